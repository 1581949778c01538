//! The walking skeleton, end to end: the real `iamlet` binary in local mode, moto as STS, the
//! fake IMDS upstream, raw clients from chosen 127.0.0.x sources and boto3. Every scenario
//! runs on both io drivers.

use iamlet_e2e::{
    FakeImds, Iamlet, Moto, NODE_MARKER, Response, drivers, get_from, request_from, run_python,
    wait_until,
};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BASE: &str = "arn:aws:iam::123456789012:role/";
const CROSS: &str = "arn:aws:iam::210987654321:role/cross";

fn pods() -> String {
    format!(
        r#"apiVersion: v1
kind: List
items:
- kind: Pod
  metadata: {{name: app, namespace: shop, uid: u-app, annotations: {{iam.amazonaws.com/role: app-role}}}}
  status: {{phase: Running, podIP: 127.0.0.11}}
- kind: Pod
  metadata: {{name: cross, namespace: shop, uid: u-cross, annotations: {{iam.amazonaws.com/role: "{CROSS}"}}}}
  status: {{phase: Running, podIP: 127.0.0.12}}
- kind: Pod
  metadata: {{name: norole, namespace: shop, uid: u-norole}}
  status: {{phase: Running, podIP: 127.0.0.13}}
- kind: Pod
  metadata: {{name: hostnet, namespace: kube-system, uid: u-hostnet, annotations: {{iam.amazonaws.com/role: host-role}}}}
  spec: {{hostNetwork: true, containers: []}}
  status: {{phase: Running, podIP: 127.0.0.14}}
- kind: Pod
  metadata: {{name: done, namespace: shop, uid: u-done, annotations: {{iam.amazonaws.com/role: done-role}}}}
  status: {{phase: Succeeded, podIP: 127.0.0.15}}
- kind: Pod
  metadata: {{name: boto, namespace: shop, uid: u-boto, annotations: {{iam.amazonaws.com/role: boto-role}}}}
  status: {{phase: Running, podIP: 127.0.0.1}}
"#
    )
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

struct Rig {
    _moto: Moto,
    imds: FakeImds,
    iamlet: Iamlet,
    moto_endpoint: String,
}

fn rig(driver: &str, extra: &[&str]) -> Rig {
    let moto = Moto::start();
    let imds = FakeImds::start();
    let mut b = Iamlet::builder()
        .pods_yaml(&pods())
        .sts(&moto)
        .imds(&imds)
        .driver(driver)
        .arg(format!("--base-role-arn={BASE}"))
        .arg("--backoff-max-elapsed-time=300ms");
    for a in extra {
        b = b.arg(*a);
    }
    let moto_endpoint = moto.endpoint();
    let r = Rig {
        iamlet: b.start(),
        imds,
        _moto: moto,
        moto_endpoint,
    };
    // moto answers AssumeRole slowly on a busy machine: let the prefetches land (bounded)
    // so the assertions below are about answers, not about moto's speed.
    for (src, role) in [(11, "app-role"), (12, CROSS), (1, "boto-role")] {
        let path = format!("/latest/meta-data/iam/security-credentials/{role}");
        wait_until!(
            Duration::from_secs(20),
            get(&r, src, &path).status == 200,
            "credentials for {role}: {}",
            r.iamlet.log()
        );
    }
    r
}

fn get(r: &Rig, src: u8, path: &str) -> Response {
    get_from(ip(src), r.iamlet.addr(), path)
}

fn assert_no_leak(resp: &Response, what: &str) {
    assert!(
        !String::from_utf8_lossy(&resp.raw).contains(NODE_MARKER),
        "{what}: node credentials leaked: {}",
        String::from_utf8_lossy(&resp.raw)
    );
}

/// `YYYY-MM-DDTHH:MM:SSZ` → Unix seconds.
fn parse_imds_time(s: &str) -> u64 {
    let b = s.as_bytes();
    assert_eq!(s.len(), 20, "timestamp {s:?}");
    assert!(
        b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'Z',
        "timestamp {s:?}"
    );
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)) as u64
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_pod_gets_its_role_listing_and_credentials_and_nothing_else() {
    for driver in drivers() {
        let r = rig(driver, &[]);
        let ctx = format!("driver {driver}");

        // Role listing: bare name, no newline, IMDS headers, exact bytes.
        let resp = get(&r, 11, "/latest/meta-data/iam/security-credentials/");
        assert_eq!(
            resp.raw,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\nServer: EC2ws\r\nConnection: close\r\n\r\napp-role",
            "{ctx}: {}",
            String::from_utf8_lossy(&resp.raw)
        );
        let resp = get(&r, 11, "/2016-09-02/meta-data/iam/security-credentials");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "app-role"),
            "{ctx}"
        );
        // A role in another account is listed by its full ARN.
        let resp = get(&r, 12, "/latest/meta-data/iam/security-credentials/");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, CROSS),
            "{ctx}"
        );

        // Credentials: the IMDS document, whole-second UTC timestamps, long enough to live.
        for path in [
            "/latest/meta-data/iam/security-credentials/app-role",
            "/latest/meta-data/iam/security-credentials/app-role/",
        ] {
            let resp = get(&r, 11, path);
            assert_eq!(resp.status, 200, "{ctx} {path}: {}", resp.body_str());
            assert_eq!(resp.header("server"), Some("EC2ws"), "{ctx}");
            let doc: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(doc["Code"], "Success", "{ctx}");
            assert_eq!(doc["Type"], "AWS-HMAC", "{ctx}");
            assert!(
                doc["AccessKeyId"].as_str().unwrap().starts_with("ASIA"),
                "{ctx}: {doc}"
            );
            assert!(
                !doc["SecretAccessKey"].as_str().unwrap().is_empty(),
                "{ctx}"
            );
            assert!(!doc["Token"].as_str().unwrap().is_empty(), "{ctx}");
            let updated = parse_imds_time(doc["LastUpdated"].as_str().unwrap());
            let expires = parse_imds_time(doc["Expiration"].as_str().unwrap());
            assert!(
                updated <= now() + 1 && updated + 120 > now(),
                "{ctx}: LastUpdated {updated} vs now {}",
                now()
            );
            assert!(
                expires > now() + 15 * 60,
                "{ctx}: Expiration must leave > 15 min: {doc}"
            );
        }
        let cross = get(
            &r,
            12,
            "/latest/meta-data/iam/security-credentials/arn:aws:iam::210987654321:role/cross",
        );
        assert_eq!(
            cross.status,
            200,
            "{ctx}: cross-account role by ARN: {}",
            cross.body_str()
        );

        // Another role: 403, exact bytes.
        let resp = get(
            &r,
            11,
            "/latest/meta-data/iam/security-credentials/other-role",
        );
        assert_eq!(resp.status, 403, "{ctx}");
        assert_eq!(
            resp.body_str(),
            "Forbidden: the requested role is not this pod's role\n",
            "{ctx}"
        );
        // Another pod's role is refused too, as is the node's.
        assert_eq!(
            get(
                &r,
                11,
                "/latest/meta-data/iam/security-credentials/boto-role"
            )
            .status,
            403,
            "{ctx}"
        );
        let node = get(
            &r,
            11,
            "/latest/meta-data/iam/security-credentials/node-role",
        );
        assert_eq!(node.status, 403, "{ctx}");
        assert_no_leak(&node, &ctx);

        // Unknown IP: waits up to --backoff-max-elapsed-time, then 404. No role, hostNetwork,
        // finished pods: 404.
        for (src, what) in [
            (99, "unknown IP"),
            (13, "pod without role"),
            (14, "hostNetwork pod"),
            (15, "Succeeded pod"),
        ] {
            for path in [
                "/latest/meta-data/iam/security-credentials/",
                "/latest/meta-data/iam/security-credentials/node-role",
            ] {
                let resp = get(&r, src, path);
                assert_eq!(
                    resp.status,
                    404,
                    "{ctx}: {what} {path}: {}",
                    resp.body_str()
                );
                assert_no_leak(&resp, &ctx);
            }
        }

        // Pass-through: the fake IMDS's exact answer, the canonical path upstream.
        r.imds.clear_requests();
        let resp = get(&r, 11, "/latest/meta-data/instance-id");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "i-0fake00000000001"),
            "{ctx}"
        );
        assert_eq!(resp.header("server"), Some("EC2ws"), "{ctx}");
        let resp = get(&r, 12, "//latest/./meta-data/instance-id");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "i-0fake00000000001"),
            "{ctx}"
        );
        // An address that is no pod of this node gets none of the node's metadata.
        let resp = get(&r, 99, "/latest/meta-data/instance-id");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (404, iamlet_e2e::rig::data::not_found_body()),
            "{ctx}"
        );
        // iamlet's own upstream token PUT is expected; the pods' GETs arrive canonical.
        let seen: Vec<String> = r
            .imds
            .requests()
            .into_iter()
            .filter(|q| q.method == "GET")
            .map(|q| q.path)
            .collect();
        assert_eq!(
            seen,
            [
                "/latest/meta-data/instance-id",
                "/latest/meta-data/instance-id"
            ],
            "{ctx}"
        );
        // Credential paths are never forwarded, whatever their spelling.
        for path in [
            "/latest/meta-data/iam/info",
            "/latest/meta-data/IAM/security-credentials/node-role",
            "/latest//meta-data/iam/security-credentials/x/../node-role",
            "/latest/meta-data/iam/security-credentials%2fnode-role",
        ] {
            let resp = get(&r, 99, path);
            assert!(
                resp.status == 404 || resp.status == 400,
                "{ctx} {path}: {}",
                resp.status
            );
            assert_no_leak(&resp, &ctx);
        }
        assert!(
            r.imds
                .requests()
                .iter()
                .all(|q| !q.path.to_ascii_lowercase().contains("/iam")),
            "{ctx}: a credential path reached the upstream: {:?}",
            r.imds.requests()
        );

        // Admin paths.
        let resp = get(&r, 1, "/healthz");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "ok\n"),
            "{ctx}"
        );
        let resp = get(&r, 1, "/metrics");
        assert_eq!(resp.status, 200, "{ctx}");
        assert!(
            resp.body_str()
                .contains("iamlet_http_requests_total{route=\"credentials\",status=\"2xx\"}"),
            "{ctx}: {}",
            resp.body_str()
        );
    }
}

