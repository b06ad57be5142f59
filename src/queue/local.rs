//! The in-process queue (with the SQLite and memory stores): jobs wait in a channel that
//! worker threads take from directly, and leases live in a map beside it. The store
//! keeps every record and attempt durable; the channel and the leases are rebuilt from
//! it at the next start (`recover`), so nothing is lost with the process.
//!
//! Why a crossbeam channel: a worker blocked in `recv` is woken without a trip through
//! the async runtime, and it spins briefly before parking. A condvar queue was measured
//! worse (each wake-up preempted an I/O thread: 79% -> 63% of the no-op ceiling).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    gave_up, Admitted, Closed, JobQueue, Lease, LeaseOptions, PushError, Pushed, Reclaimed, Renewal,
};
use crate::model::{JobId, NewJob, Outcome};
use crate::store::{
    Attempt, Finish, FinishPending, Finished, Requeued, Store, StoreError, Submitted,
};

/// A job in the channel.
enum Item {
    Job(Waiting),
    /// Wakes a blocked claim at shutdown.
    Wake,
}

struct Waiting {
    id: JobId,
    kind: String,
    params: Value,
    /// Attempts already used (the claim is the next one).
    attempts: u32,
    /// Attempts used before its last retry.
    retry_base: u32,
    /// The queue slot, given back when a worker takes the job. Recovered and reclaimed
    /// jobs take one when one is free.
    _slot: Option<OwnedSemaphorePermit>,
}

struct Held {
    attempt: u32,
    retry_base: u32,
    expires: Instant,
}

