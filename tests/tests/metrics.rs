//! `/metrics` as Prometheus sees it: `promtool check metrics` is clean on a live agent's
//! output, and a real Prometheus server on loopback scrapes iamlet and returns a sample of
//! every family that has samples (kube2iam's five among them).

use iamlet_e2e::process::run_bounded;
use iamlet_e2e::util::TempDir;
use iamlet_e2e::{
    FakeImds, Iamlet, Moto, free_port, get_from, is_ci, request_from, try_request_from,
};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    // A free port can be taken by a parallel test before Prometheus binds it: try a few.
    let mut started = None;
    for _ in 0..3 {
        let port = free_port();
        let mut child = Command::new(&prom)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join(format!("data-{port}")).display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        std::thread::sleep(Duration::from_secs(2));
        match child.try_wait() {
            Ok(None) => {
                started = Some((child, port));
                break;
            }
            _ => {
                let _ = child.wait();
            }
        }
    }
    let (child, port) = started.expect("prometheus did not start on any of 3 free ports");
    let p = Prometheus {
        child,
        port,
        _dir: dir,
    };
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: BTreeSet<String> = want.clone();
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "Prometheus returned no sample for {missing:?}"
        );
        missing.retain(|f| {
            // count(…) keeps the answer small (Prometheus chunks large ones).
            let v = query(p.port, &format!("count({f}{{job=\"iamlet\"}})"));
            !(v["status"] == "success"
                && v["data"]["result"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty()))
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    let up = query(p.port, "up{job=\"iamlet\"}");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    println!(
        "Prometheus returned samples for all {} families",
        want.len()
    );
}
