//! IMDSv2 towards pods and towards the upstream, from raw sockets: the token flow with exact
//! bytes, tokens accepted by every worker, bound to the pod's IP, expiring on time, the
//! `--imdsv2` modes, `X-Forwarded-For`, a key file that survives restarts; pass-through with
//! iamlet's own upstream token (IMDSv2-required upstream, tokenless fallback) and bounded
//! upstream failures (502/504 with an IMDS-style body).

use iamlet_e2e::rig::data as dataplane;

use dataplane::{
    LOCAL_POD, OTHER_POD, POD, Rig, Scripted, UNAUTHORIZED_CLOSE, builder, builder_at, get_req, ip,
    metric, mint, token_put,
};
use iamlet_e2e::imds::{TOKEN_HEADER, TTL_HEADER};
use iamlet_e2e::util::TempDir;
use iamlet_e2e::{FakeImds, Moto, drivers, request_from, wait_until};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

const LIST: &str = "/latest/meta-data/iam/security-credentials/";

fn get(addr: SocketAddr, src: u8, path: &str, token: Option<&str>) -> iamlet_e2e::Response {
    request_from(ip(src), addr, &get_req(path, token, ""))
}

fn text_answer(status: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nServer: EC2ws\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn token_flow_from_raw_sockets() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &["--workers=1"]);
        let addr = r.addr();
        for ttl in [1, 60, 21600] {
            mint(addr, POD, ttl); // asserts the exact answer, TTL echoed
        }
        let token = mint(addr, POD, 21600);

        // The token opens the role listing, the credentials and the pass-through.
        let resp = get(addr, POD, LIST, Some(&token));
        assert_eq!(
            String::from_utf8_lossy(&resp.raw),
            text_answer(200, "OK", "app-role"),
            "{ctx}"
        );
        let resp = get(
            addr,
            POD,
            "/latest/meta-data/iam/security-credentials/app-role",
            Some(&token),
        );
        assert_eq!(resp.status, 200, "{ctx}: {}", resp.body_str());
        let doc: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(doc["Code"], "Success", "{ctx}");
        // The header name is case-insensitive.
        let resp = request_from(
            ip(POD),
            addr,
            format!("GET {LIST} HTTP/1.1\r\nx-AWS-ec2-METADATA-token: {token}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(resp.body_str(), "app-role", "{ctx}");
        r.imds.clear_requests();
        let resp = get(addr, POD, "/latest/meta-data/instance-id", Some(&token));
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "i-0fake00000000001"),
            "{ctx}"
        );
        let forwarded: Vec<_> = r
            .imds
            .requests()
            .into_iter()
            .filter(|q| q.method == "GET")
            .collect();
        assert_eq!(forwarded.len(), 1, "{ctx}: {forwarded:?}");
        let upstream_token = forwarded[0].header(TOKEN_HEADER).unwrap_or("");
        assert!(
            upstream_token.starts_with("AQAEA") && upstream_token != token,
            "{ctx}: the upstream must see iamlet's own token, not the pod's: {upstream_token:?}"
        );

        // Bad TTLs: 400, exact.
        let bad_ttl = text_answer(
            400,
            "Bad Request",
            "Bad Request: X-aws-ec2-metadata-token-ttl-seconds must be 1..21600\n",
        );
        for ttl in [
            None,
            Some("0"),
            Some("21601"),
            Some("-1"),
            Some("1.5"),
            Some("abc"),
            Some(""),
        ] {
            let resp = r.send(POD, &token_put(ttl, ""));
            assert_eq!(
                String::from_utf8_lossy(&resp.raw),
                bad_ttl,
                "{ctx}: TTL {ttl:?}"
            );
        }
        // Through a proxy (X-Forwarded-For, any case): 403, exact.
        for xff in [
            "X-Forwarded-For: 10.0.0.1\r\n",
            "x-forwarded-for: 1.2.3.4\r\n",
        ] {
            let resp = r.send(POD, &token_put(Some("60"), xff));
            assert_eq!(
                String::from_utf8_lossy(&resp.raw),
                text_answer(403, "Forbidden", "Forbidden\n"),
                "{ctx}: {xff:?}"
            );
        }
        // A version-specific token path: 403. Other methods on the token path: 405.
        let resp = r.send(
            POD,
            format!("PUT /2021-03-23/api/token HTTP/1.1\r\n{TTL_HEADER}: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(
            String::from_utf8_lossy(&resp.raw),
            text_answer(403, "Forbidden", "Forbidden\n"),
            "{ctx}"
        );
        for method in ["GET", "POST", "DELETE"] {
            let resp = r.send(
                POD,
                format!("{method} /latest/api/token HTTP/1.1\r\n{TTL_HEADER}: 60\r\nConnection: close\r\n\r\n").as_bytes(),
            );
            assert_eq!(
                String::from_utf8_lossy(&resp.raw),
                text_answer(405, "Method Not Allowed", "Method Not Allowed\n"),
                "{ctx}: {method}"
            );
        }
        // A forged token (valid shape, wrong MAC) and junk: 401, empty body.
        let mut forged = token.clone().into_bytes();
        forged[55] = if forged[55] == b'0' { b'1' } else { b'0' };
        for bad in [
            String::from_utf8(forged).unwrap(),
            "AAAA".into(),
            "x".repeat(56),
        ] {
            let resp = get(addr, POD, LIST, Some(&bad));
            assert_eq!(resp.raw, UNAUTHORIZED_CLOSE, "{ctx}: {bad}");
        }
        assert_eq!(
            metric(addr, "iamlet_tokens_issued_total"),
            Some(4.0),
            "{ctx}"
        );
        assert_eq!(
            metric(addr, "iamlet_token_rejections_total{outcome=\"invalid\"}"),
            Some(3.0),
            "{ctx}"
        );
    }
}

