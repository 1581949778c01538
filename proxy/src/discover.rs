//! `--auto-discover-base-arn` / `--auto-discover-default-role`: ask the instance metadata
//! service (at `--metadata-addr`) for the node's instance profile and role, once at start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn http(addr: SocketAddr, host: &str, req: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("cannot reach the instance metadata service at {host}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).ok();
    s.set_write_timeout(Some(TIMEOUT)).ok();
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Err(format!(
                "malformed answer from the instance metadata service at {host}"
            ));
        }
    };
    Ok((
        resp.code.unwrap_or(0),
        String::from_utf8_lossy(&raw[head..]).into_owned(),
    ))
}

/// Fetches a metadata path, with an IMDSv2 token when the service offers one.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Result<String, String> {
    let token = match http(
        addr,
        host,
        &format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: {host}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    ) {
        Ok((200, t)) => Some(t.trim().to_owned()),
        _ => None,
    };
    let auth = token
        .map(|t| format!("X-aws-ec2-metadata-token: {t}\r\n"))
        .unwrap_or_default();
    match http(
        addr,
        host,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"),
    )? {
        (200, body) => Ok(body),
        (code, _) => Err(format!(
            "the instance metadata service at {host} answered {code} for {path}"
        )),
    }
}

/// `arn:aws:iam::ACCOUNT:role/` from `iam/info`'s InstanceProfileArn.
pub fn base_arn(addr: SocketAddr, host: &str) -> Result<String, String> {
    let info = get(addr, host, "/latest/meta-data/iam/info")?;
    let v: serde_json::Value =
        serde_json::from_str(&info).map_err(|e| format!("iam/info is not JSON: {e}"))?;
    let profile = v["InstanceProfileArn"]
        .as_str()
        .ok_or("iam/info has no InstanceProfileArn; does the node have an instance profile?")?;
    base_arn_from_profile(profile)
        .ok_or_else(|| format!("cannot derive a base role ARN from {profile:?}"))
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

/// The node's own role name (the default role for `--auto-discover-default-role`).
pub fn instance_role(addr: SocketAddr, host: &str) -> Result<String, String> {
    let list = get(addr, host, "/latest/meta-data/iam/security-credentials/")?;
    list.lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| "the node has no IAM role".into())
}

#[cfg(test)]
mod tests {
    use super::*;

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
