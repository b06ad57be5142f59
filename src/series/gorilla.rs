//! Gorilla-compressed blocks of `(timestamp_ms: i64, value: f64)` points.
//!
//! This module owns the block format for one series: the bit layout, the
//! [`BlockEncoder`] that writes it, the [`BlockIter`] that reads it back, the
//! validation of blocks loaded from elsewhere ([`SealedBlock::from_raw`]) and
//! the [`Aggregates`] computed once when a block is sealed, so that
//! `sum/count/min/max/last` queries over whole blocks never decompress.
//!
//! # Why this is hand-written
//!
//! Storage density and scan speed are the product's edge: they decide how
//! many series fit in memory and how fast a dashboard query returns. We
//! therefore own the format bit for bit instead of depending on a crate whose
//! layout, bucket sizes, NaN handling or failure modes could change under us.
//! The codec is small, has no `unsafe`, is bit-exact for every `f64`
//! (NaN payloads, `-0.0`, infinities, subnormals) and every `i64` timestamp,
//! and never panics on corrupt input.
//!
//! # Format (version 1)
//!
//! The block is a big-endian bit stream (most significant bit first), padded
//! with *one* bits to a whole byte (so pad bits can never decode as an extra
//! point). The point count is stored *outside* the
//! bytes (in [`SealedBlock`]); an empty block is zero bytes.
//!
//! * Point 0: the timestamp as 64 raw bits (two's complement), then the value
//!   as 64 raw bits (`f64::to_bits`).
//! * Point `i > 0`: a timestamp record followed by a value record.
//!
//! **Timestamps** use delta-of-delta encoding. With `delta_0 = 0`,
//! `delta_i = t_i - t_{i-1}` and `dod_i = delta_i - delta_{i-1}` (all
//! arithmetic wrapping in `i64`, which makes the scheme exact for *any* pair
//! of `i64` timestamps, including `i64::MIN` followed by `i64::MAX`):
//!
//! | prefix  | payload                 | `dod` range (two's complement)   |
//! |---------|-------------------------|----------------------------------|
//! | `0`     | —                       | `0`                              |
//! | `10`    | 7 bits                  | `-64 ..= 63`                     |
//! | `110`   | 9 bits                  | `-256 ..= 255`                   |
//! | `1110`  | 12 bits                 | `-2048 ..= 2047`                 |
//! | `11110` | 32 bits                 | `i32::MIN ..= i32::MAX` (~±24.8 days in ms) |
//! | `11111` | 64 bits                 | anything else (raw fallback)     |
//!
//! The bucket widths are those of the Gorilla paper (7/9/12/32 bits); the
//! paper's 32-bit bucket is the last one, so we add the 64-bit escape for
//! huge jumps. The first delta has no special 14-bit encoding (our blocks are
//! not aligned to two-hour windows): it is simply `dod_1 = delta_1`.
//!
//! **Values** are XORed with the previous value's bits (`x`):
//!
//! | prefix | payload                                              | when |
//! |--------|------------------------------------------------------|------|
//! | `0`    | —                                                    | `x == 0` |
//! | `10`   | `64 - L - T` meaningful bits                         | `x` fits the current window (leading zeros `>= L`, trailing zeros `>= T`) |
//! | `11`   | 5 bits `L` (capped at 31), 6 bits `M` (`64` stored as `0`), `M` meaningful bits | otherwise; `(L, T = 64 - L - M)` becomes the window |
//!
//! There is no window before the first `11` record.

use crate::neumaier::Neumaier;
use std::fmt;

use thiserror::Error;

// ---------------------------------------------------------------------------
// Bit I/O
// ---------------------------------------------------------------------------

/// Append-only MSB-first bit writer.
#[derive(Debug, Clone, Default)]
struct BitWriter {
    buf: Vec<u8>,
    /// Pending bits, right-aligned; `nbits < 64` between calls.
    acc: u64,
    nbits: u32,
}

