// The server's JSON API as the pages use it: reads need nothing; actions carry the
// bearer token the user typed (kept in sessionStorage, so it dies with the tab).

const TOKEN_KEY = "tally.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  document.dispatchEvent(new CustomEvent("tally:token"));
}

/** An answer other than 2xx, with the server's `detail` when it sent one. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }

  /** A sentence for the page. */
  explain() {
    if (this.status === 401) {
      return token()
        ? "Refused (401): the token you set is not the server's. Click “Token” to change it."
        : "Refused (401): this server needs its token for actions. Click “Token” to enter it.";
    }
    if (this.status === 0) return `The server did not answer: ${this.detail}`;
    return `Refused (${this.status}): ${this.detail}`;
  }
}

async function problem(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    return body.detail || body.reason || body.error || text;
  } catch {
    return text || res.statusText;
  }
}

async function request(method, path, { body, json, headers = {} } = {}) {
  const init = { method, headers: { ...headers } };
  if (method !== "GET") {
    const t = token();
    if (t) init.headers.Authorization = `Bearer ${t}`;
  }
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, e.message);
  }
  if (!res.ok) throw new ApiError(res.status, await problem(res));
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") || "";
  return type.includes("json") ? res.json() : res.text();
}

export const get = (path) => request("GET", path);
export const post = (path, json) => request("POST", path, { json: json ?? {} });
export const del = (path) => request("DELETE", path);
export const put = (path, body, type) =>
  request("PUT", path, { body, headers: { "Content-Type": type || "application/octet-stream" } });

/** `a=1&b=2` from an object, leaving out empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}
