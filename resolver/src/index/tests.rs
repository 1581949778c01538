//! Index rules as small tables: a sequence of steps, then who owns each IP.

use super::*;

/// A pod on `ip` with the given phase and creation time; role `role-<uid>`.
fn pod(uid: &str, ip: &str, phase: Phase, created: i64) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        namespace: "ns".into(),
        name: format!("pod-{uid}"),
        ips: vec![ip.parse().unwrap()],
        phase,
        host_network: false,
        created,
        terminating: false,
        role: Some(format!("role-{uid}")),
        external_id: None,
        service_account: None,
    }
}

fn running(uid: &str, ip: &str, created: i64) -> PodInfo {
    pod(uid, ip, Phase::Running, created)
}

fn terminating(mut p: PodInfo) -> PodInfo {
    p.terminating = true;
    p
}

fn host_network(mut p: PodInfo) -> PodInfo {
    p.host_network = true;
    p
}

fn with_ip(mut p: PodInfo, ip: &str) -> PodInfo {
    p.ips.push(ip.parse().unwrap());
    p
}

fn no_ip(mut p: PodInfo) -> PodInfo {
    p.ips.clear();
    p
}

/// A named table row: steps, then the expected owner of each IP.
type Case = (
    &'static str,
    Vec<Step>,
    Vec<(&'static str, Option<&'static str>)>,
);

enum Step {
    Apply(PodInfo),
    Delete(&'static str),
    Reset(Vec<PodInfo>),
}
use Step::*;

fn owner_of<'a>(idx: &'a PodIndex, ip: &str) -> Option<&'a str> {
    idx.owner(&ip.parse::<IpAddr>().unwrap())
        .map(|p| p.uid.as_str())
}

