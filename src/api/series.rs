//! The live-series routes: ingest (`POST /write` in line protocol, `POST
//! /v1/series/{name}/points` in JSON), reads (`GET /v1/series`, `/v1/series/{name}`,
//! `/v1/series/{name}/rollups`), `POST /v1/series/rollups/refresh`, and the original
//! service's `GET /getSum` (also served alone by `--compat-get-sum-bind`).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

use super::error::{ApiError, ApiJson};
use super::ops;
use super::state::AppState;
use super::wire;
use crate::series::agg::{AggFn, SeriesRollup};
use crate::series::line_protocol::Precision;
use crate::series::store::{validate_name, RangeQuery, SeriesError};

impl From<SeriesError> for ApiError {
    fn from(e: SeriesError) -> Self {
        match e {
            SeriesError::NotFound(_) => ApiError::NotFound(e.to_string()),
            SeriesError::NameLength(_)
            | SeriesError::NameControl
            | SeriesError::BadQuery { .. } => ApiError::BadRequest(e.to_string()),
        }
    }
}

/// The router of `--compat-get-sum-bind`: `/getSum` and `/healthz` only.
pub fn compat_get_sum_router(state: AppState) -> Router {
    Router::new()
        .route("/getSum", get(get_sum))
        .route("/healthz", get(ops::healthz))
        .fallback(ops::not_found)
        .with_state(state)
}

/// `GET /getSum`: the sum of every point ever accepted, across all series, as plain text
/// in the form `serde_json` prints an `f64` (`12345.0`, `0.5`, `1e+300`); a sum beyond
/// `f64` reads `inf` or `-inf`, as Python prints it.
#[utoipa::path(
    get,
    path = "/getSum",
    tag = "series",
    responses((status = 200, description = "The sum, e.g. `12345.0` (`inf`/`-inf` beyond f64)", content_type = "text/plain", body = String))
)]
pub async fn get_sum(State(st): State<AppState>) -> Response {
    let sum = st.series.total_sum();
    let text = HeaderValue::from_static("text/plain; charset=utf-8");
    ([(header::CONTENT_TYPE, text)], float_text(sum)).into_response()
}

/// An `f64` as `/getSum` prints it: `serde_json`'s form when finite, Python's otherwise.
pub(crate) fn float_text(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        serde_json::to_string(&v).unwrap_or_else(|_| v.to_string())
    }
}

/// Reusable body buffers for `/write`. Batches of line protocol are large (10,000 lines is
/// ~0.5 MB); allocating a fresh buffer per request showed up as the kernel zeroing new
/// pages (~20% of an ingest profile). Bounded: a few buffers of at most 64 MiB each.
static BODY_POOL: parking_lot::Mutex<Vec<Vec<u8>>> = parking_lot::Mutex::new(Vec::new());
const POOLED_BUFFERS: usize = 8;
const POOLED_MAX_BYTES: usize = 64 << 20;

fn give_back(mut buf: Vec<u8>) {
    if buf.capacity() <= POOLED_MAX_BYTES {
        buf.clear();
        let mut pool = BODY_POOL.lock();
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    }
}

