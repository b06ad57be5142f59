//! The `/api/*` routes, byte-compatible with the "Le Stats Sportif" server
//! (`stats-api.md`): its JSON shapes, its `job_id_N` ids, its error answers
//! (`{"status": "error", "reason": ...}`), and an info log line for every request in
//! and out, with its parameters.

use std::fmt::Write as _;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::error::retry_soon;
use super::ids::Wire;
use super::state::AppState;
use super::wire;
use crate::jobs::engine::SubmitError;
use crate::model::{JobId, JobStatus, NewJob};
use crate::stats::Query;
use crate::store::StoreError;

/// The `/api/<route>` of each computation: the compatible API's names (the job kinds'
/// names are the `stats` module's own).
pub fn route(q: Query) -> &'static str {
    match q {
        Query::StatesMean => "states_mean",
        Query::StateMean => "state_mean",
        Query::Best5 => "best5",
        Query::Worst5 => "worst5",
        Query::GlobalMean => "global_mean",
        Query::DiffFromMean => "diff_from_mean",
        Query::StateDiffFromMean => "state_diff_from_mean",
        Query::MeanByCategory => "mean_by_category",
        Query::StateMeanByCategory => "state_mean_by_category",
    }
}

/// Writes a string the way Python's `repr` does (single quotes unless the text holds a
/// single quote and no double quote), so tuple keys match `str(tuple)` byte for byte.
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `str()` of a Python tuple of strings: the keys of the by-category answers, as the
/// compatible API's clients compare them (injected into the `stats` kinds at start).
pub fn python_tuple(items: &[&str]) -> String {
    let parts: Vec<String> = items.iter().map(|s| py_repr(s)).collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

/// A JSON response from text we built ourselves.
fn json_text(status: StatusCode, body: String) -> Response {
    let json = HeaderValue::from_static("application/json");
    (status, [(header::CONTENT_TYPE, json)], body).into_response()
}

/// The compatible error answer, `{"status": "error", "reason": ...}`.
pub(crate) fn error(status: StatusCode, reason: &str) -> Response {
    compat_error(status, reason.to_string(), None)
}

fn compat_error(status: StatusCode, reason: String, outcome: Option<&'static str>) -> Response {
    let body = super::wire::CompatError {
        status: "error",
        reason,
        outcome,
    };
    (status, Json(body)).into_response()
}

/// A store failure in the compatible shape: 503 with `Retry-After` and the cause when
/// the store is unavailable (a full disk, an unreachable server), an opaque 500
/// otherwise (the cause is logged).
fn store_error(route: &str, e: &StoreError) -> Response {
    tracing::error!(route, error = %e, "store failed");
    if let StoreError::OutcomeUnknown { .. } = e {
        return retry_soon(compat_error(
            StatusCode::SERVICE_UNAVAILABLE,
            // These routes take no Idempotency-Key, so the advice is the job list.
            format!("{e}; the job may exist: look for it in /api/jobs before submitting again"),
            Some("unknown"),
        ));
    }
    if e.is_transient() || matches!(e, StoreError::Closed) {
        retry_soon(error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))
    } else {
        error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
}

/// The body as a JSON object, or the error answer naming what is wrong with it.
/// The error is boxed: a `Response` is large and this is the cold path.
fn parse_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, Box<Response>> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(StatusCode::PAYLOAD_TOO_LARGE, "request body is too large")
        } else {
            error(StatusCode::BAD_REQUEST, &r.body_text())
        }
    })?;
    if !is_json(headers) {
        return Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected 'Content-Type: application/json'",
        )));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("malformed JSON body: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "the JSON body must be an object",
        )));
    }
    Ok(v)
}

/// POST `/api/<route>`: queue the computation, answer `{"job_id": "job_id_N"}`.
/// Bad params still get an id; the job's result then names the problem.
pub async fn compute(
    State(st): State<AppState>,
    query: Query,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let route = route(query);
    let params = match parse_body(&headers, body) {
        Ok(p) => p,
        Err(res) => {
            tracing::info!(
                route,
                status = res.status().as_u16(),
                "api request rejected"
            );
            return *res;
        }
    };
    tracing::info!(
        route,
        question = params
            .get("question")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(""),
        state = params
            .get("state")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(""),
        "api request in"
    );
    let submitted = st
        .engine
        .submit(
            // The compat routes take no Idempotency-Key (the original API had none).
            NewJob::new(query.kind(), params),
            false,
        )
        .await;
    let res = match submitted {
        Ok(submitted) => {
            let id = submitted.id;
            tracing::info!(route, job_id = %Wire(id), "api response out");
            return json_text(StatusCode::OK, format!("{{\"job_id\":\"{}\"}}", Wire(id)));
        }
        Err(SubmitError::ShuttingDown) => error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        Err(e @ SubmitError::QueueFull { .. }) => {
            retry_soon(error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))
        }
        Err(SubmitError::Store(e)) => store_error(route, &e),
        // Compatible routes skip validation, always name a registered kind and send no
        // idempotency key.
        Err(
            e @ (SubmitError::UnknownKind { .. }
            | SubmitError::InvalidParams { .. }
            | SubmitError::KeyReused { .. }),
        ) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    tracing::info!(route, status = res.status().as_u16(), "api response out");
    res
}

