//! The watch front end: error kinds, refusals, backoff, and the follow loop fed by hand.

use super::*;
use crate::handle::Shared;
use crate::restrict::NamespaceRestrictions;
use crate::roles::RoleRules;
use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMetaExt;
use prometheus_client::registry::Registry;
use std::sync::Arc;

fn api_error(code: u16) -> watcher::Error {
    watcher::Error::InitialListFailed(kube::Error::Api(Box::new(kube::core::Status {
        code,
        ..Default::default()
    })))
}

#[test]
fn refusals_are_their_own_error_kinds_and_are_said_once_per_streak() {
    assert_eq!(error_kind(&api_error(403)), "forbidden");
    assert_eq!(error_kind(&api_error(404)), "not_found");
    assert_eq!(error_kind(&api_error(500)), "list_failed");
    let keys = AnnotationKeys::default();
    let mut r = Refused::default();
    assert!(
        !r.refused(&api_error(500), &keys),
        "a 500 is an ordinary failure"
    );
    assert!(!r.now);
    assert!(r.refused(&api_error(403), &keys));
    assert!(r.now && r.warned);
    assert!(r.refused(&api_error(403), &keys));
    r.allowed();
    assert!(!r.now && !r.warned, "a later refusal is said again");
}

#[test]
fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
    let mut b = WatchBackoff::new();
    let first = b.next().unwrap();
    assert!(first >= Duration::from_millis(125) && first < Duration::from_millis(375));
    for _ in 0..20 {
        assert!(b.next().unwrap() < Duration::from_secs(45));
    }
    b.reset();
    assert!(b.next().unwrap() < Duration::from_millis(375));
}

// The follow loop, fed by hand: `stream::iter` of the events the watchers would deliver
// (as kube-runtime tests its reflectors), and what the published snapshot then answers.

const BASE: &str = "arn:aws:iam::123456789012:role/";
const WEB_ROLE: &str = "arn:aws:iam::123456789012:role/from-sa";

fn meta(name: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("ns".into()),
        uid: Some(format!("uid-{name}")),
        resource_version: Some("1".into()),
        annotations: (!annotations.is_empty()).then(|| {
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        ..Default::default()
    }
}

/// A Running pod in namespace `ns` at `ip`, running as ServiceAccount `sa`, with its own
/// role annotation when `role` is set.
fn pod(name: &str, ip: &str, role: Option<&str>, sa: &str) -> Pod {
    let annotations: Vec<(&str, &str)> = role
        .map(|r| ("iam.amazonaws.com/role", r))
        .into_iter()
        .collect();
    Pod {
        metadata: meta(name, &annotations),
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            ..Default::default()
        }),
    }
}

fn at_version(mut p: Pod, rv: &str) -> Pod {
    p.metadata.resource_version = Some(rv.into());
    p
}

fn namespace(name: &str, allowed: &str) -> Namespace {
    let mut metadata = meta(name, &[("iam.amazonaws.com/allowed-roles", allowed)]);
    metadata.namespace = None;
    Namespace {
        metadata,
        ..Default::default()
    }
}

/// A ServiceAccount in `ns` as the metadata watcher delivers it.
fn service_account(name: &str, role: Option<&str>) -> PartialObjectMeta<ServiceAccount> {
    let annotations: Vec<(&str, &str)> = role
        .map(|r| ("eks.amazonaws.com/role-arn", r))
        .into_iter()
        .collect();
    meta(name, &annotations).into_response_partial()
}

fn pods(ev: Event<Pod>) -> Item {
    Item::Pod(Box::new(Ok(ev)))
}

fn namespaces(ev: Event<Namespace>) -> Item {
    Item::Namespace(Box::new(Ok(ev)))
}

fn service_accounts(ev: Event<PartialObjectMeta<ServiceAccount>>) -> Item {
    Item::ServiceAccount(Box::new(Ok(ev)))
}

/// A full list of `objs`, as a watcher delivers it at start and after each relist.
fn list<T>(objs: Vec<T>, wrap: fn(Event<T>) -> Item) -> Vec<Item> {
    let mut items = vec![wrap(Event::Init)];
    items.extend(objs.into_iter().map(|o| wrap(Event::InitApply(o))));
    items.push(wrap(Event::InitDone));
    items
}

