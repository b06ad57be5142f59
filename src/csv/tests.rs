//! Engine tests: the `csv` crate is the oracle; every small input is run at
//! every block size 1..=64 and with 1, 2 and 4 threads, and all runs must
//! agree with each other (errors byte-for-byte) and with the oracle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::oracle::{close, csv_sums, strictness};
use super::{sum_bytes, sum_file, ColumnSel, ScanError, SumOptions, SumResult};

fn opts(
    every: usize,
    offset: usize,
    has_header: bool,
    block_size: usize,
    threads: usize,
) -> SumOptions {
    SumOptions {
        every,
        offset,
        columns: None,
        has_header,
        block_size,
        threads,
    }
}

fn sum(data: &[u8], o: &SumOptions) -> Result<SumResult, String> {
    sum_bytes(data, o, None, None).map_err(|e| e.to_string())
}

/// Runs `data` over `block_sizes` × `threads`; all runs must agree, and
/// agree with the `csv` crate where both consider the input well-formed.
/// Returns the (common) outcome.
fn check(
    data: &[u8],
    every: usize,
    offset: usize,
    has_header: bool,
    block_sizes: &[usize],
    threads: &[usize],
) -> Result<SumResult, String> {
    let oracle = csv_sums(data, every, offset, None, has_header);
    let abs: Vec<f64> = oracle
        .as_ref()
        .map(|o| o.0.iter().map(|c| c.2).collect())
        .unwrap_or_default();
    let mut first: Option<Result<SumResult, String>> = None;
    for &bs in block_sizes {
        for &t in threads {
            let got = sum(data, &opts(every, offset, has_header, bs, t));
            match &first {
                None => first = Some(got),
                Some(want) => match (want, &got) {
                    (Ok(w), Ok(g)) => {
                        assert_eq!(w.rows, g.rows, "rows, bs={bs} t={t}");
                        assert_eq!(w.columns.len(), g.columns.len());
                        for (i, (a, b)) in w.columns.iter().zip(&g.columns).enumerate() {
                            assert_eq!(a.0, b.0);
                            let scale = abs.get(i).copied().unwrap_or(0.0);
                            assert!(
                                close(a.1, b.1, scale),
                                "{} {} vs {} bs={bs} t={t}",
                                a.0,
                                a.1,
                                b.1
                            );
                        }
                    }
                    (Err(w), Err(g)) => assert_eq!(w, g, "bs={bs} t={t} input={:?}", show(data)),
                    _ => panic!("bs={bs} t={t}: {want:?} vs {got:?} for {:?}", show(data)),
                },
            }
        }
    }
    let got = first.unwrap_or_else(|| Err("no run".into()));
    let (violation, lone_cr) = strictness(data);
    if violation {
        assert!(
            got.is_err(),
            "accepted malformed input {:?}: {got:?}",
            show(data)
        );
    } else if !lone_cr {
        match (&oracle, &got) {
            (Ok((cols, rows)), Ok(g)) => {
                assert_eq!(*rows, g.rows, "rows for {:?}", show(data));
                let keys: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
                let gkeys: Vec<&str> = g.columns.iter().map(|c| c.0.as_str()).collect();
                assert_eq!(keys, gkeys);
                for (o, (k, v)) in cols.iter().zip(&g.columns) {
                    assert!(
                        close(o.1, *v, o.2),
                        "{k}: oracle {} vs {v} for {:?}",
                        o.1,
                        show(data)
                    );
                }
            }
            (Err(_), Err(_)) => {}
            _ => panic!("oracle {oracle:?} vs engine {got:?} for {:?}", show(data)),
        }
    }
    got
}

fn show(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[..data.len().min(400)]).into_owned()
}

const ALL_SMALL: [usize; 64] = {
    let mut a = [0usize; 64];
    let mut i = 0;
    while i < 64 {
        a[i] = i + 1;
        i += 1;
    }
    a
};
const THREADS: [usize; 3] = [1, 2, 4];

