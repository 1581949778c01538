//! Connection handling: the per-worker connection limit (the longest-idle connection makes
//! room; a newcomer is refused only when all are busy), the per-source cap (counted),
//! the idle keep-alive timeout, HTTP/1.0 and `Connection: close` semantics with pipelining,
//! and graceful shutdown on SIGTERM/SIGINT (stop accepting, finish in-flight, exit 0).

use iamlet_e2e::rig::data as dataplane;

use dataplane::{POD, Rig, Scripted, builder_at, ip, metric};
use iamlet_e2e::wait_until;
use iamlet_e2e::{Conn, FakeImds, Moto, drivers};
use std::time::{Duration, Instant};

const LIST: &[u8] = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n";

fn assert_app_role(c: &mut Conn, ctx: &str) {
    let r = c.send(LIST);
    assert_eq!(
        (r.status, r.body_str().as_str()),
        (200, "app-role"),
        "{ctx}"
    );
}

#[test]
fn at_the_per_worker_limit_the_longest_idle_connection_makes_room() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        // /metrics on its own listener, so reading it takes no slot on the app worker.
        // (port 0: any free port, no race with other tests for a pre-picked one)
        let r = Rig::start(
            driver,
            FakeImds::start(),
            &[
                "--workers=1",
                "--max-connections-per-worker=3",
                "--metrics-port=0",
            ],
        );
        let admin = r.iamlet.admin_addr().expect("admin listener");
        // Three keep-alive connections, served and then idle, oldest first.
        let mut open: Vec<Conn> = (0..3)
            .map(|_| {
                let mut c = Conn::open(ip(POD), r.addr());
                assert_app_role(&mut c, &ctx);
                c
            })
            .collect();
        // A fourth is served: the connection idle the longest is closed for it.
        let mut newcomer = Conn::open(ip(POD), r.addr());
        assert_app_role(&mut newcomer, &ctx);
        assert!(
            open[0].is_closed_by_peer(Duration::from_secs(3)),
            "{ctx}: the longest-idle connection must be closed"
        );
        for c in &mut open[1..] {
            assert_app_role(c, &ctx);
        }
        assert_eq!(
            metric(admin, "iamlet_connections_evicted_total"),
            Some(1.0),
            "{ctx}"
        );
        assert_eq!(
            metric(
                admin,
                "iamlet_connections_rejected_total{reason=\"worker_full\"}"
            ),
            Some(0.0),
            "{ctx}"
        );
    }
}

#[test]
fn at_the_per_worker_limit_with_every_connection_busy_the_newcomer_is_refused_and_counted() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        // An upstream that holds GETs: a pass-through request stays in flight until released.
        let up = Scripted::start(200, true);
        let moto = Moto::start();
        let iamlet = builder_at(
            driver,
            &moto,
            up.addr,
            &[
                "--workers=1",
                "--max-connections-per-worker=3",
                "--metrics-port=0",
            ],
        )
        .start();
        let admin = iamlet.admin_addr().expect("admin listener");
        let slow = b"GET /latest/meta-data/slow HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut busy: Vec<Conn> = (0..3)
            .map(|_| {
                let mut c = Conn::open(ip(POD), iamlet.addr());
                c.write_all(slow).unwrap();
                c
            })
            .collect();
        // All three are mid-request once the upstream holds their GETs.
        let mut held = 0;
        while held < 3 {
            let (method, _, _) = up
                .next(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{ctx}: only {held} requests reached the upstream"));
            held += usize::from(method == "GET");
        }
        let mut excess = Conn::open(ip(POD), iamlet.addr());
        excess.write_all(LIST).unwrap();
        assert!(
            excess.is_closed_by_peer(Duration::from_secs(3)),
            "{ctx}: the fourth connection must be closed"
        );
        assert_eq!(
            metric(
                admin,
                "iamlet_connections_rejected_total{reason=\"worker_full\"}"
            ),
            Some(1.0),
            "{ctx}"
        );
        // The busy ones get their answers.
        up.release();
        for c in &mut busy {
            let resp = c.read_response().unwrap();
            assert_eq!(
                (resp.status, resp.body_str().as_str()),
                (200, "upstream-ok"),
                "{ctx}"
            );
        }
        // Free a slot: once the worker has seen the EOF, a new connection is served.
        busy.pop();
        wait_until!(
            Duration::from_secs(5),
            Conn::try_open(ip(POD), iamlet.addr())
                .and_then(|mut c| c.try_send(LIST))
                .is_ok_and(|resp| resp.status == 200),
            "{ctx}: a freed slot to be reusable"
        );
    }
}

