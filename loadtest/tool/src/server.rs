//! A small threaded HTTP/1.1 server (Content-Length framing, keep-alive, pipelining) for the
//! fakes: one thread per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct Request<'a> {
    pub method: &'a [u8],
    pub path: &'a [u8],
    head: &'a [u8],
    pub body: &'a [u8],
}

impl Request<'_> {
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        header(self.head, name)
    }
}

pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

pub type Handler = Arc<dyn Fn(&Request<'_>) -> Response + Send + Sync>;

/// Connections accepted so far; `GET /__loadtest/connections` answers it (how well a proxy's
/// upstream pool reuses connections).
static ACCEPTED: AtomicU64 = AtomicU64::new(0);

pub fn run(addr: SocketAddr, name: &str, handler: Handler) -> Result<(), String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("{name} listening on {}", l.local_addr().unwrap());
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        ACCEPTED.fetch_add(1, Ordering::Relaxed);
        let h = handler.clone();
        std::thread::spawn(move || serve(s, &h));
    }
    Ok(())
}

fn serve(mut s: TcpStream, handler: &Handler) {
    let _ = s.set_nodelay(true);
    // Bounds a connection thread's life when a client vanishes.
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0usize;
    let mut out = Vec::with_capacity(1024);
    let mut close = false;
    loop {
        // Answer every complete request in the buffer, then write them in one go.
        let mut start = 0;
        while let Some(end) = buf[start..filled]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| start + p + 4)
        {
            let head = &buf[start..end];
            let body_len = header(head, b"content-length")
                .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if filled < end + body_len {
                break;
            }
            let line_end = head.iter().position(|&b| b == b'\r').unwrap_or(head.len());
            let mut parts = head[..line_end].split(|&b| b == b' ');
            let req = Request {
                method: parts.next().unwrap_or(b""),
                path: parts.next().unwrap_or(b""),
                head,
                body: &buf[end..end + body_len],
            };
            close |= req
                .header(b"connection")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
            let r = if req.path == b"/__loadtest/connections" {
                Response {
                    status: "200 OK",
                    content_type: "text/plain",
                    headers: vec![],
                    body: ACCEPTED.load(Ordering::Relaxed).to_string().into_bytes(),
                }
            } else {
                handler(&req)
            };
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(r.status.as_bytes());
            out.extend_from_slice(b"\r\nContent-Type: ");
            out.extend_from_slice(r.content_type.as_bytes());
            out.extend_from_slice(b"\r\n");
            for (k, v) in &r.headers {
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            if close {
                out.extend_from_slice(b"Connection: close\r\n");
            }
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", r.body.len()).as_bytes());
            out.extend_from_slice(&r.body);
            start = end + body_len;
            if close {
                break;
            }
        }
        if !out.is_empty() {
            if s.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
        if close {
            return;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            return; // a request larger than 64 KiB: not a client of ours
        }
        match s.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
    }
}

fn header<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii())
    })
}
