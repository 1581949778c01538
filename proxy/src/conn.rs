//! One HTTP/1.1 connection: read into a reused buffer, parse in place with httparse, answer
//! the complete requests (pipelining included) up to a bound of unwritten output, write the
//! answers in one batch. Every read and write is bounded in time.

use crate::downstream::DownstreamError;
use crate::handler::handle;
use crate::respond::{self, Persist, Reply};
use crate::route::RouteLabel;
use crate::worker::{ConnGuard, Limits, WORKER_OUT_BUDGET, Worker};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent, Canceller};
use monoio::net::TcpStream;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Header slots per request (hyper uses 100; IMDS clients send fewer than ten).
pub const MAX_HEADERS: usize = 32;

/// How a request's body is framed, or why it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A body of this many bytes follows the head (0: none).
    Body(usize),
    Reject(DownstreamError),
}

/// Request-body framing. Only Content-Length bodies are accepted; Transfer-Encoding and any
/// repeated or malformed Content-Length are refused (request smuggling).
pub fn framing(req: &httparse::Request<'_, '_>, max_body: usize) -> Framing {
    let mut len: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Framing::Reject(DownstreamError::TransferEncoding);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            if len.is_some() {
                return Framing::Reject(DownstreamError::DuplicateContentLength);
            }
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| {
                    !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit())
                });
            match v.and_then(|v| v.parse::<usize>().ok()) {
                Some(n) => len = Some(n),
                None => return Framing::Reject(DownstreamError::BadContentLength),
            }
        }
    }
    match len.unwrap_or(0) {
        0 => Framing::Body(0),
        _ if req.method != Some("PUT") => Framing::Reject(DownstreamError::BodyNotAllowed),
        n if n > max_body => Framing::Reject(DownstreamError::BodyTooLarge),
        n => Framing::Body(n),
    }
}

/// What the bytes at the front of a connection's buffer hold.
#[derive(Debug)]
pub enum Next<'h, 'b> {
    /// A complete request; `len` bytes (head and body) are consumed by it.
    Request {
        req: httparse::Request<'h, 'b>,
        len: usize,
    },
    /// Not a complete request yet: read more.
    Incomplete,
    /// Refused: answered (if the error has a status) and the connection closed.
    Reject(DownstreamError),
}

/// Parses the next request in `buf` into `headers`, within `limits`: everything a worker
/// decides about a pod's bytes before answering them. Pure, so the fuzzer runs exactly this.
pub fn next_request<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
    limits: &Limits,
) -> Next<'h, 'b> {
    let mut req = httparse::Request::new(headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Next::Reject(head_too_large(buf, limits.max_head));
        }
        Ok(httparse::Status::Partial) => return Next::Incomplete,
        Err(httparse::Error::TooManyHeaders) => {
            return Next::Reject(DownstreamError::TooManyHeaders);
        }
        Err(_) => return Next::Reject(DownstreamError::Malformed),
    };
    if head_len > limits.max_head {
        return Next::Reject(head_too_large(buf, limits.max_head));
    }
    let body_len = match framing(&req, limits.max_body) {
        Framing::Body(n) => n,
        Framing::Reject(e) => return Next::Reject(e),
    };
    if buf.len() < head_len + body_len {
        return Next::Incomplete;
    }
    Next::Request {
        req,
        len: head_len + body_len,
    }
}

