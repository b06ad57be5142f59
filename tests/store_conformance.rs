//! The store conformance suite: what every job store, with the queue the engine uses
//! on it, must do. Every case runs against every store; adding a store is one line at
//! the bottom (`conformance!(name, subject-maker, durable)`).
//!
//! The cases speak only through the `Store` and `JobQueue` traits. Expected values are
//! written down by hand from the contract (design.md, src/store/mod.rs, src/queue/mod.rs),
//! never read back from an implementation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tally::metrics::Metrics;
use tally::model::{
    Attempt, Finish, IdempotencyKey, JobCounts, JobId, JobStatus, ListFilter, NewJob, Outcome,
};
use tally::queue::local::LocalQueue;
use tally::queue::redis::{RedisOptions, RedisStore};
use tally::queue::{JobQueue, Lease, LeaseOptions, PushError, Pushed, Renewal};
use tally::store::memory::MemoryStore;
use tally::store::sqlite::{SqliteOptions, SqliteStore, SqliteSync};
use tally::store::{Finished, Requeued, Store, Submitted};

/// A short lease, so that expiry cases finish quickly.
const LEASE: Duration = Duration::from_millis(150);
const MAX_ATTEMPTS: u32 = 2;
const CAPACITY: usize = 8;
const PATIENCE: Duration = Duration::from_secs(20);

/// A store and the queue the engine would use on it.
pub struct Subject {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn JobQueue>,
    /// Opens the same data again the way the next process would after a crash of this
    /// one (no flush, no close); for a store that keeps nothing, a new empty one.
    pub restart: Box<dyn FnOnce(Subject) -> BoxFuture<Subject> + Send>,
    /// What must live as long as the subject (a temp dir, a server).
    pub guard: Box<dyn std::any::Any + Send>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn lease_options() -> LeaseOptions {
    LeaseOptions {
        lease: LEASE,
        max_attempts: MAX_ATTEMPTS,
    }
}

fn local(store: Arc<dyn Store>) -> Arc<dyn JobQueue> {
    Arc::new(LocalQueue::new(store, CAPACITY, 2, lease_options()))
}

fn new_memory_subject() -> Subject {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(1000));
    Subject {
        queue: local(store.clone()),
        store,
        restart: Box::new(|_old| Box::pin(async { new_memory_subject() })),
        guard: Box::new(()),
    }
}

async fn memory_subject() -> Subject {
    new_memory_subject()
}

fn sqlite_at(dir: Arc<tempfile::TempDir>) -> Subject {
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(
            &dir.path().join("t.db"),
            SqliteOptions {
                sync: SqliteSync::Normal,
                commit_delay: Duration::ZERO,
            },
            &Metrics::new(),
        )
        .expect("the store opens"),
    );
    let again = dir.clone();
    Subject {
        queue: local(store.clone()),
        store,
        restart: Box::new(move |old: Subject| {
            Box::pin(async move {
                // A crash: whatever was committed is all there is. The old handles go
                // first, so that the file's lock is free for the next owner.
                drop(old);
                sqlite_at(again)
            })
        }),
        guard: Box::new(dir),
    }
}

async fn sqlite_subject() -> Subject {
    sqlite_at(Arc::new(tempfile::tempdir().unwrap()))
}

/// The next process's view of the subject's data.
async fn crash_and_restart(s: Subject) -> Subject {
    let Subject {
        store,
        queue,
        restart,
        guard,
    } = s;
    let unused: Box<dyn FnOnce(Subject) -> BoxFuture<Subject> + Send> =
        Box::new(|x| Box::pin(async { x }));
    restart(Subject {
        store,
        queue,
        restart: unused,
        guard,
    })
    .await
}

#[path = "support/mod.rs"]
mod support;
use support::http::eventually_within;
use support::redis_server;

/// A replica on a private Redis; a "crash" drops it (no close) and opens a new one on
/// the same server.
fn redis_on(server: Arc<redis_server::RedisServer>) -> BoxFuture<Subject> {
    Box::pin(redis_on_inner(server))
}

async fn redis_on_inner(server: Arc<redis_server::RedisServer>) -> Subject {
    let store = RedisStore::open(
        RedisOptions {
            url: server.url(),
            capacity: CAPACITY,
            result_ttl: Duration::from_secs(3600),
            lease: lease_options(),
            workers: 2,
            response_timeout: Duration::from_secs(2),
        },
        &Metrics::new(),
    )
    .await
    .expect("the redis store opens");
    let (again, this) = (server.clone(), store.clone());
    Subject {
        store: Arc::new(store.clone()),
        queue: Arc::new(store),
        restart: Box::new(move |old: Subject| {
            Box::pin(async move {
                this.halt();
                drop(old);
                redis_on(again).await
            })
        }),
        guard: Box::new(server),
    }
}

async fn redis_subject() -> Subject {
    redis_on(Arc::new(redis_server::RedisServer::start())).await
}

fn job(kind: &str, n: i64) -> NewJob {
    NewJob::new(kind, json!({ "n": n }))
}

/// A job submitted with an idempotency key that holds `ttl_ms`.
fn keyed(kind: &str, params: serde_json::Value, key: &str, ttl_ms: u64) -> NewJob {
    NewJob {
        kind: kind.into(),
        params,
        idempotency: Some(IdempotencyKey {
            key: key.into(),
            ttl_ms,
        }),
    }
}