pub struct LocalQueue {
    store: Arc<dyn Store>,
    opts: LeaseOptions,
    capacity: usize,
    /// Worker threads of this process (for the replicas listing).
    workers: usize,
    tx: crossbeam_channel::Sender<Item>,
    rx: crossbeam_channel::Receiver<Item>,
    slots: Arc<Semaphore>,
    /// Claimed jobs by id: the attempt that holds each, and until when.
    leases: Mutex<HashMap<JobId, Held>>,
    /// Cancelled while waiting in the channel: skipped when claimed.
    cancelled: Mutex<HashSet<JobId>>,
    closed: AtomicBool,
    /// Claims blocked in the channel, to wake at `close`.
    sleepers: AtomicUsize,
    /// The recovery task (it waits for queue slots); stopped by `close`.
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl LocalQueue {
    pub fn new(store: Arc<dyn Store>, capacity: usize, workers: usize, opts: LeaseOptions) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        LocalQueue {
            store,
            opts,
            capacity,
            workers,
            tx,
            rx,
            slots: Arc::new(Semaphore::new(capacity)),
            leases: Mutex::new(HashMap::new()),
            cancelled: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    fn enqueue(&self, w: Waiting) {
        // The receiver lives as long as `self`: sending cannot fail.
        let _ = self.tx.send(Item::Job(w));
    }

    /// Waits for the recovery task after `close` (part of the engine's shutdown).
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Checks `attempt` against the lease it claims to hold: true when it may finish the
    /// job (and the lease is let go), false when a newer attempt holds it.
    fn take_lease(&self, id: JobId, attempt: u32) -> bool {
        let mut leases = self.leases.lock();
        match leases.get(&id) {
            Some(h) if h.attempt == attempt => {
                leases.remove(&id);
                true
            }
            Some(_) => false,
            // No lease here: finished already, reclaimed (the store refuses an attempt
            // whose job waits for its next claim), or the outcome's write is retried: the
            // store decides.
            None => true,
        }
    }
}

#[async_trait]
impl JobQueue for LocalQueue {
    async fn push(
        &self,
        job: &NewJob,
        now_ms: i64,
        admitted: Admitted<'_>,
    ) -> Result<Pushed, PushError> {
        // A full queue refuses every submission, replays included (as on Redis): the
        // client retries later and then gets its first job.
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Err(PushError::Full {
                capacity: self.capacity,
            });
        };
        // The job is queued while its record is being committed (the work overlaps the
        // commit, and its outcome often lands in the same group commit); the caller
        // hands out the id only once the record is durable. A replay gives its slot back.
        let (submitted, durable) = self.store.submit_begin(job, now_ms).await?;
        let Submitted::New(id) = submitted else {
            return Ok(Pushed { submitted, durable });
        };
        admitted(id, true);
        self.enqueue(Waiting {
            id,
            kind: job.kind.clone(),
            params: job.params.clone(),
            attempts: 0,
            retry_base: 0,
            _slot: Some(slot),
        });
        Ok(Pushed { submitted, durable })
    }

    fn claim(&self, wait: Duration) -> Result<Option<Lease>, Closed> {
        let deadline = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(Closed);
            }
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            let got = self.rx.recv_deadline(deadline);
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            let w = match got {
                Ok(Item::Job(w)) => w,
                Ok(Item::Wake) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Ok(None),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(Closed),
            };
            if self.cancelled.lock().remove(&w.id) {
                continue;
            }
            let attempt = w.attempts.saturating_add(1);
            self.leases.lock().insert(
                w.id,
                Held {
                    attempt,
                    retry_base: w.retry_base,
                    expires: Instant::now() + self.opts.lease,
                },
            );
            // Recorded now, not when it ends: a job that takes the process down with it
            // counts its attempts across restarts, and stops after `--max-attempts`.
            if let Err(e) = self.store.start(w.id, attempt, crate::now_ms()) {
                tracing::warn!(job = %w.id, error = %e, "could not record the start of a job");
            }
            return Ok(Some(Lease {
                id: w.id,
                attempt,
                retry_base: w.retry_base,
                kind: w.kind,
                params: w.params,
            }));
        }
    }

    async fn renew(&self, held: &[(JobId, u32)], _now_ms: i64) -> Result<Vec<Renewal>, StoreError> {
        let until = Instant::now() + self.opts.lease;
        let mut leases = self.leases.lock();
        Ok(held
            .iter()
            .map(|(id, attempt)| match leases.get_mut(id) {
                Some(h) if h.attempt == *attempt => {
                    h.expires = until;
                    Renewal::Held
                }
                _ => Renewal::Lost,
            })
            .collect())
    }

    fn finish(&self, f: Finish) -> FinishPending {
        if let Attempt::Of(attempt) = f.attempt {
            if !self.take_lease(f.id, attempt) {
                return Box::pin(std::future::ready(Ok(Finished::Stale)));
            }
        }
        self.store.finish(f)
    }

    async fn release(&self, id: JobId, attempt: u32) -> Result<(), StoreError> {
        if self.take_lease(id, attempt) {
            // The channel is gone with the process: the store keeps it queued for the
            // next start.
            self.store.release(id, attempt, false).await?;
        }
        Ok(())
    }

    async fn reclaim_expired(&self, now_ms: i64) -> Result<Reclaimed, StoreError> {
        let now = Instant::now();
        let expired: Vec<(JobId, u32, u32)> = {
            let mut leases = self.leases.lock();
            let ids: Vec<(JobId, u32, u32)> = leases
                .iter()
                .filter(|(_, h)| h.expires <= now)
                .map(|(id, h)| (*id, h.attempt, h.retry_base))
                .collect();
            for (id, _, _) in &ids {
                leases.remove(id);
            }
            ids
        };
        let mut out = Reclaimed::default();
        for (id, attempt, retry_base) in expired {
            if attempt - retry_base >= self.opts.max_attempts {
                let answer = self
                    .store
                    .finish(Finish {
                        id,
                        attempt: Attempt::Of(attempt),
                        outcome: Outcome::Failed(gave_up(attempt - retry_base)),
                        started_at: None,
                        at: now_ms,
                    })
                    .await
                    .map_err(|f| f.error)?;
                if answer == Finished::Recorded {
                    out.dead.push((id, attempt));
                }
                continue;
            }
            // Rare: read the job back rather than keep every job's params in the map.
            let Some(rec) = self.store.get(id).await? else {
                continue;
            };
            if rec.status.is_finished() {
                continue;
            }
            // Queued again in the store too, the attempt still counted: from then on the
            // store refuses that attempt's late outcome. Should that write fail, the job
            // still runs again here (its next claim fences the old attempt).
            if let Err(e) = self.store.release(id, attempt, true).await {
                tracing::warn!(job = %id, error = %e, "could not record a reclaimed job as queued");
            }
            self.enqueue(Waiting {
                id,
                kind: rec.kind,
                params: rec.params,
                attempts: attempt,
                retry_base,
                _slot: self.slots.clone().try_acquire_owned().ok(),
            });
            out.requeued.push((id, attempt));
        }
        Ok(out)
    }

    async fn cancel(&self, id: JobId, now_ms: i64) -> Result<Finished, StoreError> {
        let answer = self
            .store
            .finish(Finish {
                id,
                attempt: Attempt::Any,
                outcome: Outcome::Cancelled("cancelled by request".into()),
                started_at: None,
                at: now_ms,
            })
            .await
            .map_err(|f| f.error)?;
        if answer == Finished::Recorded {
            let leased = self.leases.lock().remove(&id).is_some();
            if !leased {
                // Waiting in the channel (or about to be recovered): skip it there.
                self.cancelled.lock().insert(id);
            }
        }
        Ok(answer)
    }

    async fn retry(
        &self,
        id: JobId,
        now_ms: i64,
        admitted: Admitted<'_>,
    ) -> Result<Requeued, PushError> {
        let answer = self.store.requeue(id, now_ms).await?;
        if let Requeued::Yes(rec) = &answer {
            self.cancelled.lock().remove(&id);
            admitted(id, true);
            self.enqueue(Waiting {
                id,
                kind: rec.kind.clone(),
                params: rec.params.clone(),
                attempts: rec.attempts,
                retry_base: rec.retry_base,
                _slot: self.slots.clone().try_acquire_owned().ok(),
            });
        }
        Ok(answer)
    }

    async fn recover(&self) -> Result<usize, StoreError> {
        let jobs = self.store.recover_unfinished().await?;
        let n = jobs.len();
        if n == 0 {
            return Ok(0);
        }
        tracing::info!(
            jobs = n,
            "resuming jobs left unfinished by the previous run"
        );
        // Recovered jobs take queue slots as they free up, so a backlog after a restart
        // cannot overflow the queue; `close` stops the wait.
        let (slots, stop, tx) = (self.slots.clone(), self.stop.clone(), self.tx.clone());
        self.tasks.spawn(async move {
            for rec in jobs {
                let slot = tokio::select! {
                    s = slots.clone().acquire_owned() => match s {
                        Ok(s) => s,
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                };
                let _ = tx.send(Item::Job(Waiting {
                    id: rec.id,
                    kind: rec.kind,
                    params: rec.params,
                    attempts: rec.attempts,
                    retry_base: rec.retry_base,
                    _slot: Some(slot),
                }));
            }
        });
        Ok(n)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stop.cancel();
        // Wake every blocked claim (one extra in case one is just going to sleep).
        for _ in 0..=self.sleepers.load(Ordering::SeqCst) {
            let _ = self.tx.send(Item::Wake);
        }
    }

    fn waiting(&self) -> usize {
        self.rx.len()
    }

    async fn replicas(&self) -> Result<Vec<super::Replica>, StoreError> {
        Ok(vec![super::Replica {
            name: "local".into(),
            host: super::hostname(),
            pid: std::process::id(),
            workers: self.workers as u32,
            busy: self.leases.lock().len() as u32,
            last_seen_ms: crate::now_ms(),
            this: true,
        }])
    }

    async fn stats(&self) -> Result<super::QueueStats, StoreError> {
        Ok(super::QueueStats {
            waiting: self.rx.len() as u64,
            leased: self.leases.lock().len() as u64,
        })
    }

    fn is_local(&self) -> bool {
        true
    }
}