/// Whether the connection stays open after answering `req`.
pub fn persistence(req: &httparse::Request<'_, '_>) -> Persist {
    let http10 = req.version == Some(0);
    let (mut close, mut keep) = (false, false);
    for h in req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
    {
        for tok in h.value.split(|&b| b == b',') {
            let tok = tok.trim_ascii();
            close |= tok.eq_ignore_ascii_case(b"close");
            keep |= tok.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    match (http10, close, keep) {
        (_, true, _) => Persist::Close,
        (true, _, true) => Persist::KeepAlive10,
        (true, _, false) => Persist::Close,
        (false, _, _) => Persist::KeepAlive,
    }
}

/// Largest output buffer a connection keeps between answers.
const OUT_KEEP: usize = 64 * 1024;

/// Unwritten output after which a connection stops answering pipelined requests until it has
/// written what it has: a client that sends many requests and reads none holds at most this
/// (plus one answer), not one answer per request it sent.
pub const OUT_BOUND: usize = 64 * 1024;

/// Serves one connection until the peer closes, errs, idles out, stalls a write, or asks to
/// close. `tracked` counts it in its worker's connections and `_permit` against its source's
/// cap while it lives. A
/// `stranger` (a source that was not a known pod when it connected) gets one request per
/// connection: it is answered with `Connection: close`, so a pipelined batch from anywhere
/// costs one bounded wait, not one per request.
pub async fn serve(
    mut stream: TcpStream,
    peer: IpAddr,
    stranger: bool,
    tracked: ConnGuard,
    _permit: crate::fairness::SourcePermit,
) {
    let w = tracked.worker();
    let limits = &w.shared.settings.limits;
    let rcap = limits.max_head + limits.max_body;
    let (rbuf, out) = w.take_bufs(rcap);
    let mut b = Bufs {
        w,
        rcap,
        rbuf,
        out,
        held: 0,
    };
    // TCP_NODELAY is set before the first write that Nagle could hold back: a second answer
    // on the connection, or one larger than a segment. A connection that carries one small
    // answer (an SDK's new connection per request) never needs the system call.
    let mut nodelay = false;
    let mut answered = false;
    let mut start = 0usize;
    // When a not-yet-complete request was first seen (slowloris bound). Taken only when a read
    // leaves a partial request, so a complete request costs no clock read for it.
    let mut head_started: Option<Instant> = None;
    // The last clock reading on this connection: deadlines are counted from it rather than
    // from a fresh read per operation.
    let mut clock: Option<Instant> = None;
    // Bytes a pod pipelined while one of its requests waited, read by the watch for its
    // departure; they are parsed after that request.
    let mut early: Vec<u8> = Vec::new();
    loop {
        let mut close = false;
        // The clock reading of this batch's last request: its answer's write times out from
        // it. None when the batch holds only a refusal, which reads no clock.
        let mut answered_at: Option<Instant> = None;
        // False when answering stopped at OUT_BOUND with complete requests still buffered:
        // they are answered after the write, before reading more.
        let mut need_read = true;
        while start < b.rbuf.len() {
            if b.out.len() >= OUT_BOUND
                || (!b.out.is_empty() && w.pending_out() >= WORKER_OUT_BUDGET)
            {
                need_read = false;
                break;
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let (req, len) = match next_request(&b.rbuf[start..], &mut headers, limits) {
                Next::Request { req, len } => (req, len),
                Next::Incomplete => break,
                Next::Reject(e) => {
                    reject(w, &mut b.out, e);
                    close = true;
                    break;
                }
            };
            let persist = if stranger || w.stopping() {
                Persist::Close
            } else {
                persistence(&req)
            };
            // The request's one clock read: its credentials' freshness, its IMDSv2 token's
            // expiry, its latency and the next read's deadline all start from it.
            let now = Instant::now();
            clock = Some(now);
            let watched = {
                // Pinned where it is made: a request's future is not moved on its way.
                let handling = std::pin::pin!(handle(w, peer, &req, persist, now, &mut b.out));
                answer_watching(handling, &mut stream, stranger, &mut early).await
            };
            let Some((answered, waited)) = watched else {
                // The client left while its request waited: nothing to answer, and the
                // connection, its permit and its buffers go now rather than after the wait.
                w.metrics.peer_gone.inc();
                return;
            };
            // A request answered on its first poll waited for nothing and took a few
            // microseconds, far below the histogram's first bucket (1 ms): it is counted
            // there without a second clock read. One that waited is timed; admin answers
            // (a /metrics render) are too.
            let took = if waited || answered.route == RouteLabel::Admin {
                let end = Instant::now();
                clock = Some(end);
                end - now
            } else {
                Duration::ZERO
            };
            answered_at = clock;
            w.metrics.observe_latency(
                answered.route,
                req.method.unwrap_or(""),
                answered.status,
                took,
            );
            b.hold();
            start += len;
            head_started = None;
            if persist == Persist::Close {
                close = true;
                break;
            }
            if !early.is_empty() {
                b.rbuf.extend_from_slice(&early);
                early.clear();
            }
        }
        if !b.out.is_empty() {
            if !nodelay && (answered || b.out.len() > 1400) {
                let _ = stream.set_nodelay(true);
                nodelay = true;
            }
            answered = true;
            let (ok, buf) = write_all(
                &mut stream,
                std::mem::take(&mut b.out),
                limits.write_timeout,
                answered_at,
            )
            .await;
            b.out = buf;
            b.out.clear();
            b.release();
            if b.out.capacity() > OUT_KEEP {
                // A large answer (a /metrics scrape with many roles) does not stay resident
                // for the rest of a keep-alive connection.
                b.out = Vec::with_capacity(4096);
            }
            if !ok {
                w.metrics.downstream_error(DownstreamError::WriteStalled);
                return;
            }
        }
        // A stopping worker ends a connection once it has answered and holds nothing more
        // to answer. One accepted but not yet read is read and answered first (with
        // `Connection: close`, see `persist` above): closing it unread would reset a client
        // that did nothing wrong.
        if close || (w.stopping() && answered && start >= b.rbuf.len()) {
            return;
        }
        if start == b.rbuf.len() {
            b.rbuf.clear();
        } else if start > 0 {
            b.rbuf.drain(..start);
        }
        start = 0;
        if !need_read {
            continue;
        }
        // A partial request must complete within the header timeout; an idle connection may
        // wait for the idle timeout (and is the first to go when the worker needs room).
        let idle = b.rbuf.is_empty();
        let (since, timeout) = if idle {
            (clock, limits.idle_timeout)
        } else {
            let started = *head_started.get_or_insert_with(Instant::now);
            if started.elapsed() >= limits.header_timeout {
                w.metrics.downstream_error(DownstreamError::HeaderTimeout);
                return;
            }
            (Some(started), limits.header_timeout)
        };
        if idle {
            tracked.set_idle(true);
        }
        let len = b.rbuf.len();
        let read = read_by(
            &mut stream,
            std::mem::take(&mut b.rbuf).slice_mut(len..),
            || since.unwrap_or_else(Instant::now) + timeout,
        )
        .await;
        if idle {
            tracked.set_idle(false);
        }
        let Some((res, slice)) = read else {
            if len > 0 {
                w.metrics.downstream_error(DownstreamError::HeaderTimeout);
            }
            return;
        };
        b.rbuf = slice.into_inner();
        if !matches!(res, Ok(n) if n > 0) {
            return;
        }
    }
}

/// Most bytes one read takes while watching a waiting request's connection.
const WATCH_READ: usize = 1024;
/// Most bytes a stranger may send while its one request waits; past it, it is closed.
const STRANGER_DRAIN: usize = 64 * 1024;

/// Runs a request's `handling`. If it has to wait (for its pod to be known, STS, or the
/// upstream), the connection is watched meanwhile: a read races the wait, and EOF or an
/// error (the client hung up, or the worker evicted the connection) ends the handling at
/// once, returning `None`. Bytes a pod sends meanwhile (pipelined requests) end the watch and
/// are kept in `early`; a stranger's are dropped (it gets one answer per connection) and
/// the watch goes on, up to [`STRANGER_DRAIN`]. A request answered at once costs nothing for
/// this. Returns the handling's output and whether it had to wait.
async fn answer_watching<T>(
    mut handling: std::pin::Pin<&mut impl std::future::Future<Output = T>>,
    stream: &mut TcpStream,
    stranger: bool,
    early: &mut Vec<u8>,
) -> Option<(T, bool)> {
    if let Some(answered) = poll_once(handling.as_mut()).await {
        return Some((answered, false));
    }
    // The watching read is cancelled and awaited when the answer is ready (bytes it took
    // are the pod's next requests): it needs a canceller, made only for a request that waits.
    let mut canceller = Canceller::new();
    let mut buf = Vec::with_capacity(WATCH_READ);
    let mut dropped = 0usize;
    loop {
        let mut read = std::pin::pin!(stream.cancelable_read(buf, canceller.handle()));
        monoio::select! {
            biased;
            answered = &mut handling => {
                let _ = std::mem::take(&mut canceller).cancel();
                let (res, got) = read.await;
                if matches!(res, Ok(n) if n > 0) && !stranger {
                    early.extend_from_slice(&got);
                }
                return Some((answered, true));
            }
            (res, got) = &mut read => match res {
                Ok(n) if n > 0 => {
                    if !stranger {
                        early.extend_from_slice(&got);
                        return Some((handling.await, true));
                    }
                    // A stranger streaming while it waits is not worth reading for.
                    dropped += n;
                    if dropped > STRANGER_DRAIN {
                        return None;
                    }
                    buf = got;
                    buf.clear();
                }
                _ => return None,
            },
        }
    }
}

/// A connection's buffers, handed back to the worker's pool however `serve` ends, so no
/// exit path can forget them. A buffer an operation holds when the task is dropped (a worker
/// stopping past `--shutdown-grace`) goes with the operation: the slot it leaves is empty,
/// and an empty buffer is not pooled.
struct Bufs<'w> {
    w: &'w Worker,
    rcap: usize,
    rbuf: Vec<u8>,
    out: Vec<u8>,
    /// How much of `out` is counted in the worker's unwritten output.
    held: usize,
}

impl Bufs<'_> {
    /// Counts what `out` gained in the worker's unwritten output.
    fn hold(&mut self) {
        let grew = self.out.len().saturating_sub(self.held);
        self.w.hold_out(grew, true);
        self.held = self.out.len();
    }

    /// `out` was written (or dropped): no longer counted.
    fn release(&mut self) {
        self.w.hold_out(self.held, false);
        self.held = 0;
    }
}

impl Drop for Bufs<'_> {
    fn drop(&mut self) {
        self.release();
        let (r, o) = (
            std::mem::take(&mut self.rbuf),
            std::mem::take(&mut self.out),
        );
        self.w.give_bufs(r, o, self.rcap, OUT_KEEP);
    }
}

