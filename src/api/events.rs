//! `POST /v1/events`: the wire shape of a pipeline event, its validation, and the answer
//! `{"asyncAnswer": "Ok", "seq": N}` once the event is durable in the accepted log.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{Number, Value};

use super::error::{ApiError, ApiJson};
use super::state::AppState;
use super::wire;
use crate::pipeline::{AcceptError, Event};

/// The body of `POST /v1/events`; every field is required and no other is allowed.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    /// The client's connection number.
    pub conn: u64,
    /// The record's number on its connection.
    pub seq: u64,
    /// A number, or a string (`ok` when it parses as a number).
    #[schema(value_type = Value)]
    pub value: Value,
    /// Milliseconds or seconds since the epoch.
    #[schema(value_type = f64, minimum = 0)]
    pub sent_at: Number,
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::Full(_) => ApiError::QueueFull(e.to_string()),
            AcceptError::Draining => ApiError::ShuttingDown,
            // A disk that cannot take the log, or a journal another process holds: the
            // operator's to fix, named, and retried (503).
            AcceptError::Io(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

/// Checks what serde cannot: `value` is a number or a string, `sent_at` is not negative.
pub fn validate(body: EventBody) -> Result<Event, ApiError> {
    match &body.value {
        Value::Number(_) | Value::String(_) => {}
        other => {
            let kind = match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Array(_) => "an array",
                _ => "an object",
            };
            return Err(ApiError::Unprocessable(format!(
                "value: expected a JSON number or string, got {kind}"
            )));
        }
    }
    if body.sent_at.as_f64().is_none_or(|t| t < 0.0) {
        return Err(ApiError::Unprocessable(
            "sent_at: expected a non-negative number of milliseconds or seconds since the epoch"
                .into(),
        ));
    }
    Ok(Event {
        conn: body.conn,
        conn_seq: body.seq,
        value: body.value,
        sent_at: body.sent_at,
    })
}

#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "pipeline",
    request_body = EventBody,
    responses(
        (status = 200, description = "Durable in the accepted log", body = super::wire::EventAnswer),
        (status = 422, description = "A field missing, unknown or of the wrong type"),
        (status = 503, description = "Reorder buffer full, draining, or the accepted log cannot be written (a full disk, a journal another process holds; Retry-After)"),
    )
)]
pub async fn submit(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<EventBody>,
) -> Result<Json<wire::EventAnswer>, ApiError> {
    let event = validate(body)?;
    let seq = st.pipeline.accept(event).await?;
    Ok(Json(wire::EventAnswer {
        async_answer: "Ok",
        seq,
    }))
}
