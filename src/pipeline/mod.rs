//! The ordered pipeline: events accepted over HTTP get a gap-free sequence number and are
//! made durable in a write-ahead "accepted" log before they are acknowledged, processed
//! after a random delay, and written to the journal strictly in sequence order.
//!
//! ```text
//! handler ─permit─▶ accepted writer ──fdatasync──▶ ack {"seq": N}
//!                        │ (N assigned here, group commit)
//!                        ▼
//!               process task (random delay) ──▶ journal writer (reorder buffer,
//!                                                 in-order append, group fdatasync)
//!                                                 └─▶ permit released
//! ```
//!
//! Guarantee: every acknowledged record is in the journal after a restart (at the latest
//! once the next start's recovery ran), exactly once, in sequence order; the journal never
//! keeps a torn line. Records never acknowledged may or may not appear (if their append
//! reached the disk before the crash). Memory is bounded by `--reorder-capacity`: a
//! record holds an intake permit from acceptance until it is durable in the journal.

mod accepted;
mod journal;
mod log;
mod record;
mod recovery;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{oneshot, Semaphore};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{EventStatusLabels, Metrics, ReasonLabels};

/// The pipeline's metric families (`tally_events_*`, `tally_reorder_buffer`).
#[derive(Clone, Default)]
pub struct PipelineMetrics {
    pub events_accepted: Counter,
    pub events_journaled: Family<EventStatusLabels, Counter>,
    pub events_rejected: Family<ReasonLabels, Counter>,
    pub events_recovered: Counter,
    pub reorder_buffer: Gauge,
}

impl PipelineMetrics {
    pub fn register(m: &Metrics) -> Self {
        PipelineMetrics {
            events_accepted: m.add(
                "events_accepted",
                "Pipeline events acknowledged (durable in the accepted log)",
            ),
            events_journaled: m.add(
                "events_journaled",
                "Pipeline events written to the journal, by status (ok, failed)",
            ),
            events_rejected: m.add(
                "events_rejected",
                "Pipeline events refused, by reason (full, draining)",
            ),
            events_recovered: m.add(
                "events_recovered",
                "Accepted events journaled by the recovery at start",
            ),
            reorder_buffer: m.add(
                "reorder_buffer",
                "Processed events waiting in the reorder buffer for an earlier one",
            ),
        }
    }
}

pub use record::{process, AcceptedRecord, Event, JournalRecord, Outcome};
pub use recovery::accepted_path;

use accepted::{AcceptMsg, AcceptReq, AcceptedWriter};
use journal::{JournalMsg, JournalWriter};
use log::Sink;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// The journal file; `None` writes nothing anywhere (events are numbered, processed
    /// and ordered the same, then dropped).
    pub journal: Option<PathBuf>,
    /// Processing delay: uniform in [0, max] milliseconds.
    pub process_delay_max_ms: u64,
    /// Records accepted but not yet journaled, at most.
    pub reorder_capacity: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}; refusing to start rather than guess (move the file aside to start afresh)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0} is in use by another tally process")]
    Locked(PathBuf),
}

/// Why an event was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcceptError {
    #[error(
        "the reorder buffer is full ({0} records accepted and not yet journaled); retry later"
    )]
    Full(usize),
    #[error("the pipeline is draining and takes no new events")]
    Draining,
    #[error("the accepted log could not be written: {0}")]
    Io(String),
}

struct Writers {
    accepted: JoinHandle<(Sink, u64)>,
    journal: JoinHandle<u64>,
}

/// A handle on the running pipeline; cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    accept_tx: crossbeam_channel::Sender<AcceptMsg>,
    journal_tx: crossbeam_channel::Sender<JournalMsg>,
    permits: Arc<Semaphore>,
    capacity: usize,
    draining: AtomicBool,
    metrics: Arc<PipelineMetrics>,
    threads: Mutex<Option<Writers>>,
    journal: Option<PathBuf>,
    /// Why appending to the accepted log fails, while it does.
    failing: Arc<parking_lot::Mutex<Option<String>>>,
    /// Records in their processing delay (tasks on the runtime), stopped at `close`.
    processing: tokio_util::task::TaskTracker,
    stop_processing: tokio_util::sync::CancellationToken,
}

