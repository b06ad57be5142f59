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
use super::AppState;
use crate::jobs::model::{JobId, JobRecord, JobStatus, ListFilter, NewJob};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    kind: String,
    #[serde(default)]
    params: Option<Value>,
}

#[derive(Serialize)]
struct Progress {
    done: u64,
    total: u64,
}

/// A job on the wire.
#[derive(Serialize)]
pub struct JobView {
    id: String,
    kind: String,
    status: &'static str,
    params: Value,
    submitted_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    result: Option<Box<RawValue>>,
    error: Option<String>,
    /// Runs of the job so far (a worker that died or stalled, or a retry, adds one).
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Progress>,
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn view(r: JobRecord, progress: Option<(u64, u64)>) -> JobView {
    JobView {
        id: r.id.to_string(),
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
    raw.parse::<JobId>().map_err(|()| {
        ApiError::NotFound(format!("no job with id {raw:?} (ids look like job_id_1)"))
    })
}

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
    if st.engine.registry().get(&body.kind).is_none() {
        let known: Vec<&str> = st.engine.registry().kinds().collect();
        return Err(ApiError::BadRequest(format!(
            "unknown job kind {:?}; known kinds: {}",
            body.kind,
            known.join(", ")
        )));
    }
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
    let location = format!("/v1/jobs/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(serde_json::json!({ "id": id.to_string(), "status": "queued" })),
    )
        .into_response())
}

pub async fn get(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&raw)?;
    let mut rec = st
        .engine
        .store()
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {raw:?}")))?;
    // A job that started here moments ago may not have its start in the store yet.
    if !rec.status.is_finished() {
        if let Some(t) = st.engine.started_at(id) {
            if rec.status == JobStatus::Queued {
                rec.status = JobStatus::Running;
                rec.started_at = Some(t);
            }
            if let Some(a) = st.engine.attempt(id) {
                rec.attempts = rec.attempts.max(a);
            }
        }
    }
    let progress = (rec.status == JobStatus::Running)
        .then(|| st.engine.progress(id))
        .flatten();
    Ok(Json(view(rec, progress)))
}

pub async fn cancel(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&raw)?;
    st.engine.cancel(id).await?;
    Ok(Json(
        serde_json::json!({ "id": id.to_string(), "status": "cancelled" }),
    ))
}

/// `POST /v1/jobs/{id}/retry`: a failed or cancelled job runs again, same id, next
/// attempt (409 for a job that is queued, running or done).
pub async fn retry(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    st.engine.retry(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{id}"))],
        Json(serde_json::json!({ "id": id.to_string(), "status": "queued" })),
    )
        .into_response())
}

const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 50;

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
                    Some(v.parse::<JobId>().map_err(|()| {
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
    let jobs = st.engine.store().list(&filter).await?;
    let next = (jobs.len() == filter.limit)
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    let views: Vec<JobView> = jobs.into_iter().map(|r| view(r, None)).collect();
    Ok(Json(
        serde_json::json!({ "jobs": views, "next_cursor": next }),
    ))
}

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
pub async fn replicas(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let replicas = st.engine.queue().replicas().await?;
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
        "store": st.engine.store().name(),
        "replicas": list,
    })))
}

/// `GET /v1/queue`: jobs waiting for a worker and jobs leased, on every replica.
pub async fn queue(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let q = st.engine.queue().stats().await?;
    Ok(Json(serde_json::json!({
        "waiting": q.waiting,
        "leased": q.leased,
    })))
}
