//! InfluxDB line protocol parsing (the ingest format of Telegraf,
//! InfluxDB and VictoriaMetrics).
//!
//! This module owns turning a request body into [`Point`]s: line splitting,
//! escaping rules, field-type parsing, timestamp precision, per-line error
//! reporting, and the canonical *series key* that names a point's series.
//! It knows nothing about storage.
//!
//! # Grammar
//!
//! ```text
//! measurement[,tag_key=tag_value...] field_key=field_value[,field_key=field_value...] [timestamp]
//! ```
//!
//! * Lines are separated by `\n`; a trailing `\r` is dropped (CRLF input).
//!   Leading spaces/tabs are ignored. Blank lines and lines whose first
//!   non-blank byte is `#` are skipped. Sections are separated by one or more
//!   spaces; trailing spaces are allowed.
//! * **Escapes in names.** In the measurement, tag keys, tag values and field
//!   keys a backslash escapes `,`, `=`, space and `\` (so `\,` is a literal
//!   comma). A backslash before any other character is a literal backslash.
//!   An unescaped `=` inside a tag value is accepted literally (lenient, like
//!   VictoriaMetrics).
//! * **Field values**:
//!   * float: `1`, `-1.5`, `1e3`, `+2.5E-3`, `.5` (digits, sign, `.`, `e`;
//!     no `inf`/`nan`; a value that overflows to infinity is an error);
//!   * integer: `5i`, `-5i` (`i64`); unsigned: `5u` (`u64`);
//!   * boolean: `t T true True TRUE f F false False FALSE`;
//!   * string: `"..."` where `\"` is a quote and `\\` a backslash (any other
//!     backslash is literal). Strings are parsed and handed to the sink as
//!     [`FieldValue::Str`], and counted in [`ParseSummary::non_numeric`].
//! * **Timestamp**: optional signed integer in the request's [`Precision`],
//!   converted to milliseconds (rounding toward negative infinity); lines
//!   without one get `default_ts_ms`.
//!
//! Each field becomes one [`Point`]. A line is validated completely before
//! any of its points is emitted: a bad line emits nothing, is reported in
//! [`ParseSummary::errors`] with its 1-based line number, and does not stop
//! the following lines.
//!
//! # Series key
//!
//! A point's series is `measurement`, then `,key=value` for each tag in
//! ascending byte order of the key, then `:` and the field key, e.g.
//! `cpu,host=a,region=eu:usage_idle`. In each component the characters
//! `\`, `,`, `=`, `:` and space are prefixed with `\`, so distinct series
//! always get distinct keys. See [`series_key`] and [`Point::series_key`].
//!
//! # Performance
//!
//! The parser borrows from the input: no allocation per line unless the line
//! contains escapes (the unescaped names are then owned). Line splitting and
//! string scanning use `memchr`; name scanning uses a byte-class table.
//!
//! # Not supported
//!
//! Newlines inside string field values (lines are split on every `\n`).
//! Duplicate field keys within a line are all emitted (InfluxDB keeps the
//! last one).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use memchr::{memchr, memchr2, memchr_iter};
use thiserror::Error;

use crate::decimal;

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// Unit of the timestamps in a request (`precision=` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// Nanoseconds (InfluxDB's default).
    #[default]
    Nanoseconds,
    /// Microseconds.
    Microseconds,
    /// Milliseconds.
    Milliseconds,
    /// Seconds.
    Seconds,
}

impl Precision {
    /// Converts a timestamp in this precision to milliseconds, rounding
    /// toward negative infinity. `None` if the result does not fit `i64`.
    pub fn to_millis(self, ts: i64) -> Option<i64> {
        match self {
            Precision::Nanoseconds => Some(ts.div_euclid(1_000_000)),
            Precision::Microseconds => Some(ts.div_euclid(1_000)),
            Precision::Milliseconds => Some(ts),
            Precision::Seconds => ts.checked_mul(1_000),
        }
    }

    /// The canonical short name (`ns`, `us`, `ms`, `s`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Nanoseconds => "ns",
            Precision::Microseconds => "us",
            Precision::Milliseconds => "ms",
            Precision::Seconds => "s",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error from parsing a [`Precision`] name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown precision `{0}` (expected ns, us, ms or s)")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    /// Accepts `ns`/`n`, `us`/`u`/`µs`, `ms`, `s` (InfluxDB v1 and v2 names).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ns" | "n" => Ok(Precision::Nanoseconds),
            "us" | "u" | "µs" => Ok(Precision::Microseconds),
            "ms" => Ok(Precision::Milliseconds),
            "s" => Ok(Precision::Seconds),
            other => Err(UnknownPrecision(other.to_owned())),
        }
    }
}

/// A parsed field value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    /// `1.5`, `1e3`, `7`.
    Float(f64),
    /// `5i`.
    Int(i64),
    /// `5u`.
    UInt(u64),
    /// `t`, `false`, ...
    Bool(bool),
    /// `"text"`, unescaped. Non-numeric.
    Str(&'a str),
}

impl FieldValue<'_> {
    /// The value as `f64`: booleans are `1.0`/`0.0`; integers beyond ±2^53
    /// round to the nearest `f64`; strings are `None`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            FieldValue::Float(v) => Some(v),
            FieldValue::Int(v) => Some(v as f64),
            FieldValue::UInt(v) => Some(v as f64),
            FieldValue::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
            FieldValue::Str(_) => None,
        }
    }

    /// `false` only for strings.
    pub fn is_numeric(&self) -> bool {
        !matches!(self, FieldValue::Str(_))
    }
}

