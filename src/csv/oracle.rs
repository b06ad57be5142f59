//! Test oracle (tests and the fuzz target include this file): the same sums
//! computed with the `csv` crate, plus a deliberately naive strict RFC 4180
//! checker that says on which inputs the engine and the `csv` crate must
//! agree.
//!
//! Where the two legitimately differ (so the comparison is skipped or
//! weakened):
//! * `rfc_violation`: a `"` inside an unquoted field, text after a closing
//!   quote, or a quote open at EOF. The `csv` crate accepts these leniently;
//!   the engine must reject them (it relies on quote parity to split).
//! * `lone_cr`: an unquoted `\r` not followed by `\n`/EOF. The `csv` crate
//!   ends the record there; the engine treats it as data.
//!
//! Same on both sides: UTF-8 BOM stripped, empty lines skipped, every record
//! must have the first record's field count, no trimming.

#![allow(dead_code)]

/// Independent compensated sum for the oracle (Kahan–Babuška).
#[derive(Default, Clone, Copy)]
pub struct OracleSum {
    pub sum: f64,
    pub c: f64,
    /// Sum of |x|, for the comparison tolerance.
    pub abs: f64,
}

impl OracleSum {
    pub fn add(&mut self, x: f64) {
        let t = self.sum + x;
        self.c += if self.sum.abs() >= x.abs() {
            (self.sum - t) + x
        } else {
            (x - t) + self.sum
        };
        self.sum = t;
        self.abs += x.abs();
    }
    pub fn value(&self) -> f64 {
        if self.sum.is_finite() {
            self.sum + self.c
        } else {
            self.sum
        }
    }
}

/// Oracle output: (key, sum, sum of |x|) per column, and data row count.
pub type OracleOut = (Vec<(String, f64, f64)>, u64);

/// Sums columns `offset, offset+every, ..` (or `explicit` indexes) with the
/// `csv` crate; `Err` on any csv error, bad number, or unknown index.
pub fn csv_sums(
    data: &[u8],
    every: usize,
    offset: usize,
    explicit: Option<&[usize]>,
    has_header: bool,
) -> Result<OracleOut, String> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(data);
    let mut names: Vec<String> = Vec::new();
    let mut cols: Vec<usize> = Vec::new();
    let mut sums: Vec<OracleSum> = Vec::new();
    let mut first = true;
    let mut rows = 0u64;
    for rec in rdr.byte_records() {
        let rec = rec.map_err(|e| e.to_string())?;
        if first {
            first = false;
            names = if has_header {
                rec.iter()
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect()
            } else {
                (0..rec.len()).map(|i| format!("col{i}")).collect()
            };
            cols = match explicit {
                Some(list) => list.to_vec(),
                None => (offset..rec.len()).step_by(every).collect(),
            };
            if let Some(&bad) = cols.iter().find(|&&c| c >= rec.len()) {
                return Err(format!("column {bad} out of range"));
            }
            sums = vec![OracleSum::default(); cols.len()];
            if has_header {
                continue;
            }
        }
        for (k, &c) in cols.iter().enumerate() {
            let cell = rec.get(c).ok_or("short record")?;
            if cell.is_empty() {
                continue;
            }
            let s = std::str::from_utf8(cell).map_err(|e| e.to_string())?;
            let v: f64 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
            sums[k].add(v);
        }
        rows += 1;
    }
    let out = cols
        .iter()
        .zip(&sums)
        .map(|(&c, s)| (names[c].clone(), s.value(), s.abs))
        .collect();
    Ok((out, rows))
}

/// Relative comparison with a tolerance of 1e-9 (plus a tiny term scaled by
/// the sum of magnitudes, for sums that cancel to ~0).
pub fn close(a: f64, b: f64, abs: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a == b {
        return true;
    }
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-13 * abs
}

fn strip_bom(data: &[u8]) -> &[u8] {
    data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data)
}

#[derive(Clone, Copy, PartialEq)]
enum St {
    FieldStart,
    Unquoted,
    Quoted,
    QuoteSeen,
}

/// Naive byte-at-a-time strict RFC 4180 check. Returns
/// `(violation, lone_cr)`.
pub fn strictness(data: &[u8]) -> (bool, bool) {
    let d = strip_bom(data);
    let mut st = St::FieldStart;
    let mut lone_cr = false;
    for (i, &b) in d.iter().enumerate() {
        let cr_ok = matches!(d.get(i + 1), None | Some(b'\n'));
        st = match (st, b) {
            (St::FieldStart, b'"') => St::Quoted,
            (St::FieldStart | St::Unquoted, b',' | b'\n') => St::FieldStart,
            (St::FieldStart | St::Unquoted, b'\r') => {
                lone_cr |= !cr_ok;
                St::Unquoted
            }
            (St::Unquoted, b'"') => return (true, lone_cr),
            (St::FieldStart | St::Unquoted, _) => St::Unquoted,
            (St::Quoted, b'"') => St::QuoteSeen,
            (St::Quoted, _) => St::Quoted,
            (St::QuoteSeen, b'"') => St::Quoted,
            (St::QuoteSeen, b',' | b'\n') => St::FieldStart,
            (St::QuoteSeen, b'\r') if cr_ok => St::Unquoted,
            (St::QuoteSeen, _) => return (true, lone_cr),
        };
    }
    (st == St::Quoted, lone_cr)
}
