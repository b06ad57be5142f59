//! Shared test harness: an in-process server on port 0 with isolated state
//! ([`TestApp`]), and the real binary as a child process ([`Proc`]) for signals,
//! kill -9 and restarts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::app::Application;
use tally::config::{ServeConfig, StoreSpec};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The checked-in copy of the survey extract.
pub fn health_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/health.csv")
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// How long any wait in these tests may take before it is a failure.
pub const PATIENCE: Duration = Duration::from_secs(30);

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
        let until = Instant::now() + PATIENCE;
        loop {
            let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if wanted.contains(&body["status"].as_str().unwrap_or("")) {
                return body;
            }
            assert!(
                Instant::now() < until,
                "job {id} never reached {wanted:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// POSTs to a compatible route; returns the `job_id`.
    pub async fn compat_submit(&self, route: &str, body: &Value) -> String {
        let (status, res) = self.post(&format!("/api/{route}"), body).await;
        assert_eq!(status, StatusCode::OK, "{res}");
        res["job_id"].as_str().unwrap().to_string()
    }

    /// Polls `/api/get_results/{id}` like the original clients, until not running.
    pub async fn compat_result(&self, id: &str) -> Value {
        let until = Instant::now() + PATIENCE;
        loop {
            let (_, body) = self.get(&format!("/api/get_results/{id}")).await;
            if body["status"] != "running" {
                return body;
            }
            assert!(Instant::now() < until, "{id} still running");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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

/// Sends a request; the status and the body as JSON (or as a JSON string when it is not
/// JSON).
async fn reply(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let res = req.send().await.unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The id of a job the native API accepted.
fn accepted_id((status, body): (StatusCode, Value)) -> String {
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// The value of a metric line (exact name with labels) in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// The `tally` binary running as a child process.
pub struct Proc {
    child: Child,
    pub addr: String,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `tally serve --bind 127.0.0.1:0 <args>` in `cwd`, and waits for it to listen.
    pub fn start(cwd: &Path, args: &[&str]) -> Proc {
        Proc::start_with(cwd, args, |_| {})
    }

    /// Changes the running process's largest file size (its soft `RLIMIT_FSIZE`;
    /// `None`: unlimited). With a tiny limit every write to a file fails with EFBIG,
    /// the way writes fail on a full disk.
    pub fn set_max_file_size(&self, bytes: Option<u64>) {
        let lim = libc::rlimit {
            rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: prlimit(2) on our own child with a valid rlimit; no old value asked for.
        let rc =
            unsafe { libc::prlimit(self.pid(), libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit failed: {}", std::io::Error::last_os_error());
    }

    /// `start` with extra environment variables (e.g. libfaketime's).
    pub fn start_with_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::start_with(cwd, args, |cmd| {
            for (k, v) in env {
                cmd.env(k, v);
            }
        })
    }

    fn start_with(cwd: &Path, args: &[&str], customize: impl FnOnce(&mut Command)) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
        cmd.arg("serve")
            .args(["--bind", "127.0.0.1:0", "--enable-test-jobs"])
            .args(args)
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        customize(&mut cmd);
        let mut child = cmd.spawn().expect("the tally binary starts");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = lines.clone();
        let stdout_tx = tx.clone();
        std::thread::spawn(move || {
            let tx = stdout_tx;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("tally is listening") {
                    if let Some(addr) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next())
                    {
                        let _ = tx.send(addr.to_string());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        // With --log-file the log is not on stdout: watch the file instead.
        if let Some(i) = args.iter().position(|a| *a == "--log-file") {
            let log = cwd.join(args[i + 1]);
            std::thread::spawn(move || {
                let until = Instant::now() + PATIENCE;
                while Instant::now() < until {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if let Some(addr) = text
                        .lines()
                        .filter(|l| l.contains("tally is listening"))
                        .find_map(|l| {
                            l.split("addr=")
                                .nth(1)
                                .and_then(|s| s.split_whitespace().next())
                        })
                    {
                        let _ = tx.send(addr.to_string());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        let addr = match rx.recv_timeout(PATIENCE) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("tally did not start; output: {:?}", lines.lock().unwrap());
            }
        };
        Proc {
            child,
            addr: format!("http://{addr}"),
            lines,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(mut self, within: Duration) -> (ExitStatus, Vec<String>) {
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let lines = self.lines.lock().unwrap().clone();
                return (st, lines);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!(
                    "tally did not exit within {within:?}; output: {:?}",
                    self.lines.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> ProcClient {
        ProcClient {
            addr: self.addr.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small HTTP client aimed at a [`Proc`].
#[derive(Clone)]
pub struct ProcClient {
    pub addr: String,
    pub http: reqwest::Client,
}

impl ProcClient {
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        reply(self.http.get(format!("{}{path}", self.addr))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        reply(self.http.post(format!("{}{path}", self.addr)).json(body)).await
    }

    pub async fn submit(&self, kind: &str, params: Value) -> String {
        accepted_id(
            self.post("/v1/jobs", &json!({ "kind": kind, "params": params }))
                .await,
        )
    }

    pub async fn status_of(&self, id: &str) -> String {
        let (_, body) = self.get(&format!("/v1/jobs/{id}")).await;
        body["status"].as_str().unwrap_or("").to_string()
    }

    pub async fn wait_until(&self, what: &str, mut f: impl AsyncFnMut(&ProcClient) -> bool) {
        let until = Instant::now() + PATIENCE;
        while !f(self).await {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `tally upstream` (the slow demo upstream) running as a child process on port 0.
pub struct UpstreamProc {
    child: Child,
    /// `http://127.0.0.1:PORT/`
    pub url: String,
}

impl UpstreamProc {
    /// Starts `tally upstream --bind 127.0.0.1:0 <args>` and waits for it to listen.
    pub fn start(args: &[&str]) -> UpstreamProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("upstream")
            .args(["--bind", "127.0.0.1:0"])
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the tally binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") {
                    if let Some(addr) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next())
                    {
                        let _ = tx.send(addr.to_string());
                    }
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(PATIENCE) else {
            let _ = child.kill();
            panic!("tally upstream did not start");
        };
        UpstreamProc {
            child,
            url: format!("http://{addr}/"),
        }
    }

    /// Sends SIGTERM and waits (up to `within`) for it to exit.
    pub fn terminate(mut self, within: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < until, "tally upstream ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it now (kill -9) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for UpstreamProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
