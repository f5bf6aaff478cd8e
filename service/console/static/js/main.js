// Start-up and navigation: wait for the service, read its contract, then show the view named in the URL hash.

import { getJson } from "./api.js";
import { setupConvert } from "./convert.js";
import { $, showError } from "./dom.js";
import { setupKeys } from "./keys.js";
import { setupLive } from "./live.js";
import { setupLook } from "./look.js";
import { emit, state } from "./state.js";
import { setupStatus } from "./status.js";
import { setupVoices } from "./voices.js";

const VIEWS = { convert: "Convert", look: "Look", voices: "Voices", live: "Live", status: "Status" };

function route(initial = false) {
  const name = location.hash.slice(1);
  const view = name in VIEWS ? name : "convert";
  for (const section of document.querySelectorAll("main > section[data-view]")) {
    section.hidden = section.dataset.view !== view;
  }
  for (const link of document.querySelectorAll("nav a[href^='#']")) {
    if (link.getAttribute("href") === `#${view}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.body.dataset.view = view;
  document.title = `${VIEWS[view]} · rvc-lora console`;
  if (!initial) $(`#view-${view} h2`).focus({ preventScroll: true }); // screen readers hear the new view
  emit("view", view);
}

async function readiness() {
  const pill = $("#server-state");
  for (;;) {
    let body = { state: "unreachable", ready: false };
    try {
      body = await (await fetch("/readyz")).json(); // open route: no key, 503 until ready
    } catch {
      // the server is restarting: try again
    }
    pill.textContent = body.state;
    pill.dataset.state = body.state;
    if (body.ready) return;
    $("#boot-status").textContent = body.state === "failed"
      ? "The models failed to load: see the server log."
      : `Waiting for the service (${body.state})…`;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function start() {
  setupKeys();
  try {
    await readiness();
    state.openapi = await getJson("/openapi.json"); // asks for the key first when the server has one
    state.model = await getJson("/model");
  } catch (err) {
    $("#boot-status").textContent = "";
    showError($("#boot-error"), err);
    return;
  }
  $("#boot").hidden = true;
  setupConvert();
  setupLook();
  setupVoices();
  setupStatus();
  setupLive();
  window.addEventListener("hashchange", () => route());
  route(true);
  document.body.dataset.ready = "true";
}

start();
