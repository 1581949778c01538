//! One HTTP/1.1 connection: read into a reused buffer, parse in place with httparse, answer
//! every complete request (pipelining included), write the answers in one batch.

use crate::handler::handle;
use crate::respond::{self, Persist};
use crate::worker::Worker;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::net::IpAddr;
use std::rc::Rc;

/// Request line plus headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Request bodies (only PUT has one).
pub const MAX_BODY: usize = 1024;
pub const MAX_HEADERS: usize = 32;

enum Framing {
    Body(usize),
    Reject(respond::Status),
}

fn framing(req: &httparse::Request<'_, '_>) -> Framing {
    let mut len: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Framing::Reject(respond::BAD_REQUEST);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().and_then(|v| {
                let v = v.trim();
                (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| v.parse::<usize>().ok())
                    .flatten()
            });
            match (v, len) {
                (None, _) => return Framing::Reject(respond::BAD_REQUEST),
                (Some(a), Some(b)) if a != b => return Framing::Reject(respond::BAD_REQUEST),
                (Some(a), _) => len = Some(a),
            }
        }
    }
    match len.unwrap_or(0) {
        n if n > MAX_BODY => Framing::Reject(respond::PAYLOAD_TOO_LARGE),
        n => Framing::Body(n),
    }
}

fn persistence(req: &httparse::Request<'_, '_>) -> Persist {
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

/// Serves one connection until the peer closes, errs, idles out, or asks to close.
pub async fn serve(mut stream: TcpStream, peer: IpAddr, w: Rc<Worker>) {
    let mut rbuf: Vec<u8> = Vec::with_capacity(MAX_HEAD + MAX_BODY);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut start = 0usize;
    loop {
        let mut close = false;
        while start < rbuf.len() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let avail = &rbuf[start..];
            let head_len = match req.parse(avail) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    if avail.len() >= MAX_HEAD {
                        reject(&w, &mut out, respond::HEADERS_TOO_LARGE);
                        close = true;
                    }
                    break;
                }
                Err(httparse::Error::TooManyHeaders) => {
                    reject(&w, &mut out, respond::HEADERS_TOO_LARGE);
                    close = true;
                    break;
                }
                Err(_) => {
                    reject(&w, &mut out, respond::BAD_REQUEST);
                    close = true;
                    break;
                }
            };
            if head_len > MAX_HEAD {
                reject(&w, &mut out, respond::HEADERS_TOO_LARGE);
                close = true;
                break;
            }
            let body_len = match framing(&req) {
                Framing::Body(n) => n,
                Framing::Reject(status) => {
                    reject(&w, &mut out, status);
                    close = true;
                    break;
                }
            };
            if avail.len() < head_len + body_len {
                break; // wait for the rest of the body
            }
            let persist = persistence(&req);
            let body = &avail[head_len..head_len + body_len];
            handle(&w, peer, &req, body, persist, &mut out).await;
            start += head_len + body_len;
            if persist == Persist::Close {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            let (res, buf) = stream.write_all(out).await;
            out = buf;
            out.clear();
            if res.is_err() {
                return;
            }
        }
        if close {
            return;
        }
        if start == rbuf.len() {
            rbuf.clear();
        } else if start > 0 {
            rbuf.drain(..start);
        }
        start = 0;
        let len = rbuf.len();
        let read =
            monoio::time::timeout(w.shared.idle_timeout, stream.read(rbuf.slice_mut(len..))).await;
        match read {
            Ok((Ok(n), slice)) => {
                rbuf = slice.into_inner();
                if n == 0 {
                    return;
                }
            }
            Ok((Err(_), _)) | Err(_) => return,
        }
    }
}

fn reject(w: &Worker, out: &mut Vec<u8>, status: respond::Status) {
    w.metrics
        .request(crate::metrics::RouteLabel::Invalid, status.0);
    respond::write(
        out,
        status,
        respond::TEXT,
        status.1.as_bytes(),
        Persist::Close,
        false,
    );
}
