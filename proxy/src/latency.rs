//! Lock-free request-latency histograms, one table per worker, summed at scrape time.
//! Exposed twice: as `iamlet_http_request_duration_seconds{route,method,code}` and, for
//! existing dashboards, as kube2iam's `kube2iam_http_request_duration_seconds{code,method,handler}`
//! (same buckets as kube2iam: 1 ms × 2^i, 14 buckets).

use crate::route::RouteLabel;
use arc_swap::ArcSwap;
use iamlet_resolver::tally::CachePadded;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: usize = 14;
const ROUTES: usize = RouteLabel::ALL.len();
const METHODS: [&str; 4] = ["GET", "HEAD", "PUT", "OTHER"];
const CODES: [u16; 14] = [
    200, 400, 401, 403, 404, 405, 413, 414, 431, 500, 502, 503, 504, 0,
];
const CELLS: usize = ROUTES * METHODS.len() * CODES.len();

/// Cells exposed even before their first observation (at 0), so latency panels show 0, not
/// "no data", on a fresh agent: the 200s of GET credentials, GET role list, PUT token and
/// GET pass-through, and pass-through's 404. The other combinations appear once seen (all
/// 392 at 0 would bloat every scrape).
const ALWAYS: [usize; 5] = [
    LatencyTable::idx(RouteLabel::Credentials as usize, 0, 0),
    LatencyTable::idx(RouteLabel::RoleList as usize, 0, 0),
    LatencyTable::idx(RouteLabel::Token as usize, 2, 0),
    LatencyTable::idx(RouteLabel::Passthrough as usize, 0, 0),
    LatencyTable::idx(RouteLabel::Passthrough as usize, 0, 4),
];

fn bound(i: usize) -> f64 {
    0.001 * f64::from(1u32 << i)
}

fn method_index(m: &str) -> usize {
    METHODS[..3].iter().position(|x| *x == m).unwrap_or(3)
}

fn code_index(c: u16) -> usize {
    CODES
        .iter()
        .position(|x| *x == c)
        .unwrap_or(CODES.len() - 1)
}

/// kube2iam's handler names, so its dashboards keep working.
fn kube2iam_handler(r: RouteLabel) -> &'static str {
    match r {
        RouteLabel::Token => "tokenHandler",
        RouteLabel::Credentials => "roleHandler",
        RouteLabel::RoleList => "securityCredentialsHandler",
        RouteLabel::Passthrough => "reverseProxyHandler",
        RouteLabel::Admin => "healthHandler",
        RouteLabel::Denied => "notFoundHandler",
        RouteLabel::Invalid => "invalidRequestHandler",
        // kube2iam has no such door; a name of the same style.
        RouteLabel::Container => "containerCredentialsHandler",
    }
}

/// Every worker's table of one kind: added to when a worker starts, read at scrape.
pub type Tables<T> = Arc<ArcSwap<Vec<Arc<T>>>>;

pub fn add_table<T>(tables: &Tables<T>, t: &Arc<T>) {
    tables.rcu(|all| {
        let mut all = Vec::clone(all);
        all.push(t.clone());
        all
    });
}

#[derive(Debug, Default)]
struct Cell {
    /// Per-bucket (not cumulative) counts; the last is +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// One worker's histograms, written by that worker only and read at scrape. Aligned so that
/// no other allocation (another worker's table) shares a cache line with it.
#[derive(Debug)]
pub struct LatencyTable {
    cells: Box<CachePadded<[Cell; CELLS]>>,
}

impl Default for LatencyTable {
    fn default() -> Self {
        LatencyTable {
            cells: Box::new(CachePadded(std::array::from_fn(|_| Cell::default()))),
        }
    }
}

/// Adds `n` to a cell only its owner writes: a relaxed load and store, no read-modify-write.
#[inline]
fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl LatencyTable {
    const fn idx(route: usize, method: usize, code: usize) -> usize {
        (route * METHODS.len() + method) * CODES.len() + code
    }

    /// Records one request. Only the table's worker may call it (the cells have one writer).
    #[inline]
    pub fn observe(&self, route: RouteLabel, method: &str, code: u16, took: Duration) {
        let cell = &self.cells[Self::idx(route as usize, method_index(method), code_index(code))];
        let secs = took.as_secs_f64();
        let b = (0..BUCKETS).find(|&i| secs <= bound(i)).unwrap_or(BUCKETS);
        add(&cell.buckets[b], 1);
        add(&cell.count, 1);
        add(
            &cell.sum_nanos,
            took.as_nanos().min(u128::from(u64::MAX)) as u64,
        );
    }
}

/// Sums every worker's table at scrape time.
#[derive(Debug, Clone)]
pub struct LatencyCollector {
    pub tables: Tables<LatencyTable>,
}

struct Sum {
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

/// The tables of every worker at one scrape.
struct Loaded(Arc<Vec<Arc<LatencyTable>>>);

impl Loaded {
    fn sum(&self, i: usize) -> Option<Sum> {
        let mut buckets: Vec<(f64, u64)> = (0..BUCKETS).map(|b| (bound(b), 0)).collect();
        buckets.push((f64::INFINITY, 0));
        let (mut count, mut nanos) = (0u64, 0u64);
        for t in self.0.iter() {
            let c = &t.cells[i];
            count += c.count.load(Ordering::Relaxed);
            nanos = nanos.saturating_add(c.sum_nanos.load(Ordering::Relaxed));
            for (b, slot) in buckets.iter_mut().enumerate() {
                slot.1 += c.buckets[b].load(Ordering::Relaxed);
            }
        }
        (count > 0 || ALWAYS.contains(&i)).then(|| Sum {
            buckets,
            count,
            sum: nanos as f64 / 1e9,
        })
    }