#[test]
fn with_ipv6_each_worker_serves_both_families() {
    for driver in drivers() {
        let r = rig(driver, &["--ipv6", "--workers=2"]);
        let resp = get(&r, 11, "/latest/meta-data/iam/security-credentials/");
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "app-role"),
            "{driver}"
        );
        // The same port on [::1]: answered (admin paths answer any source; no pod has ::1).
        let v6 =
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, r.iamlet.addr().port()));
        let mut s = std::net::TcpStream::connect_timeout(&v6, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{driver}: [::1] refused: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::io::Write::write_all(
            &mut s,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut raw).unwrap();
        assert!(
            raw.starts_with(b"HTTP/1.1 200 "),
            "{driver}: {}",
            String::from_utf8_lossy(&raw)
        );
        // One worker per --workers, each accepting on both families: no second set of
        // runtimes for IPv6.
        let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", r.iamlet.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .filter(|n| n.starts_with("iamlet-worker"))
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, ["iamlet-worker-0", "iamlet-worker-1"], "{driver}");
    }
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    for driver in drivers() {
        let r = rig(driver, &[]);
        let mut c = iamlet_e2e::Conn::open(ip(11), r.iamlet.addr());
        let list = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..3 {
            let resp = c.send(list);
            assert_eq!(
                (resp.status, resp.body_str().as_str()),
                (200, "app-role"),
                "driver {driver}"
            );
            assert_eq!(resp.header("connection"), None, "driver {driver}");
        }
        let two = [
            &list[..],
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
        .concat();
        c.write_all(&two).unwrap();
        assert_eq!(
            c.read_response().unwrap().body_str(),
            "app-role",
            "driver {driver}"
        );
        assert_eq!(
            c.read_response().unwrap().body_str(),
            "i-0fake00000000001",
            "driver {driver}"
        );
    }
}

