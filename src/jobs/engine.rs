//! The engine: admits jobs into a bounded queue, runs them on a pool of worker threads,
//! and records every transition in the store.
//!
//! - Admission never blocks: a queue slot is a semaphore permit taken with `try_acquire`;
//!   no permit means "queue full" (503 + Retry-After at the edge).
//! - Workers are OS threads, so CPU work never runs on the async I/O threads.
//! - A job that panics takes its worker thread down with it; the job is failed with the
//!   panic message and a fresh thread replaces the old one at once (counted in metrics).
//! - Cancel and timeout set the job's flag (cooperative stop) and record the final state
//!   at once; whichever of finish/cancel/timeout comes first wins, exactly once.
//! - Drain: intake stops, queued and running work finishes until a deadline, and what is
//!   left stays in the store as queued/running, to be run again at the next start.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::model::{JobCounts, JobId, JobRecord, JobState, JobStatus, NewJob, Outcome};
use super::{EngineOptions, JobContext, JobError, Registry};
use crate::metrics::{KindLabels, Metrics};
use crate::now_ms;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("unknown job kind '{0}'")]
    UnknownKind(String),
    #[error("invalid params for {kind}: {reason}")]
    InvalidParams { kind: String, reason: String },
    #[error("the queue is full ({capacity} jobs waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the service is shutting down and takes no new jobs")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// A job this process has admitted and not yet let go of.
struct Live {
    kind: String,
    ctx: JobContext,
    /// Set by whoever records the final state first (worker, cancel or timeout).
    finalized: AtomicBool,
    /// Woken when the job leaves `live`, i.e. once its final state is durable.
    gone: Notify,
    /// When a worker started it (ms since epoch; 0 = not started).
    started_at: AtomicI64,
    /// The "running" state has been written to the store. Short jobs never need it:
    /// their start time travels with their outcome, saving a write per job.
    running_recorded: AtomicBool,
}

struct Queued {
    id: JobId,
    params: Value,
    live: Arc<Live>,
    /// The queue slot, given back when a worker takes the job. Recovered jobs hold one
    /// too, so a backlog after a restart cannot overflow the queue.
    _slot: OwnedSemaphorePermit,
}

struct Inner {
    store: Arc<dyn Store>,
    registry: Registry,
    metrics: Arc<Metrics>,
    opts: EngineOptions,
    tx: crossbeam_channel::Sender<Queued>,
    rx: crossbeam_channel::Receiver<Queued>,
    slots: Arc<Semaphore>,
    live: Mutex<HashMap<JobId, Arc<Live>>>,
    /// No new jobs are admitted.
    draining: AtomicBool,
    /// The drain deadline passed: workers leave what is still queued in the store.
    stopped: AtomicBool,
    /// Woken whenever a job leaves `live`, so a drain can wait without polling.
    idle: Notify,
    /// Finished jobs on their way to the store, for the one completion task.
    completions: tokio::sync::mpsc::UnboundedSender<Completion>,
    recent: Mutex<Recent>,
}

/// At most this many just-finished states wait for their first poll ([`Recent`])...
const RECENT_MAX_JOBS: usize = 4096;
/// ...holding at most this many bytes of results and errors.
const RECENT_MAX_BYTES: usize = 4 << 20;

/// Final states of jobs that just finished here, kept until their first read or until
/// pushed out by newer ones: the poll that follows a submit is answered without a store
/// read. An entry is added only once its state is durable, so a read never sees more
/// than the store holds; it is bounded in entries and bytes, so results still live in
/// the store, not in the heap.
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
        self.states.insert(id, state);
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
}

/// A job whose worker is done with it and whose outcome is on its way to the store; the
/// completion task waits until it is durable, then lets the job go.
struct Completion {
    id: JobId,
    live: Arc<Live>,
    /// The outcome as a poll will read it, for the recently-finished cache (none when
    /// the store's own reads are as cheap).
    state: Option<JobState>,
    durable: crate::store::Pending<bool>,
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the worker threads. Must be called from within a tokio runtime.
    pub fn start(
        store: Arc<dyn Store>,
        registry: Registry,
        metrics: Arc<Metrics>,
        opts: EngineOptions,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (completions, done_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            store,
            registry,
            metrics,
            slots: Arc::new(Semaphore::new(opts.queue_capacity)),
            opts,
            tx,
            rx,
            live: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            idle: Notify::new(),
            completions,
            recent: Mutex::new(Recent::default()),
        });
        for n in 0..inner.opts.workers {
            spawn_worker(inner.clone(), n);
        }
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        tokio::spawn(record_completions(inner.clone(), done_rx));
        Engine { inner }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn queue_capacity(&self) -> usize {
        self.inner.opts.queue_capacity
    }

