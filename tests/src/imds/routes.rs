//! The fake IMDS's answers, as a pure function of (method, path, headers, token store):
//! the real instance-metadata contract for the paths iamlet forwards or must never leak.

use crate::wire::header;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Present in every node secret the fake serves (credentials, user-data): a test that finds
/// it in a pod's answer has found a node-credential leak.
pub const NODE_MARKER: &str = "NODECREDLEAKMARKER";
pub const INSTANCE_ID: &str = "i-0fake00000000001";
pub const REGION: &str = "us-east-1";
pub const ACCOUNT_ID: &str = "123456789012";
pub const NODE_ROLE: &str = "node-role";
pub const INSTANCE_PROFILE_ARN: &str = "arn:aws:iam::123456789012:instance-profile/node-profile";
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";

/// One answer: status, content type, extra headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// 400 for requests the fake cannot parse.
    pub fn bad_request() -> Reply {
        Reply::error(400)
    }

    /// IMDS's XHTML error page, e.g. `404 - Not Found`.
    fn error(status: u16) -> Reply {
        let title = format!("{status} - {}", reason(status));
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<!DOCTYPE html PUBLIC \
             \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\t\"http://www.w3.org/TR/xhtml1/DTD/\
             xhtml1-transitional.dtd\">\n<html xmlns=\"http://www.w3.org/1999/xhtml\" \
             xml:lang=\"en\" lang=\"en\">\n <head>\n  <title>{title}</title>\n </head>\n \
             <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
        );
        Reply {
            status,
            content_type: "text/html",
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// Reason phrase for the statuses the fake uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unknown",
    }
}

// === impl Tokens ===

/// Tokens minted by this fake, with their expiry.
#[derive(Debug, Default)]
pub struct Tokens {
    minted: Mutex<HashMap<String, Instant>>,
}

impl Tokens {
    /// A new random-looking token valid for `ttl`.
    pub fn mint(&self, ttl: Duration) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let s = RandomState::new();
        let tok = format!(
            "AQAEA{:016x}{:016x}{:016x}==",
            s.hash_one(n),
            s.hash_one(!n),
            n
        );
        let mut m = self.minted.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(tok.clone(), Instant::now() + ttl);
        tok
    }

    /// True for a token this fake minted that has not expired.
    pub fn is_valid(&self, tok: &str) -> bool {
        let m = self.minted.lock().unwrap_or_else(|e| e.into_inner());
        m.get(tok).is_some_and(|exp| Instant::now() < *exp)
    }
}

/// Answers one request. `path` may carry a query string (ignored).
pub fn route(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    tokens: &Tokens,
    require_token: bool,
) -> Reply {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match method {
        "PUT" => put(path, headers, tokens),
        "GET" => {
            match header(headers, TOKEN_HEADER) {
                Some(t) if !tokens.is_valid(t) => return Reply::error(401),
                None if require_token => return Reply::error(401),
                _ => {}
            }
            get(path)
        }
        _ => Reply::error(405),
    }
}

fn put(path: &str, headers: &[(String, String)], tokens: &Tokens) -> Reply {
    if path != "/latest/api/token" {
        // A version-specific token path is refused like the real service does.
        let versioned = path
            .strip_suffix("/api/token")
            .is_some_and(|v| v.rfind('/') == Some(0));
        return Reply::error(if versioned { 403 } else { 405 });
    }
    if header(headers, "X-Forwarded-For").is_some() {
        return Reply::error(403);
    }
    let ttl = header(headers, TTL_HEADER).and_then(|v| v.trim().parse::<u64>().ok());
    let Some(ttl @ 1..=21600) = ttl else {
        return Reply::error(400);
    };
    let mut r = Reply::text(200, tokens.mint(Duration::from_secs(ttl)));
    r.headers.push((TTL_HEADER.to_string(), ttl.to_string()));
    r
}

