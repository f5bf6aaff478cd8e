// Live: the microphone through WebSocket /stream (float32 mono at the audio context's rate), the converted
// blocks played back in order as they come, with the latency the server reports and the time each block took.
// When the server falls behind (a slow machine, the first blocks while it warms up), microphone audio is
// dropped here rather than queued: the server closes a stream with more than `buffer_blocks` waiting, and
// live speech that arrives late is worth less than a short gap.

import { currentKey } from "./api.js";
import { $, showError } from "./dom.js";

let session = null;

function voice() {
  const chosen = $("#voice-list").value;
  return chosen === "" ? null : chosen;
}

async function start() {
  const status = $("#live-status");
  showError($("#live-error"), null);
  const ctx = new AudioContext();
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  await ctx.audioWorklet.addModule("/console/js/capture-worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(ctx, "rvc-capture");
  source.connect(capture);
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/stream`);
  ws.binaryType = "arraybuffer";
  const pitch = Number($("#live-pitch").value || 0);
  const s = { ctx, stream, ws, capture, next: 0, blocks: 0, pending: null, sent: 0, dropped: 0, block: 0, room: 1 };
  session = s;
  ws.addEventListener("open", () => {
    const config = { adapter: voice(), format: "float32", sample_rate: ctx.sampleRate, channels: 1, f0_up_key: pitch };
    if (currentKey()) config.token = currentKey();
    ws.send(JSON.stringify(config));
  });
  ws.addEventListener("message", (event) => {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if (msg.type === "ready") {
        $("#live-latency").textContent = `${(msg.latency_s * 1000).toFixed(0)} ms algorithmic latency ·`;
        s.block = msg.block_samples;
        s.room = Math.max(1, msg.buffer_blocks - 1); // one block of margin: the server counts its own way
        capture.port.onmessage = (e) => send(s, e.data);
        status.textContent = "Live: speak into the microphone.";
      } else if (msg.type === "block") {
        s.pending = msg;
      } else if (msg.type === "error") {
        showError($("#live-error"), new Error(msg.message));
      }
      return;
    }
    const samples = new Float32Array(event.data);
    const buffer = ctx.createBuffer(1, samples.length, ctx.sampleRate);
    buffer.copyToChannel(samples, 0);
    const node = ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(ctx.destination);
    s.next = Math.max(s.next, ctx.currentTime + 0.02);
    node.start(s.next);
    s.next += buffer.duration;
    s.blocks += 1;
    const info = (s.pending ? ` · last block ${s.pending.server_ms.toFixed(0)} ms on the server`
      + (s.pending.late_blocks ? ` · ${s.pending.late_blocks} late` : "") : "")
      + (s.dropped ? ` · ${(s.dropped / ctx.sampleRate).toFixed(1)} s of input dropped (the server is behind)` : "");
    $("#live-blocks").textContent = `${s.blocks} blocks played${info}`;
    $("#live-blocks").dataset.blocks = String(s.blocks);
  });
  ws.addEventListener("close", (event) => {
    if (!s.stopping) {
      showError($("#live-error"), new Error(`the server ended the stream (${event.code}${event.reason ? `: ${event.reason}` : ""})`));
    }
    stop(s);
  });
}

// Send a captured chunk unless the blocks sent and not yet returned fill the server's buffer.
function send(s, samples) {
  if (s.ws.readyState !== WebSocket.OPEN) return;
  const inFlight = Math.floor(s.sent / s.block) - s.blocks;
  if (inFlight >= s.room) {
    s.dropped += samples.length;
    return;
  }
  s.ws.send(samples.buffer);
  s.sent += samples.length;
}

function stop(s = session) {
  if (!s || s.stopping) return;
  if (session === s) session = null;
  s.stopping = true;
  s.capture.port.onmessage = null;
  s.stream.getTracks().forEach((t) => t.stop());
  if (s.ws.readyState === WebSocket.OPEN) s.ws.close(1000);
  s.ctx.close();
  $("#live-btn").textContent = "Start live conversion";
  $("#live-btn").setAttribute("aria-pressed", "false");
  $("#live-status").textContent = "Stopped.";
}

export function setupLive() {
  const button = $("#live-btn");
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    button.disabled = true;
    $("#live-status").textContent = "This browser cannot capture audio here (the microphone needs HTTPS or localhost).";
    return;
  }
  button.addEventListener("click", async () => {
    if (session) {
      stop();
      return;
    }
    button.textContent = "Stop";
    button.setAttribute("aria-pressed", "true");
    try {
      await start();
    } catch (err) {
      showError($("#live-error"), err);
      if (session) stop();
      button.textContent = "Start live conversion";
      button.setAttribute("aria-pressed", "false");
    }
  });
}
