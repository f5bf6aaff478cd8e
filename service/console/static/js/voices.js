// Voices: upload adapters (.safetensors + optional .index) or full RVC voices (.pth, .zip) and see the
// extraction report; list, search, rename, delete, details.

import { getJson, request, sendJson } from "./api.js";
import { $, el, formatBytes, showError, toast } from "./dom.js";
import { AdapterPager, adapterTitle } from "./pager.js";
import { emit, on } from "./state.js";

let pager;

function fmt(value, digits = 1, unit = "") {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(digits)}${unit}`;
}

function definitionList(pairs) {
  const dl = el("dl", { class: "facts" });
  for (const [k, v] of pairs) dl.append(el("dt", {}, k), el("dd", {}, v));
  return dl;
}

function adapterFacts(a) {
  return [
    ["name", a.name || "(none)"], ["id", a.id], ["label in the file", a.label], ["rank", a.rank],
    ["lora_alpha", a.lora_alpha], ["size", formatBytes(a.size_bytes)],
    ["index", a.has_index ? formatBytes(a.index_bytes) : "none"], ["sample rate", `${a.sr} Hz`],
    ["version", a.version], ["f0", a.f0 ? "yes" : "no"], ["created", new Date(a.created_at).toLocaleString()],
    ["layers", a.target_modules.length <= 6 ? a.target_modules.join(", ") : `${a.target_modules.length} layers`],
    ["sha256", a.sha256], ["base fingerprint", a.base_fingerprint],
  ];
}

const GOOD_SNR_DB = 20; // as `rvc-lora extract`: below it the adapter audibly differs from the full voice

function worstLayers(layers) {
  const head = el("tr", {}, ...["layer", "rank", "rel. error", "energy kept"].map((h) => el("th", { scope: "col" }, h)));
  const rows = layers.map((x) => el("tr", {},
    el("td", {}, el("code", {}, x.name)), el("td", { class: "num" }, x.rank),
    el("td", { class: "num" }, fmt(x.rel_error, 4)), el("td", { class: "num" }, fmt(100 * x.energy_kept, 2, " %"))));
  return el("div", { class: "table-wrap" }, el("table", { class: "worst-layers" },
    el("caption", {}, "Layers that fit worst"), el("thead", {}, head), el("tbody", {}, ...rows)));
}

// `r`: an `Extraction` (POST /adapters after a .pth/.zip, or GET /adapters/{id} of an extracted adapter).
function extractionReport(r, idPrefix) {
  const rows = [
    ["waveform SNR vs the full voice", fmt(r.snr_db, 1, " dB")],
    ["plain base's SNR (for scale)", fmt(r.base_snr_db, 1, " dB")],
    ["rank", r.requested_rank && r.requested_rank !== r.rank ? `${r.rank} (asked ${r.requested_rank})` : r.rank],
    ["layers", `${r.targets === "all" ? "every layer" : "decoder"}: ${r.layer_count} low-rank, ${r.full_delta_count} kept whole`],
    ["adapter size", formatBytes(r.adapter_bytes)], ["voice model size", formatBytes(r.voice_bytes)],
    ["size ratio", `1/${fmt(r.size_ratio, 1)}`],
    ["layer error (worst, mean)", `${fmt(r.max_rel_error, 4)}, ${fmt(r.mean_rel_error, 4)}`],
  ];
  if (r.seconds !== null && r.seconds !== undefined) rows.push(["time", fmt(r.seconds + (r.eval_seconds || 0), 2, " s")]);
  const title = `${idPrefix}-report-title`;
  const box = el("section", { class: "report", "aria-labelledby": title },
    el("h3", { id: title }, "Extraction report"));
  if (r.snr_db !== null && r.snr_db !== undefined) {
    const good = r.snr_db >= GOOD_SNR_DB;
    const hint = r.targets !== "all" ? "every layer (targets all)" : `a higher rank (${Math.min(4 * r.rank, 256)})`;
    box.append(el("p", { class: good ? "verdict good" : "verdict warn", role: "status" }, good
      ? `Close to the full voice (${fmt(r.snr_db, 1)} dB SNR).`
      : `Audibly different from the full voice (${fmt(r.snr_db, 1)} dB SNR, below ${GOOD_SNR_DB} dB): ` +
        `extract with ${hint}, or use the full voice itself.`));
  }
  box.append(definitionList(rows));
  if (r.worst_layers && r.worst_layers.length) box.append(worstLayers(r.worst_layers));
  if (r.notes && r.notes.length) box.append(el("ul", { class: "notes" }, ...r.notes.map((n) => el("li", {}, n))));
  return box;
}

async function upload(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("#upload-error");
  const out = $("#upload-result");
  showError(error, null);
  const file = $("#upload-file").files[0];
  if (!file) {
    showError(error, new Error("Choose a .safetensors adapter or a .pth/.zip voice model."));
    return;
  }
  const data = new FormData();
  data.append("file", file, file.name);
  const index = $("#upload-index").files[0];
  if (index) data.append("index", index, index.name);
  const name = $("#upload-name").value.trim();
  if (name) data.append("name", name);
  const rank = $("#upload-rank").value.trim();
  if (rank && !file.name.toLowerCase().endsWith(".safetensors")) data.append("rank", rank);
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  const voice = !file.name.toLowerCase().endsWith(".safetensors");
  $("#upload-status").textContent = voice ? "Uploading and extracting an adapter (this can take a while)…" : "Uploading…";
  out.replaceChildren();
  try {
    const response = await request("/adapters", { method: "POST", body: data });
    const stored = await response.json();
    const verb = response.status === 201 ? "Stored" : "Already stored";
    $("#upload-status").textContent = `${verb}: ${adapterTitle(stored)} (${stored.id}).`;
    out.append(el("h3", {}, `${verb}: ${adapterTitle(stored)}`), definitionList(adapterFacts(stored).slice(0, 8)));
    if (stored.extraction) out.append(extractionReport(stored.extraction, "upload"));
    form.reset();
    $("#upload-rank-field").hidden = true;
    toast(`${verb} ${adapterTitle(stored)}`);
    emit("adapters-changed");
  } catch (err) {
    $("#upload-status").textContent = "";
    showError(error, err);
  } finally {
    button.disabled = false;
  }
}

async function openDetails(a) {
  // the listing is brief: the details come from GET /adapters/{id}
  try {
    const full = await getJson(`/adapters/${a.id}`);
    $("#details-title").textContent = adapterTitle(full);
    $("#details-body").replaceChildren(definitionList(adapterFacts(full)));
    if (full.extraction) $("#details-body").append(extractionReport(full.extraction, "details"));
    $("#details-dialog").showModal();
  } catch (err) {
    showError($("#voices-error"), err);
  }
}

function openRename(a) {
  const dialog = $("#rename-dialog");
  const input = $("#rename-input");
  const error = $("#rename-error");
  showError(error, null);
  $("#rename-what").textContent = `Adapter ${a.id}`;
  input.value = a.name || "";
  dialog.returnValue = "";
  dialog.showModal();
  input.select();
  const form = dialog.querySelector("form");
  form.onsubmit = async (event) => {
    event.preventDefault();
    try {
      await sendJson(`/adapters/${a.id}`, "PATCH", { name: input.value.trim() || null });
      dialog.close();
      toast(`Renamed ${a.id} to ${input.value.trim() || "(no name)"}`);
      emit("adapters-changed");
    } catch (err) {
      showError(error, err);
    }
  };
}

async function remove(a) {
  const dialog = $("#delete-dialog");
  $("#delete-what").textContent = `${adapterTitle(a)} (${a.id})`;
  showError($("#delete-error"), null);
  dialog.showModal();
  const form = dialog.querySelector("form");
  form.onsubmit = async (event) => {
    event.preventDefault();
    try {
      await request(`/adapters/${a.id}`, { method: "DELETE" });
      dialog.close();
      toast(`Deleted ${adapterTitle(a)}`);
      emit("adapters-changed");
    } catch (err) {
      showError($("#delete-error"), err);
    }
  };
}

function renderTable(page) {
  const body = $("#voices-rows");
  body.replaceChildren();
  for (const a of page.adapters) {
    const title = adapterTitle(a);
    body.append(el("tr", { "data-id": a.id },
      el("th", { scope: "row" }, title, a.name ? "" : el("span", { class: "dim" }, " (no name)")),
      el("td", {}, el("code", {}, a.id)),
      el("td", { class: "num" }, a.rank),
      el("td", {}, a.has_index ? "yes" : "–"),
      el("td", { class: "num" }, formatBytes(a.size_bytes)),
      el("td", {}, new Date(a.created_at).toLocaleDateString()),
      el("td", { class: "row-actions" },
        el("button", { type: "button", onclick: () => openDetails(a), "aria-label": `Details of ${title}` }, "Details"),
        el("button", { type: "button", onclick: () => openRename(a), "aria-label": `Rename ${title}` }, "Rename"),
        el("button", { type: "button", class: "danger", onclick: () => remove(a), "aria-label": `Delete ${title}` },
          "Delete"))));
  }
  showError($("#voices-error"), null);
}

export function setupVoices() {
  $("#upload-form").addEventListener("submit", upload);
  $("#upload-file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    $("#upload-rank-field").hidden = !f || f.name.toLowerCase().endsWith(".safetensors");
  });
  for (const dialog of document.querySelectorAll("dialog.plain")) {
    dialog.querySelector("[data-close]").addEventListener("click", () => dialog.close());
  }
  pager = new AdapterPager(
    { search: $("#voices-search"), prev: $("#voices-prev"), next: $("#voices-next"), info: $("#voices-info") },
    25, renderTable, (err) => showError($("#voices-error"), err));
  on("adapters-changed", () => pager.load());
  pager.load(0);
}