/// `pods` listed, and an empty ServiceAccount list: all a start without restrictions waits for.
fn synced(pod_list: Vec<Pod>) -> Vec<Item> {
    let mut items = list(pod_list, pods);
    items.extend(list(Vec::new(), service_accounts));
    items
}

/// What feeding a fresh resolver state left behind.
struct Fed {
    shared: Arc<Shared>,
    /// Whether `first` was told (and of success).
    first: Option<bool>,
    /// The `/metrics` exposition of the resolver's and the watchers' metrics.
    metrics: String,
}

impl Fed {
    fn at(&self, ip: &str) -> Option<Arc<crate::snapshot::Identity>> {
        self.shared
            .snapshot
            .load()
            .get(&ip.parse().expect("test IP"))
            .cloned()
    }

    /// The role ARN `ip` is answered with; `None` when it is unknown or has no role.
    fn role(&self, ip: &str) -> Option<String> {
        self.at(ip)?.role.as_ref().map(|r| r.arn.clone())
    }

    fn denied(&self, ip: &str) -> bool {
        self.at(ip).is_some_and(|id| id.denied.is_some())
    }

    fn store(&self) -> serde_json::Value {
        let json = crate::handle::Handle::new(self.shared.clone()).store_json();
        serde_json::from_str(&json).expect("/debug/store is JSON")
    }
}

/// Runs `follow` over `items` (default role `fallback`, the default annotation keys) until
/// they end.
async fn feed(items: Vec<Item>, restrictions: Option<NamespaceRestrictions>) -> Fed {
    let mut registry = Registry::default();
    let metrics = ResolverMetrics::register(&mut registry);
    let watch = WatchMetrics::register(&mut registry);
    let (tx, _prefetches) = mpsc::unbounded_channel();
    let shared = Shared::new();
    let rules = RoleRules::new(Some(BASE), Some("fallback")).expect("rules");
    let state =
        State::new(rules, tx, shared.clone(), metrics.clone()).with_restrictions(restrictions);
    let mut first = None;
    let keys = AnnotationKeys::default();
    follow(
        stream::iter(items),
        &keys,
        state,
        &metrics,
        &watch,
        "node-a",
        |r| first = Some(r.is_ok()),
    )
    .await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("exposition");
    Fed {
        shared,
        first,
        metrics: text,
    }
}

#[tokio::test]
async fn the_first_publish_waits_for_every_list_then_each_ip_gets_its_pods_role() {
    let pod_list = || {
        vec![
            pod("a", "10.0.0.1", Some("app"), "default"),
            pod("b", "10.0.0.2", None, "web"),
            pod("c", "10.0.0.3", None, "default"),
        ]
    };
    // Pods listed, ServiceAccounts not yet: nothing is published, the agent is not ready
    // (b would get the default role instead of its ServiceAccount's).
    let fed = feed(list(pod_list(), pods), None).await;
    assert!(!fed.shared.is_ready());
    assert_eq!(fed.first, None);
    assert!(fed.at("10.0.0.1").is_none());

    let mut items = list(pod_list(), pods);
    items.extend(list(
        vec![
            service_account("web", Some(WEB_ROLE)),
            service_account("default", None),
        ],
        service_accounts,
    ));
    let fed = feed(items, None).await;
    assert!(fed.shared.is_ready());
    assert_eq!(fed.first, Some(true));
    assert_eq!(fed.role("10.0.0.1"), Some(format!("{BASE}app")));
    assert_eq!(fed.role("10.0.0.2").as_deref(), Some(WEB_ROLE));
    assert_eq!(fed.role("10.0.0.3"), Some(format!("{BASE}fallback")));
    assert_eq!(fed.at("10.0.0.1").unwrap().pod, "a");
}

