// The gateway's API with the caller's key on every call (Authorization: Bearer, as gateway/auth.py reads it).
// The key lives in sessionStorage: it is gone when the tab closes, and never written anywhere else.
import { errorText } from "./format.js";

const KEY = "sd-console-key";
let key = sessionStorage.getItem(KEY) || "";
const refusedHandlers = [];

export class ApiError extends Error {
  constructor(status, body) {
    super(errorText(status, body));
    this.status = status;
    this.body = body;
  }
}

export function hasKey() {
  return key !== "";
}

export function setKey(value, remember) {
  key = value;
  if (remember && value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

/** Called when the gateway refuses the key after the page was let in (a key revoked meanwhile). */
export function onRefused(handler) {
  refusedHandlers.push(handler);
}

function headers(extra = {}) {
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function readBody(response) {
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }
  return response.text();
}

/** fetch with the key; JSON in and out; an ApiError for any non-2xx answer. */
export async function request(path, { method = "GET", body, signal, extraHeaders, quietRefusal = false } = {}) {
  const init = { method, signal, headers: headers(extraHeaders) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const data = await readBody(response);
  if (!response.ok) {
    if ((response.status === 401 || response.status === 403) && !quietRefusal) {
      for (const handler of refusedHandlers) handler();
    }
    throw new ApiError(response.status, data);
  }
  return data;
}

export const get = (path, options) => request(path, options);
export const post = (path, body, options) => request(path, { ...options, method: "POST", body });

/** Image bytes as a blob: URL (an <img src> cannot send the key header). The caller revokes it. */
export async function blobUrl(path, signal) {
  const response = await fetch(path, { headers: headers(), signal });
  if (!response.ok) throw new ApiError(response.status, await readBody(response));
  return URL.createObjectURL(await response.blob());
}
