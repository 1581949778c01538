//! The upstream metadata service, per worker: a small keep-alive connection pool and
//! iamlet's own IMDSv2 token (so tokenless pods keep working where the node requires
//! IMDSv2). `!Send`: one per worker runtime.

use crate::metrics::LocalCounter;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Largest upstream response relayed (user-data is at most 16 KiB).
pub const MAX_RESPONSE: usize = 1 << 20;
/// Most connections to the metadata service one worker holds, busy and idle together. IMDS
/// is the node's, shared with its own processes and limited in packets per second per
/// interface: pods' pass-through queues for these rather than opening a connection each,
/// whatever they send.
pub const MAX_CONNS: usize = 16;
/// Of those, most one source's requests use at once: a pod flooding pass-through waits for
/// its own share while its neighbours take the rest.
pub const SOURCE_SHARE: usize = MAX_CONNS / 4;
/// New connections per second per worker beyond the first `MAX_CONNS` (an upstream that
/// closes every connection must not be answered with a connection per request).
const NEW_CONNS_PER_SEC: u64 = 32;
/// Lifetime asked for iamlet's own upstream token.
const TOKEN_TTL: u64 = 21_600;
const TOKEN_RENEW_BEFORE: Duration = Duration::from_secs(300);
/// How long "this upstream has no tokens" is believed.
const NO_TOKEN_RECHECK: Duration = Duration::from_secs(300);
/// Capacity of a new exchange buffer (most IMDS answers fit; larger ones grow it).
const BUF_SIZE: usize = 4096;
/// Exchange buffers a worker keeps for reuse, and the largest it keeps (a rare big answer's
/// buffer is freed, not held).
const MAX_POOLED_BUFS: usize = 32;
const MAX_POOLED_CAP: usize = 16 * 1024;

/// Why an exchange failed; maps to 502 or 504.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    Connect,
    ConnectTimeout,
    Timeout,
    /// Malformed, oversized, or unsupported framing.
    Protocol,
    /// No connection to the upstream could be had within the connect timeout: the worker's
    /// connections were all busy (or its source's share was), or new ones were rate-limited.
    Busy,
}

impl UpstreamError {
    pub const ALL: [UpstreamError; 5] = [
        UpstreamError::Connect,
        UpstreamError::ConnectTimeout,
        UpstreamError::Timeout,
        UpstreamError::Protocol,
        UpstreamError::Busy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamError::Connect => "upstream_connect",
            UpstreamError::ConnectTimeout => "upstream_connect_timeout",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Protocol => "upstream_protocol",
            UpstreamError::Busy => "upstream_busy",
        }
    }
}

/// A complete upstream response.
pub struct UpstreamResponse {
    pub raw: Vec<u8>,
    pub head_len: usize,
    pub status: u16,
    /// The head as framing parsed it, so relaying it needs no second parse.
    pub head: Head,
}

/// Header slots for an upstream answer (IMDS sends about eight).
pub const MAX_UPSTREAM_HEADERS: usize = 64;

/// Where one piece of an answer's head lies in its raw bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    len: u32,
}

impl Span {
    /// `part`, a slice of `raw` (as httparse hands them out).
    fn within(part: &[u8], raw: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).saturating_sub(raw.as_ptr() as usize);
        Span {
            start: u32::try_from(start).unwrap_or(u32::MAX),
            len: u32::try_from(part.len()).unwrap_or(0),
        }
    }

    pub fn get(self, raw: &[u8]) -> &[u8] {
        let start = self.start as usize;
        raw.get(start..start + self.len as usize)
            .unwrap_or_default()
    }
}

/// An answer's parsed head as positions in its raw bytes: the reason phrase, each header's
/// name and value, and the Content-Length it declared (a HEAD answer's is the GET's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub reason: Span,
    headers: [(Span, Span); MAX_UPSTREAM_HEADERS],
    count: usize,
    pub content_length: Option<usize>,
}

impl Head {
    fn of(resp: &httparse::Response<'_, '_>, raw: &[u8]) -> Head {
        let mut head = Head {
            reason: Span::within(resp.reason.unwrap_or("").as_bytes(), raw),
            headers: [(Span::default(), Span::default()); MAX_UPSTREAM_HEADERS],
            count: 0,
            content_length: None,
        };
        for h in resp.headers.iter() {
            if head.content_length.is_none() && h.name.eq_ignore_ascii_case("content-length") {
                head.content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            }
            if head.count < MAX_UPSTREAM_HEADERS {
                head.headers[head.count] = (
                    Span::within(h.name.as_bytes(), raw),
                    Span::within(h.value, raw),
                );
                head.count += 1;
            }
        }
        head
    }

