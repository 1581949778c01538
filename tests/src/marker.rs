//! `MarkerImds`: an upstream metadata service for attack tests. It answers every request with
//! [`MARKER`] followed by the request's method and path (so an answer that reaches the wrong
//! client names whose request it was), records every request it receives, and can misbehave
//! like a hostile upstream: send `100 Continue` before every answer.

use crate::wire;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The first bytes of every answer body: finding it in a pod's answer means the request
/// reached the upstream.
pub const MARKER: &str = "UPSTREAM-MARKER";

/// One request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    interim: AtomicBool,
    /// Milliseconds each answer is held.
    delay_ms: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    accepted: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
}

/// The marker upstream on 127.0.0.1:0; stopped on drop.
#[derive(Debug)]
pub struct MarkerImds {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl MarkerImds {
    pub fn start() -> MarkerImds {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind marker upstream");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { return };
                let s = s.clone();
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let open = s.open.fetch_add(1, Ordering::SeqCst) + 1;
                s.max_open.fetch_max(open, Ordering::SeqCst);
                std::thread::spawn(move || {
                    serve(conn, &s);
                    s.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        MarkerImds { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer every request with `100 Continue` first (a hostile or odd upstream).
    pub fn send_interim(&self, yes: bool) {
        self.shared.interim.store(yes, Ordering::SeqCst);
    }

    /// Hold every answer for `d` before sending it.
    pub fn delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// The most connections open at once so far.
    pub fn max_open_connections(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().expect("seen").clone()
    }

    /// The requests other than iamlet's own token PUTs.
    pub fn forwarded(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|q| !(q.method == "PUT" && q.path == "/latest/api/token"))
            .collect()
    }
}

impl Drop for MarkerImds {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve(conn: TcpStream, s: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut r = BufReader::new(conn);
    while let Ok(Some(head)) = wire::read_head(&mut r) {
        let mut parts = head.start.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        s.seen.lock().expect("seen").push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: head.headers.clone(),
        });
        let delay = s.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let mut reply = Vec::new();
        if s.interim.load(Ordering::SeqCst) {
            reply.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let body = if method == "PUT" {
            "marker-token".to_owned()
        } else {
            format!("{MARKER} {method} {path}")
        };
        reply.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        if method != "HEAD" {
            reply.extend_from_slice(body.as_bytes());
        }
        if out.write_all(&reply).is_err() {
            return;
        }
    }
}
