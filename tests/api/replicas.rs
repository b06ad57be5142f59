//! Several `tally serve` processes on one Redis: jobs submitted round-robin all end
//! once, with the right result, while one replica is killed (-9) and another stalls
//! (SIGSTOP past its lease, then SIGCONT: its late outcomes are refused); every replica
//! gives the same answers and the same counters.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use crate::helpers::{eventually, eventually_within, metric, Proc, ProcClient};
use crate::redis_server::RedisServer;

const JOBS: usize = 5000;
/// Each job sleeps this long (checkpointing), so that many are running at any moment.
const JOB_MS: u64 = 15;
/// The long jobs the killed and the stalled replica hold when they fail: their first
/// attempt outlasts the test (it can only end by being taken over), later ones take
/// `LONG_MS`.
const FIRST_MS: u64 = 600_000;
const LONG_MS: u64 = 500;

fn start_replica(dir: &std::path::Path, url: &str) -> Proc {
    Proc::start(
        dir,
        &[
            "--store",
            url,
            "--workers",
            "4",
            "--lease-ms",
            "1000",
            "--queue-capacity",
            "100000",
            "--log-level",
            "warn,tally::app=info",
        ],
    )
}

async fn metric_of(c: &ProcClient, name: &str) -> f64 {
    let (_, page) = c.get("/metrics").await;
    metric(page.as_str().unwrap_or(""), name).unwrap_or(0.0)
}

