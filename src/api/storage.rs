//! Datasets and the CSV column-sum routes: `GET /v1/datasets`, `PUT` and `DELETE
//! /v1/datasets/{name}` (uploads stream to a temporary file, are fsynced and renamed,
//! under `--max-upload-bytes`), and the routes of the original storage service:
//! `GET /csv_name=<file>`, `GET /storage/get_counter`, `GET /storage/get_json/{id}`.

use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::error::ApiError;
use super::state::AppState;
use super::wire;
use crate::csv::datasets::{check_name, DatasetError};
use crate::csv::job::KIND;
use crate::model::{JobStatus, NewJob};

impl From<DatasetError> for ApiError {
    fn from(e: DatasetError) -> Self {
        match e {
            DatasetError::BadName { .. } | DatasetError::NotAFile(_) => {
                ApiError::BadRequest(e.to_string())
            }
            DatasetError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DatasetError::Io { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::Internal(format!("file task failed: {e}"))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `{"datasets": [{"name", "size", "modified"}]}`, sorted by name.
#[utoipa::path(
    get,
    path = "/v1/datasets",
    tag = "csv",
    responses(
        (status = 200, description = "The datasets, by name", body = wire::Datasets),
        (status = 500, description = "The data directory cannot be read"),
    )
)]
pub async fn list(State(st): State<AppState>) -> Result<Json<wire::Datasets>, ApiError> {
    let dir = st.datasets.clone();
    let all = tokio::task::spawn_blocking(move || dir.list())
        .await
        .map_err(join_error)??;
    let datasets = all
        .into_iter()
        .map(|d| wire::Dataset {
            name: d.name,
            size: d.size,
            modified: d.modified.map(rfc3339),
        })
        .collect();
    Ok(Json(wire::Datasets { datasets }))
}

/// Streams the body to a temporary file, then renames it into place: a reader never
/// sees half a dataset, and a failed or too large upload leaves the old one.
#[utoipa::path(
    put,
    path = "/v1/datasets/{name}",
    tag = "csv",
    params(("name" = String, Path, description = "A plain file name")),
    request_body(content = String, description = "The CSV", content_type = "text/csv"),
    responses(
        (status = 201, description = "Created", body = wire::Uploaded),
        (status = 200, description = "Replaced", body = wire::Uploaded),
        (status = 400, description = "A bad name, or a link or directory in the way"),
        (status = 413, description = "Over --max-upload-bytes"),
    )
)]
pub async fn upload(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let limit = st.max_upload_bytes;
    let too_large = || ApiError::PayloadTooLarge(usize::try_from(limit).unwrap_or(usize::MAX));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let dir = st.datasets.clone();
    let n = name.clone();
    let (replaced, (upload, file)) = tokio::task::spawn_blocking(move || {
        // Replacing a regular file is fine; a link or a directory in the way is refused.
        let replaced = match dir.check_exists(&n) {
            Ok(()) => true,
            Err(DatasetError::NotFound(_)) => false,
            Err(e) => return Err(e),
        };
        dir.begin_upload(&n).map(|u| (replaced, u))
    })
    .await
    .map_err(join_error)??;
    let mut out = tokio::fs::File::from_std(file);
    let mut body = body;
    let mut written: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("upload interrupted: {e}")))?;
        if let Ok(data) = frame.into_data() {
            written += data.len() as u64;
            if written > limit {
                return Err(too_large());
            }
            out.write_all(&data)
                .await
                .map_err(|e| ApiError::Internal(format!("writing upload {name:?}: {e}")))?;
        }
    }
    out.flush()
        .await
        .map_err(|e| ApiError::Internal(format!("writing upload {name:?}: {e}")))?;
    let file = out.into_std().await;
    tokio::task::spawn_blocking(move || upload.commit(file))
        .await
        .map_err(join_error)??;
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(wire::Uploaded {
            name,
            size: written,
        }),
    )
        .into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/datasets/{name}",
    tag = "csv",
    params(("name" = String, Path, description = "A plain file name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A bad name"),
        (status = 404, description = "No such dataset"),
    )
)]
pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let dir = st.datasets.clone();
    tokio::task::spawn_blocking(move || dir.delete(&name))
        .await
        .map_err(join_error)??;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /csv_name=<file>`: starts a `csv.column_sum` job with the defaults (every 10th
/// column from the first). axum cannot match a prefix inside a segment, so this answers
/// every one-segment GET that no other route took, and 404 when it is not `csv_name=`.
#[utoipa::path(
    get,
    path = "/csv_name={file}",
    tag = "csv",
    params(("file" = String, Path, description = "A dataset in --data-dir")),
    responses(
        (status = 200, description = "A `csv.column_sum` job (every 10th column) started", body = wire::CsvStarted),
        (status = 400, description = "A bad name"),
        (status = 404, description = "Not a `csv_name=` path"),
        (status = 503, description = "Queue full, shutting down or store unavailable"),
    )
)]
pub async fn compat_submit(
    State(st): State<AppState>,
    Path(segment): Path<String>,
    headers: HeaderMap,
) -> Result<Json<wire::CsvStarted>, ApiError> {
    let Some(name) = segment.strip_prefix("csv_name=") else {
        return Err(ApiError::NotFound(format!(
            "no route for {} /{segment}",
            Method::GET
        )));
    };
    // Starting work is guarded like the other mutating routes (this route lives in the
    // open router so that unknown one-segment paths stay 404 rather than 401).
    if !super::auth::authorized(st.auth.as_ref(), &headers) {
        return Err(ApiError::Unauthorized);
    }
    check_name(name)?;
    // A link or a directory is refused now. Like the other compatible routes, the job is
    // not validated further: a missing file is reported in the task's result.
    let dir = st.datasets.clone();
    let n = name.to_string();
    match tokio::task::spawn_blocking(move || dir.check_exists(&n))
        .await
        .map_err(join_error)?
    {
        Ok(()) | Err(DatasetError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let id = st
        .engine
        .submit(NewJob::new(KIND, json!({ "dataset": name })), false)
        .await?
        .id;
    Ok(Json(wire::CsvStarted {
        id: crate::api::ids::text(id),
    }))
}

/// The number of tasks in progress (queued or running), as a bare JSON number.
#[utoipa::path(
    get,
    path = "/storage/get_counter",
    tag = "csv",
    responses(
        (status = 200, description = "Tasks queued or running, as a bare number", body = u64, content_type = "application/json"),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn get_counter(State(st): State<AppState>) -> Result<Json<u64>, ApiError> {
    Ok(Json(st.engine.counts().await?.in_progress()))
}

/// A task's state in the storage service's shape.
fn storage_status(status: &'static str, error: Option<String>) -> Json<wire::StorageStatus> {
    Json(wire::StorageStatus { status, error })
}

/// The result JSON of a finished task; `{"status": "running"}` while it is not;
/// `{"status": "error", "error": ...}` (404) for an unknown id; the failure as
/// `{"status": "failed"|"cancelled", "error": ...}` for a task that did not succeed.
#[utoipa::path(
    get,
    path = "/storage/get_json/{id}",
    tag = "csv",
    params(("id" = String, Path, description = "`job_id_N`")),
    responses(
        (status = 200, description = "The result JSON once done, else `{\"status\": ...}`", body = Value),
        (status = 404, description = "No such task", body = wire::StorageStatus),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn get_json(State(st): State<AppState>, Path(raw): Path<String>) -> Response {
    let unknown = || {
        (
            StatusCode::NOT_FOUND,
            storage_status("error", Some(format!("no task with id {raw:?}"))),
        )
            .into_response()
    };
    let Some(id) = crate::api::ids::parse(&raw) else {
        return unknown();
    };
    if st.engine.is_in_flight(id) {
        return storage_status("running", None).into_response();
    }
    match st.engine.state(id).await {
        Err(e) => ApiError::from(e).into_response(),
        Ok(None) => unknown(),
        Ok(Some(r)) => match r.status {
            JobStatus::Queued | JobStatus::Running => {
                storage_status("running", None).into_response()
            }
            JobStatus::Done => {
                let json = HeaderValue::from_static("application/json");
                let body = r.result.unwrap_or_else(|| "null".into());
                ([(header::CONTENT_TYPE, json)], body).into_response()
            }
            s @ (JobStatus::Failed | JobStatus::Cancelled) => storage_status(
                s.as_str(),
                Some(r.error.unwrap_or_else(|| s.as_str().to_string())),
            )
            .into_response(),
        },
    }
}
