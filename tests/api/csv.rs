//! CSV column sums: `csv.column_sum` jobs checked against the `csv` crate and against
//! Python's `math.fsum`, the dataset routes and their refusal of every path trick,
//! precise data errors, progress and cancellation, a dataset changed during its scan, the
//! storage-service routes and `tally sum`.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{eventually, eventually_blocking, fixture, Proc, TestApp};

// ---------------------------------------------------------------- generation and oracle

#[derive(Clone, Copy)]
struct Style {
    crlf: bool,
    bom: bool,
    /// Quoted text (commas, doubled quotes, newlines) in the columns not summed.
    text: bool,
    empty_p: f64,
    quote_p: f64,
    trailing_newline: bool,
}

const PLAIN: Style = Style {
    crlf: false,
    bom: false,
    text: false,
    empty_p: 0.0,
    quote_p: 0.0,
    trailing_newline: true,
};

fn summed(i: usize, every: usize, offset: usize) -> bool {
    i >= offset && (i - offset).is_multiple_of(every)
}

fn number(rng: &mut StdRng) -> String {
    match rng.random_range(0..4) {
        0 => rng.random_range(-1_000_000i64..1_000_000).to_string(),
        1 => format!("{:.3}", rng.random_range(-1000.0..1000.0)),
        2 => format!("{:e}", rng.random_range(-1.0..1.0)),
        _ => format!("{:.6}", rng.random_range(0.0..1.0)),
    }
}

fn text(rng: &mut StdRng) -> String {
    const TEXTS: [&str; 6] = [
        "plain",
        "\"a, b\"",
        "\"line\nbreak\"",
        "\"say \"\"hi\"\"\"",
        "\"crlf\r\ninside, too\"",
        "",
    ];
    TEXTS[rng.random_range(0..TEXTS.len())].to_string()
}

/// A CSV whose summed columns (for `every`/`offset`) hold numbers, possibly quoted or
/// empty, and whose other columns hold text when `style.text`.
fn generate(
    seed: u64,
    ncols: usize,
    nrows: usize,
    every: usize,
    offset: usize,
    style: Style,
) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let eol = if style.crlf { "\r\n" } else { "\n" };
    let mut out = String::new();
    if style.bom {
        out.push('\u{feff}');
    }
    let header: Vec<String> = (0..ncols)
        .map(|i| {
            if style.text && i % 3 == 1 {
                format!("\"h,{i}\"")
            } else {
                format!("h{i}")
            }
        })
        .collect();
    out.push_str(&header.join(","));
    for r in 0..nrows {
        out.push_str(eol);
        for i in 0..ncols {
            if i > 0 {
                out.push(',');
            }
            if summed(i, every, offset) || !style.text {
                if rng.random_bool(style.empty_p) {
                    continue;
                }
                let n = number(&mut rng);
                if rng.random_bool(style.quote_p) {
                    out.push_str(&format!("\"{n}\""));
                } else {
                    out.push_str(&n);
                }
            } else {
                out.push_str(&text(&mut rng));
            }
        }
        if r + 1 == nrows && !style.trailing_newline {
            return out.into_bytes();
        }
    }
    out.push_str(eol);
    out.into_bytes()
}

/// The sums by the `csv` crate: (header, sum, sum of |x|) per summed column.
fn oracle(data: &[u8], every: usize, offset: usize) -> Vec<(String, f64, f64)> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let mut rdr = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(data);
    let mut records = rdr.byte_records();
    let header = records.next().unwrap().unwrap();
    let mut out: Vec<(String, f64, f64)> = (0..header.len())
        .filter(|&i| summed(i, every, offset))
        .map(|i| (String::from_utf8_lossy(&header[i]).into_owned(), 0.0, 0.0))
        .collect();
    for rec in records {
        let rec = rec.unwrap();
        let cells = (0..rec.len()).filter(|&i| summed(i, every, offset));
        for (slot, i) in out.iter_mut().zip(cells) {
            let cell = std::str::from_utf8(&rec[i]).unwrap();
            if cell.is_empty() {
                continue;
            }
            let x: f64 = cell.parse().unwrap();
            slot.1 += x;
            slot.2 += x.abs();
        }
    }
    out
}