impl BitWriter {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            acc: 0,
            nbits: 0,
        }
    }

    /// Writes the low `n` bits of `v` (`n <= 64`).
    #[inline]
    fn write(&mut self, v: u64, n: u32) {
        debug_assert!(n <= 64);
        if n == 0 {
            return;
        }
        let v = if n == 64 { v } else { v & ((1u64 << n) - 1) };
        let free = 64 - self.nbits; // 1..=64
        if n < free {
            self.acc = (self.acc << n) | v;
            self.nbits += n;
        } else {
            // Fill the accumulator completely, flush it, keep the rest.
            let rest = n - free; // 0..64
            let hi = if rest == 0 { v } else { v >> rest };
            let acc = if free == 64 {
                hi
            } else {
                (self.acc << free) | hi
            };
            self.buf.extend_from_slice(&acc.to_be_bytes());
            self.acc = if rest == 0 {
                0
            } else {
                v & ((1u64 << rest) - 1)
            };
            self.nbits = rest;
        }
    }

    /// Bytes the stream would occupy if finished now.
    fn byte_len(&self) -> usize {
        self.buf.len() + self.nbits.div_ceil(8) as usize
    }

    fn finish(mut self) -> Vec<u8> {
        if self.nbits > 0 {
            // Pad with ones: a truncated '1…' prefix can never decode as a
            // point, so a count that is too high is always detected.
            let aligned = (self.acc << (64 - self.nbits)) | (u64::MAX >> self.nbits);
            let bytes = aligned.to_be_bytes();
            let n = self.nbits.div_ceil(8) as usize;
            self.buf.extend_from_slice(&bytes[..n]);
        }
        self.buf
    }
}

/// MSB-first bit reader that reports running past the end instead of
/// panicking. Keeps up to 64 bits cached, left-aligned in `buf`.
#[derive(Debug, Clone)]
struct BitReader<'a> {
    data: &'a [u8],
    /// Next byte of `data` not yet accounted for in `avail`.
    next: usize,
    /// Cached bits, left-aligned. Bits past `avail` are either zero or the
    /// genuine following bits of `data` (never anything else).
    buf: u64,
    avail: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            next: 0,
            buf: 0,
            avail: 0,
        }
    }

    /// Bits consumed so far.
    fn position(&self) -> usize {
        self.next * 8 - self.avail as usize
    }

    #[cfg(test)]
    fn bits_left(&self) -> usize {
        (self.data.len() - self.next) * 8 + self.avail as usize
    }

    /// Tops `buf` up to at least 57 bits, or to everything that is left.
    #[inline]
    fn refill(&mut self) {
        if let Some(chunk) = self.data.get(self.next..self.next + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            // Whole bytes only are accounted for; the extra bits ORed in are
            // the same bits the next refill will OR in again.
            self.buf |= u64::from_be_bytes(w) >> self.avail;
            let take = (63 - self.avail) >> 3;
            self.next += take as usize;
            self.avail += take * 8;
        } else {
            while self.avail <= 56 {
                let Some(&b) = self.data.get(self.next) else {
                    break;
                };
                self.buf |= u64::from(b) << (56 - self.avail);
                self.next += 1;
                self.avail += 8;
            }
        }
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        // n <= avail <= 64
        self.buf = if n >= 64 { 0 } else { self.buf << n };
        self.avail -= n;
    }

    /// Reads `n <= 64` bits as an unsigned integer.
    #[inline]
    fn read(&mut self, n: u32) -> Option<u64> {
        debug_assert!(n <= 64);
        if n > 56 {
            let hi = self.read(n - 32)?;
            let lo = self.read(32)?;
            return Some((hi << 32) | lo);
        }
        if n == 0 {
            return Some(0);
        }
        if self.avail < n {
            self.refill();
            if self.avail < n {
                return None;
            }
        }
        let v = self.buf >> (64 - n);
        self.consume(n);
        Some(v)
    }

    /// Reads a unary prefix: counts `1` bits up to `max` (<= 8), consuming
    /// the terminating `0` when fewer than `max` ones were seen.
    #[inline]
    fn read_prefix(&mut self, max: u32) -> Option<u32> {
        if self.avail < max {
            self.refill();
        }
        let ones = self.buf.leading_ones().min(max);
        let used = if ones < max { ones + 1 } else { max };
        if self.avail < used {
            return None;
        }
        self.consume(used);
        Some(ones)
    }
}

#[inline]
fn sign_extend(v: u64, bits: u32) -> i64 {
    let shift = 64 - bits;
    ((v << shift) as i64) >> shift
}

