//! Roundtrip, aggregate, validation and size tests for the Gorilla block codec.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally::series::gorilla::{BlockEncoder, DecodeError, EncodeError, SealedBlock};

fn encode(points: &[(i64, f64)]) -> SealedBlock {
    let mut enc = BlockEncoder::new();
    for (i, &(ts, v)) in points.iter().enumerate() {
        if let Err(e) = enc.push(ts, v) {
            panic!("push #{i} ({ts}, {v}) failed: {e}");
        }
    }
    assert_eq!(enc.len(), points.len());
    let expected_len = enc.encoded_len();
    let block = enc.finish();
    assert_eq!(block.byte_len(), expected_len);
    block
}

/// Bit-exact comparison (NaN payloads, signed zeros).
fn assert_roundtrip(points: &[(i64, f64)]) -> SealedBlock {
    let block = encode(points);
    assert_eq!(block.len(), points.len());
    let it = block.iter();
    assert_eq!(it.len(), points.len());
    let decoded: Vec<(i64, u64)> = it.map(|(t, v)| (t, v.to_bits())).collect();
    let expected: Vec<(i64, u64)> = points.iter().map(|&(t, v)| (t, v.to_bits())).collect();
    if decoded != expected {
        let first_bad = decoded.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "roundtrip mismatch: {} decoded vs {} expected, first difference at {first_bad:?}",
            decoded.len(),
            expected.len()
        );
    }
    assert_eq!(block.first_ts(), points.first().map(|p| p.0));
    assert_eq!(block.last_ts(), points.last().map(|p| p.0));

    // The bytes alone (plus count) rebuild an identical block.
    let rebuilt = SealedBlock::from_raw(block.as_bytes().to_vec(), block.count())
        .unwrap_or_else(|e| panic!("from_raw rejected encoder output: {e}"));
    assert_eq!(rebuilt, block);
    match (rebuilt.aggregates(), block.aggregates()) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            assert_eq!(a.count, b.count);
            // A NaN's payload depends on how the compiler ordered the additions (release
            // and debug builds differ), so NaN sums only need to agree on being NaN.
            if !(a.sum.is_nan() && b.sum.is_nan()) {
                assert_eq!(a.sum.to_bits(), b.sum.to_bits());
            }
            assert_eq!(a.min.to_bits(), b.min.to_bits());
            assert_eq!(a.max.to_bits(), b.max.to_bits());
            assert_eq!(a.last.to_bits(), b.last.to_bits());
        }
        other => panic!("aggregates differ: {other:?}"),
    }
    block
}

fn bytes_per_point(block: &SealedBlock) -> f64 {
    block.byte_len() as f64 / block.len() as f64
}

/// The demo upstream: random integers 10..=25 every 2000 ms ± 50 ms jitter.
fn demo_series(n: usize, seed: u64) -> Vec<(i64, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 1_700_000_000_000i64;
    (0..n)
        .map(|_| {
            t += 2000 + rng.random_range(-50..=50);
            (t, f64::from(rng.random_range(10..=25)))
        })
        .collect()
}

fn random_float_series(n: usize, seed: u64) -> Vec<(i64, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            (
                1_700_000_000_000 + 1000 * i as i64,
                rng.random::<f64>() * 1000.0 - 500.0,
            )
        })
        .collect()
}

#[test]
fn empty_block() {
    let block = assert_roundtrip(&[]);
    assert!(block.is_empty());
    assert_eq!(block.byte_len(), 0);
    assert_eq!(block.first_ts(), None);
    assert_eq!(block.last_ts(), None);
    assert!(block.aggregates().is_none());
    assert_eq!(block.iter().next(), None);
}

#[test]
fn single_point() {
    let block = assert_roundtrip(&[(42, 3.25)]);
    assert_eq!(block.byte_len(), 16);
    let agg = block.aggregates().unwrap();
    assert_eq!(
        (agg.count, agg.sum, agg.min, agg.max, agg.last),
        (1, 3.25, 3.25, 3.25, 3.25)
    );
}

