//! What the store's callers send its writer thread: one `Op` per write, each with the
//! channel its answer goes back on.

use super::*;

pub(super) type Ack = oneshot::Sender<Result<(), StoreError>>;

pub(super) enum Op {
    Insert {
        id: JobId,
        kind: String,
        params: String,
        at: i64,
        ack: Ack,
    },
    /// A submission with an idempotency key: the writer decides whether it makes a job
    /// (and allocates its id) inside the transaction that records the key, and answers
    /// once that committed.
    InsertKeyed {
        kind: String,
        params: String,
        at: i64,
        key: Box<KeyRow>,
        ack: oneshot::Sender<Result<Submitted, StoreError>>,
    },
    Start {
        id: JobId,
        attempt: u32,
        at: i64,
    },
    Release {
        id: JobId,
        attempt: u32,
        /// The attempt ran (its lease expired): it stays counted.
        spent: bool,
        ack: Ack,
    },
    Finish {
        id: JobId,
        attempt: Attempt,
        outcome: Outcome,
        started_at: Option<i64>,
        at: i64,
        ack: oneshot::Sender<Result<Finished, FinishFailed>>,
    },
    Requeue {
        id: JobId,
        ack: oneshot::Sender<Result<Requeued, StoreError>>,
    },
    Flush {
        ack: Ack,
    },
    /// Running → queued for every job (recovery at start-up).
    Recover {
        ack: Ack,
    },
    /// A write that proves the disk takes writes again (sent while unhealthy).
    Probe,
    /// Commit what came before, answer, and stop the writer.
    Close {
        ack: Ack,
    },
}

/// A row of `idempotency_keys`, as a keyed insert brings it.
pub(super) struct KeyRow {
    pub(super) hash: [u8; 32],
    pub(super) fingerprint: [u8; 32],
    pub(super) expires_at: i64,
}
