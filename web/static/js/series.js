// Series: the list (paged), /getSum live, and one series as a chart over a chosen
// range with step and aggregation, its points as a table, and its rollup windows.
import { get, query, ApiError } from "./api.js";
import { timeChart } from "./charts.js";
import { fill, fmtNum, fmtTime, h, notice, setText } from "./ui.js";

const RANGES = [
  ["5m", "last 5 minutes", 5 * 60e3],
  ["1h", "last hour", 3600e3],
  ["6h", "last 6 hours", 6 * 3600e3],
  ["24h", "last 24 hours", 24 * 3600e3],
  ["all", "everything kept", null],
  ["custom", "from … to …", null],
];
const STEPS = [
  ["", "raw points"],
  ["1000", "1 s"],
  ["10000", "10 s"],
  ["60000", "1 min"],
  ["300000", "5 min"],
  ["3600000", "1 h"],
];
const AGGS = ["mean", "sum", "count", "min", "max", "last"];
/** Rows shown in the points table at most (the chart shows them all). */
const TABLE_ROWS = 1000;

export function mount(main, route) {
  const list = h("tbody", { id: "series-rows" });
  const more = h("button", { id: "series-more", type: "button", hidden: true }, "More…");
  let cursor = null;

  const name = route.arg;
  const view = h("div", { id: "series-view" });
  main.append(
    h("h1", {}, "Series"),
    h("section", { class: "tiles" }, h("div", { class: "tile" }, h("div", { class: "label" }, "getSum (live)"), h("div", { class: "value", id: "get-sum" }, "–"))),
    h(
      "div",
      { class: "split" },
      h(
        "section",
        { class: "card list" },
        h("h2", {}, "All series"),
        h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "num" }, "Points"))), list),
        more,
      ),
      view,
    ),
  );

  async function loadList(append) {
    try {
      const page = await get(`/v1/series${query({ limit: 200, cursor: append ? cursor : "" })}`);
      cursor = page.next_cursor;
      more.hidden = !cursor;
      const rows = page.series.map((s) =>
        h(
          "tr",
          { class: s.name === name ? "selected" : "" },
          h("td", {}, h("a", { href: `#/series/${encodeURIComponent(s.name)}` }, s.name)),
          h("td", { class: "num", title: s.last ? `last point ${fmtTime(s.last)}` : "" }, fmtNum(s.points)),
        ),
      );
      if (append) list.append(...rows);
      else fill(list, rows.length ? rows : h("tr", {}, h("td", { colspan: 2, class: "empty" }, "No series yet: write some points (POST /write).")));
    } catch (e) {
      fill(list, h("tr", {}, h("td", { colspan: 2, class: "notice error" }, e instanceof ApiError ? e.explain() : String(e))));
    }
  }
  more.addEventListener("click", () => loadList(true));
  loadList(false);
  get("/v1/overview").then((o) => setText("get-sum", o.series.get_sum), () => {});

  const chartView = name ? seriesView(view, name) : (view.append(h("p", { class: "card empty" }, "Pick a series.")), null);
  return {
    stream: { topics: ["overview"] },
    onEvent(ev, data) {
      if (ev === "overview") {
        setText("get-sum", data.series.get_sum);
        chartView?.tick();
      }
    },
    unmount() {
      chartView?.destroy();
    },
  };
}

