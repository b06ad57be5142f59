//! The dashboard: `GET /` (the single page), `GET /docs` (the API reference, rendering
//! `/openapi.json`) and `GET /ui/{*path}` (scripts, styles, vendored libraries), all
//! embedded in the binary from `web/static/` (see `web/README.md`), so the dashboard
//! works offline and loads nothing from another host (its Content-Security-Policy says
//! so to the browser too).

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

use super::error::ApiError;

#[derive(RustEmbed)]
#[folder = "web/static/"]
struct Assets;

/// Pages may load only what this server serves.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; \
    base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "text/plain; charset=utf-8",
    }
}

/// One embedded file, with an ETag from its hash (a reload revalidates, and gets 304
/// while the binary is the same). The ETag is weak: the same file is sent compressed or
/// not, by the client's `Accept-Encoding`.
fn serve(path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let file = Assets::get(path)
        .ok_or_else(|| ApiError::NotFound(format!("no dashboard file {path:?}")))?;
    let etag = format!(
        "W/\"{}\"",
        file.metadata
            .sha256_hash()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        file.data.into_owned().into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if path.ends_with(".html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
    }
    Ok(res)
}

/// `GET /`: the dashboard.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    responses((status = 200, description = "The dashboard (HTML)", content_type = "text/html", body = String))
)]
pub async fn index(headers: HeaderMap) -> Result<Response, ApiError> {
    serve("index.html", &headers)
}

/// `GET /docs`: the API reference, rendered from `/openapi.json`.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "dashboard",
    responses((status = 200, description = "The API reference (HTML)", content_type = "text/html", body = String))
)]
pub async fn reference(headers: HeaderMap) -> Result<Response, ApiError> {
    serve("reference.html", &headers)
}

/// `GET /ui/{path}`: the dashboard's scripts, styles and vendored libraries.
#[utoipa::path(
    get,
    path = "/ui/{path}",
    tag = "dashboard",
    params(("path" = String, Path, description = "A file of the dashboard, e.g. `js/app.js`")),
    responses(
        (status = 200, description = "The file, typed by its extension", content(
            (String = "text/javascript"),
            (String = "text/css"),
            (String = "image/svg+xml"),
            (String = "text/html"),
            (String = "application/json"),
            (String = "text/plain"),
        )),
        (status = 304, description = "Unchanged (If-None-Match)"),
        (status = 404, description = "No such file"),
    )
)]
pub async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    serve(&path, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_and_the_vendored_libraries_are_embedded_with_their_licences() {
        for path in [
            "index.html",
            "reference.html",
            "js/app.js",
            "css/app.css",
            "vendor/uplot/uPlot.esm.js",
            "vendor/uplot/LICENSE",
            "vendor/swagger-ui/swagger-ui-bundle.js",
            "vendor/swagger-ui/LICENSE",
        ] {
            assert!(Assets::get(path).is_some(), "{path} is not embedded");
        }
    }

    #[test]
    fn html_pages_carry_a_policy_that_allows_only_this_origin() {
        let res = serve("index.html", &HeaderMap::new()).unwrap();
        let csp = res.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(serve("../Cargo.toml", &HeaderMap::new()).is_err());
    }
}