    /// Admits a job: checks the kind (and params when `validate`), takes a queue slot,
    /// makes the record durable, then queues it. The id is valid when this returns.
    pub async fn submit(&self, job: NewJob, validate: bool) -> Result<JobId, SubmitError> {
        let inner = &self.inner;
        if inner.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let handler = inner
            .registry
            .get(&job.kind)
            .ok_or_else(|| SubmitError::UnknownKind(job.kind.clone()))?;
        if validate {
            handler
                .validate(&job.params)
                .map_err(|reason| SubmitError::InvalidParams {
                    kind: job.kind.clone(),
                    reason,
                })?;
        }
        let Ok(slot) = inner.slots.clone().try_acquire_owned() else {
            inner.metrics.queue_rejections.inc();
            return Err(SubmitError::QueueFull {
                capacity: inner.opts.queue_capacity,
            });
        };
        // The job is queued while its record is being committed (the work overlaps the
        // commit, and its outcome often lands in the same group commit); the id is
        // returned only once the record is durable.
        let (id, durable) = inner.store.submit_begin(&job, now_ms()).await?;
        let NewJob { kind, params } = job;
        let live = self.enqueue(id, kind.clone(), params, slot);
        if let Err(e) = durable.await {
            // Never acknowledged: stop the job; its outcome cannot be recorded anyway.
            live.ctx.cancel();
            live.finalized.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        inner
            .metrics
            .jobs_submitted
            .get_or_create(&KindLabels { kind })
            .inc();
        Ok(id)
    }

    fn enqueue(
        &self,
        id: JobId,
        kind: String,
        params: Value,
        slot: OwnedSemaphorePermit,
    ) -> Arc<Live> {
        let live = Arc::new(Live {
            kind,
            ctx: JobContext::default(),
            finalized: AtomicBool::new(false),
            gone: Notify::new(),
            started_at: AtomicI64::new(0),
            running_recorded: AtomicBool::new(false),
        });
        self.inner.live.lock().insert(id, live.clone());
        self.inner.metrics.queue_depth.inc();
        // The receiver lives as long as `inner`, so sending cannot fail while we hold it.
        let _ = self.inner.tx.send(Queued {
            id,
            params,
            live: live.clone(),
            _slot: slot,
        });
        live
    }

    /// Queues again the jobs an earlier process left unfinished. Runs in the background,
    /// taking queue slots as they free up; returns how many were found.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let jobs: Vec<JobRecord> = self.inner.store.recover_unfinished().await?;
        let n = jobs.len();
        if n > 0 {
            tracing::info!(
                jobs = n,
                "resuming jobs left unfinished by the previous run"
            );
            let me = self.clone();
            tokio::spawn(async move {
                for job in jobs {
                    let Ok(slot) = me.inner.slots.clone().acquire_owned().await else {
                        return;
                    };
                    if me.inner.stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    me.enqueue(job.id, job.kind, job.params, slot);
                }
            });
        }
        Ok(n)
    }

