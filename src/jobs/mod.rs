//! Jobs: the data a job is made of ([`model`]), the kinds that know how to run them
//! ([`JobHandler`], [`Registry`]), and the [`engine::Engine`] that queues and runs them.
//!
//! Architecture Invariant: a handler is plain synchronous code that gets JSON params and
//! a [`JobContext`]; it knows nothing of HTTP, the store or the queue.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub mod engine;
pub mod model;
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

    /// Does the work. Long work calls `ctx.checkpoint()` now and then, so that a cancel
    /// or a timeout stops it.
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
}

impl JobContext {
    /// Err(Cancelled) once the job was cancelled or timed out.
    pub fn checkpoint(&self) -> Result<(), JobError> {
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

    pub fn set_progress(&self, done: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
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
    pub queue_capacity: usize,
    pub job_timeout: Option<Duration>,
}