#[test]
fn a_token_is_accepted_by_every_worker() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &["--workers=2"]);
        let token = mint(r.addr(), POD, 300);
        // SO_REUSEPORT spreads fresh connections over both workers by their 4-tuple: with 64
        // connections the chance that one worker saw none is 2^-63.
        for i in 0..64 {
            let resp = get(r.addr(), POD, LIST, Some(&token));
            assert_eq!(
                (resp.status, resp.body_str().as_str()),
                (200, "app-role"),
                "{ctx}: connection {i}"
            );
        }
        // Tokens minted on any worker verify on any other.
        let tokens: Vec<String> = (0..16).map(|_| mint(r.addr(), POD, 300)).collect();
        for (i, t) in tokens.iter().enumerate() {
            for _ in 0..4 {
                let resp = get(r.addr(), POD, LIST, Some(t));
                assert_eq!(resp.status, 200, "{ctx}: token {i}");
            }
        }
    }
}

#[test]
fn a_token_is_bound_to_the_pod_ip_that_asked_for_it() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &[]);
        let t11 = mint(r.addr(), POD, 300);
        let t12 = mint(r.addr(), OTHER_POD, 300);
        assert_ne!(t11, t12);
        assert_eq!(
            get(r.addr(), OTHER_POD, LIST, Some(&t12)).body_str(),
            "other-role"
        );
        for path in [
            LIST,
            "/latest/meta-data/iam/security-credentials/app-role",
            "/latest/meta-data/instance-id",
        ] {
            let resp = get(r.addr(), OTHER_POD, path, Some(&t11));
            assert_eq!(resp.raw, UNAUTHORIZED_CLOSE, "{ctx}: {path}");
            let resp = get(r.addr(), POD, path, Some(&t12));
            assert_eq!(resp.raw, UNAUTHORIZED_CLOSE, "{ctx}: {path}");
        }
    }
}

#[test]
fn a_token_expires_after_its_ttl_and_not_before() {
    // Where in a second a token is minted, and how long it lives, is unit-tested on an
    // injected clock (proxy/src/token.rs); here: the real binary honours it.
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &[]);
        let minted = Instant::now();
        let token = mint(r.addr(), POD, 1);
        let resp = get(r.addr(), POD, LIST, Some(&token));
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "app-role"),
            "{ctx}: a fresh TTL-1 token is refused ({:?} after minting)",
            minted.elapsed()
        );
        // Good until it expires, then refused with the exact 401.
        let expired = wait_until!(
            Duration::from_secs(5),
            {
                let resp = get(r.addr(), POD, LIST, Some(&token));
                assert!(
                    matches!(resp.status, 200 | 401),
                    "{ctx}: {}",
                    resp.body_str()
                );
                (resp.status == 401).then_some(resp)
            },
            "{ctx}: the TTL-1 token to expire"
        );
        let after = minted.elapsed();
        assert!(
            after >= Duration::from_secs(1),
            "{ctx}: a TTL-1 token expired after {after:?}"
        );
        assert_eq!(expired.raw, UNAUTHORIZED_CLOSE, "{ctx}");
        assert!(
            metric(
                r.addr(),
                "iamlet_token_rejections_total{outcome=\"expired\"}"
            )
            .is_some_and(|n| n >= 1.0),
            "{ctx}"
        );
    }
}

