//! Request targets → canonical paths → routes. Pure functions; every routing, deny and
//! forwarding decision uses the canonical path.

use std::borrow::Cow;

/// Why a target was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAPath,
    BadEscape,
    EncodedSeparator,
    Backslash,
    ControlByte,
    AboveRoot,
}

/// Canonicalises a request target: absolute-form targets keep only their path; query and
/// fragment are dropped; `//` collapses; `.`/`..` resolve; percent-escapes of unreserved
/// characters are decoded. Encoded `/`, `\`, NUL or control bytes, raw backslashes, bad
/// escapes and `..` above the root are errors. Borrowed when already canonical.
pub fn canonicalize(target: &str) -> Result<Cow<'_, str>, PathError> {
    let mut path = target;
    if let Some(rest) = path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
    {
        // The authority ends at the first `/`, `?` or `#`; without a `/` the path is empty.
        path = match rest.find(['/', '?', '#']) {
            Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
            _ => "/",
        };
    }
    let end = path
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    let path = &path[..end];
    if !path.starts_with('/') {
        return Err(PathError::NotAPath);
    }
    // One pass over the path (every request takes it): a control byte anywhere refuses it,
    // then a backslash; an escape, an empty segment or a dot segment means it needs work.
    let bytes = path.as_bytes();
    let (mut backslash, mut needs_work) = (false, false);
    let mut segment = 0;
    for i in 0..=bytes.len() {
        // The end of the path ends its last segment like a slash.
        match bytes.get(i).copied().unwrap_or(b'/') {
            0..0x20 | 0x7f => return Err(PathError::ControlByte),
            b'\\' => backslash = true,
            b'%' => needs_work = true,
            b'/' => {
                let seg = &bytes[segment..i];
                // `.` and `..` anywhere; an empty segment between two slashes (`//`).
                needs_work |=
                    seg == b"." || seg == b".." || (seg.is_empty() && i > 0 && i < bytes.len());
                segment = i + 1;
            }
            _ => {}
        }
    }
    if backslash {
        return Err(PathError::Backslash);
    }
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in &segments {
        match *seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing || s.is_empty() {
        s.push('/');
    }
    Ok(Cow::Owned(s))
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let v = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::BadEscape)?;
            match v {
                b'/' => return Err(PathError::EncodedSeparator),
                // Double encoding (`%252F`): an upstream that decodes twice would see a
                // different path than the one routed here.
                b'%' => return Err(PathError::BadEscape),
                b'\\' => return Err(PathError::Backslash),
                0..=0x1f | 0x7f => return Err(PathError::ControlByte),
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    out.push(v as char)
                }
                _ => {
                    out.push('%');
                    out.push_str(
                        &hex.iter()
                            .map(|c| c.to_ascii_uppercase() as char)
                            .collect::<String>(),
                    );
                }
            }
            i += 3;
        } else {
            let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    Ok(out)
}

/// Where a canonical path goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Ready,
    Metrics,
    DebugStore,
    /// `PUT /latest/api/token`: mint a pod-bound IMDSv2 token.
    Token,
    /// `/{v}/api/token` for a version other than `latest`: 403, as IMDS does.
    VersionedToken,
    /// `/{v}/meta-data/iam/security-credentials[/]`
    RoleList,
    /// `/{v}/meta-data/iam/security-credentials/{role}[/]`
    Credentials(&'a str),
    /// `/{v}/meta-data/iam/security-credentials-extended/{role}[/]`: the pod's credentials
    /// plus `AccountId`.
    ExtendedCredentials(&'a str),
    /// `/{v}/meta-data/iam/info`: synthesised from the pod's role.
    IamInfo,
    /// Anything else under `iam/`, identity credentials, any other spelling of a credential
    /// path: 404, never forwarded.
    Denied,
    /// user-data in any spelling, version-less included (often the node's bootstrap
    /// secrets): forwarded only with `--allow-user-data`.
    UserData,
    /// The node's signed identity, `dynamic/instance-identity/{pkcs7,signature,rsa2048}` in
    /// any spelling (enough for an aws-ec2 login as the node): forwarded only with
    /// `--allow-instance-identity-signature`. The unsigned document is forwarded.
    IdentitySignature,
    /// Everything else goes to the upstream metadata service.
    Forward,
}

const CREDS: &str = "meta-data/iam/security-credentials";
const CREDS_EXT: &str = "meta-data/iam/security-credentials-extended";

/// `…/{role}[/]` after a credentials prefix: `Some("")` for the listing.
fn role_suffix<'a>(rest: &'a str, prefix: &str) -> Option<&'a str> {
    let after = rest.strip_prefix(prefix)?;
    if after.is_empty() || after == "/" {
        return Some("");
    }
    let role = after.strip_prefix('/')?;
    Some(role.strip_suffix('/').unwrap_or(role))
}

