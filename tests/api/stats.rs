//! The statistics API against numbers computed independently: by pandas
//! (`tests/fixtures/stats_oracle.py` → `health_expected.json`) and by hand
//! (`tests/fixtures/tiny.csv`, worked out in `tiny_expected.md`).

use serde_json::{json, Value};

use crate::helpers::{fixture, TestApp};
use crate::support::http::assert_close;

#[tokio::test]
async fn every_route_matches_pandas_on_health_csv() {
    let app = TestApp::spawn().await;
    check_every_route_against_pandas(&app).await;
    app.stop().await;
}

/// Every route on every question (and every state) of health.csv, submitted at once.
pub async fn check_every_route_against_pandas(app: &TestApp) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("health_expected.json")).unwrap())
            .unwrap();
    let questions = expected["questions"].as_array().unwrap();
    assert_eq!(questions.len(), 9);
    // Submit everything first, as concurrent clients would, then collect.
    let mut pending = Vec::new();
    for q in questions {
        let question = q["question"].as_str().unwrap();
        for route in [
            "states_mean",
            "best5",
            "worst5",
            "global_mean",
            "diff_from_mean",
            "mean_by_category",
        ] {
            let id = app
                .compat_submit(route, &json!({ "question": question }))
                .await;
            let ordered = matches!(route, "states_mean" | "best5" | "worst5");
            pending.push((
                id,
                q[route].clone(),
                ordered,
                format!("{route}({question})"),
            ));
        }
        for per in q["per_state"].as_array().unwrap() {
            let state = per["state"].as_str().unwrap();
            for route in [
                "state_mean",
                "state_diff_from_mean",
                "state_mean_by_category",
            ] {
                let id = app
                    .compat_submit(route, &json!({ "question": question, "state": state }))
                    .await;
                pending.push((
                    id,
                    per[route].clone(),
                    false,
                    format!("{route}({question}, {state})"),
                ));
            }
        }
    }
    assert_eq!(pending.len(), 9 * (6 + 4 * 3));
    for (id, want, ordered, ctx) in pending {
        let res = app.compat_result(&id).await;
        assert_eq!(res["status"], "done", "{ctx}: {res}");
        assert_close(&res["data"], &want, ordered, &ctx);
    }
}

const Q1: &str = "Percent of adults aged 18 years and older who have obesity";
const Q2: &str =
    "Percent of adults who engage in muscle-strengthening activities on 2 or more days a week";