#[test]
fn required_mode_refuses_tokenless_requests() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &["--imdsv2=required"]);
        r.imds.clear_requests();
        for path in [
            LIST,
            "/latest/meta-data/iam/security-credentials/app-role",
            "/latest/meta-data/iam/info",
            "/latest/meta-data/instance-id",
            "/latest/user-data",
        ] {
            assert_eq!(
                get(r.addr(), POD, path, None).raw,
                UNAUTHORIZED_CLOSE,
                "{ctx}: {path}"
            );
        }
        assert!(
            r.imds.requests().iter().all(|q| q.method == "PUT"),
            "{ctx}: a tokenless request was forwarded: {:?}",
            r.imds.requests()
        );
        // Admin paths need no token.
        assert_eq!(
            dataplane::send_get(r.addr(), "/healthz").status,
            200,
            "{ctx}"
        );
        let token = mint(r.addr(), POD, 60);
        assert_eq!(
            get(r.addr(), POD, LIST, Some(&token)).body_str(),
            "app-role",
            "{ctx}"
        );
        assert_eq!(
            get(r.addr(), POD, "/latest/meta-data/instance-id", Some(&token)).body_str(),
            "i-0fake00000000001",
            "{ctx}"
        );
        assert!(
            metric(
                r.addr(),
                "iamlet_token_rejections_total{outcome=\"missing\"}"
            )
            .is_some_and(|n| n >= 5.0),
            "{ctx}"
        );
    }
}

#[test]
fn disabled_mode_refuses_the_token_put_so_sdks_fall_back() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &["--imdsv2=disabled"]);
        let resp = r.send(POD, &token_put(Some("21600"), ""));
        assert_eq!(
            String::from_utf8_lossy(&resp.raw),
            text_answer(
                403,
                "Forbidden",
                "Forbidden: IMDSv2 is disabled on this node\n"
            ),
            "{ctx}"
        );
        assert_eq!(
            get(r.addr(), POD, LIST, None).body_str(),
            "app-role",
            "{ctx}"
        );
    }
}

#[test]
fn a_token_key_file_makes_tokens_survive_a_restart() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let dir = TempDir::new("token-key");
        let key = dir.path().join("token.key");
        let key_arg = format!("--imds-token-key-file={}", key.display());
        let moto = Moto::start();
        let imds = FakeImds::start();
        let mut first = builder(driver, &moto, &imds, &[&key_arg]).start();
        let token = mint(first.addr(), POD, 3600);
        assert_eq!(
            get(first.addr(), POD, LIST, Some(&token)).status,
            200,
            "{ctx}"
        );
        let meta = std::fs::metadata(&key).expect("the key file is created");
        assert_eq!(meta.len(), 32, "{ctx}");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600,
            "{ctx}"
        );
        first.kill_9();

        let second = builder(driver, &moto, &imds, &[&key_arg]).start();
        let resp = get(second.addr(), POD, LIST, Some(&token));
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "app-role"),
            "{ctx}: the token did not survive the restart"
        );
        drop(second);
        // Without the key file a restart forgets every token.
        let third = builder(driver, &moto, &imds, &[]).start();
        assert_eq!(
            get(third.addr(), POD, LIST, Some(&token)).raw,
            UNAUTHORIZED_CLOSE,
            "{ctx}"
        );
    }
}

