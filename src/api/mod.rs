//! The HTTP edge: routes, shared state, and the middleware every request passes
//! (metrics, body limit, cross-site refusal, auth on mutating and admin routes).
//!
//! Architecture Invariant: only this module knows HTTP and wire JSON shapes; handlers
//! translate requests into engine calls and engine answers into responses, nothing more.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::add_extension::AddExtensionLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::metrics::{HttpLabels, RouteLabels};
use crate::stats::Query;

pub mod auth;
pub mod bulk;
pub mod compat;
pub mod cross_site;
pub mod dashboard;
pub mod encoding;
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
pub mod state;
pub mod storage;
pub mod stream;
pub mod v1;
pub mod wire;

use auth::authorized;
use error::{ApiError, BodyLimit};
use routes::{RouteEntry, Routes};
pub use state::{AppContext, AppState, HttpMetrics};

pub struct RouterOptions {
    pub max_body_bytes: usize,
    /// `/api/noop` and `/api/noop_result/{id}`: the benchmark's ceiling.
    pub test_routes: bool,
    /// `--allowed-origin`: other origins whose pages may change state.
    pub allowed_origins: Vec<crate::origin::AllowedOrigin>,
    /// The `Host` names served (loopback, the listening addresses, `--allowed-host`).
    pub hosts: crate::origin::HostPolicy,
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
        .get("/v1/overview/history", overview::history)
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
    let routes = routes
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed);
    // Preflights of `--allowed-origin` pages are answered before routing (they would get
    // 405), and their answers carry the CORS headers.
    let routes = match cross_site::cors(&opts.allowed_origins) {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes
        // On every route, present and future: a Host the service is not reachable as gets
        // 421, unsafe methods and state-changing GETs from other sites' pages get 403
        // (inside `track`, so refusals are counted).
        .layer(cross_site::CrossSiteLayer::new(
            opts.allowed_origins,
            opts.hosts,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(limit))
        // The limit, for the errors that name it.
        .layer(AddExtensionLayer::new(BodyLimit(limit)))
        // A panic in a handler answers a problem document instead of dropping the
        // connection (input never panics on purpose; this is the net under it).
        .layer(CatchPanicLayer::custom(panicked))
        // Answers of 1 KiB or more (the dashboard's assets, the API reference, listings)
        // compressed for a client that asks (gzip or br); the small hot JSON answers and
        // event streams never (a compressor costs more than it saves on a few hundred
        // bytes, and would hold back a stream's events).
        .layer(compression())
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

/// Response compression (tower-http), by the client's `Accept-Encoding`.
fn compression(
) -> tower_http::compression::CompressionLayer<impl tower_http::compression::Predicate> {
    use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
    tower_http::compression::CompressionLayer::new().compress_when(
        SizeAbove::new(1024)
            .and(NotForContentType::GRPC)
            .and(NotForContentType::IMAGES)
            .and(NotForContentType::SSE),
    )
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

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if !authorized(st.auth.as_ref(), req.headers()) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}
