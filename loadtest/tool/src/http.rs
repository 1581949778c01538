//! A blocking HTTP/1.1 client connection bound to a chosen loopback source, and a tiny
//! request/response codec (Content-Length framing only, which is all IMDS and nginx send).

use socket2::{Domain, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection from `src` (port chosen at connect time, so TIME_WAIT on one source does not
/// exhaust bind()'s port search).
pub fn connect(src: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // IP_BIND_ADDRESS_NO_PORT (Linux ≥ 4.2).
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&dst.into(), IO_TIMEOUT)?;
    s.set_tcp_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s.into())
}

pub fn get(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    request("GET", path, extra, b"")
}

pub fn request(method: &str, path: &str, extra: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    // A `Host` among the extra headers replaces the metadata address (the container door
    // is asked as 169.254.170.23); a request carries one Host either way.
    let host = extra
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map_or("169.254.169.254", |(_, v)| *v);
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: iamlet-loadtool\r\nAccept: */*\r\n"
    );
    for (k, v) in extra {
        if k.eq_ignore_ascii_case("host") {
            continue;
        }
        r.push_str(k);
        r.push_str(": ");
        r.push_str(v);
        r.push_str("\r\n");
    }
    if !body.is_empty() || method == "PUT" || method == "POST" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// One response: status, body range within the connection buffer, whether the server closes.
pub struct Response {
    pub status: u16,
    pub close: bool,
    body: std::ops::Range<usize>,
}

pub struct Conn {
    pub s: TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

const BUF: usize = 64 * 1024;
/// /metrics with per-role series can be large.
const MAX_RESPONSE: usize = 64 << 20;

impl Conn {
    pub fn new(s: TcpStream) -> Conn {
        Conn {
            s,
            buf: vec![0; BUF],
            filled: 0,
        }
    }

    pub fn open(src: Option<IpAddr>, dst: SocketAddr) -> io::Result<Conn> {
        connect(src, dst).map(Conn::new)
    }

    pub fn body(&self, r: &Response) -> &[u8] {
        &self.buf[r.body.clone()]
    }

    /// Writes `req` and reads one complete response (no pipelining: nothing is left over).
    pub fn round_trip(&mut self, req: &[u8]) -> io::Result<Response> {
        self.s.write_all(req)?;
        self.filled = 0;
        loop {
            if let Some(head) = find_head(&self.buf[..self.filled]) {
                let (status, len, close) = parse_head(&self.buf[..head])?;
                if head + len > MAX_RESPONSE {
                    return Err(io::Error::other("response too large"));
                }
                if head + len > self.buf.len() {
                    self.buf.resize(head + len, 0);
                }
                while self.filled < head + len {
                    self.fill()?;
                }
                return Ok(Response {
                    status,
                    close,
                    body: head..head + len,
                });
            }
            if self.filled == self.buf.len() {
                return Err(io::Error::other("response head too large"));
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let n = self.s.read(&mut self.buf[self.filled..])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        self.filled += n;
        Ok(())
    }
}

fn find_head(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn parse_head(h: &[u8]) -> io::Result<(u16, usize, bool)> {
    let bad = || io::Error::other("malformed response head");
    if h.len() < 12 || !h.starts_with(b"HTTP/1.") {
        return Err(bad());
    }
    let status: u16 = std::str::from_utf8(&h[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut len = 0usize;
    let mut close = h.starts_with(b"HTTP/1.0");
    for line in h.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (k, v) = (&line[..colon], line[colon + 1..].trim_ascii());
        if k.eq_ignore_ascii_case(b"content-length") {
            len = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
        } else if k.eq_ignore_ascii_case(b"connection") {
            close = v.eq_ignore_ascii_case(b"close");
        } else if k.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(io::Error::other("chunked responses are not supported"));
        }
    }
    Ok((status, len, close))
}

/// GET `path` from `dst` on a fresh connection from 127.0.0.1: status and body.
pub fn fetch(dst: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let mut c = Conn::open(None, dst)?;
    let r = c.round_trip(&get(path, &[("Connection", "close")]))?;
    Ok((r.status, c.body(&r).to_vec()))
}

/// The sum of every sample of `name` (a Prometheus text line starting with `name` followed
/// by `{`, ` `), restricted to lines containing every `filter` substring.
pub fn metric_sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse() {
        let (s, l, c) =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert_eq!((s, l, c), (200, 12, true));
        let (s, l, c) = parse_head(b"HTTP/1.1 404 Not Found\r\ncontent-length:3\r\n\r\n").unwrap();
        assert_eq!((s, l, c), (404, 3, false));
        let text = "# HELP x\nx_total{a=\"1\"} 3\nx_total{a=\"2\"} 4\nx_total_other 9\n";
        assert_eq!(metric_sum(text, "x_total", &[]), 7.0);
        assert_eq!(metric_sum(text, "x_total", &["a=\"2\""]), 4.0);
    }
}
