//! The pipeline's records: an event as accepted (one line of the accepted log), the
//! processing step, and a processed record (one line of the journal).

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

/// An event as a client sent it, already validated by the HTTP edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The client's connection number.
    pub conn: u64,
    /// The record's number within its connection.
    pub conn_seq: u64,
    /// A JSON number or string.
    pub value: Value,
    /// When the client sent it (ms or s since the epoch, as the client gave it).
    pub sent_at: Number,
}

/// One line of the accepted log: an event and the global sequence number it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcceptedRecord {
    pub seq: u64,
    pub conn: u64,
    pub conn_seq: u64,
    pub value: Value,
    pub sent_at: Number,
    /// ms since the epoch.
    pub accepted_at: i64,
}

/// What processing made of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The value, as a number.
    Ok(Number),
    /// Why the value could not be processed.
    Failed(String),
}

impl Outcome {
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Ok(_) => "ok",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// The processing step: a number is taken as it is, a string must parse as a finite
/// number, anything else fails with a reason.
pub fn process(value: &Value) -> Outcome {
    match value {
        Value::Number(n) => Outcome::Ok(n.clone()),
        Value::String(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                return Outcome::Ok(Number::from(i));
            }
            match t.parse::<f64>().ok().and_then(Number::from_f64) {
                Some(n) => Outcome::Ok(n),
                None => Outcome::Failed(format!("value {s:?} is not a number")),
            }
        }
        other => Outcome::Failed(format!("value {other} is neither a number nor a string")),
    }
}

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
pub struct JournalRecord {
    pub seq: u64,
    pub conn: u64,
    pub conn_seq: u64,
    /// The value as the client sent it.
    pub value: Value,
    pub sent_at: Number,
    pub accepted_at: i64,
    pub processed_at: i64,
    /// `ok` or `failed`.
    pub status: String,
    /// The processed value (`null` when processing failed).
    pub result: Option<Number>,
    /// Why processing failed (`null` when it did not).
    pub error: Option<String>,
}

impl JournalRecord {
    pub fn new(rec: AcceptedRecord, outcome: Outcome, processed_at: i64) -> Self {
        let status = outcome.status().to_string();
        let (result, error) = match outcome {
            Outcome::Ok(n) => (Some(n), None),
            Outcome::Failed(e) => (None, Some(e)),
        };
        JournalRecord {
            seq: rec.seq,
            conn: rec.conn,
            conn_seq: rec.conn_seq,
            value: rec.value,
            sent_at: rec.sent_at,
            accepted_at: rec.accepted_at,
            processed_at,
            status,
            result,
            error,
        }
    }
}

/// Only the sequence number of a journal line (what recovery needs).
#[derive(Debug, Deserialize)]
pub(crate) struct SeqOnly {
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_numeric_strings_process_and_the_rest_fail_with_a_reason() {
        assert_eq!(process(&json!(7)), Outcome::Ok(Number::from(7)));
        assert_eq!(process(&json!(" 12 ")), Outcome::Ok(Number::from(12)));
        assert_eq!(process(&json!("2.5")).status(), "ok");
        for bad in [
            json!("abc"),
            json!("NaN"),
            json!("inf"),
            json!(""),
            json!(null),
        ] {
            match process(&bad) {
                Outcome::Failed(reason) => assert!(
                    reason.contains("not") || reason.contains("neither"),
                    "{reason}"
                ),
                ok => panic!("{bad} processed as {ok:?}"),
            }
        }
    }
}
