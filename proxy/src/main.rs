//! The `iamlet` binary: parse flags, start the resolver thread, open the listeners, spawn
//! the workers, install the redirect, wait for a signal.

use anyhow::Context;
use iamlet::config::{self, Config, ConfigError, EX_USAGE, Runtime};
use iamlet::metrics::{Kube2iamStatus, ProxyMetrics};
use iamlet::token::TokenKey;
use iamlet::{handover, server};
use iamlet_node::imds;
use nix::sys::signal::{SigSet, Signal};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn main() {
    iamlet::malloc::tune();
    // Block the stop signals before any thread starts, so only `sigwait` below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    let _ = signals.thread_block();
    let usage = |e: ConfigError| -> ! {
        eprintln!("iamlet: {e}");
        std::process::exit(EX_USAGE)
    };
    let args = match config::parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(Ok(help)) => help.exit(),
        Err(Err(e)) => usage(e),
    };
    match &args.command {
        Some(iamlet::args::Command::Cleanup(c)) => {
            // Only kube2iam's rules need the address; an unusable one means the default.
            let metadata = iamlet_node::MetadataAddr::parse(&args.node.metadata_addr).map_or_else(
                |_| format!("{}:80", iamlet_node::METADATA_V4),
                |m| m.hostport().to_owned(),
            );
            std::process::exit(iamlet_node::cleanup::run(
                c.kube2iam,
                c.kube2iam_only,
                &metadata,
            ))
        }
        Some(iamlet::args::Command::Doctor(d)) => std::process::exit(iamlet::doctor::run(&args, d)),
        None => {}
    }
    let config = Config::validate(args).unwrap_or_else(|e| usage(e));
    if config.args.check_config {
        println!("iamlet: configuration OK");
        return;
    }
    config.init_tracing();
    if let Err(e) = run(config, signals) {
        tracing::error!("{e:#}");
        eprintln!("iamlet: {e:#}");
        std::process::exit(1);
    }
}

fn run(config: Config, signals: SigSet) -> anyhow::Result<()> {
    let a = &config.args;
    // First: a handover socket that cannot be served safely must end the start before it has
    // touched anything, not after it has taken over from the running iamlet.
    if let Some(path) = &a.proxy.handover_socket {
        handover::prepare(path)?;
    }
    let metadata = &config.metadata;
    let upstream = metadata.resolve()?;
    // --iptables: interfaces and backend checked now; the rule goes in once we listen.
    let node_ready = Arc::new(AtomicBool::new(config.redirect.is_none()));
    let redirect = iamlet_node::prepare(config.redirect.as_ref(), &node_ready)?;
    let rules = config.role_rules(&imds::Client::at(upstream, metadata.hostport()))?;
    let mut registry = Registry::default();
    let resolver = iamlet_resolver::start(config.resolver(rules.clone()), &mut registry)?;
    let metrics = ProxyMetrics::register(&mut registry, config.workers);
    registry.register_collector(Box::new(Kube2iamStatus {
        readiness: iamlet::shared::Readiness::new(resolver.handle.clone(), node_ready.clone()),
    }));
    if let Some(r) = &redirect {
        r.metrics().register(&mut registry);
    }
    let driver = server::resolve_driver(a.proxy.io_driver)?;
    server::register_driver_metric(&mut registry, driver);
    // An upgrade: the running iamlet's own listening sockets, if one serves at the handover
    // socket; else ours, bound now.
    let mut taken = match &a.proxy.handover_socket {
        Some(path) => handover::take_over(path, a.proxy.shutdown_grace)?,
        None => None,
    };
    let opened = server::open(
        &config,
        taken.as_mut().map(|t| std::mem::take(&mut t.listeners)),
    )?;
    let token_key = TokenKey::new(a.proxy.imds_token_key_file.as_deref())?;
    let p = &a.proxy;
    let stopping = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(config.shared(Runtime {
        handle: resolver.handle.clone(),
        rules,
        upstream,
        registry,
        metrics,
        token_key,
        admin_on_app_port: opened.admin.is_none(),
        node_ready,
        stopping: stopping.clone(),
    }));
    // After a handover the old process serves until this one has its pod list: accept only
    // then. Otherwise accept at once (fail-closed: the rule goes in right after).
    let synced = match &taken {
        Some(t) => t.wait_for_sync(&resolver)?,
        None => false,
    };
    let threads = server::spawn_all(opened.app, opened.admin, &shared, driver)?;
    // Fail-closed from the first second: the rule goes in as soon as the listeners accept,
    // before the first pod list. Until the list arrives, requests wait (bounded) and get 404
    // or 500, never the node's role; /ready stays false.
    if let (Some(r), Some(c)) = (&redirect, &config.redirect) {
        iamlet_node::start(r, c.verify_interval)?;
    }
    let workers = config.workers;
    tracing::info!(addr = %opened.app_addr, workers, %driver, "listening");
    if !resolver.handle.is_ready() {
        tracing::info!(
            "not ready until the first pod list arrives: requests wait up to --backoff-max-elapsed-time, then get 404"
        );
    }
    if !synced {
        resolver.wait_first_sync()?;
    }
    if let Some(t) = taken {
        t.complete(&shared, p.shutdown_grace + Duration::from_secs(1));
    }
    let handed_over = handover::offer_to_next(
        p.handover_socket.as_deref(),
        opened.offered,
        &stopping,
        p.shutdown_grace,
    )?;
    // Last: whoever waits for this line may upgrade this process at once.
    tracing::info!("ready: the first pod list is published");

    let sig = signals.wait().context("waiting for signals")?;
    tracing::info!(signal = ?sig, grace = ?p.shutdown_grace, "stopping: no new connections, finishing in-flight requests");
    stopping.store(true, Ordering::SeqCst);
    if let Some(r) = &redirect {
        r.stop(handed_over.load(Ordering::SeqCst));
    }
    if !server::join(threads, p.shutdown_grace + Duration::from_secs(1)) {
        tracing::warn!("in-flight requests did not finish within --shutdown-grace; exiting");
    }
    match shared.life.fatal() {
        Some(why) => Err(anyhow::anyhow!("{why}")),
        None => Ok(()),
    }
}
