//! The stand-in API server's HTTP/1.1 side: one thread per connection, keep-alive, routing,
//! lists (with `limit`/`continue` and resourceVersion semantics), chunked newline-delimited
//! watch streams (synthetic ADDED events, BOOKMARKs, `timeoutSeconds`, 410 Expired inside a
//! 200 stream) with the injected faults, and the events.k8s.io create/patch calls.

use super::store::{EventType, Kind, Selector, visible};
use super::{ApiRequest, Shared};
use crate::wire::{self, Head};
use serde_json::{Value, json};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Idle keep-alive bound; drop of the server shuts every connection down sooner.
const IDLE: Duration = Duration::from_secs(120);
/// A watch without `timeoutSeconds` ends after this (the real default is 30–60 minutes).
const DEFAULT_WATCH: Duration = Duration::from_secs(1800);
/// How often a watch re-checks faults, bookmarks and its deadline while idle.
const TICK: Duration = Duration::from_millis(25);
const MAX_BODY: usize = 1 << 20;

/// Serves one connection until close, error or shutdown.
pub(crate) fn serve(stream: TcpStream, shared: &Arc<Shared>) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_nodelay(true);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    while !shared.stop.load(Ordering::SeqCst) {
        let head = match wire::read_head(&mut r) {
            Ok(Some(h)) => h,
            _ => return,
        };
        let Some(req) = parse_request(&head, &mut r) else {
            let _ = respond(
                &mut out,
                400,
                &status_json(400, "BadRequest", "malformed request"),
            );
            return;
        };
        shared.record(req.clone());
        let keep = match route(&req, shared, &mut out) {
            Ok(keep) => keep,
            Err(_) => return,
        };
        let close = head
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        if !keep || close {
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn parse_request(head: &Head, r: &mut impl BufRead) -> Option<ApiRequest> {
    let mut parts = head.start.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let body = if head
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        read_chunked(r).ok()?
    } else {
        match head.content_length() {
            Some(n) if n > MAX_BODY => return None,
            Some(n) => wire::read_body(r, n).ok()?,
            None => Vec::new(),
        }
    };
    Some(ApiRequest {
        method: method.to_owned(),
        path: decode(path),
        query,
        headers: head.headers.clone(),
        body,
    })
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            let mut end = String::new();
            r.read_line(&mut end)?;
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk[..size]);
    }
}

/// Percent-decoding (and `+` as space) of a query component.
fn decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn respond(out: &mut TcpStream, code: u16, body: &Value) -> io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())
}

/// Handles one request; `Ok(false)` closes the connection.
fn route(req: &ApiRequest, shared: &Arc<Shared>, out: &mut TcpStream) -> io::Result<bool> {
    let refused = *super::lock(&shared.faults.refuse);
    match refused {
        Some(401) => {
            respond(out, 401, &status_json(401, "Unauthorized", "Unauthorized"))?;
            return Ok(true);
        }
        Some(code) => {
            let msg = "pods is forbidden: User \"system:serviceaccount:kube-system:iamlet\" cannot list resource \"pods\" in API group \"\" at the cluster scope";
            respond(out, code, &status_json(code, "Forbidden", msg))?;
            return Ok(true);
        }
        None => {}
    }
    if let Some(token) = &shared.opts.token {
        let want = format!("Bearer {token}");
        if wire::header(&req.headers, "authorization") != Some(want.as_str()) {
            respond(out, 401, &status_json(401, "Unauthorized", "Unauthorized"))?;
            return Ok(true);
        }
    }
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let resource = match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["api", "v1", "pods"]) => Some((Kind::Pod, None)),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => Some((Kind::Pod, Some(*ns))),
        ("GET", ["api", "v1", "namespaces"]) => Some((Kind::Namespace, None)),
        _ => None,
    };
    if let Some((kind, ns)) = resource {
        let sel = match Selector::parse(
            kind,
            req.param("fieldSelector"),
            req.param("labelSelector"),
            ns,
        ) {
            Ok(s) => s,
            Err(e) => {
                respond(out, 400, &status_json(400, "BadRequest", &e.to_string()))?;
                return Ok(true);
            }
        };
        if let Some(code) = shared.take_failure() {
            respond(
                out,
                code,
                &status_json(
                    code,
                    "InternalError",
                    "Internal error occurred: injected fault",
                ),
            )?;
            return Ok(true);
        }
        return if req.param("watch").is_some_and(|w| w == "true" || w == "1") {
            watch(req, shared, out, kind, &sel)
        } else {
            list(req, shared, out, kind, &sel).map(|()| true)
        };
    }
    match (req.method.as_str(), segs.as_slice()) {
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            let Ok(mut ev) = serde_json::from_slice::<Value>(&req.body) else {
                respond(out, 400, &status_json(400, "BadRequest", "invalid JSON"))?;
                return Ok(true);
            };
            ev["metadata"]["namespace"] = json!(ns);
            let n = shared
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len();
            ev["metadata"]["uid"] = json!(format!("event-{n}"));
            ev["metadata"]["resourceVersion"] = json!(n.to_string());
            shared
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ev.clone());
            respond(out, 201, &ev)?;
        }
        (
            "PATCH",
            [
                "apis",
                "events.k8s.io",
                "v1",
                "namespaces",
                _ns,
                "events",
                name,
            ],
        ) => {
            let patch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let mut events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
            match events
                .iter_mut()
                .find(|e| e["metadata"]["name"].as_str() == Some(name))
            {
                Some(ev) => {
                    merge(ev, &patch);
                    let ev = ev.clone();
                    drop(events);
                    respond(out, 200, &ev)?;
                }
                None => {
                    drop(events);
                    respond(out, 404, &status_json(404, "NotFound", "event not found"))?;
                }
            }
        }
        _ => respond(
            out,
            404,
            &status_json(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        )?,
    }
    Ok(true)
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        v => *target = v.clone(),
    }
}

