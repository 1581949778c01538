//! Node integration, for real: a node network namespace running `iamlet --iptables` (with
//! moto, the fake IMDS on 169.254.169.254:80 and a pods file), pod namespaces joined by veth
//! pairs, real iptables (nft and legacy) and conntrack, and clients in the pods using the
//! *default* metadata endpoint, so the DNAT path is what is tested.
//!
//! Needs root, `ip` and the iptables tools: elsewhere than CI a missing piece is a loud
//! `SKIPPED:`; in CI (`CI=true`) it is a failure. Every namespace, rule and process is the
//! test's own and goes away on drop; nothing is sent from the host's namespace and the host's
//! iptables are never touched (each namespace has its own netfilter tables).

use iamlet_e2e::iamlet::binary;
use iamlet_e2e::imds::NODE_ROLE;
use iamlet_e2e::netns::{self, InNetns, Netns, Pod, add_local_address, add_pod, http_get};
use iamlet_e2e::process::run_bounded;
use iamlet_e2e::{FakeImds, Iamlet, Moto, NODE_MARKER, Output, run_python, wait_until};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const BASE: &str = "arn:aws:iam::123456789012:role/";
const HOST_IP: &str = "10.254.0.1";
const APP_PORT: u16 = 8181;
const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/";
/// How long a restore may take with `--iptables-verify-interval=1s`.
const RESTORE_WITHIN: Duration = Duration::from_secs(6);

fn metadata() -> SocketAddr {
    "169.254.169.254:80".parse().unwrap()
}

fn metadata_v6() -> SocketAddr {
    "[fd00:ec2::254]:80".parse().unwrap()
}

macro_rules! require_netns {
    ($name:expr) => {
        if !netns::available($name) {
            return;
        }
    };
}

/// What a pod got when it asked the metadata address for its role.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// iamlet answered with this role name.
    Iamlet(String),
    /// The node's own metadata service answered (this pod is not redirected).
    NodeRole,
    /// Connection refused: redirected to an agent that is not there (fail-closed).
    Refused,
    Other(String),
}

fn seen_at(pod: &Pod, addr: SocketAddr) -> Seen {
    match pod.ns.run(|| http_get(addr, CREDS_PATH)) {
        Ok((200, body)) if body.trim() == NODE_ROLE => Seen::NodeRole,
        Ok((200, body)) => Seen::Iamlet(body),
        Ok((code, body)) => Seen::Other(format!("{code} {body}")),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Seen::Refused,
        Err(e) => Seen::Other(e.to_string()),
    }
}

fn seen(pod: &Pod) -> Seen {
    seen_at(pod, metadata())
}

fn role_of(iface: &str) -> String {
    format!("role-{iface}")
}

/// A node namespace with the fake IMDS at 169.254.169.254:80, the host IP on `lo`, pods,
/// optionally moto, and iamlet once started. Fields drop in order: iamlet first, the node
/// namespace last.
struct Node {
    iamlet: Option<Iamlet>,
    moto: Option<Moto>,
    imds: Option<InNetns<FakeImds>>,
    pods: Vec<Pod>,
    pods_yaml: String,
    ns: Netns,
}

struct NodeBuilder {
    ifaces: Vec<String>,
    imds: bool,
    moto: bool,
}

impl NodeBuilder {
    fn no_imds(mut self) -> Self {
        self.imds = false;
        self
    }

    fn moto(mut self) -> Self {
        self.moto = true;
        self
    }

    fn build(self) -> Node {
        let ns = Netns::new("node");
        add_local_address(&ns, "169.254.169.254/32");
        add_local_address(&ns, &format!("{HOST_IP}/32"));
        add_local_address(&ns, "fd00:ec2::254/128");
        let imds = self
            .imds
            .then(|| ns.own(ns.run(|| FakeImds::builder().bind(metadata()).start())));
        let pods: Vec<Pod> = self
            .ifaces
            .iter()
            .enumerate()
            .map(|(i, iface)| add_pod(&ns, &format!("pod-{iface}"), iface, i as u8 + 1))
            .collect();
        let mut yaml = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for p in &pods {
            yaml.push_str(&format!(
                "- kind: Pod\n  metadata: {{name: {n}, namespace: shop, uid: u-{n}, annotations: {{iam.amazonaws.com/role: {r}}}}}\n  status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: \"{ip6}\"}}]}}\n",
                n = p.name,
                r = role_of(&p.iface),
                ip = p.ip,
                ip6 = p.ip6,
            ));
        }
        let moto = self.moto.then(|| ns.run(Moto::start));
        Node {
            iamlet: None,
            moto,
            imds,
            pods,
            pods_yaml: yaml,
            ns,
        }
    }
}

impl Node {
    /// One pod per interface name (role `role-<iface>`).
    fn builder(ifaces: &[&str]) -> NodeBuilder {
        NodeBuilder {
            ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
            imds: true,
            moto: false,
        }
    }

