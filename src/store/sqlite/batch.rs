//! One batch of ops applied inside its transaction (folded so that a job inserted and
//! finished in one batch is written once), and requeues.

use super::*;

/// What applying a batch did, kept apart from the writer's state until it committed.
#[derive(Default)]
pub(super) struct Applied {
    /// New status and attempt of every job the batch touched: an overlay on
    /// `unfinished`, merged once committed, so a failed batch can be retried as is.
    pub(super) changes: Unfinished,
    /// Jobs moved into and out of each state, applied to the counts once committed.
    pub(super) into: JobCounts,
    pub(super) out_of: JobCounts,
    /// One answer per op, in batch order.
    pub(super) answers: Vec<Answer>,
}

impl Applied {
    /// Job `key`'s status and attempt as the batch leaves them, before the commit.
    pub(super) fn live(&self, unfinished: &Unfinished, key: i64) -> Option<Live> {
        self.changes
            .get(&key)
            .or_else(|| unfinished.get(&key))
            .copied()
    }

    /// Job `key` moved from `from` (`None`: a new job) to `to`.
    pub(super) fn moved(&mut self, key: i64, from: Option<JobStatus>, to: Live) {
        self.changes.insert(key, to);
        if let Some(f) = from {
            *self.out_of.slot(f) += 1;
        }
        *self.into.slot(to.status) += 1;
    }
}

/// A job's row as the ops of one batch leave it, for a job inserted in that batch: the
/// row is then written once, in its final state.
pub(super) struct Folded<'a> {
    pub(super) status: JobStatus,
    pub(super) attempts: u32,
    pub(super) started_at: Option<i64>,
    pub(super) finished_at: Option<i64>,
    pub(super) error: Option<&'a str>,
    pub(super) result: Option<&'a str>,
}

impl<'a> Folded<'a> {
    /// The same rules as the SQL paths of `apply_batch`, on a row not yet written.
    pub(super) fn apply(&mut self, op: &'a Op) -> Answer {
        match op {
            Op::Start { attempt, at, .. } => {
                if !self.status.is_finished() && *attempt > self.attempts {
                    self.status = JobStatus::Running;
                    self.attempts = *attempt;
                    self.started_at = Some(*at);
                }
                Answer::None
            }
            Op::Release { attempt, spent, .. } => {
                if self.status == JobStatus::Running && self.attempts == *attempt {
                    self.status = JobStatus::Queued;
                    self.attempts = released_attempts(*attempt, *spent);
                    self.started_at = None;
                }
                Answer::None
            }
            Op::Finish {
                attempt,
                outcome,
                started_at,
                at,
                ..
            } => Answer::Finish(match finish_rule(self.status, self.attempts, *attempt) {
                Finished::Recorded => {
                    self.status = outcome.status();
                    self.finished_at = Some(*at);
                    self.started_at = self.started_at.or(*started_at);
                    if let Attempt::Of(a) = attempt {
                        self.attempts = self.attempts.max(*a);
                    }
                    match outcome {
                        Outcome::Done(r) => self.result = Some(r),
                        Outcome::Failed(e) | Outcome::Cancelled(e) => self.error = Some(e),
                    }
                    Finished::Recorded
                }
                other => other,
            }),
            _ => Answer::None,
        }
    }
}

/// What a batch needs for its keyed inserts: where ids come from, and whether to delete
/// expired keys first.
pub(super) struct Keys<'a> {
    pub(super) next_id: &'a AtomicU64,
    pub(super) sweep: bool,
}

