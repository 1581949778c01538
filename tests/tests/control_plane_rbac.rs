//! The agent's own access to the real kube-apiserver: the shipped RBAC, in-cluster
//! configuration, `iamlet doctor`'s RBAC check, a watch resumed from a compacted
//! resourceVersion, and a token rotated on disk. The agent runs as the real binary with a
//! ServiceAccount of each test's own (the manifest's ServiceAccount, ClusterRole and
//! ClusterRoleBinding under another name), so a test that removes a verb never touches the
//! shared `iamlet` role the other control-plane tests run with.
//!
//! The in-cluster tests need root (a mount namespace puts the ServiceAccount files at
//! `/var/run/secrets/kubernetes.io/serviceaccount/` for the agent alone): elsewhere than CI
//! they are a loud `SKIPPED:`; in CI (`CI=true`) a failure.
//!
//! The token-rotation test takes about a minute and a half: kube-rs reads a token file again
//! only once its copy is 50 s old, and the agent's watch backs off (up to 30 s) while the old
//! token is refused. One test is ignored: it states what the agent must do without `watch` on
//! pods (stay unready), which it does not do yet.

use iamlet_e2e::apiserver::PodBuilder;
use iamlet_e2e::realapi::{Gate, InCluster, RealApiServer, Scope, without_verb};
use iamlet_e2e::rig::control::{BASE, LIST, Rig, ip, real_via};
use iamlet_e2e::rig::data::{metric, sample};
use iamlet_e2e::{Iamlet, Output, get_from, try_request_from, wait_until};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The API server's answer when RBAC refuses a ServiceAccount a verb (as the agent logs it).
fn forbidden(sa: &str, verb: &str, resource: &str) -> String {
    format!(
        "User \"system:serviceaccount:kube-system:{sa}\" cannot {verb} resource \"{resource}\" in API group \"\" at the cluster scope"
    )
}

/// What the agent logs when RBAC refuses `verb` on pods (it asks before it lists).
fn refused_log(verb: &str) -> String {
    format!("denied={verb} pods")
}

fn ready(r: &Rig<Scope>) -> (u16, String) {
    let resp = get_from(Ipv4Addr::LOCALHOST, r.iamlet.addr(), "/ready");
    (resp.status, resp.body_str())
}

/// `iamlet doctor` with the agent's flags for `node`, through `program` (the in-cluster
/// wrapper) or the binary with `access` (`--kubeconfig=...`). No `--test-role`: STS is not
/// tried, nothing leaves loopback.
fn doctor(
    program: Option<&std::path::Path>,
    access: &[&str],
    node: &str,
    extra: &[&str],
) -> Output {
    let node = format!("--node={node}");
    let mut args: Vec<&str> = access.to_vec();
    args.extend([node.as_str(), "--metadata-addr=127.0.0.1:9"]);
    args.extend(extra);
    args.push("doctor");
    match program {
        Some(p) => Iamlet::run_cli_via(p, &args, &[]),
        None => Iamlet::run_cli(&args),
    }
}

/// Doctor's `kubernetes:` line.
fn kubernetes_line(out: &Output) -> String {
    out.stdout
        .lines()
        .find(|l| {
            l.split_once(' ')
                .is_some_and(|(_, rest)| rest.starts_with("kubernetes:"))
        })
        .unwrap_or_else(|| panic!("no kubernetes: line:\n{}{}", out.stdout, out.stderr))
        .to_owned()
}

/// A request as `kubectl auth can-i` names it: `VERB RESOURCE[.GROUP]`, or `VERB /path` for
/// a non-resource URL.
fn can_i(verb: &str, group: &str, resource: &str) -> String {
    match (group, resource) {
        (_, r) if r.starts_with('/') => format!("{verb} {r}"),
        ("", r) => format!("{verb} {r}"),
        (g, r) => format!("{verb} {r}.{g}"),
    }
}

