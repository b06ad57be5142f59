// Datasets: list, upload and delete the CSV files of --data-dir, start a column-sum
// job on one and follow its progress.
import { del, get, post, put, ApiError } from "./api.js";
import { progressBar } from "./jobs.js";
import { badge, confirmAction, fill, fmtBytes, fmtTime, h, jsonBlock, notice } from "./ui.js";

export function mount(main) {
  const rows = h("tbody", { id: "dataset-rows" });
  const info = h("div", { id: "datasets-notice", hidden: true });
  const file = h("input", { id: "upload-file", type: "file", accept: ".csv,text/csv" });
  const nameIn = h("input", { id: "upload-name", type: "text", placeholder: "name.csv (default: the file's name)", size: 28 });
  const every = h("input", { id: "sum-every", type: "number", min: 1, value: 10, size: 4 });
  const offset = h("input", { id: "sum-offset", type: "number", min: 0, value: 0, size: 4 });
  const jobPanel = h("section", { class: "card", id: "sum-job", hidden: true });
  let jobId = null;
  let setStream = () => {};

  main.append(
    h("h1", {}, "Datasets"),
    h(
      "form",
      {
        class: "toolbar card",
        id: "upload-form",
        onsubmit: (e) => {
          e.preventDefault();
          upload();
        },
      },
      h("label", {}, "CSV ", file),
      h("label", {}, "Name ", nameIn),
      h("button", { type: "submit", id: "upload" }, "Upload"),
    ),
    info,
    h(
      "section",
      { class: "card" },
      h("h2", {}, "In --data-dir"),
      h("p", { class: "toolbar" }, "Column sums: every ", every, " th column from column ", offset),
      h("table", {}, h("thead", {}, h("tr", {}, ...["Name", "Size", "Modified", ""].map((t) => h("th", {}, t)))), rows),
    ),
    jobPanel,
  );

  async function load() {
    try {
      const r = await get("/v1/datasets");
      fill(
        rows,
        r.datasets.length
          ? r.datasets.map((d) =>
              h(
                "tr",
                { dataset: { name: d.name } },
                h("td", {}, d.name),
                h("td", { class: "num" }, fmtBytes(d.size)),
                h("td", {}, fmtTime(d.modified)),
                h(
                  "td",
                  { class: "actions" },
                  h("button", { type: "button", class: "sum", onclick: () => startSum(d.name) }, "Sum columns"),
                  h("button", { type: "button", class: "danger delete", onclick: () => remove(d.name) }, "Delete…"),
                ),
              ),
            )
          : h("tr", {}, h("td", { colspan: 4, class: "empty" }, "No dataset yet: upload a CSV.")),
      );
    } catch (e) {
      notice(info, e instanceof ApiError ? e.explain() : String(e), "error");
    }
  }

  async function upload() {
    const f = file.files[0];
    if (!f) return notice(info, "Pick a CSV file first.", "error");
    const name = nameIn.value.trim() || f.name;
    if (!(await confirmAction(`Upload ${f.name} as ${name} (${fmtBytes(f.size)})? A dataset of that name is replaced.`, "Upload"))) return;
    notice(info, `Uploading ${name}…`, "info");
    try {
      const r = await put(`/v1/datasets/${encodeURIComponent(name)}`, f, "text/csv");
      notice(info, `Uploaded ${r.name} (${fmtBytes(r.size)}).`, "ok");
    } catch (e) {
      notice(info, e instanceof ApiError ? e.explain() : String(e), "error");
    }
    load();
  }

  async function remove(name) {
    if (!(await confirmAction(`Delete the dataset ${name}? This cannot be undone.`, "Delete"))) return;
    try {
      await del(`/v1/datasets/${encodeURIComponent(name)}`);
      notice(info, `Deleted ${name}.`, "ok");
    } catch (e) {
      notice(info, e instanceof ApiError ? e.explain() : String(e), "error");
    }
    load();
  }

  async function startSum(name) {
    const params = { dataset: name, every: Number(every.value), offset: Number(offset.value) };
    if (!(await confirmAction(`Sum every ${params.every}th column of ${name} from column ${params.offset}?`, "Start"))) return;
    try {
      const r = await post("/v1/jobs", { kind: "csv.column_sum", params });
      jobId = r.id;
      jobPanel.hidden = false;
      fill(jobPanel, h("h2", {}, "Column sum ", h("a", { href: `#/jobs/${r.id}`, id: "sum-job-link" }, r.id)), progressBar(0, "sum-progress"));
      setStream();
      const j = await get(`/v1/jobs/${r.id}`);
      showJob(j);
    } catch (e) {
      notice(info, e instanceof ApiError ? e.explain() : String(e), "error");
    }
  }

  function showJob(j) {
    if (j.id !== jobId) return;
    let pct = null;
    if (j.progress && j.progress.total > 0) pct = (100 * j.progress.done) / j.progress.total;
    if (j.status === "done") pct = 100;
    if (j.status === "queued") pct = 0;
    fill(
      jobPanel,
      h("h2", {}, "Column sum ", h("a", { href: `#/jobs/${j.id}`, id: "sum-job-link" }, j.id), " ", badge(j.status)),
      progressBar(pct, "sum-progress"),
      j.error ? h("pre", { class: "error" }, j.error) : null,
      j.result ? jsonBlock(j.result, "sum-result") : null,
    );
  }

  load();
  const page = {
    stream: { topics: ["overview"] },
    onEvent(name, data) {
      if (name === "job") showJob(data);
    },
  };
  // Following a job changes what the stream sends: ask for it again.
  setStream = () => {
    page.stream = { topics: ["overview"], job: jobId };
    document.dispatchEvent(new CustomEvent("tally:stream", { detail: page.stream }));
  };
  return page;
}
