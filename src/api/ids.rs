//! Job ids on the wire: `job_id_N`, the format the compatible statistics API prescribes,
//! used on every route so that one id works on both APIs. The domain's [`JobId`] is a
//! number; only this module knows its text.

use std::fmt;

use crate::model::JobId;

/// A job id as clients see it (`job_id_N`), for `format!` and log fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire(pub JobId);

impl fmt::Display for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job_id_{}", self.0 .0)
    }
}

/// The id as text.
pub fn text(id: JobId) -> String {
    Wire(id).to_string()
}

/// Accepts exactly `job_id_N` with N a positive decimal without sign or leading zeros.
pub fn parse(s: &str) -> Option<JobId> {
    let digits = s.strip_prefix("job_id_")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok().map(JobId)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_round_trip_and_reject_lookalikes() {
        assert_eq!(parse("job_id_1"), Some(JobId(1)));
        assert_eq!(text(JobId(42)), "job_id_42");
        for bad in [
            "",
            "job_id_",
            "job_id_0",
            "job_id_01",
            "job_id_-1",
            "job_id_+1",
            "job_id_1a",
            "JOB_ID_1",
            "1",
            "job_id_99999999999999999999999",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
