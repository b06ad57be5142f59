// Time charts on uPlot (vendored): one per container, sized to it.
import uPlot from "/ui/vendor/uplot/uPlot.esm.js";

const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2"];

/**
 * A time chart in `el` with one line per label. `data` is `[xs, ys1, ys2, ...]` with
 * xs in seconds since the epoch. Returns `{ setData(data), destroy() }`.
 */
export function timeChart(el, labels, { height = 240, unit = "", points = false } = {}) {
  const width = () => Math.max(200, el.clientWidth || 600);
  const opts = {
    width: width(),
    height,
    cursor: { drag: { x: true, y: false } },
    legend: { live: true },
    scales: { x: { time: true } },
    axes: [
      {
        stroke: "currentColor",
        grid: { stroke: "rgba(128,128,128,0.15)" },
        // Whole seconds at least, as a clock reads them.
        incrs: TIME_INCRS,
        space: 70,
        values: (u, splits, _axis, _space, incr) => splits.map((s) => fmtTick(s, incr)),
      },
      {
        stroke: "currentColor",
        grid: { stroke: "rgba(128,128,128,0.15)" },
        size: 60,
        values: (u, vals) => vals.map((v) => `${fmtAxis(v)}${unit}`),
      },
    ],
    series: [
      {},
      ...labels.map((label, i) => ({
        label,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        points: { show: points },
        spanGaps: false,
      })),
    ],
  };
  let data = [[], ...labels.map(() => [])];
  const plot = new uPlot(opts, data, el);
  const resize = new ResizeObserver(() => plot.setSize({ width: width(), height }));
  resize.observe(el);
  return {
    /** `x`: [min, max] of the x axis (seconds); default: the data's. */
    setData(d, x) {
      data = d;
      plot.setData(d, !x);
      if (x) plot.setScale("x", { min: x[0], max: x[1] });
    },
    data: () => data,
    destroy() {
      resize.disconnect();
      plot.destroy();
    },
  };
}

const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800, 2592000, 31536000];

const pad = (n) => String(n).padStart(2, "0");

/** A time tick (seconds) for ticks `incr` seconds apart. */
function fmtTick(s, incr) {
  const d = new Date(s * 1000);
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  if (incr >= 86400) return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  if (incr >= 3600) return `${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hm}`;
  if (incr >= 60) return hm;
  return `${hm}:${pad(d.getSeconds())}`;
}

function fmtAxis(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return `${(v / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${(v / 1e3).toFixed(0)}k`;
  return String(Math.round(v * 100) / 100);
}

/**
 * Per-second rates from successive snapshots of counters: `push(nowMs, {name: count})`
 * appends one sample of Δcount/Δt per name (none for the first snapshot, none for one
 * less than 0.5 s after the last, and none across a counter reset, such as a restart).
 */
export class Rates {
  constructor(names, keep = 300) {
    this.names = names;
    this.keep = keep;
    this.prev = null;
    this.data = [[], ...names.map(() => [])];
    this.last = null;
  }

  push(now, counts) {
    const prev = this.prev;
    // Two snapshots moments apart (a page's first read, then the stream's) make a
    // noisy rate: wait for at least half a second between them.
    if (prev && now > prev.now && now - prev.now < 500) return false;
    this.prev = { now, counts };
    if (!prev || now <= prev.now) return false;
    const dt = (now - prev.now) / 1000;
    const rates = this.names.map((n) => (counts[n] - prev.counts[n]) / dt);
    if (rates.some((r) => r < 0)) return false;
    // The chart's times must ascend: a seeded history ahead of this point (a server
    // clock ahead of ours) keeps its place and this point is left out.
    if (this.data[0].length && this.data[0].at(-1) >= now / 1000) return false;
    this.data[0].push(now / 1000);
    rates.forEach((r, i) => this.data[i + 1].push(r));
    if (this.data[0].length > this.keep) this.data.forEach((col) => col.shift());
    this.last = Object.fromEntries(this.names.map((n, i) => [n, rates[i]]));
    return true;
  }

  /**
   * Rates the server already had (`GET /v1/overview/history`: columns `t`, in seconds,
   * and one per name), drawn before the points measured here.
   */
  seed(history) {
    const first = this.data[0].length ? this.data[0][0] : Infinity;
    const end = history.t.filter((t) => t < first).length;
    const cols = [history.t, ...this.names.map((n) => history[n])];
    this.data = this.data.map((col, i) => [...cols[i].slice(0, end), ...col]);
    while (this.data[0].length > this.keep) this.data.forEach((col) => col.shift());
  }

  reset() {
    this.prev = null;
  }
}