/// Routes a canonical path.
pub fn route(path: &str) -> Route<'_> {
    match path {
        "/healthz" => return Route::Healthz,
        "/ready" => return Route::Ready,
        "/metrics" => return Route::Metrics,
        "/debug/store" => return Route::DebugStore,
        "/latest/api/token" => return Route::Token,
        _ => {}
    }
    // "/{version}/…"
    if let Some((version, rest)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        if rest == "api/token" || rest == "api/token/" {
            return if version == "latest" {
                Route::Token
            } else {
                Route::VersionedToken
            };
        }
        if let Some(role) = role_suffix(rest, CREDS_EXT) {
            return if role.is_empty() {
                Route::Denied
            } else {
                Route::ExtendedCredentials(role)
            };
        }
        if let Some(role) = role_suffix(rest, CREDS) {
            return if role.is_empty() {
                Route::RoleList
            } else {
                Route::Credentials(role)
            };
        }
        if rest == "meta-data/iam/info" || rest == "meta-data/iam/info/" {
            return Route::IamInfo;
        }
    }
    if is_sensitive(path) {
        return Route::Denied;
    }
    // One check per class of secret, over the whole canonical path, whatever the case, the
    // version segment (or none), `;params`, or escaped decorations around it: an upstream
    // that trims or ignores those would still read the secret's path. A single tag key is
    // free text and exempt.
    if !is_tag_key(path) {
        if contains_ci(path, "instance-identity")
            && ["pkcs7", "signature", "rsa2048"]
                .iter()
                .any(|n| contains_ci(path, n))
        {
            return Route::IdentitySignature;
        }
        if contains_ci(path, "user-data") {
            return Route::UserData;
        }
    }
    Route::Forward
}

/// Case-insensitive substring test, without allocating.
fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn ends_with_ci(haystack: &str, suffix: &str) -> bool {
    haystack.len() >= suffix.len()
        && haystack.as_bytes()[haystack.len() - suffix.len()..]
            .eq_ignore_ascii_case(suffix.as_bytes())
}

/// `/{v}/meta-data/tags/instance[/KEY]` with at most one plain key segment: tag keys are
/// free text (`Diamond` contains `iam`). A deeper path, or a key with `;params` or made of
/// dots (`..;`, which some servers read as `..`), is not a tag key.
fn is_tag_key(path: &str) -> bool {
    let mut segs = path.split('/').skip(2);
    if !(segs
        .next()
        .is_some_and(|s| s.eq_ignore_ascii_case("meta-data"))
        && segs.next().is_some_and(|s| s.eq_ignore_ascii_case("tags"))
        && segs
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("instance")))
    {
        return false;
    }
    match (segs.next(), segs.next()) {
        (None, _) | (Some(""), None) => true,
        (Some(key), None) => !key.contains(';') && !key.bytes().all(|b| b == b'.'),
        _ => false,
    }
}

/// Paths that must never reach the upstream whatever their spelling: IAM and identity
/// credentials, in any case, and anything else that mentions `iam` (`iam;x`, `iam%20`,
/// `%20iam`: an upstream that trims or drops such decorations would read `iam`) except a
/// single instance tag key, which is free text (`tags/instance/Diamond`).
pub fn is_sensitive(path: &str) -> bool {
    if contains_ci(path, "/iam/")
        || ends_with_ci(path, "/iam")
        || contains_ci(path, "security-credentials")
        || contains_ci(path, "identity-credentials")
    {
        return true;
    }
    contains_ci(path, "iam") && !is_tag_key(path)
}

/// Bounded route labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    Token,
    Credentials,
    RoleList,
    Passthrough,
    Admin,
    Denied,
    Invalid,
    /// The container-credentials door (`/v1/credentials`, service-account tokens).
    Container,
}

