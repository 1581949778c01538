//! The credentials engine through the real binary: moto as STS behind a fault-injecting,
//! call-counting pass-through. Single flight, prefetch, refresh ahead, static stability,
//! external IDs in the key, the node-wide rate limit, the in-flight bound, per-pod sessions
//! and tags.

use iamlet_e2e::client::Conn;
use iamlet_e2e::rig::data::{metric, sample};
use iamlet_e2e::stsproxy::{Fault, StsProxy};
use iamlet_e2e::{FakeImds, Iamlet, Moto, Response, get_from, wait_until};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const BASE: &str = "arn:aws:iam::123456789012:role/";

struct Rig {
    _moto: Moto,
    _imds: FakeImds,
    sts: StsProxy,
    iamlet: Option<Iamlet>,
}

fn pod(name: &str, ip: Ipv4Addr, role: &str, extra_annotations: &str) -> String {
    format!(
        "- kind: Pod\n  metadata: {{name: {name}, namespace: team, uid: uid-{name}, annotations: {{iam.amazonaws.com/role: {role}{extra_annotations}}}}}\n  spec: {{serviceAccountName: sa-{name}, containers: []}}\n  status: {{phase: Running, podIP: {ip}}}\n"
    )
}

fn list(pods: &[String]) -> String {
    format!("apiVersion: v1\nkind: List\nitems:\n{}", pods.concat())
}

/// moto + the counting proxy (with `fault` from the start) + the fake IMDS; iamlet not yet.
fn sts_rig(fault: Fault) -> Rig {
    let moto = Moto::start();
    let sts = StsProxy::start(moto.addr());
    sts.set_fault(fault);
    Rig {
        _moto: moto,
        _imds: FakeImds::start(),
        sts,
        iamlet: None,
    }
}

impl Rig {
    fn start(&mut self, pods: &str, args: &[&str]) {
        let mut b = Iamlet::builder()
            .pods_yaml(pods)
            .imds(&self._imds)
            .env("AWS_ENDPOINT_URL_STS", self.sts.endpoint())
            .arg(format!("--base-role-arn={BASE}"));
        for a in args {
            b = b.arg(*a);
        }
        self.iamlet = Some(b.start());
    }

    fn iamlet(&self) -> &Iamlet {
        self.iamlet.as_ref().expect("started")
    }

    fn creds(&self, src: Ipv4Addr, role: &str) -> Response {
        get_from(
            src,
            self.iamlet().addr(),
            &format!("/latest/meta-data/iam/security-credentials/{role}"),
        )
    }
}

fn json(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body_str()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `YYYY-MM-DDTHH:MM:SSZ` → Unix seconds (days-from-civil).
fn parse_time(s: &str) -> u64 {
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    (days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)) as u64
}