    fn pod(&self, iface: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.iface == iface)
            .unwrap_or_else(|| panic!("no pod on {iface}"))
    }

    fn sts_endpoint(&self) -> String {
        // Without moto, STS is a closed port: prefetches fail, role listings still work.
        self.moto
            .as_ref()
            .map_or_else(|| "http://127.0.0.1:9".into(), Moto::endpoint)
    }

    /// The agent's usual flags for this node.
    fn flags(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--iptables".to_string(),
            format!("--host-ip={HOST_IP}"),
            format!("--app-port={APP_PORT}"),
            format!("--base-role-arn={BASE}"),
            "--iptables-verify-interval=1s".into(),
            "--backoff-max-elapsed-time=300ms".into(),
            "--io-driver=epoll".into(),
            // The node namespace's own fake metadata service (the test launcher otherwise
            // points iamlet at a refused loopback port).
            "--metadata-addr=169.254.169.254".into(),
        ]
        .into();
        if !extra.iter().any(|a| a.starts_with("--host-interface")) {
            v.push("--host-interface=cali+".into());
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Starts iamlet inside the node namespace (replacing a running one) and waits until it
    /// listens, which with --iptables is after the rule is in.
    fn start(&mut self, extra: &[&str]) -> &Iamlet {
        self.iamlet = None;
        let mut b = Iamlet::builder()
            .pods_yaml(&self.pods_yaml)
            .env("AWS_ENDPOINT_URL_STS", self.sts_endpoint());
        for a in self.flags(extra) {
            b = b.arg(a);
        }
        self.iamlet = Some(self.ns.run(move || b.start()));
        self.iamlet.as_ref().unwrap()
    }

    fn iamlet(&mut self) -> &mut Iamlet {
        self.iamlet.as_mut().expect("iamlet started")
    }

    /// Runs the iamlet binary to completion inside the node namespace (at most 60 s), with the
    /// test environment and `env` added.
    fn cli(&self, args: &[String], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(binary());
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("AWS_") || k.starts_with("IAMLET_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs([
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]);
        cmd.envs(env.iter().copied()).args(args);
        self.ns
            .run(move || run_bounded(cmd, Duration::from_secs(60)))
    }

    fn cli_str(&self, args: &[&str]) -> Output {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.cli(&args, &[])
    }

    /// `{tool}-save` of the node's nat table, e.g. `iptables-nft-save`.
    fn save(&self, tool: &str) -> String {
        self.ns.exec_ok(&format!("{tool}-save"), &[])
    }

    /// (jumps to IAMLET anywhere, rules in IAMLET) for the metadata address, as
    /// `{tool}-save` shows them (the container-credentials address's are [`Node::count_container`]).
    fn count(&self, tool: &str) -> (usize, Vec<String>) {
        self.count_for(tool, false)
    }

    /// As [`Node::count`], for the container-credentials address (169.254.170.23, fd00:ec2::23).
    fn count_container(&self, tool: &str) -> (usize, Vec<String>) {
        self.count_for(tool, true)
    }

    fn count_for(&self, tool: &str, container: bool) -> (usize, Vec<String>) {
        let save = self.save(tool);
        let ours = |l: &&str| {
            let c = l.contains("-d 169.254.170.23/32") || l.contains("-d fd00:ec2::23/128");
            c == container
        };
        let jumps = save
            .lines()
            .filter(|l| l.starts_with("-A ") && l.ends_with("-j IAMLET"))
            .filter(ours)
            .count();
        let rules = save
            .lines()
            .filter(|l| l.starts_with("-A IAMLET "))
            .filter(ours)
            .map(str::to_owned)
            .collect();
        (jumps, rules)
    }

    /// True when the first rule of nat PREROUTING is the metadata address's jump to IAMLET.
    fn jump_on_top(&self, tool: &str) -> bool {
        let out = self.ns.exec(tool, &["-w", "-t", "nat", "-S", "PREROUTING"]);
        out.stdout
            .lines()
            .find(|l| l.starts_with("-A PREROUTING"))
            .is_some_and(|l| {
                l.ends_with("-j IAMLET")
                    && (l.contains("-d 169.254.169.254/32") || l.contains("-d fd00:ec2::254/128"))
            })
    }

    /// GET on iamlet's admin paths from inside the node: (status, body), (0, "") on error.
    fn admin(&self, path: &str) -> (u16, String) {
        let addr: SocketAddr = format!("127.0.0.1:{APP_PORT}").parse().unwrap();
        self.ns.run(|| http_get(addr, path)).unwrap_or_default()
    }

    /// Requests the fake IMDS received from `pod`.
    fn imds_requests_from(&self, pod: &Pod) -> usize {
        self.imds.as_ref().map_or(0, |i| {
            i.requests()
                .iter()
                .filter(|r| r.peer.ip() == pod.ip || r.peer.ip() == pod.ip6)
                .count()
        })
    }

    fn sigterm(&mut self) -> Option<i32> {
        let pid = self.iamlet().pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let (code, timed_out) = self.iamlet().wait_exit(Duration::from_secs(20));
        assert!(!timed_out, "iamlet did not exit on SIGTERM");
        code
    }
}

/// boto3 in `pod` with its default credential chain and metadata endpoint: (method, access
/// key, secret key, token), or None when it found no credentials. The output is checked for
/// the node's credentials.
fn boto3_credentials(pod: &Pod) -> Option<(String, String, String, String)> {
    let script = r#"
import json, boto3
c = boto3.session.Session(region_name="us-east-1").get_credentials()
if c is None:
    print(json.dumps(None))
else:
    f = c.get_frozen_credentials()
    print(json.dumps([c.method, f.access_key, f.secret_key, f.token]))
"#;
    let env = [
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ("AWS_METADATA_SERVICE_TIMEOUT", "2"),
        ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1"),
    ];
    let out = pod.ns.run(|| run_python(script, &env, true));
    assert!(
        !out.stdout.contains(NODE_MARKER) && !out.stderr.contains(NODE_MARKER),
        "node credentials leaked to {}: {out:?}",
        pod.name
    );
    assert!(out.success(), "boto3 in {}: {out:?}", pod.name);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let a = v.as_array()?;
    let s = |i: usize| a[i].as_str().unwrap_or_default().to_owned();
    Some((s(0), s(1), s(2), s(3)))
}

/// GetCallerIdentity against moto (from the node) with the credentials a pod got.
fn caller_arn(node: &Node, creds: &(String, String, String, String)) -> String {
    let script = r#"
import boto3, os
print(boto3.client("sts", region_name="us-east-1", endpoint_url=os.environ["EP"]).get_caller_identity()["Arn"])
"#;
    let ep = node.sts_endpoint();
    let env = [
        ("EP", ep.as_str()),
        ("AWS_ACCESS_KEY_ID", creds.1.as_str()),
        ("AWS_SECRET_ACCESS_KEY", creds.2.as_str()),
        ("AWS_SESSION_TOKEN", creds.3.as_str()),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ];
    let out = node.ns.run(|| run_python(script, &env, true));
    assert!(out.success(), "GetCallerIdentity: {out:?}");
    out.stdout.trim().to_owned()
}

