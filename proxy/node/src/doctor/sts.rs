//! STS: AssumeRole of a test role with the agent's own credentials.

use super::Check;
use crate::imds::{Client, MetadataAddr};
use iamlet_resolver::probe::{self, StsProbeError};

/// What the STS check needs of the agent's flags.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `doctor --test-role`, else the agent's `--default-role`.
    pub role: Option<String>,
    pub base_role_arn: Option<String>,
    /// `--auto-discover-base-arn` or `--auto-discover-default-role`: the base ARN comes
    /// from the metadata service.
    pub discover_base_arn: bool,
}

pub fn check(flags: &Flags, metadata: Option<&MetadataAddr>) -> Check {
    const N: &str = "sts";
    let Some(role) = flags.role.as_deref().filter(|r| !r.is_empty()) else {
        return Check::warn(
            N,
            "AssumeRole not tried: pass --test-role=ROLE (a role the node's role may assume) to check STS",
        );
    };
    let Some(metadata) = metadata else {
        return Check::fail(N, "cannot check STS: --metadata-addr is invalid");
    };
    let arn = if role.starts_with("arn:") {
        role.to_owned()
    } else {
        let mut base = flags.base_role_arn.clone();
        if base.is_none()
            && flags.discover_base_arn
            && let Ok(client) = Client::new(metadata)
        {
            base = client.base_arn().ok();
        }
        match iamlet_resolver::RoleRules::new(base.as_deref(), None) {
            Ok(r) if r.base_arn().is_some() => r.role_arn(role),
            _ => {
                return Check::fail(
                    N,
                    format!(
                        "cannot turn {role:?} into a role ARN: pass a full ARN, --base-role-arn, or --auto-discover-base-arn"
                    ),
                );
            }
        }
    };
    match probe::assume_role(metadata.hostport(), &arn) {
        Ok(region) => Check::ok(N, format!("AssumeRole of {arn} works (region {region})")),
        Err(StsProbeError::Call(e)) => Check::fail(
            N,
            format!(
                "AssumeRole of {arn} failed ({e}); the node's role needs sts:AssumeRole on it, and the role's trust policy must trust the node's role"
            ),
        ),
        Err(e) => Check::fail(N, e.to_string()),
    }
}
