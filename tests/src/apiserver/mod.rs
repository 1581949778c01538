//! `ApiServer`: a stand-in Kubernetes API server on 127.0.0.1:0 speaking the real list/watch
//! protocol for pods and namespaces, driven by scripted changes, with fault injection.
//!
//! What a kube-rs client sees is what a real API server sends on these paths:
//! - `GET /api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/api/v1/namespaces`: lists with a
//!   non-empty `metadata.resourceVersion`, `fieldSelector`/`labelSelector` filtering (an
//!   unsupported field label is a 400), `limit`/`continue` pages served at one version,
//!   `resourceVersion` semantics (unset: most recent; `0`: any, possibly from a lagging
//!   cache; `N` + `Exact`).
//! - `?watch=true`: chunked newline-delimited events, each object with its resourceVersion,
//!   only changes newer than the requested version (synthetic ADDED events for `""`/`"0"`,
//!   and the `initial-events-end` BOOKMARK with `sendInitialEvents=true`), selector
//!   transitions as ADDED/DELETED, BOOKMARKs with `allowWatchBookmarks=true`,
//!   `timeoutSeconds`, and `410 Expired` delivered *inside* a 200 stream for a compacted
//!   version (an HTTP-level 410 would make kube-runtime retry forever).
//! - events.k8s.io/v1 Event create and merge-patch, recorded for assertions.
//!
//! It starts with the `default` and `kube-system` namespaces (resourceVersions 1 and 2).
//!
//! Faults: dropped streams, a 410 inside open streams, compaction, HTTP 500s, stalled
//! streams, slow lists, re-delivered events and stale `resourceVersion=0` lists (an HA API
//! server whose cache lags: the following watch replays changes the client already saw).
//! Every request is recorded. All threads stop and every socket is shut down on drop.

mod http;
pub mod objects;
pub mod store;

pub use objects::{PodBuilder, k8s_time};
pub use store::{EventType, Kind, Record};

use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use store::World;

/// One request as the stand-in received it (query decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ApiRequest {
    /// The first query parameter called `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }
}

/// Counters of what the stand-in did.
#[derive(Debug, Default)]
pub struct Stats {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    pub bookmarks: AtomicU64,
    /// 410 Expired events sent inside watch streams.
    pub expired_sent: AtomicU64,
    /// Watch streams cut without a final chunk.
    pub dropped: AtomicU64,
    pub duplicates_sent: AtomicU64,
    /// Requests answered with an injected HTTP error.
    pub failures_sent: AtomicU64,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    drop_gen: AtomicU64,
    expire_gen: AtomicU64,
    stall_until: Mutex<Option<Instant>>,
    list_delay: Mutex<Duration>,
    fail_next: Mutex<VecDeque<u16>>,
    /// While set, every request is refused with this status (401 or 403).
    pub(crate) refuse: Mutex<Option<u16>>,
    duplicate_next: AtomicU64,
    pub(crate) stale_lag: AtomicU64,
}

impl Faults {
    pub(crate) fn generations(&self) -> (u64, u64) {
        (
            self.drop_gen.load(Ordering::SeqCst),
            self.expire_gen.load(Ordering::SeqCst),
        )
    }

    pub(crate) fn stalled(&self, now: Instant) -> bool {
        lock(&self.stall_until).is_some_and(|t| now < t)
    }

    pub(crate) fn list_delay(&self) -> Duration {
        *lock(&self.list_delay)
    }

    pub(crate) fn take_duplicate(&self) -> bool {
        self.duplicate_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) bookmark_every: Duration,
    pub(crate) token: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) world: Mutex<World>,
    pub(crate) changed: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) requests: Mutex<Vec<ApiRequest>>,
    pub(crate) events: Mutex<Vec<Value>>,
    pub(crate) faults: Faults,
    pub(crate) stats: Stats,
    pub(crate) opts: Options,
    conns: Mutex<Vec<TcpStream>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn record(&self, req: ApiRequest) {
        lock(&self.requests).push(req);
    }

    /// An injected failure status for this request, if one is queued.
    pub(crate) fn take_failure(&self) -> Option<u16> {
        let code = lock(&self.faults.fail_next).pop_front()?;
        self.stats.failures_sent.fetch_add(1, Ordering::Relaxed);
        Some(code)
    }

    fn notify(&self) {
        let _w = lock(&self.world);
        self.changed.notify_all();
    }
}

