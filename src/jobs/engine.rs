//! The engine: admits jobs into a queue ([`crate::queue::JobQueue`]), runs what it
//! claims on a pool of worker threads, and hands every outcome to the queue, which
//! records it only for the attempt that still holds the job.
//!
//! - Admission never blocks: a full queue answers at once (503 + Retry-After at the edge).
//! - Workers are OS threads, so CPU work never runs on the async I/O threads.
//! - A job that panics takes its worker thread down with it; the job is failed with the
//!   panic message and a fresh thread replaces the old one at once (counted in metrics).
//! - Cancel and timeout set the job's flag (cooperative stop) and record the final state
//!   at once; whichever of finish/cancel/timeout comes first wins, exactly once.
//! - Leases: the sweeper renews the leases of jobs whose worker shows signs of life
//!   (checkpoints, progress), reclaims expired ones, and stops a job whose lease was
//!   lost or which was cancelled elsewhere. An outcome the store could not write is
//!   retried until it is (a full disk), and the job stays in flight meanwhile.
//! - Drain: intake stops, queued (for an in-process queue) and running work finishes
//!   until a deadline; what is left stays in the store, to be run again at the next
//!   start (or, on a shared queue, by another replica at once).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::EngineMetrics;
use super::{EngineOptions, JobContext, JobError, Registry};
use crate::metrics::{KindLabels, Metrics};
use crate::model::{
    Attempt, Finish, JobCounts, JobId, JobRecord, JobState, JobStatus, ListFilter, NewJob, Outcome,
};
use crate::now_ms;
use crate::queue::{
    gave_up, ClusterTotals, JobQueue, Lease, PushError, Pushed, QueueStats, Renewal, Replica,
    TotalsSample,
};
use crate::store::{FinishFailed, FinishPending, Finished, Requeued, Store, StoreError, Submitted};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A kind this server does not run; `known` lists the ones it does.
    #[error("unknown job kind {kind:?}; known kinds: {}", known.join(", "))]
    UnknownKind { kind: String, known: Vec<String> },
    #[error("invalid params for {kind}: {reason}")]
    InvalidParams { kind: String, reason: String },
    #[error("the queue is full ({capacity} jobs waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the service is shutting down and takes no new jobs")]
    ShuttingDown,
    /// The idempotency key was used for a different request, which made job `id`.
    #[error("the idempotency key was already used for a different request (job {id})")]
    KeyReused { id: JobId },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An accepted submission: its job, and whether it repeated an earlier submission under
/// the same idempotency key (nothing new was made, nothing counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submission {
    pub id: JobId,
    pub replayed: bool,
}