// ---------------------------------------------------------------------------
// Aggregates
// ---------------------------------------------------------------------------

/// Aggregates over every point of a sealed block, computed at seal time.
///
/// * `sum` is Neumaier-compensated (error independent of the number of
///   points for well-conditioned data). IEEE rules apply for non-finite
///   input: any NaN, or both `+inf` and `-inf`, give NaN; otherwise an
///   infinity (input or overflow) gives that infinity. The sum of only
///   `-0.0` values is `-0.0`.
/// * `min` / `max` ignore NaNs; they are NaN only if every value is NaN.
///   Between `0.0` and `-0.0` the first one seen wins.
/// * `last` is the value of the last point (latest timestamp; for equal
///   timestamps, the last pushed), bit-exact.
#[derive(Debug, Clone, Copy)]
pub struct Aggregates {
    /// Number of points (never 0 for an `Aggregates` handed out).
    pub count: u64,
    /// Compensated sum of all values.
    pub sum: f64,
    /// Smallest non-NaN value (NaN if all values are NaN).
    pub min: f64,
    /// Largest non-NaN value (NaN if all values are NaN).
    pub max: f64,
    /// Value of the last point.
    pub last: f64,
}

impl Aggregates {
    /// Mean value (`sum / count`).
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

#[derive(Debug, Clone, Copy)]
struct AggState {
    count: u64,
    sum: Neumaier,
    min: f64,
    max: f64,
    last: f64,
}

impl AggState {
    const fn new() -> Self {
        Self {
            count: 0,
            sum: Neumaier::IDENTITY,
            min: f64::NAN,
            max: f64::NAN,
            last: f64::NAN,
        }
    }

    #[inline]
    fn push(&mut self, x: f64) {
        self.count += 1;
        self.sum.add(x);
        if !x.is_nan() {
            if self.min.is_nan() || x < self.min {
                self.min = x;
            }
            if self.max.is_nan() || x > self.max {
                self.max = x;
            }
        }
        self.last = x;
    }

    fn finish(&self) -> Aggregates {
        Aggregates {
            count: self.count,
            sum: self.sum.value(),
            min: self.min,
            max: self.max,
            last: self.last,
        }
    }
}

// ---------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------

/// Why a point was rejected by [`BlockEncoder::push`]. The encoder is left
/// unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// Timestamps must be nondecreasing within a block.
    #[error("timestamp {ts} is before the previous point's timestamp {prev}")]
    OutOfOrder {
        /// Rejected timestamp.
        ts: i64,
        /// Timestamp of the last accepted point.
        prev: i64,
    },
    /// A block holds at most `u32::MAX` points.
    #[error("block is full ({} points)", u32::MAX)]
    Full,
}

/// No XOR window has been established yet.
const NO_WINDOW: u32 = u32::MAX;

/// Builds one block. Push points in nondecreasing timestamp order, then
/// [`finish`](Self::finish) to get an immutable [`SealedBlock`].
///
/// ```
/// use tally::series::gorilla::BlockEncoder;
/// let mut enc = BlockEncoder::new();
/// enc.push(1_000, 1.5).unwrap();
/// enc.push(2_000, 2.5).unwrap();
/// let block = enc.finish();
/// assert_eq!(block.iter().collect::<Vec<_>>(), vec![(1_000, 1.5), (2_000, 2.5)]);
/// assert_eq!(block.aggregates().unwrap().sum, 4.0);
/// ```
#[derive(Debug, Clone)]
pub struct BlockEncoder {
    bits: BitWriter,
    count: u32,
    first_ts: i64,
    prev_ts: i64,
    prev_delta: i64,
    prev_value: u64,
    lead: u32,
    trail: u32,
    agg: AggState,
}

