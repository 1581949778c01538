//! The stand-in's wire protocol, checked with raw sockets (kube-rs itself is checked against
//! it in `resolver/tests/apiserver_conformance.rs`).

use super::*;
use std::io::{BufRead, BufReader, Read, Write};

/// One non-watch request; returns (status, JSON body).
fn get(api: &ApiServer, target: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(api.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let head = crate::wire::read_head(&mut r).unwrap().unwrap();
    let status = head.start.split(' ').nth(1).unwrap().parse().unwrap();
    let body = crate::wire::read_body(&mut r, head.content_length().unwrap()).unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// A watch stream: reads chunked lines.
struct Watch {
    r: BufReader<TcpStream>,
}

impl Watch {
    fn open(api: &ApiServer, target: &str) -> Watch {
        let mut s = TcpStream::connect(api.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let head = crate::wire::read_head(&mut r).unwrap().unwrap();
        assert_eq!(head.start, "HTTP/1.1 200 OK");
        assert_eq!(head.header("transfer-encoding"), Some("chunked"));
        Watch { r }
    }

    /// The next event, `None` at the final chunk; an error if the stream was cut.
    fn next(&mut self) -> std::io::Result<Option<Value>> {
        let mut size = String::new();
        if self.r.read_line(&mut size)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return Ok(None);
        }
        let mut buf = vec![0; n + 2];
        self.r.read_exact(&mut buf)?;
        assert_eq!(
            &buf[n - 1..],
            b"\n\r\n",
            "one newline-terminated event per chunk"
        );
        Ok(Some(serde_json::from_slice(&buf[..n - 1]).unwrap()))
    }

    fn next_event(&mut self) -> Value {
        self.next().unwrap().expect("an event")
    }
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn lists_carry_a_resource_version_and_honour_the_field_selector() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("a", "p1", "node-a", "10.0.0.1"));
    api.create_pod(&PodBuilder::running("a", "p2", "node-b", "10.0.0.2"));
    api.set_namespace("a", &[("k", "v")]);
    let (code, list) = get(&api, "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["metadata"]["resourceVersion"], "5");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "p1");
    assert_eq!(rv_of(&items[0]), 3);
    let (_, ns) = get(&api, "/api/v1/namespaces");
    assert_eq!(ns["items"][0]["metadata"]["annotations"]["k"], "v");
    let (code, err) = get(&api, "/api/v1/pods?fieldSelector=spec.nope%3Dx");
    assert_eq!((code, err["reason"].as_str()), (400, Some("BadRequest")));
    let (_, scoped) = get(&api, "/api/v1/namespaces/b/pods");
    assert!(scoped["items"].as_array().unwrap().is_empty());
    let reqs = api.requests();
    assert_eq!(reqs[0].param("fieldSelector"), Some("spec.nodeName=node-a"));
}

#[test]
fn pages_are_served_at_one_version_and_expire_with_compaction() {
    let api = ApiServer::start();
    for i in 0..5 {
        api.create_pod(&PodBuilder::running("a", &format!("p{i}"), "n", "10.0.0.1"));
    }
    let (_, page1) = get(&api, "/api/v1/pods?limit=2");
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    assert_eq!(page1["metadata"]["remainingItemCount"], 3);
    let token = page1["metadata"]["continue"].as_str().unwrap().to_owned();
    api.create_pod(&PodBuilder::running("a", "late", "n", "10.0.0.1"));
    let (_, page2) = get(&api, &format!("/api/v1/pods?limit=10&continue={token}"));
    assert_eq!(
        page2["items"].as_array().unwrap().len(),
        3,
        "the page is at the first version"
    );
    assert_eq!(page2["metadata"]["resourceVersion"], "7");
    assert!(page2["metadata"].get("continue").is_none());
    api.compact();
    let (code, err) = get(&api, &format!("/api/v1/pods?limit=10&continue={token}"));
    assert_eq!((code, err["reason"].as_str()), (410, Some("Expired")));
}

#[test]
fn a_watch_sends_only_newer_changes_with_selector_transitions_and_bookmarks() {
    let api = ApiServer::builder()
        .bookmark_every(Duration::from_millis(100))
        .start();
    api.create_pod(&PodBuilder::running("a", "old", "node-a", "10.0.0.1"));
    let from = api.resource_version();
    let mut w = Watch::open(
        &api,
        &format!(
            "/api/v1/pods?watch=true&resourceVersion={from}&allowWatchBookmarks=true&fieldSelector=spec.nodeName%3Dnode-a&timeoutSeconds=30"
        ),
    );
    api.create_pod(&PodBuilder::new("a", "p").phase("Pending"));
    api.update_pod("a", "p", |p| p["spec"]["nodeName"] = "node-a".into());
    api.set_pod_phase("a", "p", "Running");
    api.create_pod(&PodBuilder::running("a", "elsewhere", "node-b", "10.0.0.9"));
    api.delete_pod("a", "p");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let ev = w.next_event();
        if ev["type"] != "BOOKMARK" {
            seen.push((
                ev["type"].as_str().unwrap().to_owned(),
                rv_of(&ev["object"]),
            ));
        }
    }
    assert_eq!(
        seen,
        [
            ("ADDED".into(), 5),
            ("MODIFIED".into(), 6),
            ("DELETED".into(), 8)
        ]
    );
    // Idle: a bookmark at the head version.
    let bm = w.next_event();
    assert_eq!(bm["type"], "BOOKMARK");
    assert_eq!(bm["object"]["kind"], "Pod");
    assert_eq!(rv_of(&bm["object"]), 8);
}

#[test]
fn a_compacted_version_gets_410_inside_a_200_stream() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("a", "p", "n", "10.0.0.1"));
    api.create_pod(&PodBuilder::running("a", "q", "n", "10.0.0.2"));
    api.compact();
    let mut w = Watch::open(&api, "/api/v1/pods?watch=true&resourceVersion=3");
    let ev = w.next_event();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    assert!(w.next().unwrap().is_none(), "then the stream ends cleanly");
}

