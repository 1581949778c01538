//! The immutable IP → identity snapshot the workers read without locks.
//!
//! The map is split into [`SHARDS`] immutable shards, each behind its own `Arc`. A publish
//! copies only the shards it changes and shares the rest with the previous snapshot, so one
//! pod event costs a small copy whatever the node's size; the snapshot as a whole is still
//! one value swapped atomically.
//!
//! It also carries what `/debug/store` shows besides the mapping (the last pod event's
//! resource version, the allowed-role patterns), so the dump is one consistent value.

use crate::creds::CredSlot;
use ahash::AHashMap;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Number of shards of the IP map (a power of two).
pub const SHARDS: usize = 64;

pub(crate) type Shard = AHashMap<IpAddr, Arc<Identity>>;

/// A role a pod may take, with its credential slot.
#[derive(Debug)]
pub struct RoleEntry {
    /// Full role ARN.
    pub arn: String,
    /// The exact body of the role listing (name below the base ARN, no newline).
    pub listing: Bytes,
    /// Where the rendered credentials for this (role, external ID) live.
    pub slot: Arc<CredSlot>,
}

/// Who is behind one IP.
#[derive(Debug)]
pub struct Identity {
    pub uid: String,
    pub namespace: String,
    pub pod: String,
    /// `None`: the pod has no role and there is no default role, or the role is denied.
    pub role: Option<Arc<RoleEntry>>,
    /// Why the pod may not have its role (a namespace restriction): answered as 403 with
    /// this text, at once.
    pub denied: Option<Arc<str>>,
    /// The pod's ServiceAccount (a service-account token must name the same one).
    pub service_account: Option<Arc<str>>,
    /// When each kind of Kubernetes Event was last reported for this identity (milliseconds
    /// since the resolver started; 0 = never): a lock-free first rate limit.
    pub(crate) reported: [AtomicU64; 2],
}