/// Formats the value in line-protocol syntax (`1.5`, `5i`, `5u`, `true`,
/// `"a \"quoted\" string"`).
impl fmt::Display for FieldValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldValue::Float(v) => write!(f, "{v:?}"),
            FieldValue::Int(v) => write!(f, "{v}i"),
            FieldValue::UInt(v) => write!(f, "{v}u"),
            FieldValue::Bool(b) => write!(f, "{b}"),
            FieldValue::Str(s) => {
                f.write_str("\"")?;
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        f.write_str("\\")?;
                    }
                    write!(f, "{c}")?;
                }
                f.write_str("\"")
            }
        }
    }
}

/// One tag of a point (unescaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag<'a> {
    key: Cow<'a, str>,
    value: Cow<'a, str>,
}

impl Tag<'_> {
    /// Tag key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Tag value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// One field of one line: the unit the sink receives. Borrows from the input
/// and from the parser's scratch space, so it lives only for the sink call.
#[derive(Debug, Clone, Copy)]
pub struct Point<'a> {
    measurement: &'a str,
    tags: &'a [Tag<'a>],
    field: &'a str,
    value: FieldValue<'a>,
    timestamp_ms: i64,
    line: usize,
}

impl<'a> Point<'a> {
    /// Measurement name (unescaped).
    pub fn measurement(&self) -> &'a str {
        self.measurement
    }

    /// Tags sorted by key (byte order), keys unique.
    pub fn tags(&self) -> &'a [Tag<'a>] {
        self.tags
    }

    /// Field key (unescaped).
    pub fn field(&self) -> &'a str {
        self.field
    }

    /// Field value.
    pub fn value(&self) -> FieldValue<'a> {
        self.value
    }

    /// Timestamp in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.timestamp_ms
    }

    /// 1-based line number in the input.
    pub fn line(&self) -> usize {
        self.line
    }

    /// The series key (see the module docs), freshly allocated.
    pub fn series_key(&self) -> String {
        let mut out = String::new();
        self.write_series_key(&mut out);
        out
    }

    /// Appends the series key to `out`; reuse `out` (after `clear()`) to
    /// avoid an allocation per point.
    pub fn write_series_key(&self, out: &mut String) {
        write_series_key(
            out,
            self.measurement,
            self.tags.iter().map(|t| (t.key(), t.value())),
            self.field,
        );
    }

    /// Appends the series key without its field (`measurement,tag=value...`): with
    /// [`push_series_field`], the key of any field of this line.
    pub fn write_series_prefix(&self, out: &mut String) {
        push_key_escaped(out, self.measurement);
        for t in self.tags {
            out.push(',');
            push_key_escaped(out, t.key());
            out.push('=');
            push_key_escaped(out, t.value());
        }
    }
}

/// Appends `:` and the escaped field key: after [`Point::write_series_prefix`], the
/// series key.
pub fn push_series_field(out: &mut String, field: &str) {
    out.push(':');
    push_key_escaped(out, field);
}

/// Builds the series key for a measurement, tags and field key. Tags may be
/// in any order; they are sorted by key here (duplicate keys are kept in
/// input order).
///
/// ```
/// use tally::series::line_protocol::series_key;
/// assert_eq!(series_key("cpu", &[("region", "eu"), ("host", "a")], "usage"), "cpu,host=a,region=eu:usage");
/// assert_eq!(series_key("my cpu", &[], "a:b"), "my\\ cpu:a\\:b");
/// ```
pub fn series_key(measurement: &str, tags: &[(&str, &str)], field: &str) -> String {
    let mut out = String::with_capacity(
        measurement.len()
            + field.len()
            + 1
            + tags
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>(),
    );
    if tags.windows(2).all(|w| w[0].0 <= w[1].0) {
        write_series_key(&mut out, measurement, tags.iter().copied(), field);
    } else {
        let mut sorted = tags.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        write_series_key(&mut out, measurement, sorted, field);
    }
    out
}

/// Appends the series key to `out`. `tags` must already be sorted by key
/// (as [`Point::tags`] are); they are written in the order given.
pub fn write_series_key<'t>(
    out: &mut String,
    measurement: &str,
    tags: impl IntoIterator<Item = (&'t str, &'t str)>,
    field: &str,
) {
    push_key_escaped(out, measurement);
    for (k, v) in tags {
        out.push(',');
        push_key_escaped(out, k);
        out.push('=');
        push_key_escaped(out, v);
    }
    out.push(':');
    push_key_escaped(out, field);
}

