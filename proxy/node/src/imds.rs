//! The node's instance metadata service as the agent itself uses it: `--metadata-addr` as a
//! typed value, and the one blocking client for start-up discovery
//! (`--auto-discover-base-arn`, `--auto-discover-default-role`) and `iamlet doctor`. Pods'
//! requests never come here: the data plane has its own non-blocking upstream.

use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;

/// `--metadata-addr`: `host[:port]`, kube2iam-style (a bare host, an optional `http://`
/// and trailing `/`), normalised with the default port 80.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetadataAddr {
    hostport: String,
}

/// `--metadata-addr` is unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetadataAddrError {
    #[error(
        "--metadata-addr {0:?} is not host[:port]; use e.g. 169.254.169.254 or 127.0.0.1:1338."
    )]
    Syntax(String),
    #[error("--metadata-addr {0:?} does not resolve; use an IP address such as 169.254.169.254.")]
    Unresolved(String),
}

impl MetadataAddr {
    /// Parses without touching the network.
    pub fn parse(addr: &str) -> Result<MetadataAddr, MetadataAddrError> {
        let a = addr
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let bad = || MetadataAddrError::Syntax(addr.to_owned());
        if a.is_empty() || a.contains('/') || a.contains(char::is_whitespace) {
            return Err(bad());
        }
        let hostport = if a.parse::<SocketAddr>().is_ok() {
            a.to_owned()
        } else if let Ok(ip) = a
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            SocketAddr::new(ip, 80).to_string()
        } else {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    a.to_owned()
                }
                Some(_) => return Err(bad()),
                None => format!("{a}:80"),
            }
        };
        Ok(MetadataAddr { hostport })
    }

    /// `host:port`, as the `Host` header and the logs show it.
    pub fn hostport(&self) -> &str {
        &self.hostport
    }

    /// Resolves the address (once, at start-up).
    pub fn resolve(&self) -> Result<SocketAddr, MetadataAddrError> {
        self.hostport
            .to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| MetadataAddrError::Unresolved(self.hostport.clone()))
    }
}

impl FromStr for MetadataAddr {
    type Err = MetadataAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MetadataAddr::parse(s)
    }
}

impl fmt::Display for MetadataAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hostport)
    }
}

/// What went wrong asking the metadata service.
#[derive(Debug, Error)]
pub enum ImdsError {
    #[error("cannot reach the instance metadata service at {host}: {error}")]
    Connect { host: String, error: std::io::Error },
    #[error("the instance metadata service at {host} did not answer: {error}")]
    Exchange { host: String, error: std::io::Error },
    #[error("malformed answer from the instance metadata service at {host}")]
    Malformed { host: String },
    #[error("the instance metadata service at {host} answered {code} for {path}")]
    Status {
        host: String,
        code: u16,
        path: String,
    },
    #[error("iam/info is not JSON: {0}")]
    NotJson(String),
    #[error("iam/info has no InstanceProfileArn; does the node have an instance profile?")]
    NoProfile,
    #[error("cannot derive a base role ARN from {0:?}")]
    BadProfile(String),
    #[error("the node has no IAM role")]
    NoRole,
}

impl ImdsError {
    /// The exchange ran out of time (a hop limit too low for where this runs, typically).
    pub fn timed_out(&self) -> bool {
        matches!(self, ImdsError::Exchange { error, .. } | ImdsError::Connect { error, .. }
            if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }
}

/// One HTTP answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// A blocking client: one connection per exchange (`Connection: close`), each step bounded.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
}

impl Client {
    /// Two seconds per step: the metadata service answers in milliseconds, and the agent's
    /// start-up must not hang on a wrong address.
    pub const TIMEOUT: Duration = Duration::from_secs(2);

    pub fn new(addr: &MetadataAddr) -> Result<Client, MetadataAddrError> {
        Ok(Client::at(addr.resolve()?, addr.hostport()))
    }

    /// At an address already resolved; `host` is the `Host` header.
    pub fn at(addr: SocketAddr, host: &str) -> Client {
        Client {
            addr,
            host: host.to_owned(),
            timeout: Self::TIMEOUT,
        }
    }

