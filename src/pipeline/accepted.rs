//! The accepted log's writer thread: it folds every append waiting in its channel into
//! one write and one fdatasync (group commit), gives each record its sequence number as it
//! appends it (a failed append consumes no number), answers the handlers, and hands each
//! accepted record to the processing stage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rand::Rng;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::journal::{JournalMsg, Processed};
use super::log::Sink;
use super::record::{process, AcceptedRecord, Event};
use super::AcceptError;
use super::PipelineMetrics;

/// Most appends folded into one batch.
const MAX_BATCH: usize = 4096;

/// Past this size the accepted log is emptied at the first moment the journal has every
/// record it holds.
const COMPACT_AT: u64 = 8 << 20;

pub(crate) struct AcceptReq {
    pub event: Event,
    pub accepted_at: i64,
    pub permit: OwnedSemaphorePermit,
    pub reply: oneshot::Sender<Result<u64, AcceptError>>,
}

pub(crate) enum AcceptMsg {
    Append(AcceptReq),
    Stop,
}

pub(crate) struct AcceptedWriter {
    pub rx: Receiver<AcceptMsg>,
    pub sink: Sink,
    pub next_seq: u64,
    pub journal: Sender<JournalMsg>,
    pub runtime: tokio::runtime::Handle,
    /// The processing delays in progress, stopped and awaited by `Pipeline::close`
    /// (a record cut off there stays in the accepted log for the next start).
    pub tasks: tokio_util::task::TaskTracker,
    pub stop: tokio_util::sync::CancellationToken,
    pub delay_max_ms: u64,
    pub metrics: Arc<PipelineMetrics>,
    /// Published by the journal writer: every seq up to it is durable in the journal.
    pub durable_upto: Arc<AtomicU64>,
    /// Why the last append failed, until one succeeds (`/readyz` says it).
    pub failing: Arc<parking_lot::Mutex<Option<String>>>,
}

impl AcceptedWriter {
    /// Runs until Stop; returns its log and the next sequence number it would hand out.
    pub fn run(mut self) -> (Sink, u64) {
        let mut batch: Vec<AcceptReq> = Vec::with_capacity(64);
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        // Set when a failed batch could not be rolled back: the log's tail is unknown,
        // so no number may be handed out any more.
        let mut broken = false;
        let mut stop = false;
        while !stop {
            match self.rx.recv() {
                Ok(AcceptMsg::Append(r)) => batch.push(r),
                Ok(AcceptMsg::Stop) | Err(_) => break,
            }
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(AcceptMsg::Append(r)) => batch.push(r),
                    Ok(AcceptMsg::Stop) => {
                        stop = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if broken {
                for r in batch.drain(..) {
                    // The slot is free before the handler hears of the refusal.
                    drop(r.permit);
                    let _ = r.reply.send(Err(AcceptError::Io(
                        "the accepted log is in an unknown state after a failed write".into(),
                    )));
                }
                continue;
            }
            self.compact(COMPACT_AT);
            let records = self.encode(&batch, &mut buf);
            let before = self.sink.len();
            let written = self.sink.append(&buf).and_then(|()| self.sink.sync());
            *self.failing.lock() = written
                .as_ref()
                .err()
                .map(|e| format!("the pipeline cannot write its accepted log: {e}"));
            match written {
                Ok(()) => {
                    self.next_seq += batch.len() as u64;
                    for (req, rec) in batch.drain(..).zip(records) {
                        let seq = rec.seq;
                        self.metrics.events_accepted.inc();
                        let _ = req.reply.send(Ok(seq));
                        self.hand_over(rec, req.permit);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, records = batch.len(), "appending to the accepted log failed");
                    if let Err(e2) = self.sink.rollback(before) {
                        tracing::error!(error = %e2, "rolling the accepted log back failed; refusing events from now on");
                        broken = true;
                    }
                    for r in batch.drain(..) {
                        drop(r.permit);
                        let _ = r.reply.send(Err(AcceptError::Io(e.to_string())));
                    }
                }
            }
        }
        let _ = self.sink.sync();
        (self.sink, self.next_seq)
    }

    /// Empties the log when it is at least `min_len` bytes and the journal holds every
    /// record in it. Only this thread appends, so nothing can slip in between.
    fn compact(&mut self, min_len: u64) {
        if self.sink.len() < min_len
            || self.durable_upto.load(Ordering::Acquire) + 1 != self.next_seq
        {
            return;
        }
        if let Err(e) = self.sink.rollback(0) {
            tracing::warn!(error = %e, "emptying the accepted log failed; it is kept");
        }
    }

    /// Serializes the batch into `buf`, numbering it from `next_seq`.
    fn encode(&self, batch: &[AcceptReq], buf: &mut Vec<u8>) -> Vec<AcceptedRecord> {
        buf.clear();
        let mut records = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            let rec = AcceptedRecord {
                seq: self.next_seq + i as u64,
                conn: r.event.conn,
                conn_seq: r.event.conn_seq,
                value: r.event.value.clone(),
                sent_at: r.event.sent_at.clone(),
                accepted_at: r.accepted_at,
            };
            // Serializing a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, &rec);
            buf.push(b'\n');
            records.push(rec);
        }
        records
    }