fn one_line_error(out: &Output) -> String {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("iamlet: "))
        .collect();
    assert_eq!(lines.len(), 1, "one `iamlet:` line expected: {out:?}");
    lines[0].trim_start_matches("iamlet: ").to_owned()
}

#[test]
fn boto3_in_pods_gets_each_pods_own_role_through_the_dnat() {
    require_netns!("boto3_in_pods_gets_each_pods_own_role_through_the_dnat");
    let mut node = Node::builder(&["cali1", "cali2"]).moto().build();
    // Control: without the agent a pod reaches the node's metadata service and its role —
    // the leak iamlet exists to stop, and what the fake's NODE_MARKER would reveal.
    assert_eq!(seen(node.pod("cali1")), Seen::NodeRole);
    node.start(&["--host-interface=cali+"]);
    node.imds.as_ref().unwrap().clear_requests();

    let mut arns = Vec::new();
    for iface in ["cali1", "cali2"] {
        let pod = node.pod(iface);
        let creds = boto3_credentials(pod).expect("boto3 found credentials");
        assert_eq!(
            creds.0, "iam-role",
            "boto3 used the instance metadata provider"
        );
        let arn = caller_arn(&node, &creds);
        assert!(
            arn.starts_with(&format!(
                "arn:aws:sts::123456789012:assumed-role/{}/",
                role_of(iface)
            )),
            "{iface}: {arn}"
        );
        arns.push(arn);
        // Asking for the node's role by name is refused, never forwarded.
        let (code, body) = pod
            .ns
            .run(|| http_get(metadata(), &format!("{CREDS_PATH}{NODE_ROLE}")))
            .unwrap();
        assert_ne!(code, 200, "{body}");
        assert!(!body.contains(NODE_MARKER));
        assert_eq!(
            node.imds_requests_from(pod),
            0,
            "a request reached the node's IMDS"
        );
    }
    assert_ne!(arns[0], arns[1]);
    // kube2iam users' habitual lookup finds the rule: the jump names the metadata address.
    let pre = node
        .ns
        .exec_ok("iptables", &["-t", "nat", "-S", "PREROUTING"]);
    assert!(
        pre.lines()
            .any(|l| l.contains("169.254.169.254") && l.ends_with("-j IAMLET")),
        "{pre}"
    );
    // Ready only once the rule is in (it is: start() returned after `listening`).
    assert_eq!(node.admin("/ready").0, 200);
}

#[test]
fn kill_9_leaves_the_rule_restart_keeps_one_set_cleanup_removes_everything() {
    require_netns!("kill_9_leaves_the_rule_restart_keeps_one_set_cleanup_removes_everything");
    let mut node = Node::builder(&["cali1"]).moto().build();
    node.start(&["--host-interface=cali+"]);
    let pod_role = role_of("cali1");
    assert_eq!(seen(node.pod("cali1")), Seen::Iamlet(pod_role.clone()));
    node.imds.as_ref().unwrap().clear_requests();

    // kill -9: the rule stays; requests are refused at once and never reach the node's role.
    node.iamlet().kill_9();
    let (jumps, rules) = node.count("iptables-nft");
    assert_eq!((jumps, rules.len()), (1, 1), "{rules:?}");
    let t = Instant::now();
    assert_eq!(seen(node.pod("cali1")), Seen::Refused);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        t.elapsed()
    );
    assert_eq!(boto3_credentials(node.pod("cali1")), None);
    assert_eq!(node.imds_requests_from(node.pod("cali1")), 0);

    // Restart: exactly one rule set, whatever ran before; twice, then with another interface
    // value (kube2iam's "rule added twice with different --host-interface values").
    for flags in [
        &["--host-interface=cali+"][..],
        &["--host-interface=cali+"],
        &["--host-interface=cali1,weave0+"],
    ] {
        node.start(flags);
        let (jumps, rules) = node.count("iptables-nft");
        assert_eq!(jumps, 1, "{flags:?}");
        let want = if flags[0].contains(',') { 2 } else { 1 };
        assert_eq!(rules.len(), want, "{flags:?}: {rules:?}");
        // The container-credentials address: one jump and the same rules, once.
        let (jumps, rules) = node.count_container("iptables-nft");
        assert_eq!((jumps, rules.len()), (1, want), "{flags:?}: {rules:?}");
        assert!(node.jump_on_top("iptables-nft"));
        assert_eq!(seen(node.pod("cali1")), Seen::Iamlet(pod_role.clone()));
    }
    assert!(!node.save("iptables-legacy").contains("IAMLET"));

    // SIGTERM: fail-closed, the rule stays.
    let code = node.sigterm();
    assert_eq!(code, Some(0), "clean exit on SIGTERM");
    assert_eq!(node.count("iptables-nft").0, 1);
    assert_eq!(seen(node.pod("cali1")), Seen::Refused);

    // cleanup: nothing left in any backend or family; pods reach the node's service again.
    let out = node.cli_str(&["cleanup"]);
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains("removed chain IAMLET"),
        "{}",
        out.stdout
    );
    for tool in [
        "iptables-nft",
        "iptables-legacy",
        "ip6tables-nft",
        "ip6tables-legacy",
    ] {
        assert!(!node.save(tool).contains("IAMLET"), "{tool}");
    }
    assert_eq!(seen(node.pod("cali1")), Seen::NodeRole);
    let again = node.cli_str(&["cleanup"]);
    assert!(again.success(), "{again:?}");
    assert!(
        again.stdout.contains("nothing to remove"),
        "{}",
        again.stdout
    );
}

