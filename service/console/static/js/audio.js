// Audio in the browser: decoding for waveforms, WAV encoding of microphone recordings, base64 payloads.

export const VIEW_RATE = 16000; // decoded for drawing and for recordings: the service works at 16 kHz anyway

/** Decode an encoded audio file (ArrayBuffer) to mono Float32Array samples at `rate`. */
export async function decodeMono(buffer, rate = VIEW_RATE) {
  // an offline context decodes without the autoplay policy's user-gesture rule
  const ctx = new OfflineAudioContext(1, 1, rate);
  const audio = await ctx.decodeAudioData(buffer.slice(0));
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const data = audio.getChannelData(c);
    for (let i = 0; i < data.length; i++) mono[i] += data[i] / audio.numberOfChannels;
  }
  return { samples: mono, rate: audio.sampleRate, duration: audio.duration };
}

/** 16-bit PCM mono WAV of `samples` (Float32Array in [-1, 1]) at `rate`. */
export function encodeWav(samples, rate) {
  const bytes = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(bytes);
  const text = (offset, s) => [...s].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // bytes per second
  view.setUint16(32, 2, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const v = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + 2 * i, v < 0 ? v * 0x8000 : v * 0x7fff, true);
  }
  return new Blob([bytes], { type: "audio/wav" });
}

export function base64ToBytes(b64) {
  const binary = atob(b64);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

/**
 * Min/max envelope of `samples` in `buckets` columns, for drawing: returns [times, mins, maxs].
 */
export function envelope(samples, rate, buckets = 1200) {
  const n = Math.max(1, Math.min(buckets, samples.length));
  const per = samples.length / n;
  const times = new Float64Array(n);
  const mins = new Float64Array(n);
  const maxs = new Float64Array(n);
  for (let b = 0; b < n; b++) {
    const start = Math.floor(b * per);
    const stop = Math.max(start + 1, Math.floor((b + 1) * per));
    let lo = 0;
    let hi = 0;
    for (let i = start; i < stop && i < samples.length; i++) {
      if (samples[i] < lo) lo = samples[i];
      if (samples[i] > hi) hi = samples[i];
    }
    times[b] = start / rate;
    mins[b] = lo;
    maxs[b] = hi;
  }
  return [times, mins, maxs];
}

/** The microphone through MediaRecorder; `stop()` resolves to a 16 kHz mono WAV Blob. */
export class Recorder {
  async start(onLevel) {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    this.chunks = [];
    this.recorder = new MediaRecorder(this.stream);
    this.recorder.addEventListener("dataavailable", (e) => e.data.size && this.chunks.push(e.data));
    this.recorder.start(250);
    this.started = performance.now();
    if (onLevel) {
      this.ctx = new AudioContext();
      const source = this.ctx.createMediaStreamSource(this.stream);
      const analyser = this.ctx.createAnalyser();
      analyser.fftSize = 1024;
      source.connect(analyser);
      const data = new Float32Array(analyser.fftSize);
      const tick = () => {
        if (!this.recorder || this.recorder.state !== "recording") return;
        analyser.getFloatTimeDomainData(data);
        let peak = 0;
        for (const v of data) peak = Math.max(peak, Math.abs(v));
        onLevel(peak, (performance.now() - this.started) / 1000);
        this.frame = requestAnimationFrame(tick);
      };
      tick();
    }
  }

  async stop() {
    const done = new Promise((resolve) => this.recorder.addEventListener("stop", resolve, { once: true }));
    this.recorder.stop();
    await done;
    cancelAnimationFrame(this.frame);
    this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx) await this.ctx.close();
    const recorded = new Blob(this.chunks, { type: this.recorder.mimeType });
    this.recorder = null;
    // MediaRecorder writes WebM/Opus (or MP4): decode it here and send WAV, which every server build reads
    const { samples, rate } = await decodeMono(await recorded.arrayBuffer(), VIEW_RATE);
    return encodeWav(samples, rate);
  }

  get recording() {
    return Boolean(this.recorder);
  }
}