#[tokio::test]
async fn hand_computed_answers_on_the_tiny_table() {
    let app = TestApp::spawn_with(|c| c.stats_dataset = Some(fixture("tiny.csv"))).await;
    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "states_mean",
            json!({"question": Q1}),
            json!({"Ohio": 30, "Alabama": 33, "Guam": 39.5}),
        ),
        (
            "global_mean",
            json!({"question": Q1}),
            json!({"global_mean": 34}),
        ),
        (
            "best5",
            json!({"question": Q1}),
            json!({"Ohio": 30, "Alabama": 33, "Guam": 39.5}),
        ),
        (
            "worst5",
            json!({"question": Q1}),
            json!({"Guam": 39.5, "Alabama": 33, "Ohio": 30}),
        ),
        (
            "diff_from_mean",
            json!({"question": Q1}),
            json!({"Ohio": 4, "Alabama": 1, "Guam": -5.5}),
        ),
        (
            "state_mean",
            json!({"question": Q1, "state": "Ohio"}),
            json!({"Ohio": 30}),
        ),
        (
            "state_diff_from_mean",
            json!({"question": Q1, "state": "Ohio"}),
            json!({"Ohio": 4}),
        ),
        (
            "mean_by_category",
            json!({"question": Q1}),
            json!({
                "('Alabama', 'Income', '$15,000 - $24,999')": 34.5,
                "('Alabama', 'Total', 'Total')": 30,
                "('Guam', 'Education', \"Don't know\")": 40,
                "('Guam', 'Total', 'Total')": 39,
                "('Ohio', 'Gender', 'Female')": 32,
                "('Ohio', 'Gender', 'Male')": 28,
            }),
        ),
        (
            "state_mean_by_category",
            json!({"question": Q1, "state": "Guam"}),
            json!({"Guam": {"('Education', \"Don't know\")": 40, "('Total', 'Total')": 39}}),
        ),
        // Q2 is higher-is-better: Alabama 22, Ohio (25+27+26)/3 = 26, Guam (30+32)/2 = 31.
        (
            "best5",
            json!({"question": Q2}),
            json!({"Guam": 31, "Ohio": 26, "Alabama": 22}),
        ),
        (
            "worst5",
            json!({"question": Q2}),
            json!({"Alabama": 22, "Ohio": 26, "Guam": 31}),
        ),
        // Ohio's row without category/segment counts for the mean but not by category.
        (
            "state_mean_by_category",
            json!({"question": Q2, "state": "Ohio"}),
            json!({"Ohio": {"('Age (years)', '18 - 24')": 27, "('Income', '$15,000 - $24,999')": 25}}),
        ),
    ];
    for (route, body, want) in cases {
        let id = app.compat_submit(route, &body).await;
        let res = app.compat_result(&id).await;
        assert_eq!(res["status"], "done", "{route}: {res}");
        let ordered = matches!(route, "states_mean" | "best5" | "worst5");
        assert_close(&res["data"], &want, ordered, route);
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_parameters_still_get_an_id_and_an_error_result() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            "states_mean",
            json!({"question": "What is the airspeed of a swallow?"}),
            "unknown question",
        ),
        ("states_mean", json!({}), "missing field 'question'"),
        (
            "state_mean",
            json!({"question": Q1}),
            "missing field 'state'",
        ),
        (
            "state_mean",
            json!({"question": Q1, "state": "Atlantis"}),
            "no data for state \"Atlantis\"",
        ),
        (
            "global_mean",
            json!({"question": 42}),
            "field 'question' must be a string",
        ),
    ];
    for (route, body, reason) in cases {
        let id = app.compat_submit(route, &body).await;
        let res = app.compat_result(&id).await;
        assert_eq!(res["status"], "error", "{route} {body}: {res}");
        let got = res["reason"].as_str().unwrap();
        assert!(got.contains(reason), "{route} {body}: {got}");
    }
    app.stop().await;
}

#[tokio::test]
async fn polling_right_after_submit_never_answers_invalid_job_id() {
    let app = TestApp::spawn().await;
    for _ in 0..300 {
        let id = app
            .compat_submit("global_mean", &json!({ "question": Q1 }))
            .await;
        let (_, res) = app.get(&format!("/api/get_results/{id}")).await;
        assert_ne!(res["reason"], "Invalid job_id", "{id}");
        assert!(
            res["status"] == "running" || res["status"] == "done",
            "{res}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn statistics_kinds_run_through_the_native_api_with_the_same_numbers() {
    let app = TestApp::spawn_with(|c| c.stats_dataset = Some(fixture("tiny.csv"))).await;
    let id = app
        .submit("stats.states_mean", json!({ "question": Q1 }))
        .await;
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_close(
        &job["result"],
        &json!({"Ohio": 30, "Alabama": 33, "Guam": 39.5}),
        true,
        "native",
    );
    // The same id answers on the compatible route too.
    let res = app.compat_result(&id).await;
    assert_close(
        &res["data"],
        &job["result"],
        true,
        "compat view of a native job",
    );
    app.stop().await;
}

#[tokio::test]
async fn the_bundled_sample_answers_without_a_dataset_flag() {
    let app = TestApp::spawn_with(|c| c.stats_dataset = None).await;
    let id = app
        .compat_submit("global_mean", &json!({ "question": Q1 }))
        .await;
    let res = app.compat_result(&id).await;
    assert_eq!(res["status"], "done", "{res}");
    // 229 valued rows for Q1 in data/sample_health.csv; mean computed with Python's csv
    // module: sum(float(Data_Value)) / 229.
    assert_close(
        &res["data"],
        &json!({"global_mean": 30.075545851528386}),
        false,
        "sample",
    );
    app.stop().await;
}
