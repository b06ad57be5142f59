//! Refuses state-changing requests sent by pages of other sites (CSRF): a browser sends
//! them with the user's network position (this service usually listens on loopback
//! without a token), so a page anywhere could otherwise stop the service or write data.
//!
//! Applied to the whole router, so new routes are covered: every request with an unsafe
//! method (anything but GET, HEAD, OPTIONS), and GET/HEAD on the routes in
//! `STATE_CHANGING_GETS`, is refused with 403 when `Sec-Fetch-Site` is present and
//! neither `same-origin` nor `none`, or when `Origin` is present and is `null` or does not
//! match the `Host` header, unless that origin was allowed with `--allowed-origin`.
//! Requests with neither header (curl, scripts, non-browser clients) pass.
//!
//! Before that, every request (any method, any route) whose `Host` names something the
//! service is not reachable as ([`HostPolicy`]) gets 421 Misdirected Request: without it a
//! rebound DNS name makes another site's page same-origin with the service, and the check
//! above would let it through.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use tower_layer::Layer;
use tower_service::Service;

use super::error::ApiError;
use crate::origin::{AllowedOrigin, HostPolicy, Origin};

/// Routes whose GET (and so HEAD, which axum routes to the GET handler) changes state, as
/// matched path templates. `/{segment}` is the catch-all that serves `GET /csv_name=<file>`
/// (its other paths answer 404, so refusing them costs nothing).
const STATE_CHANGING_GETS: &[&str] = &["/api/graceful_shutdown", "/{segment}"];

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    FetchSite,
    NullOrigin,
    ForeignOrigin,
    BadOrigin,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::FetchSite => "cross-site request refused: Sec-Fetch-Site says the request comes from another site's page (see --allowed-origin)",
            Refusal::NullOrigin => "cross-site request refused: 'Origin: null' (an opaque origin) may not change state",
            Refusal::ForeignOrigin => "cross-origin request refused: the Origin header does not match the Host header (see --allowed-origin)",
            Refusal::BadOrigin => "cross-origin request refused: the Origin header is not scheme://host[:port]",
        }
    }
}

/// The decision, apart from HTTP plumbing: `route` is the matched path template.
fn check(
    method: &Method,
    route: Option<&str>,
    headers: &HeaderMap,
    allowed: &[AllowedOrigin],
) -> Result<(), Refusal> {
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let changes_state = !safe
        || (*method != Method::OPTIONS && route.is_some_and(|r| STATE_CHANGING_GETS.contains(&r)));
    if !changes_state {
        return Ok(());
    }
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().map(str::trim));
    let parsed = match origin {
        None => None,
        Some(Ok("null")) => return Err(Refusal::NullOrigin),
        Some(Ok(v)) => Some(Origin::parse(v).ok_or(Refusal::BadOrigin)?),
        Some(Err(_)) => return Err(Refusal::BadOrigin),
    };
    if let Some(o) = &parsed {
        if allowed.iter().any(|a| a.origin() == o) {
            return Ok(());
        }
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Err(Refusal::FetchSite);
        }
    }
    if let Some(o) = &parsed {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !host.is_some_and(|h| o.matches_host(h.trim())) {
            return Err(Refusal::ForeignOrigin);
        }
    }
    Ok(())
}

/// The layer, applied with `Router::layer`. A plain tower layer rather than
/// `middleware::from_fn`: the check is synchronous, so a request that passes costs no
/// allocation (`from_fn` boxes a future and a service per request).
#[derive(Clone)]
pub struct CrossSiteLayer {
    allowed: Arc<[AllowedOrigin]>,
    hosts: Arc<HostPolicy>,
}

impl CrossSiteLayer {
    pub fn new(allowed: Vec<AllowedOrigin>, hosts: HostPolicy) -> Self {
        CrossSiteLayer {
            allowed: allowed.into(),
            hosts: Arc::new(hosts),
        }
    }
}

impl<S> Layer<S> for CrossSiteLayer {
    type Service = CrossSite<S>;

    fn layer(&self, inner: S) -> CrossSite<S> {
        CrossSite {
            inner,
            allowed: self.allowed.clone(),
            hosts: self.hosts.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CrossSite<S> {
    inner: S,
    allowed: Arc<[AllowedOrigin]>,
    hosts: Arc<HostPolicy>,
}

impl<S> Service<Request> for CrossSite<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // No Host at all is an HTTP/1.0 client, never a browser.
        if let Some(host) = req.headers().get(header::HOST) {
            if !host.to_str().is_ok_and(|h| self.hosts.allows(h)) {
                return Either::Left(ready(Ok(misdirected(&req, host))));
            }
        }
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        match check(req.method(), route, req.headers(), &self.allowed) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(refusal) => {
                tracing::warn!(
                    method = %req.method(),
                    route = route.unwrap_or("unmatched"),
                    reason = ?refusal,
                    "cross-site request refused"
                );
                Either::Left(ready(Ok(refused(&req, refusal))))
            }
        }
    }
}

