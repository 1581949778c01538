//! Raw HTTP/1.1 clients bound to a chosen loopback source address (iamlet identifies pods by
//! source IP; any 127.0.0.0/8 address is bindable on Linux). Exact bytes go out, one
//! response is read back; nothing here follows redirects or retries.

use crate::wire::{self, Head};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

/// Connect, read and write timeout of every client socket.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP response as read from the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Head and body bytes exactly as received.
    pub raw: Vec<u8>,
}

impl Response {
    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }

    /// The body as (lossy) UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `raw` from `src` to `dst` on a fresh connection and reads one response. Panics on
/// any IO error (see [`try_request_from`]).
pub fn request_from(src: Ipv4Addr, dst: SocketAddr, raw: &[u8]) -> Response {
    try_request_from(src, dst, raw)
        .unwrap_or_else(|e| panic!("request from {src} to {dst} failed: {e}"))
}

/// As [`request_from`], returning IO errors (a reset or an EOF before any response is how
/// some rejections look).
pub fn try_request_from(src: Ipv4Addr, dst: SocketAddr, raw: &[u8]) -> io::Result<Response> {
    Conn::try_open(src, dst)?.try_send(raw)
}

/// `GET {path}` with `Host: 169.254.169.254` and `Connection: close`, from `src`.
pub fn get_from(src: Ipv4Addr, dst: SocketAddr, path: &str) -> Response {
    let req = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
    request_from(src, dst, req.as_bytes())
}

/// A TCP stream from `src:0` to `dst` with [`TIMEOUT`] on connect, reads and writes.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    assert!(
        dst.ip().is_loopback(),
        "test clients only talk to loopback, not {dst}"
    );
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))?;
    sock.connect_timeout(&SockAddr::from(dst), TIMEOUT)?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.set_write_timeout(Some(TIMEOUT))?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock.into())
}

// === impl Conn ===

/// A keep-alive connection: several requests (or pipelined batches) on one socket.
#[derive(Debug)]
pub struct Conn {
    r: BufReader<TcpStream>,
    /// Whether the last request written was a HEAD (its response has no body).
    head_pending: bool,
}

impl Conn {
    /// Opens a connection from `src` to `dst`; panics on failure.
    pub fn open(src: Ipv4Addr, dst: SocketAddr) -> Conn {
        Conn::try_open(src, dst).unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"))
    }

    pub fn try_open(src: Ipv4Addr, dst: SocketAddr) -> io::Result<Conn> {
        Ok(Conn {
            r: BufReader::new(connect_from(src, dst)?),
            head_pending: false,
        })
    }

    /// Writes `raw` and reads one response; panics on failure.
    pub fn send(&mut self, raw: &[u8]) -> Response {
        self.try_send(raw)
            .unwrap_or_else(|e| panic!("send on keep-alive conn: {e}"))
    }

    pub fn try_send(&mut self, raw: &[u8]) -> io::Result<Response> {
        self.write_all(raw)?;
        self.read_response()
    }

    /// Writes bytes without reading (for pipelining or partial requests).
    pub fn write_all(&mut self, raw: &[u8]) -> io::Result<()> {
        self.head_pending = raw.starts_with(b"HEAD ");
        self.r.get_mut().write_all(raw)
    }

    /// Reads one response: Content-Length body, none for 1xx/204/304/HEAD, else to EOF.
    pub fn read_response(&mut self) -> io::Result<Response> {
        read_response(&mut self.r, self.head_pending).map_err(|e| match e.kind() {
            // A socket read timeout surfaces as EAGAIN on Linux; name it.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no complete response within {TIMEOUT:?}"),
            ),
            _ => e,
        })
    }

    /// The local address (the chosen source IP and its ephemeral port).
    pub fn local_addr(&self) -> SocketAddr {
        self.r.get_ref().local_addr().expect("local_addr")
    }

    /// True when the peer has closed the connection (EOF or reset seen within `wait`);
    /// false when data is waiting or nothing happened. Consumes nothing.
    pub fn is_closed_by_peer(&mut self, wait: Duration) -> bool {
        if !self.r.buffer().is_empty() {
            return false;
        }
        let s = self.r.get_ref();
        let _ = s.set_read_timeout(Some(wait));
        let closed = match s.peek(&mut [0u8; 1]) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        };
        let _ = s.set_read_timeout(Some(TIMEOUT));
        closed
    }
}

fn read_response(r: &mut BufReader<TcpStream>, head_request: bool) -> io::Result<Response> {
    let head = wire::read_head(r)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        )
    })?;
    let status = parse_status(&head.start)?;
    let body = if head_request || status < 200 || status == 204 || status == 304 {
        Vec::new()
    } else if let Some(len) = head.content_length() {
        wire::read_body(r, len)?
    } else {
        let mut b = Vec::new();
        r.read_to_end(&mut b)?;
        b
    };
    let Head {
        headers, mut raw, ..
    } = head;
    raw.extend_from_slice(&body);
    Ok(Response {
        status,
        headers,
        body,
        raw,
    })
}

/// Status code from `HTTP/1.x NNN reason`.
fn parse_status(line: &str) -> io::Result<u16> {
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") && (100..600).contains(&code) => {
            Ok(code)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {line:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status("HTTP/1.1 200 OK").unwrap(), 200);
        assert_eq!(parse_status("HTTP/1.0 404").unwrap(), 404);
        assert!(parse_status("HTTP/2 200 OK").is_err());
        assert!(parse_status("garbage").is_err());
    }

    #[test]
    #[should_panic(expected = "only talk to loopback")]
    fn refuses_non_loopback_destinations() {
        let _ = connect_from(Ipv4Addr::LOCALHOST, "169.254.169.254:80".parse().unwrap());
    }
}
