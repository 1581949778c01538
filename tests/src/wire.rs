//! A deliberately tiny HTTP/1.1 reader shared by the fake IMDS (requests) and the raw client
//! (responses): the head up to the blank line, `Name: value` headers, Content-Length bodies.
//! It is strict enough for tests and never grows past a fixed bound.

use std::io::{self, BufRead, Read};

/// Largest head (start line + headers) accepted, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;

/// A parsed head: the start line and the headers in order, names as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub start: String,
    pub headers: Vec<(String, String)>,
    /// The head's bytes exactly as read, blank line included.
    pub raw: Vec<u8>,
}

impl Head {
    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The Content-Length, if present and valid.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.trim().parse().ok()
    }
}

/// The first header called `name` in `headers` (ASCII case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads one head. `Ok(None)` on EOF before any byte (a peer closing an idle keep-alive
/// connection); `InvalidData` on a malformed or oversized head; `UnexpectedEof` mid-head.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        let n = r
            .by_ref()
            .take((MAX_HEAD + 1 - raw.len()) as u64)
            .read_until(b'\n', &mut raw)?;
        if n == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof inside head",
            ));
        }
        if raw.len() > MAX_HEAD {
            return Err(invalid("head too large"));
        }
        let line = &raw[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                raw.clear(); // tolerate a stray CRLF before the start line (RFC 9112 §2.2)
                continue;
            }
            break;
        }
    }
    let text = std::str::from_utf8(&raw).map_err(|_| invalid("head is not UTF-8"))?;
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    let start = lines.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| invalid("header without ':'"))?;
        if k.is_empty() || k.contains([' ', '\t']) {
            return Err(invalid("bad header name"));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok(Some(Head {
        start,
        headers,
        raw,
    }))
}

/// Reads exactly `len` body bytes.
pub fn read_body(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_two_pipelined_heads_and_a_body() {
        let mut r = Cursor::new(
            b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\nX-A:  b \r\n\r\nhiGET /b HTTP/1.1\r\n\r\n"
                .to_vec(),
        );
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(h.start, "PUT /a HTTP/1.1");
        assert_eq!(h.header("x-a"), Some("b"));
        assert_eq!(
            read_body(&mut r, h.content_length().unwrap()).unwrap(),
            b"hi"
        );
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!((h.start.as_str(), h.headers.len()), ("GET /b HTTP/1.1", 0));
        assert!(read_head(&mut r).unwrap().is_none());
    }

    #[test]
    fn rejects_header_without_colon_and_truncated_head() {
        let mut r = Cursor::new(b"GET / HTTP/1.1\r\nbroken\r\n\r\n".to_vec());
        assert_eq!(
            read_head(&mut r).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut r = Cursor::new(b"GET / HTTP/1.1\r\nA: b\r\n".to_vec());
        assert_eq!(
            read_head(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn rejects_oversized_head() {
        let mut big = b"GET / HTTP/1.1\r\nA: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        let err = read_head(&mut Cursor::new(big)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