impl Pipeline {
    /// Recovers the logs (see [`recovery`]) and starts the two writer threads. Must be
    /// called inside a tokio runtime (processing delays run on it).
    pub fn start(opts: PipelineOptions, registry: &Metrics) -> Result<Pipeline, PipelineError> {
        let metrics = Arc::new(PipelineMetrics::register(registry));
        let (journal_sink, accepted_sink, next_seq) = match &opts.journal {
            Some(path) => {
                let r = recovery::recover(path)?;
                metrics.events_recovered.inc_by(r.replayed);
                tracing::info!(
                    journal = %path.display(),
                    lines = r.journal_lines,
                    replayed = r.replayed,
                    cut_torn_line = r.cut_torn_line,
                    next_seq = r.next_seq,
                    "journal recovered"
                );
                (r.journal, r.accepted, r.next_seq)
            }
            None => (Sink::Memory { len: 0 }, Sink::Memory { len: 0 }, 1),
        };
        // Every label set shows in /metrics from the start, at 0.
        for status in ["ok", "failed"] {
            metrics
                .events_journaled
                .get_or_create(&EventStatusLabels {
                    status: status.to_string(),
                })
                .inc_by(0);
        }
        for reason in ["full", "draining"] {
            metrics
                .events_rejected
                .get_or_create(&ReasonLabels {
                    reason: reason.to_string(),
                })
                .inc_by(0);
        }
        let capacity = opts.reorder_capacity.max(1);
        let durable_upto = Arc::new(AtomicU64::new(next_seq - 1));
        let (accept_tx, accept_rx) = crossbeam_channel::unbounded();
        let (journal_tx, journal_rx) = crossbeam_channel::unbounded();
        let processing = tokio_util::task::TaskTracker::new();
        let stop_processing = tokio_util::sync::CancellationToken::new();
        let failing = Arc::new(parking_lot::Mutex::new(None));
        let jw = JournalWriter {
            rx: journal_rx,
            sink: journal_sink,
            next_to_write: next_seq,
            metrics: metrics.clone(),
            durable_upto: durable_upto.clone(),
        };
        let aw = AcceptedWriter {
            rx: accept_rx,
            sink: accepted_sink,
            next_seq,
            journal: journal_tx.clone(),
            runtime: tokio::runtime::Handle::current(),
            tasks: processing.clone(),
            stop: stop_processing.clone(),
            delay_max_ms: opts.process_delay_max_ms,
            metrics: metrics.clone(),
            durable_upto,
            failing: failing.clone(),
        };
        let thread_err = |source| PipelineError::Io {
            path: PathBuf::from("(writer thread)"),
            source,
        };
        let journal = std::thread::Builder::new()
            .name("tally-journal".into())
            .spawn(move || jw.run())
            .map_err(thread_err)?;
        let accepted = std::thread::Builder::new()
            .name("tally-accepted".into())
            .spawn(move || aw.run())
            .map_err(thread_err)?;
        Ok(Pipeline {
            inner: Arc::new(Inner {
                accept_tx,
                journal_tx,
                permits: Arc::new(Semaphore::new(capacity)),
                capacity,
                draining: AtomicBool::new(false),
                metrics,
                threads: Mutex::new(Some(Writers { accepted, journal })),
                processing,
                stop_processing,
                journal: opts.journal,
                failing,
            }),
        })
    }

    /// Why the pipeline cannot take events right now (its accepted log cannot be
    /// written: a full disk, or a journal another process holds), if it cannot.
    pub fn health(&self) -> Result<(), String> {
        match self.inner.failing.lock().clone() {
            None => Ok(()),
            Some(cause) => Err(cause),
        }
    }

    /// The pipeline's metric families (the dashboard reads them too).
    pub fn metrics(&self) -> &PipelineMetrics {
        &self.inner.metrics
    }

    /// The journal file, if it is on disk.
    pub fn journal_path(&self) -> Option<&std::path::Path> {
        self.inner.journal.as_deref()
    }

    fn reject(&self, reason: &str) {
        self.inner
            .metrics
            .events_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Accepts an event: answers its sequence number once it is durable in the accepted
    /// log. Never waits for room: a full reorder buffer is an error at once.
    pub async fn accept(&self, event: Event) -> Result<u64, AcceptError> {
        if self.inner.draining.load(Ordering::Acquire) {
            self.reject("draining");
            return Err(AcceptError::Draining);
        }
        let Ok(permit) = self.inner.permits.clone().try_acquire_owned() else {
            self.reject("full");
            return Err(AcceptError::Full(self.inner.capacity));
        };
        let (reply, answer) = oneshot::channel();
        let req = AcceptReq {
            event,
            accepted_at: crate::now_ms(),
            permit,
            reply,
        };
        if self.inner.accept_tx.send(AcceptMsg::Append(req)).is_err() {
            self.reject("draining");
            return Err(AcceptError::Draining);
        }
        // The writer dropping the request unanswered means it stopped.
        answer.await.unwrap_or(Err(AcceptError::Draining))
    }

    /// Records accepted and not yet durable in the journal.
    pub fn in_flight(&self) -> usize {
        self.inner.capacity - self.inner.permits.available_permits()
    }

    /// `--reorder-capacity`: records accepted and not yet journaled, at most.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// True once intake stopped.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Stops intake: every later `accept` is refused.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Waits until every accepted record is journaled, or until `deadline`; true if all were.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            if self.in_flight() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops both writers after what they hold is written and synced, and waits for them.
    /// Records still waiting for processing stay in the accepted log for the next start.
    pub async fn close(&self) {
        self.inner.draining.store(true, Ordering::Release);
        let Some(writers) = self.inner.threads.lock().take() else {
            return;
        };
        // Records still in their processing delay stay in the accepted log.
        self.inner.stop_processing.cancel();
        self.inner.processing.close();
        self.inner.processing.wait().await;
        let inner = self.inner.clone();
        // The accepted writer first: what it accepted last reaches the journal's channel
        // before the journal's Stop does.
        let joined = tokio::task::spawn_blocking(move || {
            let _ = inner.accept_tx.send(AcceptMsg::Stop);
            let accepted = writers.accepted.join();
            let _ = inner.journal_tx.send(JournalMsg::Stop);
            let journaled_next = writers.journal.join();
            // Everything accepted is journaled: the write-ahead log has nothing to offer
            // the next start.
            if let (Ok((mut sink, accepted_next)), Ok(journaled_next)) = (accepted, journaled_next)
            {
                if accepted_next == journaled_next {
                    if let Err(e) = sink.rollback(0) {
                        tracing::warn!(error = %e, "emptying the accepted log failed; the next start will skip what it holds");
                    }
                }
            }
        });
        if tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            tracing::warn!("the pipeline writers did not stop within 5 s");
        }
    }
}
