//! Hostile tenants, through the real binary with default flags: raw sockets from chosen
//! 127.0.0.x sources, an upstream that answers everything with a marker and records every
//! request. Resource attacks are judged by what a *neighbour* pod sees while one pod attacks
//! (every answer a 200, p99 under 100 ms) and by the agent's memory (RSS under 64 MiB);
//! the identity findings by what reaches the upstream. Every attack is bounded in count and
//! time and talks only to loopback.

use iamlet_e2e::attack::{agent, under_attack, warm};
use iamlet_e2e::marker::{MARKER, MarkerImds};
use iamlet_e2e::rig::data::{self as dataplane, OTHER_POD, POD, UNKNOWN, ip, sample};
use iamlet_e2e::{Conn, Moto, Response, drivers, get_from, request_from};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

/// A socket from `src` with a small receive buffer (set before connect, so the window the
/// agent sees is small too).
fn small_window_socket(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_recv_buffer_size(4096)?;
    sock.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))?;
    sock.connect_timeout(&SockAddr::from(dst), Duration::from_secs(2))?;
    sock.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(sock.into())
}

#[test]
fn ten_thousand_connections_from_one_source_do_not_take_the_neighbours_slots() {
    for driver in drivers() {
        let (moto, up) = (Moto::start(), MarkerImds::start());
        let iamlet = agent(driver, &moto, up.addr(), &[]);
        warm(&iamlet);
        let addr = iamlet.addr();
        let mut held: Vec<TcpStream> = Vec::new();
        let seen = under_attack(&iamlet, Duration::from_secs(4), || {
            // 10,000 keep-alive connections from one pod, each with one request sent and its
            // answer never read, held open.
            let req =
                b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n";
            for _ in 0..10_000 {
                match iamlet_e2e::client::connect_from(ip(POD), addr) {
                    Ok(mut s) => {
                        let _ = s.write_all(req);
                        held.push(s);
                    }
                    Err(_) => continue,
                }
            }
        });
        seen.assert_unharmed(&format!("driver {driver}: 10,000 connections from one pod"));
        let refused = sample(
            addr,
            "iamlet_connections_rejected_total{reason=\"per_source\"}",
        );
        assert!(
            refused >= 9_000.0,
            "driver {driver}: only {refused} of 10,000 connections refused by the per-source cap"
        );
        drop(held);
    }
}

#[test]
fn pipelined_scrapes_that_are_never_read_cost_bounded_memory_and_time_out() {
    for driver in drivers() {
        let (moto, up) = (Moto::start(), MarkerImds::start());
        let iamlet = agent(driver, &moto, up.addr(), &["--write-timeout=2s"]);
        warm(&iamlet);
        let addr = iamlet.addr();
        let renders_before = sample(addr, "iamlet_metrics_renders_total");
        let mut socks = Vec::new();
        let started = Instant::now();
        let seen = under_attack(&iamlet, Duration::from_secs(4), || {
            let batch = b"GET /metrics HTTP/1.1\r\n\r\n".repeat(400);
            for _ in 0..50 {
                let mut s = small_window_socket(ip(POD), addr).expect("attack socket");
                // The agent may stop reading them once its output is full: a short write is
                // the attack working, not failing.
                let _ = s.write_all(&batch);
                socks.push(s);
            }
        });
        seen.assert_unharmed(&format!("driver {driver}: 50 sockets pipelining /metrics"));
        let renders = sample(addr, "iamlet_metrics_renders_total") - renders_before;
        let secs = started.elapsed().as_secs_f64();
        assert!(
            renders <= secs.ceil() + 2.0,
            "driver {driver}: /metrics rendered {renders} times in {secs:.1} s of scrapes"
        );
        // Every attacking socket is closed by the agent once its writes stall for
        // --write-timeout (reading now drains what was written, then meets the close).
        for (i, mut s) in socks.into_iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut total = 0usize;
            let mut buf = [0u8; 64 * 1024];
            let closed = loop {
                match s.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(n) => total += n,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                    Err(_) => break false,
                }
            };
            assert!(
                closed,
                "driver {driver}: attack socket {i} still open after {:?}",
                started.elapsed()
            );
            if i == 0 {
                println!(
                    "driver {driver}: an attack socket was sent {total} bytes before the close"
                );
            }
        }
        assert!(
            sample(
                addr,
                "iamlet_errors_total{class=\"downstream\",kind=\"write_stalled\"}"
            ) >= 50.0,
            "driver {driver}"
        );
    }
}

