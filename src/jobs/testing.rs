//! Job kinds for tests and benchmarks, registered only with `--enable-test-jobs`:
//! `test.sleep` (a slow job that honours cancellation), `test.panic` (a job that takes
//! its worker down) and `test.echo` (returns its params).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{JobContext, JobError, JobHandler, Registry};

struct Sleep;
struct Panic;
struct Echo;

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
    fn run(&self, params: &Value, _ctx: &JobContext) -> Result<Value, JobError> {
        Ok(params.clone())
    }
}

pub fn register(reg: &mut Registry) {
    reg.register("test.sleep", Arc::new(Sleep));
    reg.register("test.panic", Arc::new(Panic));
    reg.register("test.echo", Arc::new(Echo));
}
