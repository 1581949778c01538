//! Data-plane metrics. Each worker counts in cells of its own (no cache line another worker
//! writes), summed when `/metrics` is rendered.

use crate::latency::{LatencyCollector, LatencyTable, Tables, add_table};
use crate::route::RouteLabel;
use arc_swap::ArcSwap;
use iamlet_resolver::tally::CachePadded;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::registry::Registry;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const DOWNSTREAM: &str = "downstream";
const UPSTREAM: &str = "upstream";

/// Every `outcome` of `iamlet_token_rejections_total`.
pub const TOKEN_REJECTIONS: [&str; 3] = ["missing", "invalid", "expired"];

/// Every `outcome` of `iamlet_container_credentials_total`: tokens verified on first sight,
/// then every reason the door refuses a request.
pub const CONTAINER_OUTCOMES: [&str; 23] = [
    "verified",
    "malformed",
    "unknown_key",
    "algorithm",
    "signature",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
    "claims",
    "not_pod_bound",
    "rate_limited",
    "no_keys",
    "review",
    "host",
    "method",
    "other_node",
    "other_pod",
    "unknown_pod",
    "pod_gone",
    "denied",
    "no_role",
    "sts",
];

const DOWNSTREAM_ERRORS: usize = crate::downstream::DownstreamError::ALL.len();
const UPSTREAM_ERRORS: usize = crate::upstream::UpstreamError::ALL.len();

/// Why a connection was closed at accept: its source already holds
/// `--max-connections-per-ip`, or the worker is at `--max-connections-per-worker` with every
/// connection mid-request (none idle to close instead).
pub const REJECT_REASONS: [&str; 3] = ["per_source", "worker_full", "strangers"];

/// The cells of a worker's counters: `iamlet_http_requests_total` by route and status
/// class, then one cell per counter below.
const REQUESTS: usize = 0;
const CONNECTIONS: usize = REQUESTS + RouteLabel::ALL.len() * CLASSES.len();
const CACHE_HITS: usize = CONNECTIONS + 1;
const CACHE_MISSES: usize = CACHE_HITS + 1;
const IP_FOUND: usize = CACHE_MISSES + 1;
const IP_TIMEOUT: usize = IP_FOUND + 1;
const TOKENS_ISSUED: usize = IP_TIMEOUT + 1;
/// `iamlet_connections_rejected_total`, in [`REJECT_REASONS`] order.
const REJECTED: usize = TOKENS_ISSUED + 1;
const EVICTED: usize = REJECTED + REJECT_REASONS.len();
const PEER_GONE: usize = EVICTED + 1;
const UPSTREAM_OPENED: usize = PEER_GONE + 1;
/// `iamlet_errors_total{class="downstream"}`, in `DownstreamError::ALL` order, then
/// `{class="upstream"}` in `UpstreamError::ALL` order.
const ERRORS: usize = UPSTREAM_OPENED + 1;
/// `iamlet_token_rejections_total`, in [`TOKEN_REJECTIONS`] order.
const TOKEN_REJECTED: usize = ERRORS + DOWNSTREAM_ERRORS + UPSTREAM_ERRORS;
/// `iamlet_container_credentials_total`, in [`CONTAINER_OUTCOMES`] order.
const CONTAINER: usize = TOKEN_REJECTED + TOKEN_REJECTIONS.len();
const CELLS: usize = CONTAINER + CONTAINER_OUTCOMES.len();

/// One worker's counter cells, written by that worker only. The alignment keeps every other
/// allocation (another worker's cells among them) off its cache lines.
type Cells = CachePadded<[AtomicU64; CELLS]>;

fn new_cells() -> Arc<Cells> {
    Arc::new(CachePadded(std::array::from_fn(|_| AtomicU64::new(0))))
}

/// One counter of one worker. Neither `Clone` nor `Sync`: its worker is the only writer, so
/// an increment is a relaxed load and store (no read-modify-write, no lock prefix).
#[derive(Debug)]
pub struct LocalCounter {
    cells: Arc<Cells>,
    cell: usize,
    _one_writer: PhantomData<Cell<()>>,
}