#[test]
fn two_thousand_slowloris_connections_do_not_slow_the_neighbour() {
    for driver in drivers() {
        let (moto, up) = (Moto::start(), MarkerImds::start());
        let iamlet = agent(driver, &moto, up.addr(), &[]);
        warm(&iamlet);
        let addr = iamlet.addr();
        let mut socks: Vec<TcpStream> = Vec::new();
        let started = Instant::now();
        let seen = under_attack(&iamlet, Duration::from_secs(4), || {
            // 2,000 requests that never finish their head, from ten sources (each under the
            // per-source cap), each dribbling a header byte now and then.
            for i in 0..2_000u32 {
                let src = Ipv4Addr::new(127, 0, 3, 1 + (i % 10) as u8);
                if let Ok(mut s) = iamlet_e2e::client::connect_from(src, addr) {
                    let _ = s.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nX-a: ");
                    socks.push(s);
                }
            }
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(500));
                for s in &mut socks {
                    let _ = s.write_all(b"a");
                }
            }
        });
        seen.assert_unharmed(&format!("driver {driver}: 2,000 slowloris connections"));
        assert!(
            socks.len() >= 1_900,
            "driver {driver}: {} opened",
            socks.len()
        );
        // The header timeout (5 s) ends them all, dribbling or not: each sees the close.
        let deadline = started + Duration::from_secs(9);
        let mut open = 0;
        for mut s in socks {
            let left = deadline.saturating_duration_since(Instant::now());
            s.set_read_timeout(Some(left.max(Duration::from_millis(100))))
                .unwrap();
            let mut b = [0u8; 1024];
            match s.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                _ => open += 1,
            }
        }
        assert_eq!(
            open, 0,
            "driver {driver}: slowloris connections outlived the header timeout"
        );
    }
}