#[tokio::test]
async fn changes_and_deletes_after_the_list_move_an_ips_answer() {
    let mut items = synced(vec![pod("a", "10.0.0.1", Some("app"), "default")]);
    items.extend([
        pods(Event::Apply(pod("a", "10.0.0.1", Some("next"), "default"))),
        pods(Event::Apply(pod("b", "10.0.0.2", Some("b"), "default"))),
        pods(Event::Apply(pod("c", "10.0.0.3", Some("c"), "default"))),
        pods(Event::Delete(pod("c", "10.0.0.3", Some("c"), "default"))),
        // A ServiceAccount that gains a role gives it to its pods without an annotation.
        pods(Event::Apply(pod("d", "10.0.0.4", None, "web"))),
        service_accounts(Event::Apply(service_account("web", Some(WEB_ROLE)))),
    ]);
    let fed = feed(items, None).await;
    assert_eq!(fed.role("10.0.0.1"), Some(format!("{BASE}next")));
    assert_eq!(fed.role("10.0.0.2"), Some(format!("{BASE}b")));
    assert!(
        fed.at("10.0.0.3").is_none(),
        "a deleted pod's IP is unknown"
    );
    assert_eq!(fed.role("10.0.0.4").as_deref(), Some(WEB_ROLE));
}

#[tokio::test]
async fn a_relist_replaces_the_index_once_it_is_complete() {
    let relist = |done: bool| {
        let mut items = synced(vec![
            pod("a", "10.0.0.1", Some("app"), "default"),
            pod("b", "10.0.0.2", Some("b"), "default"),
        ]);
        items.extend([
            Item::Pod(Box::new(Err(watcher::Error::WatchError(Box::new(
                kube::core::Status {
                    code: 410,
                    ..Default::default()
                },
            ))))),
            pods(Event::Init),
            pods(Event::InitApply(pod(
                "b",
                "10.0.0.2",
                Some("b2"),
                "default",
            ))),
            pods(Event::InitApply(pod("c", "10.0.0.3", Some("c"), "default"))),
        ]);
        if done {
            items.push(pods(Event::InitDone));
        }
        items
    };
    // Mid-relist the previous list still answers.
    let fed = feed(relist(false), None).await;
    assert_eq!(fed.role("10.0.0.1"), Some(format!("{BASE}app")));
    assert_eq!(fed.role("10.0.0.2"), Some(format!("{BASE}b")));
    assert!(fed.at("10.0.0.3").is_none());
    // Complete, it replaces the index: a is gone, b changed, c is new.
    let fed = feed(relist(true), None).await;
    assert!(
        fed.at("10.0.0.1").is_none(),
        "a pod missing from the relist"
    );
    assert_eq!(fed.role("10.0.0.2"), Some(format!("{BASE}b2")));
    assert_eq!(fed.role("10.0.0.3"), Some(format!("{BASE}c")));
    assert!(
        fed.metrics
            .contains("iamlet_watch_relists_total{resource=\"pods\"} 1\n"),
        "{}",
        fed.metrics
    );
    assert!(
        fed.metrics
            .contains("iamlet_watch_errors_total{resource=\"pods\",kind=\"expired\"} 1\n"),
        "{}",
        fed.metrics
    );
}

#[tokio::test]
async fn refused_service_accounts_do_not_hold_back_the_first_publish() {
    let start = |status: u16| {
        let mut items = list(vec![pod("b", "10.0.0.2", None, "web")], pods);
        items.push(Item::ServiceAccount(Box::new(Err(api_error(status)))));
        items
    };
    // A 500 is an outage: the first publish waits for the list.
    let fed = feed(start(500), None).await;
    assert!(!fed.shared.is_ready());
    assert_eq!(fed.first, None);
    // A 403 is a right not granted yet: pods publish with the roles they get without it.
    let fed = feed(start(403), None).await;
    assert!(fed.shared.is_ready());
    assert_eq!(fed.first, Some(true));
    assert_eq!(fed.role("10.0.0.2"), Some(format!("{BASE}fallback")));
    assert!(
        fed.metrics.contains(
            "iamlet_watch_errors_total{resource=\"serviceaccounts\",kind=\"forbidden\"} 1\n"
        ),
        "{}",
        fed.metrics
    );
    // Granted later, the next list gives the pod its ServiceAccount's role.
    let mut items = start(403);
    items.extend(list(
        vec![service_account("web", Some(WEB_ROLE))],
        service_accounts,
    ));
    let fed = feed(items, None).await;
    assert_eq!(fed.role("10.0.0.2").as_deref(), Some(WEB_ROLE));
}

