//! `tally sum FILE --every N [--offset K] [--threads T]`: the scan engine from the command
//! line. Prints exactly the JSON a `csv.column_sum` job returns; shows a progress bar on
//! stderr when stderr is a terminal.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::config::SumArgs;
use crate::csv::job::result_json;
use crate::csv::{sum_open_file, ScanError, SumOptions};

pub fn run(args: &SumArgs) -> anyhow::Result<()> {
    let shown = args.file.display().to_string();
    let file = File::open(&args.file).with_context(|| format!("cannot open {shown}"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {shown}"))?;
    anyhow::ensure!(meta.is_file(), "{shown} is not a regular file");
    let opts = SumOptions {
        every: usize::try_from(args.every).context("--every is too large")?,
        offset: usize::try_from(args.offset).context("--offset is too large")?,
        has_header: !args.no_header,
        threads: args.threads.map_or(0, |t| t as usize),
        ..SumOptions::default()
    };
    let done = AtomicU64::new(0);
    let finished = AtomicBool::new(false);
    let show_bar = !args.quiet && std::io::stderr().is_terminal();
    let outcome = std::thread::scope(|s| {
        if show_bar {
            s.spawn(|| progress_bar(meta.len(), &done, &finished));
        }
        let r = sum_open_file(&file, &args.file, &opts, Some(&done), None);
        finished.store(true, Ordering::Relaxed);
        r
    });
    let result = outcome.map_err(|e| match e {
        ScanError::Io { source, .. } => anyhow::anyhow!("cannot read {shown}: {source}"),
        ScanError::Changed { .. } => anyhow::anyhow!("{shown} {e}; run it again"),
        other => anyhow::anyhow!("{shown}: {other}"),
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", result_json(&result)).context("writing to stdout")?;
    Ok(())
}

fn progress_bar(total: u64, done: &AtomicU64, finished: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    while !finished.load(Ordering::Relaxed) {
        bar.set_position(done.load(Ordering::Relaxed).min(total));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}
