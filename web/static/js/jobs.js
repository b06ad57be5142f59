// Jobs: the list (filtered by status and kind, newest first, paged by cursor), search
// by id, bulk cancel/retry of what matches, and one job's page with its actions.
import { get, post, del, query, ApiError } from "./api.js";
import { badge, confirmAction, fill, fmtMs, fmtTime, h, jsonBlock, notice } from "./ui.js";

const STATUSES = ["queued", "running", "done", "failed", "cancelled"];
const PAGE = 25;

export function mount(main, route) {
  return route.arg ? mountJob(main, route.arg) : mountList(main, route.params);
}

function mountList(main, params) {
  const status = params.get("status") || "";
  const kind = params.get("kind") || "";
  // Cursors of the pages before this one, to go back.
  const cursors = [];
  let cursor = "";
  let next = null;
  let busy = false;
  let again = false;

  const kindSel = h("select", { id: "filter-kind", name: "kind" }, h("option", { value: "" }, "any kind"));
  const statusSel = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any status"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)),
  );
  const search = h("input", { id: "job-search", type: "search", placeholder: "job_id_42", size: 14 });
  const rows = h("tbody", { id: "job-rows" });
  const info = h("div", { id: "jobs-notice", hidden: true });
  const older = h("button", { id: "older", type: "button", disabled: true }, "Older →");
  const newer = h("button", { id: "newer", type: "button", disabled: true }, "← Newer");
  const bulkCancel = h("button", { id: "bulk-cancel", type: "button", class: "danger" }, "Cancel all matching…");
  const bulkRetry = h("button", { id: "bulk-retry", type: "button" }, "Retry all matching…");

  const filterHash = (s, k) => `#/jobs${query({ status: s, kind: k })}`;
  statusSel.addEventListener("change", () => (location.hash = filterHash(statusSel.value, kindSel.value)));
  kindSel.addEventListener("change", () => (location.hash = filterHash(statusSel.value, kindSel.value)));

  main.append(
    h("h1", {}, "Jobs"),
    h(
      "form",
      {
        class: "toolbar",
        onsubmit: (e) => {
          e.preventDefault();
          const id = search.value.trim();
          if (id) location.hash = `#/jobs/${encodeURIComponent(id)}`;
        },
      },
      h("label", {}, "Status ", statusSel),
      h("label", {}, "Kind ", kindSel),
      h("label", {}, "Find ", search),
      h("button", { type: "submit" }, "Open"),
      h("span", { class: "spacer" }),
      bulkCancel,
      bulkRetry,
    ),
    info,
    h(
      "table",
      { class: "jobs" },
      h("thead", {}, h("tr", {}, ...["Id", "Kind", "Status", "Submitted", "Started", "Finished", "Attempts"].map((t, i) => h("th", { class: i === 6 ? "num" : "" }, t)))),
      rows,
    ),
    h("div", { class: "pager" }, newer, older),
  );

  get("/v1/overview").then((o) => {
    for (const k of o.kinds) kindSel.append(h("option", { value: k.kind, selected: k.kind === kind }, k.kind));
    if (kind && !o.kinds.some((k) => k.kind === kind)) kindSel.append(h("option", { value: kind, selected: true }, kind));
  }, () => {});

  const cancellable = !status || status === "queued" || status === "running";
  const retryable = !status || status === "failed" || status === "cancelled";
  bulkCancel.disabled = !cancellable;
  bulkRetry.disabled = !retryable;

  async function load() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    again = false;
    try {
      const page = await get(`/v1/jobs${query({ status, kind, limit: PAGE, cursor })}`);
      next = page.next_cursor;
      fill(
        rows,
        page.jobs.length
          ? page.jobs.map((j) =>
              h(
                "tr",
                { dataset: { id: j.id } },
                h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)),
                h("td", {}, j.kind),
                h("td", {}, badge(j.status)),
                h("td", {}, fmtTime(j.submitted_at)),
                h("td", {}, fmtTime(j.started_at)),
                h("td", {}, fmtTime(j.finished_at)),
                h("td", { class: "num" }, j.attempts),
              ),
            )
          : h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No job matches.")),
      );
      older.disabled = !next;
      newer.disabled = cursors.length === 0;
    } catch (e) {
      notice(info, e instanceof ApiError ? e.explain() : String(e), "error");
    } finally {
      busy = false;
    }
    if (again) load();
  }

  older.addEventListener("click", () => {
    cursors.push(cursor);
    cursor = next;
    load();
  });
  newer.addEventListener("click", () => {
    cursor = cursors.pop() ?? "";
    load();
  });

  async function bulk(action) {
    const what = [status || (action === "cancel" ? "queued or running" : "failed or cancelled"), kind ? `${kind} ` : ""];
    const ok = await confirmAction(
      `${action === "cancel" ? "Cancel" : "Retry"} every ${what[1]}job that is ${what[0]}?`,
      action === "cancel" ? "Cancel them" : "Retry them",
    );
    if (!ok) return;
    let affected = 0;
    let skipped = 0;
    try {
      // Each call acts on at most 500 jobs and hands back a cursor: the next call looks
      // only at older jobs, so a job that fails again at once is not retried twice.
      let cursor;
      for (let round = 0; round < 1000; round++) {
        const r = await post(`/v1/jobs/${action}`, { status: status || undefined, kind: kind || undefined, limit: 500, cursor });
        affected += r.affected;
        skipped += r.skipped.length;
        cursor = r.next_cursor ?? undefined;
        if (!r.more || !cursor || r.stopped) {
          notice(
            info,
            `${action === "cancel" ? "Cancelled" : "Queued again"}: ${affected} job(s)` +
              (skipped ? `; ${skipped} had changed state` : "") +
              (r.stopped ? `; stopped: ${r.stopped}` : ""),
            "ok",
          );
          break;
        }
      }
    } catch (e) {
      notice(info, (affected ? `${affected} done, then: ` : "") + (e instanceof ApiError ? e.explain() : String(e)), "error");
    }
    load();
  }
  bulkCancel.addEventListener("click", () => bulk("cancel"));
  bulkRetry.addEventListener("click", () => bulk("retry"));

  load();
  return {
    stream: { topics: ["overview"] },
    onEvent(name) {
      // The first page follows new jobs; older pages stay put while being read.
      if (name === "overview" && cursors.length === 0) load();
    },
  };
}

