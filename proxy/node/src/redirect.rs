//! `--iptables` at run time: prepare (interfaces, backend) before binding, install after the
//! listeners are bound, re-verify every `--iptables-verify-interval` and restore, and on exit
//! leave it (fail-closed) or remove it (`--iptables-remove-on-exit`).

use super::backend::{self, Backend, Tool};
use super::metrics::NodeMetrics;
use super::rules::{self, Desired, Family, IfaceMatch, NatView, To};
use super::{METADATA_V4, METADATA_V6, RedirectConfig, cmd, iface};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;

/// Why the redirect cannot be prepared or installed; one sentence with the fix.
#[derive(Debug, Error)]
pub enum RedirectError {
    #[error("cannot list this node's network interfaces: {0}.")]
    Interfaces(std::io::Error),
    #[error(transparent)]
    Iface(#[from] iface::IfaceError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error("--ipv6 needs {0} on PATH; install it or drop --ipv6.")]
    NoIpv6Tool(String),
    #[error(
        "cannot install the {family} redirect with {restore}: {error}; iamlet needs NET_ADMIN (privileged: true) and a working {tables}."
    )]
    Install {
        family: Family,
        restore: String,
        tables: String,
        error: ApplyError,
    },
    #[error("cannot start the iptables verifier thread: {0}")]
    Verifier(std::io::Error),
}

/// One family's rules could not be read or made right.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Command(#[from] cmd::CommandError),
    /// A restore that reported success but left the table wrong.
    #[error("after restoring, {0}")]
    StillWrong(String),
}

/// The redirect for this node.
#[derive(Debug)]
pub struct Redirect {
    backend: Backend,
    desired: Vec<Desired>,
    metrics: NodeMetrics,
    remove_on_exit: bool,
    /// Set when the redirect is in place (readiness).
    ready: Arc<AtomicBool>,
    /// Stops the verifier thread: it acknowledges once its current pass is over, so iptables
    /// is only ever changed by one thread at a time (no lock needed).
    verifier: OnceLock<mpsc::Sender<mpsc::Sender<()>>>,
    conntrack_warned: AtomicBool,
}

/// What one check found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    AlreadyInPlace,
    /// Applied; the problems it fixed.
    Applied(Vec<rules::Problem>),
}

impl Redirect {
    /// Resolves `--host-interface` against this node and picks the backend. Touches no rule.
    /// One sentence on error.
    pub fn prepare(
        node: &RedirectConfig,
        metrics: NodeMetrics,
        ready: Arc<AtomicBool>,
    ) -> Result<Redirect, RedirectError> {
        let existing = iface::existing().map_err(RedirectError::Interfaces)?;
        let (ifaces, auto) = iface::resolve(&node.interfaces, &existing)?;
        if !auto.is_empty() {
            tracing::info!(chosen = %auto.join(", "), "--host-interface=auto");
        }
        for m in ifaces.iter().filter(|m| m.is_wildcard()) {
            if !existing.iter().any(|e| m.matches(e)) {
                tracing::warn!(interface = %m, "no interface matches yet; the rule applies once pods' interfaces appear");
            }
        }
        let (backend, why) = backend::detect(node.backend)?;
        tracing::info!(backend = %backend, reason = %why, "iptables backend");
        let desired = desired(node, ifaces);
        if node.ipv6 && !backend.installed(Family::V6) {
            return Err(RedirectError::NoIpv6Tool(
                backend.tool(Family::V6, Tool::Restore),
            ));
        }
        for d in &desired {
            metrics.init(d.family);
        }
        Ok(Redirect {
            backend,
            desired,
            metrics,
            remove_on_exit: node.remove_on_exit,
            ready,
            verifier: OnceLock::new(),
            conntrack_warned: AtomicBool::new(false),
        })
    }

