//! Token identity: the container-credentials door (`GET /v1/credentials` with a service-account
//! token in `Authorization`), against a real kube-apiserver that issues the tokens (the
//! TokenRequest API, bound to pod objects) and publishes the keys they verify with. The agent
//! runs with the shipped ServiceAccount's rights; requests come from the pods' own addresses
//! on loopback. Every refusal is checked by status and `Code`, and a refused request never
//! carries credentials.

use iamlet_e2e::apiserver::PodBuilder;
use iamlet_e2e::realapi::{RealApiServer, Scope};
use iamlet_e2e::rig::control::{LIST, Rig, real};
use iamlet_e2e::rig::data::sample;
use iamlet_e2e::{Response, try_request_from};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const AUDIENCE: &str = "pods.eks.amazonaws.com";
const DOOR: &str = "/v1/credentials";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// `GET /v1/credentials` from `src` with `Host: 169.254.170.23` and `authorization` (if any).
fn ask(addr: SocketAddr, src: &str, authorization: Option<&str>) -> Response {
    ask_as(addr, src, "GET", "169.254.170.23", authorization)
}

fn ask_as(
    addr: SocketAddr,
    src: &str,
    method: &str,
    host: &str,
    authorization: Option<&str>,
) -> Response {
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let raw = format!(
        "{method} {DOOR} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n{auth}Connection: close\r\n\r\n"
    );
    try_request_from(ip(src), addr, raw.as_bytes()).expect("an answer")
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// Asserts a refusal: `status`, `Code`, no credentials in the body.
fn refused(r: &Response, status: u16, code: &str, what: &str) {
    let body = json_of(r);
    assert_eq!(
        (r.status, body["Code"].as_str()),
        (status, Some(code)),
        "{what}: {}",
        r.body_str()
    );
    assert!(body.get("AccessKeyId").is_none(), "{what}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
    if status == 503 {
        assert_eq!(r.header("retry-after"), Some("1"), "{what}");
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `kid` and claims of a real token (its payload, unverified: the test's own token).
fn parts(token: &str) -> (String, Value) {
    let head = jsonwebtoken::decode_header(token).unwrap();
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    (head.kid.unwrap(), serde_json::from_slice(&claims).unwrap())
}

/// A token signed with the API server's own key (what only a key holder could make), with
/// `edit` applied to a real token's claims.
fn forged(api: &RealApiServer, real_token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (kid, mut claims) = parts(real_token);
    edit(&mut claims);
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid);
    let key = EncodingKey::from_rsa_pem(&api.signing_key_pem()).unwrap();
    encode(&h, &claims, &key).unwrap()
}

struct Setup {
    r: Rig<Scope>,
    ns: String,
}

/// A node with pods `app` (127.26.0.1, role app) and `web` (127.26.0.2, role web), each with
/// a ServiceAccount of its own, and iamlet serving that node.
fn setup(test: &str, extra: &[&str]) -> Setup {
    let s = RealApiServer::shared().scope(test);
    let ns = s.ns("shop");
    s.set_namespace(&ns, &[]);
    for (pod, ipaddr, role) in [("app", "127.26.0.1", "app"), ("web", "127.26.0.2", "web")] {
        s.ensure_service_account(&ns, &format!("{pod}-sa"));
        s.create_pod(
            &PodBuilder::running(&ns, pod, &s.node, ipaddr)
                .role(role)
                .service_account(&format!("{pod}-sa")),
        );
    }
    let mut args = vec!["--backoff-max-elapsed-time=1s"];
    args.extend_from_slice(extra);
    let r = real(s, &args);
    Setup { r, ns }
}

#[test]
fn a_pod_gets_its_roles_credentials_with_its_own_service_account_token() {
    // One worker: a verified token is remembered per worker.
    let Setup { r, ns } = setup("door-ok", &["--workers=1"]);
    let addr = r.iamlet.addr();
    let token = r.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    let (_, claims) = parts(&token);
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "app", "{claims}");

    let t = Instant::now();
    let resp = iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        Some(ask(addr, "127.26.0.1", Some(&token))).filter(|r| r.status == 200),
        "the pod's credentials through the door"
    );
    let doc = json_of(&resp);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    for k in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
        assert!(doc[k].as_str().is_some_and(|v| !v.is_empty()), "{k}: {doc}");
    }
    assert_eq!(doc["AccountId"], "123456789012");
    let exp = doc["Expiration"].as_str().unwrap();
    assert!(
        exp.len() == 20 && exp.ends_with('Z') && exp.as_bytes()[10] == b'T',
        "{exp}"
    );
    // The same credentials the pod gets through IMDS: one policy engine, one cache.
    let imds = r.get("127.26.0.1", &format!("{LIST}app"));
    assert_eq!(imds.status, 200, "{}", imds.body_str());
    assert_eq!(json_of(&imds)["AccessKeyId"], doc["AccessKeyId"]);
    // `Bearer` is accepted too, and the token is not verified again.
    let verified = sample(
        addr,
        "iamlet_container_credentials_total{outcome=\"verified\"}",
    );
    let again = ask(addr, "127.26.0.1", Some(&format!("Bearer {token}")));
    assert_eq!(again.status, 200, "{}", again.body_str());
    assert_eq!(
        sample(
            addr,
            "iamlet_container_credentials_total{outcome=\"verified\"}"
        ),
        verified,
        "a token seen before is a lookup, not a verification"
    );
    println!("first answer through the door within {:?}", t.elapsed());
}

#[test]
fn every_attack_on_the_door_is_refused_with_its_reason() {
    let Setup { r, ns } = setup("door-attacks", &[]);
    let api = RealApiServer::shared();
    let addr = r.iamlet.addr();
    let app = r.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    // The door works for app first (so every refusal below is the check's, not a cold start).
    iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        ask(addr, "127.26.0.1", Some(&app)).status == 200,
        "the door to answer app"
    );

    refused(
        &ask(addr, "127.26.0.1", None),
        400,
        "InvalidToken",
        "no token",
    );
    refused(
        &ask(addr, "127.26.0.1", Some("not-a-jwt")),
        400,
        "InvalidToken",
        "not a JWT",
    );
    // alg none: no algorithm to verify with.
    let (kid, claims) = parts(&app);
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": kid, "typ": "JWT"})),
        b64(&claims)
    );
    let r_none = ask(addr, "127.26.0.1", Some(&none));
    assert!(
        matches!(r_none.status, 400 | 401),
        "alg none: {}",
        r_none.body_str()
    );
    assert!(json_of(&r_none).get("AccessKeyId").is_none());
    // HS256 with the API server's public key as the secret (the classic confusion).
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.clone());
    let hs = encode(
        &h,
        &claims,
        &EncodingKey::from_secret(&api.verifying_key_pem()),
    )
    .unwrap();
    refused(
        &ask(addr, "127.26.0.1", Some(&hs)),
        401,
        "InvalidToken",
        "HS256",
    );
    // A key the API server never published.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("not-a-published-key".into());
    let unknown_kid = encode(
        &h,
        &claims,
        &EncodingKey::from_rsa_pem(&api.signing_key_pem()).unwrap(),
    )
    .unwrap();
    refused(
        &ask(addr, "127.26.0.1", Some(&unknown_kid)),
        401,
        "InvalidToken",
        "unknown kid",
    );
    // A bad signature (the signature of another token).
    let other = r.api.pod_token(&ns, "web-sa", "web", AUDIENCE, 3600);
    let mut bad_sig: Vec<&str> = app.split('.').collect();
    bad_sig[2] = other.split('.').nth(2).unwrap();
    refused(
        &ask(addr, "127.26.0.1", Some(&bad_sig.join("."))),
        401,
        "InvalidToken",
        "bad signature",
    );
    // The API server's own audience, and an unbound token.
    let api_aud = r.api.pod_token(&ns, "app-sa", "app", &api.issuer, 3600);
    refused(
        &ask(addr, "127.26.0.1", Some(&api_aud)),
        401,
        "InvalidToken",
        "the API server's audience",
    );
    let unbound = r.api.unbound_token(&ns, "app-sa", AUDIENCE);
    refused(
        &ask(addr, "127.26.0.1", Some(&unbound)),
        403,
        "AccessDenied",
        "a token bound to no pod",
    );
    // Expired and not yet valid (signed with the real key: only the times are wrong).
    let expired = forged(api, &app, |c| {
        c["exp"] = json!(now() - 120);
        c["iat"] = json!(now() - 3720);
        c["nbf"] = json!(now() - 3720);
    });
    refused(
        &ask(addr, "127.26.0.1", Some(&expired)),
        401,
        "InvalidToken",
        "expired",
    );
    let early = forged(api, &app, |c| {
        c["nbf"] = json!(now() + 600);
        c["iat"] = json!(now() + 600);
    });
    refused(
        &ask(addr, "127.26.0.1", Some(&early)),
        401,
        "InvalidToken",
        "not yet valid",
    );
    // A subject that disagrees with the kubernetes.io claim.
    let mixed = forged(api, &app, |c| {
        c["sub"] = json!(format!("system:serviceaccount:{ns}:web-sa"));
    });
    refused(
        &ask(addr, "127.26.0.1", Some(&mixed)),
        401,
        "InvalidToken",
        "subject and claim disagree",
    );
    // Another pod's valid token, from this pod's address.
    refused(
        &ask(addr, "127.26.0.1", Some(&other)),
        403,
        "AccessDenied",
        "web's token from app's address",
    );
    // A Host that is not the link-local address (DNS rebinding).
    refused(
        &ask_as(addr, "127.26.0.1", "GET", "attacker.example", Some(&app)),
        403,
        "AccessDenied",
        "a foreign Host",
    );
    refused(
        &ask_as(addr, "127.26.0.1", "POST", "169.254.170.23", Some(&app)),
        405,
        "MethodNotAllowed",
        "POST",
    );
    // 64 KiB of Authorization: refused before any verification.
    let huge = format!("Bearer {}", "A".repeat(64 * 1024));
    let r_huge = ask(addr, "127.26.0.1", Some(&huge));
    assert_eq!(r_huge.status, 431, "{}", r_huge.body_str());

    // A pod on another node: its token names that node.
    let other_node = format!("{}-other", r.api.node);
    r.api.create_node(&other_node);
    r.api.ensure_service_account(&ns, "far-sa");
    r.api.create_pod(
        &PodBuilder::running(&ns, "far", &other_node, "127.26.0.9").service_account("far-sa"),
    );
    let far = r.api.pod_token(&ns, "far-sa", "far", AUDIENCE, 3600);
    assert_eq!(parts(&far).1["kubernetes.io"]["node"]["name"], other_node);
    refused(
        &ask(addr, "127.26.0.9", Some(&far)),
        403,
        "AccessDenied",
        "a pod of another node",
    );
    // A deleted pod's token, from its old address.
    r.api.ensure_service_account(&ns, "gone-sa");
    r.api.create_pod(
        &PodBuilder::running(&ns, "gone", &r.api.node, "127.26.0.3")
            .role("gone")
            .service_account("gone-sa"),
    );
    let gone = r.api.pod_token(&ns, "gone-sa", "gone", AUDIENCE, 3600);
    iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        ask(addr, "127.26.0.3", Some(&gone)).status == 200,
        "the pod to be served before it is deleted"
    );
    r.api.delete_pod(&ns, "gone");
    let after = r.eventually("127.26.0.3", LIST, Duration::from_secs(10), |x| {
        x.status == 404
    });
    assert_eq!(after.status, 404);
    let g = ask(addr, "127.26.0.3", Some(&gone));
    refused(&g, 403, "AccessDenied", "a deleted pod's token");

    // And the real pod is still served throughout.
    assert_eq!(ask(addr, "127.26.0.1", Some(&app)).status, 200);
}

