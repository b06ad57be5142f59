//! Checkpoints off the commit path: the WAL hook the writer reads and the background
//! PASSIVE checkpointer.

use super::*;

thread_local! {
    // Pages in the write-ahead log after the last commit, as SQLite reports them to the
    // writer thread's WAL hook (one writer thread per store: a thread-local is per store).
    pub(super) static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// Log size, in pages, at which the writer checkpoints (SQLite's own default).
pub(super) const CHECKPOINT_PAGES: i32 = 1000;

/// Least time between two background checkpoints.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(10);

/// The background half of checkpointing (see `Writer::checkpoint_if_long`): after
/// commits, a PASSIVE checkpoint (it never blocks the writer or readers), then a rest of
/// [`CHECKPOINT_EVERY`]. An idle store costs nothing; the thread ends with the writer.
pub(super) fn checkpoint_loop(conn: Connection, commits: std::sync::mpsc::Receiver<()>) {
    while commits.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "background checkpoint skipped");
        }
        thread::sleep(CHECKPOINT_EVERY);
    }
}

pub(super) fn note_wal_pages(
    _: &rusqlite::hooks::Wal,
    pages: std::ffi::c_int,
) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    Ok(())
}
