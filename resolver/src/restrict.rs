//! Namespace restrictions, as kube2iam's `--namespace-restrictions`: a namespace lists the
//! roles its pods may take in an annotation (default `iam.amazonaws.com/allowed-roles`), a
//! JSON array of globs or regular expressions. Pure; patterns are compiled once per
//! annotation value.
//!
//! kube2iam's rules, kept exactly: the default role always passes; a namespace that is
//! unknown, has no annotation, or has an annotation that is not a JSON array of strings
//! allows nothing; each pattern is normalised like a pod's role (a bare name is joined to the
//! base ARN, `arn:…` is kept) and matched against the pod's resolved role ARN — globs with
//! `*` as the only wildcard over the whole ARN (ryanuber/go-glob), regexps as an unanchored
//! search (Go's `regexp.MatchString`). One change (kube2iam #341): a pattern starting with
//! `^` is used unmodified, so anchored regexps can be written against the full ARN.

use crate::roles::RoleRules;
use regex::Regex;

/// `--namespace-restriction-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestrictionFormat {
    #[default]
    Glob,
    Regexp,
}

/// `--namespace-restrictions` on, with its annotation key and pattern format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRestrictions {
    /// `--namespace-key`.
    pub key: String,
    pub format: RestrictionFormat,
}

impl Default for NamespaceRestrictions {
    fn default() -> Self {
        NamespaceRestrictions {
            key: "iam.amazonaws.com/allowed-roles".into(),
            format: RestrictionFormat::Glob,
        }
    }
}

#[derive(Debug, Clone)]
enum Pattern {
    Glob(String),
    Regex(Regex),
    /// A regexp that does not compile: matches nothing (kube2iam logs and skips it).
    Invalid,
}

/// One namespace's parsed annotation.
#[derive(Debug, Clone)]
pub struct AllowedRoles {
    /// The patterns as written (for `/debug/store`).
    pub raw: Vec<String>,
    patterns: Vec<Pattern>,
    /// Why the annotation allows nothing, when it is missing or malformed.
    problem: Option<Problem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    Missing,
    NotAnArray,
}

impl AllowedRoles {
    /// Parses an annotation value; `None` or `""` allows nothing.
    pub fn parse(value: Option<&str>, format: RestrictionFormat, rules: &RoleRules) -> Self {
        let raw: Vec<String> = match value.map(str::trim).filter(|v| !v.is_empty()) {
            None => return AllowedRoles::nothing(Problem::Missing),
            Some(v) => match serde_json::from_str(v) {
                Ok(list) => list,
                Err(_) => return AllowedRoles::nothing(Problem::NotAnArray),
            },
        };
        let patterns = raw
            .iter()
            .map(|p| {
                let normalized = normalize(p, rules);
                match format {
                    RestrictionFormat::Glob => Pattern::Glob(normalized),
                    RestrictionFormat::Regexp => {
                        Regex::new(&normalized).map_or(Pattern::Invalid, Pattern::Regex)
                    }
                }
            })
            .collect();
        AllowedRoles {
            raw,
            patterns,
            problem: None,
        }
    }

    fn nothing(problem: Problem) -> Self {
        AllowedRoles {
            raw: Vec::new(),
            patterns: Vec::new(),
            problem: Some(problem),
        }
    }

    /// Whether some pattern matches `arn`.
    pub fn allows(&self, arn: &str) -> bool {
        self.patterns.iter().any(|p| match p {
            Pattern::Glob(g) => glob(g, arn),
            Pattern::Regex(r) => r.is_match(arn),
            Pattern::Invalid => false,
        })
    }
}

/// A pattern as kube2iam normalises it (`iam.RoleARN`), except that `^…` is kept as is.
fn normalize(pattern: &str, rules: &RoleRules) -> String {
    if pattern.starts_with('^') || pattern.to_ascii_lowercase().starts_with("arn:") {
        return pattern.to_owned();
    }
    match rules.base_arn() {
        Some(base) => format!("{base}{pattern}"),
        None => pattern.to_owned(),
    }
}