/// A day: longer than any case.
const KEY_TTL_MS: u64 = 86_400_000;

async fn submit(s: &Subject, j: &NewJob) -> JobId {
    match push(s, j, 1_000).await {
        Submitted::New(id) => id,
        other => panic!("a submission without a key made {other:?}"),
    }
}

/// Pushes `j` at `now_ms` and waits until the answer may be handed out.
async fn push(s: &Subject, j: &NewJob, now_ms: i64) -> Submitted {
    push_on(&s.queue, j, now_ms).await
}

async fn push_on(queue: &Arc<dyn JobQueue>, j: &NewJob, now_ms: i64) -> Submitted {
    let Pushed { submitted, durable } = match queue.push(j, now_ms, &|_, _| {}).await {
        Ok(p) => p,
        Err(e) => panic!("push failed: {e}"),
    };
    durable.await.expect("the record is durable");
    submitted
}

/// Claims from a blocking thread, as a worker does.
async fn claim(s: &Subject, wait: Duration) -> Option<Lease> {
    let q = s.queue.clone();
    tokio::task::spawn_blocking(move || q.claim(wait).expect("the queue is open"))
        .await
        .unwrap()
}

async fn claim_now(s: &Subject) -> Lease {
    claim(s, PATIENCE).await.expect("a job was waiting")
}

async fn finish(s: &Subject, l: &Lease, outcome: Outcome) -> Finished {
    s.queue
        .finish(Finish {
            id: l.id,
            attempt: Attempt::Of(l.attempt),
            outcome,
            started_at: Some(2_000),
            at: 3_000,
        })
        .await
        .map_err(|f| f.error)
        .expect("the outcome is written")
}

fn done(v: &str) -> Outcome {
    Outcome::Done(v.to_string())
}

fn counts(queued: u64, running: u64, done: u64, failed: u64, cancelled: u64) -> JobCounts {
    JobCounts {
        queued,
        running,
        done,
        failed,
        cancelled,
    }
}

/// Reclaims until `n` expired leases came back (a lease expires `LEASE` after its last
/// renewal).
async fn reclaim(s: &Subject, n: usize) -> tally::queue::Reclaimed {
    let mut all = tally::queue::Reclaimed::default();
    eventually_within(PATIENCE, &format!("{n} expired leases"), async || {
        let r = s.queue.reclaim_expired(5_000).await.unwrap();
        all.requeued.extend(r.requeued);
        all.dead.extend(r.dead);
        if all.requeued.len() + all.dead.len() >= n {
            Ok(())
        } else {
            Err(format!("no lease expired: {all:?}"))
        }
    })
    .await;
    all
}

pub async fn a_job_is_readable_at_once_runs_and_keeps_its_result(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    let r = s.store.get(id).await.unwrap().expect("readable at once");
    assert_eq!(
        (r.status, r.attempts, r.kind.as_str()),
        (JobStatus::Queued, 0, "k")
    );
    assert_eq!(r.params, json!({ "n": 1 }));
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 0, 0, 0, 0));

    let l = claim_now(&s).await;
    assert_eq!((l.id, l.attempt, l.kind.as_str()), (id, 1, "k"));
    assert_eq!(l.params, json!({ "n": 1 }));
    s.store.flush().await.unwrap();
    let r = s.store.get(id).await.unwrap().unwrap();
    assert_eq!((r.status, r.attempts), (JobStatus::Running, 1));
    assert!(r.started_at.is_some());
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 1, 0, 0, 0));

    assert_eq!(finish(&s, &l, done("{\"x\":1}")).await, Finished::Recorded);
    let st = s.store.state(id).await.unwrap().unwrap();
    assert_eq!(st.status, JobStatus::Done);
    assert_eq!(st.result.as_deref(), Some("{\"x\":1}"));
    let r = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(r.attempts, 1);
    // Stores keep times by their own clock (a shared server's, say): only their order.
    let (sub, fin) = (r.submitted_at, r.finished_at.expect("a finish time"));
    assert!(fin >= sub, "finished {fin} before submitted {sub}");
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 0, 1, 0, 0));
    assert!(s.store.get(JobId(999_999)).await.unwrap().is_none());
}

pub async fn a_job_finishes_once(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    let l = claim_now(&s).await;
    assert_eq!(
        finish(&s, &l, Outcome::Failed("boom".into())).await,
        Finished::Recorded
    );
    assert_eq!(finish(&s, &l, done("1")).await, Finished::AlreadyFinished);
    assert_eq!(
        s.queue.cancel(id, 4_000).await.unwrap(),
        Finished::AlreadyFinished
    );
    let r = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error.as_deref(), r.result),
        (JobStatus::Failed, Some("boom"), None)
    );
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 0, 0, 1, 0));
    assert_eq!(
        s.queue.cancel(JobId(999_999), 4_000).await.unwrap(),
        Finished::Unknown
    );
}

