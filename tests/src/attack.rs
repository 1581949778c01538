//! Judging resource attacks by what a *neighbour* pod sees: while an attack runs, the
//! neighbour (`OTHER_POD`) asks for its credentials 50 times a second on new connections, and
//! the agent's RSS is sampled. Shared by the attack tests (`hostile`, `strangers`).

use crate::rig::data::{self as dataplane, OTHER_POD, ip};
use crate::{Iamlet, Moto, get_from, wait_until};
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const NEIGHBOUR_PATH: &str = "/latest/meta-data/iam/security-credentials/other-role";
/// The chart's memory limit is 128 Mi; the agent must stay well inside it.
pub const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// iamlet with the data-plane pods, `upstream` as the metadata service, default limits.
pub fn agent(driver: &str, moto: &Moto, upstream: SocketAddr, extra: &[&str]) -> Iamlet {
    let mut b = dataplane::builder_at(driver, moto, upstream, extra);
    // Scrapes share a rendering, as in production (the rig renders every scrape otherwise).
    if !extra.iter().any(|a| a.starts_with("--metrics-max-age")) {
        b = b.arg("--metrics-max-age=1s");
    }
    b.start()
}

/// Warms the neighbour's credentials so that the attack windows measure serving, not STS.
pub fn warm(iamlet: &Iamlet) {
    wait_until!(
        Duration::from_secs(20),
        get_from(ip(OTHER_POD), iamlet.addr(), NEIGHBOUR_PATH).status == 200,
        "the neighbour's first credentials"
    );
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How many of `pid`'s descriptors are TCP sockets whose peer address is one of `peers`:
/// the connections the agent still holds for them.
pub fn sockets_held_for(pid: u32, peers: &HashSet<Ipv4Addr>) -> usize {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(inode)) = (cols.get(2), cols.get(9)) else {
                return false;
            };
            let held = inode
                .parse()
                .is_ok_and(|i: u64| i != 0 && inodes.contains(&i));
            held && remote_ip(remote).is_some_and(|a| peers.contains(&a))
        })
        .count()
}

/// The address of a `/proc/net/tcp` endpoint (`0100007F:1F90`: little-endian hex).
fn remote_ip(endpoint: &str) -> Option<Ipv4Addr> {
    let hex = endpoint.split(':').next()?;
    let n = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(n.swap_bytes()))
}

/// What the neighbour pod saw, and the agent's largest RSS, during an attack.
pub struct Observed {
    pub latencies: Vec<Duration>,
    pub failures: Vec<String>,
    pub max_rss_kib: u64,
    /// The agent's RSS when the attack began.
    pub start_rss_kib: u64,
}

impl Observed {
    pub fn p99(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get((l.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    }

    pub fn assert_unharmed(&self, what: &str) {
        println!(
            "{what}: neighbour {} requests, {} failed, p99 {:?}; agent RSS {} KiB before, {} KiB at most",
            self.latencies.len() + self.failures.len(),
            self.failures.len(),
            self.p99(),
            self.start_rss_kib,
            self.max_rss_kib
        );
        assert!(
            self.latencies.len() >= 40,
            "{what}: the neighbour made too few requests ({})",
            self.latencies.len()
        );
        assert!(
            self.failures.is_empty(),
            "{what}: {} of the neighbour's requests failed: {:?}",
            self.failures.len(),
            &self.failures[..self.failures.len().min(10)]
        );
        assert!(
            self.p99() < Duration::from_millis(100),
            "{what}: the neighbour's p99 was {:?}",
            self.p99()
        );
        assert!(
            self.max_rss_kib < RSS_LIMIT_KIB,
            "{what}: the agent's RSS reached {} KiB",
            self.max_rss_kib
        );
    }
}

/// Runs `attack` while the neighbour pod asks for its credentials 50 times a second on new
/// connections and the agent's RSS is sampled; the neighbour goes on for `window` after the
/// attack started (the attack itself runs on its own threads).
pub fn under_attack(iamlet: &Iamlet, window: Duration, attack: impl FnOnce()) -> Observed {
    observe(iamlet, attack, |started, _| {
        if let Some(left) = window.checked_sub(started.elapsed()) {
            std::thread::sleep(left);
        }
    })
}

/// As [`under_attack`], with the neighbour going on for `after` once `attack` has returned.
pub fn during_and_after(iamlet: &Iamlet, after: Duration, attack: impl FnOnce()) -> Observed {
    observe(iamlet, attack, |_, ended| {
        if let Some(left) = after.checked_sub(ended.elapsed()) {
            std::thread::sleep(left);
        }
    })
}

fn observe(
    iamlet: &Iamlet,
    attack: impl FnOnce(),
    hold: impl FnOnce(Instant, Instant),
) -> Observed {
    let addr = iamlet.addr();
    let pid = iamlet.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let start_rss_kib = rss_kib(pid);
    let max_rss = Arc::new(AtomicU64::new(start_rss_kib));
    let sampler = {
        let (stop, max_rss) = (stop.clone(), max_rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                max_rss.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    let neighbour = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut latencies, mut failures) = (Vec::new(), Vec::new());
            let start = Instant::now();
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                // 50 per second, on schedule.
                let due = start + Duration::from_millis(20) * n;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                n += 1;
                let t = Instant::now();
                let raw = format!(
                    "GET {NEIGHBOUR_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
                );
                match crate::try_request_from(ip(OTHER_POD), addr, raw.as_bytes()) {
                    Ok(r) if r.status == 200 && r.body_str().contains("\"Code\" : \"Success\"") => {
                        latencies.push(t.elapsed());
                    }
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body_str())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (latencies, failures)
        })
    };
    let attack_started = Instant::now();
    attack();
    hold(attack_started, Instant::now());
    stop.store(true, Ordering::SeqCst);
    let (latencies, failures) = neighbour.join().expect("neighbour thread");
    sampler.join().expect("sampler thread");
    Observed {
        latencies,
        failures,
        max_rss_kib: max_rss.load(Ordering::SeqCst).max(rss_kib(pid)),
        start_rss_kib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_endpoints_are_little_endian_hex() {
        assert_eq!(
            remote_ip("0100007F:1F90"),
            Some(Ipv4Addr::new(127, 0, 0, 1))
        );
        assert_eq!(
            remote_ip("0B00007F:0050"),
            Some(Ipv4Addr::new(127, 0, 0, 11))
        );
    }
}
