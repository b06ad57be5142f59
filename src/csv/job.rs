//! The `csv.column_sum` job kind: params → [`SumOptions`], a dataset from the
//! [`DataDir`], the scan with the job's cancel flag and progress counter, and the result
//! as a JSON object `{"<header>": sum, ...}` in file (or requested) order.
//!
//! Params: `dataset` (plain file name in `--data-dir`), `every` (default 10, >= 1),
//! `offset` (default 0), `columns` (optional list of header names or 0-based indexes,
//! instead of the stride), `has_header` (default true; without a header keys are `col{i}`).

use std::sync::Arc;

use serde_json::{Map, Value};

use super::datasets::{DataDir, DatasetError};
use super::{sum_open_file, ColumnSel, ScanError, SumOptions, SumResult};
use crate::jobs::{JobContext, JobError, JobHandler, Registry};

/// The kind name on the wire.
pub const KIND: &str = "csv.column_sum";

/// Validated params of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct SumParams {
    pub dataset: String,
    pub options: SumOptions,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    #[error("params must be a JSON object")]
    NotAnObject,
    #[error("missing param `dataset` (a file name in the data directory)")]
    MissingDataset,
    #[error("`{0}` must be {1}")]
    Type(&'static str, &'static str),
    #[error("`columns` must not be empty")]
    NoColumns,
    #[error("`columns[{0}]` must be a header name (string) or a column index (integer >= 0)")]
    Column(usize),
    #[error("unknown param `{0}`; known: dataset, every, offset, columns, has_header")]
    Unknown(String),
}

fn uint(v: Option<&Value>, name: &'static str, default: u64, min: u64) -> Result<u64, ParamError> {
    let what = if min == 0 {
        "an integer >= 0"
    } else {
        "an integer >= 1"
    };
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= min && usize::try_from(*n).is_ok())
            .ok_or(ParamError::Type(name, what)),
    }
}