/// ryanuber/go-glob: `*` is the only wildcard and the whole subject must match.
pub fn glob(pattern: &str, subject: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return subject == pattern;
    }
    let leading = pattern.starts_with('*');
    let trailing = pattern.ends_with('*');
    let last = parts.len() - 1;
    let mut rest = subject;
    for (i, part) in parts[..last].iter().enumerate() {
        let Some(idx) = rest.find(part) else {
            return false;
        };
        if i == 0 && !leading && idx != 0 {
            return false;
        }
        rest = &rest[idx + part.len()..];
    }
    trailing || rest.ends_with(parts[last])
}

/// The verdict for a pod: `None` allowed, `Some(reason)` denied. `allowed` is the pod
/// namespace's parsed annotation, `None` when iamlet has not seen the namespace.
pub fn check(
    rules: &RoleRules,
    restrictions: &NamespaceRestrictions,
    role_arn: &str,
    namespace: &str,
    allowed: Option<&AllowedRoles>,
) -> Option<String> {
    if rules.default_role() == Some(role_arn) {
        return None;
    }
    let key = &restrictions.key;
    let Some(allowed) = allowed else {
        return Some(format!(
            "namespace {namespace} is not known to iamlet, so no role is allowed in it"
        ));
    };
    match allowed.problem {
        Some(Problem::Missing) => Some(format!(
            "namespace {namespace} allows no roles: its {key} annotation is missing or empty"
        )),
        Some(Problem::NotAnArray) => Some(format!(
            "namespace {namespace} allows no roles: its {key} annotation is not a JSON array of strings"
        )),
        None if allowed.allows(role_arn) => None,
        None => Some(format!(
            "role {role_arn} is not allowed in namespace {namespace} by its {key} annotation"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn rules(default: Option<&str>) -> RoleRules {
        RoleRules::new(Some(BASE), default).unwrap()
    }

    fn verdict(format: RestrictionFormat, annotation: Option<&str>, role: &str) -> bool {
        let r = rules(Some("fallback"));
        let restr = NamespaceRestrictions {
            key: "k".into(),
            format,
        };
        let allowed = AllowedRoles::parse(annotation, format, &r);
        check(&r, &restr, &r.role_arn(role), "ns", Some(&allowed)).is_none()
    }

    #[test]
    fn go_glob_table() {
        for (pattern, subject, want) in [
            ("*", "anything", true),
            ("", "", true),
            ("", "x", false),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("ab*", "abcd", true),
            ("*cd", "abcd", true),
            ("*bc*", "abcd", true),
            ("a*d", "abcd", true),
            ("a*d", "abcde", false),
            ("a*c*e", "abcde", true),
            ("a*a", "a", false),
            ("*x*", "abc", false),
            ("b*", "abc", false),
        ] {
            assert_eq!(glob(pattern, subject), want, "{pattern:?} vs {subject:?}");
        }
    }

    #[test]
    fn glob_patterns_are_joined_to_the_base_arn() {
        use RestrictionFormat::Glob;
        let a = Some(r#"["app-*", "arn:aws:iam::210987654321:role/cross"]"#);
        assert!(verdict(Glob, a, "app-web"));
        assert!(verdict(Glob, a, "arn:aws:iam::123456789012:role/app-web"));
        assert!(!verdict(Glob, a, "admin"));
        assert!(!verdict(Glob, a, "web-app-x"));
        assert!(verdict(Glob, a, "arn:aws:iam::210987654321:role/cross"));
        assert!(!verdict(Glob, a, "arn:aws:iam::210987654321:role/crossed"));
        // A role in another account never matches a bare-name pattern.
        assert!(!verdict(Glob, a, "arn:aws:iam::999999999999:role/app-web"));
    }

    #[test]
    fn regexp_patterns_search_unanchored_as_kube2iam_does() {
        use RestrictionFormat::Regexp;
        let a = Some(r#"["app-.*"]"#);
        assert!(verdict(Regexp, a, "app-web"));
        assert!(!verdict(Regexp, a, "admin"));
        // Go's MatchString is a search: a prefix pattern also matches longer names.
        assert!(verdict(Regexp, Some(r#"["app"]"#), "app-admin"));
        // kube2iam #341: `^…` joined to the base ARN could never match; here it is used as is.
        let anchored = Some(r#"["^arn:aws:iam::123456789012:role/app-[a-z]+$"]"#);
        assert!(verdict(Regexp, anchored, "app-web"));
        assert!(!verdict(Regexp, anchored, "app-web2"));
        assert!(!verdict(
            Regexp,
            anchored,
            "arn:aws:iam::210987654321:role/app-web"
        ));
        let full = Some(r#"["arn:aws:iam::210987654321:role/team-.*"]"#);
        assert!(verdict(
            Regexp,
            full,
            "arn:aws:iam::210987654321:role/team-a"
        ));
        assert!(!verdict(Regexp, full, "team-a"));
    }

    #[test]
    fn an_invalid_regexp_matches_nothing_but_the_others_still_count() {
        use RestrictionFormat::Regexp;
        assert!(!verdict(Regexp, Some(r#"["app-("]"#), "app-("));
        assert!(verdict(Regexp, Some(r#"["app-(", "web"]"#), "web"));
    }

    #[test]
    fn missing_empty_or_malformed_annotations_allow_nothing() {
        use RestrictionFormat::Glob;
        for a in [
            None,
            Some(""),
            Some("  "),
            Some("app-*"),
            Some(r#"{"a":1}"#),
            Some("[1]"),
            Some("[]"),
        ] {
            assert!(!verdict(Glob, a, "app-web"), "{a:?}");
        }
    }

    #[test]
    fn the_default_role_bypasses_restrictions_even_in_unknown_namespaces() {
        let r = rules(Some("fallback"));
        let restr = NamespaceRestrictions::default();
        assert_eq!(
            check(&r, &restr, &format!("{BASE}fallback"), "nowhere", None),
            None
        );
        let why = check(&r, &restr, &format!("{BASE}app"), "nowhere", None).unwrap();
        assert!(why.contains("namespace nowhere is not known"), "{why}");
    }

    #[test]
    fn reasons_name_the_role_namespace_and_annotation() {
        let r = rules(None);
        let restr = NamespaceRestrictions::default();
        let allowed = AllowedRoles::parse(Some(r#"["web"]"#), RestrictionFormat::Glob, &r);
        let why = check(&r, &restr, &format!("{BASE}app"), "shop", Some(&allowed)).unwrap();
        assert_eq!(
            why,
            "role arn:aws:iam::123456789012:role/app is not allowed in namespace shop by its iam.amazonaws.com/allowed-roles annotation"
        );
        let none = AllowedRoles::parse(None, RestrictionFormat::Glob, &r);
        let why = check(&r, &restr, &format!("{BASE}app"), "shop", Some(&none)).unwrap();
        assert!(why.contains("missing or empty"), "{why}");
        let bad = AllowedRoles::parse(Some("[web]"), RestrictionFormat::Glob, &r);
        let why = check(&r, &restr, &format!("{BASE}app"), "shop", Some(&bad)).unwrap();
        assert!(why.contains("not a JSON array"), "{why}");
    }

    #[test]
    fn without_a_base_arn_patterns_match_the_role_as_written() {
        let r = RoleRules::new(None, None).unwrap();
        let allowed = AllowedRoles::parse(Some(r#"["app-*"]"#), RestrictionFormat::Glob, &r);
        assert!(allowed.allows("app-web"));
        assert!(!allowed.allows("arn:aws:iam::123456789012:role/app-web"));
    }
}
