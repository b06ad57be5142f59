//! Bulk actions over the job list: `POST /v1/jobs/cancel` and `POST /v1/jobs/retry`
//! act on the newest jobs matching `{status, kind}`, at most `limit` per call, one job
//! at a time through the same engine calls as the single-job routes.
//!
//! A run of calls walks the list once: each answer's `next_cursor` is the last id it
//! looked at, and the next call, given it as `cursor`, looks only at older ids. A job
//! retried on one page that fails again at once is therefore not selected again on the
//! next, and a job submitted meanwhile is not selected at all (ids only grow), so every
//! job that matched when the run began is acted on at most once.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiJson};
use super::state::AppState;
use crate::jobs::engine::{CancelError, RetryError};
use crate::model::{JobId, JobStatus, ListFilter};

/// Jobs one bulk call acts on: default and most.
const BULK_DEFAULT: usize = 100;
const BULK_MAX: usize = 1000;

/// Which jobs a bulk action applies to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Only jobs in this state (cancel: `queued` or `running`, default both; retry:
    /// `failed` or `cancelled`, default both).
    #[schema(value_type = Option<String>)]
    pub status: Option<String>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Jobs acted on at most in this call (1 to 1000, default 100).
    #[schema(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// The previous call's `next_cursor`: only jobs older than it are looked at.
    pub cursor: Option<String>,
}

/// A job the action left alone, and why.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkSkip {
    pub id: String,
    pub reason: String,
}

/// What a bulk action did.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkResult {
    /// Jobs that matched the filter in this call.
    pub matched: usize,
    /// Jobs cancelled (or queued again, for retry).
    pub affected: usize,
    /// Jobs that matched but changed state in the meantime.
    pub skipped: Vec<BulkSkip>,
    /// More jobs may match: call again, with `next_cursor`.
    pub more: bool,
    /// Why the call stopped before the end of its page (a full queue, a drain, a store
    /// that stopped answering); `affected` still counts what was done before.
    pub stopped: Option<String>,
    /// Pass as `cursor` to the next call to go on where this one stopped (null when
    /// nothing more matches).
    pub next_cursor: Option<String>,
}

/// The states a bulk action may apply to, from the filter's `status`.
fn statuses(
    filter: &BulkFilter,
    allowed: [JobStatus; 2],
    action: &str,
) -> Result<Vec<JobStatus>, ApiError> {
    match filter.status.as_deref() {
        None => Ok(allowed.to_vec()),
        Some(s) => match s.parse::<JobStatus>() {
            Ok(st) if allowed.contains(&st) => Ok(vec![st]),
            _ => Err(ApiError::Unprocessable(format!(
                "status: {action} applies to {} or {} jobs; got {s:?}",
                allowed[0].as_str(),
                allowed[1].as_str()
            ))),
        },
    }
}

fn limit_of(filter: &BulkFilter) -> Result<usize, ApiError> {
    match filter.limit {
        None => Ok(BULK_DEFAULT),
        Some(n) if (1..=BULK_MAX).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::Unprocessable(format!(
            "limit must be from 1 to {BULK_MAX}; got {n}"
        ))),
    }
}

/// The newest jobs (at most `limit`, across `statuses`) matching the filter, newest
/// first, and whether more may match.
async fn matching(
    st: &AppState,
    statuses: &[JobStatus],
    kind: Option<&str>,
    limit: usize,
    before: Option<JobId>,
) -> Result<(Vec<JobId>, bool), ApiError> {
    let mut pages = Vec::new();
    for &status in statuses {
        let page = st
            .engine
            .list(&ListFilter {
                status: Some(status),
                kind: kind.map(str::to_owned),
                limit,
                before,
            })
            .await?;
        pages.push(page.into_iter().map(|r| r.id).collect());
    }
    Ok(merge(pages, limit))
}

/// One status's page after another, newest first, at most `limit`, and whether more may
/// match. A job that moved from one listed state to the other between the two reads is
/// in both pages: it counts once.
fn merge(pages: Vec<Vec<JobId>>, limit: usize) -> (Vec<JobId>, bool) {
    let mut more = pages.iter().any(|p| p.len() == limit);
    let mut ids: Vec<JobId> = pages.into_iter().flatten().collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids.dedup();
    if ids.len() > limit {
        ids.truncate(limit);
        more = true;
    }
    (ids, more)
}

