//! Web origins (`scheme://host:port`, RFC 6454) as the configuration names them
//! (`--allowed-origin`) and as browsers send them (`Origin`, `Host`): parsed once,
//! lower-cased, default ports filled in, so the configuration and the HTTP edge compare
//! the same values.

use std::fmt;
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
}
