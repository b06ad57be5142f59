//! Named leases with fencing tokens: at most one holder of a name at a time, and every
//! grant carries a token larger than any granted before, so whatever a holder writes
//! under its lease can be refused once a newer holder exists (the write presents its
//! token; only the current one passes).
//!
//! Two implementations keep one set of rules (`tests/lease_conformance.rs` runs the same
//! cases on both): [`LocalLeases`] in the process, for the single-process stores, and
//! [`RedisLeases`], one Lua script per step (`lease.lua`), on the Redis the replicas
//! share, by Redis's clock.
//!
//! A holder stops trusting its lease before Redis would expire it, as River's leader
//! elector does: [`Grant::trusted`] is true only until three quarters of the lease
//! counted from *before* the request that granted or renewed it was sent, so a holder
//! whose process stalled, or whose renewal answer came late, finds out before another
//! replica can have been granted the name. The margin is what clocks of different speeds
//! and a renewal's round trip may eat; fencing covers what is left (a holder paused
//! between its check of `trusted` and its write).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::Script;

use super::conn::{Conn, Dial};

/// The part of a lease its holder trusts, counted from before the request.
const TRUST: f64 = 0.75;

/// Why a lease step could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The lease's name is not one this module takes.
    #[error("bad lease name {0:?}: 1 to 64 of A-Z a-z 0-9 . _ : -")]
    BadName(String),
    /// A holder's name or a lease time this module does not take.
    #[error("bad lease request: {0}")]
    BadRequest(String),
    /// The shared store could not be asked; the holder must not trust its lease.
    #[error("the lease store is unavailable: {0}")]
    Unavailable(String),
}

/// A lease this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub holder: String,
    /// The fencing token: present it with every write made under the lease.
    pub token: u64,
    /// Until when (this process's clock) the holder may act on the lease.
    pub trusted_until: Instant,
}

impl Grant {
    /// Whether the holder may still act on the lease (see the module comment).
    pub fn trusted(&self) -> bool {
        Instant::now() < self.trusted_until
    }
}

/// Who holds a lease, as the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub holder: String,
    pub token: u64,
    /// How long the lease has left, by the store's clock.
    pub expires_in: Duration,
}

/// The answer to an acquire or a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Granted(Grant),
    /// Someone else holds it (or, for a renewal, the grant is no longer the current one);
    /// `None`: nobody does.
    Refused(Option<Holder>),
}

#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Takes `name` for `ttl` if nobody holds it, with a new token.
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<Claim, LeaseError>;

    /// Extends the lease `grant` holds by `ttl` from now, if it is still the current one.
    async fn renew(&self, name: &str, grant: &Grant, ttl: Duration) -> Result<Claim, LeaseError>;

    /// Gives the lease up, if `grant` is still the current one (true then).
    async fn release(&self, name: &str, grant: &Grant) -> Result<bool, LeaseError>;

    /// Who holds `name` now.
    async fn holder(&self, name: &str) -> Result<Option<Holder>, LeaseError>;

    /// Whether `token` is the current grant of `name`: the check a fenced write makes.
    async fn is_current(&self, name: &str, holder: &str, token: u64) -> Result<bool, LeaseError>;

    /// Returns once `name` may be free, at most `max` later: at once when nobody holds
    /// it, when its holder releases it (a release is announced, so a follower takes over
    /// at once rather than a lease period later), or when its lease runs out. The
    /// caller then tries to acquire it; another follower may have been first.
    async fn wait_free(&self, name: &str, max: Duration) -> Result<(), LeaseError>;
}

fn check_name(name: &str) -> Result<(), LeaseError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LeaseError::BadName(name.to_string()))
    }
}

/// A holder is named (1 to 128 bytes) and a lease lasts at least a millisecond, the
/// store's resolution.
fn check_request(holder: &str, ttl: Duration) -> Result<(), LeaseError> {
    if holder.is_empty() || holder.len() > 128 {
        return Err(LeaseError::BadRequest(format!(
            "a holder is named by 1 to 128 bytes; got {} bytes",
            holder.len()
        )));
    }
    if ttl < Duration::from_millis(1) {
        return Err(LeaseError::BadRequest(format!(
            "a lease lasts at least 1 ms; got {ttl:?}"
        )));
    }
    Ok(())
}