    pub fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Installs (or confirms) the redirect in every family, removes iamlet's chain from the
    /// other backend (so a node never has two sets), cuts connections that bypassed it, and
    /// marks the node ready.
    pub fn install(&self) -> Result<(), RedirectError> {
        for other in Backend::available()
            .into_iter()
            .filter(|b| *b != self.backend)
        {
            if self.backend == Backend::System {
                break;
            }
            for f in self.families() {
                match super::cleanup::remove_from(other, f, None) {
                    Ok(Some(what)) => {
                        tracing::warn!(backend = %other, family = %f, removed = %what, "removed iamlet's rules from the backend not in use")
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(backend = %other, family = %f, error = %e, "could not check the backend not in use")
                    }
                }
            }
        }
        for d in &self.desired {
            let outcome = self.ensure(d).map_err(|error| RedirectError::Install {
                family: d.family,
                restore: self.backend.tool(d.family, Tool::Restore),
                tables: self.backend.tool(d.family, Tool::Tables),
                error,
            })?;
            match outcome {
                // Untouched, and no conntrack flush: the connections it tracks already go to
                // an iamlet (during a handover, to the one handing its sockets over).
                Outcome::AlreadyInPlace => {
                    tracing::info!(family = %d.family, backend = %self.backend, chain = rules::CHAIN, "iptables redirect already in place")
                }
                Outcome::Applied(p) => {
                    tracing::info!(family = %d.family, backend = %self.backend, chain = rules::CHAIN, fixed = %rules::describe(&p), "iptables redirect installed");
                    // Connections a pod opened before the rule reached the node's metadata
                    // service: cut them.
                    self.flush_conntrack(d);
                }
            }
            self.metrics.set_present(d.family, true);
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    fn families(&self) -> Vec<Family> {
        self.desired.iter().map(|d| d.family).collect()
    }

    /// Reads the chains and applies the restore script when anything differs.
    pub fn ensure(&self, d: &Desired) -> Result<Outcome, ApplyError> {
        let view = self.observe(d.family)?;
        let problems = d.check(&view);
        if problems.is_empty() {
            return Ok(Outcome::AlreadyInPlace);
        }
        let script = d.restore_script(&view);
        restore(self.backend, d.family, &script)?;
        // Confirm: a restore that "worked" but left it wrong would loop forever unnoticed.
        let after = d.check(&self.observe(d.family)?);
        if !after.is_empty() {
            return Err(ApplyError::StillWrong(rules::describe(&after)));
        }
        Ok(Outcome::Applied(problems))
    }

    /// PREROUTING and IAMLET as `-S` lists them (a missing IAMLET chain is an empty list).
    fn observe(&self, family: Family) -> Result<NatView, cmd::CommandError> {
        let tables = self.backend.tool(family, Tool::Tables);
        let args = |chain| ["-w", cmd::LOCK_WAIT_S, "-t", "nat", "-S", chain];
        let pre = cmd::run_ok(&tables, &args("PREROUTING"), None, || {
            format!("{tables} -t nat -S PREROUTING")
        })?;
        // A missing IAMLET chain is an empty list, not an error.
        let chain = cmd::run(&tables, &args(rules::CHAIN), None).map_err(|error| {
            cmd::CommandError::Start {
                prog: tables.clone(),
                error,
            }
        })?;
        let mut text = pre.stdout;
        if chain.ok() {
            text.push_str(&chain.stdout);
        }
        Ok(NatView::parse(&text))
    }

    /// Deletes conntrack entries towards the metadata address, so connections a pod opened
    /// before the rule (straight to the node's IMDS) cannot carry on past it.
    fn flush_conntrack(&self, d: &Desired) {
        let addr = d.metadata.to_string();
        let mut args = vec![
            "-D",
            "-p",
            "tcp",
            "--orig-dst",
            &addr,
            "--orig-port-dst",
            "80",
        ];
        if d.family == Family::V6 {
            args.extend(["-f", "ipv6"]);
        }
        match cmd::run("conntrack", &args, None) {
            // conntrack exits 1 when there was nothing to delete.
            Ok(out) if out.ok() || out.stderr.contains("0 flow entries") => {
                tracing::debug!(family = %d.family, "conntrack entries to the metadata address flushed")
            }
            Ok(out) => {
                tracing::warn!(family = %d.family, error = %out.reason(), "conntrack flush failed; connections opened before the rule may still reach the node's metadata service")
            }
            Err(e) => {
                if !self.conntrack_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "conntrack tool not found: connections opened before the rule are not cut (install conntrack in the agent's image)")
                }
            }
        }
    }

