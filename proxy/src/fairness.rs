//! Fairness between sources: a per-source-address connection cap shared by every worker,
//! without a lock or a per-address table to grow and reclaim.
//!
//! Each source is counted in two rows of counters, at positions picked by two keyed hashes
//! (a count-min sketch): a row's counter may also count other addresses that hash there, so
//! the smaller of the two is an upper bound of the source's own connections, and exact unless
//! both of its counters collide with busy addresses. A source is refused when that bound
//! reaches the cap, so no source ever holds more than the cap; a neighbour is refused early
//! only if both of its counters collide with an attacker's, which, with random hash keys per
//! process, no pod can aim for (about one in `SLOTS²` per pair of addresses).
//!
//! Counters move at connect and close, not per request.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

/// Counters per row (a power of two).
const SLOTS: usize = 16 * 1024;

/// The cap on concurrent connections per source address.
pub struct SourceLimiter {
    cap: u32,
    rows: [Box<[AtomicU32]>; 2],
    keys: [ahash::RandomState; 2],
}

impl std::fmt::Debug for SourceLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceLimiter")
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl SourceLimiter {
    /// The process's limiter. It lives as long as the process, so a permit refers to it
    /// without a reference count: cloning an `Arc` per connection would write one shared
    /// cache line from every worker on every accept and close.
    pub fn new(cap: u32) -> &'static Self {
        let row = || (0..SLOTS).map(|_| AtomicU32::new(0)).collect();
        Box::leak(Box::new(SourceLimiter {
            cap,
            rows: [row(), row()],
            keys: [ahash::RandomState::new(), ahash::RandomState::new()],
        }))
    }

    fn slots(&self, ip: IpAddr) -> [usize; 2] {
        let ip = ip.to_canonical();
        [0, 1].map(|i| (self.keys[i].hash_one(ip) as usize) & (SLOTS - 1))
    }

    /// Counts a new connection from `ip`, or `None` when `ip` already holds the cap. The
    /// permit gives the slot back when dropped.
    pub fn try_acquire(&'static self, ip: IpAddr) -> Option<SourcePermit> {
        let slots = self.slots(ip);
        let before = [0, 1].map(|i| self.rows[i][slots[i]].fetch_add(1, Ordering::AcqRel));
        if before[0].min(before[1]) >= self.cap {
            self.release(slots);
            return None;
        }
        Some(SourcePermit {
            limiter: self,
            slots,
        })
    }

    fn release(&self, slots: [usize; 2]) {
        for (row, slot) in self.rows.iter().zip(slots) {
            row[slot].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The upper bound on `ip`'s open connections (for tests and debugging).
    pub fn count(&self, ip: IpAddr) -> u32 {
        let slots = self.slots(ip);
        let a = self.rows[0][slots[0]].load(Ordering::Acquire);
        let b = self.rows[1][slots[1]].load(Ordering::Acquire);
        a.min(b)
    }
}

/// One counted connection; uncounted on drop.
pub struct SourcePermit {
    limiter: &'static SourceLimiter,
    slots: [usize; 2],
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        self.limiter.release(self.slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_the_cap_and_not_one_more() {
        let l = SourceLimiter::new(3);
        let held: Vec<_> = (0..3)
            .map(|_| l.try_acquire(ip("10.0.0.1")).expect("under the cap"))
            .collect();
        assert!(l.try_acquire(ip("10.0.0.1")).is_none());
        assert_eq!(l.count(ip("10.0.0.1")), 3);
        drop(held);
        assert_eq!(l.count(ip("10.0.0.1")), 0);
        assert!(l.try_acquire(ip("10.0.0.1")).is_some());
    }

    #[test]
    fn a_source_at_its_cap_does_not_refuse_its_neighbours() {
        let l = SourceLimiter::new(2);
        let _hog: Vec<_> = (0..2)
            .map(|_| l.try_acquire(ip("10.0.0.66")).unwrap())
            .collect();
        // Thousands of other addresses each still get a connection (and the cap's worth).
        for i in 0..4000u32 {
            let other = IpAddr::from(std::net::Ipv4Addr::from(0x0a01_0000 + i));
            let a = l.try_acquire(other).expect("a neighbour is not refused");
            let b = l.try_acquire(other).expect("a neighbour gets the cap");
            drop((a, b));
        }
    }

    #[test]
    fn mapped_ipv4_counts_as_the_same_source() {
        let l = SourceLimiter::new(1);
        let _a = l.try_acquire(ip("10.0.0.7")).unwrap();
        assert!(l.try_acquire(ip("::ffff:10.0.0.7")).is_none());
    }
}
