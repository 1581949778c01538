//! The control plane end to end: the real `iamlet` binary watching the stand-in API server
//! (`--api-server=http://127.0.0.1:PORT --node=node-a`), moto as STS, the fake IMDS
//! upstream, raw clients from the pods' own IPs. The worst failure this product can have is
//! one pod getting another pod's role; these tests drive pod lifecycles and check what the
//! running proxy answers.

use iamlet_e2e::rig::control as common;

use common::{BASE, LIST, NODE, rig};
use iamlet_e2e::apiserver::{ApiRequest, ApiServer, PodBuilder};
use iamlet_e2e::rig::data::sample;
use iamlet_e2e::wait_until;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn pod_requests(api: &ApiServer) -> Vec<ApiRequest> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/pods")
        .collect()
}

#[test]
fn the_node_field_selector_is_sent_and_honoured() {
    // With --api-token: the stand-in answers 401 without `Authorization: Bearer sekret`.
    let api = ApiServer::builder().token("sekret").start();
    api.create_pod(&PodBuilder::running("shop", "mine", NODE, "127.20.0.1").role("mine"));
    api.create_pod(&PodBuilder::running("shop", "theirs", "node-b", "127.20.0.2").role("theirs"));
    let r = rig(
        api,
        &["--backoff-max-elapsed-time=300ms", "--api-token=sekret"],
    );

    let reqs = pod_requests(&r.api);
    assert!(reqs.iter().any(|q| !q.is_watch()), "a list: {reqs:?}");
    for q in &reqs {
        assert_eq!(
            q.param("fieldSelector"),
            Some("spec.nodeName=node-a"),
            "every pod list and watch is scoped to this node: {q:?}"
        );
        assert_ne!(
            q.param("resourceVersion").filter(|_| !q.is_watch()),
            Some("0"),
            "lists are consistent reads, never a possibly stale cache: {q:?}"
        );
    }
    assert!(
        r.api
            .requests()
            .iter()
            .all(|q| q.path != "/api/v1/namespaces"),
        "no namespace watch without namespace restrictions"
    );
    let resp = r.get("127.20.0.1", LIST);
    assert_eq!((resp.status, resp.body_str().as_str()), (200, "mine"));
    // Another node's pod is unknown here, now and after it changes.
    assert_eq!(r.get("127.20.0.2", LIST).status, 404);
    r.api
        .create_pod(&PodBuilder::running("shop", "later", "node-b", "127.20.0.3").role("later"));
    r.api.set_pod_phase("shop", "theirs", "Running");
    assert_eq!(r.get("127.20.0.3", LIST).status, 404);
    let store = r.store();
    let ips: Vec<&str> = store["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["127.20.0.1"], "{store}");
    // kube2iam's /debug/store keys are there too.
    assert_eq!(store["rolesByIP"]["127.20.0.1"], format!("{BASE}mine"));
    assert_eq!(store["namespaceByIP"]["127.20.0.1"], "shop");
}

#[test]
fn a_pod_asking_milliseconds_after_creation_gets_its_own_role() {
    let api = ApiServer::start();
    let r = rig(
        api,
        &["--default-role=fallback", "--backoff-max-elapsed-time=2s"],
    );
    let mut slowest = Duration::ZERO;
    for i in 1..=20u8 {
        let src = format!("127.21.0.{i}");
        let role = format!("own-{i}");
        r.api
            .create_pod(&PodBuilder::running("shop", &format!("new-{i}"), NODE, &src).role(&role));
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
    // And a pod without an annotation does get the default role.
    r.api
        .create_pod(&PodBuilder::running("shop", "plain", NODE, "127.21.0.99"));
    let plain = r.get("127.21.0.99", LIST);
    assert_eq!((plain.status, plain.body_str().as_str()), (200, "fallback"));
}

fn denied_events(api: &ApiServer, pod: &str) -> Vec<serde_json::Value> {
    api.events()
        .into_iter()
        .filter(|e| e["reason"] == "IamRoleDenied" && e["regarding"]["name"] == pod)
        .collect()
}

#[test]
fn a_namespace_annotation_change_takes_effect_and_denials_are_immediate() {
    const KEY: &str = "iam.amazonaws.com/allowed-roles";
    let api = ApiServer::start();
    api.set_namespace("team", &[(KEY, r#"["web-*"]"#)]);
    api.create_pod(&PodBuilder::running("team", "app", NODE, "127.22.0.1").role("app"));
    api.create_pod(&PodBuilder::running("team", "web", NODE, "127.22.0.2").role("web-1"));
    // A second denied pod: its Event marks the point by which every earlier report was handled.
    api.create_pod(&PodBuilder::running("team", "app-b", NODE, "127.22.0.4").role("app"));
    let r = rig(
        api,
        &[
            "--namespace-restrictions",
            "--default-role=fallback",
            "--backoff-max-elapsed-time=2s",
        ],
    );
    let ns_watch = r
        .api
        .requests()
        .into_iter()
        .filter(|q| q.path == "/api/v1/namespaces")
        .count();
    assert!(ns_watch >= 1, "namespaces are watched with restrictions on");

    let misses = sample(r.iamlet.addr(), "iamlet_credential_cache_misses_total");
    let denied = r.get("127.22.0.1", LIST);
    assert_eq!(denied.status, 403, "{}", denied.body_str());
    assert_eq!(
        denied.body_str(),
        format!(
            "Forbidden: role {BASE}app is not allowed in namespace team by its {KEY} annotation\n"
        )
    );
    let creds = r.get("127.22.0.1", &format!("{LIST}app"));
    assert_eq!(creds.status, 403);
    assert_eq!(
        sample(r.iamlet.addr(), "iamlet_credential_cache_misses_total"),
        misses,
        "a denial never waits for credentials"
    );
    assert_eq!(r.get("127.22.0.2", LIST).body_str(), "web-1");

    // One IamRoleDenied Event on the pod, however many denied requests.
    for _ in 0..5 {
        assert_eq!(r.get("127.22.0.1", LIST).status, 403);
    }
    // Reports are handled in order: once app-b's Event exists, all of app's were handled.
    assert_eq!(r.get("127.22.0.4", LIST).status, 403);
    wait_until!(
        Duration::from_secs(5),
        !denied_events(&r.api, "app-b").is_empty(),
        "app-b's IamRoleDenied Event"
    );
    let events = denied_events(&r.api, "app");
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["kind"], "Pod");
    assert_eq!(ev["regarding"]["namespace"], "team");
    assert_eq!(ev["reportingController"], "iamlet");
    assert_eq!(ev["reportingInstance"], NODE);
    assert!(
        ev["note"]
            .as_str()
            .unwrap()
            .contains("is not allowed in namespace team")
    );

    // The namespace now allows app: the same pod gets its role, without a restart.
    r.api.set_namespace("team", &[(KEY, r#"["web-*", "app"]"#)]);
    let ok = r.eventually("127.22.0.1", LIST, Duration::from_secs(5), |x| {
        x.status == 200
    });
    assert_eq!((ok.status, ok.body_str().as_str()), (200, "app"));
    let creds = r.get("127.22.0.1", &format!("{LIST}app"));
    assert_eq!(creds.status, 200, "{}", creds.body_str());
    let store = r.store();
    assert_eq!(store["rolesByNamespace"]["team"][1], "app", "{store}");

    // Annotation removed: denied again; the default role still passes.
    r.api.set_namespace("team", &[]);
    let again = r.eventually("127.22.0.1", LIST, Duration::from_secs(5), |x| {
        x.status == 403
    });
    assert!(
        again.body_str().contains("missing or empty"),
        "{}",
        again.body_str()
    );
    r.api
        .create_pod(&PodBuilder::running("team", "plain", NODE, "127.22.0.3"));
    let plain = r.get("127.22.0.3", LIST);
    assert_eq!((plain.status, plain.body_str().as_str()), (200, "fallback"));
}

#[test]
fn updates_made_while_the_watch_is_broken_or_expired_are_not_lost() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("shop", "a", NODE, "127.23.0.1").role("a"));
    let r = rig(api, &["--backoff-max-elapsed-time=300ms"]);
    assert_eq!(r.get("127.23.0.1", LIST).body_str(), "a");

    // A broken stream: the changes made meanwhile arrive on the resumed watch.
    r.api.drop_watches();
    r.api.delete_pod("shop", "a");
    r.api
        .create_pod(&PodBuilder::running("shop", "b", NODE, "127.23.0.1").role("b"));
    let b = r.eventually("127.23.0.1", LIST, Duration::from_secs(10), |x| {
        x.body_str() == "b"
    });
    assert_eq!(b.body_str(), "b");

    // History compacted and the stream ended with 410 inside it: a relist.
    r.api.stall_watches(Duration::from_millis(200));
    r.api.delete_pod("shop", "b");
    r.api
        .create_pod(&PodBuilder::running("shop", "c", NODE, "127.23.0.1").role("c"));
    r.api.compact();
    r.api.expire_watches();
    let c = r.eventually("127.23.0.1", LIST, Duration::from_secs(10), |x| {
        x.body_str() == "c"
    });
    assert_eq!(c.body_str(), "c");

    // A 500 on the relist, then success.
    r.api.fail_next(2, 500);
    r.api.compact();
    r.api.drop_watches();
    r.api.delete_pod("shop", "c");
    let gone = r.eventually("127.23.0.1", LIST, Duration::from_secs(10), |x| {
        x.status == 404
    });
    assert_eq!(gone.status, 404);

    let m = r.metrics();
    assert!(
        m.contains("iamlet_watch_relists_total{resource=\"pods\"}"),
        "{m}"
    );
    assert!(
        m.contains("iamlet_watch_errors_total{resource=\"pods\",kind=\"expired\"}"),
        "{m}"
    );
    assert!(r.api.stats().expired_sent.load(Ordering::Relaxed) >= 1);
}

#[test]
fn an_sts_failure_is_reported_as_an_event_on_the_pod() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("shop", "app", NODE, "127.24.0.1").role("app"));
    let imds = iamlet_e2e::FakeImds::start();
    // STS at a port nobody listens on: every AssumeRole fails.
    let dead = format!("http://127.0.0.1:{}", iamlet_e2e::free_port());
    let iamlet = iamlet_e2e::Iamlet::builder()
        .imds(&imds)
        .env("AWS_ENDPOINT_URL_STS", dead)
        .arg(format!("--api-server={}", api.url()))
        .arg(format!("--node={NODE}"))
        .arg(format!("--base-role-arn={BASE}"))
        .arg("--backoff-max-elapsed-time=10s")
        .start();
    let src = "127.24.0.1".parse().unwrap();
    let resp = iamlet_e2e::get_from(src, iamlet.addr(), &format!("{LIST}app"));
    assert_eq!(resp.status, 500, "{}", resp.body_str());
    let found = wait_until!(
        Duration::from_secs(5),
        Some(
            api.events()
                .into_iter()
                .filter(|e| e["reason"] == "IamCredentialError")
                .collect::<Vec<_>>()
        )
        .filter(|evs| !evs.is_empty()),
        "an IamCredentialError Event"
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["regarding"]["name"], "app");
    let note = found[0]["note"].as_str().unwrap();
    assert!(
        note.starts_with(&format!("AssumeRole of {BASE}app failed")),
        "{note}"
    );
}
