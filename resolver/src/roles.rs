//! Role rules: which IAM role ARN a pod gets, and how the role is named back to it.
//!
//! Pure functions of configuration and annotations, kube2iam-compatible.

use thiserror::Error;

/// Errors in role configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RoleConfigError {
    #[error(
        "--base-role-arn {0:?} is not a role ARN prefix; expected arn:aws:iam::<12-digit account>:role/ (optionally with a path), e.g. arn:aws:iam::123456789012:role/"
    )]
    InvalidBaseArn(String),
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