#[test]
fn boto3_gets_the_pods_assumed_role_through_iamlet() {
    for driver in drivers() {
        let r = rig(driver, &[]);
        let endpoint = format!("http://127.0.0.1:{}/", r.iamlet.addr().port());
        let script = "import boto3\nprint(boto3.client('sts').get_caller_identity()['Arn'])";
        let out = run_python(
            script,
            &[
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str()),
                ("AWS_ENDPOINT_URL_STS", r.moto_endpoint.as_str()),
                ("AWS_DEFAULT_REGION", "us-east-1"),
                ("AWS_CONFIG_FILE", "/dev/null"),
                ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ],
            true,
        );
        assert!(
            out.success(),
            "driver {driver}: boto3 failed: {}\n{}\n{}",
            out.stderr,
            out.stdout,
            r.iamlet.log()
        );
        let arn = out.stdout.trim();
        assert!(
            arn.starts_with("arn:aws:sts::123456789012:assumed-role/boto-role/"),
            "driver {driver}: boto3 got {arn:?}"
        );
    }
}

#[test]
fn pods_file_replaced_by_rename_is_picked_up() {
    let driver = drivers()[0];
    let r = rig(driver, &[]);
    assert_eq!(
        get(&r, 21, "/latest/meta-data/iam/security-credentials/").status,
        404
    );
    let path = r.iamlet.pods_file_path().to_path_buf();
    let updated = pods().replace("podIP: 127.0.0.11", "podIP: 127.0.0.21");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, updated).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    // A request from the new IP waits for the publish that contains it; allow a few rounds.
    let resp = wait_until!(
        Duration::from_secs(10),
        Some(get(&r, 21, "/latest/meta-data/iam/security-credentials/"))
            .filter(|r| r.status == 200),
        "the renamed pods file to be picked up: {}",
        r.iamlet.log()
    );
    assert_eq!(resp.body_str(), "app-role");
    assert_eq!(
        get(&r, 11, "/latest/meta-data/iam/security-credentials/").status,
        404,
        "the old IP must be gone"
    );
}