fn push_key_escaped(out: &mut String, s: &str) {
    let needs = |c: char| matches!(c, '\\' | ',' | '=' | ':' | ' ');
    if !s.contains(needs) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        if needs(c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// What is wrong with a line. Quoted snippets of the input are cut to 64
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LineErrorKind {
    /// The line is not UTF-8.
    #[error("line is not valid UTF-8")]
    InvalidUtf8,
    /// The line starts with `,` or a space.
    #[error("missing measurement name")]
    MissingMeasurement,
    /// Nothing after the measurement and tags.
    #[error("missing field set (expected `measurement[,tags] field=value`)")]
    MissingFields,
    /// `,=value` in the tag set.
    #[error("empty tag key")]
    EmptyTagKey,
    /// `,key` not followed by `=`.
    #[error("tag `{0}` has no `=value`")]
    MissingTagValue(String),
    /// `,key=` followed by `,`, a space or the end of the line.
    #[error("empty value for tag `{0}`")]
    EmptyTagValue(String),
    /// The same tag key twice in one line.
    #[error("duplicate tag key `{0}`")]
    DuplicateTag(String),
    /// `=value` with no key in the field set.
    #[error("empty field key")]
    EmptyFieldKey,
    /// A field key not followed by `=`.
    #[error("field `{0}` has no `=value`")]
    MissingFieldValue(String),
    /// `key=` followed by `,`, a space or the end of the line.
    #[error("empty value for field `{0}`")]
    EmptyFieldValue(String),
    /// A value that is not a float, integer, unsigned, boolean or string.
    #[error("invalid value `{value}` for field `{field}`")]
    InvalidFieldValue {
        /// Field key.
        field: String,
        /// Offending text.
        value: String,
    },
    /// An `i`/`u` value outside `i64`/`u64`, or a float overflowing to infinity.
    #[error("value `{value}` for field `{field}` is out of range")]
    FieldValueOutOfRange {
        /// Field key.
        field: String,
        /// Offending text.
        value: String,
    },
    /// A string value without its closing quote.
    #[error("unterminated string value for field `{0}`")]
    UnterminatedString(String),
    /// A closing quote followed by something other than `,`, space or end.
    #[error("unexpected `{after}` after string value of field `{field}`")]
    AfterString {
        /// Field key.
        field: String,
        /// Text after the closing quote.
        after: String,
    },
    /// The timestamp is not an integer.
    #[error("invalid timestamp `{0}`")]
    InvalidTimestamp(String),
    /// The timestamp does not fit `i64`, or not once converted to ms.
    #[error("timestamp `{value}` is out of range for precision {precision}")]
    TimestampOutOfRange {
        /// Offending text.
        value: String,
        /// Request precision.
        precision: Precision,
    },
    /// Something after the timestamp.
    #[error("unexpected data after timestamp: `{0}`")]
    TrailingData(String),
}

/// A rejected line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {kind}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub kind: LineErrorKind,
}

/// At most this many [`LineError`]s are kept in [`ParseSummary::errors`];
/// [`ParseSummary::error_lines`] counts them all.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// Outcome of [`parse_lines`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParseSummary {
    /// Lines seen, including blank, comment and bad lines.
    pub lines: usize,
    /// Blank and comment lines.
    pub skipped_lines: usize,
    /// Lines whose points were all emitted.
    pub ok_lines: usize,
    /// Rejected lines.
    pub error_lines: usize,
    /// Points handed to the sink (one per field).
    pub points: usize,
    /// Of those, string-valued (non-numeric) points.
    pub non_numeric: usize,
    /// The first [`MAX_REPORTED_ERRORS`] errors, in line order.
    pub errors: Vec<LineError>,
}

impl ParseSummary {
    /// `true` if no line was rejected.
    pub fn is_clean(&self) -> bool {
        self.error_lines == 0
    }
}

// ---------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------

/// Parses `input` line by line, calling `sink` once per field of every valid
/// line, in input order. Timestamps are read in `precision` and converted to
/// milliseconds; lines without a timestamp get `default_ts_ms`.
///
/// ```
/// use tally::series::line_protocol::{parse_lines, Precision};
/// let mut keys = Vec::new();
/// let summary = parse_lines(b"cpu,host=a usage=1.5,up=t 1700000000\nbad\n", Precision::Seconds, 0, |p| {
///     keys.push((p.series_key(), p.value().as_f64(), p.timestamp_ms()));
/// });
/// assert_eq!(keys, [("cpu,host=a:usage".to_string(), Some(1.5), 1_700_000_000_000),
///                   ("cpu,host=a:up".to_string(), Some(1.0), 1_700_000_000_000)]);
/// assert_eq!(summary.errors[0].to_string(), "line 2: missing field set (expected `measurement[,tags] field=value`)");
/// ```
pub fn parse_lines<F>(
    input: &[u8],
    precision: Precision,
    default_ts_ms: i64,
    sink: F,
) -> ParseSummary
where
    F: FnMut(Point<'_>),
{
    /// A sink that knows no series part: every line is parsed whole. The production
    /// parser with nothing remembered, so that tests of `parse_lines` test it.
    struct Forget<F>(F);
    impl<'i, F: FnMut(Point<'_>)> SeriesSink<'i> for Forget<F> {
        type Part = ();
        fn lookup(&mut self, _raw: &'i [u8]) -> Option<()> {
            None
        }
        fn known(&mut self, _: (), _: &str, _: FieldValue<'_>, _: i64) {}
        fn point(&mut self, _raw: &'i [u8], p: Point<'_>) {
            (self.0)(p)
        }
    }
    parse_lines_cached(input, precision, default_ts_ms, &mut Forget(sink))
}