#[test]
fn one_source_gets_at_most_its_connection_cap_and_its_neighbours_keep_theirs() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(
            driver,
            FakeImds::start(),
            &["--max-connections-per-ip=4", "--metrics-port=0"],
        );
        let admin = r.iamlet.admin_addr().expect("admin listener");
        let mut held: Vec<Conn> = (0..4)
            .map(|_| {
                let mut c = Conn::open(ip(POD), r.addr());
                assert_app_role(&mut c, &ctx);
                c
            })
            .collect();
        let mut fifth = Conn::open(ip(POD), r.addr());
        fifth.write_all(LIST).unwrap();
        assert!(
            fifth.is_closed_by_peer(Duration::from_secs(3)),
            "{ctx}: the fifth connection from one source must be closed"
        );
        assert_eq!(
            metric(
                admin,
                "iamlet_connections_rejected_total{reason=\"per_source\"}"
            ),
            Some(1.0),
            "{ctx}"
        );
        // Another pod is not affected, and the source's own four still work.
        let other = iamlet_e2e::get_from(
            ip(dataplane::OTHER_POD),
            r.addr(),
            "/latest/meta-data/iam/security-credentials/",
        );
        assert_eq!(
            (other.status, other.body_str().as_str()),
            (200, "other-role"),
            "{ctx}"
        );
        for c in &mut held {
            assert_app_role(c, &ctx);
        }
    }
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &["--idle-timeout=400ms"]);
        let mut c = Conn::open(ip(POD), r.addr());
        assert_app_role(&mut c, &ctx);
        let idle_from = Instant::now();
        // Activity within the timeout keeps it open.
        assert!(!c.is_closed_by_peer(Duration::from_millis(200)), "{ctx}");
        assert_app_role(&mut c, &ctx);
        let idle_from2 = Instant::now();
        assert!(c.is_closed_by_peer(Duration::from_secs(3)), "{ctx}");
        let idle = idle_from2.elapsed();
        assert!(
            idle >= Duration::from_millis(350) && idle < Duration::from_secs(2),
            "{ctx}: closed after {idle:?} idle (first request {:?} ago)",
            idle_from.elapsed()
        );
    }
}

#[test]
fn http10_connection_close_and_pipelining_follow_http_semantics() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(driver, FakeImds::start(), &[]);

        // HTTP/1.0 without keep-alive: answered with `Connection: close`, then closed.
        let mut c = Conn::open(ip(POD), r.addr());
        let resp = c.send(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\n\r\n");
        assert_eq!(
            resp.raw,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\nServer: EC2ws\r\nConnection: close\r\n\r\napp-role",
            "{ctx}"
        );
        assert!(c.is_closed_by_peer(Duration::from_secs(2)), "{ctx}");

        // HTTP/1.0 with keep-alive: `Connection: keep-alive`, and the connection stays.
        let mut c = Conn::open(ip(POD), r.addr());
        let ka = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        for _ in 0..2 {
            let resp = c.send(ka);
            assert_eq!(resp.header("connection"), Some("keep-alive"), "{ctx}");
            assert_eq!(resp.body_str(), "app-role", "{ctx}");
        }
        // A pass-through answer to HTTP/1.0 keep-alive keeps the connection too.
        let resp =
            c.send(b"GET /latest/meta-data/instance-id HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(
            (
                resp.status,
                resp.body_str().as_str(),
                resp.header("connection")
            ),
            (200, "i-0fake00000000001", Some("keep-alive")),
            "{ctx}"
        );
        assert!(!c.is_closed_by_peer(Duration::from_millis(100)), "{ctx}");

        // Pipelined: three requests, the second says `Connection: close`; two answers, then EOF.
        let mut c = Conn::open(ip(POD), r.addr());
        let batch = [
            LIST,
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nConnection: close\r\n\r\n",
            LIST,
        ]
        .concat();
        c.write_all(&batch).unwrap();
        let a = c.read_response().unwrap();
        assert_eq!(
            (a.status, a.body_str().as_str()),
            (200, "app-role"),
            "{ctx}"
        );
        let b = c.read_response().unwrap();
        assert_eq!(
            (b.status, b.body_str().as_str(), b.header("connection")),
            (200, "i-0fake00000000001", Some("close")),
            "{ctx}"
        );
        assert!(c.is_closed_by_peer(Duration::from_secs(2)), "{ctx}");
        assert!(
            c.read_response().is_err(),
            "{ctx}: nothing after `Connection: close`"
        );

        // Twenty pipelined requests in one write, answered in order.
        let mut c = Conn::open(ip(POD), r.addr());
        let many: Vec<u8> = (0..20)
            .flat_map(|i| {
                if i % 2 == 0 {
                    LIST.to_vec()
                } else {
                    b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n".to_vec()
                }
            })
            .collect();
        c.write_all(&many).unwrap();
        for i in 0..20 {
            let r = c.read_response().unwrap();
            let want = if i % 2 == 0 {
                "app-role"
            } else {
                "i-0fake00000000001"
            };
            assert_eq!((r.status, r.body_str().as_str()), (200, want), "{ctx} #{i}");
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let out = iamlet_e2e::process::run_bounded(
        {
            let mut c = std::process::Command::new("kill");
            c.arg(format!("-{sig}")).arg(pid.to_string());
            c
        },
        Duration::from_secs(10),
    );
    assert!(out.success(), "kill -{sig} {pid}: {}", out.stderr);
}

#[test]
fn sigterm_and_sigint_stop_accepting_finish_in_flight_requests_and_exit_0() {
    for (driver, sig) in drivers()
        .into_iter()
        .flat_map(|d| [(d, "TERM"), (d, "INT")])
    {
        let ctx = format!("driver {driver}, SIG{sig}");
        let moto = Moto::start();
        // The upstream holds GETs until released: an in-flight pass-through request.
        let up = Scripted::start(404, true);
        let mut iamlet = builder_at(driver, &moto, up.addr, &["--shutdown-grace=10s"]).start();
        let addr = iamlet.addr();

        let mut idle = Conn::open(ip(POD), addr);
        assert_app_role(&mut idle, &ctx);
        let mut busy = Conn::open(ip(POD), addr);
        busy.write_all(b"GET /latest/meta-data/slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let seen = std::iter::from_fn(|| up.next(Duration::from_secs(5)))
            .take(5)
            .find(|(m, _, _)| m == "GET");
        assert_eq!(
            seen.map(|(_, p, _)| p).as_deref(),
            Some("/latest/meta-data/slow"),
            "{ctx}: the request must be in flight"
        );

        signal(iamlet.pid(), sig);
        assert!(
            iamlet.wait_for_log("stopping", Duration::from_secs(5)),
            "{ctx}: {}",
            iamlet.log()
        );
        // No new connections once the listeners are gone.
        wait_until!(
            Duration::from_secs(3),
            Conn::try_open(ip(POD), addr).is_err(),
            "{ctx}: no more accepting after the signal"
        );
        // The idle keep-alive connection is closed; the busy one gets its answer.
        assert!(idle.is_closed_by_peer(Duration::from_secs(3)), "{ctx}");
        assert!(
            iamlet.try_exit_status().is_none(),
            "{ctx}: exited before the in-flight request finished"
        );
        up.release();
        let resp = busy.read_response().unwrap();
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "upstream-ok"),
            "{ctx}"
        );
        assert!(busy.is_closed_by_peer(Duration::from_secs(3)), "{ctx}");
        let (code, timed_out) = iamlet.wait_exit(Duration::from_secs(10));
        assert_eq!(
            (code, timed_out),
            (Some(0), false),
            "{ctx}: {}",
            iamlet.log()
        );
    }
}

