// Overview: job counts, queue, workers, a chart of jobs per second (the server's last
// 15 minutes, then live from its counters), per-kind p50/p99 run times, and the replicas.
import { get } from "./api.js";
import { Rates, timeChart } from "./charts.js";
import { fill, fmtAgo, fmtMs, fmtNum, h, setText, tile } from "./ui.js";

export function mount(main) {
  const chartEl = h("div", { class: "chart", id: "rate-chart", dataset: { samples: "0" } });
  const kinds = h("tbody", { id: "kinds" });
  const replicas = h("tbody", { id: "replicas" });
  main.append(
    h("h1", {}, "Overview"),
    h(
      "section",
      { class: "tiles" },
      tile("Queued", "c-queued", "jobs waiting in the store"),
      tile("Running", "c-running"),
      tile("Done", "c-done"),
      tile("Failed", "c-failed"),
      tile("Cancelled", "c-cancelled"),
      tile("Queue waiting / leased", "c-queue", "the whole queue, every replica"),
      tile("Workers busy / alive", "c-workers", "this server's worker threads"),
      tile("getSum", "c-sum", "sum of every series point ever accepted"),
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Jobs per second ", h("small", {}, "(", h("span", { id: "r-scope" }, "this process"), ")")),
      h(
        "p",
        { class: "rates" },
        h("span", { id: "r-submitted" }, "–"),
        " submitted/s · ",
        h("span", { id: "r-done" }, "–"),
        " done/s · ",
        h("span", { id: "r-failed" }, "–"),
        " failed/s",
      ),
      chartEl,
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Replicas ", h("small", { id: "store-name" }, "")),
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, ...["Name", "Host", "PID", "Workers", "Busy", "Last seen", "State"].map((t, i) => h("th", { class: i >= 2 && i <= 4 ? "num" : "" }, t)))),
        replicas,
      ),
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Job kinds ", h("small", {}, "(run times of the last 1024 jobs of each kind)")),
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, ...["Kind", "Submitted", "Done", "Failed", "Cancelled", "p50", "p99"].map((t, i) => h("th", { class: i ? "num" : "" }, t)))),
        kinds,
      ),
    ),
  );

  const chart = timeChart(chartEl, ["submitted/s", "done/s", "failed/s"], { unit: "" });
  // The server's last 15 minutes (a point a second), then a point per snapshot.
  const rates = new Rates(["submitted", "done", "failed"], 1500);
  function draw() {
    chart.setData(rates.data);
    chartEl.dataset.samples = String(rates.data[0].length);
    chartEl.dataset.peak = String(Math.max(0, ...rates.data[1]));
  }

  function show(o) {
    const j = o.jobs;
    for (const k of ["queued", "running", "done", "failed", "cancelled"]) {
      setText(`c-${k}`, j ? fmtNum(j[k]) : "?");
    }
    setText("c-queue", o.queue ? `${fmtNum(o.queue.waiting)} / ${fmtNum(o.queue.leased)}` : "?");
    setText("c-workers", `${o.workers.busy} / ${o.workers.alive}`);
    setText("c-sum", o.series.get_sum);
    setText("store-name", `(store: ${o.store})`);
    // Every replica's counters when the store is shared, else this process's.
    setText("r-scope", o.cluster_totals ? "all replicas" : "this process");
    if (rates.push(o.now, o.cluster_totals || o.totals)) {
      draw();
      setText("r-submitted", fmtNum(rates.last.submitted, 1));
      setText("r-done", fmtNum(rates.last.done, 1));
      setText("r-failed", fmtNum(rates.last.failed, 1));
    }
    // Kinds that ran here first, busiest on top; the idle ones after, by name. (With
    // several replicas a job submitted here may run elsewhere, and the other way round.)
    const activity = (k) => k.submitted + k.done + k.failed + k.cancelled;
    const ordered = [...o.kinds].sort((a, b) => activity(b) - activity(a) || a.kind.localeCompare(b.kind));
    fill(
      kinds,
      ordered.map((k) =>
        h(
          "tr",
          { dataset: { kind: k.kind }, class: activity(k) ? "" : "idle" },
          h("td", {}, h("a", { href: `#/jobs?kind=${encodeURIComponent(k.kind)}` }, k.kind)),
          h("td", { class: "num" }, fmtNum(k.submitted)),
          h("td", { class: "num" }, fmtNum(k.done)),
          h("td", { class: "num" }, fmtNum(k.failed)),
          h("td", { class: "num" }, fmtNum(k.cancelled)),
          h("td", { class: "num" }, fmtMs(k.p50_ms)),
          h("td", { class: "num" }, fmtMs(k.p99_ms)),
        ),
      ),
    );
    fill(
      replicas,
      (o.replicas || []).map((r) => {
        const stale = r.seen_ms_ago > 30000;
        return h(
          "tr",
          {},
          h("td", {}, r.name, r.this ? h("span", { class: "badge this" }, "this") : null),
          h("td", {}, r.host),
          h("td", { class: "num" }, r.pid),
          h("td", { class: "num" }, r.workers),
          h("td", { class: "num" }, r.busy),
          h("td", {}, fmtAgo(r.seen_ms_ago)),
          h("td", {}, h("span", { class: `badge ${stale ? "failed" : "done"}` }, stale ? "silent" : "alive")),
        );
      }),
    );
  }

  get("/v1/overview").then(show, () => {});
  get("/v1/overview/history").then((history) => {
    rates.seed(history);
    draw();
  }, () => {});
  return {
    stream: { topics: ["overview"] },
    onEvent(name, data) {
      if (name === "overview") show(data);
    },
    unmount() {
      chart.destroy();
    },
  };
}
