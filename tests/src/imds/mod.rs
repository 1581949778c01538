//! `FakeImds`: an in-process EC2 instance metadata service on 127.0.0.1:0 with the real
//! IMDSv1/v2 contract (see [`routes`]), recording every request so tests can assert what
//! iamlet forwarded. One thread per connection; HTTP/1.1 keep-alive and pipelining.

pub mod routes;

pub use routes::{NODE_MARKER, NODE_ROLE, TOKEN_HEADER, TTL_HEADER};

use crate::wire::{self, header};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Idle keep-alive timeout; also bounds how long a connection thread outlives the fake.
const IDLE: Duration = Duration::from_secs(10);
/// Largest request body read (token PUTs carry none).
const MAX_BODY: usize = 64 * 1024;

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// The request target as sent (query string included).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client's address (iamlet's upstream socket, or a test client).
    pub peer: SocketAddr,
}

impl Recorded {
    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

#[derive(Debug, Default)]
struct Shared {
    shutdown: AtomicBool,
    require_token: AtomicBool,
    requests: Mutex<Vec<Recorded>>,
    tokens: routes::Tokens,
}

/// Options for [`FakeImds`].
#[derive(Debug, Default, Clone)]
pub struct FakeImdsBuilder {
    require_token: bool,
    bind: Option<SocketAddr>,
}

impl FakeImdsBuilder {
    /// IMDSv2 required: a GET without a valid minted token gets 401.
    pub fn require_token(mut self, yes: bool) -> Self {
        self.require_token = yes;
        self
    }

    /// Listens on `addr` instead of 127.0.0.1:0 (the node-integration tests bind
    /// 169.254.169.254:80 inside a test network namespace). Dropping the fake connects to this
    /// address once to stop it: drop it where that address is the fake's (`Netns::own`).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    pub fn start(self) -> FakeImds {
        let addr = self
            .bind
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(addr).expect("bind fake IMDS");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared::default());
        shared
            .require_token
            .store(self.require_token, Ordering::SeqCst);
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("fake-imds-accept".into())
            .spawn(move || accept_loop(listener, s))
            .expect("spawn accept thread");
        FakeImds {
            addr,
            shared,
            accept: Some(accept),
        }
    }
}

// === impl FakeImds ===

/// A running fake IMDS; stops accepting on drop.
#[derive(Debug)]
pub struct FakeImds {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeImds {
    pub fn builder() -> FakeImdsBuilder {
        FakeImdsBuilder::default()
    }

    /// A fake with default options (tokens optional).
    pub fn start() -> FakeImds {
        FakeImds::builder().start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches IMDSv2-required on or off at run time.
    pub fn set_require_token(&self, yes: bool) {
        self.shared.require_token.store(yes, Ordering::SeqCst);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Unblock accept(); the loop sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let s = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("fake-imds-conn".into())
            .spawn(move || serve(stream, &s));
    }
}

/// Serves requests on one connection until close, error, idle timeout or shutdown.
fn serve(stream: TcpStream, shared: &Shared) {
    let Ok(peer) = stream.peer_addr() else { return };
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_write_timeout(Some(IDLE));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    while !shared.shutdown.load(Ordering::SeqCst) {
        let head = match wire::read_head(&mut r) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(_) => return write_reply(&mut out, &routes::Reply::bad_request(), true),
        };
        let mut parts = head.start.split(' ');
        let (Some(method), Some(path), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return write_reply(&mut out, &routes::Reply::bad_request(), true);
        };
        let body = match head.content_length() {
            Some(n) if n > MAX_BODY => {
                return write_reply(&mut out, &routes::Reply::bad_request(), true);
            }
            Some(n) => match wire::read_body(&mut r, n) {
                Ok(b) => b,
                Err(_) => return,
            },
            None => Vec::new(),
        };
        let conn_hdr = head.header("connection").unwrap_or("").to_ascii_lowercase();
        let close = conn_hdr.contains("close")
            || (version == "HTTP/1.0" && !conn_hdr.contains("keep-alive"));
        let rec = Recorded {
            method: method.to_string(),
            path: path.to_string(),
            headers: head.headers.clone(),
            body,
            peer,
        };
        shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rec);
        let require = shared.require_token.load(Ordering::SeqCst);
        let reply = routes::route(method, path, &head.headers, &shared.tokens, require);
        write_reply(&mut out, &reply, close);
        if close {
            return;
        }
    }
}

fn write_reply(out: &mut TcpStream, reply: &routes::Reply, close: bool) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nServer: EC2ws\r\n\
         Accept-Ranges: none\r\nConnection: {}\r\n",
        reply.status,
        routes::reason(reply.status),
        reply.content_type,
        reply.body.len(),
        if close { "close" } else { "keep-alive" },
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&reply.body);
    let _ = out.write_all(&bytes);
    let _ = out.flush();
}
