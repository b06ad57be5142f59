//! CSV column-sum scan engine: sums every `every`-th column (or an explicit
//! list of columns) of a CSV file, in parallel, with compensated summation.
//!
//! This module owns reading the file (memory-mapped), splitting it into
//! chunks at record boundaries, RFC 4180 parsing, number parsing and
//! summation. It is hand-written rather than built on the `csv` crate
//! because scan speed is the product's edge: it never materialises records,
//! skips unselected cells with a 64-byte SIMD bitmask (no allocation), parses
//! simple decimals on an exact fast path, and splits one file across threads
//! even when quoted fields contain newlines. The `csv` crate is kept as the
//! test oracle.
//!
//! Format accepted (strict RFC 4180, separator `,`):
//! * records end with `\n` or `\r\n`; the last may lack it; a lone `\r` is data;
//! * a UTF-8 BOM at the very start is skipped; empty lines are skipped;
//! * quoted fields may contain `,`, `\r`, `\n` and `""` (a literal `"`);
//!   a `"` in an unquoted field, text after a closing quote, or a quote still
//!   open at end of file are errors (the `csv` crate accepts these leniently;
//!   we cannot, since parallel splitting relies on quote parity);
//! * every record must have as many fields as the first one (header);
//! * a summed cell is parsed, after removing its quotes and un-doubling `""`,
//!   with exactly the semantics of `str::parse::<f64>`: nothing is trimmed
//!   (`" 1"` is an error), `inf`/`NaN`/exponents are accepted; an empty cell
//!   counts nothing; invalid UTF-8 is an error in summed cells only;
//! * header names are decoded lossily (invalid UTF-8 → U+FFFD).
//!
//! Errors carry the first bad place in file order (`Location`: record number
//! with the header as record 1, physical line, byte offset), independent of
//! block size and thread count.
//!
//! Pipeline (see `split` and `engine`): the body is cut into waves of
//! `2 × threads` blocks of `block_size` bytes. Pass 1 counts `"` per block and
//! finds each block's first newline at either quote parity; a prefix-xor over
//! blocks gives the true first record start in each block. Pass 2 sums each
//! chunk `[start_i, start_{i+1})` on its own thread with one Neumaier
//! accumulator per selected column; partial sums are merged in file order,
//! also compensated. The hot loop (`record`) walks 64-byte masks of `,`/`"`/
//! `\n` (SSE2 baseline; AVX2+POPCNT+BMI1+LZCNT chosen at run time), skips
//! runs of unselected fields by counting mask bits, and parses short decimals
//! with an exact SWAR fast path (`number`).
//!
//! A file that shrinks or changes while it is scanned fails the scan with
//! [`ScanError::Changed`] instead of ending the process with SIGBUS: see
//! `mapping` for how, and why the scan keeps its mmap.
//!
//! `unsafe` is limited to: the mmap and its SIGBUS handler (`mapping`), SIMD
//! loads from `&[u8; 64]`, and calling the AVX2-compiled entry point after
//! run-time feature detection.

pub mod datasets;
mod engine;
mod error;
pub mod job;
mod mapping;
mod number;
mod record;
mod split;

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use error::{Location, ScanError};

use engine::{Body, BodyError, Plan};
use record::{RawError, RawKind};

/// Default `block_size`: 8 MiB.
pub const DEFAULT_BLOCK_SIZE: usize = 8 << 20;

/// A column chosen by header name (first match; `col{i}` without a header)
/// or by 0-based index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnSel {
    Name(String),
    Index(usize),
}

/// What to sum and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumOptions {
    /// Stride between summed columns (>= 1). Ignored when `columns` is set.
    pub every: usize,
    /// First summed column (0-based). Past the last column: nothing is summed.
    pub offset: usize,
    /// Explicit columns, summed and reported in this order (repeats allowed).
    pub columns: Option<Vec<ColumnSel>>,
    /// First non-blank record is a header (keys are its cells); otherwise
    /// keys are `col{i}`.
    pub has_header: bool,
    /// Bytes per parallel work unit (>= 1). Memory in flight is bounded by
    /// roughly `2 × threads × block_size` of (evictable) mapped pages.
    pub block_size: usize,
    /// Worker threads; 0 means all cores.
    pub threads: usize,
}

