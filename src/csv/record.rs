//! The hot loop: a 64-byte bitmask scanner over `,` `"` `\n` and a strict
//! RFC 4180 record parser driven by it.
//!
//! Grammar (strict, so that quote parity == "inside a quoted field", which
//! the parallel splitter relies on):
//! * a record ends at `\n`; a `\r` right before `\n` (or before EOF) belongs
//!   to the terminator; any other `\r` is ordinary data;
//! * a field is quoted iff its first byte is `"`; inside, `""` is a literal
//!   quote and `,`/`\r`/`\n` are data; the closing quote must be followed by
//!   `,`, `\n`, `\r\n`, `\r`+EOF or EOF;
//! * a `"` anywhere else is an error (`StrayQuote`), as is anything else
//!   after a closing quote (`AfterQuote`) and a quote left open at EOF;
//! * an empty line (`\n` or `\r\n` alone) is skipped, like the `csv` crate.

use memchr::memchr;

/// What went wrong, without the context (record number, names) that only
/// the caller knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawKind {
    NotANumber(Vec<u8>),
    InvalidUtf8,
    Ragged { expected: usize, found: usize },
    StrayQuote,
    AfterQuote,
    Unterminated,
}

/// A parse error at absolute byte `offset`; `records_before` counts the
/// complete non-blank records of the same chunk that precede it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawError {
    pub kind: RawKind,
    pub offset: usize,
    pub column: Option<usize>,
    pub records_before: u64,
}

impl RawError {
    fn new(kind: RawKind, offset: usize, column: Option<usize>) -> Self {
        RawError {
            kind,
            offset,
            column,
            records_before: 0,
        }
    }
}

/// Bit `i` of `.0` is set iff `block[i] == b','`; of `.1` iff it is `"` or `\n`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn classify(block: &[u8; 64]) -> (u64, u64) {
    use core::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let mut commas = 0u64;
    let mut special = 0u64;
    // SAFETY: SSE2 is part of the x86_64 baseline (always enabled), and each
    // unaligned load reads bytes 16*i .. 16*i+16 of the 64-byte array.
    unsafe {
        let c = _mm_set1_epi8(b',' as i8);
        let q = _mm_set1_epi8(b'"' as i8);
        let n = _mm_set1_epi8(b'\n' as i8);
        for i in 0..4 {
            let v = _mm_loadu_si128(block.as_ptr().add(16 * i).cast::<__m128i>());
            let mc = _mm_movemask_epi8(_mm_cmpeq_epi8(v, c)) as u32 as u64;
            let ms = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, q), _mm_cmpeq_epi8(v, n)))
                as u32 as u64;
            commas |= mc << (16 * i);
            special |= ms << (16 * i);
        }
    }
    (commas, special)
}

/// Portable fallback (also the reference the SIMD version is tested against).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline(always)]
pub(crate) fn classify_portable(block: &[u8; 64]) -> (u64, u64) {
    let mut commas = 0u64;
    let mut special = 0u64;
    for (i, &b) in block.iter().enumerate() {
        commas |= u64::from(b == b',') << i;
        special |= u64::from(b == b'"' || b == b'\n') << i;
    }
    (commas, special)
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(crate) fn classify(block: &[u8; 64]) -> (u64, u64) {
    classify_portable(block)
}

/// How 64 bytes are classified; a type parameter so that the AVX2 version
/// is inlined into the `#[target_feature(enable = "avx2")]` entry point.
pub(crate) trait Classify {
    fn classify(block: &[u8; 64]) -> (u64, u64);
}

/// Baseline: SSE2 on x86_64, portable elsewhere.
pub(crate) struct Base;

impl Classify for Base {
    #[inline(always)]
    fn classify(block: &[u8; 64]) -> (u64, u64) {
        classify(block)
    }
}

/// AVX2. Only instantiate inside a function compiled with AVX2 enabled that
/// is only called after `is_x86_feature_detected!("avx2")`.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Classify for Avx2 {
    #[inline(always)]
    fn classify(block: &[u8; 64]) -> (u64, u64) {
        use core::arch::x86_64::{
            __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_or_si256,
            _mm256_set1_epi8,
        };
        // SAFETY: `Avx2` is only used under a run-time AVX2 check (see the
        // type's docs); the loads read bytes 0..32 and 32..64 of the array.
        unsafe {
            let c = _mm256_set1_epi8(b',' as i8);
            let q = _mm256_set1_epi8(b'"' as i8);
            let n = _mm256_set1_epi8(b'\n' as i8);
            let lo = _mm256_loadu_si256(block.as_ptr().cast::<__m256i>());
            let hi = _mm256_loadu_si256(block.as_ptr().add(32).cast::<__m256i>());
            let c_lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(lo, c)) as u32 as u64;
            let c_hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(hi, c)) as u32 as u64;
            let s_lo = _mm256_movemask_epi8(_mm256_or_si256(
                _mm256_cmpeq_epi8(lo, q),
                _mm256_cmpeq_epi8(lo, n),
            )) as u32 as u64;
            let s_hi = _mm256_movemask_epi8(_mm256_or_si256(
                _mm256_cmpeq_epi8(hi, q),
                _mm256_cmpeq_epi8(hi, n),
            )) as u32 as u64;
            (c_lo | (c_hi << 32), s_lo | (s_hi << 32))
        }
    }
}

