//! A real headless Chromium for the dashboard tests, driven over WebDriver
//! (`chromedriver` from Debian's `chromium-driver`, on a free port, with a fresh
//! profile). One browser at a time in this test binary; each test gets its own.
//! Without `chromium` and `chromedriver` the tests fail with the command that installs
//! them: they never skip.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::helpers::{eventually, PATIENCE};

/// Chromium's flags: headless, and nothing that talks to the outside (this machine
/// refuses outside connections anyway; a quiet browser is also a faster one).
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
    "--window-size=1360,1300",
];

const INSTALL_HINT: &str = "the browser tests need Debian's `chromium` and `chromium-driver`: \
     apt-get update && apt-get install -y chromium chromium-driver (.ci/run installs them)";

/// One browser at a time: two Chromiums on two cores make every test slow.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `POST /session/{id}/se/log {"type": "browser"}`: the console messages since the last
/// call (chromedriver's log endpoint; W3C WebDriver has none).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &reqwest::Url,
        session_id: Option<&str>,
    ) -> Result<reqwest::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or("")))
    }

    fn method_and_body(&self, _url: &reqwest::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

pub struct Browser {
    pub client: Client,
    /// The server under test, e.g. `http://127.0.0.1:40123`.
    pub base: String,
    driver: Child,
    _profile: TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
    /// Console errors seen so far (the log endpoint hands each message out once).
    console: Vec<Value>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium for the server at `base`.
    pub async fn open(base: &str) -> Browser {
        Browser::open_with(base, &[]).await
    }

    /// [`Browser::open`] with more Chromium flags (e.g. `--host-resolver-rules`).
    pub async fn open_with(base: &str, flags: &[&str]) -> Browser {
        let chromium = find_program(&["chromium", "chromium-browser"]).expect(INSTALL_HINT);
        let chromedriver = find_program(&["chromedriver"]).expect(INSTALL_HINT);
        let turn = ONE_AT_A_TIME.lock().await;
        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(chromedriver);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so a failed test kills the browser with it.
            .process_group(0);
        let driver = cmd.spawn().expect("chromedriver starts");
        eventually("chromedriver to listen", async || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| format!("connecting to port {port}: {e}"))
        })
        .await;
        let mut args: Vec<String> = FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(flags.iter().map(|f| f.to_string()));
        let caps: Capabilities = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        }))
        .unwrap();
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session starts");
        Browser {
            client,
            base: base.to_string(),
            driver,
            _profile: profile,
            _turn: turn,
            console: Vec::new(),
        }
    }

    pub async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
    }

    /// Runs `script` (a function body: `return ...`) in the page.
    pub async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Polls `script` until it returns something truthy; returns that.
    pub async fn wait_js(&self, what: &str, script: &str) -> Value {
        let until = Instant::now() + PATIENCE;
        loop {
            let v = self.js(script).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() > until {
                self.screenshot("timeout").await;
                panic!("timed out waiting for {what} (`{script}` gave {v}); see target/screenshots/timeout.png");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first element matching `css`, once it exists.
    /// Runs `fetch(url, init)` in the page (`init` is a JS object literal) and answers
    /// `"<status> <body>"`, or `"error <message>"` when the browser refused it (CORS).
    pub async fn fetch(&self, url: &str, init: &str) -> String {
        let r = self
            .client
            .execute_async(
                &format!(
                    "const done = arguments[arguments.length - 1];
                     fetch({url:?}, {init})
                       .then(r => r.text().then(t => done(r.status + ' ' + t)))
                       .catch(e => done('error ' + e));"
                ),
                vec![],
            )
            .await
            .expect("the script runs");
        r.as_str().unwrap_or_default().to_string()
    }

    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// The text of the first element matching `css`, once it exists.
    pub async fn text(&self, css: &str) -> String {
        let el = self.find(css).await;
        el.text().await.unwrap()
    }

    pub async fn click(&self, css: &str) {
        let el = self.find(css).await;
        el.click().await.unwrap();
    }

    /// Clicks `css`, then "Confirm" in the confirmation dialog it opens.
    pub async fn click_confirmed(&self, css: &str) {
        self.click(css).await;
        self.wait_js(
            "the confirmation dialog",
            "return document.getElementById('confirm').open",
        )
        .await;
        self.click("#confirm-ok").await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        el.clear().await.unwrap();
        el.send_keys(text).await.unwrap();
    }

    /// Saves a PNG of the page to `target/screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Console messages of level SEVERE (errors) since the start, except those that
    /// contain one of `expected`.
    pub async fn console_errors(&mut self, expected: &[&str]) -> Vec<String> {
        let entries = self.client.issue_cmd(BrowserLog).await.unwrap();
        if let Value::Array(list) = entries {
            self.console.extend(list);
        }
        self.console
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .filter(|m| !expected.iter().any(|x| m.contains(x)))
            .collect()
    }

    /// Resources this page loaded from anywhere but the server under test.
    pub async fn outside_loads(&self) -> Vec<String> {
        let names = self
            .js("return performance.getEntriesByType('resource').map(e => e.name)")
            .await;
        names
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .filter(|n| !n.starts_with(&format!("{}/", self.base)))
            .map(str::to_string)
            .collect()
    }

    /// Checks the current page loaded nothing from outside and nothing went to the
    /// console as an error (but `expected`).
    pub async fn check_clean(&mut self, expected: &[&str]) {
        let outside = self.outside_loads().await;
        assert!(
            outside.is_empty(),
            "loaded from outside the server: {outside:?}"
        );
        let errors = self.console_errors(expected).await;
        assert!(errors.is_empty(), "console errors: {errors:#?}");
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        self.kill();
    }

    fn kill(&mut self) {
        // SAFETY: killpg(2) on the process group we created for the driver.
        unsafe {
            libc::killpg(self.driver.id() as i32, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(None) = self.driver.try_wait() {
            self.kill();
        }
    }
}