/// Applies one batch in one IMMEDIATE transaction (the write lock is taken up front,
/// waiting on the busy handler, rather than failing when a read upgrades to a write).
/// What it changes goes to `out`, merged by the caller only once the commit succeeded.
pub(super) fn apply_batch(
    conn: &mut Connection,
    batch: &[Op],
    unfinished: &Unfinished,
    out: &mut Applied,
    blobs: &mut Blobs,
    keys: Keys<'_>,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Expiry by the clock of the submissions (the one their keys' lifetimes count on).
    let newest_keyed = batch
        .iter()
        .filter_map(|op| match op {
            Op::InsertKeyed { at, .. } => Some(*at),
            _ => None,
        })
        .max();
    if let Some(now) = newest_keyed.filter(|_| keys.sweep) {
        tx.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?1", [now])?;
    }

    // Ops about a job inserted in this batch are folded into its insert: the row is
    // written once, in the state they leave it in (one row instead of an insert and
    // updates). `folded_into[i]` is the insert op an op was folded into.
    let mut inserted_at: HashMap<JobId, usize> = HashMap::new();
    let mut folded_into: Vec<Option<usize>> = vec![None; batch.len()];
    let mut has_folds = false;
    for (i, op) in batch.iter().enumerate() {
        match op {
            Op::Insert { id, .. } => {
                inserted_at.insert(*id, i);
            }
            Op::Start { id, .. } | Op::Release { id, .. } | Op::Finish { id, .. } => {
                if let Some(&j) = inserted_at.get(id) {
                    folded_into[i] = Some(j);
                    has_folds = true;
                }
            }
            _ => {}
        }
    }
    out.answers = vec![Answer::None; batch.len()];
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO jobs (id, kind, params, status, submitted_at, started_at, finished_at, \
             error, result_blob, attempts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut start = tx.prepare_cached(
            "UPDATE jobs SET status = 1, attempts = ?2, started_at = ?3 WHERE id = ?1",
        )?;
        let mut release = tx.prepare_cached(
            "UPDATE jobs SET status = 0, attempts = ?2, started_at = NULL WHERE id = ?1",
        )?;
        let mut finish = tx.prepare_cached(
            "UPDATE jobs SET status = ?2, finished_at = ?3, error = ?4, \
             started_at = COALESCE(started_at, ?5), result_blob = ?6, \
             attempts = MAX(attempts, ?7) WHERE id = ?1",
        )?;
        let mut lookup = tx.prepare_cached("SELECT status, attempts FROM jobs WHERE id = ?1")?;
        let mut add_blob = tx.prepare_cached(
            "INSERT INTO blobs (hash, body) VALUES (?1, ?2) ON CONFLICT (hash) DO NOTHING",
        )?;
        let mut find_blob = tx.prepare_cached("SELECT id FROM blobs WHERE hash = ?1")?;
        // A key recorded earlier in this batch is found too (same transaction).
        let mut find_key = tx.prepare_cached(
            "SELECT job_id, fingerprint FROM idempotency_keys \
             WHERE key_hash = ?1 AND expires_at > ?2",
        )?;
        let mut add_key = tx.prepare_cached(
            "INSERT INTO idempotency_keys (key_hash, job_id, fingerprint, expires_at) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (key_hash) DO UPDATE SET \
             job_id = excluded.job_id, fingerprint = excluded.fingerprint, \
             expires_at = excluded.expires_at",
        )?;
        let mut blob_id = |body: &str| -> Result<i64, rusqlite::Error> {
            let hash = *blake3::hash(body.as_bytes()).as_bytes();
            if let Some(id) = blobs.get(&hash) {
                return Ok(id);
            }
            let id = if add_blob.execute(params![&hash[..], body])? == 1 {
                tx.last_insert_rowid()
            } else {
                find_blob.query_row([&hash[..]], |r| r.get(0))?
            };
            blobs.stage(hash, id);
            Ok(id)
        };
        for (i, op) in batch.iter().enumerate() {
            if folded_into[i].is_some() {
                continue;
            }
            match op {
                Op::Insert {
                    id,
                    kind,
                    params,
                    at,
                    ..
                } => {
                    let mut row = Folded {
                        status: JobStatus::Queued,
                        attempts: 0,
                        started_at: None,
                        finished_at: None,
                        error: None,
                        result: None,
                    };
                    if has_folds {
                        for j in (i + 1)..batch.len() {
                            if folded_into[j] == Some(i) {
                                out.answers[j] = row.apply(&batch[j]);
                            }
                        }
                    }
                    let blob = row.result.map(&mut blob_id).transpose()?;
                    insert.execute(params![
                        id.0 as i64,
                        kind,
                        params,
                        row.status.code(),
                        at,
                        row.started_at,
                        row.finished_at,
                        row.error,
                        blob,
                        row.attempts
                    ])?;
                    let live = Live {
                        status: row.status,
                        attempts: row.attempts,
                    };
                    out.moved(id.0 as i64, None, live);
                }
                Op::InsertKeyed {
                    kind,
                    params,
                    at,
                    key,
                    ..
                } => {
                    let seen = find_key
                        .query_row(params![&key.hash[..], at], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                        })
                        .optional()?;
                    out.answers[i] = Answer::Submitted(match seen {
                        Some((first, fp)) if fp[..] == key.fingerprint[..] => {
                            Submitted::Replayed(JobId(first as u64))
                        }
                        Some((first, _)) => Submitted::KeyReused(JobId(first as u64)),
                        None => {
                            // Allocated again if the batch is retried: a failed commit
                            // leaves a gap, as it does for unkeyed inserts.
                            let id = keys.next_id.fetch_add(1, Ordering::Relaxed) as i64;
                            insert.execute(params![
                                id,
                                kind,
                                params,
                                JobStatus::Queued.code(),
                                at,
                                None::<i64>,
                                None::<i64>,
                                None::<String>,
                                None::<i64>,
                                0
                            ])?;
                            add_key.execute(params![
                                &key.hash[..],
                                id,
                                &key.fingerprint[..],
                                key.expires_at
                            ])?;
                            let live = Live {
                                status: JobStatus::Queued,
                                attempts: 0,
                            };
                            out.moved(id, None, live);
                            Submitted::New(JobId(id as u64))
                        }
                    });
                }
                Op::Start { id, attempt, at } => {
                    let key = id.0 as i64;
                    let cur = out.live(unfinished, key);
                    // A newer attempt takes over a job whose last attempt was reclaimed.
                    if let Some(live) =
                        cur.filter(|l| !l.status.is_finished() && *attempt > l.attempts)
                    {
                        start.execute(params![key, attempt, at])?;
                        let to = Live {
                            status: JobStatus::Running,
                            attempts: *attempt,
                        };
                        out.moved(key, Some(live.status), to);
                    }
                }
                Op::Release {
                    id, attempt, spent, ..
                } => {
                    let key = id.0 as i64;
                    let cur = out.live(unfinished, key);
                    if cur.is_some_and(|l| l.status == JobStatus::Running && l.attempts == *attempt)
                    {
                        let attempts = released_attempts(*attempt, *spent);
                        release.execute(params![key, attempts])?;
                        let to = Live {
                            status: JobStatus::Queued,
                            attempts,
                        };
                        out.moved(key, Some(JobStatus::Running), to);
                    }
                }
                Op::Finish {
                    id,
                    attempt,
                    outcome,
                    started_at,
                    at,
                    ..
                } => {
                    let key = id.0 as i64;
                    let cur = match out.live(unfinished, key) {
                        Some(l) => Some(l),
                        // Not unfinished: finished or unknown. Rare (late outcomes,
                        // cancels of finished jobs), so a read is fine.
                        None => lookup
                            .query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                            .optional()?
                            .map(|(code, attempts)| Live {
                                status: JobStatus::from_code(code).unwrap_or(JobStatus::Failed),
                                attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                            }),
                    };
                    let answer = match cur {
                        None => Finished::Unknown,
                        Some(live) => match finish_rule(live.status, live.attempts, *attempt) {
                            Finished::Recorded => {
                                let after = outcome.status();
                                let (error, blob) = match outcome {
                                    Outcome::Done(r) => (None, Some(blob_id(r)?)),
                                    Outcome::Failed(e) | Outcome::Cancelled(e) => {
                                        (Some(e.as_str()), None)
                                    }
                                };
                                let attempts = match attempt {
                                    Attempt::Of(a) => live.attempts.max(*a),
                                    Attempt::Any => live.attempts,
                                };
                                finish.execute(params![
                                    key,
                                    after.code(),
                                    at,
                                    error,
                                    started_at,
                                    blob,
                                    attempts
                                ])?;
                                let to = Live {
                                    status: after,
                                    attempts,
                                };
                                out.moved(key, Some(live.status), to);
                                Finished::Recorded
                            }
                            other => other,
                        },
                    };
                    out.answers[i] = Answer::Finish(answer);
                }
                Op::Requeue { id, .. } => {
                    out.answers[i] = Answer::Requeue(requeue(&tx, *id, out)?);
                }
                Op::Probe => {
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES ('probe', ?1) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        [crate::now_ms()],
                    )?;
                }
                Op::Flush { .. } | Op::Close { .. } => {}
                Op::Recover { .. } => {
                    tx.execute(
                        "UPDATE jobs SET status = 0, started_at = NULL WHERE status = 1",
                        [],
                    )?;
                    let running: Vec<(i64, u32)> = unfinished
                        .iter()
                        .chain(out.changes.iter())
                        .filter(|(_, l)| l.status == JobStatus::Running)
                        .map(|(id, l)| (*id, l.attempts))
                        .collect();
                    for (id, attempts) in running {
                        if out
                            .live(unfinished, id)
                            .is_some_and(|l| l.status == JobStatus::Running)
                        {
                            let to = Live {
                                status: JobStatus::Queued,
                                attempts,
                            };
                            out.moved(id, Some(JobStatus::Running), to);
                        }
                    }
                }
            }
        }
    }
    tx.commit()
}

