//! Per-process shared settings and per-worker state.

use crate::metrics::{ProxyMetrics, WorkerMetrics};
use iamlet_resolver::{Handle, Identity, RoleRules, SnapshotReader};
use prometheus_client::registry::Registry;
use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Immutable settings shared by every worker.
pub struct Shared {
    pub handle: Handle,
    pub rules: RoleRules,
    pub upstream: SocketAddr,
    /// Host header sent upstream.
    pub upstream_host: String,
    /// How long a request from an unknown IP waits for its pod (`--backoff-max-elapsed-time`).
    pub wait_ip: Duration,
    pub debug: bool,
    /// Whether the app port also serves `/metrics` and `/debug/store`.
    pub admin_on_app_port: bool,
    pub registry: Arc<Registry>,
    pub metrics: ProxyMetrics,
    pub idle_timeout: Duration,
    /// Node-side readiness (with --iptables: the rule is installed); `/ready` needs it and
    /// the resolver's first publish.
    pub node_ready: Arc<AtomicBool>,
}

/// One worker thread's state (`!Send`: lives on its runtime only).
pub struct Worker {
    pub shared: Arc<Shared>,
    pub metrics: WorkerMetrics,
    /// Serves only admin paths (the separate metrics listener).
    pub admin_only: bool,
    reader: RefCell<SnapshotReader>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>, admin_only: bool) -> Self {
        Worker {
            metrics: shared.metrics.worker(),
            reader: RefCell::new(shared.handle.reader()),
            shared,
            admin_only,
        }
    }

    /// The identity behind `ip` in the current snapshot (no lock, no wait).
    #[inline]
    pub fn identity(&self, ip: &IpAddr) -> Option<Arc<Identity>> {
        self.reader.borrow_mut().load().get(ip).cloned()
    }

    /// Waits for `ip` to appear, up to `--backoff-max-elapsed-time`.
    pub async fn wait_identity(&self, ip: IpAddr) -> Option<Arc<Identity>> {
        if let Some(id) = self.identity(&ip) {
            return Some(id);
        }
        match monoio::time::timeout(self.shared.wait_ip, self.shared.handle.wait_for_ip(ip)).await {
            Ok(id) => {
                self.metrics.ip_found.inc();
                Some(id)
            }
            Err(_) => {
                self.metrics.ip_timeout.inc();
                None
            }
        }
    }
}