/// The jobs a bulk `action` applies to (validated filter, newest first) and the result
/// to fill in as it goes.
async fn select(
    st: &AppState,
    filter: &BulkFilter,
    allowed: [JobStatus; 2],
    action: &str,
) -> Result<(Vec<JobId>, BulkResult), ApiError> {
    let statuses = statuses(filter, allowed, action)?;
    let limit = limit_of(filter)?;
    let before = match filter.cursor.as_deref() {
        None => None,
        Some(c) => Some(crate::api::ids::parse(c).ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "cursor: expected the next_cursor of an earlier answer; got {c:?}"
            ))
        })?),
    };
    let (ids, more) = matching(st, &statuses, filter.kind.as_deref(), limit, before).await?;
    let out = BulkResult {
        matched: ids.len(),
        affected: 0,
        skipped: Vec::new(),
        more,
        stopped: None,
        next_cursor: None,
    };
    Ok((ids, out))
}

/// Ends a page: when the walk stopped at `ids[done]` (or went through `done == len`),
/// the next call starts after the last id looked at, or where this call started.
fn finish_page(
    mut out: BulkResult,
    ids: &[JobId],
    done: usize,
    cursor: Option<String>,
) -> BulkResult {
    if out.more {
        out.next_cursor = match done {
            0 => cursor,
            n => Some(crate::api::ids::text(ids[n - 1])),
        };
    }
    out
}

/// A store error after part of the page was done: the answer keeps the count and says
/// where it stopped (nothing done yet: the error itself, as for any call).
fn stop_on_store(out: &mut BulkResult, e: crate::store::StoreError) -> Result<(), ApiError> {
    // A store's own failure is an internal error (logged, its cause not sent), as on
    // every route; only a store that cannot answer now ends the page with the count.
    if (out.affected == 0 && out.skipped.is_empty()) || !e.is_transient() {
        return Err(e.into());
    }
    out.stopped = Some(e.to_string());
    out.more = true;
    Ok(())
}

/// What acting on one job of the page came to.
enum Step {
    Done,
    /// It changed state in the meantime: left alone, for this reason.
    Skip(String),
    /// Nothing more can be done now (a full queue, a drain): the page stops here.
    Stop(String),
    Store(crate::store::StoreError),
}

#[derive(Clone, Copy)]
enum Action {
    Cancel,
    Retry,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Retry => "retry",
        }
    }

    /// The states it applies to.
    fn applies_to(self) -> [JobStatus; 2] {
        match self {
            Action::Cancel => [JobStatus::Queued, JobStatus::Running],
            Action::Retry => [JobStatus::Failed, JobStatus::Cancelled],
        }
    }

    async fn apply(self, st: &AppState, id: JobId) -> Step {
        match self {
            Action::Cancel => match st.engine.cancel(id).await {
                Ok(()) => Step::Done,
                Err(e @ (CancelError::NotFound(_) | CancelError::AlreadyFinished { .. })) => {
                    Step::Skip(super::error::cancel_refusal(&e))
                }
                Err(CancelError::Store(e)) => Step::Store(e),
            },
            Action::Retry => match st.engine.retry(id).await {
                Ok(()) => Step::Done,
                Err(e @ (RetryError::NotFound(_) | RetryError::NotRetryable { .. })) => {
                    Step::Skip(super::error::retry_refusal(&e))
                }
                Err(e @ (RetryError::QueueFull { .. } | RetryError::ShuttingDown)) => {
                    Step::Stop(e.to_string())
                }
                Err(RetryError::Store(e)) => Step::Store(e),
            },
        }
    }
}

/// One page of a bulk action: selects what matches and applies the action to each job
/// in turn, newest first, until the page ends or a job stops it.
async fn walk(
    st: &AppState,
    filter: BulkFilter,
    action: Action,
) -> Result<Json<BulkResult>, ApiError> {
    let (ids, mut out) = select(st, &filter, action.applies_to(), action.name()).await?;
    let mut done = 0;
    for &id in &ids {
        match action.apply(st, id).await {
            Step::Done => out.affected += 1,
            Step::Skip(reason) => out.skipped.push(BulkSkip {
                id: crate::api::ids::text(id),
                reason,
            }),
            Step::Stop(why) => {
                out.stopped = Some(why);
                out.more = true;
                break;
            }
            Step::Store(e) => {
                stop_on_store(&mut out, e)?;
                break;
            }
        }
        done += 1;
    }
    Ok(Json(finish_page(out, &ids, done, filter.cursor)))
}

