//! The Redis store (`--store redis://HOST:PORT[/DB]`): job records, results, counters,
//! ids and the queue live in Redis, so any number of `tally serve` processes share one
//! view and one queue. It implements both [`JobQueue`] and [`Store`]; it lives in the
//! queue's room because it is a queue first, and the records ride with it (the store
//! room below knows nothing of queues).
//!
//! Why lists and Lua scripts (in the manner of BullMQ) rather than Streams with a
//! consumer group: a job's state, its lease, its attempt number, the per-state counters
//! and the status indexes must change together, and a script changes them in one atomic
//! step; a stream's pending-entries list would be a second, separate record of who holds
//! what (XCLAIM/XAUTOCLAIM reclaim by idle time, not by our fenced attempts), and
//! cancelling or retrying an entry in the middle of a stream is awkward. With a plain
//! list the queue is just ids, and every rule lives in the scripts next to each other
//! (`src/queue/redis/*.lua`).
//!
//! Layout: every key shares the `{tally}` hash tag and every key a script touches is in
//! its KEYS, so the scripts run on Redis Cluster too (one slot). `rec` is a hash of small
//! JSON records, `params` and `result` hashes hold the rest; `wait` is the queue,
//! `leases` a sorted set of lease expiries, `counts` the exact counters, `st:*` and
//! `all` sorted sets index jobs by id for listings, `expiry` orders finished jobs by the
//! time they expire (`--result-ttl`). Leases and expiries use Redis's clock (`TIME`), so
//! replicas' clocks do not matter.
//!
//! Claims: a fetcher task takes work only for idle workers. It runs the claim script
//! (pop + lease, atomic, one round trip); when the queue is empty it blocks in `BLMOVE`
//! on a connection of its own, moving the next id into this consumer's in-flight list
//! (so a replica that dies between the move and the lease does not lose the job: a
//! janitor moves a dead consumer's in-flight ids back). Each process start is a consumer
//! with a unique name (host, pid and random bits: replicas restart under the same host
//! name), with a heartbeat in `replicas`.
//!
//! Failures: every command has a short response timeout; errors of the connection are
//! [`StoreError::Unavailable`] (503 to clients, outcomes retried by the engine), a
//! background ping drives `/readyz`, the connection manager reconnects with backoff, and
//! after a reconnect this replica waits one lease period before reclaiming leases (their
//! holders get a chance to renew them first).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::{AsyncCommands, Script};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::conn::{self, Conn, Dial};
use crate::metrics::Metrics;
use crate::model::{JobCounts, JobId, JobRecord, JobState, JobStatus, ListFilter, NewJob, Outcome};
use crate::queue::{
    hostname, Admitted, Closed, JobQueue, Lease, LeaseOptions, PushError, Pushed, Reclaimed,
    Renewal, Replica,
};
use crate::store::{
    Attempt, Finish, FinishFailed, FinishPending, Finished, Requeued, Store, StoreError, Submitted,
};

const STORE: &str = "redis";
/// Where the scripts announce finished jobs (see `prelude.lua`).
const FINISHED_CHANNEL: &str = "{tally}:finished";
const PREFIX: &str = "{tally}:";

/// Keys in the order every script expects them (see `prelude.lua`).
const KEY_NAMES: [&str; 15] = [
    "next_id",
    "rec",
    "params",
    "result",
    "wait",
    "leases",
    "counts",
    "all",
    "expiry",
    "st:queued",
    "st:running",
    "st:done",
    "st:failed",
    "st:cancelled",
    "epoch",
];

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn inflight_key(consumer: &str) -> String {
    format!("{PREFIX}inflight:{consumer}")
}

fn replica_key(consumer: &str) -> String {
    format!("{PREFIX}replica:{consumer}")
}

/// `submit.lua`'s KEYS[16], ARGV[8] and ARGV[9] for a job's idempotency key (see
/// `prelude.lua`): the key's entry, the request's fingerprint, the key's lifetime.
fn idempotency_args(inv: &mut redis::ScriptInvocation<'_>, job: &NewJob) {
    match &job.idempotency {
        Some(k) => {
            let entry = blake3::Hash::from(crate::store::key_hash(&k.key)).to_hex();
            inv.key(format!("{PREFIX}idem:{entry}"))
                .arg(
                    blake3::Hash::from(crate::store::fingerprint(job))
                        .to_hex()
                        .as_str(),
                )
                .arg(k.ttl_ms.max(1));
        }
        None => {
            inv.arg("").arg(0);
        }
    }
}

/// A new epoch's name: random, so two replicas beginning one at once cannot agree by
/// chance.
fn fresh_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// How long a replica may go without a heartbeat before the others take it for dead.
fn liveness_ms(lease_ms: u64) -> u64 {
    (lease_ms * 3).max(10_000)
}

/// A script: its flags line, the prelude, its body. Flagged scripts (Redis 7) are refused
/// as a whole before they start when Redis is out of memory, unless they `allow-oom`:
/// those that free memory or keep it level (expiry, renewals, hand-backs and reclaims,
/// in-flight recovery, heartbeats, the epoch check, which writes two small keys) do, so
/// a full Redis can recover and leases do not expire for want of memory; those that grow
/// it (submit, claim, finish, retry) do not, and never half-run. Only a write of the
/// second kind succeeding says Redis takes writes again (`wrote`).
macro_rules! script {
    ($file:literal) => {
        script!($file, "")
    };
    ($file:literal, $flags:literal) => {
        Script::new(concat!(
            "#!lua",
            $flags,
            "\n",
            include_str!("prelude.lua"),
            "\n",
            include_str!($file)
        ))
    };
}

struct Scripts {
    submit: Script,
    claim: Script,
    renew: Script,
    finish: Script,
    release: Script,
    reclaim: Script,
    retry: Script,
    expire: Script,
    recover_inflight: Script,
    heartbeat: Script,
    epoch: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            submit: script!("submit.lua"),
            claim: script!("claim.lua"),
            renew: script!("renew.lua", " flags=allow-oom"),
            finish: script!("finish.lua"),
            release: script!("release.lua", " flags=allow-oom"),
            reclaim: script!("reclaim.lua", " flags=allow-oom"),
            retry: script!("retry.lua"),
            expire: script!("expire.lua", " flags=allow-oom"),
            recover_inflight: script!("recover_inflight.lua", " flags=allow-oom"),
            heartbeat: script!("heartbeat.lua", " flags=allow-oom"),
            epoch: script!("epoch.lua", " flags=allow-oom"),
        }
    }
}

/// How the Redis store behaves (flags `--queue-capacity`, `--result-ttl`, `--lease-ms`,
/// `--max-attempts`, `--workers`).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub capacity: usize,
    pub result_ttl: Duration,
    pub lease: LeaseOptions,
    /// Jobs this process runs at once: the fetcher claims only for idle workers.
    pub workers: usize,
    /// How long a command may take before it is an error (Redis unreachable).
    pub response_timeout: Duration,
}

