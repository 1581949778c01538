//! `--key value` / `--flag` arguments, and loopback-only address parsing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// Flags that take no value.
const BOOLEAN: &[&str] = &["no-keepalive", "imdsv2", "quiet"];

pub struct Args {
    values: HashMap<String, Vec<String>>,
}

impl Args {
    pub fn parse(it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = it.peekable();
        while let Some(k) = it.next() {
            let Some(k) = k.strip_prefix("--") else {
                return Err(format!("unexpected argument {k}"));
            };
            if let Some((k, v)) = k.split_once('=') {
                values.entry(k.into()).or_default().push(v.into());
            } else if BOOLEAN.contains(&k) {
                values.entry(k.into()).or_default().push("true".into());
            } else {
                let v = it.next().ok_or(format!("--{k} needs a value"))?;
                values.entry(k.into()).or_default().push(v);
            }
        }
        Ok(Args { values })
    }

    pub fn opt(&self, k: &str) -> Option<&str> {
        self.values
            .get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    pub fn all(&self, k: &str) -> Vec<String> {
        self.values.get(k).cloned().unwrap_or_default()
    }

    pub fn flag(&self, k: &str) -> bool {
        self.opt(k).is_some_and(|v| v == "true" || v == "1")
    }

    pub fn req(&self, k: &str) -> Result<&str, String> {
        self.opt(k).ok_or(format!("--{k} is required"))
    }

    pub fn num<T: FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.opt(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{k}: cannot parse {v:?}")),
        }
    }

    pub fn secs(&self, k: &str, default: f64) -> Result<Duration, String> {
        let s: f64 = self.num(k, default)?;
        if !(0.0..=86_400.0).contains(&s) {
            return Err(format!("--{k}: {s} s is out of range"));
        }
        Ok(Duration::from_secs_f64(s))
    }

    pub fn addr(&self, k: &str) -> Result<SocketAddr, String> {
        loopback_addr(self.req(k)?)
    }
}

/// `host:port` on loopback (a bare port means 127.0.0.1).
pub fn loopback_addr(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = if let Ok(p) = s.parse::<u16>() {
        SocketAddr::from(([127, 0, 0, 1], p))
    } else {
        s.parse().map_err(|_| format!("not an address: {s}"))?
    };
    if !a.ip().is_loopback() {
        return Err(format!("{a} is not a loopback address (loopback only)"));
    }
    Ok(a)
}

pub fn loopback_ip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|_| format!("not an IP: {s}"))?;
    if !ip.is_loopback() {
        return Err(format!("{ip} is not a loopback address (loopback only)"));
    }
    Ok(ip)
}