#[test]
fn remove_on_exit_takes_the_rule_away_on_sigterm() {
    require_netns!("remove_on_exit_takes_the_rule_away_on_sigterm");
    let mut node = Node::builder(&["cali1"]).build();
    node.start(&["--iptables-remove-on-exit"]);
    assert_eq!(node.count("iptables-nft").0, 1);
    assert_eq!(node.sigterm(), Some(0));
    assert_eq!(node.count("iptables-nft"), (0, vec![]));
    assert_eq!(seen(node.pod("cali1")), Seen::NodeRole);
}

#[test]
fn a_deleted_moved_or_emptied_rule_is_restored_within_the_verify_interval() {
    require_netns!("a_deleted_moved_or_emptied_rule_is_restored_within_the_verify_interval");
    let mut node = Node::builder(&["cali1"]).build();
    node.start(&[]);
    let want = Seen::Iamlet(role_of("cali1"));
    assert_eq!(seen(node.pod("cali1")), want);
    let tamper: &[&[&str]] = &[
        // The jump deleted by hand (kube2iam users' manual fix, applied to a running agent).
        &["-t", "nat", "-D", "PREROUTING", "1"],
        // Another rule inserted above it (kube2iam PR #21).
        &[
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "1",
            "-s",
            "10.99.0.0/16",
            "-j",
            "RETURN",
        ],
        // The chain emptied.
        &["-t", "nat", "-F", "IAMLET"],
    ];
    for (i, args) in tamper.iter().enumerate() {
        node.ns.exec_ok("iptables-nft", args);
        wait_until!(
            RESTORE_WITHIN,
            node.jump_on_top("iptables-nft")
                && node.count("iptables-nft").1.len() == 1
                && node.count_container("iptables-nft").1.len() == 1,
            "the rules restored after {args:?}:\n{}",
            node.save("iptables-nft")
        );
        assert_eq!(node.count("iptables-nft").0, 1);
        assert_eq!(node.count_container("iptables-nft").0, 1);
        assert_eq!(seen(node.pod("cali1")), want);
        let metrics = node.admin("/metrics").1;
        let line = format!(
            "iamlet_iptables_restores_total{{family=\"ipv4\"}} {}",
            i + 1
        );
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
        assert!(metrics.contains("iamlet_iptables_rule_present{family=\"ipv4\"} 1"));
    }
    assert!(
        node.iamlet()
            .wait_for_log("iptables redirect restored", Duration::ZERO)
    );
}

#[test]
fn wildcard_negation_and_several_interfaces_reach_the_right_pods_only() {
    require_netns!("wildcard_negation_and_several_interfaces_reach_the_right_pods_only");
    let ifaces = ["cali1", "cali2", "eni1", "weave"];
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("cali+", &["--host-interface=cali+"], &["cali1", "cali2"]),
        (
            "!eni1",
            &["--host-interface=!eni1"],
            &["cali1", "cali2", "weave"],
        ),
        (
            "cali1,weave",
            &["--host-interface=cali1,weave"],
            &["cali1", "weave"],
        ),
        (
            "cali2 eni1",
            &["--host-interface=cali2", "--host-interface=eni1"],
            &["cali2", "eni1"],
        ),
        (
            "auto",
            &["--host-interface=auto"],
            &["cali1", "cali2", "eni1", "weave"],
        ),
    ];
    for backend in ["nft", "legacy"] {
        let mut node = Node::builder(&ifaces).build();
        let tool = format!("iptables-{backend}");
        let chosen = format!("--iptables-backend={backend}");
        for (name, flags, redirected) in cases {
            let mut all = flags.to_vec();
            all.push(&chosen);
            node.start(&all);
            for iface in ifaces {
                let got = seen(node.pod(iface));
                let want = if redirected.contains(&iface) {
                    Seen::Iamlet(role_of(iface))
                } else {
                    Seen::NodeRole
                };
                assert_eq!(got, want, "{backend} {name}: pod on {iface}");
            }
            let (jumps, _) = node.count(&tool);
            assert_eq!(jumps, 1, "{backend} {name}");
        }
        // auto logged what it chose, one rule per detected convention.
        assert!(
            node.iamlet().wait_for_log("cali+ (Calico)", Duration::ZERO),
            "{}",
            node.iamlet().log()
        );
        assert_eq!(
            node.count(&tool).1.len(),
            3,
            "{backend}: cali+, eni+, weave"
        );
    }
}

#[test]
fn the_backend_the_node_uses_is_detected_and_cleanup_covers_both() {
    require_netns!("the_backend_the_node_uses_is_detected_and_cleanup_covers_both");
    // (seed rules: legacy count, nft count) → the backend iamlet must use.
    let cases: &[(usize, usize, &str, &[&str])] = &[
        (2, 1, "legacy", &[]),
        (1, 2, "nft", &[]),
        (0, 0, "legacy", &["--iptables-backend=legacy"]),
    ];
    for (legacy, nft, want, extra) in cases {
        let mut node = Node::builder(&["cali1"]).build();
        for (tool, n) in [("iptables-legacy", *legacy), ("iptables-nft", *nft)] {
            for i in 0..n {
                node.ns.exec_ok(
                    tool,
                    &[
                        "-t",
                        "filter",
                        "-A",
                        "INPUT",
                        "-s",
                        &format!("192.0.2.{i}/32"),
                        "-j",
                        "DROP",
                    ],
                );
            }
        }
        node.start(extra);
        assert!(
            node.iamlet()
                .wait_for_log(&format!("backend={want}"), Duration::ZERO),
            "{}",
            node.iamlet().log()
        );
        let other = if *want == "nft" { "legacy" } else { "nft" };
        assert_eq!(node.count(&format!("iptables-{want}")).0, 1, "{want}");
        assert_eq!(
            node.count(&format!("iptables-{other}")),
            (0, vec![]),
            "{other}"
        );
        assert_eq!(
            seen(node.pod("cali1")),
            Seen::Iamlet(role_of("cali1")),
            "{want}"
        );
        node.iamlet().kill_9();
        let out = node.cli_str(&["cleanup"]);
        assert!(
            out.success() && out.stdout.contains(&format!("(ipv4, {want})")),
            "{out:?}"
        );
        assert_eq!(node.count(&format!("iptables-{want}")), (0, vec![]));
        assert_eq!(seen(node.pod("cali1")), Seen::NodeRole);
    }
}

