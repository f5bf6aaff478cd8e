// Status: GET /status every few seconds while the view is open (model, device, queue, throughput, RTF, adapters).

import { getJson } from "./api.js";
import { $, el, formatBytes, formatSeconds, showError } from "./dom.js";
import { on } from "./state.js";

const EVERY_MS = 2000;
let timer = null;

function tile(label, value, detail = "") {
  return el("div", { class: "tile" }, el("span", { class: "tile-label" }, label),
    el("span", { class: "tile-value" }, value), detail ? el("span", { class: "tile-detail" }, detail) : "");
}

function num(v, digits = 2) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

function render(s) {
  const q = s.queue;
  const jobs = Object.entries(s.jobs).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(" · ") || "none yet";
  const fill = Math.min(1, q.audio_s / q.max_audio_s);
  const queueBar = el("progress", { max: "1", value: String(fill), "aria-label": "queue fill" });
  $("#status-tiles").replaceChildren(
    tile("State", s.state, `up ${formatSeconds(s.uptime_s)}`),
    tile("Device", s.model ? s.model.device : "–", s.model ? `${s.model.version}, ${s.model.sr / 1000} kHz` : "loading"),
    el("div", { class: "tile" }, el("span", { class: "tile-label" }, "Queue"),
      el("span", { class: "tile-value" }, `${num(q.audio_s, 1)} s`),
      queueBar,
      el("span", { class: "tile-detail" },
        `${q.jobs} job${q.jobs === 1 ? "" : "s"} waiting · limit ${q.max_audio_s} s`
        + (q.wait_s ? ` · clears in ~${formatSeconds(q.wait_s)}` : ""))),
    tile("Throughput", s.throughput === null ? "–" : `${num(s.throughput, 1)}×`,
      "real time: seconds of audio converted per device second"),
    tile("Real-time factor", num(s.rtf, 3), `recent; mean since start ${num(s.rtf_mean, 3)}`),
    tile("Adapters", String(s.adapters_stored), `${s.adapters_on_device} on the device · `
      + `${s.adapters_in_host_memory} in host memory`),
    tile("Jobs", String(Object.values(s.jobs).reduce((a, b) => a + b, 0)), jobs),
  );
  const m = s.model;
  $("#status-model").replaceChildren(...(m ? [
    ["fingerprint", m.fingerprint.slice(0, 16) + "…"], ["version", m.version], ["sample rate", `${m.sr} Hz`],
    ["f0", m.f0 ? "yes" : "no"], ["speakers", m.n_speakers], ["content features", m.content_dim],
    ["max rank", m.max_rank], ["f0 methods", m.f0_methods.join(", ")], ["LoRA layers", m.target_modules.length],
    ["longest audio", formatSeconds(m.limits.max_audio_s)], ["largest audio upload", formatBytes(m.limits.max_audio_bytes)],
    ["largest adapter", formatBytes(m.limits.max_adapter_bytes)], ["request timeout", formatSeconds(m.limits.request_timeout_s)],
  ].flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]) : [el("dt", {}, "model"), el("dd", {}, "loading…")]));
  $("#status-updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

async function poll() {
  try {
    render(await getJson("/status"));
    showError($("#status-error"), null);
  } catch (err) {
    showError($("#status-error"), err);
  }
}

export function setupStatus() {
  on("view", (view) => {
    clearInterval(timer);
    timer = null;
    if (view === "status") {
      poll();
      timer = setInterval(poll, EVERY_MS);
    }
  });
}
