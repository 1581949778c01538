//! The pod index: a pure state machine of the node's pods and namespaces (`apply`, `delete`,
//! `reset`), the rule that picks one owner per IP, and the set of changes since the last
//! publish so a snapshot can be rebuilt incrementally. No IO.

use crate::pod::{NamespaceInfo, Phase, PodInfo};
use ahash::{AHashMap, AHashSet};
use std::net::IpAddr;

/// What changed since the last [`PodIndex::take_changes`].
#[derive(Debug, Default)]
pub struct Changes {
    /// UIDs of pods added, updated or removed.
    pub pods: AHashSet<String>,
    /// IPs whose claimants (or a claimant's rank) changed.
    pub ips: AHashSet<IpAddr>,
    /// Namespaces added, updated or removed.
    pub namespaces: AHashSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.ips.is_empty() && self.namespaces.is_empty()
    }
}

/// Every pod and namespace the source reported, keyed by UID / name, plus the pods claiming
/// each IP.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: AHashMap<String, PodInfo>,
    /// Mappable pods claiming each IP (almost always exactly one).
    claims: AHashMap<IpAddr, Vec<String>>,
    namespaces: AHashMap<String, NamespaceInfo>,
    changes: Changes,
}

impl PodIndex {
    /// Adds or replaces a pod (by UID). Terminal pods are removed. An identical update is a
    /// no-op (relists and duplicate deliveries change nothing).
    pub fn apply(&mut self, pod: PodInfo) {
        if pod.phase == Phase::Terminal {
            self.delete(&pod.uid);
            return;
        }
        if self.pods.get(&pod.uid) == Some(&pod) {
            return;
        }
        if let Some(old) = self.pods.remove(&pod.uid) {
            self.unclaim(&old);
        }
        self.claim(&pod);
        self.changes.pods.insert(pod.uid.clone());
        self.pods.insert(pod.uid.clone(), pod);
    }

    /// Removes a pod by UID; its IPs stay with any other pod claiming them.
    pub fn delete(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            self.unclaim(&old);
            self.changes.pods.insert(old.uid);
        }
    }

    /// Replaces every pod (a relist): pods not in `pods` are deleted, the others applied, so
    /// only real differences show up as changes.
    pub fn reset(&mut self, pods: impl IntoIterator<Item = PodInfo>) {
        let pods: Vec<PodInfo> = pods.into_iter().collect();
        let keep: AHashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !keep.contains(uid.as_str()))
            .cloned()
            .collect();
        drop(keep);
        for uid in gone {
            self.delete(&uid);
        }
        for p in pods {
            self.apply(p);
        }
    }

    fn claim(&mut self, pod: &PodInfo) {
        if !pod.is_mappable() {
            return;
        }
        for ip in &pod.ips {
            self.claims.entry(*ip).or_default().push(pod.uid.clone());
            self.changes.ips.insert(*ip);
        }
    }

    fn unclaim(&mut self, pod: &PodInfo) {
        if !pod.is_mappable() {
            return;
        }
        for ip in &pod.ips {
            if let Some(uids) = self.claims.get_mut(ip) {
                uids.retain(|u| *u != pod.uid);
                if uids.is_empty() {
                    self.claims.remove(ip);
                }
            }
            self.changes.ips.insert(*ip);
        }
    }

    pub fn apply_namespace(&mut self, ns: NamespaceInfo) {
        if self.namespaces.get(&ns.name) != Some(&ns) {
            self.changes.namespaces.insert(ns.name.clone());
            self.namespaces.insert(ns.name.clone(), ns);
        }
    }

    pub fn delete_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.changes.namespaces.insert(name.to_owned());
        }
    }

    /// Replaces every namespace (a relist), recording only real differences.
    pub fn reset_namespaces(&mut self, nss: impl IntoIterator<Item = NamespaceInfo>) {
        let nss: Vec<NamespaceInfo> = nss.into_iter().collect();
        let keep: AHashSet<&str> = nss.iter().map(|n| n.name.as_str()).collect();
        let gone: Vec<String> = self
            .namespaces
            .keys()
            .filter(|n| !keep.contains(n.as_str()))
            .cloned()
            .collect();
        drop(keep);
        for n in gone {
            self.delete_namespace(&n);
        }
        for ns in nss {
            self.apply_namespace(ns);
        }
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.get(name)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &NamespaceInfo> {
        self.namespaces.values()
    }

    pub fn pod(&self, uid: &str) -> Option<&PodInfo> {
        self.pods.get(uid)
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// The changes recorded since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The owner of one IP: hostNetwork and terminal pods never own one; otherwise a pod that
    /// is not terminating beats one that is, Running beats Pending/Unknown, then the newer
    /// creationTimestamp, then the UID (deterministic).
    pub fn owner(&self, ip: &IpAddr) -> Option<&PodInfo> {
        self.claims
            .get(ip)?
            .iter()
            .filter_map(|uid| self.pods.get(uid))
            .max_by(|a, b| rank(a).cmp(&rank(b)))
    }

    /// Every IP's owner (see [`PodIndex::owner`]).
    pub fn owners(&self) -> AHashMap<IpAddr, &PodInfo> {
        self.claims
            .keys()
            .filter_map(|ip| Some((*ip, self.owner(ip)?)))
            .collect()
    }
}

fn rank(p: &PodInfo) -> (bool, bool, i64, &str) {
    (
        !p.terminating,
        p.phase == Phase::Running,
        p.created,
        p.uid.as_str(),
    )
}

#[cfg(test)]
mod tests;