impl LocalCounter {
    fn new(cells: &Arc<Cells>, cell: usize) -> Self {
        LocalCounter {
            cells: cells.clone(),
            cell,
            _one_writer: PhantomData,
        }
    }

    #[inline]
    pub fn inc(&self) {
        bump(&self.cells[self.cell]);
    }
}

#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Shared families, registered once.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    /// Every worker's cells (a worker's stay after it stops: counters never go down).
    cells: Tables<Cells>,
    latency: Tables<LatencyTable>,
    /// `/metrics` renderings (a flood of scrapes shares one per --metrics-max-age).
    pub metrics_renders: Counter,
}

/// Error classes and kinds, both bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    class: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: &'static str,
}

impl ProxyMetrics {
    /// Registers the families; `workers` is how many workers to expect (a capacity hint:
    /// each worker made by [`ProxyMetrics::worker`] gets cells of its own).
    pub fn register(registry: &mut Registry, workers: usize) -> Self {
        let m = ProxyMetrics {
            cells: Arc::new(ArcSwap::from_pointee(Vec::with_capacity(workers + 1))),
            latency: Arc::new(ArcSwap::from_pointee(Vec::with_capacity(workers + 1))),
            metrics_renders: Counter::default(),
        };
        registry.register_collector(Box::new(LatencyCollector {
            tables: m.latency.clone(),
        }));
        registry
            .sub_registry_with_prefix("iamlet")
            .register_collector(Box::new(m.clone()));
        m
    }

    /// A new worker's handles, over cells of its own.
    pub fn worker(&self) -> WorkerMetrics {
        let cells = new_cells();
        let latency = Arc::new(LatencyTable::default());
        add_table(&self.cells, &cells);
        add_table(&self.latency, &latency);
        let c = |cell| LocalCounter::new(&cells, cell);
        WorkerMetrics {
            latency,
            tokens_issued: c(TOKENS_ISSUED),
            rejected_per_source: c(REJECTED),
            rejected_worker_full: c(REJECTED + 1),
            rejected_strangers: c(REJECTED + 2),
            peer_gone: c(PEER_GONE),
            connections_evicted: c(EVICTED),
            connections: c(CONNECTIONS),
            cache_hits: c(CACHE_HITS),
            cache_misses: c(CACHE_MISSES),
            ip_found: c(IP_FOUND),
            ip_timeout: c(IP_TIMEOUT),
            cells,
        }
    }
}

/// Sums cell `i` over every worker.
fn sum(cells: &[Arc<Cells>], i: usize) -> u64 {
    cells
        .iter()
        .fold(0u64, |n, c| n.wrapping_add(c[i].load(Ordering::Relaxed)))
}

/// The registry's way of exposing a counter, kept for the summed ones: the help text it
/// registered the families with (its own plus a period), the prefix of the sub-registry.
fn counter<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    encoder.encode_descriptor(name, &format!("{help}."), None, MetricType::Counter)
}

fn family<'a, L: EncodeLabelSet>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut f = counter(encoder, name, help)?;
    for (labels, n) in series {
        ConstCounter::new(n).encode(f.encode_family(&labels)?)?;
    }
    Ok(())
}

fn single(encoder: &mut DescriptorEncoder, name: &str, help: &str, n: u64) -> std::fmt::Result {
    ConstCounter::new(n).encode(counter(encoder, name, help)?)
}

