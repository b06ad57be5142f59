//! Which store a process opens: `--store memory | sqlite:PATH | redis://...`, parsed
//! and checked once, with the Redis password kept out of every log line and message.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where job records and results are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// Nothing touches the disk; finished results are capped and evicted oldest first.
    Memory,
    /// SQLite file in WAL mode with group commits (the default).
    Sqlite(PathBuf),
    /// A Redis server or cluster every replica shares
    /// (`redis[+cluster]://[[USER]:PASSWORD@]HOST:PORT[/DB]`).
    Redis(RedisUrl),
}

/// The schemes of a Redis URL: `redis+cluster://` asks for a cluster client whatever the
/// server says (`redis://` finds out from the server).
const SCHEMES: [&str; 2] = ["redis://", "redis+cluster://"];

/// A Redis URL, checked at parse time; its password never shows in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL as given, password included: for the client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn parse(s: &str) -> Result<RedisUrl, String> {
        let rest = SCHEMES
            .iter()
            .find_map(|scheme| s.strip_prefix(scheme))
            .ok_or_else(|| format!("{s:?} is not a redis:// URL"))?;
        let (authority, db) = match rest.split_once('/') {
            Some((a, d)) => (a, Some(d)),
            None => (rest, None),
        };
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        if host.is_empty() {
            return Err("the redis URL needs a host, e.g. redis://HOST:PORT/0".into());
        }
        if let Some(p) = port {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("bad port {p:?} in the redis URL"))?;
        }
        if let Some(d) = db.filter(|d| !d.is_empty()) {
            d.parse::<u32>()
                .map_err(|_| format!("bad database number {d:?} in the redis URL"))?;
        }
        Ok(RedisUrl(s.to_string()))
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, rest) = self.0.split_at(self.0.find("://").map_or(0, |i| i + 3));
        match rest.rsplit_once('@') {
            Some((_, rest)) => write!(f, "{scheme}***@{rest}"),
            None => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

impl FromStr for StoreSpec {
    type Err = String;

    /// The error never holds the URL's user and password (it reaches stderr and logs).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).map_err(|e| match userinfo(s) {
            Some(secret) => e.replace(secret, "***"),
            None => e,
        })
    }
}

/// The `user:password` of `scheme://user:password@host...`, if any.
fn userinfo(s: &str) -> Option<&str> {
    let rest = &s[s.find("://")? + 3..];
    let end = rest.rfind('@')?;
    Some(&rest[..end]).filter(|u| !u.is_empty())
}

impl StoreSpec {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "memory" {
            return Ok(StoreSpec::Memory);
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err("sqlite: needs a path, e.g. sqlite:tally.db".into());
            }
            return Ok(StoreSpec::Sqlite(PathBuf::from(path)));
        }
        if SCHEMES.iter().any(|scheme| s.starts_with(scheme)) {
            return RedisUrl::parse(s).map(StoreSpec::Redis);
        }
        Err(format!(
            "unknown store '{s}': expected memory, sqlite:PATH or redis://HOST:PORT[/DB]"
        ))
    }
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreSpec::Redis(u) => write!(f, "{u}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_parses_and_keeps_its_password_out_of_print() {
        let s: StoreSpec = "redis+cluster://:s3cret@127.0.0.1:7100".parse().unwrap();
        assert_eq!(s.to_string(), "redis+cluster://***@127.0.0.1:7100");
        let err = "redis+cluster://:s3cret@h:0"
            .parse::<StoreSpec>()
            .unwrap_err();
        assert!(err.contains("bad port") && !err.contains("s3cret"), "{err}");
    }
}
