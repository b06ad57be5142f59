//! The statistics API's domain: the survey dataset, loaded once, and the nine
//! computations of `stats-api.md` over it.
//!
//! Loading folds every row into per-question accumulators (global, per state, per
//! state × category × segment), so each query afterwards is a few map lookups and a
//! sort, whatever the size of the CSV. Sums are compensated (Neumaier).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::{Map, Value};

use crate::jobs::{JobContext, JobError, JobHandler, Registry};
use crate::neumaier::Neumaier;

/// The bundled sample, so that a fresh clone answers without `--stats-dataset`.
pub const SAMPLE_CSV: &str = include_str!("../../data/sample_health.csv");

/// Questions where a lower mean is better (best5 ascending).
pub const LOWER_IS_BETTER: [&str; 5] = [
    "Percent of adults aged 18 years and older who have an overweight classification",
    "Percent of adults aged 18 years and older who have obesity",
    "Percent of adults who engage in no leisure-time physical activity",
    "Percent of adults who report consuming fruit less than one time daily",
    "Percent of adults who report consuming vegetables less than one time daily",
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("CSV error: {0}")]
    Csv(#[from] csv::Error),
    #[error("the CSV has no column named '{0}'")]
    MissingColumn(&'static str),
}

/// A compensated running sum and a count.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    sum: Neumaier,
    n: u64,
}

impl Acc {
    fn add(&mut self, x: f64) {
        self.sum.add(x);
        self.n += 1;
    }

    fn mean(&self) -> f64 {
        self.sum.value() / self.n as f64
    }
}

#[derive(Debug, Default)]
struct QuestionData {
    global: Acc,
    states: HashMap<String, Acc>,
    /// state → (category, segment) → values; only rows with both present.
    by_category: HashMap<String, BTreeMap<(String, String), Acc>>,
}

/// What the dataset held when it was loaded, for the start-up log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadSummary {
    pub rows: u64,
    pub used: u64,
    pub empty_values: u64,
    pub bad_values: u64,
    pub short_rows: u64,
}

pub struct Dataset {
    questions: HashMap<String, QuestionData>,
    pub summary: LoadSummary,
}

/// One of the nine computations, named by its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Query {
    StatesMean,
    StateMean,
    Best5,
    Worst5,
    GlobalMean,
    DiffFromMean,
    StateDiffFromMean,
    MeanByCategory,
    StateMeanByCategory,
}

impl Query {
    pub const ALL: [Query; 9] = [
        Query::StatesMean,
        Query::StateMean,
        Query::Best5,
        Query::Worst5,
        Query::GlobalMean,
        Query::DiffFromMean,
        Query::StateDiffFromMean,
        Query::MeanByCategory,
        Query::StateMeanByCategory,
    ];

    /// The computation's name, the job kind's suffix (`stats.<name>`). (The compatible
    /// API's routes happen to use the same words; `api::compat` owns those.)
    pub fn name(self) -> &'static str {
        match self {
            Query::StatesMean => "states_mean",
            Query::StateMean => "state_mean",
            Query::Best5 => "best5",
            Query::Worst5 => "worst5",
            Query::GlobalMean => "global_mean",
            Query::DiffFromMean => "diff_from_mean",
            Query::StateDiffFromMean => "state_diff_from_mean",
            Query::MeanByCategory => "mean_by_category",
            Query::StateMeanByCategory => "state_mean_by_category",
        }
    }

    pub fn kind(self) -> String {
        format!("stats.{}", self.name())
    }

    pub fn needs_state(self) -> bool {
        match self {
            Query::StateMean | Query::StateDiffFromMean | Query::StateMeanByCategory => true,
            Query::StatesMean
            | Query::Best5
            | Query::Worst5
            | Query::GlobalMean
            | Query::DiffFromMean
            | Query::MeanByCategory => false,
        }
    }
}

fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

