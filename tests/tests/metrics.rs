//! `/metrics` as Prometheus sees it: `promtool check metrics` is clean on a live agent's
//! output, and a real Prometheus server on loopback scrapes iamlet and returns a sample of
//! every family that has samples (kube2iam's five among them).

use iamlet_e2e::process::run_bounded;
use iamlet_e2e::util::TempDir;
use iamlet_e2e::{
    FakeImds, Iamlet, Moto, free_port, get_from, is_ci, request_from, try_request_from, wait_until,
};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PODS: &str = "apiVersion: v1\nkind: List\nitems:\n- kind: Pod\n  metadata: {name: m, namespace: obs, uid: u-m, annotations: {iam.amazonaws.com/role: metrics-role}}\n  status: {phase: Running, podIP: 127.0.0.41}\n";

fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = iamlet_e2e::util::find_on_path(name);
    if found.is_none() {
        assert!(
            !is_ci(),
            "{name} is missing in CI: .ci/run installs Debian's prometheus package"
        );
        eprintln!("SKIPPED: {name} not installed (apt-get install prometheus)");
    }
    found
}

/// An agent that has answered every kind of request, so most families have samples.
fn busy_agent(moto: &Moto, imds: &FakeImds) -> Iamlet {
    let iamlet = Iamlet::builder()
        .pods_yaml(PODS)
        .sts(moto)
        .imds(imds)
        .arg("--base-role-arn=arn:aws:iam::123456789012:role/")
        .arg("--backoff-max-elapsed-time=5s")
        .start();
    let a = iamlet.addr();
    let pod = Ipv4Addr::new(127, 0, 0, 41);
    for _ in 0..3 {
        assert_eq!(
            get_from(
                pod,
                a,
                "/latest/meta-data/iam/security-credentials/metrics-role"
            )
            .status,
            200
        );
    }
    get_from(pod, a, "/latest/meta-data/iam/security-credentials/");
    get_from(pod, a, "/latest/meta-data/instance-id");
    get_from(
        Ipv4Addr::new(127, 0, 0, 42),
        a,
        "/latest/meta-data/iam/security-credentials/",
    );
    request_from(pod, a, b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n");
    request_from(pod, a, b"GET /latest/meta-data/ HTTP/1.1\r\nX-aws-ec2-metadata-token: forged\r\nConnection: close\r\n\r\n");
    request_from(pod, a, b"GET /%zz HTTP/1.1\r\nConnection: close\r\n\r\n");
    iamlet
}

fn scrape(iamlet: &Iamlet) -> String {
    let r = get_from(Ipv4Addr::LOCALHOST, iamlet.addr(), "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    r.body_str()
}

/// Families with at least one sample, by the name Prometheus stores them under.
fn families_with_samples(text: &str) -> BTreeSet<String> {
    let mut types = std::collections::BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        if let Some((name, kind)) = l.split_once(' ') {
            types.insert(name.to_owned(), kind.to_owned());
        }
    }
    let mut out = BTreeSet::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let sample = l.split(['{', ' ']).next().unwrap_or("");
        for (name, kind) in &types {
            let hit = match kind.as_str() {
                "histogram" => sample == format!("{name}_count"),
                _ => sample == name,
            };
            if hit {
                out.insert(if kind == "histogram" {
                    format!("{name}_count")
                } else {
                    name.clone()
                });
            }
        }
    }
    out
}

