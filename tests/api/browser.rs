//! The dashboard in a real headless Chromium (see `webdriver.rs`): each test drives a
//! page the way a person would, checks what it shows against the API, saves a
//! screenshot to `target/screenshots/`, and checks that the page logged no console
//! error and loaded nothing from outside the server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::config::Secret;

use crate::helpers::TestApp;
use crate::webdriver::Browser;

const TOKEN: &str = "dashboard-s3cret";

/// Opens the dashboard with live updates every second.
async fn dashboard(app: &TestApp, hash: &str) -> Browser {
    let b = Browser::open(&app.addr).await;
    // The refresh interval is read when the page loads: set it, then load again.
    b.goto(&format!("/{hash}")).await;
    b.js("localStorage.setItem('tally.refresh', '1000')").await;
    b.client.refresh().await.unwrap();
    assert_eq!(
        b.js("return document.getElementById('refresh').value")
            .await,
        "1000"
    );
    b.wait_js(
        "the live stream",
        "return document.getElementById('live').dataset.state === 'live'",
    )
    .await;
    b
}

async fn job(app: &TestApp, id: &str) -> Value {
    app.get(&format!("/v1/jobs/{id}")).await.1
}

#[tokio::test]
async fn the_overview_chart_updates_while_jobs_run() {
    let app = TestApp::spawn().await;
    let mut b = dashboard(&app, "#/overview").await;
    // Jobs keep arriving while the page watches.
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (client, url, stop) = (app.client.clone(), app.url("/v1/jobs"), stop.clone());
        tokio::spawn(async move {
            // A mix: sleeps of several lengths, echoes, and a job that fails.
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                let body = match n % 10 {
                    0 => json!({ "kind": "test.panic", "params": { "message": "on purpose" } }),
                    1 | 4 | 7 => json!({ "kind": "test.echo", "params": { "n": n } }),
                    k => json!({ "kind": "test.sleep", "params": { "ms": 2 + 4 * k } }),
                };
                let _ = client.post(&url).json(&body).send().await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let samples = |n: u32| {
        format!("return Number(document.getElementById('rate-chart').dataset.samples) >= {n}")
    };
    b.wait_js("three points on the rate chart", &samples(3))
        .await;
    b.wait_js(
        "a submission rate above zero",
        "return Number(document.getElementById('r-submitted').textContent) > 0",
    )
    .await;
    // It keeps moving: more points, drawn on the chart's canvas.
    let before = b
        .js("return Number(document.getElementById('rate-chart').dataset.samples)")
        .await
        .as_u64()
        .unwrap();
    b.wait_js("more points", &samples(before as u32 + 2)).await;
    assert_eq!(
        b.js("return !!document.querySelector('#rate-chart canvas')")
            .await,
        true
    );
    let done: u64 = b.text("#c-done").await.replace(',', "").parse().unwrap();
    assert!(done > 0, "done count shown: {done}");
    b.wait_js(
        "a failure rate above zero",
        "return Number(document.getElementById('r-failed').textContent) > 0",
    )
    .await;
    b.wait_js(
        "the kind's p50",
        "return document.querySelector('#kinds tr[data-kind=\"test.sleep\"] td:nth-child(6)').textContent !== '–'",
    )
    .await;
    b.screenshot("overview").await;
    stop.store(true, Ordering::Relaxed);
    submitter.await.unwrap();
    // test.panic's panics are the server's business, not the page's.
    b.check_clean(&[]).await;
    b.close().await;
    app.stop().await;
}

/// The highest rate of `name` in `GET /v1/overview/history`.
pub async fn history_peak(app: &TestApp, name: &str) -> f64 {
    let (status, h) = app.get("/v1/overview/history").await;
    assert_eq!(status, StatusCode::OK, "{h}");
    h[name]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .fold(0.0, f64::max)
}

/// Submits `jobs` quick jobs, waits for them to end and for the server's history to
/// hold the whole burst: a sample taken after the last job ended (samples come once a
/// second; later ones add only zero rates, so the peaks no longer change).
pub async fn burst_into_history(app: &TestApp, jobs: usize) {
    let mut ids = Vec::new();
    for n in 0..jobs {
        ids.push(app.submit("test.echo", json!({ "n": n })).await);
    }
    for id in &ids {
        app.wait_job(id).await;
    }
    let ended = tally::now_ms() as f64 / 1000.0;
    crate::helpers::eventually("the whole burst in the history", async || {
        let (_, h) = app.get("/v1/overview/history").await;
        match h["t"].as_array().and_then(|t| t.last()?.as_f64()) {
            Some(t) if t > ended => Ok(()),
            _ => Err(format!("no sample after {ended} yet: {h}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_page_opened_after_a_burst_draws_the_burst_from_the_servers_history() {
    let app = TestApp::spawn().await;
    // A burst of jobs, over before any page opens.
    burst_into_history(&app, 200).await;
    assert!(
        history_peak(&app, "done").await > 0.0,
        "no burst in the history"
    );
    let peak = history_peak(&app, "submitted").await;
    assert!(peak > 0.0);
    // The page has watched nothing of it (no job runs while it is open, so every rate it
    // measures itself is 0): what it draws of the burst comes from the history.
    let mut b = dashboard(&app, "#/overview").await;
    b.wait_js(
        "the burst on the chart",
        "return Number(document.getElementById('rate-chart').dataset.peak) > 0",
    )
    .await;
    let drawn = b
        .js("return Number(document.getElementById('rate-chart').dataset.peak)")
        .await
        .as_f64()
        .unwrap();
    assert_eq!(drawn, peak, "the page draws the server's rates");
    b.screenshot("overview-history").await;
    b.check_clean(&[]).await;
    b.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_job_submitted_through_the_api_appears_in_the_list_and_its_page_shows_the_result() {
    let app = TestApp::spawn().await;
    let first = app
        .submit("test.echo", json!({ "greeting": "first" }))
        .await;
    app.wait_job(&first).await;
    let mut b = dashboard(&app, "#/jobs").await;
    b.wait_js(
        "the first job's row",
        &format!("return !!document.querySelector('tr[data-id=\"{first}\"]')"),
    )
    .await;
    // One submitted while the page is open shows up by itself.
    let id = app
        .submit("test.echo", json!({ "greeting": "hello from the test" }))
        .await;
    app.wait_job(&id).await;
    b.wait_js(
        "the new job's row",
        &format!("return !!document.querySelector('tr[data-id=\"{id}\"]')"),
    )
    .await;
    b.screenshot("jobs").await;
    b.click(&format!("tr[data-id=\"{id}\"] a")).await;
    b.wait_js(
        "the job page",
        "return document.getElementById('job-status')?.dataset.status === 'done'",
    )
    .await;
    let result: Value = serde_json::from_str(&b.text("#job-result").await).unwrap();
    assert_eq!(result, json!({ "greeting": "hello from the test" }));
    let params: Value = serde_json::from_str(&b.text("#job-params").await).unwrap();
    assert_eq!(params, json!({ "greeting": "hello from the test" }));
    b.wait_js(
        "#job-attempts to read 1",
        "return document.querySelector('#job-attempts')?.textContent === '1'",
    )
    .await;
    assert_eq!(
        b.js("return document.getElementById('job-progress').getAttribute('aria-valuenow')")
            .await,
        "100"
    );
    b.screenshot("job").await;
    // Searching by id opens the same page.
    b.goto("/#/jobs").await;
    b.type_into("#job-search", &first).await;
    b.click("form.toolbar button[type=submit]").await;
    b.wait_js(
        "the first job's page",
        &format!("return location.hash === '#/jobs/{first}' && document.getElementById('job-result')?.textContent.includes('first')"),
    )
    .await;
    b.check_clean(&[]).await;
    b.close().await;
    app.stop().await;
}

#[tokio::test]
async fn cancel_and_retry_work_from_the_job_page_and_are_refused_without_the_token() {
    let app = TestApp::spawn_with(|c| {
        c.auth_token = Some(Secret(TOKEN.to_string()));
        c.shutdown_timeout = 1;
    })
    .await;
    let res = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(TOKEN)
        .json(&json!({ "kind": "test.sleep", "params": { "ms": 600000 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    app.wait_status(&id, &["running"]).await;

    let mut b = dashboard(&app, &format!("#/jobs/{id}")).await;
    b.wait_js(
        "the running job",
        "return document.getElementById('job-status')?.dataset.status === 'running'",
    )
    .await;
    // Without the token: refused, said so, and the job runs on.
    b.click_confirmed("#job-cancel").await;
    b.wait_js(
        "the refusal",
        "return document.getElementById('job-notice').textContent.includes('401')",
    )
    .await;
    let notice = b.text("#job-notice").await;
    assert!(notice.contains("Token"), "{notice}");
    b.screenshot("job-refused").await;
    assert_eq!(job(&app, &id).await["status"], "running");

    // With it: cancelled.
    b.click("#token-button").await;
    b.type_into("#token-input", TOKEN).await;
    b.click("#token-save").await;
    b.wait_js(
        "#token-button to read Token: set",
        "return document.querySelector('#token-button')?.textContent === 'Token: set'",
    )
    .await;
    b.click_confirmed("#job-cancel").await;
    b.wait_js(
        "the cancelled job",
        "return document.getElementById('job-status')?.dataset.status === 'cancelled'",
    )
    .await;
    assert_eq!(job(&app, &id).await["status"], "cancelled");

    // Retry is refused too without the token ("Forget" clears it)...
    b.click("#token-button").await;
    b.click("#token-clear").await;
    b.wait_js(
        "#token-button to read Token: none",
        "return document.querySelector('#token-button')?.textContent === 'Token: none'",
    )
    .await;
    b.click_confirmed("#job-retry").await;
    b.wait_js(
        "the second refusal",
        "return document.getElementById('job-notice').textContent.includes('401')",
    )
    .await;
    assert_eq!(job(&app, &id).await["status"], "cancelled");

    // ...and with it, the job runs again: a new attempt of the same job.
    b.click("#token-button").await;
    b.type_into("#token-input", TOKEN).await;
    b.click("#token-save").await;
    b.click_confirmed("#job-retry").await;
    b.wait_js(
        "the retried job",
        "return document.getElementById('job-notice').textContent.includes('queued again')",
    )
    .await;
    let retried = app.wait_status(&id, &["queued", "running"]).await;
    assert_eq!(retried["attempts"], 2, "{retried}");
    b.wait_js(
        "the second attempt on the page",
        "return document.getElementById('job-attempts')?.textContent === '2'",
    )
    .await;
    b.screenshot("job-retried").await;
    // Only the two deliberate 401s reached the console (which shows the console is read).
    let errors = b.console_errors(&[]).await;
    assert!(
        errors.len() == 2 && errors.iter().all(|e| e.contains("401")),
        "console errors: {errors:#?}"
    );
    b.check_clean(&["401"]).await;
    let status = app
        .client
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    b.close().await;
    app.stop().await;
}

/// "Retry all matching" in the page over 600 jobs that fail again at once: the page
/// walks the list with the answers' cursors, so it says 600, and each job ran twice.
#[tokio::test]
async fn retry_all_matching_from_the_page_retries_each_failed_job_once() {
    let app = TestApp::spawn_with(|c| c.workers = Some(4)).await;
    let ids = crate::dashboard::submit_failing_jobs(&app, 600).await;
    let mut b = dashboard(&app, "#/jobs").await;
    b.wait_js(
        "the retry button",
        "return document.getElementById('bulk-retry')?.disabled === false",
    )
    .await;
    b.click_confirmed("#bulk-retry").await;
    let said = b
        .wait_js(
            "the page to say what it queued again",
            "const n = document.getElementById('jobs-notice'); \
             return !n.hidden && n.textContent.includes('Queued again') && n.textContent",
        )
        .await;
    assert_eq!(said, "Queued again: 600 job(s)");
    crate::dashboard::wait_failed(&app, 600).await;
    assert_eq!(
        crate::dashboard::attempts_of(&app, &ids).await,
        [(2, 600)].into(),
        "attempts → jobs"
    );
    b.screenshot("jobs-retried-all").await;
    b.check_clean(&[]).await;
    b.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_series_chart_draws_the_points_the_test_wrote() {
    let app = TestApp::spawn().await;
    let name = "room,site=lab:temperature";
    let now = tally::now_ms();
    let written: Vec<(i64, f64)> = vec![
        (now - 50_000, 3.0),
        (now - 40_000, 1.5),
        (now - 30_000, 4.0),
        (now - 20_000, -1.0),
        (now - 10_000, 5.25),
    ];
    let points: Vec<Value> = written
        .iter()
        .map(|(t, v)| json!({ "t": t, "v": v }))
        .collect();
    let encoded = name
        .replace(',', "%2C")
        .replace(':', "%3A")
        .replace('=', "%3D");
    let (status, body) = app
        .post(&format!("/v1/series/{encoded}/points"), &json!(points))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 5);

    let mut b = dashboard(&app, &format!("#/series/{encoded}")).await;
    b.wait_js(
        "five points on the chart",
        "return document.getElementById('series-chart').dataset.points === '5'",
    )
    .await;
    let rows = b
        .js("return [...document.querySelectorAll('#series-data tr')].map(r => [Number(r.dataset.t), Number(r.dataset.v)])")
        .await;
    let shown: Vec<(i64, f64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_i64().unwrap(), r[1].as_f64().unwrap()))
        .collect();
    assert_eq!(shown, written);
    // The line is drawn: the canvas has pixels of the series' colour (#2563eb).
    let painted = b
        .js("const c = document.querySelector('#series-chart canvas'); \
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
             let n = 0; for (let i = 0; i < d.length; i += 4) { \
               if (Math.abs(d[i] - 37) < 30 && Math.abs(d[i+1] - 99) < 30 && Math.abs(d[i+2] - 235) < 30 && d[i+3] > 128) n++; } \
             return n")
        .await
        .as_u64()
        .unwrap();
    assert!(painted > 20, "only {painted} pixels of the series' colour");
    b.screenshot("series").await;
    // getSum is the sum of every point written: 3 + 1.5 + 4 - 1 + 5.25.
    b.wait_js(
        "getSum",
        "return document.getElementById('get-sum').textContent === '12.75'",
    )
    .await;
    // A step with an aggregate: one bucket per hour holding all five (sum 12.75) or
    // two (their sums add up to it).
    b.js("const s = document.getElementById('step'); s.value = '3600000'; s.dispatchEvent(new Event('change'))")
        .await;
    b.js("const a = document.getElementById('agg'); a.value = 'sum'; a.dispatchEvent(new Event('change'))")
        .await;
    let total = b
        .wait_js(
            "the hourly sums",
            "const v = [...document.querySelectorAll('#series-data tr')].map(r => Number(r.dataset.v)); \
             const c = document.getElementById('series-chart').dataset; \
             return c.agg === 'sum' && c.step === '3600000' ? v.reduce((a, b) => a + b, 0) : null",
        )
        .await;
    assert_eq!(total.as_f64(), Some(12.75));
    b.wait_js(
        "the rollups",
        "return document.getElementById('rollups').textContent.includes('All time')",
    )
    .await;
    b.check_clean(&[]).await;
    b.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_dataset_upload_starts_a_column_sum_job_whose_progress_bar_reaches_100_percent() {
    let app = TestApp::spawn().await;
    // 11 columns: every 10th from the first is c0 and c10.
    // c0: 1.5 + 2 + 3 = 6.5; c10: 10 + 20 + 30.25 = 60.25.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sales.csv");
    std::fs::write(
        &csv,
        "c0,c1,c2,c3,c4,c5,c6,c7,c8,c9,c10\n\
         1.5,1,1,1,1,1,1,1,1,1,10\n\
         2,2,2,2,2,2,2,2,2,2,20\n\
         3,3,3,3,3,3,3,3,3,3,30.25\n",
    )
    .unwrap();
    let mut b = dashboard(&app, "#/datasets").await;
    let input = b.find("#upload-file").await;
    input.send_keys(csv.to_str().unwrap()).await.unwrap();
    b.click_confirmed("#upload").await;
    b.wait_js(
        "the uploaded dataset",
        "return !!document.querySelector('tr[data-name=\"sales.csv\"]')",
    )
    .await;
    assert!(app.data_dir.join("sales.csv").is_file());
    b.click_confirmed("tr[data-name=\"sales.csv\"] button.sum")
        .await;
    b.wait_js(
        "the progress bar at 100%",
        "return document.getElementById('sum-progress')?.getAttribute('aria-valuenow') === '100'",
    )
    .await;
    let shown: Value = serde_json::from_str(&b.text("#sum-result").await).unwrap();
    assert_eq!(shown, json!({ "c0": 6.5, "c10": 60.25 }));
    let id = b.text("#sum-job-link").await;
    let j = job(&app, &id).await;
    assert_eq!(j["status"], "done");
    assert_eq!(j["result"], json!({ "c0": 6.5, "c10": 60.25 }));
    b.screenshot("datasets").await;
    // Deleting asks first, then the dataset is gone.
    b.click_confirmed("tr[data-name=\"sales.csv\"] button.delete")
        .await;
    b.wait_js(
        "the dataset gone",
        "return !document.querySelector('tr[data-name=\"sales.csv\"]')",
    )
    .await;
    assert!(!app.data_dir.join("sales.csv").exists());
    b.check_clean(&[]).await;
    b.close().await;
    app.stop().await;
}

#[tokio::test]
async fn the_sources_page_and_the_api_reference_load_only_from_this_server() {
    let app = TestApp::spawn().await;
    for i in 0..3 {
        let (status, _) = app
            .post(
                "/v1/events",
                &json!({ "conn": 1, "seq": i, "value": i, "sent_at": 1_700_000_000_000u64 }),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut b = dashboard(&app, "#/sources").await;
    b.wait_js(
        "three accepted events",
        "return document.getElementById('p-accepted').textContent === '3'",
    )
    .await;
    b.wait_js(
        "three journaled",
        "return document.getElementById('p-journaled').textContent === '3'",
    )
    .await;
    b.screenshot("sources").await;
    b.check_clean(&[]).await;

    b.goto("/docs").await;
    b.wait_js(
        "the rendered reference",
        "return document.querySelector('.swagger-ui .info .title')?.textContent.includes('tally')",
    )
    .await;
    b.wait_js(
        "the job routes",
        "return document.querySelectorAll('.opblock').length > 40",
    )
    .await;
    b.screenshot("reference").await;
    b.check_clean(&[]).await;
    b.close().await;
    app.stop().await;
}
