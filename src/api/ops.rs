//! Operational routes: liveness, readiness, Prometheus metrics, and the answers for
//! unknown routes and methods.

use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::{retry_soon, ApiError};
use super::state::AppState;
use super::wire;
use crate::model::JobStatus;

use crate::metrics::StateLabels;

/// Alive: answers without touching the store or the workers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = wire::Health))
)]
pub async fn healthz() -> Json<wire::Health> {
    Json(wire::Health::is("ok"))
}

/// Ready to take work: 503 while draining, and while the store cannot write (with the
/// cause; it turns ready again by itself once the store recovers).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = wire::Health),
        (status = 503, description = "Draining, or the store cannot write", body = wire::Health),
    )
)]
pub async fn readyz(State(st): State<AppState>) -> Response {
    if st.engine.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(wire::Health::is("draining")),
        )
            .into_response();
    }
    match st.engine.store_health().and_then(|()| st.pipeline.health()) {
        Ok(()) => Json(wire::Health::is("ready")).into_response(),
        Err(cause) => retry_soon((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(wire::Health {
                status: "unavailable",
                detail: Some(cause),
            }),
        )),
    }
}

/// `GET /metrics`: Prometheus/OpenMetrics text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Every metric", content_type = "application/openmetrics-text", body = String))
)]
pub async fn metrics(State(st): State<AppState>) -> Response {
    // Values owned by the store are sampled at scrape time.
    if let Ok(c) = st.engine.counts().await {
        let mut c = c;
        for s in JobStatus::ALL {
            st.gauges
                .jobs_in_store
                .get_or_create(&StateLabels {
                    state: s.as_str().to_string(),
                })
                .set(*c.slot(s) as i64);
        }
    }
    st.gauges.sample_evictions(st.engine.store_evictions());
    // The queue as a whole (every replica's, with Redis).
    if let Ok(q) = st.engine.queue_stats().await {
        st.gauges.queue_depth.set(q.waiting as i64);
        st.gauges.queue_leased.set(q.leased as i64);
    }
    let text =
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
    ([(header::CONTENT_TYPE, text)], st.metrics.render()).into_response()
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
