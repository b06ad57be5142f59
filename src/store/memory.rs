//! The memory store: a map behind a mutex, nothing on disk. Finished jobs are capped:
//! past `max_finished`, the oldest finished record is evicted (counted in `/metrics`).
//! Unfinished jobs are never evicted: the queue's own capacity bounds them.
//! Idempotency keys live their lifetime (`--idempotency-ttl`) and at most
//! [`MAX_KEYS`] of them are kept: expired keys are dropped at each keyed submission, and
//! past the cap the oldest key goes first (its lifetime cut short).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    fingerprint, finish_rule, key_hash, released_attempts, Attempt, Finish, FinishPending,
    Finished, Requeued, Store, StoreError, Submitted,
};
use crate::model::{JobCounts, JobId, JobRecord, JobStatus, ListFilter, NewJob, Outcome};

pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_finished: usize,
    evictions: AtomicU64,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Ordered by id so that listings are cheap and stable.
    jobs: BTreeMap<JobId, JobRecord>,
    /// Finished ids in the order they finished: the eviction order.
    finished: VecDeque<JobId>,
    counts: JobCounts,
    /// Idempotency keys by their hash: the job, its request's fingerprint, the expiry.
    keys: HashMap<[u8; 32], Keyed>,
    /// Keys in the order they were recorded, with their expiry: the eviction order.
    key_order: VecDeque<([u8; 32], i64)>,
}

struct Keyed {
    id: JobId,
    fingerprint: [u8; 32],
    expires_at: i64,
}

/// Most idempotency keys the memory store keeps (about 10 MB of them).
pub const MAX_KEYS: usize = 100_000;

impl Inner {
    /// Drops expired keys, and the oldest past [`MAX_KEYS`].
    fn evict_keys(&mut self, now_ms: i64) {
        while let Some(&(hash, expires_at)) = self.key_order.front() {
            if expires_at > now_ms && self.key_order.len() < MAX_KEYS {
                break;
            }
            self.key_order.pop_front();
            // A key used again after it expired has a newer entry: keep that one.
            if self
                .keys
                .get(&hash)
                .is_some_and(|k| k.expires_at == expires_at)
            {
                self.keys.remove(&hash);
            }
        }
    }
}