impl Default for BlockEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockEncoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty encoder with room for about `points` points before
    /// reallocating (assumes ~2 bytes per point).
    pub fn with_capacity(points: usize) -> Self {
        Self {
            bits: BitWriter::with_capacity(16 + points.saturating_mul(2)),
            count: 0,
            first_ts: 0,
            prev_ts: 0,
            prev_delta: 0,
            prev_value: 0,
            lead: NO_WINDOW,
            trail: 0,
            agg: AggState::new(),
        }
    }

    /// Number of points pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// `true` if no point has been pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size in bytes the block would have if sealed now; use it to decide
    /// when to cut a block.
    pub fn encoded_len(&self) -> usize {
        self.bits.byte_len()
    }

    /// Timestamp of the last pushed point.
    pub fn last_ts(&self) -> Option<i64> {
        (self.count > 0).then_some(self.prev_ts)
    }

    /// Appends a point. Equal timestamps are allowed; a timestamp lower than
    /// the previous one is rejected and the encoder is left unchanged.
    pub fn push(&mut self, ts: i64, value: f64) -> Result<(), EncodeError> {
        let bits = value.to_bits();
        if self.count == 0 {
            self.bits.write(ts as u64, 64);
            self.bits.write(bits, 64);
            self.first_ts = ts;
        } else {
            if ts < self.prev_ts {
                return Err(EncodeError::OutOfOrder {
                    ts,
                    prev: self.prev_ts,
                });
            }
            if self.count == u32::MAX {
                return Err(EncodeError::Full);
            }
            let delta = ts.wrapping_sub(self.prev_ts);
            self.write_dod(delta.wrapping_sub(self.prev_delta));
            self.prev_delta = delta;
            self.write_xor(bits ^ self.prev_value);
        }
        self.count += 1;
        self.prev_ts = ts;
        self.prev_value = bits;
        self.agg.push(value);
        Ok(())
    }

    #[inline]
    fn write_dod(&mut self, dod: i64) {
        let w = &mut self.bits;
        let u = dod as u64;
        match dod {
            0 => w.write(0b0, 1),
            -64..=63 => w.write((0b10 << 7) | (u & 0x7f), 2 + 7),
            -256..=255 => w.write((0b110 << 9) | (u & 0x1ff), 3 + 9),
            -2048..=2047 => w.write((0b1110 << 12) | (u & 0xfff), 4 + 12),
            _ if i32::try_from(dod).is_ok() => w.write((0b11110 << 32) | (u & 0xffff_ffff), 5 + 32),
            _ => {
                w.write(0b11111, 5);
                w.write(u, 64);
            }
        }
    }

    #[inline]
    fn write_xor(&mut self, x: u64) {
        if x == 0 {
            self.bits.write(0b0, 1);
            return;
        }
        let lead = x.leading_zeros();
        let trail = x.trailing_zeros();
        if self.lead != NO_WINDOW && lead >= self.lead && trail >= self.trail {
            let m = 64 - self.lead - self.trail;
            self.bits.write(0b10, 2);
            self.bits.write(x >> self.trail, m);
        } else {
            let lead = lead.min(31);
            let m = 64 - lead - trail; // 1..=64
            self.bits.write(
                (0b11 << 11) | (u64::from(lead) << 6) | u64::from(m & 63),
                2 + 5 + 6,
            );
            self.bits.write(x >> trail, m);
            self.lead = lead;
            self.trail = trail;
        }
    }

    /// Seals the block: compacts the bytes and fixes the aggregates.
    pub fn finish(self) -> SealedBlock {
        let count = self.count;
        SealedBlock {
            data: self.bits.finish().into_boxed_slice(),
            count,
            first_ts: self.first_ts,
            last_ts: self.prev_ts,
            agg: self.agg.finish(),
        }
    }
}

// ---------------------------------------------------------------------------
// Sealed block
// ---------------------------------------------------------------------------

/// Why bytes handed to [`SealedBlock::from_raw`] are not a valid block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The stream ended before `count` points were read.
    #[error("block data ends inside point {point}")]
    Truncated {
        /// 0-based index of the incomplete point.
        point: u32,
    },
    /// A value record uses the previous window before any was set, or
    /// describes a window wider than 64 bits.
    #[error("invalid XOR window in point {point}")]
    BadWindow {
        /// 0-based index of the bad point.
        point: u32,
    },
    /// Timestamps decode to a decreasing sequence.
    #[error("timestamp of point {point} is before the previous one")]
    OutOfOrder {
        /// 0-based index of the bad point.
        point: u32,
    },
    /// Bytes remain after the last point, or the pad bits are not all ones.
    #[error("{bits} unexpected bits after the last point")]
    TrailingData {
        /// Number of bits left over after the last point.
        bits: usize,
    },
}

