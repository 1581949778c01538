//! The `iamlet` binary: parse flags, start the resolver thread, bind, wait for the first
//! sync, spawn the workers, wait for a signal.

use anyhow::Context;
use clap::Parser;
use iamlet::args::SessionName;
use iamlet::args::{Args, LogFormat};
use iamlet::config::{self, Config, EX_USAGE};
use iamlet::metrics::{Kube2iamStatus, ProxyMetrics};
use iamlet::token::TokenKey;
use iamlet::worker::{Limits, Shared, UpstreamConfig};
use iamlet::{discover, handover, server};
use iamlet_resolver::source::kube::KubeOptions;
use iamlet_resolver::{AnnotationKeys, CredPolicy, PodSource, RoleRules, SessionMode};
use nix::sys::signal::{SigSet, Signal};
use prometheus_client::registry::Registry;
use std::net::{Ipv4Addr, SocketAddr};
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

    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let first = e.to_string();
            let first = first
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("iamlet: {first}; run `iamlet --help` for the flags.");
            std::process::exit(EX_USAGE);
        }
    };
    if let Some(cmd) = &args.command {
        std::process::exit(iamlet::node::run_command(cmd, &args));
    }
    let config = match Config::validate(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iamlet: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    if config.args.check_config {
        println!("iamlet: configuration OK");
        return;
    }
    init_tracing(&config);
    if let Err(e) = run(config, signals) {
        tracing::error!("{e:#}");
        eprintln!("iamlet: {e:#}");
        std::process::exit(1);
    }
}

