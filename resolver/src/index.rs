//! The pod index: a pure state machine of the node's pods, namespaces and role-carrying
//! ServiceAccounts (`apply`, `delete`, `reset`), the rule that picks one owner per IP, and
//! the set of changes since the last publish so a snapshot can be rebuilt incrementally.
//! No IO.

use crate::pod::{NamespaceInfo, Phase, PodInfo, ServiceAccountInfo};
use ahash::{AHashMap, AHashSet};
use std::hash::Hash;
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

    /// Replaces every kept object of one kind (a relist): those not in `items` are deleted,
    /// the others applied, so only real differences show up as changes. One diff for pods,
    /// namespaces and ServiceAccounts alike.
    pub fn reset<T: Kept>(&mut self, items: impl IntoIterator<Item = T>) {
        let items: Vec<T> = items.into_iter().collect();
        // Owned before anything is deleted: the keys borrow from the index.
        let gone: Vec<T::Owned> = {
            let keep: AHashSet<T::Key<'_>> = items.iter().map(T::key).collect();
            T::kept(self)
                .filter(|k| !keep.contains(k))
                .map(T::owned)
                .collect()
        };
        for key in &gone {
            T::delete(self, T::as_key(key));
        }
        for item in items {
            item.apply_to(self);
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

/// One kind of object the index keeps, as [`PodIndex::reset`] diffs a relist of it against
/// what is kept: pods by UID, namespaces by name, ServiceAccounts by namespace and name.
pub trait Kept: Sized {
    /// The object's key, borrowed (from the relisted object or from the index).
    type Key<'a>: Eq + Hash;
    /// The key owned, to delete by once the index's borrow has ended.
    type Owned;
    fn key(&self) -> Self::Key<'_>;
    /// The keys of every object of this kind the index keeps.
    fn kept(index: &PodIndex) -> impl Iterator<Item = Self::Key<'_>>;
    fn owned(key: Self::Key<'_>) -> Self::Owned;
    fn as_key(owned: &Self::Owned) -> Self::Key<'_>;
    /// Adds or replaces this object, as a watch event would.
    fn apply_to(self, index: &mut PodIndex);
    /// Removes the object with this key, as a watch event would.
    fn delete(index: &mut PodIndex, key: Self::Key<'_>);
}

impl Kept for PodInfo {
    type Key<'a> = &'a str;
    type Owned = String;
    fn key(&self) -> &str {
        &self.uid
    }
    fn kept(index: &PodIndex) -> impl Iterator<Item = &str> {
        index.pods.keys().map(String::as_str)
    }
    fn owned(key: &str) -> String {
        key.to_owned()
    }
    fn as_key(owned: &String) -> &str {
        owned
    }
    fn apply_to(self, index: &mut PodIndex) {
        index.apply(self);
    }
    fn delete(index: &mut PodIndex, uid: &str) {
        index.delete(uid);
    }
}

impl Kept for NamespaceInfo {
    type Key<'a> = &'a str;
    type Owned = String;
    fn key(&self) -> &str {
        &self.name
    }
    fn kept(index: &PodIndex) -> impl Iterator<Item = &str> {
        index.namespaces.keys().map(String::as_str)
    }
    fn owned(key: &str) -> String {
        key.to_owned()
    }
    fn as_key(owned: &String) -> &str {
        owned
    }
    fn apply_to(self, index: &mut PodIndex) {
        index.apply_namespace(self);
    }
    fn delete(index: &mut PodIndex, name: &str) {
        index.delete_namespace(name);
    }
}

/// A relisted ServiceAccount without a role is applied like a watched one: it is forgotten
/// (the index keeps only those with a role).
impl Kept for ServiceAccountInfo {
    type Key<'a> = (&'a str, &'a str);
    type Owned = (String, String);
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
    fn kept(index: &PodIndex) -> impl Iterator<Item = (&str, &str)> {
        index
            .service_accounts
            .iter()
            .flat_map(|(ns, m)| m.keys().map(move |n| (ns.as_str(), n.as_str())))
    }
    fn owned((ns, name): (&str, &str)) -> (String, String) {
        (ns.to_owned(), name.to_owned())
    }
    fn as_key((ns, name): &(String, String)) -> (&str, &str) {
        (ns, name)
    }
    fn apply_to(self, index: &mut PodIndex) {
        index.apply_service_account(self);
    }
    fn delete(index: &mut PodIndex, (ns, name): (&str, &str)) {
        index.delete_service_account(ns, name);
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