    fn cells(&self) -> impl Iterator<Item = (RouteLabel, &'static str, u16, Sum)> + '_ {
        RouteLabel::ALL.into_iter().flat_map(move |r| {
            METHODS.iter().enumerate().flat_map(move |(m, method)| {
                CODES.iter().enumerate().filter_map(move |(c, code)| {
                    self.sum(LatencyTable::idx(r as usize, m, c))
                        .map(|s| (r, *method, *code, s))
                })
            })
        })
    }
}

fn code_label(code: u16) -> String {
    if code == 0 {
        "other".to_owned()
    } else {
        code.to_string()
    }
}

impl Collector for LatencyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tables = Loaded(self.tables.load_full());
        let cells: Vec<_> = tables.cells().collect();
        {
            let mut family = encoder.encode_descriptor(
                "iamlet_http_request_duration",
                "Time to answer an HTTP request, by route, method and status code",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (r, method, code, s) in &cells {
                let labels = [
                    ("route", r.as_str().to_owned()),
                    ("method", (*method).to_owned()),
                    ("code", code_label(*code)),
                ];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<Vec<(String, String)>>(s.sum, s.count, &s.buckets, None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "kube2iam_http_request_duration",
            "Time taken for kube2iam to serve HTTP request (kube2iam-compatible).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (r, method, code, s) in &cells {
            let labels = [
                ("code", code_label(*code)),
                ("method", (*method).to_owned()),
                ("handler", kube2iam_handler(*r).to_owned()),
            ];
            family
                .encode_family(&labels)?
                .encode_histogram::<Vec<(String, String)>>(s.sum, s.count, &s.buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn observations_are_summed_across_workers_and_encoded_under_both_names() {
        let tables: Vec<Arc<LatencyTable>> =
            (0..2).map(|_| Arc::new(LatencyTable::default())).collect();
        tables[0].observe(
            RouteLabel::Credentials,
            "GET",
            200,
            Duration::from_micros(500),
        );
        tables[1].observe(
            RouteLabel::Credentials,
            "GET",
            200,
            Duration::from_millis(3),
        );
        tables[1].observe(RouteLabel::Passthrough, "GET", 504, Duration::from_secs(60));
        let mut reg = Registry::default();
        reg.register_collector(Box::new(LatencyCollector {
            tables: Arc::new(arc_swap::ArcSwap::from_pointee(tables)),
        }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("iamlet_http_request_duration_seconds_count{route=\"credentials\",method=\"GET\",code=\"200\"} 2"), "{out}");
        assert!(out.contains("kube2iam_http_request_duration_seconds_bucket{le=\"0.001\",code=\"200\",method=\"GET\",handler=\"roleHandler\"} 1"), "{out}");
        assert!(out.contains("kube2iam_http_request_duration_seconds_bucket{le=\"0.004\",code=\"200\",method=\"GET\",handler=\"roleHandler\"} 2"), "{out}");
        assert!(out.contains("kube2iam_http_request_duration_seconds_bucket{le=\"+Inf\",code=\"504\",method=\"GET\",handler=\"reverseProxyHandler\"} 1"), "{out}");
    }
}