impl Identity {
    pub fn new(
        uid: String,
        namespace: String,
        pod: String,
        role: Option<Arc<RoleEntry>>,
        denied: Option<Arc<str>>,
    ) -> Self {
        Identity {
            uid,
            namespace,
            pod,
            role,
            denied,
            service_account: None,
            reported: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// The pod's ServiceAccount, for binding service-account tokens to it.
    pub fn with_service_account(mut self, sa: Option<&str>) -> Self {
        self.service_account = sa.map(Arc::from);
        self
    }

    /// Claims the right to report event kind `kind` at `now_ms` if the last report is at
    /// least `every_ms` old.
    pub(crate) fn claim_report(&self, kind: usize, now_ms: u64, every_ms: u64) -> bool {
        let slot = &self.reported[kind];
        let last = slot.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < every_ms {
            return false;
        }
        slot.compare_exchange(last, now_ms.max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.uid == other.uid
            && self.namespace == other.namespace
            && self.pod == other.pod
            && self.denied == other.denied
            && match (&self.role, &other.role) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

/// One published state of the node's pods.
#[derive(Debug, Clone)]
pub struct Snapshot {
    shards: Vec<Arc<Shard>>,
    pods: usize,
    ips: usize,
    debug: DebugView,
}

/// What `/debug/store` shows besides the mapping.
#[derive(Debug, Clone, Default)]
pub(crate) struct DebugView {
    /// The `resourceVersion` of the last pod event applied: the mapping reflects at least
    /// this version.
    pub(crate) resource_version: Option<Arc<str>>,
    /// Allowed-role patterns by namespace, as written (only with namespace restrictions).
    pub(crate) allowed_roles: Arc<BTreeMap<String, Vec<String>>>,
}

impl DebugView {
    /// Whether `other` shows the same: the patterns are replaced, never edited, once a
    /// snapshot shares them, so their pointer tells.
    pub(crate) fn same_as(&self, other: &DebugView) -> bool {
        self.resource_version == other.resource_version
            && Arc::ptr_eq(&self.allowed_roles, &other.allowed_roles)
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        let empty = Arc::new(Shard::default());
        Snapshot {
            shards: vec![empty; SHARDS],
            pods: 0,
            ips: 0,
            debug: DebugView::default(),
        }
    }
}

/// Which shard holds `ip` (a multiplicative hash of the address bits).
#[inline]
pub(crate) fn shard_of(ip: &IpAddr) -> usize {
    let bits = match ip {
        IpAddr::V4(a) => u64::from(u32::from(*a)),
        IpAddr::V6(a) => {
            let v = u128::from(*a);
            (v as u64) ^ ((v >> 64) as u64)
        }
    };
    (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

impl Snapshot {
    pub(crate) fn from_shards(
        shards: Vec<Arc<Shard>>,
        pods: usize,
        ips: usize,
        debug: DebugView,
    ) -> Self {
        debug_assert_eq!(shards.len(), SHARDS);
        Snapshot {
            shards,
            pods,
            ips,
            debug,
        }
    }

    /// A snapshot of exactly `by_ip` (tests and benches).
    pub fn from_map(by_ip: AHashMap<IpAddr, Arc<Identity>>) -> Self {
        let mut shards: Vec<Shard> = (0..SHARDS).map(|_| Shard::default()).collect();
        let ips = by_ip.len();
        let mut uids = ahash::AHashSet::new();
        for (ip, id) in by_ip {
            uids.insert(id.uid.clone());
            shards[shard_of(&ip)].insert(ip, id);
        }
        Snapshot {
            shards: shards.into_iter().map(Arc::new).collect(),
            pods: uids.len(),
            ips,
            debug: DebugView::default(),
        }
    }

    /// The identity behind `ip` (IPv4-mapped IPv6 addresses are looked up as IPv4).
    #[inline]
    pub fn get(&self, ip: &IpAddr) -> Option<&Arc<Identity>> {
        let ip = ip.to_canonical();
        self.shards[shard_of(&ip)].get(&ip)
    }

    /// Number of IPs mapped.
    pub fn ips(&self) -> usize {
        self.ips
    }

    /// Number of pods owning at least one IP.
    pub fn pods(&self) -> usize {
        self.pods
    }

    /// The `resourceVersion` of the last pod event applied (the mapping reflects at least
    /// this version); `None` before the first event after a list, and in local mode.
    pub fn resource_version(&self) -> Option<&str> {
        self.debug.resource_version.as_deref()
    }

    /// Allowed-role patterns by namespace, as written (only with namespace restrictions).
    pub fn allowed_roles(&self) -> &BTreeMap<String, Vec<String>> {
        &self.debug.allowed_roles
    }

    pub(crate) fn debug(&self) -> &DebugView {
        &self.debug
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Arc<Identity>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// Same mapping (identities equal, roles the same entries).
    pub fn same_as(&self, other: &Snapshot) -> bool {
        self.ips == other.ips
            && self
                .iter()
                .all(|(ip, id)| other.get(ip).is_some_and(|o| **o == **id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uid: &str) -> Arc<Identity> {
        Arc::new(Identity::new(
            uid.into(),
            "ns".into(),
            uid.into(),
            None,
            None,
        ))
    }

    #[test]
    fn lookups_find_v4_v6_and_v4_mapped_addresses() {
        let mut m = AHashMap::new();
        for i in 0..1000u32 {
            m.insert(
                IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                id(&format!("p{i}")),
            );
        }
        m.insert("fd00::1".parse().unwrap(), id("v6"));
        let s = Snapshot::from_map(m);
        assert_eq!((s.ips(), s.pods()), (1001, 1001));
        assert_eq!(s.get(&"10.0.0.7".parse().unwrap()).unwrap().uid, "p7");
        assert_eq!(
            s.get(&"::ffff:10.0.0.7".parse().unwrap()).unwrap().uid,
            "p7"
        );
        assert_eq!(s.get(&"fd00::1".parse().unwrap()).unwrap().uid, "v6");
        assert!(s.get(&"10.0.9.9".parse().unwrap()).is_none());
        assert_eq!(s.iter().count(), 1001);
        // The hash spreads one /22 over most shards.
        let used: ahash::AHashSet<usize> = s.iter().map(|(ip, _)| shard_of(ip)).collect();
        assert!(used.len() > SHARDS / 2, "{}", used.len());
    }

    #[test]
    fn report_claims_are_rate_limited() {
        let i = id("a");
        assert!(i.claim_report(0, 1_000, 60_000));
        assert!(!i.claim_report(0, 30_000, 60_000));
        assert!(i.claim_report(1, 30_000, 60_000), "kinds are independent");
        assert!(i.claim_report(0, 61_000, 60_000));
    }
}
