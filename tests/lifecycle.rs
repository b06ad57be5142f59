//! Nothing outlives the application that started it: building, serving, stopping and
//! building again on the same SQLite store, several times in one process, leaves the
//! process's thread count where it started and the store's lock free.
//!
//! Its own test binary, with one test: other tests running in the same process would
//! move the thread count.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tally::app::Application;
use tally::config::{ServeConfig, StoreSpec};

#[path = "support/mod.rs"]
mod support;
use support::http::{eventually, eventually_blocking};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn thread_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    names.sort();
    names
}

/// True when nobody holds the store's lock (we take it and let it go).
fn lock_is_free(db: &Path) -> bool {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(format!("{}.lock", db.display()))
        .unwrap();
    lock.try_lock().is_ok()
}

async fn serve_once(cfg: ServeConfig, round: usize) {
    let app = Application::build(cfg)
        .await
        .expect("the application builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    // Work that touches every part: jobs through both APIs, a slow one, a read of the
    // listing, an event for the pipeline, a point for the series.
    let q = "Percent of adults aged 18 years and older who have obesity";
    let mut ids = Vec::new();
    for _ in 0..5 {
        let r: Value = client
            .post(format!("{base}/api/global_mean"))
            .json(&json!({ "question": q }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["job_id"].as_str().unwrap().to_string());
    }
    let r: Value = client
        .post(format!("{base}/v1/jobs"))
        .json(&json!({ "kind": "test.sleep", "params": { "ms": 50 } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ids.push(r["id"].as_str().unwrap().to_string());
    for id in &ids {
        eventually(&format!("round {round}: {id} to finish"), async || {
            let j: Value = client
                .get(format!("{base}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if j["status"] == "done" {
                Ok(())
            } else {
                Err(j.to_string())
            }
        })
        .await;
    }
    let listing = client.get(format!("{base}/api/jobs")).send().await.unwrap();
    assert!(listing.status().is_success());
    let ev = client
        .post(format!("{base}/v1/events"))
        .json(&json!({ "conn": 1, "seq": round, "value": 1, "sent_at": 0 }))
        .send()
        .await
        .unwrap();
    assert!(ev.status().is_success(), "{:?}", ev.text().await);
    let w = client
        .post(format!("{base}/write"))
        .body(format!("m v={round} {}", tally::now_ms()))
        .send()
        .await
        .unwrap();
    assert!(w.status().is_success());
    drop(client);
    let _ = stop.send(());
    running.await.unwrap().expect("it stops cleanly");
}

#[test]
fn an_application_rebuilt_on_the_same_store_leaves_no_thread_or_lock_behind() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Idle blocking-pool threads leave quickly, so the count settles fast.
        .thread_keep_alive(Duration::from_millis(50))
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tally.db");
    let baseline = threads();
    let names_before = thread_names();
    for round in 0..4 {
        let mut cfg = ServeConfig::defaults();
        cfg.bind = "127.0.0.1:0".parse().unwrap();
        cfg.store = StoreSpec::Sqlite(db.clone());
        cfg.journal = Some(dir.path().join("journal.jsonl"));
        cfg.data_dir = dir.path().join("data");
        cfg.workers = Some(3);
        cfg.enable_test_jobs = true;
        cfg.shutdown_linger_ms = 0;
        rt.block_on(serve_once(cfg, round));
        assert!(
            lock_is_free(&db),
            "round {round}: the store's lock is still held after the application stopped"
        );
        eventually_blocking(
            &format!("round {round}: the thread count to settle at {baseline}"),
            || {
                if threads() == baseline {
                    Ok(())
                } else {
                    Err(format!(
                        "{} threads; now {:?}, before {:?}",
                        threads(),
                        thread_names(),
                        names_before
                    ))
                }
            },
        );
    }
}
