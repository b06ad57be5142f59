//! Logging: tracing with UTC RFC 3339 timestamps, to standard output or to a file that
//! rotates by size and keeps a fixed number of backups (the `file-rotate` crate), written
//! off the request path by `tracing-appender`'s background writer.

use std::io::IsTerminal;
use std::path::Path;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// A background writer that blocks rather than drops lines when it falls behind: the
/// request log is an audit trail, so losing lines under load is not acceptable.
fn non_blocking<W: std::io::Write + Send + 'static>(w: W) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default().lossy(false).finish(w)
}

/// Keeps the background log writer alive; drop it last so buffered lines are written.
pub struct LogGuard(#[allow(dead_code)] WorkerGuard);

/// Smallest rotation size accepted; smaller is surely a mistake (and 0 would panic).
pub const MIN_ROTATE_BYTES: usize = 1024;

pub fn init(
    filter: &str,
    log_file: Option<&Path>,
    max_bytes: usize,
    backups: usize,
) -> anyhow::Result<LogGuard> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .map_err(|e| anyhow::anyhow!("invalid log filter {filter:?}: {e}"))?;
    let (writer, guard) = match log_file {
        Some(path) => {
            if max_bytes < MIN_ROTATE_BYTES {
                anyhow::bail!("--log-max-bytes must be at least {MIN_ROTATE_BYTES}");
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let file = FileRotate::new(
                path,
                AppendCount::new(backups),
                ContentLimit::BytesSurpassed(max_bytes),
                Compression::None,
                None,
            );
            non_blocking(file)
        }
        None => non_blocking(std::io::stdout()),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(
            log_file.is_none()
                && std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging already initialised: {e}"))?;
    Ok(LogGuard(guard))
}