#[test]
fn random_floats_roundtrip() {
    for seed in 0..20 {
        assert_roundtrip(&random_float_series(1000, seed));
    }
}

#[test]
fn random_bit_patterns_roundtrip() {
    // Arbitrary u64 bit patterns: covers NaN payloads, subnormals, infinities.
    let mut rng = StdRng::seed_from_u64(7);
    let mut t = 0i64;
    let points: Vec<_> = (0..5000)
        .map(|_| {
            t += rng.random_range(0..5000);
            (t, f64::from_bits(rng.random::<u64>()))
        })
        .collect();
    assert_roundtrip(&points);
}

#[test]
fn special_values_roundtrip_bit_exact() {
    let values = [
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        -f64::NAN,
        f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN
        f64::from_bits(0x7ff8_dead_beef_0001), // NaN with payload
        f64::from_bits(0xfff0_0000_0000_0001),
        f64::MIN_POSITIVE,
        f64::from_bits(1), // smallest subnormal
        -f64::from_bits(1),
        f64::MAX,
        f64::MIN,
        f64::EPSILON,
        1.0,
        -0.0,
        -0.0,
        f64::NAN,
    ];
    let points: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as i64 * 10, v))
        .collect();
    assert_roundtrip(&points);
    // Every value followed by every other value, to hit each window case.
    let mut pairs = Vec::new();
    let mut t = 0;
    for &a in &values {
        for &b in &values {
            pairs.push((t, a));
            pairs.push((t + 1, b));
            t += 2;
        }
    }
    assert_roundtrip(&pairs);
}

#[test]
fn constant_values_compress_to_about_one_byte_per_point_with_regular_timestamps() {
    let points: Vec<_> = (0..10_000).map(|i| (i * 1000, 42.5)).collect();
    let block = assert_roundtrip(&points);
    // dod = 0 and xor = 0: 2 bits per point after the first two.
    assert!(
        block.byte_len() <= 16 + 3 + 10_000 / 4 + 1,
        "{} bytes",
        block.byte_len()
    );
}

#[test]
fn demo_upstream_integer_series_roundtrip_and_size() {
    for seed in 0..5 {
        let block = assert_roundtrip(&demo_series(3600, seed));
        let bpp = bytes_per_point(&block);
        assert!(bpp < 3.0, "demo series: {bpp:.3} bytes/point");
    }
}

#[test]
fn irregular_timestamps_roundtrip() {
    let mut rng = StdRng::seed_from_u64(99);
    let mut t = -5_000_000_000i64;
    let mut points = Vec::new();
    for _ in 0..20_000 {
        let gap = match rng.random_range(0..10) {
            0 => 0,                                        // duplicate timestamp
            1 => rng.random_range(0..100),                 // burst
            2 => rng.random_range(0..10_000_000_000i64),   // > i32 range dod
            3 => rng.random_range(1_000_000..100_000_000), // i32 bucket
            _ => 1000 + rng.random_range(-300..300),
        };
        t += gap;
        points.push((t, f64::from(rng.random_range(0..100)) / 4.0));
    }
    assert_roundtrip(&points);
}

#[test]
fn timestamp_extremes_roundtrip() {
    assert_roundtrip(&[(i64::MIN, 1.0), (i64::MAX, 2.0)]);
    assert_roundtrip(&[
        (i64::MIN, 1.0),
        (i64::MIN, 2.0),
        (0, 3.0),
        (i64::MAX, 4.0),
        (i64::MAX, 5.0),
    ]);
    assert_roundtrip(&[
        (i64::MIN, 1.0),
        (i64::MAX, 2.0),
        (i64::MAX, 3.0),
        (i64::MAX, 4.0),
    ]);
    assert_roundtrip(&[(-1, 0.0), (0, 0.0), (i64::MAX - 1, 0.0), (i64::MAX, 0.0)]);
}

