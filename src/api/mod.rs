//! The HTTP edge: routes, shared state, and the middleware every request passes
//! (metrics, body limit, cross-site refusal, auth on mutating and admin routes).
//!
//! Architecture Invariant: only this module knows HTTP and wire JSON shapes; handlers
//! translate requests into engine calls and engine answers into responses, nothing more.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::config::Secret;
use crate::csv::datasets::DataDir;
use crate::jobs::engine::Engine;
use crate::metrics::{HttpLabels, Metrics, RouteLabels};
use crate::pipeline::Pipeline;
use crate::stats::Query;

pub mod compat;
pub mod cross_site;
pub mod error;
pub mod events;
pub mod ops;
pub mod series;
pub mod server;
pub mod sources;
pub mod storage;
pub mod v1;

use error::{ApiError, BodyLimit};

/// What every handler may use; shared behind one `Arc`, so that handing it to a
/// request costs one reference count.
pub type AppState = Arc<AppContext>;

pub struct AppContext {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    /// `Some` when `--auth-token` is set.
    pub auth: Option<Secret>,
    /// Cancelled to ask the application to drain and stop (`/api/graceful_shutdown`).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// How long `/api/get_results` may hold a poll of an unfinished job (long polling).
    pub poll_hold: std::time::Duration,
    /// `--data-dir`: datasets of `csv.column_sum` jobs.
    pub datasets: DataDir,
    /// `--max-upload-bytes`: largest dataset upload.
    pub max_upload_bytes: u64,
    /// The ordered pipeline behind `POST /v1/events`.
    pub pipeline: Pipeline,
    /// The in-memory live series.
    pub series: Arc<crate::series::store::SeriesStore>,
    /// The published rollups of the live series and their refresh.
    pub rollups: Arc<crate::series::rollup::Rollups>,
    /// `--max-write-bytes`: largest `POST /write` body.
    pub max_write_bytes: usize,
    /// The polled sources (`--source`, `--config`) and their supervision state.
    pub sources: Arc<crate::series::sources::Sources>,
}

impl AppContext {
    pub fn request_shutdown(&self) {
        self.shutdown.cancel();
    }
}

pub struct RouterOptions {
    pub max_body_bytes: usize,
    /// `/api/noop` and `/api/noop_result/{id}`: the benchmark's ceiling.
    pub test_routes: bool,
    /// `--allowed-origin`: other origins whose pages may change state.
    pub allowed_origins: Vec<cross_site::AllowedOrigin>,
}

