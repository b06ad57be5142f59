//! Pass 2 and the wave loop: split a window of the input into chunks at true
//! record boundaries (pass 1, `split`), sum each chunk in parallel, fold the
//! partial sums in file order.
//!
//! The body is processed in *waves* of `2 × threads` blocks, so the memory
//! held at once is `O(threads × (block_size + selected columns))` whatever the
//! file size. Chunk 0 of a wave starts at a known record start; the last
//! chunk may run past the wave's end to finish its last record, and the next
//! wave starts where it stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use super::number::{parse_at, parse_f64, CellError, Neumaier};
use super::record::{parse_record, unescape, Base, Bits, Classify, RawError, RawKind, Sink};
use super::split::scan_block;

/// `sel` value of a column that is not summed.
pub(crate) const NONE: u32 = u32::MAX;

/// Bytes of a bad cell kept for its error message: more than 80 characters of any text.
const SHOWN_BYTES: usize = 1024;

/// Which columns to sum, resolved against the header.
pub(crate) struct Plan {
    /// Per column: accumulator slot, or `NONE`.
    pub sel: Vec<u32>,
    /// Per column: number of consecutive unsummed columns starting here.
    pub run: Vec<u32>,
    pub ncols: usize,
    pub nslots: usize,
}

impl Plan {
    pub(crate) fn new(ncols: usize, wanted: &[usize]) -> (Plan, Vec<u32>) {
        let mut sel = vec![NONE; ncols];
        let mut nslots = 0u32;
        let mut out = Vec::with_capacity(wanted.len());
        for &c in wanted {
            if sel[c] == NONE {
                sel[c] = nslots;
                nslots += 1;
            }
            out.push(sel[c]);
        }
        let mut run = vec![0u32; ncols];
        for c in (0..ncols).rev() {
            if sel[c] == NONE {
                run[c] = 1 + run.get(c + 1).copied().unwrap_or(0);
            }
        }
        (
            Plan {
                sel,
                run,
                ncols,
                nslots: nslots as usize,
            },
            out,
        )
    }
}

struct NumSink<'p> {
    plan: &'p Plan,
    accs: Vec<Neumaier>,
    /// First bad cell of the current record; reported at the record's end
    /// unless the record is ragged (a ragged row is the better message).
    pending: Option<RawError>,
}

impl Sink for NumSink<'_> {
    #[inline(always)]
    fn wants(&self, field: usize) -> bool {
        matches!(self.plan.sel.get(field), Some(&s) if s != NONE)
    }

    #[inline(always)]
    fn skip_run(&self, field: usize) -> usize {
        self.plan.run.get(field).map_or(0, |&r| r as usize)
    }

    #[inline(always)]
    fn cell(
        &mut self,
        field: usize,
        data: &[u8],
        start: usize,
        end: usize,
        escaped: bool,
        offset: usize,
    ) {
        if start == end {
            return;
        }
        let slot = match self.plan.sel.get(field) {
            Some(&s) if s != NONE => s as usize,
            _ => return,
        };
        let parsed = if escaped {
            parse_f64(&unescape(&data[start..end], true))
        } else {
            parse_at(data, start, end)
        };
        match parsed {
            Ok(v) => {
                if let Some(acc) = self.accs.get_mut(slot) {
                    acc.add(v);
                }
            }
            Err(e) => {
                if self.pending.is_none() {
                    let kind = match e {
                        CellError::InvalidUtf8 => RawKind::InvalidUtf8,
                        // The message shows 80 characters: copying a huge cell (say one
                        // running into the zeros of a truncated file) would be a waste.
                        CellError::NotANumber => RawKind::NotANumber(unescape(
                            &data[start..end.min(start.saturating_add(SHOWN_BYTES))],
                            escaped,
                        )),
                    };
                    self.pending = Some(RawError {
                        kind,
                        offset,
                        column: Some(field),
                        records_before: 0,
                    });
                }
            }
        }
    }
}

/// Result of one chunk.
pub(crate) struct ChunkOut {
    pub accs: Vec<Neumaier>,
    pub rows: u64,
    /// Where the chunk's last record ended.
    pub end: usize,
}

/// Sums the records that start in `[start, end)`; `start` must be a true
/// record start. The last record may end after `end`.
///
/// On x86_64 CPUs with AVX2/POPCNT/BMI1/LZCNT (checked at run time, cached
/// by std) the same code is compiled with those instructions enabled and
/// 32-byte compares; otherwise the SSE2 (or portable) baseline runs.
pub(crate) fn parse_chunk(
    data: &[u8],
    start: usize,
    end: usize,
    plan: &Plan,
) -> Result<ChunkOut, RawError> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("popcnt")
            && std::arch::is_x86_feature_detected!("bmi1")
            && std::arch::is_x86_feature_detected!("lzcnt")
        {
            // SAFETY: the CPU supports every feature `parse_chunk_avx2` enables.
            return unsafe { parse_chunk_avx2(data, start, end, plan) };
        }
    }
    parse_chunk_impl::<Base>(data, start, end, plan)
}