/// The receiver of [`parse_lines_cached`]: it remembers the series parts it has seen, so
/// that lines of a known series skip parsing, unescaping and sorting their tags.
///
/// A line's *series part* is its bytes before the first unescaped space: the measurement
/// and tags exactly as sent. The same bytes always parse to the same measurement and
/// tags, so a part that once parsed without error can be looked up by its bytes alone.
pub trait SeriesSink<'i> {
    /// What the sink keeps for a series part.
    type Part: Copy;

    /// The part remembered for these bytes, if any. Called once per line (not for a line
    /// whose series part is byte for byte the previous line's, when that one was found).
    fn lookup(&mut self, raw: &'i [u8]) -> Option<Self::Part>;

    /// A field of a valid line whose series part `lookup` found.
    fn known(&mut self, part: Self::Part, field: &str, value: FieldValue<'_>, timestamp_ms: i64);

    /// A field of a valid line whose series part `lookup` did not find: the whole point,
    /// and `raw`, the bytes the sink may remember it by.
    fn point(&mut self, raw: &'i [u8], p: Point<'_>);
}

/// [`parse_lines`] for a [`SeriesSink`]: the same lines accepted, the same points (in the
/// same order, for `known` and `point` together), the same summary and errors; only the
/// tags of lines whose series part the sink knows are not parsed again.
pub fn parse_lines_cached<'i, S: SeriesSink<'i>>(
    input: &'i [u8],
    precision: Precision,
    default_ts_ms: i64,
    sink: &mut S,
) -> ParseSummary {
    let mut summary = ParseSummary::default();
    let mut scratch = Scratch::default();
    // One UTF-8 check for the whole batch (fast, and the common case) instead of one per
    // line; a batch with invalid bytes falls back to checking line by line, so the bad
    // line is still the one reported.
    let text = std::str::from_utf8(input).ok();
    let mut last: Option<(&'i [u8], S::Part)> = None;
    let mut start = 0;
    let mut line_no = 0;
    let mut ends = memchr_iter(b'\n', input);
    loop {
        let (end, next) = match ends.next() {
            Some(nl) => (nl, nl + 1),
            None if start < input.len() => (input.len(), input.len()),
            None => break,
        };
        let line = &input[start..end];
        let line_text = text.map(|t| (t, start));
        start = next;
        line_no += 1;
        summary.lines += 1;
        parse_one_cached(
            LineRef {
                bytes: line,
                whole: line_text,
                no: line_no,
            },
            precision,
            default_ts_ms,
            &mut scratch,
            &mut summary,
            sink,
            &mut last,
        );
    }
    summary
}

#[inline]
fn parse_one_cached<'i, S: SeriesSink<'i>>(
    LineRef {
        bytes: line,
        whole,
        no: line_no,
    }: LineRef<'i>,
    precision: Precision,
    default_ts_ms: i64,
    scratch: &mut Scratch<'i>,
    summary: &mut ParseSummary,
    sink: &mut S,
    last: &mut Option<(&'i [u8], S::Part)>,
) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let skip = line
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let line = &line[skip..];
    let text = whole.and_then(|(t, at)| t.get(at + skip..at + skip + line.len()));
    if line.is_empty() || line[0] == b'#' {
        summary.skipped_lines += 1;
        return;
    }
    scratch.tags.clear();
    scratch.fields.clear();
    let text = match text.map_or_else(|| std::str::from_utf8(line), Ok) {
        Ok(text) => text,
        Err(_) => return line_error(summary, line_no, LineErrorKind::InvalidUtf8),
    };
    // Where the series part ends when it parses (see `SeriesSink`): the first space not
    // escaped (found with SIMD up to the first backslash, if any).
    let end = match memchr2(b' ', b'\\', line) {
        Some(at) if line[at] == b'\\' => scan_name(line, at, C_SPACE).0,
        Some(at) => at,
        None => line.len(),
    };
    let raw = &line[..end];
    let part = match *last {
        Some((prev, part)) if prev == raw => Some(part),
        _ => sink.lookup(raw),
    };
    *last = part.map(|p| (raw, p));
    match part {
        Some(part) => match parse_fields(text, end, precision, default_ts_ms, scratch) {
            Ok(timestamp_ms) => {
                summary.ok_lines += 1;
                for f in &scratch.fields {
                    let value = f.value.field_value(summary);
                    sink.known(part, &f.key, value, timestamp_ms);
                }
            }
            Err(kind) => line_error(summary, line_no, kind),
        },
        None => match parse_line(text, precision, default_ts_ms, scratch) {
            Ok((measurement, timestamp_ms)) => {
                summary.ok_lines += 1;
                for f in &scratch.fields {
                    let value = f.value.field_value(summary);
                    sink.point(
                        raw,
                        Point {
                            measurement: &measurement,
                            tags: &scratch.tags,
                            field: &f.key,
                            value,
                            timestamp_ms,
                            line: line_no,
                        },
                    );
                }
            }
            Err(kind) => line_error(summary, line_no, kind),
        },
    }
}

fn line_error(summary: &mut ParseSummary, line: usize, kind: LineErrorKind) {
    summary.error_lines += 1;
    if summary.errors.len() < MAX_REPORTED_ERRORS {
        summary.errors.push(LineError { line, kind });
    }
}

#[derive(Default)]
struct Scratch<'i> {
    tags: Vec<Tag<'i>>,
    fields: Vec<RawField<'i>>,
    /// The last field key without escapes: most lines repeat it (`value`), and bytes that
    /// start with it and `=` scan to the same key.
    last_key: &'i str,
}

struct RawField<'i> {
    key: Cow<'i, str>,
    value: RawValue<'i>,
}

enum RawValue<'i> {
    Float(f64),
    Int(i64),
    UInt(u64),
    Bool(bool),
    Str(Cow<'i, str>),
}

impl RawValue<'_> {
    /// The value handed to a sink; counts strings and points in `summary`.
    #[inline]
    fn field_value(&self, summary: &mut ParseSummary) -> FieldValue<'_> {
        summary.points += 1;
        match self {
            RawValue::Float(v) => FieldValue::Float(*v),
            RawValue::Int(v) => FieldValue::Int(*v),
            RawValue::UInt(v) => FieldValue::UInt(*v),
            RawValue::Bool(v) => FieldValue::Bool(*v),
            RawValue::Str(s) => {
                summary.non_numeric += 1;
                FieldValue::Str(s)
            }
        }
    }
}