/// What kube2iam installs (and leaves behind): `-A PREROUTING -d 169.254.169.254/32 -i IFACE
/// -p tcp -m tcp --dport 80 -j DNAT --to-destination HOST:PORT`.
fn add_kube2iam_rule(node: &Node, tool: &str, iface: &str) {
    node.ns.exec_ok(
        tool,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "169.254.169.254/32",
            "-i",
            iface,
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{HOST_IP}:{APP_PORT}"),
        ],
    );
}

#[test]
fn cleanup_kube2iam_removes_the_rules_kube2iam_left_behind() {
    require_netns!("cleanup_kube2iam_removes_the_rules_kube2iam_left_behind");
    let node = Node::builder(&["cali1", "weave"]).build();
    // What an uninstalled kube2iam leaves: every metadata request from its pods fails.
    for (tool, iface) in [("iptables-legacy", "cali1"), ("iptables-nft", "weave")] {
        add_kube2iam_rule(&node, tool, iface);
    }
    assert_eq!(seen(node.pod("cali1")), Seen::Refused);
    assert_eq!(seen(node.pod("weave")), Seen::Refused);

    let report = node.cli_str(&["cleanup"]);
    assert!(report.success(), "{report:?}");
    assert!(
        report.stdout.contains("found 1 kube2iam DNAT rule(s)")
            && report.stdout.contains("iamlet cleanup --kube2iam"),
        "{}",
        report.stdout
    );
    assert_eq!(
        seen(node.pod("cali1")),
        Seen::Refused,
        "reported, not removed"
    );

    let out = node.cli_str(&["cleanup", "--kube2iam"]);
    assert!(out.success(), "{out:?}");
    assert_eq!(
        out.stdout.matches("1 kube2iam DNAT rule(s)").count(),
        2,
        "{}",
        out.stdout
    );
    for tool in ["iptables-legacy", "iptables-nft"] {
        assert!(!node.save(tool).contains("169.254.169.254"), "{tool}");
    }
    assert_eq!(seen(node.pod("cali1")), Seen::NodeRole);
    assert_eq!(seen(node.pod("weave")), Seen::NodeRole);
    let again = node.cli_str(&["cleanup", "--kube2iam"]);
    assert!(
        again.success() && again.stdout.contains("nothing to remove"),
        "{again:?}"
    );
}

#[test]
fn cleanup_kube2iam_only_keeps_iamlets_rule_while_it_serves() {
    require_netns!("cleanup_kube2iam_only_keeps_iamlets_rule_while_it_serves");
    let mut node = Node::builder(&["cali1"]).build();
    node.start(&["--host-interface=cali1"]);
    // kube2iam's leftover, appended behind iamlet's jump.
    add_kube2iam_rule(&node, "iptables", "cali1");
    let before = seen(node.pod("cali1"));
    assert!(matches!(before, Seen::Iamlet(_)), "{before:?}");
    let out = node.cli_str(&["cleanup", "--kube2iam-only"]);
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains("removed 1 kube2iam DNAT rule(s)")
            && out.stdout.contains("iamlet's rules untouched"),
        "{}",
        out.stdout
    );
    let (jumps, _) = node.count("iptables");
    assert!(
        jumps > 0 && node.jump_on_top("iptables"),
        "iamlet's rule must stay: {}",
        node.save("iptables")
    );
    assert_eq!(
        seen(node.pod("cali1")),
        before,
        "the pod keeps getting its role from iamlet"
    );
    let again = node.cli_str(&["cleanup", "--kube2iam-only"]);
    assert!(
        again.success() && again.stdout.contains("nothing to remove"),
        "{again:?}"
    );
}

