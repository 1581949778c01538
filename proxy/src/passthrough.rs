//! Pass-through of non-credential paths to `--metadata-addr`: canonical path, hop-by-hop
//! headers and any pod token stripped, iamlet's own upstream token added, no
//! X-Forwarded-For. Failures answer 502/504 with a small IMDS-style body.

use crate::handler::Asked;
use crate::respond::{self, Reply};
use crate::upstream::{UpstreamError, UpstreamResponse};
use crate::worker::Worker;
use std::time::Instant;

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

/// The only request headers a pod's request carries upstream: what IMDS clients send to
/// negotiate a GET. Everything else is dropped: `Expect` (an upstream `100 Continue` is not
/// an answer), hop-by-hop and framing headers, `Host` (iamlet sets its own), forwarding
/// headers (IMDS refuses tokens for proxied requests; the pod's address is not the
/// upstream's business), and the pod's token (iamlet adds its own).
const FORWARDED_REQUEST: [&str; 6] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "user-agent",
    "if-none-match",
    "if-modified-since",
];

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn build(
    w: &Worker,
    method: &str,
    path: &str,
    headers: &[httparse::Header<'_>],
    token: Option<&str>,
) -> Vec<u8> {
    let mut req = w.upstream.buffer();
    for part in [
        method,
        " ",
        path,
        " HTTP/1.1\r\nHost: ",
        w.upstream.host(),
        "\r\n",
    ] {
        req.extend_from_slice(part.as_bytes());
    }
    for h in headers {
        if !FORWARDED_REQUEST
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
    if let Some(t) = token {
        req.extend_from_slice(b"X-aws-ec2-metadata-token: ");
        req.extend_from_slice(t.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// Forwards a GET or HEAD and writes the relayed answer; returns the status written (the
/// caller counts it). A HEAD goes upstream as a GET whose body is dropped: its answer is read
/// to the byte, so its connection is pooled like any other (a HEAD answer's framing leaves
/// that in doubt, and a connection per HEAD spends the node's connections to IMDS).
pub async fn forward(
    w: &Worker,
    asked: Asked<'_, '_, Option<Instant>>,
    path: &str,
    reply: &mut Reply<'_>,
) -> u16 {
    // The method is the reply's to act on (a HEAD is relayed as the GET's head).
    let Asked {
        peer,
        method: _,
        headers,
        mut now,
    } = asked;
    for attempt in 0..2 {
        let token = match w.upstream.token(now).await {
            Ok(t) => t,
            Err(e) => return fail(w, reply, e),
        };
        let req = build(w, "GET", path, headers, token.as_deref());
        // A second attempt reads the clock afresh.
        match w
            .upstream
            .exchange(req, false, Some(peer), now.take())
            .await
        {
            Ok(resp) if resp.status == 401 && attempt == 0 => {
                // Our token expired early, or the upstream started requiring tokens.
                w.upstream.invalidate_token();
                w.upstream.recycle(resp.raw);
            }
            Ok(resp) => {
                let status = relay(&resp, reply);
                w.upstream.recycle(resp.raw);
                return status;
            }
            Err(e) => return fail(w, reply, e),
        }
    }
    fail(w, reply, UpstreamError::Protocol)
}

/// Answers a failed exchange.
fn fail(w: &Worker, reply: &mut Reply<'_>, e: UpstreamError) -> u16 {
    w.metrics.upstream_error(e);
    let (status, code, msg) = match e {
        UpstreamError::Connect => (
            respond::BAD_GATEWAY,
            "UpstreamUnavailable",
            "the instance metadata service is unreachable",
        ),
        UpstreamError::ConnectTimeout => (
            respond::GATEWAY_TIMEOUT,
            "UpstreamTimeout",
            "the instance metadata service did not accept the connection in time",
        ),
        UpstreamError::Timeout => (
            respond::GATEWAY_TIMEOUT,
            "UpstreamTimeout",
            "the instance metadata service did not answer in time",
        ),
        UpstreamError::Protocol => (
            respond::BAD_GATEWAY,
            "UpstreamError",
            "the instance metadata service sent no valid response",
        ),
        UpstreamError::Busy => (
            respond::UNAVAILABLE,
            "UpstreamBusy",
            "too many requests to the instance metadata service from this node; retry shortly",
        ),
    };
    reply.full(status, respond::JSON, &respond::error_json(code, msg));
    status.0
}

/// Writes the upstream's answer, reframed from the head its framing parsed (no second
/// parse); an answer that did not frame never gets here (502).
fn relay(resp: &UpstreamResponse, reply: &mut Reply<'_>) -> u16 {
    let raw = &resp.raw;
    let body = raw.get(resp.head_len..).unwrap_or_default();
    // The Content-Length of a HEAD's answer is the GET's, as the upstream declared it (or, for
    // the GET relayed for a HEAD, the body it sent).
    let len = if reply.is_head() {
        resp.head.content_length.unwrap_or(body.len())
    } else {
        body.len()
    };
    reply.status_line(resp.status, resp.head.reason.get(raw));
    for (name, value) in resp.head.headers(raw) {
        if !is_hop_by_hop(name) {
            reply.header(name.as_bytes(), value);
        }
    }
    reply.content_length(len);
    reply.end_head();
    reply.body(body);
    resp.status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::respond::Persist;

    #[test]
    fn relay_strips_hop_by_hop_and_reframes() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nKeep-Alive: x\r\nServer: EC2ws\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        let resp = UpstreamResponse::framed(raw, false).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            relay(&resp, &mut Reply::new(&mut out, Persist::KeepAlive, "GET")),
            200
        );
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: EC2ws\r\nContent-Length: 5\r\n\r\nhello");
    }

    #[test]
    fn an_unparsable_head_is_a_protocol_error_so_the_caller_answers_502() {
        assert!(matches!(
            UpstreamResponse::framed(b"garbage\r\n\r\n".to_vec(), false),
            Err(UpstreamError::Protocol)
        ));
    }

    #[test]
    fn a_head_answer_relays_the_declared_length_without_a_body() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-A: b\r\n\r\n".to_vec();
        let resp = UpstreamResponse::framed(raw, true).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            relay(&resp, &mut Reply::new(&mut out, Persist::Close, "HEAD")),
            200
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 7\r\nConnection: close\r\n\r\n"
        );
    }
}