/// A record as `rec` holds it (see `prelude.lua`).
#[derive(Debug, Deserialize)]
struct Rec {
    k: String,
    s: String,
    sub: Option<f64>,
    st: Option<f64>,
    fin: Option<f64>,
    a: Option<f64>,
    b: Option<f64>,
    e: Option<String>,
}

fn parse_status(s: &str) -> Option<JobStatus> {
    s.parse().ok()
}

fn ms(v: Option<f64>) -> Option<i64> {
    v.map(|x| x as i64)
}

fn count(v: Option<f64>) -> u32 {
    v.map_or(0, |x| x.clamp(0.0, u32::MAX as f64) as u32)
}

/// What the process knows of its connection to Redis, for `/readyz` and the reclaim
/// grace period.
struct Link {
    /// Why the last command or ping failed to reach Redis, while it does.
    down: Mutex<Option<String>>,
    /// Why Redis refuses writes (out of memory, loading, read-only...), while it does:
    /// set by a refused write, cleared only by a write that succeeds (the heartbeat's
    /// probe, every second), never by a read, so readiness does not flap while reads
    /// still work.
    refusing: Mutex<Option<String>>,
    /// When the connection last came back (reclaims wait a lease period after it).
    up_since: Mutex<Instant>,
}

impl Link {
    fn failed(&self, cause: &str) {
        let mut d = self.down.lock();
        if d.is_none() {
            tracing::warn!(cause, "lost the connection to redis; retrying with backoff");
        }
        *d = Some(cause.to_string());
    }

    fn ok(&self) {
        let mut d = self.down.lock();
        if d.take().is_some() {
            *self.up_since.lock() = Instant::now();
            tracing::info!("connected to redis again");
        }
    }

    fn refused(&self, cause: &str) {
        let mut r = self.refusing.lock();
        if r.is_none() {
            tracing::warn!(
                cause,
                "redis refuses writes; submissions answer 503 until it takes them again"
            );
        }
        *r = Some(cause.to_string());
    }

    fn writes_ok(&self) {
        if self.refusing.lock().take().is_some() {
            tracing::info!("redis takes writes again");
        }
    }

    fn health(&self) -> Option<String> {
        self.down
            .lock()
            .clone()
            .or_else(|| self.refusing.lock().clone())
    }
}

/// The data set this replica knows Redis to hold (see `epoch.lua`): ids are handed out
/// only while Redis still holds it.
struct Epoch {
    /// `<name>/<base>` as Redis keeps it.
    name: Mutex<String>,
    /// The highest id this replica knows was handed out (its own submissions and the
    /// counter as the heartbeat last read it): Redis's counter below it means Redis
    /// forgot ids.
    high_water: std::sync::atomic::AtomicU64,
}

impl Epoch {
    fn saw(&self, id: u64) {
        self.high_water.fetch_max(id, Ordering::SeqCst);
    }
}

struct Inner {
    conn: Conn,
    dial: Dial,
    scripts: Scripts,
    keys: Vec<String>,
    opts: RedisOptions,
    consumer: String,
    /// `tally_store_expirations_total`: finished jobs this replica's janitor deleted.
    expirations: prometheus_client::metrics::counter::Counter,
    /// `tally_store_resets_total`: times this replica found Redis had lost ids it handed
    /// out, and moved the id sequence past them.
    resets: prometheus_client::metrics::counter::Counter,
    link: Link,
    epoch: Epoch,
    /// Held by the fetcher from a blocking move until its claim: an id in this consumer's
    /// in-flight list while nobody holds it was moved by a command whose reply was lost,
    /// and the janitor hands it back (see `hand_back_own`).
    claiming: tokio::sync::Mutex<()>,
    /// Claimed jobs handed to worker threads.
    ready_tx: crossbeam_channel::Sender<Lease>,
    ready_rx: crossbeam_channel::Receiver<Lease>,
    /// Claims asked for by worker threads and not yet served: a worker adds one when it
    /// starts waiting, the fetcher takes one off for each lease it hands over (so a
    /// lease in transit is never counted as still wanted), and a worker that gives up
    /// waiting takes its own back if it is still there.
    wanting: std::sync::atomic::AtomicUsize,
    /// Wakes the fetcher when a worker starts waiting.
    want: tokio::sync::Notify,
    closed: AtomicBool,
    /// Stops everything: `Store::close`, or a halt.
    stop: CancellationToken,
    /// Stops claiming only (`JobQueue::close`, the start of a drain), a child of `stop`:
    /// the heartbeat, expiry and wake-ups of long polls go on while the drain finishes
    /// the jobs this replica holds, so the others do not take it for dead meanwhile.
    claims: CancellationToken,
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
    /// Polls waiting for a job to finish anywhere (see `wait_finished`), woken by the
    /// finished-jobs channel.
    waiters: Mutex<std::collections::HashMap<JobId, (Arc<tokio::sync::Notify>, usize)>>,
    /// Outcomes sent from worker threads and not yet answered: `flush` waits for them.
    in_flight: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

impl Inner {
    /// Takes one waiting worker's claim, if one waits: the fetcher serving it, or a submit
    /// leasing its job to it. False when no worker waits (or another took the claim).
    fn take_want(&self) -> bool {
        self.wanting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| w.checked_sub(1))
            .is_ok()
    }
}

/// The Redis store and queue. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// What a failed command says about Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Redis could not be reached, or did not answer in time.
    Link,
    /// Redis answered and refused: out of memory, loading, read-only, a script busy.
    Refusing,
    /// This request itself was refused: retrying it as it is cannot help.
    Request,
}

fn classify(e: &redis::RedisError) -> (StoreError, Failure) {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        let err = StoreError::Unavailable {
            store: STORE,
            cause: e.to_string(),
        };
        return (err, Failure::Link);
    }
    // Conditions of the server that pass: the same write succeeds once they end.
    let refusal = match e.code() {
        Some("OOM") => Some(
            "Redis is out of memory (used memory is over maxmemory) and refuses writes \
             until memory is freed"
                .to_string(),
        ),
        Some(
            code @ ("LOADING" | "BUSY" | "MASTERDOWN" | "READONLY" | "TRYAGAIN" | "CLUSTERDOWN"
            | "NOREPLICAS" | "MISCONF"),
        ) => Some(format!(
            "Redis refuses writes for now ({code}: {})",
            e.detail().unwrap_or("").trim()
        )),
        _ => None,
    };
    match refusal {
        Some(cause) => (
            StoreError::Unavailable {
                store: STORE,
                cause,
            },
            Failure::Refusing,
        ),
        None => (
            StoreError::Rejected {
                store: STORE,
                cause: e.to_string(),
            },
            Failure::Request,
        ),
    }
}

/// A write whose reply never came: it may have been applied.
fn outcome_unknown(e: &redis::RedisError) -> bool {
    !e.is_connection_refusal() && (e.is_timeout() || e.is_connection_dropped() || e.is_io_error())
}

