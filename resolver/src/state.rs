//! Turns the pod index into snapshots, incrementally: only the pods, namespaces,
//! ServiceAccounts and IPs that changed since the last publish are looked at, only the
//! snapshot shards holding changed IPs are copied, and nothing is published when no IP's
//! identity changed (a newer resource version or allowed-role pattern alone replaces the
//! snapshot with one sharing every shard, waking and counting nothing). Resolves roles (pod
//! annotation, else ServiceAccount annotation, else the default role: [`State::pod_role`])
//! and namespace restrictions, and keeps one credential slot per key for live pods
//! (prefetching new ones).

use crate::creds::sts::sanitize_session;
use crate::creds::{CredKey, CredSlot, Origin, PodSession};
use crate::events::{Report, ReportKind};
use crate::handle::Shared;
use crate::index::PodIndex;
use crate::metrics::ResolverMetrics;
use crate::pod::PodInfo;
use crate::restrict::{self, AllowedRoles, NamespaceRestrictions};
use crate::roles::{PodRole, RoleRules};
use crate::snapshot::{DebugView, Identity, RoleEntry, SHARDS, Shard, Snapshot, shard_of};
use ahash::{AHashMap, AHashSet};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::mpsc;

/// What a pod's identity is made of, before it is built.
struct Spec {
    key: Option<CredKey>,
    denied: Option<Arc<str>>,
    /// When the pod's own annotation overrode its ServiceAccount's different role: the
    /// `IamRoleConflict` Event's note.
    conflict: Option<String>,
}

impl Spec {
    fn matches(&self, pod: &PodInfo, id: &Identity) -> bool {
        id.namespace == pod.namespace
            && id.pod == pod.name
            && id.denied == self.denied
            && id.role.as_ref().map(|r| r.slot.key()) == self.key.as_ref()
    }
}

/// The resolver's mutable state; lives on the resolver thread only.
pub(crate) struct State {
    pub(crate) index: PodIndex,
    rules: RoleRules,
    restrictions: Option<NamespaceRestrictions>,
    /// Parsed allowed-roles annotations by namespace (with restrictions only).
    allowed: AHashMap<String, Arc<AllowedRoles>>,
    /// The identity of every mappable pod, by UID.
    identities: AHashMap<String, Arc<Identity>>,
    /// Number of snapshot IPs each pod owns (pods with at least one).
    owned: AHashMap<String, usize>,
    /// Credential entries in use, with the number of identities using each.
    roles: AHashMap<CredKey, (Arc<RoleEntry>, usize)>,
    /// The published shards (shared with the current snapshot; copied on write).
    shards: Vec<Arc<Shard>>,
    ips: usize,
    /// The `resourceVersion` of the last pod event applied (shown by `/debug/store`).
    pub(crate) resource_version: Option<Arc<str>>,
    /// Allowed-role patterns by namespace, as written (shown by `/debug/store`).
    allowed_roles: Arc<BTreeMap<String, Vec<String>>>,
    requests: mpsc::UnboundedSender<Arc<CredSlot>>,
    shared: Arc<Shared>,
    metrics: ResolverMetrics,
    /// Node-wide or per-pod AssumeRole sessions.
    session: SessionMode,
    /// `--cluster-name`, tagged as `eks-cluster-name` with `--session-tags`.
    cluster_name: Option<String>,
}

/// How AssumeRole sessions map to pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SessionMode {
    /// One session per (role, external ID) on the node.
    #[default]
    Node,
    /// One session per pod, named `<namespace>.<pod>`, optionally with session tags.
    Pod { tags: bool },
}

/// A per-pod session: `<namespace>.<pod>` and, with `--session-tags`, the Kubernetes tags
/// (EKS Pod Identity's names, so ABAC policies written for it carry over).
fn pod_session(pod: &PodInfo, tags: bool, cluster: Option<&str>) -> PodSession {
    let tags = if tags {
        let mut t = vec![
            ("kubernetes-namespace".to_owned(), pod.namespace.clone()),
            ("kubernetes-pod-name".to_owned(), pod.name.clone()),
        ];
        if let Some(sa) = &pod.service_account {
            t.push(("kubernetes-service-account".to_owned(), sa.clone()));
        }
        t.push(("kubernetes-pod-uid".to_owned(), pod.uid.clone()));
        if let Some(c) = cluster {
            t.push(("eks-cluster-name".to_owned(), c.to_owned()));
        }
        t
    } else {
        Vec::new()
    };
    PodSession {
        name: sanitize_session(&format!("{}.{}", pod.namespace, pod.name)),
        tags,
    }
}

impl State {
    pub(crate) fn with_sessions(mut self, session: SessionMode) -> Self {
        self.session = session;
        self
    }

    pub(crate) fn with_cluster_name(mut self, cluster: Option<String>) -> Self {
        self.cluster_name = cluster;
        self
    }