fn list(
    req: &ApiRequest,
    shared: &Arc<Shared>,
    out: &mut TcpStream,
    kind: Kind,
    sel: &Selector,
) -> io::Result<()> {
    shared.stats.lists.fetch_add(1, Ordering::Relaxed);
    let delay = shared.faults.list_delay();
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let w = shared.world.lock().unwrap_or_else(|e| e.into_inner());
    let (at, offset) = match req.param("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .strip_prefix("c1.")
                .and_then(|t| t.split_once('.'))
                .and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            match parsed {
                Some((rv, _)) if rv < w.compacted => {
                    drop(w);
                    return respond(
                        out,
                        410,
                        &status_json(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        ),
                    );
                }
                Some(p) => p,
                None => {
                    drop(w);
                    return respond(
                        out,
                        400,
                        &status_json(400, "BadRequest", "invalid continue token"),
                    );
                }
            }
        }
        None => match req.param("resourceVersion").filter(|v| !v.is_empty()) {
            None => (w.rv, 0),
            Some("0") => {
                let lag = shared.faults.stale_lag.load(Ordering::SeqCst);
                (w.rv.saturating_sub(lag).max(w.compacted), 0)
            }
            Some(v) => {
                let Ok(n) = v.parse::<u64>() else {
                    drop(w);
                    return respond(
                        out,
                        400,
                        &status_json(400, "BadRequest", "invalid resourceVersion"),
                    );
                };
                if n > w.rv {
                    drop(w);
                    return respond(
                        out,
                        504,
                        &status_json(
                            504,
                            "Timeout",
                            &format!("Too large resource version: {n}, current: {}", w_rv(shared)),
                        ),
                    );
                }
                match req.param("resourceVersionMatch") {
                    Some("Exact") if n < w.compacted => {
                        drop(w);
                        return respond(
                            out,
                            410,
                            &status_json(410, "Expired", &format!("too old resource version: {n}")),
                        );
                    }
                    Some("Exact") => (n, 0),
                    _ => (w.rv, 0),
                }
            }
        },
    };
    let items = w.list_at(kind, at, sel);
    drop(w);
    // A `resourceVersion=0` list is served from the watch cache, which ignores `limit`.
    let from_cache = req.param("resourceVersion") == Some("0");
    let limit = req
        .param("limit")
        .filter(|_| !from_cache)
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = offset.saturating_add(limit).min(items.len());
    let page = &items[offset.min(end)..end];
    let mut meta = json!({ "resourceVersion": at.to_string() });
    if end < items.len() {
        meta["continue"] = json!(format!("c1.{at}.{end}"));
        meta["remainingItemCount"] = json!(items.len() - end);
    }
    let mut body = format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"v1\",\"metadata\":{},\"items\":[",
        kind.list_kind(),
        meta
    );
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())
}

fn w_rv(shared: &Shared) -> u64 {
    shared.world.lock().unwrap_or_else(|e| e.into_inner()).rv
}

fn chunk(out: &mut TcpStream, line: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 16);
    write!(buf, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
    out.write_all(&buf)
}

fn event_line(kind: &str, object: &str) -> String {
    format!("{{\"type\":\"{kind}\",\"object\":{object}}}")
}

fn bookmark(out: &mut TcpStream, kind: Kind, rv: u64, initial_end: bool) -> io::Result<()> {
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let obj = json!({"kind": kind.name(), "apiVersion": "v1", "metadata": meta});
    chunk(out, &event_line("BOOKMARK", &obj.to_string()))
}