impl Default for SumOptions {
    fn default() -> Self {
        SumOptions {
            every: 10,
            offset: 0,
            columns: None,
            has_header: true,
            block_size: DEFAULT_BLOCK_SIZE,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Sums, in requested order, plus the number of data rows (blank lines and
/// the header excluded) and of input bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct SumResult {
    pub columns: Vec<(String, f64)>,
    pub rows: u64,
    pub bytes: u64,
}

/// Memory-maps `path` and runs [`sum_bytes`] on it.
///
/// `progress` is increased by bytes done; setting `cancel` makes the scan
/// stop with [`ScanError::Cancelled`] (checked once per block per thread).
/// A file that shrinks or is rewritten in place meanwhile gives
/// [`ScanError::Changed`].
pub fn sum_file(
    path: &Path,
    opts: &SumOptions,
    progress: Option<&AtomicU64>,
    cancel: Option<&AtomicBool>,
) -> Result<SumResult, ScanError> {
    let file = File::open(path).map_err(|source| ScanError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sum_open_file(&file, path, opts, progress, cancel)
}

/// [`sum_file`] on a file already opened (e.g. with `O_NOFOLLOW` by
/// [`datasets`]); `path` only names it in errors.
pub fn sum_open_file(
    file: &File,
    path: &Path,
    opts: &SumOptions,
    progress: Option<&AtomicU64>,
    cancel: Option<&AtomicBool>,
) -> Result<SumResult, ScanError> {
    sum_mapped(file, path, opts, progress, cancel, None)
}

/// [`sum_open_file`], with a hook called before each wave (see `engine::Body`).
pub(crate) fn sum_mapped(
    file: &File,
    path: &Path,
    opts: &SumOptions,
    progress: Option<&AtomicU64>,
    cancel: Option<&AtomicBool>,
    wave_hook: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<SumResult, ScanError> {
    let io = |source| ScanError::Io {
        path: path.to_path_buf(),
        source,
    };
    let before = mapping::Stamp::of(file).map_err(io)?;
    if before.size == 0 {
        return sum_bytes(&[], opts, progress, cancel);
    }
    let map = mapping::ScanMap::new(file, before).map_err(io)?;
    let outcome = scan(
        map.bytes(),
        opts,
        progress,
        cancel,
        Some(map.faulted()),
        wave_hook,
    );
    if matches!(outcome, Err(ScanError::Cancelled)) {
        return outcome;
    }
    // Sums, or a data error, read from a file that changed meanwhile may mix two
    // versions of it: neither is worth reporting.
    if let Some(now) = map.changed(file).map_err(io)? {
        return Err(ScanError::Changed {
            before: before.size,
            after: now.size,
        });
    }
    outcome
}

/// Sums columns of CSV text held in memory. See the module docs for the
/// accepted format and [`sum_file`] for `progress` / `cancel`.
pub fn sum_bytes(
    data: &[u8],
    opts: &SumOptions,
    progress: Option<&AtomicU64>,
    cancel: Option<&AtomicBool>,
) -> Result<SumResult, ScanError> {
    scan(data, opts, progress, cancel, None, None)
}

/// [`sum_bytes`], also stopping once `faulted` is set (the mapping behind `data` lost
/// pages: see `mapping`).
fn scan(
    data: &[u8],
    opts: &SumOptions,
    progress: Option<&AtomicU64>,
    cancel: Option<&AtomicBool>,
    faulted: Option<&AtomicBool>,
    wave_hook: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<SumResult, ScanError> {
    if opts.every == 0 {
        return Err(ScanError::InvalidOptions(
            "`every` must be at least 1".into(),
        ));
    }
    if opts.block_size == 0 {
        return Err(ScanError::InvalidOptions(
            "`block_size` must be at least 1".into(),
        ));
    }
    if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
        return Err(ScanError::Cancelled);
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };

    let bom = if data.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let first = record::first_record(data, bom).map_err(|e| convert(data, e, 0, &[]))?;
    let (names, body_start, header_records): (Vec<String>, usize, u64) = match first {
        None => (Vec::new(), data.len(), 0),
        Some((fields, next)) if opts.has_header => (
            fields
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect(),
            next,
            1,
        ),
        Some((fields, _)) => (
            (0..fields.len()).map(|i| format!("col{i}")).collect(),
            bom,
            0,
        ),
    };
    let ncols = names.len();

    let wanted: Vec<usize> = match &opts.columns {
        None => (opts.offset..ncols).step_by(opts.every).collect(),
        Some(list) => list
            .iter()
            .map(|sel| match sel {
                ColumnSel::Index(i) if *i < ncols => Ok(*i),
                ColumnSel::Index(i) => Err(ScanError::ColumnOutOfRange { index: *i, ncols }),
                ColumnSel::Name(n) => names
                    .iter()
                    .position(|h| h == n)
                    .ok_or_else(|| ScanError::UnknownColumn(n.clone())),
            })
            .collect::<Result<_, _>>()?,
    };
    let (plan, out_slots) = Plan::new(ncols, &wanted);

    if let Some(p) = progress {
        p.fetch_add(body_start as u64, Ordering::Relaxed);
    }
    let body = Body {
        data,
        plan: &plan,
        threads,
        block_size: opts.block_size,
        progress,
        cancel,
        faulted,
        wave_hook,
    };
    let pool = if threads > 1 && rayon::current_num_threads() != threads {
        Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| ScanError::ThreadPool(e.to_string()))?,
        )
    } else {
        None
    };
    let outcome = match &pool {
        Some(p) => p.install(|| body.run(body_start)),
        None => body.run(body_start),
    };
    let (sums, rows) = outcome.map_err(|e| match e {
        BodyError::Cancelled => ScanError::Cancelled,
        // The caller, which has the file, replaces this with the sizes it sees now.
        BodyError::Changed => ScanError::Changed {
            before: data.len() as u64,
            after: data.len() as u64,
        },
        BodyError::Internal(what) => ScanError::Internal(what),
        BodyError::Raw {
            err,
            data_rows_before,
        } => convert(data, err, header_records + data_rows_before, &names),
    })?;
    if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
        return Err(ScanError::Cancelled);
    }
    let columns = wanted
        .iter()
        .zip(&out_slots)
        .map(|(&c, &slot)| {
            let v = sums.get(slot as usize).map_or(0.0, |n| n.value());
            (names[c].clone(), v)
        })
        .collect();
    Ok(SumResult {
        columns,
        rows,
        bytes: data.len() as u64,
    })
}

/// Adds context to a raw parse error. `records_before`: records (header
/// included) before the chunk the error came from.
fn convert(data: &[u8], e: RawError, records_before: u64, names: &[String]) -> ScanError {
    let offset = e.offset.min(data.len());
    let line = 1 + memchr::memchr_iter(b'\n', &data[..offset]).count() as u64;
    let at = Location {
        record: records_before + e.records_before + 1,
        line,
        byte: offset as u64,
    };
    let column = e.column.unwrap_or(0);
    let name = names
        .get(column)
        .cloned()
        .unwrap_or_else(|| format!("col{column}"));
    match e.kind {
        RawKind::NotANumber(bytes) => {
            let full = String::from_utf8_lossy(&bytes);
            let text = match full.char_indices().nth(80) {
                Some((cut, _)) => format!("{}...", &full[..cut]),
                None => full.into_owned(),
            };
            ScanError::NotANumber {
                at,
                column,
                name,
                text,
            }
        }
        RawKind::InvalidUtf8 => ScanError::InvalidUtf8 { at, column, name },
        RawKind::Ragged { expected, found } => ScanError::Ragged {
            at,
            expected,
            found,
        },
        RawKind::StrayQuote => ScanError::Malformed {
            at,
            column,
            name,
            what: "quote inside an unquoted field",
        },
        RawKind::AfterQuote => ScanError::Malformed {
            at,
            column,
            name,
            what: "unexpected character after closing quote",
        },
        RawKind::Unterminated => ScanError::UnterminatedQuote { at },
    }
}