/// Every request the API server audited for `user`, named by [`can_i`], with the worst
/// status it was answered.
fn requests_of(api: &RealApiServer, user: &str) -> std::collections::BTreeMap<String, i64> {
    let mut out = std::collections::BTreeMap::new();
    for e in api.audit_of(user) {
        let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
        let name = if e["objectRef"].is_object() {
            can_i(
                &s(&e["verb"]),
                &s(&e["objectRef"]["apiGroup"]),
                &s(&e["objectRef"]["resource"]),
            )
        } else {
            let uri = s(&e["requestURI"]);
            let path = uri.split('?').next().unwrap_or("").to_owned();
            can_i(&s(&e["verb"]), "", &path)
        };
        let code = e["responseStatus"]["code"].as_i64().unwrap_or(0);
        let worst = out.entry(name).or_insert(0);
        *worst = (*worst).max(code);
    }
    out
}

/// What doctor's `kubernetes:` line says it checked and found allowed (`(allowed: a, b)`).
fn allowed_by_doctor(line: &str) -> BTreeSet<String> {
    let (_, rest) = line
        .split_once("(allowed: ")
        .unwrap_or_else(|| panic!("no (allowed: ...) in {line}"));
    let (list, _) = rest.split_once(')').expect("closing parenthesis");
    list.split(", ").map(str::to_owned).collect()
}

/// What doctor's `kubernetes:` line says RBAC denies (`denies a, b:` or `denies a, b;`).
fn denied_by_doctor(line: &str) -> Vec<String> {
    let (_, rest) = line
        .split_once("denies ")
        .unwrap_or_else(|| panic!("no `denies` in {line}"));
    let end = rest.find([':', ';']).expect("end of the list");
    rest[..end].split(", ").map(str::to_owned).collect()
}