/// The families under `iamlet_`, in the order they were registered before the per-worker
/// counters existed, with their names, help and labels unchanged.
impl Collector for ProxyMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cells = self.cells.load_full();
        let s = |i| sum(&cells, i);
        let e = &mut encoder;
        // Label families with no series yet (no worker yet) are left out, as the registry does.
        if !cells.is_empty() {
            let series = RouteLabel::ALL.into_iter().flat_map(|r| {
                CLASSES.iter().enumerate().map(move |(class, status)| {
                    let labels = RequestLabels {
                        route: r.as_str(),
                        status,
                    };
                    (labels, REQUESTS + r as usize * CLASSES.len() + class)
                })
            });
            let series: Vec<_> = series.map(|(l, i)| (l, s(i))).collect();
            family(
                e,
                "http_requests",
                "HTTP requests answered, by route and status class",
                series,
            )?;
        }
        single(
            e,
            "http_connections",
            "Connections accepted",
            s(CONNECTIONS),
        )?;
        single(
            e,
            "credential_cache_hits",
            "Credential requests answered from the cache",
            s(CACHE_HITS),
        )?;
        single(
            e,
            "credential_cache_misses",
            "Credential requests that had to wait for STS",
            s(CACHE_MISSES),
        )?;
        if !cells.is_empty() {
            family(
                e,
                "ip_waits",
                "Requests from an IP not yet known, by outcome",
                [("found", IP_FOUND), ("timeout", IP_TIMEOUT)]
                    .map(|(outcome, i)| (OutcomeLabels { outcome }, s(i))),
            )?;
        }
        // Errors and container outcomes appear once seen; the token rejections' outcomes are
        // there at 0 from the start (dashboards show 0, not "no data").
        let downstream = crate::downstream::DownstreamError::ALL
            .iter()
            .enumerate()
            .map(|(k, e)| ((DOWNSTREAM, e.label()), ERRORS + k));
        let upstream = crate::upstream::UpstreamError::ALL
            .iter()
            .enumerate()
            .map(|(k, e)| ((UPSTREAM, e.label()), ERRORS + DOWNSTREAM_ERRORS + k));
        let errors: Vec<_> = downstream
            .chain(upstream)
            .map(|((class, kind), i)| (ErrorLabels { class, kind }, s(i)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if !errors.is_empty() {
            family(
                e,
                "errors",
                "Errors by class (downstream: the client's request; upstream: the metadata service) and kind",
                errors,
            )?;
        }
        family(
            e,
            "token_rejections",
            "IMDSv2 tokens refused, by outcome (missing, invalid, expired)",
            TOKEN_REJECTIONS
                .iter()
                .enumerate()
                .map(|(k, &outcome)| (OutcomeLabels { outcome }, s(TOKEN_REJECTED + k))),
        )?;
        let container: Vec<_> = CONTAINER_OUTCOMES
            .iter()
            .enumerate()
            .map(|(k, &outcome)| (OutcomeLabels { outcome }, s(CONTAINER + k)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if !container.is_empty() {
            family(
                e,
                "container_credentials",
                "The container-credentials endpoint: service-account tokens verified on first sight (verified) and requests refused, by reason (malformed, unknown_key, algorithm, signature, expired, not_yet_valid, issuer, audience, claims, not_pod_bound, rate_limited, no_keys, review, host, method, other_node, other_pod, unknown_pod, pod_gone, denied, no_role, sts)",
                container,
            )?;
        }
        single(
            e,
            "tokens_issued",
            "IMDSv2 tokens minted for pods",
            s(TOKENS_ISSUED),
        )?;
        family(
            e,
            "connections_rejected",
            "Connections closed at accept, by reason (per_source: the source address holds --max-connections-per-ip; worker_full: the worker is at --max-connections-per-worker and no connection can make room; strangers: a source that is not a known pod while such sources hold their share, a sixteenth of --max-connections-per-worker)",
            REJECT_REASONS
                .iter()
                .enumerate()
                .map(|(k, &reason)| (ReasonLabels { reason }, s(REJECTED + k))),
        )?;
        self.metrics_renders.encode(counter(
            e,
            "metrics_renders",
            "Renderings of /metrics (scrapes within --metrics-max-age share one)",
        )?)?;
        single(
            e,
            "connections_evicted",
            "Connections closed to make room for a new one at --max-connections-per-worker (strangers first, then waiting requests, then the longest-idle keep-alive)",
            s(EVICTED),
        )?;
        single(
            e,
            "requests_abandoned",
            "Requests given up while they waited because their client had gone (connection, buffers and slot released at once)",
            s(PEER_GONE),
        )?;
        single(
            e,
            "upstream_connections_opened",
            "Connections opened to the metadata service (each worker holds at most 16, busy and idle)",
            s(UPSTREAM_OPENED),
        )
    }
}

/// Resolved counters for one worker.
pub struct WorkerMetrics {
    cells: Arc<Cells>,
    latency: Arc<LatencyTable>,
    pub tokens_issued: LocalCounter,
    pub rejected_per_source: LocalCounter,
    pub rejected_worker_full: LocalCounter,
    pub rejected_strangers: LocalCounter,
    /// Requests abandoned because their client left while they waited.
    pub peer_gone: LocalCounter,
    pub connections_evicted: LocalCounter,
    pub connections: LocalCounter,
    pub cache_hits: LocalCounter,
    pub cache_misses: LocalCounter,
    pub ip_found: LocalCounter,
    pub ip_timeout: LocalCounter,
}

impl WorkerMetrics {
    /// The counter of connections opened to the metadata service, for the worker's
    /// `Upstream` (same thread, so still one writer).
    pub fn upstream_opened(&self) -> LocalCounter {
        LocalCounter::new(&self.cells, UPSTREAM_OPENED)
    }

    #[inline]
    pub fn request(&self, route: RouteLabel, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        bump(&self.cells[REQUESTS + route as usize * CLASSES.len() + class]);
    }

    /// Records how long a request answered on `route` with `status` took.
    #[inline]
    pub fn observe_latency(&self, route: RouteLabel, method: &str, status: u16, took: Duration) {
        self.latency.observe(route, method, status, took);
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, e: crate::upstream::UpstreamError) {
        let k = crate::upstream::UpstreamError::ALL
            .iter()
            .position(|x| *x == e)
            .unwrap_or(0);
        bump(&self.cells[ERRORS + DOWNSTREAM_ERRORS + k]);
    }

    /// Counts a request the pod got wrong.
    pub fn downstream_error(&self, e: crate::downstream::DownstreamError) {
        let k = crate::downstream::DownstreamError::ALL
            .iter()
            .position(|x| *x == e)
            .unwrap_or(0);
        bump(&self.cells[ERRORS + k]);
    }

    /// Counts a refused IMDSv2 token: one of [`TOKEN_REJECTIONS`].
    pub fn token_rejected(&self, outcome: &'static str) {
        debug_assert!(TOKEN_REJECTIONS.contains(&outcome), "{outcome}");
        if let Some(k) = TOKEN_REJECTIONS.iter().position(|x| *x == outcome) {
            bump(&self.cells[TOKEN_REJECTED + k]);
        }
    }

    /// Counts one outcome of the container-credentials door: one of [`CONTAINER_OUTCOMES`].
    pub fn container_outcome(&self, outcome: &'static str) {
        debug_assert!(CONTAINER_OUTCOMES.contains(&outcome), "{outcome}");
        if let Some(k) = CONTAINER_OUTCOMES.iter().position(|x| *x == outcome) {
            bump(&self.cells[CONTAINER + k]);
        }
    }
}

/// kube2iam's `kube2iam_healthcheck_status` (1 when ready) and `kube2iam_info`, computed at
/// scrape time.
#[derive(Debug)]
pub struct Kube2iamStatus {
    pub readiness: crate::shared::Readiness,
}

impl prometheus_client::collector::Collector for Kube2iamStatus {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let ready = self.readiness.is_ready();
        let status = ConstGauge::new(i64::from(ready));
        status.encode(encoder.encode_descriptor(
            "kube2iam_healthcheck_status",
            "The healthcheck status at scrape time. A value of 1 means it is passing, 0 means it is failing.",
            None,
            status.metric_type(),
        )?)?;
        let info = ConstGauge::new(1i64);
        let labels = [
            ("version", env!("CARGO_PKG_VERSION")),
            (
                "build_date",
                option_env!("IAMLET_BUILD_DATE").unwrap_or("unknown"),
            ),
            (
                "commit_hash",
                option_env!("IAMLET_GIT_COMMIT").unwrap_or("unknown"),
            ),
        ];
        let mut family = encoder.encode_descriptor(
            "kube2iam_info",
            "Informational labels about the kube2iam-compatible process (iamlet).",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&labels)?)?;
        Ok(())
    }
}

