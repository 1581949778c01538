//! Data-plane metrics. Counter handles are resolved once per worker, so a request costs one
//! atomic add and no lock.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

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
    const ALL: [RouteLabel; 7] = [
        RouteLabel::Token,
        RouteLabel::Credentials,
        RouteLabel::RoleList,
        RouteLabel::Passthrough,
        RouteLabel::Admin,
        RouteLabel::Denied,
        RouteLabel::Invalid,
    ];

    fn as_str(self) -> &'static str {
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
    connections_rejected: Counter,
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

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ProxyMetrics {
            requests: Family::default(),
            connections: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            ip_waits: Family::default(),
            errors: Family::default(),
            token_rejections: Family::default(),
            tokens_issued: Counter::default(),
            connections_rejected: Counter::default(),
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
        WorkerMetrics {
            shared: self.clone(),
            tokens_issued: self.tokens_issued.clone(),
            connections_rejected: self.connections_rejected.clone(),
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
    shared: ProxyMetrics,
    pub tokens_issued: Counter,
    pub connections_rejected: Counter,
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

    /// Counts a refused IMDSv2 token: `missing`, `invalid` or `expired`.
    pub fn token_rejected(&self, outcome: &'static str) {
        self.shared
            .token_rejections
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}
