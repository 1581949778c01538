//! `iamlet doctor`: the node checks, one line each —
//! `OK|WARN|FAIL <check>: <what was found / what to do>` — exit 1 on any FAIL. Run with the
//! agent's flags; inside the agent's container (`kubectl exec ds/iamlet -- iamlet doctor`)
//! it adopts the running agent's flags when none are given.

use super::backend;
use super::cleanup;
use super::iface;
use super::port;
use super::redirect;
use super::rules::{self, IfaceMatch};
use crate::args::{Args, DoctorArgs};
use crate::config::{self, Config};
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    pub name: &'static str,
    pub text: String,
}

impl Check {
    fn ok(name: &'static str, text: impl Into<String>) -> Check {
        Check {
            level: Level::Ok,
            name,
            text: text.into(),
        }
    }
    fn warn(name: &'static str, text: impl Into<String>) -> Check {
        Check {
            level: Level::Warn,
            name,
            text: text.into(),
        }
    }
    fn fail(name: &'static str, text: impl Into<String>) -> Check {
        Check {
            level: Level::Fail,
            name,
            text: text.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = match self.level {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        // One line, whatever a tool printed.
        let text = self.text.replace('\n', " ");
        write!(f, "{l} {}: {text}", self.name)
    }
}

/// Runs every check, printing each line as it completes; returns the exit code.
pub fn run(args: &Args, d: &DoctorArgs) -> i32 {
    let args = match adopt_agent_flags() {
        Some((pid, agent)) => {
            println!("doctor: no flags given; using those of the running iamlet (pid {pid})");
            agent
        }
        None => args.clone(),
    };
    let mut worst = Level::Ok;
    let mut emit = |c: Check| {
        println!("{c}");
        worst = worst.max(c.level);
    };
    let config = match Config::validate(args.clone()) {
        Ok(c) => {
            emit(Check::ok("flags", "valid"));
            Some(c)
        }
        Err(e) => {
            emit(Check::fail("flags", e.0));
            None
        }
    };
    let ifaces = check_interfaces(&args, &mut emit);
    check_iptables(&args, config.as_ref(), ifaces.as_deref(), &mut emit);
    check_ports(&args, config.as_ref(), &mut emit);
    let hostport = config::metadata_hostport(&args.node.metadata_addr).ok();
    let imds = hostport.as_deref().map(check_imds);
    if let Some((c, _)) = &imds {
        emit(c.clone());
    }
    let region_from_imds = imds.and_then(|(_, r)| r);
    emit(check_region(
        |k| std::env::var(k).ok(),
        region_from_imds.as_deref(),
    ));
    emit(check_sts(&args, d, hostport.as_deref()));
    emit(check_kubernetes(&args));
    i32::from(worst == Level::Fail)
}

/// `iamlet doctor` with no flags, inside the agent's container or on its node: the flags of
/// the iamlet agent running in this network namespace.
fn adopt_agent_flags() -> Option<(u32, Args)> {
    use clap::Parser;
    let argv: Vec<String> = std::env::args().collect();
    let sub = argv.iter().position(|a| a == "doctor")?;
    if sub != 1 || std::env::vars().any(|(k, _)| k.starts_with("IAMLET_")) {
        return None;
    }
    let me = std::process::id();
    let my_net = std::fs::read_link("/proc/self/ns/net").ok()?;
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || std::fs::read_link(p.path().join("ns/net")).ok().as_ref() != Some(&my_net) {
            continue;
        }
        let Ok(raw) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let words: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        let is_iamlet = words
            .first()
            .is_some_and(|w| w.rsplit('/').next() == Some("iamlet"));
        if !is_iamlet || words.iter().any(|w| w == "doctor" || w == "cleanup") {
            continue;
        }
        if let Ok(a) = Args::try_parse_from(&words) {
            return Some((pid, a));
        }
    }
    None
}

/// Interfaces: the values resolve, and the matched ones have received packets.
fn check_interfaces(args: &Args, emit: &mut impl FnMut(Check)) -> Option<Vec<IfaceMatch>> {
    const N: &str = "interfaces";
    let existing = match iface::existing() {
        Ok(e) => e,
        Err(e) => {
            emit(Check::fail(
                N,
                format!("cannot list network interfaces: {e}"),
            ));
            return None;
        }
    };
    if !args.node.iptables {
        emit(Check::ok(
            N,
            format!(
                "--host-interface is only used with --iptables ({})",
                hint(&existing)
            ),
        ));
        return None;
    }
    let (matches, auto) = match iface::resolve(&args.node.host_interface, &existing) {
        Ok(r) => r,
        Err(sentence) => {
            emit(Check::fail(N, sentence));
            return None;
        }
    };
    let rx = iface::rx_packets();
    let mut parts = Vec::new();
    let mut idle = Vec::new();
    for m in &matches {
        let hit: Vec<&String> = existing.iter().filter(|e| m.matches(e)).collect();
        if hit.is_empty() {
            emit(Check::warn(
                N,
                format!(
                    "--host-interface {m} matches no interface yet (no pods on this node yet, or not this CNI's prefix; {})",
                    hint(&existing)
                ),
            ));
            continue;
        }
        let packets: u64 = rx
            .iter()
            .filter(|(n, _)| m.matches(n))
            .map(|(_, p)| p)
            .sum();
        if packets == 0 {
            idle.push(m.to_string());
        }
        let shown: Vec<&str> = hit.iter().take(4).map(|s| s.as_str()).collect();
        let more = if hit.len() > 4 {
            format!(" and {} more", hit.len() - 4)
        } else {
            String::new()
        };
        parts.push(format!(
            "{m} matches {}{more} ({packets} packets received)",
            shown.join(", ")
        ));
    }
    let chose = if auto.is_empty() {
        String::new()
    } else {
        format!("auto chose {}; ", auto.join(", "))
    };
    if !idle.is_empty() {
        emit(Check::warn(
            N,
            format!(
                "{chose}{} received no packets yet: is that the pods' interface? ({})",
                idle.join(", "),
                hint(&existing)
            ),
        ));
    } else if !parts.is_empty() {
        emit(Check::ok(N, format!("{chose}{}", parts.join("; "))));
    }
    Some(matches)
}

fn hint(existing: &[String]) -> String {
    let h = iface::hints(existing);
    if h.is_empty() {
        "no known CNI's pod interfaces here".into()
    } else {
        h.iter()
            .map(|c| format!("{} suggests --host-interface={}", c.name, c.value))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The redirect: backend, rule present and pointing here, leftovers.
fn check_iptables(
    args: &Args,
    config: Option<&Config>,
    ifaces: Option<&[IfaceMatch]>,
    emit: &mut impl FnMut(Check),
) {
    const N: &str = "iptables";
    let inventory = cleanup::inventory();
    if inventory.is_empty() {
        let c = if args.node.iptables {
            Check::fail(
                N,
                "no iptables tools found (iptables, iptables-save, iptables-restore); --iptables needs them in the agent's image",
            )
        } else {
            Check::warn(
                N,
                "no iptables tools found: cannot see how pods' metadata traffic is routed",
            )
        };
        emit(c);
        return;
    }
    // kube2iam's leftovers, in any backend.
    let addrs = config.map_or_else(
        || vec![IpAddr::V4(super::METADATA_V4)],
        |c| cleanup::kube2iam_addrs(&c.metadata_hostport),
    );
    for (b, f, view) in &inventory {
        let n = rules::kube2iam_rules(view, &addrs).len();
        if n > 0 {
            emit(Check::warn(
                "kube2iam",
                format!(
                    "{n} kube2iam DNAT rule(s) to the metadata address left in nat PREROUTING ({f}, {b}); they send pods to an agent that may be gone; remove them with `iamlet cleanup --kube2iam-only` (keeps iamlet's rule)"
                ),
            ));
        }
    }
    let holders: Vec<String> = inventory
        .iter()
        .filter(|(_, _, v)| v.has_iamlet())
        .map(|(b, f, _)| format!("{f} {b}"))
        .collect();
    if !args.node.iptables {
        if holders.is_empty() {
            emit(Check::ok(
                N,
                "--iptables is off and nothing of iamlet's is in the nat table; pods must reach iamlet by other means",
            ));
        } else {
            emit(Check::warn(
                N,
                format!(
                    "--iptables is off but an IAMLET chain exists ({}); if iamlet no longer manages this node, remove it with `iamlet cleanup`",
                    holders.join(", ")
                ),
            ));
        }
        return;
    }
    let (b, why) = match backend::detect(args.node.iptables_backend) {
        Ok(r) => r,
        Err(e) => {
            emit(Check::fail(N, e));
            return;
        }
    };
    let mixed: Vec<&String> = holders.iter().filter(|h| !h.ends_with(b.name())).collect();
    if !mixed.is_empty() {
        emit(Check::warn(
            N,
            format!(
                "iamlet's chain also exists in another backend ({}) than the one in use ({b}); run `iamlet cleanup` and restart iamlet",
                mixed
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let (Some(config), Some(ifaces)) = (config, ifaces) else {
        emit(Check::warn(
            N,
            format!(
                "backend {b} ({why}); the rule cannot be checked until the flags and interfaces above are fixed"
            ),
        ));
        return;
    };
    let Some(host_ip) = config.host_ip else {
        return;
    };
    let desired = match redirect::desired(&args.node, host_ip, ifaces.to_vec()) {
        Ok(d) => d,
        Err(e) => {
            emit(Check::fail(N, e));
            return;
        }
    };
    for d in desired {
        let view = inventory
            .iter()
            .find(|(ib, f, _)| *ib == b && *f == d.family)
            .map(|(_, _, v)| v.clone());
        let Some(view) = view else {
            emit(Check::fail(
                N,
                format!(
                    "cannot read the {} nat table with the {b} backend",
                    d.family
                ),
            ));
            continue;
        };
        let problems = d.check(&view);
        let to = match d.to {
            rules::To::Dnat(a) => a.to_string(),
            rules::To::Redirect(p) => format!("port {p} (REDIRECT)"),
        };
        if problems.is_empty() {
            emit(Check::ok(
                N,
                format!(
                    "{} redirect in place ({b} backend, {why}): {} jumped to from the top of nat PREROUTING, {} rule(s) sending {}:80 to {to}",
                    d.family,
                    rules::CHAIN,
                    d.ifaces.len(),
                    d.metadata
                ),
            ));
        } else {
            let fix = if view.has_iamlet() {
                "the running iamlet restores its own rule within --iptables-verify-interval; if it persists, check that the agent's --host-ip, --app-port and --host-interface match these flags"
            } else {
                "start iamlet with --iptables (it installs the rule after binding its port)"
            };
            emit(Check::fail(
                N,
                format!(
                    "{} redirect ({b} backend) is not as wanted: {}; {fix}",
                    d.family,
                    rules::describe(&problems)
                ),
            ));
        }
    }
}

/// The app and metrics ports: free, or held by iamlet.
fn check_ports(args: &Args, config: Option<&Config>, emit: &mut impl FnMut(Check)) {
    const N: &str = "port";
    let metrics = config.map_or(args.node.app_port, |c| c.metrics_port);
    let mut ports = vec![(args.node.app_port, "--app-port")];
    if metrics != args.node.app_port {
        ports.push((metrics, "--metrics-port"));
    }
    let redirected = args.node.iptables
        && cleanup::inventory()
            .iter()
            .any(|(_, _, v)| v.chain_rules(rules::CHAIN).next().is_some());
    for (p, flag) in ports {
        if p == 0 {
            continue;
        }
        let inodes = port::listeners(p);
        if inodes.is_empty() {
            if redirected && flag == "--app-port" {
                emit(Check::fail(
                    N,
                    format!(
                        "nothing listens on port {p} ({flag}) but the iptables rule sends pods there, so their metadata requests are refused (fail-closed); start iamlet, or run `iamlet cleanup` to let pods reach the node's metadata service"
                    ),
                ));
            } else {
                emit(Check::ok(N, format!("port {p} ({flag}) is free")));
            }
            continue;
        }
        let holders = port::holders(&inodes);
        if holders.is_empty() {
            emit(Check::warn(
                N,
                format!(
                    "port {p} ({flag}) is in use by a process not visible from here (another container?); if it is not iamlet: {}",
                    port::in_use_sentence(p, flag, &[])
                ),
            ));
        } else if holders.iter().all(|h| h.name == "iamlet") {
            let who: Vec<String> = holders.iter().map(ToString::to_string).collect();
            emit(Check::ok(
                N,
                format!("port {p} ({flag}) is served by {}", who.join(", ")),
            ));
        } else {
            emit(Check::fail(N, port::in_use_sentence(p, flag, &holders)));
        }
    }
}

/// A plain HTTP/1.1 exchange: (status, body).
fn http(addr: SocketAddr, req: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer")
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// The upstream metadata service: reachable, tokens, IMDSv2 required; and its region.
fn check_imds(hostport: &str) -> (Check, Option<String>) {
    const N: &str = "imds";
    let addr = match config::resolve_metadata(hostport) {
        Ok(a) => a,
        Err(e) => return (Check::fail(N, e.0), None),
    };
    let put = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: {hostport}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let token = match http(addr, &put) {
        Ok((200, t)) => Ok(t.trim().to_owned()),
        Ok((code, _)) => Err(format!("the token PUT got {code}")),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            Err("the token PUT timed out (the instance's http-put-response-hop-limit is too low for where this runs; iamlet needs hostNetwork: true)".into())
        }
        Err(e) => {
            return (
                Check::fail(N, format!("cannot reach the metadata service at --metadata-addr {hostport}: {e}; check the instance's metadata options (http-endpoint=enabled) and that iamlet runs with hostNetwork: true")),
                None,
            );
        }
    };
    let get = |path: &str, tok: Option<&str>| {
        let auth = tok
            .map(|t| format!("X-aws-ec2-metadata-token: {t}\r\n"))
            .unwrap_or_default();
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}Connection: close\r\n\r\n"),
        )
    };
    let v1 = get("/latest/meta-data/instance-id", None);
    let tok = token.as_ref().ok().map(String::as_str);
    let id = get("/latest/meta-data/instance-id", tok);
    let region = get("/latest/meta-data/placement/region", tok)
        .ok()
        .filter(|(c, _)| *c == 200)
        .map(|(_, b)| b.trim().to_owned());
    let check = match (&token, &v1, &id) {
        (Ok(_), Ok((401, _)), Ok((200, id))) => Check::ok(
            N,
            format!(
                "{hostport} answers (instance {}); IMDSv2 is required, iamlet adds its own token upstream, so tokenless pods keep working and pods need no hop-limit change",
                id.trim()
            ),
        ),
        (Ok(_), _, Ok((200, id))) => Check::ok(
            N,
            format!(
                "{hostport} answers (instance {}); session tokens supported, IMDSv1 allowed",
                id.trim()
            ),
        ),
        (Err(why), Ok((200, id)), _) => Check::warn(
            N,
            format!(
                "{hostport} answers (instance {}) but {why}; pods' IMDSv2 requests are answered by iamlet itself",
                id.trim()
            ),
        ),
        (_, _, Ok((code, _))) => Check::fail(
            N,
            format!(
                "{hostport} answered {code} for /latest/meta-data/instance-id; is --metadata-addr the instance metadata service?"
            ),
        ),
        (_, _, Err(e)) => Check::fail(N, format!("{hostport} did not answer a metadata GET: {e}")),
    };
    (check, region)
}

/// The agent's region: from the environment, or (fragile) from instance metadata.
fn check_region(env: impl Fn(&str) -> Option<String>, from_imds: Option<&str>) -> Check {
    const N: &str = "region";
    for k in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        if let Some(v) = env(k).filter(|v| !v.is_empty()) {
            return Check::ok(N, format!("{k}={v}"));
        }
    }
    match from_imds {
        Some(r) => Check::warn(
            N,
            format!(
                "AWS_REGION is not set; the instance metadata says {r}; set AWS_REGION in the DaemonSet so STS calls do not depend on it"
            ),
        ),
        None => Check::fail(
            N,
            "no region: AWS_REGION is not set and the instance metadata does not say; set AWS_REGION in the DaemonSet",
        ),
    }
}

/// AssumeRole of a test role with the agent's own credentials.
fn check_sts(args: &Args, d: &DoctorArgs, hostport: Option<&str>) -> Check {
    const N: &str = "sts";
    let Some(role) = d
        .test_role
        .clone()
        .or_else(|| args.iam.default_role.clone())
        .filter(|r| !r.is_empty())
    else {
        return Check::warn(
            N,
            "AssumeRole not tried: pass --test-role=ROLE (a role the node's role may assume) to check STS",
        );
    };
    let Some(hostport) = hostport else {
        return Check::fail(N, "cannot check STS: --metadata-addr is invalid");
    };
    let arn = if role.starts_with("arn:") {
        role.clone()
    } else {
        let mut base = args.iam.base_role_arn.clone();
        if base.is_none()
            && (args.iam.auto_discover_base_arn || args.iam.auto_discover_default_role)
            && let Ok(addr) = config::resolve_metadata(hostport)
        {
            base = crate::discover::base_arn(addr, hostport).ok();
        }
        match iamlet_resolver::RoleRules::new(base.as_deref(), None) {
            Ok(r) if r.base_arn().is_some() => r.role_arn(&role),
            _ => {
                return Check::fail(
                    N,
                    format!(
                        "cannot turn {role:?} into a role ARN: pass a full ARN, --base-role-arn, or --auto-discover-base-arn"
                    ),
                );
            }
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Check::fail(N, format!("cannot start a runtime: {e}")),
    };
    let hostport = hostport.to_owned();
    rt.block_on(async move {
        let sts = match iamlet_resolver::creds::sts::Sts::new(&hostport, Duration::from_secs(5)).await {
            Ok(s) => s,
            Err(e) => return Check::fail(N, e.to_string()),
        };
        let key = iamlet_resolver::CredKey {
            role_arn: arn.clone(),
            external_id: None,
            session: None,
        };
        match sts.assume_role(&key, "iamlet-doctor", Duration::from_secs(900)).await {
            Ok(_) => Check::ok(N, format!("AssumeRole of {arn} works (region {})", sts.region())),
            Err(e) => Check::fail(N, format!("AssumeRole of {arn} failed ({e}); the node's role needs sts:AssumeRole on it, and the role's trust policy must trust the node's role")),
        }
    })
}

/// The pod source: the file, or the API server with the RBAC iamlet needs.
fn check_kubernetes(args: &Args) -> Check {
    const N: &str = "kubernetes";
    if let Some(path) = &args.kube.pods_from {
        return match std::fs::metadata(path) {
            Ok(_) => Check::ok(
                N,
                format!(
                    "pods come from {} (local mode; no API server used)",
                    path.display()
                ),
            ),
            Err(e) => Check::fail(N, format!("--pods-from {}: {e}", path.display())),
        };
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Check::fail(N, format!("cannot start a runtime: {e}")),
    };
    rt.block_on(kube_check(args))
}

async fn kube_check(args: &Args) -> Check {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ListParams, PostParams};
    const N: &str = "kubernetes";
    let k = &args.kube;
    let config = if let Some(path) = &k.kubeconfig {
        match kube::config::Kubeconfig::read_from(path) {
            Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    } else if let Some(server) = &k.api_server {
        match server.parse() {
            Ok(uri) => {
                let mut c = kube::Config::new(uri);
                if let Some(token) = &k.api_token {
                    c.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
                        .unwrap_or_default();
                }
                Ok(c)
            }
            Err(e) => Err(format!("invalid --api-server: {e}")),
        }
    } else {
        kube::Config::infer().await.map_err(|e| e.to_string())
    };
    let mut config = match config {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                N,
                format!(
                    "no Kubernetes API configuration ({e}); in a cluster this comes from the service account, else pass --kubeconfig or --api-server"
                ),
            );
        }
    };
    config.accept_invalid_certs |= k.insecure;
    config.read_timeout = Some(Duration::from_secs(5));
    config.connect_timeout = Some(Duration::from_secs(5));
    let client = match kube::Client::try_from(config) {
        Ok(c) => c,
        Err(e) => return Check::fail(N, format!("cannot build the Kubernetes client: {e}")),
    };
    let mut lp = ListParams::default().limit(1);
    if let Some(node) = &k.node {
        lp = lp.fields(&format!("spec.nodeName={node}"));
    }
    if let Err(e) = kube::Api::<Pod>::all(client.clone()).list(&lp).await {
        return Check::fail(N, kube_error(&e));
    }
    let mut needed = vec![("pods", "list"), ("pods", "watch")];
    if args.iam.namespace_restrictions {
        needed.extend([("namespaces", "list"), ("namespaces", "watch")]);
    }
    let mut missing = Vec::new();
    for (resource, verb) in needed {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    resource: Some(resource.into()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match kube::Api::<SelfSubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
        {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => missing.push(format!("{verb} {resource}")),
            Err(_) => {}
        }
    }
    let node = match &k.node {
        Some(n) => format!("pods of node {n}"),
        None => "pods (no --node: every pod in the cluster; set --node=$(NODE_NAME))".into(),
    };
    if !missing.is_empty() {
        return Check::fail(
            N,
            format!(
                "the API server answers but RBAC denies {}; grant get/list/watch on pods (and namespaces with --namespace-restrictions) to iamlet's service account (ClusterRole + ClusterRoleBinding)",
                missing.join(", ")
            ),
        );
    }
    if k.node.is_none() {
        return Check::warn(
            N,
            format!("the API server answers and RBAC allows listing and watching {node}"),
        );
    }
    Check::ok(
        N,
        format!("the API server answers and RBAC allows listing and watching {node}"),
    )
}

fn kube_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 401 => "the API server rejected iamlet's credentials (401); check the service account token or --api-token".into(),
        kube::Error::Api(s) if s.code == 403 => format!("RBAC denies listing pods (403: {}); grant get/list/watch on pods (and namespaces with --namespace-restrictions) to iamlet's service account", s.message),
        kube::Error::Api(s) => format!("the API server answered {} ({})", s.code, s.message),
        other => format!("cannot reach the API server: {other}; check --api-server/--kubeconfig and the node's network path to it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_shape() {
        assert_eq!(
            Check::ok("port", "port 8181 (--app-port) is free").to_string(),
            "OK port: port 8181 (--app-port) is free"
        );
        assert_eq!(
            Check::warn("region", "a\nb").to_string(),
            "WARN region: a b"
        );
        assert_eq!(Check::fail("iptables", "x").to_string(), "FAIL iptables: x");
        assert!(Level::Fail > Level::Warn && Level::Warn > Level::Ok);
    }

    #[test]
    fn region_from_env_wins_then_imds_then_fails() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                set.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = check_region(env(&[("AWS_REGION", "us-west-2")]), Some("eu-west-1"));
        assert_eq!(
            (c.level, c.text.as_str()),
            (Level::Ok, "AWS_REGION=us-west-2")
        );
        let c = check_region(
            env(&[("AWS_REGION", ""), ("AWS_DEFAULT_REGION", "ap-south-1")]),
            None,
        );
        assert_eq!(
            (c.level, c.text.as_str()),
            (Level::Ok, "AWS_DEFAULT_REGION=ap-south-1")
        );
        let c = check_region(env(&[]), Some("eu-west-1"));
        assert_eq!(c.level, Level::Warn, "{c}");
        assert!(
            c.text.contains("the instance metadata says eu-west-1"),
            "{c}"
        );
        let c = check_region(env(&[]), None);
        assert_eq!(c.level, Level::Fail, "{c}");
        assert!(c.text.starts_with("no region"), "{c}");
    }
}
