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
use axum::routing::get;
use axum::Router;
use tower_http::add_extension::AddExtensionLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::config::Secret;
use crate::csv::datasets::DataDir;
use crate::jobs::engine::Engine;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{seconds_histogram, HistogramFamily, HttpLabels, Metrics, RouteLabels};
use crate::pipeline::Pipeline;
use crate::stats::Query;

pub mod bulk;
pub mod compat;
pub mod cross_site;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod ids;
pub mod openapi;
pub mod ops;
pub mod overview;
pub mod routes;
pub mod series;
pub mod server;
pub mod sources;
pub mod storage;
pub mod stream;
pub mod v1;
pub mod wire;

use error::{ApiError, BodyLimit};
use routes::{RouteEntry, Routes};

/// What every handler may use; shared behind one `Arc`, so that handing it to a
/// request costs one reference count.
pub type AppState = Arc<AppContext>;

pub struct AppContext {
    pub engine: Engine,
    /// The shared registry (`/metrics` renders it; each subsystem registered its own
    /// families on it when it was built).
    pub metrics: Arc<Metrics>,
    /// Requests by route and status, and their latency.
    pub http_metrics: HttpMetrics,
    /// Open, refused and timed-out connections of every listener.
    pub server_metrics: Arc<server::ServerMetrics>,
    /// Values owned by the store and the queue, sampled when `/metrics` is scraped.
    pub gauges: ops::Gauges,
    /// `Some` when `--auth-token` is set.
    pub auth: Option<Secret>,
    /// Cancelled to ask the application to drain and stop (`/api/graceful_shutdown`).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// `--idempotency-ttl`: how long a submission's `Idempotency-Key` holds.
    pub idempotency_ttl: std::time::Duration,
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
    /// Line-protocol ingest into `series` (`POST /write` and the TCP listener).
    pub ingest: Arc<crate::series::ingest::Ingester>,
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
    pub allowed_origins: Vec<crate::origin::AllowedOrigin>,
}

/// The routes, open and guarded, without their state or middleware: what
/// [`route_list`] lists and [`router`] serves. `openapi_json` answers `/openapi.json`.
fn tables(
    opts: &RouterOptions,
    max_write_bytes: usize,
    openapi_json: Arc<std::sync::OnceLock<String>>,
) -> (Routes, Routes) {
    // Routes that change state or administer the service: guarded by the bearer token.
    let mut guarded = Routes::guarded()
        .post("/v1/jobs", v1::submit)
        .post("/v1/jobs/cancel", bulk::cancel)
        .post("/v1/jobs/retry", bulk::retry)
        .delete("/v1/jobs/{id}", v1::cancel)
        .post("/v1/jobs/{id}/retry", v1::retry)
        .post("/v1/events", events::submit)
        // Line protocol batches get their own, larger limit (--max-write-bytes).
        .post_with("/write", series::write, |r| {
            r.layer(DefaultBodyLimit::max(max_write_bytes))
        })
        .post("/v1/series/{name}/points", series::post_points)
        .post("/v1/series/rollups/refresh", series::refresh)
        .get("/api/graceful_shutdown", compat::graceful_shutdown)
        // Uploads stream to disk under their own limit (--max-upload-bytes).
        .put_with("/v1/datasets/{name}", storage::upload, |r| {
            r.layer(DefaultBodyLimit::disable())
        })
        .delete("/v1/datasets/{name}", storage::delete);
    for query in Query::ALL {
        guarded = guarded.post(
            &format!("/api/{}", compat::route(query)),
            move |st, headers, body| compat::compute(st, query, headers, body),
        );
    }

    let mut open = Routes::open()
        .get("/", dashboard::index)
        .get("/docs", dashboard::reference)
        // OpenAPI has no catch-all segment: the description names it `{path}`.
        .add(
            Method::GET,
            "/ui/{*path}",
            get(dashboard::asset),
            Some("/ui/{path}"),
        )
        .get("/openapi.json", move || openapi::serve(openapi_json))
        .get("/healthz", ops::healthz)
        .get("/readyz", ops::readyz)
        .get("/metrics", ops::metrics)
        .get("/v1/jobs", v1::list)
        .get("/v1/jobs/stats", v1::stats)
        .get("/v1/overview", overview::overview)
        .get("/v1/pipeline", overview::pipeline)
        .get("/v1/stream", stream::stream)
        .get("/v1/replicas", v1::replicas)
        .get("/v1/queue", v1::queue)
        .get("/v1/jobs/{id}", v1::get)
        .get("/api/get_results/{id}", compat::get_results)
        .get("/api/jobs", compat::jobs)
        .get("/api/num_jobs", compat::num_jobs)
        .get("/v1/datasets", storage::list)
        .get("/getSum", series::get_sum)
        .get("/v1/series", series::list)
        .get("/v1/series/{name}", series::query)
        .get("/v1/series/{name}/rollups", series::rollups)
        .get("/v1/sources", sources::list)
        .get("/storage/get_counter", storage::get_counter)
        .get("/storage/get_json/{id}", storage::get_json)
        // Checks --auth-token itself: only `csv_name=` starts work.
        .add(
            Method::GET,
            "/{segment}",
            get(storage::compat_submit).fallback(ops::not_found),
            Some("/csv_name={file}"),
        );
    if opts.test_routes {
        open = open
            .post("/api/noop", compat::noop_submit)
            .get("/api/noop_result/{id}", compat::noop_result);
    }
    (guarded, open)
}