/// Parses and checks params (types and the name's syntax; not the file).
pub fn parse_params(params: &Value) -> Result<SumParams, ParamError> {
    let obj = params.as_object().ok_or(ParamError::NotAnObject)?;
    if let Some(k) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "dataset" | "every" | "offset" | "columns" | "has_header"
        )
    }) {
        return Err(ParamError::Unknown(k.clone()));
    }
    let dataset = match obj.get("dataset") {
        None | Some(Value::Null) => return Err(ParamError::MissingDataset),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ParamError::Type("dataset", "a string")),
    };
    let every = uint(obj.get("every"), "every", 10, 1)? as usize;
    let offset = uint(obj.get("offset"), "offset", 0, 0)? as usize;
    let has_header = match obj.get("has_header") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ParamError::Type("has_header", "true or false")),
    };
    let columns = match obj.get("columns") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) if list.is_empty() => return Err(ParamError::NoColumns),
        Some(Value::Array(list)) => Some(
            list.iter()
                .enumerate()
                .map(|(i, c)| match c {
                    Value::String(s) => Ok(ColumnSel::Name(s.clone())),
                    Value::Number(n) => n
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .map(ColumnSel::Index)
                        .ok_or(ParamError::Column(i)),
                    _ => Err(ParamError::Column(i)),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(ParamError::Type("columns", "a list")),
    };
    Ok(SumParams {
        dataset,
        options: SumOptions {
            every,
            offset,
            columns,
            has_header,
            ..SumOptions::default()
        },
    })
}

/// The result object: one key per summed column, in order. A header repeated among the
/// summed columns gets `#2`, `#3`... so no sum is lost; a non-finite sum is `null`.
pub fn result_json(r: &SumResult) -> Value {
    let mut map = Map::with_capacity(r.columns.len());
    for (name, sum) in &r.columns {
        let mut key = name.clone();
        let mut n = 1;
        while map.contains_key(&key) {
            n += 1;
            key = format!("{name}#{n}");
        }
        map.insert(
            key,
            serde_json::Number::from_f64(*sum).map_or(Value::Null, Value::Number),
        );
    }
    Value::Object(map)
}

/// A scan error as the job's message: names the dataset, and the record, column and
/// text for data errors. Never shows the server's paths.
pub fn describe(dataset: &str, e: &ScanError) -> String {
    match e {
        ScanError::Io { source, .. } => format!("dataset {dataset:?}: cannot read: {source}"),
        ScanError::Changed { .. } => format!("dataset {dataset:?} {e}; run the job again"),
        other => format!("dataset {dataset:?}: {other}"),
    }
}

/// Runs the scan on a dataset of `dir`, with the job's cancel flag and progress.
pub fn run_sum(dir: &DataDir, p: &SumParams, ctx: &JobContext) -> Result<Value, JobError> {
    ctx.checkpoint()?;
    let (file, path) = dir
        .open(&p.dataset)
        .map_err(|e| JobError::Failed(e.to_string()))?;
    let size = file
        .metadata()
        .map_err(|e| JobError::Failed(format!("dataset {:?}: {e}", p.dataset)))?
        .len();
    ctx.set_progress_total(size);
    match sum_open_file(
        &file,
        &path,
        &p.options,
        Some(ctx.progress_done()),
        Some(ctx.cancel_flag()),
    ) {
        Ok(r) => Ok(result_json(&r)),
        Err(ScanError::Cancelled) => Err(JobError::Cancelled),
        Err(e) => Err(JobError::Failed(describe(&p.dataset, &e))),
    }
}

/// The handler registered as [`KIND`].
pub struct ColumnSum {
    dir: DataDir,
}

impl ColumnSum {
    pub fn new(dir: DataDir) -> Self {
        ColumnSum { dir }
    }
}

impl JobHandler for ColumnSum {
    fn validate(&self, params: &Value) -> Result<(), String> {
        let p = parse_params(params).map_err(|e| e.to_string())?;
        self.dir.check_exists(&p.dataset).map_err(|e| match e {
            DatasetError::Io { .. } => format!("dataset {:?} cannot be read", p.dataset),
            other => other.to_string(),
        })
    }

    fn run(&self, params: &Value, ctx: &JobContext) -> Result<Value, JobError> {
        let p = parse_params(params).map_err(|e| JobError::Failed(e.to_string()))?;
        run_sum(&self.dir, &p, ctx)
    }
}

/// Registers `csv.column_sum` over `dir`.
pub fn register(registry: &mut Registry, dir: DataDir) {
    registry.register(KIND, Arc::new(ColumnSum::new(dir)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_default_and_name_their_problems() {
        let p = parse_params(&json!({"dataset": "a.csv"})).unwrap();
        assert_eq!((p.options.every, p.options.offset), (10, 0));
        assert!(p.options.has_header && p.options.columns.is_none());
        let p = parse_params(&json!({"dataset": "a.csv", "columns": ["x", 3]})).unwrap();
        assert_eq!(
            p.options.columns,
            Some(vec![ColumnSel::Name("x".into()), ColumnSel::Index(3)])
        );
        let bad = [
            (json!({}), "missing param `dataset`"),
            (json!({"dataset": 1}), "`dataset` must be a string"),
            (
                json!({"dataset": "a", "every": 0}),
                "`every` must be an integer >= 1",
            ),
            (json!({"dataset": "a", "every": "2"}), "`every`"),
            (
                json!({"dataset": "a", "offset": -1}),
                "`offset` must be an integer >= 0",
            ),
            (json!({"dataset": "a", "columns": []}), "must not be empty"),
            (json!({"dataset": "a", "columns": [1.5]}), "`columns[0]`"),
            (json!({"dataset": "a", "has_header": 1}), "`has_header`"),
            (json!({"dataset": "a", "evry": 2}), "unknown param `evry`"),
        ];
        for (v, want) in bad {
            let e = parse_params(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn repeated_headers_keep_every_sum_and_non_finite_is_null() {
        let r = SumResult {
            columns: vec![("a".into(), 1.0), ("a".into(), 2.0), ("b".into(), f64::NAN)],
            rows: 1,
            bytes: 1,
        };
        assert_eq!(result_json(&r), json!({"a": 1.0, "a#2": 2.0, "b": null}));
    }
}