/// Converts prometheus-client's OpenMetrics text to the classic Prometheus text format
/// (0.0.4): counter families are named with their `_total` suffix in `# HELP`/`# TYPE`, and
/// `# UNIT` and `# EOF` lines are dropped. Samples are identical in both formats.
pub fn openmetrics_to_text(om: &str) -> String {
    let classic = Classic::new(om);
    let mut out = Vec::with_capacity(classic.len());
    classic.write_into(&mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// An OpenMetrics exposition to be written as classic text: its length is known before the
/// bytes are written (for Content-Length), and they go straight into the answer buffer (with
/// hundreds of roles the exposition is megabytes; no intermediate copy).
pub struct Classic<'a> {
    om: &'a str,
    counters: ahash::AHashSet<&'a str>,
}

impl<'a> Classic<'a> {
    pub fn new(om: &'a str) -> Self {
        let counters = om
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(" counter"))
            .collect();
        Classic { om, counters }
    }

    /// Length of the classic text.
    pub fn len(&self) -> usize {
        let mut n = 0;
        self.convert(|part| n += part.len());
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the classic text to `out`.
    pub fn write_into(&self, out: &mut Vec<u8>) {
        self.convert(|part| out.extend_from_slice(part.as_bytes()));
    }

    fn convert(&self, mut push: impl FnMut(&str)) {
        let (om, counters) = (self.om, &self.counters);
        for line in om.lines() {
            if line.starts_with("# UNIT ") || line == "# EOF" {
                continue;
            }
            let meta = line
                .strip_prefix("# HELP ")
                .map(|r| ("# HELP ", r))
                .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
            match meta {
                Some((kind, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    push(kind);
                    push(name);
                    if counters.contains(name) {
                        push("_total");
                    }
                    push(" ");
                    push(tail);
                }
                None => push(line),
            }
            push("\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workers_counts_are_summed_under_the_registered_names() {
        let mut reg = Registry::default();
        let m = ProxyMetrics::register(&mut reg, 2);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let w = m.worker();
                    w.request(RouteLabel::Credentials, 200);
                    w.cache_hits.inc();
                    w.rejected_worker_full.inc();
                    w.observe_latency(
                        RouteLabel::Credentials,
                        "GET",
                        200,
                        Duration::from_millis(1),
                    );
                });
            }
        });
        m.worker()
            .downstream_error(crate::downstream::DownstreamError::Method);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            "# HELP iamlet_http_requests HTTP requests answered, by route and status class.",
            "# TYPE iamlet_http_requests counter",
            "iamlet_http_requests_total{route=\"credentials\",status=\"2xx\"} 2",
            "iamlet_http_requests_total{route=\"credentials\",status=\"4xx\"} 0",
            "iamlet_credential_cache_hits_total 2",
            "iamlet_credential_cache_misses_total 0",
            "iamlet_ip_waits_total{outcome=\"timeout\"} 0",
            "iamlet_connections_rejected_total{reason=\"worker_full\"} 2",
            "iamlet_connections_rejected_total{reason=\"per_source\"} 0",
            "iamlet_errors_total{class=\"downstream\",kind=\"method\"} 1",
            "iamlet_token_rejections_total{outcome=\"missing\"} 0",
            "iamlet_http_request_duration_seconds_count{route=\"credentials\",method=\"GET\",code=\"200\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn openmetrics_counters_get_total_names_in_classic_text() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 3\n# HELP a_seconds Time.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\na_seconds_count 1\n# HELP g Gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let want = "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 3\n# HELP a_seconds Time.\n# TYPE a_seconds histogram\na_seconds_count 1\n# HELP g Gauge.\n# TYPE g gauge\ng 1\n";
        assert_eq!(openmetrics_to_text(om), want);
        assert_eq!(Classic::new(om).len(), want.len());
        let mut out = b"head|".to_vec();
        Classic::new(om).write_into(&mut out);
        assert_eq!(out, [b"head|".as_slice(), want.as_bytes()].concat());
    }
}