/// One line of the input.
struct LineRef<'i> {
    bytes: &'i [u8],
    /// The whole input as text (when it is valid UTF-8) and where `bytes` starts in it.
    whole: Option<(&'i str, usize)>,
    /// 1-based line number, for error reports.
    no: usize,
}

const C_COMMA: u8 = 1;
const C_SPACE: u8 = 2;
const C_EQ: u8 = 4;
const C_BSLASH: u8 = 8;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b',' as usize] = C_COMMA;
    t[b' ' as usize] = C_SPACE;
    t[b'=' as usize] = C_EQ;
    t[b'\\' as usize] = C_BSLASH;
    t
};

/// Scans a name starting at `i` up to the first unescaped byte of class
/// `stop` (or the end). Returns the stop position and whether a backslash
/// was seen.
#[inline]
fn scan_name(b: &[u8], mut i: usize, stop: u8) -> (usize, bool) {
    let mut escaped = false;
    while let Some(&c) = b.get(i) {
        let class = CLASS[c as usize];
        if class & stop != 0 {
            return (i, escaped);
        }
        if class & C_BSLASH != 0 {
            escaped = true;
            i += 2;
        } else {
            i += 1;
        }
    }
    (b.len(), escaped)
}

/// Scans an unquoted field value or timestamp: no escapes.
#[inline]
fn scan_plain(b: &[u8], mut i: usize, stop: u8) -> usize {
    while let Some(&c) = b.get(i) {
        if CLASS[c as usize] & stop != 0 {
            return i;
        }
        i += 1;
    }
    b.len()
}

#[inline]
fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    i
}

/// Removes name escapes (`\,` `\=` `\ ` `\\`).
#[inline]
fn unescape_name(raw: &str, escaped: bool) -> Cow<'_, str> {
    if !escaped {
        return Cow::Borrowed(raw);
    }
    unescape(raw, |c| matches!(c, b',' | b'=' | b' ' | b'\\'))
}

fn unescape(raw: &str, escapable: impl Fn(u8) -> bool) -> Cow<'_, str> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut from = 0;
    let mut search = 0;
    while let Some(off) = b.get(search..).and_then(|rest| memchr(b'\\', rest)) {
        let at = search + off;
        match b.get(at + 1) {
            Some(&c) if escapable(c) => {
                // Both bytes are ASCII, so these are char boundaries.
                out.push_str(&raw[from..at]);
                from = at + 1;
                search = at + 2;
            }
            _ => search = at + 1,
        }
    }
    out.push_str(&raw[from..]);
    Cow::Owned(out)
}

/// Cuts a snippet of the input for an error message.
fn snippet(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut cut = MAX;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

/// Parses one non-blank, non-comment line into `scratch`; returns the
/// measurement and the timestamp in ms.
fn parse_line<'i>(
    line: &'i str,
    precision: Precision,
    default_ts_ms: i64,
    scratch: &mut Scratch<'i>,
) -> Result<(Cow<'i, str>, i64), LineErrorKind> {
    let (measurement, i) = parse_series(line, scratch)?;
    let ts = parse_fields(line, i, precision, default_ts_ms, scratch)?;
    Ok((measurement, ts))
}

/// Parses the measurement and tag set into `scratch.tags`; returns the measurement and
/// where the series part ends (the first unescaped space, or the end of the line).
fn parse_series<'i>(
    line: &'i str,
    scratch: &mut Scratch<'i>,
) -> Result<(Cow<'i, str>, usize), LineErrorKind> {
    let b = line.as_bytes();

    // Measurement.
    let (m_end, m_esc) = scan_name(b, 0, C_COMMA | C_SPACE);
    if m_end == 0 {
        return Err(LineErrorKind::MissingMeasurement);
    }
    let measurement = unescape_name(&line[..m_end], m_esc);
    let mut i = m_end;

    // Tag set.
    while b.get(i) == Some(&b',') {
        let ks = i + 1;
        let (k_end, k_esc) = scan_name(b, ks, C_COMMA | C_SPACE | C_EQ);
        if k_end == ks {
            return Err(LineErrorKind::EmptyTagKey);
        }
        let key = unescape_name(&line[ks..k_end], k_esc);
        if b.get(k_end) != Some(&b'=') {
            return Err(LineErrorKind::MissingTagValue(snippet(&key)));
        }
        let vs = k_end + 1;
        let (v_end, v_esc) = scan_name(b, vs, C_COMMA | C_SPACE);
        if v_end == vs {
            return Err(LineErrorKind::EmptyTagValue(snippet(&key)));
        }
        let value = unescape_name(&line[vs..v_end], v_esc);
        scratch.tags.push(Tag { key, value });
        i = v_end;
    }
    if scratch.tags.len() > 1 {
        scratch.tags.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        if let Some(w) = scratch.tags.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(LineErrorKind::DuplicateTag(snippet(&w[0].key)));
        }
    }
    Ok((measurement, i))
}