pub async fn a_cancelled_queued_job_is_never_handed_out(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    let other = submit(&s, &job("k", 2)).await;
    assert_eq!(s.queue.cancel(id, 4_000).await.unwrap(), Finished::Recorded);
    let l = claim_now(&s).await;
    assert_eq!(l.id, other, "the cancelled job is skipped");
    assert!(claim(&s, Duration::from_millis(200)).await.is_none());
    let r = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(r.status, JobStatus::Cancelled);
    assert_eq!(r.error.as_deref(), Some("cancelled by request"));
    s.store.flush().await.unwrap();
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 1, 0, 0, 1));
}

pub async fn a_cancelled_running_job_loses_its_lease_and_its_late_outcome(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    let l = claim_now(&s).await;
    assert_eq!(s.queue.cancel(id, 4_000).await.unwrap(), Finished::Recorded);
    let renewed = s.queue.renew(&[(id, l.attempt)], 4_100).await.unwrap();
    assert_ne!(
        renewed,
        vec![Renewal::Held],
        "the worker learns it must stop"
    );
    let late = finish(&s, &l, done("1")).await;
    assert!(
        matches!(late, Finished::AlreadyFinished),
        "a late outcome after a cancel changes nothing: {late:?}"
    );
    let r = s.store.get(id).await.unwrap().unwrap();
    assert_eq!((r.status, r.result), (JobStatus::Cancelled, None));
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 0, 0, 0, 1));
}

pub async fn jobs_are_listed_newest_first_with_filters_and_cursors(s: Subject) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(submit(&s, &job(kind, i)).await);
    }
    // Finish the first (an even one).
    let l = claim_now(&s).await;
    assert_eq!(l.id, ids[0], "oldest first out of the queue");
    finish(&s, &l, done("1")).await;
    let page = |limit, status, kind: Option<&str>, before| ListFilter {
        limit,
        status,
        kind: kind.map(str::to_string),
        before,
    };
    let ids_of = |v: Vec<tally::model::JobRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let first = s.store.list(&page(2, None, None, None)).await.unwrap();
    assert_eq!(ids_of(first), vec![ids[4], ids[3]]);
    let next = s
        .store
        .list(&page(2, None, None, Some(ids[3])))
        .await
        .unwrap();
    assert_eq!(ids_of(next), vec![ids[2], ids[1]]);
    let last = s
        .store
        .list(&page(2, None, None, Some(ids[1])))
        .await
        .unwrap();
    assert_eq!(ids_of(last), vec![ids[0]]);
    let evens = s
        .store
        .list(&page(10, Some(JobStatus::Queued), Some("even"), None))
        .await
        .unwrap();
    assert_eq!(ids_of(evens), vec![ids[4], ids[2]]);
    let done_ones = s
        .store
        .list(&page(10, Some(JobStatus::Done), None, None))
        .await
        .unwrap();
    assert_eq!(ids_of(done_ones), vec![ids[0]]);

    let statuses = s.store.statuses(None, 3).await.unwrap();
    assert_eq!(
        statuses,
        vec![
            (ids[0], JobStatus::Done),
            (ids[1], JobStatus::Queued),
            (ids[2], JobStatus::Queued)
        ]
    );
    let rest = s.store.statuses(Some(ids[2]), 3).await.unwrap();
    assert_eq!(
        rest,
        vec![(ids[3], JobStatus::Queued), (ids[4], JobStatus::Queued)]
    );
    assert!(s.store.statuses(Some(ids[4]), 3).await.unwrap().is_empty());
}

pub async fn counts_follow_every_transition_and_never_go_negative(s: Subject) {
    let a = submit(&s, &job("k", 1)).await;
    let b = submit(&s, &job("k", 2)).await;
    let c = submit(&s, &job("k", 3)).await;
    assert_eq!(s.store.counts().await.unwrap(), counts(3, 0, 0, 0, 0));
    let la = claim_now(&s).await;
    let lb = claim_now(&s).await;
    s.store.flush().await.unwrap();
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 2, 0, 0, 0));
    finish(&s, &la, done("1")).await;
    finish(&s, &lb, Outcome::Failed("no".into())).await;
    s.queue.cancel(c, 5_000).await.unwrap();
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 0, 1, 1, 1));
    // Finishing twice, cancelling the finished, retrying: never counted twice.
    finish(&s, &la, done("1")).await;
    s.queue.cancel(a, 5_000).await.unwrap();
    assert!(matches!(
        s.queue.retry(b, 6_000, &|_, _| {}).await.unwrap(),
        Requeued::Yes(_)
    ));
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 0, 1, 0, 1));
    assert_eq!(
        s.store.counts().await.unwrap().in_progress(),
        1,
        "in progress = queued + running"
    );
    let _ = (a, b);
}