#[tokio::test]
async fn with_restrictions_the_namespace_list_is_waited_for_and_decides_what_is_allowed() {
    let restricted = || Some(NamespaceRestrictions::default());
    let start = || {
        synced(vec![
            pod("a", "10.0.0.1", Some("app"), "default"),
            pod("b", "10.0.0.2", Some("other"), "default"),
        ])
    };
    let fed = feed(start(), restricted()).await;
    assert!(!fed.shared.is_ready(), "published before the namespaces");

    let mut items = start();
    items.extend(list(vec![namespace("ns", r#"["app"]"#)], namespaces));
    let fed = feed(items, restricted()).await;
    assert_eq!(fed.first, Some(true));
    assert_eq!(fed.role("10.0.0.1"), Some(format!("{BASE}app")));
    assert!(!fed.denied("10.0.0.1"));
    assert!(fed.denied("10.0.0.2"));
    assert_eq!(fed.store()["rolesByNamespace"]["ns"][0], "app");

    // The namespace deleted: nothing is allowed in it any more.
    let mut items = start();
    items.extend(list(vec![namespace("ns", r#"["app"]"#)], namespaces));
    items.push(namespaces(Event::Delete(namespace("ns", r#"["app"]"#))));
    let fed = feed(items, restricted()).await;
    assert!(fed.denied("10.0.0.1"));
    assert_eq!(fed.role("10.0.0.1"), None);
}

#[tokio::test]
async fn the_debug_store_shows_the_resource_version_of_the_last_pod_event() {
    let a = |role: &str, rv: &str| at_version(pod("a", "10.0.0.1", Some(role), "default"), rv);
    let rv = |items: Vec<Item>| async {
        let fed = feed(items, None).await;
        fed.store()["resourceVersion"].clone()
    };
    // A list carries no event's version.
    assert_eq!(
        rv(synced(vec![a("app", "40")])).await,
        serde_json::Value::Null
    );

    let mut items = synced(vec![a("app", "40")]);
    items.push(pods(Event::Apply(a("next", "41"))));
    assert_eq!(rv(items).await, "41");

    // An event that changes no IP's answer still moves it; a ServiceAccount's does not.
    let mut items = synced(vec![a("app", "40")]);
    items.extend([
        pods(Event::Apply(a("next", "41"))),
        pods(Event::Apply(a("next", "42"))),
        service_accounts(Event::Apply(service_account("web", Some(WEB_ROLE)))),
    ]);
    assert_eq!(rv(items).await, "42");

    // A delete moves it too, even of a pod never seen.
    let mut items = synced(vec![a("app", "40")]);
    items.push(pods(Event::Delete(at_version(
        pod("z", "10.0.0.9", None, "default"),
        "43",
    ))));
    assert_eq!(rv(items).await, "43");
}

#[tokio::test]
async fn a_list_broken_off_midway_is_started_afresh() {
    let mut items = list(vec![pod("a", "10.0.0.1", Some("app"), "default")], pods);
    items.extend(list(Vec::new(), service_accounts));
    // The relist's stream breaks after one object; the watcher lists again from the start.
    items.extend([
        pods(Event::Init),
        pods(Event::InitApply(pod(
            "old",
            "10.0.0.7",
            Some("old"),
            "default",
        ))),
        Item::Pod(Box::new(Err(api_error(500)))),
    ]);
    items.extend(list(vec![pod("b", "10.0.0.2", Some("b"), "default")], pods));
    let fed = feed(items, None).await;
    assert!(fed.at("10.0.0.7").is_none(), "a half list's pod was kept");
    assert!(fed.at("10.0.0.1").is_none());
    assert_eq!(fed.role("10.0.0.2"), Some(format!("{BASE}b")));
}