impl RouteLabel {
    pub const ALL: [RouteLabel; 8] = [
        RouteLabel::Token,
        RouteLabel::Credentials,
        RouteLabel::RoleList,
        RouteLabel::Passthrough,
        RouteLabel::Admin,
        RouteLabel::Denied,
        RouteLabel::Invalid,
        RouteLabel::Container,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Token => "token",
            RouteLabel::Credentials => "credentials",
            RouteLabel::RoleList => "role_list",
            RouteLabel::Passthrough => "passthrough",
            RouteLabel::Admin => "admin",
            RouteLabel::Denied => "denied",
            RouteLabel::Invalid => "invalid",
            RouteLabel::Container => "container_credentials",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks `canonicalize` makes in one pass, spelled the plain way: every path of up
    /// to four segments drawn from the awkward ones is judged the same.
    #[test]
    fn the_one_pass_check_judges_every_path_as_the_plain_checks_do() {
        let parts = ["", ".", "..", "a", "%41", "b\\c", "\u{1}", "x\u{7f}"];
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &paths {
                for part in parts {
                    next.push(format!("{p}/{part}"));
                }
            }
            paths.extend(next.clone());
            paths = next;
        }
        for path in paths {
            let plain = if path.bytes().any(|b| b < 0x20 || b == 0x7f) {
                Some(PathError::ControlByte)
            } else if path.contains('\\') {
                Some(PathError::Backslash)
            } else {
                None
            };
            let needs_work = path.contains('%')
                || path.contains("//")
                || path.split('/').any(|s| s == "." || s == "..");
            match canonicalize(&path) {
                Err(e @ (PathError::ControlByte | PathError::Backslash)) => {
                    assert_eq!(Some(e), plain, "{path:?}")
                }
                Ok(Cow::Borrowed(_)) => assert!(plain.is_none() && !needs_work, "{path:?}"),
                Ok(Cow::Owned(_)) | Err(_) => assert!(plain.is_none() && needs_work, "{path:?}"),
            }
        }
    }