impl Dataset {
    pub fn load_path(path: &Path) -> Result<Dataset, LoadError> {
        let file = std::fs::File::open(path).map_err(|source| LoadError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Dataset::load(std::io::BufReader::with_capacity(1 << 20, file))
    }

    pub fn sample() -> Result<Dataset, LoadError> {
        Dataset::load(SAMPLE_CSV.as_bytes())
    }

    /// Reads the survey CSV: RFC 4180, header row, BOM tolerated, rows with an empty or
    /// non-numeric `Data_Value` skipped (and counted), a final newline optional.
    pub fn load(reader: impl Read) -> Result<Dataset, LoadError> {
        let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
        let headers = rdr.headers()?.clone();
        let col = |name: &'static str| {
            headers
                .iter()
                .position(|h| h.trim_start_matches('\u{feff}') == name)
                .ok_or(LoadError::MissingColumn(name))
        };
        let (c_state, c_question, c_value, c_cat, c_seg) = (
            col("LocationDesc")?,
            col("Question")?,
            col("Data_Value")?,
            col("StratificationCategory1")?,
            col("Stratification1")?,
        );
        let mut questions: HashMap<String, QuestionData> = HashMap::new();
        let mut summary = LoadSummary::default();
        let mut record = csv::StringRecord::new();
        while rdr.read_record(&mut record)? {
            summary.rows += 1;
            let (Some(state), Some(question), Some(value)) = (
                record.get(c_state),
                record.get(c_question),
                record.get(c_value),
            ) else {
                summary.short_rows += 1;
                continue;
            };
            let value = value.trim();
            if value.is_empty() {
                summary.empty_values += 1;
                continue;
            }
            let Ok(x) = value.parse::<f64>() else {
                summary.bad_values += 1;
                continue;
            };
            if !x.is_finite() {
                summary.bad_values += 1;
                continue;
            }
            summary.used += 1;
            let q = questions.entry(question.to_string()).or_default();
            q.global.add(x);
            q.states.entry(state.to_string()).or_default().add(x);
            let cat = record.get(c_cat).unwrap_or("");
            let seg = record.get(c_seg).unwrap_or("");
            if !cat.is_empty() && !seg.is_empty() {
                q.by_category
                    .entry(state.to_string())
                    .or_default()
                    .entry((cat.to_string(), seg.to_string()))
                    .or_default()
                    .add(x);
            }
        }
        Ok(Dataset { questions, summary })
    }

    pub fn question_count(&self) -> usize {
        self.questions.len()
    }

    /// Runs one computation. Errors are the `reason` of the compatible API's error result.
    /// `group_key` writes the key of a (state,) category, segment group: the wire's
    /// business (the compatible API wants Python tuples), not the computation's.
    pub fn compute(
        &self,
        query: Query,
        question: &str,
        state: Option<&str>,
        group_key: &GroupKey,
    ) -> Result<Value, String> {
        let q = self
            .questions
            .get(question)
            .ok_or_else(|| format!("unknown question: {question:?}"))?;
        let state_acc = |s: &str| {
            q.states
                .get(s)
                .ok_or_else(|| format!("no data for state {s:?} and this question"))
        };
        let need_state = || state.ok_or_else(|| "missing field 'state'".to_string());
        let global = q.global.mean();
        let mut out = Map::new();
        match query {
            Query::StatesMean => {
                for (s, m) in sorted_means(q) {
                    out.insert(s.to_string(), num(m));
                }
            }
            Query::StateMean => {
                let s = need_state()?;
                out.insert(s.to_string(), num(state_acc(s)?.mean()));
            }
            Query::Best5 | Query::Worst5 => {
                let mut means = sorted_means(q);
                let lower_better = LOWER_IS_BETTER.contains(&question);
                // Ascending order lists the best first when lower is better.
                let best_first = lower_better;
                let want_best = query == Query::Best5;
                if want_best != best_first {
                    // Descending by mean; keep name order among equal means, as ascending order does.
                    means.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
                }
                for (s, m) in means.into_iter().take(5) {
                    out.insert(s.to_string(), num(m));
                }
            }
            Query::GlobalMean => {
                out.insert("global_mean".into(), num(global));
            }
            Query::DiffFromMean => {
                for (s, m) in sorted_means(q) {
                    out.insert(s.to_string(), num(global - m));
                }
            }
            Query::StateDiffFromMean => {
                let s = need_state()?;
                out.insert(s.to_string(), num(global - state_acc(s)?.mean()));
            }
            Query::MeanByCategory => {
                let mut states: Vec<&String> = q.by_category.keys().collect();
                states.sort();
                for s in states {
                    for ((cat, seg), acc) in &q.by_category[s] {
                        out.insert(group_key(&[s, cat, seg]), num(acc.mean()));
                    }
                }
            }
            Query::StateMeanByCategory => {
                let s = need_state()?;
                state_acc(s)?;
                let mut inner = Map::new();
                if let Some(cats) = q.by_category.get(s) {
                    for ((cat, seg), acc) in cats {
                        inner.insert(group_key(&[cat, seg]), num(acc.mean()));
                    }
                }
                out.insert(s.to_string(), Value::Object(inner));
            }
        }
        Ok(Value::Object(out))
    }
}