    /// Each header's name (a token, so text) and value, in order.
    pub fn headers<'r>(&self, raw: &'r [u8]) -> impl Iterator<Item = (&'r str, &'r [u8])> {
        self.headers[..self.count]
            .iter()
            .map(move |(n, v)| (std::str::from_utf8(n.get(raw)).unwrap_or(""), v.get(raw)))
    }
}

impl UpstreamResponse {
    /// A whole answer already read (`head`: to a HEAD request), framed as the exchange
    /// frames one: anything that does not frame is a protocol error (answered 502).
    pub fn framed(mut raw: Vec<u8>, head: bool) -> Result<UpstreamResponse, UpstreamError> {
        match settle(&mut raw, head) {
            Settled::Complete {
                head_len,
                total,
                status,
                head: parsed,
                ..
            } => Ok(UpstreamResponse::of(raw, head_len, total, status, parsed)),
            _ => Err(UpstreamError::Protocol),
        }
    }

    /// The settled answer at the start of `raw`, `total` bytes long (what follows it is cut).
    fn of(mut raw: Vec<u8>, head_len: usize, total: usize, status: u16, head: Head) -> Self {
        raw.truncate(total);
        UpstreamResponse {
            raw,
            head_len,
            status,
            head,
        }
    }
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
    /// Exchanges under way (each on a connection of its own), overall and per source.
    busy: Cell<usize>,
    busy_by_source: RefCell<ahash::AHashMap<IpAddr, usize>>,
    /// Requests waiting for a place, in line per source (`None`: iamlet's own). When an
    /// exchange ends, the first of each line is woken (only it may take the place), so a
    /// pod's requests past its share are served in the order they came and a place costs a
    /// wake-up per waiting source, not per waiting request. Waking every waiter and letting
    /// the first polled take the place starved some for the whole bound (then a 503) while
    /// the pod's later requests went through.
    lines: RefCell<ahash::AHashMap<Option<IpAddr>, VecDeque<Waiting>>>,
    tickets: Cell<u64>,
    /// New connections that may be opened now, and when that count was last topped up.
    new_conns: Cell<u64>,
    new_conns_at: Cell<Instant>,
    /// Counts the connections opened.
    opened: LocalCounter,
    token: RefCell<TokenState>,
    /// Request and response buffers of finished exchanges.
    bufs: RefCell<Vec<Vec<u8>>>,
}

impl Upstream {
    pub fn new(
        addr: SocketAddr,
        host: String,
        connect_timeout: Duration,
        response_timeout: Duration,
        opened: LocalCounter,
    ) -> Self {
        Upstream {
            addr,
            host,
            connect_timeout,
            response_timeout,
            idle: RefCell::new(Vec::new()),
            busy: Cell::new(0),
            busy_by_source: RefCell::default(),
            lines: RefCell::default(),
            tickets: Cell::new(0),
            new_conns: Cell::new(MAX_CONNS as u64),
            new_conns_at: Cell::new(Instant::now()),
            opened,
            token: RefCell::new(TokenState::Unknown),
            bufs: RefCell::new(Vec::new()),
        }
    }

    /// An empty buffer for a request or a response, reused when one is free.
    pub fn buffer(&self) -> Vec<u8> {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
    }