    /// One verification pass over every family; restores what is wrong.
    pub fn verify_once(&self) {
        let mut all_ok = true;
        for d in &self.desired {
            match self.ensure(d) {
                Ok(Outcome::AlreadyInPlace) => self.metrics.set_present(d.family, true),
                Ok(Outcome::Applied(p)) => {
                    self.metrics.restored(d.family);
                    self.metrics.set_present(d.family, true);
                    tracing::warn!(family = %d.family, backend = %self.backend, found = %rules::describe(&p), "iptables redirect restored");
                    self.flush_conntrack(d);
                }
                Err(e) => {
                    all_ok = false;
                    self.metrics.error(d.family);
                    self.metrics.set_present(d.family, false);
                    tracing::error!(family = %d.family, backend = %self.backend, error = %e, "cannot verify or restore the iptables redirect");
                }
            }
        }
        self.ready.store(all_ok, Ordering::Release);
    }

    /// Starts the verifier thread: every `interval`, [`Redirect::verify_once`], until
    /// [`Redirect::stop`]. Call once, after [`Redirect::install`].
    pub fn spawn_verifier(self: &Arc<Self>, interval: Duration) -> std::io::Result<JoinHandle<()>> {
        let (tx, rx) = mpsc::channel::<mpsc::Sender<()>>();
        if self.verifier.set(tx).is_err() {
            return Err(std::io::Error::other("the verifier is already running"));
        }
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("iamlet-iptables".into())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => me.verify_once(),
                        Ok(ack) => {
                            let _ = ack.send(());
                            return;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
    }

    /// On exit: stops the verifier (waiting for a pass in progress); removes the redirect
    /// with `--iptables-remove-on-exit`, otherwise leaves it so pods never fall through to the
    /// node's role (fail-closed). After a listener handover (`handed_over`) the redirect is
    /// the new process's: only the verifier stops.
    pub fn stop(&self, handed_over: bool) {
        if let Some(tx) = self.verifier.get() {
            let (ack_tx, ack_rx) = mpsc::channel();
            if tx.send(ack_tx).is_ok() {
                let _ = ack_rx.recv_timeout(cmd::TIMEOUT * 4);
            }
        }
        if handed_over {
            tracing::info!(
                chain = rules::CHAIN,
                "listeners handed over: the iptables redirect stays as it is for the new process"
            );
            return;
        }
        if !self.remove_on_exit {
            tracing::info!(
                chain = rules::CHAIN,
                "leaving the iptables redirect in place (fail-closed): pods get connection refused until iamlet is back; `iamlet cleanup` removes it"
            );
            return;
        }
        self.ready.store(false, Ordering::Release);
        for d in &self.desired {
            match super::cleanup::remove_from(self.backend, d.family, None) {
                Ok(Some(what)) => {
                    tracing::info!(family = %d.family, removed = %what, "iptables redirect removed (--iptables-remove-on-exit)")
                }
                Ok(None) => tracing::info!(family = %d.family, "no iptables redirect to remove"),
                Err(e) => {
                    tracing::error!(family = %d.family, error = %e, "cannot remove the iptables redirect")
                }
            }
            self.metrics.set_present(d.family, false);
            self.flush_conntrack(d);
        }
    }
}

/// The rules for `--iptables` (and `--ipv6`): DNAT to `--host-ip:--app-port` per interface;
/// IPv6 to `--host-ipv6` or, without it, REDIRECT to `--app-port`.
pub fn desired(node: &RedirectConfig, ifaces: Vec<IfaceMatch>) -> Vec<Desired> {
    let mut v = vec![Desired {
        family: Family::V4,
        metadata: IpAddr::V4(METADATA_V4),
        container: node
            .container_credentials
            .then_some(IpAddr::V4(super::CONTAINER_V4)),
        ifaces: ifaces.clone(),
        to: To::Dnat(SocketAddr::from((node.host_ip, node.app_port))),
    }];
    if node.ipv6 {
        let to = match node.host_ipv6 {
            Some(ip) => To::Dnat(SocketAddr::from((ip, node.app_port))),
            None => To::Redirect(node.app_port),
        };
        v.push(Desired {
            family: Family::V6,
            metadata: IpAddr::V6(METADATA_V6),
            container: node
                .container_credentials
                .then_some(IpAddr::V6(super::CONTAINER_V6)),
            ifaces,
            to,
        });
    }
    v
}

/// Applies `script` with `iptables-restore --noflush` (atomic: all lines or none).
pub fn restore(backend: Backend, family: Family, script: &str) -> Result<(), cmd::CommandError> {
    let prog = backend.tool(family, Tool::Restore);
    cmd::run_ok(
        &prog,
        &["-w", cmd::LOCK_WAIT_S, "--noflush"],
        Some(script),
        || format!("{prog} --noflush"),
    )?;
    Ok(())
}