#[test]
fn ownership_rules_table() {
    const A: &str = "10.0.0.1";
    const B: &str = "10.0.0.2";
    let cases: Vec<Case> = vec![
        (
            "a pod owns its IP",
            vec![Apply(running("a", A, 1))],
            vec![(A, Some("a"))],
        ),
        (
            "every IP of a dual-stack pod maps to it",
            vec![Apply(with_ip(running("d", A, 1), "fd00::4"))],
            vec![(A, Some("d")), ("fd00::4", Some("d"))],
        ),
        (
            "a pod without an IP owns nothing",
            vec![Apply(no_ip(running("n", A, 1)))],
            vec![(A, None)],
        ),
        (
            "hostNetwork pods never own an IP",
            vec![Apply(host_network(running("h", A, 1)))],
            vec![(A, None)],
        ),
        (
            "hostNetwork pods do not displace a pod on the same IP",
            vec![
                Apply(running("p", A, 1)),
                Apply(host_network(running("h", A, 9))),
            ],
            vec![(A, Some("p"))],
        ),
        (
            "Succeeded or Failed pods are removed",
            vec![
                Apply(running("a", A, 1)),
                Apply(pod("a", A, Phase::Terminal, 1)),
            ],
            vec![(A, None)],
        ),
        (
            "a terminal pod that still reports the IP does not take it from the new pod",
            vec![
                Apply(running("new", A, 5)),
                Apply(pod("old", A, Phase::Terminal, 1)),
            ],
            vec![(A, Some("new"))],
        ),
        (
            "terminating pods keep their identity",
            vec![Apply(terminating(running("t", A, 1)))],
            vec![(A, Some("t"))],
        ),
        (
            "Running beats Pending, even a newer Pending",
            vec![
                Apply(running("old", A, 1)),
                Apply(pod("new", A, Phase::Pending, 5)),
            ],
            vec![(A, Some("old"))],
        ),
        (
            "Running beats Unknown",
            vec![
                Apply(pod("u", A, Phase::Unknown, 9)),
                Apply(running("r", A, 1)),
            ],
            vec![(A, Some("r"))],
        ),
        (
            "among Running pods the newer creationTimestamp wins",
            vec![Apply(running("new", A, 9)), Apply(running("old", A, 1))],
            vec![(A, Some("new"))],
        ),
        (
            "same creationTimestamp: the UID decides, whatever the arrival order",
            vec![Apply(running("b", A, 1)), Apply(running("a", A, 1))],
            vec![(A, Some("b"))],
        ),
        (
            "a live pod beats a terminating pod whose IP was handed on",
            vec![
                Apply(terminating(running("old", A, 9))),
                Apply(pod("new", A, Phase::Pending, 1)),
            ],
            vec![(A, Some("new"))],
        ),
        (
            "a delete removes the IP only from that UID: the new owner stays",
            vec![
                Apply(running("old", A, 1)),
                Apply(running("new", A, 2)),
                Delete("old"),
            ],
            vec![(A, Some("new"))],
        ),
        (
            "a delete of the losing claimant keeps the winner",
            vec![
                Apply(running("win", A, 2)),
                Apply(pod("lose", A, Phase::Pending, 3)),
                Delete("lose"),
            ],
            vec![(A, Some("win"))],
        ),
        (
            "a delete of the winner hands the IP to the remaining claimant",
            vec![
                Apply(running("win", A, 2)),
                Apply(pod("lose", A, Phase::Pending, 3)),
                Delete("win"),
            ],
            vec![(A, Some("lose"))],
        ),
        (
            "a delete of an unknown UID changes nothing",
            vec![Apply(running("a", A, 1)), Delete("zzz")],
            vec![(A, Some("a"))],
        ),
        (
            "a repeated delete (duplicate delivery) changes nothing",
            vec![
                Apply(running("a", A, 1)),
                Delete("a"),
                Apply(running("b", A, 2)),
                Delete("a"),
            ],
            vec![(A, Some("b"))],
        ),
        (
            "an IP change moves the pod",
            vec![Apply(running("a", A, 1)), Apply(running("a", B, 1))],
            vec![(A, None), (B, Some("a"))],
        ),
        (
            "a relist replaces everything",
            vec![Apply(running("a", A, 1)), Reset(vec![running("b", B, 1)])],
            vec![(A, None), (B, Some("b"))],
        ),
        (
            "a relist that no longer has the old owner hands the IP to the new one",
            vec![
                Apply(running("old", A, 1)),
                Reset(vec![running("new", A, 2)]),
            ],
            vec![(A, Some("new"))],
        ),
    ];
    for (name, steps, want) in cases {
        let mut idx = PodIndex::default();
        for s in steps {
            match s {
                Apply(p) => idx.apply(p),
                Delete(uid) => idx.delete(uid),
                Reset(ps) => idx.reset(ps),
            }
        }
        for (ip, owner) in want {
            assert_eq!(owner_of(&idx, ip), owner, "{name}: owner of {ip}");
        }
        // The incremental owner agrees with the full computation.
        let all = idx.owners();
        for (ip, p) in &all {
            assert_eq!(idx.owner(ip).map(|o| &o.uid), Some(&p.uid), "{name}");
        }
    }
}

#[test]
fn identical_updates_and_relists_record_no_change() {
    let mut idx = PodIndex::default();
    idx.apply(running("a", "10.0.0.1", 1));
    idx.apply(running("b", "10.0.0.2", 1));
    let first = idx.take_changes();
    assert_eq!(first.pods.len(), 2);
    assert_eq!(first.ips.len(), 2);
    idx.apply(running("a", "10.0.0.1", 1));
    idx.reset([running("a", "10.0.0.1", 1), running("b", "10.0.0.2", 1)]);
    assert!(idx.take_changes().is_empty());
    idx.reset([running("a", "10.0.0.1", 1)]);
    let ch = idx.take_changes();
    assert_eq!(ch.pods.iter().collect::<Vec<_>>(), ["b"]);
    assert_eq!(ch.ips.len(), 1);
}

#[test]
fn rank_changes_mark_the_ip_even_when_the_ip_set_is_unchanged() {
    let mut idx = PodIndex::default();
    idx.apply(pod("a", "10.0.0.1", Phase::Pending, 1));
    idx.take_changes();
    idx.apply(running("a", "10.0.0.1", 1));
    let ch = idx.take_changes();
    assert!(ch.ips.contains(&"10.0.0.1".parse::<IpAddr>().unwrap()));
    assert!(ch.pods.contains("a"));
}