impl MemoryStore {
    pub fn new(max_finished: usize) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
            max_finished: max_finished.max(1),
            evictions: AtomicU64::new(0),
        }
    }

    fn apply_finish(&self, f: Finish) -> Finished {
        let Finish {
            id,
            attempt,
            outcome,
            started_at,
            at: now_ms,
        } = f;
        let mut g = self.inner.lock();
        let Some(rec) = g.jobs.get_mut(&id) else {
            return Finished::Unknown;
        };
        let before = rec.status;
        match finish_rule(before, rec.attempts, attempt) {
            Finished::Recorded => {}
            refused => return refused,
        }
        let after = outcome.status();
        rec.status = after;
        rec.finished_at = Some(now_ms);
        if rec.started_at.is_none() {
            rec.started_at = started_at;
        }
        if let Attempt::Of(a) = attempt {
            rec.attempts = rec.attempts.max(a);
        }
        match outcome {
            Outcome::Done(r) => rec.result = Some(r),
            Outcome::Failed(e) | Outcome::Cancelled(e) => rec.error = Some(e),
        }
        *g.counts.slot(before) -= 1;
        *g.counts.slot(after) += 1;
        g.finished.push_back(id);
        while g.finished.len() > self.max_finished {
            if let Some(old) = g.finished.pop_front() {
                // A requeued job may have left `finished` and come back: evict only what
                // is still finished.
                if g.jobs.get(&old).is_some_and(|r| r.status.is_finished()) {
                    if let Some(r) = g.jobs.remove(&old) {
                        *g.counts.slot(r.status) -= 1;
                    }
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Finished::Recorded
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn submit(&self, job: &NewJob, now_ms: i64) -> Result<Submitted, StoreError> {
        let mut g = self.inner.lock();
        let keyed = job.idempotency.as_ref().map(|k| {
            let ttl = i64::try_from(k.ttl_ms).unwrap_or(i64::MAX);
            (key_hash(&k.key), now_ms.saturating_add(ttl))
        });
        let fp = keyed.map(|_| fingerprint(job));
        if let (Some((hash, _)), Some(fp)) = (keyed, fp) {
            g.evict_keys(now_ms);
            if let Some(k) = g.keys.get(&hash).filter(|k| k.expires_at > now_ms) {
                return Ok(if k.fingerprint == fp {
                    Submitted::Replayed(k.id)
                } else {
                    Submitted::KeyReused(k.id)
                });
            }
        }
        let id = JobId(g.next_id);
        g.next_id += 1;
        g.jobs.insert(
            id,
            JobRecord {
                id,
                kind: job.kind.clone(),
                params: job.params.clone(),
                status: JobStatus::Queued,
                submitted_at: now_ms,
                started_at: None,
                finished_at: None,
                result: None,
                error: None,
                attempts: 0,
                retry_base: 0,
            },
        );
        g.counts.queued += 1;
        if let (Some((hash, expires_at)), Some(fingerprint)) = (keyed, fp) {
            g.keys.insert(
                hash,
                Keyed {
                    id,
                    fingerprint,
                    expires_at,
                },
            );
            g.key_order.push_back((hash, expires_at));
        }
        Ok(Submitted::New(id))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.inner.lock().jobs.get(&id).cloned())
    }

    fn start(&self, id: JobId, attempt: u32, now_ms: i64) -> Result<(), StoreError> {
        let mut g = self.inner.lock();
        let Some(rec) = g.jobs.get_mut(&id) else {
            return Ok(());
        };
        // A newer attempt takes over a job whose last attempt was reclaimed.
        if rec.status.is_finished() || attempt <= rec.attempts {
            return Ok(());
        }
        let before = rec.status;
        rec.status = JobStatus::Running;
        rec.started_at = Some(now_ms);
        rec.attempts = attempt;
        *g.counts.slot(before) -= 1;
        g.counts.running += 1;
        Ok(())
    }

    async fn release(&self, id: JobId, attempt: u32, spent: bool) -> Result<(), StoreError> {
        let mut g = self.inner.lock();
        let Some(rec) = g.jobs.get_mut(&id) else {
            return Ok(());
        };
        if rec.status == JobStatus::Running && rec.attempts == attempt {
            rec.status = JobStatus::Queued;
            rec.started_at = None;
            rec.attempts = released_attempts(attempt, spent);
            g.counts.running -= 1;
            g.counts.queued += 1;
        }
        Ok(())
    }

    fn finish(&self, f: Finish) -> FinishPending {
        Box::pin(std::future::ready(Ok(self.apply_finish(f))))
    }

    async fn requeue(&self, id: JobId, _now_ms: i64) -> Result<Requeued, StoreError> {
        let mut g = self.inner.lock();
        let Some(rec) = g.jobs.get_mut(&id) else {
            return Ok(Requeued::Unknown);
        };
        let before = rec.status;
        match before {
            JobStatus::Queued | JobStatus::Running => return Ok(Requeued::NotFinished(before)),
            JobStatus::Done => return Ok(Requeued::Done),
            JobStatus::Failed | JobStatus::Cancelled => {}
        }
        rec.requeue();
        let out = rec.clone();
        *g.counts.slot(before) -= 1;
        g.counts.queued += 1;
        // It stays in `finished` (eviction order); eviction skips unfinished records.
        Ok(Requeued::Yes(Box::new(out)))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError> {
        let g = self.inner.lock();
        let upper = filter.before.map(|b| b.0).unwrap_or(u64::MAX);
        Ok(g.jobs
            .range(..JobId(upper))
            .rev()
            .map(|(_, r)| r)
            .filter(|r| filter.status.is_none_or(|s| r.status == s))
            .filter(|r| filter.kind.as_deref().is_none_or(|k| r.kind == k))
            .take(filter.limit)
            .cloned()
            .collect())
    }

    async fn statuses(
        &self,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<(JobId, JobStatus)>, StoreError> {
        let from = JobId(after.map_or(0, |a| a.0.saturating_add(1)));
        Ok(self
            .inner
            .lock()
            .jobs
            .range(from..)
            .take(limit)
            .map(|(id, r)| (*id, r.status))
            .collect())
    }

    async fn counts(&self) -> Result<JobCounts, StoreError> {
        Ok(self.inner.lock().counts)
    }

    async fn recover_unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
        // A memory store starts empty: nothing survives the process, by design.
        Ok(Vec::new())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn cheap_reads(&self) -> bool {
        true
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    //! What only this store does: its cap. Everything every store must do is in the
    //! conformance suite (tests/store_conformance.rs).
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn oldest_finished_results_are_evicted_past_the_cap_but_never_unfinished_ones() {
        let s = MemoryStore::new(2);
        let job = NewJob::new("k", json!({}));
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(s.submit(&job, 0).await.unwrap().id());
        }
        for id in &ids[..3] {
            let f = s
                .finish(Finish {
                    id: *id,
                    attempt: Attempt::Of(1),
                    outcome: Outcome::Done("1".into()),
                    started_at: None,
                    at: 1,
                })
                .await
                .unwrap();
            assert_eq!(f, Finished::Recorded);
        }
        assert!(s.get(ids[0]).await.unwrap().is_none());
        assert!(s.get(ids[2]).await.unwrap().is_some());
        assert!(
            s.get(ids[3]).await.unwrap().is_some(),
            "unfinished: never evicted"
        );
        assert_eq!(s.evictions(), 1);
        let c = s.counts().await.unwrap();
        assert_eq!((c.done, c.queued), (2, 1));
    }
}