/// Cursor over the structural bytes (`,` `"` `\n`) of `data` from some
/// position on. Invariant: `all`/`commas` only hold bits of unconsumed
/// structural bytes in `[base, base + 64)`.
pub(crate) struct Bits<C: Classify> {
    base: usize,
    all: u64,
    commas: u64,
    _classify: core::marker::PhantomData<C>,
}

impl<C: Classify> Bits<C> {
    #[inline(always)]
    pub(crate) fn at(data: &[u8], pos: usize) -> Self {
        let mut b = Bits {
            base: pos,
            all: 0,
            commas: 0,
            _classify: core::marker::PhantomData,
        };
        b.load(data);
        b
    }

    #[inline(always)]
    fn load(&mut self, data: &[u8]) {
        let (c, s) = match data.get(self.base..self.base.saturating_add(64)) {
            Some(block) => match <&[u8; 64]>::try_from(block) {
                Ok(arr) => C::classify(arr),
                Err(_) => (0, 0), // unreachable: the range is 64 long
            },
            None => {
                let mut buf = [0u8; 64];
                let tail = data.get(self.base..).unwrap_or(&[]);
                buf[..tail.len()].copy_from_slice(tail);
                C::classify(&buf)
            }
        };
        self.commas = c;
        self.all = c | s;
    }

    /// Moves to the next 64-byte window; `false` at end of data.
    #[inline(always)]
    fn advance(&mut self, data: &[u8]) -> bool {
        self.base += 64;
        if self.base >= data.len() {
            self.all = 0;
            self.commas = 0;
            return false;
        }
        self.load(data);
        true
    }

    #[inline(always)]
    pub(crate) fn seek(&mut self, data: &[u8], pos: usize) {
        self.base = pos;
        self.load(data);
    }

    /// Position of the next structural byte, consuming it.
    #[inline(always)]
    fn next(&mut self, data: &[u8]) -> Option<usize> {
        while self.all == 0 {
            if !self.advance(data) {
                return None;
            }
        }
        let low = self.all & self.all.wrapping_neg();
        self.all ^= low;
        self.commas &= !low;
        Some(self.base + low.trailing_zeros() as usize)
    }

    /// Consumes up to `want` commas that come before any `"`/`\n`, i.e. skips
    /// up to `want` plain comma-terminated fields. Returns how many were
    /// skipped and the position of the last comma consumed.
    #[inline(always)]
    fn skip_commas(&mut self, data: &[u8], mut want: usize) -> (usize, usize) {
        let mut done = 0usize;
        let mut last = 0usize;
        loop {
            let special = self.all & !self.commas;
            let first_special = special & special.wrapping_neg();
            let avail = if first_special == 0 {
                self.commas
            } else {
                self.commas & (first_special - 1)
            };
            let n = avail.count_ones() as usize;
            if n >= want {
                let pos = select(avail, (want - 1) as u32);
                let upto = if pos == 63 {
                    u64::MAX
                } else {
                    (2u64 << pos) - 1
                };
                self.all &= !upto;
                self.commas &= !upto;
                return (done + want, self.base + pos as usize);
            }
            if n > 0 {
                last = self.base + 63 - avail.leading_zeros() as usize;
                self.all &= !avail;
                self.commas &= !avail;
                done += n;
                want -= n;
            }
            if first_special != 0 || !self.advance(data) {
                return (done, last);
            }
        }
    }
}