/// Parses the field set (from `i`, the end of the series part) into `scratch.fields`
/// and the timestamp; returns the timestamp in ms.
fn parse_fields<'i>(
    line: &'i str,
    mut i: usize,
    precision: Precision,
    default_ts_ms: i64,
    scratch: &mut Scratch<'i>,
) -> Result<i64, LineErrorKind> {
    let b = line.as_bytes();
    let len = b.len();

    // Field set.
    i = skip_spaces(b, i);
    if i >= len {
        return Err(LineErrorKind::MissingFields);
    }
    loop {
        let ks = i;
        let hint = scratch.last_key.len();
        let (k_end, k_esc) = if hint > 0
            && b.get(ks + hint) == Some(&b'=')
            && b[ks..].starts_with(scratch.last_key.as_bytes())
        {
            (ks + hint, false)
        } else {
            scan_name(b, ks, C_COMMA | C_SPACE | C_EQ)
        };
        if k_end == ks {
            return Err(LineErrorKind::EmptyFieldKey);
        }
        if !k_esc {
            scratch.last_key = &line[ks..k_end];
        }
        let key = unescape_name(&line[ks..k_end], k_esc);
        if b.get(k_end) != Some(&b'=') {
            return Err(LineErrorKind::MissingFieldValue(snippet(&key)));
        }
        let vs = k_end + 1;
        let (value, v_end) = if b.get(vs) == Some(&b'"') {
            parse_string(line, vs, &key)?
        } else if let Some((v, v_end)) = float_at(b, vs) {
            (RawValue::Float(v), v_end)
        } else {
            let v_end = scan_plain(b, vs, C_COMMA | C_SPACE);
            if v_end == vs {
                return Err(LineErrorKind::EmptyFieldValue(snippet(&key)));
            }
            (parse_value(&line[vs..v_end], &key)?, v_end)
        };
        scratch.fields.push(RawField { key, value });
        i = v_end;
        if b.get(i) == Some(&b',') {
            i += 1;
        } else {
            break;
        }
    }

    // Timestamp.
    i = skip_spaces(b, i);
    if i >= len {
        return Ok(default_ts_ms);
    }
    let (ts, t_end) = match timestamp_at(b, i, precision) {
        Some(fast) => fast,
        None => {
            let t_end = scan_plain(b, i, C_SPACE);
            (parse_timestamp(&line[i..t_end], precision)?, t_end)
        }
    };
    let rest = skip_spaces(b, t_end);
    if rest < len {
        return Err(LineErrorKind::TrailingData(snippet(&line[rest..])));
    }
    Ok(ts)
}

/// Parses a quoted string starting at the opening quote `b[q]`; returns the
/// value and the index just past the closing quote.
fn parse_string<'i>(
    line: &'i str,
    q: usize,
    key: &str,
) -> Result<(RawValue<'i>, usize), LineErrorKind> {
    let b = line.as_bytes();
    let start = q + 1;
    let mut j = start;
    let mut escaped = false;
    let close = loop {
        let Some(off) = b.get(j..).and_then(|rest| memchr2(b'"', b'\\', rest)) else {
            return Err(LineErrorKind::UnterminatedString(snippet(key)));
        };
        let at = j + off;
        if b[at] == b'"' {
            break at;
        }
        escaped = true;
        j = at + 2;
    };
    let raw = &line[start..close];
    let value = if escaped {
        unescape(raw, |c| c == b'"' || c == b'\\')
    } else {
        Cow::Borrowed(raw)
    };
    let end = close + 1;
    match b.get(end) {
        None | Some(b',') | Some(b' ') => Ok((RawValue::Str(value), end)),
        Some(_) => {
            let after_end = scan_plain(b, end, C_COMMA | C_SPACE);
            Err(LineErrorKind::AfterString {
                field: snippet(key),
                after: snippet(&line[end..after_end]),
            })
        }
    }
}

fn invalid(key: &str, value: &str) -> LineErrorKind {
    LineErrorKind::InvalidFieldValue {
        field: snippet(key),
        value: snippet(value),
    }
}

fn out_of_range(key: &str, value: &str) -> LineErrorKind {
    LineErrorKind::FieldValueOutOfRange {
        field: snippet(key),
        value: snippet(value),
    }
}

/// Parses an unquoted field value (non-empty).
#[inline]
fn parse_value<'i>(s: &str, key: &str) -> Result<RawValue<'i>, LineErrorKind> {
    let b = s.as_bytes();
    match b.last() {
        Some(b'i') => {
            let digits = &b[..b.len() - 1];
            match parse_int(digits) {
                Ok(v) => Ok(RawValue::Int(v)),
                Err(IntError::Overflow) => Err(out_of_range(key, s)),
                Err(IntError::Invalid) => Err(invalid(key, s)),
            }
        }
        Some(b'u') => {
            let digits = &b[..b.len() - 1];
            if let Some(rest) = digits.strip_prefix(b"-") {
                // A negative unsigned is a range error if it is otherwise a number.
                return Err(if is_digits(rest) {
                    out_of_range(key, s)
                } else {
                    invalid(key, s)
                });
            }
            match parse_uint(digits) {
                Ok(v) => Ok(RawValue::UInt(v)),
                Err(IntError::Overflow) => Err(out_of_range(key, s)),
                Err(IntError::Invalid) => Err(invalid(key, s)),
            }
        }
        _ => match s {
            "t" | "T" | "true" | "True" | "TRUE" => Ok(RawValue::Bool(true)),
            "f" | "F" | "false" | "False" | "FALSE" => Ok(RawValue::Bool(false)),
            _ => parse_float(s).map(RawValue::Float).map_err(|e| match e {
                IntError::Overflow => out_of_range(key, s),
                IntError::Invalid => invalid(key, s),
            }),
        },
    }
}

enum IntError {
    Invalid,
    Overflow,
}

fn is_digits(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(u8::is_ascii_digit)
}