function seriesView(view, name) {
  const rangeSel = h("select", { id: "range" }, RANGES.map(([v, label]) => h("option", { value: v, selected: v === "1h" }, label)));
  const from = h("input", { id: "from", type: "datetime-local", step: 1, hidden: true });
  const to = h("input", { id: "to", type: "datetime-local", step: 1, hidden: true });
  const stepSel = h("select", { id: "step" }, STEPS.map(([v, label]) => h("option", { value: v }, label)));
  const aggSel = h("select", { id: "agg", disabled: true }, AGGS.map((a) => h("option", { value: a }, a)));
  const info = h("div", { id: "series-notice", hidden: true });
  const chartEl = h("div", { class: "chart", id: "series-chart", dataset: { points: "0" } });
  const table = h("tbody", { id: "series-data" });
  const rollups = h("div", { id: "rollups" });
  fill(
    view,
    h(
      "section",
      { class: "card" },
      h("h2", {}, h("code", {}, name)),
      h(
        "form",
        {
          class: "toolbar",
          onsubmit: (e) => {
            e.preventDefault();
            load();
          },
        },
        h("label", {}, "Range ", rangeSel),
        from,
        to,
        h("label", {}, "Step ", stepSel),
        h("label", {}, "Aggregate ", aggSel),
        h("button", { type: "submit", id: "series-apply" }, "Show"),
      ),
      info,
      chartEl,
      h(
        "details",
        {},
        h("summary", {}, "Points ", h("span", { id: "series-count" }, "")),
        h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", {}, "ms"), h("th", {}, "Value"))), table),
      ),
    ),
    h("section", { class: "card" }, h("h2", {}, "Rollups"), rollups),
  );
  rangeSel.addEventListener("change", () => {
    const custom = rangeSel.value === "custom";
    from.hidden = to.hidden = !custom;
    if (!custom) load();
  });
  stepSel.addEventListener("change", () => {
    aggSel.disabled = !stepSel.value;
    load();
  });
  aggSel.addEventListener("change", load);

  const chart = timeChart(chartEl, [name], { points: true });
  let loading = false;
  // A change while a load is in flight loads again once it is done.
  let again = false;

  function params() {
    const range = RANGES.find(([v]) => v === rangeSel.value);
    const p = { step: stepSel.value, agg: stepSel.value ? aggSel.value : "" };
    if (range[0] === "custom") {
      if (from.value) p.from = new Date(from.value).getTime();
      if (to.value) p.to = new Date(to.value).getTime();
    } else if (range[2]) {
      p.from = Date.now() - range[2];
    }
    return p;
  }

  async function load() {
    if (loading) {
      again = true;
      return;
    }
    loading = true;
    again = false;
    try {
      const q = query(params());
      const r = await get(`/v1/series/${encodeURIComponent(name)}${q}`);
      notice(info, "");
      const pts = r.points;
      // The x axis spans the range asked for (or the points, padded by a step).
      const p = params();
      const pad = Number(p.step) || 60e3;
      const lo = p.from ?? (pts.length ? pts[0].t - pad : Date.now() - 3600e3);
      const hi = p.to ?? (p.from !== undefined ? Date.now() : pts.length ? pts[pts.length - 1].t + pad : Date.now());
      chart.setData([pts.map((q) => q.t / 1000), pts.map((q) => q.v)], [lo / 1000, hi / 1000]);
      chartEl.dataset.points = String(pts.length);
      // What the chart shows, for whoever checks it (the step and aggregate).
      chartEl.dataset.step = r.step ?? "";
      chartEl.dataset.agg = r.agg ?? "";
      setText("series-count", `(${pts.length}${pts.length > TABLE_ROWS ? `, the last ${TABLE_ROWS} below` : ""})`);
      fill(
        table,
        pts.slice(-TABLE_ROWS).map((p) =>
          h("tr", { dataset: { t: String(p.t), v: String(p.v) } }, h("td", {}, fmtTime(p.t)), h("td", { class: "num" }, p.t), h("td", { class: "num" }, p.v === null ? "–" : String(p.v))),
        ),
      );
    } catch (e) {
      notice(info, e instanceof ApiError ? e.explain() : String(e), "error");
    } finally {
      loading = false;
    }
    if (again) return load();
    loadRollups();
  }

  async function loadRollups() {
    try {
      const r = await get(`/v1/series/${encodeURIComponent(name)}/rollups`);
      const sum = (a) => h("td", { class: "num" }, a.count ? fmtNum(a.sum, 3) : "–");
      const agg = (label, a) =>
        h("tr", {}, h("th", {}, label), h("td", { class: "num" }, fmtNum(a.count)), sum(a), h("td", { class: "num" }, fmtNum(a.mean, 3)), h("td", { class: "num" }, fmtNum(a.min, 3)), h("td", { class: "num" }, fmtNum(a.max, 3)), h("td", { class: "num" }, fmtNum(a.last, 3)));
      const head = h("thead", {}, h("tr", {}, ...["", "Count", "Sum", "Mean", "Min", "Max", "Last"].map((t) => h("th", {}, t))));
      fill(
        rollups,
        h("p", { class: "muted" }, `Windows of ${r.window_ms / 1000} s; computed ${r.computed_at ? fmtTime(r.computed_at) : "just now"}.`),
        h(
          "table",
          {},
          head,
          h(
            "tbody",
            {},
            agg("All time", r.total),
            agg("Retained", r.retained),
            r.windows.slice(-20).reverse().map((w) => agg(fmtTime(w.start), w)),
          ),
        ),
      );
    } catch (e) {
      fill(rollups, h("p", { class: "notice error" }, e instanceof ApiError ? e.explain() : String(e)));
    }
  }

  load();
  return {
    // A relative range follows the clock: reload with each live update.
    tick() {
      if (rangeSel.value !== "custom") load();
    },
    destroy() {
      chart.destroy();
    },
  };
}
