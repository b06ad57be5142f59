//! The native job API: `/v1/jobs` (submit, list), `/v1/jobs/{id}` (get, cancel),
//! `/v1/jobs/{id}/retry`, `/v1/jobs/stats`.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::error::{ApiError, ApiJson};
use super::ids::{self, Wire};
use super::openapi::wire;
use super::AppState;
use crate::model::{JobId, JobRecord, JobStatus, ListFilter, NewJob};

/// A job to run: its kind and its params.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    kind: String,
    /// A JSON object (null or absent: `{}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    params: Option<Value>,
}

/// How far a running job got, in units of its own (bytes, rows).
#[derive(Serialize, utoipa::ToSchema)]
struct Progress {
    done: u64,
    total: u64,
}

/// A job on the wire.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobView {
    id: String,
    kind: String,
    /// `queued`, `running`, `done`, `failed` or `cancelled`.
    #[schema(value_type = String, pattern = "^(queued|running|done|failed|cancelled)$")]
    status: &'static str,
    #[schema(value_type = Object)]
    params: Value,
    /// RFC 3339 (ms).
    submitted_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    /// The job's answer once done (any JSON).
    #[schema(value_type = Option<Value>)]
    result: Option<Box<RawValue>>,
    error: Option<String>,
    /// Runs of the job so far (a worker that died or stalled, or a retry, adds one).
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Progress>,
}

pub(crate) fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn view(r: JobRecord, progress: Option<(u64, u64)>) -> JobView {
    JobView {
        id: ids::text(r.id),
        kind: r.kind,
        status: r.status.as_str(),
        params: r.params,
        submitted_at: rfc3339(r.submitted_at),
        started_at: r.started_at.map(rfc3339),
        finished_at: r.finished_at.map(rfc3339),
        // Stored results are JSON we wrote ourselves; a corrupt one shows as null.
        result: r.result.and_then(|s| RawValue::from_string(s).ok()),
        error: r.error,
        attempts: r.attempts,
        progress: progress.map(|(done, total)| Progress { done, total }),
    }
}

fn parse_id(raw: &str) -> Result<JobId, ApiError> {
    crate::api::ids::parse(raw).ok_or_else(|| {
        ApiError::NotFound(format!("no job with id {raw:?} (ids look like job_id_1)"))
    })
}

/// `POST /v1/jobs`: queues a job; its id is valid everywhere once answered.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = SubmitBody,
    responses(
        (status = 202, description = "Queued", body = wire::Accepted,
            headers(("Location" = String, description = "The job's URL"))),
        (status = 400, description = "Unknown kind or a malformed body", body = wire::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over --max-body-bytes", body = wire::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = wire::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Params the kind refuses", body = wire::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Queue full, shutting down or store unavailable (Retry-After)", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn submit(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<SubmitBody>,
) -> Result<Response, ApiError> {
    let params = match body.params {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(p @ Value::Object(_)) => p,
        Some(other) => {
            return Err(ApiError::Unprocessable(format!(
                "params must be a JSON object, not {other}"
            )))
        }
    };
    let id = st
        .engine
        .submit(
            NewJob {
                kind: body.kind,
                params,
            },
            true,
        )
        .await?;
    let location = format!("/v1/jobs/{}", Wire(id));
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(serde_json::json!({ "id": ids::text(id), "status": "queued" })),
    )
        .into_response())
}

