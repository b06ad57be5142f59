//! tally on a real Redis Cluster: three masters on loopback, each replica's URL naming a
//! node that does not own the `{tally}` slot (so a client that is not a cluster client
//! gets `MOVED` on its first command and never starts). One replica finds out from the
//! server (`redis://`), the other is told by its URL (`redis+cluster://`); both serve one
//! queue, and every key lands on the slot's owner.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{eventually_within, Proc};
use crate::redis_server::RedisCluster;

fn start(dir: &std::path::Path, url: &str) -> Proc {
    Proc::start(
        dir,
        &[
            "--store",
            url,
            "--workers",
            "2",
            "--log-level",
            "warn,tally=info",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_a_three_master_cluster_serve_one_queue() {
    let cluster = RedisCluster::start();
    let (owner, other) = cluster.owner_and_other("{tally}");
    let third = cluster
        .nodes
        .iter()
        .find(|n| n.port != owner.port && n.port != other.port)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), &format!("redis://127.0.0.1:{}", other.port));
    let b = start(
        dir.path(),
        &format!("redis+cluster://127.0.0.1:{}", third.port),
    );
    assert!(
        a.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("cluster client")),
        "the replica says it found a cluster: {:?}",
        a.lines.lock().unwrap()
    );
    let (ca, cb) = (a.client(), b.client());
    for c in [&ca, &cb] {
        let (st, body) = c.get("/readyz").await;
        assert!(st.is_success(), "{st} {body}");
    }

    // Jobs submitted to either replica run on one queue: each replica sees every job
    // done, with its result, and the other replica among the replicas.
    let mut ids = Vec::new();
    for i in 0..20u64 {
        let c = if i % 2 == 0 { &ca } else { &cb };
        ids.push(c.submit("test.sleep", json!({"ms": 10})).await);
    }
    for id in &ids {
        for c in [&ca, &cb] {
            let what = format!("job {id} done as seen by {}", c.addr);
            eventually_within(Duration::from_secs(30), &what, async || {
                match c.status_of(id).await.as_str() {
                    "done" => Ok(()),
                    s => Err(s.to_string()),
                }
            })
            .await;
        }
    }
    let (_, replicas) = ca.get("/v1/replicas").await;
    let listed = replicas["replicas"].as_array().map_or(0, |r| r.len());
    assert_eq!(listed, 2, "{replicas}");
    let (_, stats) = cb.get("/v1/jobs/stats").await;
    assert_eq!(stats["done"], 20, "{stats}");

    // Every key is on the owner of the `{tally}` slot, none elsewhere.
    let on = |n: &crate::redis_server::RedisServer| -> i64 { n.query(&mut redis::cmd("DBSIZE")) };
    assert!(on(owner) > 0, "the slot's owner holds tally's keys");
    assert_eq!(on(other), 0, "nothing on a node that does not own the slot");
    assert_eq!(on(third), 0, "nothing on a node that does not own the slot");
}

/// A database other than 0 does not exist on a cluster: the start fails saying so,
/// whether the URL or the server says cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_other_than_0_on_a_cluster_is_refused_naming_the_cause() {
    let cluster = RedisCluster::start();
    let port = cluster.nodes[0].port;
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("redis://127.0.0.1:{port}/1"),
        format!("redis+cluster://127.0.0.1:{port}/1"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", "--bind", "127.0.0.1:0", "--store", &url])
            .current_dir(dir.path())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .expect("tally exits")
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{url}: {text}");
        assert!(text.contains("only database 0"), "{url}: {text}");
    }
}
