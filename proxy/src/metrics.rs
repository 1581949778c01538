//! Data-plane metrics. Counter handles are resolved once per worker, so a request costs one
//! atomic add and no lock.

use crate::latency::{LatencyCollector, LatencyTable};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Bounded route labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    Token,
    Credentials,
    RoleList,
    Passthrough,
    Admin,
    Denied,
    Invalid,
}

impl RouteLabel {
    pub const ALL: [RouteLabel; 7] = [
        RouteLabel::Token,
        RouteLabel::Credentials,
        RouteLabel::RoleList,
        RouteLabel::Passthrough,
        RouteLabel::Admin,
        RouteLabel::Denied,
        RouteLabel::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Token => "token",
            RouteLabel::Credentials => "credentials",
            RouteLabel::RoleList => "role_list",
            RouteLabel::Passthrough => "passthrough",
            RouteLabel::Admin => "admin",
            RouteLabel::Denied => "denied",
            RouteLabel::Invalid => "invalid",
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every `outcome` of `iamlet_token_rejections_total`.
pub const TOKEN_REJECTIONS: [&str; 3] = ["missing", "invalid", "expired"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: &'static str,
}

/// Shared families, registered once.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    connections: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    ip_waits: Family<OutcomeLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    token_rejections: Family<OutcomeLabels, Counter>,
    tokens_issued: Counter,
    connections_rejected: Family<ReasonLabels, Counter>,
    connections_evicted: Counter,
    /// `/metrics` renderings (a flood of scrapes shares one per --metrics-max-age).
    pub metrics_renders: Counter,
    latency: Arc<Vec<Arc<LatencyTable>>>,
    next_table: Arc<AtomicUsize>,
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

/// Why a connection was closed at accept: its source already holds
/// `--max-connections-per-ip`, or the worker is at `--max-connections-per-worker` with every
/// connection mid-request (none idle to close instead).
pub const REJECT_REASONS: [&str; 2] = ["per_source", "worker_full"];

impl ProxyMetrics {
    /// Registers the families; `workers` sizes the per-worker latency tables.
    pub fn register(registry: &mut Registry, workers: usize) -> Self {
        let tables: Arc<Vec<Arc<LatencyTable>>> = Arc::new(
            (0..workers.max(1) + 1)
                .map(|_| Arc::new(LatencyTable::default()))
                .collect(),
        );
        registry.register_collector(Box::new(LatencyCollector {
            tables: tables.clone(),
        }));
        let m = ProxyMetrics {
            requests: Family::default(),
            connections: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            ip_waits: Family::default(),
            errors: Family::default(),
            token_rejections: Family::default(),
            tokens_issued: Counter::default(),
            connections_rejected: Family::default(),
            connections_evicted: Counter::default(),
            metrics_renders: Counter::default(),
            latency: tables,
            next_table: Arc::new(AtomicUsize::new(0)),
        };
        let r = registry.sub_registry_with_prefix("iamlet");
        r.register(
            "http_requests",
            "HTTP requests answered, by route and status class",
            m.requests.clone(),
        );
        r.register(
            "http_connections",
            "Connections accepted",
            m.connections.clone(),
        );
        r.register(
            "credential_cache_hits",
            "Credential requests answered from the cache",
            m.cache_hits.clone(),
        );
        r.register(
            "credential_cache_misses",
            "Credential requests that had to wait for STS",
            m.cache_misses.clone(),
        );
        r.register(
            "ip_waits",
            "Requests from an IP not yet known, by outcome",
            m.ip_waits.clone(),
        );
        r.register(
            "errors",
            "Errors by class (downstream: the client's request; upstream: the metadata service) and kind",
            m.errors.clone(),
        );
        r.register(
            "token_rejections",
            "IMDSv2 tokens refused, by outcome (missing, invalid, expired)",
            m.token_rejections.clone(),
        );
        r.register(
            "tokens_issued",
            "IMDSv2 tokens minted for pods",
            m.tokens_issued.clone(),
        );
        // Known outcomes exist at 0 from the start (dashboards show 0, not "no data").
        for outcome in TOKEN_REJECTIONS {
            let _ = m.token_rejections.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in REJECT_REASONS {
            let _ = m
                .connections_rejected
                .get_or_create(&ReasonLabels { reason });
        }
        r.register(
            "connections_rejected",
            "Connections closed at accept, by reason (per_source: the source address holds --max-connections-per-ip; worker_full: the worker is at --max-connections-per-worker and no connection is idle)",
            m.connections_rejected.clone(),
        );
        r.register(
            "metrics_renders",
            "Renderings of /metrics (scrapes within --metrics-max-age share one)",
            m.metrics_renders.clone(),
        );
        r.register(
            "connections_evicted",
            "Idle keep-alive connections closed to make room for a new one at --max-connections-per-worker",
            m.connections_evicted.clone(),
        );
        m
    }

    /// Per-worker handles.
    pub fn worker(&self) -> WorkerMetrics {
        let requests = RouteLabel::ALL.map(|r| {
            CLASSES.map(|status| {
                Counter::clone(&self.requests.get_or_create(&RequestLabels {
                    route: r.as_str(),
                    status,
                }))
            })
        });
        // One statement per lookup: a `get_or_create` guard held across a second lookup of the
        // same family deadlocks against another worker's insert.
        let ip_found = self
            .ip_waits
            .get_or_create(&OutcomeLabels { outcome: "found" })
            .clone();
        let ip_timeout = self
            .ip_waits
            .get_or_create(&OutcomeLabels { outcome: "timeout" })
            .clone();
        let table = self.latency
            [self.next_table.fetch_add(1, Ordering::Relaxed) % self.latency.len()]
        .clone();
        let rejected_per_source = self
            .connections_rejected
            .get_or_create(&ReasonLabels {
                reason: "per_source",
            })
            .clone();
        let rejected_worker_full = self
            .connections_rejected
            .get_or_create(&ReasonLabels {
                reason: "worker_full",
            })
            .clone();
        WorkerMetrics {
            latency: table,
            last: Cell::new((RouteLabel::Invalid, 0)),
            shared: self.clone(),
            tokens_issued: self.tokens_issued.clone(),
            rejected_per_source,
            rejected_worker_full,
            connections_evicted: self.connections_evicted.clone(),
            requests,
            connections: self.connections.clone(),
            cache_hits: self.cache_hits.clone(),
            cache_misses: self.cache_misses.clone(),
            ip_found,
            ip_timeout,
        }
    }
}

/// Resolved counters for one worker.
pub struct WorkerMetrics {
    latency: Arc<LatencyTable>,
    /// The route and status of the answer just written (for the latency histogram).
    last: Cell<(RouteLabel, u16)>,
    shared: ProxyMetrics,
    pub tokens_issued: Counter,
    pub rejected_per_source: Counter,
    pub rejected_worker_full: Counter,
    pub connections_evicted: Counter,
    requests: [[Counter; 5]; 7],
    pub connections: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub ip_found: Counter,
    pub ip_timeout: Counter,
}

impl WorkerMetrics {
    #[inline]
    pub fn request(&self, route: RouteLabel, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests[route as usize][class].inc();
        self.last.set((route, status));
    }

    /// Records the latency of the request whose answer was just counted.
    #[inline]
    pub fn observe_latency(&self, method: &str, took: Duration) {
        let (route, status) = self.last.get();
        self.latency.observe(route, method, status, took);
    }

    /// Counts an upstream failure (error path only: takes the family's lock).
    pub fn upstream_error(&self, kind: &'static str) {
        self.shared
            .errors
            .get_or_create(&ErrorLabels {
                class: "upstream",
                kind,
            })
            .inc();
    }

    /// Counts a request the pod got wrong (error path only).
    pub fn downstream_error(&self, kind: &'static str) {
        self.shared
            .errors
            .get_or_create(&ErrorLabels {
                class: "downstream",
                kind,
            })
            .inc();
    }

    /// Counts a refused IMDSv2 token: one of [`TOKEN_REJECTIONS`].
    pub fn token_rejected(&self, outcome: &'static str) {
        debug_assert!(TOKEN_REJECTIONS.contains(&outcome), "{outcome}");
        self.shared
            .token_rejections
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// kube2iam's `kube2iam_healthcheck_status` (1 when ready) and `kube2iam_info`, computed at
/// scrape time.
#[derive(Debug)]
pub struct Kube2iamStatus {
    pub handle: iamlet_resolver::Handle,
    pub node_ready: Arc<std::sync::atomic::AtomicBool>,
}

impl prometheus_client::collector::Collector for Kube2iamStatus {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let ready = self.handle.is_ready() && self.node_ready.load(Ordering::Acquire);
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