/// CORS for the origins of `--allowed-origin` (none without it: same-origin pages need
/// none): a preflight from one of them is answered with the methods and request headers
/// the API takes, `Authorization` included (the token travels in a header, never in a
/// cookie, so credentials mode stays off), and its requests' answers carry
/// `Access-Control-Allow-Origin`, so the page can read them; the headers a client acts on
/// are exposed. Any other origin gets no CORS header, so the browser refuses, and its
/// state-changing requests are refused here as before. Inside the Host check: a rebound
/// name gets 421 before any CORS answer.
pub fn cors(allowed: &[AllowedOrigin]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if allowed.is_empty() {
        return None;
    }
    let allowed: Arc<[AllowedOrigin]> = allowed.into();
    let origin = AllowOrigin::predicate(move |o, _| {
        o.to_str()
            .ok()
            .and_then(Origin::parse)
            .is_some_and(|o| allowed.iter().any(|a| *a.origin() == o))
    });
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::ACCEPT,
                header::HeaderName::from_static("idempotency-key"),
                header::HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                header::ETAG,
                header::WWW_AUTHENTICATE,
                super::v1::IDEMPOTENT_REPLAYED,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// 421 for a `Host` the service does not answer to, naming it and the flag that allows it.
fn misdirected(req: &Request, host: &axum::http::HeaderValue) -> Response {
    let host = String::from_utf8_lossy(host.as_bytes());
    tracing::warn!(host = %host, path = req.uri().path(), "request for a host this service does not answer to refused");
    let reason = format!(
        "the Host header names '{host}', which this service does not answer to (a defence against DNS rebinding): serve it with --allowed-host NAME"
    );
    if req.uri().path().starts_with("/api/") {
        super::compat::error(StatusCode::MISDIRECTED_REQUEST, &reason)
    } else {
        ApiError::Misdirected(reason).into_response()
    }
}

/// 403 in the shape of the route's API: `/api/*` answers `{"status": "error", "reason":
/// ...}`, the rest problem+json.
fn refused(req: &Request, refusal: Refusal) -> Response {
    let reason = refusal.reason();
    if req.uri().path().starts_with("/api/") {
        super::compat::error(StatusCode::FORBIDDEN, reason)
    } else {
        ApiError::Forbidden(reason.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            let name = axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            h.insert(name, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// A request's method, matched route and headers, and the decision.
    type Case<'a> = (
        Method,
        Option<&'a str>,
        &'a [(&'a str, &'a str)],
        Result<(), Refusal>,
    );

    #[test]
    fn browsers_pages_of_other_sites_cannot_change_state() {
        let allowed: Vec<AllowedOrigin> = vec!["https://dash.example:8443".parse().unwrap()];
        let host = ("host", "127.0.0.1:5000");
        use Refusal::*;
        let cases: &[Case<'_>] = &[
            // Non-browser clients send neither header.
            (Method::POST, Some("/write"), &[host], Ok(())),
            (Method::GET, Some("/api/graceful_shutdown"), &[host], Ok(())),
            // Reads are never refused, whoever asks.
            (
                Method::GET,
                Some("/v1/jobs"),
                &[
                    host,
                    ("origin", "http://evil.example"),
                    ("sec-fetch-site", "cross-site"),
                ],
                Ok(()),
            ),
            (
                Method::OPTIONS,
                Some("/api/graceful_shutdown"),
                &[host, ("origin", "http://evil.example")],
                Ok(()),
            ),
            // State-changing GETs and HEADs are.
            (
                Method::GET,
                Some("/api/graceful_shutdown"),
                &[host, ("origin", "http://evil.example")],
                Err(ForeignOrigin),
            ),
            (
                Method::HEAD,
                Some("/api/graceful_shutdown"),
                &[host, ("sec-fetch-site", "cross-site")],
                Err(FetchSite),
            ),
            (
                Method::GET,
                Some("/{segment}"),
                &[host, ("sec-fetch-site", "same-site")],
                Err(FetchSite),
            ),
            // Unsafe methods on any route, matched or not.
            (
                Method::POST,
                Some("/write"),
                &[host, ("sec-fetch-site", "cross-site")],
                Err(FetchSite),
            ),
            (
                Method::DELETE,
                None,
                &[host, ("origin", "null")],
                Err(NullOrigin),
            ),
            (
                Method::POST,
                Some("/v1/jobs"),
                &[host, ("origin", "ftp://127.0.0.1:5000")],
                Err(BadOrigin),
            ),
            (
                Method::POST,
                Some("/v1/jobs"),
                &[host, ("origin", "http://127.0.0.1:5001")],
                Err(ForeignOrigin),
            ),
            (
                Method::POST,
                Some("/v1/jobs"),
                &[("origin", "http://127.0.0.1:5000")],
                Err(ForeignOrigin),
            ),
            // The same origin, in any case, and what the browser itself marks as such.
            (
                Method::POST,
                Some("/v1/jobs"),
                &[
                    host,
                    ("origin", "http://127.0.0.1:5000"),
                    ("sec-fetch-site", "same-origin"),
                ],
                Ok(()),
            ),
            (
                Method::POST,
                Some("/v1/jobs"),
                &[
                    ("host", "Tally.Example"),
                    ("origin", "https://tally.example"),
                ],
                Ok(()),
            ),
            (
                Method::POST,
                Some("/v1/jobs"),
                &[("host", "[::1]:5000"), ("origin", "http://[::1]:5000")],
                Ok(()),
            ),
            (
                Method::POST,
                Some("/v1/jobs"),
                &[host, ("sec-fetch-site", "none")],
                Ok(()),
            ),
            // An allowed origin passes even though the browser says cross-site.
            (
                Method::POST,
                Some("/v1/jobs"),
                &[
                    host,
                    ("origin", "https://dash.example:8443"),
                    ("sec-fetch-site", "cross-site"),
                ],
                Ok(()),
            ),
            (
                Method::POST,
                Some("/v1/jobs"),
                &[host, ("origin", "http://dash.example:8443")],
                Err(ForeignOrigin),
            ),
        ];
        for (method, route, hs, expect) in cases {
            let got = check(method, *route, &headers(hs), &allowed);
            assert_eq!(got, *expect, "{method} {route:?} {hs:?}");
        }
    }
}