#[test]
fn shutdown_grace_bounds_a_request_that_never_finishes() {
    let driver = drivers()[0];
    let moto = Moto::start();
    let up = Scripted::start(404, true);
    let mut iamlet = builder_at(
        driver,
        &moto,
        up.addr,
        &["--shutdown-grace=500ms", "--upstream-timeout=30s"],
    )
    .start();
    let mut busy = Conn::open(ip(POD), iamlet.addr());
    busy.write_all(b"GET /latest/meta-data/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let seen = std::iter::from_fn(|| up.next(Duration::from_secs(5)))
        .take(5)
        .any(|(m, _, _)| m == "GET");
    assert!(seen, "the request must be in flight");
    let t = Instant::now();
    signal(iamlet.pid(), "TERM");
    let (code, timed_out) = iamlet.wait_exit(Duration::from_secs(10));
    assert_eq!((code, timed_out), (Some(0), false), "{}", iamlet.log());
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "exit took {:?} with --shutdown-grace=500ms",
        t.elapsed()
    );
}

#[test]
fn request_limits_follow_their_flags() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = Rig::start(
            driver,
            FakeImds::start(),
            &["--max-request-head=1024", "--max-request-body=16"],
        );
        let status = |raw: Vec<u8>| {
            iamlet_e2e::try_request_from(ip(POD), r.addr(), &raw)
                .map(|resp| resp.status)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"))
        };
        let put = |len: usize| {
            format!(
                "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{}",
                "b".repeat(len)
            )
            .into_bytes()
        };
        assert_eq!(status(put(16)), 200, "{ctx}: a 16-byte body is allowed");
        assert_eq!(status(put(17)), 413, "{ctx}");
        let header = |n: usize| {
            format!(
                "GET {LIST_PATH} HTTP/1.1\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
                "h".repeat(n)
            )
            .into_bytes()
        };
        assert_eq!(status(header(800)), 200, "{ctx}");
        assert_eq!(status(header(1100)), 431, "{ctx}");
        let line = format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(1100)).into_bytes();
        assert_eq!(status(line), 414, "{ctx}");
    }
}

const LIST_PATH: &str = "/latest/meta-data/iam/security-credentials/";