impl RedisStore {
    /// Connects (failing at once when Redis cannot be reached: the service does not
    /// start on a store it cannot see), registers this process as a consumer and starts
    /// its fetcher, heartbeat and janitor. Must be called inside a tokio runtime.
    pub async fn open(opts: RedisOptions, metrics: &Metrics) -> Result<Self, StoreError> {
        let (conn, dial) = conn::connect(&opts.url, opts.response_timeout)
            .await
            .map_err(|e| match e {
                Ok(e) => classify(&e).0,
                Err(cause) => StoreError::Rejected {
                    store: STORE,
                    cause,
                },
            })?;
        let consumer = format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>()
        );
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let stop = CancellationToken::new();
        let me = RedisStore {
            inner: Arc::new(Inner {
                conn,
                dial,
                scripts: Scripts::new(),
                keys: KEY_NAMES.iter().map(|k| key(k)).collect(),
                consumer,
                expirations: metrics.add(
                    "store_expirations",
                    "Finished jobs deleted from the store after --result-ttl",
                ),
                resets: metrics.add(
                    "store_resets",
                    "Times Redis was found to have lost ids it had handed out (restarted \
                     empty, a lagging failover); ids continue past them",
                ),
                link: Link {
                    down: Mutex::new(None),
                    refusing: Mutex::new(None),
                    up_since: Mutex::new(Instant::now()),
                },
                epoch: Epoch {
                    name: Mutex::new(String::new()),
                    high_water: std::sync::atomic::AtomicU64::new(0),
                },
                claiming: tokio::sync::Mutex::new(()),
                ready_tx,
                ready_rx,
                wanting: std::sync::atomic::AtomicUsize::new(0),
                want: tokio::sync::Notify::new(),
                closed: AtomicBool::new(false),
                claims: stop.child_token(),
                stop,
                tasks: TaskTracker::new(),
                runtime: tokio::runtime::Handle::current(),
                waiters: Mutex::new(std::collections::HashMap::new()),
                in_flight: std::sync::atomic::AtomicUsize::new(0),
                settled: tokio::sync::Notify::new(),
                opts,
            }),
        };
        me.join_epoch().await?;
        me.heartbeat().await.map_err(|e| classify(&e).0)?;
        tracing::info!(consumer = %me.inner.consumer, epoch = %me.inner.epoch.name.lock(), cluster = me.inner.dial.is_cluster(), "joined the redis queue");
        me.inner.tasks.spawn(me.clone().fetch());
        me.inner.tasks.spawn(me.clone().housekeeping());
        me.inner.tasks.spawn(me.clone().listen_finished());
        Ok(me)
    }

    /// Stops this replica's background work (fetcher, heartbeat, janitor) without handing
    /// anything back: what a crash leaves behind. For tests of recovery.
    pub fn halt(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.stop.cancel();
    }

    /// A job's status alone: one small read, without its result.
    async fn status(&self, id: JobId) -> Result<Option<JobStatus>, StoreError> {
        let rec: Option<String> = self.seen(self.conn().hget(key("rec"), id.0).await)?;
        rec.map(|rec| to_record(id, &rec, None, None).map(|r| r.status))
            .transpose()
    }

    /// This process's consumer name.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// Finished jobs deleted after `--result-ttl` by this process.
    pub fn expirations(&self) -> u64 {
        self.inner.expirations.get()
    }

    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// Notes the outcome of a command for `/readyz` and maps its error.
    fn seen<T>(&self, r: redis::RedisResult<T>) -> Result<T, StoreError> {
        match r {
            Ok(v) => {
                self.inner.link.ok();
                Ok(v)
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// `seen` for a command that wrote: its success also says Redis takes writes.
    fn wrote<T>(&self, r: redis::RedisResult<T>) -> Result<T, StoreError> {
        let v = self.seen(r)?;
        self.inner.link.writes_ok();
        Ok(v)
    }

    fn failed(&self, e: &redis::RedisError) -> StoreError {
        let (err, failure) = classify(e);
        match failure {
            Failure::Link => self.inner.link.failed(&e.to_string()),
            Failure::Refusing => {
                // Redis answered: the connection is up.
                self.inner.link.ok();
                if let StoreError::Unavailable { cause, .. } = &err {
                    self.inner.link.refused(cause);
                }
            }
            Failure::Request => self.inner.link.ok(),
        }
        err
    }

    fn invocation<'a>(&'a self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for k in &self.inner.keys {
            inv.key(k);
        }
        inv
    }

    fn epoch(&self) -> String {
        self.inner.epoch.name.lock().clone()
    }

    /// Learns which data set Redis holds (see `epoch.lua`): at start (no epoch known yet),
    /// and whenever Redis does not hold the one this replica knows (another epoch, none, or
    /// a counter below ids already handed out): then the id sequence moves past every id
    /// that may have been handed out, under a new epoch, or adopts the one another replica
    /// began.
    async fn join_epoch(&self) -> Result<(), StoreError> {
        let known = self.epoch();
        let high = self.inner.epoch.high_water.load(Ordering::SeqCst);
        let mut inv = self.invocation(&self.inner.scripts.epoch);
        inv.arg(&known).arg(high).arg(fresh_epoch());
        // `seen`, not `wrote`: the script runs while Redis is full (allow-oom), so its
        // success does not say Redis takes writes again.
        let (name, next, lost): (String, u64, u8) =
            self.seen(inv.invoke_async(&mut self.conn()).await)?;
        if name != known {
            if lost == 1 {
                self.inner.resets.inc();
                tracing::error!(
                    old = %known, new = %name, known_ids = high, next_id = next + 1,
                    "redis lost the data it held (restarted without persistence, flushed, or a \
                     lagging failover): jobs acknowledged before the loss are gone; ids go on \
                     from {} so that none is handed out twice", next + 1
                );
            } else if !known.is_empty() {
                tracing::warn!(old = %known, new = %name, "another replica found redis had lost its data; following its new id range");
            }
            *self.inner.epoch.name.lock() = name;
        }
        self.inner.epoch.saw(next);
        Ok(())
    }

    /// Says this replica is alive, by Redis's clock, and checks the data set; returns the
    /// server's time (ms).
    async fn heartbeat(&self) -> redis::RedisResult<i64> {
        let lease_ms = self.inner.opts.lease.lease.as_millis() as u64;
        let waiting = self.inner.wanting.load(Ordering::Relaxed);
        let busy = self.inner.opts.workers.saturating_sub(waiting);
        let mut inv = self.invocation(&self.inner.scripts.heartbeat);
        inv.key(key("replicas"))
            .key(replica_key(&self.inner.consumer))
            .arg(&self.inner.consumer)
            .arg(hostname())
            .arg(std::process::id())
            .arg(self.inner.opts.workers)
            .arg(busy)
            .arg(liveness_ms(lease_ms))
            .key(key("rates"))
            .arg(crate::queue::HISTORY_SECS);
        let (now, epoch, next): (i64, String, u64) = inv.invoke_async(&mut self.conn()).await?;
        if epoch != self.epoch() || next < self.inner.epoch.high_water.load(Ordering::SeqCst) {
            if let Err(e) = self.join_epoch().await {
                tracing::warn!(error = %e, "could not check which data set redis holds");
            }
        } else {
            self.inner.epoch.saw(next);
        }
        Ok(now)
    }

    /// A write that grows nothing, to learn whether Redis takes writes again after it
    /// refused them.
    async fn probe_writes(&self) {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(key("write_probe"))
            .arg(&self.inner.consumer)
            .arg("PX")
            .arg(10_000)
            .query_async(&mut self.conn())
            .await;
        let _ = self.wrote(r);
    }

    /// How many leases the fetcher should claim now: one per waiting worker not yet
    /// served. Nothing is fetched ahead: a claimed job is `running` to every reader, so
    /// it is claimed only when a worker is there to run it.
    fn wanted(&self) -> usize {
        self.inner.wanting.load(Ordering::SeqCst)
    }

    /// The fetcher: claims jobs for the waiting workers, in one batch per round trip,
    /// and hands them over. (Measured: one claim in flight per waiting worker instead
    /// was slower, 6.5-6.8k against 6.9-7.6k jobs/s, in alternating runs.)
    async fn fetch(self) {
        let inner = &self.inner;
        // Blocking moves wait on a connection of their own, so they never hold up other
        // commands.
        let mut blocking: Option<Conn> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            // Nothing to do while every waiting worker has a lease ready.
            while self.wanted() == 0 {
                tokio::select! {
                    _ = inner.want.notified() => {}
                    _ = inner.claims.cancelled() => return,
                    // A safety net for a wake-up that raced with the check.
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            if inner.closed.load(Ordering::SeqCst) {
                return;
            }
            let claimed = tokio::select! {
                c = async {
                    let _claiming = inner.claiming.lock().await;
                    self.claim_some(self.wanted(), &mut blocking).await
                } => c,
                _ = inner.claims.cancelled() => return,
            };
            match claimed {
                Ok(leases) => {
                    backoff = Duration::from_millis(50);
                    for lease in leases {
                        if inner.closed.load(Ordering::SeqCst) {
                            // Closed meanwhile: straight back to the queue.
                            let _ = self.release_lease(lease.id, lease.attempt, false).await;
                            continue;
                        }
                        // This worker's claim is served; if a submit served it first,
                        // nobody waits for this job: back to the queue at once.
                        let served = inner.take_want();
                        if !served {
                            let _ = self.release_lease(lease.id, lease.attempt, false).await;
                            continue;
                        }
                        let _ = inner.ready_tx.send(lease);
                    }
                }
                Err(e) => {
                    // The claim's reply may be lost, its effect not: a blocking move may
                    // have put a job in our in-flight list. Hand it back now (the janitor
                    // does it later if Redis cannot be reached now).
                    blocking = None;
                    tracing::debug!(error = %e, "claim failed; backing off");
                    self.hand_back_own().await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = inner.claims.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Up to `n` of the oldest waiting jobs at once; when there are none, the next one to
    /// arrive within a second (none if nothing did).
    async fn claim_some(
        &self,
        n: usize,
        blocking: &mut Option<Conn>,
    ) -> Result<Vec<Lease>, StoreError> {
        let got = self.claim_script("", n.max(1)).await?;
        if !got.is_empty() {
            return Ok(got);
        }
        self.claim_blocking(blocking).await
    }

    /// The next job to arrive within a second, moved to this consumer's in-flight list by
    /// a blocking move, then leased.
    async fn claim_blocking(&self, blocking: &mut Option<Conn>) -> Result<Vec<Lease>, StoreError> {
        if blocking.is_none() {
            let c = self.inner.dial.blocking().await;
            *blocking = Some(self.seen(c)?);
        }
        let Some(c) = blocking.as_mut() else {
            return Ok(Vec::new());
        };
        let moved: Option<String> = self.seen(
            redis::cmd("BLMOVE")
                .arg(key("wait"))
                .arg(inflight_key(&self.inner.consumer))
                .arg("RIGHT")
                .arg("LEFT")
                .arg(1.0)
                .query_async(c)
                .await,
        )?;
        match moved {
            Some(id) => self.claim_script(&id, 1).await,
            None => Ok(Vec::new()),
        }
    }

    async fn claim_script(&self, id: &str, count: usize) -> Result<Vec<Lease>, StoreError> {
        let mut inv = self.invocation(&self.inner.scripts.claim);
        inv.key(inflight_key(&self.inner.consumer))
            .arg(&self.inner.consumer)
            .arg(self.inner.opts.lease.lease.as_millis() as u64)
            .arg(id)
            .arg(count);
        let raw: Vec<redis::Value> = self.seen(inv.invoke_async(&mut self.conn()).await)?;
        let int = |v: &redis::Value| -> u64 {
            match v {
                redis::Value::Int(n) => (*n).max(0) as u64,
                _ => 0,
            }
        };
        let text = |v: &redis::Value| -> String {
            match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Value::SimpleString(s) => s.clone(),
                _ => String::new(),
            }
        };
        Ok(raw
            .chunks_exact(5)
            .map(|f| Lease {
                id: JobId(int(&f[0])),
                attempt: int(&f[1]) as u32,
                kind: text(&f[2]),
                params: serde_json::from_str(&text(&f[3])).unwrap_or(serde_json::Value::Null),
                retry_base: int(&f[4]) as u32,
            })
            .collect())
    }

    /// Wakes the polls waiting for jobs that finished (on any replica), from the channel
    /// the scripts publish to. Reconnects with backoff; a poll whose wake-up is lost
    /// still ends at its hold time.
    async fn listen_finished(self) {
        use futures_util::StreamExt;
        let inner = &self.inner;
        let mut backoff = Duration::from_millis(100);
        loop {
            let subscribed = async {
                let mut ps = inner.dial.pubsub().await?;
                ps.subscribe(FINISHED_CHANNEL).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let ps = tokio::select! {
                r = subscribed => r,
                _ = inner.stop.cancelled() => return,
            };
            match ps {
                Ok(ps) => {
                    backoff = Duration::from_millis(100);
                    let mut messages = ps.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            m = messages.next() => m,
                            _ = inner.stop.cancelled() => return,
                        };
                        let Some(msg) = msg else { break };
                        let id = std::str::from_utf8(msg.get_payload_bytes())
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok());
                        if let Some(id) = id {
                            if let Some((n, _)) = inner.waiters.lock().get(&JobId(id)) {
                                n.notify_waiters();
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "subscribing to finished jobs failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = inner.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Heartbeat, expiry of finished jobs, recovery of dead consumers' in-flight ids and of
    /// our own stranded ones: every second on every replica. Each runs whatever the others
    /// did: expiry frees the memory that ends a full Redis, so nothing skips it.
    async fn housekeeping(self) {
        let inner = &self.inner;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = inner.stop.cancelled() => return,
            }
            let server_now = match self.heartbeat().await {
                Ok(now) => {
                    inner.link.ok();
                    Some(now)
                }
                Err(e) => {
                    self.failed(&e);
                    None
                }
            };
            if inner.link.refusing.lock().is_some() {
                self.probe_writes().await;
            }
            self.expire_finished().await;
            if let Some(now) = server_now {
                if let Err(e) = self.recover_dead_consumers(now).await {
                    tracing::debug!(error = %e, "recovering dead consumers failed");
                }
            }
            // Not while the fetcher is between a blocking move and its claim: then an id
            // in our list is on its way to a worker.
            tokio::select! {
                _ = async {
                    let _claiming = inner.claiming.lock().await;
                    self.hand_back_own().await;
                } => {}
                _ = inner.stop.cancelled() => return,
            }
        }
    }

    /// Deletes finished jobs past `--result-ttl`, a thousand per call.
    async fn expire_finished(&self) {
        loop {
            let mut inv = self.invocation(&self.inner.scripts.expire);
            inv.arg(1000);
            match inv.invoke_async::<u64>(&mut self.conn()).await {
                Ok(n) => {
                    self.inner.expirations.inc_by(n);
                    if n < 1000 {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "expiring finished jobs failed");
                    return;
                }
            }
        }
    }

    /// Puts back on the queue what sits in this consumer's in-flight list: ids a blocking
    /// move took off the queue whose reply never reached us (a stalled link, a timeout).
    /// Called after a failed claim and by the janitor, never while a claim is under way.
    async fn hand_back_own(&self) {
        let mut inv = self.invocation(&self.inner.scripts.recover_inflight);
        inv.key(inflight_key(&self.inner.consumer));
        match inv.invoke_async::<u64>(&mut self.conn()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                jobs = n,
                "queued again jobs taken off the queue for this replica whose claim's reply was lost"
            ),
            Err(e) => tracing::debug!(error = %e, "handing back our in-flight ids failed; retried"),
        }
    }

    /// Consumers whose heartbeat stopped (by the server's clock, `now`): what they had
    /// taken off the queue but not yet leased goes back; their leases expire on their own
    /// and are reclaimed.
    async fn recover_dead_consumers(&self, now: i64) -> redis::RedisResult<()> {
        let mut c = self.conn();
        let lease_ms = self.inner.opts.lease.lease.as_millis() as u64;
        let cutoff = now - liveness_ms(lease_ms) as i64;
        let dead: Vec<String> = c.zrangebyscore(key("replicas"), "-inf", cutoff).await?;
        for consumer in dead {
            if consumer == self.inner.consumer {
                continue;
            }
            let mut inv = self.invocation(&self.inner.scripts.recover_inflight);
            inv.key(inflight_key(&consumer));
            let n: u64 = inv.invoke_async(&mut c).await?;
            if n > 0 {
                tracing::warn!(%consumer, jobs = n, "queued again what a dead replica had taken");
            }
            redis::pipe()
                .zrem(key("replicas"), &consumer)
                .del(replica_key(&consumer))
                .query_async::<()>(&mut c)
                .await?;
        }
        Ok(())
    }

    /// Hands a lease back (see `release.lua`); `spent`: the attempt stays counted.
    async fn release_lease(
        &self,
        id: JobId,
        attempt: u32,
        spent: bool,
    ) -> Result<bool, StoreError> {
        let mut inv = self.invocation(&self.inner.scripts.release);
        inv.arg(id.0)
            .arg(attempt)
            .arg(u8::from(spent))
            .arg(&self.inner.consumer);
        let n: i64 = self.seen(inv.invoke_async(&mut self.conn()).await)?;
        Ok(n == 1)
    }

    async fn finish_script(
        &self,
        id: JobId,
        attempt: Attempt,
        outcome: Outcome,
        started_at: Option<i64>,
    ) -> Result<Finished, FinishFailed> {
        let attempt_arg: i64 = match attempt {
            Attempt::Of(a) => i64::from(a),
            Attempt::Any => -1,
        };
        let (status, body) = match &outcome {
            Outcome::Done(r) => ("done", r.as_str()),
            Outcome::Failed(e) => ("failed", e.as_str()),
            Outcome::Cancelled(e) => ("cancelled", e.as_str()),
        };
        let owner = match attempt {
            Attempt::Of(_) => self.inner.consumer.as_str(),
            Attempt::Any => "",
        };
        let mut inv = self.invocation(&self.inner.scripts.finish);
        inv.arg(id.0)
            .arg(attempt_arg)
            .arg(status)
            .arg(body)
            .arg(started_at.unwrap_or(0))
            .arg(self.inner.opts.result_ttl.as_millis() as u64)
            .arg(owner);
        match inv.invoke_async::<i64>(&mut self.conn()).await {
            Ok(code) => {
                self.inner.link.ok();
                if code == 1 {
                    self.inner.link.writes_ok();
                }
                let answer = match code {
                    1 => Finished::Recorded,
                    2 => Finished::AlreadyFinished,
                    3 => Finished::Stale,
                    _ => Finished::Unknown,
                };
                Ok(answer)
            }
            Err(e) => Err(FinishFailed {
                error: self.failed(&e),
                outcome: Some(outcome),
            }),
        }
    }

    /// Runs the submit script (see `submit.lua`): once, or twice when Redis turned out not
    /// to hold the data set this replica knew (the second time in the epoch it moved to).
    /// A reply that never came is `OutcomeUnknown`: the job may exist.
    async fn submit_script(
        &self,
        job: &NewJob,
        capacity: usize,
        consumer: &str,
    ) -> Result<SubmitAnswer, StoreError> {
        let params = job.params.to_string();
        for _ in 0..2 {
            let epoch = self.epoch();
            let high = self.inner.epoch.high_water.load(Ordering::SeqCst);
            let mut inv = self.invocation(&self.inner.scripts.submit);
            inv.arg(&job.kind)
                .arg(&params)
                .arg(capacity)
                .arg(consumer)
                .arg(self.inner.opts.lease.lease.as_millis() as u64)
                .arg(&epoch)
                .arg(high);
            idempotency_args(&mut inv, job);
            let answer: Vec<i64> = match inv.invoke_async(&mut self.conn()).await {
                Ok(a) => a,
                Err(e) => {
                    let err = self.failed(&e);
                    if outcome_unknown(&e) {
                        return Err(StoreError::OutcomeUnknown {
                            store: STORE,
                            cause: e.to_string(),
                        });
                    }
                    return Err(err);
                }
            };
            self.inner.link.ok();
            match answer.as_slice() {
                [-1] => self.join_epoch().await?,
                [id, code] if *id > 0 => {
                    let id = JobId(*id as u64);
                    self.inner.epoch.saw(id.0);
                    return Ok(match code {
                        2 => SubmitAnswer::Made(Submitted::Replayed(id), false),
                        3 => SubmitAnswer::Made(Submitted::KeyReused(id), false),
                        _ => {
                            self.inner.link.writes_ok();
                            SubmitAnswer::Made(Submitted::New(id), *code == 1)
                        }
                    });
                }
                _ => return Ok(SubmitAnswer::Full),
            }
        }
        Err(StoreError::Unavailable {
            store: STORE,
            cause: "redis changed data sets twice during one submission".into(),
        })
    }

    async fn get_record(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut c = self.conn();
        let (rec, params, result): (Option<String>, Option<String>, Option<String>) = self.seen(
            redis::pipe()
                .hget(key("rec"), id.0)
                .hget(key("params"), id.0)
                .hget(key("result"), id.0)
                .query_async(&mut c)
                .await,
        )?;
        let Some(rec) = rec else { return Ok(None) };
        Ok(Some(to_record(id, &rec, params.as_deref(), result)?))
    }

    /// Records of `ids` (missing ones skipped), in the same order.
    async fn records(&self, ids: &[u64], with_params: bool) -> Result<Vec<JobRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn();
        let mut p = redis::pipe();
        p.cmd("HMGET").arg(key("rec")).arg(ids);
        if with_params {
            p.cmd("HMGET").arg(key("params")).arg(ids);
            p.cmd("HMGET").arg(key("result")).arg(ids);
        }
        let out: Vec<Vec<Option<String>>> = self.seen(p.query_async(&mut c).await)?;
        let mut recs = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let Some(Some(rec)) = out.first().and_then(|v| v.get(i)) else {
                continue;
            };
            let params = out.get(1).and_then(|v| v.get(i)).cloned().flatten();
            let result = out.get(2).and_then(|v| v.get(i)).cloned().flatten();
            recs.push(to_record(JobId(*id), rec, params.as_deref(), result)?);
        }
        Ok(recs)
    }
}

/// What the submit script did.
enum SubmitAnswer {
    /// What the submission made (a new job, or the first job of its idempotency key), and
    /// whether a new job was leased at once to the submitting replica.
    Made(Submitted, bool),
    /// The queue holds `--queue-capacity` jobs.
    Full,
}

fn to_record(
    id: JobId,
    rec: &str,
    params: Option<&str>,
    result: Option<String>,
) -> Result<JobRecord, StoreError> {
    let r: Rec = serde_json::from_str(rec).map_err(|e| StoreError::Corrupt {
        id: id.0,
        what: e.to_string(),
    })?;
    let status = parse_status(&r.s).ok_or_else(|| StoreError::Corrupt {
        id: id.0,
        what: format!("status {:?}", r.s),
    })?;
    Ok(JobRecord {
        id,
        kind: r.k,
        params: params
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(serde_json::Value::Null),
        status,
        submitted_at: ms(r.sub).unwrap_or(0),
        started_at: ms(r.st),
        finished_at: ms(r.fin),
        result: if status == JobStatus::Done {
            result
        } else {
            None
        },
        error: r.e,
        attempts: count(r.a),
        retry_base: count(r.b),
    })
}

#[async_trait]
impl Store for RedisStore {
    async fn submit(&self, job: &NewJob, _now_ms: i64) -> Result<Submitted, StoreError> {
        match self.submit_script(job, 0, "").await? {
            SubmitAnswer::Made(s, _) => Ok(s),
            SubmitAnswer::Full => Err(StoreError::Rejected {
                store: STORE,
                cause: "the queue is full".into(),
            }),
        }
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.get_record(id).await
    }

    async fn state(&self, id: JobId) -> Result<Option<JobState>, StoreError> {
        let mut c = self.conn();
        let (rec, result): (Option<String>, Option<String>) = self.seen(
            redis::pipe()
                .hget(key("rec"), id.0)
                .hget(key("result"), id.0)
                .query_async(&mut c)
                .await,
        )?;
        let Some(rec) = rec else { return Ok(None) };
        let r = to_record(id, &rec, None, result)?;
        Ok(Some(JobState {
            status: r.status,
            result: r.result,
            error: r.error,
        }))
    }

    fn start(&self, _id: JobId, _attempt: u32, _now_ms: i64) -> Result<(), StoreError> {
        // The claim script records the start.
        Ok(())
    }

    async fn release(&self, id: JobId, attempt: u32, spent: bool) -> Result<(), StoreError> {
        self.release_lease(id, attempt, spent).await.map(|_| ())
    }

    fn finish(&self, f: Finish) -> FinishPending {
        let Finish {
            id,
            attempt,
            outcome,
            started_at,
            ..
        } = f;
        // Sent now, from the runtime, whether or not anyone polls the answer.
        let me = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        self.inner.runtime.spawn(async move {
            let answer = me.finish_script(id, attempt, outcome, started_at).await;
            me.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
            me.inner.settled.notify_waiters();
            let _ = tx.send(answer);
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(FinishFailed::from(StoreError::Closed)))
        })
    }

    async fn requeue(&self, id: JobId, _now_ms: i64) -> Result<Requeued, StoreError> {
        let mut inv = self.invocation(&self.inner.scripts.retry);
        inv.arg(id.0);
        let raw: Vec<redis::Value> = self.seen(inv.invoke_async(&mut self.conn()).await)?;
        match raw.first() {
            Some(redis::Value::Int(1)) => match self.get_record(id).await? {
                Some(rec) => Ok(Requeued::Yes(Box::new(rec))),
                None => Ok(Requeued::Unknown),
            },
            Some(redis::Value::Int(2)) => {
                let status = match raw.get(1) {
                    Some(redis::Value::BulkString(b)) => {
                        parse_status(&String::from_utf8_lossy(b)).unwrap_or(JobStatus::Done)
                    }
                    _ => JobStatus::Done,
                };
                Ok(if status == JobStatus::Done {
                    Requeued::Done
                } else {
                    Requeued::NotFinished(status)
                })
            }
            _ => Ok(Requeued::Unknown),
        }
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError> {
        let index = match filter.status {
            Some(s) => key(&format!("st:{}", s.as_str())),
            None => key("all"),
        };
        let mut upper = filter.before.map_or(u64::MAX, |b| b.0.saturating_sub(1));
        let mut out = Vec::with_capacity(filter.limit);
        let chunk = (filter.limit * 4).clamp(16, 2000);
        loop {
            let mut c = self.conn();
            let max = if upper == u64::MAX {
                "+inf".to_string()
            } else {
                upper.to_string()
            };
            let ids: Vec<u64> = self.seen(
                redis::cmd("ZRANGE")
                    .arg(&index)
                    .arg(&max)
                    .arg("-inf")
                    .arg("BYSCORE")
                    .arg("REV")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(chunk)
                    .query_async(&mut c)
                    .await,
            )?;
            if ids.is_empty() {
                return Ok(out);
            }
            upper = ids.last().map_or(0, |l| l.saturating_sub(1));
            for rec in self.records(&ids, true).await? {
                if filter.kind.as_deref().is_some_and(|k| rec.kind != k) {
                    continue;
                }
                out.push(rec);
                if out.len() == filter.limit {
                    return Ok(out);
                }
            }
            if ids.len() < chunk || upper == 0 {
                return Ok(out);
            }
        }
    }

    async fn statuses(
        &self,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<(JobId, JobStatus)>, StoreError> {
        let mut c = self.conn();
        let from = format!("({}", after.map_or(0, |a| a.0));
        let ids: Vec<u64> = self.seen(
            redis::cmd("ZRANGE")
                .arg(key("all"))
                .arg(&from)
                .arg("+inf")
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut c)
                .await,
        )?;
        Ok(self
            .records(&ids, false)
            .await?
            .into_iter()
            .map(|r| (r.id, r.status))
            .collect())
    }

    async fn counts(&self) -> Result<JobCounts, StoreError> {
        let mut c = self.conn();
        let raw: std::collections::HashMap<String, i64> =
            self.seen(c.hgetall(key("counts")).await)?;
        let mut out = JobCounts::default();
        for s in JobStatus::ALL {
            *out.slot(s) = raw.get(s.as_str()).copied().unwrap_or(0).max(0) as u64;
        }
        Ok(out)
    }

    async fn recover_unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
        // Nothing lives in the process: leases of a dead replica expire and are reclaimed.
        Ok(Vec::new())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Writes made from the runtime were answered when they returned; those sent from
        // worker threads are waited for.
        loop {
            let settled = self.inner.settled.notified();
            if self.inner.in_flight.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), settled).await;
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        JobQueue::close(self);
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        // A blocking move cut short may have left an id in our in-flight list: back to
        // the queue with it. Then leave the replicas list at once rather than when the
        // heartbeat goes stale.
        let mut c = self.conn();
        let mut inv = self.invocation(&self.inner.scripts.recover_inflight);
        inv.key(inflight_key(&self.inner.consumer));
        let back: redis::RedisResult<u64> = inv.invoke_async(&mut c).await;
        let left: redis::RedisResult<()> = redis::pipe()
            .zrem(key("replicas"), &self.inner.consumer)
            .del(replica_key(&self.inner.consumer))
            .query_async(&mut c)
            .await;
        self.seen(back.and(left))
    }

    fn health(&self) -> Result<(), String> {
        match self.inner.link.health() {
            None => Ok(()),
            Some(cause) => Err(format!("the redis store is unavailable: {cause}")),
        }
    }

    fn name(&self) -> &'static str {
        STORE
    }
}

#[async_trait]
impl JobQueue for RedisStore {
    async fn push(
        &self,
        job: &NewJob,
        _now_ms: i64,
        admitted: Admitted<'_>,
    ) -> Result<Pushed, PushError> {
        let inner = &self.inner;
        // A worker of ours waiting for work gets this job straight from the submit
        // script: no trip through the queue, no claim round trip, and its poll is held
        // here. Its claim is taken over now and given back if the job was not leased.
        let here = !inner.closed.load(Ordering::SeqCst) && inner.take_want();
        let give_back = || {
            if here {
                inner.wanting.fetch_add(1, Ordering::SeqCst);
                inner.want.notify_one();
            }
        };
        let consumer = if here { inner.consumer.as_str() } else { "" };
        let (id, leased) = match self.submit_script(job, inner.opts.capacity, consumer).await {
            Ok(SubmitAnswer::Made(Submitted::New(id), leased)) => (id, leased),
            Ok(SubmitAnswer::Made(submitted, _)) => {
                give_back();
                return Ok(Pushed {
                    submitted,
                    durable: Box::pin(std::future::ready(Ok(()))),
                });
            }
            Ok(SubmitAnswer::Full) => {
                give_back();
                return Err(PushError::Full {
                    capacity: inner.opts.capacity,
                });
            }
            Err(e) => {
                give_back();
                return Err(e.into());
            }
        };
        admitted(id, leased);
        if leased {
            let _ = inner.ready_tx.send(Lease {
                id,
                attempt: 1,
                retry_base: 0,
                kind: job.kind.clone(),
                params: job.params.clone(),
            });
        } else {
            give_back();
        }
        // Acknowledged by Redis: as durable as its persistence settings make it.
        Ok(Pushed {
            submitted: Submitted::New(id),
            durable: Box::pin(std::future::ready(Ok(()))),
        })
    }

    fn claim(&self, wait: Duration) -> Result<Option<Lease>, Closed> {
        if let Ok(lease) = self.inner.ready_rx.try_recv() {
            return Ok(Some(lease));
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Closed);
        }
        self.inner.wanting.fetch_add(1, Ordering::SeqCst);
        self.inner.want.notify_one();
        match self.inner.ready_rx.recv_timeout(wait) {
            Ok(lease) => Ok(Some(lease)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                // Take our claim back; if the fetcher already served it, the lease is
                // on its way: take it.
                let withdrawn = self.inner.take_want();
                if !withdrawn {
                    if let Ok(lease) = self.inner.ready_rx.recv_timeout(Duration::from_secs(5)) {
                        return Ok(Some(lease));
                    }
                }
                if self.inner.closed.load(Ordering::SeqCst) {
                    Err(Closed)
                } else {
                    Ok(None)
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Closed),
        }
    }

    async fn renew(&self, held: &[(JobId, u32)], _now_ms: i64) -> Result<Vec<Renewal>, StoreError> {
        let mut inv = self.invocation(&self.inner.scripts.renew);
        inv.arg(&self.inner.consumer)
            .arg(self.inner.opts.lease.lease.as_millis() as u64);
        for (id, attempt) in held {
            inv.arg(id.0).arg(*attempt);
        }
        let codes: Vec<i64> = self.seen(inv.invoke_async(&mut self.conn()).await)?;
        Ok(codes
            .into_iter()
            .map(|c| match c {
                1 => Renewal::Held,
                2 => Renewal::Cancelled,
                _ => Renewal::Lost,
            })
            .collect())
    }

    fn finish(&self, f: Finish) -> FinishPending {
        Store::finish(self, f)
    }

    async fn release(&self, id: JobId, attempt: u32) -> Result<(), StoreError> {
        self.release_lease(id, attempt, false).await.map(|_| ())
    }

    async fn reclaim_expired(&self, _now_ms: i64) -> Result<Reclaimed, StoreError> {
        // After a reconnect, give holders one lease period to renew first: Redis's clock
        // ran on while nobody could reach it.
        if self.inner.link.down.lock().is_some()
            || self.inner.link.up_since.lock().elapsed() < self.inner.opts.lease.lease
        {
            return Ok(Reclaimed::default());
        }
        let mut inv = self.invocation(&self.inner.scripts.reclaim);
        inv.arg(self.inner.opts.lease.max_attempts)
            .arg(self.inner.opts.result_ttl.as_millis() as u64)
            .arg(1000)
            .arg(crate::queue::gave_up("%d"));
        let flat: Vec<u64> = self.seen(inv.invoke_async(&mut self.conn()).await)?;
        let mut out = Reclaimed::default();
        for chunk in flat.chunks(3) {
            if let [id, attempt, kind] = chunk {
                let entry = (JobId(*id), *attempt as u32);
                if *kind == 2 {
                    out.dead.push(entry);
                } else {
                    out.requeued.push(entry);
                }
            }
        }
        Ok(out)
    }

    async fn cancel(&self, id: JobId, _now_ms: i64) -> Result<Finished, StoreError> {
        self.finish_script(
            id,
            Attempt::Any,
            Outcome::Cancelled("cancelled by request".into()),
            None,
        )
        .await
        .map_err(|f| f.error)
    }

    async fn retry(
        &self,
        id: JobId,
        now_ms: i64,
        admitted: Admitted<'_>,
    ) -> Result<Requeued, PushError> {
        let answer = self.requeue(id, now_ms).await?;
        if matches!(answer, Requeued::Yes(_)) {
            admitted(id, false);
        }
        Ok(answer)
    }

    async fn recover(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Claimed but not started: straight back to the queue.
        let me = self.clone();
        drop(self.inner.tasks.spawn(async move {
            while let Ok(lease) = me.inner.ready_rx.try_recv() {
                if let Err(e) = me.release_lease(lease.id, lease.attempt, false).await {
                    tracing::warn!(job = %lease.id, error = %e, "could not hand an unstarted job back; its lease will expire");
                }
            }
        }));
        self.inner.claims.cancel();
    }

    fn waiting(&self) -> usize {
        self.inner.ready_rx.len()
    }

    async fn wait_finished(&self, id: JobId, hold: Duration) {
        if hold.is_zero() {
            return;
        }
        let notify = {
            let mut w = self.inner.waiters.lock();
            let e = w
                .entry(id)
                .or_insert_with(|| (Arc::new(tokio::sync::Notify::new()), 0));
            e.1 += 1;
            e.0.clone()
        };
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // Finished already (or unknown): no wait.
        let open = matches!(
            self.status(id).await,
            Ok(Some(JobStatus::Queued | JobStatus::Running))
        );
        if open {
            let _ = tokio::time::timeout(hold, woken).await;
        }
        let mut w = self.inner.waiters.lock();
        if let Some(e) = w.get_mut(&id) {
            e.1 -= 1;
            if e.1 == 0 {
                w.remove(&id);
            }
        }
    }

    async fn replicas(&self) -> Result<Vec<Replica>, StoreError> {
        let mut c = self.conn();
        // Heartbeats carry Redis's time: read it with them and say when each replica was
        // last seen on this process's clock, so a replica whose host clock is off is
        // neither shown stale nor taken for dead.
        let local_now = crate::now_ms();
        let (names, time): (Vec<(String, f64)>, (i64, i64)) = self.seen(
            redis::pipe()
                .zrange_withscores(key("replicas"), 0, -1)
                .cmd("TIME")
                .query_async(&mut c)
                .await,
        )?;
        let server_now = time_ms(time);
        let mut p = redis::pipe();
        for (name, _) in &names {
            p.hgetall(replica_key(name));
        }
        let infos: Vec<std::collections::HashMap<String, String>> =
            self.seen(p.query_async(&mut c).await)?;
        Ok(names
            .into_iter()
            .zip(infos)
            .map(|((name, seen), info)| {
                let num = |k: &str| info.get(k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
                Replica {
                    this: name == self.inner.consumer,
                    host: info.get("host").cloned().unwrap_or_default(),
                    pid: num("pid"),
                    workers: num("workers"),
                    busy: num("busy"),
                    last_seen_ms: local_now - (server_now - seen as i64).max(0),
                    name,
                }
            })
            .collect())
    }

    async fn stats(&self) -> Result<crate::queue::QueueStats, StoreError> {
        let mut c = self.conn();
        let (waiting, leased): (u64, u64) = self.seen(
            redis::pipe()
                .llen(key("wait"))
                .zcard(key("leases"))
                .query_async(&mut c)
                .await,
        )?;
        Ok(crate::queue::QueueStats { waiting, leased })
    }

    async fn cluster_totals(&self) -> Result<Option<crate::queue::ClusterTotals>, StoreError> {
        let mut c = self.conn();
        // Counted by the scripts as jobs are made and end (not next_id, which jumps past
        // lost ids after Redis forgot its data).
        let ever: Vec<Option<u64>> = self.seen(
            redis::cmd("HMGET")
                .arg(key("counts"))
                .arg("ever:submitted")
                .arg("ever:done")
                .arg("ever:failed")
                .arg("ever:cancelled")
                .query_async(&mut c)
                .await,
        )?;
        let ever = |i: usize| ever.get(i).copied().flatten().unwrap_or(0);
        Ok(Some(crate::queue::ClusterTotals {
            submitted: ever(0),
            done: ever(1),
            failed: ever(2),
            cancelled: ever(3),
        }))
    }

    async fn totals_history(&self) -> Result<Option<Vec<crate::queue::TotalsSample>>, StoreError> {
        // Samples carry Redis's time: read it with them and move them to this process's
        // clock, which the live points and the window use (as `replicas` does).
        let local_now = crate::now_ms();
        let (raw, time): (Vec<String>, (i64, i64)) = self.seen(
            redis::pipe()
                .zrange(key("rates"), 0, -1)
                .cmd("TIME")
                .query_async(&mut self.conn())
                .await,
        )?;
        let skew = local_now - time_ms(time);
        Ok(Some(
            raw.iter()
                .filter_map(|s| parse_sample(s))
                .map(|mut s| {
                    s.at_ms += skew;
                    s
                })
                .collect(),
        ))
    }

    fn is_local(&self) -> bool {
        false
    }
}

/// Redis's `TIME` (seconds, microseconds) in milliseconds.
fn time_ms((secs, micros): (i64, i64)) -> i64 {
    secs * 1000 + micros / 1000
}

/// A sample as `heartbeat.lua` records it: "<ms> <submitted> <done> <failed> <cancelled>".
fn parse_sample(s: &str) -> Option<crate::queue::TotalsSample> {
    let mut f = s.split(' ').map(str::parse::<u64>);
    let mut next = || f.next()?.ok();
    Some(crate::queue::TotalsSample {
        at_ms: i64::try_from(next()?).ok()?,
        totals: crate::queue::ClusterTotals {
            submitted: next()?,
            done: next()?,
            failed: next()?,
            cancelled: next()?,
        },
    })
}
