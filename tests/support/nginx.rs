//! A private nginx for a test: Debian's binary run as the current user on a free
//! loopback port, with the repository's configuration (`deploy/nginx.conf.template`)
//! rendered for loopback replicas, everything it writes in its own directory. It fails
//! loudly when nginx is missing (`.ci/run` installs it); tests never skip.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's nginx configuration, with its placeholders.
pub fn template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx.conf.template")
}

/// The placeholders the template has, and compose.yaml's nginx environment sets.
pub const PLACEHOLDERS: [&str; 2] = ["NGINX_LISTEN", "TALLY_UPSTREAM_SERVERS"];

/// Substitutes the placeholders the way the nginx image's envsubst does; panics when the
/// template has a placeholder this does not know (it would reach nginx unrendered).
pub fn render(template: &str, listen: &str, upstream_servers: &str) -> String {
    let out = template
        .replace("${NGINX_LISTEN}", listen)
        .replace("${TALLY_UPSTREAM_SERVERS}", upstream_servers);
    if let Some(at) = out.find("${") {
        let rest: String = out[at..].chars().take(40).collect();
        panic!("deploy/nginx.conf.template has a placeholder nothing renders: {rest}");
    }
    out
}

fn binary() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join("nginx");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "nginx is not installed (apt-get install nginx-light, or nginx); the deployment \
         test runs the repository's nginx configuration for real and needs it"
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().unwrap().port()
}

pub struct Nginx {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx in front of `replicas` (loopback ports), listening on a free port; returns
    /// once it accepts connections.
    pub fn start(replicas: &[u16]) -> Nginx {
        let template = std::fs::read_to_string(template_path()).expect("the nginx template");
        let servers: String = replicas
            .iter()
            .map(|p| format!("server 127.0.0.1:{p};"))
            .collect::<Vec<_>>()
            .join(" ");
        // The port is free when picked; another process could take it before nginx
        // binds, so a failed start is tried again on another one.
        let mut last_error = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let site = render(&template, &format!("127.0.0.1:{port}"), &servers);
            std::fs::write(dir.path().join("tally.conf"), site).unwrap();
            std::fs::write(dir.path().join("nginx.conf"), main_conf(dir.path())).unwrap();
            let d = dir.path();
            // The access log is the process's standard output (the template logs to
            // /dev/stdout, as in the container).
            let stdout = File::create(d.join("access.log")).unwrap();
            let mut child = Command::new(binary())
                .arg("-p")
                .arg(d)
                .arg("-e")
                .arg(d.join("error.log"))
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(Stdio::inherit())
                .spawn()
                .expect("nginx starts");
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Nginx {
                        child: Some(child),
                        port,
                        dir,
                    };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!(
                        "nginx exited ({status}): {}",
                        std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
                    );
                    break;
                }
                if Instant::now() > until {
                    let _ = child.kill();
                    panic!("nginx did not listen on {port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What `Host` a client sends to this nginx.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The access log so far (format `tally_upstream` of the template).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Fast shutdown through the master (SIGTERM), which stops its workers; a kill -9
    /// would leave them serving the port.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The main configuration around the repository's site file: the paths nginx would
/// otherwise take from its compiled-in prefix (pid, temp files, logs) point into `dir`,
/// one worker, in the foreground.
fn main_conf(dir: &Path) -> String {
    let d = dir.display();
    // As root, nginx would hand its workers to `nobody`, which cannot enter the test's
    // private directory; a user that runs it unprivileged keeps its own user anyway.
    // SAFETY: geteuid(2) has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;"
    } else {
        ""
    };
    format!(
        "{user}
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/tally.conf;
}}
"
    )
}
