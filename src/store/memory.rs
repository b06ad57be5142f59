//! The memory store: a map behind a mutex, nothing on disk. Finished jobs are capped:
//! past `max_finished`, the oldest finished record is evicted (counted in `/metrics`).
//! Unfinished jobs are never evicted: the queue's own capacity bounds them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Store, StoreError};
use crate::jobs::model::{JobCounts, JobId, JobRecord, JobStatus, ListFilter, NewJob, Outcome};

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
}

impl MemoryStore {
    fn apply_finish(
        &self,
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        now_ms: i64,
    ) -> bool {
        let mut g = self.inner.lock();
        let Some(rec) = g.jobs.get_mut(&id) else {
            return false;
        };
        let before = rec.status;
        if before.is_finished() {
            return false;
        }
        let after = outcome.status();
        rec.status = after;
        rec.finished_at = Some(now_ms);
        if rec.started_at.is_none() {
            rec.started_at = started_at;
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
                if let Some(r) = g.jobs.remove(&old) {
                    *g.counts.slot(r.status) -= 1;
                }
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn submit(&self, job: &NewJob, now_ms: i64) -> Result<JobId, StoreError> {
        let mut g = self.inner.lock();
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
            },
        );
        g.counts.queued += 1;
        Ok(id)
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.inner.lock().jobs.get(&id).cloned())
    }

    async fn mark_running(&self, id: JobId, now_ms: i64) -> Result<bool, StoreError> {
        let mut g = self.inner.lock();
        let Some(rec) = g.jobs.get_mut(&id) else {
            return Ok(false);
        };
        if rec.status != JobStatus::Queued {
            return Ok(false);
        }
        rec.status = JobStatus::Running;
        rec.started_at = Some(now_ms);
        g.counts.queued -= 1;
        g.counts.running += 1;
        Ok(true)
    }

    async fn finish(
        &self,
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        Ok(self.apply_finish(id, outcome, started_at, now_ms))
    }

    fn finish_begin(
        &self,
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        now_ms: i64,
    ) -> super::Pending<bool> {
        let changed = self.apply_finish(id, outcome, started_at, now_ms);
        Box::pin(std::future::ready(Ok(changed)))
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

    async fn statuses(&self) -> Result<Vec<(JobId, JobStatus)>, StoreError> {
        Ok(self
            .inner
            .lock()
            .jobs
            .values()
            .map(|r| (r.id, r.status))
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
    use super::*;
    use serde_json::json;

    fn job() -> NewJob {
        NewJob {
            kind: "k".into(),
            params: json!({}),
        }
    }

    #[tokio::test]
    async fn oldest_finished_results_are_evicted_past_the_cap() {
        let s = MemoryStore::new(2);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(s.submit(&job(), 0).await.unwrap());
        }
        for id in &ids {
            assert!(s
                .finish(*id, Outcome::Done("1".into()), None, 1)
                .await
                .unwrap());
        }
        assert!(s.get(ids[0]).await.unwrap().is_none());
        assert!(s.get(ids[2]).await.unwrap().is_some());
        assert_eq!(s.evictions(), 1);
        assert_eq!(s.counts().await.unwrap().done, 2);
    }

    #[tokio::test]
    async fn a_finished_job_cannot_finish_twice() {
        let s = MemoryStore::new(10);
        let id = s.submit(&job(), 0).await.unwrap();
        assert!(s.mark_running(id, 1).await.unwrap());
        assert!(s
            .finish(id, Outcome::Cancelled("x".into()), None, 2)
            .await
            .unwrap());
        assert!(!s
            .finish(id, Outcome::Done("1".into()), None, 3)
            .await
            .unwrap());
        let r = s.get(id).await.unwrap().unwrap();
        assert_eq!(r.status, JobStatus::Cancelled);
        assert_eq!(s.counts().await.unwrap().in_progress(), 0);
    }
}