#[test]
fn malformed_requests_get_4xx_and_neighbours_keep_working() {
    for driver in drivers() {
        let r = rig(driver, &[]);
        let mut neighbour = iamlet_e2e::Conn::open(ip(11), r.iamlet.addr());
        let list = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n";
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(), 400),
            ("bad request line", b"GET\r\n\r\n".to_vec(), 400),
            ("huge header", big.into_bytes(), 431),
            ("two lengths", b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(), 400),
            ("chunked", b"PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
            ("encoded slash", b"GET /latest/meta-data/iam%2Fsecurity-credentials HTTP/1.1\r\n\r\n".to_vec(), 400),
            ("above root", b"GET /../../etc/passwd HTTP/1.1\r\n\r\n".to_vec(), 400),
            ("body too large", format!("PUT /x HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{}", "b".repeat(5000)).into_bytes(), 413),
        ];
        for (what, raw, want) in cases {
            let resp = request_from(ip(11), r.iamlet.addr(), &raw);
            assert_eq!(
                resp.status,
                want,
                "driver {driver}: {what}: {}",
                String::from_utf8_lossy(&resp.raw)
            );
            let ok = neighbour.send(list);
            assert_eq!(
                (ok.status, ok.body_str().as_str()),
                (200, "app-role"),
                "driver {driver}: neighbour after {what}"
            );
        }
    }
}

#[test]
fn doctor_reports_a_bad_flag_and_still_runs_every_check() {
    let out = Iamlet::run_cli(&[
        "--host-ip=node-1",
        "--metadata-addr=127.0.0.1:9",
        "--pods-from=/dev/null",
        "doctor",
    ]);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(
            "FAIL flags: --host-ip \"node-1\" is not an IP address; pass the node's IP, e.g. --host-ip=$(HOST_IP) from status.hostIP."
        ),
        "{}",
        out.stdout
    );
    for check in [
        "interfaces:",
        "port:",
        "imds:",
        "region:",
        "sts:",
        "kubernetes:",
    ] {
        assert!(
            lines.iter().any(|l| l
                .split_once(' ')
                .is_some_and(|(_, rest)| rest.starts_with(check))),
            "no {check} line: {}",
            out.stdout
        );
    }
}

#[test]
fn a_start_up_failure_is_one_line_with_its_cause_once() {
    let out = Iamlet::run_cli(&[
        "--app-port=0",
        "--metadata-addr=127.0.0.1:9",
        "--pods-from=/dev/null",
        "--imds-token-key-file=/nonexistent-iamlet-test-dir/key",
    ]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("iamlet: "))
        .unwrap_or_else(|| panic!("no `iamlet: ` line: {}", out.stderr));
    assert_eq!(
        line,
        "iamlet: cannot create --imds-token-key-file /nonexistent-iamlet-test-dir/key: No such file or directory (os error 2)"
    );
}