#[test]
fn ten_thousand_requests_for_a_cold_role_cause_exactly_one_assume_role() {
    // STS is slow, so the prefetch is still in flight when the storm arrives.
    let mut rig = sts_rig(Fault::Delay(Duration::from_millis(1500)));
    let ips: Vec<Ipv4Addr> = (1..=100).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
    let pods: Vec<String> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| pod(&format!("p{i}"), *ip, "hot-role", ""))
        .collect();
    rig.start(&list(&pods), &["--backoff-max-elapsed-time=20s"]);
    let addr = rig.iamlet().addr();
    let req =
        b"GET /latest/meta-data/iam/security-credentials/hot-role HTTP/1.1\r\nHost: x\r\n\r\n";
    // 500 connections from 100 source IPs, 20 pipelined requests each: 10,000 outstanding.
    let threads: Vec<_> = (0..500)
        .map(|i| {
            let src = ips[i % ips.len()];
            std::thread::spawn(move || {
                let mut c = Conn::open(src, addr);
                c.write_all(&req.repeat(20)).unwrap();
                (0..20)
                    .map(|_| c.read_response().expect("response"))
                    .map(|r| {
                        (
                            r.status,
                            json(&r)["AccessKeyId"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut keys = BTreeSet::new();
    let mut n = 0;
    for t in threads {
        for (status, key) in t.join().unwrap() {
            assert_eq!(status, 200);
            keys.insert(key);
            n += 1;
        }
    }
    let calls = rig.sts.calls();
    println!(
        "requests: {n}, distinct access keys: {}, AssumeRole calls: {}",
        keys.len(),
        calls.len()
    );
    assert_eq!(n, 10_000);
    assert_eq!(keys.len(), 1);
    assert_eq!(
        calls.len(),
        1,
        "exactly one AssumeRole for one cold role: {calls:?}"
    );
    assert_eq!(calls[0].role_arn, format!("{BASE}hot-role"));
}

#[test]
fn prefetch_makes_a_new_pods_first_request_a_cache_hit() {
    let delay = Duration::from_millis(800);
    let mut rig = sts_rig(Fault::Delay(delay));
    let base = pod("base", Ipv4Addr::new(127, 0, 0, 30), "base-role", "");
    rig.start(
        &list(std::slice::from_ref(&base)),
        &["--backoff-max-elapsed-time=5s"],
    );
    wait_until!(
        Duration::from_secs(10),
        rig.sts.calls().len() == 1,
        "the base pod's prefetch"
    );
    let file = rig.iamlet().pods_file_path().to_path_buf();

    // Without prefetch (asked before the prefetch could finish): the request waits for STS.
    let cold_ip = Ipv4Addr::new(127, 0, 0, 32);
    std::fs::write(
        &file,
        list(&[base.clone(), pod("cold", cold_ip, "cold-role", "")]),
    )
    .unwrap();
    // The request arrives before iamlet knows the pod, so its prefetch cannot have finished:
    // the request is a cache miss that waits for STS.
    let addr = rig.iamlet().addr();
    let (hits, misses) = cache_counts(addr);
    let t = Instant::now();
    let resp = rig.creds(cold_ip, "cold-role");
    let cold = t.elapsed();
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    assert_eq!(
        cache_counts(addr),
        (hits, misses + 1.0),
        "the cold request should have waited for STS"
    );

    // With prefetch: the pod appears, iamlet fetches at once; the first request is a hit.
    let warm_ip = Ipv4Addr::new(127, 0, 0, 31);
    std::fs::write(
        &file,
        list(&[
            base,
            pod("cold", cold_ip, "cold-role", ""),
            pod("warm", warm_ip, "warm-role", ""),
        ]),
    )
    .unwrap();
    // A completed AssumeRole is counted only once its answer is published.
    let fetched = format!(
        "kube2iam_iam_request_duration_seconds_count{{code=\"Success\",role_arn=\"{BASE}warm-role\"}}"
    );
    wait_until!(
        Duration::from_secs(10),
        metric(addr, &fetched) == Some(1.0),
        "the new pod's prefetch to complete"
    );
    let calls_before = rig.sts.calls().len();
    let (hits, misses) = cache_counts(addr);
    let t = Instant::now();
    let resp = rig.creds(warm_ip, "warm-role");
    let warm = t.elapsed();
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    println!(
        "first-request latency: without prefetch {cold:?}, with prefetch {warm:?} (STS delay {delay:?})"
    );
    assert_eq!(
        rig.sts.calls().len(),
        calls_before,
        "no STS call on the request path"
    );
    assert_eq!(
        cache_counts(addr),
        (hits + 1.0, misses),
        "a prefetched first request is a cache hit: it does not wait for STS"
    );
}

/// (credential cache hits, misses) so far; a miss is a request that waited for STS.
fn cache_counts(addr: std::net::SocketAddr) -> (f64, f64) {
    (
        sample(addr, "iamlet_credential_cache_hits_total"),
        sample(addr, "iamlet_credential_cache_misses_total"),
    )
}

#[test]
fn credentials_are_refreshed_ahead_and_no_request_waits_for_sts() {
    let mut rig = sts_rig(Fault::Delay(Duration::from_millis(300)));
    // 8-second credentials, TTL 2 s: refresh about every 5 s.
    rig.sts.set_expires_in(Some(Duration::from_secs(8)));
    let ip = Ipv4Addr::new(127, 0, 0, 40);
    rig.start(
        &list(&[pod("r", ip, "refresh-role", "")]),
        &["--iam-role-session-ttl=2s"],
    );
    wait_until!(
        Duration::from_secs(10),
        rig.creds(ip, "refresh-role").status == 200,
        "the first credentials"
    );
    let addr = rig.iamlet().addr();
    let (hits, misses) = cache_counts(addr);
    let start = Instant::now();
    let mut keys = BTreeSet::new();
    let mut slowest = Duration::ZERO;
    let mut n = 0.0;
    // Ask until three refresh cycles have been served (about 15 s), checking every answer.
    wait_until!(
        Duration::from_secs(40),
        {
            let t = Instant::now();
            let resp = rig.creds(ip, "refresh-role");
            slowest = slowest.max(t.elapsed());
            assert_eq!(resp.status, 200, "{}", resp.body_str());
            let doc = json(&resp);
            let expires = parse_time(doc["Expiration"].as_str().unwrap());
            // Expiration is truncated to whole seconds: allow that one second.
            assert!(
                expires + 1 > unix_now() + 2,
                "served credentials expire too soon: {doc} (now {})",
                unix_now()
            );
            keys.insert(doc["AccessKeyId"].as_str().unwrap().to_owned());
            n += 1.0;
            keys.len() >= 3
        },
        "three refresh cycles; saw {} credentials",
        keys.len()
    );
    let calls = rig.sts.calls().len();
    println!(
        "{n} requests over {:?}: {} distinct credentials, {calls} AssumeRole calls, slowest request {slowest:?}",
        start.elapsed(),
        keys.len()
    );
    assert_eq!(
        cache_counts(addr),
        (hits + n, misses),
        "every request was a cache hit: none waited for STS"
    );
}

#[test]
fn an_sts_outage_serves_valid_credentials_then_a_json_500_then_recovers() {
    let mut rig = sts_rig(Fault::Pass);
    rig.sts.set_expires_in(Some(Duration::from_secs(8)));
    let ip = Ipv4Addr::new(127, 0, 0, 50);
    rig.start(
        &list(&[pod("o", ip, "outage-role", "")]),
        &["--iam-role-session-ttl=2s", "--iam-role-error-ttl=500ms"],
    );
    wait_until!(
        Duration::from_secs(10),
        rig.creds(ip, "outage-role").status == 200,
        "the first credentials"
    );
    let first = json(&rig.creds(ip, "outage-role"))["AccessKeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    rig.sts.set_fault(Fault::Error500);
    // Served while still valid (more than the minimum lifetime left), then JSON 500s, and
    // never anything but the last valid credentials or an error.
    let mut served_stale = 0;
    let mut codes = BTreeSet::new();
    wait_until!(
        Duration::from_secs(20),
        {
            let resp = rig.creds(ip, "outage-role");
            if resp.status == 200 {
                assert!(
                    codes.is_empty(),
                    "valid credentials again after an error during the outage"
                );
                assert_eq!(
                    json(&resp)["AccessKeyId"],
                    first.as_str(),
                    "only the last valid credentials may be served"
                );
                served_stale += 1;
            } else {
                assert_eq!(resp.status, 500, "{}", resp.body_str());
                assert_eq!(resp.header("content-type"), Some("application/json"));
                let err = json(&resp);
                assert!(
                    err["Message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{err}"
                );
                codes.insert(err["Code"].as_str().unwrap().to_owned());
            }
            codes.contains("InternalFailure")
        },
        "STS's error to be answered; saw {codes:?}"
    );
    assert!(
        served_stale > 5,
        "valid credentials should have been served during the outage"
    );
    rig.sts.set_fault(Fault::Pass);
    let resp = wait_until!(
        Duration::from_secs(20),
        Some(rig.creds(ip, "outage-role")).filter(|r| r.status == 200),
        "recovery after STS came back"
    );
    assert_ne!(json(&resp)["AccessKeyId"], first.as_str());
    println!("outage: {served_stale} requests served the last valid credentials before the 500");
}

#[test]
fn throttling_with_nothing_cached_is_a_json_500_with_the_aws_code() {
    let mut rig = sts_rig(Fault::Throttle);
    let ip = Ipv4Addr::new(127, 0, 0, 55);
    rig.start(
        &list(&[pod("t", ip, "throttled-role", "")]),
        &["--backoff-max-elapsed-time=10s"],
    );
    let resp = rig.creds(ip, "throttled-role");
    assert_eq!(resp.status, 500, "{}", resp.body_str());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(json(&resp)["Code"], "Throttling");
}

#[test]
fn external_ids_are_part_of_the_key() {
    let mut rig = sts_rig(Fault::Pass);
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 60), Ipv4Addr::new(127, 0, 0, 61));
    rig.start(
        &list(&[
            pod(
                "tenant-a",
                a,
                "shared-role",
                ", iam.amazonaws.com/external-id: ext-a",
            ),
            pod(
                "tenant-b",
                b,
                "shared-role",
                ", iam.amazonaws.com/external-id: ext-b",
            ),
        ]),
        &[],
    );
    let ka = json(&rig.creds(a, "shared-role"))["AccessKeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let kb = json(&rig.creds(b, "shared-role"))["AccessKeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        ka, kb,
        "pods with different external IDs must not share credentials"
    );
    let ext: BTreeSet<Option<String>> =
        rig.sts.calls().into_iter().map(|c| c.external_id).collect();
    assert_eq!(
        ext,
        BTreeSet::from([Some("ext-a".to_owned()), Some("ext-b".to_owned())])
    );
    assert_eq!(rig.sts.calls().len(), 2);
}

#[test]
fn the_node_wide_rate_limit_bounds_assume_role_calls() {
    let mut rig = sts_rig(Fault::Pass);
    let (rate, roles) = (50, 500);
    let pods: Vec<String> = (0..roles)
        .map(|i| {
            pod(
                &format!("storm{i}"),
                Ipv4Addr::new(127, 0, 2 + (i / 250) as u8, 1 + (i % 250) as u8),
                &format!("role-{i}"),
                "",
            )
        })
        .collect();
    rig.start(&list(&pods), &[&format!("--sts-rate-limit={rate}")]);
    wait_until!(
        Duration::from_secs(60),
        rig.sts.calls().len() >= roles,
        "every prefetch"
    );
    let calls = rig.sts.calls();
    let mut at: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    at.sort();
    let worst = at
        .iter()
        .enumerate()
        .map(|(i, t)| {
            at[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    let span = *at.last().unwrap() - at[0];
    let distinct: BTreeSet<&str> = calls.iter().map(|c| c.role_arn.as_str()).collect();
    println!(
        "{roles} cold roles: {} calls over {span:?}, at most {worst} in any 1 s window (limit {rate}/s)",
        calls.len()
    );
    assert_eq!(distinct.len(), roles);
    assert_eq!(calls.len(), roles, "one call per role");
    // iamlet lets calls out at most `rate` per second; the counting proxy stamps each when its
    // own thread reads it, so allow a call of scheduling jitter at each edge of the window.
    assert!(
        worst <= rate + 2,
        "{worst} AssumeRole calls within one second exceed the limit of {rate}/s"
    );
    let floor = Duration::from_secs_f64((roles - 1) as f64 / rate as f64 * 0.9);
    assert!(
        span >= floor,
        "{span:?} is too short for {roles} calls at {rate}/s"
    );
}

#[test]
fn assume_role_calls_in_flight_are_bounded() {
    // 48 cold roles at once, no effective rate limit, STS answering each after 300 ms: calls
    // go out in waves of --sts-max-in-flight, never more at once, and every role is fetched.
    let mut rig = sts_rig(Fault::Delay(Duration::from_millis(300)));
    let (bound, roles) = (4, 48);
    let pods: Vec<String> = (0..roles)
        .map(|i| {
            pod(
                &format!("wave{i}"),
                Ipv4Addr::new(127, 0, 4, 1 + i as u8),
                &format!("wave-role-{i}"),
                "",
            )
        })
        .collect();
    let started = Instant::now();
    rig.start(
        &list(&pods),
        &[
            "--sts-rate-limit=10000",
            &format!("--sts-max-in-flight={bound}"),
        ],
    );
    wait_until!(
        Duration::from_secs(60),
        rig.sts.passed().len() >= roles,
        "every prefetch"
    );
    let took = started.elapsed();
    let most = rig.sts.max_in_flight();
    println!(
        "{roles} cold roles, bound {bound}: at most {most} AssumeRole calls in flight, all fetched in {took:?}"
    );
    let distinct: BTreeSet<String> = rig.sts.calls().into_iter().map(|c| c.role_arn).collect();
    assert_eq!(distinct.len(), roles, "every role fetched once");
    assert!(
        most <= bound,
        "{most} AssumeRole calls in flight at once, bound {bound}"
    );
    assert!(
        most >= 2,
        "calls ran one at a time ({most}); the bound should let {bound} run together"
    );
    // 48 calls of >= 300 ms, at most 4 at a time: at least 12 waves.
    assert!(
        took >= Duration::from_millis(300 * (roles / bound) as u64),
        "{took:?}"
    );
    // Pods get their credentials once fetched.
    let last = roles - 1;
    let resp = rig.creds(
        Ipv4Addr::new(127, 0, 4, 1 + last as u8),
        &format!("wave-role-{last}"),
    );
    assert_eq!(resp.status, 200, "{}", resp.body_str());
}

#[test]
fn per_pod_sessions_are_named_and_tagged() {
    let mut rig = sts_rig(Fault::Pass);
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 70), Ipv4Addr::new(127, 0, 0, 71));
    rig.start(
        &list(&[
            pod("web", a, "app-role", ""),
            pod("worker", b, "app-role", ""),
        ]),
        &["--session-tags", "--cluster-name=prod-1"],
    );
    let (ra, rb) = (rig.creds(a, "app-role"), rig.creds(b, "app-role"));
    assert_eq!((ra.status, rb.status), (200, 200));
    assert_ne!(
        json(&ra)["AccessKeyId"],
        json(&rb)["AccessKeyId"],
        "per-pod sessions"
    );
    let mut calls = rig.sts.calls();
    calls.sort_by(|x, y| x.session_name.cmp(&y.session_name));
    let names: Vec<&str> = calls.iter().map(|c| c.session_name.as_str()).collect();
    assert_eq!(names, ["team.web", "team.worker"]);
    assert_eq!(
        calls[0].tags,
        [
            ("kubernetes-namespace".to_owned(), "team".to_owned()),
            ("kubernetes-pod-name".to_owned(), "web".to_owned()),
            ("kubernetes-service-account".to_owned(), "sa-web".to_owned()),
            ("kubernetes-pod-uid".to_owned(), "uid-web".to_owned()),
            ("eks-cluster-name".to_owned(), "prod-1".to_owned()),
        ]
    );
}

#[test]
fn node_sessions_are_shared_and_named_after_node_and_role() {
    let mut rig = sts_rig(Fault::Pass);
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 80), Ipv4Addr::new(127, 0, 0, 81));
    rig.start(
        &list(&[pod("one", a, "app-role", ""), pod("two", b, "app-role", "")]),
        &["--node=node-7"],
    );
    let (ra, rb) = (rig.creds(a, "app-role"), rig.creds(b, "app-role"));
    assert_eq!(json(&ra)["AccessKeyId"], json(&rb)["AccessKeyId"]);
    let calls = rig.sts.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].session_name, "node-7-app-role");
    assert!(calls[0].tags.is_empty());
}
