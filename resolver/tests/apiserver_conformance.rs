//! kube-runtime's own watcher against the stand-in API server (`iamlet_e2e::ApiServer`): the
//! stand-in must be indistinguishable from a real API server on the paths iamlet uses — the
//! list+watch cycle, field selectors, pagination, bookmarks, 410 Expired inside a watch
//! stream, broken streams, streaming lists — or the end-to-end tests built on it prove
//! nothing.

use futures_util::StreamExt;
use iamlet_e2e::{ApiServer, PodBuilder};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event, ListSemantic};
use kube::{Api, Client};
use std::time::Duration;
use tokio::sync::mpsc;

fn client(api: &ApiServer) -> Client {
    let config = kube::Config::new(api.url().parse().unwrap());
    Client::try_from(config).unwrap()
}

/// A compact description of an event: `init`, `+name`, `done`, `apply name`, `delete name`,
/// `error 410`, `error <text>`.
fn describe(ev: &watcher::Result<Event<Pod>>) -> String {
    let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    match ev {
        Ok(Event::Init) => "init".into(),
        Ok(Event::InitApply(p)) => format!("+{}", name(p)),
        Ok(Event::InitDone) => "done".into(),
        Ok(Event::Apply(p)) => format!("apply {}", name(p)),
        Ok(Event::Delete(p)) => format!("delete {}", name(p)),
        Err(watcher::Error::WatchError(s)) => format!("error {}", s.code),
        Err(e) => format!("error {e}"),
    }
}

