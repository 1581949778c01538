//! The pod index: a pure state machine of the node's pods (`apply`, `delete`, `reset`),
//! and the rule that picks one owner per IP. No IO.

use crate::pod::{NamespaceInfo, Phase, PodInfo};
use ahash::AHashMap;
use std::net::IpAddr;

/// Every pod and namespace the source reported, keyed by UID / name.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: AHashMap<String, PodInfo>,
    namespaces: AHashMap<String, NamespaceInfo>,
}

impl PodIndex {
    /// Adds or replaces a pod (by UID). Terminal pods are removed.
    pub fn apply(&mut self, pod: PodInfo) {
        if pod.phase == Phase::Terminal {
            self.pods.remove(&pod.uid);
        } else {
            self.pods.insert(pod.uid.clone(), pod);
        }
    }

    /// Removes a pod by UID.
    pub fn delete(&mut self, uid: &str) {
        self.pods.remove(uid);
    }

    /// Replaces every pod (a relist).
    pub fn reset(&mut self, pods: impl IntoIterator<Item = PodInfo>) {
        self.pods.clear();
        for p in pods {
            self.apply(p);
        }
    }

    pub fn apply_namespace(&mut self, ns: NamespaceInfo) {
        self.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn delete_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn reset_namespaces(&mut self, nss: impl IntoIterator<Item = NamespaceInfo>) {
        self.namespaces = nss.into_iter().map(|n| (n.name.clone(), n)).collect();
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.get(name)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// One owner per IP: hostNetwork and terminal pods never own one; otherwise Running beats
    /// Pending/Unknown, then the newer creationTimestamp, then the UID (deterministic).
    pub fn owners(&self) -> AHashMap<IpAddr, &PodInfo> {
        let mut owners: AHashMap<IpAddr, &PodInfo> = AHashMap::with_capacity(self.pods.len());
        for pod in self.pods.values().filter(|p| p.is_mappable()) {
            for ip in &pod.ips {
                owners
                    .entry(*ip)
                    .and_modify(|cur| {
                        if rank(pod) > rank(cur) {
                            *cur = pod;
                        }
                    })
                    .or_insert(pod);
            }
        }
        owners
    }
}

fn rank(p: &PodInfo) -> (bool, i64, &str) {
    (p.phase == Phase::Running, p.created, p.uid.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn mk_pod(uid: &str, ip: &str, phase: Phase, created: i64) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: format!("pod-{uid}"),
            ips: vec![ip.parse().unwrap()],
            phase,
            host_network: false,
            created,
            terminating: false,
            role: Some(format!("role-{uid}")),
            external_id: None,
            service_account: None,
        }
    }

    fn owner_of<'a>(idx: &'a PodIndex, ip: &str) -> Option<&'a str> {
        idx.owners()
            .get(&ip.parse::<IpAddr>().unwrap())
            .map(|p| p.uid.as_str())
    }

    #[test]
    fn pod_with_ip_is_indexed_and_delete_removes_it() {
        let mut idx = PodIndex::default();
        idx.apply(mk_pod("a", "10.0.0.1", Phase::Running, 1));
        assert_eq!(owner_of(&idx, "10.0.0.1"), Some("a"));
        idx.delete("a");
        assert_eq!(owner_of(&idx, "10.0.0.1"), None);
    }

    #[test]
    fn running_beats_pending_then_newer_wins() {
        let mut idx = PodIndex::default();
        idx.apply(mk_pod("old-running", "10.0.0.1", Phase::Running, 1));
        idx.apply(mk_pod("new-pending", "10.0.0.1", Phase::Pending, 5));
        assert_eq!(owner_of(&idx, "10.0.0.1"), Some("old-running"));
        idx.apply(mk_pod("new-running", "10.0.0.1", Phase::Running, 9));
        assert_eq!(owner_of(&idx, "10.0.0.1"), Some("new-running"));
    }

    #[test]
    fn delete_of_a_previous_owner_keeps_the_current_owner() {
        let mut idx = PodIndex::default();
        idx.apply(mk_pod("old", "10.0.0.1", Phase::Running, 1));
        idx.apply(mk_pod("new", "10.0.0.1", Phase::Running, 2));
        idx.delete("old");
        assert_eq!(owner_of(&idx, "10.0.0.1"), Some("new"));
    }

    #[test]
    fn terminal_update_removes_the_pod() {
        let mut idx = PodIndex::default();
        idx.apply(mk_pod("a", "10.0.0.1", Phase::Running, 1));
        idx.apply(mk_pod("a", "10.0.0.1", Phase::Terminal, 1));
        assert!(idx.is_empty());
    }

    #[test]
    fn host_network_pods_are_never_owners() {
        let mut idx = PodIndex::default();
        let mut p = mk_pod("h", "10.0.0.9", Phase::Running, 1);
        p.host_network = true;
        idx.apply(p);
        assert_eq!(owner_of(&idx, "10.0.0.9"), None);
    }

    #[test]
    fn terminating_pods_keep_their_identity() {
        let mut idx = PodIndex::default();
        let mut p = mk_pod("t", "10.0.0.3", Phase::Running, 1);
        p.terminating = true;
        idx.apply(p);
        assert_eq!(owner_of(&idx, "10.0.0.3"), Some("t"));
    }

    #[test]
    fn reset_replaces_everything() {
        let mut idx = PodIndex::default();
        idx.apply(mk_pod("a", "10.0.0.1", Phase::Running, 1));
        idx.reset([mk_pod("b", "10.0.0.2", Phase::Running, 1)]);
        assert_eq!(owner_of(&idx, "10.0.0.1"), None);
        assert_eq!(owner_of(&idx, "10.0.0.2"), Some("b"));
    }

    #[test]
    fn every_ip_of_a_dual_stack_pod_maps_to_it() {
        let mut idx = PodIndex::default();
        let mut p = mk_pod("d", "10.0.0.4", Phase::Running, 1);
        p.ips.push("fd00::4".parse().unwrap());
        idx.apply(p);
        assert_eq!(owner_of(&idx, "10.0.0.4"), Some("d"));
        assert_eq!(owner_of(&idx, "fd00::4"), Some("d"));
    }
}