/// One read, given up at the deadline `deadline` gives (`None`: the connection is to be
/// closed; the read is dropped, which cancels it, and its buffer goes with it). A read that
/// completes when first polled arms no timer and asks for no deadline.
async fn read_by<T: monoio::buf::IoBufMut + 'static>(
    stream: &mut TcpStream,
    buf: T,
    deadline: impl FnOnce() -> Instant,
) -> Option<(std::io::Result<usize>, T)> {
    let mut read = std::pin::pin!(stream.read(buf));
    if let Some(done) = poll_once(read.as_mut()).await {
        return Some(done);
    }
    monoio::select! {
        done = &mut read => Some(done),
        _ = monoio::time::sleep_until(deadline().into()) => None,
    }
}

/// Polls `f` once: its output if that finished it.
async fn poll_once<F: std::future::Future>(mut f: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await;
    match polled {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Writes all of `out`; false when the peer is gone or a write made no progress within
/// `timeout` (a client that stopped reading: the write is dropped, which cancels it, and the
/// connection is to be closed). The buffer comes back unless then. A write that completes
/// when first polled (nearly all on epoll: the answer fits the socket's buffer) arms no
/// timer. One that does not (every write on io_uring, whose completions come from the ring)
/// counts its wait from `since`, the clock reading of the last request it answers (taken
/// microseconds before), and reads the clock only when there is none or after a partial
/// write.
async fn write_all(
    stream: &mut TcpStream,
    mut out: Vec<u8>,
    timeout: std::time::Duration,
    mut since: Option<Instant>,
) -> (bool, Vec<u8>) {
    let mut written = 0;
    while written < out.len() {
        let mut write = std::pin::pin!(stream.write(out.slice(written..)));
        let done = match poll_once(write.as_mut()).await {
            Some(done) => Some(done),
            None => {
                let deadline = since.take().unwrap_or_else(Instant::now) + timeout;
                monoio::select! {
                    done = &mut write => Some(done),
                    _ = monoio::time::sleep_until(deadline.into()) => None,
                }
            }
        };
        let Some((res, slice)) = done else {
            return (false, Vec::new());
        };
        out = slice.into_inner();
        match res {
            Ok(0) | Err(_) => return (false, out),
            Ok(n) => {
                written += n;
                // Progress: a further wait counts from now.
                since = None;
            }
        }
    }
    (true, out)
}

/// 414 when the request line alone does not end within `max_head` bytes, else 431.
pub fn head_too_large(avail: &[u8], max_head: usize) -> DownstreamError {
    if avail[..max_head.min(avail.len())].contains(&b'\n') {
        DownstreamError::HeadTooLarge
    } else {
        DownstreamError::UriTooLong
    }
}

fn reject(w: &Worker, out: &mut Vec<u8>, e: DownstreamError) {
    w.metrics.downstream_error(e);
    let Some(status) = e.status() else {
        return;
    };
    w.metrics.request(RouteLabel::Invalid, status.0);
    Reply::to_unparsed(out).full(status, respond::TEXT, status.1.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_framing(raw: &[u8]) -> Result<usize, u16> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(raw).unwrap();
        match framing(&req, 1024) {
            Framing::Body(n) => Ok(n),
            Framing::Reject(e) => Err(e.status().map_or(0, |s| s.0)),
        }
    }

    #[test]
    fn body_framing_table() {
        assert_eq!(parse_framing(b"GET / HTTP/1.1\r\n\r\n"), Ok(0));
        assert_eq!(
            parse_framing(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"),
            Ok(3)
        );
        assert_eq!(
            parse_framing(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(0)
        );
        assert_eq!(
            parse_framing(b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            parse_framing(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            parse_framing(b"PUT / HTTP/1.1\r\nContent-Length: +3\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            parse_framing(b"PUT / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            parse_framing(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            parse_framing(b"PUT / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n"),
            Err(413)
        );
    }

    #[test]
    fn persistence_table() {
        let p = |raw: &[u8]| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(raw).unwrap();
            persistence(&req)
        };
        assert_eq!(p(b"GET / HTTP/1.1\r\n\r\n"), Persist::KeepAlive);
        assert_eq!(
            p(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Persist::Close
        );
        assert_eq!(p(b"GET / HTTP/1.0\r\n\r\n"), Persist::Close);
        assert_eq!(
            p(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"),
            Persist::KeepAlive10
        );
        assert_eq!(
            p(b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n"),
            Persist::Close
        );
    }
}