fn get(path: &str) -> Reply {
    // Drop the version segment: `/latest/...`, `/2016-09-02/...`.
    let rest = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((v, rest)) if !v.is_empty() => rest,
        _ if path == "/" => return Reply::text(200, "latest"),
        _ => return Reply::error(404),
    };
    let now = time::OffsetDateTime::now_utc();
    match rest {
        "" => Reply::text(200, "dynamic\nmeta-data\nuser-data"),
        "meta-data" | "meta-data/" => Reply::text(200, "ami-id\niam/\ninstance-id\nplacement/"),
        "meta-data/instance-id" => Reply::text(200, INSTANCE_ID),
        "meta-data/placement/region" => Reply::text(200, REGION),
        "meta-data/iam" | "meta-data/iam/" => Reply::text(200, "info\nsecurity-credentials/"),
        "meta-data/iam/info" => json(serde_json::json!({
            "Code": "Success",
            "LastUpdated": imds_time(now),
            "InstanceProfileArn": INSTANCE_PROFILE_ARN,
            "InstanceProfileId": "AIPAFAKENODEPROFILE01",
        })),
        "meta-data/iam/security-credentials" | "meta-data/iam/security-credentials/" => {
            Reply::text(200, NODE_ROLE)
        }
        r if r
            .strip_prefix("meta-data/iam/security-credentials/")
            .is_some_and(|role| role.trim_end_matches('/') == NODE_ROLE) =>
        {
            json(serde_json::json!({
                "Code": "Success",
                "LastUpdated": imds_time(now),
                "Type": "AWS-HMAC",
                "AccessKeyId": format!("ASIA{NODE_MARKER}"),
                "SecretAccessKey": format!("{NODE_MARKER}/secretsecretsecret"),
                "Token": format!("IQoJb3JpZ2luX2VjE{NODE_MARKER}nodesessiontoken=="),
                "Expiration": imds_time(now + time::Duration::hours(6)),
            }))
        }
        "user-data" => Reply::text(200, format!("#!/bin/bash\nNODE_SECRET={NODE_MARKER}\n")),
        "dynamic/instance-identity/document" => json(serde_json::json!({
            "accountId": ACCOUNT_ID,
            "architecture": "x86_64",
            "availabilityZone": "us-east-1a",
            "imageId": "ami-0fake000000000001",
            "instanceId": INSTANCE_ID,
            "instanceType": "m5.large",
            "privateIp": "10.0.0.10",
            "region": REGION,
            "version": "2017-09-30",
        })),
        _ => Reply::error(404),
    }
}

fn json(v: serde_json::Value) -> Reply {
    let body = serde_json::to_vec_pretty(&v).expect("json");
    Reply::text(200, body)
}

/// IMDS timestamps: UTC, whole seconds, literal `Z`.
fn imds_time(t: time::OffsetDateTime) -> String {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&f).expect("format time")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn token_ttl_bounds_are_enforced() {
        let t = Tokens::default();
        for (ttl, status) in [
            ("0", 400),
            ("1", 200),
            ("21600", 200),
            ("21601", 400),
            ("x", 400),
        ] {
            let r = route(
                "PUT",
                "/latest/api/token",
                &h(&[(TTL_HEADER, ttl)]),
                &t,
                false,
            );
            assert_eq!(r.status, status, "ttl {ttl}");
        }
        assert_eq!(
            route("PUT", "/latest/api/token", &[], &t, false).status,
            400
        );
        assert_eq!(
            route("PUT", "/2021-01-03/api/token", &[], &t, false).status,
            403
        );
    }

    #[test]
    fn credentials_carry_the_marker_and_imds_timestamps() {
        let t = Tokens::default();
        let path = "/2016-09-02/meta-data/iam/security-credentials/node-role/";
        let r = route("GET", path, &[], &t, false);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        for k in ["AccessKeyId", "SecretAccessKey", "Token"] {
            assert!(v[k].as_str().unwrap().contains(NODE_MARKER), "{k}");
        }
        let exp = v["Expiration"].as_str().unwrap();
        assert!(exp.len() == 20 && exp.ends_with('Z'), "{exp}");
    }

    #[test]
    fn invalid_token_is_401_even_when_optional() {
        let t = Tokens::default();
        let bad = h(&[(TOKEN_HEADER, "nope")]);
        assert_eq!(
            route("GET", "/latest/meta-data/instance-id", &bad, &t, false).status,
            401
        );
        let good = h(&[(TOKEN_HEADER, &t.mint(Duration::from_secs(5)))]);
        assert_eq!(
            route("GET", "/latest/meta-data/instance-id", &good, &t, true).status,
            200
        );
        let expired = h(&[(TOKEN_HEADER, &t.mint(Duration::ZERO))]);
        assert_eq!(
            route("GET", "/latest/meta-data/instance-id", &expired, &t, false).status,
            401
        );
    }

    #[test]
    fn unknown_paths_are_404_html() {
        let r = route(
            "GET",
            "/latest/meta-data/nope",
            &[],
            &Tokens::default(),
            false,
        );
        assert_eq!((r.status, r.content_type), (404, "text/html"));
        assert!(
            String::from_utf8(r.body)
                .unwrap()
                .contains("404 - Not Found")
        );
    }
}