/// Every job on one replica, by id, through its paged listing.
async fn all_jobs(c: &ProcClient) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cur) => format!("/v1/jobs?limit=1000&cursor={cur}"),
            None => "/v1/jobs?limit=1000".to_string(),
        };
        let (_, page) = c.get(&path).await;
        for j in page["jobs"].as_array().unwrap() {
            out.insert(j["id"].as_str().unwrap().to_string(), j.clone());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_redis_finish_every_job_once_through_a_kill_and_a_stall() {
    let server = RedisServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let procs: Vec<Proc> = (0..3).map(|_| start_replica(dir.path(), &url)).collect();
    let clients: Vec<ProcClient> = procs.iter().map(Proc::client).collect();

    // Replicas 1 and 2 get two long jobs each first, while their workers wait for work
    // (a replica with a waiting worker leases a job submitted to it at once): replica 1
    // holds them when it is killed, replica 2 when it stalls.
    let mut long = HashMap::new();
    for (k, c) in [
        (0, &clients[1]),
        (1, &clients[1]),
        (2, &clients[2]),
        (3, &clients[2]),
    ] {
        let n = JOBS + k;
        let id = c
            .submit(
                "test.echo",
                json!({ "n": n, "ms": LONG_MS, "first_ms": FIRST_MS }),
            )
            .await;
        c.wait_until("the long job to run", async |c| {
            c.status_of(&id).await == "running"
        })
        .await;
        long.insert(id, n);
    }

    // Submit round-robin, 32 at a time.
    let submitted: Vec<(String, usize)> = stream::iter(0..JOBS)
        .map(|n| {
            let c = clients[n % 3].clone();
            async move {
                let id = c.submit("test.echo", json!({ "n": n, "ms": JOB_MS })).await;
                (id, n)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let expected: HashMap<String, usize> = submitted.into_iter().collect();
    assert_eq!(expected.len(), JOBS, "every id is distinct");

    let mut procs = procs.into_iter();
    let (p0, p1, p2) = (
        procs.next().unwrap(),
        procs.next().unwrap(),
        procs.next().unwrap(),
    );
    // Replica 2 stalls past its lease while running the long jobs: the others take its
    // jobs over (its long ones leave `running` only when reclaimed), then it wakes.
    p2.signal(libc::SIGSTOP);
    let stalled: Vec<String> = long
        .iter()
        .filter(|(_, n)| **n >= JOBS + 2)
        .map(|(id, _)| id.clone())
        .collect();
    clients[0]
        .wait_until(
            "the others to reclaim the stalled replica's long jobs",
            async |c| {
                for id in &stalled {
                    let (_, job) = c.get(&format!("/v1/jobs/{id}")).await;
                    if job["status"] == "running" && job["attempts"] == 1 {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    p2.signal(libc::SIGCONT);
    // Replica 1 dies with its long jobs in its hands.
    p1.kill9();

    // Everything ends.
    let live = [&clients[0], &clients[2]];
    eventually_within(
        Duration::from_secs(120),
        "everything to finish",
        async || {
            let (_, stats) = live[0].get("/v1/jobs/stats").await;
            if stats["done"] == json!(JOBS + long.len()) && stats["in_progress"] == json!(0) {
                Ok(())
            } else {
                Err(format!("not everything finished: {stats}"))
            }
        },
    )
    .await;

    // Every job done once, with its own result; both live replicas agree on everything.
    let views = [all_jobs(live[0]).await, all_jobs(live[1]).await];
    assert_eq!(views[0].len(), JOBS + long.len());
    for (id, n) in &long {
        let job = &views[0][id];
        assert_eq!(
            job["result"],
            json!({ "n": n, "ms": LONG_MS, "first_ms": FIRST_MS }),
            "{job}"
        );
        assert!(job["attempts"].as_u64().unwrap() >= 2, "taken over: {job}");
    }
    let mut reran = 0;
    for (id, n) in &expected {
        let job = &views[0][id];
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["result"], json!({ "n": n, "ms": JOB_MS }), "{job}");
        let attempts = job["attempts"].as_u64().unwrap();
        assert!(attempts >= 1, "{job}");
        if attempts > 1 {
            reran += 1;
        }
        assert_eq!(job, &views[1][id], "replicas disagree on {id}");
    }
    for path in ["/v1/jobs/stats", "/api/num_jobs", "/storage/get_counter"] {
        assert_eq!(live[0].get(path).await, live[1].get(path).await, "{path}");
    }
    // The stalled replica's late outcomes were refused, not recorded.
    let fenced = metric_of(live[1], "tally_queue_fenced_total").await;
    assert!(
        fenced > 0.0,
        "no late outcome of the stalled replica was refused"
    );
    eprintln!(
        "{JOBS} short jobs: {reran} ran more than once; {} long ones taken over; {fenced} stale outcomes refused",
        long.len()
    );
    drop((p0, p2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_told_to_stop_hands_its_jobs_to_the_others_at_once() {
    let server = RedisServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    // Leases far longer than the test's patience: a job another replica picks up in time
    // was handed back, not reclaimed after its lease expired.
    let args = |workers: &'static str| {
        vec![
            "--store".to_string(),
            url.clone(),
            "--workers".into(),
            workers.into(),
            "--lease-ms".into(),
            "120000".into(),
            "--shutdown-timeout".into(),
            "1".into(),
        ]
    };
    let a_args = args("2");
    let a = Proc::start(
        dir.path(),
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let ca = a.client();
    // A takes two long jobs; nobody else is there yet.
    let long: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..2 {
            ids.push(ca.submit("test.sleep", json!({ "ms": 600_000 })).await);
        }
        ids
    };
    for id in &long {
        ca.wait_until("A to run its job", async |c| {
            c.status_of(id).await == "running"
        })
        .await;
    }
    let b_args = args("2");
    let b = Proc::start(
        dir.path(),
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let cb = b.client();
    a.signal(libc::SIGTERM);
    let (status, _) = a.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    // B runs them now (both its workers busy: nothing else was submitted), as the same
    // attempt (a hand-back does not count one).
    cb.wait_until("B to take over the handed-back jobs", async |c| {
        metric_of(c, "tally_busy_workers").await == 2.0
    })
    .await;
    for id in &long {
        let (_, job) = cb.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(
            (job["status"].clone(), job["attempts"].clone()),
            (json!("running"), json!(1)),
            "{job}"
        );
    }
    let (_, replicas) = cb.get("/v1/replicas").await;
    assert_eq!(
        replicas["replicas"].as_array().unwrap().len(),
        1,
        "A left the replicas list as it stopped: {replicas}"
    );
    drop(b);
}

/// With Redis and no `--journal`, events are ordered and dropped: the start says so in
/// the log (and `/v1/pipeline` shows no journal); with a journal of its own, nothing is
/// said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_redis_without_a_journal_says_at_start_that_events_are_not_kept() {
    let server = RedisServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let warning = "the ordered pipeline writes no journal";
    for (journal, warned) in [(None, true), (Some("events.jsonl"), false)] {
        let mut args = vec!["--store", url.as_str()];
        if let Some(j) = journal {
            args.extend(["--journal", j]);
        }
        let p = Proc::start(dir.path(), &args);
        let (_, pipeline) = p.client().get("/v1/pipeline").await;
        assert_eq!(pipeline["journal"].is_null(), warned, "{pipeline}");
        p.signal(libc::SIGTERM);
        let (status, lines) = p.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "{status:?}");
        assert_eq!(
            lines.iter().any(|l| l.contains(warning)),
            warned,
            "journal {journal:?}: {lines:#?}"
        );
    }
}

/// A replica draining on Redis keeps its heartbeat until it has finished: the others go
/// on seeing it (busy with the job it finishes), rather than taking it for dead once the
/// drain outlasts the liveness window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_keeps_its_heartbeat_until_it_stops() {
    let server = RedisServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    // Leases of 1 s: a replica whose heartbeat stops is taken for dead after 10 s (the
    // liveness window's floor); A's drain lasts longer than that.
    let args = [
        "--store",
        &url,
        "--workers",
        "1",
        "--lease-ms",
        "1000",
        "--shutdown-timeout",
        "60",
    ];
    let a = Proc::start(dir.path(), &args);
    let b = Proc::start(dir.path(), &args);
    let (ca, cb) = (a.client(), b.client());
    let id = ca.submit("test.sleep", json!({ "ms": 13_000 })).await;
    ca.wait_until("A to run its job", async |c| {
        c.status_of(&id).await == "running"
    })
    .await;
    let a_pid = a.pid() as u64;
    // A as B lists it: its consumer name and busy workers.
    let listed = async || -> Option<(String, u64)> {
        let (_, r) = cb.get("/v1/replicas").await;
        r["replicas"].as_array()?.iter().find_map(|x| {
            (x["pid"].as_u64() == Some(a_pid)).then(|| {
                (
                    x["name"].as_str().unwrap_or("").to_string(),
                    x["busy"].as_u64().unwrap_or(0),
                )
            })
        })
    };
    let name = listed().await.expect("A is listed").0;
    // The time of A's last heartbeat, as Redis holds it (not derived from clocks).
    let beat = || -> u64 {
        let v: Option<String> = server.query(
            redis::cmd("HGET")
                .arg(format!("{{tally}}:replica:{name}"))
                .arg("seen_ms"),
        );
        v.and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let draining = std::time::Instant::now();
    a.signal(libc::SIGTERM);
    // Two heartbeats after the drain began (one might have been on its way as it
    // began).
    let mut seen = beat();
    for n in 1..=2 {
        let what = format!("A's heartbeat number {n} during its drain");
        seen = eventually(&what, async || match beat() {
            at if at > seen => Ok(at),
            at => Err(format!("seen_ms {at}")),
        })
        .await;
    }
    // Past the liveness window into the drain, B still lists A, busy with its job, and
    // A's heartbeat still moves.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(draining.elapsed())).await;
    assert_eq!(
        listed().await,
        Some((name.clone(), 1)),
        "A is listed, busy, 11 s into its drain"
    );
    let late = beat();
    eventually("A's heartbeat 11 s into its drain", async || match beat() {
        at if at > late => Ok(()),
        at => Err(format!("seen_ms {at}")),
    })
    .await;
    let (status, _) = a.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert_eq!(
        cb.status_of(&id).await,
        "done",
        "A finished its job before it stopped"
    );
    let (_, replicas) = cb.get("/v1/replicas").await;
    assert_eq!(
        replicas["replicas"].as_array().unwrap().len(),
        1,
        "{replicas}"
    );
}
