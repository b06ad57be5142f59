//! The one writer of the file: folds waiting ops into one transaction, commits, and
//! answers each op.

use super::*;

/// The one writer of the file, on its own thread.
pub(super) struct Writer {
    pub(super) next_id: Arc<AtomicU64>,
    /// When expired idempotency keys were last deleted.
    pub(super) last_key_sweep: Option<Instant>,
    pub(super) commit_delay: Duration,
    pub(super) conn: Connection,
    pub(super) unfinished: Unfinished,
    pub(super) counts: Arc<Mutex<JobCounts>>,
    pub(super) metrics: SqliteMetrics,
    /// Wakes the checkpointer after a commit.
    pub(super) committed: std::sync::mpsc::SyncSender<()>,
    pub(super) unhealthy: Arc<Mutex<Option<String>>>,
    pub(super) blobs: Blobs,
}

/// What a batch answers each of its operations, decided while it is applied and sent
/// only once it committed.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Answer {
    None,
    Finish(Finished),
    Requeue(Requeued),
    Submitted(Submitted),
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        // Replaces SQLite's automatic checkpoint (itself a WAL hook): see the end of the loop.
        self.conn.wal_hook(Some(note_wal_pages));
        let mut batch: Vec<Op> = Vec::with_capacity(256);
        let mut last_batch = 0usize;
        while let Some(op) = rx.blocking_recv() {
            batch.push(op);
            // Commit delay: under concurrency (the last batch held more than one write),
            // wait a moment for the writes that are surely coming, above all the outcome
            // of a job whose insert is in this batch: both then go out as one row in one
            // commit. A lone write, or a delay of zero, commits at once.
            if !self.commit_delay.is_zero() && last_batch > 1 {
                thread::sleep(self.commit_delay);
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // Nothing after a Close is applied: those writes are answered "closed".
            let close_at = batch.iter().position(|op| matches!(op, Op::Close { .. }));
            let after_close = close_at.map(|i| batch.split_off(i + 1));
            last_batch = batch.len();
            self.commit(&mut batch);
            if let Some(rest) = after_close {
                for op in rest {
                    fail_op(op, StoreError::Closed);
                }
                rx.close();
                while let Ok(op) = rx.try_recv() {
                    fail_op(op, StoreError::Closed);
                }
                return;
            }
            self.checkpoint_if_long();
        }
    }

    /// Applies `batch` in one transaction (tried a few times), then answers every op.
    pub(super) fn commit(&mut self, batch: &mut Vec<Op>) {
        let started = Instant::now();
        let n = batch.len();
        let mut out = Applied::default();
        // A failed transaction rolls back entirely, so the batch can be tried again as a
        // whole; transient errors (a busy disk, a lock) must not lose accepted writes.
        let mut res = Err(rusqlite::Error::InvalidQuery);
        let changes_before = self.conn.total_changes();
        let sweep_keys = batch.iter().any(|op| matches!(op, Op::InsertKeyed { .. }))
            && self
                .last_key_sweep
                .is_none_or(|t| t.elapsed() >= KEY_SWEEP_EVERY);
        if sweep_keys {
            self.last_key_sweep = Some(Instant::now());
        }
        for attempt in 0..COMMIT_ATTEMPTS {
            out = Applied::default();
            self.blobs.rolled_back();
            res = apply_batch(
                &mut self.conn,
                batch,
                &self.unfinished,
                &mut out,
                &mut self.blobs,
                Keys {
                    next_id: &self.next_id,
                    sweep: sweep_keys,
                },
            );
            match &res {
                Ok(()) => break,
                Err(e) => {
                    let f = classify(e, os_errno(&self.conn));
                    tracing::warn!(cause = %f.cause, attempt, ops = n, "sqlite commit failed; retrying");
                    if !f.transient {
                        break;
                    }
                    thread::sleep(Duration::from_millis(10 << attempt));
                }
            }
        }
        self.metrics.commit(n, started.elapsed());
        match res {
            Ok(()) => {
                self.blobs.committed();
                // Only a commit that wrote proves the disk takes writes (one that
                // changed nothing writes nothing, and succeeds on a full disk too).
                if self.conn.total_changes() > changes_before
                    && self.unhealthy.lock().take().is_some()
                {
                    tracing::info!("the sqlite store takes writes again");
                }
                // Wakes the checkpointer unless a wake-up is already pending.
                let _ = self.committed.try_send(());
                for (id, live) in out.changes.drain() {
                    if live.status.is_finished() {
                        self.unfinished.remove(&id);
                    } else {
                        self.unfinished.insert(id, live);
                    }
                }
                {
                    let mut c = self.counts.lock();
                    for s in JobStatus::ALL {
                        *c.slot(s) += *out.into.slot(s);
                        *c.slot(s) = c.slot(s).saturating_sub(*out.out_of.slot(s));
                    }
                }
                for (op, answer) in batch.drain(..).zip(out.answers) {
                    answer_op(op, answer);
                }
            }
            Err(e) => {
                let f = classify(&e, os_errno(&self.conn));
                tracing::error!(cause = %f.cause, ops = n, "sqlite commit failed");
                self.blobs.rolled_back();
                self.metrics.errors.inc();
                if f.transient {
                    *self.unhealthy.lock() = Some(f.cause.clone());
                }
                for op in batch.drain(..) {
                    fail_op(op, f.error());
                }
            }
        }
    }

    /// Checkpoints: the checkpointer thread copies the log into the database in the
    /// background; once the log is long, the writer copies what is left (little) right
    /// after a commit's acks, so that the next commit starts the log over. SQLite's
    /// automatic checkpoint instead runs inside a commit, copying a thousand pages (5 ms
    /// here) while every writer of that batch waits for its answer.
    pub(super) fn checkpoint_if_long(&mut self) {
        if WAL_PAGES.with(std::cell::Cell::get) < CHECKPOINT_PAGES {
            return;
        }
        let started = Instant::now();
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            Ok(()) => WAL_PAGES.with(|p| p.set(0)),
            Err(e) => {
                tracing::warn!(error = %e, "sqlite checkpoint failed; retried after the next commit")
            }
        }
        self.metrics
            .checkpoint_duration
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Sends each op of a committed batch its answer.
pub(super) fn answer_op(op: Op, answer: Answer) {
    match (op, answer) {
        (
            Op::Insert { ack, .. }
            | Op::Flush { ack }
            | Op::Recover { ack }
            | Op::Release { ack, .. }
            | Op::Close { ack },
            _,
        ) => {
            let _ = ack.send(Ok(()));
        }
        (Op::Finish { ack, .. }, Answer::Finish(f)) => {
            let _ = ack.send(Ok(f));
        }
        (Op::Finish { ack, .. }, _) => {
            let _ = ack.send(Ok(Finished::AlreadyFinished));
        }
        (Op::Requeue { ack, .. }, Answer::Requeue(r)) => {
            let _ = ack.send(Ok(r));
        }
        (Op::Requeue { ack, .. }, _) => {
            let _ = ack.send(Ok(Requeued::Unknown));
        }
        (Op::InsertKeyed { ack, .. }, Answer::Submitted(s)) => {
            let _ = ack.send(Ok(s));
        }
        (Op::InsertKeyed { ack, .. }, _) => {
            let _ = ack.send(Err(StoreError::Closed));
        }
        (Op::Start { .. } | Op::Probe, _) => {}
    }
}

/// Tells an op that was not applied why: the cause of its batch's failure, or
/// `Closed` after the store closed. Outcomes go back to their sender.
pub(super) fn fail_op(op: Op, error: StoreError) {
    match op {
        Op::Insert { ack, .. }
        | Op::Flush { ack }
        | Op::Recover { ack }
        | Op::Release { ack, .. }
        | Op::Close { ack } => {
            let _ = ack.send(Err(error));
        }
        Op::Finish { ack, outcome, .. } => {
            let _ = ack.send(Err(FinishFailed {
                error,
                outcome: Some(outcome),
            }));
        }
        Op::Requeue { ack, .. } => {
            let _ = ack.send(Err(error));
        }
        Op::InsertKeyed { ack, .. } => {
            let _ = ack.send(Err(error));
        }
        Op::Start { .. } | Op::Probe => {}
    }
}
