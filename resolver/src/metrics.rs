//! Control-plane metrics (Prometheus, via prometheus-client). Labels are bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// kube2iam's `kube2iam_iam_request_duration_seconds` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IamLabels {
    code: String,
    role_arn: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role_arn: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Handles to the resolver's metrics.
#[derive(Clone, Debug)]
pub struct ResolverMetrics {
    pods_indexed: Gauge,
    ips_indexed: Gauge,
    roles_cached: Gauge,
    publishes: Counter,
    source_errors: Counter,
    assume_role: Family<OutcomeLabels, Counter>,
    assume_role_seconds: Histogram,
    assume_role_in_flight: Gauge,
    refreshes: Counter,
    kept_stale: Counter,
    rate_limited: Counter,
    k2i_iam_seconds: Family<IamLabels, Histogram>,
    k2i_cache_hits: Family<RoleLabels, Counter>,
}

impl ResolverMetrics {
    /// Registers the families under `iamlet_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ResolverMetrics {
            pods_indexed: Gauge::default(),
            ips_indexed: Gauge::default(),
            roles_cached: Gauge::default(),
            publishes: Counter::default(),
            source_errors: Counter::default(),
            assume_role: Family::default(),
            assume_role_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            assume_role_in_flight: Gauge::default(),
            refreshes: Counter::default(),
            kept_stale: Counter::default(),
            rate_limited: Counter::default(),
            k2i_iam_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            k2i_cache_hits: Family::default(),
        };
        let k = registry.sub_registry_with_prefix("kube2iam");
        k.register_with_unit(
            "iam_request_duration",
            "Time taken to complete IAM request in seconds (kube2iam-compatible).",
            prometheus_client::registry::Unit::Seconds,
            m.k2i_iam_seconds.clone(),
        );
        k.register(
            "iam_cache_hits",
            "Total number of IAM cache hits (kube2iam-compatible).",
            m.k2i_cache_hits.clone(),
        );
        let r = registry.sub_registry_with_prefix("iamlet");
        r.register(
            "pods_indexed",
            "Pods with at least one IP mapped in the published snapshot",
            m.pods_indexed.clone(),
        );
        r.register(
            "ips_indexed",
            "Pod IPs mapped in the published snapshot",
            m.ips_indexed.clone(),
        );
        r.register(
            "credential_keys",
            "Credential keys (role, external ID) held for live pods",
            m.roles_cached.clone(),
        );
        r.register(
            "snapshot_publishes",
            "Identity snapshots published to the workers",
            m.publishes.clone(),
        );
        r.register(
            "pod_source_errors",
            "Failed reads of the pod source (API server or pods file)",
            m.source_errors.clone(),
        );
        r.register(
            "sts_assume_role",
            "STS AssumeRole calls by outcome",
            m.assume_role.clone(),
        );
        r.register_with_unit(
            "sts_assume_role_duration",
            "STS AssumeRole latency",
            prometheus_client::registry::Unit::Seconds,
            m.assume_role_seconds.clone(),
        );
        m
    }

    /// `error`: the AWS error code, mapped to a bounded outcome label.
    /// The per-role cache-hit counter a credential slot increments (kube2iam-compatible).
    pub(crate) fn cache_hits_for(&self, role_arn: &str) -> Counter {
        Counter::clone(&self.k2i_cache_hits.get_or_create(&RoleLabels {
            role_arn: role_arn.to_owned(),
        }))
    }

    pub(crate) fn observe_assume_role_for(
        &self,
        role_arn: &str,
        error: Option<&str>,
        took: Duration,
    ) {
        let code = error.unwrap_or("Success").to_owned();
        self.k2i_iam_seconds
            .get_or_create(&IamLabels {
                code,
                role_arn: role_arn.to_owned(),
            })
            .observe(took.as_secs_f64());
        self.observe_assume_role(error, took);
    }

    pub(crate) fn observe_assume_role(&self, error: Option<&str>, took: Duration) {
        let outcome = match error {
            None => "success",
            Some(c) if c.contains("Throttl") || c.contains("RequestLimitExceeded") => "throttled",
            Some("AccessDenied") => "denied",
            Some("ServiceUnavailable") => "unavailable",
            Some(_) => "error",
        };
        self.assume_role
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.assume_role_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn in_flight(&self, delta: i64) {
        self.assume_role_in_flight.inc_by(delta);
    }

    pub(crate) fn refreshed(&self) {
        self.refreshes.inc();
    }

    pub(crate) fn kept_stale(&self) {
        self.kept_stale.inc();
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    pub(crate) fn set_index(&self, pods: usize, ips: usize, keys: usize) {
        self.pods_indexed.set(pods as i64);
        self.ips_indexed.set(ips as i64);
        self.roles_cached.set(keys as i64);
    }

    pub(crate) fn published(&self) {
        self.publishes.inc();
    }

    pub(crate) fn source_error(&self) {
        self.source_errors.inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchErrorLabels {
    resource: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

/// The Kubernetes watchers' health: errors by kind, and relists (each one follows a `410
/// Expired` or an error the watch could not resume from).
#[derive(Clone, Debug)]
pub struct WatchMetrics {
    errors: Family<WatchErrorLabels, Counter>,
    relists: Family<ResourceLabels, Counter>,
}

impl WatchMetrics {
    /// Registers `iamlet_watch_errors_total` and `iamlet_watch_relists_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = WatchMetrics {
            errors: Family::default(),
            relists: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("iamlet");
        r.register(
            "watch_errors",
            "Kubernetes watch errors by resource and kind (list_failed, watch_start_failed, expired, watch_error, stream_failed, no_resource_version)",
            m.errors.clone(),
        );
        r.register(
            "watch_relists",
            "Kubernetes watcher restarts from a fresh list, by resource",
            m.relists.clone(),
        );
        m
    }

    pub(crate) fn error(&self, resource: &'static str, kind: &'static str) {
        self.errors
            .get_or_create(&WatchErrorLabels { resource, kind })
            .inc();
    }

    pub(crate) fn relisted(&self, resource: &'static str) {
        self.relists
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }
}