fn must_ok(r: Result<SumResult, String>) -> SumResult {
    match r {
        Ok(r) => r,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn pairs(r: &SumResult) -> Vec<(&str, f64)> {
    r.columns.iter().map(|(k, v)| (k.as_str(), *v)).collect()
}

// ---------------------------------------------------------------- tables

struct Case {
    name: &'static str,
    input: &'static [u8],
    every: usize,
    offset: usize,
    header: bool,
    want: Result<&'static [(&'static str, f64)], &'static str>,
    rows: u64,
}

const CASES: &[Case] = &[
    Case {
        name: "quoted header with comma, doubled quotes, newline",
        input: b"\"a,b\",x,\"say \"\"hi\"\"\nnow\"\n1,q,2\n3,w,4\n",
        every: 2,
        offset: 0,
        header: true,
        want: Ok(&[("a,b", 4.0), ("say \"hi\"\nnow", 6.0)]),
        rows: 2,
    },
    Case {
        name: "quoted numbers and text with newlines in skipped column",
        input: b"n,t\n\"1.5\",\"x\ny,\"\"z\"\"\"\n\"2.5\",plain\n",
        every: 2,
        offset: 0,
        header: true,
        want: Ok(&[("n", 4.0)]),
        rows: 2,
    },
    Case {
        name: "BOM and CRLF, no trailing newline",
        input: b"\xEF\xBB\xBFa,b\r\n1,2\r\n3,4",
        every: 1,
        offset: 0,
        header: true,
        want: Ok(&[("a", 4.0), ("b", 6.0)]),
        rows: 2,
    },
    Case {
        name: "CRLF after a quoted last field",
        input: b"a,b\r\n1,\"2\"\r\n3,\"4\"\r\n",
        every: 1,
        offset: 1,
        header: true,
        want: Ok(&[("b", 6.0)]),
        rows: 2,
    },
    Case {
        name: "empty cells count nothing; blank lines skipped",
        input: b"a,b,c\n,,\n1,,2\n\n\r\n,5,\n",
        every: 1,
        offset: 0,
        header: true,
        want: Ok(&[("a", 1.0), ("b", 5.0), ("c", 2.0)]),
        rows: 3,
    },
    Case {
        name: "one column one row",
        input: b"v\n42",
        every: 1,
        offset: 0,
        header: true,
        want: Ok(&[("v", 42.0)]),
        rows: 1,
    },
    Case {
        name: "header only",
        input: b"a,b\n",
        every: 1,
        offset: 0,
        header: true,
        want: Ok(&[("a", 0.0), ("b", 0.0)]),
        rows: 0,
    },
    Case {
        name: "empty input",
        input: b"",
        every: 1,
        offset: 0,
        header: true,
        want: Ok(&[]),
        rows: 0,
    },
    Case {
        name: "offset past the last column",
        input: b"a,b\n1,2\n",
        every: 1,
        offset: 5,
        header: true,
        want: Ok(&[]),
        rows: 1,
    },
    Case {
        name: "headerless keys",
        input: b"1,2,3\n4,5,6\n",
        every: 2,
        offset: 0,
        header: false,
        want: Ok(&[("col0", 5.0), ("col2", 9.0)]),
        rows: 2,
    },
    Case {
        name: "std::parse semantics: exponents, signs, inf",
        input: b"a,b\n1e3,+2\n-.5,inf\n",
        every: 1,
        offset: 0,
        header: true,
        want: Ok(&[("a", 999.5), ("b", f64::INFINITY)]),
        rows: 2,
    },
    Case {
        name: "invalid UTF-8 in a skipped cell is ignored",
        input: b"a,b\n1,\xff\xfe\n2,x\n",
        every: 2,
        offset: 0,
        header: true,
        want: Ok(&[("a", 3.0)]),
        rows: 2,
    },
    Case {
        name: "not a number",
        input: b"id,price\n1,2.5\n2,\"abc\"\"d\"\n",
        every: 1,
        offset: 0,
        header: true,
        want: Err("record 3 (line 3, byte 17): column 1 (\"price\"): not a number: \"abc\\\"d\""),
        rows: 0,
    },
    Case {
        name: "not a number after a multi-line quoted field",
        input: b"a,b\n\"x\ny\",1\n2, 3\n",
        every: 1,
        offset: 1,
        header: true,
        want: Err("record 3 (line 4, byte 14): column 1 (\"b\"): not a number: \" 3\""),
        rows: 0,
    },
    Case {
        name: "ragged row (too few) wins over a bad cell in it",
        input: b"a,b,c\n1,2,3\nx,2\n",
        every: 1,
        offset: 0,
        header: true,
        want: Err("record 3 (line 3, byte 12): expected 3 fields, found 2"),
        rows: 0,
    },
    Case {
        name: "ragged row (too many), headerless",
        input: b"1,2\n3,4\n\n5,6,7\n",
        every: 1,
        offset: 0,
        header: false,
        want: Err("record 3 (line 4, byte 9): expected 2 fields, found 3"),
        rows: 0,
    },
    Case {
        name: "unterminated quote",
        input: b"a,b\n1,2\n3,\"4\n5,6\n",
        every: 1,
        offset: 0,
        header: true,
        want: Err("record 3 (line 3, byte 10): quoted field not closed before end of file"),
        rows: 0,
    },
    Case {
        name: "stray quote in unquoted field",
        input: b"a,b\n1,2\"\n3,\"4\"\n",
        every: 1,
        offset: 0,
        header: true,
        want: Err("record 2 (line 2, byte 7): column 1 (\"b\"): quote inside an unquoted field"),
        rows: 0,
    },
    Case {
        name: "text after closing quote",
        input: b"a,b\n\"1\"x,2\n",
        every: 1,
        offset: 1,
        header: true,
        want: Err(
            "record 2 (line 2, byte 7): column 0 (\"a\"): unexpected character after closing quote",
        ),
        rows: 0,
    },
    Case {
        name: "invalid UTF-8 in a summed cell",
        input: b"a\n1\n\xff\n",
        every: 1,
        offset: 0,
        header: true,
        want: Err("record 3 (line 3, byte 4): column 0 (\"a\"): invalid UTF-8"),
        rows: 0,
    },
    Case {
        name: "surrounding spaces are not trimmed",
        input: b"a\n 1\n",
        every: 1,
        offset: 0,
        header: true,
        want: Err("record 2 (line 2, byte 2): column 0 (\"a\"): not a number: \" 1\""),
        rows: 0,
    },
    Case {
        name: "bad header: unterminated quote",
        input: b"\"a,b\n1,2\n",
        every: 1,
        offset: 0,
        header: true,
        want: Err("record 1 (line 1, byte 0): quoted field not closed before end of file"),
        rows: 0,
    },
];

