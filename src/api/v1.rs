//! The native job API: `/v1/jobs` (submit, list), `/v1/jobs/{id}` (get, cancel),
//! `/v1/jobs/{id}/retry`, `/v1/jobs/stats`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::error::{ApiError, ApiJson};
use super::ids::{self, Wire};
use super::state::AppState;
use super::wire::{self, view, JobView};
use crate::model::{IdempotencyKey, JobId, JobStatus, ListFilter, NewJob};

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

fn parse_id(raw: &str) -> Result<JobId, ApiError> {
    crate::api::ids::parse(raw).ok_or_else(|| {
        ApiError::NotFound(format!("no job with id {raw:?} (ids look like job_id_1)"))
    })
}

/// The request header naming a submission, so that its retries make one job.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The answer header saying a submission repeated an earlier one (its job, not a new one).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The submission's `Idempotency-Key`, if it sent one: 1 to 255 visible ASCII characters
/// (`!` to `~`, no spaces), sent once.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "send one Idempotency-Key header, not several".into(),
        ));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::BadRequest(format!(
            "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters, not {}",
            bytes.len()
        )));
    }
    if !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(
            "the Idempotency-Key header must be visible ASCII characters ('!' to '~'), without spaces"
                .into(),
        ));
    }
    // Checked above: every byte is ASCII.
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// `POST /v1/jobs`: queues a job; its id is valid everywhere once answered. With an
/// `Idempotency-Key`, a submission that repeats an earlier one (same key, kind and params,
/// within `--idempotency-ttl`) gets that first job's answer instead of a new job.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = SubmitBody,
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "1 to 255 visible ASCII characters naming this submission: a retry with the same key and the same kind and params within --idempotency-ttl gets the first job (header Idempotent-Replayed: true) instead of a second one; the same key with another request is 422",
            min_length = 1, max_length = 255, pattern = "^[!-~]+$"),
    ),
    responses(
        (status = 202, description = "Queued, or (Idempotent-Replayed: true) the job an earlier submission with the same Idempotency-Key made", body = wire::Accepted,
            headers(
                ("Location" = String, description = "The job's URL"),
                ("Idempotent-Replayed" = String, description = "`true` when this is the answer to an earlier submission with the same Idempotency-Key (no new job); absent otherwise"),
            )),
        (status = 400, description = "Unknown kind, a malformed body or a malformed Idempotency-Key"),
        (status = 422, description = "Params the kind refuses, or an Idempotency-Key already used for another request (`job_id` names the job it made)"),
        (status = 503, description = "Queue full, shutting down or store unavailable (Retry-After); `outcome: unknown` when the store never answered and the job may exist: retry with the same Idempotency-Key"),
    )
)]
pub async fn submit(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SubmitBody>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let params = match body.params {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(p @ Value::Object(_)) => p,
        Some(other) => {
            return Err(ApiError::Unprocessable(format!(
                "params must be a JSON object, not {other}"
            )))
        }
    };
    let idempotency = key.map(|key| IdempotencyKey {
        key,
        ttl_ms: st.idempotency_ttl.as_millis() as u64,
    });
    let job = NewJob {
        kind: body.kind,
        params,
        idempotency,
    };
    let submitted = st.engine.submit(job, true).await?;
    let id = submitted.id;
    let location = format!("/v1/jobs/{}", Wire(id));
    // A replay answers what the first submission was answered (its job was queued then;
    // its state now is at the Location).
    let mut res = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(wire::Accepted::queued(id)),
    )
        .into_response();
    if submitted.replayed {
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// `GET /v1/jobs/{id}`: a job, with its progress while it runs.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "`job_id_N`")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 404, description = "No such job"),
        (status = 503, description = "Store unavailable"),
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
        (status = 404, description = "No such job"),
        (status = 409, description = "Already finished"),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn cancel(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<wire::CancelledJob>, ApiError> {
    let id = parse_id(&raw)?;
    st.engine.cancel(id).await?;
    Ok(Json(wire::CancelledJob {
        id: ids::text(id),
        status: "cancelled",
    }))
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
        (status = 404, description = "No such job"),
        (status = 409, description = "Queued, running or done"),
        (status = 503, description = "Queue full, shutting down or store unavailable"),
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
        Json(wire::Accepted::queued(id)),
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
        (status = 400, description = "A bad parameter"),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn list(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<wire::JobPage>, ApiError> {
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
    Ok(Json(wire::JobPage {
        jobs: jobs.into_iter().map(|r| view(r, None)).collect(),
        next_cursor: next,
    }))
}

/// `GET /v1/jobs/stats`: jobs in the store by state.
#[utoipa::path(
    get,
    path = "/v1/jobs/stats",
    tag = "jobs",
    responses(
        (status = 200, description = "Counts", body = wire::JobCountsView),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn stats(State(st): State<AppState>) -> Result<Json<wire::JobCountsView>, ApiError> {
    Ok(Json(st.engine.counts().await?.into()))
}

/// `GET /v1/replicas`: the processes taking work from the queue (with Redis, every
/// replica that reported within the last few lease periods; otherwise this process).
#[utoipa::path(
    get,
    path = "/v1/replicas",
    tag = "jobs",
    responses(
        (status = 200, description = "The replicas", body = wire::ReplicasBody),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn replicas(State(st): State<AppState>) -> Result<Json<wire::ReplicasBody>, ApiError> {
    let replicas = st.engine.replicas().await?;
    Ok(Json(wire::ReplicasBody {
        store: st.engine.store_name().to_string(),
        replicas: wire::replica_views(replicas),
    }))
}

/// `GET /v1/queue`: jobs waiting for a worker and jobs leased, on every replica.
#[utoipa::path(
    get,
    path = "/v1/queue",
    tag = "jobs",
    responses(
        (status = 200, description = "The queue", body = wire::QueueView),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn queue(State(st): State<AppState>) -> Result<Json<wire::QueueView>, ApiError> {
    Ok(Json(st.engine.queue_stats().await?.into()))
}