pub async fn unfinished_jobs_survive_a_crash_and_run_again(s: Subject, durable: bool) {
    let ran = submit(&s, &job("k", 1)).await;
    let running = submit(&s, &job("k", 2)).await;
    let waiting = submit(&s, &job("k", 3)).await;
    let l = claim_now(&s).await;
    finish(&s, &l, done("{\"first\":true}")).await;
    let l2 = claim_now(&s).await;
    assert_eq!(l2.id, running);
    s.store.flush().await.unwrap();
    let s = crash_and_restart(s).await;
    let recovered = s.queue.recover().await.unwrap();
    if !durable {
        assert_eq!(recovered, 0, "a store that keeps nothing starts empty");
        assert!(s.store.get(ran).await.unwrap().is_none());
        return;
    }
    let r = s.store.get(ran).await.unwrap().unwrap();
    assert_eq!(
        r.result.as_deref(),
        Some("{\"first\":true}"),
        "results survive"
    );
    // Both unfinished jobs run again: an in-process queue requeues them at start, a
    // shared one once the dead process's lease expires.
    let mut again = Vec::new();
    eventually_within(PATIENCE, "both unfinished jobs to run again", async || {
        // What runs again is alive: its lease is renewed while we wait for the other.
        let held: Vec<(JobId, u32)> = again.iter().map(|l: &Lease| (l.id, l.attempt)).collect();
        if !held.is_empty() {
            s.queue.renew(&held, 5_000).await.unwrap();
        }
        s.queue.reclaim_expired(5_000).await.unwrap();
        if let Some(l) = claim(&s, Duration::from_millis(20)).await {
            again.push(l);
        }
        if again.len() >= 2 {
            Ok(())
        } else {
            Err(format!("only {again:?} ran again"))
        }
    })
    .await;
    s.store.flush().await.unwrap();
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 2, 1, 0, 0));
    again.sort_by_key(|l| l.id);
    assert_eq!(
        again.iter().map(|l| (l.id, l.attempt)).collect::<Vec<_>>(),
        vec![(running, 2), (waiting, 1)],
        "the job that was running when the process died runs its second attempt"
    );
    let next = submit(&s, &job("k", 4)).await;
    assert!(next.0 > waiting.0, "ids are never reused after a restart");
}

pub async fn flush_makes_every_earlier_write_durable_and_visible(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    let l = claim_now(&s).await;
    // From a worker thread, not waiting for the write.
    let q = s.queue.clone();
    let pending = tokio::task::spawn_blocking(move || {
        q.finish(Finish {
            id: l.id,
            attempt: Attempt::Of(l.attempt),
            outcome: done("\"v\""),
            started_at: Some(2_000),
            at: 3_000,
        })
    })
    .await
    .unwrap();
    s.store.flush().await.unwrap();
    let st = s.store.state(id).await.unwrap().unwrap();
    assert_eq!(
        (st.status, st.result.as_deref()),
        (JobStatus::Done, Some("\"v\""))
    );
    assert_eq!(
        pending.await.map_err(|f| f.error).unwrap(),
        Finished::Recorded
    );
}

pub async fn a_stale_attempt_is_fenced_and_the_newer_attempt_wins(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    let first = claim_now(&s).await;
    assert_eq!(first.attempt, 1);
    // Its worker stalls: no renewal; the lease expires and the job is reclaimed.
    let r = reclaim(&s, 1).await;
    assert_eq!(r.requeued, vec![(id, 1)]);
    let second = claim_now(&s).await;
    assert_eq!((second.id, second.attempt), (id, 2));
    assert_eq!(
        s.queue.renew(&[(id, 1), (id, 2)], 6_000).await.unwrap(),
        vec![Renewal::Lost, Renewal::Held]
    );
    assert_eq!(finish(&s, &first, done("\"one\"")).await, Finished::Stale);
    assert_eq!(
        finish(&s, &second, done("\"two\"")).await,
        Finished::Recorded
    );
    assert_eq!(
        finish(&s, &first, done("\"one\"")).await,
        Finished::Stale,
        "still stale once the job is done"
    );
    let rec = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.result.as_deref(), rec.attempts),
        (JobStatus::Done, Some("\"two\""), 2)
    );
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 0, 1, 0, 0));
}

pub async fn a_stale_attempt_is_fenced_while_its_reclaimed_job_waits(s: Subject) {
    // Between the reclaim and the next claim the job holds no lease: the stalled
    // attempt's outcome (whatever it is) must not end it.
    let id = submit(&s, &job("k", 1)).await;
    let first = claim_now(&s).await;
    let r = reclaim(&s, 1).await;
    assert_eq!(r.requeued, vec![(id, 1)]);
    for outcome in [
        Outcome::Cancelled("cancelled".into()),
        Outcome::Failed("boom".into()),
        done("\"one\""),
    ] {
        assert_eq!(finish(&s, &first, outcome).await, Finished::Stale);
    }
    let rec = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(rec.status, JobStatus::Queued, "{rec:?}");
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 0, 0, 0, 0));
    let second = claim_now(&s).await;
    assert_eq!((second.id, second.attempt), (id, 2));
    assert_eq!(
        finish(&s, &second, done("\"two\"")).await,
        Finished::Recorded
    );
    let rec = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.result.as_deref(), rec.attempts),
        (JobStatus::Done, Some("\"two\""), 2)
    );
}

pub async fn a_job_whose_attempts_all_expire_is_a_dead_letter(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    for attempt in 1..=MAX_ATTEMPTS {
        let l = claim_now(&s).await;
        assert_eq!(l.attempt, attempt);
        let r = reclaim(&s, 1).await;
        if attempt < MAX_ATTEMPTS {
            assert_eq!(r.requeued, vec![(id, attempt)]);
        } else {
            assert_eq!(r.dead, vec![(id, attempt)]);
        }
    }
    assert!(
        claim(&s, Duration::from_millis(200)).await.is_none(),
        "not queued again"
    );
    let rec = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.attempts),
        (JobStatus::Failed, MAX_ATTEMPTS)
    );
    let err = rec.error.unwrap_or_default();
    assert!(
        err.contains(&format!("gave up after {MAX_ATTEMPTS} attempts")),
        "{err}"
    );
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 0, 0, 1, 0));
}

