//! The upstream metadata service, per worker: a small keep-alive connection pool and
//! iamlet's own IMDSv2 token (so tokenless pods keep working where the node requires
//! IMDSv2). `!Send`: one per worker runtime.

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Largest upstream response relayed (user-data is at most 16 KiB).
pub const MAX_RESPONSE: usize = 1 << 20;
/// Idle upstream connections kept per worker: with 50 concurrent pass-through requests, 8
/// left 15–18 % of requests opening a new connection under io_uring (loadtest/RESULTS.md).
const MAX_IDLE: usize = 64;
/// Lifetime asked for iamlet's own upstream token.
const TOKEN_TTL: u64 = 21_600;
const TOKEN_RENEW_BEFORE: Duration = Duration::from_secs(300);
/// How long "this upstream has no tokens" is believed.
const NO_TOKEN_RECHECK: Duration = Duration::from_secs(300);

/// Why an exchange failed; maps to 502 or 504.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    Connect,
    ConnectTimeout,
    Timeout,
    /// Malformed, oversized, or unsupported framing.
    Protocol,
}

impl UpstreamError {
    pub fn label(self) -> &'static str {
        match self {
            UpstreamError::Connect => "upstream_connect",
            UpstreamError::ConnectTimeout => "upstream_connect_timeout",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Protocol => "upstream_protocol",
        }
    }
}

/// A complete upstream response.
pub struct UpstreamResponse {
    pub raw: Vec<u8>,
    pub head_len: usize,
    pub status: u16,
}

enum TokenState {
    Unknown,
    Unsupported { until: Instant },
    Have { value: Rc<str>, renew_at: Instant },
}

/// One worker's view of the upstream.
pub struct Upstream {
    addr: SocketAddr,
    host: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle: RefCell<Vec<TcpStream>>,
    token: RefCell<TokenState>,
}