/// Reads the whole body into a pooled buffer, refusing more than `limit` bytes.
async fn read_pooled(mut body: axum::body::Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = BODY_POOL.lock().pop().unwrap_or_default();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                give_back(buf);
                return Err(ApiError::BadRequest(format!(
                    "reading the request body: {e}"
                )));
            }
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                give_back(buf);
                return Err(ApiError::PayloadTooLarge(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// `POST /write?precision=ns|us|ms|s`: Influx line protocol. 204 when every point was
/// stored; 200 `{"accepted", "rejected", "reasons"}` when every line parsed but some
/// points were refused (late, future, ...); 400 listing the first bad lines otherwise,
/// with the same counts (the good lines are stored all the same).
#[utoipa::path(
    post,
    path = "/write",
    tag = "series",
    params(("precision" = Option<String>, Query, description = "ns (default), us, ms or s")),
    request_body(content = String, description = "Influx line protocol, uncompressed or with `Content-Encoding: gzip`", content_type = "text/plain"),
    responses(
        (status = 204, description = "Every point stored"),
        (status = 200, description = "Every line parsed; some points refused", body = wire::WriteReport),
        (status = 400, description = "Bad lines (the good ones are stored), or a bad precision", body = wire::WriteProblem, content_type = "application/problem+json"),
        (status = 413, description = "Body over --max-write-bytes (as sent, or inflated from gzip)"),
        (status = 415, description = "A Content-Encoding other than gzip or identity"),
    )
)]
pub async fn write(
    State(st): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let encoding = super::encoding::of(&headers)?;
    let precision = match params.get("precision") {
        None => Precision::Nanoseconds,
        Some(p) => p
            .parse::<Precision>()
            .map_err(|e| ApiError::BadRequest(format!("precision: {e}")))?,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.max_write_bytes as u64) {
        return Err(ApiError::PayloadTooLarge(st.max_write_bytes));
    }
    // A gzip body is limited as sent and as inflated (`encoding.rs`).
    let limit = st.max_write_bytes;
    let body = read_pooled(body, limit).await?;
    let ingest = st.ingest.clone();
    let now = crate::now_ms();
    let r = tokio::task::spawn_blocking(move || {
        let body = match encoding {
            super::encoding::Encoding::Identity => body,
            super::encoding::Encoding::Gzip => {
                let mut plain = BODY_POOL.lock().pop().unwrap_or_default();
                let inflated = super::encoding::gunzip_into(&body, &mut plain, limit);
                give_back(body);
                if let Err(e) = inflated {
                    give_back(plain);
                    return Err(ApiError::from(e));
                }
                plain
            }
        };
        let r = ingest.ingest(&body, precision, now, "write");
        give_back(body);
        Ok(r)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let reasons = r.rejections();
    let rejected: u64 = reasons.iter().map(|r| r.1).sum();
    if r.parse.is_clean() && r.bad_names == 0 {
        if rejected == 0 {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        return Ok(Json(wire::WriteReport {
            accepted: r.store.accepted,
            rejected,
            reasons: wire::Reasons(reasons),
        })
        .into_response());
    }
    let errors = r
        .parse
        .errors
        .iter()
        .map(|e| wire::LineError {
            line: e.line as u64,
            message: e.kind.to_string(),
        })
        .collect();
    let mut detail = format!(
        "{} of {} lines rejected; the points of the other lines were stored ({} points)",
        r.parse.error_lines, r.parse.lines, r.store.accepted
    );
    if let Some(first) = r.parse.errors.first() {
        detail.push_str(&format!("; first error: {first}"));
    }
    if r.bad_names > 0 {
        detail.push_str(&format!(
            "; {} points refused: series name longer than 256 bytes or with control characters",
            r.bad_names
        ));
    }
    let body = wire::WriteProblem {
        problem: wire::Problem::new(StatusCode::BAD_REQUEST, detail),
        errors,
        accepted_points: r.store.accepted,
        accepted: r.store.accepted,
        rejected,
        reasons: wire::Reasons(reasons),
    };
    let problem = HeaderValue::from_static("application/problem+json");
    let content_type = [(header::CONTENT_TYPE, problem)];
    Ok((StatusCode::BAD_REQUEST, content_type, Json(body)).into_response())
}

fn point_of(i: usize, p: &Value) -> Result<(i64, f64), ApiError> {
    let obj = p.as_object().ok_or_else(|| {
        ApiError::Unprocessable(format!("[{i}]: expected {{\"t\": <ms>, \"v\": <number>}}"))
    })?;
    if let Some(k) = obj.keys().find(|k| *k != "t" && *k != "v") {
        return Err(ApiError::Unprocessable(format!(
            "[{i}]: unknown field `{k}`"
        )));
    }
    let t = obj.get("t").and_then(Value::as_i64).ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "[{i}].t: expected an integer number of milliseconds"
        ))
    })?;
    let v = obj
        .get("v")
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
        .ok_or_else(|| ApiError::Unprocessable(format!("[{i}].v: expected a finite number")))?;
    Ok((t, v))
}

