//! Publishing: incremental snapshots equal a full rebuild, restrictions deny with a reason,
//! slots are shared and prefetched once, nothing is republished without a change.

use super::*;
use crate::pod::{NamespaceInfo, Phase, PodInfo, ServiceAccountInfo};
use crate::restrict::RestrictionFormat;
use prometheus_client::registry::Registry;

const BASE: &str = "arn:aws:iam::123456789012:role/";

fn pod(uid: &str, ip: &str, role: Option<&str>, ext: Option<&str>) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        namespace: "ns".into(),
        name: uid.into(),
        ips: vec![ip.parse().unwrap()],
        phase: Phase::Running,
        host_network: false,
        created: 1,
        terminating: false,
        role: role.map(Into::into),
        external_id: ext.map(Into::into),
        service_account: None,
    }
}

fn sa(ns: &str, name: &str, role: Option<&str>) -> ServiceAccountInfo {
    ServiceAccountInfo {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("sa-{name}"),
        role: role.map(Into::into),
    }
}

/// `p` running as ServiceAccount `name`.
fn as_sa(mut p: PodInfo, name: &str) -> PodInfo {
    p.service_account = Some(name.into());
    p
}

fn namespace(name: &str, allowed: Option<&str>) -> NamespaceInfo {
    NamespaceInfo {
        name: name.into(),
        annotations: allowed
            .map(|a| [("iam.amazonaws.com/allowed-roles".to_string(), a.to_string())].into())
            .unwrap_or_default(),
    }
}

fn state_with(
    default: Option<&str>,
    restrictions: Option<NamespaceRestrictions>,
) -> (State, mpsc::UnboundedReceiver<Arc<CredSlot>>, Arc<Shared>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Shared::new();
    let rules = RoleRules::new(Some(BASE), default).unwrap();
    let m = ResolverMetrics::register(&mut Registry::default());
    (
        State::new(rules, tx, shared.clone(), m).with_restrictions(restrictions),
        rx,
        shared,
    )
}

fn state() -> (State, mpsc::UnboundedReceiver<Arc<CredSlot>>, Arc<Shared>) {
    state_with(None, None)
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Arc<CredSlot>>) -> usize {
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    n
}

fn at(shared: &Shared, ip: &str) -> Option<Arc<Identity>> {
    shared.snapshot.load().get(&ip.parse().unwrap()).cloned()
}

#[test]
fn the_first_publish_marks_ready_even_when_empty() {
    let (mut st, _rx, shared) = state();
    assert!(!shared.is_ready());
    st.publish();
    assert!(shared.is_ready());
    assert_eq!(shared.snapshot.load().ips(), 0);
}

#[test]
fn pods_sharing_a_key_share_one_slot_and_one_prefetch() {
    let (mut st, mut rx, shared) = state();
    st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
    st.index.apply(pod("b", "10.0.0.2", Some("app"), None));
    st.index
        .apply(pod("c", "10.0.0.3", Some("app"), Some("tenant-2")));
    st.index.apply(pod("d", "10.0.0.4", None, None));
    st.publish();
    let role = |ip: &str| at(&shared, ip).unwrap().role.clone();
    let (a, b, c) = (
        role("10.0.0.1").unwrap(),
        role("10.0.0.2").unwrap(),
        role("10.0.0.3").unwrap(),
    );
    assert!(Arc::ptr_eq(&a, &b));
    assert!(
        !Arc::ptr_eq(&a.slot, &c.slot),
        "external ID must be part of the key"
    );
    assert_eq!(&a.listing[..], b"app");
    assert!(role("10.0.0.4").is_none());
    assert_eq!(drain(&mut rx), 2);
    let snap = shared.snapshot.load();
    assert_eq!((snap.pods(), snap.ips()), (4, 4));
}

#[test]
fn unchanged_state_is_not_republished_and_slots_survive() {
    let (mut st, mut rx, shared) = state();
    st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
    st.publish();
    let first = shared.snapshot.load_full();
    st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
    st.publish();
    assert!(Arc::ptr_eq(&first, &shared.snapshot.load_full()));
    st.index.apply(pod("b", "10.0.0.2", Some("app"), None));
    st.publish();
    let second = shared.snapshot.load_full();
    assert!(!Arc::ptr_eq(&first, &second));
    let slot = |s: &Snapshot, ip: &str| {
        s.get(&ip.parse().unwrap())
            .unwrap()
            .role
            .clone()
            .unwrap()
            .slot
            .clone()
    };
    assert!(Arc::ptr_eq(
        &slot(&first, "10.0.0.1"),
        &slot(&second, "10.0.0.2")
    ));
    assert_eq!(
        drain(&mut rx),
        1,
        "an existing key must not be fetched again"
    );
    // The old snapshot is immutable: b is not in it.
    assert!(first.get(&"10.0.0.2".parse().unwrap()).is_none());
}