/// Failed or cancelled → queued, inside the batch's transaction.
pub(super) fn requeue(
    tx: &rusqlite::Transaction<'_>,
    id: JobId,
    out: &mut Applied,
) -> Result<Requeued, rusqlite::Error> {
    let key = id.0 as i64;
    let rec = tx
        .prepare_cached(&format!("{SELECT_COLS} {RESULT_JOIN} WHERE j.id = ?1"))?
        .query_row([key], row_to_record)
        .optional()?;
    let Some(mut rec) = rec else {
        return Ok(Requeued::Unknown);
    };
    // This batch may have changed it already.
    if let Some(l) = out.changes.get(&key) {
        rec.status = l.status;
        rec.attempts = l.attempts;
    }
    match rec.status {
        JobStatus::Queued | JobStatus::Running => return Ok(Requeued::NotFinished(rec.status)),
        JobStatus::Done => return Ok(Requeued::Done),
        JobStatus::Failed | JobStatus::Cancelled => {}
    }
    tx.prepare_cached(
        "UPDATE jobs SET status = 0, started_at = NULL, finished_at = NULL, error = NULL, \
         result_blob = NULL, retry_base = attempts WHERE id = ?1",
    )?
    .execute([key])?;
    // A result from a store before shared results must not come back with it.
    tx.prepare_cached("DELETE FROM results WHERE id = ?1")?
        .execute([key])?;
    let to = Live {
        status: JobStatus::Queued,
        attempts: rec.attempts,
    };
    out.moved(key, Some(rec.status), to);
    rec.requeue();
    Ok(Requeued::Yes(Box::new(rec)))
}