#[test]
fn cli_lists_every_kube2iam_flag_and_rejects_bad_ones_in_one_sentence() {
    let help = Iamlet::run_cli(&["--help"]);
    assert!(help.success(), "{}", help.stderr);
    for flag in [
        "--kubeconfig",
        "--api-server",
        "--api-token",
        "--insecure",
        "--app-port",
        "--metrics-port",
        "--base-role-arn",
        "--default-role",
        "--iam-role-key",
        "--iam-external-id",
        "--iam-role-session-ttl",
        "--iam-role-error-ttl",
        "--metadata-addr",
        "--iptables",
        "--host-interface",
        "--host-ip",
        "--auto-discover-base-arn",
        "--auto-discover-default-role",
        "--namespace-restrictions",
        "--namespace-restriction-format",
        "--namespace-key",
        "--cache-resync-period",
        "--resolve-duplicate-cache-ips",
        "--node",
        "--backoff-max-interval",
        "--backoff-max-elapsed-time",
        "--log-format",
        "--log-level",
        "--use-regional-sts-endpoint",
        "--debug",
        "--verbose",
        "--version",
        "--pods-from",
        "--workers",
        "--io-driver",
        "--check-config",
    ] {
        assert!(help.stdout.contains(flag), "--help does not list {flag}");
    }
    // The kube2iam rollout guide's DaemonSet args, as the deploy tests read them, with a
    // literal host IP for the Downward API's.
    let mut seed: Vec<&str> = include_str!("../../deploy/tests/seed-args.txt")
        .split_whitespace()
        .map(|a| match a {
            "--host-ip=$(HOST_IP)" => "--host-ip=10.0.0.1",
            a => a,
        })
        .collect();
    assert_eq!(seed.len(), 8, "seed args: {seed:?}");
    seed.push("--check-config");
    let seed = Iamlet::run_cli(&seed);
    assert_eq!(seed.code, Some(0), "seed DaemonSet args: {}", seed.stderr);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--iptables", "--check-config"],
            "--iptables needs --host-ip",
        ),
        (
            &["--base-role-arn=arn:aws:iam::1:role/", "--check-config"],
            "--base-role-arn",
        ),
        (
            &[
                "--default-role=a",
                "--auto-discover-default-role",
                "--check-config",
            ],
            "--default-role and --auto-discover-default-role",
        ),
        (
            &[
                "--base-role-arn=arn:aws:iam::123456789012:role/",
                "--auto-discover-base-arn",
                "--check-config",
            ],
            "--auto-discover-base-arn cannot be used with --base-role-arn",
        ),
        (&["--app-port=eighty", "--check-config"], "--app-port"),
        (&["--no-such-flag"], "--no-such-flag"),
        (
            &["--iam-role-session-ttl=15", "--check-config"],
            "--iam-role-session-ttl",
        ),
    ];
    for (args, want) in cases {
        let out = Iamlet::run_cli(args);
        assert_eq!(out.code, Some(64), "{args:?}: {}", out.stderr);
        let msg = out.stderr.trim();
        assert!(msg.contains(want), "{args:?}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{args:?}: not one line: {msg}");
    }
    // Every flag also reads an IAMLET_* variable.
    let env = iamlet_e2e::process::run_bounded(
        {
            let mut c = std::process::Command::new(iamlet_e2e::iamlet::binary());
            c.arg("--check-config").env("IAMLET_IPTABLES", "true");
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(
        env.code,
        Some(64),
        "IAMLET_IPTABLES=true without a host IP must fail: {}",
        env.stderr
    );
}

#[test]
fn local_mode_with_node_maps_only_that_nodes_pods() {
    let moto = Moto::start();
    let imds = FakeImds::start();
    let pods = r#"apiVersion: v1
kind: List
items:
- kind: Pod
  metadata: {name: here, namespace: shop, uid: u-here, annotations: {iam.amazonaws.com/role: here-role}}
  spec: {nodeName: node-a, containers: []}
  status: {phase: Running, podIP: 127.0.0.16}
- kind: Pod
  metadata: {name: elsewhere, namespace: shop, uid: u-elsewhere, annotations: {iam.amazonaws.com/role: there-role}}
  spec: {nodeName: node-b, containers: []}
  status: {phase: Running, podIP: 127.0.0.17}
- kind: Pod
  metadata: {name: unscheduled, namespace: shop, uid: u-unscheduled, annotations: {iam.amazonaws.com/role: new-role}}
  status: {phase: Pending, podIP: 127.0.0.18}
"#;
    let iamlet = Iamlet::builder()
        .pods_yaml(pods)
        .sts(&moto)
        .imds(&imds)
        .arg(format!("--base-role-arn={BASE}"))
        .arg("--backoff-max-elapsed-time=300ms")
        .arg("--node=node-a")
        .start();
    let list = "/latest/meta-data/iam/security-credentials/";
    let here = get_from(ip(16), iamlet.addr(), list);
    assert_eq!((here.status, here.body_str().as_str()), (200, "here-role"));
    assert_eq!(
        get_from(ip(17), iamlet.addr(), list).status,
        404,
        "a pod of another node is not mapped"
    );
    let pending = get_from(ip(18), iamlet.addr(), list);
    assert_eq!(
        (pending.status, pending.body_str().as_str()),
        (200, "new-role")
    );
}