    /// Starts processing: at once when there is no delay, else on a task that sleeps a
    /// random delay in [0, --process-delay-max-ms] first.
    fn hand_over(&self, rec: AcceptedRecord, permit: OwnedSemaphorePermit) {
        let delay = if self.delay_max_ms == 0 {
            0
        } else {
            rand::rng().random_range(0..=self.delay_max_ms)
        };
        let journal = self.journal.clone();
        let finish = move || {
            let outcome = process(&rec.value);
            let _ = journal.send(JournalMsg::Record(Processed {
                rec,
                outcome,
                processed_at: crate::now_ms(),
                permit: Some(permit),
            }));
        };
        if delay == 0 {
            finish();
        } else {
            let stop = self.stop.clone();
            self.tasks.spawn_on(
                async move {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => finish(),
                        _ = stop.cancelled() => {}
                    }
                },
                &self.runtime,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Number};
    use tokio::sync::Semaphore;

    fn request(
        permits: &Arc<Semaphore>,
        conn_seq: u64,
    ) -> (AcceptMsg, oneshot::Receiver<Result<u64, AcceptError>>) {
        let (reply, answer) = oneshot::channel();
        let req = AcceptReq {
            event: Event {
                conn: 1,
                conn_seq,
                value: json!(conn_seq),
                sent_at: Number::from(1),
            },
            accepted_at: 2,
            permit: permits.clone().try_acquire_owned().unwrap(),
            reply,
        };
        (AcceptMsg::Append(req), answer)
    }

    #[tokio::test]
    async fn a_failed_append_consumes_no_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        // The log's directory cannot be created while a file stands in its place.
        let blocker = dir.path().join("d");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("j.accepted");
        let (tx, rx) = crossbeam_channel::unbounded();
        let (jtx, jrx) = crossbeam_channel::unbounded();
        let failing = Arc::new(parking_lot::Mutex::new(None));
        let w = AcceptedWriter {
            rx,
            sink: Sink::Pending { path: path.clone() },
            next_seq: 1,
            journal: jtx,
            runtime: tokio::runtime::Handle::current(),
            tasks: tokio_util::task::TaskTracker::new(),
            stop: tokio_util::sync::CancellationToken::new(),
            delay_max_ms: 0,
            metrics: Arc::new(PipelineMetrics::default()),
            durable_upto: Arc::new(AtomicU64::new(0)),
            failing: failing.clone(),
        };
        let thread = std::thread::spawn(move || w.run());
        let permits = Arc::new(Semaphore::new(4));

        let (msg, answer) = request(&permits, 1);
        tx.send(msg).unwrap();
        assert!(matches!(answer.await.unwrap(), Err(AcceptError::Io(_))));
        assert_eq!(
            permits.available_permits(),
            4,
            "a refused record frees its slot"
        );
        let why = failing
            .lock()
            .clone()
            .expect("the failure is kept for /readyz");
        assert!(why.contains("cannot write its accepted log"), "{why}");

        std::fs::remove_file(&blocker).unwrap();
        let (msg, answer) = request(&permits, 2);
        tx.send(msg).unwrap();
        assert_eq!(answer.await.unwrap().unwrap(), 1);
        assert_eq!(*failing.lock(), None, "ready again once an append succeeds");
        tx.send(AcceptMsg::Stop).unwrap();
        let (_, next) = thread.join().unwrap();
        assert_eq!(next, 2);
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(
            line.starts_with("{\"seq\":1,\"conn\":1,\"conn_seq\":2,"),
            "{line}"
        );
        // Processed at once (no delay) and handed to the journal with its permit.
        match jrx.try_recv() {
            Ok(JournalMsg::Record(p)) => assert_eq!((p.rec.seq, p.outcome.status()), (1, "ok")),
            _ => panic!("nothing reached the journal"),
        }
    }
}