#[test]
fn pass_through_on_an_imdsv2_required_upstream_uses_iamlets_own_token() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let imds = FakeImds::builder().require_token(true).start();
        let r = Rig::start(driver, imds, &["--workers=1"]);
        r.imds.clear_requests();
        // A tokenless pod (IMDSv1 client) still gets answers.
        let resp = get(r.addr(), LOCAL_POD, "/latest/meta-data/instance-id", None);
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "i-0fake00000000001"),
            "{ctx}"
        );
        // A pod with its own token and proxy headers: none of them reach the upstream.
        let pod_token = mint(r.addr(), POD, 60);
        let resp = request_from(
            ip(POD),
            r.addr(),
            &get_req(
                "/latest/meta-data/placement/region",
                Some(&pod_token),
                "X-Forwarded-For: 10.9.9.9\r\nForwarded: for=10.9.9.9\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nX-Custom: dropped\r\nExpect: 100-continue\r\nUser-Agent: test-agent/1.0\r\n",
            ),
        );
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "us-east-1"),
            "{ctx}"
        );
        let seen = r.imds.requests();
        let puts: Vec<_> = seen.iter().filter(|q| q.method == "PUT").collect();
        let gets: Vec<_> = seen.iter().filter(|q| q.method == "GET").collect();
        assert_eq!(
            puts.len(),
            1,
            "{ctx}: one upstream token per worker: {seen:?}"
        );
        assert_eq!(puts[0].path, "/latest/api/token", "{ctx}");
        assert_eq!(puts[0].header(TTL_HEADER), Some("21600"), "{ctx}");
        assert_eq!(
            gets.iter().map(|q| q.path.as_str()).collect::<Vec<_>>(),
            [
                "/latest/meta-data/instance-id",
                "/latest/meta-data/placement/region"
            ],
            "{ctx}"
        );
        let upstream_token = gets[0].header(TOKEN_HEADER).expect("iamlet's token");
        for q in &gets {
            assert_eq!(q.header(TOKEN_HEADER), Some(upstream_token), "{ctx}: {q:?}");
            assert_ne!(q.header(TOKEN_HEADER), Some(pod_token.as_str()), "{ctx}");
            for h in [
                "x-forwarded-for",
                "forwarded",
                "keep-alive",
                "proxy-authorization",
                "x-custom",
                "expect",
            ] {
                assert_eq!(q.header(h), None, "{ctx}: {h} reached the upstream: {q:?}");
            }
            assert_eq!(
                q.headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(TOKEN_HEADER))
                    .count(),
                1,
                "{ctx}: {q:?}"
            );
        }
        // Only the allow-listed request headers go upstream.
        assert_eq!(
            gets[1].header("user-agent"),
            Some("test-agent/1.0"),
            "{ctx}"
        );
        // One worker, one pooled keep-alive connection for the token and both requests.
        assert!(
            seen.iter().all(|q| q.peer == seen[0].peer),
            "{ctx}: the upstream connection was not reused: {:?}",
            seen.iter().map(|q| q.peer).collect::<Vec<_>>()
        );
        assert!(
            seen.iter().all(|q| q.header("x-forwarded-for").is_none()),
            "{ctx}"
        );
    }
}

#[test]
fn an_upstream_without_tokens_is_used_tokenless() {
    for driver in drivers() {
        for put_status in [403, 404, 405] {
            let ctx = format!("driver {driver}, upstream PUT answers {put_status}");
            let moto = Moto::start();
            let up = Scripted::start(put_status, false);
            let iamlet = builder_at(driver, &moto, up.addr, &["--workers=1"]).start();
            for _ in 0..3 {
                let resp = get(iamlet.addr(), POD, "/latest/meta-data/instance-id", None);
                assert_eq!(
                    (resp.status, resp.body_str().as_str()),
                    (200, "upstream-ok"),
                    "{ctx}"
                );
            }
            let seen: Vec<_> = std::iter::from_fn(|| up.next(Duration::from_millis(500)))
                .take(10)
                .collect();
            let methods: Vec<&str> = seen.iter().map(|(m, _, _)| m.as_str()).collect();
            // One PUT, remembered: the GETs follow without a token and without new PUTs.
            assert_eq!(methods, ["PUT", "GET", "GET", "GET"], "{ctx}: {seen:?}");
            for (_, _, headers) in &seen[1..] {
                assert!(
                    !headers
                        .iter()
                        .any(|(k, _)| k.eq_ignore_ascii_case(TOKEN_HEADER)),
                    "{ctx}: {headers:?}"
                );
            }
        }
    }
}

#[test]
fn iamlets_upstream_token_is_fetched_again_when_the_upstream_forgets_it() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let moto = Moto::start();
        let up = Scripted::start_with(200, false, true);
        let iamlet = builder_at(driver, &moto, up.addr, &["--workers=1"]).start();
        for _ in 0..2 {
            let resp = get(iamlet.addr(), POD, "/latest/meta-data/instance-id", None);
            assert_eq!(
                (resp.status, resp.body_str().as_str()),
                (200, "upstream-ok"),
                "{ctx}"
            );
        }
        let seen: Vec<(String, Option<String>)> =
            std::iter::from_fn(|| up.next(Duration::from_millis(500)))
                .take(10)
                .map(|(m, _, h)| {
                    let tok = h
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(TOKEN_HEADER))
                        .map(|(_, v)| v.clone());
                    (m, tok)
                })
                .collect();
        let t = |n: u32| Some(format!("scripted-token-{n}"));
        assert_eq!(
            seen,
            [
                ("PUT".to_string(), None),
                ("GET".to_string(), t(0)), // 401: forgotten
                ("PUT".to_string(), None),
                ("GET".to_string(), t(1)),
                ("GET".to_string(), t(1)), // the new token is kept
            ],
            "{ctx}"
        );
    }
}

