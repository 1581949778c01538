//! `iamlet doctor`: the node checks with the agent's flags, one line each —
//! `OK|WARN|FAIL <check>: <what was found / what to do>` — exit 1 on any FAIL. Inside the
//! agent's container (`kubectl exec ds/iamlet -- iamlet doctor`) it adopts the running
//! agent's flags when none are given. The checks themselves are `iamlet_node::doctor`'s.

use crate::args::{Args, DoctorArgs};
use crate::config::Config;
use iamlet_node::doctor::{self, Check, Level};
use iamlet_node::{METADATA_V4, MetadataAddr, cleanup};
use std::net::IpAddr;

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
            emit(Check::fail("flags", e.to_string()));
            None
        }
    };
    let node = &args.node;
    let ifaces = doctor::interfaces::check(&node.host_interface, node.iptables, &mut emit);
    let iptables = doctor::iptables::Flags {
        iptables: node.iptables,
        backend: node.iptables_backend.into(),
        kube2iam_addrs: match &config {
            Some(c) => cleanup::kube2iam_addrs(c.metadata.hostport()),
            None => vec![IpAddr::V4(METADATA_V4)],
        },
        redirect: config.as_ref().and_then(|c| c.redirect.clone()),
    };
    doctor::iptables::check(&iptables, ifaces.as_deref(), &mut emit);
    let metrics_port = config.as_ref().map_or(node.app_port, |c| c.metrics_port);
    doctor::ports::check(node.app_port, metrics_port, node.iptables, &mut emit);
    // An invalid --metadata-addr is already the flags line's FAIL; STS says so again.
    let metadata = MetadataAddr::parse(&node.metadata_addr).ok();
    let mut region = None;
    if let Some(m) = &metadata {
        let (imds, from_imds) = doctor::imds::check(m);
        emit(imds);
        region = from_imds;
    }
    emit(doctor::imds::check_region(
        |k| std::env::var(k).ok(),
        region.as_deref(),
    ));
    let sts = doctor::sts::Flags {
        role: d
            .test_role
            .clone()
            .or_else(|| args.iam.default_role.clone()),
        base_role_arn: args.iam.base_role_arn.clone(),
        discover_base_arn: args.iam.auto_discover_base_arn || args.iam.auto_discover_default_role,
    };
    emit(doctor::sts::check(&sts, metadata.as_ref()));
    emit(doctor::kubernetes::check(
        args.kube.pods_from.as_deref(),
        &crate::config::kube_options(&args.kube),
        args.iam.namespace_restrictions,
    ));
    i32::from(worst == Level::Fail)
}

/// `iamlet doctor` with no flags, inside the agent's container or on its node: the flags of
/// the iamlet agent running in this network namespace.
fn adopt_agent_flags() -> Option<(u32, Args)> {
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
        if let Ok(a) = Args::try_parse_go(&words) {
            return Some((pid, a));
        }
    }
    None
}
