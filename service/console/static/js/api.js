// The page's only way to the server: the documented HTTP API, with the API key (when the server has one)
// sent as a bearer header. The key is kept for this tab only (sessionStorage), never in a cookie.

const KEY_SLOT = "rvc-lora-api-key";

export class ApiError extends Error {
  /** An HTTP error with the service's envelope `{"error": {"code", "message"}}` (or a network failure: status 0). */
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  describe() {
    return this.status ? `${this.message} (HTTP ${this.status}, ${this.code})` : this.message;
  }
}

let askForKey = null; // set by keys.js: (reason) => Promise<string|null>

export function onKeyNeeded(handler) {
  askForKey = handler;
}

export function currentKey() {
  return sessionStorage.getItem(KEY_SLOT);
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch {
    // not the JSON envelope (a proxy's page, say): keep the status line
  }
  return new ApiError(response.status, code, message);
}

/**
 * fetch() against the API. A 401 asks for the key (once per call) and retries with it; other
 * non-2xx answers throw ApiError. Returns the Response.
 */
export async function request(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers(options.headers || {});
    const key = currentKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiError(0, "network", `cannot reach the server: ${err.message}`);
    }
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401 && askForKey && attempt < 3) {
      const given = await askForKey(key ? "The server refused this key." : "This server needs an API key.");
      if (given) continue;
    }
    throw error;
  }
}

export async function getJson(path) {
  return (await request(path)).json();
}

export async function sendJson(path, method, body) {
  const response = await request(path, {
    method,
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return response.status === 204 ? null : response.json();
}

/** One page of `GET /adapters` (search `q`, `limit`, `offset`). */
export function listAdapters({ q = "", limit = 50, offset = 0 } = {}) {
  const params = new URLSearchParams({ limit: String(limit), offset: String(offset) });
  if (q) params.set("q", q);
  return getJson(`/adapters?${params}`);
}
