//! The `process_*` metrics every Prometheus client library exports, read from
//! `/proc/self` at each scrape (Linux; elsewhere they are left out), and
//! `tally_build_info`.
//!
//! Names and meanings are those of the client libraries' "process metrics": CPU seconds
//! (user + system), resident and virtual memory in bytes (`VmRSS`, `VmSize` of
//! `/proc/self/status`, given in kB, so no page size is assumed), open and maximal file
//! descriptors (the soft `RLIMIT_NOFILE`), start time in seconds since the epoch
//! (`starttime` of `/proc/self/stat` in clock ticks after `btime` of `/proc/stat`), and
//! OS threads.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};

/// The process as `/proc` shows it at one moment; `None` where a file could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<i64>,
    pub virtual_bytes: Option<i64>,
    pub open_fds: Option<i64>,
    pub max_fds: Option<i64>,
    pub start_time_seconds: Option<f64>,
    pub threads: Option<i64>,
}

impl ProcessSample {
    /// Reads `/proc/self` (and `/proc/stat`'s boot time).
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let stat = read("/proc/self/stat");
        let stat = stat.as_deref().and_then(StatFields::parse);
        let status = read("/proc/self/status").unwrap_or_default();
        let ticks = clock_ticks();
        let btime = read("/proc/stat").as_deref().and_then(boot_time);
        ProcessSample {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / ticks),
            resident_bytes: status_kb(&status, "VmRSS").map(|kb| kb * 1024),
            virtual_bytes: status_kb(&status, "VmSize").map(|kb| kb * 1024),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as i64),
            max_fds: read("/proc/self/limits")
                .as_deref()
                .and_then(max_open_files),
            start_time_seconds: stat
                .zip(btime)
                .map(|(s, boot)| boot as f64 + s.starttime as f64 / ticks),
            threads: status_kb(&status, "Threads").or(stat.map(|s| s.threads)),
        }
    }
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StatFields {
    utime: u64,
    stime: u64,
    threads: i64,
    starttime: u64,
}

impl StatFields {
    /// `pid (comm) state ppid ...`: the command may hold spaces and parentheses, so the
    /// fields are counted from the last `)`; field 3 (`state`) is then the first.
    fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // proc(5) numbers fields from 1; `state` is field 3, at index 0 here.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        Some(StatFields {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)? as i64,
            starttime: field(22)?,
        })
    }
}

/// A `Name:  value [kB]` line of `/proc/self/status` (the number only).
fn status_kb(status: &str, name: &str) -> Option<i64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits` (`None` when unlimited).
fn max_open_files(limits: &str) -> Option<i64> {
    limits.lines().find_map(|l| {
        let v = l.strip_prefix("Max open files")?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Clock ticks per second of `/proc`'s times (USER_HZ, 100 on Linux).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Registered on the unprefixed registry: reads `/proc` at each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessSample::read();
        if let Some(v) = s.cpu_seconds {
            // A counter: the encoder adds `_total`.
            let c = ConstCounter::new(v);
            let help = "Total user and system CPU time spent in seconds.";
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                help,
                None,
                c.metric_type(),
            )?)?;
        }
        let mut gauge = |name: &str, help: &str, v: Option<i64>| {
            if let Some(v) = v {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            s.resident_bytes,
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            s.virtual_bytes,
        )?;
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            s.open_fds,
        )?;
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            s.max_fds,
        )?;
        gauge(
            "process_threads",
            "Number of OS threads in the process.",
            s.threads,
        )?;
        if let Some(v) = s.start_time_seconds {
            let g = ConstGauge::new(v);
            let help = "Start time of the process since unix epoch in seconds.";
            g.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                help,
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub arch: String,
    pub os: String,
}

/// `build_info{version, arch, os} 1` (the registry makes it `tally_build_info`).
pub fn build_info() -> Family<BuildLabels, Gauge> {
    let f = Family::<BuildLabels, Gauge>::default();
    f.get_or_create(&BuildLabels {
        version: env!("CARGO_PKG_VERSION").to_string(),
        arch: std::env::consts::ARCH.to_string(),
        os: std::env::consts::OS.to_string(),
    })
    .set(1);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 1093 0 0 0 \
                    250 75 0 0 20 0 7 0 123456 123 456 18446744073709551615";
        assert_eq!(
            StatFields::parse(line),
            Some(StatFields {
                utime: 250,
                stime: 75,
                threads: 7,
                starttime: 123456
            })
        );
        assert_eq!(StatFields::parse("4242 (cut"), None);
    }

    #[test]
    fn status_limits_and_boot_time_parse() {
        let status = "Name:\ttally\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\nThreads:\t9\n";
        assert_eq!(status_kb(status, "VmRSS"), Some(2048));
        assert_eq!(status_kb(status, "VmSize"), Some(123456));
        assert_eq!(status_kb(status, "Threads"), Some(9));
        assert_eq!(status_kb(status, "VmSwap"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63704                63704                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            max_open_files(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1700000000)
        );
    }

    #[test]
    fn this_process_is_sampled_on_linux() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let s = ProcessSample::read();
        assert!(s.resident_bytes.unwrap() > 0);
        assert!(s.virtual_bytes.unwrap() >= s.resident_bytes.unwrap());
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.threads.unwrap() >= 1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
    }
}
