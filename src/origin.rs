//! Web origins (`scheme://host:port`, RFC 6454) and host names as the configuration names
//! them (`--allowed-origin`, `--allowed-host`) and as browsers send them (`Origin`,
//! `Host`): parsed once, lower-cased, default ports filled in, so the configuration and
//! the HTTP edge compare the same values.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An origin allowed to send state-changing requests (`--allowed-origin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(Origin);

impl AllowedOrigin {
    /// The origin itself.
    pub fn origin(&self) -> &Origin {
        &self.0
    }
}

impl FromStr for AllowedOrigin {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A trailing slash is forgiven in configuration; browsers never send one.
        let s = s.trim();
        Origin::parse(s.strip_suffix('/').unwrap_or(s))
            .map(AllowedOrigin)
            .ok_or_else(|| {
                format!("'{s}' is not an origin: expected http(s)://host[:port], e.g. https://dash.example.com")
            })
    }
}

impl fmt::Display for AllowedOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.0;
        write!(f, "{}://{}:{}", o.scheme, o.host, o.port)
    }
}

/// `scheme://host:port`, lower-cased, with the scheme's default port filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses the value of an `Origin` header (RFC 6454 serialization: no path).
    pub fn parse(s: &str) -> Option<Origin> {
        let (scheme, authority) = s.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let (host, port) = split_authority(authority)?;
        Some(Origin {
            scheme,
            host,
            port: port.unwrap_or(default_port),
        })
    }

    /// Whether this origin names the server the request was sent to. A `Host` without a
    /// port stands for the origin scheme's default port (behind a TLS proxy, `https`).
    pub fn matches_host(&self, host: &str) -> bool {
        match split_authority(host) {
            Some((h, port)) => h == self.host && port.unwrap_or(self.port) == self.port,
            None => false,
        }
    }
}

/// A name the service answers to besides its loopback names and addresses
/// (`--allowed-host`): `tally.example.com`, or `*.example.com` for every name below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    name: String,
    subdomains: bool,
}

impl FromStr for AllowedHost {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (subdomains, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "'{s}' is not a host name: expected a name such as tally.example.com or *.example.com (no scheme, port or path)"
            ));
        }
        Ok(AllowedHost { name, subdomains })
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let star = if self.subdomains { "*." } else { "" };
        write!(f, "{star}{}", self.name)
    }
}

/// Which `Host` headers the HTTP edge serves: the defence against DNS rebinding, where a
/// page of another site has its own name resolve to this machine and then talks to the
/// service as its own origin (the `Origin` = `Host` check cannot tell it apart). Such a
/// request always carries the attacker's public name in `Host`, never an address, so
/// served are: names of one label (`localhost`, a compose service's `tally`: resolved by
/// the local network, which an attacker's site cannot name), loopback addresses, the
/// addresses the service listens on (any address when it listens on all of them: naming
/// the machine by address is no rebinding), the hosts of `--allowed-origin` and the names
/// of `--allowed-host`.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    names: Vec<AllowedHost>,
    addrs: Vec<IpAddr>,
    any_addr: bool,
}

impl HostPolicy {
    pub fn new(listen: &[IpAddr], hosts: &[AllowedHost], origins: &[AllowedOrigin]) -> Self {
        let mut names = hosts.to_vec();
        let mut addrs: Vec<IpAddr> = listen.to_vec();
        for o in origins {
            match parse_ip(&o.0.host) {
                Some(ip) => addrs.push(ip),
                None => names.push(AllowedHost {
                    name: o.0.host.clone(),
                    subdomains: false,
                }),
            }
        }
        HostPolicy {
            names,
            any_addr: listen.iter().any(IpAddr::is_unspecified),
            addrs,
        }
    }

    /// Loopback only: what a service listening on 127.0.0.1 with no flags serves.
    pub fn loopback() -> Self {
        HostPolicy::new(&[], &[], &[])
    }