/// The baseline path, whatever the CPU (tests compare it with the dispatched one).
#[cfg(test)]
pub(crate) fn parse_chunk_baseline(
    data: &[u8],
    start: usize,
    end: usize,
    plan: &Plan,
) -> Result<ChunkOut, RawError> {
    parse_chunk_impl::<Base>(data, start, end, plan)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt,bmi1,lzcnt")]
unsafe fn parse_chunk_avx2(
    data: &[u8],
    start: usize,
    end: usize,
    plan: &Plan,
) -> Result<ChunkOut, RawError> {
    parse_chunk_impl::<super::record::Avx2>(data, start, end, plan)
}

#[inline(always)]
fn parse_chunk_impl<C: Classify>(
    data: &[u8],
    start: usize,
    end: usize,
    plan: &Plan,
) -> Result<ChunkOut, RawError> {
    let mut sink = NumSink {
        plan,
        accs: vec![Neumaier::default(); plan.nslots],
        pending: None,
    };
    let mut bits = Bits::<C>::at(data, start);
    let mut rec = start;
    let mut rows = 0u64;
    while rec < end {
        let r = parse_record(data, &mut bits, rec, &mut sink).map_err(|mut e| {
            e.records_before = rows;
            e
        })?;
        if r.fields > 0 {
            if r.fields != plan.ncols {
                return Err(RawError {
                    kind: RawKind::Ragged {
                        expected: plan.ncols,
                        found: r.fields,
                    },
                    offset: rec,
                    column: None,
                    records_before: rows,
                });
            }
            if let Some(mut e) = sink.pending.take() {
                e.records_before = rows;
                return Err(e);
            }
            rows += 1;
        }
        rec = r.next;
    }
    Ok(ChunkOut {
        accs: sink.accs,
        rows,
        end: rec,
    })
}

/// Why the body scan stopped.
pub(crate) enum BodyError {
    Cancelled,
    /// The mapped file shrank under the scan (`mapping`'s flag).
    Changed,
    /// `data_rows_before`: data records before the chunk that failed.
    Raw {
        err: RawError,
        data_rows_before: u64,
    },
    Internal(&'static str),
}

pub(crate) struct Body<'a> {
    pub data: &'a [u8],
    pub plan: &'a Plan,
    pub threads: usize,
    pub block_size: usize,
    pub progress: Option<&'a AtomicU64>,
    pub cancel: Option<&'a AtomicBool>,
    /// Set when part of the mapped file was replaced by zeros (see `mapping`).
    pub faulted: Option<&'a AtomicBool>,
    /// Called before each wave with the offset it starts at (tests change the file there).
    pub wave_hook: Option<&'a (dyn Fn(usize) + Sync)>,
}

impl Body<'_> {
    /// Checked once per block per thread: the hot loop itself never looks.
    fn stopped(&self) -> Option<BodyError> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            Some(BodyError::Cancelled)
        } else if self.faulted.is_some_and(|f| f.load(Ordering::Relaxed)) {
            Some(BodyError::Changed)
        } else {
            None
        }
    }

    fn map<T: Send>(&self, n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
        if self.threads > 1 && n > 1 {
            (0..n).into_par_iter().map(f).collect()
        } else {
            (0..n).map(f).collect()
        }
    }

    /// Scans `data[start..]`; returns per-slot sums and the data row count.
    pub(crate) fn run(&self, start: usize) -> Result<(Vec<Neumaier>, u64), BodyError> {
        let data = self.data;
        let len = data.len();
        let bs = self.block_size.max(1);
        let per_wave = if self.threads > 1 {
            self.threads.saturating_mul(2)
        } else {
            1
        };
        let wave_len = bs.saturating_mul(per_wave);
        let mut total = vec![Neumaier::default(); self.plan.nslots];
        let mut rows = 0u64;
        let mut s = start;
        while s < len {
            if let Some(hook) = self.wave_hook {
                hook(s);
            }
            if let Some(e) = self.stopped() {
                return Err(e);
            }
            let wend = s.saturating_add(wave_len).min(len);
            let nblocks = (wend - s).div_ceil(bs);
            let bstart = |i: usize| (s + i * bs).min(wend);
            let mut starts = vec![s];
            if nblocks > 1 {
                let scans = self.map(nblocks, |i| scan_block(data, bstart(i), bstart(i + 1)));
                let mut odd = false;
                for i in 1..nblocks {
                    odd ^= scans[i - 1].odd_quotes;
                    if let Some(nl) = scans[i].first_nl[usize::from(odd)] {
                        let st = nl + 1;
                        if st < wend && starts.last().is_some_and(|&l| st > l) {
                            starts.push(st);
                        }
                    }
                }
            }
            let n = starts.len();
            let outs = self.map(n, |i| {
                if let Some(e) = self.stopped() {
                    return Err(e);
                }
                let end = starts.get(i + 1).copied().unwrap_or(wend);
                let out =
                    parse_chunk(data, starts[i], end, self.plan).map_err(|err| BodyError::Raw {
                        err,
                        data_rows_before: 0,
                    })?;
                if let Some(p) = self.progress {
                    p.fetch_add((out.end - starts[i]) as u64, Ordering::Relaxed);
                }
                Ok(out)
            });
            let mut next = s;
            for (i, out) in outs.into_iter().enumerate() {
                let out = match out {
                    Ok(o) => o,
                    Err(BodyError::Raw { err, .. }) => {
                        return Err(BodyError::Raw {
                            err,
                            data_rows_before: rows,
                        })
                    }
                    Err(e) => return Err(e),
                };
                if starts.get(i + 1).is_some_and(|&nx| nx != out.end) {
                    return Err(BodyError::Internal("chunk boundary mismatch"));
                }
                rows += out.rows;
                for (t, a) in total.iter_mut().zip(&out.accs) {
                    t.merge(a);
                }
                next = out.end;
            }
            if next <= s {
                return Err(BodyError::Internal("no progress"));
            }
            s = next;
        }
        Ok((total, rows))
    }
}
