//! `GET /v1/stream`: the dashboard's one server-sent-events stream per tab. Every
//! `interval_ms` it sends the snapshots of the topics asked for (`overview`,
//! `pipeline`, `sources`) and, with `job`, that job. It ends with a `shutdown` event as
//! soon as the service begins to drain, so an open tab never holds up a stop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};

use super::error::ApiError;
use super::state::AppState;
use super::{overview, sources, v1};

/// `interval_ms`: default, least and most.
const DEFAULT_INTERVAL_MS: u64 = 2000;
const MIN_INTERVAL_MS: u64 = 250;
const MAX_INTERVAL_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topic {
    Overview,
    Pipeline,
    Sources,
}

impl Topic {
    const ALL: [(&'static str, Topic); 3] = [
        ("overview", Topic::Overview),
        ("pipeline", Topic::Pipeline),
        ("sources", Topic::Sources),
    ];
}

/// What one stream sends, from its query.
#[derive(Debug, PartialEq)]
struct Plan {
    interval: Duration,
    topics: Vec<Topic>,
    job: Option<String>,
}

fn plan(q: &HashMap<String, String>) -> Result<Plan, ApiError> {
    let mut p = Plan {
        interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
        topics: vec![Topic::Overview],
        job: None,
    };
    for (k, v) in q {
        match k.as_str() {
            "interval_ms" => {
                let ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "interval_ms must be an integer from {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS}; got {v:?}"
                        ))
                    })?;
                p.interval = Duration::from_millis(ms);
            }
            "topics" => {
                p.topics.clear();
                for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let topic = Topic::ALL
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, t)| *t)
                        .ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "topics: unknown topic {name:?}; use overview, pipeline, sources"
                            ))
                        })?;
                    if !p.topics.contains(&topic) {
                        p.topics.push(topic);
                    }
                }
            }
            "job" => {
                if crate::api::ids::parse(v).is_none() {
                    return Err(ApiError::BadRequest(format!(
                        "job {v:?} is not a job id (ids look like job_id_1)"
                    )));
                }
                p.job = Some(v.clone());
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; use interval_ms, topics, job"
                )))
            }
        }
    }
    Ok(p)
}

fn json_event(name: &str, data: impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()))
}

/// The events of one tick, in topic order, then the job.
async fn tick(st: &AppState, p: &Plan) -> Vec<Event> {
    let mut out = Vec::with_capacity(p.topics.len() + 1);
    for t in &p.topics {
        out.push(match t {
            Topic::Overview => json_event("overview", overview::snapshot(st).await),
            Topic::Pipeline => json_event("pipeline", overview::pipeline_view(st)),
            Topic::Sources => json_event("sources", sources::list(State(st.clone())).await.0),
        });
    }
    if let Some(id) = &p.job {
        out.push(match v1::get(State(st.clone()), Path(id.clone())).await {
            Ok(view) => json_event("job", view.0),
            Err(e) => json_event("job_error", serde_json::json!({ "detail": e.to_string() })),
        });
    }
    out
}

/// The events of a stream: a tick every interval until the service drains, then one
/// `shutdown` event, then the end.
fn events(st: AppState, p: Plan) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut every = tokio::time::interval(p.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = st.shutdown.clone();
    stream::unfold(
        (st, p, every, stop, false),
        |(st, p, mut every, stop, ended)| async move {
            if ended {
                return None;
            }
            let draining = tokio::select! {
                biased;
                _ = stop.cancelled() => true,
                _ = every.tick() => st.engine.is_draining(),
            };
            if draining {
                let bye = json_event(
                    "shutdown",
                    serde_json::json!({ "detail": "the service is shutting down" }),
                );
                return Some((vec![bye], (st, p, every, stop, true)));
            }
            let batch = tick(&st, &p).await;
            Some((batch, (st, p, every, stop, false)))
        },
    )
    .flat_map(|batch| stream::iter(batch.into_iter().map(Ok)))
}

/// `GET /v1/stream?interval_ms=&topics=&job=`: server-sent events for the dashboard.
#[utoipa::path(
    get,
    path = "/v1/stream",
    tag = "dashboard",
    params(
        ("interval_ms" = Option<u64>, Query, minimum = 250, maximum = 60000, description = "Milliseconds between two rounds of events (default 2000)"),
        ("topics" = Option<String>, Query, description = "Comma-separated: overview (GET /v1/overview), pipeline (GET /v1/pipeline), sources (GET /v1/sources); default overview"),
        ("job" = Option<String>, Query, description = "Also send this job (GET /v1/jobs/{id}) as a `job` event each round (`job_error` when it cannot be read)"),
    ),
    responses(
        (status = 200, description = "An endless `text/event-stream`: each round sends one event per topic, named after it, whose data is the JSON of the matching route; a `shutdown` event ends the stream when the service begins to drain", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter"),
        (status = 503, description = "Shutting down: no new stream"),
    )
)]
pub async fn stream(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = plan(&q)?;
    if st.shutdown.is_cancelled() || st.engine.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let mut res = Sse::new(events(st, p))
        .keep_alive(KeepAlive::default())
        .into_response();
    // nginx buffers proxied responses unless told not to; a stream must pass at once.
    res.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stream_parameters_are_checked_and_default_to_the_overview_every_two_seconds() {
        assert_eq!(
            plan(&q(&[])).unwrap(),
            Plan {
                interval: Duration::from_millis(2000),
                topics: vec![Topic::Overview],
                job: None
            }
        );
        let p = plan(&q(&[
            ("interval_ms", "250"),
            ("topics", "sources, pipeline,sources"),
            ("job", "job_id_7"),
        ]))
        .unwrap();
        assert_eq!(p.interval, Duration::from_millis(250));
        assert_eq!(p.topics, vec![Topic::Sources, Topic::Pipeline]);
        assert_eq!(p.job.as_deref(), Some("job_id_7"));
        for bad in [
            ("interval_ms", "249"),
            ("interval_ms", "60001"),
            ("interval_ms", "x"),
            ("topics", "overview,metrics"),
            ("job", "7"),
            ("every", "1000"),
        ] {
            assert!(plan(&q(&[bad])).is_err(), "{bad:?}");
        }
    }
}