#[utoipa::path(
    get,
    path = "/api/get_results/{id}",
    tag = "statistics",
    params(("id" = String, Path, description = "`job_id_N`")),
    responses(
        (status = 200, description = "`running`, `done` with `data`, or `error` with `reason`", body = wire::CompatResult),
        (status = 404, description = "Invalid job_id", body = wire::CompatError),
        (status = 503, description = "Store unavailable", body = wire::CompatError),
    )
)]
pub async fn get_results(State(st): State<AppState>, Path(raw): Path<String>) -> Response {
    tracing::info!(route = "get_results", job_id = %raw, "api request in");
    let res = match crate::api::ids::parse(&raw) {
        None => error(StatusCode::NOT_FOUND, "Invalid job_id"),
        // A job still in flight here may finish within the poll hold: answer then,
        // rather than "running" now and again at the client's next poll. A job still
        // in flight after the hold answers from memory, without a store read.
        Some(id)
            if {
                st.engine.wait_finished(id, st.poll_hold).await;
                st.engine.is_in_flight(id)
            } =>
        {
            json_text(StatusCode::OK, r#"{"status":"running"}"#.to_string())
        }
        Some(id) => match st.engine.state(id).await {
            Err(e) => store_error("get_results", &e),
            Ok(None) => error(StatusCode::NOT_FOUND, "Invalid job_id"),
            Ok(Some(r)) => match r.status {
                JobStatus::Queued | JobStatus::Running => {
                    json_text(StatusCode::OK, r#"{"status":"running"}"#.to_string())
                }
                JobStatus::Done => json_text(
                    StatusCode::OK,
                    format!(
                        "{{\"status\":\"done\",\"data\":{}}}",
                        r.result.as_deref().unwrap_or("null")
                    ),
                ),
                JobStatus::Failed | JobStatus::Cancelled => {
                    error(StatusCode::OK, r.error.as_deref().unwrap_or("failed"))
                }
            },
        },
    };
    tracing::info!(route = "get_results", job_id = %raw, status = res.status().as_u16(), "api response out");
    res
}

/// Rows of `/api/jobs` read from the store per chunk of the answer.
const JOBS_PAGE: usize = 4096;

/// `{"status": "done", "data": [{"job_id_1": "done"}, {"job_id_2": "running"}]}`;
/// a job that failed is "done" here (its result carries the error), as in the original.
/// Streamed a page of the store at a time, so a long history costs no more memory than
/// a page (a store error midway ends the answer early; it is logged).
#[utoipa::path(
    get,
    path = "/api/jobs",
    tag = "statistics",
    responses(
        (status = 200, description = "Every job and its state", body = wire::CompatJobs),
        (status = 503, description = "Store unavailable", body = wire::CompatError),
    )
)]
pub async fn jobs(State(st): State<AppState>) -> Response {
    tracing::info!(route = "jobs", "api request in");
    // The first page is read before answering, so a store that cannot answer at all
    // gets a proper error rather than a broken 200.
    let first = match st.engine.statuses(None, JOBS_PAGE).await {
        Ok(a) => a,
        Err(e) => return store_error("jobs", &e),
    };
    struct Listing {
        st: AppState,
        page: Option<Vec<(JobId, JobStatus)>>,
        sent: usize,
        opened: bool,
    }
    let listing = Listing {
        st,
        page: Some(first),
        sent: 0,
        opened: false,
    };
    let body = futures_util::stream::unfold(listing, |mut l| async move {
        let mut out = String::new();
        if !l.opened {
            l.opened = true;
            out.push_str(r#"{"status":"done","data":["#);
        }
        let page = match l.page.take() {
            Some(p) => p,
            None => return None,
        };
        let last = page.last().map(|(id, _)| *id);
        let full = page.len() == JOBS_PAGE;
        out.reserve(page.len() * 24);
        for (id, status) in &page {
            if l.sent > 0 {
                out.push(',');
            }
            l.sent += 1;
            let s = if status.is_finished() {
                "done"
            } else {
                "running"
            };
            let _ = write!(out, "{{\"{}\":\"{s}\"}}", Wire(*id));
        }
        if full {
            match l.st.engine.statuses(last, JOBS_PAGE).await {
                Ok(next) => l.page = Some(next),
                Err(e) => {
                    tracing::error!(error = %e, "store failed while listing jobs; the answer is cut short");
                    return Some((Err(std::io::Error::other(e.to_string())), l));
                }
            }
        } else {
            out.push_str("]}");
            tracing::info!(route = "jobs", jobs = l.sent, "api response out");
        }
        Some((Ok::<_, std::io::Error>(out), l))
    });
    // Fused: the compression layer polls a body once more after its end.
    let body = axum::body::Body::from_stream(futures_util::StreamExt::fuse(body));
    let json = HeaderValue::from_static("application/json");
    ([(header::CONTENT_TYPE, json)], body).into_response()
}

#[utoipa::path(
    get,
    path = "/api/num_jobs",
    tag = "statistics",
    responses(
        (status = 200, description = "Jobs not yet finished", body = wire::NumJobs),
        (status = 503, description = "Store unavailable", body = wire::CompatError),
    )
)]
pub async fn num_jobs(State(st): State<AppState>) -> Response {
    tracing::info!(route = "num_jobs", "api request in");
    match st.engine.counts().await {
        Ok(c) => {
            tracing::info!(
                route = "num_jobs",
                num_jobs = c.in_progress(),
                "api response out"
            );
            Json(wire::NumJobs {
                num_jobs: c.in_progress(),
            })
            .into_response()
        }
        Err(e) => store_error("num_jobs", &e),
    }
}