#[test]
fn a_key_no_pod_uses_any_more_is_dropped_and_fetched_again_when_it_returns() {
    let (mut st, mut rx, _shared) = state();
    st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
    st.publish();
    assert_eq!(drain(&mut rx), 1);
    st.index.delete("a");
    st.publish();
    assert!(st.roles.is_empty());
    st.index.apply(pod("b", "10.0.0.2", Some("app"), None));
    st.publish();
    assert_eq!(drain(&mut rx), 1);
}

#[test]
fn a_restricted_role_is_denied_with_a_reason_and_never_fetched() {
    let restr = NamespaceRestrictions::default();
    let (mut st, mut rx, shared) = state_with(Some("fallback"), Some(restr));
    st.index.reset([namespace("ns", Some(r#"["web-*"]"#))]);
    st.index.apply(pod("app", "10.0.0.1", Some("app"), None));
    st.index.apply(pod("web", "10.0.0.2", Some("web-1"), None));
    st.index.apply(pod("plain", "10.0.0.3", None, None));
    let mut other = pod("lost", "10.0.0.4", Some("app"), None);
    other.namespace = "unknown".into();
    st.index.apply(other);
    st.publish();
    let app = at(&shared, "10.0.0.1").unwrap();
    assert!(app.role.is_none());
    assert_eq!(
        app.denied.as_deref(),
        Some(
            "role arn:aws:iam::123456789012:role/app is not allowed in namespace ns by its iam.amazonaws.com/allowed-roles annotation"
        )
    );
    assert!(at(&shared, "10.0.0.2").unwrap().role.is_some());
    let plain = at(&shared, "10.0.0.3").unwrap();
    assert_eq!(
        plain.role.as_ref().unwrap().arn,
        format!("{BASE}fallback"),
        "the default role bypasses restrictions"
    );
    let lost = at(&shared, "10.0.0.4").unwrap();
    assert!(lost.denied.as_deref().unwrap().contains("not known"));
    assert_eq!(drain(&mut rx), 2, "web-1 and the default role only");

    // The namespace now allows app-*: the same pod gets its role.
    st.index
        .apply_namespace(namespace("ns", Some(r#"["web-*", "app"]"#)));
    st.publish();
    let app = at(&shared, "10.0.0.1").unwrap();
    assert_eq!(app.role.as_ref().unwrap().arn, format!("{BASE}app"));
    assert!(app.denied.is_none());
    assert_eq!(drain(&mut rx), 1);
    // The web pod's identity did not change: same Arc.
    // And back: the annotation removed denies again.
    st.index.apply_namespace(namespace("ns", None));
    st.publish();
    assert!(
        at(&shared, "10.0.0.1")
            .unwrap()
            .denied
            .as_deref()
            .unwrap()
            .contains("missing or empty")
    );
    let snap = shared.snapshot.load();
    assert_eq!(snap.allowed_roles().get("ns"), Some(&Vec::<String>::new()));
}

#[test]
fn regexp_restrictions_apply_through_the_state() {
    let restr = NamespaceRestrictions {
        format: RestrictionFormat::Regexp,
        ..Default::default()
    };
    let (mut st, _rx, shared) = state_with(None, Some(restr));
    st.index.reset([namespace(
        "ns",
        Some(r#"["^arn:aws:iam::123456789012:role/app-[0-9]+$"]"#),
    )]);
    st.index.apply(pod("a", "10.0.0.1", Some("app-1"), None));
    st.index.apply(pod("b", "10.0.0.2", Some("app-x"), None));
    st.publish();
    assert!(at(&shared, "10.0.0.1").unwrap().denied.is_none());
    assert!(at(&shared, "10.0.0.2").unwrap().denied.is_some());
}

/// A tiny deterministic generator (xorshift64*), so the test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The snapshot a full rebuild would publish: IP → (UID, role ARN, denied).
fn expected(st: &State) -> BTreeMap<IpAddr, (String, Option<String>, Option<String>)> {
    st.index
        .owners()
        .into_iter()
        .map(|(ip, p)| {
            let spec = st.spec(p);
            (
                ip,
                (
                    p.uid.clone(),
                    spec.key.map(|k| k.role_arn),
                    spec.denied.map(|d| d.to_string()),
                ),
            )
        })
        .collect()
}

fn published(shared: &Shared) -> BTreeMap<IpAddr, (String, Option<String>, Option<String>)> {
    shared
        .snapshot
        .load()
        .iter()
        .map(|(ip, id)| {
            (
                *ip,
                (
                    id.uid.clone(),
                    id.role.as_ref().map(|r| r.arn.clone()),
                    id.denied.as_deref().map(str::to_owned),
                ),
            )
        })
        .collect()
}

#[test]
fn incremental_publishes_equal_a_full_rebuild_under_random_churn() {
    let restr = NamespaceRestrictions::default();
    let (mut st, mut rx, shared) = state_with(Some("fallback"), Some(restr));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let phases = [
        Phase::Pending,
        Phase::Running,
        Phase::Running,
        Phase::Terminal,
    ];
    for step in 0..5_000u32 {
        match rng.below(10) {
            0..=5 => {
                let uid = format!("u{}", rng.below(60));
                let ip = format!("10.0.0.{}", rng.below(24));
                let role = ["app", "web-1", "web-2", "admin"][rng.below(4) as usize];
                let mut p = pod(&uid, &ip, (rng.below(5) > 0).then_some(role), None);
                p.namespace = format!("ns{}", rng.below(3));
                p.service_account = (rng.below(4) > 0).then(|| format!("sa{}", rng.below(2)));
                p.phase = phases[rng.below(4) as usize];
                p.created = rng.below(5) as i64;
                p.terminating = rng.below(6) == 0;
                p.host_network = rng.below(20) == 0;
                if rng.below(15) == 0 {
                    p.ips
                        .push(format!("fd00::{}", rng.below(8)).parse().unwrap());
                }
                st.index.apply(p);
            }
            6..=7 => st.index.delete(&format!("u{}", rng.below(60))),
            8 => {
                let allowed = [
                    None,
                    Some(r#"["web-*"]"#),
                    Some(r#"["app","admin"]"#),
                    Some("bad"),
                ][rng.below(4) as usize];
                st.index
                    .apply_namespace(namespace(&format!("ns{}", rng.below(3)), allowed));
            }
            9 if rng.below(2) == 0 => st.index.delete_namespace(&format!("ns{}", rng.below(3))),
            _ => {
                // A ServiceAccount's role appears, changes or goes (`default` is one too).
                let name = ["sa0", "sa1", "default"][rng.below(3) as usize];
                let role = [
                    None,
                    Some(format!("{BASE}web-sa")),
                    Some(format!("{BASE}app")),
                    Some("arn:aws:iam::210987654321:role/cross".to_owned()),
                ][rng.below(4) as usize]
                    .clone();
                st.index.apply_service_account(sa(
                    &format!("ns{}", rng.below(3)),
                    name,
                    role.as_deref(),
                ));
            }
        }
        if rng.below(3) == 0 || step % 97 == 0 {
            st.publish();
            assert_eq!(published(&shared), expected(&st), "after step {step}");
            let snap = shared.snapshot.load();
            let owners: AHashSet<&str> = snap.iter().map(|(_, id)| id.uid.as_str()).collect();
            assert_eq!(snap.pods(), owners.len(), "after step {step}");
            assert_eq!(snap.ips(), snap.iter().count(), "after step {step}");
            // Every key in use is held once; no key is held without a user.
            let used: AHashSet<&CredKey> = st
                .identities
                .values()
                .filter_map(|i| i.role.as_ref().map(|r| r.slot.key()))
                .collect();
            assert_eq!(used.len(), st.roles.len(), "after step {step}");
        }
    }
    drain(&mut rx);
}

/// A state whose reports (Events) are kept in the returned receiver.
fn with_reports(shared: &Shared) -> mpsc::Receiver<Report> {
    let (tx, rx) = mpsc::channel(16);
    shared.reports.set(tx).unwrap();
    rx
}

fn reports(rx: &mut mpsc::Receiver<Report>) -> Vec<(ReportKind, String, String)> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push((r.kind, r.identity.pod.clone(), r.detail.unwrap_or_default()));
    }
    out
}

const SA_ROLE: &str = "arn:aws:iam::123456789012:role/from-sa";

#[test]
fn a_pod_without_an_annotation_gets_its_service_accounts_role_as_is() {
    let (mut st, mut rx, shared) = state_with(Some("fallback"), None);
    let cross = "arn:aws:iam::210987654321:role/cross-sa";
    st.index.reset([
        sa("ns", "web", Some(SA_ROLE)),
        sa("ns", "cross", Some(cross)),
        sa("ns", "plain", None),
    ]);
    st.index
        .apply(as_sa(pod("a", "10.0.0.1", None, Some("ext-1")), "web"));
    st.index
        .apply(as_sa(pod("b", "10.0.0.2", None, None), "cross"));
    st.index
        .apply(as_sa(pod("c", "10.0.0.3", None, None), "plain"));
    st.publish();
    let a = at(&shared, "10.0.0.1").unwrap();
    let role = a.role.as_ref().unwrap();
    assert_eq!(role.arn, SA_ROLE);
    assert_eq!(&role.listing[..], b"from-sa", "listed below the base ARN");
    assert_eq!(
        role.slot.key().external_id.as_deref(),
        Some("ext-1"),
        "the pod's external ID applies whatever the role's source"
    );
    let b = at(&shared, "10.0.0.2").unwrap();
    assert_eq!(b.role.as_ref().unwrap().arn, cross);
    assert_eq!(&b.role.as_ref().unwrap().listing[..], cross.as_bytes());
    let c = at(&shared, "10.0.0.3").unwrap();
    assert_eq!(c.role.as_ref().unwrap().arn, format!("{BASE}fallback"));
    assert_eq!(drain(&mut rx), 3, "every role prefetched");
}

#[test]
fn the_pod_annotation_wins_and_a_different_service_account_role_is_reported() {
    let (mut st, _rx, shared) = state();
    let mut events = with_reports(&shared);
    st.index
        .apply_service_account(sa("ns", "web", Some(SA_ROLE)));
    st.index
        .apply(as_sa(pod("own", "10.0.0.1", Some("app"), None), "web"));
    // The same role both ways is no conflict.
    st.index
        .apply(as_sa(pod("same", "10.0.0.2", Some(SA_ROLE), None), "web"));
    st.publish();
    assert_eq!(
        at(&shared, "10.0.0.1").unwrap().role.as_ref().unwrap().arn,
        format!("{BASE}app")
    );
    assert_eq!(
        at(&shared, "10.0.0.2").unwrap().role.as_ref().unwrap().arn,
        SA_ROLE
    );
    assert_eq!(
        reports(&mut events),
        [(
            ReportKind::Conflict,
            "own".to_owned(),
            format!(
                "the pod's role annotation names {BASE}app, its ServiceAccount web names {SA_ROLE}: the pod's annotation wins"
            )
        )]
    );
    // Reported again when the pod changes (the event task rate-limits it to one a minute).
    let mut again = as_sa(pod("own", "10.0.0.1", Some("app"), None), "web");
    again.terminating = true;
    st.index.apply(again);
    st.publish();
    assert_eq!(reports(&mut events).len(), 1);
    // Nothing is reported for pods whose annotation agrees or is absent.
    st.index
        .apply(as_sa(pod("sa-only", "10.0.0.3", None, None), "web"));
    st.publish();
    assert!(reports(&mut events).is_empty());
}

#[test]
fn a_service_account_annotation_change_refreshes_its_pods_and_only_them() {
    let (mut st, mut rx, shared) = state_with(Some("fallback"), None);
    st.index
        .apply_service_account(sa("ns", "web", Some(SA_ROLE)));
    st.index
        .apply(as_sa(pod("a", "10.0.0.1", None, None), "web"));
    st.index
        .apply(as_sa(pod("b", "10.0.0.2", None, None), "web"));
    st.index
        .apply(as_sa(pod("other", "10.0.0.3", None, None), "other"));
    let mut elsewhere = as_sa(pod("elsewhere", "10.0.0.4", None, None), "web");
    elsewhere.namespace = "ns2".into();
    st.index.apply(elsewhere);
    st.publish();
    assert_eq!(drain(&mut rx), 2, "the SA's role and the default role");
    let other_before = at(&shared, "10.0.0.3").unwrap();
    let elsewhere_before = at(&shared, "10.0.0.4").unwrap();

    let next = "arn:aws:iam::123456789012:role/next";
    st.index.apply_service_account(sa("ns", "web", Some(next)));
    st.publish();
    for ip in ["10.0.0.1", "10.0.0.2"] {
        assert_eq!(at(&shared, ip).unwrap().role.as_ref().unwrap().arn, next);
    }
    assert_eq!(drain(&mut rx), 1, "the new role is prefetched once");
    assert!(
        !st.roles.keys().any(|k| k.role_arn == SA_ROLE),
        "the old role's slot is dropped with its last pod"
    );
    // Pods of another ServiceAccount, or of one with the same name elsewhere, keep their
    // identity (the same Arc: not rebuilt).
    assert!(Arc::ptr_eq(
        &other_before,
        &at(&shared, "10.0.0.3").unwrap()
    ));
    assert!(Arc::ptr_eq(
        &elsewhere_before,
        &at(&shared, "10.0.0.4").unwrap()
    ));

    // Deleted: back to the default role; a relist that brings it back: its role again.
    st.index.delete_service_account("ns", "web");
    st.publish();
    assert_eq!(
        at(&shared, "10.0.0.1").unwrap().role.as_ref().unwrap().arn,
        format!("{BASE}fallback")
    );
    st.index.reset([sa("ns", "web", Some(SA_ROLE))]);
    st.publish();
    assert_eq!(
        at(&shared, "10.0.0.2").unwrap().role.as_ref().unwrap().arn,
        SA_ROLE
    );
    // Without a default role, a pod whose ServiceAccount lost its role has none.
    let (mut st, _rx, shared) = state();
    st.index
        .apply_service_account(sa("ns", "web", Some(SA_ROLE)));
    st.index
        .apply(as_sa(pod("a", "10.0.0.1", None, None), "web"));
    st.publish();
    assert!(at(&shared, "10.0.0.1").unwrap().role.is_some());
    st.index.apply_service_account(sa("ns", "web", None));
    st.publish();
    assert!(at(&shared, "10.0.0.1").unwrap().role.is_none());
}

#[test]
fn namespace_restrictions_apply_to_a_service_account_role() {
    let restr = NamespaceRestrictions::default();
    let (mut st, mut rx, shared) = state_with(Some("fallback"), Some(restr));
    st.index.reset([namespace("ns", Some(r#"["web-*"]"#))]);
    st.index
        .apply_service_account(sa("ns", "web", Some(SA_ROLE)));
    st.index
        .apply(as_sa(pod("a", "10.0.0.1", None, None), "web"));
    st.publish();
    let a = at(&shared, "10.0.0.1").unwrap();
    assert!(a.role.is_none());
    assert_eq!(
        a.denied.as_deref(),
        Some(
            "role arn:aws:iam::123456789012:role/from-sa is not allowed in namespace ns by its iam.amazonaws.com/allowed-roles annotation"
        )
    );
    assert_eq!(drain(&mut rx), 0, "a denied role is never fetched");
    // Allowed once the namespace lists it; denied again when the SA names another role.
    st.index
        .apply_namespace(namespace("ns", Some(r#"["web-*", "from-sa"]"#)));
    st.publish();
    assert_eq!(
        at(&shared, "10.0.0.1").unwrap().role.as_ref().unwrap().arn,
        SA_ROLE
    );
    st.index.apply_service_account(sa(
        "ns",
        "web",
        Some("arn:aws:iam::123456789012:role/admin"),
    ));
    st.publish();
    assert!(at(&shared, "10.0.0.1").unwrap().denied.is_some());
    // The default role bypasses restrictions, whether the SA names it or nothing does.
    st.index
        .apply_service_account(sa("ns", "web", Some(&format!("{BASE}fallback"))));
    st.publish();
    assert!(at(&shared, "10.0.0.1").unwrap().denied.is_none());
}

#[test]
fn a_newer_resource_version_alone_is_carried_by_a_snapshot_sharing_every_identity() {
    let (mut st, _rx, shared) = state();
    st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
    st.resource_version = Some(Arc::from("5"));
    st.publish();
    let first = shared.snapshot.load_full();
    assert_eq!(first.resource_version(), Some("5"));
    // An event that changes no answer: the version moves, the identities are the same.
    st.index.apply(pod("a", "10.0.0.1", Some("app"), None));
    st.resource_version = Some(Arc::from("6"));
    st.publish();
    let second = shared.snapshot.load_full();
    assert_eq!(second.resource_version(), Some("6"));
    assert_eq!(
        first.resource_version(),
        Some("5"),
        "a snapshot is immutable"
    );
    assert!(Arc::ptr_eq(
        first.get(&"10.0.0.1".parse().unwrap()).unwrap(),
        second.get(&"10.0.0.1".parse().unwrap()).unwrap()
    ));
    // Nothing new at all: nothing is stored.
    st.publish();
    assert!(Arc::ptr_eq(&second, &shared.snapshot.load_full()));
}