/// (state, mean) ascending by mean, ties by name.
fn sorted_means(q: &QuestionData) -> Vec<(&str, f64)> {
    let mut v: Vec<(&str, f64)> = q
        .states
        .iter()
        .map(|(s, a)| (s.as_str(), a.mean()))
        .collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)));
    v
}

/// (question, state) of a computation.
type MemoKey = (String, Option<String>);

/// The `stats.<route>` job kind: params `{"question": .., "state": ..}`.
/// Writes the key of a group of rows (its state, category and segment names).
pub type GroupKey = dyn Fn(&[&str]) -> String + Send + Sync;

struct StatsJob {
    dataset: Arc<Dataset>,
    query: Query,
    group_key: Arc<GroupKey>,
    /// Serialized results by (question, state). The dataset never changes after
    /// loading, so an answer computed once is the answer forever. Only successful
    /// answers are kept, so the cache is bounded by the dataset (questions × states),
    /// never by traffic.
    memo: RwLock<HashMap<MemoKey, Arc<str>>>,
}

fn params_of(query: Query, params: &Value) -> Result<(String, Option<String>), String> {
    let field = |name: &str| -> Result<Option<String>, String> {
        match params.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("field '{name}' must be a string, not {other}")),
        }
    };
    if !params.is_object() {
        return Err("the request body must be a JSON object".into());
    }
    let question = field("question")?.ok_or("missing field 'question'")?;
    let state = field("state")?;
    if query.needs_state() && state.is_none() {
        return Err("missing field 'state'".into());
    }
    Ok((question, state))
}

impl JobHandler for StatsJob {
    fn validate(&self, params: &Value) -> Result<(), String> {
        params_of(self.query, params).map(|_| ())
    }

    fn run(&self, params: &Value, ctx: &JobContext) -> Result<Value, JobError> {
        ctx.checkpoint()?;
        let (question, state) = params_of(self.query, params).map_err(JobError::Failed)?;
        self.dataset
            .compute(self.query, &question, state.as_deref(), &*self.group_key)
            .map_err(JobError::Failed)
    }

    fn run_json(&self, params: &Value, ctx: &JobContext) -> Result<String, JobError> {
        ctx.checkpoint()?;
        let (question, state) = params_of(self.query, params).map_err(JobError::Failed)?;
        let key = (question, state.filter(|_| self.query.needs_state()));
        if let Some(hit) = self.memo.read().get(&key) {
            return Ok(hit.to_string());
        }
        let text = self
            .dataset
            .compute(self.query, &key.0, key.1.as_deref(), &*self.group_key)
            .map_err(JobError::Failed)?
            .to_string();
        self.memo.write().insert(key, Arc::from(text.as_str()));
        Ok(text)
    }
}