#[test]
fn every_dod_bucket_boundary_roundtrips() {
    // delta-of-delta exactly at and just past each bucket edge, both signs.
    let edges: [i64; 14] = [
        0, 1, -1, 63, 64, -64, -65, 255, 256, -256, -257, 2047, 2048, -2049,
    ];
    let wide = [
        i64::from(i32::MAX),
        i64::from(i32::MAX) + 1,
        i64::from(i32::MIN),
        i64::from(i32::MIN) - 1,
    ];
    for &dod in edges.iter().chain(&wide) {
        // Base delta large enough that delta + dod stays nonnegative.
        let base = 10_000_000_000i64;
        let pts = [
            (0, 1.0),
            (base, 1.0),
            (2 * base + dod, 1.0),
            (3 * base + dod, 2.0),
        ];
        assert_roundtrip(&pts);
    }
}

#[test]
fn out_of_order_push_is_rejected_and_encoder_unchanged() {
    let mut enc = BlockEncoder::new();
    enc.push(1000, 1.0).unwrap();
    enc.push(1000, 2.0).unwrap(); // equal is fine
    assert_eq!(
        enc.push(999, 3.0),
        Err(EncodeError::OutOfOrder {
            ts: 999,
            prev: 1000
        })
    );
    assert_eq!(enc.len(), 2);
    assert_eq!(enc.last_ts(), Some(1000));
    enc.push(2000, 4.0).unwrap();
    let block = enc.finish();
    assert_eq!(
        block.iter().collect::<Vec<_>>(),
        vec![(1000, 1.0), (1000, 2.0), (2000, 4.0)]
    );
    assert_eq!(block.aggregates().unwrap().sum, 7.0);
}

#[test]
fn aggregates_sum_is_compensated() {
    let block = encode(&[(0, 1e100), (1, 1.0), (2, -1e100)]);
    assert_eq!(block.aggregates().unwrap().sum, 1.0);

    let points: Vec<_> = (0..10_000).map(|i| (i, 0.1)).collect();
    let agg = encode(&points).aggregates().unwrap();
    assert_eq!(agg.sum, 1000.0); // naive summation gives 1000.0000000001588
    assert_eq!(agg.count, 10_000);
    assert!((agg.mean() - 0.1).abs() < 1e-15);
}

#[test]
fn aggregates_min_max_last() {
    let agg = encode(&[(0, 3.0), (1, -2.0), (2, 7.5), (3, 1.0)])
        .aggregates()
        .unwrap();
    assert_eq!(
        (agg.min, agg.max, agg.last, agg.sum, agg.count),
        (-2.0, 7.5, 1.0, 9.5, 4)
    );
}

#[test]
fn aggregates_non_finite() {
    let agg = encode(&[(0, 1.0), (1, f64::NAN), (2, -4.0)])
        .aggregates()
        .unwrap();
    assert!(agg.sum.is_nan());
    assert_eq!((agg.min, agg.max, agg.last), (-4.0, 1.0, -4.0));

    let agg = encode(&[(0, f64::NAN), (1, f64::NAN)])
        .aggregates()
        .unwrap();
    assert!(agg.min.is_nan() && agg.max.is_nan() && agg.last.is_nan());

    let agg = encode(&[(0, 1.0), (1, f64::INFINITY), (2, 5.0)])
        .aggregates()
        .unwrap();
    assert_eq!(
        (agg.sum, agg.max, agg.min),
        (f64::INFINITY, f64::INFINITY, 1.0)
    );

    let agg = encode(&[(0, f64::INFINITY), (1, f64::NEG_INFINITY)])
        .aggregates()
        .unwrap();
    assert!(agg.sum.is_nan());

    let agg = encode(&[(0, f64::MAX), (1, f64::MAX)])
        .aggregates()
        .unwrap();
    assert_eq!(agg.sum, f64::INFINITY);

    let agg = encode(&[(0, -0.0), (1, -0.0)]).aggregates().unwrap();
    assert_eq!(agg.sum.to_bits(), (-0.0f64).to_bits());
    let agg = encode(&[
        (0, f64::NAN),
        (1, 2.0),
        (2, f64::from_bits(0x7ff8_0000_0000_0042)),
    ])
    .aggregates()
    .unwrap();
    assert_eq!(agg.last.to_bits(), 0x7ff8_0000_0000_0042);
}

