//! The deployment, run for real on loopback: a private `redis-server`, three
//! `tally serve --store redis://...` replicas sharing one `--data-dir`, and Debian's nginx
//! with the repository's configuration (`deploy/nginx.conf.template`) rendered for their
//! ports. The compatible flows and the native job API are driven through nginx; every
//! replica, asked directly, must then give the same answers and counters; a replica
//! killed with kill -9 while nginx serves must cost no request and no job.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::{assert_close, eventually, fixture, reply};
use support::nginx::{self, Nginx};
use support::process::Proc;
use support::redis_server::RedisServer;

/// One `tally serve` process.
struct Replica {
    /// None once killed.
    proc: Option<Proc>,
    port: u16,
    /// Its working directory (nothing of the Redis store is written there).
    _cwd: tempfile::TempDir,
}

impl Replica {
    fn start(redis: &RedisServer, data_dir: &Path, lease_ms: u64) -> Replica {
        let cwd = tempfile::tempdir().unwrap();
        let data_dir = data_dir.to_str().unwrap();
        let health = fixture("health.csv");
        let lease = lease_ms.to_string();
        let proc = Proc::start(
            cwd.path(),
            &[
                "--workers",
                "2",
                "--store",
                &redis.url(),
                "--data-dir",
                data_dir,
                "--stats-dataset",
                health.to_str().unwrap(),
                "--lease-ms",
                &lease,
                "--shutdown-timeout",
                "2",
                "--log-level",
                "warn,tally::app=info",
            ],
        );
        let port = proc
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the listening address has a port");
        Replica {
            proc: Some(proc),
            port,
            _cwd: cwd,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn pid(&self) -> i32 {
        self.proc.as_ref().expect("a live replica").pid()
    }

    fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill9();
        }
    }
}

/// Redis, the replicas, nginx in front, and a client.
struct Cluster {
    http: reqwest::Client,
    nginx: Nginx,
    replicas: Vec<Replica>,
    data_dir: tempfile::TempDir,
    _redis: RedisServer,
}

impl Cluster {
    fn start(replicas: usize, lease_ms: u64) -> Cluster {
        let redis = RedisServer::start();
        let data_dir = tempfile::tempdir().unwrap();
        let replicas: Vec<Replica> = (0..replicas)
            .map(|_| Replica::start(&redis, data_dir.path(), lease_ms))
            .collect();
        let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
        let nginx = Nginx::start(&ports);
        Cluster {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            nginx,
            replicas,
            data_dir,
            _redis: redis,
        }
    }

    /// A request through nginx: status and body (JSON, or a JSON string).
    async fn get(&self, path: &str) -> (StatusCode, Value) {
        reply(self.http.get(self.nginx.url(path))).await
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        reply(self.http.post(self.nginx.url(path)).json(body)).await
    }