fn trusted_from(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.mul_f64(TRUST)
}

/// Leases in this process: for one process, where no other can contend.
#[derive(Default)]
pub struct LocalLeases {
    held: Mutex<HashMap<String, (String, u64, Instant)>>,
    fence: AtomicU64,
    /// Woken by every release (followers check their name again).
    freed: tokio::sync::Notify,
}

impl LocalLeases {
    pub fn new() -> Self {
        Self::default()
    }

    /// The live entry of `name` (an expired one is dropped).
    fn current(
        held: &mut HashMap<String, (String, u64, Instant)>,
        name: &str,
        now: Instant,
    ) -> Option<Holder> {
        match held.get(name) {
            Some((_, _, until)) if *until <= now => {
                held.remove(name);
                None
            }
            Some((holder, token, until)) => Some(Holder {
                holder: holder.clone(),
                token: *token,
                expires_in: *until - now,
            }),
            None => None,
        }
    }
}

#[async_trait]
impl Leases for LocalLeases {
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<Claim, LeaseError> {
        check_name(name)?;
        check_request(holder, ttl)?;
        let now = Instant::now();
        let mut held = self.held.lock();
        if let Some(h) = Self::current(&mut held, name, now) {
            return Ok(Claim::Refused(Some(h)));
        }
        let token = self.fence.fetch_add(1, Ordering::SeqCst) + 1;
        held.insert(name.to_string(), (holder.to_string(), token, now + ttl));
        Ok(Claim::Granted(Grant {
            holder: holder.to_string(),
            token,
            trusted_until: trusted_from(now, ttl),
        }))
    }

    async fn renew(&self, name: &str, grant: &Grant, ttl: Duration) -> Result<Claim, LeaseError> {
        check_name(name)?;
        check_request(&grant.holder, ttl)?;
        let now = Instant::now();
        let mut held = self.held.lock();
        match Self::current(&mut held, name, now) {
            Some(h) if h.holder == grant.holder && h.token == grant.token => {
                held.insert(name.to_string(), (h.holder, h.token, now + ttl));
                Ok(Claim::Granted(Grant {
                    trusted_until: trusted_from(now, ttl),
                    ..grant.clone()
                }))
            }
            other => Ok(Claim::Refused(other)),
        }
    }

