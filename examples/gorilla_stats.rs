//! Gorilla block size and speed on the reference data sets.
//!
//! `cargo run --release --example gorilla_stats`

use std::hint::black_box;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally::series::gorilla::{BlockEncoder, SealedBlock};

fn encode(points: &[(i64, f64)]) -> SealedBlock {
    let mut enc = BlockEncoder::with_capacity(points.len());
    for &(t, v) in points {
        if let Err(e) = enc.push(t, v) {
            panic!("{e}");
        }
    }
    enc.finish()
}

fn main() {
    const N: usize = 7200; // one block: 4 h at 2 s, 2 h at 1 s
    let mut rng = StdRng::seed_from_u64(1);
    let mut t = 1_700_000_000_000i64;
    let demo: Vec<_> = (0..N)
        .map(|_| {
            t += 2000 + rng.random_range(-50..=50);
            (t, f64::from(rng.random_range(10..=25)))
        })
        .collect();
    let regular_demo: Vec<_> = (0..N)
        .map(|i| (i as i64 * 2000, f64::from(rng.random_range(10..=25))))
        .collect();
    let floats: Vec<_> = (0..N)
        .map(|i| (i as i64 * 1000, rng.random::<f64>() * 1000.0))
        .collect();
    let gauge: Vec<_> = (0..N)
        .map(|i| {
            (
                i as i64 * 1000,
                (i as f64 / 100.0).sin().mul_add(50.0, 50.0).round() / 10.0,
            )
        })
        .collect();
    let constant: Vec<_> = (0..N).map(|i| (i as i64 * 1000, 1.0)).collect();

    for (name, pts) in [
        ("demo: int 10..=25, 2000±50 ms", &demo),
        ("int 10..=25, exactly 2000 ms", &regular_demo),
        ("random f64, 1 s", &floats),
        ("1-decimal gauge, 1 s", &gauge),
        ("constant, 1 s", &constant),
    ] {
        let block = encode(pts);
        println!(
            "{name:<32} {:>6.3} bytes/point ({} points, {} bytes)",
            block.byte_len() as f64 / N as f64,
            N,
            block.byte_len()
        );
    }

    // Throughput on the demo data.
    let rounds = 300;
    let t0 = Instant::now();
    let mut bytes = 0;
    for _ in 0..rounds {
        bytes += black_box(encode(black_box(&demo))).byte_len();
    }
    let enc = t0.elapsed().as_secs_f64();
    let block = encode(&demo);
    let t0 = Instant::now();
    let mut acc = 0.0;
    for _ in 0..rounds {
        for (t, v) in black_box(&block).iter() {
            acc += v + t as f64;
        }
    }
    let dec = t0.elapsed().as_secs_f64();
    black_box((bytes, acc));
    let pts = (rounds * N) as f64;
    println!(
        "encode {:.1} M points/s, decode {:.1} M points/s (demo data)",
        pts / enc / 1e6,
        pts / dec / 1e6
    );
}
