// Plots with the vendored uPlot (global `uPlot`, loaded by index.html): waveform envelopes and f0 contours.

import { envelope } from "./audio.js";

const Y_AXIS_SIZE = 56; // the same for every plot, so that their time axes line up
const NOTE_NAMES = ["C", "C♯", "D", "D♯", "E", "F", "F♯", "G", "G♯", "A", "A♯", "B"];

export function hzToMidi(hz) {
  return 69 + 12 * Math.log2(hz / 440);
}

export function noteName(midi) {
  const m = Math.round(midi);
  return `${NOTE_NAMES[((m % 12) + 12) % 12]}${Math.floor(m / 12) - 1}`;
}

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function axisStyle() {
  const ink = css("--muted");
  const grid = css("--grid");
  return { stroke: ink, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
}

/** A uPlot that follows its container's width. */
class Plot {
  constructor(container, height) {
    this.container = container;
    this.height = height;
    this.plot = null;
    this.observer = new ResizeObserver(() => this.#fit());
    this.observer.observe(container);
  }

  #width() {
    return Math.max(240, Math.floor(this.container.clientWidth));
  }

  #fit() {
    if (this.plot && this.container.clientWidth > 0) this.plot.setSize({ width: this.#width(), height: this.height });
  }

  draw(opts, data) {
    if (this.plot) this.plot.destroy();
    this.plot = new uPlot({ width: this.#width(), height: this.height, ...opts }, data, this.container);
  }

  clear() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }
}

export class WaveformPlot extends Plot {
  constructor(container, label) {
    super(container, 140);
    this.label = label;
  }

  /** Draw `samples` (Float32Array) at `rate` Hz, x in seconds from 0 to `duration` (to align several plots). */
  show(samples, rate, duration) {
    const [t, lo, hi] = envelope(samples, rate);
    let peak = 0;
    for (let i = 0; i < lo.length; i++) peak = Math.max(peak, -lo[i], hi[i]);
    const top = Math.max(peak * 1.1, 0.01); // scaled to the peak: a quiet take is still visible
    const color = css("--accent");
    this.draw({
      scales: { x: { time: false, range: [0, duration] }, y: { range: [-top, top] } },
      legend: { show: false },
      cursor: { y: false, points: { show: false } },
      series: [{}, { stroke: color, width: 1 }, { stroke: color, width: 1 }],
      bands: [{ series: [2, 1], fill: css("--accent-soft") }],
      axes: [{ ...axisStyle(), label: "seconds", labelSize: 18, size: 34 },
        { ...axisStyle(), size: Y_AXIS_SIZE, label: "level", labelSize: 18, splits: () => [-peak, 0, peak],
          values: (u, splits) => splits.map((v) => (v === 0 ? "0" : v.toFixed(peak < 0.1 ? 3 : 2))) }],
    }, [Array.from(t), Array.from(lo), Array.from(hi)]);
    const dbfs = peak > 0 ? (20 * Math.log10(peak)).toFixed(1) : "-inf";
    this.container.dataset.peak = String(peak);
    this.container.setAttribute("aria-label", `${this.label}: waveform, ${duration.toFixed(2)} seconds, `
      + `peak ${dbfs} dBFS`);
    return dbfs;
  }
}

export class F0Plot extends Plot {
  constructor(container) {
    super(container, 260);
  }

  /**
   * `f0` from `POST /convert?include=f0`: {frame_s, source_hz, used_hz}; `unit` "hz" or "note".
   * Unvoiced frames (0 Hz) are gaps. Returns the number of voiced frames drawn.
   */
  show(f0, unit, duration) {
    const toY = unit === "note" ? (hz) => (hz > 0 ? hzToMidi(hz) : null) : (hz) => (hz > 0 ? hz : null);
    const times = f0.source_hz.map((_, i) => i * f0.frame_s);
    const source = f0.source_hz.map(toY);
    const used = f0.used_hz.map(toY);
    const voiced = used.filter((v) => v !== null).length;
    const values = [...source, ...used].filter((v) => v !== null);
    let lo = values.length ? Math.min(...values) : unit === "note" ? 48 : 80;
    let hi = values.length ? Math.max(...values) : unit === "note" ? 72 : 400;
    if (unit === "note") {
      lo = Math.floor(lo) - 2;
      hi = Math.ceil(hi) + 2;
    } else {
      lo = Math.max(0, lo * 0.85);
      hi = hi * 1.1;
    }
    const yAxis = unit === "note"
      ? {
        ...axisStyle(), size: Y_AXIS_SIZE, label: "note", labelSize: 18,
        splits: (u, axis, min, max) => {
          const step = max - min > 36 ? 12 : max - min > 14 ? 4 : 1;
          const out = [];
          for (let m = Math.ceil(min / step) * step; m <= max; m += step) out.push(m);
          return out;
        },
        values: (u, splits) => splits.map(noteName),
      }
      : { ...axisStyle(), size: Y_AXIS_SIZE, label: "Hz", labelSize: 18 };
    const fmt = unit === "note"
      ? (u, v) => (v === null || v === undefined ? "–" : `${noteName(v)} (${(440 * 2 ** ((v - 69) / 12)).toFixed(1)} Hz)`)
      : (u, v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} Hz`);
    this.draw({
      scales: { x: { time: false, range: [0, duration] }, y: { range: [lo, hi] } },
      series: [
        { label: "time", value: (u, v) => (v === null || v === undefined ? "–" : `${v.toFixed(2)} s`) },
        { label: "input f0", stroke: css("--muted"), width: 1.5, dash: [4, 3], spanGaps: false, value: fmt,
          points: { show: false } },
        { label: "f0 used", stroke: css("--accent"), width: 2, spanGaps: false, value: fmt, points: { show: false } },
      ],
      axes: [{ ...axisStyle(), label: "seconds", labelSize: 18, size: 34 }, yAxis],
    }, [times, source, used]);
    this.container.dataset.points = String(voiced);
    this.container.dataset.unit = unit;
    this.container.setAttribute("aria-label",
      `Pitch contour: ${voiced} voiced frames of ${times.length}, input f0 and the f0 used`);
    return voiced;
  }
}
