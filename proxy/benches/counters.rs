//! Counting one event from 1..N threads (N: the available parallelism, at least 2), each
//! thread adding the same fixed number of increments:
//!
//! - `shared`: one prometheus-client `Counter` cloned into every thread (an atomic add on
//!   one cache line that every thread writes), how the workers counted before;
//! - `per_worker`: each thread's own [`WorkerMetrics`] counter (a load and store in cells
//!   that thread alone writes), how the workers count requests, cache hits and connections;
//! - `per_thread`: one resolver [`ThreadCounter`] shared by every thread (a cell per thread
//!   behind a thread-local), how the workers count a role's cache hits.
//!
//! Throughput is increments per second over all threads.
//!
//! Run: `cargo bench -p iamlet --bench counters`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use iamlet::metrics::{ProxyMetrics, WorkerMetrics};
use iamlet_resolver::tally::ThreadCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Increments per thread per iteration.
const INCREMENTS: u64 = 100_000;

fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// Runs `work(thread, state)` on `states.len()` threads at once, `iters` times each, and
/// returns the time from the common start to the last thread's end.
fn timed<S: Send>(states: &mut Vec<S>, iters: u64, work: impl Fn(&S) + Sync) -> Duration {
    let barrier = Barrier::new(states.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = states
            .drain(..)
            .map(|state| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..iters {
                        work(&state);
                    }
                    state
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        states.extend(handles.into_iter().map(|h| h.join().expect("bench thread")));
        start.elapsed()
    })
}

fn counters(c: &mut Criterion) {
    let mut g = c.benchmark_group("counters");
    for threads in 1..=max_threads() {
        g.throughput(Throughput::Elements(INCREMENTS * threads as u64));
        g.bench_function(BenchmarkId::new("shared", threads), |b| {
            let counter = Counter::<u64>::default();
            let mut states: Vec<Counter> = vec![counter.clone(); threads];
            b.iter_custom(|iters| {
                timed(&mut states, iters, |c| {
                    for _ in 0..INCREMENTS {
                        black_box(c).inc();
                    }
                })
            });
            black_box(counter.get());
        });
        g.bench_function(BenchmarkId::new("per_worker", threads), |b| {
            let metrics = ProxyMetrics::register(&mut Registry::default(), threads);
            let mut states: Vec<WorkerMetrics> = (0..threads).map(|_| metrics.worker()).collect();
            b.iter_custom(|iters| {
                timed(&mut states, iters, |w| {
                    for _ in 0..INCREMENTS {
                        black_box(&w.cache_hits).inc();
                    }
                })
            });
        });
        g.bench_function(BenchmarkId::new("per_thread", threads), |b| {
            let counter = ThreadCounter::new();
            let mut states: Vec<&ThreadCounter> = vec![&counter; threads];
            b.iter_custom(|iters| {
                timed(&mut states, iters, |c| {
                    for _ in 0..INCREMENTS {
                        black_box(*c).inc();
                    }
                })
            });
            black_box(counter.get());
        });
    }
    g.finish();
}

criterion_group!(benches, counters);
criterion_main!(benches);