#[test]
fn startup_errors_are_one_sentence_with_the_fix() {
    require_netns!("startup_errors_are_one_sentence_with_the_fix");
    let node = Node::builder(&["cali1"]).build();
    let pods = iamlet_e2e::util::TempDir::new("node-pods");
    let pods_file = pods.path().join("pods.yaml");
    std::fs::write(&pods_file, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    let pods_flag = format!("--pods-from={}", pods_file.display());

    // The wrong --host-interface for the CNI (kube2iam's `route ip+net: no such network
    // interface`).
    let out = node.cli_str(&[
        "--iptables",
        &format!("--host-ip={HOST_IP}"),
        "--host-interface=weave",
        &pods_flag,
    ]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(
        one_line_error(&out),
        "--host-interface \"weave\" does not exist on this node (interfaces here: cali1, lo; cali* suggests Calico: --host-interface=cali+); use the pods' interface or --host-interface=auto."
    );
    assert!(
        !node.save("iptables-nft").contains("IAMLET"),
        "no rule on failure"
    );

    // --iptables without --host-ip.
    let out = node.cli_str(&["--iptables", "--host-interface=cali+", &pods_flag]);
    assert_eq!(out.code, Some(64), "{out:?}");
    assert!(
        one_line_error(&out).starts_with("--iptables needs --host-ip"),
        "{out:?}"
    );

    // Port in use: the sentence names the port, the holder and the flags.
    let held = node
        .ns
        .run(|| TcpListener::bind(("0.0.0.0", APP_PORT)).unwrap());
    let me = std::process::id();
    for (args, port, flag) in [
        (
            vec![format!("--app-port={APP_PORT}")],
            APP_PORT,
            "--app-port",
        ),
        (
            vec![
                "--app-port=8182".into(),
                format!("--metrics-port={APP_PORT}"),
            ],
            APP_PORT,
            "--metrics-port",
        ),
    ] {
        let mut all = args.clone();
        all.push(pods_flag.clone());
        let out = node.cli(&all, &[]);
        assert_eq!(out.code, Some(1), "{out:?}");
        let line = one_line_error(&out);
        assert!(
            line.starts_with(&format!("port {port} ({flag}) is already in use on this node (held by "))
                && line.contains(&format!("(pid {me})"))
                && line.ends_with("free it or choose other ports with --app-port and --metrics-port (and the DaemonSet's hostPort), e.g. --app-port=8182 --metrics-port=8183"),
            "{line}"
        );
    }
    drop(held);
}

#[test]
fn doctor_reports_a_healthy_node_and_a_broken_one() {
    require_netns!("doctor_reports_a_healthy_node_and_a_broken_one");
    let mut node = Node::builder(&["cali1"]).moto().build();
    node.start(&[]);
    assert_eq!(seen(node.pod("cali1")), Seen::Iamlet(role_of("cali1")));
    let sts = node.sts_endpoint();
    let env = [("AWS_ENDPOINT_URL_STS", sts.as_str())];
    let pods_file = node
        .iamlet
        .as_ref()
        .unwrap()
        .pods_file_path()
        .display()
        .to_string();
    let mut flags = node.flags(&[]);
    flags.push(format!("--pods-from={pods_file}"));
    let mut args = flags.clone();
    args.extend(["doctor".into(), "--test-role=doctor-role".into()]);
    let out = node.cli(&args, &env);
    assert_eq!(out.code, Some(0), "{out:?}");
    let want_ok = [
        "OK flags: valid",
        "OK interfaces: cali+ matches cali1 (",
        "OK iptables: ipv4 redirect in place (nft backend",
        &format!(
            "OK port: port {APP_PORT} (--app-port) is served by iamlet (pid {})",
            node.iamlet().pid()
        ),
        "OK imds: 169.254.169.254:80 answers (instance i-",
        "OK region: AWS_REGION=us-east-1",
        "OK sts: AssumeRole of arn:aws:iam::123456789012:role/doctor-role works",
        "OK kubernetes: pods come from",
    ];
    for w in want_ok {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(w)),
            "{w:?} not in:\n{}",
            out.stdout
        );
    }
    for l in out.stdout.lines() {
        assert!(
            ["OK ", "WARN ", "FAIL "].iter().any(|p| l.starts_with(p)) || l.starts_with("doctor:"),
            "not a verdict line: {l}"
        );
    }

    // `kubectl exec ... iamlet doctor` with no flags adopts the running agent's.
    let out = node.cli(&["doctor".into(), "--test-role=doctor-role".into()], &env);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "using those of the running iamlet (pid {})",
            node.iamlet().pid()
        )),
        "{}",
        out.stdout
    );

    // The agent gone (kill -9) with its rule left: pods are refused, and doctor says why.
    node.iamlet().kill_9();
    let out = node.cli(&args, &env);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.lines().any(|l| l.starts_with(&format!("FAIL port: nothing listens on port {APP_PORT} (--app-port) but the iptables rule sends pods there"))),
        "{}",
        out.stdout
    );

    // A broken node: wrong interface, kube2iam leftovers, the port taken, no IMDS.
    let broken = Node::builder(&["cali1"]).no_imds().build();
    broken.ns.exec_ok(
        "iptables-legacy",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "169.254.169.254/32",
            "-i",
            "docker0",
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "10.254.0.1:8181",
        ],
    );
    let held = broken
        .ns
        .run(|| TcpListener::bind(("0.0.0.0", APP_PORT)).unwrap());
    let mut args = vec![
        "--iptables".to_string(),
        format!("--host-ip={HOST_IP}"),
        "--host-interface=weave".into(),
        format!("--pods-from={pods_file}"),
        "doctor".into(),
    ];
    let out = broken.cli(&args, &env);
    assert_eq!(out.code, Some(1), "{out:?}");
    let want = [
        "FAIL interfaces: --host-interface \"weave\" does not exist on this node",
        "WARN kube2iam: 1 kube2iam DNAT rule(s) to the metadata address left in nat PREROUTING (ipv4, legacy)",
        &format!(
            "FAIL port: port {APP_PORT} (--app-port) is already in use on this node (held by "
        ),
        "FAIL imds: cannot reach the metadata service at --metadata-addr 169.254.169.254:80",
        "WARN sts: AssumeRole not tried",
    ];
    for w in want {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(w)),
            "{w:?} not in:\n{}",
            out.stdout
        );
    }
    // The same with the right interface: the rule is reported missing.
    args[2] = "--host-interface=cali+".into();
    let out = broken.cli(&args, &env);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("FAIL iptables: ipv4 redirect (legacy backend) is not as wanted: the IAMLET chain is missing")),
        "{}",
        out.stdout
    );
    drop(held);
}

