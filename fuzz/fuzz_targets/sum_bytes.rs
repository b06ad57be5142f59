//! Arbitrary bytes → `sum_bytes` with a tiny block size, checked against
//! (1) the same input scanned in one block on one thread: identical outcome
//! (errors byte-for-byte, sums within 1e-9 relative), and (2) the `csv`
//! crate, on inputs both consider well-formed (see `src/oracle.rs` for
//! where they legitimately differ: lenient quotes and lone `\r`).
//!
//! The first 3 bytes pick the options: block size 1..=64, every 1..=4,
//! offset 0..=2, header on/off, 1 or 2 threads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::csv::{sum_bytes, SumOptions, SumResult};

#[path = "../../src/csv/oracle.rs"]
mod oracle;

fn same_sums(a: &SumResult, b: &SumResult, scale: &[f64]) {
    assert_eq!(a.rows, b.rows);
    assert_eq!(a.columns.len(), b.columns.len());
    for (i, (x, y)) in a.columns.iter().zip(&b.columns).enumerate() {
        assert_eq!(x.0, y.0);
        let s = scale.get(i).copied().unwrap_or(0.0);
        assert!(oracle::close(x.1, y.1, s), "{}: {} vs {}", x.0, x.1, y.1);
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    let (cfg, data) = input.split_at(3);
    let every = 1 + usize::from(cfg[1]) % 4;
    let offset = (usize::from(cfg[1]) / 4) % 3;
    let has_header = cfg[2] & 1 != 0;
    let opts = SumOptions {
        every,
        offset,
        columns: None,
        has_header,
        block_size: 1 + usize::from(cfg[0]) % 64,
        threads: 1 + usize::from((cfg[2] >> 1) & 1),
    };
    let got = sum_bytes(data, &opts, None, None).map_err(|e| e.to_string());
    let whole = SumOptions { block_size: 1 << 20, threads: 1, ..opts.clone() };
    let reference = sum_bytes(data, &whole, None, None).map_err(|e| e.to_string());

    let oracle = oracle::csv_sums(data, every, offset, None, has_header);
    let scale: Vec<f64> = oracle.as_ref().map(|o| o.0.iter().map(|c| c.2).collect()).unwrap_or_default();
    // Sums near f64::MAX may overflow or not depending on how they are
    // grouped; that is rounding, not a bug.
    let huge = scale.iter().any(|s| !(s.abs() < 1e300));

    match (&got, &reference) {
        (Ok(a), Ok(b)) => {
            if !huge {
                same_sums(a, b, &scale)
            }
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("block-size dependent: {got:?} vs {reference:?}"),
    }

    let (violation, lone_cr) = oracle::strictness(data);
    if violation {
        assert!(got.is_err(), "accepted malformed input: {got:?}");
        return;
    }
    if lone_cr {
        return;
    }
    match (&oracle, &got) {
        (Ok((cols, rows)), Ok(g)) => {
            assert_eq!(*rows, g.rows);
            assert_eq!(cols.len(), g.columns.len());
            for (o, (k, v)) in cols.iter().zip(&g.columns) {
                assert_eq!(&o.0, k);
                assert!(huge || oracle::close(o.1, *v, o.2), "{k}: csv {} vs {v}", o.1);
            }
        }
        (Err(_), Err(_)) => {}
        _ => panic!("csv crate {oracle:?} vs engine {got:?}"),
    }
});