#[test]
fn table_cases_all_block_sizes_and_threads() {
    for c in CASES {
        let got = check(c.input, c.every, c.offset, c.header, &ALL_SMALL, &THREADS);
        match (&c.want, &got) {
            (Ok(want), Ok(g)) => {
                assert_eq!(pairs(g), want.to_vec(), "{}", c.name);
                assert_eq!(g.rows, c.rows, "{}", c.name);
                assert_eq!(g.bytes, c.input.len() as u64);
            }
            (Err(want), Err(g)) => assert_eq!(g, want, "{}", c.name),
            _ => panic!("{}: got {got:?}", c.name),
        }
    }
}

#[test]
fn error_variants_carry_structured_fields() {
    let data = b"id,price\n1,2.5\n2,oops\n";
    match sum_bytes(data, &opts(1, 0, true, 4, 2), None, None) {
        Err(ScanError::NotANumber {
            at,
            column,
            name,
            text,
        }) => {
            assert_eq!((at.record, at.line, at.byte), (3, 3, 17));
            assert_eq!((column, name.as_str(), text.as_str()), (1, "price", "oops"));
        }
        other => panic!("{other:?}"),
    }
    let long = format!("a\n{}\n", "x".repeat(200));
    match sum_bytes(long.as_bytes(), &SumOptions::default(), None, None) {
        Err(ScanError::NotANumber { text, .. }) => {
            assert_eq!(text, format!("{}...", "x".repeat(80)))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn explicit_columns() {
    let data = b"a,b,c\n1,2,3\n4,5,6\n";
    let sel = |cols: Vec<ColumnSel>, header: bool| SumOptions {
        columns: Some(cols),
        has_header: header,
        block_size: 3,
        ..SumOptions::default()
    };
    let r = must_ok(sum(
        data,
        &sel(
            vec![
                ColumnSel::Name("c".into()),
                ColumnSel::Index(0),
                ColumnSel::Name("c".into()),
            ],
            true,
        ),
    ));
    assert_eq!(pairs(&r), vec![("c", 9.0), ("a", 5.0), ("c", 9.0)]);
    let r = must_ok(sum(
        b"1,2\n3,4\n",
        &sel(vec![ColumnSel::Name("col1".into())], false),
    ));
    assert_eq!(pairs(&r), vec![("col1", 6.0)]);
    assert_eq!(
        sum(data, &sel(vec![ColumnSel::Name("zz".into())], true)),
        Err("no column named \"zz\"".into())
    );
    assert_eq!(
        sum(data, &sel(vec![ColumnSel::Index(3)], true)),
        Err("column index 3 is out of range: the file has 3 columns".into())
    );
    // Explicit columns are parsed even when `every` would skip them.
    assert_eq!(
        sum(b"a,b\n1,x\n", &sel(vec![ColumnSel::Index(0)], true)).map(|r| r.rows),
        Ok(1)
    );
}

#[test]
fn invalid_options() {
    assert!(matches!(
        sum_bytes(b"a\n1\n", &opts(0, 0, true, 8, 1), None, None),
        Err(ScanError::InvalidOptions(_))
    ));
    assert!(matches!(
        sum_bytes(b"a\n1\n", &opts(1, 0, true, 0, 1), None, None),
        Err(ScanError::InvalidOptions(_))
    ));
}

// ----------------------------------------------------- generated inputs

#[derive(Clone, Copy, Debug)]
struct Style {
    crlf: bool,
    bom: bool,
    trailing_nl: bool,
    header: bool,
    quote_p: f64,
    empty_p: f64,
}

fn number(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => format!("{}", rng.random_range(-1000i64..1000)),
        1 => format!("{:e}", rng.random_range(-1e6..1e6f64)),
        2 => format!("{}", rng.random::<f64>() * 1e-7),
        3 => format!(
            "-{}.{}",
            rng.random_range(0..100),
            rng.random_range(0..1000)
        ),
        4 => format!(".{}", rng.random_range(0..1000)),
        5 => format!("{}.", rng.random_range(0..1000)),
        _ => format!("{:.3}", rng.random_range(-1000.0..1000.0f64)),
    }
}

fn text(rng: &mut StdRng) -> String {
    let alphabet = ['a', 'Z', ' ', ',', '"', '\n', '\r', 'é', '1', '.'];
    let n = rng.random_range(0..8);
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect()
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Random CSV whose columns `offset, offset+every, ..` hold numbers (or
/// empties) and whose other columns hold arbitrary text.
fn gen_csv(
    rng: &mut StdRng,
    ncols: usize,
    nrows: usize,
    every: usize,
    offset: usize,
    st: Style,
) -> Vec<u8> {
    let nl = if st.crlf { "\r\n" } else { "\n" };
    let mut out = String::new();
    if st.bom {
        out.push('\u{feff}');
    }
    let numeric = |c: usize| c >= offset && (c - offset).is_multiple_of(every);
    let mut lines: Vec<String> = Vec::new();
    if st.header {
        lines.push(
            (0..ncols)
                .map(|c| {
                    if c % 3 == 0 {
                        quote(&format!("h{c},\"x\"\n"))
                    } else {
                        format!("h{c}")
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    for _ in 0..nrows {
        let cells: Vec<String> = (0..ncols)
            .map(|c| {
                let raw = if rng.random_bool(st.empty_p) {
                    String::new()
                } else if numeric(c) {
                    number(rng)
                } else {
                    text(rng)
                };
                let special = raw.contains(['"', ',', '\n', '\r']);
                // An unquoted empty sole cell would be a blank line: quote it.
                if special || rng.random_bool(st.quote_p) || (ncols == 1 && raw.is_empty()) {
                    quote(&raw)
                } else {
                    raw
                }
            })
            .collect();
        lines.push(cells.join(","));
    }
    out.push_str(&lines.join(nl));
    if st.trailing_nl {
        out.push_str(nl);
    }
    out.into_bytes()
}

#[test]
fn generated_small_inputs_match_oracle_at_every_block_size() {
    let mut rng = StdRng::seed_from_u64(42);
    let shapes: &[(usize, usize, usize, usize)] = &[
        (1, 5, 1, 0),
        (3, 6, 1, 0),
        (5, 4, 2, 1),
        (12, 3, 10, 0),
        (12, 3, 10, 2),
        (4, 1, 3, 0),
    ];
    for &(ncols, nrows, every, offset) in shapes {
        for bits in 0..16u32 {
            let st = Style {
                crlf: bits & 1 != 0,
                bom: bits & 2 != 0,
                trailing_nl: bits & 4 != 0,
                header: bits & 8 != 0,
                quote_p: 0.4,
                empty_p: 0.15,
            };
            let data = gen_csv(&mut rng, ncols, nrows, every, offset, st);
            let got = check(&data, every, offset, st.header, &ALL_SMALL, &THREADS);
            assert!(got.is_ok(), "{st:?} {got:?} {:?}", show(&data));
        }
    }
}

#[test]
fn thousand_columns() {
    let mut rng = StdRng::seed_from_u64(1);
    let st = Style {
        crlf: false,
        bom: false,
        trailing_nl: true,
        header: true,
        quote_p: 0.1,
        empty_p: 0.05,
    };
    let data = gen_csv(&mut rng, 1000, 30, 10, 3, st);
    let r = must_ok(check(&data, 10, 3, true, &[7, 64, 1000, 1 << 20], &THREADS));
    assert_eq!(r.columns.len(), 100);
    assert_eq!(r.columns[1].0, "h13");
    let data = gen_csv(&mut rng, 1000, 20, 1, 0, st);
    let r = must_ok(check(&data, 1, 0, true, &[13, 4096], &[1, 2]));
    assert_eq!(r.columns.len(), 1000);
}

#[test]
fn headerless_keys_col0_col10() {
    let row: Vec<String> = (0..25).map(|i| i.to_string()).collect();
    let data = format!("{}\n{}\n", row.join(","), row.join(","));
    let r = must_ok(check(data.as_bytes(), 10, 0, false, &[1, 5, 64], &THREADS));
    assert_eq!(
        pairs(&r),
        vec![("col0", 0.0), ("col10", 20.0), ("col20", 40.0)]
    );
}

#[test]
fn million_rows_no_drift() {
    // 1e6 rows of "i,0.1,-i": generated in memory, checked against closed
    // forms; 0.1 summed a million times must not drift.
    let n = 1_000_000u64;
    let mut data = Vec::with_capacity(16 * n as usize);
    data.extend_from_slice(b"i,tenth,neg\n");
    for i in 0..n {
        data.extend_from_slice(i.to_string().as_bytes());
        data.extend_from_slice(b",0.1,-");
        data.extend_from_slice(i.to_string().as_bytes());
        data.push(b'\n');
    }
    let want_i = (n * (n - 1) / 2) as f64;
    for (bs, t) in [(1 << 20, 2), (DEFAULT_BS, 1)] {
        let r = must_ok(sum(&data, &opts(1, 0, true, bs, t)));
        assert_eq!(r.rows, n);
        assert_eq!(
            pairs(&r),
            vec![("i", want_i), ("tenth", 100_000.0), ("neg", -want_i)]
        );
    }
}

const DEFAULT_BS: usize = super::DEFAULT_BLOCK_SIZE;

#[test]
fn randomized_property_vs_oracle() {
    // The same property as fuzz/fuzz_targets/sum_bytes.rs, on random bytes
    // from a CSV-ish alphabet and on mutated valid CSV.
    let mut rng = StdRng::seed_from_u64(0xC5F);
    let alphabet: &[&[u8]] = &[
        b"1", b"2.5", b"-", b"e", b".", b",", b",", b"\n", b"\n", b"\"", b"\"", b"\r\n", b"\r",
        b"a", b" ", b"\xff", b"",
    ];
    let iters = if cfg!(debug_assertions) { 4000 } else { 40000 };
    let mut seen = [0usize; 4];
    for it in 0..iters {
        let mut data: Vec<u8> = Vec::new();
        if it % 2 == 0 {
            if rng.random_bool(0.1) {
                data.extend_from_slice(b"\xEF\xBB\xBF");
            }
            for _ in 0..rng.random_range(0..40) {
                data.extend_from_slice(alphabet[rng.random_range(0..alphabet.len())]);
            }
        } else {
            let st = Style {
                crlf: rng.random_bool(0.3),
                bom: rng.random_bool(0.1),
                trailing_nl: rng.random_bool(0.5),
                header: rng.random_bool(0.5),
                quote_p: 0.3,
                empty_p: 0.2,
            };
            let ncols = rng.random_range(1..5);
            let nrows = rng.random_range(0..5);
            data = gen_csv(&mut rng, ncols, nrows, 1, 0, st);
            for _ in 0..rng.random_range(0..3) {
                if !data.is_empty() {
                    let i = rng.random_range(0..data.len());
                    data[i] = alphabet[rng.random_range(0..alphabet.len())]
                        .first()
                        .copied()
                        .unwrap_or(b'x');
                }
            }
        }
        let every = rng.random_range(1..4);
        let offset = rng.random_range(0..3);
        let header = rng.random_bool(0.5);
        let got = check(
            &data,
            every,
            offset,
            header,
            &[1, 2, 3, 5, 8, 64, DEFAULT_BS],
            &[1, 2],
        );
        let (violation, lone_cr) = strictness(&data);
        let k = match (&got, violation || lone_cr) {
            (Ok(r), false) if !r.columns.is_empty() && r.rows > 0 => 0,
            (Err(_), false) => 1,
            (_, true) => 2,
            _ => 3,
        };
        seen[k] += 1;
    }
    eprintln!("outcomes (compared ok, both err, engine-only err, other): {seen:?}");
    // The generators must exercise all outcomes: compared sums, errors both
    // sides agree on, and inputs only the engine rejects.
    assert!(seen.iter().take(3).all(|&n| n > iters / 20), "{seen:?}");
}

// ------------------------------------------- progress, cancel, files

#[test]
fn progress_reaches_total_and_cancel_stops() {
    let mut data = b"a,b\n".to_vec();
    for i in 0..200_000 {
        data.extend_from_slice(format!("{i},{}.5\n", i % 7).as_bytes());
    }
    let progress = AtomicU64::new(0);
    let r = sum_bytes(&data, &opts(1, 0, true, 4096, 2), Some(&progress), None);
    assert!(r.is_ok());
    assert_eq!(progress.load(Ordering::Relaxed), data.len() as u64);

    let cancel = AtomicBool::new(true);
    assert!(matches!(
        sum_bytes(&data, &opts(1, 0, true, 4096, 2), None, Some(&cancel)),
        Err(ScanError::Cancelled)
    ));

    // Cancel mid-scan from another thread once some progress is seen.
    let cancel = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let mut big = b"a,b\n".to_vec();
    for i in 0..1_500_000 {
        big.extend_from_slice(format!("{i},{}.5\n", i % 7).as_bytes());
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            while progress.load(Ordering::Relaxed) <= 4 {
                std::hint::spin_loop();
            }
            cancel.store(true, Ordering::Relaxed);
        });
        let r = sum_bytes(
            &big,
            &opts(1, 0, true, 256, 2),
            Some(&progress),
            Some(&cancel),
        );
        assert!(matches!(r, Err(ScanError::Cancelled)), "{r:?}");
        assert!(progress.load(Ordering::Relaxed) < big.len() as u64);
    });
}

#[test]
fn sum_file_maps_and_reports_io_errors() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("x.csv");
    let write = |p: &std::path::Path, d: &[u8]| {
        if let Err(e) = std::fs::write(p, d) {
            panic!("write: {e}");
        }
    };
    write(&path, b"a,b\n1,2\n3,4\n");
    let r = sum_file(&path, &opts(1, 0, true, 5, 2), None, None).map_err(|e| e.to_string());
    assert_eq!(
        r.map(|r| (r.rows, r.bytes, r.columns)),
        Ok((2, 12, vec![("a".into(), 4.0), ("b".into(), 6.0)]))
    );
    let empty = dir.path().join("empty.csv");
    write(&empty, b"");
    let r = sum_file(&empty, &SumOptions::default(), None, None).map_err(|e| e.to_string());
    assert_eq!(r.map(|r| r.columns.len()), Ok(0));
    let missing = dir.path().join("missing.csv");
    assert!(matches!(
        sum_file(&missing, &SumOptions::default(), None, None),
        Err(ScanError::Io { .. })
    ));
}

#[test]
fn baseline_and_dispatched_hot_loops_agree() {
    use super::engine::{parse_chunk, parse_chunk_baseline, Plan};
    let mut rng = StdRng::seed_from_u64(5);
    let mut inputs: Vec<Vec<u8>> = CASES.iter().map(|c| c.input.to_vec()).collect();
    for ncols in [1, 3, 40] {
        let st = Style {
            crlf: true,
            bom: false,
            trailing_nl: false,
            header: false,
            quote_p: 0.3,
            empty_p: 0.1,
        };
        inputs.push(gen_csv(&mut rng, ncols, 50, 2, 0, st));
    }
    for data in &inputs {
        let ncols = match super::record::first_record(data, 0) {
            Ok(Some((f, _))) => f.len(),
            _ => continue,
        };
        let wanted: Vec<usize> = (0..ncols).step_by(2).collect();
        let (plan, _) = Plan::new(ncols, &wanted);
        let a = parse_chunk(data, 0, data.len(), &plan);
        let b = parse_chunk_baseline(data, 0, data.len(), &plan);
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!((a.rows, a.end), (b.rows, b.end));
                let va: Vec<u64> = a.accs.iter().map(|n| n.value().to_bits()).collect();
                let vb: Vec<u64> = b.accs.iter().map(|n| n.value().to_bits()).collect();
                assert_eq!(va, vb);
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("{:?} vs {:?}", a.is_ok(), b.is_ok()),
        }
    }
}

// ------------------------------------------- a file changed during the scan

/// A file `a,b` with rows `i,2i` for i in 1..=rows, so that a = rows(rows+1)/2 and
/// b = 2a; back-dated, so that any rewrite moves its mtime whatever the clock's
/// granularity.
fn numbered_file(rows: u64) -> (tempfile::NamedTempFile, u64) {
    use std::io::Write;
    let mut text = String::from("a,b\n");
    for i in 1..=rows {
        text.push_str(&format!("{i},{}\n", 2 * i));
    }
    let mut tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.write_all(text.as_bytes()).unwrap();
    let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    tmp.as_file().set_modified(past).unwrap();
    (tmp, text.len() as u64)
}

/// Scans `tmp` in 4 KiB blocks; `hook` runs once, before the wave at the 100th block,
/// well inside the file.
fn scan_changing(
    tmp: &tempfile::NamedTempFile,
    threads: usize,
    hook: impl Fn() + Sync,
) -> Result<SumResult, ScanError> {
    let file = std::fs::File::open(tmp.path()).unwrap();
    let done = AtomicBool::new(false);
    let wave = |at: usize| {
        if at >= 100 * 4096 && !done.swap(true, Ordering::Relaxed) {
            hook();
        }
    };
    let o = opts(1, 0, true, 4096, threads);
    super::sum_mapped(&file, tmp.path(), &o, None, None, Some(&wave))
}

#[test]
fn a_file_truncated_mid_scan_fails_with_its_sizes_and_an_untouched_one_sums() {
    for threads in [1, 3] {
        let (tmp, size) = numbered_file(200_000);
        let r = scan_changing(&tmp, threads, || {});
        let a = 200_000.0 * 200_001.0 / 2.0;
        assert_eq!(
            r.map(|r| r.columns).map_err(|e| e.to_string()),
            Ok(vec![("a".into(), a), ("b".into(), 2.0 * a)])
        );
        // What `cp` does to the file it copies over: truncate, then write.
        let r = scan_changing(&tmp, threads, || {
            std::fs::write(tmp.path(), b"a,b\n1,2\n").unwrap();
        });
        assert!(
            matches!(r, Err(ScanError::Changed { before, after: 8 }) if before == size),
            "threads {threads}: {r:?}"
        );
        let msg = r.unwrap_err().to_string();
        assert_eq!(msg, format!("changed during the scan (size {size} -> 8)"));
    }
}

#[test]
fn a_same_size_rewrite_in_place_mid_scan_fails_the_scan() {
    use std::os::unix::fs::FileExt;
    let (tmp, size) = numbered_file(200_000);
    // Every digit 1 becomes 2, from the start: same size, parts already summed.
    let text = std::fs::read(tmp.path()).unwrap();
    let other: Vec<u8> = text
        .iter()
        .map(|&b| if b == b'1' { b'2' } else { b })
        .collect();
    let r = scan_changing(&tmp, 2, || {
        tmp.as_file().write_all_at(&other, 0).unwrap();
    });
    assert!(
        matches!(r, Err(ScanError::Changed { before, after }) if before == size && after == size),
        "{r:?}"
    );
    assert_eq!(
        r.unwrap_err().to_string(),
        format!("changed during the scan (modified in place, size {size} unchanged)")
    );
}

#[test]
fn concurrent_scans_of_a_truncated_file_both_fail_and_one_of_another_file_sums() {
    use std::sync::Barrier;
    let (shared, size) = numbered_file(200_000);
    let (other, _) = numbered_file(1_000);
    // All three wait, mid-scan, until the first one has truncated `shared`.
    let (mapped, truncated) = (Barrier::new(3), Barrier::new(3));
    let wait = || {
        mapped.wait();
        truncated.wait();
    };
    let (first, second, third) = std::thread::scope(|s| {
        let first = s.spawn(|| {
            scan_changing(&shared, 1, || {
                mapped.wait();
                shared.as_file().set_len(100).unwrap();
                truncated.wait();
            })
        });
        let second = s.spawn(|| scan_changing(&shared, 2, wait));
        let third = s.spawn(|| {
            // `other` is smaller than 100 blocks: its hook runs at the first wave.
            let file = std::fs::File::open(other.path()).unwrap();
            let o = opts(1, 0, true, 64, 1);
            let once = AtomicBool::new(false);
            let hook = |_: usize| {
                if !once.swap(true, Ordering::Relaxed) {
                    wait();
                }
            };
            super::sum_mapped(&file, other.path(), &o, None, None, Some(&hook))
        });
        (
            first.join().unwrap(),
            second.join().unwrap(),
            third.join().unwrap(),
        )
    });
    for r in [first, second] {
        assert!(
            matches!(r, Err(ScanError::Changed { before, after: 100 }) if before == size),
            "{r:?}"
        );
    }
    let a = 1_000.0 * 1_001.0 / 2.0;
    assert_eq!(
        third.map(|r| r.columns).map_err(|e| e.to_string()),
        Ok(vec![("a".into(), a), ("b".into(), 2.0 * a)])
    );
}

#[test]
fn a_huge_bad_cell_is_reported_by_its_first_80_characters() {
    let mut data = b"a\n1\n".to_vec();
    data.extend(std::iter::repeat_n(b'x', 100_000));
    data.push(b'\n');
    let e = sum(&data, &opts(1, 0, true, 1 << 20, 1)).unwrap_err();
    assert!(
        e.ends_with(&format!(": not a number: \"{}...\"", "x".repeat(80))),
        "{e}"
    );
}
