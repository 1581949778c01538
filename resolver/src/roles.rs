//! Role rules: which IAM role ARN a pod gets, and how the role is named back to it.
//!
//! Pure functions of configuration and annotations, kube2iam-compatible. [`RoleRules::pod_role`]
//! is the one place a pod's role is decided, whichever door (IMDS or the container
//! credentials endpoint) asks.

use thiserror::Error;

/// Errors in role configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RoleConfigError {
    #[error(
        "--base-role-arn {0:?} is not a role ARN prefix; expected arn:aws:iam::<12-digit account>:role/ (optionally with a path), e.g. arn:aws:iam::123456789012:role/"
    )]
    InvalidBaseArn(String),
}

/// Where a pod's role came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleSource {
    /// The pod's `--iam-role-key` annotation.
    Pod,
    /// Its ServiceAccount's `--service-account-role-key` annotation.
    ServiceAccount,
    /// `--default-role`.
    Default,
}

/// The role a pod gets ([`RoleRules::pod_role`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRole {
    /// Full role ARN.
    pub arn: String,
    pub source: RoleSource,
    /// The ServiceAccount's role, when the pod's annotation named a different one and won
    /// (reported as an `IamRoleConflict` Event).
    pub overridden: Option<String>,
}

/// How annotations map to role ARNs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleRules {
    /// Always ends with `/` when set.
    base_arn: Option<String>,
    /// Already resolved to a full ARN.
    default_role: Option<String>,
}

impl RoleRules {
    /// Builds the rules; the base ARN is validated and given a trailing `/`.
    pub fn new(
        base_arn: Option<&str>,
        default_role: Option<&str>,
    ) -> Result<Self, RoleConfigError> {
        let base_arn = match base_arn.filter(|b| !b.is_empty()) {
            Some(b) => {
                if !is_valid_base_arn(b) {
                    return Err(RoleConfigError::InvalidBaseArn(b.to_owned()));
                }
                Some(if b.ends_with('/') {
                    b.to_owned()
                } else {
                    format!("{b}/")
                })
            }
            None => None,
        };
        let mut rules = RoleRules {
            base_arn,
            default_role: None,
        };
        rules.default_role = default_role
            .filter(|r| !r.is_empty())
            .map(|r| rules.role_arn(r));
        Ok(rules)
    }

    pub fn base_arn(&self) -> Option<&str> {
        self.base_arn.as_deref()
    }

    pub fn default_role(&self) -> Option<&str> {
        self.default_role.as_deref()
    }

    /// A value starting with `arn:` is used as is; otherwise it is joined to the base ARN.
    pub fn role_arn(&self, role: &str) -> String {
        let role = role.trim();
        if role.starts_with("arn:") {
            return role.to_owned();
        }
        match &self.base_arn {
            Some(base) => format!("{base}{}", role.trim_start_matches('/')),
            None => role.to_owned(),
        }
    }

    /// The role a pod gets from its annotation value, or the default role.
    pub fn resolve(&self, annotation: Option<&str>) -> Option<String> {
        match annotation.map(str::trim).filter(|a| !a.is_empty()) {
            Some(a) => Some(self.role_arn(a)),
            None => self.default_role.clone(),
        }
    }

    /// The role a pod gets: its own annotation (a bare name joined to the base ARN, `arn:…`
    /// as is), else its ServiceAccount's annotation (a full ARN, always used as is: EKS's
    /// annotation has no base ARN), else the default role. The pod annotation wins; when the
    /// ServiceAccount names a different role, that role is returned in `overridden`.
    pub fn pod_role(&self, pod: Option<&str>, service_account: Option<&str>) -> Option<PodRole> {
        fn present(v: Option<&str>) -> Option<&str> {
            v.map(str::trim).filter(|v| !v.is_empty())
        }
        let sa = present(service_account);
        match (present(pod), sa) {
            (Some(p), _) => {
                let arn = self.role_arn(p);
                Some(PodRole {
                    overridden: sa.filter(|s| *s != arn).map(str::to_owned),
                    arn,
                    source: RoleSource::Pod,
                })
            }
            (None, Some(s)) => Some(PodRole {
                arn: s.to_owned(),
                source: RoleSource::ServiceAccount,
                overridden: None,
            }),
            (None, None) => Some(PodRole {
                arn: self.default_role.clone()?,
                source: RoleSource::Default,
                overridden: None,
            }),
        }
    }

