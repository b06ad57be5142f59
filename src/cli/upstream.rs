//! `tally upstream`: the slow demo upstream. `GET /` answers, after `--delay-ms` (a tokio
//! sleep, so any number of requests wait at once without holding a thread), a random
//! integer in `[--min, --max]` as plain text. With it, the whole live sum service (a
//! source polling this upstream) runs on one machine.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rand::Rng;
use tokio::net::TcpListener;

use crate::config::UpstreamArgs;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("--min {min} is greater than --max {max}")]
    EmptyRange { min: i64, max: i64 },
}

/// What the demo upstream answers.
#[derive(Debug, Clone, Copy)]
pub struct Demo {
    pub delay: Duration,
    pub min: i64,
    pub max: i64,
}

impl Demo {
    pub fn new(delay_ms: u64, min: i64, max: i64) -> Result<Self, UpstreamError> {
        if min > max {
            return Err(UpstreamError::EmptyRange { min, max });
        }
        Ok(Demo {
            delay: Duration::from_millis(delay_ms),
            min,
            max,
        })
    }
}

async fn answer(State(demo): State<Demo>) -> Response {
    tokio::time::sleep(demo.delay).await;
    let v = rand::rng().random_range(demo.min..=demo.max);
    let text = HeaderValue::from_static("text/plain; charset=utf-8");
    ([(header::CONTENT_TYPE, text)], v.to_string()).into_response()
}

/// The demo's router: `GET /` only.
pub fn router(demo: Demo) -> Router {
    Router::new().route("/", get(answer)).with_state(demo)
}

/// Installs the SIGINT and SIGTERM handlers now (before the address is announced, so a
/// signal sent right after start is never lost); the future resolves at the first one.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

/// Runs `tally upstream` until SIGINT or SIGTERM.
pub fn run(args: &UpstreamArgs) -> anyhow::Result<()> {
    let demo = Demo::new(args.delay_ms, args.min, args.max)?;
    let _log = crate::telemetry::init(&args.log_level, None, 0, 0)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tally-upstream")
        .build()
        .context("starting the async runtime")?;
    let bind: SocketAddr = args.bind;
    let result = rt.block_on(async move {
        let stop = shutdown_signal()?;
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding {bind}"))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            delay_ms = args.delay_ms,
            min = demo.min,
            max = demo.max,
            "tally upstream listening"
        );
        axum::serve(listener, router(demo))
            .with_graceful_shutdown(stop)
            .await
            .context("serving")?;
        tracing::info!("stopped");
        anyhow::Ok(())
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "tally upstream failed");
    }
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_range_is_refused() {
        assert_eq!(
            Demo::new(0, 5, 4).unwrap_err(),
            UpstreamError::EmptyRange { min: 5, max: 4 }
        );
        assert!(Demo::new(0, 4, 4).is_ok());
    }

    #[test]
    fn upstream_defaults_to_port_4568_two_seconds_and_ten_to_twenty_five() {
        use clap::Parser;
        let crate::config::Command::Upstream(a) =
            crate::config::Cli::parse_from(["tally", "upstream"]).command
        else {
            panic!("not an upstream command");
        };
        assert_eq!(a.bind.to_string(), "127.0.0.1:4568");
        assert_eq!((a.delay_ms, a.min, a.max), (2000, 10, 25));
    }
}