/// An immutable, compressed block of points with precomputed aggregates.
///
/// Every `SealedBlock` is valid by construction: it either comes from
/// [`BlockEncoder::finish`] or was fully checked by [`SealedBlock::from_raw`],
/// so decoding it cannot fail.
#[derive(Clone)]
pub struct SealedBlock {
    data: Box<[u8]>,
    count: u32,
    first_ts: i64,
    last_ts: i64,
    agg: Aggregates,
}

impl fmt::Debug for SealedBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBlock")
            .field("count", &self.count)
            .field("bytes", &self.data.len())
            .field("first_ts", &self.first_ts())
            .field("last_ts", &self.last_ts())
            .field("aggregates", &self.aggregates())
            .finish()
    }
}

/// Blocks are equal when they hold the same encoded points.
impl PartialEq for SealedBlock {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.data == other.data
    }
}
impl Eq for SealedBlock {}

impl SealedBlock {
    /// Rebuilds a block from bytes previously obtained with
    /// [`as_bytes`](Self::as_bytes) and its point count (e.g. after reading
    /// it from disk). The whole block is decoded and checked, and the
    /// aggregates are recomputed; corrupt input yields an error, never a
    /// panic.
    pub fn from_raw(data: impl Into<Box<[u8]>>, count: u32) -> Result<Self, DecodeError> {
        let data: Box<[u8]> = data.into();
        let mut agg = AggState::new();
        let mut first_ts = 0;
        let mut last_ts = 0;
        let consumed_bits;
        {
            let mut it = BlockIter::new(&data, count);
            while it.remaining > 0 {
                let index = it.decoded;
                let (ts, v) = it.step()?;
                if index == 0 {
                    first_ts = ts;
                } else if ts < last_ts {
                    return Err(DecodeError::OutOfOrder { point: index });
                }
                last_ts = ts;
                agg.push(v);
            }
            consumed_bits = it.reader.position();
        }
        let total_bits = data.len() * 8;
        let spare = total_bits - consumed_bits;
        let pad_mask = if spare > 0 && spare < 8 {
            (1u8 << spare) - 1
        } else {
            0
        };
        let bad_pad = data.last().is_some_and(|b| b & pad_mask != pad_mask);
        if spare >= 8 || bad_pad {
            return Err(DecodeError::TrailingData { bits: spare });
        }
        Ok(Self {
            data,
            count,
            first_ts,
            last_ts,
            agg: agg.finish(),
        })
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// `true` for a block with no points.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Point count as stored next to the bytes (see [`from_raw`](Self::from_raw)).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Timestamp of the first point.
    pub fn first_ts(&self) -> Option<i64> {
        (self.count > 0).then_some(self.first_ts)
    }

    /// Timestamp of the last point.
    pub fn last_ts(&self) -> Option<i64> {
        (self.count > 0).then_some(self.last_ts)
    }

    /// Aggregates over all points; `None` for an empty block.
    pub fn aggregates(&self) -> Option<Aggregates> {
        (self.count > 0).then_some(self.agg)
    }

    /// The encoded bit stream (see the module docs for the layout).
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Compressed size in bytes (excluding this struct's fixed header).
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Decodes the points in order.
    pub fn iter(&self) -> BlockIter<'_> {
        BlockIter::new(&self.data, self.count)
    }
}

impl<'a> IntoIterator for &'a SealedBlock {
    type Item = (i64, f64);
    type IntoIter = BlockIter<'a>;
    fn into_iter(self) -> BlockIter<'a> {
        self.iter()
    }
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

/// Iterator over the `(timestamp_ms, value)` points of a [`SealedBlock`].
#[derive(Debug, Clone)]
pub struct BlockIter<'a> {
    reader: BitReader<'a>,
    remaining: u32,
    decoded: u32,
    started: bool,
    prev_ts: i64,
    prev_delta: i64,
    prev_value: u64,
    lead: u32,
    trail: u32,
}

impl<'a> BlockIter<'a> {
    fn new(data: &'a [u8], count: u32) -> Self {
        Self {
            reader: BitReader::new(data),
            remaining: count,
            decoded: 0,
            started: false,
            prev_ts: 0,
            prev_delta: 0,
            prev_value: 0,
            lead: NO_WINDOW,
            trail: 0,
        }
    }