    pub(crate) fn new(
        rules: RoleRules,
        requests: mpsc::UnboundedSender<Arc<CredSlot>>,
        shared: Arc<Shared>,
        metrics: ResolverMetrics,
    ) -> Self {
        let empty = Arc::new(Shard::default());
        State {
            index: PodIndex::default(),
            rules,
            restrictions: None,
            allowed: AHashMap::new(),
            identities: AHashMap::new(),
            owned: AHashMap::new(),
            roles: AHashMap::new(),
            shards: vec![empty; SHARDS],
            ips: 0,
            resource_version: None,
            allowed_roles: Arc::default(),
            requests,
            shared,
            metrics,
            session: SessionMode::Node,
            cluster_name: None,
        }
    }

    pub(crate) fn with_restrictions(mut self, restrictions: Option<NamespaceRestrictions>) -> Self {
        self.restrictions = restrictions;
        self
    }

    pub(crate) fn restrictions(&self) -> Option<&NamespaceRestrictions> {
        self.restrictions.as_ref()
    }

    /// Applies the index's changes to the snapshot and publishes it if any IP's identity
    /// changed (and always the first time, which marks the store ready).
    pub(crate) fn publish(&mut self) {
        let changes = self.index.take_changes();
        let mut pods = changes.pods;
        if !changes.service_accounts.is_empty() {
            // The pods running as a ServiceAccount whose role changed (the index keeps no
            // reverse map: a role annotation changes rarely, a pod often).
            let mut by_ns: AHashMap<&str, AHashSet<&str>> = AHashMap::new();
            for (ns, name) in &changes.service_accounts {
                by_ns.entry(ns).or_default().insert(name);
            }
            pods.extend(
                self.index
                    .pods()
                    .filter(|p| {
                        by_ns
                            .get(p.namespace.as_str())
                            .is_some_and(|names| names.contains(p.service_account_name()))
                    })
                    .map(|p| p.uid.clone()),
            );
        }
        if !changes.namespaces.is_empty() && self.restrictions.is_some() {
            self.reparse_namespaces(&changes.namespaces);
            pods.extend(
                self.index
                    .pods()
                    .filter(|p| changes.namespaces.contains(&p.namespace))
                    .map(|p| p.uid.clone()),
            );
        }
        let mut ips = changes.ips;
        for uid in &pods {
            self.refresh_identity(uid, &mut ips);
        }
        let mut changed = false;
        for ip in ips {
            changed |= self.remap(ip);
        }
        let debug = DebugView {
            resource_version: self.resource_version.clone(),
            allowed_roles: self.allowed_roles.clone(),
        };
        if changed || !self.shared.is_ready() {
            let snap =
                Snapshot::from_shards(self.shards.clone(), self.owned.len(), self.ips, debug);
            self.shared.snapshot.store(Arc::new(snap));
            self.shared.mark_ready();
            self.shared.published.notify_waiters();
            self.metrics.published();
        } else if !self.shared.snapshot.load().debug().same_as(&debug) {
            // No IP's answer changed: no waiter to wake, no publish to count; the shards are
            // the current snapshot's, so `/debug/store` stays exact for a pointer copy each.
            let snap =
                Snapshot::from_shards(self.shards.clone(), self.owned.len(), self.ips, debug);
            self.shared.snapshot.store(Arc::new(snap));
        }
        self.metrics
            .set_index(self.owned.len(), self.ips, self.roles.len());
    }

    fn reparse_namespaces(&mut self, names: &AHashSet<String>) {
        let Some(r) = &self.restrictions else { return };
        let debug = Arc::make_mut(&mut self.allowed_roles);
        for name in names {
            match self.index.namespace(name) {
                Some(ns) => {
                    let value = ns.annotations.get(&r.key).map(String::as_str);
                    let allowed = AllowedRoles::parse(value, r.format, &self.rules);
                    debug.insert(name.clone(), allowed.raw.clone());
                    self.allowed.insert(name.clone(), Arc::new(allowed));
                }
                None => {
                    debug.remove(name);
                    self.allowed.remove(name);
                }
            }
        }
    }

    /// The role `pod` gets, from its annotation, its ServiceAccount's (looked up in the
    /// index) or the default role: the one rule every door resolves through.
    pub(crate) fn pod_role(&self, pod: &PodInfo) -> Option<PodRole> {
        let sa = self.index.service_account_role(pod);
        self.rules.pod_role(pod.role.as_deref(), sa)
    }

