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
    accepted_id, eventually, eventually_blocking, eventually_within, fixture, health_csv, metric,
    reply, text_of, PATIENCE,
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
    /// The private Redis of an app on [`Backend::Redis`].
    _redis: Option<crate::redis_server::RedisServer>,
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
            _redis: None,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// [`TestApp::spawn_with`] on `store` (a private `redis-server` for Redis, kept as
    /// long as the app).
    pub async fn on(store: Backend, f: impl FnOnce(&mut ServeConfig)) -> TestApp {
        let redis = (store == Backend::Redis).then(crate::redis_server::RedisServer::start);
        let url = redis.as_ref().map(|r| r.url());
        let mut app = TestApp::spawn_with(move |c| {
            match store {
                Backend::Memory => c.store = StoreSpec::Memory,
                Backend::Sqlite => {}
                Backend::Redis => c.store = url.unwrap().parse().expect("a redis URL"),
            }
            f(c);
        })
        .await;
        app._redis = redis;
        app
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

/// The stores an API scenario runs on (see [`on_every_store`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite,
    Redis,
}

/// One test per store for each scenario named: `async fn scenario(store: Backend)`
/// becomes `memory::scenario`, `sqlite::scenario` and `redis::scenario`, so a behaviour
/// the API promises on every store is written once.
macro_rules! on_every_store {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(crate::helpers::Backend::Memory).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(crate::helpers::Backend::Redis).await
                }
            )*
        }
    };
}
pub(crate) use on_every_store;
