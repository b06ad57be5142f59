//! `tally load --mode write`, the real binary, against an in-process server: every line
//! of every batch becomes a point, and `/getSum` adds them up.

use serde_json::Value;

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_load_in_write_mode_stores_every_line_and_get_sum_adds_them_up() {
    let app = TestApp::spawn().await;
    // 3 connections x 4 batches x 500 lines of the value 1.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["load", "--target", &app.addr, "--json", "--quiet"])
        .args([
            "--mode",
            "write",
            "--values",
            "constant",
            "--batch-lines",
            "500",
        ])
        .args(["--connection-count", "3", "--connection-value", "4"])
        .args(["--delay-range", "0"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["mode"], "write");
    assert_eq!(
        (summary["sent"].as_u64(), summary["acknowledged"].as_u64()),
        (Some(12), Some(12)),
        "{summary}"
    );
    assert_eq!(summary["lines_acknowledged"].as_u64(), Some(6000));
    assert!(summary["lines_per_s"].as_f64().unwrap() > 0.0);

    let (_, sum) = app.get("/getSum").await;
    assert_eq!(sum.as_f64(), Some(6000.0), "{sum}");
    // One series per connection, its timestamps 1 ms apart across batches.
    let (_, list) = app.get("/v1/series").await;
    let series = list["series"].as_array().unwrap();
    assert_eq!(series.len(), 3, "{list}");
    for s in series {
        assert_eq!(s["points"].as_u64(), Some(2000), "{list}");
        let span = s["last"].as_i64().unwrap() - s["first"].as_i64().unwrap();
        assert_eq!(span, 1999, "{list}");
    }
    app.stop().await;
}