fn json_error(status: u16, reason: &str, code: &str, message: &str) -> String {
    let body = format!("{{\n  \"Code\" : \"{code}\",\n  \"Message\" : \"{message}\"\n}}");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nServer: EC2ws\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn an_upstream_that_never_answers_gets_504_within_the_timeout() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        // Listening, never accepting: the kernel completes the handshake, nobody answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let moto = Moto::start();
        let iamlet = builder_at(
            driver,
            &moto,
            silent.local_addr().unwrap(),
            &["--upstream-timeout=1s", "--workers=1"],
        )
        .start();
        for attempt in 0..2 {
            let t = Instant::now();
            let resp = get(iamlet.addr(), POD, "/latest/meta-data/instance-id", None);
            let took = t.elapsed();
            assert_eq!(
                String::from_utf8_lossy(&resp.raw),
                json_error(
                    504,
                    "Gateway Timeout",
                    "UpstreamTimeout",
                    "the instance metadata service did not answer in time"
                ),
                "{ctx}"
            );
            // Not before the 1 s bound; and by it, not by the 3 s default.
            assert!(
                took >= Duration::from_millis(950) && took < Duration::from_secs(3),
                "{ctx}: attempt {attempt}: 504 after {took:?} with --upstream-timeout=1s"
            );
        }
        // Credentials do not depend on the upstream.
        assert_eq!(
            get(iamlet.addr(), POD, LIST, None).body_str(),
            "app-role",
            "{ctx}"
        );
        assert!(
            metric(
                iamlet.addr(),
                "iamlet_errors_total{class=\"upstream\",kind=\"upstream_timeout\"}"
            )
            .is_some_and(|n| n >= 2.0),
            "{ctx}"
        );
        drop(silent);
    }
}

#[test]
fn a_closed_upstream_port_gets_502_fast() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let moto = Moto::start();
        let iamlet = builder_at(
            driver,
            &moto,
            closed,
            &["--workers=1", "--upstream-connect-timeout=5s"],
        )
        .start();
        let t = Instant::now();
        let resp = get(iamlet.addr(), POD, "/latest/meta-data/instance-id", None);
        let took = t.elapsed();
        assert_eq!(
            String::from_utf8_lossy(&resp.raw),
            json_error(
                502,
                "Bad Gateway",
                "UpstreamUnavailable",
                "the instance metadata service is unreachable"
            ),
            "{ctx}"
        );
        // On the refusal, not when the 5 s connect bound runs out.
        assert!(took < Duration::from_secs(5), "{ctx}: 502 after {took:?}");
        let doc: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(doc["Code"], "UpstreamUnavailable", "{ctx}");
        assert_eq!(
            metric(
                iamlet.addr(),
                "iamlet_http_requests_total{route=\"passthrough\",status=\"5xx\"}"
            ),
            Some(1.0),
            "{ctx}: one failed request counts once"
        );
    }
}

#[test]
fn an_upstream_that_does_not_accept_connections_gets_504_after_the_connect_timeout() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        // A listener with a zero backlog and one connection already queued: the kernel drops
        // further SYNs, so connects hang.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        sock.listen(0).unwrap();
        let full: SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        let mut hangs = false;
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&full, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(_) => {
                    hangs = true;
                    break;
                }
            }
        }
        assert!(hangs, "{ctx}: could not fill the accept queue");
        let moto = Moto::start();
        let iamlet = builder_at(
            driver,
            &moto,
            full,
            &["--upstream-connect-timeout=300ms", "--workers=1"],
        )
        .start();
        let t = Instant::now();
        let resp = get(iamlet.addr(), POD, "/latest/meta-data/instance-id", None);
        let took = t.elapsed();
        assert_eq!(
            String::from_utf8_lossy(&resp.raw),
            json_error(
                504,
                "Gateway Timeout",
                "UpstreamTimeout",
                "the instance metadata service did not accept the connection in time"
            ),
            "{ctx}"
        );
        // By the 300 ms connect bound, not the 3 s response bound.
        assert!(
            took >= Duration::from_millis(280) && took < Duration::from_secs(3),
            "{ctx}: 504 after {took:?} with --upstream-connect-timeout=300ms"
        );
        drop(fillers);
    }
}
