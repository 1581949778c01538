//! Control-plane metrics (Prometheus, via prometheus-client). Labels are bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

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
        };
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

    pub(crate) fn observe_assume_role(&self, ok: bool, took: Duration) {
        let outcome = if ok { "success" } else { "error" };
        self.assume_role
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.assume_role_seconds.observe(took.as_secs_f64());
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