    /// Cancels a queued or running job. A running job stops at its next checkpoint; its
    /// state is `cancelled` from now on either way.
    pub async fn cancel(&self, id: JobId) -> Result<(), CancelError> {
        let live = self.inner.live.lock().get(&id).cloned();
        // A job already finalized (cancelled, timed out) but whose worker has not yet
        // noticed is answered from the store below, like any finished job.
        if let Some(live) = live.filter(|l| !l.finalized.load(Ordering::SeqCst)) {
            live.ctx.cancel();
            if !live.finalized.swap(true, Ordering::SeqCst) {
                self.inner
                    .store
                    .finish(
                        id,
                        Outcome::Cancelled("cancelled by request".into()),
                        Some(live.started_at.load(Ordering::SeqCst)).filter(|t| *t > 0),
                        now_ms(),
                    )
                    .await?;
                self.inner
                    .metrics
                    .job_finished(&live.kind, "cancelled", None);
            }
            return Ok(());
        }
        match self.inner.store.get(id).await? {
            None => Err(CancelError::NotFound(id)),
            Some(r) if r.status.is_finished() => Err(CancelError::AlreadyFinished {
                id,
                status: r.status,
            }),
            Some(r) => {
                // Known to the store but not to this process (not yet recovered).
                if self
                    .inner
                    .store
                    .finish(
                        id,
                        Outcome::Cancelled("cancelled by request".into()),
                        None,
                        now_ms(),
                    )
                    .await?
                {
                    self.inner.metrics.job_finished(&r.kind, "cancelled", None);
                }
                Ok(())
            }
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
    /// once when this process does not hold the job. This lets a poll answer "done" the moment it
    /// is true instead of "running" now and a new poll later (long polling).
    pub async fn wait_finished(&self, id: JobId, hold: Duration) {
        let Some(live) = self.inner.live.lock().get(&id).cloned() else {
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

    /// When a job running in this process started, if it has (the store may not know
    /// yet: short jobs record their start with their outcome).
    pub fn started_at(&self, id: JobId) -> Option<i64> {
        self.inner
            .live
            .lock()
            .get(&id)
            .map(|l| l.started_at.load(Ordering::SeqCst))
            .filter(|t| *t > 0)
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

    /// Jobs admitted by this process and not yet finished.
    pub fn live_jobs(&self) -> usize {
        self.inner.live.lock().len()
    }

    /// Stops intake. Idempotent.
    pub fn begin_drain(&self) {
        if !self.inner.draining.swap(true, Ordering::SeqCst) {
            tracing::info!(live = self.live_jobs(), "draining: no new jobs accepted");
        }
    }

    /// Waits until every admitted job has finished, or the deadline. Returns true when
    /// everything finished. After a timeout the workers stop picking up queued jobs, which
    /// stay queued in the store for the next start.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.live.lock().is_empty() {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {
                    self.inner.stopped.store(true, Ordering::SeqCst);
                    return self.inner.live.lock().is_empty();
                }
                // A safety net in case a wake-up raced with the check above.
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

/// How often running jobs are looked at for timeouts and for recording their start.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// One task for all running jobs, instead of a timer per job: records "running" in the
/// store for jobs that run longer than one sweep, and fails jobs past their timeout.
/// Ends when the engine is dropped.
async fn sweep(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = now_ms();
        let running: Vec<(JobId, Arc<Live>)> = inner
            .live
            .lock()
            .iter()
            .filter(|(_, l)| {
                l.started_at.load(Ordering::SeqCst) > 0 && !l.finalized.load(Ordering::SeqCst)
            })
            .map(|(id, l)| (*id, l.clone()))
            .collect();
        for (id, live) in running {
            let started = live.started_at.load(Ordering::SeqCst);
            if let Some(t) = inner.opts.job_timeout {
                if now - started >= t.as_millis() as i64 {
                    live.ctx.cancel();
                    if !live.finalized.swap(true, Ordering::SeqCst) {
                        let msg = format!("timed out after {} s", t.as_secs_f64());
                        if let Err(e) = inner
                            .store
                            .finish(id, Outcome::Failed(msg), Some(started), now)
                            .await
                        {
                            tracing::warn!(job = %id, error = %e, "could not record timeout");
                        }
                        inner.metrics.job_finished(&live.kind, "timeout", Some(t));
                    }
                    continue;
                }
            }
            if now - started >= SWEEP_EVERY.as_millis() as i64
                && !live.running_recorded.swap(true, Ordering::SeqCst)
            {
                if let Err(e) = inner.store.mark_running(id, started).await {
                    tracing::warn!(job = %id, error = %e, "could not record job start");
                }
            }
        }
    }
}

fn spawn_worker(inner: Arc<Inner>, n: usize) {
    let builder = std::thread::Builder::new().name(format!("tally-worker-{n}"));
    let spawned = builder.spawn(move || {
        inner.metrics.workers.inc();
        worker_loop(&inner, n);
        inner.metrics.workers.dec();
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start a worker thread");
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

fn worker_loop(inner: &Arc<Inner>, n: usize) {
    while let Ok(q) = inner.rx.recv() {
        let Queued {
            id,
            params,
            live,
            _slot,
        } = q;
        drop(_slot);
        inner.metrics.queue_depth.dec();
        if inner.stopped.load(Ordering::SeqCst) || live.finalized.load(Ordering::SeqCst) {
            // Cancelled while queued, or past the drain deadline (stays queued in store).
            release(inner, id, &live);
            continue;
        }
        let Some(handler) = inner.registry.get(&live.kind).cloned() else {
            // Only possible for a job recovered from a store written by another version.
            let msg = format!("unknown job kind '{}'", live.kind);
            complete(inner, id, &live, Outcome::Failed(msg), "failed", None);
            continue;
        };
        live.started_at.store(now_ms(), Ordering::SeqCst);
        inner.metrics.busy_workers.inc();
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| handler.run_json(&params, &live.ctx)));
        let took = started.elapsed();
        inner.metrics.busy_workers.dec();
        match result {
            Ok(Ok(value)) => complete(inner, id, &live, Outcome::Done(value), "done", Some(took)),
            Ok(Err(JobError::Failed(msg))) => {
                complete(inner, id, &live, Outcome::Failed(msg), "failed", Some(took))
            }
            Ok(Err(JobError::Cancelled)) => complete(
                inner,
                id,
                &live,
                Outcome::Cancelled("cancelled".into()),
                "cancelled",
                Some(took),
            ),
            Err(payload) => {
                let msg = format!("worker panicked: {}", panic_message(payload.as_ref()));
                tracing::error!(job = %id, kind = %live.kind, worker = n, "{msg}; replacing the worker");
                complete(inner, id, &live, Outcome::Failed(msg), "panic", Some(took));
                inner.metrics.worker_restarts.inc();
                // This thread's state is suspect after a panic: a fresh one takes its place.
                spawn_worker(inner.clone(), n);
                return;
            }
        }
    }
}

/// Records the final state unless a cancel or timeout already did, then lets the job go.
/// The worker does not wait for the store: it hands the outcome to the completion task
/// and takes the next job.
fn complete(
    inner: &Arc<Inner>,
    id: JobId,
    live: &Arc<Live>,
    outcome: Outcome,
    label: &str,
    took: Option<Duration>,
) {
    if live.finalized.swap(true, Ordering::SeqCst) {
        // A cancel or timeout recorded (and committed) the final state already.
        release(inner, id, live);
        return;
    }
    inner.metrics.job_finished(&live.kind, label, took);
    let state = (!inner.store.cheap_reads()).then(|| JobState::from(&outcome));
    let started = Some(live.started_at.load(Ordering::SeqCst)).filter(|t| *t > 0);
    // Straight to the store from this thread: no hop through a task before the write is
    // queued, so it often lands in the same group commit as the job's insert.
    let durable = inner.store.finish_begin(id, outcome, started, now_ms());
    let done = Completion {
        id,
        live: live.clone(),
        state,
        durable,
    };
    if let Err(lost) = inner.completions.send(done) {
        // Only when the runtime is gone (process exit): the job stays unfinished in the
        // store (unless the write above lands) and runs again at the next start.
        release(inner, lost.0.id, &lost.0.live);
    }
}

/// One task sees every outcome through: once the store says it is durable, it removes
/// the job from `live` ("in flight here" means "final state not yet durable"). One task
/// instead of one per job: under load a single wake-up carries a whole group commit's
/// worth of completions.
async fn record_completions(
    inner: Arc<Inner>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Completion>,
) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut pending = FuturesUnordered::new();
    let mut batch = Vec::with_capacity(256);
    let mut open = true;
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256), if open => {
                if n == 0 {
                    open = false;
                }
                for c in batch.drain(..) {
                    pending.push(async move {
                        let recorded = match c.durable.await {
                            Ok(changed) => c.state.filter(|_| changed),
                            Err(e) => {
                                tracing::error!(job = %c.id, error = %e, "could not record job outcome");
                                None
                            }
                        };
                        (c.id, c.live, recorded)
                    });
                }
            }
            Some((id, live, recorded)) = pending.next(), if !pending.is_empty() => {
                if let Some(state) = recorded {
                    inner.recent.lock().insert(id, state);
                }
                release(&inner, id, &live);
            }
            else => return,
        }
    }
}

fn release(inner: &Inner, id: JobId, live: &Live) {
    inner.live.lock().remove(&id);
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
