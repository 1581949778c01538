//! The node's metadata service as iamlet reaches it (tokens, IMDSv2 required), and the
//! agent's region.

use super::Check;
use crate::imds::{Answer, Client, MetadataAddr};

/// The upstream metadata service: reachable, tokens, IMDSv2 required; and its region.
pub fn check(addr: &MetadataAddr) -> (Check, Option<String>) {
    const N: &str = "imds";
    let hostport = addr.hostport();
    let client = match Client::new(addr) {
        Ok(c) => c,
        Err(e) => return (Check::fail(N, e.to_string()), None),
    };
    let token = match client.token() {
        Ok(Answer { status: 200, body }) => Ok(body.trim().to_owned()),
        Ok(Answer { status, .. }) => Err(format!("the token PUT got {status}")),
        Err(e) if e.timed_out() => {
            Err("the token PUT timed out (the instance's http-put-response-hop-limit is too low for where this runs; iamlet needs hostNetwork: true)".to_owned())
        }
        Err(e) => {
            let why = match e {
                crate::imds::ImdsError::Connect { error, .. }
                | crate::imds::ImdsError::Exchange { error, .. } => error.to_string(),
                other => other.to_string(),
            };
            return (
                Check::fail(N, format!("cannot reach the metadata service at --metadata-addr {hostport}: {why}; check the instance's metadata options (http-endpoint=enabled) and that iamlet runs with hostNetwork: true")),
                None,
            );
        }
    };
    let path = "/latest/meta-data/instance-id";
    let v1 = client.get_with(path, None);
    let tok = token.as_ref().ok().map(String::as_str);
    let id = client.get_with(path, tok);
    let region = client
        .get_with("/latest/meta-data/placement/region", tok)
        .ok()
        .filter(|a| a.status == 200)
        .map(|a| a.body.trim().to_owned());
    let check = match (&token, &v1, &id) {
        (
            Ok(_),
            Ok(Answer { status: 401, .. }),
            Ok(Answer {
                status: 200,
                body: id,
            }),
        ) => Check::ok(
            N,
            format!(
                "{hostport} answers (instance {}); IMDSv2 is required, iamlet adds its own token upstream, so tokenless pods keep working and pods need no hop-limit change",
                id.trim()
            ),
        ),
        (
            Ok(_),
            _,
            Ok(Answer {
                status: 200,
                body: id,
            }),
        ) => Check::ok(
            N,
            format!(
                "{hostport} answers (instance {}); session tokens supported, IMDSv1 allowed",
                id.trim()
            ),
        ),
        (
            Err(why),
            Ok(Answer {
                status: 200,
                body: id,
            }),
            _,
        ) => Check::warn(
            N,
            format!(
                "{hostport} answers (instance {}) but {why}; pods' IMDSv2 requests are answered by iamlet itself",
                id.trim()
            ),
        ),
        (_, _, Ok(Answer { status: code, .. })) => Check::fail(
            N,
            format!(
                "{hostport} answered {code} for /latest/meta-data/instance-id; is --metadata-addr the instance metadata service?"
            ),
        ),
        (_, _, Err(e)) => Check::fail(N, format!("{hostport} did not answer a metadata GET: {e}")),
    };
    (check, region)
}

/// The agent's region: from the environment, or (fragile) from instance metadata.
pub fn check_region(env: impl Fn(&str) -> Option<String>, from_imds: Option<&str>) -> Check {
    const N: &str = "region";
    for k in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        if let Some(v) = env(k).filter(|v| !v.is_empty()) {
            return Check::ok(N, format!("{k}={v}"));
        }
    }
    match from_imds {
        Some(r) => Check::warn(
            N,
            format!(
                "AWS_REGION is not set; the instance metadata says {r}; set AWS_REGION in the DaemonSet so STS calls do not depend on it"
            ),
        ),
        None => Check::fail(
            N,
            "no region: AWS_REGION is not set and the instance metadata does not say; set AWS_REGION in the DaemonSet",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn region_from_env_wins_then_imds_then_fails() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                set.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = check_region(env(&[("AWS_REGION", "us-west-2")]), Some("eu-west-1"));
        assert_eq!(
            (c.level, c.text.as_str()),
            (Level::Ok, "AWS_REGION=us-west-2")
        );
        let c = check_region(
            env(&[("AWS_REGION", ""), ("AWS_DEFAULT_REGION", "ap-south-1")]),
            None,
        );
        assert_eq!(
            (c.level, c.text.as_str()),
            (Level::Ok, "AWS_DEFAULT_REGION=ap-south-1")
        );
        let c = check_region(env(&[]), Some("eu-west-1"));
        assert_eq!(c.level, Level::Warn, "{c}");
        assert!(
            c.text.contains("the instance metadata says eu-west-1"),
            "{c}"
        );
        let c = check_region(env(&[]), None);
        assert_eq!(c.level, Level::Fail, "{c}");
        assert!(c.text.starts_with("no region"), "{c}");
    }
}