    /// One request: `method path` with `headers`, no body.
    pub fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ImdsError> {
        let host = &self.host;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method != "GET" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("Connection: close\r\n\r\n");
        let exchange = |error| ImdsError::Exchange {
            host: host.clone(),
            error,
        };
        let mut s = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(|error| {
            ImdsError::Connect {
                host: host.clone(),
                error,
            }
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(exchange)?;
        s.set_write_timeout(Some(self.timeout)).map_err(exchange)?;
        s.write_all(req.as_bytes()).map_err(exchange)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(exchange)?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&raw) {
            Ok(httparse::Status::Complete(n)) => Ok(Answer {
                status: resp.code.unwrap_or(0),
                body: String::from_utf8_lossy(&raw[n..]).into_owned(),
            }),
            _ => Err(ImdsError::Malformed { host: host.clone() }),
        }
    }

    /// An IMDSv2 session token (60 s), when the service hands one out.
    pub fn token(&self) -> Result<Answer, ImdsError> {
        self.exchange(
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        )
    }

    /// GET `path` with `token` (IMDSv2) or without (IMDSv1).
    pub fn get_with(&self, path: &str, token: Option<&str>) -> Result<Answer, ImdsError> {
        match token {
            Some(t) => self.exchange("GET", path, &[("X-aws-ec2-metadata-token", t)]),
            None => self.exchange("GET", path, &[]),
        }
    }

    /// Fetches a metadata path, with an IMDSv2 token when the service offers one; only a 200
    /// is an answer.
    pub fn get(&self, path: &str) -> Result<String, ImdsError> {
        let token = match self.token() {
            Ok(a) if a.status == 200 => Some(a.body.trim().to_owned()),
            _ => None,
        };
        match self.get_with(path, token.as_deref())? {
            Answer { status: 200, body } => Ok(body),
            Answer { status, .. } => Err(ImdsError::Status {
                host: self.host.clone(),
                code: status,
                path: path.to_owned(),
            }),
        }
    }

    /// `arn:aws:iam::ACCOUNT:role/` from `iam/info`'s InstanceProfileArn.
    pub fn base_arn(&self) -> Result<String, ImdsError> {
        let info = self.get("/latest/meta-data/iam/info")?;
        let v: serde_json::Value =
            serde_json::from_str(&info).map_err(|e| ImdsError::NotJson(e.to_string()))?;
        let profile = v["InstanceProfileArn"]
            .as_str()
            .ok_or(ImdsError::NoProfile)?;
        base_arn_from_profile(profile).ok_or_else(|| ImdsError::BadProfile(profile.to_owned()))
    }

    /// The node's own role name (the default role for `--auto-discover-default-role`).
    pub fn instance_role(&self) -> Result<String, ImdsError> {
        let list = self.get("/latest/meta-data/iam/security-credentials/")?;
        list.lines()
            .next()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .ok_or(ImdsError::NoRole)
    }
}

fn base_arn_from_profile(profile: &str) -> Option<String> {
    let mut parts = profile.splitn(6, ':');
    let (arn, partition, service, _region, account) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (arn == "arn" && service == "iam" && account.len() == 12)
        .then(|| format!("arn:{partition}:iam::{account}:role/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostport(addr: &str) -> Result<String, MetadataAddrError> {
        MetadataAddr::parse(addr).map(|a| a.hostport().to_owned())
    }

    #[test]
    fn metadata_addr_forms() {
        assert_eq!(hostport("169.254.169.254").unwrap(), "169.254.169.254:80");
        assert_eq!(hostport("127.0.0.1:1338").unwrap(), "127.0.0.1:1338");
        assert_eq!(hostport("localhost:99").unwrap(), "localhost:99");
        assert_eq!(hostport("[fd00:ec2::254]").unwrap(), "[fd00:ec2::254]:80");
        assert_eq!(hostport("imds").unwrap(), "imds:80");
        assert!(hostport("a:b").is_err());
        let e = hostport("http://1.2.3.4/x").unwrap_err().to_string();
        assert!(e.starts_with("--metadata-addr") && e.ends_with('.'), "{e}");
    }

    #[test]
    fn base_arn_comes_from_the_instance_profile() {
        assert_eq!(
            base_arn_from_profile("arn:aws:iam::123456789012:instance-profile/nodes").as_deref(),
            Some("arn:aws:iam::123456789012:role/")
        );
        assert_eq!(
            base_arn_from_profile("arn:aws-cn:iam::123456789012:instance-profile/p").as_deref(),
            Some("arn:aws-cn:iam::123456789012:role/")
        );
        assert_eq!(base_arn_from_profile("nonsense"), None);
    }
}
