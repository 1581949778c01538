//! The handle the data plane uses: a lock-free snapshot reader, waiting for an IP, and
//! readiness. No tokio or kube type appears in its public signatures.

use crate::snapshot::{Identity, Snapshot};
use arc_swap::{ArcSwap, Cache};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) snapshot: Arc<ArcSwap<Snapshot>>,
    pub(crate) published: Notify,
    ready: AtomicBool,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            published: Notify::new(),
            ready: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

/// Cheap to clone; shared by every worker.
#[derive(Clone, Debug)]
pub struct Handle {
    shared: Arc<Shared>,
}

/// A per-worker snapshot reader (an `arc_swap::Cache`: one pointer compare per load).
pub struct SnapshotReader {
    cache: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
}

impl SnapshotReader {
    #[inline]
    pub fn load(&mut self) -> &Arc<Snapshot> {
        self.cache.load()
    }
}

impl Handle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Handle { shared }
    }

    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader {
            cache: Cache::new(self.shared.snapshot.clone()),
        }
    }

    /// The current snapshot (allocation-free, but takes a reference count).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// True once the first full list has been published.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Resolves when a published snapshot maps `ip`. Sleeps on the resolver's publish
    /// notification; callers bound it with a timeout.
    pub async fn wait_for_ip(&self, ip: IpAddr) -> Arc<Identity> {
        loop {
            let notified = self.shared.published.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(id) = self.shared.snapshot.load().get(&ip) {
                return id.clone();
            }
            notified.await;
        }
    }

    /// The index as JSON (`--debug` only): IP → namespace, pod, role.
    pub fn store_json(&self) -> String {
        let snap = self.snapshot();
        let mut rows: Vec<_> = snap
            .iter()
            .map(|(ip, id)| {
                serde_json::json!({
                    "ip": ip.to_string(),
                    "namespace": id.namespace,
                    "pod": id.pod,
                    "role": id.role.as_ref().map(|r| r.arn.clone()),
                })
            })
            .collect();
        rows.sort_by(|a, b| a["ip"].as_str().cmp(&b["ip"].as_str()));
        serde_json::to_string_pretty(&rows).unwrap_or_default()
    }
}