pub async fn writes_about_one_job_apply_in_the_order_they_were_sent(s: Subject) {
    // Sent back to back from a worker thread without waiting: insert, start, finish.
    let Pushed {
        submitted: Submitted::New(id),
        durable,
    } = s.queue.push(&job("k", 1), 1_000, &|_, _| {}).await.unwrap()
    else {
        panic!("no new job");
    };
    let q = s.queue.clone();
    let pending = tokio::task::spawn_blocking(move || {
        let l = q.claim(PATIENCE).unwrap().unwrap();
        assert_eq!(l.id, id);
        q.finish(Finish {
            id: l.id,
            attempt: Attempt::Of(l.attempt),
            outcome: done("\"ordered\""),
            started_at: Some(1_500),
            at: 2_500,
        })
    })
    .await
    .unwrap();
    durable.await.unwrap();
    assert_eq!(
        pending.await.map_err(|f| f.error).unwrap(),
        Finished::Recorded
    );
    let rec = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.attempts, rec.result.as_deref()),
        (JobStatus::Done, 1, Some("\"ordered\""))
    );
    assert!(rec.started_at.is_some() && rec.finished_at.is_some());
    // A start that comes after the outcome changes nothing.
    let store = s.store.clone();
    tokio::task::spawn_blocking(move || store.start(id, 2, 3_000))
        .await
        .unwrap()
        .unwrap();
    s.store.flush().await.unwrap();
    let rec = s.store.get(id).await.unwrap().unwrap();
    assert_eq!((rec.status, rec.attempts), (JobStatus::Done, 1));
    assert_eq!(s.store.counts().await.unwrap(), counts(0, 0, 1, 0, 0));
}

pub async fn a_failed_or_cancelled_job_runs_again_under_its_id(s: Subject) {
    let failed = submit(&s, &job("k", 1)).await;
    let finished = submit(&s, &job("k", 2)).await;
    let queued = submit(&s, &job("k", 3)).await;
    let l = claim_now(&s).await;
    finish(&s, &l, Outcome::Failed("first try".into())).await;
    let l = claim_now(&s).await;
    finish(&s, &l, done("2")).await;
    assert!(matches!(
        s.queue.retry(finished, 5_000, &|_, _| {}).await.unwrap(),
        Requeued::Done
    ));
    assert!(matches!(
        s.queue.retry(queued, 5_000, &|_, _| {}).await.unwrap(),
        Requeued::NotFinished(JobStatus::Queued)
    ));
    assert!(matches!(
        s.queue
            .retry(JobId(999_999), 5_000, &|_, _| {})
            .await
            .unwrap(),
        Requeued::Unknown
    ));
    let admitted = std::sync::Mutex::new(Vec::new());
    match s
        .queue
        .retry(failed, 5_000, &|id, _| admitted.lock().unwrap().push(id))
        .await
        .unwrap()
    {
        Requeued::Yes(rec) => {
            assert_eq!(
                (rec.id, rec.status, rec.attempts),
                (failed, JobStatus::Queued, 1)
            );
            assert_eq!(rec.error, None);
        }
        other => panic!("{other:?}"),
    }
    let rec = s.store.get(failed).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.error, rec.finished_at),
        (JobStatus::Queued, None, None)
    );
    // The queued job and the retried one, in queue order.
    let mut next = [claim_now(&s).await, claim_now(&s).await];
    next.sort_by_key(|l| l.id);
    assert_eq!(
        next.iter().map(|l| (l.id, l.attempt)).collect::<Vec<_>>(),
        vec![(failed, 2), (queued, 1)]
    );
    assert_eq!(
        finish(&s, &next[0], done("\"again\"")).await,
        Finished::Recorded
    );
    let rec = s.store.get(failed).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.attempts, rec.result.as_deref()),
        (JobStatus::Done, 2, Some("\"again\""))
    );
}

pub async fn a_released_claim_goes_back_without_using_an_attempt(s: Subject) {
    let id = submit(&s, &job("k", 1)).await;
    let l = claim_now(&s).await;
    s.queue.release(l.id, l.attempt).await.unwrap();
    s.store.flush().await.unwrap();
    let rec = s.store.get(id).await.unwrap().unwrap();
    assert_eq!((rec.status, rec.attempts), (JobStatus::Queued, 0));
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 0, 0, 0, 0));
}

pub async fn a_full_queue_refuses_at_once(s: Subject) {
    for i in 0..CAPACITY {
        submit(&s, &job("k", i as i64)).await;
    }
    match s.queue.push(&job("k", 99), 1_000, &|_, _| {}).await {
        Err(PushError::Full { capacity }) => assert_eq!(capacity, CAPACITY),
        Err(e) => panic!("{e}"),
        Ok(p) => panic!("admitted {:?} past the capacity", p.submitted),
    }
    // Taking one frees a slot.
    claim_now(&s).await;
    submit(&s, &job("k", 100)).await;
}