/// Options for [`ApiServer`].
#[derive(Debug, Clone)]
pub struct ApiServerBuilder {
    bookmark_every: Duration,
    token: Option<String>,
}

impl Default for ApiServerBuilder {
    fn default() -> Self {
        ApiServerBuilder {
            bookmark_every: Duration::from_secs(1),
            token: None,
        }
    }
}

impl ApiServerBuilder {
    /// How often an idle watch with `allowWatchBookmarks=true` gets a BOOKMARK (default 1 s;
    /// the real server sends one about every minute).
    pub fn bookmark_every(mut self, d: Duration) -> Self {
        self.bookmark_every = d;
        self
    }

    /// Require `Authorization: Bearer <token>` (401 otherwise).
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn start(self) -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stand-in API server");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            world: Mutex::new(World::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            requests: Mutex::default(),
            events: Mutex::default(),
            faults: Faults::default(),
            stats: Stats::default(),
            opts: Options {
                bookmark_every: self.bookmark_every,
                token: self.token,
            },
            conns: Mutex::default(),
        });
        {
            // Every cluster has these; they also make the first resourceVersion non-trivial.
            let mut w = lock(&shared.world);
            for ns in ["default", "kube-system"] {
                let uid = w.new_uid();
                let obj = objects::namespace_json(ns, &uid, objects::now_unix(), &BTreeMap::new());
                w.commit((Kind::Namespace, String::new(), ns.to_owned()), Some(obj));
            }
        }
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("apiserver-accept".into())
            .spawn(move || accept_loop(listener, s))
            .expect("spawn accept thread");
        ApiServer {
            addr,
            shared,
            accept: Some(accept),
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        if let Ok(c) = stream.try_clone() {
            lock(&shared.conns).push(c);
        }
        let s = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("apiserver-conn".into())
            .spawn(move || http::serve(stream, &s));
    }
}

/// A created object: its UID and the resourceVersion of the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub uid: String,
    pub rv: u64,
}

// === impl ApiServer ===

