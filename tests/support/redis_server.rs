//! A private `redis-server` for a test: a free port on 127.0.0.1, its own directory,
//! never the machine's shared server. It fails loudly when `redis-server` is missing
//! (`.ci/run` installs it); tests never skip.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::http::eventually_blocking_within;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// Starts on another port left, when a port is taken under the server's feet.
    restarts_left: u32,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().unwrap().port()
}

fn binary() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join("redis-server");
        if p.exists() {
            return p;
        }
    }
    panic!("redis-server is not installed (apt-get install redis-server); these tests need it");
}

impl RedisServer {
    /// Without persistence.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// With extra configuration, e.g. `["--appendonly", "yes", "--appendfsync", "always"]`.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let mut s = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
            restarts_left: 3,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let what = format!("redis-server to come up on {}", self.port);
        eventually_blocking_within(Duration::from_secs(20), &what, || {
            // Gone already: its port was taken between our probe for a free one and its
            // bind (another test's server, under a loaded run). Once more, on another.
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                if self.restarts_left == 0 {
                    panic!(
                        "redis-server exited at start ({status}) on port {}",
                        self.port
                    );
                }
                self.restarts_left -= 1;
                self.port = free_port();
                self.launch();
                return Ok(());
            }
            let mut c = self.client().get_connection().map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query::<String>(&mut c)
                .map(drop)
                .map_err(|e| format!("PING: {e}"))
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// kill -9: nothing is flushed beyond what its persistence settings already wrote.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory (and so the same AOF).
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    /// A command on a fresh connection.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut c = self.client().get_connection().unwrap();
        cmd.query(&mut c).unwrap()
    }

    /// `used_memory` from INFO memory.
    pub fn used_memory(&self) -> u64 {
        let info: String = self.query(redis::cmd("INFO").arg("memory"));
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO memory has used_memory")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Redis Cluster of three masters on loopback (no replicas), each a private
/// `redis-server` with cluster mode on, its slots assigned and its nodes met by the test
/// itself (no `redis-cli --cluster`): up when every node says `cluster_state:ok`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let per = 16384 / nodes.len();
        for (i, n) in nodes.iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == nodes.len() {
                16383
            } else {
                first + per - 1
            };
            let _: String = n.query(
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(first)
                    .arg(last),
            );
        }
        for n in &nodes[1..] {
            let _: String = n.query(
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(nodes[0].port),
            );
        }
        for n in &nodes {
            let what = format!("cluster node {} to say cluster_state:ok", n.port);
            eventually_blocking_within(Duration::from_secs(30), &what, || {
                let info: String = n.query(redis::cmd("CLUSTER").arg("INFO"));
                let known: String = n.query(redis::cmd("CLUSTER").arg("NODES"));
                if info.contains("cluster_state:ok") && known.lines().count() == 3 {
                    Ok(())
                } else {
                    Err(info)
                }
            });
        }
        RedisCluster { nodes }
    }

    /// The node that owns the slot of `key`, and one that does not.
    pub fn owner_and_other(&self, key: &str) -> (&RedisServer, &RedisServer) {
        let slot: i64 = self.nodes[0].query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key));
        let per = 16384 / self.nodes.len() as i64;
        let owner = ((slot / per) as usize).min(self.nodes.len() - 1);
        (
            &self.nodes[owner],
            &self.nodes[(owner + 1) % self.nodes.len()],
        )
    }
}
