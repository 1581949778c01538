//! The control plane end to end against the real thing: the `iamlet` binary watching a real
//! kube-apiserver (and etcd) built from their Go modules, with the shipped ServiceAccount's
//! token and nothing more (`deploy/manifests/iamlet.yaml`'s RBAC), moto as STS, the fake IMDS
//! upstream, raw clients from the pods' own IPs. Each test has a node and namespaces of its
//! own on the shared server. The worst failure this product can have is one pod getting
//! another pod's role; these tests drive pod lifecycles and check what the running proxy
//! answers. What only a scripted server can do (a stream cut mid-event, a 410 at an exact
//! moment, a 500 on a relist) is in `control_plane_faults.rs`.

use iamlet_e2e::apiserver::PodBuilder;
use iamlet_e2e::realapi::RealApiServer;
use iamlet_e2e::rig::control::{BASE, LIST, real, real_with};
use iamlet_e2e::rig::data::sample;
use iamlet_e2e::wait_until;
use std::time::{Duration, Instant};

/// The agent's user, as the API server authenticates its token.
const AGENT: &str = "system:serviceaccount:kube-system:iamlet";

#[test]
fn the_node_field_selector_scopes_every_list_and_watch_to_this_node() {
    let api = RealApiServer::shared();
    let s = api.scope("field-selector");
    let ns = s.ns("shop");
    let other = format!("{}-other", s.node);
    s.create_node(&other);
    s.create_pod(&PodBuilder::running(&ns, "mine", &s.node, "127.20.0.1").role("mine"));
    s.create_pod(&PodBuilder::running(&ns, "theirs", &other, "127.20.0.2").role("theirs"));
    let node = s.node.clone();
    let r = real(s, &["--backoff-max-elapsed-time=300ms"]);

    let resp = r.get("127.20.0.1", LIST);
    assert_eq!((resp.status, resp.body_str().as_str()), (200, "mine"));
    // Another node's pod is unknown here, now and after it changes.
    assert_eq!(r.get("127.20.0.2", LIST).status, 404);
    r.api
        .create_pod(&PodBuilder::running(&ns, "later", &other, "127.20.0.3").role("later"));
    r.api.set_pod_phase(&ns, "theirs", "Running");
    assert_eq!(r.get("127.20.0.3", LIST).status, 404);
    let store = r.store();
    let ips: Vec<&str> = store["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["127.20.0.1"], "{store}");
    assert_eq!(store["rolesByIP"]["127.20.0.1"], format!("{BASE}mine"));
    assert_eq!(store["namespaceByIP"]["127.20.0.1"], ns);

    // What the API server itself recorded of this agent's pod requests (its audit log):
    // every list and watch carries this node's field selector, lists are consistent reads
    // (never resourceVersion=0), and no namespace is read without restrictions.
    let selector = format!("fieldSelector=spec.nodeName%3D{node}");
    let mine: Vec<String> = api
        .audit_of(AGENT)
        .iter()
        .filter_map(|e| e["requestURI"].as_str().map(str::to_owned))
        .filter(|u| u.starts_with("/api/v1/pods") && u.contains(&node))
        .collect();
    assert!(
        mine.iter().any(|u| !u.contains("watch=")),
        "a list: {mine:?}"
    );
    assert!(
        mine.iter().any(|u| u.contains("watch=")),
        "a watch: {mine:?}"
    );
    for u in &mine {
        assert!(u.contains(&selector), "{u}");
        if !u.contains("watch=") {
            assert!(!u.contains("resourceVersion=0"), "a consistent list: {u}");
        }
    }
}

#[test]
fn a_pod_asking_milliseconds_after_creation_gets_its_own_role() {
    let s = RealApiServer::shared().scope("milliseconds");
    let ns = s.ns("shop");
    let r = real(
        s,
        &["--default-role=fallback", "--backoff-max-elapsed-time=2s"],
    );
    let mut slowest = Duration::ZERO;
    for i in 1..=20u8 {
        let src = format!("127.21.0.{i}");
        let role = format!("own-{i}");
        r.api.create_pod(
            &PodBuilder::running(&ns, &format!("new-{i}"), &r.api.node, &src).role(&role),
        );
        // No pause: the request races the watch event.
        let t = Instant::now();
        let list = r.get(&src, LIST);
        slowest = slowest.max(t.elapsed());
        assert_eq!(
            (list.status, list.body_str()),
            (200, role.clone()),
            "pod {i}: not 404, not the default role"
        );
        let creds = r.get(&src, &format!("{LIST}{role}"));
        assert_eq!(creds.status, 200, "pod {i}: {}", creds.body_str());
        let doc: serde_json::Value = serde_json::from_slice(&creds.body).unwrap();
        assert_eq!(doc["Code"], "Success");
    }
    eprintln!("slowest first answer after creation: {slowest:?}");
    r.api.create_pod(&PodBuilder::running(
        &ns,
        "plain",
        &r.api.node,
        "127.21.0.99",
    ));
    let plain = r.get("127.21.0.99", LIST);
    assert_eq!((plain.status, plain.body_str().as_str()), (200, "fallback"));
}

#[test]
fn pods_changed_deleted_finished_and_ips_reused_never_answer_a_role_that_is_not_the_owners() {
    let s = RealApiServer::shared().scope("lifecycle");
    let ns = s.ns("shop");
    s.create_pod(&PodBuilder::running(&ns, "a", &s.node, "127.23.0.1").role("a"));
    let r = real(s, &["--backoff-max-elapsed-time=300ms"]);
    assert_eq!(r.get("127.23.0.1", LIST).body_str(), "a");

    // The annotation changes: the new role, never the old one afterwards.
    r.api
        .annotate_pod(&ns, "a", &[("iam.amazonaws.com/role", "a-2")]);
    let changed = r.eventually("127.23.0.1", LIST, Duration::from_secs(5), |x| {
        x.body_str() == "a-2"
    });
    assert_eq!(changed.body_str(), "a-2");

    // Deleted: unknown. The IP is reused by a new pod: its role.
    r.api.delete_pod(&ns, "a");
    let gone = r.eventually("127.23.0.1", LIST, Duration::from_secs(5), |x| {
        x.status == 404
    });
    assert_eq!(gone.status, 404);
    r.api
        .create_pod(&PodBuilder::running(&ns, "b", &r.api.node, "127.23.0.1").role("b"));
    assert_eq!(r.get("127.23.0.1", LIST).body_str(), "b");

    // Finished (Succeeded): its IP is no longer its identity.
    r.api.set_pod_phase(&ns, "b", "Succeeded");
    let done = r.eventually("127.23.0.1", LIST, Duration::from_secs(5), |x| {
        x.status == 404
    });
    assert_eq!(done.status, 404, "{}", done.body_str());
    // A hostNetwork pod is never mapped.
    r.api.create_pod(
        &PodBuilder::running(&ns, "host", &r.api.node, "127.23.0.2")
            .role("host")
            .host_network(),
    );
    r.api
        .create_pod(&PodBuilder::running(&ns, "c", &r.api.node, "127.23.0.3").role("c"));
    assert_eq!(r.get("127.23.0.3", LIST).body_str(), "c");
    assert_eq!(r.get("127.23.0.2", LIST).status, 404);
}

fn denied_events(
    r: &iamlet_e2e::rig::control::Rig<iamlet_e2e::realapi::Scope>,
    ns: &str,
    pod: &str,
) -> Vec<serde_json::Value> {
    r.api
        .events_for(ns, pod)
        .into_iter()
        .filter(|e| e["reason"] == "IamRoleDenied")
        .collect()
}

#[test]
fn a_namespace_annotation_change_takes_effect_and_denials_are_events_the_server_accepts() {
    const KEY: &str = "iam.amazonaws.com/allowed-roles";
    let s = RealApiServer::shared().scope("namespaces");
    let team = s.ns("team");
    s.set_namespace(&team, &[(KEY, r#"["web-*"]"#)]);
    s.create_pod(&PodBuilder::running(&team, "app", &s.node, "127.22.0.1").role("app"));
    s.create_pod(&PodBuilder::running(&team, "web", &s.node, "127.22.0.2").role("web-1"));
    // A second denied pod: its Event marks the point by which every earlier report was handled.
    s.create_pod(&PodBuilder::running(&team, "app-b", &s.node, "127.22.0.4").role("app"));
    let node = s.node.clone();
    let r = real(
        s,
        &[
            "--namespace-restrictions",
            "--default-role=fallback",
            "--backoff-max-elapsed-time=2s",
        ],
    );
    let misses = sample(r.iamlet.addr(), "iamlet_credential_cache_misses_total");
    let denied = r.get("127.22.0.1", LIST);
    assert_eq!(denied.status, 403, "{}", denied.body_str());
    assert_eq!(
        denied.body_str(),
        format!(
            "Forbidden: role {BASE}app is not allowed in namespace {team} by its {KEY} annotation\n"
        )
    );
    assert_eq!(r.get("127.22.0.1", &format!("{LIST}app")).status, 403);
    assert_eq!(
        sample(r.iamlet.addr(), "iamlet_credential_cache_misses_total"),
        misses,
        "a denial never waits for credentials"
    );
    assert_eq!(r.get("127.22.0.2", LIST).body_str(), "web-1");

    // One IamRoleDenied Event on the pod, however many denied requests: accepted by the real
    // server's validation, and found the way `kubectl get events --field-selector
    // involvedObject.name=app` finds it.
    for _ in 0..5 {
        assert_eq!(r.get("127.22.0.1", LIST).status, 403);
    }
    assert_eq!(r.get("127.22.0.4", LIST).status, 403);
    wait_until!(
        Duration::from_secs(10),
        !denied_events(&r, &team, "app-b").is_empty(),
        "app-b's IamRoleDenied Event"
    );
    let events = denied_events(&r, &team, "app");
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["involvedObject"]["kind"], "Pod");
    assert_eq!(ev["involvedObject"]["namespace"], team.as_str());
    assert_eq!(ev["involvedObject"]["name"], "app");
    assert_eq!(ev["reportingComponent"], "iamlet");
    assert_eq!(ev["reportingInstance"], node.as_str());
    assert!(
        ev["message"]
            .as_str()
            .unwrap()
            .contains(&format!("is not allowed in namespace {team}")),
        "{ev}"
    );

    // The namespace now allows app: the same pod gets its role, without a restart.
    r.api.set_namespace(&team, &[(KEY, r#"["web-*", "app"]"#)]);
    let ok = r.eventually("127.22.0.1", LIST, Duration::from_secs(5), |x| {
        x.status == 200
    });
    assert_eq!((ok.status, ok.body_str().as_str()), (200, "app"));
    let creds = r.get("127.22.0.1", &format!("{LIST}app"));
    assert_eq!(creds.status, 200, "{}", creds.body_str());
    let store = r.store();
    assert_eq!(
        store["rolesByNamespace"][team.as_str()][1],
        "app",
        "{store}"
    );

    // Annotation removed: denied again; the default role still passes.
    r.api.set_namespace(&team, &[]);
    let again = r.eventually("127.22.0.1", LIST, Duration::from_secs(5), |x| {
        x.status == 403
    });
    assert!(
        again.body_str().contains("missing or empty"),
        "{}",
        again.body_str()
    );
    r.api.create_pod(&PodBuilder::running(
        &team,
        "plain",
        &r.api.node,
        "127.22.0.3",
    ));
    let plain = r.get("127.22.0.3", LIST);
    assert_eq!((plain.status, plain.body_str().as_str()), (200, "fallback"));
}

#[test]
fn an_sts_failure_is_reported_as_an_event_the_server_accepts() {
    let s = RealApiServer::shared().scope("sts-failure");
    let ns = s.ns("shop");
    s.create_pod(&PodBuilder::running(&ns, "app", &s.node, "127.24.0.1").role("app"));
    // STS at a port nobody listens on: every AssumeRole fails.
    let dead = format!("http://127.0.0.1:{}", iamlet_e2e::free_port());
    let r = real_with(s, &["--backoff-max-elapsed-time=10s"], |b| {
        b.env("AWS_ENDPOINT_URL_STS", dead)
    });
    let resp = r.get("127.24.0.1", &format!("{LIST}app"));
    assert_eq!(resp.status, 500, "{}", resp.body_str());
    let found = wait_until!(
        Duration::from_secs(10),
        Some(
            r.api
                .events_for(&ns, "app")
                .into_iter()
                .filter(|e| e["reason"] == "IamCredentialError")
                .collect::<Vec<_>>()
        )
        .filter(|evs| !evs.is_empty()),
        "an IamCredentialError Event"
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["involvedObject"]["name"], "app");
    let note = found[0]["message"].as_str().unwrap();
    assert!(
        note.starts_with(&format!("AssumeRole of {BASE}app failed")),
        "{note}"
    );
}

/// The annotation EKS (IRSA) reads on a ServiceAccount.
const SA_KEY: &str = "eks.amazonaws.com/role-arn";

fn events_with_reason(
    r: &iamlet_e2e::rig::control::Rig<iamlet_e2e::realapi::Scope>,
    ns: &str,
    pod: &str,
    reason: &str,
) -> Vec<serde_json::Value> {
    r.api
        .events_for(ns, pod)
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

#[test]
fn a_service_accounts_role_reaches_its_pods_follows_its_changes_and_loses_to_the_pods_own() {
    let s = RealApiServer::shared().scope("service-accounts");
    let ns = s.ns("shop");
    let sa_role = format!("{BASE}sa-role");
    s.annotate_service_account(&ns, "reader", &[(SA_KEY, Some(&sa_role))]);
    s.create_pod(
        &PodBuilder::running(&ns, "plain", &s.node, "127.28.0.1").service_account("reader"),
    );
    s.create_pod(
        &PodBuilder::running(&ns, "own", &s.node, "127.28.0.2")
            .service_account("reader")
            .role("app"),
    );
    let r = real(
        s,
        &["--default-role=fallback", "--backoff-max-elapsed-time=2s"],
    );

    // The first publish waited for the ServiceAccount list: the SA's role from the first
    // answer on, never the default role first.
    let first = r.get("127.28.0.1", LIST);
    assert_eq!((first.status, first.body_str().as_str()), (200, "sa-role"));
    let creds = r.get("127.28.0.1", &format!("{LIST}sa-role"));
    assert_eq!(creds.status, 200, "{}", creds.body_str());
    assert_eq!(r.store()["rolesByIP"]["127.28.0.1"], sa_role);

    // The pod's own annotation wins; the conflict is an Event on the pod, accepted by the
    // real server and found as `kubectl get events --field-selector involvedObject.name=own`.
    assert_eq!(r.get("127.28.0.2", LIST).body_str(), "app");
    let found = wait_until!(
        Duration::from_secs(10),
        Some(events_with_reason(&r, &ns, "own", "IamRoleConflict")).filter(|e| !e.is_empty()),
        "own's IamRoleConflict Event"
    );
    assert_eq!(found.len(), 1, "{found:?}");
    let ev = &found[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["involvedObject"]["kind"], "Pod");
    let note = ev["message"].as_str().unwrap();
    assert!(
        note.contains(&format!("{BASE}app")) && note.contains(&sa_role),
        "{note}"
    );
    assert!(
        events_with_reason(&r, &ns, "plain", "IamRoleConflict").is_empty(),
        "no conflict for a pod without its own annotation"
    );

    // The ServiceAccount's annotation changes: its pod follows, without a restart, and
    // never goes back.
    r.api
        .annotate_service_account(&ns, "reader", &[(SA_KEY, Some(&format!("{BASE}next")))]);
    let next = r.eventually("127.28.0.1", LIST, Duration::from_secs(10), |x| {
        x.body_str() == "next"
    });
    assert_eq!((next.status, next.body_str().as_str()), (200, "next"));
    assert_eq!(r.get("127.28.0.1", &format!("{LIST}sa-role")).status, 403);
    assert_eq!(r.get("127.28.0.2", LIST).body_str(), "app");

    // The annotation removed: the default role.
    r.api
        .annotate_service_account(&ns, "reader", &[(SA_KEY, None)]);
    let back = r.eventually("127.28.0.1", LIST, Duration::from_secs(10), |x| {
        x.body_str() == "fallback"
    });
    assert_eq!(back.body_str(), "fallback");
}

#[test]
fn a_role_without_serviceaccounts_is_warned_about_once_and_granting_it_needs_no_restart() {
    use iamlet_e2e::realapi::without_verb;
    let s = RealApiServer::shared().scope("no-sa-rights");
    let ns = s.ns("shop");
    // The shipped role as a cluster upgraded from kube2iam may still have it: no
    // serviceaccounts.
    let name = s.own_identity(Some(&|role: &mut serde_json::Value| {
        for verb in ["get", "list", "watch"] {
            without_verb(role, "", "serviceaccounts", verb);
        }
    }));
    let token = s.token("kube-system", &name, 3600);
    let dir = std::env::temp_dir().join(format!("iamlet-e2e-no-sa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = format!("--kubeconfig={}", s.kubeconfig_for(&token, &dir).display());
    s.annotate_service_account(&ns, "reader", &[(SA_KEY, Some(&format!("{BASE}sa-role")))]);
    s.create_pod(&PodBuilder::running(&ns, "annotated", &s.node, "127.29.0.1").role("app"));
    s.create_pod(
        &PodBuilder::running(&ns, "by-sa", &s.node, "127.29.0.2").service_account("reader"),
    );

    // Starting returns once the agent logged `ready:`: readiness did not wait for the
    // ServiceAccounts it may not read.
    let r = iamlet_e2e::rig::control::real_via(
        s,
        &[kubeconfig.as_str()],
        &["--default-role=fallback", "--backoff-max-elapsed-time=2s"],
        |b| b,
    );
    let ready = r.get("127.0.0.1", "/ready");
    assert_eq!(ready.status, 200, "{}", ready.body_str());
    assert_eq!(r.get("127.29.0.1", LIST).body_str(), "app");
    assert_eq!(r.get("127.29.0.2", LIST).body_str(), "fallback");
    let warning = "may not list and watch serviceaccounts (403)";
    let log = r.iamlet.log();
    assert_eq!(
        log.matches(warning).count(),
        1,
        "one warning sentence:\n{log}"
    );
    assert!(
        log.contains("grant get, list and watch on serviceaccounts"),
        "the warning says what to grant:\n{log}"
    );
    assert!(
        sample(
            r.iamlet.addr(),
            "iamlet_watch_errors_total{resource=\"serviceaccounts\",kind=\"forbidden\"}"
        ) >= 1.0
    );

    // The rights granted (the shipped role applied as is): the retrying watch lists them and
    // the pod gets its ServiceAccount's role, without a restart. The watch backs off to at
    // most 30 s (±50 %) between tries, hence the bound.
    r.api.apply_identity(&name, None);
    let granted = r.eventually("127.29.0.2", LIST, Duration::from_secs(60), |x| {
        x.body_str() == "sa-role"
    });
    assert_eq!(granted.body_str(), "sa-role", "{}", r.iamlet.log());
    assert!(
        r.iamlet
            .wait_for_log("serviceaccounts are readable now", Duration::from_secs(5)),
        "{}",
        r.iamlet.log()
    );
    // (Matched on the refusal's own words: a bare "403" also turns up in timestamps and
    // access key ids.)
    assert_eq!(
        r.iamlet
            .log()
            .lines()
            .filter(|l| l.contains("serviceaccounts is forbidden"))
            .count(),
        1,
        "the refusals were said once, by the one warning sentence:\n{}",
        r.iamlet.log()
    );
}
