//! `POST /v1/events`: the wire shape of a pipeline event, its validation, and the answer
//! `{"asyncAnswer": "Ok", "seq": N}` once the event is durable in the accepted log.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Number, Value};

use super::error::{ApiError, ApiJson};
use super::AppState;
use crate::pipeline::{AcceptError, Event};

/// The body of `POST /v1/events`; every field is required and no other is allowed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    pub conn: u64,
    pub seq: u64,
    pub value: Value,
    pub sent_at: Number,
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::Full(_) => ApiError::QueueFull(e.to_string()),
            AcceptError::Draining => ApiError::ShuttingDown,
            AcceptError::Io(_) => ApiError::Internal(e.to_string()),
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

pub async fn submit(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<EventBody>,
) -> Result<Json<Value>, ApiError> {
    let event = validate(body)?;
    let seq = st.pipeline.accept(event).await?;
    Ok(Json(json!({ "asyncAnswer": "Ok", "seq": seq })))
}