    /// Decodes the next point; `remaining > 0` must hold.
    #[inline]
    fn step(&mut self) -> Result<(i64, f64), DecodeError> {
        let point = self.decoded;
        let truncated = DecodeError::Truncated { point };
        let r = &mut self.reader;
        if !self.started {
            let ts = r.read(64).ok_or(truncated)? as i64;
            let v = r.read(64).ok_or(truncated)?;
            self.started = true;
            self.prev_ts = ts;
            self.prev_value = v;
        } else {
            let dod = match r.read_prefix(5).ok_or(truncated)? {
                0 => 0,
                1 => sign_extend(r.read(7).ok_or(truncated)?, 7),
                2 => sign_extend(r.read(9).ok_or(truncated)?, 9),
                3 => sign_extend(r.read(12).ok_or(truncated)?, 12),
                4 => sign_extend(r.read(32).ok_or(truncated)?, 32),
                _ => r.read(64).ok_or(truncated)? as i64,
            };
            let delta = self.prev_delta.wrapping_add(dod);
            self.prev_delta = delta;
            self.prev_ts = self.prev_ts.wrapping_add(delta);

            match r.read_prefix(2).ok_or(truncated)? {
                0 => {}
                1 => {
                    if self.lead == NO_WINDOW {
                        return Err(DecodeError::BadWindow { point });
                    }
                    let m = 64 - self.lead - self.trail;
                    let x = r.read(m).ok_or(truncated)?;
                    self.prev_value ^= x << self.trail;
                }
                _ => {
                    let hdr = r.read(11).ok_or(truncated)?;
                    let lead = (hdr >> 6) as u32;
                    let m = match (hdr & 63) as u32 {
                        0 => 64,
                        m => m,
                    };
                    if lead + m > 64 {
                        return Err(DecodeError::BadWindow { point });
                    }
                    let trail = 64 - lead - m;
                    let x = r.read(m).ok_or(truncated)?;
                    // `trail == 64` is impossible since m >= 1.
                    self.prev_value ^= x << trail;
                    self.lead = lead;
                    self.trail = trail;
                }
            }
        }
        self.remaining -= 1;
        self.decoded += 1;
        Ok((self.prev_ts, f64::from_bits(self.prev_value)))
    }
}

impl Iterator for BlockIter<'_> {
    type Item = (i64, f64);

    #[inline]
    fn next(&mut self) -> Option<(i64, f64)> {
        if self.remaining == 0 {
            return None;
        }
        match self.step() {
            Ok(p) => Some(p),
            Err(_) => {
                // Unreachable for a SealedBlock (validated on construction);
                // stop rather than yield garbage.
                debug_assert!(false, "corrupt SealedBlock");
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining as usize, Some(self.remaining as usize))
    }
}

impl ExactSizeIterator for BlockIter<'_> {}
impl std::iter::FusedIterator for BlockIter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_writer_reader_roundtrip_all_widths() {
        let mut w = BitWriter::default();
        let mut expect = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for round in 0..3 {
            for n in 0..=64u32 {
                x = x.rotate_left(17).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ round;
                let v = if n == 64 { x } else { x & ((1u64 << n) - 1) };
                w.write(v, n);
                expect.push((v, n));
            }
        }
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes);
        for (v, n) in expect {
            assert_eq!(r.read(n), Some(v), "width {n}");
        }
        assert!(r.bits_left() < 8);
        assert_eq!(r.read(8), None);
    }

    #[test]
    fn read_prefix_counts_ones() {
        let mut w = BitWriter::default();
        for p in [0b0u64, 0b10, 0b110, 0b1110, 0b11110, 0b11111] {
            let n = 64 - p.leading_zeros().min(63);
            w.write(p, n.max(1));
        }
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes);
        for expect in 0..=5 {
            assert_eq!(r.read_prefix(5), Some(expect));
        }
    }

    #[test]
    fn sign_extend_works() {
        assert_eq!(sign_extend(0x7f, 7), -1);
        assert_eq!(sign_extend(0x40, 7), -64);
        assert_eq!(sign_extend(0x3f, 7), 63);
        assert_eq!(sign_extend(0xffff_ffff, 32), -1);
    }
}