    /// What the role listing shows: the name below the base ARN, or the full ARN for a role
    /// elsewhere (another account, or no base ARN configured).
    pub fn listing_name<'a>(&self, arn: &'a str) -> &'a str {
        match &self.base_arn {
            Some(base) => arn
                .strip_prefix(base.as_str())
                .filter(|r| !r.is_empty())
                .unwrap_or(arn),
            None => arn,
        }
    }

    /// Whether the role named in a request path (a bare name or a full ARN) is `arn`.
    /// Same answer as `self.role_arn(requested) == arn`, without allocating (it runs on every
    /// credentials request).
    pub fn names(&self, requested: &str, arn: &str) -> bool {
        let role = requested.trim();
        if role.is_empty() {
            return false;
        }
        if role.starts_with("arn:") {
            return role == arn;
        }
        match &self.base_arn {
            Some(base) => arn.strip_prefix(base.as_str()) == Some(role.trim_start_matches('/')),
            None => role == arn,
        }
    }
}

/// `arn:<partition>:iam::<12 digits>:role/<optional path>`, as kube2iam's `ARNRegexp`.
pub fn is_valid_base_arn(arn: &str) -> bool {
    let Some(rest) = arn.strip_prefix("arn:") else {
        return false;
    };
    let Some((partition, rest)) = rest.split_once(':') else {
        return false;
    };
    if !partition.starts_with("aws")
        || !partition
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return false;
    }
    let Some(rest) = rest.strip_prefix("iam::") else {
        return false;
    };
    let Some((account, rest)) = rest.split_once(':') else {
        return false;
    };
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let Some(path) = rest.strip_prefix("role") else {
        return false;
    };
    path.is_empty()
        || (path.starts_with('/')
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/+=,.@_-".contains(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    #[test]
    fn bare_name_is_joined_to_base_arn() {
        let r = RoleRules::new(Some(BASE), None).unwrap();
        assert_eq!(r.resolve(Some("app")), Some(format!("{BASE}app")));
        assert_eq!(r.resolve(Some("/app")), Some(format!("{BASE}app")));
        assert_eq!(r.resolve(Some("team/app")), Some(format!("{BASE}team/app")));
    }

    #[test]
    fn full_arn_is_used_as_is() {
        let r = RoleRules::new(Some(BASE), None).unwrap();
        let other = "arn:aws:iam::210987654321:role/cross";
        assert_eq!(r.resolve(Some(other)).as_deref(), Some(other));
        assert_eq!(r.listing_name(other), other);
    }

    #[test]
    fn base_arn_gets_trailing_slash() {
        let r = RoleRules::new(Some("arn:aws:iam::123456789012:role"), None).unwrap();
        assert_eq!(r.base_arn(), Some(BASE));
        let r = RoleRules::new(Some("arn:aws:iam::123456789012:role/path"), Some("d")).unwrap();
        assert_eq!(
            r.default_role(),
            Some("arn:aws:iam::123456789012:role/path/d")
        );
    }

    #[test]
    fn missing_or_empty_annotation_falls_back_to_default_role() {
        let r = RoleRules::new(Some(BASE), Some("fallback")).unwrap();
        assert_eq!(r.resolve(None), Some(format!("{BASE}fallback")));
        assert_eq!(r.resolve(Some("  ")), Some(format!("{BASE}fallback")));
        let none = RoleRules::new(Some(BASE), None).unwrap();
        assert_eq!(none.resolve(None), None);
    }

    #[test]
    fn the_pod_annotation_wins_then_the_service_account_then_the_default() {
        let r = RoleRules::new(Some(BASE), Some("fallback")).unwrap();
        let sa = "arn:aws:iam::210987654321:role/from-sa";
        let role = |pod, sa| r.pod_role(pod, sa).unwrap();
        // Pod annotation only, both, the ServiceAccount only, neither.
        assert_eq!(
            role(Some("app"), None),
            PodRole {
                arn: format!("{BASE}app"),
                source: RoleSource::Pod,
                overridden: None
            }
        );
        assert_eq!(
            role(Some("app"), Some(sa)),
            PodRole {
                arn: format!("{BASE}app"),
                source: RoleSource::Pod,
                overridden: Some(sa.into())
            }
        );
        assert_eq!(
            role(Some(" "), Some(sa)),
            PodRole {
                arn: sa.into(),
                source: RoleSource::ServiceAccount,
                overridden: None
            },
            "an empty pod annotation is no annotation"
        );
        assert_eq!(
            role(None, Some("  ")),
            PodRole {
                arn: format!("{BASE}fallback"),
                source: RoleSource::Default,
                overridden: None
            }
        );
        // Both naming the same role is no conflict, whichever way the pod spells it.
        let same = format!("{BASE}app");
        assert_eq!(role(Some("app"), Some(&same)).overridden, None);
        assert_eq!(role(Some(&same), Some(&same)).overridden, None);
        // The base ARN is never joined to the ServiceAccount's value: it is used as is.
        assert_eq!(role(None, Some("bare")).arn, "bare");
        // No default role: a pod with neither annotation has no role.
        let none = RoleRules::new(Some(BASE), None).unwrap();
        assert_eq!(none.pod_role(None, None), None);
        assert_eq!(none.pod_role(None, Some(sa)).unwrap().arn, sa);
    }

    #[test]
    fn listing_strips_base_arn() {
        let r = RoleRules::new(Some(BASE), None).unwrap();
        assert_eq!(r.listing_name(&format!("{BASE}team/app")), "team/app");
        let no_base = RoleRules::new(None, None).unwrap();
        assert_eq!(
            no_base.listing_name(&format!("{BASE}app")),
            format!("{BASE}app")
        );
    }

    #[test]
    fn requested_role_matches_by_name_or_arn() {
        let r = RoleRules::new(Some(BASE), None).unwrap();
        let arn = format!("{BASE}app");
        assert!(r.names("app", &arn));
        assert!(r.names(&arn, &arn));
        assert!(!r.names("other", &arn));
        assert!(!r.names("", &arn));
        assert!(!r.names("ap", &arn));
        assert!(r.names("/app", &arn));
        assert!(!r.names("app/", &arn));
        // The allocation-free comparison agrees with role_arn() on every shape.
        let no_base = RoleRules::new(None, None).unwrap();
        for rules in [&r, &no_base] {
            for requested in [
                "app",
                "/app",
                " app ",
                "team/app",
                "arn:aws:iam::123456789012:role/app",
                "x",
                "",
            ] {
                for target in [
                    arn.as_str(),
                    "app",
                    "arn:aws:iam::123456789012:role/team/app",
                ] {
                    let want = !requested.trim().is_empty() && rules.role_arn(requested) == target;
                    assert_eq!(
                        rules.names(requested, target),
                        want,
                        "{requested:?} vs {target:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn base_arn_validation_table() {
        for (arn, ok) in [
            ("arn:aws:iam::123456789012:role/", true),
            ("arn:aws:iam::123456789012:role", true),
            ("arn:aws-cn:iam::123456789012:role/", true),
            ("arn:aws-us-gov:iam::123456789012:role/some/path/", true),
            ("arn:aws:iam::12345678901:role/", false),
            ("arn:aws:iam::1234567890123:role/", false),
            ("arn:aws:iam:us-east-1:123456789012:role/", false),
            ("arn:aws:sts::123456789012:role/", false),
            ("arn:aws:iam::123456789012:user/", false),
            ("123456789012", false),
            ("", false),
        ] {
            assert_eq!(is_valid_base_arn(arn), ok, "{arn}");
        }
        assert!(matches!(
            RoleRules::new(Some("nope"), None),
            Err(RoleConfigError::InvalidBaseArn(_))
        ));
    }
}
