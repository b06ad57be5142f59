// Small DOM helpers and formatters shared by the pages.

/** `h("a", {href: "#"}, "text", child)`: an element; attributes starting with `on` are
 * listeners, `dataset` an object of data attributes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  for (const c of children.flat()) {
    if (c !== undefined && c !== null && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export function fmtNum(n, digits = 0) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1) return `${(ms * 1000).toFixed(0)} µs`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(2)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** A time (RFC 3339 text or ms since the epoch) in the browser's zone. */
export function fmtTime(t) {
  if (t === null || t === undefined || t === "") return "–";
  const d = typeof t === "number" ? new Date(t) : new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  return d.toLocaleString("sv-SE", { hour12: false }) + `.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

export function fmtAgo(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return "just now";
  if (ms < 60000) return `${Math.round(ms / 1000)} s ago`;
  return `${Math.round(ms / 60000)} min ago`;
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

/** A stat tile: a label over a value; the value's element gets `id`. */
export function tile(label, id, hint) {
  return h("div", { class: "tile", title: hint }, h("div", { class: "label" }, label), h("div", { class: "value", id }, "–"));
}

export function setText(id, text) {
  const el = document.getElementById(id);
  if (el) el.textContent = text;
}

/** Shows a message in a notice area (`kind`: info, ok, error). */
export function notice(el, text, kind = "info") {
  if (!el) return;
  el.hidden = !text;
  el.className = `notice ${kind}`;
  el.setAttribute("role", kind === "error" ? "alert" : "status");
  el.textContent = text || "";
}

/** Asks the user through the page's confirmation dialog; resolves true on "Confirm". */
export function confirmAction(message, confirmLabel = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = message;
  document.getElementById("confirm-ok").textContent = confirmLabel;
  return new Promise((resolve) => {
    const done = () => {
      dialog.removeEventListener("close", done);
      resolve(dialog.returnValue === "ok");
    };
    dialog.addEventListener("close", done);
    dialog.returnValue = "";
    dialog.showModal();
  });
}

/** A `<pre>` of pretty JSON. */
export function jsonBlock(value, id) {
  return h("pre", { class: "json", id }, value === undefined ? "–" : JSON.stringify(value, null, 2));
}
