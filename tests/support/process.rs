//! The `tally` binary as a child process: `tally serve` ([`Proc`]) for signals, kill -9
//! and restarts, with a small client ([`ProcClient`]), and `tally upstream`
//! ([`UpstreamProc`]).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use super::http::{accepted_id, eventually_blocking_within, reply, PATIENCE};

/// The `tally` binary running as a child process.
pub struct Proc {
    child: Child,
    pub addr: String,
    pub lines: Arc<Mutex<Vec<String>>>,
    /// The thread that reads its stdout into `lines`; it ends when the process exits.
    reader: Option<JoinHandle<()>>,
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
        let reader = std::thread::spawn(move || {
            let tx = stdout_tx;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
                    let _ = tx.send(addr);
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
                    if let Some(addr) = text.lines().find_map(listening_addr) {
                        let _ = tx.send(addr);
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
            reader: Some(reader),
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

    /// Waits for the process to exit on its own; its status and everything it printed.
    pub fn wait_exit(mut self, within: Duration) -> (ExitStatus, Vec<String>) {
        // On a timeout the panic drops `self`, whose Drop kills the process.
        let st = eventually_blocking_within(within, "tally to exit", || {
            self.child
                .try_wait()
                .unwrap()
                .ok_or_else(|| format!("still running; output: {:?}", self.lines.lock().unwrap()))
        });
        // Its stdout is closed: the reader ends once it took the last lines.
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the output reader does not panic");
        }
        let lines = self.lines.lock().unwrap().clone();
        (st, lines)
    }

    pub fn client(&self) -> ProcClient {
        ProcClient {
            addr: self.addr.clone(),
            http: reqwest::Client::new(),
        }
    }
}

/// The address in the start-up line `tally is listening`, in the text log format
/// (`addr=127.0.0.1:1234`) or the JSON one (`"fields":{"addr":"127.0.0.1:1234"}`).
fn listening_addr(line: &str) -> Option<String> {
    if !line.contains("tally is listening") {
        return None;
    }
    if line.starts_with('{') {
        let v: Value = serde_json::from_str(line).ok()?;
        return v["fields"]["addr"].as_str().map(str::to_string);
    }
    line.split("addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_string)
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
        super::http::eventually(what, async || {
            if f(self).await {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        })
        .await
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
        eventually_blocking_within(within, "tally upstream to exit on SIGTERM", || {
            self.child
                .try_wait()
                .unwrap()
                .ok_or_else(|| "still running: it ignored SIGTERM".to_string())
        })
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
