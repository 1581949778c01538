//! The leak corpus: hundreds of spellings of the node-credential paths (every version prefix,
//! `//`, `/./`, `/../`, percent-encodings, case changes, backslashes, `;params`, `?query`,
//! `#fragment`, trailing slashes, absolute-form targets, HTTP/1.0, GET/HEAD/POST/PUT, with and
//! without a pod token, from a known pod and from an unknown IP) sent to iamlet in front of
//! the fake IMDS. Zero answers may carry the node's secrets, and the fake must never see a
//! credential or user-data path. Every variant also gets the exact status its meaning calls
//! for.

use iamlet_e2e::rig::data as dataplane;

use dataplane::{POD, Rig, UNKNOWN, ip, mint};
use iamlet_e2e::imds::{NODE_ROLE, TOKEN_HEADER};
use iamlet_e2e::{FakeImds, NODE_MARKER, Response, drivers, try_request_from};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// What a node-secret path is, semantically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `meta-data/iam/security-credentials/<node role>`
    NodeCreds,
    /// `meta-data/iam/security-credentials/`
    RoleList,
    /// `meta-data/identity-credentials/ec2/security-credentials/ec2-instance`
    Identity,
    /// `meta-data/iam/info`
    IamInfo,
    /// `user-data` (not forwarded by default)
    UserData,
    /// `dynamic/instance-identity/pkcs7`, the node's signed identity (not forwarded by
    /// default)
    Signature,
}

const TARGETS: [Target; 6] = [
    Target::NodeCreds,
    Target::RoleList,
    Target::Identity,
    Target::IamInfo,
    Target::UserData,
    Target::Signature,
];

impl Target {
    /// Path segments after the version (an empty last segment = trailing slash).
    fn segments(self) -> Vec<&'static str> {
        match self {
            Target::NodeCreds => vec!["meta-data", "iam", "security-credentials", NODE_ROLE],
            Target::RoleList => vec!["meta-data", "iam", "security-credentials", ""],
            Target::Identity => vec![
                "meta-data",
                "identity-credentials",
                "ec2",
                "security-credentials",
                "ec2-instance",
            ],
            Target::IamInfo => vec!["meta-data", "iam", "info"],
            Target::UserData => vec!["user-data"],
            Target::Signature => vec!["dynamic", "instance-identity", "pkcs7"],
        }
    }
}

/// How iamlet must read a spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meaning {
    /// The same path as the plain spelling.
    Same,
    /// Not the credential route, but still a credential path: refused, never forwarded.
    Denied,
    /// A malformed or dangerous target: 400.
    Invalid,
    /// Resolves to the listing `/latest/meta-data/` (query or fragment cut the rest off).
    MetaDataListing,
    /// Resolves to `/` (the rest is an absolute-form target's query).
    Root,
}

const VERSIONS: [&str; 31] = [
    "latest",
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
    "2023-10-31",
    "2024-04-11",
    "LATEST",
];

fn join(version: &str, segs: &[&str]) -> String {
    format!("/{version}/{}", segs.join("/"))
}

/// Percent-encodes every byte (upper-case hex).
fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Percent-encodes the first byte of every non-empty segment (lower-case hex).
fn encode_first(segs: &[&str]) -> Vec<String> {
    segs.iter()
        .map(|s| match s.as_bytes().first() {
            Some(b) => format!("%{b:02x}{}", &s[1..]),
            None => String::new(),
        })
        .collect()
}

/// The sensitive segment of a target (`iam`, `identity-credentials`, `user-data`, `pkcs7`).
fn sensitive_index(t: Target) -> usize {
    match t {
        Target::UserData => 0,
        Target::Signature => 2,
        _ => 1,
    }
}