#[test]
fn a_flood_of_forged_tokens_costs_the_neighbour_nothing() {
    let Setup { r, ns } = setup("door-flood", &[]);
    let addr = r.iamlet.addr();
    let web = r.api.pod_token(&ns, "web-sa", "web", AUDIENCE, 3600);
    let app = r.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        ask(addr, "127.26.0.2", Some(&web)).status == 200,
        "the neighbour's first credentials"
    );
    let pid = r.iamlet.pid();
    let rss_before = iamlet_e2e::attack::rss_kib(pid);
    // Forged tokens with the right key id and every claim right but the signature, each
    // different (so none is remembered), from the attacking pod, on 8 connections at once.
    let (kid, claims) = parts(&app);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let mut max_rss = rss_before;
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (stop, sent, kid, claims) = (&stop, &sent, &kid, &claims);
            s.spawn(move || {
                let key = EncodingKey::from_secret(b"not the key");
                let mut n = 0u64;
                let deadline = Instant::now() + Duration::from_secs(12);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                    n += 1;
                    let mut c = claims.clone();
                    c["jti"] = json!(format!("{t}-{n}"));
                    let mut h = Header::new(Algorithm::HS256);
                    h.kid = Some(kid.clone());
                    let hs = encode(&h, &c, &key).unwrap();
                    // Keep the RS256 header so the signature check itself is what refuses.
                    let forged_header = {
                        use base64::Engine;
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .encode(json!({"alg": "RS256", "kid": kid, "typ": "JWT"}).to_string())
                    };
                    let mut p: Vec<String> = hs.split('.').map(str::to_owned).collect();
                    p[0] = forged_header;
                    let token = p.join(".");
                    let _ = ask(addr, "127.26.0.1", Some(&token));
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        // The neighbour: 50 requests a second for 10 s, each on a new connection.
        let start = Instant::now();
        for n in 0..500u32 {
            let due = start + Duration::from_millis(20) * n;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let t = Instant::now();
            let resp = ask(addr, "127.26.0.2", Some(&web));
            if resp.status == 200 {
                latencies.push(t.elapsed());
            } else {
                failures.push(format!("{} {}", resp.status, resp.body_str()));
            }
            if n % 25 == 0 {
                max_rss = max_rss.max(iamlet_e2e::attack::rss_kib(pid));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99).div_ceil(100).saturating_sub(1)];
    println!(
        "{} forged tokens; neighbour {} answered, {} failed, p99 {p99:?}; RSS {rss_before} -> {max_rss} KiB; rate-limited {}",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        latencies.len(),
        failures.len(),
        sample(
            addr,
            "iamlet_container_credentials_total{outcome=\"rate_limited\"}"
        )
    );
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    assert!(
        max_rss < iamlet_e2e::attack::RSS_LIMIT_KIB,
        "RSS {max_rss} KiB"
    );
    assert!(sent.load(std::sync::atomic::Ordering::Relaxed) > 500);
}

#[test]
fn signing_keys_rotate_with_no_failed_request_and_the_kept_keys_outlive_a_restart() {
    // A server of this test's own: it is restarted with other signing keys.
    let api = RealApiServer::private(&[]);
    let s = api.scope("rotation");
    let ns = s.ns("shop");
    s.set_namespace(&ns, &[]);
    s.ensure_service_account(&ns, "app-sa");
    s.create_pod(
        &PodBuilder::running(&ns, "app", &s.node, "127.27.0.1")
            .role("app")
            .service_account("app-sa"),
    );
    let dir = std::env::temp_dir().join(format!("iamlet-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("service-account-keys.json");
    let cache_flag = format!("--token-keys-cache={}", cache.display());
    let r = real(s, &["--backoff-max-elapsed-time=1s", &cache_flag]);
    let addr = r.iamlet.addr();
    let t1 = r.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        ask(addr, "127.27.0.1", Some(&t1)).status == 200,
        "the first token's credentials"
    );

    // From now on the pod asks every 50 ms with its current token; none may fail.
    let current = std::sync::Mutex::new(t1.clone());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (failures, asked) = std::thread::scope(|sc| {
        let asker = sc.spawn(|| {
            let (mut failures, mut asked) = (Vec::new(), 0u32);
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                let token = current.lock().unwrap().clone();
                let resp = ask(addr, "127.27.0.1", Some(&token));
                asked += 1;
                if resp.status != 200 {
                    failures.push(format!("{} {}", resp.status, resp.body_str()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (failures, asked)
        });
        // 1. The new key is published beside the old one (still signing with the old).
        api.set_signing_keys("sa", &["sa", "sa2"]);
        // The agent fetches again at once for an unknown key only when its set is older
        // than the refetch bound (5 s): wait for that, on its own metric.
        iamlet_e2e::wait_until!(
            Duration::from_secs(20),
            sample(addr, "iamlet_token_keys_age_seconds") >= 5.0,
            "the key set to be older than the refetch bound"
        );
        // 2. Tokens are signed with the new key: a kid the agent has not seen yet.
        api.set_signing_keys("sa2", &["sa", "sa2"]);
        let t2 = r.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
        assert_ne!(parts(&t1).0, parts(&t2).0, "a new key id");
        *current.lock().unwrap() = t2.clone();
        let first = ask(addr, "127.27.0.1", Some(&t2));
        assert_eq!(first.status, 200, "{}", first.body_str());
        // 3. The old key is retired.
        api.set_signing_keys("sa2", &["sa2"]);
        iamlet_e2e::wait_until!(
            Duration::from_secs(10),
            ask(addr, "127.27.0.1", Some(&t2)).status == 200,
            "the new token after the old key's retirement"
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        asker.join().unwrap()
    });
    println!(
        "{asked} requests across the rotation, {} failed",
        failures.len()
    );
    assert!(asked >= 20, "{asked}");
    assert!(failures.is_empty(), "{failures:?}");

    // The keys the agent fetched were kept, 0600, both of them.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let kept: Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_eq!(kept["issuer"], api.issuer.as_str());
    assert!(
        !kept["jwks"]["keys"].as_array().unwrap().is_empty(),
        "{kept}"
    );

    // A restart while the keys cannot be fetched: the agent may no longer read the issuer's
    // documents, and a new process verifies with the kept set.
    let t2 = current_token(&r, &ns);
    let node_flag = format!("--node={}", r.api.node);
    // The agent's own token from before was signed with the retired key: a new one, as
    // kubelet would project it.
    let agent_token = api
        .scope("rotation-agent")
        .token("kube-system", "iamlet", 3600);
    let kubeconfig = format!(
        "--kubeconfig={}",
        r.api.kubeconfig_for(&agent_token, &dir).display()
    );
    cut_key_reads(api);
    let agent = restart_agent(&[
        &kubeconfig,
        &node_flag,
        &cache_flag,
        "--base-role-arn=arn:aws:iam::123456789012:role/",
        "--backoff-max-elapsed-time=1s",
    ]);
    drop(r);
    let iamlet = &agent.iamlet;
    let addr = iamlet.addr();
    iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        sample(addr, "iamlet_token_key_fetches_total{outcome=\"failed\"}") >= 1.0,
        "the new agent's key fetch to be refused"
    );
    let resp = ask(addr, "127.27.0.1", Some(&t2));
    assert_eq!(resp.status, 200, "{}\n{}", resp.body_str(), iamlet.log());
    assert!(
        iamlet.wait_for_log(
            "service-account keys loaded from the last run",
            Duration::from_secs(5)
        ),
        "{}",
        iamlet.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
    api.stop();
}

fn current_token(r: &Rig<Scope>, ns: &str) -> String {
    r.api.pod_token(ns, "app-sa", "app", AUDIENCE, 3600)
}

/// Takes away the agent's read of the issuer's documents (`/.well-known/openid-configuration`,
/// `/openid/v1/jwks`): the server's default binding that lets every ServiceAccount read them,
/// and the shipped role's own rule for them.
fn cut_key_reads(api: &'static RealApiServer) {
    api.delete_cluster_role_binding("system:service-account-issuer-discovery");
    let _ = api.shipped_identity();
    let no_discovery = |role: &mut Value| {
        if let Some(rules) = role["rules"].as_array_mut() {
            rules.retain(|r| r.get("nonResourceURLs").is_none());
        }
    };
    for obj in iamlet_e2e::realapi::shipped_rbac(Some(&no_discovery)) {
        if obj["kind"] == "ClusterRole" {
            api.apply_object(&obj);
        }
    }
}

/// A new agent process with `args` (moto and a fake IMDS of its own).
fn restart_agent(args: &[&str]) -> Rig<()> {
    iamlet_e2e::rig::control::with_agent((), |mut b| {
        for a in args {
            b = b.arg(*a);
        }
        b
    })
}

#[test]
fn with_token_review_the_api_server_vouches_for_a_token_whose_key_is_unknown() {
    // A server of this test's own: the agent may not read the issuer's documents, so it can
    // never fetch the keys, and its role is given TokenReview.
    let api = RealApiServer::private(&[]);
    cut_key_reads(api);
    let s = api.scope("review");
    api.apply_object(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "iamlet-token-review"},
        "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    }));
    api.apply_object(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "iamlet-token-review"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "iamlet-token-review"},
        "subjects": [{"kind": "ServiceAccount", "name": "iamlet", "namespace": "kube-system"}]
    }));
    let ns = s.ns("shop");
    s.set_namespace(&ns, &[]);
    for (pod, ipaddr) in [("app", "127.28.0.1"), ("web", "127.28.0.2")] {
        s.ensure_service_account(&ns, &format!("{pod}-sa"));
        s.create_pod(
            &PodBuilder::running(&ns, pod, &s.node, ipaddr)
                .role(pod)
                .service_account(&format!("{pod}-sa")),
        );
    }
    let r = real(s, &["--backoff-max-elapsed-time=1s", "--token-review"]);
    let addr = r.iamlet.addr();
    let app = r.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    let web = r.api.pod_token(&ns, "web-sa", "web", AUDIENCE, 3600);
    let ok = iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        Some(ask(addr, "127.28.0.1", Some(&app))).filter(|x| x.status == 200),
        "the API server's word for app's token"
    );
    assert!(json_of(&ok)["AccessKeyId"].as_str().is_some());
    assert!(
        sample(addr, "iamlet_token_key_fetches_total{outcome=\"failed\"}") >= 1.0,
        "the keys were never fetched: the review answered"
    );
    // The binding still holds for a reviewed token: web's from app's address.
    refused(
        &ask(addr, "127.28.0.1", Some(&web)),
        403,
        "AccessDenied",
        "another pod's reviewed token",
    );
    // A token the API server does not vouch for (signed with a key of nobody's).
    let forged = forged(api, &app, |c| c["jti"] = json!("x"));
    let mut parts3: Vec<&str> = forged.split('.').collect();
    let other = r.api.pod_token(&ns, "web-sa", "web", "someone-else", 3600);
    parts3[2] = other.split('.').nth(2).unwrap();
    refused(
        &ask(addr, "127.28.0.1", Some(&parts3.join("."))),
        401,
        "InvalidToken",
        "a token the API server does not authenticate",
    );
    drop(r);
    api.stop();
}

#[test]
fn a_denial_at_the_door_is_an_event_that_names_the_door_and_the_token() {
    const KEY: &str = "iam.amazonaws.com/allowed-roles";
    let s = RealApiServer::shared().scope("door-events");
    let ns = s.ns("team");
    s.set_namespace(&ns, &[(KEY, r#"["web-*"]"#)]);
    s.ensure_service_account(&ns, "app-sa");
    s.create_pod(
        &PodBuilder::running(&ns, "app", &s.node, "127.29.0.1")
            .role("app")
            .service_account("app-sa"),
    );
    let r = real(
        s,
        &["--namespace-restrictions", "--backoff-max-elapsed-time=1s"],
    );
    let addr = r.iamlet.addr();
    let token = r.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    let denied = ask(addr, "127.29.0.1", Some(&token));
    refused(
        &denied,
        403,
        "AccessDenied",
        "a role the namespace does not allow",
    );
    assert!(
        json_of(&denied)["Message"]
            .as_str()
            .unwrap()
            .contains(&format!("is not allowed in namespace {ns}")),
        "{}",
        denied.body_str()
    );
    // The audit line names the token by a hash prefix; the Event names the door and that token.
    assert!(
        r.iamlet
            .wait_for_log("service-account token verified", Duration::from_secs(5)),
        "{}",
        r.iamlet.log()
    );
    let log = r.iamlet.log();
    let line = log
        .lines()
        .find(|l| l.contains("service-account token verified"))
        .unwrap_or_else(|| panic!("no audit line:\n{log}"));
    let prefix = line
        .split("token_sha256=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    assert_eq!(prefix.len(), 16, "{line}");
    assert!(
        line.contains("door=\"container\"") || line.contains("door=container"),
        "{line}"
    );
    let events = iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        Some(
            r.api
                .events_for(&ns, "app")
                .into_iter()
                .filter(|e| e["reason"] == "IamRoleDenied")
                .collect::<Vec<_>>()
        )
        .filter(|e| !e.is_empty()),
        "the IamRoleDenied Event"
    );
    let message = events[0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "(container-credentials door, service-account token {prefix})"
        )),
        "{message}"
    );
}

#[test]
fn a_service_account_role_reaches_its_pod_through_both_doors() {
    let s = RealApiServer::shared().scope("door-sa-role");
    let ns = s.ns("shop");
    s.set_namespace(&ns, &[]);
    s.ensure_service_account(&ns, "checkout-sa");
    s.annotate_service_account(
        &ns,
        "checkout-sa",
        &[(
            "eks.amazonaws.com/role-arn",
            Some("arn:aws:iam::210987654321:role/checkout"),
        )],
    );
    // No role annotation on the pod: its ServiceAccount's role is its role.
    s.create_pod(
        &PodBuilder::running(&ns, "checkout", &s.node, "127.29.1.1").service_account("checkout-sa"),
    );
    let r = real(s, &["--backoff-max-elapsed-time=1s", "--workers=1"]);
    let addr = r.iamlet.addr();
    let listing = r.eventually("127.29.1.1", LIST, Duration::from_secs(10), |x| {
        x.status == 200
    });
    assert_eq!(
        listing.body_str(),
        "arn:aws:iam::210987654321:role/checkout",
        "IMDS lists the other account's role in full"
    );
    let token = r
        .api
        .pod_token(&ns, "checkout-sa", "checkout", AUDIENCE, 3600);
    let door = ask(addr, "127.29.1.1", Some(&token));
    assert_eq!(door.status, 200, "{}", door.body_str());
    let imds = r.get(
        "127.29.1.1",
        &format!("{LIST}arn:aws:iam::210987654321:role/checkout"),
    );
    assert_eq!(imds.status, 200, "{}", imds.body_str());
    assert_eq!(json_of(&door)["AccessKeyId"], json_of(&imds)["AccessKeyId"]);
    assert_eq!(json_of(&door)["AccountId"], "210987654321");
}

#[test]
fn with_token_review_a_token_whose_pod_the_agent_never_saw_is_retried_only_while_the_pod_lives() {
    let s = RealApiServer::shared().scope("review-unseen");
    // The shipped rules, and TokenReview as the chart grants it with `tokenReview: true`.
    let identity = s.own_identity(Some(&|role: &mut Value| {
        role["rules"].as_array_mut().unwrap().push(json!({
            "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]
        }))
    }));
    let dir = std::env::temp_dir().join(format!("iamlet-review-unseen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = format!(
        "--kubeconfig={}",
        s.kubeconfig_for(&s.token("kube-system", &identity, 3600), &dir)
            .display()
    );
    let ns = s.ns("shop");
    s.set_namespace(&ns, &[]);
    s.ensure_service_account(&ns, "app-sa");
    // `gone`: a pod of this node deleted before the agent started (it keeps no tombstone of
    // a pod it never saw); its token is still unexpired.
    s.create_pod(
        &PodBuilder::running(&ns, "gone", &s.node, "127.29.0.1")
            .role("app")
            .service_account("app-sa"),
    );
    let gone = s.pod_token(&ns, "app-sa", "gone", AUDIENCE, 3600);
    s.delete_pod(&ns, "gone");
    // `late`: a pod of this node that has no address yet, so the agent cannot tell it is the
    // one asking from 127.29.0.2.
    s.create_pod(
        &PodBuilder::new(&ns, "late")
            .node(&s.node)
            .phase("Pending")
            .role("app")
            .service_account("app-sa"),
    );
    let late = s.pod_token(&ns, "app-sa", "late", AUDIENCE, 3600);

    let node = format!("--node={}", s.node);
    let base = format!("--base-role-arn={}", iamlet_e2e::rig::control::BASE);
    let args = [
        kubeconfig.as_str(),
        node.as_str(),
        base.as_str(),
        "--backoff-max-elapsed-time=1s",
    ];
    // Without TokenReview the agent cannot tell the two apart: both are "retry".
    let plain = restart_agent(&args);
    for (src, token) in [("127.29.0.1", &gone), ("127.29.0.2", &late)] {
        let resp = ask(plain.iamlet.addr(), src, Some(token));
        refused(
            &resp,
            503,
            "ServiceUnavailable",
            "an unseen pod, unreviewed",
        );
    }
    drop(plain);
    let r = restart_agent(&[&args[..], &["--token-review"]].concat());
    let addr = r.iamlet.addr();
    refused(
        &ask(addr, "127.29.0.1", Some(&gone)),
        403,
        "AccessDenied",
        "a deleted pod's token, reviewed",
    );
    let resp = ask(addr, "127.29.0.2", Some(&late));
    refused(&resp, 503, "ServiceUnavailable", "a live pod not known yet");
    assert!(
        json_of(&resp)["Message"]
            .as_str()
            .unwrap()
            .contains("no pod of this node is known at this address yet"),
        "{}",
        resp.body_str()
    );
    assert_eq!(
        sample(
            addr,
            "iamlet_container_credentials_total{outcome=\"pod_gone\"}"
        ),
        1.0,
        "{}",
        r.iamlet.log()
    );
    // The live pod gets its address: the same token is answered.
    s.set_pod_status(&ns, "late", "Running", &["127.29.0.2".to_owned()]);
    let ok = iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        Some(ask(addr, "127.29.0.2", Some(&late))).filter(|x| x.status == 200),
        "the late pod's credentials"
    );
    assert!(json_of(&ok)["AccessKeyId"].as_str().is_some());
    // The deleted pod's token stays refused (from its old address, now nobody's).
    refused(
        &ask(addr, "127.29.0.1", Some(&gone)),
        403,
        "AccessDenied",
        "a deleted pod's token, again",
    );
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_api_server_outage_across_an_agent_upgrade_fails_no_request() {
    // A server of this test's own: it is stopped for a while.
    let api = RealApiServer::private(&[]);
    let s = api.scope("outage");
    let ns = s.ns("shop");
    s.set_namespace(&ns, &[]);
    s.ensure_service_account(&ns, "app-sa");
    s.create_pod(
        &PodBuilder::running(&ns, "app", &s.node, "127.30.0.1")
            .role("app")
            .service_account("app-sa"),
    );
    let dir = std::env::temp_dir().join(format!("iamlet-outage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cache_flag = format!(
        "--token-keys-cache={}",
        dir.join("service-account-keys.json").display()
    );
    let sock_flag = format!(
        "--handover-socket={}",
        dir.join("run/handover.sock").display()
    );
    let node_flag = format!("--node={}", s.node);
    let kubeconfig = format!(
        "--kubeconfig={}",
        api.shipped_identity().kubeconfig.display()
    );
    let mut old = real(
        s,
        &["--backoff-max-elapsed-time=1s", &cache_flag, &sock_flag],
    );
    let addr = old.iamlet.addr();
    let first = old.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    iamlet_e2e::wait_until!(
        Duration::from_secs(10),
        ask(addr, "127.30.0.1", Some(&first)).status == 200,
        "the first token's credentials"
    );
    // A token the old agent never sees: the new one meets it first, after the outage.
    let fresh = old.api.pod_token(&ns, "app-sa", "app", AUDIENCE, 3600);
    // Once the server is back the new agent may list pods but not read the issuer's
    // documents: it can only verify with the keys the old one kept.
    cut_key_reads(api);

    let current = std::sync::Mutex::new(first.clone());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let asked = std::sync::atomic::AtomicU32::new(0);
    let (failures, new) = std::thread::scope(|sc| {
        let asker = sc.spawn(|| {
            let mut failures = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(180);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                let token = current.lock().unwrap().clone();
                match try_request_from(
                    ip("127.30.0.1"),
                    addr,
                    format!(
                        "GET {DOOR} HTTP/1.1\r\nHost: 169.254.170.23\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                ) {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body_str())),
                    Err(e) => failures.push(e.to_string()),
                }
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
            failures
        });
        let wait_asked = |n: u32| {
            let from = asked.load(std::sync::atomic::Ordering::SeqCst);
            iamlet_e2e::wait_until!(
                Duration::from_secs(20),
                asked.load(std::sync::atomic::Ordering::SeqCst) >= from + n,
                "{n} more requests"
            );
        };
        wait_asked(10);
        // The outage begins; the upgrade starts during it: the new process takes the
        // sockets and waits for a pod list it cannot get, while the old one serves.
        api.stop_apiserver();
        let new = restart_agent_until(
            &[
                &kubeconfig,
                &node_flag,
                &cache_flag,
                &sock_flag,
                "--base-role-arn=arn:aws:iam::123456789012:role/",
                "--backoff-max-elapsed-time=1s",
            ],
            "handover: waiting for the first pod list",
        );
        wait_asked(40);
        assert!(
            old.iamlet.try_exit_status().is_none(),
            "the old agent serves through the outage: {}",
            old.iamlet.log()
        );
        // The server comes back: the new agent lists pods, accepts, and the old one goes.
        api.start_apiserver();
        let (code, timed_out) = old.iamlet.wait_exit(Duration::from_secs(60));
        assert_eq!(
            (code, timed_out),
            (Some(0), false),
            "the old agent hands over and exits: {}\nnew: {}",
            old.iamlet.log(),
            new.iamlet.log()
        );
        // Only the new agent answers now; it has never seen this token.
        *current.lock().unwrap() = fresh.clone();
        wait_asked(20);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (asker.join().unwrap(), new)
    });
    let asked = asked.into_inner();
    println!(
        "{asked} requests across the outage and the upgrade, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}\n{}", new.iamlet.log());
    let log = new.iamlet.log();
    assert!(
        log.contains("service-account keys loaded from the last run"),
        "{log}"
    );
    assert!(
        log.contains("service-account token verified"),
        "the new agent verified the fresh token itself: {log}"
    );
    drop(new);
    drop(old);
    let _ = std::fs::remove_dir_all(&dir);
    api.stop();
}

/// As [`restart_agent`], returning once the agent logs `needle` (a handover step).
fn restart_agent_until(args: &[&str], needle: &str) -> Rig<()> {
    iamlet_e2e::rig::control::with_agent((), |mut b| {
        for a in args {
            b = b.arg(*a);
        }
        b.until(needle)
    })
}
