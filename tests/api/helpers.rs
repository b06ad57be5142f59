//! The api tests' harness: an in-process server on port 0 with isolated state
//! ([`TestApp`]); the rest (the real binary as a child process, requests and their
//! JSON, `eventually`) comes from `tests/support/`, shared with the other test binaries.

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::app::Application;
use tally::config::{ServeConfig, StoreSpec};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use crate::support::http::{
    accepted_id, eventually, fixture, health_csv, metric, reply, PATIENCE,
};
pub use crate::support::process::{Proc, ProcClient, UpstreamProc};

pub struct TestApp {
    pub addr: String,
    pub client: reqwest::Client,
    /// `--data-dir`: by default `data/` inside the test's temp dir (created on demand).
    pub data_dir: PathBuf,
    /// `--compat-get-sum-bind`'s base URL, when the test set it.
    pub compat_addr: Option<String>,
    /// `--line-listen`'s address, when the test set it.
    pub line_addr: Option<std::net::SocketAddr>,
    /// Holds the SQLite file; removed when the test ends.
    _dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(|_| {}).await
    }

    /// Defaults for tests: port 0, an SQLite file in a fresh temp dir, 2 workers, the
    /// test job kinds on, the health.csv fixture; `f` adjusts the rest.
    pub async fn spawn_with(f: impl FnOnce(&mut ServeConfig)) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServeConfig::defaults();
        cfg.bind = "127.0.0.1:0".parse().unwrap();
        cfg.store = StoreSpec::Sqlite(dir.path().join("tally.db"));
        cfg.workers = Some(2);
        cfg.enable_test_jobs = true;
        cfg.shutdown_linger_ms = 0;
        cfg.stats_dataset = Some(health_csv());
        cfg.data_dir = dir.path().join("data");
        f(&mut cfg);
        let data_dir = cfg.data_dir.clone();
        let app = Application::build(cfg)
            .await
            .expect("the application builds");
        let addr = format!("http://127.0.0.1:{}", app.port());
        let compat_addr = app.compat_addr().map(|a| format!("http://{a}"));
        let line_addr = app.line_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        TestApp {
            addr,
            client: reqwest::Client::new(),
            data_dir,
            compat_addr,
            line_addr,
            _dir: dir,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        reply(self.client.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        reply(self.client.post(self.url(path)).json(body)).await
    }

    /// Submits on the native API; returns the job id.
    pub async fn submit(&self, kind: &str, params: Value) -> String {
        accepted_id(
            self.post("/v1/jobs", &json!({ "kind": kind, "params": params }))
                .await,
        )
    }

    /// Polls `/v1/jobs/{id}` until the job is finished.
    pub async fn wait_job(&self, id: &str) -> Value {
        self.wait_status(id, &["done", "failed", "cancelled"]).await
    }

    pub async fn wait_status(&self, id: &str, wanted: &[&str]) -> Value {
        eventually(&format!("job {id} to reach {wanted:?}"), async || {
            let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if wanted.contains(&body["status"].as_str().unwrap_or("")) {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        })
        .await
    }

    /// POSTs to a compatible route; returns the `job_id`.
    pub async fn compat_submit(&self, route: &str, body: &Value) -> String {
        let (status, res) = self.post(&format!("/api/{route}"), body).await;
        assert_eq!(status, StatusCode::OK, "{res}");
        res["job_id"].as_str().unwrap().to_string()
    }

    /// Polls `/api/get_results/{id}` like the original clients, until not running.
    pub async fn compat_result(&self, id: &str) -> Value {
        eventually(&format!("{id} to finish"), async || {
            let (_, body) = self.get(&format!("/api/get_results/{id}")).await;
            if body["status"] != "running" {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        })
        .await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the server the way a signal would, and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}