/// `POST /v1/series/{name}/points` with `[{"t": <ms>, "v": <number>}]`.
#[utoipa::path(
    post,
    path = "/v1/series/{name}/points",
    tag = "series",
    params(("name" = String, Path, description = "1 to 256 bytes, no control characters")),
    request_body = Vec<wire::Point>,
    responses(
        (status = 200, description = "Points stored and refused, by reason", body = wire::PointsReport),
        (status = 400, description = "A bad series name or malformed JSON"),
        (status = 422, description = "Not an array of points"),
    )
)]
pub async fn post_points(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<wire::PointsReport>, ApiError> {
    validate_name(&name)?;
    let arr = body.as_array().ok_or_else(|| {
        ApiError::Unprocessable("expected a JSON array of {\"t\", \"v\"} points".into())
    })?;
    let points = arr
        .iter()
        .enumerate()
        .map(|(i, p)| point_of(i, p))
        .collect::<Result<Vec<_>, _>>()?;
    let store = st.series.clone();
    let r = tokio::task::spawn_blocking(move || {
        let r = store.insert(&name, &points, crate::now_ms());
        store.metrics().accepted("json", r.accepted);
        r
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(wire::PointsReport {
        accepted: r.accepted,
        rejected_late: r.late,
        rejected_expired: r.expired,
        rejected_future: r.future,
        rejected_non_finite: r.non_finite,
        rejected_overflow: r.overflow,
        rejected_series_limit: r.series_limit,
    }))
}

/// Series per page of `GET /v1/series`: default and largest.
const SERIES_PAGE: usize = 1000;
const SERIES_MAX_PAGE: usize = 10_000;

/// `GET /v1/series?limit=&cursor=`: a page of series in name order (bytewise), after the
/// name `cursor`; `next_cursor` (the page's last name) is null on the last page.
#[utoipa::path(
    get,
    path = "/v1/series",
    tag = "series",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "Series per page (default 1000)"),
        ("cursor" = Option<String>, Query, description = "The previous page's `next_cursor`"),
    ),
    responses(
        (status = 200, description = "A page of series in name order", body = wire::SeriesPage),
        (status = 400, description = "A bad parameter"),
    )
)]
pub async fn list(
    State(st): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<wire::SeriesPage>, ApiError> {
    let mut limit = SERIES_PAGE;
    let mut cursor: Option<String> = None;
    for (k, v) in params {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=SERIES_MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "limit must be an integer from 1 to {SERIES_MAX_PAGE}; got {v:?}"
                        ))
                    })?
            }
            "cursor" => cursor = Some(v),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; use limit, cursor"
                )))
            }
        }
    }
    let store = st.series.clone();
    let (page, more) = tokio::task::spawn_blocking(move || {
        store.list_page(cursor.as_deref().filter(|c| !c.is_empty()), limit)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let next = more
        .then(|| page.last().map(|s| s.name.to_string()))
        .flatten();
    let series = page
        .into_iter()
        .map(|s| wire::SeriesInfo {
            name: s.name.to_string(),
            points: s.points,
            first: s.first,
            last: s.last,
        })
        .collect();
    Ok(Json(wire::SeriesPage {
        series,
        next_cursor: next,
    }))
}

fn int_param(
    params: &HashMap<String, String>,
    name: &'static str,
) -> Result<Option<i64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "{name}: expected an integer number of milliseconds, got `{v}`"
                ))
            })
        })
        .transpose()
}