/// A running stand-in API server; stops and closes every connection on drop.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ApiServer {
    pub fn builder() -> ApiServerBuilder {
        ApiServerBuilder::default()
    }

    /// A stand-in with default options.
    pub fn start() -> ApiServer {
        ApiServer::builder().start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `--api-server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.shared.world)
    }

    /// Commits a change and wakes the watches.
    fn commit(&self, w: &mut World, key: store::Key, obj: Option<Value>) -> Option<u64> {
        let rv = w.commit(key, obj);
        self.shared.changed.notify_all();
        rv
    }

    // --- scripted changes ---

    /// Creates a pod (a fresh UID unless the builder sets one; creationTimestamp now unless
    /// set). Panics if it exists.
    pub fn create_pod(&self, pod: &PodBuilder) -> Created {
        let mut w = self.world();
        let key = (Kind::Pod, pod.namespace.clone(), pod.name.clone());
        assert!(
            w.get(&key).is_none(),
            "pod {}/{} exists",
            pod.namespace,
            pod.name
        );
        let uid = pod.uid.clone().unwrap_or_else(|| w.new_uid());
        let created = pod.created.unwrap_or_else(objects::now_unix);
        let obj = pod.to_json(&uid, created);
        let rv = self
            .commit(&mut w, key, Some(obj))
            .expect("a create is a change");
        Created { uid, rv }
    }

    /// Changes a pod in place (`f` edits the stored object); returns the new version.
    /// Panics if the pod does not exist.
    pub fn update_pod(&self, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) -> u64 {
        let mut w = self.world();
        let key = (Kind::Pod, namespace.to_owned(), name.to_owned());
        let mut obj = w
            .get(&key)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"))
            .clone();
        f(&mut obj);
        self.commit(&mut w, key, Some(obj))
            .expect("an update is a change")
    }

    /// Sets `status.phase`.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> u64 {
        self.update_pod(namespace, name, |p| p["status"]["phase"] = phase.into())
    }

    /// Starts a graceful deletion (sets `metadata.deletionTimestamp`).
    pub fn mark_terminating(&self, namespace: &str, name: &str) -> u64 {
        self.update_pod(namespace, name, |p| {
            p["metadata"]["deletionTimestamp"] = k8s_time(objects::now_unix() + 30).into();
            p["metadata"]["deletionGracePeriodSeconds"] = 30.into();
        })
    }

    /// Deletes a pod; `None` if it did not exist.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<u64> {
        let mut w = self.world();
        let key = (Kind::Pod, namespace.to_owned(), name.to_owned());
        self.commit(&mut w, key, None)
    }

    /// Creates or replaces a namespace with exactly these annotations.
    pub fn set_namespace(&self, name: &str, annotations: &[(&str, &str)]) -> u64 {
        let mut w = self.world();
        let key = (Kind::Namespace, String::new(), name.to_owned());
        let (uid, created) = match w.get(&key) {
            Some(v) => (
                v["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
                objects::now_unix(),
            ),
            None => (w.new_uid(), objects::now_unix()),
        };
        let ann: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let obj = objects::namespace_json(name, &uid, created, &ann);
        self.commit(&mut w, key, Some(obj))
            .expect("a namespace write is a change")
    }

    pub fn delete_namespace(&self, name: &str) -> Option<u64> {
        let mut w = self.world();
        let key = (Kind::Namespace, String::new(), name.to_owned());
        self.commit(&mut w, key, None)
    }

    /// The last committed resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.world().rv
    }

    /// Every change so far, in resourceVersion order.
    pub fn log(&self) -> Vec<Record> {
        self.world().log.clone()
    }

    /// A pod as stored now.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.world()
            .get(&(Kind::Pod, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    // --- faults ---

    /// Cuts every open watch stream without a final chunk (a broken connection).
    pub fn drop_watches(&self) {
        self.shared.faults.drop_gen.fetch_add(1, Ordering::SeqCst);
        self.shared.notify();
    }

    /// Sends `410 Expired` inside every open watch stream and ends it.
    pub fn expire_watches(&self) {
        self.shared.faults.expire_gen.fetch_add(1, Ordering::SeqCst);
        self.shared.notify();
    }

    /// Compacts history up to now: a watch from an older version gets 410 Expired (inside
    /// the stream), an old `continue` token an HTTP 410.
    pub fn compact(&self) {
        let mut w = self.world();
        w.compacted = w.rv;
    }

    /// The next `n` list or watch requests get HTTP `code` (e.g. 500) with a Status body.
    pub fn fail_next(&self, n: usize, code: u16) {
        lock(&self.shared.faults.fail_next).extend(std::iter::repeat_n(code, n));
    }

    /// Refuses every request with `code` (401: the token is not accepted; 403: RBAC not
    /// applied), as a real API server does, until called with `None`.
    pub fn refuse(&self, code: Option<u16>) {
        *lock(&self.shared.faults.refuse) = code;
    }

    /// Open watch streams send nothing for `d` (changes queue up, then flow).
    pub fn stall_watches(&self, d: Duration) {
        *lock(&self.shared.faults.stall_until) = Some(Instant::now() + d);
    }

    /// Lists answer only after `d`.
    pub fn delay_lists(&self, d: Duration) {
        *lock(&self.shared.faults.list_delay) = d;
    }

    /// The next `n` watch events are each delivered twice.
    pub fn duplicate_next(&self, n: u64) {
        self.shared
            .faults
            .duplicate_next
            .fetch_add(n, Ordering::SeqCst);
    }

    /// `resourceVersion=0` lists are served `lag` versions behind (a lagging cache).
    pub fn stale_lists(&self, lag: u64) {
        self.shared.faults.stale_lag.store(lag, Ordering::SeqCst);
    }

    // --- what happened ---

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ApiRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Events created through events.k8s.io (as patched since).
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared.events).clone()
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.notify();
        for c in lock(&self.shared.conns).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        // Unblock accept(); the loop sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