impl From<PushError> for SubmitError {
    fn from(e: PushError) -> Self {
        match e {
            PushError::Full { capacity } => SubmitError::QueueFull { capacity },
            PushError::Store(s) => SubmitError::Store(s),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("job {id} already {status}", status = .status.as_str())]
    AlreadyFinished { id: JobId, status: JobStatus },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("job {id} is {status}; only failed or cancelled jobs run again", status = .status.as_str())]
    NotRetryable { id: JobId, status: JobStatus },
    #[error("the service is shutting down and takes no new jobs")]
    ShuttingDown,
    #[error("the queue is full ({capacity} jobs waiting); retry later")]
    QueueFull { capacity: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job this process has admitted or claimed and not yet let go of: one per attempt.
struct Live {
    kind: String,
    ctx: JobContext,
    /// The attempt running here (0: admitted here, not yet claimed).
    attempt: AtomicU32,
    /// Set by whoever decides the final state first (worker, cancel, timeout, shutdown).
    finalized: AtomicBool,
    /// Woken when the job leaves `live`, i.e. once its final state is durable.
    gone: Notify,
    /// When a worker started it (ms since epoch; 0 = not started).
    started_at: AtomicI64,
    /// The outcome is decided and on its way to the store (retried while it cannot be
    /// written): the lease is renewed for it whatever the worker does.
    outcome_pending: AtomicBool,
    /// Progress as last seen by the sweeper, and when it last moved: progress counts as
    /// a sign of life for jobs that report it from many threads (the CSV scan).
    progress_seen: AtomicU64,
    progress_moved_at: AtomicI64,
}

impl Live {
    fn new(kind: String, attempt: u32) -> Arc<Live> {
        Arc::new(Live {
            kind,
            ctx: JobContext::new(attempt),
            attempt: AtomicU32::new(attempt),
            finalized: AtomicBool::new(false),
            gone: Notify::new(),
            started_at: AtomicI64::new(0),
            outcome_pending: AtomicBool::new(false),
            progress_seen: AtomicU64::new(0),
            progress_moved_at: AtomicI64::new(0),
        })
    }

    /// The last sign of life of the job's worker (ms since epoch).
    fn last_sign_of_life(&self, now: i64) -> i64 {
        if let Some((done, _)) = self.ctx.progress() {
            if self.progress_seen.swap(done, Ordering::Relaxed) != done {
                self.progress_moved_at.store(now, Ordering::Relaxed);
            }
        }
        self.ctx
            .last_beat()
            .max(self.started_at.load(Ordering::Relaxed))
            .max(self.progress_moved_at.load(Ordering::Relaxed))
    }
}

struct Inner {
    queue: Arc<dyn JobQueue>,
    store: Arc<dyn Store>,
    registry: Registry,
    metrics: EngineMetrics,
    opts: EngineOptions,
    live: Mutex<HashMap<JobId, Arc<Live>>>,
    /// No new jobs are admitted.
    draining: AtomicBool,
    /// Past the drain deadline: claims are handed back, not run.
    stopped: AtomicBool,
    /// Woken whenever a job leaves `live`, so a drain can wait without polling.
    idle: Notify,
    /// Outcomes on their way to the store, for the one completion task.
    completions: tokio::sync::mpsc::UnboundedSender<Completion>,
    recent: Mutex<Recent>,
    /// This process's totals a second apart, for an in-process queue's rate history.
    history: super::history::Ring,
    /// The sweeper and the completion task; `stop` ends them.
    tasks: TaskTracker,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// At most this many just-finished states wait for their first poll ([`Recent`])...
const RECENT_MAX_JOBS: usize = 4096;
/// ...holding at most this many bytes of results and errors.
const RECENT_MAX_BYTES: usize = 4 << 20;

/// Final states of jobs that just finished here, kept until their first read or until
/// pushed out by newer ones: the poll that follows a submit is answered without a store
/// read. An entry is added only once its state is durable, so a read never sees more
/// than the store holds; it is bounded in entries and bytes, so results still live in
/// the store, not in the heap. Only with an in-process queue: then every retry goes
/// through this engine, which forgets the entry, so the cache is never older than the
/// store; on a shared queue another replica may retry the job, and nothing is cached.
#[derive(Default)]
struct Recent {
    states: HashMap<JobId, JobState>,
    order: VecDeque<JobId>,
    bytes: usize,
}

fn state_bytes(s: &JobState) -> usize {
    s.result.as_ref().map_or(0, String::len) + s.error.as_ref().map_or(0, String::len)
}

impl Recent {
    fn insert(&mut self, id: JobId, state: JobState) {
        let size = state_bytes(&state);
        if size > RECENT_MAX_BYTES / 4 {
            return;
        }
        self.bytes += size;
        if let Some(old) = self.states.insert(id, state) {
            self.bytes -= state_bytes(&old);
        }
        self.order.push_back(id);
        while self.order.len() > RECENT_MAX_JOBS || self.bytes > RECENT_MAX_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(s) = self.states.remove(&old) {
                self.bytes -= state_bytes(&s);
            }
        }
    }

    fn take(&mut self, id: JobId) -> Option<JobState> {
        let s = self.states.remove(&id)?;
        self.bytes -= state_bytes(&s);
        // Its id stays in `order` until pushed out; removing it there would cost a scan.
        Some(s)
    }

    /// A job that runs again must not answer from its previous run.
    fn forget(&mut self, id: JobId) {
        let _ = self.take(id);
    }
}

/// An outcome on its way to the store; the completion task waits until it is durable
/// (retrying it while the store cannot take it), then lets the job go.
struct Completion {
    id: JobId,
    attempt: u32,
    live: Arc<Live>,
    /// The outcome as a poll will read it, for the recently-finished cache (none when
    /// the store's own reads are as cheap).
    state: Option<JobState>,
    started_at: Option<i64>,
    durable: FinishPending,
}

/// How long a blocked claim waits before a worker looks around (shutdown wakes it
/// earlier).
const CLAIM_WAIT: Duration = Duration::from_secs(1);

/// Retries of an outcome the store could not take start after this long, doubling...
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the worker threads, the sweeper and the completion task. Must be called
    /// from within a tokio runtime; [`Engine::shutdown`] stops and joins them all.
    pub fn start(
        queue: Arc<dyn JobQueue>,
        store: Arc<dyn Store>,
        registry: Registry,
        metrics: &Metrics,
        opts: EngineOptions,
    ) -> Self {
        let (completions, done_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            queue,
            store,
            registry,
            metrics: EngineMetrics::register(metrics),
            opts,
            live: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            idle: Notify::new(),
            completions,
            recent: Mutex::new(Recent::default()),
            history: Default::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            threads: Mutex::new(Vec::new()),
        });
        for n in 0..inner.opts.workers {
            spawn_worker(inner.clone(), n);
        }
        inner.tasks.spawn(sweep(inner.clone()));
        // A shared queue's replicas keep the cluster's history in the store.
        if inner.queue.is_local() {
            inner.tasks.spawn(sample_totals(inner.clone()));
        }
        inner
            .tasks
            .spawn(record_completions(inner.clone(), done_rx));
        Engine { inner }
    }