#[inline]
fn parse_uint(b: &[u8]) -> Result<u64, IntError> {
    let b = b.strip_prefix(b"+").unwrap_or(b);
    if !is_digits(b) {
        return Err(IntError::Invalid);
    }
    let mut v: u64 = 0;
    for &c in b {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .ok_or(IntError::Overflow)?;
    }
    Ok(v)
}

#[inline]
fn parse_int(b: &[u8]) -> Result<i64, IntError> {
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, b),
    };
    if !is_digits(digits) {
        return Err(IntError::Invalid);
    }
    if digits.len() <= 19 {
        // 10^19 - 1 < u64::MAX: no overflow before the range check (19 digits is every
        // nanosecond timestamp from 2001 to 2286).
        let mut v: u64 = 0;
        for &c in digits {
            v = v * 10 + u64::from(c - b'0');
        }
        return if neg {
            // Up to 2^63, which is i64::MIN.
            if v <= 1 << 63 {
                Ok((v as i64).wrapping_neg())
            } else {
                Err(IntError::Overflow)
            }
        } else {
            i64::try_from(v).map_err(|_| IntError::Overflow)
        };
    }
    // Accumulate negatively so that i64::MIN parses.
    let mut v: i64 = 0;
    for &c in digits {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_sub(i64::from(c - b'0')))
            .ok_or(IntError::Overflow)?;
    }
    if neg {
        Ok(v)
    } else {
        v.checked_neg().ok_or(IntError::Overflow)
    }
}

/// The common float value (`-12.345`) parsed where it starts, at `b[vs]`, in one pass:
/// the value and where it ends, when it is plain decimal digits (with a sign and a point)
/// followed by `,`, a space or the end, and Clinger's fast path applies. `None` sends the
/// value to the general path, which gives the same result or the error.
#[inline]
fn float_at(b: &[u8], vs: usize) -> Option<(f64, usize)> {
    let (v, end) = decimal::scan(b, vs)?;
    matches!(b.get(end), None | Some(b',' | b' ')).then_some((v, end))
}

/// The common timestamp (up to 19 digits, optionally `-`, followed by a space or the end)
/// parsed where it starts, in one pass: the time in ms and where it ends. `None` sends
/// it to the general path (which also words the errors).
#[inline]
fn timestamp_at(b: &[u8], start: usize, precision: Precision) -> Option<(i64, usize)> {
    let neg = b.get(start) == Some(&b'-');
    let mut i = start + usize::from(neg);
    let first = i;
    let mut v: u64 = 0;
    // Eight digits at a time for the first sixteen (a nanosecond timestamp has 19).
    while i - first < 16 {
        match b.get(i..i + 8).and_then(decimal::eight_digits) {
            Some(d) => {
                v = v * 100_000_000 + d;
                i += 8;
            }
            None => break,
        }
    }
    while let Some(&c) = b.get(i) {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        v = v.wrapping_mul(10).wrapping_add(u64::from(d));
        i += 1;
    }
    let n = i - first;
    if n == 0 || n > 19 || !matches!(b.get(i), None | Some(b' ')) {
        return None;
    }
    let ts = if neg {
        if v > 1 << 63 {
            return None;
        }
        (v as i64).wrapping_neg()
    } else {
        i64::try_from(v).ok()?
    };
    Some((precision.to_millis(ts)?, i))
}

#[inline]
fn parse_float(s: &str) -> Result<f64, IntError> {
    let b = s.as_bytes();
    if let Some(v) = decimal::parse(b) {
        return Ok(v);
    }
    // Restrict to the line-protocol float syntax before handing to std, which
    // would also accept `inf`, `NaN`, `infinity`.
    let mut has_digit = false;
    for &c in b {
        match c {
            b'0'..=b'9' => has_digit = true,
            b'.' | b'e' | b'E' | b'+' | b'-' => {}
            _ => return Err(IntError::Invalid),
        }
    }
    if !has_digit || matches!(b.first(), Some(b'e' | b'E')) {
        return Err(IntError::Invalid);
    }
    let v: f64 = s.parse().map_err(|_| IntError::Invalid)?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(IntError::Overflow)
    }
}

