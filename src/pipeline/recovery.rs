//! Start-up recovery: cut a torn last line off the journal, replay every record of the
//! accepted log that the journal does not have yet (in sequence order, so nothing is
//! written twice), then empty the accepted log, all before the first event is taken.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::journal::{encode, Processed};
use super::log::{lock_exclusive, scan, sync_dir, ScanError, Scanned, Sink};
use super::record::{process, AcceptedRecord, SeqOnly};
use super::PipelineError;

/// The logs, ready for their writers.
pub(crate) struct Recovered {
    pub journal: Sink,
    pub accepted: Sink,
    /// The next sequence number to hand out (and to write).
    pub next_seq: u64,
    /// Records of the accepted log journaled by this recovery.
    pub replayed: u64,
    /// Whether a torn line was cut off the journal.
    pub cut_torn_line: bool,
    /// Complete lines the journal had before the replay.
    pub journal_lines: u64,
}

/// `<journal>.accepted`
pub fn accepted_path(journal: &Path) -> PathBuf {
    let mut s = journal.as_os_str().to_owned();
    s.push(".accepted");
    PathBuf::from(s)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PipelineError + '_ {
    move |source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn scan_err(path: &Path, e: ScanError) -> PipelineError {
    match e {
        ScanError::Io(source) => PipelineError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => PipelineError::Corrupt {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

fn open_locked(path: &Path) -> Result<File, PipelineError> {
    let file = Sink::open(path).map_err(io(path))?;
    if !lock_exclusive(&file).map_err(io(path))? {
        return Err(PipelineError::Locked(path.to_path_buf()));
    }
    Ok(file)
}

pub(crate) fn recover(journal_path: &Path) -> Result<Recovered, PipelineError> {
    let apath = accepted_path(journal_path);
    let absent = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    if absent(journal_path) && absent(&apath) {
        // A first start: nothing to recover, and nothing is created until the first event.
        return Ok(Recovered {
            journal: Sink::Pending {
                path: journal_path.to_path_buf(),
            },
            accepted: Sink::Pending { path: apath },
            next_seq: 1,
            replayed: 0,
            cut_torn_line: false,
            journal_lines: 0,
        });
    }
    if let Some(dir) = journal_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut journal = open_locked(journal_path)?;
    let mut last = 0u64;
    let scanned: Scanned = scan::<SeqOnly>(&mut journal, |r| {
        if r.seq <= last {
            return Err(format!(
                "sequence numbers must increase, but {} follows {last}",
                r.seq
            ));
        }
        last = r.seq;
        Ok(())
    })
    .map_err(|e| scan_err(journal_path, e))?;
    if scanned.torn {
        tracing::warn!(
            journal = %journal_path.display(),
            keep_bytes = scanned.good_len,
            "the journal ends in a torn line (a crash during a write); cutting it off"
        );
        journal
            .set_len(scanned.good_len)
            .map_err(io(journal_path))?;
        journal.sync_data().map_err(io(journal_path))?;
    }
    let mut journal = Sink::file(journal, scanned.good_len);

    let mut accepted = open_locked(&apath)?;
    let mut replay: Vec<AcceptedRecord> = Vec::new();
    let mut max_accepted = 0u64;
    // A torn tail of the accepted log is a batch that was never acknowledged: dropped.
    scan::<AcceptedRecord>(&mut accepted, |r| {
        max_accepted = max_accepted.max(r.seq);
        if r.seq > last {
            replay.push(r);
        }
        Ok(())
    })
    .map_err(|e| scan_err(&apath, e))?;
    replay.sort_by_key(|r| r.seq);
    replay.dedup_by_key(|r| r.seq);

    let replayed = replay.len() as u64;
    if !replay.is_empty() {
        let mut buf = Vec::with_capacity(replay.len() * 200);
        for rec in replay {
            let outcome = process(&rec.value);
            encode(
                Processed {
                    rec,
                    outcome,
                    processed_at: crate::now_ms(),
                    permit: None,
                },
                &mut buf,
            );
        }
        journal
            .append(&buf)
            .and_then(|()| journal.sync())
            .map_err(io(journal_path))?;
    }
    // Everything the accepted log holds is in the journal now.
    accepted.set_len(0).map_err(io(&apath))?;
    accepted.sync_data().map_err(io(&apath))?;
    sync_dir(journal_path).map_err(io(journal_path))?;

    Ok(Recovered {
        journal,
        accepted: Sink::file(accepted, 0),
        next_seq: last.max(max_accepted) + 1,
        replayed,
        cut_torn_line: scanned.torn,
        journal_lines: scanned.lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn accepted_line(seq: u64, value: Value) -> String {
        format!(
            "{}\n",
            json!({"seq": seq, "conn": 1, "conn_seq": seq, "value": value, "sent_at": 1, "accepted_at": 2})
        )
    }

    #[test]
    fn recovery_cuts_a_torn_line_and_replays_only_what_the_journal_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("j.jsonl");
        std::fs::write(
            &j,
            "{\"seq\":1,\"status\":\"ok\"}\n{\"seq\":2,\"status\":\"ok\"}\n{\"seq\":3,\"sta",
        )
        .unwrap();
        let a: String = (1..=5)
            .map(|s| accepted_line(s, json!(s)))
            .collect::<String>()
            + "{\"seq\":6,\"conn";
        std::fs::write(accepted_path(&j), a).unwrap();

        let r = recover(&j).unwrap();
        assert!(r.cut_torn_line);
        assert_eq!((r.replayed, r.next_seq, r.journal_lines), (3, 6, 2));
        drop(r);
        let got: Vec<u64> = lines(&j)
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        assert_eq!(std::fs::metadata(accepted_path(&j)).unwrap().len(), 0);

        // A second start finds nothing to do and numbers on from 6.
        let r = recover(&j).unwrap();
        assert_eq!((r.replayed, r.next_seq, r.cut_torn_line), (0, 6, false));
    }

    #[test]
    fn a_journal_whose_numbers_go_backwards_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("j.jsonl");
        std::fs::write(&j, "{\"seq\":2}\n{\"seq\":1}\n").unwrap();
        let e = recover(&j).err().unwrap();
        assert!(e.to_string().contains("must increase"), "{e}");
    }

    #[test]
    fn a_second_process_cannot_open_the_same_journal() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("j.jsonl");
        std::fs::write(&j, "").unwrap();
        let _first = recover(&j).unwrap();
        assert!(matches!(recover(&j), Err(PipelineError::Locked(_))));
    }
}
