//! Process-wide settings shared by the workers, and each worker's own state.

use crate::args::{Imdsv2Mode, MetadataPolicy};
use crate::fairness::SourceLimiter;
use crate::metrics::{ProxyMetrics, WorkerMetrics};
use crate::token::TokenKey;
use crate::upstream::Upstream;
use arc_swap::ArcSwapOption;
use iamlet_resolver::{Handle, Identity, RoleRules, SnapshotReader};
use prometheus_client::registry::Registry;
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Request and connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// A write that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8192,
            max_body: 1024,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(5),
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
    /// Forward `user-data` (`--allow-user-data`); refused by default.
    pub forward_user_data: bool,
    /// Forward the node's signed identity (`--allow-instance-identity-signature`).
    pub forward_identity_signature: bool,
    /// The per-source-address connection cap, over all workers.
    pub sources: &'static SourceLimiter,
    /// The last `/metrics` rendering, shared by every scrape younger than `metrics_max_age`.
    pub metrics_cache: ArcSwapOption<RenderedMetrics>,
    /// Set while one worker renders `/metrics`; the others serve the previous rendering.
    pub metrics_rendering: AtomicBool,
    pub metrics_max_age: Duration,
    /// Set for a while after a listener handover: workers also sweep their listener's queue
    /// (`server::sweep`), for a connection whose wake-up the previous process took with it.
    pub sweeping: AtomicBool,
    /// Node-side readiness (with --iptables: the rule is installed); `/ready` needs it and
    /// the resolver's first publish.
    pub node_ready: Arc<AtomicBool>,
    /// Set on SIGTERM/SIGINT: stop accepting, finish in-flight requests.
    pub stopping: Arc<AtomicBool>,
    pub shutdown_grace: Duration,
}

/// One `/metrics` rendering, in both formats.
pub struct RenderedMetrics {
    pub at: Instant,
    pub openmetrics: String,
    pub classic: Vec<u8>,
}

impl Shared {
    /// `/metrics`, rendered at most once per `metrics_max_age` in the whole process: a flood
    /// of scrapes costs copies, not renders. While one worker renders, the others answer with
    /// the previous rendering (or render their own when there is none yet).
    pub fn rendered_metrics(&self) -> Arc<RenderedMetrics> {
        let now = Instant::now();
        let cached = self.metrics_cache.load_full();
        if let Some(c) = &cached
            && now.duration_since(c.at) < self.metrics_max_age
        {
            return c.clone();
        }
        let mine = self
            .metrics_rendering
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !mine && let Some(c) = cached {
            return c;
        }
        let r = Arc::new(self.render_metrics(now));
        if mine {
            self.metrics_cache.store(Some(r.clone()));
            self.metrics_rendering.store(false, Ordering::Release);
        }
        r
    }

    fn render_metrics(&self, at: Instant) -> RenderedMetrics {
        self.metrics.metrics_renders.inc();
        // Sized from the last rendering: with many roles the exposition is megabytes, and
        // growing a String by doubling would hold up to twice that.
        let hint = self
            .metrics_cache
            .load()
            .as_ref()
            .map_or(16 * 1024, |c| c.openmetrics.len());
        let mut openmetrics = String::with_capacity(hint + hint / 16);
        let _ = prometheus_client::encoding::text::encode(&mut openmetrics, &self.registry);
        let converted = crate::metrics::Classic::new(&openmetrics);
        let mut classic = Vec::with_capacity(converted.len());
        converted.write_into(&mut classic);
        RenderedMetrics {
            at,
            openmetrics,
            classic,
        }
    }
}

