//! Control-plane benches: one pod event applied to the index and published as a new
//! snapshot, at 750 pods (a big node) and 100,000 pods (a cluster-wide watch), compared with
//! the full rebuild the first design did; and the per-request lookup the workers do.
//!
//! Run: `cargo bench -p iamlet-resolver --bench index`. Figures: loadtest/RESULTS.md.

use ahash::AHashMap;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use iamlet_resolver::pod::{Phase, PodInfo};
use iamlet_resolver::standalone::Standalone;
use iamlet_resolver::{Identity, RoleRules, Snapshot};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

const SIZES: [usize; 2] = [750, 100_000];
const ROLES: usize = 50;

fn ip_of(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + i as u32))
}

fn pod(i: usize, role: usize) -> PodInfo {
    PodInfo {
        uid: format!("00000000-0000-4000-8000-{i:012x}"),
        namespace: format!("ns-{}", i % 100),
        name: format!("pod-{i}"),
        ips: vec![ip_of(i)],
        phase: Phase::Running,
        host_network: false,
        created: 1_700_000_000 + i as i64,
        terminating: false,
        role: Some(format!("role-{}", role % ROLES)),
        external_id: None,
        service_account: Some("default".into()),
    }
}

fn rules() -> RoleRules {
    RoleRules::new(Some("arn:aws:iam::123456789012:role/"), None).unwrap()
}

fn node(n: usize) -> Standalone {
    let mut s = Standalone::new(rules(), None);
    for i in 0..n {
        s.apply(pod(i, i));
    }
    s.publish();
    assert_eq!(s.snapshot().ips(), n);
    s
}

/// One pod event (a role change, so the snapshot really changes) + publish.
fn publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply_and_publish");
    g.measurement_time(Duration::from_secs(3));
    for n in SIZES {
        let mut s = node(n);
        let mut flipped = vec![false; n];
        let mut k = 0usize;
        g.bench_function(BenchmarkId::new("incremental", n), |b| {
            b.iter(|| {
                k = (k + 7919) % n;
                flipped[k] = !flipped[k];
                s.apply(pod(k, k + usize::from(flipped[k])));
                s.publish();
            });
        });
        // The first design: rebuild every IP's identity and compare whole maps.
        g.sample_size(if n > 10_000 { 10 } else { 50 });
        g.bench_function(BenchmarkId::new("full_rebuild", n), |b| {
            let ids: AHashMap<String, Arc<Identity>> = s
                .snapshot()
                .iter()
                .map(|(_, id)| (id.uid.clone(), id.clone()))
                .collect();
            b.iter(|| {
                let owners = s.index().owners();
                let mut by_ip = AHashMap::with_capacity(owners.len());
                for (ip, p) in owners {
                    by_ip.insert(ip, ids[&p.uid].clone());
                }
                let next = Snapshot::from_map(by_ip);
                black_box(next.same_as(&s.snapshot()))
            });
        });
        g.sample_size(100);
    }
    g.finish();
}

/// The index alone: one pod applied (no publish).
fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("index_apply");
    g.measurement_time(Duration::from_secs(2));
    for n in SIZES {
        let mut s = node(n);
        let mut k = 0usize;
        let mut r = 0usize;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                k = (k + 7919) % n;
                r += 1;
                s.apply(pod(k, r));
            });
        });
    }
    g.finish();
}

/// Per request: the worker's snapshot reader (an arc_swap Cache) plus the IP lookup.
fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    g.measurement_time(Duration::from_secs(2));
    for n in SIZES {
        let s = node(n);
        let handle = s.handle();
        let mut reader = handle.reader();
        let probes: Vec<IpAddr> = (0..1024).map(|i| ip_of((i * 7919) % n)).collect();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("reader_get", n), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(reader.load().get(&probes[i]).is_some())
            });
        });
        // Baseline: one flat AHashMap, no snapshot indirection.
        let flat: AHashMap<IpAddr, Arc<Identity>> = s
            .snapshot()
            .iter()
            .map(|(ip, id)| (*ip, id.clone()))
            .collect();
        g.bench_function(BenchmarkId::new("flat_hashmap", n), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(flat.get(&probes[i]).is_some())
            });
        });
    }
    g.finish();
}

criterion_group!(benches, publish, apply, lookup);
criterion_main!(benches);