pub fn router(state: AppState, opts: RouterOptions) -> Router {
    // Routes that change state or administer the service: guarded by the bearer token.
    let mut guarded = Router::new()
        .route("/v1/jobs", post(v1::submit))
        .route("/v1/jobs/{id}", axum::routing::delete(v1::cancel))
        .route("/v1/jobs/{id}/retry", post(v1::retry))
        .route("/v1/events", post(events::submit))
        .route(
            "/write",
            // Line protocol batches get their own, larger limit (--max-write-bytes).
            post(series::write).layer(DefaultBodyLimit::max(state.max_write_bytes)),
        )
        .route("/v1/series/{name}/points", post(series::post_points))
        .route("/v1/series/rollups/refresh", post(series::refresh))
        .route("/api/graceful_shutdown", get(compat::graceful_shutdown))
        .route(
            "/v1/datasets/{name}",
            axum::routing::put(storage::upload)
                .delete(storage::delete)
                // Uploads stream to disk under their own limit (--max-upload-bytes).
                .layer(DefaultBodyLimit::disable()),
        );
    for query in Query::ALL {
        guarded = guarded.route(
            &format!("/api/{}", query.route()),
            post(move |st, headers, body| compat::compute(st, query, headers, body)),
        );
    }
    let guarded = guarded.route_layer(middleware::from_fn_with_state(state.clone(), require_token));

    let mut open = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/jobs", get(v1::list))
        .route("/v1/jobs/stats", get(v1::stats))
        .route("/v1/replicas", get(v1::replicas))
        .route("/v1/queue", get(v1::queue))
        .route("/v1/jobs/{id}", get(v1::get))
        .route("/api/get_results/{id}", get(compat::get_results))
        .route("/api/jobs", get(compat::jobs))
        .route("/api/num_jobs", get(compat::num_jobs))
        .route("/v1/datasets", get(storage::list))
        .route("/getSum", get(series::get_sum))
        .route("/v1/series", get(series::list))
        .route("/v1/series/{name}", get(series::query))
        .route("/v1/series/{name}/rollups", get(series::rollups))
        .route("/v1/sources", get(sources::list))
        .route("/storage/get_counter", get(storage::get_counter))
        .route("/storage/get_json/{id}", get(storage::get_json))
        // Checks --auth-token itself: only `csv_name=` starts work.
        .route(
            "/{segment}",
            get(storage::compat_submit).fallback(ops::not_found),
        );
    if opts.test_routes {
        open = open
            .route("/api/noop", post(compat::noop_submit))
            .route("/api/noop_result/{id}", get(compat::noop_result));
    }

    let limit = opts.max_body_bytes;
    open.merge(guarded)
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        // On every route, present and future: unsafe methods and state-changing GETs
        // from other sites' pages get 403 (inside `track`, so refusals are counted).
        .layer(cross_site::CrossSiteLayer::new(opts.allowed_origins))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(move |mut req: Request, next: Next| {
            req.extensions_mut().insert(BodyLimit(limit));
            next.run(req)
        }))
        .with_state(state)
}

/// Counts every request by route template and status, and times it.
async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| match p.as_str() {
            // The catch-all of `GET /csv_name=<file>` (see storage::compat_submit).
            "/{segment}" if req.uri().path().starts_with("/csv_name=") => "/csv_name={file}",
            "/{segment}" => "unmatched",
            other => other,
        })
        .unwrap_or("unmatched")
        .to_owned();
    let method = match *req.method() {
        Method::GET | Method::POST | Method::PUT | Method::DELETE | Method::HEAD => {
            req.method().to_string()
        }
        _ => "OTHER".to_owned(),
    };
    let started = Instant::now();
    let res = next.run(req).await;
    st.metrics
        .http_duration
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    st.metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credentials of `Authorization: Bearer <token>`. The scheme is case-insensitive
/// and may be followed by more than one space (RFC 9110 §11.1, §11.4).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether a request may use a guarded route: always without `--auth-token`, else only
/// with the token as a bearer credential (compared in constant time).
pub(crate) fn authorized(auth: Option<&Secret>, headers: &HeaderMap) -> bool {
    match auth {
        None => true,
        Some(Secret(token)) => {
            bearer_token(headers).is_some_and(|given| same_secret(given, token.as_bytes()))
        }
    }
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if !authorized(st.auth.as_ref(), req.headers()) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn secrets_compare_by_content_and_length() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_must_match() {
        let token = Secret("s3cret".to_string());
        for (header, ok) in [
            (Some("Bearer s3cret"), true),
            (Some("bearer s3cret"), true),
            (Some("BEARER s3cret"), true),
            (Some("Bearer   s3cret"), true),
            (Some("Bearer s3cret "), true),
            (Some("Bearer wrong"), false),
            (Some("Bearer s3cre"), false),
            (Some("Bearers3cret"), false),
            (Some("Bearer"), false),
            (Some("Bearer "), false),
            (Some("Basic s3cret"), false),
            (Some("Token s3cret"), false),
            (Some("s3cret"), false),
            (None, false),
        ] {
            let mut h = HeaderMap::new();
            if let Some(v) = header {
                h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
            }
            assert_eq!(authorized(Some(&token), &h), ok, "{header:?}");
            assert!(authorized(None, &h), "no token configured: {header:?}");
        }
    }
}