    /// Which store holds the jobs (`sqlite`, `memory`, `redis`).
    pub fn store_name(&self) -> &'static str {
        self.inner.store.name()
    }

    /// Whether the store takes writes now; else why not (readiness).
    pub fn store_health(&self) -> Result<(), String> {
        self.inner.store.health()
    }

    /// Finished records the store dropped for room (the memory store's cap).
    pub fn store_evictions(&self) -> u64 {
        self.inner.store.evictions()
    }

    /// Flushes and closes the store: the last step of a shutdown, after the engine and the
    /// pipeline stopped.
    pub async fn close_store(&self) -> Result<(), StoreError> {
        self.inner.store.close().await
    }

    /// A job's record as the store has it, brought up to date with what this process
    /// knows sooner: a job that started here moments ago may not have its start (or its
    /// attempt) in the store yet.
    pub async fn record(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let Some(mut rec) = self.inner.store.get(id).await? else {
            return Ok(None);
        };
        // Only an attempt newer than the store's counts: an older one still winding down
        // here (cancelled, its job already queued again by a retry) says nothing.
        let newer = self.attempt(id).filter(|a| *a > rec.attempts);
        if let (false, Some(a), Some(t)) = (rec.status.is_finished(), newer, self.started_at(id)) {
            if rec.status == JobStatus::Queued {
                rec.status = JobStatus::Running;
                rec.started_at = Some(t);
            }
            rec.attempts = a;
        }
        Ok(Some(rec))
    }

    /// A page of job records, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError> {
        self.inner.store.list(filter).await
    }

    /// A page of `(id, status)` in id order after `after` (the compatible job listing).
    pub async fn statuses(
        &self,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<(JobId, JobStatus)>, StoreError> {
        self.inner.store.statuses(after, limit).await
    }

    /// The queue's size (with Redis, the shared queue's).
    pub async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        self.inner.queue.stats().await
    }

    /// Jobs submitted and ended on every replica (none with an in-process queue).
    pub async fn cluster_totals(&self) -> Result<Option<ClusterTotals>, StoreError> {
        self.inner.queue.cluster_totals().await
    }

    /// This process's totals, every kind's together.
    pub fn process_totals(&self) -> ClusterTotals {
        process_totals(&self.inner)
    }

    /// Jobs per second for the last 15 minutes: every replica's with a shared queue (and
    /// then `true`), else this process's.
    pub async fn rate_history(&self) -> Result<(super::history::Rates, bool), StoreError> {
        let (samples, cluster) = match self.inner.queue.totals_history().await? {
            Some(samples) => (samples, true),
            None => (self.inner.history.samples(), false),
        };
        Ok((super::history::rates(&samples, now_ms()), cluster))
    }

    /// The processes taking work from the queue.
    pub async fn replicas(&self) -> Result<Vec<Replica>, StoreError> {
        self.inner.queue.replicas().await
    }

    /// The engine's metric families (the dashboard reads them too).
    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Starts tracking a job the queue just admitted, when this process will run it.
    fn admitted(&self, kind: &str) -> impl Fn(JobId, bool) + Send + Sync + '_ {
        let kind = kind.to_string();
        move |id, runs_here| {
            if runs_here {
                self.inner
                    .live
                    .lock()
                    .insert(id, Live::new(kind.clone(), 0));
            }
        }
    }

    /// Admits a job: checks the kind (and params when `validate`), queues it and waits
    /// until its record is durable. The id is valid when this returns. With an
    /// idempotency key the store already holds for the same request, nothing is queued
    /// or counted: the answer is the first job, `replayed`.
    pub async fn submit(&self, job: NewJob, validate: bool) -> Result<Submission, SubmitError> {
        let inner = &self.inner;
        let handler = inner
            .registry
            .get(&job.kind)
            .ok_or_else(|| SubmitError::UnknownKind {
                kind: job.kind.clone(),
                known: inner.registry.kinds().map(str::to_owned).collect(),
            })?;
        if inner.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if validate {
            handler
                .validate(&job.params)
                .map_err(|reason| SubmitError::InvalidParams {
                    kind: job.kind.clone(),
                    reason,
                })?;
        }
        let admitted = self.admitted(&job.kind);
        let (id, durable) = match inner.queue.push(&job, now_ms(), &admitted).await {
            Ok(Pushed {
                submitted: Submitted::New(id),
                durable,
            }) => (id, durable),
            Ok(Pushed {
                submitted: Submitted::Replayed(id),
                durable,
            }) => {
                durable.await?;
                return Ok(Submission { id, replayed: true });
            }
            Ok(Pushed {
                submitted: Submitted::KeyReused(id),
                durable,
            }) => {
                durable.await?;
                return Err(SubmitError::KeyReused { id });
            }
            Err(e) => {
                if matches!(e, PushError::Full { .. }) {
                    inner.metrics.queue_rejections.inc();
                }
                return Err(e.into());
            }
        };
        if let Err(e) = durable.await {
            // Never acknowledged: stop the job; its outcome cannot be recorded anyway.
            let live = inner.live.lock().get(&id).cloned();
            if let Some(live) = live {
                live.ctx.cancel();
                live.finalized.store(true, Ordering::SeqCst);
                if live.attempt.load(Ordering::SeqCst) == 0 {
                    release(inner, id, &live);
                }
            }
            return Err(e.into());
        }
        inner
            .metrics
            .submitted
            .get_or_create(&KindLabels { kind: job.kind })
            .inc();
        Ok(Submission {
            id,
            replayed: false,
        })
    }

    /// Queues again the jobs an earlier process left unfinished (for a queue that lives
    /// in this process); returns how many were found.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        self.inner.queue.recover().await
    }

    /// Cancels a queued or running job, wherever it runs. A running job stops at its
    /// next checkpoint; its state is `cancelled` from now on either way.
    pub async fn cancel(&self, id: JobId) -> Result<(), CancelError> {
        let inner = &self.inner;
        let live = inner.live.lock().get(&id).cloned();
        match inner.queue.cancel(id, now_ms()).await? {
            Finished::Recorded => {
                if let Some(live) = live {
                    live.ctx.cancel();
                    if !live.finalized.swap(true, Ordering::SeqCst) {
                        inner.metrics.job_finished(&live.kind, "cancelled", None);
                    }
                    // Not claimed yet: nothing else will let it go. A running one is let
                    // go by its worker when it stops.
                    if live.attempt.load(Ordering::SeqCst) == 0 {
                        release(inner, id, &live);
                    }
                } else if let Ok(Some(r)) = inner.store.get(id).await {
                    inner.metrics.job_finished(&r.kind, "cancelled", None);
                }
                Ok(())
            }
            Finished::Unknown => Err(CancelError::NotFound(id)),
            Finished::AlreadyFinished | Finished::Stale => match inner.store.get(id).await? {
                Some(r) => Err(CancelError::AlreadyFinished {
                    id,
                    status: r.status,
                }),
                None => Err(CancelError::NotFound(id)),
            },
        }
    }

    /// Runs a failed or cancelled job again: same id, next attempt.
    pub async fn retry(&self, id: JobId) -> Result<(), RetryError> {
        let inner = &self.inner;
        if inner.draining.load(Ordering::SeqCst) {
            return Err(RetryError::ShuttingDown);
        }
        let Some(rec) = inner.store.get(id).await? else {
            return Err(RetryError::NotFound(id));
        };
        let admitted = self.admitted(&rec.kind);
        let answer = inner
            .queue
            .retry(id, now_ms(), &admitted)
            .await
            .map_err(|e| match e {
                PushError::Full { capacity } => RetryError::QueueFull { capacity },
                PushError::Store(s) => RetryError::Store(s),
            })?;
        match answer {
            Requeued::Yes(_) => {
                inner.recent.lock().forget(id);
                Ok(())
            }
            Requeued::Unknown => Err(RetryError::NotFound(id)),
            Requeued::Done => Err(RetryError::NotRetryable {
                id,
                status: JobStatus::Done,
            }),
            Requeued::NotFinished(status) => Err(RetryError::NotRetryable { id, status }),
        }
    }

    /// True when this process holds the job and it has not finished: the answer to a
    /// poll without a store read. False says nothing: ask the store.
    pub fn is_in_flight(&self, id: JobId) -> bool {
        self.inner
            .live
            .lock()
            .get(&id)
            .is_some_and(|l| !l.finalized.load(Ordering::SeqCst))
    }

    /// Waits up to `hold` for a job held by this process to finish durably. Returns at
    /// once when this process does not hold the job. This lets a poll answer "done" the
    /// moment it is true instead of "running" now and a new poll later (long polling).
    pub async fn wait_finished(&self, id: JobId, hold: Duration) {
        let Some(live) = self.inner.live.lock().get(&id).cloned() else {
            // Not here: on a shared queue it may run on another replica. (An in-process
            // queue would return at once; skipping the call spares the boxed future on
            // every poll of a finished job.)
            if !self.inner.queue.is_local() {
                self.inner.queue.wait_finished(id, hold).await;
            }
            return;
        };
        let gone = live.gone.notified();
        tokio::pin!(gone);
        gone.as_mut().enable();
        if !self.inner.live.lock().contains_key(&id) {
            return;
        }
        let _ = tokio::time::timeout(hold, gone).await;
    }

    /// Status, result and error of a job: from the jobs that just finished here (each
    /// answered once that way), else from the store.
    pub async fn state(&self, id: JobId) -> Result<Option<JobState>, StoreError> {
        if let Some(s) = self.inner.recent.lock().take(id) {
            return Ok(Some(s));
        }
        self.inner.store.state(id).await
    }

    /// When a job running in this process started, if it has.
    pub fn started_at(&self, id: JobId) -> Option<i64> {
        self.inner
            .live
            .lock()
            .get(&id)
            .map(|l| l.started_at.load(Ordering::SeqCst))
            .filter(|t| *t > 0)
    }

    /// The attempt of a job claimed in this process (the store may not have it yet).
    pub fn attempt(&self, id: JobId) -> Option<u32> {
        self.inner
            .live
            .lock()
            .get(&id)
            .map(|l| l.attempt.load(Ordering::SeqCst))
            .filter(|a| *a > 0)
    }

    /// Progress of a job running in this process, if it reports any.
    pub fn progress(&self, id: JobId) -> Option<(u64, u64)> {
        self.inner
            .live
            .lock()
            .get(&id)
            .and_then(|l| l.ctx.progress())
    }

    pub async fn counts(&self) -> Result<JobCounts, StoreError> {
        self.inner.store.counts().await
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Jobs admitted or claimed by this process and not yet finished.
    pub fn live_jobs(&self) -> usize {
        self.inner.live.lock().len()
    }

    /// Stops intake. Idempotent. A shared queue also stops handing this process work
    /// (what it fetched ahead goes back at once); an in-process one goes on until the
    /// jobs it holds are done.
    pub fn begin_drain(&self) {
        if !self.inner.draining.swap(true, Ordering::SeqCst) {
            tracing::info!(live = self.live_jobs(), "draining: no new jobs accepted");
            if !self.inner.queue.is_local() {
                self.inner.queue.close();
            }
        }
    }

    /// Waits until every job this process holds has finished, or the deadline. Returns
    /// true when everything finished (outcomes durable).
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.live.lock().is_empty() {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return self.inner.live.lock().is_empty();
                }
                // A safety net in case a wake-up raced with the check above.
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Stops the engine: no more claims; jobs still running are stopped (cooperatively)
    /// and handed back unfinished, for the next start or another replica; outcomes in
    /// flight get until `deadline`; then the worker threads, the sweeper and the
    /// completion task are joined. Idempotent.
    pub async fn shutdown(&self, deadline: Instant) {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::SeqCst);
        inner.stopped.store(true, Ordering::SeqCst);
        inner.queue.close();
        // What still runs now is left for later: abandoned, not failed or cancelled.
        let running: Vec<(JobId, Arc<Live>)> = inner
            .live
            .lock()
            .iter()
            .map(|(id, l)| (*id, l.clone()))
            .collect();
        let mut handed_back = 0usize;
        for (id, live) in running {
            if live.finalized.swap(true, Ordering::SeqCst) {
                continue; // its outcome is on its way; the completion task sees it through
            }
            live.ctx.cancel();
            let attempt = live.attempt.load(Ordering::SeqCst);
            if attempt > 0 {
                if let Err(e) = inner.queue.release(id, attempt).await {
                    tracing::warn!(job = %id, error = %e, "could not hand a running job back");
                }
                handed_back += 1;
            }
            release(inner, id, &live);
        }
        if handed_back > 0 {
            tracing::warn!(
                jobs = handed_back,
                "jobs still running at shutdown were handed back unfinished"
            );
        }
        // Outcomes already on their way: give them until the deadline.
        let _ = tokio::time::timeout_at(deadline.into(), async {
            while inner
                .live
                .lock()
                .values()
                .any(|l| l.outcome_pending.load(Ordering::SeqCst))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        inner.stop.cancel();
        inner.tasks.close();
        if tokio::time::timeout_at(deadline.into(), inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("the engine's tasks did not stop before the deadline");
        }
        // Workers stop at their next claim; one still inside a job that ignores its
        // cancel flag cannot be stopped and is left behind (the process exit ends it).
        let threads: Vec<JoinHandle<()>> = std::mem::take(&mut *inner.threads.lock());
        let grace = deadline.max(Instant::now() + Duration::from_secs(1));
        let mut stuck = 0;
        for t in threads {
            while !t.is_finished() && Instant::now() < grace {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 {
            tracing::warn!(
                workers = stuck,
                "worker threads still inside a job were left behind"
            );
        }
    }
}

fn process_totals(inner: &Inner) -> ClusterTotals {
    inner
        .registry
        .kinds()
        .map(|k| inner.metrics.kind_totals(k))
        .fold(ClusterTotals::default(), |a, b| ClusterTotals {
            submitted: a.submitted + b.submitted,
            done: a.done + b.done,
            failed: a.failed + b.failed,
            cancelled: a.cancelled + b.cancelled,
        })
}

/// Records this process's totals once a second, for the rate history.
async fn sample_totals(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inner.stop.cancelled() => return,
        }
        inner.history.record(TotalsSample {
            at_ms: now_ms(),
            totals: process_totals(&inner),
        });
    }
}

/// How often running jobs are looked at for timeouts.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// One task for all jobs held here, instead of a timer per job: fails jobs past their
/// timeout; renews the leases of jobs whose worker is alive; reclaims expired leases.
async fn sweep(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_every = inner.opts.lease.renew_every();
    let mut last_renew = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inner.stop.cancelled() => return,
        }
        let now = now_ms();
        let held: Vec<(JobId, Arc<Live>)> = inner
            .live
            .lock()
            .iter()
            .filter(|(_, l)| l.attempt.load(Ordering::SeqCst) > 0)
            .map(|(id, l)| (*id, l.clone()))
            .collect();
        if let Some(t) = inner.opts.job_timeout {
            for (id, live) in &held {
                let started = live.started_at.load(Ordering::SeqCst);
                if started == 0 || now - started < t.as_millis() as i64 {
                    continue;
                }
                live.ctx.cancel();
                if !live.finalized.swap(true, Ordering::SeqCst) {
                    let msg = format!("timed out after {} s", t.as_secs_f64());
                    inner.metrics.job_finished(&live.kind, "timeout", Some(t));
                    let attempt = live.attempt.load(Ordering::SeqCst);
                    let queue = inner.queue.clone();
                    let id = *id;
                    send_completion(
                        &inner,
                        Completion {
                            id,
                            attempt,
                            live: live.clone(),
                            state: None,
                            started_at: Some(started),
                            durable: Box::pin(async move {
                                queue
                                    .finish(Finish {
                                        id,
                                        attempt: Attempt::Of(attempt),
                                        outcome: Outcome::Failed(msg),
                                        started_at: Some(started),
                                        at: now,
                                    })
                                    .await
                            }),
                        },
                    );
                }
            }
        }
        if last_renew.elapsed() < renew_every {
            continue;
        }
        last_renew = Instant::now();
        renew_and_reclaim(&inner, &held, now).await;
    }
}