function mountJob(main, id) {
  const detail = h("div", { id: "job-detail" }, "Loading…");
  const info = h("div", { id: "job-notice", hidden: true });
  const cancelBtn = h("button", { id: "job-cancel", type: "button", class: "danger", disabled: true }, "Cancel");
  const retryBtn = h("button", { id: "job-retry", type: "button", disabled: true }, "Retry");
  main.append(
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    h("h1", {}, "Job ", h("code", {}, id)),
    h("div", { class: "toolbar" }, cancelBtn, retryBtn),
    info,
    detail,
  );

  function show(j) {
    const finished = ["done", "failed", "cancelled"].includes(j.status);
    cancelBtn.disabled = finished;
    retryBtn.disabled = !(j.status === "failed" || j.status === "cancelled");
    const started = j.started_at ? Date.parse(j.started_at) : null;
    const ended = j.finished_at ? Date.parse(j.finished_at) : null;
    let pct = null;
    if (j.progress && j.progress.total > 0) pct = Math.min(100, (100 * j.progress.done) / j.progress.total);
    if (j.status === "done") pct = 100;
    fill(
      detail,
      h(
        "dl",
        { class: "fields" },
        h("dt", {}, "Status"),
        h("dd", { id: "job-status", dataset: { status: j.status } }, badge(j.status)),
        h("dt", {}, "Kind"),
        h("dd", {}, j.kind),
        h("dt", {}, "Attempts"),
        h("dd", { id: "job-attempts" }, String(j.attempts)),
        h("dt", {}, "Submitted"),
        h("dd", {}, fmtTime(j.submitted_at)),
        h("dt", {}, "Started"),
        h("dd", {}, fmtTime(j.started_at)),
        h("dt", {}, "Finished"),
        h("dd", {}, fmtTime(j.finished_at)),
        h("dt", {}, "Ran for"),
        h("dd", {}, started && ended ? fmtMs(ended - started) : started ? "running…" : "–"),
        h("dt", {}, "Progress"),
        h("dd", {}, progressBar(pct, "job-progress")),
      ),
      h("h2", {}, "Params"),
      jsonBlock(j.params, "job-params"),
      h("h2", {}, "Result"),
      jsonBlock(j.result, "job-result"),
      j.error ? [h("h2", {}, "Error"), h("pre", { class: "error", id: "job-error" }, j.error)] : null,
    );
  }

  async function refresh() {
    try {
      show(await get(`/v1/jobs/${encodeURIComponent(id)}`));
    } catch (e) {
      fill(detail, h("p", { class: "notice error", role: "alert" }, e instanceof ApiError ? e.explain() : String(e)));
    }
  }

  async function act(label, confirmText, call, done) {
    if (!(await confirmAction(confirmText, label))) return;
    try {
      await call();
      notice(info, done, "ok");
    } catch (e) {
      notice(info, e instanceof ApiError ? e.explain() : String(e), "error");
    }
    refresh();
  }
  cancelBtn.addEventListener("click", () =>
    act("Cancel job", `Cancel ${id}?`, () => del(`/v1/jobs/${encodeURIComponent(id)}`), `${id} cancelled.`),
  );
  retryBtn.addEventListener("click", () =>
    act("Retry job", `Run ${id} again (as a new attempt)?`, () => post(`/v1/jobs/${encodeURIComponent(id)}/retry`), `${id} queued again.`),
  );

  refresh();
  const valid = /^job_id_[1-9][0-9]*$/.test(id);
  return {
    stream: valid ? { topics: ["overview"], job: id } : { topics: ["overview"] },
    onEvent(name, data) {
      if (name === "job") show(data);
    },
  };
}

/** A progress bar (0 to 100, or null for unknown). */
export function progressBar(pct, id) {
  const known = pct !== null && pct !== undefined;
  const v = known ? Math.round(pct) : 0;
  const bar = h("div", { class: "bar" });
  bar.style.width = `${v}%`;
  return h(
    "div",
    {
      class: `progress${known ? "" : " unknown"}`,
      id,
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": known ? v : null,
    },
    bar,
    h("span", {}, known ? `${v}%` : "–"),
  );
}
