//! Errors at the HTTP edge: one enum, rendered as `application/problem+json` (RFC 9457)
//! with a human `detail`. Internal causes are logged and answered with an opaque 500.
//! Also the JSON extractor that turns every body rejection into that same shape.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use super::ids::Wire;
use super::wire::Problem;
use crate::jobs::engine::{CancelError, RetryError, SubmitError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    /// A submission's `Idempotency-Key` already made another request's job (422; the
    /// problem body names it in `job_id`).
    #[error(
        "the Idempotency-Key was already used for a different request (another kind or params), which made job {}; send a new key for a new job",
        Wire(*.0)
    )]
    IdempotencyKeyReused(crate::model::JobId),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("this route needs 'Authorization: Bearer <token>' with the server's token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The `Host` header names something this service does not answer to.
    #[error("{0}")]
    Misdirected(String),
    #[error("{0}")]
    QueueFull(String),
    #[error("the service is shutting down and takes no new work")]
    ShuttingDown,
    /// A dependency (the store) cannot serve right now; the detail names it and why.
    #[error("{0}")]
    Unavailable(String),
    /// A submission was sent to the store and its answer never came: the job may exist.
    /// The problem body says `"outcome": "unknown"`.
    #[error(
        "{0}; retry with the same Idempotency-Key header to get that job rather than a second one"
    )]
    OutcomeUnknown(String),
    /// The cause is logged, never sent to the client.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) | ApiError::IdempotencyKeyReused(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::QueueFull(_)
            | ApiError::ShuttingDown
            | ApiError::Unavailable(_)
            | ApiError::OutcomeUnknown(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: &str = "1";

/// `res` with `Retry-After` ([`RETRY_AFTER_SECS`]): a 503 the client may try again soon.
pub fn retry_soon(res: impl IntoResponse) -> Response {
    let wait = HeaderValue::from_static(RETRY_AFTER_SECS);
    ([(header::RETRY_AFTER, wait)], res).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(%cause, "internal error");
        }
        let mut body = Problem::new(status, self.to_string());
        match &self {
            ApiError::OutcomeUnknown(_) => body.outcome = Some("unknown"),
            ApiError::IdempotencyKeyReused(id) => body.job_id = Some(Wire(*id).to_string()),
            _ => {}
        }
        let problem = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )];
        let res = (status, problem, Json(body)).into_response();
        match self {
            ApiError::QueueFull(_)
            | ApiError::ShuttingDown
            | ApiError::Unavailable(_)
            | ApiError::OutcomeUnknown(_) => retry_soon(res),
            ApiError::Unauthorized => {
                let bearer = HeaderValue::from_static("Bearer");
                ([(header::WWW_AUTHENTICATE, bearer)], res).into_response()
            }
            _ => res,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // Transient: the client may retry; the detail says what is wrong (a full
            // disk, an unreachable Redis), which is the operator's, not a secret.
            StoreError::Unavailable { .. } | StoreError::Io(_) | StoreError::Closed => {
                tracing::warn!(error = %e, "store unavailable");
                ApiError::Unavailable(e.to_string())
            }
            StoreError::OutcomeUnknown { .. } => {
                tracing::warn!(error = %e, "store did not answer a write");
                ApiError::OutcomeUnknown(e.to_string())
            }
            StoreError::Failed { .. }
            | StoreError::Rejected { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Locked(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::UnknownKind { .. } => ApiError::BadRequest(e.to_string()),
            SubmitError::InvalidParams { .. } => ApiError::Unprocessable(e.to_string()),
            SubmitError::QueueFull { .. } => ApiError::QueueFull(e.to_string()),
            SubmitError::ShuttingDown => ApiError::ShuttingDown,
            SubmitError::KeyReused { id } => ApiError::IdempotencyKeyReused(id),
            SubmitError::Store(s) => s.into(),
        }
    }
}

/// A refused cancel in words, with the job's id as clients write it.
pub fn cancel_refusal(e: &CancelError) -> String {
    match e {
        CancelError::NotFound(id) => format!("job {} not found", Wire(*id)),
        CancelError::AlreadyFinished { id, status } => {
            format!("job {} already {}", Wire(*id), status.as_str())
        }
        CancelError::Store(s) => s.to_string(),
    }
}

/// A refused retry in words, with the job's id as clients write it.
pub fn retry_refusal(e: &RetryError) -> String {
    match e {
        RetryError::NotFound(id) => format!("job {} not found", Wire(*id)),
        RetryError::NotRetryable { id, status } => format!(
            "job {} is {}; only failed or cancelled jobs run again",
            Wire(*id),
            status.as_str()
        ),
        RetryError::ShuttingDown | RetryError::QueueFull { .. } | RetryError::Store(_) => {
            e.to_string()
        }
    }
}

impl From<CancelError> for ApiError {
    fn from(e: CancelError) -> Self {
        match e {
            CancelError::NotFound(_) => ApiError::NotFound(cancel_refusal(&e)),
            CancelError::AlreadyFinished { .. } => ApiError::Conflict(cancel_refusal(&e)),
            CancelError::Store(s) => s.into(),
        }
    }
}

impl From<RetryError> for ApiError {
    fn from(e: RetryError) -> Self {
        match e {
            RetryError::NotFound(_) => ApiError::NotFound(retry_refusal(&e)),
            RetryError::NotRetryable { .. } => ApiError::Conflict(retry_refusal(&e)),
            RetryError::ShuttingDown => ApiError::ShuttingDown,
            RetryError::QueueFull { .. } => ApiError::QueueFull(e.to_string()),
            RetryError::Store(s) => s.into(),
        }
    }
}

impl From<super::encoding::BodyError> for ApiError {
    fn from(e: super::encoding::BodyError) -> Self {
        use super::encoding::BodyError;
        match e {
            BodyError::Unsupported(_) => ApiError::UnsupportedMediaType(e.to_string()),
            BodyError::TooLarge(limit) => ApiError::PayloadTooLarge(limit),
            BodyError::Corrupt(_) => ApiError::BadRequest(e.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = r.body_text();
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::BadRequest(text),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ApiError::UnsupportedMediaType("expected 'Content-Type: application/json'".into())
            }
            StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(text),
            _ => ApiError::BadRequest(text),
        }
    }
}

/// `Json<T>` whose rejections are problem documents.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        let req = inflated(req, limit.unwrap_or(usize::MAX))
            .await
            .map_err(IntoResponse::into_response)?;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge(limit.unwrap_or(0)).into_response())
            }
            Err(r) => Err(ApiError::from(r).into_response()),
        }
    }
}

/// The request with a gzip body inflated (both sizes under `limit`, see `encoding.rs`);
/// an uncompressed one as it is.
async fn inflated(req: Request, limit: usize) -> Result<Request, ApiError> {
    use super::encoding::{self, Encoding};
    if encoding::of(req.headers())? == Encoding::Identity {
        return Ok(req);
    }
    let (mut parts, body) = req.into_parts();
    let gzip = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(limit))?;
    let plain = tokio::task::spawn_blocking(move || {
        let mut plain = Vec::new();
        encoding::gunzip_into(&gzip, &mut plain, limit).map(|()| plain)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Request::from_parts(parts, axum::body::Body::from(plain)))
}

/// The configured body limit, put in request extensions so errors can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);