/// Renews the leases of jobs whose worker showed life within a lease period (or whose
/// outcome is on its way), stops the jobs whose lease is gone, and reclaims expired
/// leases (this process's or, on a shared queue, a dead replica's).
async fn renew_and_reclaim(inner: &Inner, held: &[(JobId, Arc<Live>)], now: i64) {
    let lease_ms = inner.opts.lease.lease.as_millis() as i64;
    let alive: Vec<&(JobId, Arc<Live>)> = held
        .iter()
        .filter(|(_, l)| {
            l.outcome_pending.load(Ordering::SeqCst)
                || (!l.finalized.load(Ordering::SeqCst)
                    && now - l.last_sign_of_life(now) < lease_ms)
        })
        .collect();
    if !alive.is_empty() {
        let keys: Vec<(JobId, u32)> = alive
            .iter()
            .map(|(id, l)| (*id, l.attempt.load(Ordering::SeqCst)))
            .collect();
        match inner.queue.renew(&keys, now).await {
            Ok(answers) => {
                for ((id, live), answer) in alive.iter().zip(answers) {
                    match answer {
                        Renewal::Held => {}
                        // An outcome on its way: the in-process queue let the lease go
                        // when it took the outcome; the store decides.
                        Renewal::Lost if live.outcome_pending.load(Ordering::SeqCst) => {}
                        Renewal::Lost => {
                            // Its outcome will be refused: no use going on.
                            live.ctx.cancel();
                            tracing::warn!(job = %id, attempt = live.attempt.load(Ordering::SeqCst), "lease lost; stopping this attempt");
                        }
                        Renewal::Cancelled => {
                            live.ctx.cancel();
                            live.finalized.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew leases"),
        }
    }
    match inner.queue.reclaim_expired(now).await {
        Ok(r) => {
            for (id, attempt) in r.requeued.iter().chain(r.dead.iter()) {
                tracing::warn!(job = %id, attempt, "lease expired; job reclaimed");
                // If that attempt runs here (stalled), stop it; its outcome will be refused.
                if let Some(live) = inner.live.lock().get(id) {
                    if live.attempt.load(Ordering::SeqCst) == *attempt {
                        live.ctx.cancel();
                    }
                }
            }
            inner.metrics.reclaims.inc_by(r.requeued.len() as u64);
            inner.metrics.dead_letters.inc_by(r.dead.len() as u64);
            for (id, attempts) in &r.dead {
                tracing::error!(job = %id, attempts, "job failed for good: {}", gave_up(*attempts));
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not reclaim expired leases"),
    }
}

fn spawn_worker(inner: Arc<Inner>, n: usize) {
    let builder = std::thread::Builder::new().name(format!("tally-worker-{n}"));
    let me = inner.clone();
    let spawned = builder.spawn(move || {
        me.metrics.workers.inc();
        worker_loop(&me, n);
        me.metrics.workers.dec();
    });
    match spawned {
        Ok(h) => {
            let mut threads = inner.threads.lock();
            threads.retain(|t| !t.is_finished());
            threads.push(h);
        }
        Err(e) => tracing::error!(error = %e, "could not start a worker thread"),
    }
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// The `Live` of a claimed attempt: the one made at admission for its first claim here,
/// else a fresh one (a recovered, reclaimed or retried job, or one admitted elsewhere).
fn adopt(inner: &Inner, lease: &Lease) -> Arc<Live> {
    let mut live = inner.live.lock();
    if let Some(l) = live.get(&lease.id) {
        if l.attempt
            .compare_exchange(0, lease.attempt, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // Tracked from its admission: this is its first claim.
            l.ctx.set_attempt(lease.attempt);
            return l.clone();
        }
        if l.attempt.load(Ordering::SeqCst) == lease.attempt {
            return l.clone();
        }
    }
    // An older attempt may still be here (its lease was lost): it keeps its own `Live`.
    let fresh = Live::new(lease.kind.clone(), lease.attempt);
    live.insert(lease.id, fresh.clone());
    fresh
}

fn worker_loop(inner: &Arc<Inner>, n: usize) {
    loop {
        let lease = match inner.queue.claim(CLAIM_WAIT) {
            Ok(Some(lease)) => lease,
            Ok(None) => continue,
            Err(_closed) => return,
        };
        let live = adopt(inner, &lease);
        let Lease {
            id,
            attempt,
            retry_base,
            kind,
            params,
        } = lease;
        if live.finalized.load(Ordering::SeqCst) {
            // Cancelled (or never acknowledged) before it started.
            release(inner, id, &live);
            continue;
        }
        if inner.stopped.load(Ordering::SeqCst) {
            // Past the drain deadline: hand it back for the next start.
            live.finalized.store(true, Ordering::SeqCst);
            let queue = inner.queue.clone();
            let (done, done_rx) = tokio::sync::oneshot::channel();
            let handed = inner.tasks.spawn(async move {
                let _ = queue.release(id, attempt).await;
                let _ = done.send(());
            });
            drop(handed);
            let _ = done_rx.blocking_recv();
            release(inner, id, &live);
            continue;
        }
        live.started_at.store(now_ms(), Ordering::SeqCst);
        let end = |outcome, label, took| complete(inner, id, attempt, &live, outcome, label, took);
        // A job that took the process down with it every time (crash loop): its starts
        // were counted, and it stops here.
        if attempt - retry_base > inner.opts.lease.max_attempts {
            let msg = gave_up(attempt - 1 - retry_base);
            inner.metrics.dead_letters.inc();
            end(Outcome::Failed(msg), "failed", None);
            continue;
        }
        let Some(handler) = inner.registry.get(&kind).cloned() else {
            // Only possible for a job queued by a process with other kinds.
            let msg = format!("unknown job kind '{kind}'");
            end(Outcome::Failed(msg), "failed", None);
            continue;
        };
        inner.metrics.busy_workers.inc();
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| handler.run_json(&params, &live.ctx)));
        let took = started.elapsed();
        inner.metrics.busy_workers.dec();
        match result {
            Ok(Ok(value)) => end(Outcome::Done(value), "done", Some(took)),
            Ok(Err(JobError::Failed(msg))) => end(Outcome::Failed(msg), "failed", Some(took)),
            Ok(Err(JobError::Cancelled)) => end(
                Outcome::Cancelled("cancelled".into()),
                "cancelled",
                Some(took),
            ),
            Err(payload) => {
                let msg = format!("worker panicked: {}", panic_message(payload.as_ref()));
                tracing::error!(job = %id, kind = %live.kind, worker = n, "{msg}; replacing the worker");
                end(Outcome::Failed(msg), "panic", Some(took));
                inner.metrics.worker_restarts.inc();
                // This thread's state is suspect after a panic: a fresh one takes its place.
                if !inner.stop.is_cancelled() {
                    spawn_worker(inner.clone(), n);
                }
                return;
            }
        }
    }
}

/// Hands the outcome to the queue unless a cancel, timeout or shutdown decided the
/// job's end already, then lets the job go once it is durable. The worker does not wait
/// for the store: the completion task sees the write through.
fn complete(
    inner: &Arc<Inner>,
    id: JobId,
    attempt: u32,
    live: &Arc<Live>,
    outcome: Outcome,
    label: &str,
    took: Option<Duration>,
) {
    if live.finalized.swap(true, Ordering::SeqCst) {
        // A cancel, timeout or shutdown recorded (or left) the final state already.
        release(inner, id, live);
        return;
    }
    inner.metrics.job_finished(&live.kind, label, took);
    // Kept only where this process sees every change to the job: on a shared queue a
    // retry through another replica can run it again, and the cache would answer this
    // run's outcome after the store holds a newer one.
    let state =
        (!inner.store.cheap_reads() && inner.queue.is_local()).then(|| JobState::from(&outcome));
    let started = Some(live.started_at.load(Ordering::SeqCst)).filter(|t| *t > 0);
    live.outcome_pending.store(true, Ordering::SeqCst);
    // Straight to the queue from this thread: no hop through a task before the write is
    // queued, so it often lands in the same group commit as the job's insert.
    let durable = inner.queue.finish(Finish {
        id,
        attempt: Attempt::Of(attempt),
        outcome,
        started_at: started,
        at: now_ms(),
    });
    send_completion(
        inner,
        Completion {
            id,
            attempt,
            live: live.clone(),
            state,
            started_at: started,
            durable,
        },
    );
}

fn send_completion(inner: &Inner, c: Completion) {
    c.live.outcome_pending.store(true, Ordering::SeqCst);
    if let Err(lost) = inner.completions.send(c) {
        // Only when the completion task is gone (after shutdown): the job stays
        // unfinished in the store (unless the write lands) and runs again later.
        let c = lost.0;
        c.live.outcome_pending.store(false, Ordering::SeqCst);
        release(inner, c.id, &c.live);
    }
}

/// What became of one outcome write.
enum Settled {
    /// Durable (or refused, or moot): let the job go.
    Done(Completion, Finished),
    /// Not written: try again after `wait`, with the outcome handed back.
    Retry(Completion, Outcome, Duration),
    /// The store is closed or the outcome is lost: give up on it here.
    Abandon(Completion, String),
}

/// Waits for one outcome write and decides what comes next.
async fn settle(mut c: Completion, wait_before_retry: Duration) -> Settled {
    let durable = std::mem::replace(&mut c.durable, Box::pin(std::future::pending()));
    match durable.await {
        Ok(f) => Settled::Done(c, f),
        Err(FinishFailed {
            error,
            outcome: Some(outcome),
        }) if error.is_transient() => Settled::Retry(c, outcome, wait_before_retry),
        Err(FinishFailed {
            error:
                error @ (StoreError::Rejected { .. }
                | StoreError::Corrupt { .. }
                | StoreError::Failed { .. }),
            outcome: Some(_),
        }) => {
            // This outcome itself cannot be stored (too large, say): record that instead.
            let msg = format!("the job's outcome could not be stored: {error}");
            Settled::Retry(c, Outcome::Failed(msg), wait_before_retry)
        }
        Err(FinishFailed { error, .. }) => Settled::Abandon(c, error.to_string()),
    }
}

/// One task sees every outcome through: once the queue says it is durable (or
/// refused), it removes the job from `live` ("in flight here" means "final state not yet
/// durable"); an outcome the store could not take is tried again, with a growing pause,
/// until it is written or the engine stops. One task instead of one per job: under load
/// a single wake-up carries a whole group commit's worth of completions.
async fn record_completions(
    inner: Arc<Inner>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Completion>,
) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    // First writes (the hot path, unboxed) and retries (rare, boxed) apart.
    let mut pending = FuturesUnordered::new();
    let mut retrying: Retrying = FuturesUnordered::new();
    let mut batch = Vec::with_capacity(256);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    break;
                }
                for c in batch.drain(..) {
                    pending.push(settle(c, RETRY_FIRST));
                }
            }
            Some(settled) = pending.next(), if !pending.is_empty() => {
                on_settled(&inner, settled, &mut retrying);
            }
            Some(settled) = retrying.next(), if !retrying.is_empty() => {
                on_settled(&inner, settled, &mut retrying);
            }
            _ = inner.stop.cancelled() => break,
        }
    }
    // Stopping: outcomes being written are seen through for a moment; retries are not
    // (their jobs stay unfinished in the store and run again).
    drop(retrying);
    let mut ignored: Retrying = FuturesUnordered::new();
    while let Ok(Some(settled)) =
        tokio::time::timeout(Duration::from_millis(100), pending.next()).await
    {
        on_settled(&inner, settled, &mut ignored);
    }
    for (_, live) in inner.live.lock().drain() {
        live.gone.notify_waiters();
    }
    inner.idle.notify_waiters();
}

