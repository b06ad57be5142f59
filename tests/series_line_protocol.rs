//! Table-driven tests for the line-protocol parser.
//!
//! Each case renders what the parser produced, one string per point or error:
//! `series_key value timestamp_ms` for points (value in line-protocol syntax)
//! and `! line N: message` for rejected lines.

use tally::series::line_protocol::{
    parse_lines, series_key, FieldValue, LineErrorKind, ParseSummary, Precision,
    MAX_REPORTED_ERRORS,
};

const DEFAULT_TS: i64 = 999;

fn run(input: &[u8], precision: Precision) -> (Vec<String>, ParseSummary) {
    let mut out = Vec::new();
    let mut points = Vec::new();
    let summary = parse_lines(input, precision, DEFAULT_TS, |p| {
        points.push((
            p.line(),
            format!("{} {} {}", p.series_key(), p.value(), p.timestamp_ms()),
        ));
    });
    // Merge points and errors in line order (points of a line keep field order).
    let mut errors = summary
        .errors
        .iter()
        .map(|e| (e.line, format!("! {e}")))
        .peekable();
    for (line, text) in points {
        while let Some((_, e)) = errors.next_if(|(l, _)| *l < line) {
            out.push(e);
        }
        out.push(text);
    }
    out.extend(errors.map(|(_, e)| e));
    (out, summary)
}

#[track_caller]
fn check_with(precision: Precision, input: &str, expected: &[&str]) {
    check_bytes(precision, input.as_bytes(), expected);
}

#[track_caller]
fn check_bytes(precision: Precision, input: &[u8], expected: &[&str]) {
    let (got, summary) = run(input, precision);
    assert_eq!(got, expected, "input: {:?}", String::from_utf8_lossy(input));
    assert_eq!(
        summary.points,
        got.iter().filter(|l| !l.starts_with('!')).count()
    );
    assert_eq!(summary.error_lines, summary.errors.len());
    assert_eq!(
        summary.lines,
        summary.skipped_lines + summary.ok_lines + summary.error_lines
    );
}

#[track_caller]
fn check(input: &str, expected: &[&str]) {
    check_with(Precision::Milliseconds, input, expected);
}

#[test]
fn basics() {
    let cases: &[(&str, &[&str])] = &[
        ("cpu value=1.5 1000", &["cpu:value 1.5 1000"]),
        (
            "cpu,host=a,region=eu usage=1.5 1000",
            &["cpu,host=a,region=eu:usage 1.5 1000"],
        ),
        // Tags are sorted in the key and in Point::tags.
        (
            "cpu,region=eu,host=a,az=1 usage=1 5",
            &["cpu,az=1,host=a,region=eu:usage 1.0 5"],
        ),
        (
            "cpu a=1,b=2i,c=3u,d=t,e=\"x\" 7",
            &[
                "cpu:a 1.0 7",
                "cpu:b 2i 7",
                "cpu:c 3u 7",
                "cpu:d true 7",
                "cpu:e \"x\" 7",
            ],
        ),
        // Missing timestamp -> default.
        ("cpu v=1", &["cpu:v 1.0 999"]),
        ("cpu v=1 ", &["cpu:v 1.0 999"]),
        ("cpu v=1 1000   ", &["cpu:v 1.0 1000"]),
        ("cpu  v=1   1000", &["cpu:v 1.0 1000"]),
        ("  \tcpu v=1 1", &["cpu:v 1.0 1"]),
        ("cpu v=1 -5", &["cpu:v 1.0 -5"]),
        ("cpu v=1 +5", &["cpu:v 1.0 5"]),
        // Line endings, blank lines, comments.
        (
            "cpu v=1 1\r\ncpu v=2 2\r\n",
            &["cpu:v 1.0 1", "cpu:v 2.0 2"],
        ),
        (
            "# comment\n\n   \r\ncpu v=1 1\n  # indented comment\n#cpu v=2 2",
            &["cpu:v 1.0 1"],
        ),
        ("cpu v=1 1\ncpu v=2 2", &["cpu:v 1.0 1", "cpu:v 2.0 2"]),
        ("", &[]),
        ("\n\n\n", &[]),
        ("温度,地点=東京 値=21.5 1", &["温度,地点=東京:値 21.5 1"]),
    ];
    for (input, expected) in cases {
        check(input, expected);
    }
}