/// Every spelling of target `t` under version `v`, with its meaning.
fn spellings(t: Target, v: &str) -> Vec<(String, String, Meaning)> {
    use Meaning::*;
    let segs = t.segments();
    let plain = join(v, &segs);
    let mut out: Vec<(&str, String, Meaning)> = Vec::new();
    let mut add = |kind: &'static str, path: String, m: Meaning| out.push((kind, path, m));

    add("plain", plain.clone(), Same);
    add("double slashes", plain.replace('/', "//"), Same);
    add("leading //", format!("/{plain}"), Same);
    add(
        "dot segments",
        format!("/./{v}/./{}", segs.join("/./")),
        Same,
    );
    add(
        "dot-dot segments",
        format!("/x/../{v}/y/z/../../{}", segs.join("/w/../")),
        Same,
    );
    add(
        "dot-dot back into the path",
        format!("/{v}/meta-data/../{}", segs.join("/")),
        Same,
    );
    add(
        "encoded dots",
        format!("/{v}/%2e/x/%2E%2e/{}", segs.join("/")),
        Same,
    );
    add(
        "first letters encoded",
        format!("/{v}/{}", encode_first(&segs).join("/")),
        Same,
    );
    add(
        "segments fully encoded",
        format!(
            "/{}/{}",
            encode_all(v),
            segs.iter()
                .map(|s| encode_all(s))
                .collect::<Vec<_>>()
                .join("/")
        ),
        Same,
    );
    add(
        "encoded slash",
        format!("/{v}/{}", segs.join("%2F")),
        if segs.len() > 1 { Invalid } else { Same },
    );
    add(
        "encoded slash, lower case",
        format!("/{v}%2f{}", segs.join("/")),
        Invalid,
    );
    add(
        "double-encoded slash",
        format!("/{v}/{}", segs.join("%252F")),
        if segs.len() > 1 { Invalid } else { Same },
    );
    add(
        "encoded backslash",
        format!("/{v}/{}", segs.join("%5C")),
        if segs.len() > 1 { Invalid } else { Same },
    );
    add("backslashes", plain.replace('/', "\\"), Invalid);
    add(
        "backslash after the version",
        format!("/{v}\\{}", segs.join("/")),
        Invalid,
    );
    add("NUL", format!("{plain}%00"), Invalid);
    add("encoded newline", format!("{plain}%0a"), Invalid);
    add("above the root", format!("/{v}/../..{plain}"), Invalid);
    add("upper case", plain.to_ascii_uppercase(), Denied);
    let mut sens = segs.clone();
    let upper = sens[sensitive_index(t)].to_ascii_uppercase();
    sens[sensitive_index(t)] = &upper;
    add("sensitive segment upper case", join(v, &sens), Denied);
    let title: Vec<String> = segs
        .iter()
        .map(|s| {
            let mut c = s.chars();
            c.next().map_or(String::new(), |f| {
                f.to_ascii_uppercase().to_string() + c.as_str()
            })
        })
        .collect();
    add("title case", format!("/{v}/{}", title.join("/")), Denied);
    let mut semi = segs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    semi[sensitive_index(t)].push_str(";x=1");
    add(
        ";params on the sensitive segment",
        join(v, &semi.iter().map(String::as_str).collect::<Vec<_>>()),
        Denied,
    );
    let mut semi_empty = segs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    semi_empty[sensitive_index(t)].push(';');
    add(
        "empty ;param",
        join(
            v,
            &semi_empty.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        Denied,
    );
    add("?query", format!("{plain}?x=1&y=/../../"), Same);
    add("empty ?", format!("{plain}?"), Same);
    add(
        "? hides the rest",
        format!("/{v}/meta-data/?/../{}", segs.join("/")),
        MetaDataListing,
    );
    add("#fragment", format!("{plain}#frag"), Same);
    add(
        "# hides the rest",
        format!("/{v}/meta-data/#/../{}", segs.join("/")),
        MetaDataListing,
    );
    let bare = plain.trim_end_matches('/');
    add("trailing slash", format!("{bare}/"), Same);
    add("trailing //", format!("{bare}//"), Same);
    add("trailing /.", format!("{bare}/."), Same);
    add("no trailing slash", bare.to_string(), Same);
    add(
        "absolute-form",
        format!("http://169.254.169.254{plain}"),
        Same,
    );
    add(
        "absolute-form with port and //",
        format!("http://169.254.169.254:80/{plain}"),
        Same,
    );
    add(
        "absolute-form, other host",
        format!("http://attacker.example{plain}"),
        Same,
    );
    add(
        "absolute-form https with userinfo",
        format!("https://user:pw@169.254.169.254{plain}"),
        Same,
    );
    add(
        "absolute-form, path in the query",
        format!("http://169.254.169.254?{plain}"),
        Root,
    );
    add(
        "absolute-form, path in the fragment",
        format!("http://169.254.169.254#{plain}"),
        Root,
    );
    add(
        "absolute-form, upper-case scheme",
        format!("HTTP://169.254.169.254{plain}"),
        Invalid,
    );
    add(
        "overlong UTF-8 dots",
        format!("/{v}/meta-data/%c0%ae%c0%ae/{}", segs.join("/")),
        Denied,
    );
    add("no version", format!("/{}", segs.join("/")), Denied);
    add(
        "extra version",
        format!("/{v}/latest/{}", segs.join("/")),
        Denied,
    );
    out.into_iter()
        .map(|(kind, path, m)| (kind.to_string(), path, m))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
    Put,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

#[derive(Debug, Clone)]
struct Variant {
    what: String,
    target: Target,
    meaning: Meaning,
    method: Method,
    http10: bool,
    src: u8,
    with_token: bool,
    raw: Vec<u8>,
}

/// The status iamlet must answer `v` with (the fake answers `Root` and `MetaDataListing`).
fn expected_status(v: &Variant) -> u16 {
    let known = v.src == POD;
    if v.meaning == Meaning::Invalid {
        return 400;
    }
    if matches!(v.method, Method::Post | Method::Put) {
        return 405;
    }
    match v.meaning {
        Meaning::Invalid => 400,
        Meaning::Denied => 404,
        // Only a known pod's requests are forwarded: an unknown source waits, then 404.
        Meaning::MetaDataListing | Meaning::Root if !known => 404,
        // Forwarded, a HEAD as a GET (the fake IMDS answers GET only): 200 either way.
        Meaning::MetaDataListing | Meaning::Root => 200,
        Meaning::Same => match (v.target, known) {
            (Target::NodeCreds, true) => 403,
            (Target::RoleList | Target::IamInfo, true) => 200,
            _ => 404,
        },
    }
}

fn corpus(tokens: &BTreeMap<u8, String>) -> Vec<Variant> {
    // (description, path, target, meaning, method, HTTP/1.0, source)
    let mut plan: Vec<(String, String, Target, Meaning, Method, bool, u8)> = Vec::new();
    // Every version prefix, plain, from both sources.
    for t in TARGETS {
        for v in VERSIONS {
            let path = join(v, &t.segments());
            for src in [POD, UNKNOWN] {
                plan.push((
                    format!("version {v}"),
                    path.clone(),
                    t,
                    Meaning::Same,
                    Method::Get,
                    false,
                    src,
                ));
            }
        }
    }
    // Every spelling under two versions: GET from both sources, plus one more method or
    // protocol version from one source, rotating.
    let extra = [
        (Method::Head, false),
        (Method::Post, false),
        (Method::Put, false),
        (Method::Get, true),
        (Method::Head, true),
    ];
    let mut k = 0usize;
    for t in TARGETS {
        for v in ["latest", "2009-04-04"] {
            for (kind, path, m) in spellings(t, v) {
                for src in [POD, UNKNOWN] {
                    plan.push((kind.clone(), path.clone(), t, m, Method::Get, false, src));
                }
                let (method, http10) = extra[k % extra.len()];
                let src = if (k / extra.len()).is_multiple_of(2) {
                    POD
                } else {
                    UNKNOWN
                };
                plan.push((kind, path, t, m, method, http10, src));
                k += 1;
            }
        }
    }
    plan.into_iter()
        .enumerate()
        .map(|(n, (what, path, target, meaning, method, http10, src))| {
            // Every third request of the pod carries its valid token (an unknown source
            // gets none: it cannot mint one).
            let with_token = n % 3 == 0 && src == POD;
            let mut raw = format!(
                "{} {path} HTTP/1.{}\r\nHost: 169.254.169.254\r\n",
                method.as_str(),
                if http10 { 0 } else { 1 }
            );
            if with_token {
                raw.push_str(&format!("{TOKEN_HEADER}: {}\r\n", tokens[&src]));
            }
            if matches!(method, Method::Post | Method::Put) {
                raw.push_str("Content-Length: 0\r\n");
            }
            if !http10 {
                raw.push_str("Connection: close\r\n");
            }
            raw.push_str("\r\n");
            Variant {
                what: format!("{what}: {path}"),
                target,
                meaning,
                method,
                http10,
                src,
                with_token,
                raw: raw.into_bytes(),
            }
        })
        .collect()
}

fn check_response(v: &Variant, resp: &Response) -> Result<(), String> {
    let raw = String::from_utf8_lossy(&resp.raw);
    for secret in [
        NODE_MARKER,
        NODE_ROLE,
        "node-profile",
        "AIPAFAKENODEPROFILE01",
    ] {
        if raw.contains(secret) {
            return Err(format!("LEAK ({secret}) in the answer:\n{raw}"));
        }
    }
    let want = expected_status(v);
    if resp.status != want {
        return Err(format!("status {} instead of {want}:\n{raw}", resp.status));
    }
    let body = resp.body_str();
    // What the fake answers a GET of the root and of the listing.
    let root = "latest";
    let listing = "ami-id\niam/\ninstance-id\nplacement/";
    let ok = match (want, v.method, v.meaning, v.target) {
        // A HEAD relayed as a GET: the GET's length, no body.
        (200, Method::Head, Meaning::Root, _) => {
            body.is_empty() && resp.header("content-length") == Some(&root.len().to_string())
        }
        (200, Method::Head, Meaning::MetaDataListing, _) => {
            body.is_empty() && resp.header("content-length") == Some(&listing.len().to_string())
        }
        (_, Method::Head, _, _) => body.is_empty(),
        (405, _, Meaning::MetaDataListing | Meaning::Root, _) => true,
        (400, ..) => body == "Bad Request: invalid path\n",
        (405, ..) => body == "Method Not Allowed\n",
        (403, ..) => body == "Forbidden: the requested role is not this pod's role\n",
        (404, ..) => body == dataplane::not_found_body(),
        (200, _, Meaning::Root, _) => body == root,
        (200, _, Meaning::MetaDataListing, _) => body == listing,
        (200, _, _, Target::RoleList) => body == "app-role",
        (200, _, _, Target::IamInfo) => {
            let doc: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            doc["InstanceProfileArn"] == "arn:aws:iam::123456789012:instance-profile/app-role"
                && doc["Code"] == "Success"
        }
        _ => false,
    };
    if !ok {
        return Err(format!("unexpected body for {want}:\n{raw}"));
    }
    let close = resp.header("connection");
    // HTTP/1.0 without keep-alive and `Connection: close` requests are answered with close.
    if close != Some("close") {
        return Err(format!("no `Connection: close` in the answer:\n{raw}"));
    }
    Ok(())
}

fn send_all(addr: SocketAddr, variants: &[Variant]) -> Vec<(usize, Result<Response, String>)> {
    const THREADS: usize = 8;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|k| {
                s.spawn(move || {
                    variants
                        .iter()
                        .enumerate()
                        .skip(k)
                        .step_by(THREADS)
                        .map(|(i, v)| {
                            (
                                i,
                                try_request_from(ip(v.src), addr, &v.raw)
                                    .map_err(|e| e.to_string()),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("sender thread"))
            .collect()
    })
}

#[test]
fn no_spelling_of_a_node_secret_path_leaks_or_reaches_the_upstream() {
    for driver in drivers() {
        // Requests from the unknown IP wait this long for a pod that never comes.
        let mut r = Rig::start(
            driver,
            FakeImds::start(),
            &["--backoff-max-elapsed-time=20ms"],
        );
        let tokens: BTreeMap<u8, String> = [POD]
            .into_iter()
            .map(|src| (src, mint(r.addr(), src, 21600)))
            .collect();
        r.imds.clear_requests();
        let variants = corpus(&tokens);
        assert!(variants.len() >= 150);
        println!(
            "driver {driver}: leak corpus of {} request variants",
            variants.len()
        );

        let results = send_all(r.addr(), &variants);
        assert_eq!(results.len(), variants.len());
        let mut failures = Vec::new();
        let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
        for (i, res) in &results {
            let v = &variants[*i];
            let verdict = res.as_ref().map_err(Clone::clone).and_then(|resp| {
                *by_status.entry(resp.status).or_default() += 1;
                check_response(v, resp)
            });
            if let Err(e) = verdict {
                failures.push(format!(
                    "[{} HTTP/1.{} from 127.0.0.{}{}] {}: {e}",
                    v.method.as_str(),
                    if v.http10 { 0 } else { 1 },
                    v.src,
                    if v.with_token { ", with token" } else { "" },
                    v.what
                ));
            }
        }
        println!("driver {driver}: answers by status {by_status:?}");

        let forwarded = r.imds.requests();
        let reached: Vec<String> = forwarded
            .iter()
            .map(|q| q.path.to_ascii_lowercase())
            .filter(|p| {
                // user-data and the signed identity, however decorated
                let signature = p.contains("instance-identity")
                    && ["pkcs7", "signature", "rsa2048"]
                        .iter()
                        .any(|n| p.contains(n));
                p.contains("iam")
                    || p.contains("identity-credentials")
                    || p.contains("user-data")
                    || signature
            })
            .collect();
        assert!(
            failures.is_empty() && reached.is_empty(),
            "driver {driver}: {} of {} variants failed:\n{}\n\nthe upstream received: {reached:#?}",
            failures.len(),
            variants.len(),
            failures.join("\n")
        );
        // What did reach the upstream: iamlet's own token PUT and the canonical listings.
        for q in &forwarded {
            let listing = q.method == "GET"
                && (q.path == "/"
                    || VERSIONS
                        .iter()
                        .any(|v| q.path == format!("/{v}/meta-data/")));
            let own_token = q.method == "PUT" && q.path == "/latest/api/token";
            assert!(
                listing || own_token,
                "driver {driver}: unexpected upstream request {} {:?}",
                q.method,
                q.path
            );
            assert_ne!(
                q.header(TOKEN_HEADER),
                Some(tokens[&POD].as_str()),
                "driver {driver}: a pod token reached the upstream"
            );
        }
        assert!(
            r.iamlet.try_exit_status().is_none(),
            "driver {driver}: iamlet exited"
        );
    }
}

#[test]
fn allowlist_policy_forwards_only_matching_canonical_paths() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(
            driver,
            FakeImds::start(),
            &[
                "--metadata-policy=allowlist",
                "--allow-metadata-path=^/latest/meta-data/placement/",
            ],
        );
        r.imds.clear_requests();
        let get = |path: &str| iamlet_e2e::get_from(ip(POD), r.addr(), path);
        let resp = get("/latest/meta-data/placement/region");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "us-east-1"),
            "{ctx}"
        );
        for path in [
            "/latest/meta-data/instance-id",
            "/latest/meta-data/placement/../instance-id",
            "/latest/meta-data/placement/%2e%2e/instance-id",
            "/2009-04-04/meta-data/placement/region",
            "/latest/user-data",
        ] {
            let resp = get(path);
            assert_eq!(
                (resp.status, resp.body_str()),
                (404, dataplane::not_found_body().to_string()),
                "{ctx}: {path}"
            );
        }
        // iamlet's own answers do not depend on the policy.
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/").body_str(),
            "app-role",
            "{ctx}"
        );
        let gets: Vec<String> = r
            .imds
            .requests()
            .into_iter()
            .filter(|q| q.method == "GET")
            .map(|q| q.path)
            .collect();
        assert_eq!(gets, ["/latest/meta-data/placement/region"], "{ctx}");
    }
}