/// Every `(method, path)` the router of these options serves (HEAD aside, which axum
/// answers wherever GET is).
pub fn route_list(opts: &RouterOptions) -> Vec<RouteEntry> {
    let (guarded, open) = tables(opts, 0, Arc::default());
    open.merge(guarded).into_parts().1
}

pub fn router(state: AppState, opts: RouterOptions) -> Router {
    let openapi_json = Arc::new(std::sync::OnceLock::new());
    let (guarded, open) = tables(&opts, state.max_write_bytes, openapi_json.clone());
    let guarded = guarded.map_router(|r| {
        r.route_layer(middleware::from_fn_with_state(state.clone(), require_token))
    });
    let (routes, list) = open.merge(guarded).into_parts();
    let kinds: Vec<String> = state.engine.registry().kinds().map(str::to_owned).collect();
    let _ = openapi_json.set(openapi::document(&list, &kinds).to_string());

    let limit = opts.max_body_bytes;
    routes
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        // On every route, present and future: unsafe methods and state-changing GETs
        // from other sites' pages get 403 (inside `track`, so refusals are counted).
        .layer(cross_site::CrossSiteLayer::new(opts.allowed_origins))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(limit))
        // The limit, for the errors that name it.
        .layer(AddExtensionLayer::new(BodyLimit(limit)))
        // A panic in a handler answers a problem document instead of dropping the
        // connection (input never panics on purpose; this is the net under it).
        .layer(CatchPanicLayer::custom(panicked))
        // A span per request at debug level (off by default: free); the bearer token
        // never shows in it.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .with_state(state)
}

/// The answer to a request whose handler panicked: logged with its message, answered as
/// an opaque 500.
fn panicked(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let msg = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    ApiError::Internal(format!("a handler panicked: {msg}")).into_response()
}

/// The HTTP edge's request families (`tally_http_requests`, `..._duration_seconds`).
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
}

impl HttpMetrics {
    pub fn register(m: &Metrics) -> Self {
        let h = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
        };
        m.register(
            "http_requests",
            "HTTP requests, by route and status",
            h.requests.clone(),
        );
        m.register(
            "http_request_duration_seconds",
            "HTTP request latency, by route",
            h.duration.clone(),
        );
        h
    }
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
    st.http_metrics
        .duration
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    st.http_metrics
        .requests
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