    /// Hands a buffer back for reuse (a response's, once relayed).
    pub fn recycle(&self, mut buf: Vec<u8>) {
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < MAX_POOLED_BUFS && (BUF_SIZE..=MAX_POOLED_CAP).contains(&buf.capacity()) {
            buf.clear();
            bufs.push(buf);
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// iamlet's own token for the upstream, fetched or renewed when needed; `None` when the
    /// upstream does not do IMDSv2 (or answered the token request oddly: asked again next
    /// time). A transport failure is returned: the request itself would only meet it again,
    /// doubling the time a pod waits for its 502/504.
    pub async fn token(&self, since: Option<Instant>) -> Result<Option<Rc<str>>, UpstreamError> {
        let now = since.unwrap_or_else(Instant::now);
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
        match self.exchange(req.into_bytes(), false, None, None).await {
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

    /// Sends one request and reads one response (`head`: the request was a HEAD, so the
    /// answer has no body whatever its Content-Length); reuses a pooled connection when one is
    /// idle and retries once on a fresh connection if the pooled one turned out to be dead.
    /// `source`: the pod it is for (`None`: iamlet's own), whose share it counts against.
    /// Waits up to the connect timeout for a connection (see [`MAX_CONNS`]).
    pub async fn exchange(
        &self,
        req: Vec<u8>,
        head: bool,
        source: Option<IpAddr>,
        since: Option<Instant>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let (slot, waited) = self.slot(source).await?;
        let _slot = slot;
        let pooled = self.idle.borrow_mut().pop();
        let req = match pooled {
            Some(conn) => {
                // From the request's clock reading when it had one and took its place at
                // once: a pooled exchange costs no reading of its own.
                let start = since.filter(|_| !waited).unwrap_or_else(Instant::now);
                let deadline = start + self.response_timeout;
                match monoio::time::timeout_at(deadline.into(), self.round_trip(conn, req, head))
                    .await
                {
                    Ok(Ok((resp, conn))) => return Ok(self.finish(resp, conn)),
                    Ok(Err(RoundTrip::Stale(req))) => {
                        if !self.take_new_conn() {
                            self.recycle(req);
                            return Err(UpstreamError::Busy);
                        }
                        req
                    }
                    Ok(Err(RoundTrip::Failed(e))) => return Err(e),
                    Err(_) => return Err(UpstreamError::Timeout),
                }
            }
            // `slot` made sure a new connection may be opened.
            None => req,
        };
        self.opened.inc();
        let conn =
            match monoio::time::timeout(self.connect_timeout, TcpStream::connect_addr(self.addr))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(_)) => return Err(UpstreamError::Connect),
                Err(_) => return Err(UpstreamError::ConnectTimeout),
            };
        let _ = conn.set_nodelay(true);
        match monoio::time::timeout(self.response_timeout, self.round_trip(conn, req, head)).await {
            Ok(Ok((resp, conn))) => Ok(self.finish(resp, conn)),
            Ok(Err(RoundTrip::Stale(_))) => Err(UpstreamError::Protocol),
            Ok(Err(RoundTrip::Failed(e))) => Err(e),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    /// A place among the exchanges under way: a free connection (pooled, or one that may be
    /// opened now) within the worker's cap and within `source`'s share. Waits for one, woken
    /// when an exchange ends or when the next new connection is allowed, for at most the
    /// connect timeout.
    /// Also says whether it had to wait.
    async fn slot(&self, source: Option<IpAddr>) -> Result<(Slot<'_>, bool), UpstreamError> {
        let mut deadline: Option<Instant> = None;
        // This request's place in its source's line, once it has had to wait.
        let mut queued: Option<InLine<'_>> = None;
        loop {
            let share_left = source.is_none_or(|ip| {
                self.busy_by_source.borrow().get(&ip).copied().unwrap_or(0) < SOURCE_SHARE
            });
            let busy = self.busy.get();
            let first = match &queued {
                Some(q) => q.first(),
                None => !self.lines.borrow().contains_key(&source),
            };
            if share_left && busy < MAX_CONNS && first {
                // Busy and idle connections together stay within the cap: with none idle, all
                // of them are busy, so one more fits.
                if !self.idle.borrow().is_empty() || self.take_new_conn() {
                    drop(queued);
                    return Ok((self.enter(source), deadline.is_some()));
                }
            }
            let now = Instant::now();
            let until = *deadline.get_or_insert(now + self.connect_timeout);
            if now >= until {
                return Err(UpstreamError::Busy);
            }
            if queued.is_none() {
                queued = Some(self.line_up(source));
            }
            // Wait for a freed connection, the next new-connection allowance, or the bound.
            let next_new =
                self.new_conns_at.get() + Duration::from_millis(1000 / NEW_CONNS_PER_SEC);
            let wake = if share_left && busy < MAX_CONNS {
                until.min(next_new.max(now))
            } else {
                until
            };
            let turn = queued.as_ref().expect("in line").turn();
            monoio::select! {
                () = turn => {}
                () = monoio::time::sleep(wake - now) => {}
            }
        }
    }

    /// A ticket at the end of `source`'s line.
    fn line_up(&self, source: Option<IpAddr>) -> InLine<'_> {
        let ticket = self.tickets.get();
        self.tickets.set(ticket + 1);
        self.lines
            .borrow_mut()
            .entry(source)
            .or_default()
            .push_back(Waiting {
                ticket,
                woken: false,
                waker: None,
            });
        InLine {
            up: self,
            source,
            ticket,
        }
    }

    fn enter(&self, source: Option<IpAddr>) -> Slot<'_> {
        self.busy.set(self.busy.get() + 1);
        if let Some(ip) = source {
            *self.busy_by_source.borrow_mut().entry(ip).or_insert(0) += 1;
        }
        Slot { up: self, source }
    }

    /// Takes one new-connection allowance, topped up at [`NEW_CONNS_PER_SEC`] to at most
    /// [`MAX_CONNS`]; false when none is left.
    fn take_new_conn(&self) -> bool {
        let now = Instant::now();
        let step = Duration::from_millis(1000 / NEW_CONNS_PER_SEC);
        let since = now.saturating_duration_since(self.new_conns_at.get());
        let earned = (since.as_millis() / step.as_millis()) as u64;
        if earned > 0 {
            let topped = (self.new_conns.get() + earned).min(MAX_CONNS as u64);
            self.new_conns.set(topped);
            self.new_conns_at.set(if topped == MAX_CONNS as u64 {
                now
            } else {
                self.new_conns_at.get() + step * earned as u32
            });
        }
        match self.new_conns.get() {
            0 => false,
            n => {
                self.new_conns.set(n - 1);
                true
            }
        }
    }

    fn finish(&self, resp: UpstreamResponse, conn: Option<TcpStream>) -> UpstreamResponse {
        if let Some(c) = conn {
            let mut idle = self.idle.borrow_mut();
            // While its exchange holds a place, a connection counts as busy; pooled, it is
            // within the same cap.
            if idle.len() < MAX_CONNS {
                idle.push(c);
            }
        }
        resp
    }

    /// Writes `req` and reads one response. Returns the connection when it may be reused.
    /// The request's buffer is kept for a retry until the exchange ends, then reused.
    async fn round_trip(
        &self,
        mut conn: TcpStream,
        req: Vec<u8>,
        head: bool,
    ) -> Result<(UpstreamResponse, Option<TcpStream>), RoundTrip> {
        let (res, req) = conn.write_all(req).await;
        if res.is_err() {
            return Err(RoundTrip::Stale(req));
        }
        let mut buf = self.buffer();
        let answer = loop {
            match settle(&mut buf, head) {
                Settled::Complete {
                    head_len,
                    total,
                    status,
                    reusable,
                    head: parsed,
                } => {
                    let resp = UpstreamResponse::of(buf, head_len, total, status, parsed);
                    break Ok((resp, reusable.then_some(conn)));
                }
                Settled::Invalid => break Err(UpstreamError::Protocol),
                Settled::Partial => {}
            }
            if buf.len() > MAX_RESPONSE {
                break Err(UpstreamError::Protocol);
            }
            if buf.capacity() - buf.len() < 2048 {
                buf.reserve(buf.capacity());
            }
            let len = buf.len();
            let (res, slice) = conn.read(buf.slice_mut(len..)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) | Err(_) if buf.is_empty() => {
                    self.recycle(buf);
                    return Err(RoundTrip::Stale(req));
                }
                Ok(0) => {
                    // Close-delimited body: what we have is the response.
                    break match close_delimited(&buf) {
                        Some((head_len, status, parsed)) => Ok((
                            UpstreamResponse {
                                raw: buf,
                                head_len,
                                status,
                                head: parsed,
                            },
                            None,
                        )),
                        None => Err(UpstreamError::Protocol),
                    };
                }
                Ok(_) => {}
                Err(_) => break Err(UpstreamError::Protocol),
            }
        };
        self.recycle(req);
        answer.map_err(RoundTrip::Failed)
    }
}

/// One exchange's place (see [`Upstream::slot`]), given back on drop.
struct Slot<'a> {
    up: &'a Upstream,
    source: Option<IpAddr>,
}

