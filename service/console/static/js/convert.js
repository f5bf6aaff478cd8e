// Convert: pick a voice, give audio (file or microphone), set RVC's parameters, convert, listen, compare.

import { request } from "./api.js";
import { Recorder, base64ToBytes, decodeMono } from "./audio.js";
import { $, el, formatSeconds, showError, toast } from "./dom.js";
import { AdapterPager, adapterOption, adapterTitle } from "./pager.js";
import { ParamsForm, convertSchema } from "./params.js";
import { emit, on, state } from "./state.js";

const BASE = ""; // the option value of the base voice (no adapter)
const KEEP_RESULTS = 8;
let params = null;
let input = null; // {name, blob, samples, rate, duration}
let recorder = null;
let counter = 0;
const titles = new Map(); // adapter id -> display title, for result labels

function parseServerTiming(header) {
  const out = {};
  for (const part of (header || "").split(",")) {
    const [name, ...rest] = part.trim().split(";");
    const dur = rest.find((r) => r.trim().startsWith("dur="));
    if (name && dur) out[name] = Number(dur.split("=")[1]) / 1000;
  }
  return out;
}

async function useInput(name, blob) {
  const error = $("#input-error");
  showError(error, null);
  try {
    const decoded = await decodeMono(await blob.arrayBuffer());
    input = { name, blob, ...decoded };
  } catch {
    input = { name, blob, samples: null, rate: 0, duration: null };
  }
  const preview = $("#input-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  $("#input-info").textContent = input.duration === null
    ? `${name}: the browser cannot decode it to draw it; the server may still read it`
    : `${name}: ${formatSeconds(input.duration)}`;
  $("#convert-btn").disabled = false;
}

function setupInput() {
  const file = $("#audio-file");
  file.addEventListener("change", () => {
    if (file.files.length) useInput(file.files[0].name, file.files[0]);
  });
  const drop = $("#drop-zone");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) useInput(f.name, f);
  });

  for (const radio of document.querySelectorAll("input[name=source]")) {
    radio.addEventListener("change", () => {
      $("#source-file").hidden = radio.value !== "file" || !radio.checked;
      $("#source-mic").hidden = radio.value !== "mic" || !radio.checked;
    });
  }

  const button = $("#record-btn");
  const meter = $("#record-level");
  const time = $("#record-time");
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    button.disabled = true;
    time.textContent = "This browser cannot record here (the microphone needs HTTPS or localhost).";
  }
  button.addEventListener("click", async () => {
    const error = $("#input-error");
    if (recorder && recorder.recording) {
      button.disabled = true;
      try {
        const wav = await recorder.stop();
        await useInput(`recording-${new Date().toISOString().slice(11, 19).replaceAll(":", "")}.wav`, wav);
      } catch (err) {
        showError(error, err);
      } finally {
        button.disabled = false;
        button.textContent = "Record";
        button.setAttribute("aria-pressed", "false");
        meter.value = 0;
      }
      return;
    }
    recorder = new Recorder();
    try {
      await recorder.start((peak, seconds) => {
        meter.value = peak;
        time.textContent = `recording ${seconds.toFixed(1)} s`;
      });
      button.textContent = "Stop";
      button.setAttribute("aria-pressed", "true");
      showError(error, null);
    } catch (err) {
      showError(error, new Error(`microphone: ${err.message}`));
    }
  });
}

function setupVoicePicker() {
  const list = $("#voice-list");
  const pager = new AdapterPager(
    { search: $("#voice-search"), prev: $("#voice-prev"), next: $("#voice-next"), info: $("#voice-info") },
    50,
    (page) => {
      const chosen = list.value;
      list.replaceChildren(el("option", { value: BASE }, "Base voice (no adapter)"));
      for (const a of page.adapters) {
        titles.set(a.id, adapterTitle(a));
        list.append(adapterOption(a));
      }
      list.value = [...list.options].some((o) => o.value === chosen) ? chosen : BASE;
      showError($("#voice-error"), null);
    },
    (err) => showError($("#voice-error"), err),
  );
  on("adapters-changed", () => pager.load());
  return pager;
}