pub async fn a_repeated_idempotency_key_answers_the_first_job_and_makes_nothing(s: Subject) {
    let first = keyed("k", json!({ "a": 1, "b": [1, 2] }), "order-17", KEY_TTL_MS);
    let id = match push(&s, &first, 1_000).await {
        Submitted::New(id) => id,
        other => panic!("the first submission with a key made {other:?}"),
    };
    // The same request (its params' keys in another order are the same params).
    let again = keyed("k", json!({ "b": [1, 2], "a": 1 }), "order-17", KEY_TTL_MS);
    assert_eq!(push(&s, &again, 1_100).await, Submitted::Replayed(id));
    assert_eq!(push(&s, &first, 1_200).await, Submitted::Replayed(id));
    s.store.flush().await.unwrap();
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 0, 0, 0, 0));
    // One job queued, not three.
    let l = claim_now(&s).await;
    assert_eq!((l.id, l.attempt), (id, 1));
    assert!(claim(&s, Duration::from_millis(200)).await.is_none());
    // Still the first job once it ran.
    assert_eq!(finish(&s, &l, done("1")).await, Finished::Recorded);
    assert_eq!(push(&s, &again, 1_300).await, Submitted::Replayed(id));
    let r = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.params),
        (JobStatus::Done, json!({ "a": 1, "b": [1, 2] }))
    );
    // Another key, or none, is another job.
    let other = keyed("k", json!({ "a": 1, "b": [1, 2] }), "order-18", KEY_TTL_MS);
    let second = match push(&s, &other, 1_400).await {
        Submitted::New(n) => n,
        x => panic!("another key made {x:?}"),
    };
    assert_ne!(second, id);
    let unkeyed = submit(&s, &NewJob::new("k", json!({ "a": 1, "b": [1, 2] }))).await;
    assert!(unkeyed != id && unkeyed != second);
    // Three jobs in all (a queue may already have leased the new ones to a worker).
    s.store.flush().await.unwrap();
    let c = s.store.counts().await.unwrap();
    assert_eq!((c.queued + c.running, c.done), (2, 1), "{c:?}");
}

pub async fn a_key_used_for_another_request_is_refused_naming_its_job(s: Subject) {
    let id = match push(&s, &keyed("k", json!({ "n": 1 }), "k-1", KEY_TTL_MS), 1_000).await {
        Submitted::New(id) => id,
        other => panic!("{other:?}"),
    };
    // Other params, another kind: refused, naming the job the key made; nothing queued.
    for (kind, params) in [
        ("k", json!({ "n": 2 })),
        ("other", json!({ "n": 1 })),
        ("k", json!({})),
    ] {
        assert_eq!(
            push(&s, &keyed(kind, params, "k-1", KEY_TTL_MS), 1_100).await,
            Submitted::KeyReused(id)
        );
    }
    s.store.flush().await.unwrap();
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 0, 0, 0, 0));
    // The key still answers its own request.
    assert_eq!(
        push(&s, &keyed("k", json!({ "n": 1 }), "k-1", KEY_TTL_MS), 1_200).await,
        Submitted::Replayed(id)
    );
}

