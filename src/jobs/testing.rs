//! Job kinds for tests and benchmarks, registered only with `--enable-test-jobs`:
//! `test.sleep` (a slow job that honours cancellation), `test.panic` (a job that takes
//! its worker down), `test.echo` (returns its params, after `ms` when given, or `first_ms` in its first attempt;
//! fails at once in attempts up to `fail_attempts`), `test.stall` (a worker that
//! stalls without a sign of life in its first attempts, then answers which attempt it
//! is) and `test.blob` (a large result, after a pause).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{JobContext, JobError, JobHandler, Registry};

struct Sleep;
struct Panic;
struct Echo;
struct Stall;
struct Blob;

fn sleep_ms(params: &Value) -> Result<u64, String> {
    match params.get("ms") {
        None => Ok(100),
        Some(v) => v
            .as_u64()
            .filter(|ms| *ms <= 3_600_000)
            .ok_or_else(|| "ms must be an integer between 0 and 3600000".to_string()),
    }
}

impl JobHandler for Sleep {
    fn validate(&self, params: &Value) -> Result<(), String> {
        sleep_ms(params).map(|_| ())
    }

    fn run(&self, params: &Value, ctx: &JobContext) -> Result<Value, JobError> {
        let ms = sleep_ms(params).map_err(JobError::Failed)?;
        let until = Instant::now() + Duration::from_millis(ms);
        loop {
            ctx.checkpoint()?;
            let now = Instant::now();
            if now >= until {
                return Ok(serde_json::json!({ "slept_ms": ms }));
            }
            std::thread::sleep((until - now).min(Duration::from_millis(10)));
        }
    }
}

impl JobHandler for Panic {
    fn run(&self, params: &Value, _ctx: &JobContext) -> Result<Value, JobError> {
        let msg = params
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("test.panic was asked to panic");
        panic!("{msg}");
    }
}

impl JobHandler for Echo {
    fn validate(&self, params: &Value) -> Result<(), String> {
        u64_param(params, "fail_attempts", 0, 100).map(|_| ())
    }

    /// Its params back; after `ms` milliseconds (checkpointing) when they say so, or after
    /// `first_ms` in the first attempt when given (a job that holds its first worker until
    /// that worker dies or stalls, and is quick when taken over). Attempts up to
    /// `fail_attempts` (default 0) fail at once instead, naming their attempt (a job that
    /// fails quickly until it is retried).
    fn run(&self, params: &Value, ctx: &JobContext) -> Result<Value, JobError> {
        let fails = u64_param(params, "fail_attempts", 0, 100).map_err(JobError::Failed)?;
        if u64::from(ctx.attempt()) <= fails {
            return Err(JobError::Failed(format!(
                "test.echo fails attempts up to {fails}; this was attempt {}",
                ctx.attempt()
            )));
        }
        let first = params.get("first_ms").filter(|_| ctx.attempt() == 1);
        if let Some(ms) = first.or(params.get("ms")).and_then(Value::as_u64) {
            let until = Instant::now() + Duration::from_millis(ms.min(3_600_000));
            while Instant::now() < until {
                ctx.checkpoint()?;
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(5)));
            }
        }
        Ok(params.clone())
    }
}

fn u64_param(params: &Value, name: &str, default: u64, max: u64) -> Result<u64, String> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= max)
            .ok_or_else(|| format!("{name} must be an integer between 0 and {max}")),
    }
}

impl JobHandler for Stall {
    fn validate(&self, params: &Value) -> Result<(), String> {
        u64_param(params, "ms", 1000, 3_600_000)?;
        u64_param(params, "stall_attempts", 1, 100).map(|_| ())
    }

    /// Attempts up to `stall_attempts` sleep `ms` without a checkpoint (a stalled
    /// worker: its lease is not renewed); later ones answer at once.
    fn run(&self, params: &Value, ctx: &JobContext) -> Result<Value, JobError> {
        let ms = u64_param(params, "ms", 1000, 3_600_000).map_err(JobError::Failed)?;
        let stalls = u64_param(params, "stall_attempts", 1, 100).map_err(JobError::Failed)?;
        if u64::from(ctx.attempt()) <= stalls {
            std::thread::sleep(Duration::from_millis(ms));
        }
        Ok(serde_json::json!({ "attempt": ctx.attempt() }))
    }
}

impl JobHandler for Blob {
    fn validate(&self, params: &Value) -> Result<(), String> {
        u64_param(params, "bytes", 1000, 64 << 20)?;
        u64_param(params, "ms", 0, 3_600_000).map(|_| ())
    }

    /// After `ms` (honouring cancellation), a JSON string of `bytes` bytes that starts
    /// with `seed`, so that distinct seeds make distinct results.
    fn run(&self, params: &Value, ctx: &JobContext) -> Result<Value, JobError> {
        let bytes = u64_param(params, "bytes", 1000, 64 << 20).map_err(JobError::Failed)?;
        let ms = u64_param(params, "ms", 0, 3_600_000).map_err(JobError::Failed)?;
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            ctx.checkpoint()?;
            std::thread::sleep(Duration::from_millis(5));
        }
        let seed = params.get("seed").and_then(Value::as_str).unwrap_or("");
        let mut s = String::with_capacity(bytes as usize);
        s.push_str(seed);
        while s.len() < bytes as usize {
            s.push('x');
        }
        Ok(Value::String(s))
    }
}

pub fn register(reg: &mut Registry) {
    reg.register("test.sleep", Arc::new(Sleep));
    reg.register("test.panic", Arc::new(Panic));
    reg.register("test.echo", Arc::new(Echo));
    reg.register("test.stall", Arc::new(Stall));
    reg.register("test.blob", Arc::new(Blob));
}
