//! Who stops what: every background piece the application starts (the job engine, the
//! pipeline, the store, the series tasks, the HTTP listener) is stopped through one
//! shape, [`Component::shutdown`], which drains what it holds until a deadline, stops it
//! and joins its threads and tasks; `app.rs` calls them in order. [`Tasks`] is the
//! plumbing most of them use (tokio-util's `CancellationToken` to ask, `TaskTracker` to
//! wait).
//!
//! Architecture Invariant: nothing outlives the `Application` that started it; a stopped
//! application leaves no thread, task, open file or lock behind (a job stuck in a loop
//! that ignores its cancel flag is the one exception, and is logged).

use std::future::Future;
use std::time::Instant;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running background component.
#[async_trait]
pub trait Component: Send + Sync {
    /// For logs.
    fn name(&self) -> &'static str;

    /// Stops it, and returns once its threads and tasks have ended, or at `deadline`
    /// (then says so in the log).
    async fn shutdown(&self, deadline: Instant);
}

/// Tasks started together and stopped together.
#[derive(Clone, Default)]
pub struct Tasks {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new() -> Self {
        Tasks::default()
    }

    /// The token the tasks watch: cancelled when they must stop.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Asks every task to stop and waits for them until `deadline`. True when all ended.
    pub async fn stop(&self, deadline: Instant) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout_at(deadline.into(), self.tracker.wait())
            .await
            .is_ok()
    }
}