/// A waiting request's place in its source's line; leaving it (with a place, at the bound, or
/// dropped with a request whose client hung up) lets the next one check.
struct InLine<'a> {
    up: &'a Upstream,
    source: Option<IpAddr>,
    ticket: u64,
}

/// A request in line, and whether it has been told to look again.
struct Waiting {
    ticket: u64,
    woken: bool,
    waker: Option<Waker>,
}

/// Tells the first of `line` to look again.
fn wake_first(line: &mut VecDeque<Waiting>) {
    if let Some(w) = line.front_mut() {
        w.woken = true;
        if let Some(waker) = w.waker.take() {
            waker.wake();
        }
    }
}

impl InLine<'_> {
    fn first(&self) -> bool {
        self.up
            .lines
            .borrow()
            .get(&self.source)
            .and_then(|l| l.front())
            .is_some_and(|w| w.ticket == self.ticket)
    }

    /// Resolves when this request is told to look again (a place came free, or it came to
    /// the front of its line).
    fn turn(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            let mut lines = self.up.lines.borrow_mut();
            let Some(w) = lines
                .get_mut(&self.source)
                .and_then(|l| l.iter_mut().find(|w| w.ticket == self.ticket))
            else {
                return Poll::Ready(());
            };
            if std::mem::take(&mut w.woken) {
                return Poll::Ready(());
            }
            w.waker = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let mut lines = self.up.lines.borrow_mut();
        if let Some(line) = lines.get_mut(&self.source) {
            let was_first = line.front().is_some_and(|w| w.ticket == self.ticket);
            line.retain(|w| w.ticket != self.ticket);
            if line.is_empty() {
                lines.remove(&self.source);
            } else if was_first {
                wake_first(line);
            }
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let up = self.up;
        up.busy.set(up.busy.get() - 1);
        if let Some(ip) = self.source {
            let mut by = up.busy_by_source.borrow_mut();
            if let Some(n) = by.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by.remove(&ip);
                }
            }
        }
        up.lines.borrow_mut().values_mut().for_each(wake_first);
    }
}