function renderResult(result) {
  const id = `result-${result.n}`;
  const audio = el("audio", { controls: true, preload: "auto", src: result.url, "aria-labelledby": `${id}-title` });
  audio.dataset.duration = String(result.duration);
  const compute = Object.entries(result.timing).filter(([k]) => k !== "queue" && k !== "decode" && k !== "encode")
    .reduce((sum, [, v]) => sum + v, 0);
  const card = el("article", { class: "result", id, "aria-labelledby": `${id}-title` },
    el("header", {},
      el("h3", { id: `${id}-title` }, `#${result.n} · ${result.voice}`),
      el("span", { class: "tag" }, result.mediaType.split("/")[1]),
      el("button", { type: "button", class: "quiet close", "aria-label": `Remove result ${result.n}`,
        title: "Remove", onclick: () => removeResult(result) }, "✕")),
    el("p", { class: "settings" }, result.settings),
    audio,
    el("p", { class: "meta" },
      `${formatSeconds(result.duration)} at ${result.sr} Hz · converted in ${formatSeconds(compute)}`
      + (result.duration ? ` (RTF ${(compute / result.duration).toFixed(2)})` : "")
      + (result.cache ? ` · adapter cache ${result.cache}` : "")),
    el("div", { class: "actions" },
      el("a", { class: "button", href: result.url, download: result.filename }, "Download"),
      el("button", { type: "button", onclick: () => switchTo(audio),
        title: "Pause the result that is playing and continue in this one at the same moment" }, "A/B switch"),
      el("button", { type: "button", onclick: () => { state.selected = result; emit("select", result); location.hash = "#look"; } },
        "Look")));
  result.card = card;
  $("#results").prepend(card);
  $("#results-empty").hidden = true;
}

function switchTo(target) {
  const playing = [...document.querySelectorAll("#results audio")].find((a) => a !== target && !a.paused);
  if (playing) {
    target.currentTime = Math.min(playing.currentTime, target.duration || playing.currentTime);
    playing.pause();
  }
  target.play();
}

function removeResult(result) {
  state.results = state.results.filter((r) => r !== result);
  result.card.remove();
  URL.revokeObjectURL(result.url);
  $("#results-empty").hidden = state.results.length > 0;
  emit("results-changed");
}

async function convert() {
  const status = $("#convert-status");
  const error = $("#convert-error");
  showError(error, null);
  if (!input) {
    showError(error, new Error("Choose an audio file or record one first."));
    return;
  }
  if (!params.validate()) return;
  const form = new FormData();
  form.append("audio", input.blob, input.name);
  const adapter = $("#voice-list").value;
  if (adapter !== BASE) form.append("adapter", adapter);
  for (const [k, v] of Object.entries(params.values())) form.append(k, v);
  const button = $("#convert-btn");
  button.disabled = true;
  status.textContent = "Converting…";
  const started = performance.now();
  try {
    const response = await request("/convert?include=f0", { method: "POST", body: form });
    const body = await response.json();
    const bytes = base64ToBytes(body.audio.data);
    const blob = new Blob([bytes], { type: body.audio.media_type });
    const n = ++counter;
    const voice = adapter === BASE ? "base voice" : titles.get(adapter) || adapter;
    const ext = body.audio.media_type.split("/")[1];
    const stem = input.name.replace(/\.[^.]+$/, "");
    const result = {
      n, voice, settings: params.summary(), url: URL.createObjectURL(blob), blob, mediaType: body.audio.media_type,
      filename: `${stem}-${voice.replace(/[^A-Za-z0-9._-]+/g, "_")}-${n}.${ext}`, duration: body.audio.duration_s,
      sr: body.audio.sr, f0: body.f0, input, timing: parseServerTiming(response.headers.get("Server-Timing")),
      cache: response.headers.get("X-Adapter-Cache") && adapter !== BASE ? response.headers.get("X-Adapter-Cache") : null,
    };
    state.results.unshift(result);
    for (const old of state.results.slice(KEEP_RESULTS)) removeResult(old);
    renderResult(result);
    state.selected = result;
    emit("result", result);
    status.textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s: result #${n}.`;
    toast(`Result #${n} is ready`);
  } catch (err) {
    status.textContent = "";
    showError(error, err);
  } finally {
    button.disabled = false;
  }
}

export function setupConvert() {
  setupInput();
  const pager = setupVoicePicker();
  params = new ParamsForm($("#params"), convertSchema(state.openapi), state.model);
  $("#params-reset").addEventListener("click", () => params.reset());
  $("#convert-form").addEventListener("submit", (e) => {
    e.preventDefault();
    convert();
  });
  pager.load(0);
}