type Retrying = futures_util::stream::FuturesUnordered<
    std::pin::Pin<Box<dyn std::future::Future<Output = Settled> + Send>>,
>;

fn on_settled(inner: &Arc<Inner>, settled: Settled, retrying: &mut Retrying) {
    match settled {
        Settled::Done(c, answer) => {
            match answer {
                Finished::Recorded => {
                    if let Some(state) = c.state {
                        inner.recent.lock().insert(c.id, state);
                    }
                }
                Finished::Stale => {
                    inner.metrics.fenced.inc();
                    tracing::warn!(
                        job = %c.id,
                        attempt = c.attempt,
                        "refused the outcome of a stale attempt: a newer attempt holds the job"
                    );
                }
                Finished::AlreadyFinished | Finished::Unknown => {}
            }
            c.live.outcome_pending.store(false, Ordering::SeqCst);
            release(inner, c.id, &c.live);
        }
        Settled::Retry(mut c, outcome, wait) => {
            inner.metrics.outcome_retries.inc();
            tracing::warn!(
                job = %c.id,
                retry_in_ms = wait.as_millis() as u64,
                "the store could not take a job's outcome; it stays in flight and is retried"
            );
            let queue = inner.queue.clone();
            let next = (wait * 2).min(RETRY_MAX);
            retrying.push(Box::pin(async move {
                tokio::time::sleep(wait).await;
                let (id, attempt, started) = (c.id, c.attempt, c.started_at);
                c.durable = Box::pin(async move {
                    queue
                        .finish(Finish {
                            id,
                            attempt: Attempt::Of(attempt),
                            outcome,
                            started_at: started,
                            at: now_ms(),
                        })
                        .await
                });
                settle(c, next).await
            }));
        }
        Settled::Abandon(c, why) => {
            tracing::error!(
                job = %c.id,
                cause = %why,
                "could not record a job's outcome; it stays unfinished in the store and runs again"
            );
            c.live.outcome_pending.store(false, Ordering::SeqCst);
            release(inner, c.id, &c.live);
        }
    }
}

