//! The request parse → frame → canonicalise → route path of iamlet's workers, as pure
//! functions, with the invariants that must hold for any input. Shared by the cargo-fuzz
//! target (`fuzz_targets/request.rs`) and the corpus replay test (`proxy/tests/fuzz_corpus.rs`),
//! so both check exactly the same thing. A panic here is a bug.

use iamlet::conn::{self, Framing, MAX_HEADERS, Next};
use iamlet::respond::Persist;
use iamlet::route::{self, Route};
use iamlet::token::{self, TokenCheck, TokenKey};
use std::net::{IpAddr, Ipv4Addr};

/// iamlet's default limits.
const MAX_HEAD: usize = 8192;
const MAX_BODY: usize = 1024;

/// Runs one input through everything a worker does with a request before any IO: the
/// workers' own `conn::next_request`, then what they do with a complete request.
pub fn check(data: &[u8]) {
    let limits = iamlet::worker::Limits::default();
    assert_eq!((limits.max_head, limits.max_body), (MAX_HEAD, MAX_BODY));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match conn::next_request(data, &mut headers, &limits) {
        Next::Request { req, len } => {
            assert!(len <= data.len());
            let head_len = len - framed_body(&req);
            assert!(head_len <= MAX_HEAD, "a {head_len}-byte head accepted");
            check_request(&req);
        }
        Next::Incomplete => assert!(data.len() < MAX_HEAD || head_complete(data)),
        Next::Reject(e) => {
            let status = e.status().expect("a parse rejection is answered");
            assert!(
                matches!(status.0, 400 | 413 | 414 | 431),
                "{e:?}: {status:?}"
            );
            if matches!(status.0, 414 | 431) && e.label() == "head_too_large" {
                assert_head_limit(data);
            }
        }
    }
    // Any text is also a request target (the router must cope with what httparse lets by).
    if let Ok(s) = std::str::from_utf8(data) {
        check_target(s.lines().next().unwrap_or(""));
        check_target(s);
    }
}

fn assert_head_limit(data: &[u8]) {
    let status = conn::head_too_large(data, MAX_HEAD).status();
    assert!(
        matches!(status, Some(s) if matches!(s.0, 414 | 431)),
        "{status:?}"
    );
}

/// The body length a complete request was framed with.
fn framed_body(req: &httparse::Request<'_, '_>) -> usize {
    match conn::framing(req, MAX_BODY) {
        Framing::Body(n) => n,
        Framing::Reject(e) => panic!("a request framed as {e:?} was accepted"),
    }
}

/// A complete head whose body has not arrived yet.
fn head_complete(data: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    matches!(
        httparse::Request::new(&mut headers).parse(data),
        Ok(httparse::Status::Complete(_))
    )
}

fn check_request(req: &httparse::Request<'_, '_>) {
    match conn::framing(req, MAX_BODY) {
        Framing::Body(n) => {
            assert!(n <= MAX_BODY);
            assert!(
                n == 0 || req.method == Some("PUT"),
                "a body on {:?}",
                req.method
            );
            let lengths = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                .count();
            assert!(lengths <= 1, "{lengths} Content-Length headers accepted");
            assert!(
                !req.headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding")),
                "Transfer-Encoding accepted"
            );
        }
        Framing::Reject(e) => assert!(matches!(e.status().map(|s| s.0), Some(400 | 413)), "{e:?}"),
    }
    let persist = conn::persistence(req);
    if req.version == Some(1) && persist != Persist::Close {
        assert_eq!(persist, Persist::KeepAlive);
    }
    let key = TokenKey::from_bytes(&[7; 32]);
    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    for h in req.headers.iter() {
        if h.name
            .eq_ignore_ascii_case("x-aws-ec2-metadata-token-ttl-seconds")
            && let Some(ttl) = token::parse_ttl(h.value)
        {
            assert!((1..=token::MAX_TTL_SECS).contains(&ttl));
        }
        if h.name.eq_ignore_ascii_case("x-aws-ec2-metadata-token") {
            // Nothing a client sends verifies unless we minted it.
            assert_ne!(key.verify(h.value, peer, 0), TokenCheck::Valid);
        }
    }
    if let Some(path) = req.path {
        check_target(path);
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Canonicalises and routes one target; asserts the canonical form and the deny rule.
pub fn check_target(target: &str) {
    let Ok(canon) = route::canonicalize(target) else {
        return;
    };
    let c: &str = &canon;
    assert!(c.starts_with('/'), "{target:?} -> {c:?}");
    let lower = c.to_ascii_lowercase();
    for bad in ["//", "/./", "/../", "\\", "%2f", "%5c", "%25", "?", "#"] {
        assert!(!lower.contains(bad), "{target:?} -> {c:?} contains {bad:?}");
    }
    assert!(
        !c.ends_with("/.") && !c.ends_with("/..") && c != "." && c != "..",
        "{target:?} -> {c:?}"
    );
    assert!(
        !c.bytes().any(|b| b < 0x20 || b == 0x7f),
        "{target:?} -> {c:?} has a control byte"
    );
    // Escapes left are upper-case and never of an unreserved character.
    let b = c.as_bytes();
    for (i, _) in c.match_indices('%') {
        let hex = b.get(i + 1..i + 3).expect("a complete escape");
        assert!(
            hex.iter()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
            "{target:?} -> {c:?}"
        );
        let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
        assert!(!is_unreserved(v), "{target:?} -> {c:?} keeps %{v:02X}");
    }
    // Canonical is a fixed point.
    assert_eq!(
        route::canonicalize(c).as_deref(),
        Ok(c),
        "{target:?} -> {c:?} is not stable"
    );
    // Whatever may be forwarded never names a credential path.
    let rt = route::route(c);
    match rt {
        Route::Forward | Route::UserData => {
            assert!(!route::is_sensitive(c), "{c:?} routed {rt:?}");
            for secret in ["security-credentials", "identity-credentials", "/iam/"] {
                assert!(!lower.contains(secret), "{c:?} routed {rt:?}");
            }
            assert!(!lower.ends_with("/iam"), "{c:?} routed {rt:?}");
            if lower.contains("iam") {
                let mut segs = lower.split('/').skip(2);
                assert!(
                    segs.next() == Some("meta-data") && segs.next() == Some("tags"),
                    "{c:?} mentions iam and is routed {rt:?}"
                );
            }
        }
        Route::Credentials(role) | Route::ExtendedCredentials(role) => {
            assert!(!role.is_empty() && !role.starts_with('/') && !role.ends_with('/'));
        }
        _ => {}
    }
}
