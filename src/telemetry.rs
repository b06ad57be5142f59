//! Logging: tracing with UTC RFC 3339 timestamps, to standard output or to a file that
//! rotates by size and keeps a fixed number of backups (the `file-rotate` crate), written
//! off the request path by one flusher thread (see [`BufferedLog`]). Control characters in
//! messages and field values are escaped ([`EscapedFields`]): one event, one line. With
//! `--log-format json` each line is one JSON object instead ([`LogFormat`]).

use std::fmt;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use parking_lot::{Condvar, Mutex};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::EnvFilter;

/// Smallest rotation size accepted; smaller is surely a mistake (and 0 would panic).
pub const MIN_ROTATE_BYTES: usize = 1024;

/// How long a line may wait in memory before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Buffered bytes that make the flusher write at once instead of at its next tick.
const FLUSH_SOON_BYTES: usize = 256 * 1024;
/// Buffered bytes past which a logging thread waits for the flusher: lines are never
/// dropped, and memory stays bounded when the disk stalls.
const MAX_BUFFERED_BYTES: usize = 16 * 1024 * 1024;

/// Log lines gathered in memory and written by one flusher thread, at most every
/// [`FLUSH_EVERY`] or as soon as [`FLUSH_SOON_BYTES`] wait.
///
/// Written here rather than taken from `tracing-appender` because its background writer
/// receives each line through a channel that spins, yields and wakes its thread per line:
/// at 15k requests/s on 2 cores (four request lines per job) those wake-ups and yields
/// cost about a tenth of the server's CPU. Here a line costs a memcpy under a mutex, and
/// the flusher wakes at most a hundred times a second. Rotation stays with `file-rotate`.
#[derive(Clone)]
pub struct BufferedLog {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the flusher: the first line after an idle spell, a full buffer, or closing.
    work: Condvar,
    /// Wakes logging threads that waited for room.
    room: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// The flusher waits for a first line (as opposed to waiting out its tick).
    idle: bool,
    closed: bool,
}

/// One event's writer (tracing-subscriber writes each formatted line with one call).
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut st = self.shared.state.lock();
        while st.buf.len() >= MAX_BUFFERED_BYTES && !st.closed {
            self.shared.room.wait(&mut st);
        }
        st.buf.extend_from_slice(data);
        if st.idle || st.buf.len() >= FLUSH_SOON_BYTES {
            st.idle = false;
            self.shared.work.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedLog {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

impl BufferedLog {
    /// Starts the flusher thread writing to `out`, in writes of whole lines of at most
    /// `max_write` bytes where lines allow (a rotating file can pass its size limit by
    /// one write). Drop the guard to write what is left and stop it.
    pub fn start<W: Write + Send + 'static>(
        mut out: W,
        max_write: usize,
    ) -> std::io::Result<(Self, FlushGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            room: Condvar::new(),
        });
        let flusher = shared.clone();
        let handle = std::thread::Builder::new()
            .name("tally-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let closed = {
                        let mut st = flusher.state.lock();
                        if st.buf.is_empty() && !st.closed {
                            st.idle = true;
                            while st.idle && !st.closed {
                                flusher.work.wait(&mut st);
                            }
                        }
                        // Let lines gather for one tick, unless the buffer is already big.
                        if st.buf.len() < FLUSH_SOON_BYTES && !st.closed {
                            flusher.work.wait_for(&mut st, FLUSH_EVERY);
                        }
                        std::mem::swap(&mut st.buf, &mut spare);
                        flusher.room.notify_all();
                        st.closed && st.buf.is_empty()
                    };
                    if !spare.is_empty() {
                        // A failing log disk must not take the service down; the lines
                        // are lost, as they would be with any other writer.
                        let _ =
                            write_in_pieces(&mut out, &spare, max_write).and_then(|()| out.flush());
                        spare.clear();
                    }
                    if closed {
                        return;
                    }
                }
            })?;
        Ok((
            BufferedLog {
                shared: shared.clone(),
            },
            FlushGuard {
                shared,
                handle: Some(handle),
            },
        ))
    }
}

/// Writes `buf` in pieces that end at a line break and hold at most `max_write` bytes,
/// unless one line is longer (it is written whole).
fn write_in_pieces<W: Write>(out: &mut W, mut buf: &[u8], max_write: usize) -> std::io::Result<()> {
    while !buf.is_empty() {
        let window = &buf[..buf.len().min(max_write.max(1))];
        let end = if window.len() == buf.len() {
            buf.len()
        } else {
            match memchr::memrchr(b'\n', window) {
                Some(i) => i + 1,
                None => memchr::memchr(b'\n', buf).map_or(buf.len(), |i| i + 1),
            }
        };
        out.write_all(&buf[..end])?;
        buf = &buf[end..];
    }
    Ok(())
}

/// Writes every buffered line and stops the flusher when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.work.notify_all();
        self.shared.room.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// tracing-subscriber's default field format (`message key=value ...`) with every