/// Lets a job go: it leaves `live` (if this attempt is still the one there) and its
/// waiters are woken.
fn release(inner: &Inner, id: JobId, live: &Arc<Live>) {
    {
        let mut map = inner.live.lock();
        if map.get(&id).is_some_and(|l| Arc::ptr_eq(l, live)) {
            map.remove(&id);
        }
    }
    live.gone.notify_waiters();
    inner.idle.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(bytes: usize) -> JobState {
        JobState {
            status: JobStatus::Done,
            result: Some("x".repeat(bytes)),
            error: None,
        }
    }

    #[test]
    fn recent_states_are_read_once_and_bounded_in_count_and_bytes() {
        let mut r = Recent::default();
        r.insert(JobId(1), done(10));
        assert_eq!(
            r.take(JobId(1)).and_then(|s| s.result).map(|s| s.len()),
            Some(10)
        );
        assert!(
            r.take(JobId(1)).is_none(),
            "answered once, then from the store"
        );
        assert_eq!(r.bytes, 0);

        for i in 0..(RECENT_MAX_JOBS as u64 + 10) {
            r.insert(JobId(100 + i), done(1));
        }
        assert_eq!(r.states.len(), RECENT_MAX_JOBS);
        assert!(r.take(JobId(100)).is_none(), "the oldest were pushed out");
        assert!(r.take(JobId(100 + RECENT_MAX_JOBS as u64 + 9)).is_some());

        let mut r = Recent::default();
        let big = RECENT_MAX_BYTES / 4;
        for i in 0..8 {
            r.insert(JobId(i), done(big));
        }
        assert!(r.bytes <= RECENT_MAX_BYTES, "{} bytes kept", r.bytes);
        assert!(r.take(JobId(7)).is_some());
        assert!(r.take(JobId(0)).is_none());
        r.insert(JobId(99), done(RECENT_MAX_BYTES));
        assert!(
            r.take(JobId(99)).is_none(),
            "a huge result is left to the store"
        );
    }
}