enum RoundTrip {
    /// The connection died before any response byte: the request can be retried.
    Stale(Vec<u8>),
    Failed(UpstreamError),
}

/// What the bytes read so far from the upstream hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not a complete head yet, or a close-delimited body still arriving.
    Partial,
    Invalid,
    /// A complete 1xx head of `len` bytes: skipped, the answer follows.
    Interim {
        len: usize,
    },
    Complete {
        head_len: usize,
        total: usize,
        status: u16,
        reusable: bool,
    },
}

/// What [`settle`] makes of the start of an answer: an interim (1xx) answer is never one.
/// The head's positions make it large; it is returned once per upstream answer, and a box
/// would be an allocation per answer.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Not a complete head yet, or a close-delimited body still arriving.
    Partial,
    Invalid,
    Complete {
        head_len: usize,
        total: usize,
        status: u16,
        reusable: bool,
        /// The head as framing parsed it, so relaying it needs no second parse.
        head: Head,
    },
}

/// Frames what has been read of an upstream answer the way the exchange does: interim (1xx)
/// answers are dropped from `buf`, and a complete answer is reusable only when it ended
/// exactly where its framing said (bytes after it would be taken for the next request's
/// answer, whichever pod sends it). Pure: the exchange and the fuzz target use it.
pub fn settle(buf: &mut Vec<u8>, head: bool) -> Settled {
    loop {
        match frame_head(buf, head) {
            (Frame::Interim { len }, _) => {
                buf.drain(..len);
            }
            (
                Frame::Complete {
                    head_len,
                    total,
                    status,
                    reusable,
                },
                Some(parsed),
            ) => {
                // Never after a HEAD either: a server that sends a body anyway would have
                // it read as the next answer.
                return Settled::Complete {
                    head_len,
                    total,
                    status,
                    reusable: reusable && buf.len() == total && !head,
                    head: parsed,
                };
            }
            (Frame::Partial, _) => return Settled::Partial,
            (Frame::Complete { .. }, None) | (Frame::Invalid, _) => return Settled::Invalid,
        }
    }
}

/// Frames one upstream answer at the start of `buf` (`head`: to a HEAD request).
pub fn frame(buf: &[u8], head: bool) -> Frame {
    frame_head(buf, head).0
}

