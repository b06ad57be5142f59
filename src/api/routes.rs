//! A router that remembers what it routes: every `(method, path)` added through
//! [`Routes`] is listed, so the OpenAPI description can be checked against the router
//! itself (`openapi::tests`) rather than against a list kept by hand.

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{self, MethodRouter};
use axum::Router;

use super::state::AppState;

/// One route as the router serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub method: Method,
    /// The router's path template (`/v1/jobs/{id}`).
    pub path: String,
    /// The path in the OpenAPI description, when the router's differs (the one-segment
    /// catch-all that serves `/csv_name={file}`).
    pub documented_as: Option<&'static str>,
    /// Behind the bearer token (`--auth-token`).
    pub guarded: bool,
}

impl RouteEntry {
    /// The path under which the description lists this route.
    pub fn doc_path(&self) -> &str {
        self.documented_as.unwrap_or(&self.path)
    }
}

/// An axum router plus the list of its routes.
pub struct Routes {
    router: Router<AppState>,
    list: Vec<RouteEntry>,
    guarded: bool,
}

impl Routes {
    /// Routes open to every client.
    pub fn open() -> Routes {
        Routes {
            router: Router::new(),
            list: Vec::new(),
            guarded: false,
        }
    }

    /// Routes behind the bearer token (the caller adds the guard layer).
    pub fn guarded() -> Routes {
        Routes {
            guarded: true,
            ..Routes::open()
        }
    }

    /// Adds `method_router` (which must serve exactly `method`) at `path`, listed under
    /// `documented_as` in the description when the router's template cannot be written
    /// in OpenAPI (a catch-all). The helpers below are the usual way in.
    pub fn add(
        mut self,
        method: Method,
        path: &str,
        method_router: MethodRouter<AppState>,
        documented_as: Option<&'static str>,
    ) -> Routes {
        self.router = self.router.route(path, method_router);
        self.list.push(RouteEntry {
            method,
            path: path.to_string(),
            documented_as,
            guarded: self.guarded,
        });
        self
    }

    pub fn get<H: Handler<T, AppState>, T: 'static>(self, path: &str, h: H) -> Routes {
        self.add(Method::GET, path, routing::get(h), None)
    }

    pub fn post<H: Handler<T, AppState>, T: 'static>(self, path: &str, h: H) -> Routes {
        self.add(Method::POST, path, routing::post(h), None)
    }

    pub fn put<H: Handler<T, AppState>, T: 'static>(self, path: &str, h: H) -> Routes {
        self.add(Method::PUT, path, routing::put(h), None)
    }

    pub fn delete<H: Handler<T, AppState>, T: 'static>(self, path: &str, h: H) -> Routes {
        self.add(Method::DELETE, path, routing::delete(h), None)
    }

    /// Like [`Routes::post`], with `wrap` applied to this route alone.
    pub fn post_with<H: Handler<T, AppState>, T: 'static>(
        self,
        path: &str,
        h: H,
        wrap: impl FnOnce(MethodRouter<AppState>) -> MethodRouter<AppState>,
    ) -> Routes {
        self.add(Method::POST, path, wrap(routing::post(h)), None)
    }

    /// Like [`Routes::put`], with `wrap` applied to this route alone.
    pub fn put_with<H: Handler<T, AppState>, T: 'static>(
        self,
        path: &str,
        h: H,
        wrap: impl FnOnce(MethodRouter<AppState>) -> MethodRouter<AppState>,
    ) -> Routes {
        self.add(Method::PUT, path, wrap(routing::put(h)), None)
    }

    /// Applies `f` to the router (e.g. a `route_layer`), keeping the list.
    pub fn map_router(mut self, f: impl FnOnce(Router<AppState>) -> Router<AppState>) -> Routes {
        self.router = f(self.router);
        self
    }

    /// Both sets of routes in one router (paths may repeat with other methods).
    pub fn merge(mut self, other: Routes) -> Routes {
        self.router = self.router.merge(other.router);
        self.list.extend(other.list);
        self
    }

    pub fn into_parts(self) -> (Router<AppState>, Vec<RouteEntry>) {
        (self.router, self.list)
    }
}