/// `SELECT_IN_BYTE[b][k]`: position of the k-th (0-based) set bit of byte `b`.
static SELECT_IN_BYTE: [[u8; 8]; 256] = {
    let mut t = [[8u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        let mut i = 0;
        while i < 8 {
            if b & (1 << i) != 0 {
                t[b][k] = i as u8;
                k += 1;
            }
            i += 1;
        }
        b += 1;
    }
    t
};

/// Position of the `k`-th (0-based) set bit of `x`; `x` must have more than
/// `k` set bits. Branch-free (the skip count varies per call, so a
/// clear-lowest-bit loop mispredicts its exit every time).
#[inline(always)]
fn select(x: u64, k: u32) -> u32 {
    let mut x = x;
    let mut k = k;
    let mut pos = 0u32;
    for shift in [32u32, 16, 8] {
        let c = (x & ((1u64 << shift) - 1)).count_ones();
        let go = u32::from(k >= c);
        k -= c * go;
        x >>= shift * go;
        pos += shift * go;
    }
    pos + u32::from(SELECT_IN_BYTE[(x & 0xFF) as usize][(k & 7) as usize])
}

/// Receives the cells of a record.
pub(crate) trait Sink {
    /// Whether cell `field` is looked at at all.
    fn wants(&self, field: usize) -> bool;
    /// How many consecutive unwanted fields start at `field` (0 if wanted or
    /// past the known columns).
    fn skip_run(&self, field: usize) -> usize;
    /// A wanted cell: `data[start..end]` is the content without surrounding
    /// quotes, with `""` still doubled when `escaped`; `offset` is where the
    /// cell starts (its opening quote if quoted). `data` is the whole input,
    /// so a parser may read a few bytes past `end` (and must ignore them).
    fn cell(
        &mut self,
        field: usize,
        data: &[u8],
        start: usize,
        end: usize,
        escaped: bool,
        offset: usize,
    );
}

/// How one record ended.
pub(crate) struct RecordEnd {
    /// Start of the next record.
    pub next: usize,
    /// Number of fields (0 for a skipped blank line).
    pub fields: usize,
}

/// Parses the record starting at `rec` (a true record start) and reports its
/// wanted cells to `sink`. `bits` must be positioned at `rec` (fresh or left
/// by the previous call).
#[inline(always)]
pub(crate) fn parse_record<S: Sink, C: Classify>(
    data: &[u8],
    bits: &mut Bits<C>,
    rec: usize,
    sink: &mut S,
) -> Result<RecordEnd, RawError> {
    let len = data.len();
    let mut field = 0usize;
    let mut fstart = rec;
    loop {
        let run = sink.skip_run(field);
        if run > 0 {
            let (n, last) = bits.skip_commas(data, run);
            if n > 0 {
                field += n;
                fstart = last + 1;
                if n == run {
                    continue;
                }
            }
        }
        match bits.next(data) {
            None => {
                let end = strip_cr(data, fstart, len);
                if field == 0 && end == fstart {
                    return Ok(RecordEnd {
                        next: len,
                        fields: 0,
                    });
                }
                if sink.wants(field) {
                    sink.cell(field, data, fstart, end, false, fstart);
                }
                return Ok(RecordEnd {
                    next: len,
                    fields: field + 1,
                });
            }
            Some(p) => match data[p] {
                b',' => {
                    if sink.wants(field) {
                        sink.cell(field, data, fstart, p, false, fstart);
                    }
                    field += 1;
                    fstart = p + 1;
                }
                b'\n' => {
                    let end = strip_cr(data, fstart, p);
                    if field == 0 && end == fstart {
                        return Ok(RecordEnd {
                            next: p + 1,
                            fields: 0,
                        });
                    }
                    if sink.wants(field) {
                        sink.cell(field, data, fstart, end, false, fstart);
                    }
                    return Ok(RecordEnd {
                        next: p + 1,
                        fields: field + 1,
                    });
                }
                _ => {
                    if p != fstart {
                        return Err(RawError::new(RawKind::StrayQuote, p, Some(field)));
                    }
                    let (close, escaped) = find_close(data, p)?;
                    let after = close + 1;
                    let (next, is_end) = match data.get(after) {
                        None => (len, true),
                        Some(b',') => (after + 1, false),
                        Some(b'\n') => (after + 1, true),
                        Some(b'\r') if matches!(data.get(after + 1), None | Some(b'\n')) => {
                            ((after + 2).min(len), true)
                        }
                        Some(_) => {
                            return Err(RawError::new(RawKind::AfterQuote, after, Some(field)));
                        }
                    };
                    if sink.wants(field) {
                        sink.cell(field, data, p + 1, close, escaped, p);
                    }
                    bits.seek(data, next);
                    if is_end {
                        return Ok(RecordEnd {
                            next,
                            fields: field + 1,
                        });
                    }
                    field += 1;
                    fstart = next;
                }
            },
        }
    }
}

#[inline(always)]
fn strip_cr(data: &[u8], start: usize, end: usize) -> usize {
    if end > start && data[end - 1] == b'\r' {
        end - 1
    } else {
        end
    }
}

/// Finds the closing quote of the quoted field opened at `open`.
fn find_close(data: &[u8], open: usize) -> Result<(usize, bool), RawError> {
    let mut i = open + 1;
    let mut escaped = false;
    loop {
        match memchr(b'"', &data[i..]) {
            None => return Err(RawError::new(RawKind::Unterminated, open, None)),
            Some(k) => {
                let q = i + k;
                if data.get(q + 1) == Some(&b'"') {
                    escaped = true;
                    i = q + 2;
                } else {
                    return Ok((q, escaped));
                }
            }
        }
    }
}

/// `""` → `"`.
pub(crate) fn unescape(raw: &[u8], escaped: bool) -> Vec<u8> {
    if !escaped {
        return raw.to_vec();
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        out.push(raw[i]);
        i += if raw[i] == b'"' { 2 } else { 1 };
    }
    out
}

/// Collects every cell of a record (used for the header / first record).
#[derive(Default)]
pub(crate) struct Collect {
    pub fields: Vec<Vec<u8>>,
}

impl Sink for Collect {
    fn wants(&self, _: usize) -> bool {
        true
    }
    fn skip_run(&self, _: usize) -> usize {
        0
    }
    fn cell(
        &mut self,
        field: usize,
        data: &[u8],
        start: usize,
        end: usize,
        escaped: bool,
        _: usize,
    ) {
        let raw = &data[start..end];
        // Cells arrive in order; fill any gap defensively.
        while self.fields.len() < field {
            self.fields.push(Vec::new());
        }
        self.fields.push(unescape(raw, escaped));
    }
}

/// Cells of one record, and where the next record starts.
pub(crate) type FirstRecord = (Vec<Vec<u8>>, usize);

/// Parses the first non-blank record at or after `pos`.
/// Returns its cells and the start of the following record, or `None` if
/// there is none.
pub(crate) fn first_record(data: &[u8], mut pos: usize) -> Result<Option<FirstRecord>, RawError> {
    let mut bits = Bits::<Base>::at(data, pos);
    while pos < data.len() {
        let mut sink = Collect::default();
        let end = parse_record(data, &mut bits, pos, &mut sink)?;
        if end.fields > 0 {
            let mut fields = sink.fields;
            fields.resize(end.fields, Vec::new());
            return Ok(Some((fields, end.next)));
        }
        pos = end.next;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_classify_matches_portable() {
        let mut block = [0u8; 64];
        let alphabet = b",\"\n\r a1.";
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            for b in block.iter_mut() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = alphabet[(x >> 16) as usize % alphabet.len()];
            }
            assert_eq!(classify(&block), classify_portable(&block));
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                fn avx2(block: &[u8; 64]) -> (u64, u64) {
                    Avx2::classify(block)
                }
                // SAFETY: AVX2 was detected just above.
                assert_eq!(unsafe { avx2(&block) }, classify_portable(&block));
            }
        }
    }

    #[test]
    fn select_finds_kth_bit() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut a = x;
            for k in 0..x.count_ones() {
                assert_eq!(select(x, k), a.trailing_zeros(), "{x:#x} {k}");
                a &= a - 1;
            }
        }
    }

    #[test]
    fn unescape_doubled_quotes() {
        assert_eq!(unescape(br#"a""b"""#, true), br#"a"b""#.to_vec());
        assert_eq!(unescape(b"ab", false), b"ab".to_vec());
    }
}