    /// Whether a request whose `Host` header is `host` is served.
    pub fn allows(&self, host: &str) -> bool {
        let Some((host, _port)) = split_authority(host.trim()) else {
            return false;
        };
        if let Some(ip) = parse_ip(&host) {
            return ip.is_loopback() || self.any_addr || self.addrs.contains(&ip);
        }
        let host = host.strip_suffix('.').unwrap_or(&host);
        !host.contains('.')
            || self.names.iter().any(|n| match n.subdomains {
                false => host == n.name,
                true => host
                    .strip_suffix(n.name.as_str())
                    .is_some_and(|rest| rest.ends_with('.')),
            })
    }
}

/// An address as `Host` and `Origin` write it (IPv6 in brackets).
fn parse_ip(host: &str) -> Option<IpAddr> {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse().ok(),
        None => host.parse().ok(),
    }
}

/// `host[:port]` into a lower-cased host (IPv6 in brackets) and the port, if any.
fn split_authority(s: &str) -> Option<(String, Option<u16>)> {
    if s.is_empty() || s.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = if s.starts_with('[') {
        let end = s.find(']')?;
        match &s[end + 1..] {
            "" => (&s[..=end], None),
            rest => (&s[..=end], Some(rest.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(':') && !host.starts_with('[') {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_origins_parse_or_name_the_problem() {
        for (input, expect) in [
            ("https://dash.example", Some("https://dash.example:443")),
            (
                "HTTP://Dash.Example:8080/",
                Some("http://dash.example:8080"),
            ),
            ("http://[::1]:3000", Some("http://[::1]:3000")),
            ("dash.example", None),
            ("ftp://dash.example", None),
            ("https://dash.example/app", None),
            ("https://dash.example:99999", None),
            ("https://", None),
            ("https://user@dash.example", None),
        ] {
            let got = input.parse::<AllowedOrigin>().map(|o| o.to_string()).ok();
            assert_eq!(got.as_deref(), expect, "{input}");
        }
        let err = "dash.example".parse::<AllowedOrigin>().unwrap_err();
        assert!(err.contains("http(s)://host[:port]"), "{err}");
    }

    #[test]
    fn allowed_hosts_parse_or_name_the_problem() {
        for (input, expect) in [
            ("Tally.Example.com", Some("tally.example.com")),
            ("*.example.com", Some("*.example.com")),
            ("tally.example.", Some("tally.example")),
            ("https://tally.example", None),
            ("tally.example:5000", None),
            ("tally.example/x", None),
            ("*", None),
            ("", None),
        ] {
            let got = input.parse::<AllowedHost>().map(|h| h.to_string()).ok();
            assert_eq!(got.as_deref(), expect, "{input}");
        }
    }

    #[test]
    fn only_the_names_the_service_is_reachable_as_are_served() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let policy = HostPolicy::new(
            &[loopback, "10.1.2.3".parse().unwrap()],
            &[
                "tally.example".parse().unwrap(),
                "*.svc.local".parse().unwrap(),
            ],
            &["https://dash.example:8443".parse().unwrap()],
        );
        for (host, served) in [
            ("127.0.0.1:5000", true),
            ("127.8.9.10:5000", true),
            ("localhost:5000", true),
            ("LOCALHOST", true),
            ("localhost.:5000", true),
            ("tally:5000", true),
            ("[::1]:5000", true),
            ("10.1.2.3:5000", true),
            ("tally.example", true),
            ("a.b.svc.local:80", true),
            ("dash.example:5000", true),
            // A rebound name, another address, a name that only ends like an allowed one.
            ("rebind.example:5000", false),
            ("10.9.9.9:5000", false),
            ("evilsvc.local", false),
            ("svc.local", false),
            ("localhost.evil.example", false),
            ("", false),
            ("a b", false),
        ] {
            assert_eq!(policy.allows(host), served, "{host}");
        }
        let all = HostPolicy::new(&["0.0.0.0".parse().unwrap()], &[], &[]);
        assert!(all.allows("192.168.1.20:5000") && all.allows("[fe80::1]:5000"));
        assert!(!all.allows("rebind.example:5000"));
        assert!(HostPolicy::loopback().allows("127.0.0.1:5000"));
        assert!(!HostPolicy::loopback().allows("10.1.2.3:5000"));
    }
}
