//! `iamlet_iptables_*` metrics: whether the redirect is in place, how often it had to be
//! restored, how often checking it failed. Labels: the address family only.

use super::rules::Family as IpFamily;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: &'static str,
}

/// Registered once; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    present: Family<FamilyLabel, Gauge>,
    restores: Family<FamilyLabel, Counter>,
    errors: Family<FamilyLabel, Counter>,
}

impl NodeMetrics {
    /// Registers these families (clones share the values) under `iamlet_iptables_*`.
    pub fn register(&self, registry: &mut Registry) {
        let m = self;
        let r = registry.sub_registry_with_prefix("iamlet_iptables");
        r.register(
            "rule_present",
            "1 when the IAMLET chain, its rules and the jump at the top of nat PREROUTING are as iamlet wants them",
            m.present.clone(),
        );
        r.register(
            "restores",
            "Times the redirect was found missing, moved or changed and was restored",
            m.restores.clone(),
        );
        r.register(
            "errors",
            "Checks or restores of the redirect that failed",
            m.errors.clone(),
        );
    }

    fn label(f: IpFamily) -> FamilyLabel {
        FamilyLabel { family: f.name() }
    }

    pub fn set_present(&self, f: IpFamily, yes: bool) {
        self.present
            .get_or_create(&Self::label(f))
            .set(i64::from(yes));
    }

    pub fn restored(&self, f: IpFamily) {
        self.restores.get_or_create(&Self::label(f)).inc();
    }

    pub fn error(&self, f: IpFamily) {
        self.errors.get_or_create(&Self::label(f)).inc();
    }

    /// Creates the series for `f` so they show 0 before anything happens.
    pub fn init(&self, f: IpFamily) {
        self.set_present(f, false);
        let _ = self.restores.get_or_create(&Self::label(f));
        let _ = self.errors.get_or_create(&Self::label(f));
    }
}
