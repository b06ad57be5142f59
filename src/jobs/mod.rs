//! Jobs: the data a job is made of ([`crate::model`]), the kinds that know how to run them
//! ([`JobHandler`], [`Registry`]), and the [`engine::Engine`] that queues and runs them.
//!
//! Architecture Invariant: a handler is plain synchronous code that gets JSON params and
//! a [`JobContext`]; it knows nothing of HTTP, the store or the queue.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub mod engine;
pub mod history;
pub mod metrics;
pub mod testing;

/// Why a job did not produce a result.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobError {
    /// The job ran and failed; the message is shown to the client.
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
}

/// A kind of job: validates its params at submission and runs on a worker thread.
pub trait JobHandler: Send + Sync + 'static {
    /// Checks params before a job is accepted on the native API, so a bad request is a
    /// 4xx there rather than a failed job. Compatible routes skip this on purpose: their
    /// protocol reports bad params in the job's result.
    fn validate(&self, _params: &Value) -> Result<(), String> {
        Ok(())
    }

    /// Does the work. Long work calls `ctx.checkpoint()` (or reports progress) now and
    /// then, so that a cancel or a timeout stops it and its lease stays renewed.
    fn run(&self, params: &Value, ctx: &JobContext) -> Result<Value, JobError>;

    /// The result as JSON text, which is what the store keeps. Kinds that can answer
    /// from a cache of serialized results override this to skip the serialization.
    fn run_json(&self, params: &Value, ctx: &JobContext) -> Result<String, JobError> {
        self.run(params, ctx).map(|v| v.to_string())
    }
}

/// What a running job can see of its surroundings.
#[derive(Default)]
pub struct JobContext {
    cancelled: AtomicBool,
    /// Progress as (done, total), in units the job chooses (bytes for CSV scans).
    done: AtomicU64,
    total: AtomicU64,
    /// When the job last showed it is alive (ms since epoch; 0 = not yet): its lease is
    /// renewed only while it does (see [`JobContext::checkpoint`]).
    beat: AtomicI64,
    /// Which attempt this is (1 for the first run; 0 until the job is claimed, for a job
    /// tracked from its admission).
    attempt: AtomicU32,
}

impl JobContext {
    pub fn new(attempt: u32) -> Self {
        JobContext {
            attempt: AtomicU32::new(attempt),
            ..JobContext::default()
        }
    }

    /// Which attempt of the job this run is: 1 for the first, more after its worker died
    /// or stalled, or after a retry.
    pub fn attempt(&self) -> u32 {
        self.attempt.load(Ordering::Relaxed)
    }

    /// Sets the attempt when the job is claimed (before it runs).
    pub(crate) fn set_attempt(&self, attempt: u32) {
        self.attempt.store(attempt, Ordering::Relaxed);
    }

    /// Err(Cancelled) once the job was cancelled or timed out. Also tells the engine the
    /// job is alive: a job whose worker shows no sign of life (a checkpoint or progress)
    /// for a whole lease period (`--lease-ms`) loses its lease, and another worker runs
    /// it again; long jobs call this (or report progress) well within that period.
    pub fn checkpoint(&self) -> Result<(), JobError> {
        self.beat.store(crate::now_ms(), Ordering::Relaxed);
        if self.cancelled.load(Ordering::Relaxed) {
            Err(JobError::Cancelled)
        } else {
            Ok(())
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// The cancel flag itself, for engines that poll it directly (the CSV scan).
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancelled
    }

    /// The "done" counter itself, for engines that add to it from many threads.
    pub fn progress_done(&self) -> &AtomicU64 {
        &self.done
    }

    pub fn set_progress_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// When the job last called [`JobContext::checkpoint`] (0 = never).
    pub fn last_beat(&self) -> i64 {
        self.beat.load(Ordering::Relaxed)
    }

    pub fn progress(&self) -> Option<(u64, u64)> {
        let total = self.total.load(Ordering::Relaxed);
        (total > 0).then(|| (self.done.load(Ordering::Relaxed), total))
    }
}

/// The kinds this process can run, by name. Built once at start-up.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<String, Arc<dyn JobHandler>>,
}

impl Registry {
    pub fn register(&mut self, kind: impl Into<String>, handler: Arc<dyn JobHandler>) {
        self.kinds.insert(kind.into(), handler);
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn JobHandler>> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }
}

/// Options of the engine, taken from the configuration.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub workers: usize,
    pub job_timeout: Option<Duration>,
    pub lease: crate::queue::LeaseOptions,
}