pub async fn concurrent_submissions_with_one_key_make_one_job(s: Subject) {
    let start = Arc::new(tokio::sync::Barrier::new(6));
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (queue, start) = (s.queue.clone(), start.clone());
            tokio::spawn(async move {
                let j = keyed("k", json!({ "n": 1 }), "one-key", KEY_TTL_MS);
                start.wait().await;
                push_on(&queue, &j, 1_000).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let new: Vec<JobId> = answers
        .iter()
        .filter_map(|a| match a {
            Submitted::New(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(new.len(), 1, "one job made: {answers:?}");
    for a in &answers {
        assert!(
            matches!(a, Submitted::New(id) | Submitted::Replayed(id) if *id == new[0]),
            "{answers:?}"
        );
    }
    s.store.flush().await.unwrap();
    assert_eq!(s.store.counts().await.unwrap(), counts(1, 0, 0, 0, 0));
    let listed = s
        .store
        .list(&ListFilter {
            limit: 100,
            status: None,
            kind: None,
            before: None,
        })
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|r| r.id).collect::<Vec<_>>(), new);
}

pub async fn a_key_is_free_again_after_its_lifetime(s: Subject) {
    // 300 ms by the submissions' clock and by the store's own (Redis keeps time itself).
    let first = match push(&s, &keyed("k", json!({ "n": 1 }), "short", 300), 1_000).await {
        Submitted::New(id) => id,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        push(&s, &keyed("k", json!({ "n": 1 }), "short", 300), 1_100).await,
        Submitted::Replayed(first)
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Expired: the same key makes a new job, even for another request, and holds anew.
    let second = match push(
        &s,
        &keyed("k", json!({ "n": 2 }), "short", KEY_TTL_MS),
        1_700,
    )
    .await
    {
        Submitted::New(id) => id,
        other => panic!("an expired key answered {other:?}"),
    };
    assert_ne!(second, first);
    assert_eq!(
        push(
            &s,
            &keyed("k", json!({ "n": 2 }), "short", KEY_TTL_MS),
            1_800
        )
        .await,
        Submitted::Replayed(second)
    );
    assert_eq!(
        push(
            &s,
            &keyed("k", json!({ "n": 1 }), "short", KEY_TTL_MS),
            1_900
        )
        .await,
        Submitted::KeyReused(second)
    );
}

pub async fn an_idempotency_key_survives_a_crash(s: Subject, durable: bool) {
    let j = keyed("k", json!({ "n": 1 }), "kept", KEY_TTL_MS);
    let id = match push(&s, &j, 1_000).await {
        Submitted::New(id) => id,
        other => panic!("{other:?}"),
    };
    let s = crash_and_restart(s).await;
    let answer = push(&s, &j, 2_000).await;
    if durable {
        assert_eq!(answer, Submitted::Replayed(id));
    } else {
        // Nothing kept: the key went with the jobs.
        assert!(matches!(answer, Submitted::New(_)), "{answer:?}");
    }
}

pub async fn the_store_is_healthy_and_closes_cleanly(s: Subject) {
    assert_eq!(s.store.health(), Ok(()));
    let id = submit(&s, &job("k", 1)).await;
    s.store.close().await.unwrap();
    s.store.close().await.unwrap();
    let _ = id;
}

/// One store under every case: `conformance!(module, async fn making a Subject,
/// durable)`.
macro_rules! conformance {
    ($name:ident, $make:expr, $durable:expr) => {
        mod $name {
            use super::*;

            macro_rules! case {
                ($case:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        super::$case($make().await).await;
                    }
                };
            }

            case!(a_job_is_readable_at_once_runs_and_keeps_its_result);
            case!(a_job_finishes_once);
            case!(a_cancelled_queued_job_is_never_handed_out);
            case!(a_cancelled_running_job_loses_its_lease_and_its_late_outcome);
            case!(jobs_are_listed_newest_first_with_filters_and_cursors);
            case!(counts_follow_every_transition_and_never_go_negative);
            case!(flush_makes_every_earlier_write_durable_and_visible);
            case!(a_stale_attempt_is_fenced_and_the_newer_attempt_wins);
            case!(a_stale_attempt_is_fenced_while_its_reclaimed_job_waits);
            case!(a_job_whose_attempts_all_expire_is_a_dead_letter);
            case!(writes_about_one_job_apply_in_the_order_they_were_sent);
            case!(a_failed_or_cancelled_job_runs_again_under_its_id);
            case!(a_released_claim_goes_back_without_using_an_attempt);
            case!(a_full_queue_refuses_at_once);
            case!(the_store_is_healthy_and_closes_cleanly);
            case!(a_repeated_idempotency_key_answers_the_first_job_and_makes_nothing);
            case!(a_key_used_for_another_request_is_refused_naming_its_job);
            case!(concurrent_submissions_with_one_key_make_one_job);
            case!(a_key_is_free_again_after_its_lifetime);

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unfinished_jobs_survive_a_crash_and_run_again() {
                super::unfinished_jobs_survive_a_crash_and_run_again($make().await, $durable).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_idempotency_key_survives_a_crash() {
                super::an_idempotency_key_survives_a_crash($make().await, $durable).await;
            }
        }
    };
}

conformance!(memory, memory_subject, false);
conformance!(sqlite, sqlite_subject, true);
conformance!(redis, redis_subject, true);

/// What only a networked store can meet: Redis's own faults, each forced directly on a
/// private server while a store works on it.
mod redis_faults {
    use super::*;
    use tally::store::{Attempt, FinishFailed, StoreError};

    async fn open(server: &redis_server::RedisServer, ttl: Duration) -> RedisStore {
        RedisStore::open(
            RedisOptions {
                url: server.url(),
                capacity: CAPACITY,
                result_ttl: ttl,
                lease: lease_options(),
                workers: 2,
                response_timeout: Duration::from_secs(2),
            },
            &Metrics::new(),
        )
        .await
        .expect("the redis store opens")
    }

    fn subject(store: &RedisStore, server: Arc<redis_server::RedisServer>) -> Subject {
        Subject {
            store: Arc::new(store.clone()),
            queue: Arc::new(store.clone()),
            restart: Box::new(|s| Box::pin(async { s })),
            guard: Box::new(server),
        }
    }

    fn set_maxmemory(server: &redis_server::RedisServer, bytes: u64) {
        let _: () = server.query(
            ::redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(bytes.to_string()),
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_a_lost_reply_left_in_this_replicas_list_goes_back_and_runs() {
        let server = Arc::new(redis_server::RedisServer::start());
        let store = open(&server, Duration::from_secs(3600)).await;
        let s = subject(&store, server.clone());
        let id = submit(&s, &job("k", 1)).await;
        // A blocking move took it for this replica and its reply never arrived.
        let inflight = format!("{{tally}}:inflight:{}", store.consumer());
        let moved: Option<String> = server.query(
            ::redis::cmd("LMOVE")
                .arg("{tally}:wait")
                .arg(&inflight)
                .arg("RIGHT")
                .arg("LEFT"),
        );
        assert_eq!(moved, Some(id.0.to_string()));
        let l = claim_now(&s).await;
        assert_eq!((l.id, l.attempt), (id, 1));
        let left: u64 = server.query(::redis::cmd("LLEN").arg(&inflight));
        assert_eq!(left, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_redis_is_unavailable_and_an_outcome_it_refused_is_handed_back() {
        let server = Arc::new(redis_server::RedisServer::start());
        let store = open(&server, Duration::from_secs(3600)).await;
        let s = subject(&store, server.clone());
        let id = submit(&s, &job("k", 1)).await;
        let l = claim_now(&s).await;
        set_maxmemory(&server, server.used_memory() / 2);
        match s.queue.push(&job("k", 2), 1_000, &|_, _| {}).await {
            Err(PushError::Store(e @ StoreError::Unavailable { .. })) => {
                assert!(e.to_string().contains("out of memory"), "{e}");
            }
            Err(e) => panic!("{e}"),
            Ok(p) => panic!("admitted {:?} into a full redis", p.submitted),
        }
        match s
            .queue
            .finish(Finish {
                id: l.id,
                attempt: Attempt::Of(l.attempt),
                outcome: done("\"kept\""),
                started_at: None,
                at: 0,
            })
            .await
        {
            Err(FinishFailed {
                error,
                outcome: Some(Outcome::Done(r)),
            }) => {
                assert!(error.is_transient(), "{error}");
                assert_eq!(r, "\"kept\"");
            }
            other => panic!("{other:?}"),
        }
        let health = s.store.health().unwrap_err();
        assert!(health.contains("out of memory"), "{health}");
        // Reads still answer while writes are refused.
        assert_eq!(
            s.store.get(id).await.unwrap().unwrap().status,
            JobStatus::Running
        );
        set_maxmemory(&server, 0);
        assert_eq!(finish(&s, &l, done("\"kept\"")).await, Finished::Recorded);
        eventually_within(PATIENCE, "the store to be healthy", async || {
            s.store.health()
        })
        .await;
        let _ = Attempt::Any;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_jobs_expire_while_redis_is_full() {
        let server = Arc::new(redis_server::RedisServer::start());
        let store = open(&server, Duration::from_secs(2)).await;
        let s = subject(&store, server.clone());
        for n in 0..CAPACITY as i64 {
            submit(&s, &job("k", n)).await;
            let l = claim_now(&s).await;
            finish(&s, &l, done(&"x".repeat(10_000))).await;
        }
        set_maxmemory(&server, server.used_memory() / 2);
        // The counters drop inside the script; the expirations metric once it answered.
        eventually_within(PATIENCE, "finished jobs to expire", async || {
            let done = s.store.counts().await.unwrap().done;
            let expired = store.expirations();
            if done == 0 && expired >= CAPACITY as u64 {
                Ok(())
            } else {
                Err(format!(
                    "{done} finished jobs left, {expired} expirations counted"
                ))
            }
        })
        .await;
        assert_eq!(store.expirations(), CAPACITY as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idempotency_key_is_kept_with_its_lifetime_and_without_its_text() {
        let server = Arc::new(redis_server::RedisServer::start());
        let store = open(&server, Duration::from_secs(3600)).await;
        let s = subject(&store, server.clone());
        let j = keyed("k", json!({ "n": 1 }), "client-key-42", 60_000);
        assert!(matches!(push(&s, &j, 1_000).await, Submitted::New(_)));
        let keys: Vec<String> = server.query(::redis::cmd("KEYS").arg("{tally}:idem:*"));
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(!keys[0].contains("client-key-42"), "{keys:?}");
        let ttl: i64 = server.query(::redis::cmd("PTTL").arg(&keys[0]));
        assert!(ttl > 0 && ttl <= 60_000, "PTTL {ttl}");
        // A replay leaves the lifetime as the first submission set it.
        assert!(matches!(push(&s, &j, 1_000).await, Submitted::Replayed(_)));
        let again: i64 = server.query(::redis::cmd("PTTL").arg(&keys[0]));
        assert!(again <= ttl, "PTTL {again} after {ttl}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ids_move_past_every_id_handed_out_when_redis_forgets() {
        let server = Arc::new(redis_server::RedisServer::start());
        let store = open(&server, Duration::from_secs(3600)).await;
        let s = subject(&store, server.clone());
        let mut old = Vec::new();
        for n in 0..3 {
            old.push(submit(&s, &job("k", n)).await.0);
        }
        assert_eq!(old, [1, 2, 3]);
        // Redis forgets everything (restarted without persistence, or flushed).
        let _: () = server.query(&mut ::redis::cmd("FLUSHALL"));
        let next = submit(&s, &job("k", 3)).await.0;
        assert!(next > 3, "id {next} handed out again");
        // A replica that starts now, knowing nothing of the old ids, follows the new range.
        let late = open(&server, Duration::from_secs(3600)).await;
        let t = subject(&late, server.clone());
        let after = submit(&t, &job("k", 4)).await.0;
        assert!(after > next, "{after} after {next}");
        // A lagging failover: the counter falls behind ids already handed out.
        let _: () = server.query(::redis::cmd("SET").arg("{tally}:next_id").arg(1));
        let again = submit(&s, &job("k", 5)).await.0;
        assert!(again > after, "{again} after {after}");
        assert!(s.store.get(JobId(old[2])).await.unwrap().is_none());
    }
}