/// As [`frame`], with the parsed head of a complete answer.
fn frame_head(buf: &[u8], head: bool) -> (Frame, Option<Head>) {
    let mut headers = [httparse::EMPTY_HEADER; MAX_UPSTREAM_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return (Frame::Partial, None),
        Err(_) => return (Frame::Invalid, None),
    };
    let status = resp.code.unwrap_or(0);
    if !(100..=599).contains(&status) {
        return (Frame::Invalid, None);
    }
    if (100..200).contains(&status) {
        // 101 would switch protocols: never expected from IMDS.
        let f = if status == 101 {
            Frame::Invalid
        } else {
            Frame::Interim { len: head_len }
        };
        return (f, None);
    }
    let mut len = None;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return (Frame::Invalid, None);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match (v, len) {
                (None, _) => return (Frame::Invalid, None),
                // Two different lengths: which one frames the answer is ambiguous.
                (Some(n), Some(m)) if n != m => return (Frame::Invalid, None),
                (Some(n), _) => len = Some(n),
            }
        }
        if h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close") {
            close = true;
        }
    }
    let len = match (len, status) {
        (_, _) if head => 0,
        (_, 204 | 304) => 0,
        (Some(n), _) => n,
        (None, _) => return (Frame::Partial, None), // close-delimited: read to EOF
    };
    if len > MAX_RESPONSE {
        return (Frame::Invalid, None);
    }
    if buf.len() < head_len + len {
        return (Frame::Partial, None);
    }
    let complete = Frame::Complete {
        head_len,
        total: head_len + len,
        status,
        reusable: !close,
    };
    (complete, Some(Head::of(&resp, buf)))
}

fn close_delimited(buf: &[u8]) -> Option<(usize, u16, Head)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_UPSTREAM_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            Some((n, resp.code.unwrap_or(0), Head::of(&resp, buf)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_table() {
        assert_eq!(
            frame(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab", false),
            Frame::Partial
        );
        assert_eq!(
            frame(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA",
                false
            ),
            Frame::Complete {
                head_len: 38,
                total: 41,
                status: 200,
                reusable: true
            }
        );
        assert!(matches!(
            frame(
                b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            ),
            Frame::Complete {
                status: 404,
                reusable: false,
                ..
            }
        ));
        assert_eq!(
            frame(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Frame::Invalid
        );
        assert_eq!(
            frame(b"HTTP/1.1 200 OK\r\n\r\nbody-until-close", false),
            Frame::Partial
        );
        assert_eq!(frame(b"garbage\r\n\r\n", false), Frame::Invalid);
    }

    #[test]
    fn an_interim_answer_is_skipped_not_taken_for_the_answer() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(frame(raw, false), Frame::Interim { len: 25 });
        assert_eq!(
            frame(&raw[25..], false),
            Frame::Complete {
                head_len: 38,
                total: 40,
                status: 200,
                reusable: true
            }
        );
        assert_eq!(
            frame(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false),
            Frame::Invalid
        );
    }

    #[test]
    fn settling_skips_interim_answers_and_pools_only_an_exact_answer() {
        let mut buf = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        assert!(matches!(
            settle(&mut buf, false),
            Settled::Complete {
                head_len: 38,
                total: 40,
                status: 200,
                reusable: true,
                ..
            }
        ));
        assert!(buf.starts_with(b"HTTP/1.1 200 OK"));
        // A second answer already behind this one: not pooled.
        let mut buf =
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n".to_vec();
        assert!(matches!(
            settle(&mut buf, false),
            Settled::Complete {
                reusable: false,
                ..
            }
        ));
        let mut partial = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 20".to_vec();
        assert_eq!(settle(&mut partial, false), Settled::Partial);
        assert_eq!(partial, b"HTTP/1.1 20");
    }

    #[test]
    fn a_head_answer_has_no_body_whatever_its_length_says() {
        assert_eq!(
            frame(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", true),
            Frame::Complete {
                head_len: 39,
                total: 39,
                status: 200,
                reusable: true
            }
        );
        assert_eq!(
            frame(b"HTTP/1.1 200 OK\r\n\r\n", true),
            Frame::Complete {
                head_len: 19,
                total: 19,
                status: 200,
                reusable: true
            }
        );
    }

    #[test]
    fn ambiguous_or_oversized_lengths_are_invalid() {
        assert_eq!(
            frame(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                false
            ),
            Frame::Invalid
        );
        assert_eq!(
            frame(b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\na", false),
            Frame::Invalid
        );
        assert_eq!(
            frame(
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
                false
            ),
            Frame::Invalid
        );
        assert_eq!(frame(b"HTTP/1.1 600 X\r\n\r\n", false), Frame::Invalid);
    }
}
