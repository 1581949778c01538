//! The pod index: a pure state machine of the node's pods, namespaces and role-carrying
//! ServiceAccounts (`apply`, `delete`, `reset`), the rule that picks one owner per IP, and
//! the set of changes since the last publish so a snapshot can be rebuilt incrementally.
//! No IO.

use crate::pod::{NamespaceInfo, Phase, PodInfo, ServiceAccountInfo};
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
    /// ServiceAccounts (namespace, name) whose role annotation appeared, changed or went.
    pub service_accounts: AHashSet<(String, String)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
            && self.ips.is_empty()
            && self.namespaces.is_empty()
            && self.service_accounts.is_empty()
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
    /// ServiceAccounts with a role annotation, by namespace then name (looked up by `&str`
    /// without building a key). Those without one are not kept: the answer is the same.
    service_accounts: AHashMap<String, AHashMap<String, ServiceAccountInfo>>,
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

    /// Adds, replaces or (without a role annotation) forgets a ServiceAccount; records a
    /// change only when its role changed.
    pub fn apply_service_account(&mut self, sa: ServiceAccountInfo) {
        if sa.role.is_none() {
            self.delete_service_account(&sa.namespace, &sa.name);
            return;
        }
        let in_ns = self
            .service_accounts
            .entry(sa.namespace.clone())
            .or_default();
        if in_ns.get(&sa.name) == Some(&sa) {
            return;
        }
        let role_changed = in_ns.get(&sa.name).map(|o| &o.role) != Some(&sa.role);
        if role_changed {
            (self.changes.service_accounts).insert((sa.namespace.clone(), sa.name.clone()));
        }
        in_ns.insert(sa.name.clone(), sa);
    }

    pub fn delete_service_account(&mut self, namespace: &str, name: &str) {
        let Some(in_ns) = self.service_accounts.get_mut(namespace) else {
            return;
        };
        if in_ns.remove(name).is_some() {
            (self.changes.service_accounts).insert((namespace.to_owned(), name.to_owned()));
        }
        if in_ns.is_empty() {
            self.service_accounts.remove(namespace);
        }
    }

    /// Replaces every ServiceAccount (a relist), recording only real differences.
    pub fn reset_service_accounts(&mut self, sas: impl IntoIterator<Item = ServiceAccountInfo>) {
        let sas: Vec<ServiceAccountInfo> = sas.into_iter().filter(|s| s.role.is_some()).collect();
        let keep: AHashSet<(&str, &str)> = sas
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .collect();
        let gone: Vec<(String, String)> = self
            .service_accounts
            .iter()
            .flat_map(|(ns, m)| m.keys().map(move |n| (ns, n)))
            .filter(|(ns, n)| !keep.contains(&(ns.as_str(), n.as_str())))
            .map(|(ns, n)| (ns.clone(), n.clone()))
            .collect();
        drop(keep);
        for (ns, n) in gone {
            self.delete_service_account(&ns, &n);
        }
        for sa in sas {
            self.apply_service_account(sa);
        }
    }

    /// A ServiceAccount that carries a role annotation.
    pub fn service_account(&self, namespace: &str, name: &str) -> Option<&ServiceAccountInfo> {
        self.service_accounts.get(namespace)?.get(name)
    }

    /// The role annotation of `pod`'s ServiceAccount, if it has one.
    pub fn service_account_role(&self, pod: &PodInfo) -> Option<&str> {
        self.service_account(&pod.namespace, pod.service_account_name())?
            .role
            .as_deref()
    }

    /// Number of ServiceAccounts kept (those with a role annotation).
    pub fn service_accounts_len(&self) -> usize {
        self.service_accounts.values().map(|m| m.len()).sum()
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