#[test]
fn promtool_finds_the_live_metrics_clean() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let (moto, imds) = (Moto::start(), FakeImds::start());
    let iamlet = busy_agent(&moto, &imds);
    let text = scrape(&iamlet);
    let dir = TempDir::new("promtool");
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let out = run_bounded(
        {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!(
                "{} check metrics < {}",
                promtool.display(),
                file.display()
            ));
            c
        },
        Duration::from_secs(30),
    );
    assert!(
        out.success(),
        "promtool check metrics: {}{}\n{text}",
        out.stdout,
        out.stderr
    );
    for family in [
        "kube2iam_http_request_duration_seconds",
        "kube2iam_iam_request_duration_seconds",
        "kube2iam_iam_cache_hits_total",
        "kube2iam_healthcheck_status",
        "kube2iam_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `dir/prometheus.yml` on a free port and waits (bounded) until
    /// `/-/ready` answers 200. A port taken by a parallel test before Prometheus bound it
    /// (it exits) is retried on another; anything else fails with the server's log.
    fn start(prom: &std::path::Path, dir: TempDir) -> Prometheus {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log_path = dir.path().join(format!("prometheus-{port}.log"));
            let log = std::fs::File::create(&log_path).expect("create prometheus log");
            let mut child = Command::new(prom)
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join(format!("data-{port}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let to = format!("127.0.0.1:{port}").parse().unwrap();
            let ready = iamlet_e2e::wait::poll(Duration::from_secs(60), || {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(Err(status));
                }
                let raw = b"GET /-/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
                try_request_from(Ipv4Addr::LOCALHOST, to, raw)
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|_| Ok(()))
            });
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            match ready {
                Ok(Ok(())) => {
                    return Prometheus {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                Ok(Err(status)) if log.contains("address already in use") => {
                    last = format!("exited ({status}) on port {port}, taken meanwhile");
                }
                Ok(Err(status)) => panic!("prometheus exited ({status}); log:\n{log}"),
                Err(waited) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("prometheus was not ready on port {port} after {waited:?}; log:\n{log}");
                }
            }
        }
        panic!("prometheus did not start on any of 3 free ports: {last}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn query(port: u16, q: &str) -> serde_json::Value {
    let path = format!(
        "/api/v1/query?query={}",
        q.replace('{', "%7B")
            .replace('}', "%7D")
            .replace('"', "%22")
    );
    let raw = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    // Refused until Prometheus listens: that is "no answer yet".
    let to = format!("127.0.0.1:{port}").parse().unwrap();
    match try_request_from(Ipv4Addr::LOCALHOST, to, raw.as_bytes()) {
        Ok(r) => serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::Value::Null,
    }
}

#[test]
fn a_real_prometheus_scrapes_every_family() {
    let Some(prom) = tool("prometheus") else {
        return;
    };
    let (moto, imds) = (Moto::start(), FakeImds::start());
    let iamlet = busy_agent(&moto, &imds);
    let dir = TempDir::new("prometheus");
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: iamlet\n  static_configs: [{{targets: ['127.0.0.1:{}']}}]\n",
        iamlet.addr().port()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let p = Prometheus::start(&prom, dir);
    let want = families_with_samples(&scrape(&iamlet));
    for must in [
        "kube2iam_http_request_duration_seconds_count",
        "kube2iam_iam_cache_hits_total",
        "kube2iam_info",
        "iamlet_http_requests_total",
    ] {
        assert!(
            want.contains(must),
            "{must} has no sample in /metrics: {want:?}"
        );
    }
    // Prometheus needs a few seconds before the first scrape is queryable.
    let mut missing: BTreeSet<String> = want.clone();
    wait_until!(
        Duration::from_secs(60),
        {
            missing.retain(|f| {
                // count(…) keeps the answer small (Prometheus chunks large ones).
                let v = query(p.port, &format!("count({f}{{job=\"iamlet\"}})"));
                !(v["status"] == "success"
                    && v["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty()))
            });
            missing.is_empty()
        },
        "Prometheus to return a sample of every family; none yet for {missing:?}"
    );
    let up = query(p.port, "up{job=\"iamlet\"}");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    println!(
        "Prometheus returned samples for all {} families",
        want.len()
    );
}

/// Every metric name the shipped Grafana dashboard queries.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = iamlet_e2e::workspace_root().join("deploy/chart/dashboards/iamlet.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut names = BTreeSet::new();
    for prefix in ["iamlet_", "kube2iam_"] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(prefix) {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // Only whole words: not the tail of a longer identifier.
            let before = rest[..at].chars().next_back();
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(name.clone());
            }
            rest = &rest[at + name.len()..];
        }
    }
    names
}

#[test]
fn a_fresh_agent_exposes_every_dashboard_family_at_zero() {
    // STS accepts connections and never answers: no AssumeRole completes, so whatever the
    // agent exposes was there before its first event.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let imds = FakeImds::start();
    let iamlet = Iamlet::builder()
        .pods_yaml(PODS)
        .imds(&imds)
        .env(
            "AWS_ENDPOINT_URL_STS",
            format!("http://{}", silent.local_addr().unwrap()),
        )
        .arg("--base-role-arn=arn:aws:iam::123456789012:role/")
        .start();
    let ready = |a| get_from(Ipv4Addr::LOCALHOST, a, "/ready").status == 200;
    wait_until!(Duration::from_secs(30), ready(iamlet.addr()), "/ready");
    let text = scrape(&iamlet);
    // The DNAT rule's families exist where iamlet manages the rule (--iptables): the deploy
    // tests check them on an agent started that way, in a network namespace.
    let want: BTreeSet<String> = dashboard_metrics()
        .into_iter()
        .filter(|m| !m.starts_with("iamlet_iptables_"))
        .collect();
    assert!(want.len() >= 8, "the dashboard's metrics: {want:?}");
    let mut missing = Vec::new();
    for name in &want {
        // A sample of that name, or of the histogram of that name.
        let has = |l: &&str| {
            l.strip_prefix(name.as_str()).is_some_and(|rest| {
                let rest = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| rest.strip_prefix(s))
                    .unwrap_or(rest);
                rest.starts_with(['{', ' '])
            })
        };
        if !text.lines().any(|l| has(&l)) {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "a fresh agent has no sample of {missing:?}:\n{text}"
    );
    for line in [
        "iamlet_sts_assume_role_total{outcome=\"success\"} 0",
        "iamlet_sts_assume_role_total{outcome=\"throttled\"} 0",
        "iamlet_credential_cache_hits_total 0",
        "iamlet_credential_cache_misses_total 0",
        "iamlet_token_rejections_total{outcome=\"missing\"} 0",
        "iamlet_http_requests_total{route=\"credentials\",status=\"2xx\"} 0",
        "iamlet_http_requests_total{route=\"passthrough\",status=\"5xx\"} 0",
        "iamlet_watch_relists_total{resource=\"pods\"} 0",
        "kube2iam_iam_cache_hits_total{role_arn=\"arn:aws:iam::123456789012:role/metrics-role\"} 0",
        "kube2iam_iam_request_duration_seconds_count{code=\"Success\",role_arn=\"arn:aws:iam::123456789012:role/metrics-role\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "`{line}` missing:\n{text}");
    }
    // The driver the workers run on, as the `listening` line says.
    let log = iamlet.log();
    let driver = log
        .lines()
        .find(|l| l.contains(" listening "))
        .and_then(|l| l.split("driver=").nth(1))
        .map(|d| d.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap_or_else(|| panic!("no driver in the listening line:\n{log}"));
    let line = format!("iamlet_io_driver_info{{driver=\"{driver}\"}} 1");
    assert!(text.lines().any(|l| l == line), "`{line}` missing:\n{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("iamlet_io_driver_info{"))
            .count(),
        1,
        "one driver:\n{text}"
    );
    drop(silent);
}