/// A watcher polled continuously by a task (as iamlet's resolver loop does), its events
/// described into a channel.
struct Watching {
    rx: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Watching {
    fn start(api: &ApiServer, cfg: watcher::Config) -> Watching {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut w = watcher::watcher(Api::<Pod>::all(client(api)), cfg).boxed();
        let task = tokio::spawn(async move {
            while let Some(ev) = w.next().await {
                if tx.send(describe(&ev)).is_err() {
                    return;
                }
            }
        });
        Watching { rx, task }
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("the watcher produced nothing within 10 s")
            .expect("the watcher stream ended")
    }

    async fn take(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Events up to and including the first that is not an error.
    async fn past_errors(&mut self) -> Vec<String> {
        let mut got = Vec::new();
        while got.last().is_none_or(|g: &String| g.starts_with("error")) {
            got.push(self.next().await);
        }
        got
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `n`th watch request, waiting (bounded) for it to arrive.
async fn watch_request(api: &ApiServer, n: usize) -> iamlet_e2e::apiserver::ApiRequest {
    for _ in 0..500 {
        if let Some(r) = api.requests().into_iter().filter(|r| r.is_watch()).nth(n) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no watch request #{n}: {:?}", api.requests());
}

fn node_a() -> watcher::Config {
    watcher::Config::default()
        .fields("spec.nodeName=node-a")
        .list_semantic(ListSemantic::MostRecent)
}

#[tokio::test]
async fn list_then_watch_sees_exactly_this_nodes_pods() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("ns", "a1", "node-a", "10.0.0.1"));
    api.create_pod(&PodBuilder::running("ns", "b1", "node-b", "10.0.0.2"));
    let mut w = Watching::start(&api, node_a());
    assert_eq!(w.take(3).await, ["init", "+a1", "done"]);
    api.create_pod(&PodBuilder::new("ns", "a2").phase("Pending"));
    api.update_pod("ns", "a2", |p| p["spec"]["nodeName"] = "node-a".into());
    api.create_pod(&PodBuilder::running("ns", "b2", "node-b", "10.0.0.3"));
    api.set_pod_phase("ns", "a2", "Running");
    api.delete_pod("ns", "a1");
    assert_eq!(w.take(3).await, ["apply a2", "apply a2", "delete a1"]);
    let reqs = api.requests();
    let list = &reqs[0];
    assert_eq!(list.path, "/api/v1/pods");
    assert_eq!(list.param("fieldSelector"), Some("spec.nodeName=node-a"));
    assert_eq!(
        list.param("resourceVersion"),
        None,
        "MostRecent: a consistent read"
    );
    let watch = reqs.iter().find(|r| r.is_watch()).unwrap();
    assert_eq!(watch.param("fieldSelector"), Some("spec.nodeName=node-a"));
    assert_eq!(watch.param("resourceVersion"), Some("4"));
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(watch.param("timeoutSeconds"), Some("290"));
    assert_eq!(watch.param("sendInitialEvents"), None);
}

#[tokio::test]
async fn lists_are_paged_with_continue_tokens_at_one_version() {
    let api = ApiServer::start();
    for i in 0..5 {
        api.create_pod(&PodBuilder::running(
            "ns",
            &format!("p{i}"),
            "node-a",
            "10.0.0.1",
        ));
    }
    let cfg = watcher::Config::default().page_size(2);
    let mut w = Watching::start(&api, cfg);
    assert_eq!(
        w.take(7).await,
        ["init", "+p0", "+p1", "+p2", "+p3", "+p4", "done"]
    );
    let lists: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| !r.is_watch())
        .collect();
    assert_eq!(lists.len(), 3);
    assert_eq!(lists[0].param("limit"), Some("2"));
    assert!(lists[1].param("continue").is_some());
    let watch = watch_request(&api, 0).await;
    assert_eq!(
        watch.param("resourceVersion"),
        Some("7"),
        "the version of the first page"
    );
}

#[tokio::test]
async fn any_semantic_lists_at_version_zero_and_may_get_a_stale_cache() {
    let api = ApiServer::start();
    for i in 0..4 {
        api.create_pod(&PodBuilder::running(
            "ns",
            &format!("p{i}"),
            "node-a",
            "10.0.0.1",
        ));
    }
    api.stale_lists(2);
    let cfg = watcher::Config {
        page_size: None,
        ..watcher::Config::default().list_semantic(ListSemantic::Any)
    };
    let mut w = Watching::start(&api, cfg);
    assert_eq!(w.take(4).await, ["init", "+p0", "+p1", "done"]);
    // The watch from the stale version replays what the cache had not seen yet.
    assert_eq!(w.take(2).await, ["apply p2", "apply p3"]);
    let list = &api.requests()[0];
    assert_eq!(list.param("resourceVersion"), Some("0"));
    assert_eq!(list.param("resourceVersionMatch"), Some("NotOlderThan"));
}

#[tokio::test]
async fn a_410_inside_the_stream_makes_the_watcher_relist() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("ns", "a1", "node-a", "10.0.0.1"));
    let mut w = Watching::start(&api, node_a());
    assert_eq!(w.take(3).await, ["init", "+a1", "done"]);
    // Make sure the watch is open before expiring it.
    api.create_pod(&PodBuilder::running("ns", "a2", "node-a", "10.0.0.2"));
    assert_eq!(w.take(1).await, ["apply a2"]);
    api.compact();
    api.expire_watches();
    assert_eq!(w.take(5).await, ["error 410", "init", "+a1", "+a2", "done"]);
    assert!(
        api.stats()
            .expired_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn a_broken_stream_resumes_from_the_last_version_without_loss() {
    let api = ApiServer::start();
    let mut w = Watching::start(&api, node_a());
    assert_eq!(w.take(2).await, ["init", "done"]);
    api.create_pod(&PodBuilder::running("ns", "a1", "node-a", "10.0.0.1"));
    assert_eq!(w.take(1).await, ["apply a1"]);
    let seen = api.resource_version();
    api.drop_watches();
    api.create_pod(&PodBuilder::running("ns", "a2", "node-a", "10.0.0.2"));
    let got = w.past_errors().await;
    assert_eq!(got.last().unwrap(), "apply a2", "{got:?}");
    let rewatch = api
        .requests()
        .into_iter()
        .filter(|r| r.is_watch())
        .nth(1)
        .expect("a second watch");
    assert_eq!(
        rewatch.param("resourceVersion"),
        Some(seen.to_string().as_str())
    );
}

#[tokio::test]
async fn bookmarks_move_the_resume_version_past_other_nodes_changes() {
    let api = ApiServer::builder()
        .bookmark_every(Duration::from_millis(50))
        .start();
    let mut w = Watching::start(&api, node_a());
    assert_eq!(w.take(2).await, ["init", "done"]);
    for i in 0..3 {
        api.create_pod(&PodBuilder::running(
            "ns",
            &format!("b{i}"),
            "node-b",
            "10.0.0.9",
        ));
    }
    let head = api.resource_version();
    let before = api
        .stats()
        .bookmarks
        .load(std::sync::atomic::Ordering::Relaxed);
    // Wait (bounded) for a bookmark at the head to be sent, then break the stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while api
        .stats()
        .bookmarks
        .load(std::sync::atomic::Ordering::Relaxed)
        < before + 2
    {
        assert!(std::time::Instant::now() < deadline, "no bookmarks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.drop_watches();
    api.create_pod(&PodBuilder::running("ns", "a1", "node-a", "10.0.0.1"));
    let got = w.past_errors().await;
    assert_eq!(got.last().unwrap(), "apply a1");
    let watches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.is_watch())
        .collect();
    let rewatch = watches
        .get(1)
        .unwrap_or_else(|| panic!("{got:?} {watches:?}"));
    assert_eq!(
        rewatch.param("resourceVersion"),
        Some(head.to_string().as_str())
    );
}

#[tokio::test]
async fn streaming_lists_end_their_initial_events_with_a_bookmark() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("ns", "a1", "node-a", "10.0.0.1"));
    api.create_pod(&PodBuilder::running("ns", "b1", "node-b", "10.0.0.2"));
    let cfg = watcher::Config::default()
        .fields("spec.nodeName=node-a")
        .streaming_lists();
    let mut w = Watching::start(&api, cfg);
    assert_eq!(w.take(3).await, ["init", "+a1", "done"]);
    api.create_pod(&PodBuilder::running("ns", "a2", "node-a", "10.0.0.3"));
    assert_eq!(w.take(1).await, ["apply a2"]);
    let first = &api.requests()[0];
    assert_eq!(first.param("sendInitialEvents"), Some("true"));
}

#[tokio::test]
async fn an_http_500_is_an_error_the_watcher_retries_past() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("ns", "a1", "node-a", "10.0.0.1"));
    api.fail_next(1, 500);
    let mut w = Watching::start(&api, node_a());
    let got = w.take(5).await;
    assert!(got[1].starts_with("error"), "{got:?}");
    assert_eq!(got[0], "init");
    assert_eq!(got[2..], ["init", "+a1", "done"]);
}
