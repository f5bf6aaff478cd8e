// Small DOM helpers: elements from attributes and children (text is always set as text, never as HTML).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null || child === "") continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function formatSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - 60 * m)} s`;
}

let toastTimer = null;

/** A short message in the polite live region at the bottom of the page. */
export function toast(message, kind = "info") {
  const node = document.getElementById("toast");
  node.textContent = message;
  node.dataset.kind = kind;
  node.classList.add("shown");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => node.classList.remove("shown"), 4000);
}

/** Show `error` (an ApiError or any Error) in `node` (a role=alert element), or clear it with null. */
export function showError(node, error) {
  node.hidden = !error;
  node.textContent = error ? (error.describe ? error.describe() : error.message) : "";
}
