//! Turns the pod index into snapshots: resolves roles, keeps one credential slot per key for
//! live pods (prefetching new ones), and publishes only when the mapping changed.

use crate::creds::{CredKey, CredSlot};
use crate::handle::Shared;
use crate::index::PodIndex;
use crate::metrics::ResolverMetrics;
use crate::roles::RoleRules;
use crate::snapshot::{Identity, RoleEntry, Snapshot};
use ahash::AHashMap;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The resolver's mutable state; lives on the resolver thread only.
pub(crate) struct State {
    pub(crate) index: PodIndex,
    rules: RoleRules,
    roles: AHashMap<CredKey, Arc<RoleEntry>>,
    requests: mpsc::UnboundedSender<Arc<CredSlot>>,
    shared: Arc<Shared>,
    metrics: ResolverMetrics,
}

impl State {
    pub(crate) fn new(
        rules: RoleRules,
        requests: mpsc::UnboundedSender<Arc<CredSlot>>,
        shared: Arc<Shared>,
        metrics: ResolverMetrics,
    ) -> Self {
        State {
            index: PodIndex::default(),
            rules,
            roles: AHashMap::new(),
            requests,
            shared,
            metrics,
        }
    }

    /// Builds a snapshot from the index; new credential keys are prefetched.
    pub(crate) fn build(&mut self) -> Snapshot {
        let owners = self.index.owners();
        let mut by_ip = AHashMap::with_capacity(owners.len());
        let mut identities: AHashMap<&str, Arc<Identity>> = AHashMap::new();
        let mut live: AHashMap<CredKey, Arc<RoleEntry>> = AHashMap::new();
        for (ip, pod) in owners {
            let id = identities
                .entry(pod.uid.as_str())
                .or_insert_with(|| {
                    let role = self.rules.resolve(pod.role.as_deref()).map(|arn| {
                        let key = CredKey {
                            role_arn: arn,
                            external_id: pod.external_id.clone(),
                        };
                        live.entry(key.clone())
                            .or_insert_with(|| match self.roles.get(&key) {
                                Some(e) => e.clone(),
                                None => {
                                    let listing = Bytes::from(
                                        self.rules.listing_name(&key.role_arn).to_owned(),
                                    );
                                    let slot = CredSlot::new(key.clone(), self.requests.clone());
                                    slot.request(); // prefetch: the pod's first ask is a cache hit
                                    Arc::new(RoleEntry {
                                        arn: key.role_arn.clone(),
                                        listing,
                                        slot,
                                    })
                                }
                            })
                            .clone()
                    });
                    Arc::new(Identity {
                        uid: pod.uid.clone(),
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        role,
                    })
                })
                .clone();
            by_ip.insert(ip, id);
        }
        let pods = identities.len();
        self.roles = live;
        self.metrics.set_index(pods, by_ip.len(), self.roles.len());
        Snapshot::new(by_ip, pods)
    }

    /// Builds and publishes if anything changed; always marks the store ready.
    pub(crate) fn publish(&mut self) {
        let next = self.build();
        let changed = !self.shared.snapshot.load().same_as(&next);
        if changed || !self.shared.is_ready() {
            self.shared.snapshot.store(Arc::new(next));
            self.shared.mark_ready();
            self.shared.published.notify_waiters();
            self.metrics.published();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::{Phase, PodInfo};
    use prometheus_client::registry::Registry;

    fn pod(uid: &str, ip: &str, role: Option<&str>, ext: Option<&str>) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            ips: vec![ip.parse().unwrap()],
            phase: Phase::Running,
            host_network: false,
            created: 1,
            terminating: false,
            role: role.map(Into::into),
            external_id: ext.map(Into::into),
            service_account: None,
        }
    }

    fn state() -> (State, mpsc::UnboundedReceiver<Arc<CredSlot>>, Arc<Shared>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Shared::new();
        let rules = RoleRules::new(Some("arn:aws:iam::123456789012:role/"), None).unwrap();
        let m = ResolverMetrics::register(&mut Registry::default());
        (State::new(rules, tx, shared.clone(), m), rx, shared)
    }

    #[test]
    fn pods_sharing_a_key_share_one_slot_and_one_prefetch() {
        let (mut st, mut rx, shared) = state();
        st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
        st.index.apply(pod("b", "10.0.0.2", Some("app"), None));
        st.index
            .apply(pod("c", "10.0.0.3", Some("app"), Some("tenant-2")));
        st.index.apply(pod("d", "10.0.0.4", None, None));
        st.publish();
        let snap = shared.snapshot.load();
        let role = |ip: &str| snap.get(&ip.parse().unwrap()).unwrap().role.clone();
        let (a, b, c) = (
            role("10.0.0.1").unwrap(),
            role("10.0.0.2").unwrap(),
            role("10.0.0.3").unwrap(),
        );
        assert!(Arc::ptr_eq(&a, &b));
        assert!(
            !Arc::ptr_eq(&a.slot, &c.slot),
            "external ID must be part of the key"
        );
        assert_eq!(&a.listing[..], b"app");
        assert!(role("10.0.0.4").is_none());
        let mut fetched = 0;
        while rx.try_recv().is_ok() {
            fetched += 1;
        }
        assert_eq!(fetched, 2);
    }

    #[test]
    fn unchanged_state_is_not_republished_and_slots_survive() {
        let (mut st, mut rx, shared) = state();
        st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
        st.publish();
        let first = shared.snapshot.load_full();
        st.publish();
        assert!(Arc::ptr_eq(&first, &shared.snapshot.load_full()));
        st.index.apply(pod("b", "10.0.0.2", Some("app"), None));
        st.publish();
        let second = shared.snapshot.load_full();
        assert!(!Arc::ptr_eq(&first, &second));
        let slot = |s: &Snapshot, ip: &str| {
            s.get(&ip.parse().unwrap())
                .unwrap()
                .role
                .clone()
                .unwrap()
                .slot
                .clone()
        };
        assert!(Arc::ptr_eq(
            &slot(&first, "10.0.0.1"),
            &slot(&second, "10.0.0.2")
        ));
        assert!(rx.try_recv().is_ok());
        assert!(
            rx.try_recv().is_err(),
            "an existing key must not be fetched again"
        );
    }
}