#[test]
fn faults_cut_expire_stall_and_duplicate_streams() {
    let api = ApiServer::start();
    let mut w = Watch::open(&api, "/api/v1/pods?watch=true&resourceVersion=0");
    api.duplicate_next(1);
    api.create_pod(&PodBuilder::running("a", "p", "n", "10.0.0.1"));
    assert_eq!(w.next_event()["type"], "ADDED");
    assert_eq!(w.next_event()["type"], "ADDED", "re-delivered");
    api.expire_watches();
    assert_eq!(w.next_event()["object"]["code"], 410);
    assert!(w.next().unwrap().is_none());

    let mut w = Watch::open(&api, "/api/v1/pods?watch=true&resourceVersion=3");
    api.drop_watches();
    assert!(
        w.next().is_err(),
        "a dropped stream ends without the final chunk"
    );

    let mut w = Watch::open(&api, "/api/v1/pods?watch=true&resourceVersion=3");
    api.stall_watches(Duration::from_millis(300));
    let t = Instant::now();
    api.set_pod_phase("a", "p", "Failed");
    assert_eq!(w.next_event()["type"], "MODIFIED");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );

    api.fail_next(1, 500);
    let (code, body) = get(&api, "/api/v1/pods");
    assert_eq!((code, body["code"].as_u64()), (500, Some(500)));
    assert_eq!(get(&api, "/api/v1/pods").0, 200);
    assert_eq!(api.stats().dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn synthetic_initial_events_and_the_initial_events_end_bookmark() {
    let api = ApiServer::start();
    api.create_pod(&PodBuilder::running("a", "p", "n", "10.0.0.1"));
    let mut w = Watch::open(
        &api,
        "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
    );
    assert_eq!(w.next_event()["type"], "ADDED");
    let bm = w.next_event();
    assert_eq!(bm["type"], "BOOKMARK");
    assert_eq!(
        bm["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[test]
fn stale_zero_version_lists_lag_behind() {
    let api = ApiServer::start();
    for i in 0..4 {
        api.create_pod(&PodBuilder::running("a", &format!("p{i}"), "n", "10.0.0.1"));
    }
    api.stale_lists(2);
    let (_, any) = get(
        &api,
        "/api/v1/pods?resourceVersion=0&resourceVersionMatch=NotOlderThan&limit=1",
    );
    assert_eq!(any["metadata"]["resourceVersion"], "4");
    assert_eq!(
        any["items"].as_array().unwrap().len(),
        2,
        "the cache ignores limit"
    );
    let (_, recent) = get(&api, "/api/v1/pods");
    assert_eq!(recent["items"].as_array().unwrap().len(), 4);
}

#[test]
fn events_are_created_and_patched() {
    let api = ApiServer::start();
    let body = r#"{"metadata":{"name":"p.1"},"reason":"IamRoleDenied"}"#;
    let mut s = TcpStream::connect(api.addr()).unwrap();
    write!(
        s,
        "POST /apis/events.k8s.io/v1/namespaces/shop/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let head = crate::wire::read_head(&mut r).unwrap().unwrap();
    assert_eq!(head.start, "HTTP/1.1 201 Created");
    let _ = crate::wire::read_body(&mut r, head.content_length().unwrap());
    let patch = r#"{"series":{"count":2}}"#;
    write!(
        s,
        "PATCH /apis/events.k8s.io/v1/namespaces/shop/events/p.1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{patch}",
        patch.len()
    )
    .unwrap();
    let head = crate::wire::read_head(&mut r).unwrap().unwrap();
    assert_eq!(head.start, "HTTP/1.1 200 OK");
    let ev = &api.events()[0];
    assert_eq!(ev["reason"], "IamRoleDenied");
    assert_eq!(ev["metadata"]["namespace"], "shop");
    assert_eq!(ev["series"]["count"], 2);
}

#[test]
fn a_token_is_required_when_configured() {
    let api = ApiServer::builder().token("sekret").start();
    assert_eq!(get(&api, "/api/v1/pods").0, 401);
}