#[test]
fn namespace_changes_are_recorded_only_when_different() {
    let ns = |name: &str, v: &str| NamespaceInfo {
        name: name.into(),
        annotations: [("k".to_string(), v.to_string())].into(),
    };
    let mut idx = PodIndex::default();
    idx.reset([ns("a", "1"), ns("b", "1")]);
    assert_eq!(idx.take_changes().namespaces.len(), 2);
    idx.apply_namespace(ns("a", "1"));
    idx.reset([ns("a", "1"), ns("b", "1")]);
    assert!(idx.take_changes().is_empty());
    idx.apply_namespace(ns("a", "2"));
    idx.reset([ns("a", "2")]);
    let ch = idx.take_changes();
    assert_eq!(ch.namespaces.len(), 2, "a changed, b removed");
    assert!(idx.namespace("b").is_none());
    assert_eq!(idx.namespace("a").unwrap().annotations["k"], "2");
}

fn sa(ns: &str, name: &str, role: Option<&str>) -> ServiceAccountInfo {
    ServiceAccountInfo {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("sa-{ns}-{name}"),
        role: role.map(Into::into),
    }
}

#[test]
fn service_account_changes_are_recorded_only_when_the_role_changes() {
    let mut idx = PodIndex::default();
    idx.reset([sa("ns", "web", Some("arn:r1")), sa("ns", "plain", None)]);
    let ch = idx.take_changes();
    assert_eq!(
        ch.service_accounts.into_iter().collect::<Vec<_>>(),
        [("ns".to_string(), "web".to_string())],
        "one without a role is not kept, so it changes nothing"
    );
    assert_eq!(idx.service_accounts_len(), 1);
    assert!(idx.service_account("ns", "plain").is_none());

    // The same role again, from a relist or a recreated ServiceAccount: no change.
    idx.apply_service_account(sa("ns", "web", Some("arn:r1")));
    let mut recreated = sa("ns", "web", Some("arn:r1"));
    recreated.uid = "sa-new".into();
    idx.apply_service_account(recreated);
    assert_eq!(idx.service_account("ns", "web").unwrap().uid, "sa-new");
    idx.reset([sa("ns", "web", Some("arn:r1"))]);
    assert!(idx.take_changes().is_empty());

    // A new role, the annotation removed, a delete of what is not there.
    idx.apply_service_account(sa("ns", "web", Some("arn:r2")));
    assert_eq!(idx.take_changes().service_accounts.len(), 1);
    idx.apply_service_account(sa("ns", "web", None));
    assert_eq!(idx.take_changes().service_accounts.len(), 1);
    assert!(idx.service_account("ns", "web").is_none());
    idx.delete_service_account("ns", "web");
    idx.delete_service_account("nowhere", "web");
    assert!(idx.take_changes().is_empty());

    // A relist without one that had a role records its removal.
    idx.apply_service_account(sa("a", "x", Some("arn:x")));
    idx.apply_service_account(sa("b", "y", Some("arn:y")));
    idx.take_changes();
    idx.reset([sa("b", "y", Some("arn:y"))]);
    let ch = idx.take_changes();
    assert_eq!(
        ch.service_accounts.into_iter().collect::<Vec<_>>(),
        [("a".to_string(), "x".to_string())]
    );
    assert_eq!(idx.service_accounts_len(), 1);
}

#[test]
fn a_pod_finds_its_service_accounts_role_by_namespace_and_name() {
    let mut idx = PodIndex::default();
    idx.apply_service_account(sa("ns", "web", Some("arn:web")));
    idx.apply_service_account(sa("ns", "default", Some("arn:default-sa")));
    idx.apply_service_account(sa("other", "web", Some("arn:other-web")));
    let mut p = running("a", "10.0.0.1", 1);
    p.service_account = Some("web".into());
    assert_eq!(idx.service_account_role(&p), Some("arn:web"));
    p.namespace = "other".into();
    assert_eq!(idx.service_account_role(&p), Some("arn:other-web"));
    p.namespace = "third".into();
    assert_eq!(idx.service_account_role(&p), None);
    // No serviceAccountName: the namespace's `default`.
    p.namespace = "ns".into();
    p.service_account = None;
    assert_eq!(idx.service_account_role(&p), Some("arn:default-sa"));
}