/// `GET /v1/series/{name}?from=&to=&step=&agg=`: raw points in `[from, to)`, or with
/// `step` one aggregated value per non-empty bucket (buckets aligned to the epoch).
#[utoipa::path(
    get,
    path = "/v1/series/{name}",
    tag = "series",
    params(
        ("name" = String, Path),
        ("from" = Option<i64>, Query, description = "ms since the epoch, inclusive"),
        ("to" = Option<i64>, Query, description = "ms since the epoch, exclusive"),
        ("step" = Option<i64>, Query, description = "Bucket width (ms); without it, raw points"),
        ("agg" = Option<String>, Query, description = "sum, count, mean (default), min, max, last; needs step"),
    ),
    responses(
        (status = 200, description = "Points", body = wire::SeriesPoints),
        (status = 400, description = "A bad parameter"),
        (status = 404, description = "No such series"),
    )
)]
pub async fn query(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<wire::SeriesPoints>, ApiError> {
    if let Some(k) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "from" | "to" | "step" | "agg"))
    {
        return Err(ApiError::BadRequest(format!(
            "{k}: unknown parameter (expected from, to, step, agg)"
        )));
    }
    let from = int_param(&params, "from")?;
    let to = int_param(&params, "to")?;
    let step = int_param(&params, "step")?;
    let agg = match params.get("agg") {
        None => AggFn::Mean,
        Some(a) => a
            .parse::<AggFn>()
            .map_err(|e| ApiError::BadRequest(format!("agg: {e}")))?,
    };
    if params.contains_key("agg") && step.is_none() {
        return Err(ApiError::BadRequest("agg: needs a step".into()));
    }
    let q = RangeQuery {
        from,
        to,
        step,
        agg,
    };
    let store = st.series.clone();
    let n = name.clone();
    let points = tokio::task::spawn_blocking(move || store.query(&n, q))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(wire::SeriesPoints {
        name,
        from,
        to,
        step,
        agg: step.map(|_| format!("{agg:?}").to_lowercase()),
        points: points
            .into_iter()
            .map(|(t, v)| wire::Point { t, v })
            .collect(),
    }))
}

fn rollup_view(
    name: &str,
    r: &SeriesRollup,
    window_ms: i64,
    computed_at: Option<i64>,
) -> wire::Rollups {
    let windows = r
        .windows
        .iter()
        .map(|(start, a)| wire::RollupWindow {
            start: *start,
            agg: a.summary().into(),
        })
        .collect();
    wire::Rollups {
        name: name.to_string(),
        total: r.total.summary().into(),
        retained: r.retained.summary().into(),
        window_ms,
        windows,
        computed_at,
    }
}

/// `GET /v1/series/{name}/rollups`: from the last published snapshot; a series created
/// since then is computed on the spot (`computed_at` is then null).
#[utoipa::path(
    get,
    path = "/v1/series/{name}/rollups",
    tag = "series",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "The series' rollups", body = wire::Rollups),
        (status = 400, description = "A bad series name"),
        (status = 404, description = "No such series"),
    )
)]
pub async fn rollups(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<wire::Rollups>, ApiError> {
    let window_ms = st.series.options().window_ms;
    let snap = st.rollups.snapshot();
    if let Some(r) = snap.series.get(name.as_str()) {
        return Ok(Json(rollup_view(
            &name,
            r,
            window_ms,
            Some(snap.computed_at_ms),
        )));
    }
    let r = st.series.rollup(&name)?;
    Ok(Json(rollup_view(&name, &r, window_ms, None)))
}

/// `POST /v1/series/rollups/refresh`: recompute and publish now.
#[utoipa::path(
    post,
    path = "/v1/series/rollups/refresh",
    tag = "series",
    responses((status = 200, description = "Recomputed and published", body = wire::Refreshed))
)]
pub async fn refresh(State(st): State<AppState>) -> Json<wire::Refreshed> {
    let snap = st.rollups.refresh_async().await;
    Json(wire::Refreshed {
        computed_at: snap.computed_at_ms,
        series: snap.series.len() as u64,
    })
}
