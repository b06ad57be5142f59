//! `GET /v1/sources`: the polled sources and their supervision state.

use axum::extract::State;
use axum::Json;

use super::state::AppState;
use super::wire::{self, rfc3339};

/// `GET /v1/sources`: `{"sources": [{name, kind, url, series, state, restarts,
/// last_error, last_success, last_value, points}]}`.
#[utoipa::path(
    get,
    path = "/v1/sources",
    tag = "series",
    responses((status = 200, description = "The sources", body = wire::Sources))
)]
pub async fn list(State(st): State<AppState>) -> Json<wire::Sources> {
    let sources = st
        .sources
        .list()
        .into_iter()
        .map(|s| wire::Source {
            name: s.name,
            kind: "upstream",
            url: s.url,
            series: s.series,
            state: s.state.as_str(),
            restarts: s.restarts,
            last_error: s.last_error,
            last_success: s.last_success_ms.map(rfc3339),
            last_value: s.last_value,
            points: s.points,
        })
        .collect();
    Json(wire::Sources { sources })
}