/// One open connection as its worker sees it.
#[derive(Debug)]
pub struct ConnState {
    fd: RawFd,
    /// 0 while the connection has a request in progress; else the worker's idle sequence
    /// number when it started waiting for the next request (smaller: idle for longer).
    idle_since: Cell<u64>,
    evicted: Cell<bool>,
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
    open: RefCell<ahash::AHashMap<u64, Rc<ConnState>>>,
    next_conn: Cell<u64>,
    idle_seq: Cell<u64>,
    /// Connections shut down to make room, not yet closed by their task.
    evicting: Cell<usize>,
    /// Connections accepted whose task has not run yet (a stopping worker waits for them).
    starting: Cell<usize>,
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
            idle_seq: Cell::new(0),
            evicting: Cell::new(0),
            starting: Cell::new(0),
            bufs: RefCell::new(Vec::new()),
            shared,
        }
    }

    /// The identity behind `ip` in the current snapshot (no lock, no wait).
    #[inline]
    pub fn identity(&self, ip: &IpAddr) -> Option<Arc<Identity>> {
        self.reader.borrow_mut().load().get(ip).cloned()
    }

    /// Runs `f` on the identity behind `ip` in the current snapshot, borrowed: no reference
    /// count is taken, a count every worker serving that pod would write. `f` must not call
    /// back into the snapshot reader (it holds it).
    #[inline]
    pub fn with_identity<R>(&self, ip: &IpAddr, f: impl FnOnce(&Arc<Identity>) -> R) -> Option<R> {
        self.reader.borrow_mut().load().get(ip).map(f)
    }

    /// Whether `ip` is a known pod, waiting for it (as [`Worker::wait_identity`]) if not yet.
    pub async fn wait_known(&self, ip: IpAddr) -> bool {
        self.with_identity(&ip, |_| ()).is_some() || self.wait_for(ip).await.is_some()
    }

    /// Waits for `ip` to appear, up to `--backoff-max-elapsed-time`.
    pub async fn wait_identity(&self, ip: IpAddr) -> Option<Arc<Identity>> {
        if let Some(id) = self.identity(&ip) {
            return Some(id);
        }
        self.wait_for(ip).await
    }

    /// Waits for `ip`, not in the current snapshot, to appear.
    async fn wait_for(&self, ip: IpAddr) -> Option<Arc<Identity>> {
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

    /// A connection was accepted; its task will call [`Worker::track`].
    pub fn starting(&self) {
        self.starting.set(self.starting.get() + 1);
    }

    /// Connections accepted and not yet closed, whether or not their task has run.
    pub fn unfinished_connections(&self) -> usize {
        self.open.borrow().len() + self.starting.get()
    }

    /// Open connections that are not already being closed to make room.
    pub fn live_connections(&self) -> usize {
        self.open.borrow().len() - self.evicting.get()
    }

    /// Closes the connection that has waited longest for its next request (a keep-alive
    /// connection between requests); false when every connection is mid-request.
    pub fn evict_idlest(&self) -> bool {
        let open = self.open.borrow();
        let idlest = open
            .values()
            .filter(|c| c.idle_since.get() != 0 && !c.evicted.get())
            .min_by_key(|c| c.idle_since.get());
        let Some(c) = idlest else { return false };
        c.evicted.set(true);
        self.evicting.set(self.evicting.get() + 1);
        // Its pending read sees EOF and the connection's task ends as after a peer close.
        let _ = nix::sys::socket::shutdown(c.fd, nix::sys::socket::Shutdown::Both);
        true
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
    /// are not the usual size, e.g. one left empty by an operation that still held it).
    pub fn give_bufs(&self, mut r: Vec<u8>, mut o: Vec<u8>, rcap: usize, out_keep: usize) {
        let mut pool = self.bufs.borrow_mut();
        let usable = r.capacity() == rcap && (1..=out_keep).contains(&o.capacity());
        if pool.len() < MAX_POOLED_BUFS && usable {
            r.clear();
            o.clear();
            pool.push((r, o));
        }
    }

    pub fn track(&self, fd: RawFd) -> ConnGuard<'_> {
        self.starting.set(self.starting.get().saturating_sub(1));
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        let state = Rc::new(ConnState {
            fd,
            idle_since: Cell::new(0),
            evicted: Cell::new(false),
        });
        self.open.borrow_mut().insert(id, state.clone());
        ConnGuard {
            worker: self,
            id,
            state,
        }
    }

    /// Shuts down the read side of every connection waiting for a request: it reads what
    /// the client already sent (a shut-down read still returns queued data) and then sees
    /// EOF, so an idle keep-alive connection closes and a fresh one still gets its request
    /// answered. Busy ones are left alone: they answer with `Connection: close` (the worker
    /// is stopping) and close then.
    pub fn close_reads(&self) {
        for c in self.open.borrow().values() {
            if c.idle_since.get() != 0 {
                let _ = nix::sys::socket::shutdown(c.fd, nix::sys::socket::Shutdown::Read);
            }
        }
    }
}

/// Untracks a connection when dropped.
pub struct ConnGuard<'a> {
    worker: &'a Worker,
    id: u64,
    state: Rc<ConnState>,
}

impl ConnGuard<'_> {
    /// The connection waits for its next request (true) or has one in progress (false).
    #[inline]
    pub fn set_idle(&self, idle: bool) {
        let seq = if idle {
            let n = self.worker.idle_seq.get() + 1;
            self.worker.idle_seq.set(n);
            n
        } else {
            0
        };
        self.state.idle_since.set(seq);
    }
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.worker.open.borrow_mut().remove(&self.id);
        if self.state.evicted.get() {
            self.worker.evicting.set(self.worker.evicting.get() - 1);
        }
    }
}
