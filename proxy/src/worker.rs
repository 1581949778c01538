//! Process-wide settings shared by the workers, and each worker's own state.

use crate::conns::ConnTable;
use crate::metrics::WorkerMetrics;
use crate::notify::LocalNotify;
use crate::upstream::Upstream;
use iamlet_resolver::creds::{CredAnswer, CredSlot};
use iamlet_resolver::{Identity, Snapshot, SnapshotReader};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use crate::shared::{Limits, Shared, UpstreamConfig};

/// Most bytes of answers a worker holds unwritten over all its connections: past it, a
/// connection with answers pending writes them before answering more of its pipelined
/// requests, so what clients send and do not read costs a bounded amount of memory.
pub const WORKER_OUT_BUDGET: usize = 4 << 20;

/// One bounded wait for an address to become a known pod, shared by every request from that
/// address on this worker: one wait on the resolver, however many requests wait.
#[derive(Default)]
struct IpWait {
    /// `Some` once finished: the pod, or `None` when the wait ran out.
    result: RefCell<Option<Option<Arc<Identity>>>>,
    done: LocalNotify,
    waiters: Cell<usize>,
    /// Set when the last waiter left before the wait finished: nobody needs it any more.
    abandoned: Cell<bool>,
    abandon: LocalNotify,
}

type IpWaits = Rc<RefCell<ahash::AHashMap<IpAddr, Rc<IpWait>>>>;

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
    /// The snapshot [`Worker::snapshot`] hands out until the reader has a newer one. The
    /// `Rc` is the point: its count is this thread's alone (one allocation per snapshot).
    #[allow(clippy::redundant_allocation)]
    current: RefCell<Rc<Arc<Snapshot>>>,
    conns: RefCell<ConnTable>,
    /// Bytes of answers written into connections' output buffers and not yet sent.
    pending_out: Cell<usize>,
    ip_waits: IpWaits,
    /// Read and output buffers of closed connections, reused by new ones (a new connection
    /// per request is what SDKs do; this saves two allocations of ~9 and 4 KiB per request).
    bufs: RefCell<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Service-account tokens this worker verified, and sources' failed verifications.
    pub tokens: RefCell<crate::container::TokenMemory>,
}

/// Most idle buffer pairs a worker keeps (~13 KiB each).
const MAX_POOLED_BUFS: usize = 256;

impl Worker {
    pub fn new(shared: Arc<Shared>, admin_only: bool) -> Self {
        let u = &shared.settings.upstream;
        let metrics = shared.metrics.worker();
        let opened = metrics.upstream_opened();
        Worker {
            metrics,
            current: RefCell::new(Rc::new(shared.handle.reader().load().clone())),
            reader: RefCell::new(shared.handle.reader()),
            upstream: Upstream::new(
                u.addr,
                u.host.clone(),
                u.connect_timeout,
                u.response_timeout,
                opened,
            ),
            allow_paths: shared.settings.allow_paths.clone(),
            admin_only,
            conns: RefCell::new(ConnTable::new()),
            pending_out: Cell::new(0),
            ip_waits: Rc::default(),
            bufs: RefCell::new(Vec::new()),
            tokens: RefCell::default(),
            shared,
        }
    }

    /// The current snapshot, for one request: a worker-local handle (no lock, and no count
    /// shared with other workers is written: a pod served by every worker would otherwise
    /// bounce its identity's count between their caches). Holding it across a wait only
    /// keeps that snapshot alive a little longer.
    #[inline]
    #[allow(clippy::redundant_allocation)]
    pub fn snapshot(&self) -> Rc<Arc<Snapshot>> {
        let mut reader = self.reader.borrow_mut();
        let latest = reader.load();
        let mut current = self.current.borrow_mut();
        if !Arc::ptr_eq(&current, latest) {
            *current = Rc::new(latest.clone());
        }
        current.clone()
    }

    /// The identity behind `ip` in the current snapshot (no lock, no wait).
    #[inline]
    pub fn identity(&self, ip: &IpAddr) -> Option<Arc<Identity>> {
        self.snapshot().get(ip).cloned()
    }

    /// Whether `ip` is a known pod now.
    #[inline]
    pub fn is_known(&self, ip: &IpAddr) -> bool {
        self.snapshot().get(ip).is_some()
    }