#[test]
fn connections_opened_before_the_rule_are_cut_by_the_conntrack_flush() {
    require_netns!("connections_opened_before_the_rule_are_cut_by_the_conntrack_flush");
    let mut node = Node::builder(&["cali1"]).build();
    // Conntrack is on in a real node (kube-proxy's service DNATs); turn it on here the same
    // way, so the pod's connection gets a conntrack entry before any metadata rule exists.
    node.ns.exec_ok(
        "iptables-nft",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.96.0.10/32",
            "-p",
            "tcp",
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "10.254.0.1:53",
        ],
    );
    let pod = node.pod("cali1");
    let mut conn = pod
        .ns
        .run(|| TcpStream::connect_timeout(&metadata(), Duration::from_secs(5)))
        .expect("connect to the node's metadata service");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ask = |c: &mut TcpStream| -> std::io::Result<String> {
        write!(
            c,
            "GET {CREDS_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
        )?;
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    assert!(ask(&mut conn).unwrap().ends_with(NODE_ROLE));

    // A DNAT rule alone does not stop an established connection (the conntrack entry
    // predates it): this is the bypass the flush closes.
    node.ns.exec_ok(
        "iptables-nft",
        &[
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "1",
            "-d",
            "169.254.169.254/32",
            "-i",
            "cali1",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{HOST_IP}:{APP_PORT}"),
        ],
    );
    assert!(
        ask(&mut conn).unwrap().ends_with(NODE_ROLE),
        "established connection bypasses the rule"
    );

    node.start(&[]);
    let after = ask(&mut conn);
    assert!(
        after.as_ref().map_or(true, |r| !r.contains(NODE_ROLE)),
        "after iamlet installed its rule the old connection still reached the node's role: {after:?}"
    );
    assert_eq!(seen(node.pod("cali1")), Seen::Iamlet(role_of("cali1")));
}

#[test]
fn ipv6_metadata_address_is_redirected_with_ip6tables() {
    require_netns!("ipv6_metadata_address_is_redirected_with_ip6tables");
    let mut node = Node::builder(&["cali1"]).build();
    // REDIRECT (no --host-ipv6), then DNAT to --host-ipv6.
    add_local_address(&node.ns, "fd00:254::1/128");
    for extra in [&["--ipv6"][..], &["--ipv6", "--host-ipv6=fd00:254::1"]] {
        node.start(extra);
        let (jumps, rules) = node.count("ip6tables-nft");
        assert_eq!((jumps, rules.len()), (1, 1), "{extra:?}");
        let want_target = if extra.len() == 1 {
            format!("-j REDIRECT --to-ports {APP_PORT}")
        } else {
            format!("-j DNAT --to-destination [fd00:254::1]:{APP_PORT}")
        };
        assert!(
            rules[0].contains("-d fd00:ec2::254/128 -i cali+") && rules[0].ends_with(&want_target),
            "{rules:?}"
        );
        assert_eq!(
            seen_at(node.pod("cali1"), metadata_v6()),
            Seen::Iamlet(role_of("cali1")),
            "{extra:?}"
        );
        assert_eq!(seen(node.pod("cali1")), Seen::Iamlet(role_of("cali1")));
    }
    node.iamlet().kill_9();
    assert_eq!(seen_at(node.pod("cali1"), metadata_v6()), Seen::Refused);
    let out = node.cli_str(&["cleanup"]);
    assert!(out.stdout.contains("(ipv6, nft)"), "{out:?}");
    assert!(!node.save("ip6tables-nft").contains("IAMLET"));
}

#[test]
fn fault_injection_an_api_server_that_refuses_the_agent_at_boot_never_opens_the_nodes_role() {
    require_netns!("node");
    use iamlet_e2e::apiserver::{ApiServer, PodBuilder};
    let node = Node::builder(&["cali1"]).moto().build();
    let pod = node.pod("cali1");
    // The stand-in API server lives in the node namespace (the agent there cannot reach a
    // real one on the host's loopback); it refuses the agent (RBAC not applied yet) for exactly
    // a minute, then serves. The real server's refusal of a missing verb is in
    // control_plane_rbac.rs.
    let api = node.ns.own(node.ns.run(ApiServer::start));
    api.refuse(Some(403));
    api.create_pod(
        &PodBuilder::running("shop", &pod.name, "node-a", &pod.ip.to_string())
            .role(&role_of("cali1")),
    );
    let mut b = Iamlet::builder()
        .unsynced()
        .env("AWS_ENDPOINT_URL_STS", node.sts_endpoint())
        .arg(format!("--api-server={}", api.url()))
        .arg("--node=node-a");
    for a in node.flags(&[]) {
        b = b.arg(a);
    }
    let iamlet = node.ns.own(node.ns.run(move || b.start()));
    assert!(
        iamlet.wait_for_log("not ready until the first pod list", Duration::from_secs(5)),
        "{}",
        iamlet.log()
    );
    // The rule is in before the first sync.
    assert!(
        node.jump_on_top("iptables-nft"),
        "{}",
        node.save("iptables-nft")
    );
    let refused_for = Duration::from_secs(60);
    let start = Instant::now();
    let mut asked = 0;
    while start.elapsed() < refused_for {
        let s = seen(pod);
        assert_ne!(
            s,
            Seen::NodeRole,
            "the pod reached the node's role after {:?}",
            start.elapsed()
        );
        assert!(
            matches!(&s, Seen::Other(a) if a.starts_with("404 ")),
            "while unsynced, a pod gets 404: {s:?}"
        );
        assert_eq!(
            node.admin("/ready").0,
            503,
            "/ready while the API server refuses"
        );
        asked += 1;
        // Each ask waits --backoff-max-elapsed-time (300 ms) for the pod that never comes.
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        node.imds_requests_from(pod),
        0,
        "a request of the pod reached the metadata service"
    );
    assert!(
        iamlet.log().contains("403"),
        "the refusal is logged:\n{}",
        iamlet.log()
    );
    // doctor says why the agent is not ready.
    let mut args = node.flags(&[]);
    args.extend([
        format!("--api-server={}", api.url()),
        "--node=node-a".into(),
        "doctor".into(),
    ]);
    let sts = node.sts_endpoint();
    let out = node.cli(&args, &[("AWS_ENDPOINT_URL_STS", sts.as_str())]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("FAIL kubernetes:") && l.contains("RBAC denies")),
        "{}",
        out.stdout
    );
    // The API server relents: the pod gets its own role (the watcher retries with backoff).
    api.refuse(None);
    wait_until!(
        Duration::from_secs(60),
        seen(pod) == Seen::Iamlet(role_of("cali1")),
        "the pod's own role once the API server answers; log:\n{}",
        iamlet.log()
    );
    assert_eq!(node.admin("/ready").0, 200);
    println!("{asked} requests during {refused_for:?} of refusals: none reached the node's role");
}

