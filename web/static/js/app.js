// The dashboard's shell: hash routes (#/overview, #/jobs, #/jobs/<id>, #/series,
// #/series/<name>, #/sources, #/datasets), the refresh picker, the token dialog and
// the banner; each page is a module with `mount(main, route) -> { onEvent, unmount }`.
import * as live from "./live.js";
import { setToken, token } from "./api.js";
import * as overview from "./overview.js";
import * as jobs from "./jobs.js";
import * as series from "./series.js";
import * as sources from "./sources.js";
import * as datasets from "./datasets.js";

const pages = { overview, jobs, series, sources, datasets };
let current = null;

/** `#/jobs/job_id_3?status=failed` -> { page: "jobs", arg: "job_id_3", params }. */
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, qs] = raw.split("?");
  const [page, ...rest] = path.split("/");
  return {
    page: pages[page] ? page : "overview",
    arg: rest.length ? decodeURIComponent(rest.join("/")) : null,
    params: new URLSearchParams(qs || ""),
  };
}

function banner(text, kind = "error") {
  const el = document.getElementById("banner");
  el.hidden = !text;
  el.className = `banner ${kind}`;
  el.textContent = text || "";
}

function onEvent(name, data) {
  if (name === "overview") {
    banner(data.store_error ? `The store is not answering: ${data.store_error}` : "");
    if (data.draining) banner("This server is draining: it takes no new work.", "warn");
  } else if (name === "shutdown") {
    banner("The server is shutting down; live updates will resume when it is back.", "warn");
  }
  current?.onEvent?.(name, data);
}

function route() {
  const r = parseHash();
  current?.unmount?.();
  const main = document.getElementById("main");
  main.replaceChildren();
  for (const a of document.querySelectorAll("#nav a[data-page]")) {
    a.classList.toggle("active", a.dataset.page === r.page);
  }
  current = pages[r.page].mount(main, r) || {};
  live.want(current.stream || { topics: ["overview"] }, onEvent);
}

function showToken() {
  const b = document.getElementById("token-button");
  b.textContent = token() ? "Token: set" : "Token: none";
  b.classList.toggle("set", !!token());
}

function setupToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-button").addEventListener("click", () => {
    input.value = token();
    dialog.showModal();
  });
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") setToken(input.value.trim());
    if (dialog.returnValue === "clear") setToken("");
  });
  document.addEventListener("tally:token", showToken);
  showToken();
}

function setupRefresh() {
  const sel = document.getElementById("refresh");
  sel.value = String(live.interval());
  if (sel.value === "") sel.value = "2000";
  sel.addEventListener("change", () => live.setInterval_(Number(sel.value)));
}

// Errors the pages did not catch still show, rather than fail silently.
window.addEventListener("unhandledrejection", (e) => {
  banner(`Unexpected error: ${e.reason?.message || e.reason}`);
});

setupToken();
setupRefresh();
// A page that starts following something (a job) asks for a new stream.
document.addEventListener("tally:stream", (e) => live.want(e.detail, onEvent));
window.addEventListener("hashchange", route);
route();