impl Upstream {
    pub fn new(
        addr: SocketAddr,
        host: String,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        Upstream {
            addr,
            host,
            connect_timeout,
            response_timeout,
            idle: RefCell::new(Vec::new()),
            token: RefCell::new(TokenState::Unknown),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// iamlet's own token for the upstream, fetched or renewed when needed; `None` when the
    /// upstream does not do IMDSv2 (or answered the token request oddly: asked again next
    /// time). A transport failure is returned: the request itself would only meet it again,
    /// doubling the time a pod waits for its 502/504.
    pub async fn token(&self) -> Result<Option<Rc<str>>, UpstreamError> {
        let now = Instant::now();
        match &*self.token.borrow() {
            TokenState::Have { value, renew_at } if now < *renew_at => {
                return Ok(Some(value.clone()));
            }
            TokenState::Unsupported { until } if now < *until => return Ok(None),
            _ => {}
        }
        let req = format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: {}\r\nX-aws-ec2-metadata-token-ttl-seconds: {TOKEN_TTL}\r\nContent-Length: 0\r\n\r\n",
            self.host
        );
        match self.exchange(req.into_bytes()).await {
            Ok(resp) if resp.status == 200 => {
                let value = String::from_utf8_lossy(&resp.raw[resp.head_len..])
                    .trim()
                    .to_owned();
                if value.is_empty() || value.contains(['\r', '\n']) {
                    return Ok(None);
                }
                let value: Rc<str> = value.into();
                let renew_at = now + Duration::from_secs(TOKEN_TTL) - TOKEN_RENEW_BEFORE;
                *self.token.borrow_mut() = TokenState::Have {
                    value: value.clone(),
                    renew_at,
                };
                Ok(Some(value))
            }
            Ok(resp) if matches!(resp.status, 400 | 403 | 404 | 405) => {
                *self.token.borrow_mut() = TokenState::Unsupported {
                    until: now + NO_TOKEN_RECHECK,
                };
                Ok(None)
            }
            // Any other answer: try again next time.
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets the token (after a 401 from the upstream).
    pub fn invalidate_token(&self) {
        *self.token.borrow_mut() = TokenState::Unknown;
    }

    /// Sends one request and reads one response; reuses a pooled connection when one is idle
    /// and retries once on a fresh connection if the pooled one turned out to be dead.
    pub async fn exchange(&self, req: Vec<u8>) -> Result<UpstreamResponse, UpstreamError> {
        let pooled = self.idle.borrow_mut().pop();
        let req = match pooled {
            Some(conn) => {
                match monoio::time::timeout(self.response_timeout, round_trip(conn, req)).await {
                    Ok(Ok((resp, conn))) => return Ok(self.finish(resp, conn)),
                    Ok(Err(RoundTrip::Stale(req))) => req,
                    Ok(Err(RoundTrip::Failed(e))) => return Err(e),
                    Err(_) => return Err(UpstreamError::Timeout),
                }
            }
            None => req,
        };
        let conn =
            match monoio::time::timeout(self.connect_timeout, TcpStream::connect_addr(self.addr))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(_)) => return Err(UpstreamError::Connect),
                Err(_) => return Err(UpstreamError::ConnectTimeout),
            };
        let _ = conn.set_nodelay(true);
        match monoio::time::timeout(self.response_timeout, round_trip(conn, req)).await {
            Ok(Ok((resp, conn))) => Ok(self.finish(resp, conn)),
            Ok(Err(RoundTrip::Stale(_))) => Err(UpstreamError::Protocol),
            Ok(Err(RoundTrip::Failed(e))) => Err(e),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    fn finish(&self, resp: UpstreamResponse, conn: Option<TcpStream>) -> UpstreamResponse {
        if let Some(c) = conn {
            let mut idle = self.idle.borrow_mut();
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
        resp
    }
}

enum RoundTrip {
    /// The connection died before any response byte: the request can be retried.
    Stale(Vec<u8>),
    Failed(UpstreamError),
}

/// Writes `req` and reads one response. Returns the connection when it may be reused.
async fn round_trip(
    mut conn: TcpStream,
    req: Vec<u8>,
) -> Result<(UpstreamResponse, Option<TcpStream>), RoundTrip> {
    let (res, req) = conn.write_all(req).await;
    if res.is_err() {
        return Err(RoundTrip::Stale(req));
    }
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        match frame(&buf) {
            Frame::Complete {
                head_len,
                total,
                status,
                reusable,
            } => {
                buf.truncate(total);
                let resp = UpstreamResponse {
                    raw: buf,
                    head_len,
                    status,
                };
                return Ok((resp, reusable.then_some(conn)));
            }
            Frame::Invalid => return Err(RoundTrip::Failed(UpstreamError::Protocol)),
            Frame::Partial => {}
        }
        if buf.len() > MAX_RESPONSE {
            return Err(RoundTrip::Failed(UpstreamError::Protocol));
        }
        if buf.capacity() - buf.len() < 2048 {
            buf.reserve(buf.capacity());
        }
        let len = buf.len();
        let (res, slice) = conn.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) if buf.is_empty() => return Err(RoundTrip::Stale(req)),
            Ok(0) => {
                // Close-delimited body: what we have is the response.
                return match close_delimited(&buf) {
                    Some((head_len, status)) => Ok((
                        UpstreamResponse {
                            raw: buf,
                            head_len,
                            status,
                        },
                        None,
                    )),
                    None => Err(RoundTrip::Failed(UpstreamError::Protocol)),
                };
            }
            Ok(_) => {}
            Err(_) if buf.is_empty() => return Err(RoundTrip::Stale(req)),
            Err(_) => return Err(RoundTrip::Failed(UpstreamError::Protocol)),
        }
    }
}

enum Frame {
    Partial,
    Invalid,
    Complete {
        head_len: usize,
        total: usize,
        status: u16,
        reusable: bool,
    },
}

fn frame(buf: &[u8]) -> Frame {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Frame::Partial,
        Err(_) => return Frame::Invalid,
    };
    let status = resp.code.unwrap_or(0);
    let mut len = None;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Frame::Invalid;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                Some(n) => len = Some(n),
                None => return Frame::Invalid,
            }
        }
        if h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close") {
            close = true;
        }
    }
    let len = match (len, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => return Frame::Partial, // close-delimited: read to EOF
    };
    if buf.len() < head_len + len {
        return Frame::Partial;
    }
    Frame::Complete {
        head_len,
        total: head_len + len,
        status,
        reusable: !close,
    }
}

fn close_delimited(buf: &[u8]) -> Option<(usize, u16)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Some((n, resp.code.unwrap_or(0))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_table() {
        assert!(matches!(
            frame(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab"),
            Frame::Partial
        ));
        assert!(matches!(
            frame(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA"),
            Frame::Complete {
                head_len: 38,
                total: 41,
                status: 200,
                reusable: true
            }
        ));
        assert!(matches!(
            frame(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
            Frame::Complete {
                status: 404,
                reusable: false,
                ..
            }
        ));
        assert!(matches!(
            frame(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Frame::Invalid
        ));
        assert!(matches!(
            frame(b"HTTP/1.1 200 OK\r\n\r\nbody-until-close"),
            Frame::Partial
        ));
        assert!(matches!(frame(b"garbage\r\n\r\n"), Frame::Invalid));
    }
}
