//! Control-plane metrics (Prometheus, via prometheus-client). Labels are bounded.

use crate::tally::ThreadCounter;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
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
    k2i_cache_hits: RoleHits,
}

/// The cache-hit counter of one role, incremented by the workers on every credential answer
/// served from the cache: per-thread cells, so workers answering for the same role do not
/// write one shared cache line.
pub type RoleHitCounter = Arc<ThreadCounter>;

/// `kube2iam_iam_cache_hits_total{role_arn}`: every role seen, summed at scrape time.
#[derive(Clone, Debug, Default)]
struct RoleHits {
    roles: Arc<Mutex<BTreeMap<String, RoleHitCounter>>>,
}

impl Collector for RoleHits {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        if roles.is_empty() {
            return Ok(());
        }
        // The help text as this family has always been exposed (it was registered with a
        // closing period, and the registry adds one).
        let mut family = encoder.encode_descriptor(
            "iam_cache_hits",
            "Total number of IAM cache hits (kube2iam-compatible)..",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (arn, hits) in roles.iter() {
            let labels = RoleLabels {
                role_arn: arn.clone(),
            };
            ConstCounter::new(hits.get()).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
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
            k2i_cache_hits: RoleHits::default(),
        };
        let k = registry.sub_registry_with_prefix("kube2iam");
        k.register_with_unit(
            "iam_request_duration",
            "Time taken to complete IAM request in seconds (kube2iam-compatible).",
            prometheus_client::registry::Unit::Seconds,
            m.k2i_iam_seconds.clone(),
        );
        // Families whose label values are known up front exist at 0 from the start
        // (dashboards and rate() then show 0, not "no data").
        for outcome in ASSUME_ROLE_OUTCOMES {
            let _ = m.assume_role.get_or_create(&OutcomeLabels { outcome });
        }
        k.register_collector(Box::new(m.k2i_cache_hits.clone()));
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

    /// The per-role cache-hit counter a credential slot increments (kube2iam-compatible).
    /// Also creates the role's successful-call series of
    /// `kube2iam_iam_request_duration_seconds` at 0, so a role's panels show 0, not "no
    /// data", before its first call completes.
    pub(crate) fn cache_hits_for(&self, role_arn: &str) -> RoleHitCounter {
        let _ = self.k2i_iam_seconds.get_or_create(&IamLabels {
            code: "Success".to_owned(),
            role_arn: role_arn.to_owned(),
        });
        let mut roles = self
            .k2i_cache_hits
            .roles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        roles.entry(role_arn.to_owned()).or_default().clone()
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
        let outcome = assume_role_outcome(error);
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

/// Every `outcome` of `iamlet_sts_assume_role_total`.
const ASSUME_ROLE_OUTCOMES: [&str; 5] = ["success", "throttled", "denied", "unavailable", "error"];

/// The bounded outcome label for an AWS error code (`None`: success).
fn assume_role_outcome(error: Option<&str>) -> &'static str {
    match error {
        None => "success",
        Some(c) if c.contains("Throttl") || c.contains("RequestLimitExceeded") => "throttled",
        Some("AccessDenied") => "denied",
        Some("ServiceUnavailable") => "unavailable",
        Some(_) => "error",
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
        // Pods are always watched: their relist count exists at 0 from the start.
        let _ = m
            .relists
            .get_or_create(&ResourceLabels { resource: "pods" });
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn exposition(register: impl FnOnce(&mut Registry)) -> String {
        let mut r = Registry::default();
        register(&mut r);
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn families_with_known_labels_exist_at_zero_before_any_event() {
        let text = exposition(|r| {
            ResolverMetrics::register(r);
            WatchMetrics::register(r);
        });
        for outcome in ASSUME_ROLE_OUTCOMES {
            let line = format!("iamlet_sts_assume_role_total{{outcome=\"{outcome}\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l == "iamlet_watch_relists_total{resource=\"pods\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn a_roles_kube2iam_series_exist_at_zero_once_its_slot_exists() {
        let mut r = Registry::default();
        let m = ResolverMetrics::register(&mut r);
        let _hits = m.cache_hits_for("arn:aws:iam::1:role/a");
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        assert!(
            text.contains(
                "kube2iam_iam_request_duration_seconds_count{code=\"Success\",role_arn=\"arn:aws:iam::1:role/a\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("kube2iam_iam_cache_hits_total{role_arn=\"arn:aws:iam::1:role/a\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn aws_error_codes_map_to_bounded_outcomes() {
        for (code, want) in [
            (None, "success"),
            (Some("Throttling"), "throttled"),
            (Some("RequestLimitExceeded"), "throttled"),
            (Some("AccessDenied"), "denied"),
            (Some("ServiceUnavailable"), "unavailable"),
            (Some("InvalidClientTokenId"), "error"),
        ] {
            assert_eq!(assume_role_outcome(code), want, "{code:?}");
            assert!(ASSUME_ROLE_OUTCOMES.contains(&want));
        }
    }
}
