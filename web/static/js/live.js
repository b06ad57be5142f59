// The tab's one server-sent-events stream (GET /v1/stream). The page in view says
// which topics (and which job) it wants; the stream is reopened when that changes,
// closed while the tab is hidden or the refresh picker says "off", and after a
// `shutdown` event retried with a growing pause.

const REFRESH_KEY = "tally.refresh";

let source = null;
let wanted = { topics: ["overview"], job: null };
let listener = () => {};
let retryTimer = null;
let retryDelay = 2000;
let state = "off";

export function interval() {
  const v = Number(localStorage.getItem(REFRESH_KEY) ?? 2000);
  return Number.isFinite(v) ? v : 2000;
}

export function setInterval_(ms) {
  localStorage.setItem(REFRESH_KEY, String(ms));
  reconnect();
}

function setState(s, title) {
  state = s;
  const dot = document.getElementById("live");
  if (dot) {
    dot.className = `live ${s}`;
    dot.title = title || s;
    dot.dataset.state = s;
  }
}

export function liveState() {
  return state;
}

function url() {
  const q = new URLSearchParams();
  q.set("interval_ms", String(interval()));
  q.set("topics", wanted.topics.join(","));
  if (wanted.job) q.set("job", wanted.job);
  return `/v1/stream?${q}`;
}

function close() {
  if (source) {
    source.close();
    source = null;
  }
  clearTimeout(retryTimer);
  retryTimer = null;
}

export function reconnect() {
  close();
  if (interval() <= 0) {
    setState("off", "live updates are off");
    return;
  }
  if (document.hidden) {
    setState("paused", "paused while the tab is hidden");
    return;
  }
  const es = new EventSource(url());
  source = es;
  setState("connecting");
  const names = ["overview", "pipeline", "sources", "job", "job_error"];
  for (const name of names) {
    es.addEventListener(name, (e) => {
      retryDelay = 2000;
      setState("live", "receiving live updates");
      let data;
      try {
        data = JSON.parse(e.data);
      } catch {
        return;
      }
      listener(name, data);
    });
  }
  es.addEventListener("shutdown", (e) => {
    listener("shutdown", JSON.parse(e.data || "{}"));
    retryLater("the server is shutting down");
  });
  es.onerror = () => {
    // The browser retries by itself while the connection can be opened; a refused
    // stream (e.g. 503 while draining) closes it, and then we retry.
    if (es.readyState === EventSource.CLOSED) retryLater("stream closed");
    else setState("connecting", "reconnecting");
  };
}

function retryLater(why) {
  close();
  setState("down", `${why}; retrying in ${Math.round(retryDelay / 1000)} s`);
  retryTimer = setTimeout(reconnect, retryDelay);
  retryDelay = Math.min(retryDelay * 2, 30000);
}

/** What the page in view wants, and who gets the events. */
export function want({ topics = ["overview"], job = null } = {}, onEvent = () => {}) {
  listener = onEvent;
  const same = wanted.job === job && wanted.topics.join() === topics.join();
  wanted = { topics, job };
  if (!same || !source) reconnect();
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    close();
    setState("paused", "paused while the tab is hidden");
  } else {
    reconnect();
  }
});