/// control character escaped, in the message and in every field value, whatever the call
/// site formats (`%`, `?`, strings, errors): a client-controlled value (a job id in a path,
/// a header) can then neither start a forged log line nor write raw control bytes.
/// Escaped: C0 (`\n`, `\r`, `\t`, `\0`, others as `\x1b`), DEL (`\x7f`), C1 (`\u{85}`),
/// and the Unicode line and paragraph separators (`\u{2028}`, `\u{2029}`).
///
/// A visitor of its own rather than a wrapper around `DefaultFields`: strings and numbers
/// (most fields) need no escaping pass (`{:?}` of a string escapes all of the above), so
/// only the message, `%`/`?` values and errors go through [`Escaping`], and a line costs
/// no more than with the default format. Field names are not in italics on a colour
/// terminal.
#[derive(Debug, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut v = FieldVisitor {
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

/// Writes fields as `DefaultFields` does: the message bare, the others `name=value`,
/// separated by spaces, `log.*` fields (already shown as metadata) skipped.
struct FieldVisitor<'w> {
    writer: Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl FieldVisitor<'_> {
    /// Writes `name=` (nothing for the message) after a separating space, unless the
    /// field is skipped or an earlier write failed.
    fn begin(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.empty) {
            self.result = self.writer.write_char(' ');
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }

    /// A value that cannot hold a control character.
    fn plain(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.begin(field) {
            self.result = self.writer.write_fmt(value);
        }
    }

    /// A value that may hold anything.
    fn escaped(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.begin(field) {
            self.result = fmt::Write::write_fmt(&mut Escaping(&mut self.writer), value);
        }
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.escaped(field, format_args!("{value}"));
        } else {
            // `{:?}` quotes the string and escapes every control character itself.
            self.plain(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.escaped(field, format_args!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        match value.source() {
            None => self.escaped(field, format_args!("{value}")),
            Some(source) => {
                let sources = ErrorSources(source);
                let name = field.name();
                self.escaped(field, format_args!("{value} {name}.sources={sources}"));
            }
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.plain(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.plain(field, format_args!("{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.plain(field, format_args!("{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.plain(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.plain(field, format_args!("{value:?}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.plain(field, format_args!("{value}"));
    }
}

/// An error's chain of sources, as `DefaultFields` shows it: `[first, second]`.
struct ErrorSources<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorSources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&format_args!("{e}"));
            next = e.source();
        }
        list.finish()
    }
}

/// Escapes what [`EscapedFields`] promises while passing the rest through.
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

fn is_escaped(c: char) -> bool {
    // `is_control` is Unicode's Cc: C0, DEL and C1.
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Fast path: no byte that is, or starts, an escaped character (C1 is encoded
        // as C2 80..9F, U+2028/9 as E2 80 A8/A9).
        if !s
            .bytes()
            .any(|b| b < 0x20 || b == 0x7f || b == 0xc2 || b == 0xe2)
        {
            return self.0.write_str(s);
        }
        let mut clean = 0;
        for (i, c) in s.char_indices() {
            if !is_escaped(c) {
                continue;
            }
            self.0.write_str(&s[clean..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                '\0' => self.0.write_str("\\0")?,
                c if (c as u32) < 0x80 => write!(self.0, "\\x{:02x}", c as u32)?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            clean = i + c.len_utf8();
        }
        self.0.write_str(&s[clean..])
    }
}

/// Keeps the log flusher alive; drop it last so buffered lines are written.
pub struct LogGuard(#[allow(dead_code)] FlushGuard);

/// How a log line is written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `<time> <LEVEL> <target>: <message> key=value ...`, control characters escaped.
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's format): `timestamp`, `level`,
    /// `fields` (`message` and the event's fields), `target`, and the spans.
    Json,
}

/// [`init_as`] in the text format.
pub fn init(
    filter: &str,
    log_file: Option<&Path>,
    max_bytes: usize,
    backups: usize,
) -> anyhow::Result<LogGuard> {
    init_as(LogFormat::Text, filter, log_file, max_bytes, backups)
}

pub fn init_as(
    format: LogFormat,
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
            // The file may pass its limit by one write: keep writes a small part of it.
            BufferedLog::start(file, (max_bytes / 8).clamp(1, 64 * 1024))?
        }
        None => BufferedLog::start(std::io::stdout(), 64 * 1024)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder
            .fmt_fields(EscapedFields)
            .with_ansi(
                log_file.is_none()
                    && std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none(),
            )
            .try_init(),
        // JSON strings escape every control character below U+0020 themselves, so a
        // value still cannot break the line.
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("logging already initialised: {e}"))?;
    Ok(LogGuard(guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read after the flusher wrote to it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_whole_and_in_each_threads_order() {
        let sink = Sink::default();
        let (log, guard) = BufferedLog::start(sink.clone(), 4096).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        let line = format!("thread {t} line {i} {}\n", "x".repeat(i % 200));
                        log.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut parts = line.split(' ');
            assert_eq!(parts.next(), Some("thread"), "{line}");
            let t: usize = parts.next().unwrap().parse().unwrap();
            assert_eq!(parts.next(), Some("line"));
            let i: usize = parts.next().unwrap().parse().unwrap();
            assert_eq!(i, next[t], "thread {t} lines out of order");
            assert_eq!(parts.next().unwrap(), "x".repeat(i % 200));
            next[t] += 1;
        }
        assert_eq!(next, [20_000; 4], "every line was written");
    }

    /// Records the size of each write.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.push(data.to_vec());
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_end_at_line_breaks_and_stay_under_the_limit_unless_a_line_is_longer() {
        let text = b"aa\nbbbb\ncccccccccccc\nd\ne\nno-newline";
        let mut w = Writes::default();
        write_in_pieces(&mut w, text, 8).unwrap();
        let pieces: Vec<&[u8]> = w.0.iter().map(Vec::as_slice).collect();
        assert_eq!(
            pieces,
            vec![
                &b"aa\nbbbb\n"[..],
                b"cccccccccccc\n",
                b"d\ne\n",
                b"no-newline"
            ]
        );
        assert_eq!(pieces.concat(), text);
    }

    /// The lines an event becomes, formatted as `init` formats them (without colours).
    fn logged(f: impl FnOnce()) -> String {
        logged_with(EscapedFields, f)
    }

    fn logged_with<N>(fields: N, f: impl FnOnce()) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(fields)
            .with_writer(move || out.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = sink.0.lock().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("outer failed")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn ordinary_lines_are_formatted_exactly_as_by_the_default_fields() {
        let event = || {
            let err = Outer(std::io::Error::other("inner failed"));
            let plain = std::io::Error::other("plain failure");
            tracing::info!(
                route = "global_mean",
                question = "Percent of adults \"aged\" 18+",
                job_id = %"job_id_7",
                status = 200u16,
                delta = -3i64,
                ratio = 0.5f64,
                whole = 2.0f64,
                ok = true,
                list = ?vec!["a", "b"],
                r#type = "x",
                error = &err as &dyn std::error::Error,
                plain = &plain as &dyn std::error::Error,
                "api request in ({} rows)",
                12
            );
            tracing::warn!("bare message");
            tracing::info!(only = 1u8);
        };
        let ours = logged_with(EscapedFields, event);
        let default = logged_with(tracing_subscriber::fmt::format::DefaultFields::new(), event);
        assert_eq!(ours, default);
        assert_eq!(ours.lines().count(), 3, "{ours}");
    }

    #[test]
    fn control_characters_in_any_field_or_message_are_escaped_and_the_rest_kept() {
        let evil = "job_id_1\n2026-01-01T00:00:00.000000Z ERROR tally::app: FORGED\r\t\0\x1b[31m\x7f\u{85}\u{2028}\u{2029}é—ok";
        let err = std::io::Error::other(evil);
        let text = logged(|| {
            tracing::info!(display = %evil, debug = ?evil, plain = evil, error = &err as &dyn std::error::Error, "msg {evil}");
        });
        assert_eq!(
            text.matches('\n').count(),
            1,
            "one event, one line: {text:?}"
        );
        assert!(text.ends_with('\n'));
        let line = text.trim_end_matches('\n');
        assert!(!line.chars().any(is_escaped), "{line:?}");
        // Display values and the message: each character escaped once, the rest kept.
        let escaped = "job_id_1\\n2026-01-01T00:00:00.000000Z ERROR tally::app: FORGED\\r\\t\\0";
        assert!(
            line.contains(&format!(
                "display={escaped}\\x1b[31m\\x7f\\u{{85}}\\u{{2028}}\\u{{2029}}é—ok"
            )),
            "{line}"
        );
        assert!(line.contains(&format!(" msg {escaped}")), "{line}");
        // Debug values were already escaped by `{:?}`; nothing is escaped twice.
        assert!(line.contains(r#"debug="job_id_1\n2026"#), "{line}");
        assert!(line.contains(r#"plain="job_id_1\n2026"#), "{line}");
        assert!(line.contains(&format!("error={escaped}")), "{line}");
        // Ordinary lines are untouched.
        let text = logged(
            || tracing::info!(route = "get_results", job_id = %"job_id_7", "api request in"),
        );
        assert!(
            text.ends_with("api request in route=\"get_results\" job_id=job_id_7\n"),
            "{text}"
        );
    }

    #[test]
    fn a_lone_line_is_written_within_a_tick_without_closing() {
        let sink = Sink::default();
        let (log, _guard) = BufferedLog::start(sink.clone(), 4096).unwrap();
        log.make_writer().write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&sink.0.lock()[..], b"hello\n");
    }
}