/// Starts the drain (idempotent) and says whether work remains.
#[utoipa::path(
    get,
    path = "/api/graceful_shutdown",
    tag = "statistics",
    responses((status = 200, description = "Draining; `done` once no job is left", body = wire::ShutdownStatus))
)]
pub async fn graceful_shutdown(State(st): State<AppState>) -> Response {
    tracing::info!(route = "graceful_shutdown", "api request in");
    st.engine.begin_drain();
    st.request_shutdown();
    let remaining = st.engine.live_jobs();
    let status = if remaining == 0 { "done" } else { "running" };
    tracing::info!(
        route = "graceful_shutdown",
        remaining,
        status,
        "api response out"
    );
    Json(wire::ShutdownStatus { status }).into_response()
}

/// The benchmark's ceiling: parses the body like a real route, touches nothing.
#[utoipa::path(
    post,
    path = "/api/noop",
    tag = "statistics",
    description = "Only with --enable-test-jobs: parses the body like a statistics route, runs nothing.",
    request_body = wire::CompatQuestion,
    responses(
        (status = 200, description = "Always `job_id_0`", body = wire::CompatJobId),
    )
)]
pub async fn noop_submit(headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    match parse_body(&headers, body) {
        Ok(_) => json_text(StatusCode::OK, r#"{"job_id":"job_id_0"}"#.to_string()),
        Err(res) => *res,
    }
}

#[utoipa::path(
    get,
    path = "/api/noop_result/{id}",
    tag = "statistics",
    description = "Only with --enable-test-jobs: an empty result for any id.",
    params(("id" = String, Path)),
    responses((status = 200, description = "Always done", body = wire::CompatResult))
)]
pub async fn noop_result(Path(_id): Path<String>) -> Response {
    json_text(StatusCode::OK, r#"{"status":"done","data":{}}"#.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_matches_python() {
        // Expected strings written as Python 3 prints them.
        let cases = [
            (
                vec!["Alabama", "Income", "$15,000 - $24,999"],
                "('Alabama', 'Income', '$15,000 - $24,999')",
            ),
            (
                vec!["Guam", "Education", "Don't know"],
                "('Guam', 'Education', \"Don't know\")",
            ),
            (vec!["a'b\"c", "x"], "('a\\'b\"c', 'x')"),
            (vec!["back\\slash", "tab\t"], "('back\\\\slash', 'tab\\t')"),
            (vec!["one"], "('one',)"),
        ];
        for (items, expect) in cases {
            assert_eq!(python_tuple(&items), expect);
        }
    }

    #[test]
    fn json_content_types_are_recognised() {
        let cases = [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/problem+json", true),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
        ];
        for (ct, expect) in cases {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            assert_eq!(is_json(&h), expect, "{ct}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }
}
