// The API key dialog: asked once when the server answers 401, kept for this tab only.

import { currentKey, onKeyNeeded, setKey } from "./api.js";

let pending = null; // one dialog for every request that needs the key at the same time

export function setupKeys() {
  const dialog = document.getElementById("key-dialog");
  const form = dialog.querySelector("form");
  const input = document.getElementById("key-input");
  const reason = document.getElementById("key-reason");
  const forget = document.getElementById("key-forget");

  const refreshButton = () => {
    forget.hidden = !currentKey();
  };
  refreshButton();
  forget.addEventListener("click", () => {
    setKey(null);
    refreshButton();
    forget.blur();
  });

  onKeyNeeded((why) => {
    if (pending) return pending;
    pending = new Promise((resolve) => {
      const refused = Boolean(currentKey());
      reason.textContent = why;
      reason.classList.toggle("error", refused);
      reason.setAttribute("role", refused ? "alert" : "status");
      input.value = "";
      input.setAttribute("aria-invalid", refused ? "true" : "false");
      const finish = (key) => {
        form.removeEventListener("submit", onSubmit);
        dialog.removeEventListener("close", onClose);
        if (dialog.open) dialog.close();
        pending = null;
        refreshButton();
        resolve(key);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) {
          input.focus();
          return;
        }
        setKey(key);
        finish(key);
      };
      const onClose = () => finish(null);
      form.addEventListener("submit", onSubmit);
      dialog.addEventListener("close", onClose);
      dialog.showModal();
      input.focus();
    });
    return pending;
  });
}