    #[test]
    fn canonical_forms() {
        let ok = [
            ("/latest/meta-data/", "/latest/meta-data/"),
            ("//latest//meta-data", "/latest/meta-data"),
            (
                "/latest/./meta-data/../meta-data/iam/",
                "/latest/meta-data/iam/",
            ),
            ("/latest/meta-data/iam/..", "/latest/meta-data/"),
            ("/latest/%6Deta-data", "/latest/meta-data"),
            ("/latest/meta-data?x=1#f", "/latest/meta-data"),
            (
                "http://169.254.169.254/latest/meta-data/instance-id",
                "/latest/meta-data/instance-id",
            ),
            ("http://evil.example", "/"),
            ("http://h?/latest/meta-data/iam/info", "/"),
            ("http://h#/latest/meta-data/iam/info", "/"),
            ("http://h:80//latest", "/latest"),
            ("/a%20b", "/a%20b"),
            ("/a%2a", "/a%2A"),
            ("/", "/"),
        ];
        for (input, want) in ok {
            assert_eq!(canonicalize(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            (
                "/latest/meta-data/iam%2fsecurity-credentials",
                PathError::EncodedSeparator,
            ),
            ("/latest%5cmeta-data", PathError::Backslash),
            ("/latest\\meta-data", PathError::Backslash),
            ("/latest/%00", PathError::ControlByte),
            ("/latest/%zz", PathError::BadEscape),
            ("/latest/%4", PathError::BadEscape),
            ("/latest/meta-data%252Fiam%252Finfo", PathError::BadEscape),
            ("/../etc", PathError::AboveRoot),
            ("/latest/../../x", PathError::AboveRoot),
            ("latest/meta-data", PathError::NotAPath),
            ("*", PathError::NotAPath),
        ];
        for (input, want) in bad {
            assert_eq!(canonicalize(input), Err(want), "{input}");
        }
    }

    #[test]
    fn user_data_is_one_route_in_every_spelling() {
        for p in [
            "/user-data",
            "/user-data/",
            "/USER-DATA",
            "/latest/%20user-data",
            "/latest/user-data%20",
            "/latest/user-data;x",
            "/2009-04-04/user-data/x",
            "/latest/meta-data/../user-data",
        ] {
            let c = canonicalize(p).unwrap();
            assert_eq!(route(&c), Route::UserData, "{p} → {c}");
        }
        // A tag key is free text.
        assert_eq!(
            route("/latest/meta-data/tags/instance/user-data"),
            Route::Forward
        );
    }

    #[test]
    fn the_signed_identity_is_one_route_and_the_document_is_not() {
        for p in [
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/rsa2048",
            "/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/INSTANCE-IDENTITY/PKCS7/",
            "/latest/dynamic/instance-identity/pkcs7;x",
            "/latest/dynamic/instance-identity/%20signature",
            "/2016-09-02/dynamic/instance-identity/rsa2048",
        ] {
            let c = canonicalize(p).unwrap();
            assert_eq!(route(&c), Route::IdentitySignature, "{p} → {c}");
        }
        assert_eq!(
            route("/latest/dynamic/instance-identity/document"),
            Route::Forward
        );
        assert_eq!(route("/latest/dynamic/instance-identity/"), Route::Forward);
    }

    #[test]
    fn the_tag_exemption_covers_one_key_and_not_a_way_to_iam() {
        assert_eq!(
            route("/latest/meta-data/tags/instance/..;/..;/iam;/info"),
            Route::Denied
        );
        assert_eq!(
            route("/latest/meta-data/tags/instance/Diamond/x/iam"),
            Route::Denied
        );
        assert_eq!(
            route("/latest/meta-data/tags/instance/Diamond;x"),
            Route::Denied
        );
        assert_eq!(
            route("/latest/meta-data/tags/instance/..;iam"),
            Route::Denied
        );
        assert_eq!(
            route("/latest/meta-data/tags/instance/Diamond"),
            Route::Forward
        );
    }

    #[test]
    fn already_canonical_paths_are_borrowed() {
        assert!(matches!(
            canonicalize("/latest/meta-data/iam/security-credentials/r"),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn routes() {
        assert_eq!(
            route("/latest/meta-data/iam/security-credentials"),
            Route::RoleList
        );
        assert_eq!(
            route("/2016-09-02/meta-data/iam/security-credentials/"),
            Route::RoleList
        );
        assert_eq!(
            route("/latest/meta-data/iam/security-credentials/app"),
            Route::Credentials("app")
        );
        assert_eq!(
            route("/latest/meta-data/iam/security-credentials/app/"),
            Route::Credentials("app")
        );
        assert_eq!(
            route("/latest/meta-data/iam/security-credentials/team/app"),
            Route::Credentials("team/app")
        );
        assert_eq!(route("/latest/meta-data/iam/info"), Route::IamInfo);
        assert_eq!(route("/2009-04-04/meta-data/iam/info/"), Route::IamInfo);
        assert_eq!(
            route("/latest/meta-data/iam/security-credentials-extended/app"),
            Route::ExtendedCredentials("app")
        );
        assert_eq!(
            route("/latest/meta-data/iam/security-credentials-extended/"),
            Route::Denied
        );
        assert_eq!(route("/latest/meta-data/iam/"), Route::Denied);
        assert_eq!(route("/latest/meta-data/iam"), Route::Denied);
        assert_eq!(route("/latest/api/token"), Route::Token);
        assert_eq!(route("/2021-01-03/api/token"), Route::VersionedToken);
        assert_eq!(route("/latest/user-data"), Route::UserData);
        assert_eq!(route("/2009-04-04/user-data/"), Route::UserData);
        assert_eq!(route("/latest/USER-DATA"), Route::UserData);
        assert_eq!(route("/latest/user-data;x"), Route::UserData);
        assert_eq!(route("/latest/user-dat\u{e4}"), Route::Forward);
        assert_eq!(route("/latest/meta-data/iam;x/info"), Route::Denied);
        assert_eq!(route("/latest/meta-data/IAM%20/info"), Route::Denied);
        assert_eq!(route("/latest/meta-data/%20iam/info"), Route::Denied);
        assert_eq!(
            route("/latest/meta-data/tags/instance/Diamond"),
            Route::Forward
        );
        assert_eq!(route("/latest/meta-data/tags/instance/iam"), Route::Denied);
        assert_eq!(
            route("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
            Route::Denied
        );
        assert_eq!(
            route("/latest/meta-data/IAM/Security-Credentials/"),
            Route::Denied
        );
        assert_eq!(route("/meta-data/iam/security-credentials/"), Route::Denied);
        assert_eq!(route("/latest/meta-data/instance-id"), Route::Forward);
        assert_eq!(route("/latest/meta-data/tags/instance"), Route::Forward);
        assert_eq!(route("/latest/meta-data/tags/instance/"), Route::Forward);
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(route("/metrics"), Route::Metrics);
    }
}