#[test]
fn extended_credentials_and_iam_info_are_answered_from_the_pods_role() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &[]);
        r.imds.clear_requests();
        let get = |path: &str| iamlet_e2e::get_from(ip(POD), r.addr(), path);
        let json = |resp: &Response| -> serde_json::Value {
            assert_eq!(resp.status, 200, "{ctx}: {}", resp.body_str());
            assert_eq!(resp.header("server"), Some("EC2ws"), "{ctx}");
            serde_json::from_slice(&resp.body).unwrap()
        };
        let plain = json(&get("/latest/meta-data/iam/security-credentials/app-role"));
        for path in [
            "/latest/meta-data/iam/security-credentials-extended/app-role",
            "/2021-07-15/meta-data/iam/security-credentials-extended/app-role/",
        ] {
            let ext = json(&get(path));
            assert_eq!(ext["AccountId"], "123456789012", "{ctx}: {ext}");
            for k in [
                "Code",
                "Type",
                "AccessKeyId",
                "SecretAccessKey",
                "Token",
                "Expiration",
            ] {
                assert_eq!(ext[k], plain[k], "{ctx}: {k}");
            }
        }
        let other = get("/latest/meta-data/iam/security-credentials-extended/node-role");
        assert_eq!(
            (other.status, other.body_str().as_str()),
            (
                403,
                "Forbidden: the requested role is not this pod's role\n"
            ),
            "{ctx}"
        );
        let listing = get("/latest/meta-data/iam/security-credentials-extended/");
        assert_eq!(listing.status, 404, "{ctx}");
        let info = json(&get("/latest/meta-data/iam/info"));
        let keys: Vec<&String> = info.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "Code",
                "InstanceProfileArn",
                "InstanceProfileId",
                "LastUpdated"
            ],
            "{ctx}: {info}"
        );
        assert_eq!(info["Code"], "Success", "{ctx}");
        assert_eq!(
            info["InstanceProfileArn"], "arn:aws:iam::123456789012:instance-profile/app-role",
            "{ctx}"
        );
        let id = info["InstanceProfileId"].as_str().unwrap();
        assert!(id.starts_with("AIPA") && id.len() == 21, "{ctx}: {id}");
        assert!(
            r.imds.requests().is_empty(),
            "{ctx}: {:?}",
            r.imds.requests()
        );
    }
}