fn init_tracing(config: &Config) {
    let filter = std::env::var("IAMLET_LOG").unwrap_or_else(|_| config.log_filter.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.args.log.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

fn run(config: Config, signals: SigSet) -> anyhow::Result<()> {
    let Config {
        args,
        workers,
        metrics_port,
        metadata_hostport,
        host_ip,
        ..
    } = config;
    let upstream = config::resolve_metadata(&metadata_hostport)?;
    // --iptables: interfaces and backend checked now; the rule goes in once we listen.
    let node_ready = Arc::new(AtomicBool::new(!args.node.iptables));
    let redirect = iamlet::node::prepare(&args.node, host_ip, node_ready.clone())
        .map_err(anyhow::Error::msg)?;
    let mut base_arn = args.iam.base_role_arn.clone();
    let mut default_role = args.iam.default_role.clone();
    if args.iam.auto_discover_base_arn || args.iam.auto_discover_default_role {
        let arn = discover::base_arn(upstream, &metadata_hostport).map_err(anyhow::Error::msg)?;
        tracing::info!(base_arn = %arn, "base ARN discovered");
        base_arn = Some(arn);
    }
    if args.iam.auto_discover_default_role {
        let role =
            discover::instance_role(upstream, &metadata_hostport).map_err(anyhow::Error::msg)?;
        tracing::info!(default_role = %role, "using the instance's role as the default role");
        default_role = Some(role);
    }
    let allow_paths = config::allow_paths(&args.proxy.allow_metadata_path)?;
    let rules = RoleRules::new(base_arn.as_deref(), default_role.as_deref())?;
    let source = match &args.kube.pods_from {
        Some(path) => PodSource::File {
            path: path.clone(),
            node: args.kube.node.clone(),
        },
        None => PodSource::Kube(KubeOptions {
            kubeconfig: args.kube.kubeconfig.clone(),
            api_server: args.kube.api_server.clone(),
            api_token: args.kube.api_token.clone(),
            insecure: args.kube.insecure,
            node: args.kube.node.clone(),
        }),
    };
    let node_name = args
        .kube
        .node
        .clone()
        .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
        .unwrap_or_else(|| "iamlet".into());

    let mut registry = Registry::default();
    let resolver = iamlet_resolver::start(
        iamlet_resolver::Config {
            rules: rules.clone(),
            keys: AnnotationKeys {
                role: args.iam.iam_role_key.clone(),
                external_id: args.iam.iam_external_id.clone(),
            },
            restrictions: args.iam.namespace_restrictions.then(|| {
                iamlet_resolver::NamespaceRestrictions {
                    key: args.iam.namespace_key.clone(),
                    format: match args.iam.namespace_restriction_format {
                        iamlet::args::RestrictionFormat::Glob => {
                            iamlet_resolver::RestrictionFormat::Glob
                        }
                        iamlet::args::RestrictionFormat::Regexp => {
                            iamlet_resolver::RestrictionFormat::Regexp
                        }
                    },
                }
            }),
            source,
            creds: CredPolicy {
                session_ttl: args.iam.iam_role_session_ttl,
                error_ttl: args.iam.iam_role_error_ttl,
                session_prefix: node_name,
                rate_limit: args.sts.sts_rate_limit,
                max_in_flight: args.sts.sts_max_in_flight as usize,
            },
            metadata_addr: metadata_hostport.clone(),
            sts_timeout: args.sts.sts_timeout,
            sessions: match (args.sts.session_name, args.sts.session_tags) {
                (SessionName::Node, false) => SessionMode::Node,
                (_, tags) => SessionMode::Pod { tags },
            },
        },
        &mut registry,
    )?;
    let metrics = ProxyMetrics::register(&mut registry, workers);
    registry.register_collector(Box::new(Kube2iamStatus {
        handle: resolver.handle.clone(),
        node_ready: node_ready.clone(),
    }));
    if let Some(r) = &redirect {
        r.metrics().register(&mut registry);
    }

    let driver = server::resolve_driver(args.proxy.io_driver).map_err(anyhow::Error::msg)?;
    server::register_driver_metric(&mut registry, driver);
    // An upgrade: the running iamlet's own listening sockets, if one serves at the handover
    // socket; else ours, bound now.
    let mut taken = match &args.proxy.handover_socket {
        Some(path) => handover::take_over(path)?,
        None => None,
    };
    let (app, taken_admin) = match taken.as_mut() {
        Some(t) => {
            let l = std::mem::take(&mut t.listeners);
            tracing::info!(
                app = l.app.len(),
                admin = l.admin.len(),
                "handover: took the running iamlet's listening sockets; it serves until this one is ready"
            );
            (l.app, Some(l.admin).filter(|a| !a.is_empty()))
        }
        None => {
            // A listener with SO_REUSEPORT (ours have it) would silently share the port
            // with another process.
            for (port, flag) in [
                (args.node.app_port, "--app-port"),
                (metrics_port, "--metrics-port"),
            ] {
                iamlet::node::port::check_not_shared(port, flag).map_err(anyhow::Error::msg)?;
            }
            let app_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.node.app_port));
            let app = server::bind(app_addr, workers)
                .map_err(|e| bind_error(e, args.node.app_port, "--app-port"))?;
            (app, None)
        }
    };
    let app_bound = app[0].local_addr().context("listener address")?;
    let app6 = if args.node.ipv6 {
        Some(
            iamlet::node::bind_v6(app_bound.port(), workers)
                .map_err(|e| bind_error(e, app_bound.port(), "--app-port"))?,
        )
    } else {
        None
    };
    // A separate admin listener when --metrics-port differs from --app-port, or is 0 (any
    // free port) given explicitly.
    let separate_admin = metrics_port != args.node.app_port || args.node.metrics_port == Some(0);
    let admin = match taken_admin {
        Some(l) if separate_admin => Some(l),
        _ if separate_admin => Some(
            server::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, metrics_port)), 1)
                .map_err(|e| bind_error(e, metrics_port, "--metrics-port"))?,
        ),
        _ => None,
    };
    // Copies of our listening sockets, for handing them to the next iamlet.
    let offered = handover::Listeners {
        app: dup_all(&app)?,
        admin: admin
            .as_deref()
            .map(dup_all)
            .transpose()?
            .unwrap_or_default(),
    };

    let token_key = match &args.proxy.imds_token_key_file {
        Some(path) => TokenKey::from_file(path),
        None => TokenKey::random(),
    }
    .map_err(anyhow::Error::msg)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        handle: resolver.handle.clone(),
        rules,
        upstream: UpstreamConfig {
            addr: upstream,
            host: metadata_hostport,
            connect_timeout: args.proxy.upstream_connect_timeout,
            response_timeout: args.proxy.upstream_timeout,
        },
        wait_ip: args.iam.backoff_max_elapsed_time,
        debug: args.log.debug,
        admin_on_app_port: admin.is_none(),
        registry: Arc::new(registry),
        metrics,
        limits: Limits {
            max_head: args.proxy.max_request_head,
            max_body: args.proxy.max_request_body,
            header_timeout: args.proxy.header_read_timeout,
            idle_timeout: args.proxy.idle_timeout,
            write_timeout: args.proxy.write_timeout,
            max_connections: args.proxy.max_connections_per_worker,
        },
        imdsv2: args.proxy.imdsv2,
        token_key,
        policy: args.proxy.metadata_policy,
        allow_paths,
        forward_user_data: args.proxy.allow_user_data,
        forward_identity_signature: args.proxy.allow_instance_identity_signature,
        sources: iamlet::fairness::SourceLimiter::new(args.proxy.max_connections_per_ip),
        metrics_cache: Default::default(),
        metrics_rendering: AtomicBool::new(false),
        metrics_max_age: args.proxy.metrics_max_age,
        sweeping: AtomicBool::new(false),
        node_ready,
        stopping: stopping.clone(),
        shutdown_grace: args.proxy.shutdown_grace,
    });
    // After a handover the old process serves until this one has its pod list: accept only
    // then. Otherwise accept at once (fail-closed: the rule goes in right after).
    let mut synced = false;
    if let Some(t) = &taken {
        tracing::info!("handover: waiting for the first pod list before accepting");
        let old_gone = t.watch_old();
        loop {
            if let Some(r) = resolver.wait_first_sync_for(Duration::from_millis(50)) {
                r?;
                synced = true;
                break;
            }
            if old_gone.try_recv().is_ok() {
                // Nobody accepts on the sockets now: take the connections, and let them wait
                // for the pod list as at any start.
                tracing::warn!(
                    "handover: the previous iamlet went away before this one was ready; accepting now"
                );
                break;
            }
        }
    }
    let shared_for_sweep = shared.clone();
    let mut threads = server::spawn("iamlet-worker", app, shared.clone(), driver, false)?;
    if let Some(app6) = app6 {
        threads.extend(server::spawn(
            "iamlet-worker6",
            app6,
            shared.clone(),
            driver,
            false,
        )?);
    }
    if let Some(admin) = admin {
        let bound = admin[0].local_addr()?;
        threads.extend(server::spawn("iamlet-admin", admin, shared, driver, true)?);
        tracing::info!(addr = %bound, "admin listening");
    }
    // Fail-closed from the first second: the rule goes in as soon as the listeners accept,
    // before the first pod list. Until the list arrives, requests wait (bounded) and get 404
    // or 500, never the node's role; /ready stays false.
    if let Some(r) = &redirect {
        iamlet::node::start(r, args.node.iptables_verify_interval).map_err(anyhow::Error::msg)?;
    }
    tracing::info!(addr = %app_bound, workers, %driver, "listening");
    if !resolver.handle.is_ready() {
        tracing::info!(
            "not ready until the first pod list arrives: requests wait up to --backoff-max-elapsed-time, then get 404"
        );
    }
    if !synced {
        resolver.wait_first_sync()?;
    }
    if let Some(t) = taken {
        // Synced and accepting on the same sockets: the old process may stop now. Its
        // cancelled accepts may take a connection's wake-up with them: sweep the queues
        // until it is surely gone.
        shared_for_sweep.sweeping.store(true, Ordering::Relaxed);
        let s = shared_for_sweep.clone();
        let sweep_for = args.proxy.shutdown_grace + Duration::from_secs(1);
        std::thread::spawn(move || {
            std::thread::sleep(sweep_for);
            s.sweeping.store(false, Ordering::Relaxed);
        });
        match t.finish() {
            Ok(()) => tracing::info!("handover: the previous iamlet stopped accepting"),
            Err(e) => {
                tracing::warn!(error = %e, "handover: the previous iamlet did not confirm; both accept until it exits")
            }
        }
    }
    let handed_over = Arc::new(AtomicBool::new(false));
    if let Some(path) = &args.proxy.handover_socket {
        let flag = handed_over.clone();
        handover::offer(path, offered, stopping.clone(), move || {
            flag.store(true, Ordering::SeqCst);
            // Process-directed, so the main thread's sigwait sees it: the usual graceful
            // stop (no new accepts, in-flight requests finish), with the rule untouched.
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
        })?;
    } else {
        drop(offered);
    }
    // Last: whoever waits for this line may upgrade this process at once.
    tracing::info!("ready: the first pod list is published");

    let sig = signals.wait().context("waiting for signals")?;
    tracing::info!(signal = ?sig, grace = ?args.proxy.shutdown_grace, "stopping: no new connections, finishing in-flight requests");
    stopping.store(true, Ordering::SeqCst);
    if let Some(r) = &redirect {
        r.stop(handed_over.load(Ordering::SeqCst));
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for t in threads {
            let _ = t.join();
        }
        let _ = done_tx.send(());
    });
    if done_rx
        .recv_timeout(args.proxy.shutdown_grace + Duration::from_secs(1))
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within --shutdown-grace; exiting");
    }
    Ok(())
}

fn dup_all(listeners: &[std::net::TcpListener]) -> std::io::Result<Vec<std::net::TcpListener>> {
    listeners
        .iter()
        .map(std::net::TcpListener::try_clone)
        .collect()
}

fn bind_error(e: std::io::Error, port: u16, flag: &str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        let holders = iamlet::node::port::holder_of(port);
        anyhow::anyhow!(iamlet::node::port::in_use_sentence(port, flag, &holders))
    } else {
        anyhow::anyhow!("cannot listen on {flag} {port}: {e}")
    }
}
