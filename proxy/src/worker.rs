//! Process-wide settings shared by the workers, and each worker's own state.

use crate::args::{Imdsv2Mode, MetadataPolicy};
use crate::metrics::{ProxyMetrics, WorkerMetrics};
use crate::token::TokenKey;
use crate::upstream::Upstream;
use iamlet_resolver::{Handle, Identity, RoleRules, SnapshotReader};
use prometheus_client::registry::Registry;
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Request and connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8192,
            max_body: 1024,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// Where and how the upstream metadata service is reached.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub addr: SocketAddr,
    /// Host header sent upstream.
    pub host: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// Immutable settings shared by every worker.
pub struct Shared {
    pub handle: Handle,
    pub rules: RoleRules,
    pub upstream: UpstreamConfig,
    /// How long a request from an unknown IP waits for its pod (`--backoff-max-elapsed-time`).
    pub wait_ip: Duration,
    pub debug: bool,
    /// Whether the app port also serves `/metrics` and `/debug/store`.
    pub admin_on_app_port: bool,
    pub registry: Arc<Registry>,
    pub metrics: ProxyMetrics,
    pub limits: Limits,
    pub imdsv2: Imdsv2Mode,
    pub token_key: TokenKey,
    pub policy: MetadataPolicy,
    pub allow_paths: Vec<regex::Regex>,
    pub block_user_data: bool,
    /// Node-side readiness (with --iptables: the rule is installed); `/ready` needs it and
    /// the resolver's first publish.
    pub node_ready: Arc<AtomicBool>,
    /// Set on SIGTERM/SIGINT: stop accepting, finish in-flight requests.
    pub stopping: Arc<AtomicBool>,
    pub shutdown_grace: Duration,
    /// Size of the last `/metrics` exposition, to size the next one's buffer.
    pub metrics_size_hint: std::sync::atomic::AtomicUsize,
}

/// One worker thread's state (`!Send`: lives on its runtime only).
pub struct Worker {
    pub shared: Arc<Shared>,
    pub metrics: WorkerMetrics,
    /// Serves only admin paths (the separate metrics listener).
    pub admin_only: bool,
    pub upstream: Upstream,
    /// Per-worker copies: a shared `Regex` would share its match-cache pool across threads.
    pub allow_paths: Vec<regex::Regex>,
    reader: RefCell<SnapshotReader>,
    open: RefCell<ahash::AHashMap<u64, RawFd>>,
    next_conn: Cell<u64>,
    /// Read and output buffers of closed connections, reused by new ones (a new connection
    /// per request is what SDKs do; this saves two allocations of ~9 and 4 KiB per request).
    bufs: RefCell<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// Most idle buffer pairs a worker keeps (~13 KiB each).
const MAX_POOLED_BUFS: usize = 256;

impl Worker {
    pub fn new(shared: Arc<Shared>, admin_only: bool) -> Self {
        let u = &shared.upstream;
        Worker {
            metrics: shared.metrics.worker(),
            reader: RefCell::new(shared.handle.reader()),
            upstream: Upstream::new(
                u.addr,
                u.host.clone(),
                u.connect_timeout,
                u.response_timeout,
            ),
            allow_paths: shared.allow_paths.clone(),
            admin_only,
            open: RefCell::new(ahash::AHashMap::new()),
            next_conn: Cell::new(0),
            bufs: RefCell::new(Vec::new()),
            shared,
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

    pub fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Relaxed)
    }

    /// Number of open connections on this worker.
    pub fn open_connections(&self) -> usize {
        self.open.borrow().len()
    }

    /// Tracks a connection; the returned guard untracks it.
    /// A connection's read buffer (capacity `rcap`) and output buffer, empty.
    pub fn take_bufs(&self, rcap: usize) -> (Vec<u8>, Vec<u8>) {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| (Vec::with_capacity(rcap), Vec::with_capacity(4096)))
    }

    /// Returns a closed connection's buffers for reuse (dropped if the pool is full or they
    /// are not the usual size).
    pub fn give_bufs(&self, mut r: Vec<u8>, mut o: Vec<u8>, rcap: usize, out_keep: usize) {
        let mut pool = self.bufs.borrow_mut();
        if pool.len() < MAX_POOLED_BUFS && r.capacity() == rcap && o.capacity() <= out_keep {
            r.clear();
            o.clear();
            pool.push((r, o));
        }
    }

    pub fn track(&self, fd: RawFd) -> ConnGuard<'_> {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        self.open.borrow_mut().insert(id, fd);
        ConnGuard { worker: self, id }
    }

    /// Shuts down the read side of every open connection: idle ones see EOF and close,
    /// busy ones finish writing their answer first.
    pub fn close_reads(&self) {
        for fd in self.open.borrow().values() {
            let _ = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Read);
        }
    }
}

/// Untracks a connection when dropped.
pub struct ConnGuard<'a> {
    worker: &'a Worker,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.worker.open.borrow_mut().remove(&self.id);
    }
}