#[test]
fn escaping() {
    let cases: &[(&str, &[&str])] = &[
        // Escaped space, comma, equals in every name position.
        (
            r"my\ cpu,ta\,g\=x=v\ 1\,2 f\ k\=ey=1 1",
            &[r"my\ cpu,ta\,g\=x=v\ 1\,2:f\ k\=ey 1.0 1"],
        ),
        (r"a\,b v=1 1", &[r"a\,b:v 1.0 1"]),
        (r"a\=b v=1 1", &[r"a\=b:v 1.0 1"]),
        // Unescaped '=' is literal in a measurement and in a tag value.
        ("a=b v=1 1", &[r"a\=b:v 1.0 1"]),
        ("cpu,t=a=b v=1 1", &[r"cpu,t=a\=b:v 1.0 1"]),
        // Backslash before a non-escapable character is literal.
        (r"cpu\x,t=a\b v\n=1 1", &[r"cpu\\x,t=a\\b:v\\n 1.0 1"]),
        // `\\` is one backslash; the following space still ends the name.
        (r"cpu\\ v=1 1", &[r"cpu\\:v 1.0 1"]),
        (r"cpu,t=a\\,u=b v=1 1", &[r"cpu,t=a\\,u=b:v 1.0 1"]),
        // ':' is escaped in keys so that the key is unambiguous.
        ("a:b,c:d=e:f g:h=1 1", &[r"a\:b,c\:d=e\:f:g\:h 1.0 1"]),
        // Strings: commas, spaces and equals inside quotes; \" and \\ escapes.
        (
            r#"s v="hello, world = yes" 1"#,
            &[r#"s:v "hello, world = yes" 1"#],
        ),
        (
            r#"s v="a \"q\" \\ b \x" 1"#,
            &[r#"s:v "a \"q\" \\ b \\x" 1"#],
        ),
        (r#"s v="",w=1 1"#, &[r#"s:v "" 1"#, "s:w 1.0 1"]),
        (r#"s v="a\\" 1"#, &[r#"s:v "a\\" 1"#]),
        (r#"s v="x y",w="z" 1"#, &[r#"s:v "x y" 1"#, r#"s:w "z" 1"#]),
        (r#"s v="ünï" 1"#, &[r#"s:v "ünï" 1"#]),
    ];
    for (input, expected) in cases {
        check(input, expected);
    }
}

#[test]
fn field_types() {
    let cases: &[(&str, &[&str])] = &[
        (
            "m a=1.5,b=-2,c=1e3,d=+2.5E-3,e=.5,f=0,g=1.,h=-0.0 1",
            &[
                "m:a 1.5 1",
                "m:b -2.0 1",
                "m:c 1000.0 1",
                "m:d 0.0025 1",
                "m:e 0.5 1",
                "m:f 0.0 1",
                "m:g 1.0 1",
                "m:h -0.0 1",
            ],
        ),
        (
            "m a=5i,b=-5i,c=9223372036854775807i,d=-9223372036854775808i,e=0i 1",
            &[
                "m:a 5i 1",
                "m:b -5i 1",
                "m:c 9223372036854775807i 1",
                "m:d -9223372036854775808i 1",
                "m:e 0i 1",
            ],
        ),
        (
            "m a=5u,b=18446744073709551615u,c=0u 1",
            &["m:a 5u 1", "m:b 18446744073709551615u 1", "m:c 0u 1"],
        ),
        (
            "m a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE 1",
            &[
                "m:a true 1",
                "m:b true 1",
                "m:c true 1",
                "m:d true 1",
                "m:e true 1",
                "m:f false 1",
                "m:g false 1",
                "m:h false 1",
                "m:i false 1",
                "m:j false 1",
            ],
        ),
    ];
    for (input, expected) in cases {
        check(input, expected);
    }
}

#[test]
fn errors() {
    let cases: &[(&str, &str)] = &[
        (
            "cpu",
            "missing field set (expected `measurement[,tags] field=value`)",
        ),
        (
            "cpu ",
            "missing field set (expected `measurement[,tags] field=value`)",
        ),
        (
            "cpu,host=a",
            "missing field set (expected `measurement[,tags] field=value`)",
        ),
        (
            "cpu,host=a ",
            "missing field set (expected `measurement[,tags] field=value`)",
        ),
        (",host=a v=1", "missing measurement name"),
        ("cpu,=a v=1", "empty tag key"),
        ("cpu, v=1", "empty tag key"),
        ("cpu,host v=1", "tag `host` has no `=value`"),
        ("cpu,host,a=b v=1", "tag `host` has no `=value`"),
        ("cpu,host= v=1", "empty value for tag `host`"),
        ("cpu,host=,a=b v=1", "empty value for tag `host`"),
        ("cpu,h=a,g=c,h=b v=1", "duplicate tag key `h`"),
        ("cpu =1", "empty field key"),
        ("cpu v=1,", "empty field key"),
        ("cpu v=1,,w=2", "empty field key"),
        ("cpu v", "field `v` has no `=value`"),
        ("cpu v 123", "field `v` has no `=value`"),
        ("cpu v,w=1", "field `v` has no `=value`"),
        ("cpu v=", "empty value for field `v`"),
        ("cpu v= 1", "empty value for field `v`"),
        ("cpu v=,w=1", "empty value for field `v`"),
        ("cpu v=abc", "invalid value `abc` for field `v`"),
        ("cpu v=1.2.3", "invalid value `1.2.3` for field `v`"),
        ("cpu v=inf", "invalid value `inf` for field `v`"),
        ("cpu v=-Inf", "invalid value `-Inf` for field `v`"),
        ("cpu v=NaN", "invalid value `NaN` for field `v`"),
        ("cpu v=e5", "invalid value `e5` for field `v`"),
        ("cpu v=.", "invalid value `.` for field `v`"),
        ("cpu v=1x", "invalid value `1x` for field `v`"),
        ("cpu v=tru", "invalid value `tru` for field `v`"),
        ("cpu v=yes", "invalid value `yes` for field `v`"),
        ("cpu v=i", "invalid value `i` for field `v`"),
        ("cpu v=1.5i", "invalid value `1.5i` for field `v`"),
        ("cpu v=--5i", "invalid value `--5i` for field `v`"),
        ("cpu v=u", "invalid value `u` for field `v`"),
        ("cpu v=-xu", "invalid value `-xu` for field `v`"),
        ("cpu v=1e400", "value `1e400` for field `v` is out of range"),
        (
            "cpu v=-1e400",
            "value `-1e400` for field `v` is out of range",
        ),
        (
            "cpu v=9223372036854775808i",
            "value `9223372036854775808i` for field `v` is out of range",
        ),
        (
            "cpu v=-9223372036854775809i",
            "value `-9223372036854775809i` for field `v` is out of range",
        ),
        (
            "cpu v=18446744073709551616u",
            "value `18446744073709551616u` for field `v` is out of range",
        ),
        ("cpu v=-1u", "value `-1u` for field `v` is out of range"),
        ("cpu v=\"abc", "unterminated string value for field `v`"),
        ("cpu v=\"abc\\\"", "unterminated string value for field `v`"),
        ("cpu v=\"abc\\", "unterminated string value for field `v`"),
        (
            "cpu v=\"abc\"x 1",
            "unexpected `x` after string value of field `v`",
        ),
        ("cpu v=1 12x", "invalid timestamp `12x`"),
        ("cpu v=1 1.5", "invalid timestamp `1.5`"),
        ("cpu v=1 -", "invalid timestamp `-`"),
        ("cpu v=1 1_000", "invalid timestamp `1_000`"),
        (
            "cpu v=1 99999999999999999999",
            "timestamp `99999999999999999999` is out of range for precision ms",
        ),
        ("cpu v=1 1 2", "unexpected data after timestamp: `2`"),
        (
            "cpu v=1 1 extra junk",
            "unexpected data after timestamp: `extra junk`",
        ),
        ("garbage line here", "field `line` has no `=value`"),
        (
            "!!!",
            "missing field set (expected `measurement[,tags] field=value`)",
        ),
        (
            "\u{1}\u{2}",
            "missing field set (expected `measurement[,tags] field=value`)",
        ),
        ("{\"json\": 1}", "field `1}` has no `=value`"),
    ];
    for (input, message) in cases {
        check(input, &[&format!("! line 1: {message}")]);
    }
}

#[test]
fn invalid_utf8_and_long_snippets() {
    check_bytes(
        Precision::Milliseconds,
        b"cpu v=1 1\ncp\xff v=1 1\ncpu v=2 2",
        &[
            "cpu:v 1.0 1",
            "! line 2: line is not valid UTF-8",
            "cpu:v 2.0 2",
        ],
    );
    let long = format!("cpu v={}", "x".repeat(100));
    check(
        &long,
        &[&format!(
            "! line 1: invalid value `{}…` for field `v`",
            "x".repeat(64)
        )],
    );
}

#[test]
fn bad_lines_do_not_stop_others_and_are_atomic() {
    let input = "cpu v=1 1\nbad\ncpu v=2 2\n\n# c\ncpu v= 3\ncpu a=1,b=oops 4\ncpu v=3 3";
    check(
        input,
        &[
            "cpu:v 1.0 1",
            "! line 2: missing field set (expected `measurement[,tags] field=value`)",
            "cpu:v 2.0 2",
            "! line 6: empty value for field `v`",
            // Line 7's valid first field is not emitted.
            "! line 7: invalid value `oops` for field `b`",
            "cpu:v 3.0 3",
        ],
    );
    let (_, s) = run(input.as_bytes(), Precision::Milliseconds);
    assert_eq!(
        (
            s.lines,
            s.skipped_lines,
            s.ok_lines,
            s.error_lines,
            s.points,
            s.non_numeric
        ),
        (8, 2, 3, 3, 3, 0)
    );
}

#[test]
fn summary_counts_non_numeric() {
    let (_, s) = run(
        b"m a=\"x\",b=1,c=\"y\" 1\nm d=2i 2\n",
        Precision::Milliseconds,
    );
    assert_eq!((s.lines, s.ok_lines, s.points, s.non_numeric), (2, 2, 4, 2));
    assert!(s.is_clean());
}

#[test]
fn error_list_is_capped() {
    let input = "bad\n".repeat(MAX_REPORTED_ERRORS + 50);
    let (_, s) = run(input.as_bytes(), Precision::Milliseconds);
    assert_eq!(s.error_lines, MAX_REPORTED_ERRORS + 50);
    assert_eq!(s.errors.len(), MAX_REPORTED_ERRORS);
    assert_eq!(s.errors.last().map(|e| e.line), Some(MAX_REPORTED_ERRORS));
    assert_eq!(s.errors[0].kind, LineErrorKind::MissingFields);
}

#[test]
fn precisions() {
    use Precision::*;
    let cases: &[(Precision, &str, &[&str])] = &[
        (
            Nanoseconds,
            "m v=1 1700000000123456789",
            &["m:v 1.0 1700000000123"],
        ),
        (
            Microseconds,
            "m v=1 1700000000123456",
            &["m:v 1.0 1700000000123"],
        ),
        (
            Milliseconds,
            "m v=1 1700000000123",
            &["m:v 1.0 1700000000123"],
        ),
        (Seconds, "m v=1 1700000000", &["m:v 1.0 1700000000000"]),
        // Floor toward negative infinity for pre-1970 timestamps.
        (Nanoseconds, "m v=1 -1", &["m:v 1.0 -1"]),
        (Nanoseconds, "m v=1 -1000000", &["m:v 1.0 -1"]),
        (Nanoseconds, "m v=1 -1000001", &["m:v 1.0 -2"]),
        (Microseconds, "m v=1 999", &["m:v 1.0 0"]),
        (
            Nanoseconds,
            "m v=1 9223372036854775807",
            &["m:v 1.0 9223372036854"],
        ),
        (
            Nanoseconds,
            "m v=1 -9223372036854775808",
            &["m:v 1.0 -9223372036855"],
        ),
        (
            Seconds,
            "m v=1 9223372036854775",
            &["m:v 1.0 9223372036854775000"],
        ),
        (
            Seconds,
            "m v=1 9223372036854776",
            &["! line 1: timestamp `9223372036854776` is out of range for precision s"],
        ),
        (
            Seconds,
            "m v=1 -9223372036854776",
            &["! line 1: timestamp `-9223372036854776` is out of range for precision s"],
        ),
        (
            Nanoseconds,
            "m v=1 9223372036854775808",
            &["! line 1: timestamp `9223372036854775808` is out of range for precision ns"],
        ),
        // The default timestamp is already in ms and is not converted.
        (Seconds, "m v=1", &["m:v 1.0 999"]),
    ];
    for (precision, input, expected) in cases {
        check_with(*precision, input, expected);
    }
}

#[test]
fn precision_names() {
    for (name, p) in [
        ("ns", Precision::Nanoseconds),
        ("n", Precision::Nanoseconds),
        ("us", Precision::Microseconds),
        ("u", Precision::Microseconds),
        ("µs", Precision::Microseconds),
        ("ms", Precision::Milliseconds),
        ("s", Precision::Seconds),
    ] {
        assert_eq!(name.parse::<Precision>(), Ok(p));
    }
    assert_eq!(
        "h".parse::<Precision>().map_err(|e| e.to_string()),
        Err("unknown precision `h` (expected ns, us, ms or s)".into())
    );
    assert_eq!(Precision::default(), Precision::Nanoseconds);
    assert_eq!(Precision::Seconds.to_string(), "s");
}

#[test]
fn point_accessors_and_zero_copy() {
    let input = b"cpu,z=1,host=a usage=1.5,s=\"x\" 1000\nm\\ x,k\\,=v\\= f\\ =2i 5\n";
    let range = input.as_ptr_range();
    let mut seen = Vec::new();
    parse_lines(input, Precision::Milliseconds, 0, |p| {
        let borrowed = range.contains(&p.measurement().as_ptr());
        let tags: Vec<(String, String)> = p
            .tags()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect();
        seen.push((
            p.line(),
            p.measurement().to_owned(),
            tags,
            p.field().to_owned(),
            p.value().as_f64(),
            p.value().is_numeric(),
            borrowed,
        ));
    });
    let t = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    assert_eq!(
        seen,
        vec![
            (
                1,
                "cpu".into(),
                vec![t("host", "a"), t("z", "1")],
                "usage".into(),
                Some(1.5),
                true,
                true
            ),
            (
                1,
                "cpu".into(),
                vec![t("host", "a"), t("z", "1")],
                "s".into(),
                None,
                false,
                true
            ),
            (
                2,
                "m x".into(),
                vec![t("k,", "v=")],
                "f ".into(),
                Some(2.0),
                true,
                false
            ),
        ]
    );
}

#[test]
fn field_value_as_f64() {
    assert_eq!(FieldValue::Bool(true).as_f64(), Some(1.0));
    assert_eq!(FieldValue::Bool(false).as_f64(), Some(0.0));
    assert_eq!(FieldValue::Int(-3).as_f64(), Some(-3.0));
    assert_eq!(
        FieldValue::UInt(u64::MAX).as_f64(),
        Some(18446744073709551615.0)
    );
    assert_eq!(FieldValue::Str("1").as_f64(), None);
}

#[test]
fn series_key_helper() {
    assert_eq!(series_key("cpu", &[], "usage"), "cpu:usage");
    assert_eq!(
        series_key("cpu", &[("region", "eu"), ("host", "a")], "usage"),
        "cpu,host=a,region=eu:usage"
    );
    assert_eq!(
        series_key("a b", &[("c,d", "e=f:g\\")], "h:i"),
        r"a\ b,c\,d=e\=f\:g\\:h\:i"
    );
    // Ambiguous-looking inputs get distinct keys.
    assert_ne!(series_key("a:b", &[], "c"), series_key("a", &[], "b:c"));
    assert_ne!(
        series_key("a", &[("b", "c,d=e")], "f"),
        series_key("a", &[("b", "c"), ("d", "e")], "f")
    );
    // The parser's Point::series_key agrees with the helper.
    let mut keys = Vec::new();
    parse_lines(
        b"cpu,region=eu,host=a usage=1 1",
        Precision::Seconds,
        0,
        |p| keys.push(p.series_key()),
    );
    assert_eq!(
        keys,
        [series_key(
            "cpu",
            &[("host", "a"), ("region", "eu")],
            "usage"
        )]
    );
}

#[test]
fn never_panics_on_random_input() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let alphabet = b"ab=, \\\"\n\r#0123456789.eEiu-+tf\xff\xc3\xa9\t";
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..20_000 {
        let len = rng.random_range(0..40);
        let input: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        let mut n = 0;
        let s = parse_lines(&input, Precision::Nanoseconds, 0, |p| {
            n += 1;
            let _ = p.series_key();
        });
        assert_eq!(s.points, n);
        assert_eq!(s.lines, s.skipped_lines + s.ok_lines + s.error_lines);
    }
}