fn parse_timestamp(raw: &str, precision: Precision) -> Result<i64, LineErrorKind> {
    let out_of_range = || LineErrorKind::TimestampOutOfRange {
        value: snippet(raw),
        precision,
    };
    let ts = match parse_int(raw.as_bytes()) {
        Ok(v) => v,
        Err(IntError::Overflow) => return Err(out_of_range()),
        Err(IntError::Invalid) => return Err(LineErrorKind::InvalidTimestamp(snippet(raw))),
    };
    precision.to_millis(ts).ok_or_else(out_of_range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_float_path_matches_std_bit_for_bit() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut checked = 0;
        for _ in 0..200_000 {
            let int_digits = (next() % 12) as usize;
            let frac_digits = (next() % 12) as usize;
            let mut s = String::new();
            match next() % 3 {
                0 => s.push('-'),
                1 => s.push('+'),
                _ => {}
            }
            for _ in 0..int_digits {
                s.push(char::from(b'0' + (next() % 10) as u8));
            }
            if next() % 4 != 0 {
                s.push('.');
                for _ in 0..frac_digits {
                    s.push(char::from(b'0' + (next() % 10) as u8));
                }
            }
            let std: Option<f64> = s.parse().ok();
            if let Some(fast) = decimal::parse(s.as_bytes()) {
                checked += 1;
                assert_eq!(Some(fast.to_bits()), std.map(f64::to_bits), "{s}");
            }
            assert_eq!(
                parse_float(&s).ok().map(f64::to_bits),
                std.map(f64::to_bits),
                "{s}"
            );
        }
        assert!(checked > 100_000);
        for s in [
            "9007199254740992",
            "9007199254740993",
            "0.1",
            "-0.0",
            "1234567890123456789",
            "1.2345678901234567890123",
        ] {
            assert_eq!(
                parse_float(s).ok().map(f64::to_bits),
                s.parse::<f64>().ok().map(f64::to_bits),
                "{s}"
            );
        }
    }

    /// A sink that caches every series part, rebuilding keys from what it kept.
    #[derive(Default)]
    struct Caching<'i> {
        parts: std::collections::HashMap<&'i [u8], usize>,
        prefixes: Vec<String>,
        points: Vec<String>,
    }

    impl<'i> SeriesSink<'i> for Caching<'i> {
        type Part = usize;
        fn lookup(&mut self, raw: &'i [u8]) -> Option<usize> {
            self.parts.get(raw).copied()
        }
        fn known(&mut self, part: usize, field: &str, value: FieldValue<'_>, ts: i64) {
            let mut key = self.prefixes[part].clone();
            push_series_field(&mut key, field);
            self.points.push(format!("{key} {value} {ts}"));
        }
        fn point(&mut self, raw: &'i [u8], p: Point<'_>) {
            if !self.parts.contains_key(raw) {
                let mut prefix = String::new();
                p.write_series_prefix(&mut prefix);
                self.parts.insert(raw, self.prefixes.len());
                self.prefixes.push(prefix);
            }
            self.points.push(format!(
                "{} {} {}",
                p.series_key(),
                p.value(),
                p.timestamp_ms()
            ));
        }
    }

    #[test]
    fn the_cached_parser_gives_what_the_plain_one_gives() {
        let measurements = ["m", "cpu", "a\\ b", "x\\,y", "", ",", "c=d", "\\", "é"];
        let tags = [
            "",
            ",t=1",
            ",t=2",
            ",a=b",
            ",t=",
            ",=v",
            ",k",
            ",k\\ x=v\\=1",
            ",t=1,t=1",
            ",z=1,a=2",
            ",a=2,z=1",
            ",t=a b",
            ",t=a\\",
            ",t=\\,",
        ];
        let fields = [
            " v=1",
            " v=1.5",
            " v=-2e3",
            " v=1i",
            " v=t",
            " v=\"s\"",
            " v=",
            " =1",
            " v=1,w=2",
            " v=abc",
            "  v=9007199254740993",
            " v=1.",
            " v=+.5",
            " v=-0",
            " v=1u",
            " v=-1u",
            " v=12.345,s=\"a b\"",
            " v=\"x",
            " v=1e400",
            "",
            " v=0.1234567890123456789012",
            " v=1..2",
        ];
        let stamps = [
            "",
            " 1700000000000",
            " -5",
            " 99999999999999999999",
            " 1x",
            " 1 2",
            " 1700000000000000000",
            " +5",
            " 9223372036854775807",
            " -9223372036854775808",
            " 9223372036854775808",
            "  7  ",
            " 00000000000000000001",
        ];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut lines = Vec::new();
        for _ in 0..3000 {
            let lead = ["", "", "  ", "\t", "#"][next(5)];
            lines.push(format!(
                "{lead}{}{}{}{}",
                measurements[next(measurements.len())],
                tags[next(tags.len())],
                fields[next(fields.len())],
                stamps[next(stamps.len())],
            ));
        }
        // Each line twice, the second time mostly far from the first.
        let mut input = String::new();
        for i in 0..lines.len() * 2 {
            input.push_str(&lines[if i % 2 == 0 { i / 2 } else { next(lines.len()) }]);
            input.push_str(["\n", "\r\n"][next(2)]);
        }
        let mut bytes = input.into_bytes();
        for precision in [Precision::Nanoseconds, Precision::Seconds] {
            for text in [true, false] {
                if !text {
                    // Not UTF-8 as a whole: checked line by line.
                    bytes.extend_from_slice(b"m v=1 5\n\xff v=1\nm v=2 5\n");
                }
                let mut plain = Vec::new();
                let want = parse_lines(&bytes, precision, 42, |p| {
                    plain.push(format!(
                        "{} {} {}",
                        p.series_key(),
                        p.value(),
                        p.timestamp_ms()
                    ));
                });
                let mut sink = Caching::default();
                let got = parse_lines_cached(&bytes, precision, 42, &mut sink);
                assert_eq!(got, want);
                assert_eq!(sink.points, plain);
                assert!(want.points > 500 && want.error_lines > 1000, "{want:?}");
            }
        }
    }

    #[test]
    fn int_parsing_edges() {
        for s in [
            "0",
            "-0",
            "999999999999999999",
            "-999999999999999999",
            "1000000000000000000",
            "9223372036854775807",
            "-9223372036854775808",
            "+5",
        ] {
            assert_eq!(parse_int(s.as_bytes()).ok(), s.parse::<i64>().ok(), "{s}");
        }
        assert!(matches!(
            parse_int(b"9223372036854775808"),
            Err(IntError::Overflow)
        ));
        assert!(matches!(
            parse_int(b"-9223372036854775809"),
            Err(IntError::Overflow)
        ));
        assert!(matches!(parse_int(b"-"), Err(IntError::Invalid)));
        assert!(matches!(
            parse_uint(b"18446744073709551616"),
            Err(IntError::Overflow)
        ));
    }
}
