//! The resolver's state machine without a resolver thread, a Kubernetes client or STS: pods
//! in, snapshots out. For benchmarks and tests outside this crate; credential prefetches
//! are queued and never run.

use crate::handle::{Handle, Shared};
use crate::metrics::ResolverMetrics;
use crate::pod::{NamespaceInfo, PodInfo};
use crate::restrict::NamespaceRestrictions;
use crate::roles::RoleRules;
use crate::state::State;
use crate::{CredSlot, Snapshot};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Index + incremental publisher + handle, driven by hand.
pub struct Standalone {
    state: State,
    shared: Arc<Shared>,
    prefetches: mpsc::UnboundedReceiver<Arc<CredSlot>>,
}

impl Standalone {
    pub fn new(rules: RoleRules, restrictions: Option<NamespaceRestrictions>) -> Self {
        let (tx, prefetches) = mpsc::unbounded_channel();
        let shared = Shared::new();
        let metrics = ResolverMetrics::register(&mut Registry::default());
        let state = State::new(rules, tx, shared.clone(), metrics).with_restrictions(restrictions);
        Standalone {
            state,
            shared,
            prefetches,
        }
    }

    pub fn apply(&mut self, pod: PodInfo) {
        self.state.index.apply(pod);
    }

    pub fn delete(&mut self, uid: &str) {
        self.state.index.delete(uid);
    }

    pub fn apply_namespace(&mut self, ns: NamespaceInfo) {
        self.state.index.apply_namespace(ns);
    }

    /// Publishes the changes since the last call (if any IP's identity changed).
    pub fn publish(&mut self) {
        self.state.publish();
        while self.prefetches.try_recv().is_ok() {}
    }

    /// The handle the workers would use.
    pub fn handle(&self) -> Handle {
        Handle::new(self.shared.clone())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// The index (e.g. for a full-rebuild comparison).
    pub fn index(&self) -> &crate::index::PodIndex {
        &self.state.index
    }
}