    /// A GET through nginx that must succeed, whatever replica is down.
    async fn get_ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "GET {path} through nginx: {body}\nnginx errors:\n{}",
            self.nginx.error_log()
        );
        body
    }

    async fn submit(&self, kind: &str, params: Value) -> String {
        let (status, body) = self
            .post("/v1/jobs", &json!({ "kind": kind, "params": params }))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "POST /v1/jobs: {body}");
        assert_eq!(body["status"], "queued", "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Polls `/v1/jobs/{id}` through nginx until the job is in one of `wanted`.
    async fn wait_status(&self, id: &str, wanted: &[&str]) -> Value {
        eventually(&format!("job {id} to reach {wanted:?}"), async || {
            let body = self.get_ok(&format!("/v1/jobs/{id}")).await;
            if wanted.contains(&body["status"].as_str().unwrap_or("")) {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        })
        .await
    }

    /// Waits until no job is queued or running, as nginx's replicas see it.
    async fn wait_idle(&self) {
        eventually("no job in progress", async || {
            let stats = self.get_ok("/v1/jobs/stats").await;
            if stats["in_progress"] == 0 {
                Ok(())
            } else {
                Err(stats.to_string())
            }
        })
        .await
    }

    /// The same GET on every live replica directly (not through nginx).
    async fn on_each(&self, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        for r in &self.replicas {
            let (status, body) = reply(self.http.get(r.url(path))).await;
            assert_eq!(status, StatusCode::OK, "GET {path} on :{}: {body}", r.port);
            out.push(body);
        }
        out
    }

    /// Every live replica answers `path` the same way; returns that answer.
    async fn same_on_each(&self, path: &str) -> Value {
        let answers = self.on_each(path).await;
        for (r, a) in self.replicas.iter().zip(&answers) {
            assert_eq!(a, &answers[0], "replica :{} differs on {path}", r.port);
        }
        answers[0].clone()
    }

    /// The replicas (ports) nginx passed requests to, from its access log.
    fn upstreams_used(&self) -> BTreeSet<u16> {
        self.nginx
            .access_log()
            .lines()
            .filter_map(|l| l.split("upstream=\"").nth(1))
            .filter_map(|s| s.split('"').next())
            .flat_map(|s| s.split(", ").map(str::to_string).collect::<Vec<_>>())
            .filter_map(|a| a.rsplit(':').next().and_then(|p| p.parse().ok()))
            .collect()
    }
}

/// A CSV of integers (so every sum is exact in f64) and the sums of every 10th column
/// from the first, computed here from the same numbers.
fn integer_csv(rows: i64, cols: i64, seed: i64) -> (String, Value) {
    let header: Vec<String> = (0..cols).map(|c| format!("c{c}")).collect();
    let mut text = header.join(",") + "\n";
    let mut sums = vec![0i64; cols as usize];
    for r in 0..rows {
        let row: Vec<String> = (0..cols)
            .map(|c| {
                let v = (r * 7919 + c * 104_729 + seed * 31) % 20_001 - 10_000;
                sums[c as usize] += v;
                v.to_string()
            })
            .collect();
        text += &row.join(",");
        text.push('\n');
    }
    let mut want = serde_json::Map::new();
    for c in (0..cols).step_by(10) {
        want.insert(format!("c{c}"), json!(sums[c as usize] as f64));
    }
    (text, Value::Object(want))
}

#[tokio::test]
async fn the_compatible_flows_and_the_job_api_work_through_nginx_and_every_replica_agrees() {
    let c = Cluster::start(3, 30_000);

    // The CSV sum service: a dataset written straight into the shared --data-dir, and
    // one uploaded through nginx (larger than the default 1 MiB body limit: the upload
    // location has its own).
    let (small, small_sums) = integer_csv(300, 23, 1);
    std::fs::write(c.data_dir.path().join("small.csv"), small).unwrap();
    let (big, big_sums) = integer_csv(20_000, 31, 2);
    assert!(big.len() > 1 << 21, "the upload is over 2 MiB");
    let up = c
        .http
        .put(c.nginx.url("/v1/datasets/big.csv"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        up.status(),
        StatusCode::CREATED,
        "{}",
        up.text().await.unwrap()
    );

    let mut csv_jobs = Vec::new();
    for i in 0..9 {
        let (name, want) = if i % 3 == 2 {
            ("big.csv", &big_sums)
        } else {
            ("small.csv", &small_sums)
        };
        let body = c.get_ok(&format!("/csv_name={name}")).await;
        let id = body["Task started, your id"]
            .as_str()
            .unwrap_or_else(|| panic!("no task id: {body}"))
            .to_string();
        csv_jobs.push((id, want.clone()));
    }
    let counter = c.get_ok("/storage/get_counter").await;
    assert!(
        counter.as_u64().is_some_and(|n| n <= 9),
        "tasks in progress: {counter}"
    );

    // The statistics API: every route and question, as concurrent clients would send
    // them, against pandas' answers (tests/fixtures/stats_oracle.py).
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("health_expected.json")).unwrap())
            .unwrap();
    let mut stats_jobs = Vec::new();
    for q in expected["questions"].as_array().unwrap() {
        let question = q["question"].as_str().unwrap();
        let mut ask = vec![];
        for route in [
            "states_mean",
            "best5",
            "worst5",
            "global_mean",
            "diff_from_mean",
            "mean_by_category",
        ] {
            let ordered = matches!(route, "states_mean" | "best5" | "worst5");
            ask.push((
                route,
                json!({ "question": question }),
                q[route].clone(),
                ordered,
            ));
        }
        for per in q["per_state"].as_array().unwrap() {
            let state = per["state"].as_str().unwrap();
            for route in [
                "state_mean",
                "state_diff_from_mean",
                "state_mean_by_category",
            ] {
                let body = json!({ "question": question, "state": state });
                ask.push((route, body, per[route].clone(), false));
            }
        }
        for (route, body, want, ordered) in ask {
            let (status, res) = c.post(&format!("/api/{route}"), &body).await;
            assert_eq!(status, StatusCode::OK, "{route}: {res}");
            let id = res["job_id"].as_str().unwrap().to_string();
            assert!(id.starts_with("job_id_"), "{id}");
            stats_jobs.push((id, want, ordered, format!("{route}({body})")));
        }
    }
    assert_eq!(stats_jobs.len(), 9 * (6 + 4 * 3));
    let num_jobs = c.get_ok("/api/num_jobs").await;
    assert!(num_jobs["num_jobs"].as_u64().is_some(), "{num_jobs}");

    // The native API: submit, get, list, cancel, retry.
    let mut echo_jobs = Vec::new();
    for n in 0..12 {
        let params = json!({ "n": n, "replicas": "three" });
        echo_jobs.push((c.submit("test.echo", params.clone()).await, params));
    }
    let sleeper = c.submit("test.sleep", json!({ "ms": 60_000 })).await;
    c.wait_status(&sleeper, &["running"]).await;
    let del = c
        .http
        .delete(c.nginx.url(&format!("/v1/jobs/{sleeper}")))
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "cancel: {}", del.status());
    let cancelled = c.wait_status(&sleeper, &["cancelled"]).await;
    assert_eq!(cancelled["attempts"], 1, "{cancelled}");
    let again = c.submit("test.sleep", json!({ "ms": 200 })).await;
    let del = c
        .http
        .delete(c.nginx.url(&format!("/v1/jobs/{again}")))
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "cancel: {}", del.status());
    c.wait_status(&again, &["cancelled"]).await;
    let (status, body) = c.post(&format!("/v1/jobs/{again}/retry"), &json!({})).await;
    assert!(status.is_success(), "retry: {status} {body}");
    let retried = c.wait_status(&again, &["done"]).await;
    assert_eq!(retried["result"], json!({ "slept_ms": 200 }), "{retried}");

    // Results, polled through nginx the way each API's clients poll.
    for (id, want) in &csv_jobs {
        let got = eventually(&format!("{id} to finish"), async || {
            let body = c.get_ok(&format!("/storage/get_json/{id}")).await;
            if body.get("status").is_none() {
                return Ok(body);
            }
            assert_eq!(body["status"], "running", "{id}: {body}");
            Err(body.to_string())
        })
        .await;
        assert_close(&got, want, false, id);
    }
    for (id, want, ordered, ctx) in &stats_jobs {
        let res = eventually(&format!("{ctx} to finish"), async || {
            let body = c.get_ok(&format!("/api/get_results/{id}")).await;
            if body["status"] != "running" {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        })
        .await;
        assert_eq!(res["status"], "done", "{ctx}: {res}");
        assert_close(&res["data"], want, *ordered, ctx);
    }
    for (id, params) in &echo_jobs {
        let done = c.wait_status(id, &["done"]).await;
        assert_eq!(&done["result"], params, "{id}");
        assert_eq!(done["kind"], "test.echo");
    }
    let page = c.get_ok("/v1/jobs?kind=test.echo&limit=100").await;
    let listed: BTreeSet<&str> = page["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("a page of jobs: {page}"))
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    let submitted: BTreeSet<&str> = echo_jobs.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(listed, submitted);
    c.wait_idle().await;

    // nginx spread the work over the three replicas...
    let ports: BTreeSet<u16> = c.replicas.iter().map(|r| r.port).collect();
    assert_eq!(c.upstreams_used(), ports, "{}", c.nginx.access_log());

    // ...and each of them, asked directly, tells the same story: every job, every
    // result, every counter.
    let total = csv_jobs.len() + stats_jobs.len() + echo_jobs.len() + 2;
    let mut ids: Vec<&str> = csv_jobs.iter().map(|(id, _)| id.as_str()).collect();
    ids.extend(stats_jobs.iter().map(|(id, ..)| id.as_str()));
    ids.extend(echo_jobs.iter().map(|(id, _)| id.as_str()));
    ids.extend([sleeper.as_str(), again.as_str()]);
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        total,
        "ids are unique"
    );
    for id in &ids {
        c.same_on_each(&format!("/v1/jobs/{id}")).await;
    }
    for (id, want) in &csv_jobs {
        assert_close(
            &c.same_on_each(&format!("/storage/get_json/{id}")).await,
            want,
            false,
            id,
        );
    }
    for (id, ..) in stats_jobs.iter().take(20) {
        c.same_on_each(&format!("/api/get_results/{id}")).await;
    }
    let stats = c.same_on_each("/v1/jobs/stats").await;
    assert_eq!(
        stats,
        json!({
            "queued": 0, "running": 0, "done": total - 1, "failed": 0, "cancelled": 1,
            "in_progress": 0
        })
    );
    assert_eq!(c.same_on_each("/storage/get_counter").await, json!(0));
    assert_eq!(
        c.same_on_each("/api/num_jobs").await,
        json!({ "num_jobs": 0 })
    );
    // Each replica sees all three (and is one of them).
    for (r, seen) in c.replicas.iter().zip(c.on_each("/v1/replicas").await) {
        let list = seen["replicas"].as_array().unwrap();
        assert_eq!(list.len(), 3, ":{} sees {seen}", r.port);
        assert_eq!(list.iter().filter(|x| x["this"] == true).count(), 1);
    }

    // nginx passes the Host the client sent, so tally's cross-site check still tells a
    // page of this site from another site's.
    for (origin, want) in [
        (format!("http://{}", c.nginx.host()), StatusCode::ACCEPTED),
        ("http://evil.example".to_string(), StatusCode::FORBIDDEN),
    ] {
        let res = c
            .http
            .post(c.nginx.url("/v1/jobs"))
            .header("origin", &origin)
            .json(&json!({ "kind": "test.echo", "params": {} }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), want, "Origin {origin}");
    }
    // A body over the 1 MiB limit is refused by nginx before any replica reads it.
    let res = c
        .http
        .post(c.nginx.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_replica_killed_while_nginx_serves_costs_no_request_and_no_job() {
    // Short leases, so the dead replica's jobs are taken over within a second or two.
    let mut c = Cluster::start(3, 1_000);
    let mut jobs = Vec::new();
    for n in 0..30 {
        jobs.push(c.submit("test.sleep", json!({ "ms": 700 + n })).await);
    }

    // Kill a replica while it runs jobs and more are waiting.
    let victim = c.replicas[1].port;
    eventually("the victim to be busy with more jobs waiting", async || {
        let seen = c.get_ok("/v1/replicas").await;
        let busy = seen["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["pid"] == json!(c.replicas[1].pid()))
            .map_or(0, |r| r["busy"].as_u64().unwrap_or(0));
        let queue = c.get_ok("/v1/queue").await;
        if busy == 2 && queue["waiting"].as_u64().unwrap_or(0) > 0 {
            Ok(())
        } else {
            Err(format!("{seen} {queue}"))
        }
    })
    .await;
    c.replicas[1].kill9();
    let log_before = c.nginx.access_log().lines().count();

    // Reads go on: nginx passes a read that reached the dead replica to the next one.
    for _ in 0..6 {
        c.get_ok("/v1/jobs/stats").await;
    }
    let retried: Vec<String> = c
        .nginx
        .access_log()
        .lines()
        .skip(log_before)
        .filter(|l| l.contains(&format!("upstream=\"127.0.0.1:{victim}, ")))
        .map(str::to_string)
        .collect();
    assert!(
        !retried.is_empty() && retried.iter().all(|l| l.contains("\" 200 ")),
        "a read sent to the dead replica was answered by another: {}",
        c.nginx.access_log()
    );
    // Submissions go on too (a connection refused means nothing was sent, so nginx
    // tries the next replica even for a POST).
    for n in 0..10 {
        jobs.push(c.submit("test.sleep", json!({ "ms": 100 + n })).await);
    }

    // Every job reaches `done` once, with its own result; the dead replica's running
    // jobs ran again elsewhere (a later attempt).
    let mut attempts = 0;
    for (i, id) in jobs.iter().enumerate() {
        let done = c.wait_status(id, &["done"]).await;
        let ms = if i < 30 { 700 + i } else { 100 + i - 30 };
        assert_eq!(done["result"], json!({ "slept_ms": ms }), "{id}: {done}");
        attempts += done["attempts"].as_u64().unwrap();
    }
    assert!(
        attempts > jobs.len() as u64,
        "the victim's running jobs were run again: {attempts} attempts for {} jobs",
        jobs.len()
    );
    c.wait_idle().await;

    // The survivors agree with each other on every job and counter.
    c.replicas.remove(1);
    for id in &jobs {
        c.same_on_each(&format!("/v1/jobs/{id}")).await;
    }
    let stats = c.same_on_each("/v1/jobs/stats").await;
    assert_eq!(
        stats,
        json!({
            "queued": 0, "running": 0, "done": jobs.len(), "failed": 0, "cancelled": 0,
            "in_progress": 0
        })
    );
    assert_eq!(c.same_on_each("/storage/get_counter").await, json!(0));
    // And the dead one drops out of the list of replicas once its heartbeat is old.
    eventually("the dead replica to drop out of the list", async || {
        let lists = c.on_each("/v1/replicas").await;
        if lists
            .iter()
            .all(|l| l["replicas"].as_array().is_some_and(|r| r.len() == 2))
        {
            Ok(())
        } else {
            Err(format!("{lists:?}"))
        }
    })
    .await;
}

#[test]
fn compose_and_this_test_fill_the_same_placeholders_of_the_one_nginx_template() {
    let template = std::fs::read_to_string(nginx::template_path()).unwrap();
    let found: BTreeSet<&str> = template
        .match_indices("${")
        .filter_map(|(at, _)| template[at + 2..].split('}').next())
        .collect();
    assert_eq!(found, nginx::PLACEHOLDERS.into_iter().collect());
    let compose =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("compose.yaml"))
            .unwrap();
    assert!(
        compose.contains("./deploy/nginx.conf.template:/etc/nginx/templates/default.conf.template"),
        "compose.yaml mounts the repository's template where the nginx image renders it"
    );
    for p in nginx::PLACEHOLDERS {
        assert!(compose.contains(&format!("{p}:")), "compose.yaml sets {p}");
    }
}
