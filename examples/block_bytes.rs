//! Bytes per point of sealed blocks on the benchmark's point sets: Gorilla alone against
//! the store's sealed blocks (the smaller of Gorilla and packed zstd columns), and the
//! time to decode them.
//!
//! `cargo run --release --example block_bytes [POINTS]` (default 2,000,000 per set).

use std::hint::black_box;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally::series::gorilla::BlockEncoder;
use tally::series::packed::Block;

const BLOCK: usize = 1024;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let mut rng = StdRng::seed_from_u64(13);
    let t0 = 1_800_000_000_000i64;
    let sets: Vec<(&str, Vec<(i64, f64)>)> = vec![
        (
            "demo-like: 1 s grid, int 10..=25",
            (0..n as i64)
                .map(|i| (t0 + i * 1000, f64::from(rng.random_range(10..=25))))
                .collect(),
        ),
        (
            "jittered: 1 s ±20 ms, int 10..=25",
            (0..n as i64)
                .map(|i| {
                    (
                        t0 + i * 1000 + rng.random_range(-20..=20),
                        f64::from(rng.random_range(10..=25)),
                    )
                })
                .collect(),
        ),
        (
            "random floats: 1 s ±20 ms, [0,100) 3 decimals",
            (0..n as i64)
                .map(|i| {
                    (
                        t0 + i * 1000 + rng.random_range(-20..=20),
                        f64::from(rng.random_range(0..100_000)) / 1000.0,
                    )
                })
                .collect(),
        ),
        (
            "random f64: 1 s ±20 ms, [0,100) full precision",
            (0..n as i64)
                .map(|i| {
                    (
                        t0 + i * 1000 + rng.random_range(-20..=20),
                        rng.random::<f64>() * 100.0,
                    )
                })
                .collect(),
        ),
    ];
    for (name, pts) in &sets {
        let t = Instant::now();
        let mut gorilla = 0;
        for c in pts.chunks(BLOCK) {
            let mut enc = BlockEncoder::with_capacity(c.len());
            for &(t, v) in c {
                enc.push(t, v).expect("sorted");
            }
            gorilla += enc.finish().byte_len();
        }
        let g_enc = t.elapsed().as_secs_f64();
        let gblocks: Vec<_> = pts
            .chunks(BLOCK)
            .map(|c| {
                let mut enc = BlockEncoder::with_capacity(c.len());
                for &(t, v) in c {
                    enc.push(t, v).expect("sorted");
                }
                enc.finish()
            })
            .collect();
        let t = Instant::now();
        let mut acc = 0.0;
        for b in &gblocks {
            acc += b.iter().map(|p| p.1).sum::<f64>();
        }
        let g_dec = t.elapsed().as_secs_f64();
        black_box(acc);
        let t = Instant::now();
        let blocks: Vec<Block> = pts.chunks(BLOCK).map(Block::encode).collect();
        let enc = t.elapsed().as_secs_f64();
        let bytes: usize = blocks.iter().map(Block::byte_len).sum();
        let packed = blocks.iter().filter(|b| b.is_packed()).count();
        let t = Instant::now();
        let mut buf = Vec::with_capacity(BLOCK);
        let mut acc = 0.0;
        for b in &blocks {
            buf.clear();
            b.decode_into(&mut buf);
            acc += buf.iter().map(|p| p.1).sum::<f64>();
        }
        let dec = t.elapsed().as_secs_f64();
        black_box(acc);
        println!(
            "{name:<48} gorilla {:.3} B/pt; sealed {:.3} B/pt ({packed}/{} packed); seal {:.0} ns/pt (gorilla {:.0}), decode {:.1} ns/pt (gorilla {:.1})",
            gorilla as f64 / pts.len() as f64,
            bytes as f64 / pts.len() as f64,
            blocks.len(),
            enc * 1e9 / pts.len() as f64,
            g_enc * 1e9 / pts.len() as f64,
            dec * 1e9 / pts.len() as f64,
            g_dec * 1e9 / pts.len() as f64,
        );
    }
}
