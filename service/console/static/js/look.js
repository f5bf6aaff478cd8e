// Look: the waveforms of a result's input and output, and the pitch contour its conversion used.

import { decodeMono } from "./audio.js";
import { $, el } from "./dom.js";
import { F0Plot, WaveformPlot, hzToMidi, noteName } from "./plots.js";
import { on, state } from "./state.js";

let inPlot;
let outPlot;
let f0Plot;
const decoded = new WeakMap(); // result -> decoded output samples

function median(values) {
  if (!values.length) return null;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function describeF0(f0) {
  const voiced = f0.used_hz.filter((v) => v > 0);
  const share = f0.used_hz.length ? (100 * voiced.length) / f0.used_hz.length : 0;
  const src = median(f0.source_hz.filter((v) => v > 0));
  const used = median(voiced);
  if (!voiced.length) return `No voiced frames: the ${f0.f0_method} pitch tracker found no pitch in this input.`;
  const shift = f0.f0_up_key ? ` (f0_up_key ${f0.f0_up_key > 0 ? "+" : ""}${f0.f0_up_key})` : "";
  return `${share.toFixed(0)}% of ${f0.used_hz.length} frames voiced · median input ${src.toFixed(1)} Hz `
    + `(${noteName(hzToMidi(src))}) → used ${used.toFixed(1)} Hz (${noteName(hzToMidi(used))})${shift} · `
    + `method ${f0.f0_method}`;
}

function unit() {
  return document.querySelector("input[name=f0-unit]:checked").value;
}

async function show(result) {
  const picker = $("#look-result");
  const empty = !result;
  $("#look-empty").hidden = !empty;
  $("#look-body").hidden = empty;
  if (empty) return;
  picker.value = String(result.n);
  const duration = Math.max(result.duration || 0, result.input.duration || 0) || 1;
  let inPeak = "";
  if (result.input.samples) inPeak = ` · peak ${inPlot.show(result.input.samples, result.input.rate, duration)} dBFS`;
  else inPlot.clear();
  $("#look-in-caption").textContent = `Input: ${result.input.name}${inPeak}`;
  if (!decoded.has(result)) decoded.set(result, await decodeMono(await result.blob.arrayBuffer()));
  const out = decoded.get(result);
  const outPeak = outPlot.show(out.samples, out.rate, duration);
  $("#look-out-caption").textContent = `Output #${result.n}: ${result.voice} (${result.settings}) · peak ${outPeak} dBFS`;
  const summary = $("#f0-summary");
  if (result.f0) {
    f0Plot.show(result.f0, unit(), duration);
    summary.textContent = describeF0(result.f0);
  } else {
    f0Plot.clear();
    summary.textContent = "This base model does not use f0: there is no pitch contour.";
  }
}

function refreshPicker() {
  const picker = $("#look-result");
  picker.replaceChildren(...state.results.map((r) => el("option", { value: String(r.n) }, `#${r.n} · ${r.voice}`)));
  if (state.selected && !state.results.includes(state.selected)) state.selected = state.results[0] || null;
}

export function setupLook() {
  inPlot = new WaveformPlot($("#plot-in"), "Input");
  outPlot = new WaveformPlot($("#plot-out"), "Output");
  f0Plot = new F0Plot($("#plot-f0"));
  $("#look-result").addEventListener("change", (e) => {
    state.selected = state.results.find((r) => String(r.n) === e.target.value) || null;
    show(state.selected);
  });
  for (const radio of document.querySelectorAll("input[name=f0-unit]")) {
    radio.addEventListener("change", () => state.selected && state.selected.f0 && f0Plot.show(
      state.selected.f0, unit(), Math.max(state.selected.duration, state.selected.input.duration || 0)));
  }
  on("result", () => refreshPicker());
  on("results-changed", () => {
    refreshPicker();
    if (document.body.dataset.view === "look") show(state.selected);
  });
  on("select", () => refreshPicker());
  on("view", (view) => view === "look" && show(state.selected));
  refreshPicker();
}