fn assert_sums(got: &Value, want: &[(String, f64, f64)], what: &str) {
    let got = got.as_object().unwrap_or_else(|| panic!("{what}: {got}"));
    let keys: Vec<&str> = got.keys().map(String::as_str).collect();
    let want_keys: Vec<&str> = want.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(keys, want_keys, "{what}: keys in file order");
    for (name, sum, abs) in want {
        let g = got[name].as_f64().unwrap();
        assert!(
            (g - sum).abs() <= 1e-9 * abs + 1e-12,
            "{what}: {name}: got {g}, the csv crate says {sum}"
        );
    }
}

// ---------------------------------------------------------------- small helpers

async fn sum_job(app: &TestApp, params: Value) -> Value {
    let id = app.submit("csv.column_sum", params).await;
    app.wait_job(&id).await
}

async fn sum_ok(app: &TestApp, params: Value) -> Value {
    let job = sum_job(app, params.clone()).await;
    assert_eq!(job["status"], "done", "{params}: {job}");
    job["result"].clone()
}

fn put_file(app: &TestApp, name: &str, data: &[u8]) {
    std::fs::create_dir_all(&app.data_dir).unwrap();
    std::fs::write(app.data_dir.join(name), data).unwrap();
}

/// Writes a CSV of about `mib` MiB (a header `c0..c19`, then rows of 20 numbers), fast:
/// one 1 MiB block of rows written again and again. Returns its size.
fn write_big_csv(path: &Path, mib: usize) -> u64 {
    use std::io::Write;
    let mut rng = StdRng::seed_from_u64(9);
    let mut block = String::new();
    while block.len() < 1 << 20 {
        let row: Vec<String> = (0..20).map(|_| number(&mut rng)).collect();
        block.push_str(&row.join(","));
        block.push('\n');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let header: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    writeln!(f, "{}", header.join(",")).unwrap();
    for _ in 0..mib {
        f.write_all(block.as_bytes()).unwrap();
    }
    f.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// One raw HTTP/1.1 request, so that paths reach the server exactly as written (an HTTP
/// client would normalize `..` and `%2e%2e`). Returns the status and the whole response.
async fn raw(app: &TestApp, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr = app.addr.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

// ---------------------------------------------------------------- sums

#[tokio::test]
async fn sums_equal_the_csv_crate_on_quoted_crlf_bom_empty_wide_narrow_and_long_files() {
    let app = TestApp::spawn().await;
    let quoted = Style {
        crlf: true,
        bom: true,
        text: true,
        empty_p: 0.1,
        quote_p: 0.2,
        trailing_newline: true,
    };
    // (name, file, every, offset)
    let cases: Vec<(&str, Vec<u8>, usize, usize)> = vec![
        ("quoted.csv", generate(1, 8, 300, 3, 1, quoted), 3, 1),
        (
            "lf_no_final_newline.csv",
            generate(
                2,
                5,
                200,
                2,
                0,
                Style {
                    crlf: false,
                    bom: false,
                    trailing_newline: false,
                    ..quoted
                },
            ),
            2,
            0,
        ),
        ("one_column.csv", generate(3, 1, 500, 1, 0, PLAIN), 1, 0),
        (
            "thousand_columns.csv",
            generate(4, 1000, 40, 10, 0, PLAIN),
            10,
            0,
        ),
        (
            "thousand_columns_offset.csv",
            generate(5, 1000, 20, 7, 3, quoted),
            7,
            3,
        ),
        ("one_row.csv", generate(6, 5, 1, 2, 1, quoted), 2, 1),
        ("header_only.csv", generate(7, 4, 0, 1, 0, PLAIN), 1, 0),
        (
            "long.csv",
            generate(
                8,
                6,
                200_000,
                2,
                0,
                Style {
                    empty_p: 0.05,
                    quote_p: 0.05,
                    ..quoted
                },
            ),
            2,
            0,
        ),
    ];
    for (name, data, every, offset) in &cases {
        put_file(&app, name, data);
        let got = sum_ok(
            &app,
            json!({ "dataset": name, "every": every, "offset": offset }),
        )
        .await;
        assert_sums(&got, &oracle(data, *every, *offset), name);
    }
    // `every` defaults to 10 and `offset` to 0.
    let got = sum_ok(&app, json!({ "dataset": "thousand_columns.csv" })).await;
    assert_eq!(got.as_object().unwrap().len(), 100);
    app.stop().await;
}

#[tokio::test]
async fn sums_of_the_checked_in_fixture_equal_pythons_fsum() {
    let app = TestApp::spawn().await;
    put_file(
        &app,
        "sums.csv",
        &std::fs::read(fixture("sums.csv")).unwrap(),
    );
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sums_expected.json")).unwrap())
            .unwrap();
    for case in expected.as_array().unwrap() {
        let mut params = case["params"].clone();
        params["dataset"] = json!("sums.csv");
        let got = sum_ok(&app, params.clone()).await;
        let want = case["result"].as_object().unwrap();
        let got_obj = got.as_object().unwrap();
        assert_eq!(
            got_obj.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{params}"
        );
        for (k, w) in want {
            let (g, w) = (got[k].as_f64().unwrap(), w.as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{params}: {k}: tally {g}, fsum {w}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn explicit_columns_and_headerless_files_name_their_keys() {
    let app = TestApp::spawn().await;
    put_file(&app, "h.csv", b"a,b,c\n1,2,3\n4,5,6\n");
    put_file(&app, "n.csv", b"1,2,3\n4,5,6\n");
    let got = sum_ok(&app, json!({ "dataset": "h.csv", "columns": ["c", 0] })).await;
    assert_eq!(got, json!({ "c": 9.0, "a": 5.0 }));
    let got = sum_ok(
        &app,
        json!({ "dataset": "n.csv", "has_header": false, "every": 2 }),
    )
    .await;
    assert_eq!(got, json!({ "col0": 5.0, "col2": 9.0 }));
    let job = sum_job(&app, json!({ "dataset": "h.csv", "columns": ["zz"] })).await;
    assert_eq!(job["status"], "failed");
    assert!(job["error"]
        .as_str()
        .unwrap()
        .contains("no column named \"zz\""));
    app.stop().await;
}

#[tokio::test]
async fn bad_params_are_refused_at_submission_with_a_message() {
    let app = TestApp::spawn().await;
    put_file(&app, "h.csv", b"a\n1\n");
    for (params, want) in [
        (json!({}), "missing param `dataset`"),
        (
            json!({ "dataset": "h.csv", "every": 0 }),
            "`every` must be an integer >= 1",
        ),
        (json!({ "dataset": "h.csv", "offset": "x" }), "`offset`"),
        (
            json!({ "dataset": "h.csv", "columns": "a" }),
            "`columns` must be a list",
        ),
        (
            json!({ "dataset": "nope.csv" }),
            "no dataset named \"nope.csv\"",
        ),
        (json!({ "dataset": "../h.csv" }), "invalid dataset name"),
    ] {
        let (status, body) = app
            .post(
                "/v1/jobs",
                &json!({ "kind": "csv.column_sum", "params": params }),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{params}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(want),
            "{params}: {body}"
        );
    }
    app.stop().await;
}

// ---------------------------------------------------------------- data errors

#[tokio::test]
async fn a_non_numeric_cell_fails_the_job_naming_its_row_column_and_text() {
    let app = TestApp::spawn().await;
    put_file(&app, "bad.csv", b"a,b,c\n1,2,3\n4,oops,6\n");
    let job = sum_job(&app, json!({ "dataset": "bad.csv", "every": 1 })).await;
    assert_eq!(job["status"], "failed", "{job}");
    let e = job["error"].as_str().unwrap();
    for part in [
        "record 3",
        "line 3",
        "column 1",
        "\"b\"",
        "not a number",
        "\"oops\"",
    ] {
        assert!(e.contains(part), "{part} missing from {e}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_ragged_row_fails_the_job_with_its_row_number() {
    let app = TestApp::spawn().await;
    put_file(&app, "ragged.csv", b"a,b\n1,2\n3,4\n5\n6,7\n");
    let job = sum_job(&app, json!({ "dataset": "ragged.csv", "every": 1 })).await;
    assert_eq!(job["status"], "failed", "{job}");
    let e = job["error"].as_str().unwrap();
    assert!(
        e.contains("record 4") && e.contains("expected 2 fields, found 1"),
        "{e}"
    );
    app.stop().await;
}

// ---------------------------------------------------------------- progress and cancel

#[tokio::test]
async fn a_long_scan_reports_progress_in_bytes_and_stops_when_cancelled() {
    let app = TestApp::spawn_with(|c| c.workers = Some(1)).await;
    std::fs::create_dir_all(&app.data_dir).unwrap();
    let path = app.data_dir.join("big.csv");
    let size = write_big_csv(&path, 200);
    let id = app
        .submit(
            "csv.column_sum",
            json!({ "dataset": "big.csv", "every": 1 }),
        )
        .await;
    let seen = eventually("the scan to report progress", async || {
        let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
        assert_ne!(
            job["status"], "done",
            "the scan ended before progress was seen"
        );
        if job["progress"]["done"].as_u64().unwrap_or(0) > 0 {
            Ok(job)
        } else {
            Err(format!("no progress: {job}"))
        }
    })
    .await;
    assert_eq!(seen["status"], "running");
    assert_eq!(seen["progress"]["total"].as_u64(), Some(size));
    assert!(seen["progress"]["done"].as_u64().unwrap() <= size);
    let res = app
        .client
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    app.stop().await;
}

// ---------------------------------------------------------------- a dataset changed during its scan

/// What `cp small.csv big.csv` does to `big.csv`: open it with `O_TRUNC`, then write.
const SMALL: &[u8] = b"x,y\n1.5,2\n-4,8.25\n";

#[tokio::test]
async fn a_dataset_truncated_during_its_scan_fails_that_job_and_the_service_keeps_serving() {
    // The real binary: before the fix the truncation ended the whole process (SIGBUS).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let big = dir.path().join("data/big.csv");
    let size = write_big_csv(&big, 150);
    let mut server = Proc::start(
        dir.path(),
        &["--store", "memory", "--data-dir", "data", "--workers", "1"],
    );
    let api = server.client();
    let id = api
        .submit(
            "csv.column_sum",
            json!({ "dataset": "big.csv", "every": 1 }),
        )
        .await;
    let path = format!("/v1/jobs/{id}");
    api.wait_until("the scan to start", async |c| {
        let (_, job) = c.get(&path).await;
        assert_ne!(
            job["status"], "done",
            "the scan ended before the file changed"
        );
        job["progress"]["done"].as_u64().unwrap_or(0) > 0
    })
    .await;

    std::fs::write(&big, SMALL).unwrap();

    api.wait_until("the job to end", async |c| {
        matches!(
            c.status_of(&id).await.as_str(),
            "done" | "failed" | "cancelled"
        )
    })
    .await;
    let (_, job) = api.get(&path).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("\"big.csv\" changed during the scan")
            && error.contains(&format!("(size {size} -> "))
            && error.ends_with("run the job again"),
        "{error}"
    );
    assert!(server.is_running(), "the service must outlive the scan");
    let (status, _) = api.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);

    // The same name now holds the small file; x: 1.5 - 4, y: 2 + 8.25.
    let id = api
        .submit(
            "csv.column_sum",
            json!({ "dataset": "big.csv", "every": 1 }),
        )
        .await;
    api.wait_until("the second job to end", async |c| {
        matches!(
            c.status_of(&id).await.as_str(),
            "done" | "failed" | "cancelled"
        )
    })
    .await;
    let (_, job) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["result"], json!({ "x": -2.5, "y": 10.25 }));
}

#[test]
fn tally_sum_on_a_file_truncated_during_the_scan_exits_1_naming_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.csv");
    let size = write_big_csv(&big, 150);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sum", "--every", "1", "--threads", "1"])
        .arg(&big)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The scan has begun once the file is mapped into the process.
    let maps = format!("/proc/{}/maps", child.id());
    let shown = big.to_str().unwrap();
    eventually_blocking(&format!("tally sum to map {shown}"), || {
        if std::fs::read_to_string(&maps)
            .unwrap_or_default()
            .contains(shown)
        {
            return Ok(());
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "tally sum ended before its file was seen mapped"
        );
        Err(format!("{shown} not in {maps}"))
    });

    std::fs::write(&big, SMALL).unwrap();

    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    assert!(
        stderr.contains(&format!("{shown} changed during the scan (size {size} -> "))
            && stderr.trim_end().ends_with("run it again"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

// ---------------------------------------------------------------- datasets

#[tokio::test]
async fn uploading_then_summing_then_deleting_a_dataset_works() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/v1/datasets").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "datasets": [] }),
        "a missing data dir lists empty"
    );

    let data = "x,y\n1.5,2\n2.5,3\n";
    let put = |body: &'static str| {
        app.client
            .put(app.url("/v1/datasets/up.csv"))
            .body(body)
            .send()
    };
    let res = put(data).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let (_, body) = app.get("/v1/datasets").await;
    let list = body["datasets"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0]["name"], "up.csv");
    assert_eq!(list[0]["size"], data.len());
    let modified = list[0]["modified"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(modified).is_ok(), "{modified}");

    let got = sum_ok(&app, json!({ "dataset": "up.csv", "every": 1 })).await;
    assert_eq!(got, json!({ "x": 4.0, "y": 5.0 }));

    let res = put("x\n7\n").await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "a second upload replaces the first"
    );
    let got = sum_ok(&app, json!({ "dataset": "up.csv" })).await;
    assert_eq!(got, json!({ "x": 7.0 }));

    let del = || app.client.delete(app.url("/v1/datasets/up.csv")).send();
    assert_eq!(del().await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(del().await.unwrap().status(), StatusCode::NOT_FOUND);
    let (_, body) = app.get("/v1/datasets").await;
    assert_eq!(body, json!({ "datasets": [] }));
    app.stop().await;
}

#[tokio::test]
async fn an_upload_over_the_limit_gets_413_and_leaves_nothing_behind() {
    let app = TestApp::spawn_with(|c| {
        c.max_upload_bytes = 64;
        // The request-body limit of JSON routes does not apply to uploads.
        c.max_body_bytes = 8;
    })
    .await;
    let ok = "a\n1\n2\n3\n";
    let res = app
        .client
        .put(app.url("/v1/datasets/small.csv"))
        .body(ok)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "larger than --max-body-bytes is fine"
    );

    let big = "a\n".repeat(100);
    let res = app
        .client
        .put(app.url("/v1/datasets/big.csv"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("64 bytes"),
        "{body}"
    );

    // Without a Content-Length the limit is enforced while streaming.
    let addr = app.addr.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "PUT /v1/datasets/chunked.csv HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..10 {
        req.push_str(&format!("{:x}\r\n{}\r\n", 20, "b".repeat(20)));
    }
    req.push_str("0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    let names: Vec<String> = std::fs::read_dir(&app.data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["small.csv"], "no partial or temporary file is left");
    app.stop().await;
}

#[tokio::test]
async fn path_traversal_names_are_refused_with_400_and_nothing_outside_is_touched() {
    let app = TestApp::spawn().await;
    let outside = app.data_dir.parent().unwrap().join("outside.csv");
    std::fs::write(&outside, "secret\n42\n").unwrap();
    put_file(&app, "inside.csv", b"a\n1\n");
    std::os::unix::fs::symlink(&outside, app.data_dir.join("link.csv")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", app.data_dir.join("passwd")).unwrap();

    // Each is one path segment as sent on the wire.
    let encoded = [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "..%2Foutside.csv",
        "..%2foutside.csv",
        "%2Fetc%2Fpasswd",
        "a%2Fb",
        "%2e%2e%2Foutside.csv",
        "..%5Coutside.csv",
        "inside.csv%00",
        "%00",
        ".hidden",
        "link.csv",
        "passwd",
    ];
    for seg in encoded {
        for (method, path) in [
            ("PUT", format!("/v1/datasets/{seg}")),
            ("DELETE", format!("/v1/datasets/{seg}")),
            ("GET", format!("/csv_name={seg}")),
        ] {
            let (status, text) = raw(&app, method, &path, "9\n").await;
            assert_eq!(status, 400, "{method} {path}: {text}");
            assert!(
                text.contains("application/problem+json") && text.contains("dataset name")
                    || text.contains("not a regular file"),
                "{method} {path}: {text}"
            );
        }
    }
    // Unencoded slashes never reach a dataset handler.
    for path in [
        "/v1/datasets/../outside.csv",
        "/v1/datasets//etc/passwd",
        "/csv_name=../outside.csv",
        "/csv_name=/etc/passwd",
    ] {
        for method in ["PUT", "DELETE", "GET"] {
            let (status, text) = raw(&app, method, path, "9\n").await;
            assert!((400..500).contains(&status), "{method} {path}: {text}");
        }
    }
    // The same names as job params.
    for name in [
        "..",
        "../outside.csv",
        "/etc/passwd",
        "a/b",
        "a\0b",
        ".x",
        "link.csv",
        "passwd",
    ] {
        let (status, body) = app
            .post(
                "/v1/jobs",
                &json!({ "kind": "csv.column_sum", "params": { "dataset": name } }),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name:?}: {body}");
    }
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret\n42\n");
    assert!(std::fs::symlink_metadata(app.data_dir.join("link.csv"))
        .unwrap()
        .file_type()
        .is_symlink());
    let (_, body) = app.get("/v1/datasets").await;
    let names: Vec<&str> = body["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["inside.csv"],
        "links and hidden files are not listed"
    );
    // Beside the data dir, only what was there: the store and outside.csv.
    for e in std::fs::read_dir(app.data_dir.parent().unwrap()).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(
            n == "data" || n == "outside.csv" || n.starts_with("tally.db"),
            "unexpected file {n:?} outside the data dir"
        );
    }
    assert!(
        !Path::new("/etc/passwd.csv").exists() && !app.data_dir.join("b").exists(),
        "no file was created by a refused upload"
    );
    app.stop().await;
}

#[tokio::test]
async fn uploads_deletes_and_csv_name_need_the_token_when_one_is_set() {
    let app = TestApp::spawn_with(|c| c.auth_token = Some("tok".parse().unwrap())).await;
    put_file(&app, "a.csv", b"a\n1\n");
    let (status, _) = raw(&app, "PUT", "/v1/datasets/b.csv", "a\n1\n").await;
    assert_eq!(status, 401);
    let (status, _) = raw(&app, "DELETE", "/v1/datasets/a.csv", "").await;
    assert_eq!(status, 401);
    let (status, _) = raw(&app, "GET", "/csv_name=a.csv", "").await;
    assert_eq!(status, 401);
    let (status, _) = app.get("/v1/datasets").await;
    assert_eq!(status, StatusCode::OK, "listing is a read");
    let (status, _) = app.get("/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let res = app
        .client
        .put(app.url("/v1/datasets/b.csv"))
        .bearer_auth("tok")
        .body("a\n1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    app.stop().await;
}

// ---------------------------------------------------------------- storage-service routes

async fn compat_result(app: &TestApp, id: &str) -> (StatusCode, Value) {
    eventually(&format!("{id} to finish"), async || {
        let (status, body) = app.get(&format!("/storage/get_json/{id}")).await;
        if body != json!({ "status": "running" }) {
            Ok((status, body))
        } else {
            Err(format!("{id} still running: {body}"))
        }
    })
    .await
}

#[tokio::test]
async fn the_storage_service_routes_start_count_and_return_tasks() {
    let app = TestApp::spawn().await;
    let data = generate(11, 25, 100, 10, 0, PLAIN);
    put_file(&app, "data.csv", &data);

    let (status, body) = app.get("/csv_name=data.csv").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["Task started, your id"].as_str().unwrap().to_string();
    let (status, result) = compat_result(&app, &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_sums(&result, &oracle(&data, 10, 0), "csv_name");

    // The counter counts queued and running tasks of every kind.
    let sleeper = app.submit("test.sleep", json!({ "ms": 400 })).await;
    let (status, n) = app.get("/storage/get_counter").await;
    assert_eq!(status, StatusCode::OK);
    assert!(n.as_u64().unwrap() >= 1, "{n}");
    let (_, running) = app.get(&format!("/storage/get_json/{sleeper}")).await;
    assert_eq!(running, json!({ "status": "running" }));
    app.wait_job(&sleeper).await;
    let (_, n) = app.get("/storage/get_counter").await;
    assert_eq!(n, json!(0));

    // A task on a missing file: an id, then an error JSON naming the file.
    let (_, body) = app.get("/csv_name=missing.csv").await;
    let id = body["Task started, your id"].as_str().unwrap().to_string();
    let (status, err) = compat_result(&app, &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(err["status"], "failed");
    assert!(
        err["error"].as_str().unwrap().contains("missing.csv"),
        "{err}"
    );

    for unknown in ["job_id_999999", "banana"] {
        let (status, body) = app.get(&format!("/storage/get_json/{unknown}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["status"], "error", "{body}");
    }
    // The one-segment catch-all leaves other routes alone.
    let (status, body) = app.get("/healthz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "status": "ok" })));
    let res = app.client.get(app.url("/nowhere")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    app.stop().await;
}

// ---------------------------------------------------------------- command line

#[tokio::test]
async fn tally_sum_prints_the_json_the_job_returns() {
    let app = TestApp::spawn().await;
    let data = generate(
        12,
        9,
        1000,
        3,
        1,
        Style {
            crlf: true,
            bom: true,
            text: true,
            empty_p: 0.1,
            quote_p: 0.1,
            trailing_newline: true,
        },
    );
    put_file(&app, "cli.csv", &data);
    let job = sum_ok(
        &app,
        json!({ "dataset": "cli.csv", "every": 3, "offset": 1 }),
    )
    .await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sum", "--every", "3", "--offset", "1", "--threads", "2"])
        .arg(app.data_dir.join("cli.csv"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, job);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim_end(),
        job.to_string()
    );

    put_file(&app, "bad.csv", b"a,b\n1,x\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sum", "--every", "1"])
        .arg(app.data_dir.join("bad.csv"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("record 2") && err.contains("\"x\""), "{err}");
    app.stop().await;
}