/// `GET path` from `src` with `Expect: 100-continue`, on a fresh connection.
fn get_expecting(src: u8, addr: SocketAddr, path: &str) -> Response {
    request_from(
        ip(src),
        addr,
        format!(
            "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
}

#[test]
fn an_upstream_interim_answer_never_gives_one_pod_anothers_answer() {
    for driver in drivers() {
        let (moto, up) = (Moto::start(), MarkerImds::start());
        up.send_interim(true);
        // One worker: one pool, the case where a desynchronised connection is always reused.
        let iamlet = agent(driver, &moto, up.addr(), &["--workers=1"]);
        warm(&iamlet);
        let addr = iamlet.addr();
        let seen = under_attack(&iamlet, Duration::from_secs(2), || {
            for i in 0..30 {
                let a = get_expecting(POD, addr, &format!("/latest/meta-data/a-{i}"));
                let b = get_from(ip(OTHER_POD), addr, &format!("/latest/meta-data/b-{i}"));
                assert_eq!(
                    (a.status, a.body_str()),
                    (200, format!("{MARKER} GET /latest/meta-data/a-{i}")),
                    "driver {driver}"
                );
                assert_eq!(
                    (b.status, b.body_str()),
                    (200, format!("{MARKER} GET /latest/meta-data/b-{i}")),
                    "driver {driver}: the other pod got someone else's answer"
                );
            }
        });
        seen.assert_unharmed(&format!("driver {driver}: 100 Continue from the upstream"));
        for q in up.seen() {
            assert_eq!(
                q.header("expect"),
                None,
                "driver {driver}: Expect forwarded: {q:?}"
            );
        }
    }
}

#[test]
fn an_unknown_source_gets_no_token_and_none_of_the_nodes_metadata() {
    for driver in drivers() {
        let (moto, up) = (Moto::start(), MarkerImds::start());
        let iamlet = agent(
            driver,
            &moto,
            up.addr(),
            &["--backoff-max-elapsed-time=200ms"],
        );
        let addr = iamlet.addr();
        let put = b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n";
        let resp = request_from(ip(UNKNOWN), addr, put);
        assert_eq!(
            (resp.status, resp.body_str()),
            (404, dataplane::not_found_body().to_owned()),
            "driver {driver}: a token for an unknown source"
        );
        for path in [
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/document",
            "/latest/meta-data/instance-id",
            "/latest/user-data",
            "/",
        ] {
            let resp = get_from(ip(UNKNOWN), addr, path);
            assert_eq!(resp.status, 404, "driver {driver}: {path}");
            assert!(!resp.body_str().contains(MARKER), "driver {driver}: {path}");
        }
        assert_eq!(
            up.forwarded(),
            [],
            "driver {driver}: forwarded for an unknown source"
        );
        // Admin paths answer any source (kubelet probes, Prometheus).
        assert_eq!(get_from(ip(UNKNOWN), addr, "/healthz").status, 200);
        assert_eq!(get_from(ip(UNKNOWN), addr, "/ready").status, 200);
        assert_eq!(get_from(ip(UNKNOWN), addr, "/metrics").status, 200);
        // A pod of the node gets its token and the unsigned identity document.
        let t = dataplane::mint(addr, POD, 60);
        assert_eq!(t.len(), 56);
        let doc = get_from(ip(POD), addr, "/latest/dynamic/instance-identity/document");
        assert_eq!(
            doc.body_str(),
            format!("{MARKER} GET /latest/dynamic/instance-identity/document")
        );
    }
}

/// Every spelling of the node's secrets that must stay on the node by default.
const NODE_SECRETS: [&str; 12] = [
    "/latest/user-data",
    "/user-data",
    "/user-data/",
    "/latest/%20user-data",
    "/LATEST/USER-DATA",
    "/2009-04-04/user-data;x",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/signature",
    "/latest/dynamic/instance-identity/rsa2048",
    "/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/PKCS7/",
    "/latest/meta-data/tags/instance/..;/..;/iam;/info",
];

#[test]
fn user_data_and_the_signed_identity_stay_on_the_node_whatever_the_spelling() {
    for driver in drivers() {
        let (moto, up) = (Moto::start(), MarkerImds::start());
        // --block-user-data (kube2iam's flag) still works; it is also the default.
        for flags in [&[][..], &["--block-user-data"][..]] {
            let iamlet = agent(driver, &moto, up.addr(), flags);
            for path in NODE_SECRETS {
                let resp = get_from(ip(POD), iamlet.addr(), path);
                assert_eq!(
                    (resp.status, resp.body_str()),
                    (404, dataplane::not_found_body().to_owned()),
                    "driver {driver} {flags:?}: {path}"
                );
            }
            assert_eq!(up.forwarded(), [], "driver {driver} {flags:?}");
        }
        // The opt-ins restore kube2iam's forwarding, canonical paths only.
        let iamlet = agent(
            driver,
            &moto,
            up.addr(),
            &["--allow-user-data", "--allow-instance-identity-signature"],
        );
        for (path, canonical) in [
            ("/latest/user-data", "/latest/user-data"),
            ("/latest//./user-data", "/latest/user-data"),
            (
                "/latest/dynamic/instance-identity/pkcs7",
                "/latest/dynamic/instance-identity/pkcs7",
            ),
        ] {
            let resp = get_from(ip(POD), iamlet.addr(), path);
            assert_eq!(
                resp.body_str(),
                format!("{MARKER} GET {canonical}"),
                "driver {driver}: {path}"
            );
        }
        // The tag exemption never opens iam.
        let resp = get_from(
            ip(POD),
            iamlet.addr(),
            "/latest/meta-data/tags/instance/..;/..;/iam;/info",
        );
        assert_eq!(resp.status, 404, "driver {driver}");
        assert!(
            up.forwarded()
                .iter()
                .all(|q| !q.path.to_ascii_lowercase().contains("iam")),
            "driver {driver}: {:?}",
            up.forwarded()
        );
    }
}

#[test]
fn head_on_a_pass_through_path_answers_at_once_without_a_body() {
    for driver in drivers() {
        let (moto, up) = (Moto::start(), MarkerImds::start());
        let iamlet = agent(driver, &moto, up.addr(), &["--workers=1"]);
        let path = "/latest/meta-data/instance-id";
        // A HEAD is relayed as a GET whose body is dropped: its length is the GET's body's.
        let body_len = format!("{MARKER} GET {path}").len();
        let mut c = Conn::open(ip(POD), iamlet.addr());
        let t = Instant::now();
        let head = c.send(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let took = t.elapsed();
        assert_eq!(head.status, 200, "driver {driver}");
        assert_eq!(
            head.header("content-length"),
            Some(body_len.to_string().as_str()),
            "driver {driver}"
        );
        assert!(head.body.is_empty(), "driver {driver}");
        // Answered by the upstream's head, not by the 3 s response timeout.
        assert!(took < Duration::from_secs(3), "driver {driver}: {took:?}");
        // The connection and the upstream pool stay in step: the next GET gets its own answer.
        let get = c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert_eq!(
            get.body_str(),
            format!("{MARKER} GET {path}"),
            "driver {driver}"
        );
        assert_eq!(
            sample(
                iamlet.addr(),
                "iamlet_http_requests_total{route=\"passthrough\",status=\"5xx\"}"
            ),
            0.0,
            "driver {driver}"
        );
    }
}

#[test]
fn a_head_that_fails_upstream_gets_headers_only_and_the_connection_stays_in_step() {
    let driver = drivers()[0];
    let moto = Moto::start();
    // Nobody listens at the upstream: every pass-through fails with 502.
    let dead: SocketAddr = format!("127.0.0.1:{}", iamlet_e2e::free_port())
        .parse()
        .unwrap();
    let iamlet = agent(driver, &moto, dead, &["--workers=1"]);
    let mut c = Conn::open(ip(POD), iamlet.addr());
    let head = c.send(b"HEAD /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(head.status, 502);
    assert!(head.body.is_empty(), "{}", head.body_str());
    // The next answer on the same connection is its own, not the 502's body.
    let list =
        c.send(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((list.status, list.body_str().as_str()), (200, "app-role"));
}

#[test]
fn a_head_refused_by_iamlet_itself_gets_headers_only_and_the_connection_stays_in_step() {
    let driver = drivers()[0];
    let (moto, up) = (Moto::start(), MarkerImds::start());
    let iamlet = agent(driver, &moto, up.addr(), &["--workers=1"]);
    let mut c = Conn::open(ip(POD), iamlet.addr());
    for (request, status) in [
        // A token is minted by PUT only.
        ("HEAD /latest/api/token HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        // A token that is not one.
        (
            "HEAD /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: forged\r\n\r\n",
            401,
        ),
        // The container door without a token.
        (
            "HEAD /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\n\r\n",
            405,
        ),
        // A path that is not one.
        ("HEAD /latest/%2e%2e%2f HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ] {
        let head = c.send(request.as_bytes());
        assert_eq!(head.status, status, "{request:?}");
        assert!(head.body.is_empty(), "{request:?}: {}", head.body_str());
        if head.header("connection") == Some("close") {
            c = Conn::open(ip(POD), iamlet.addr());
            continue;
        }
        // The next answer on the same connection is its own.
        let list =
            c.send(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            (list.status, list.body_str().as_str()),
            (200, "app-role"),
            "after {request:?}"
        );
    }
}