/// `iamlet_watch_errors_total{resource="pods",...}`, all kinds together.
fn pod_watch_errors(r: &Rig<Scope>) -> f64 {
    r.metrics()
        .lines()
        .filter(|l| l.starts_with("iamlet_watch_errors_total{") && l.contains("resource=\"pods\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Every permission a ClusterRole's rules grant, named by [`can_i`] (non-resource URLs as
/// `VERB /path`).
fn grants(role: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let strs = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        for v in strs("verbs") {
            for g in strs("apiGroups") {
                for r in strs("resources") {
                    out.insert(can_i(&v, &g, &r));
                }
            }
            for url in strs("nonResourceURLs") {
                out.insert(can_i(&v, "", &url));
            }
        }
    }
    out
}

#[test]
fn in_cluster_the_shipped_rules_are_enough_and_doctor_checks_every_request_the_agent_makes() {
    const TEST: &str =
        "in_cluster_the_shipped_rules_are_enough_and_doctor_checks_every_request_the_agent_makes";
    if !InCluster::available(TEST) {
        return;
    }
    const KEY: &str = "iam.amazonaws.com/allowed-roles";
    let api = RealApiServer::shared();
    let s = api.scope("rbac-shipped");
    let sa = s.own_identity(None);
    let token = s.token("kube-system", &sa, 3600);
    let team = s.ns("team");
    s.set_namespace(&team, &[(KEY, r#"["app"]"#)]);
    s.create_pod(&PodBuilder::running(&team, "app", &s.node, "127.25.0.1").role("app"));
    s.create_pod(&PodBuilder::running(&team, "denied", &s.node, "127.25.0.2").role("other"));
    let node = s.node.clone();
    let ic = InCluster::new(api, &token);
    // No --kubeconfig, no --api-server: the in-cluster configuration, as in the DaemonSet.
    let r = real_via(
        s,
        &[],
        &["--namespace-restrictions", "--backoff-max-elapsed-time=2s"],
        |b| b.binary(ic.wrapper()),
    );
    assert_eq!(ready(&r), (200, "ready\n".to_owned()));
    let app = r.get("127.25.0.1", LIST);
    assert_eq!((app.status, app.body_str().as_str()), (200, "app"));
    let creds = r.get("127.25.0.1", &format!("{LIST}app"));
    assert_eq!(creds.status, 200, "{}", creds.body_str());
    // A denial becomes an Event: the shipped rules let the agent write it.
    assert_eq!(r.get("127.25.0.2", LIST).status, 403);
    wait_until!(
        Duration::from_secs(10),
        r.api
            .events_for(&team, "denied")
            .iter()
            .any(|e| e["reason"] == "IamRoleDenied"),
        "the IamRoleDenied Event; log:\n{}",
        r.iamlet.log()
    );

    // doctor, in the same in-cluster setup, agrees.
    let out = doctor(
        Some(ic.wrapper()),
        &[],
        &node,
        &["--namespace-restrictions"],
    );
    let line = kubernetes_line(&out);
    assert!(
        line.starts_with(&format!(
            "OK kubernetes: the API server answers and RBAC allows listing and watching pods of node {node} (allowed: "
        )),
        "{line}\n{}{}",
        out.stdout,
        out.stderr
    );
    let checked = allowed_by_doctor(&line);

    // What the API server recorded of this ServiceAccount (the agent's requests, and
    // doctor's): every request was allowed — the shipped rules are enough — and every kind of
    // resource request is one doctor checks (its own access reviews aside), so a request the
    // agent starts making fails here until doctor checks it too.
    let user = format!("system:serviceaccount:kube-system:{sa}");
    let used = requests_of(api, &user);
    let refused: Vec<_> = used.iter().filter(|(_, code)| **code >= 400).collect();
    assert!(
        refused.is_empty(),
        "refused by the shipped rules: {refused:?}"
    );
    let unchecked: Vec<&String> = used
        .keys()
        .filter(|r| !r.contains(" /"))
        .filter(|r| r.as_str() != "create selfsubjectaccessreviews.authorization.k8s.io")
        .filter(|r| !checked.contains(*r))
        .collect();
    assert!(
        unchecked.is_empty(),
        "requests `iamlet doctor` does not check (resolver/src/probe.rs): {unchecked:?}; doctor checked {checked:?}"
    );
    for needed in [
        "list pods",
        "watch pods",
        "list namespaces",
        "watch namespaces",
        "list serviceaccounts",
        "watch serviceaccounts",
        "create events.events.k8s.io",
    ] {
        assert!(used.contains_key(needed), "{needed} not seen: {used:?}");
    }
    let role = iamlet_e2e::realapi::shipped_rbac(None)
        .into_iter()
        .find(|o| o["kind"] == "ClusterRole")
        .unwrap();
    let unused: Vec<_> = grants(&role)
        .difference(&checked)
        .filter(|g| !used.contains_key(*g))
        .cloned()
        .collect();
    eprintln!(
        "requests made: {used:?}; granted by the shipped ClusterRole but never asked for by the agent: {unused:?}"
    );
}

#[test]
fn in_cluster_without_list_on_pods_ready_stays_503_until_the_first_sync_then_the_same_agent_syncs()
{
    const TEST: &str = "in_cluster_without_list_on_pods_ready_stays_503_until_the_first_sync_then_the_same_agent_syncs";
    if !InCluster::available(TEST) {
        return;
    }
    let api = RealApiServer::shared();
    let s = api.scope("rbac-no-list");
    let sa = s.own_identity(Some(&|r: &mut Value| without_verb(r, "", "pods", "list")));
    let token = s.token("kube-system", &sa, 3600);
    let ns = s.ns("shop");
    s.create_pod(&PodBuilder::running(&ns, "app", &s.node, "127.25.2.1").role("app"));
    let node = s.node.clone();
    let ic = InCluster::new(api, &token);
    let r = real_via(s, &[], &["--backoff-max-elapsed-time=300ms"], |b| {
        b.binary(ic.wrapper()).unsynced()
    });
    // The agent asks before it lists (SelfSubjectAccessReview), names what is refused once,
    // and asks again and again.
    wait_until!(
        Duration::from_secs(20),
        pod_watch_errors(&r) >= 3.0 && r.iamlet.log().contains(&refused_log("list")),
        "three refusals, the verb named in the log; metrics:\n{}\nlog:\n{}",
        r.metrics(),
        r.iamlet.log()
    );
    // Refused three times, and no first sync: /ready is 503 and no pod is served.
    assert_eq!(
        ready(&r),
        (
            503,
            "not ready: waiting for the first pod list\n".to_owned()
        )
    );
    assert!(
        !r.iamlet.log().contains("ready: the first pod list"),
        "{}",
        r.iamlet.log()
    );
    let before = r.get("127.25.2.1", LIST);
    assert_eq!(before.status, 404, "{}", before.body_str());
    let line = kubernetes_line(&doctor(Some(ic.wrapper()), &[], &node, &[]));
    assert!(
        line.starts_with("FAIL kubernetes: RBAC denies listing pods (403: pods is forbidden:"),
        "{line}"
    );

    // Granted: the same process lists, becomes ready and answers.
    let pid = r.iamlet.pid();
    r.api.apply_identity(&sa, None);
    wait_until!(
        Duration::from_secs(60),
        ready(&r).0 == 200,
        "/ready once list is granted; log:\n{}",
        r.iamlet.log()
    );
    let after = r.get("127.25.2.1", LIST);
    assert_eq!((after.status, after.body_str().as_str()), (200, "app"));
    assert_eq!(r.iamlet.pid(), pid);
}

/// The agent with every shipped right but `watch` on pods, in-cluster, started unsynced.
fn without_watch(test: &str, ip: &str) -> Option<(Rig<Scope>, InCluster, String, String)> {
    if !InCluster::available(test) {
        return None;
    }
    let api = RealApiServer::shared();
    let s = api.scope("rbac-no-watch");
    let sa = s.own_identity(Some(&|r: &mut Value| without_verb(r, "", "pods", "watch")));
    let token = s.token("kube-system", &sa, 3600);
    let ns = s.ns("shop");
    s.create_pod(&PodBuilder::running(&ns, "app", &s.node, ip).role("app"));
    let ic = InCluster::new(api, &token);
    let r = real_via(s, &[], &["--backoff-max-elapsed-time=300ms"], |b| {
        b.binary(ic.wrapper()).unsynced()
    });
    // The watch is refused (the list is allowed): the agent, which asks before it lists,
    // names the verb and the resource, and asks again and again.
    wait_until!(
        Duration::from_secs(20),
        pod_watch_errors(&r) >= 3.0 && r.iamlet.log().contains(&refused_log("watch")),
        "three refusals, the verb named in the log; metrics:\n{}\nlog:\n{}",
        r.metrics(),
        r.iamlet.log()
    );
    // It never lists, so the API server never refused it anything (it did not ask).
    assert!(
        !r.iamlet.log().contains(&forbidden(&sa, "watch", "pods")),
        "{}",
        r.iamlet.log()
    );
    Some((r, ic, sa, ns))
}

#[test]
fn in_cluster_without_watch_on_pods_the_log_and_doctor_name_the_verb_and_granting_it_makes_the_same_agent_watch()
 {
    let Some((r, ic, sa, ns)) = without_watch(
        "in_cluster_without_watch_on_pods_the_log_and_doctor_name_the_verb_and_granting_it_makes_the_same_agent_watch",
        "127.25.1.1",
    ) else {
        return;
    };
    // doctor, in the same in-cluster setup, names exactly what is missing.
    let out = doctor(Some(ic.wrapper()), &[], &r.api.node, &[]);
    let line = kubernetes_line(&out);
    assert!(
        line.starts_with("FAIL kubernetes: the API server answers but RBAC denies "),
        "{line}"
    );
    assert_eq!(denied_by_doctor(&line), ["watch pods"], "{line}");
    assert_eq!(out.code, Some(1), "{}", out.stdout);

    // The verb is granted again: the same process watches, without a restart — a pod
    // created from now on is known at once.
    let pid = r.iamlet.pid();
    r.api.apply_identity(&sa, None);
    r.api
        .create_pod(&PodBuilder::running(&ns, "later", &r.api.node, "127.25.1.2").role("later"));
    let later = r.eventually("127.25.1.2", LIST, Duration::from_secs(60), |x| {
        x.status == 200
    });
    assert_eq!(
        (later.status, later.body_str().as_str()),
        (200, "later"),
        "log:\n{}",
        r.iamlet.log()
    );
    assert_eq!(ready(&r), (200, "ready\n".to_owned()));
    let app = r.get("127.25.1.1", LIST);
    assert_eq!((app.status, app.body_str().as_str()), (200, "app"));
    assert_eq!(r.iamlet.pid(), pid);
    // Watching: the next pod is known as soon as it exists.
    r.api
        .create_pod(&PodBuilder::running(&ns, "next", &r.api.node, "127.25.1.3").role("next"));
    let next = r.get("127.25.1.3", LIST);
    assert_eq!((next.status, next.body_str().as_str()), (200, "next"));
}

#[test]
fn in_cluster_without_watch_on_pods_the_agent_is_never_ready_and_never_serves_a_frozen_list() {
    let Some((r, _ic, _sa, ns)) = without_watch(
        "in_cluster_without_watch_on_pods_the_agent_is_never_ready_and_never_serves_a_frozen_list",
        "127.25.3.1",
    ) else {
        return;
    };
    // Three watches refused, and still no first sync: /ready stays 503 until the watch runs.
    assert_eq!(
        ready(&r),
        (
            503,
            "not ready: waiting for the first pod list\n".to_owned()
        ),
        "log:\n{}",
        r.iamlet.log()
    );
    // What readiness hides otherwise: the pod is deleted and its IP goes to another pod with
    // another role; an agent that cannot watch must not keep answering the deleted pod's.
    r.api.delete_pod(&ns, "app");
    r.api
        .create_pod(&PodBuilder::running(&ns, "other", &r.api.node, "127.25.3.1").role("other"));
    let answer = r.eventually("127.25.3.1", LIST, Duration::from_secs(10), |x| {
        x.body_str() != "app"
    });
    assert_ne!(answer.body_str(), "app", "log:\n{}", r.iamlet.log());
}

#[test]
fn doctor_names_a_missing_events_or_service_accounts_permission() {
    let api = RealApiServer::shared();
    let s = api.scope("rbac-optional");
    let sa = s.own_identity(Some(&|r: &mut Value| {
        without_verb(r, "events.k8s.io", "events", "create")
    }));
    let token = s.token("kube-system", &sa, 3600);
    let dir = iamlet_e2e::util::TempDir::new("rbac-optional");
    let kc = s.kubeconfig_for(&token, dir.path());
    let access = format!("--kubeconfig={}", kc.display());
    let out = doctor(None, &[access.as_str()], &s.node, &[]);
    let line = kubernetes_line(&out);
    assert!(
        line.starts_with(&format!(
            "WARN kubernetes: the API server answers and RBAC allows listing and watching pods of node {} (allowed: ",
            s.node
        )),
        "{line}"
    );
    assert_eq!(
        denied_by_doctor(&line),
        ["create events.events.k8s.io"],
        "{line}"
    );
    assert!(
        allowed_by_doctor(&line).contains("patch events.events.k8s.io"),
        "{line}"
    );

    // Without patch as well, both are named; with the full rules, the line is OK again.
    s.apply_identity(
        &sa,
        Some(&|r: &mut Value| {
            without_verb(r, "events.k8s.io", "events", "create");
            without_verb(r, "events.k8s.io", "events", "patch");
        }),
    );
    let line = kubernetes_line(&doctor(None, &[access.as_str()], &s.node, &[]));
    assert_eq!(
        denied_by_doctor(&line),
        ["create events.events.k8s.io", "patch events.events.k8s.io"],
        "{line}"
    );
    // ServiceAccounts not watchable: the agent serves without their roles, and doctor says so.
    s.apply_identity(
        &sa,
        Some(&|r: &mut Value| without_verb(r, "", "serviceaccounts", "watch")),
    );
    let line = kubernetes_line(&doctor(None, &[access.as_str()], &s.node, &[]));
    assert!(line.starts_with("WARN kubernetes:"), "{line}");
    assert_eq!(denied_by_doctor(&line), ["watch serviceaccounts"], "{line}");
    assert!(
        line.contains("pods get no role from their ServiceAccount's annotation"),
        "{line}"
    );
    s.apply_identity(&sa, None);
    let line = kubernetes_line(&doctor(None, &[access.as_str()], &s.node, &[]));
    assert!(line.starts_with("OK kubernetes:"), "{line}");
    for checked in [
        "list pods",
        "watch pods",
        "list serviceaccounts",
        "watch serviceaccounts",
        "create events.events.k8s.io",
        "patch events.events.k8s.io",
    ] {
        assert!(
            allowed_by_doctor(&line).contains(checked),
            "{checked}: {line}"
        );
    }
}

/// One answer to the pod at the churned IP, with what the agent's store held just before.
#[derive(Debug, Clone)]
struct Answer {
    /// The API server had acknowledged A's deletion when the request started.
    after_delete: bool,
    /// `/debug/store` (read just before the request) still listed A.
    a_in_store: bool,
    /// Status and body, or the IO error.
    answer: Result<(u16, String), String>,
}

impl Answer {
    fn role(&self) -> Option<&str> {
        match &self.answer {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    }
}

/// Sets the flag when dropped: a test that panics stops its poller too.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Asks `LIST` from `src` (and `/debug/store` just before) every few milliseconds until
/// `stop`; each answer is recorded with whether `deleted` was set when it was asked.
fn poll_answers(
    addr: SocketAddr,
    src: Ipv4Addr,
    a_uid: String,
    deleted: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<Answer>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let list =
            format!("GET {LIST} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
        let store = b"GET /debug/store HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        while !stop.load(Ordering::SeqCst) {
            let after_delete = deleted.load(Ordering::SeqCst);
            let a_in_store = match try_request_from(Ipv4Addr::LOCALHOST, addr, store) {
                Ok(r) => {
                    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                    // Unreadable: assume the worst (A still there), which asserts nothing.
                    v["pods"].as_array().is_none_or(|pods| {
                        pods.iter()
                            .any(|p| p["uid"].as_str() == Some(a_uid.as_str()))
                    })
                }
                Err(_) => true,
            };
            let answer = try_request_from(src, addr, list.as_bytes())
                .map(|r| (r.status, r.body_str()))
                .map_err(|e| e.to_string());
            out.lock().unwrap().push(Answer {
                after_delete,
                a_in_store,
                answer,
            });
            // Pacing for a 2-core machine, not a wait on anything.
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

#[test]
fn a_watch_resumed_from_a_compacted_resource_version_relists_and_never_brings_a_deleted_pod_back() {
    // A server of this test's own: it is restarted.
    let api = RealApiServer::private(&[]);
    let s = api.scope("stale-rv");
    let ns = s.ns("shop");
    let x = "127.26.0.1";
    let a_uid = s.create_pod(&PodBuilder::running(&ns, "a", &s.node, x).role("a"));
    // The agent reaches the server through a gate the test can close (the tests' own calls
    // go straight to the server).
    let gate = Gate::new(api);
    let dir = iamlet_e2e::util::TempDir::new("stale-rv");
    let kc = s.kubeconfig_at(
        &gate.server(),
        &format!("token: {}", api.shipped_identity().token),
        dir.path(),
    );
    let access = format!("--kubeconfig={}", kc.display());
    let r = real_via(
        s,
        &[access.as_str()],
        &["--backoff-max-elapsed-time=300ms"],
        |b| b,
    );
    assert_eq!(r.get(x, LIST).body_str(), "a");
    let addr = r.iamlet.addr();
    const RELISTS: &str = "iamlet_watch_relists_total{resource=\"pods\"}";
    const EXPIRED: &str = "iamlet_watch_errors_total{resource=\"pods\",kind=\"expired\"}";
    let relists = sample(addr, RELISTS);
    assert_eq!(metric(addr, EXPIRED), None, "no 410 yet");

    let deleted = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_panic = StopOnDrop(stop.clone());
    let answers = Arc::new(Mutex::new(Vec::new()));
    let poller = poll_answers(
        addr,
        ip(x),
        a_uid.clone(),
        deleted.clone(),
        stop.clone(),
        answers.clone(),
    );

    // Stop the world: the node loses the control plane (its watch breaks, reconnects are
    // refused); meanwhile A is deleted and B takes its IP with another role; kube-apiserver
    // is restarted and etcd compacted while it is down. The new server's watch cache starts
    // after those changes and etcd has no history before them, so the agent's watch, resumed
    // from the last resourceVersion it saw, is too old: 410.
    gate.close();
    r.api.delete_pod(&ns, "a");
    deleted.store(true, Ordering::SeqCst);
    let t_deleted = Instant::now();
    r.api
        .create_pod(&PodBuilder::running(&ns, "b", &r.api.node, x).role("b"));
    api.stop_apiserver();
    let compacted = api.compact_etcd();
    api.start_apiserver();
    gate.open();

    wait_until!(
        Duration::from_secs(60),
        answers
            .lock()
            .unwrap()
            .last()
            .is_some_and(|a| a.role() == Some("b")),
        "B's role at {x}; log:\n{}",
        r.iamlet.log()
    );
    let converged = t_deleted.elapsed();
    // A few more answers after convergence: it stays there.
    let n = answers.lock().unwrap().len();
    wait_until!(
        Duration::from_secs(10),
        answers.lock().unwrap().len() >= n + 20
    );
    stop.store(true, Ordering::SeqCst);
    poller.join().expect("poller");
    let answers = answers.lock().unwrap().clone();

    // The agent relisted because its watch expired, as the API server said (410).
    assert!(
        sample(addr, RELISTS) > relists,
        "a relist; metrics:\n{}",
        r.metrics()
    );
    assert!(
        metric(addr, EXPIRED).is_some_and(|n| n >= 1.0),
        "a 410 (expired) watch error; metrics:\n{}",
        r.metrics()
    );
    assert!(
        r.iamlet.log().contains("watch expired (410); relisting"),
        "{}",
        r.iamlet.log()
    );

    // Never A's role once the agent knew A was gone; never back to A after any other answer
    // followed the deletion; and finally B, with A gone from the store.
    for (i, a) in answers.iter().enumerate() {
        if !a.a_in_store {
            assert_ne!(
                a.role(),
                Some("a"),
                "answer {i} after A left the store: {a:?}"
            );
        }
    }
    let first_other = answers
        .iter()
        .position(|a| a.after_delete && a.answer.is_ok() && a.role() != Some("a"))
        .expect("an answer other than A's after the deletion");
    let back: Vec<_> = answers[first_other..]
        .iter()
        .filter(|a| a.role() == Some("a"))
        .collect();
    assert!(back.is_empty(), "A's role came back: {back:?}");
    for a in &answers[first_other..] {
        assert!(
            matches!(a.role(), Some("b")) || matches!(a.answer, Ok((404, _))),
            "only B's role or unknown once A is gone: {a:?}"
        );
    }
    let store = r.store();
    let uids: Vec<&str> = store["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uid"].as_str().unwrap())
        .collect();
    assert!(!uids.contains(&a_uid.as_str()), "{store}");
    assert_eq!(store["rolesByIP"][x], format!("{BASE}b"), "{store}");
    let stale = answers
        .iter()
        .filter(|a| a.after_delete && a.role() == Some("a"))
        .count();
    eprintln!(
        "etcd compacted at {compacted}; {} answers, {stale} of them A's role after its deletion \
         while the agent was cut off (it cannot know before its watch says so); B's role \
         {converged:?} after the deletion",
        answers.len()
    );
}

#[test]
fn a_token_rotated_on_disk_is_read_again_and_the_agent_keeps_working_after_the_old_one_is_revoked()
{
    let api = RealApiServer::shared();
    let s = api.scope("token-rotation");
    let sa = s.own_identity(None);
    let ns = s.ns("shop");
    s.create_pod(&PodBuilder::running(&ns, "before", &s.node, "127.27.0.1").role("before"));
    let dir = iamlet_e2e::util::TempDir::new("token-rotation");
    let token_file = dir.path().join("token");
    // The shortest lifetime the API server grants: T1 is made invalid below, not left to
    // expire.
    let t1 = s.token("kube-system", &sa, 600);
    std::fs::write(&token_file, &t1).expect("write T1");
    let gate = Gate::new(api);
    let kc = s.kubeconfig_at(
        &gate.server(),
        &format!("tokenFile: {}", token_file.display()),
        dir.path(),
    );
    let access = format!("--kubeconfig={}", kc.display());
    let started = Instant::now();
    let r = real_via(
        s,
        &[access.as_str()],
        &["--backoff-max-elapsed-time=300ms"],
        |b| b,
    );
    assert_eq!(r.get("127.27.0.1", LIST).body_str(), "before");
    let user = format!("system:serviceaccount:kube-system:{sa}");
    let sa_uid = |audit: &Value| audit["user"]["uid"].as_str().unwrap_or("").to_owned();
    let old_uid = sa_uid(
        api.audit_of(&user)
            .last()
            .expect("the agent's requests audited"),
    );

    // Rotation: the ServiceAccount is deleted and created again, which revokes T1 (a bound
    // token names its ServiceAccount's UID); T2, for the new one, is written to the file.
    r.api.recreate_service_account("kube-system", &sa);
    let t2 = r.api.token("kube-system", &sa, 3600);
    let tmp = dir.path().join("token.new");
    std::fs::write(&tmp, &t2).expect("write T2");
    std::fs::rename(&tmp, &token_file).expect("rotate the token file");
    let rotated = Instant::now();
    // The API server caches a token's successful authentication for a few seconds (10 s in
    // kube-apiserver): T1 is refused once that has passed.
    wait_until!(
        Duration::from_secs(30),
        r.api.accepts(&t1) == Err(401),
        "T1 refused (401) once its ServiceAccount is gone"
    );
    assert_eq!(r.api.accepts(&t2), Ok(()), "T2 is accepted");
    // The agent's connections break: its watch must be made again, with a token.
    let unauthorized = |r: &Rig<Scope>| r.iamlet.log().matches("Unauthorized").count();
    let refused_before = unauthorized(&r);
    gate.cut();
    r.api
        .create_pod(&PodBuilder::running(&ns, "after", &r.api.node, "127.27.0.2").role("after"));

    // kube-rs re-reads a token file only when its copy is 50 s old (kube-client's TokenFile:
    // a 60 s lifetime, reloaded within 10 s of its end), whatever the API server answers:
    // until then the agent tries T1 again and is refused (401), stays ready and answers
    // from what it knew...
    wait_until!(
        Duration::from_secs(20),
        unauthorized(&r) > refused_before,
        "the watch made again with T1, refused (401); log:\n{}",
        r.iamlet.log()
    );
    assert_eq!(ready(&r).0, 200);
    assert_eq!(r.get("127.27.0.1", LIST).body_str(), "before");
    // ...then it reads T2 and resumes: the pod created after the rotation gets its role. The
    // watch backs off (up to 30 s, jittered) meanwhile, hence the bound.
    let after = r.eventually("127.27.0.2", LIST, Duration::from_secs(150), |x| {
        x.status == 200
    });
    assert_eq!(
        (after.status, after.body_str().as_str()),
        (200, "after"),
        "log:\n{}",
        r.iamlet.log()
    );
    let took = rotated.elapsed();
    assert_eq!(r.get("127.27.0.1", LIST).body_str(), "before");
    assert_eq!(ready(&r).0, 200);
    // The API server authenticated the agent as the new ServiceAccount: T2.
    let audit = api.audit_of(&user);
    let new_uid = sa_uid(audit.last().unwrap());
    assert_ne!(
        new_uid, old_uid,
        "requests after the rotation carry the new ServiceAccount"
    );
    assert!(
        audit.iter().any(|e| sa_uid(e) == new_uid
            && e["verb"] == "watch"
            && e["objectRef"]["resource"] == "pods"),
        "a pod watch authenticated with T2"
    );
    let errors: Vec<String> = r
        .metrics()
        .lines()
        .filter(|l| l.starts_with("iamlet_watch_errors_total{"))
        .map(str::to_owned)
        .collect();
    eprintln!(
        "agent started {:?} before the rotation; the pod created after it got its role {took:?} \
         after it; {} 401s logged meanwhile; {errors:?}",
        rotated - started,
        unauthorized(&r) - refused_before
    );
}