    /// The identity `pod` should have: its role (whatever its source) through the namespace
    /// restrictions, keyed with the pod's external ID and session.
    fn spec(&self, pod: &PodInfo) -> Spec {
        let Some(PodRole {
            arn, overridden, ..
        }) = self.pod_role(pod)
        else {
            return Spec {
                key: None,
                denied: None,
                conflict: None,
            };
        };
        let conflict = overridden.map(|sa_role| {
            format!(
                "the pod's role annotation names {arn}, its ServiceAccount {} names {sa_role}: the pod's annotation wins",
                pod.service_account_name()
            )
        });
        let denied = self.restrictions.as_ref().and_then(|r| {
            let allowed = self.allowed.get(&pod.namespace).map(|a| &**a);
            restrict::check(&self.rules, r, &arn, &pod.namespace, allowed)
        });
        match denied {
            Some(reason) => Spec {
                key: None,
                denied: Some(Arc::from(reason)),
                conflict,
            },
            None => Spec {
                key: Some(CredKey {
                    role_arn: arn,
                    external_id: pod.external_id.clone(),
                    session: match self.session {
                        SessionMode::Node => None,
                        SessionMode::Pod { tags } => {
                            Some(pod_session(pod, tags, self.cluster_name.as_deref()))
                        }
                    },
                }),
                denied: None,
                conflict,
            },
        }
    }

    /// Rebuilds one pod's identity if what it is made of changed; marks its IPs.
    fn refresh_identity(&mut self, uid: &str, ips: &mut AHashSet<IpAddr>) {
        let Some(pod) = self.index.pod(uid).filter(|p| p.is_mappable()) else {
            if let Some(old) = self.identities.remove(uid) {
                self.release(&old);
                self.shared.pod_gone(uid);
            }
            return;
        };
        let spec = self.spec(pod);
        if let Some(old) = self.identities.get(uid)
            && spec.matches(pod, old)
        {
            if let Some(note) = spec.conflict {
                self.report_conflict(old.clone(), note);
            }
            return;
        }
        let (namespace, name) = (pod.namespace.clone(), pod.name.clone());
        // A pod's ServiceAccount is immutable: no change to it needs a new identity.
        let service_account = pod.service_account.clone();
        ips.extend(pod.ips.iter().copied());
        if let Some(old) = self.identities.remove(uid) {
            self.release(&old);
        }
        let origin = Origin {
            namespace: namespace.clone(),
            pod: name.clone(),
        };
        let role = spec.key.map(|k| self.acquire(k, origin));
        let id = Arc::new(
            Identity::new(uid.to_owned(), namespace, name, role, spec.denied)
                .with_service_account(service_account.as_deref()),
        );
        if let Some(note) = spec.conflict {
            self.report_conflict(id.clone(), note);
        }
        self.identities.insert(uid.to_owned(), id);
    }

    /// The pod's annotation overrode its ServiceAccount's different role: an
    /// `IamRoleConflict` Event (the event task allows one per pod a minute, so a pod updated
    /// often reports it no more often than that).
    fn report_conflict(&self, identity: Arc<Identity>, note: String) {
        let Some(tx) = self.shared.reports.get() else {
            return;
        };
        // A full queue drops the report, as the workers' reports are dropped: advisory.
        let _ = tx.try_send(Report {
            kind: ReportKind::Conflict,
            identity,
            detail: Some(note),
        });
    }

    /// Points `ip` at its owner's identity; true if that changed the snapshot.
    fn remap(&mut self, ip: IpAddr) -> bool {
        let want = self
            .index
            .owner(&ip)
            .and_then(|p| self.identities.get(&p.uid))
            .cloned();
        let s = shard_of(&ip);
        let cur = self.shards[s].get(&ip).cloned();
        match (&cur, &want) {
            (None, None) => return false,
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => return false,
            _ => {}
        }
        if let Some(old) = &cur
            && let Some(n) = self.owned.get_mut(&old.uid)
        {
            *n -= 1;
            if *n == 0 {
                self.owned.remove(&old.uid);
            }
        }
        let shard = Arc::make_mut(&mut self.shards[s]);
        match want {
            Some(id) => {
                *self.owned.entry(id.uid.clone()).or_default() += 1;
                if shard.insert(ip, id).is_none() {
                    self.ips += 1;
                }
            }
            None => {
                if shard.remove(&ip).is_some() {
                    self.ips -= 1;
                }
            }
        }
        true
    }

    /// The entry for `key`, created (and prefetched) on first use.
    fn acquire(&mut self, key: CredKey, origin: Origin) -> Arc<RoleEntry> {
        if let Some((entry, n)) = self.roles.get_mut(&key) {
            *n += 1;
            return entry.clone();
        }
        let listing = Bytes::from(self.rules.listing_name(&key.role_arn).to_owned());
        let hits = self.metrics.cache_hits_for(&key.role_arn);
        let slot = CredSlot::with_hits(key.clone(), origin, self.requests.clone(), hits);
        slot.request(); // prefetch: the pod's first ask is a cache hit
        let entry = Arc::new(RoleEntry {
            arn: key.role_arn.clone(),
            listing,
            slot,
        });
        self.roles.insert(key, (entry.clone(), 1));
        entry
    }

    fn release(&mut self, id: &Identity) {
        let Some(role) = &id.role else { return };
        let key = role.slot.key();
        if let Some((_, n)) = self.roles.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.roles.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests;
