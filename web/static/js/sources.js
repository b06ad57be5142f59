// Sources and pipeline: each polled source's state, last value, last error, restarts
// and who polls it; the ordered pipeline's accepted, journaled and waiting records.
import { get } from "./api.js";
import { Rates, timeChart } from "./charts.js";
import { badge, fill, fmtNum, fmtTime, h, setText, tile } from "./ui.js";

export function mount(main) {
  const rows = h("tbody", { id: "source-rows" });
  const chartEl = h("div", { class: "chart", id: "pipeline-chart", dataset: { samples: "0" } });
  let holder = "this server";
  main.append(
    h("h1", {}, "Sources & pipeline"),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Sources"),
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, ...["Name", "URL", "Series", "State", "Last value", "Last success", "Last error", "Restarts", "Points", "Polled by"].map((t) => h("th", {}, t)))),
        rows,
      ),
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Ordered pipeline ", h("small", {}, "(POST /v1/events → accepted log → processing → journal)")),
      h(
        "div",
        { class: "tiles" },
        tile("Accepted", "p-accepted", "acknowledged since start"),
        tile("Journaled", "p-journaled", "ok + failed, in sequence order"),
        tile("Journaled failed", "p-failed", "values that are not numbers"),
        tile("Waiting", "p-waiting", "accepted, not yet journaled"),
        tile("Reorder buffer", "p-reorder", "processed, waiting for an earlier one"),
        tile("Capacity", "p-capacity", "--reorder-capacity"),
        tile("Refused (full / draining)", "p-rejected"),
        tile("Recovered at start", "p-recovered"),
      ),
      h("p", { class: "muted", id: "p-journal" }, ""),
      chartEl,
    ),
  );
  const chart = timeChart(chartEl, ["accepted/s", "journaled/s"]);
  const rates = new Rates(["accepted", "journaled"]);

  function showSources(list) {
    fill(
      rows,
      list.sources.length
        ? list.sources.map((s) =>
            h(
              "tr",
              { dataset: { source: s.name } },
              h("td", {}, s.name),
              h("td", {}, h("code", {}, s.url)),
              h("td", {}, h("a", { href: `#/series/${encodeURIComponent(s.series)}` }, s.series)),
              h("td", {}, badge(s.state === "running" ? "running" : "failed"), " ", s.state),
              h("td", { class: "num" }, s.last_value ?? "–"),
              h("td", {}, fmtTime(s.last_success)),
              h("td", { class: "error-text" }, s.last_error || "–"),
              h("td", { class: "num" }, fmtNum(s.restarts)),
              h("td", { class: "num" }, fmtNum(s.points)),
              h("td", {}, holder),
            ),
          )
        : h("tr", {}, h("td", { colspan: 10, class: "empty" }, "No source configured (--source NAME=URL or [[source]] in --config).")),
    );
  }

  function showPipeline(p) {
    setText("p-accepted", fmtNum(p.accepted));
    setText("p-journaled", fmtNum(p.journaled));
    setText("p-failed", fmtNum(p.journaled_failed));
    setText("p-waiting", fmtNum(p.waiting));
    setText("p-reorder", fmtNum(p.reorder_buffer));
    setText("p-capacity", fmtNum(p.capacity));
    setText("p-rejected", `${fmtNum(p.rejected_full)} / ${fmtNum(p.rejected_draining)}`);
    setText("p-recovered", fmtNum(p.recovered));
    setText("p-journal", p.journal ? `Journal: ${p.journal}` : "No journal on disk (--store memory): events are ordered, then dropped.");
    if (rates.push(Date.now(), p)) {
      chart.setData(rates.data);
      chartEl.dataset.samples = String(rates.data[0].length);
    }
  }

  get("/v1/sources").then(showSources, () => {});
  get("/v1/pipeline").then(showPipeline, () => {});
  return {
    stream: { topics: ["overview", "pipeline", "sources"] },
    onEvent(name, data) {
      if (name === "overview") {
        // Every replica polls its own sources (until sources are leased cluster-wide).
        const me = (data.replicas || []).find((r) => r.this);
        if (me) holder = `${me.name} (this server)`;
      } else if (name === "sources") showSources(data);
      else if (name === "pipeline") showPipeline(data);
    },
    unmount() {
      chart.destroy();
    },
  };
}