    /// The credentials in `slot`, fetched now if it has none fresh, within `--backoff-max-elapsed-time`
    /// (`None` past it). Boxed, like [`Worker::wait_for`]: few requests wait.
    pub fn fetch(
        &self,
        slot: &Arc<CredSlot>,
    ) -> Pin<Box<impl Future<Output = Option<Arc<CredAnswer>>> + '_>> {
        let (bound, slot) = (self.shared.settings.wait_ip, slot.clone());
        Box::pin(async move { monoio::time::timeout(bound, slot.get()).await.ok() })
    }

    /// Whether `ip` is a known pod, waiting for it (as [`Worker::wait_identity`]) if not yet.
    pub async fn wait_known(&self, ip: IpAddr) -> bool {
        self.is_known(&ip) || self.wait_for(ip).await.is_some()
    }

    /// Waits for `ip` to appear, up to `--backoff-max-elapsed-time`.
    pub async fn wait_identity(&self, ip: IpAddr) -> Option<Arc<Identity>> {
        if let Some(id) = self.identity(&ip) {
            return Some(id);
        }
        self.wait_for(ip).await
    }

    /// Waits for `ip`, not in the current snapshot, to appear: joins the wait already under
    /// way for `ip` on this worker (ending when it ends) or starts one. Boxed: few requests
    /// wait, and inline the wait's state would be part of every request's future, moved and
    /// copied with it.
    pub fn wait_for(
        &self,
        ip: IpAddr,
    ) -> Pin<Box<impl Future<Output = Option<Arc<Identity>>> + '_>> {
        Box::pin(self.wait_for_inline(ip))
    }

    async fn wait_for_inline(&self, ip: IpAddr) -> Option<Arc<Identity>> {
        let wait = self.ip_wait(ip);
        wait.waiters.set(wait.waiters.get() + 1);
        let _leave = Leave(&wait);
        let found = loop {
            let done = wait.done.notified();
            if let Some(r) = &*wait.result.borrow() {
                break r.clone();
            }
            done.await;
        };
        match found {
            Some(id) => {
                self.metrics.ip_found.inc();
                Some(id)
            }
            None => {
                self.metrics.ip_timeout.inc();
                None
            }
        }
    }

    /// The wait under way for `ip`, or a new one: a task on this worker waits on the
    /// resolver, bounded, and wakes every request waiting for `ip` when it ends.
    fn ip_wait(&self, ip: IpAddr) -> Rc<IpWait> {
        if let Some(w) = self.ip_waits.borrow().get(&ip)
            && !w.abandoned.get()
        {
            return w.clone();
        }
        let wait = Rc::new(IpWait::default());
        self.ip_waits.borrow_mut().insert(ip, wait.clone());
        let (w, waits) = (wait.clone(), self.ip_waits.clone());
        let (handle, bound) = (self.shared.handle.clone(), self.shared.settings.wait_ip);
        monoio::spawn(async move {
            let abandoned = async {
                let n = w.abandon.notified();
                if !w.abandoned.get() {
                    n.await;
                }
            };
            let found = monoio::select! {
                r = monoio::time::timeout(bound, handle.wait_for_ip(ip)) => Some(r.ok()),
                _ = abandoned => None,
            };
            let mut all = waits.borrow_mut();
            if all.get(&ip).is_some_and(|x| Rc::ptr_eq(x, &w)) {
                all.remove(&ip);
            }
            drop(all);
            *w.result.borrow_mut() = Some(found.flatten());
            w.done.notify_all();
        });
        wait
    }

    /// Addresses with a wait under way on this worker (for tests and debugging).
    pub fn ip_waits(&self) -> usize {
        self.ip_waits.borrow().len()
    }

    pub fn stopping(&self) -> bool {
        self.shared.life.stopping.load(Ordering::Relaxed)
    }

    /// Connections accepted and not yet closed, whether or not their task has run.
    pub fn unfinished_connections(&self) -> usize {
        self.conns.borrow().open()
    }

    /// Open connections that are not already being closed to make room.
    pub fn live_connections(&self) -> usize {
        self.conns.borrow().live()
    }

    /// Open connections from sources that were not known pods when accepted.
    pub fn stranger_connections(&self) -> usize {
        self.conns.borrow().strangers()
    }

    /// Closes one connection to make room, in [`ConnTable::evict`]'s order (a stranger, then
    /// the longest-idle keep-alive); false when every connection is a pod's busy one.
    /// Room for a stranger (`for_stranger`) is only ever made by another stranger.
    pub fn evict_one(&self, for_stranger: bool) -> bool {
        let Some(fd) = self.conns.borrow_mut().evict(for_stranger) else {
            return false;
        };
        // Its pending read sees EOF and the connection's task ends as after a peer close.
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        true
    }

    /// Bytes of answers not yet sent, over the worker's connections.
    pub fn pending_out(&self) -> usize {
        self.pending_out.get()
    }

    /// `n` bytes of answers are about to be written (`true`) or are done with (`false`).
    pub fn hold_out(&self, n: usize, held: bool) {
        let p = self.pending_out.get();
        self.pending_out
            .set(if held { p + n } else { p.saturating_sub(n) });
    }

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

    /// Tracks a connection from the moment it is admitted (`stranger`: its source was not a
    /// known pod), before its task first runs: the caps count a burst of accepted
    /// connections at once, not only those whose tasks have started. The returned guard
    /// untracks it.
    pub fn track(self: &Rc<Self>, fd: RawFd, stranger: bool) -> ConnGuard {
        let id = self.conns.borrow_mut().insert(fd, stranger);
        ConnGuard {
            worker: self.clone(),
            id,
        }
    }

    /// Shuts down the read side of every connection waiting for a request: it reads what
    /// the client already sent (a shut-down read still returns queued data) and then sees
    /// EOF, so an idle keep-alive connection closes and a fresh one still gets its request
    /// answered. Busy ones are left alone: they answer with `Connection: close` (the worker
    /// is stopping) and close then.
    pub fn close_reads(&self) {
        for fd in self.conns.borrow().idle_fds() {
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
        }
    }
}

/// Leaves a shared [`IpWait`]; the last waiter to leave an unfinished wait ends it.
struct Leave<'a>(&'a IpWait);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let w = self.0;
        w.waiters.set(w.waiters.get() - 1);
        if w.waiters.get() == 0 && w.result.borrow().is_none() {
            w.abandoned.set(true);
            w.abandon.notify_all();
        }
    }
}

/// A tracked connection, and its worker; untracks the connection when dropped.
pub struct ConnGuard {
    worker: Rc<Worker>,
    id: u32,
}

impl ConnGuard {
    pub fn worker(&self) -> &Rc<Worker> {
        &self.worker
    }

    /// The connection waits for its next request (true) or has one in progress (false).
    #[inline]
    pub fn set_idle(&self, idle: bool) {
        self.worker.conns.borrow_mut().set_idle(self.id, idle);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.worker.conns.borrow_mut().remove(self.id);
    }
}