/// `GET /v1/jobs/{id}`: a job, with its progress while it runs.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "`job_id_N`")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 404, description = "No such job", body = wire::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&raw)?;
    let rec = st
        .engine
        .record(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {raw:?}")))?;
    let progress = (rec.status == JobStatus::Running)
        .then(|| st.engine.progress(id))
        .flatten();
    Ok(Json(view(rec, progress)))
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job, wherever it runs.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "`job_id_N`")),
    responses(
        (status = 200, description = "Cancelled", body = wire::CancelledJob),
        (status = 404, description = "No such job", body = wire::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished", body = wire::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw)?;
    st.engine.cancel(id).await?;
    Ok(Json(
        serde_json::json!({ "id": ids::text(id), "status": "cancelled" }),
    ))
}

/// `POST /v1/jobs/{id}/retry`: a failed or cancelled job runs again, same id, next
/// attempt (409 for a job that is queued, running or done).
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/retry",
    tag = "jobs",
    params(("id" = String, Path, description = "`job_id_N`")),
    responses(
        (status = 202, description = "Queued again", body = wire::Accepted),
        (status = 404, description = "No such job", body = wire::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Queued, running or done", body = wire::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Queue full, shutting down or store unavailable", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn retry(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    st.engine.retry(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{}", Wire(id)))],
        Json(serde_json::json!({ "id": ids::text(id), "status": "queued" })),
    )
        .into_response())
}

const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 50;

/// `GET /v1/jobs`: a page of jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(
        ("status" = Option<String>, Query, description = "queued, running, done, failed or cancelled"),
        ("kind" = Option<String>, Query, description = "Only this kind"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Jobs per page (default 50)"),
        ("cursor" = Option<String>, Query, description = "The previous page's `next_cursor`"),
    ),
    responses(
        (status = 200, description = "A page", body = wire::JobPage),
        (status = 400, description = "A bad parameter", body = wire::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let mut filter = ListFilter {
        limit: DEFAULT_PAGE,
        ..ListFilter::default()
    };
    for (k, v) in &q {
        match k.as_str() {
            "status" => {
                filter.status = Some(v.parse::<JobStatus>().map_err(|()| {
                    ApiError::BadRequest(format!(
                        "status must be one of queued, running, done, failed, cancelled; got {v:?}"
                    ))
                })?)
            }
            "kind" => filter.kind = Some(v.clone()),
            "limit" => {
                filter.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "limit must be an integer from 1 to {MAX_PAGE}; got {v:?}"
                        ))
                    })?
            }
            "cursor" => {
                filter.before =
                    Some(crate::api::ids::parse(v).ok_or_else(|| {
                        ApiError::BadRequest(format!("cursor {v:?} is not a job id"))
                    })?)
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; use status, kind, limit, cursor"
                )))
            }
        }
    }
    let jobs = st.engine.list(&filter).await?;
    let next = (jobs.len() == filter.limit)
        .then(|| jobs.last().map(|j| ids::text(j.id)))
        .flatten();
    let views: Vec<JobView> = jobs.into_iter().map(|r| view(r, None)).collect();
    Ok(Json(
        serde_json::json!({ "jobs": views, "next_cursor": next }),
    ))
}

/// `GET /v1/jobs/stats`: jobs in the store by state.
#[utoipa::path(
    get,
    path = "/v1/jobs/stats",
    tag = "jobs",
    responses(
        (status = 200, description = "Counts", body = super::overview::JobCountsView),
        (status = 503, description = "Store unavailable", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stats(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let c = st.engine.counts().await?;
    Ok(Json(serde_json::json!({
        "queued": c.queued,
        "running": c.running,
        "done": c.done,
        "failed": c.failed,
        "cancelled": c.cancelled,
        "in_progress": c.in_progress(),
    })))
}

/// `GET /v1/replicas`: the processes taking work from the queue (with Redis, every
/// replica that reported within the last few lease periods; otherwise this process).
#[utoipa::path(
    get,
    path = "/v1/replicas",
    tag = "jobs",
    responses(
        (status = 200, description = "The replicas", body = super::overview::ReplicasBody),
        (status = 503, description = "Store unavailable", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn replicas(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let replicas = st.engine.replicas().await?;
    let now = crate::now_ms();
    let list: Vec<Value> = replicas
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "host": r.host,
                "pid": r.pid,
                "workers": r.workers,
                "busy": r.busy,
                "last_seen": rfc3339(r.last_seen_ms),
                "seen_ms_ago": (now - r.last_seen_ms).max(0),
                "this": r.this,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "store": st.engine.store_name(),
        "replicas": list,
    })))
}

/// `GET /v1/queue`: jobs waiting for a worker and jobs leased, on every replica.
#[utoipa::path(
    get,
    path = "/v1/queue",
    tag = "jobs",
    responses(
        (status = 200, description = "The queue", body = super::overview::QueueView),
        (status = 503, description = "Store unavailable", body = wire::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn queue(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let q = st.engine.queue_stats().await?;
    Ok(Json(serde_json::json!({
        "waiting": q.waiting,
        "leased": q.leased,
    })))
}