fn expired(out: &mut TcpStream, asked: u64, oldest: u64) -> io::Result<()> {
    let status = status_json(
        410,
        "Expired",
        &format!("too old resource version: {asked} ({oldest})"),
    );
    chunk(out, &event_line("ERROR", &status.to_string()))?;
    out.write_all(b"0\r\n\r\n")
}

/// Streams watch events; `Ok(true)` when the stream ended cleanly (connection reusable).
fn watch(
    req: &ApiRequest,
    shared: &Arc<Shared>,
    out: &mut TcpStream,
    kind: Kind,
    sel: &Selector,
) -> io::Result<bool> {
    shared.stats.watches.fetch_add(1, Ordering::Relaxed);
    let timeout = req
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_WATCH, Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let bookmarks = req.param("allowWatchBookmarks") == Some("true");
    let send_initial = req.param("sendInitialEvents") == Some("true");
    let rv_param = req.param("resourceVersion").unwrap_or("");
    let (drop_gen, expire_gen) = shared.faults.generations();

    let w = shared.world.lock().unwrap_or_else(|e| e.into_inner());
    let mut initial: Vec<(u64, Arc<str>)> = Vec::new();
    let start = if rv_param.is_empty() || rv_param == "0" {
        initial = w.current_events(kind, sel);
        Ok(w.rv)
    } else {
        match rv_param.parse::<u64>() {
            Ok(n) if n < w.compacted => Err((n, w.compacted)),
            Ok(n) => Ok(n),
            Err(_) => {
                drop(w);
                respond(
                    out,
                    400,
                    &status_json(400, "BadRequest", "invalid resourceVersion"),
                )?;
                return Ok(true);
            }
        }
    };
    drop(w);
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    let start = match start {
        Ok(s) => s,
        Err((asked, oldest)) => {
            shared.stats.expired_sent.fetch_add(1, Ordering::Relaxed);
            expired(out, asked, oldest)?;
            return Ok(true);
        }
    };
    for (_, obj) in &initial {
        chunk(out, &event_line("ADDED", obj))?;
    }
    if send_initial {
        bookmark(out, kind, start, true)?;
    }
    let mut pos = shared
        .world
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .position_after(start);
    let mut last_bookmark = Instant::now();
    let mut head_rv = start;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let (d, e) = shared.faults.generations();
        if d != drop_gen {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            let _ = out.shutdown(Shutdown::Both);
            return Ok(false);
        }
        if e != expire_gen {
            shared.stats.expired_sent.fetch_add(1, Ordering::Relaxed);
            let oldest = w_rv(shared);
            expired(out, head_rv, oldest)?;
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            if bookmarks {
                bookmark(out, kind, head_rv, false)?;
            }
            out.write_all(b"0\r\n\r\n")?;
            return Ok(true);
        }
        if shared.faults.stalled(now) {
            std::thread::sleep(TICK);
            continue;
        }
        let mut batch: Vec<(EventType, Arc<str>)> = Vec::new();
        {
            let mut w = shared.world.lock().unwrap_or_else(|e| e.into_inner());
            if w.log.len() <= pos {
                let wait = TICK.min(deadline.saturating_duration_since(now));
                w = shared
                    .changed
                    .wait_timeout(w, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if shared.faults.stalled(Instant::now())
                || shared.faults.generations() != (drop_gen, expire_gen)
            {
                continue;
            }
            for r in &w.log[pos..] {
                if let Some(t) = visible(r, kind, sel) {
                    batch.push((t, Arc::clone(&r.json)));
                }
            }
            pos = w.log.len();
            head_rv = w.rv;
        }
        for (t, obj) in &batch {
            let line = event_line(t.as_str(), obj);
            chunk(out, &line)?;
            if shared.faults.take_duplicate() {
                shared.stats.duplicates_sent.fetch_add(1, Ordering::Relaxed);
                chunk(out, &line)?;
            }
        }
        if bookmarks && last_bookmark.elapsed() >= shared.opts.bookmark_every {
            shared.stats.bookmarks.fetch_add(1, Ordering::Relaxed);
            bookmark(out, kind, head_rv, false)?;
            last_bookmark = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_are_percent_decoded() {
        assert_eq!(decode("spec.nodeName%3Dnode-a"), "spec.nodeName=node-a");
        assert_eq!(decode("a+b%2Cc"), "a b,c");
        assert_eq!(decode("50%"), "50%");
        assert_eq!(decode("%zz"), "%zz");
    }

    #[test]
    fn merge_patch_replaces_and_removes() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut t, &json!({"a": null, "b": {"c": 9}, "e": [1]}));
        assert_eq!(t, json!({"b": {"c": 9, "d": 3}, "e": [1]}));
    }
}