#[test]
fn from_raw_rejects_corruption() {
    let block = encode(&demo_series(100, 1));
    let bytes = block.as_bytes();

    assert_eq!(
        SealedBlock::from_raw(bytes[..bytes.len() - 20].to_vec(), 100)
            .err()
            .map(|e| matches!(e, DecodeError::Truncated { .. })),
        Some(true)
    );
    // Pad bits are ones, so even one phantom point is detected.
    assert_eq!(
        SealedBlock::from_raw(bytes.to_vec(), 101).err(),
        Some(DecodeError::Truncated { point: 100 })
    );
    let mut zero_pad = bytes.to_vec();
    if let Some(last) = zero_pad.last_mut() {
        *last &= 0xf0;
    }
    assert!(SealedBlock::from_raw(zero_pad, 100).is_err());
    assert!(matches!(
        SealedBlock::from_raw(bytes.to_vec(), 50),
        Err(DecodeError::TrailingData { .. })
    ));
    let mut extra = bytes.to_vec();
    extra.push(0);
    assert!(matches!(
        SealedBlock::from_raw(extra, 100),
        Err(DecodeError::TrailingData { .. })
    ));
    assert!(matches!(
        SealedBlock::from_raw(vec![0u8; 3], 0),
        Err(DecodeError::TrailingData { bits: 24 })
    ));
    assert!(matches!(
        SealedBlock::from_raw(vec![0u8; 15], 1),
        Err(DecodeError::Truncated { point: 0 })
    ));
    assert!(SealedBlock::from_raw(Vec::new(), 0).is_ok());

    // Decreasing timestamps: second point's dod = -1 via the 7-bit bucket.
    let mut raw = vec![0u8; 16];
    raw[7] = 10; // ts0 = 10, value0 = 0.0
    raw.extend_from_slice(&[0b1011_1111, 0b1000_0000]); // '10' + 1111111 (-1), then value '0'
    assert_eq!(
        SealedBlock::from_raw(raw, 2).err(),
        Some(DecodeError::OutOfOrder { point: 1 })
    );

    // '10' value record with no window established yet.
    let mut raw = vec![0u8; 16];
    raw.push(0b0100_0000); // dod '0', value '10'
    assert_eq!(
        SealedBlock::from_raw(raw, 2).err(),
        Some(DecodeError::BadWindow { point: 1 })
    );
}

#[test]
fn from_raw_never_panics_on_garbage() {
    let mut rng = StdRng::seed_from_u64(1234);
    let good = encode(&random_float_series(200, 3));
    for _ in 0..20_000 {
        let len = rng.random_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if rng.random_bool(0.5) {
            // Mutate a valid block instead: flip a few bits.
            bytes = good.as_bytes().to_vec();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
        }
        let count = rng.random_range(0..300);
        if let Ok(block) = SealedBlock::from_raw(bytes, count) {
            // Whatever was accepted decodes fully and in order.
            let pts: Vec<_> = block.iter().collect();
            assert_eq!(pts.len(), count as usize);
            assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0));
        }
    }
}

#[test]
fn size_report() {
    // Printed with `cargo test -- --nocapture size_report`.
    let demo = encode(&demo_series(3600, 42));
    let floats = encode(&random_float_series(3600, 42));
    let constant = encode(&(0..3600).map(|i| (i * 1000, 1.0)).collect::<Vec<_>>());
    println!(
        "demo (int 10..=25, 2000±50 ms): {:.3} bytes/point",
        bytes_per_point(&demo)
    );
    println!(
        "random f64, 1 s interval:      {:.3} bytes/point",
        bytes_per_point(&floats)
    );
    println!(
        "constant, 1 s interval:        {:.3} bytes/point",
        bytes_per_point(&constant)
    );
    assert!(bytes_per_point(&floats) < 9.0);
}