/// Registers the nine `stats.<name>` kinds; `group_key` writes the keys of the
/// by-category answers.
pub fn register(reg: &mut Registry, dataset: Arc<Dataset>, group_key: Arc<GroupKey>) {
    for query in Query::ALL {
        reg.register(
            query.kind(),
            Arc::new(StatsJob {
                dataset: dataset.clone(),
                query,
                group_key: group_key.clone(),
                memo: RwLock::new(HashMap::new()),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "LocationDesc,Question,Data_Value,StratificationCategory1,Stratification1";

    fn check(csv: &str, query: Query, question: &str, state: Option<&str>, expect: &str) {
        let d = Dataset::load(csv.as_bytes()).unwrap();
        // Python's str() of a tuple of plain strings (the compatible API injects the full
        // one, with Python's quoting rules, at start).
        let tuple = |parts: &[&str]| {
            let quoted: Vec<String> = parts.iter().map(|p| format!("'{p}'")).collect();
            format!("({})", quoted.join(", "))
        };
        let got = match d.compute(query, question, state, &tuple) {
            Ok(v) => v.to_string(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "{query:?} {question} {state:?}");
    }

    #[test]
    fn computations_on_a_hand_made_table() {
        let csv = format!(
            "{HEADER}\nA,Q,1,Income,low\nA,Q,3,Income,high\nB,Q,10,,\nB,Q,,Income,low\nC,Q,4,Age,\"18, 24\"\nA,R,7,Income,low"
        );
        let c = csv.as_str();
        // Means: A = 2, B = 10, C = 4; global = (1+3+10+4)/4 = 4.5.
        check(
            c,
            Query::StatesMean,
            "Q",
            None,
            r#"{"A":2.0,"C":4.0,"B":10.0}"#,
        );
        check(c, Query::GlobalMean, "Q", None, r#"{"global_mean":4.5}"#);
        check(
            c,
            Query::DiffFromMean,
            "Q",
            None,
            r#"{"A":2.5,"C":0.5,"B":-5.5}"#,
        );
        check(c, Query::StateDiffFromMean, "Q", Some("B"), r#"{"B":-5.5}"#);
        check(c, Query::StateMean, "Q", Some("C"), r#"{"C":4.0}"#);
        // "Q" is not in the lower-is-better list: best = highest first.
        check(c, Query::Best5, "Q", None, r#"{"B":10.0,"C":4.0,"A":2.0}"#);
        check(c, Query::Worst5, "Q", None, r#"{"A":2.0,"C":4.0,"B":10.0}"#);
        check(
            c,
            Query::MeanByCategory,
            "Q",
            None,
            r#"{"('A', 'Income', 'high')":3.0,"('A', 'Income', 'low')":1.0,"('C', 'Age', '18, 24')":4.0}"#,
        );
        check(c, Query::StateMeanByCategory, "Q", Some("B"), r#"{"B":{}}"#);
        check(
            c,
            Query::StateMean,
            "Q",
            Some("Z"),
            r#"error: no data for state "Z" and this question"#,
        );
        check(
            c,
            Query::StateMean,
            "nope",
            Some("A"),
            r#"error: unknown question: "nope""#,
        );
        check(
            c,
            Query::StateMean,
            "Q",
            None,
            "error: missing field 'state'",
        );
    }

    #[test]
    fn lower_is_better_questions_rank_ascending() {
        let q = LOWER_IS_BETTER[1];
        let csv = format!("{HEADER}\nA,{q},5,,\nB,{q},1,,\nC,{q},3,,\n");
        check(&csv, Query::Best5, q, None, r#"{"B":1.0,"C":3.0,"A":5.0}"#);
        check(&csv, Query::Worst5, q, None, r#"{"A":5.0,"C":3.0,"B":1.0}"#);
    }

    #[test]
    fn the_bundled_sample_loads() {
        let d = Dataset::sample().unwrap();
        assert_eq!(d.summary.rows, 2000);
        assert_eq!(d.question_count(), 9);
    }

    #[test]
    fn a_missing_column_is_named() {
        let err = Dataset::load("LocationDesc,Question\nA,Q\n".as_bytes())
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "the CSV has no column named 'Data_Value'");
    }
}