/// `POST /v1/jobs/cancel`: cancels the newest queued or running jobs that match.
#[utoipa::path(
    post,
    path = "/v1/jobs/cancel",
    tag = "jobs",
    request_body = BulkFilter,
    responses(
        (status = 200, description = "What was cancelled", body = BulkResult),
        (status = 422, description = "A status that cannot be cancelled, a bad limit or cursor, or an unknown field"),
        (status = 503, description = "Store unavailable before anything was done"),
    )
)]
pub async fn cancel(
    State(st): State<AppState>,
    ApiJson(filter): ApiJson<BulkFilter>,
) -> Result<Json<BulkResult>, ApiError> {
    walk(&st, filter, Action::Cancel).await
}

/// `POST /v1/jobs/retry`: queues again the newest failed or cancelled jobs that match.
#[utoipa::path(
    post,
    path = "/v1/jobs/retry",
    tag = "jobs",
    request_body = BulkFilter,
    responses(
        (status = 200, description = "What was queued again", body = BulkResult),
        (status = 422, description = "A status that cannot be retried, a bad limit or cursor, or an unknown field"),
        (status = 503, description = "Store unavailable before anything was done"),
    )
)]
pub async fn retry(
    State(st): State<AppState>,
    ApiJson(filter): ApiJson<BulkFilter>,
) -> Result<Json<BulkResult>, ApiError> {
    walk(&st, filter, Action::Retry).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(matched: usize, more: bool) -> BulkResult {
        BulkResult {
            matched,
            affected: 0,
            skipped: Vec::new(),
            more,
            stopped: None,
            next_cursor: None,
        }
    }

    fn unavailable() -> crate::store::StoreError {
        crate::store::StoreError::Unavailable {
            store: "redis",
            cause: "OOM".into(),
        }
    }

    #[test]
    fn a_job_that_moved_between_the_two_status_reads_counts_once() {
        // Read as queued, then again as running after it started.
        let (ids, more) = merge(vec![vec![JobId(5), JobId(3)], vec![JobId(5)]], 10);
        assert_eq!(ids, [JobId(5), JobId(3)]);
        assert!(!more);
        let (ids, more) = merge(vec![vec![JobId(9), JobId(8)], vec![JobId(7)]], 2);
        assert_eq!((ids, more), (vec![JobId(9), JobId(8)], true));
    }

    #[test]
    fn the_next_page_starts_after_the_last_job_looked_at() {
        let ids = [JobId(9), JobId(7), JobId(4)];
        let done = finish_page(page(3, true), &ids, 3, None);
        assert_eq!(done.next_cursor.as_deref(), Some("job_id_4"));
        // Stopped at the second job: it is looked at again next time.
        let stopped = finish_page(page(3, true), &ids, 1, None);
        assert_eq!(stopped.next_cursor.as_deref(), Some("job_id_9"));
        // Stopped at the first: where this call started.
        let none = finish_page(page(3, true), &ids, 0, Some("job_id_12".into()));
        assert_eq!(none.next_cursor.as_deref(), Some("job_id_12"));
        // The end of the walk has no cursor.
        assert_eq!(finish_page(page(3, false), &ids, 3, None).next_cursor, None);
    }

    #[test]
    fn a_store_error_after_part_of_a_page_keeps_the_count() {
        let mut first = page(3, false);
        assert!(
            stop_on_store(&mut first, unavailable()).is_err(),
            "nothing done: the error itself"
        );
        let mut later = page(3, false);
        later.affected = 2;
        stop_on_store(&mut later, unavailable()).unwrap();
        assert!(later.more);
        assert_eq!(later.affected, 2);
        assert!(later.stopped.unwrap().contains("OOM"));
        let mut failed = page(3, false);
        failed.affected = 2;
        let own = crate::store::StoreError::Failed {
            store: "sqlite",
            cause: "schema".into(),
        };
        assert!(
            stop_on_store(&mut failed, own).is_err(),
            "a store's own failure is not sent as `stopped`"
        );
    }
}