    async fn release(&self, name: &str, grant: &Grant) -> Result<bool, LeaseError> {
        check_name(name)?;
        let mut held = self.held.lock();
        match Self::current(&mut held, name, Instant::now()) {
            Some(h) if h.holder == grant.holder && h.token == grant.token => {
                held.remove(name);
                self.freed.notify_waiters();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn holder(&self, name: &str) -> Result<Option<Holder>, LeaseError> {
        check_name(name)?;
        Ok(Self::current(&mut self.held.lock(), name, Instant::now()))
    }

    async fn is_current(&self, name: &str, holder: &str, token: u64) -> Result<bool, LeaseError> {
        Ok(self
            .holder(name)
            .await?
            .is_some_and(|h| h.holder == holder && h.token == token))
    }

    async fn wait_free(&self, name: &str, max: Duration) -> Result<(), LeaseError> {
        let until = tokio::time::Instant::now() + max;
        loop {
            // Listening before looking, so a release in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let Some(h) = self.holder(name).await? else {
                return Ok(());
            };
            let wake = (tokio::time::Instant::now() + h.expires_in).min(until);
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
            if tokio::time::Instant::now() >= until {
                return Ok(());
            }
        }
    }
}

/// Leases on the Redis the replicas share (keys `{tally}:lease:NAME` and
/// `{tally}:fence:NAME`, in the one slot of every tally key).
pub struct RedisLeases {
    conn: Conn,
    /// For the announcements of releases.
    dial: Dial,
    script: Script,
}

impl RedisLeases {
    pub fn new(conn: Conn, dial: Dial) -> Self {
        RedisLeases {
            conn,
            dial,
            // Leases keep memory level: they must be renewable while Redis is full.
            script: Script::new(concat!(
                "#!lua flags=allow-oom\n",
                include_str!("lease.lua")
            )),
        }
    }

    async fn step(
        &self,
        op: &str,
        name: &str,
        holder: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<(bool, Option<Holder>), LeaseError> {
        check_name(name)?;
        let (granted, who, current, pttl): (u8, String, u64, i64) = self
            .script
            .key(format!("{{tally}}:lease:{name}"))
            .key(format!("{{tally}}:fence:{name}"))
            .arg(op)
            .arg(holder)
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        let held = (!who.is_empty()).then(|| Holder {
            holder: who,
            token: current,
            expires_in: Duration::from_millis(pttl.max(0) as u64),
        });
        Ok((granted == 1, held))
    }

    fn claim(sent: Instant, ttl: Duration, granted: bool, held: Option<Holder>) -> Claim {
        match held {
            Some(h) if granted => Claim::Granted(Grant {
                holder: h.holder,
                token: h.token,
                trusted_until: trusted_from(sent, ttl),
            }),
            other => Claim::Refused(other),
        }
    }
}

#[async_trait]
impl Leases for RedisLeases {
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<Claim, LeaseError> {
        check_request(holder, ttl)?;
        let sent = Instant::now();
        let (granted, held) = self.step("acquire", name, holder, 0, ttl).await?;
        Ok(Self::claim(sent, ttl, granted, held))
    }

    async fn renew(&self, name: &str, grant: &Grant, ttl: Duration) -> Result<Claim, LeaseError> {
        check_request(&grant.holder, ttl)?;
        let sent = Instant::now();
        let (granted, held) = self
            .step("renew", name, &grant.holder, grant.token, ttl)
            .await?;
        Ok(Self::claim(sent, ttl, granted, held))
    }

    async fn release(&self, name: &str, grant: &Grant) -> Result<bool, LeaseError> {
        let (released, _) = self
            .step("release", name, &grant.holder, grant.token, Duration::ZERO)
            .await?;
        Ok(released)
    }

    async fn holder(&self, name: &str) -> Result<Option<Holder>, LeaseError> {
        Ok(self.step("check", name, "", 0, Duration::ZERO).await?.1)
    }

    async fn is_current(&self, name: &str, holder: &str, token: u64) -> Result<bool, LeaseError> {
        Ok(self
            .step("check", name, holder, token, Duration::ZERO)
            .await?
            .0)
    }

    async fn wait_free(&self, name: &str, max: Duration) -> Result<(), LeaseError> {
        use futures_util::StreamExt;
        check_name(name)?;
        let until = tokio::time::Instant::now() + max;
        let unavailable = |e: redis::RedisError| LeaseError::Unavailable(e.to_string());
        // Subscribed before looking, so a release in between is heard; within `max`,
        // which also bounds a connection that does not answer.
        let subscribed = tokio::time::timeout_at(until, async {
            let mut ps = self.dial.pubsub().await?;
            ps.subscribe(format!("{{tally}}:lease:{name}:free")).await?;
            Ok::<_, redis::RedisError>(ps)
        });
        let mut ps = match subscribed.await {
            Ok(ps) => ps.map_err(unavailable)?,
            Err(_) => return Ok(()),
        };
        let mut messages = ps.on_message();
        loop {
            let Some(h) = self.holder(name).await? else {
                return Ok(());
            };
            // The store's clock says when the lease ends; a little past it, look again.
            let wake =
                (tokio::time::Instant::now() + h.expires_in + Duration::from_millis(5)).min(until);
            tokio::select! {
                m = messages.next() => if m.is_none() {
                    return Err(LeaseError::Unavailable("the announcements' connection closed".into()));
                },
                () = tokio::time::sleep_until(wake) => {}
            }
            if tokio::time::Instant::now() >= until {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_short_and_plain() {
        for good in ["journal", "source:demo-1", "a.b_c"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "{tally}", &"x".repeat(65), "é"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_holder_trusts_less_than_its_lease_from_before_it_asked() {
        let sent = Instant::now();
        let ttl = Duration::from_millis(1000);
        assert!(trusted_from(sent, ttl) < sent + ttl);
        assert!(trusted_from(sent, ttl) > sent);
    }
}
