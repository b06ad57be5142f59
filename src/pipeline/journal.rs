//! The journal's writer thread: a reorder buffer of processed records keyed by sequence
//! number, written strictly in order (a record waits for every earlier one), in groups of
//! one write and one fdatasync, after which the records' intake permits are released.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use tokio::sync::OwnedSemaphorePermit;

use super::log::Sink;
use super::record::{AcceptedRecord, JournalRecord, Outcome};
use super::PipelineMetrics;
use crate::metrics::EventStatusLabels;

/// Most messages taken from the channel before writing what is ready.
const MAX_GROUP: usize = 8192;

pub(crate) struct Processed {
    pub rec: AcceptedRecord,
    pub outcome: Outcome,
    pub processed_at: i64,
    /// The intake permit, released once the record is durable in the journal.
    pub permit: Option<OwnedSemaphorePermit>,
}

pub(crate) enum JournalMsg {
    Record(Processed),
    Stop,
}

/// Appends one journal line for `p` to `buf`.
pub(crate) fn encode(p: Processed, buf: &mut Vec<u8>) -> Option<OwnedSemaphorePermit> {
    let line = JournalRecord::new(p.rec, p.outcome, p.processed_at);
    // Serializing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &line);
    buf.push(b'\n');
    p.permit
}

pub(crate) struct JournalWriter {
    pub rx: Receiver<JournalMsg>,
    pub sink: Sink,
    pub next_to_write: u64,
    pub metrics: Arc<PipelineMetrics>,
    /// The highest sequence number durable in the journal (every lower one is too).
    pub durable_upto: Arc<AtomicU64>,
}

impl JournalWriter {
    /// Runs until Stop; returns one past the highest sequence number durable in the journal.
    pub fn run(mut self) -> u64 {
        let mut pending: BTreeMap<u64, Processed> = BTreeMap::new();
        let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::new();
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut stop = false;
        while !stop {
            match self.rx.recv() {
                Ok(msg) => stop |= self.take(msg, &mut pending),
                Err(_) => break,
            }
            for _ in 0..MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(msg) => stop |= self.take(msg, &mut pending),
                    Err(_) => break,
                }
            }
            while let Some(p) = pending.remove(&self.next_to_write) {
                match p.outcome {
                    Outcome::Ok(_) => ok += 1,
                    Outcome::Failed(_) => failed += 1,
                }
                permits.extend(encode(p, &mut buf));
                self.next_to_write += 1;
            }
            if !buf.is_empty() {
                let (written, stopped) = self.write(&buf, &mut pending);
                stop |= stopped;
                buf.clear();
                permits.clear();
                if !written {
                    // Gave up at shutdown: report only what is durable.
                    self.next_to_write = self.durable_upto.load(Ordering::Acquire) + 1;
                    break;
                }
                self.durable_upto
                    .store(self.next_to_write - 1, Ordering::Release);
                self.count("ok", &mut ok);
                self.count("failed", &mut failed);
            }
            self.metrics.reorder_buffer.set(pending.len() as i64);
        }
        if !pending.is_empty() {
            tracing::info!(
                waiting = pending.len(),
                next = self.next_to_write,
                "journal stopped with records waiting for an earlier one; the accepted log has them for the next start"
            );
        }
        let _ = self.sink.sync();
        self.next_to_write
    }

    /// Files a message; true for Stop.
    fn take(&self, msg: JournalMsg, pending: &mut BTreeMap<u64, Processed>) -> bool {
        match msg {
            JournalMsg::Record(p) => {
                pending.insert(p.rec.seq, p);
                false
            }
            JournalMsg::Stop => true,
        }
    }

    /// Appends and syncs `buf`, retrying while the disk refuses (intake fills up and
    /// answers 503 meanwhile). Returns (written, a Stop arrived); it gives up only when
    /// stopping.
    fn write(&mut self, buf: &[u8], pending: &mut BTreeMap<u64, Processed>) -> (bool, bool) {
        let mut stop = false;
        for attempt in 0u32.. {
            let before = self.sink.len();
            match self.sink.append(buf).and_then(|()| self.sink.sync()) {
                Ok(()) => return (true, stop),
                Err(e) => {
                    tracing::error!(error = %e, attempt, "writing the journal failed; retrying");
                    let _ = self.sink.rollback(before);
                    if stop && attempt >= 3 {
                        tracing::error!("giving up on the journal at shutdown; the accepted log has the records for the next start");
                        return (false, true);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    while let Ok(msg) = self.rx.try_recv() {
                        stop |= self.take(msg, pending);
                    }
                }
            }
        }
        (false, stop)
    }

    fn count(&self, status: &str, n: &mut u64) {
        if *n > 0 {
            self.metrics
                .events_journaled
                .get_or_create(&EventStatusLabels {
                    status: status.to_string(),
                })
                .inc_by(*n);
            *n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Number};

    fn processed(seq: u64, value: serde_json::Value) -> Processed {
        let outcome = crate::pipeline::process(&value);
        Processed {
            rec: AcceptedRecord {
                seq,
                conn: 1,
                conn_seq: seq,
                value,
                sent_at: Number::from(1),
                accepted_at: 2,
            },
            outcome,
            processed_at: 3,
            permit: None,
        }
    }

    #[test]
    fn records_that_arrive_out_of_order_are_written_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let file = Sink::open(&path).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let durable = Arc::new(AtomicU64::new(0));
        let w = JournalWriter {
            rx,
            sink: Sink::file(file, 0),
            next_to_write: 1,
            metrics: Arc::new(PipelineMetrics::default()),
            durable_upto: durable.clone(),
        };
        for seq in [3, 5, 1, 4] {
            tx.send(JournalMsg::Record(processed(seq, json!(seq))))
                .unwrap();
        }
        tx.send(JournalMsg::Record(processed(2, json!("x"))))
            .unwrap();
        tx.send(JournalMsg::Stop).unwrap();
        assert_eq!(w.run(), 6);
        assert_eq!(durable.load(Ordering::Acquire), 5);
        let text = std::fs::read_to_string(&path).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert!(text
            .lines()
            .nth(1)
            .unwrap()
            .contains("\"status\":\"failed\""));
    }
}
