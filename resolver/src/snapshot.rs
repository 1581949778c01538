//! The immutable IP → identity snapshot the workers read without locks.

use crate::creds::CredSlot;
use ahash::AHashMap;
use bytes::Bytes;
use std::net::IpAddr;
use std::sync::Arc;

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
    /// `None`: the pod has no role and there is no default role.
    pub role: Option<Arc<RoleEntry>>,
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.uid == other.uid
            && self.namespace == other.namespace
            && self.pod == other.pod
            && match (&self.role, &other.role) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

/// One published state of the node's pods.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_ip: AHashMap<IpAddr, Arc<Identity>>,
    pods: usize,
}

impl Snapshot {
    pub(crate) fn new(by_ip: AHashMap<IpAddr, Arc<Identity>>, pods: usize) -> Self {
        Snapshot { by_ip, pods }
    }

    /// The identity behind `ip` (IPv4-mapped IPv6 addresses are looked up as IPv4).
    #[inline]
    pub fn get(&self, ip: &IpAddr) -> Option<&Arc<Identity>> {
        self.by_ip.get(ip)
    }

    pub fn ips(&self) -> usize {
        self.by_ip.len()
    }

    pub fn pods(&self) -> usize {
        self.pods
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Arc<Identity>)> {
        self.by_ip.iter()
    }

    /// Same mapping (used to skip publishing an unchanged state).
    pub fn same_as(&self, other: &Snapshot) -> bool {
        self.by_ip.len() == other.by_ip.len()
            && self
                .by_ip
                .iter()
                .all(|(ip, id)| other.by_ip.get(ip).is_some_and(|o| **o == **id))
    }
}
