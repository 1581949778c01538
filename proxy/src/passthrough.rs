//! Pass-through of non-credential paths to `--metadata-addr`, with bounded connect and
//! response times. Hop-by-hop headers are stripped both ways; no X-Forwarded-For is added.

use crate::respond::{self, Persist};
use crate::worker::Worker;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::io::Write;
use std::time::Duration;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest upstream response relayed (user-data is at most 16 KiB).
pub const MAX_RESPONSE: usize = 1 << 20;

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Headers a pod may not pass to the upstream.
const STRIPPED_REQUEST: [&str; 3] = ["host", "x-forwarded-for", "forwarded"];

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Result of a forward: the status written.
#[allow(clippy::too_many_arguments)] // the request's parts, borrowed from the read buffer
pub async fn forward(
    w: &Worker,
    method: &str,
    path: &str,
    headers: &[httparse::Header<'_>],
    body: &[u8],
    out: &mut Vec<u8>,
    persist: Persist,
    head_only: bool,
) -> u16 {
    let shared = &w.shared;
    let mut req: Vec<u8> = Vec::with_capacity(256 + body.len());
    let _ = write!(
        req,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        shared.upstream_host
    );
    for h in headers {
        if is_hop_by_hop(h.name)
            || STRIPPED_REQUEST
                .iter()
                .any(|s| h.name.eq_ignore_ascii_case(s))
        {
            continue;
        }
        req.extend_from_slice(h.name.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(h.value);
        req.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || method == "PUT" {
        let _ = write!(req, "Content-Length: {}\r\n", body.len());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);

    let stream = match monoio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect_addr(shared.upstream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, upstream = %shared.upstream, "upstream connect failed");
            return fail(
                out,
                respond::BAD_GATEWAY,
                "UpstreamUnavailable",
                "the instance metadata service is unreachable",
                persist,
            );
        }
        Err(_) => {
            return fail(
                out,
                respond::GATEWAY_TIMEOUT,
                "UpstreamTimeout",
                "the instance metadata service did not accept the connection in time",
                persist,
            );
        }
    };
    match monoio::time::timeout(RESPONSE_TIMEOUT, exchange(stream, req)).await {
        Ok(Ok(resp)) => relay(&resp, out, persist, head_only, method == "HEAD"),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "upstream exchange failed");
            fail(
                out,
                respond::BAD_GATEWAY,
                "UpstreamError",
                "the instance metadata service sent no valid response",
                persist,
            )
        }
        Err(_) => fail(
            out,
            respond::GATEWAY_TIMEOUT,
            "UpstreamTimeout",
            "the instance metadata service did not answer in time",
            persist,
        ),
    }
}

fn fail(
    out: &mut Vec<u8>,
    status: respond::Status,
    code: &str,
    msg: &str,
    persist: Persist,
) -> u16 {
    respond::write(
        out,
        status,
        respond::JSON,
        &respond::error_json(code, msg),
        persist,
        false,
    );
    status.0
}

/// Sends the request and reads the whole response (the upstream closes after it).
async fn exchange(mut stream: TcpStream, req: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let (res, _) = stream.write_all(req).await;
    res?;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        if buf.len() > MAX_RESPONSE {
            return Err(std::io::Error::other("upstream response too large"));
        }
        if let Some(total) = complete_len(&buf) {
            buf.truncate(total);
            return Ok(buf);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(buf.capacity());
        }
        let len = buf.len();
        let (res, slice) = stream.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        if res? == 0 {
            return Ok(buf);
        }
    }
}

/// Length of a complete response with Content-Length, if buffered.
fn complete_len(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let cl = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })?;
    (buf.len() >= head + cl).then_some(head + cl)
}

fn relay(raw: &[u8], out: &mut Vec<u8>, persist: Persist, head_only: bool, was_head: bool) -> u16 {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return fail(
                out,
                respond::BAD_GATEWAY,
                "UpstreamError",
                "the instance metadata service sent a malformed response",
                persist,
            );
        }
    };
    if resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return fail(
            out,
            respond::BAD_GATEWAY,
            "UpstreamError",
            "chunked upstream responses are not relayed",
            persist,
        );
    }
    let code = resp.code.unwrap_or(502);
    let body = if was_head { &[][..] } else { &raw[head..] };
    let declared = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let len = if was_head {
        declared.unwrap_or(0)
    } else {
        body.len()
    };
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", code, resp.reason.unwrap_or(""));
    for h in resp.headers.iter() {
        if is_hop_by_hop(h.name) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "Content-Length: {len}\r\n");
    match persist {
        Persist::KeepAlive => {}
        Persist::KeepAlive10 => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        Persist::Close => out.extend_from_slice(b"Connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_strips_hop_by_hop_and_reframes() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nKeep-Alive: x\r\nServer: EC2ws\r\nContent-Length: 5\r\n\r\nhello";
        let mut out = Vec::new();
        assert_eq!(relay(raw, &mut out, Persist::KeepAlive, false, false), 200);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: EC2ws\r\nContent-Length: 5\r\n\r\nhello"
        );
    }

    #[test]
    fn complete_len_waits_for_the_whole_body() {
        assert_eq!(
            complete_len(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab"),
            None
        );
        assert_eq!(
            complete_len(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"),
            Some(41)
        );
    }
}
