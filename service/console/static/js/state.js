// What the views share: the server's contract and model, and the conversions made in this tab.

export const state = {
  openapi: null, // GET /openapi.json
  model: null, // GET /model
  results: [], // newest first: {n, voice, settings, url, mediaType, filename, duration, sr, f0, input, timing}
  selected: null, // the result shown in Look
  events: new EventTarget(),
};

export function emit(name, detail) {
  state.events.dispatchEvent(new CustomEvent(name, { detail }));
}

export function on(name, handler) {
  state.events.addEventListener(name, (e) => handler(e.detail));
}