#[test]
fn unmodified_sdks_in_a_pod_get_its_role_through_the_container_credentials_address() {
    require_netns!(
        "unmodified_sdks_in_a_pod_get_its_role_through_the_container_credentials_address"
    );
    use iamlet_e2e::apiserver::PodBuilder;
    use iamlet_e2e::realapi::RealApiServer;
    let mut node = Node::builder(&["cali1"]).no_imds().build();
    // STS on every address of the node, so that SDKs in the pod reach it too.
    node.moto = Some(node.ns.run(|| Moto::start_on("0.0.0.0")));
    let (pod_name, pod_ip, pod_node_ip) = {
        let p = node.pod("cali1");
        (p.name.clone(), p.ip, p.node_ip)
    };
    // The pod as an object of the real API server (which issues its token, bound to it),
    // with the netns pod's address; the agent in the node namespace reads the server's own
    // objects and published keys from files (it cannot reach the server on the host's
    // loopback).
    let api = RealApiServer::shared();
    let scope = api.scope("sdk-container");
    let ns = scope.ns("shop");
    scope.set_namespace(&ns, &[]);
    scope.ensure_service_account(&ns, "cali1-sa");
    scope.create_pod(
        &PodBuilder::running(&ns, &pod_name, &scope.node, &pod_ip.to_string())
            .role(&role_of("cali1"))
            .service_account("cali1-sa"),
    );
    node.pods_yaml = scope.objects_list_json(&ns);
    let dir = std::env::temp_dir().join(format!("iamlet-sdk-door-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, api.jwks()).unwrap();
    let token_file = dir.join("token");
    std::fs::write(
        &token_file,
        scope.pod_token(&ns, "cali1-sa", &pod_name, "pods.eks.amazonaws.com", 3600),
    )
    .unwrap();
    let jwks_flag = format!("--token-jwks-file={}", jwks.display());
    let issuer_flag = format!("--token-issuer={}", api.issuer);
    let node_flag = format!("--node={}", scope.node);
    node.start(&[&jwks_flag, &issuer_flag, &node_flag]);
    let (jumps, rules) = node.count_container("iptables-nft");
    assert_eq!((jumps, rules.len()), (1, 1), "{rules:?}");

    let sts = node
        .moto
        .as_ref()
        .unwrap()
        .endpoint()
        .replace("127.0.0.1", &pod_node_ip.to_string());
    let token_path = token_file.display().to_string();
    // Exactly the two variables a pod gets, plus a region and where STS is; no IMDS at all.
    let env: Vec<(&str, String)> = vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://169.254.170.23/v1/credentials".into(),
        ),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_path),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/nonexistent".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
        ("AWS_ENDPOINT_URL_STS", sts),
    ];
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let want = format!(
        "arn:aws:sts::123456789012:assumed-role/{}/",
        role_of("cali1")
    );
    let pod = node.pod("cali1");
    let run = |mut cmd: Command| -> Output {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::temp_dir());
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        pod.ns
            .run(move || run_bounded(cmd, Duration::from_secs(90)))
    };
    let mut arns: Vec<(&str, String)> = Vec::new();

    // boto3: the container provider, then STS from inside the pod.
    let script = r#"
import json, boto3
s = boto3.session.Session()
c = s.get_credentials()
assert c.method == "container-role", c.method
print(s.client("sts").get_caller_identity()["Arn"])
"#;
    let out = pod.ns.run(|| run_python(script, &env_ref, true));
    assert!(
        out.success(),
        "boto3: {out:?}\n{}",
        node.iamlet.as_ref().unwrap().log()
    );
    arns.push(("boto3", out.stdout.trim().to_owned()));
    // The AWS CLI.
    let out = run(iamlet_e2e::python::aws_caller_arn());
    assert!(out.success(), "aws cli: {out:?}");
    arns.push(("aws cli", out.stdout.trim().to_owned()));
    // aws-sdk-js v3, its default chain.
    let js = iamlet_e2e::workspace_root().join("tests/js");
    assert!(
        js.join("node_modules/@aws-sdk/client-sts").is_dir() || !iamlet_e2e::is_ci(),
        "tests/js/node_modules is missing in CI"
    );
    if js.join("node_modules/@aws-sdk/client-sts").is_dir() {
        let mut node_js = Command::new("node");
        node_js.arg("default-chain.mjs").current_dir(&js);
        let out = run(node_js);
        assert!(out.success(), "aws-sdk-js v3: {out:?}");
        arns.push(("aws-sdk-js v3", out.stdout.trim().to_owned()));
    } else {
        eprintln!("SKIPPED aws-sdk-js v3: run tests/install-python-tools.sh");
    }
    // aws-sdk-go-v2, built from the Go module proxy.
    let go = Command::new(iamlet_e2e::workspace_root().join("tests/sdk-go/build.sh"))
        .output()
        .expect("tests/sdk-go/build.sh");
    assert!(
        go.status.success(),
        "{}",
        String::from_utf8_lossy(&go.stderr)
    );
    let out = run(Command::new(String::from_utf8_lossy(&go.stdout).trim()));
    assert!(out.success(), "aws-sdk-go-v2: {out:?}");
    arns.push(("aws-sdk-go-v2", out.stdout.trim().to_owned()));
    // aws-sdk-rust, its default chain, in a process of its own.
    let out = run(Command::new(env!("CARGO_BIN_EXE_rust_sdk_caller")));
    assert!(out.success(), "aws-sdk-rust: {out:?}");
    arns.push(("aws-sdk-rust", out.stdout.trim().to_owned()));

    for (who, arn) in &arns {
        assert!(arn.starts_with(&want), "{who} got {arn:?}, wanted {want}…");
    }
    println!("{arns:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
