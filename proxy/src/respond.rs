//! Writing responses into the connection's reusable output buffer.

/// Status line pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16, pub &'static str);

pub const OK: Status = Status(200, "OK");
pub const BAD_REQUEST: Status = Status(400, "Bad Request");
pub const FORBIDDEN: Status = Status(403, "Forbidden");
pub const NOT_FOUND: Status = Status(404, "Not Found");
pub const METHOD_NOT_ALLOWED: Status = Status(405, "Method Not Allowed");
pub const URI_TOO_LONG: Status = Status(414, "URI Too Long");
pub const PAYLOAD_TOO_LARGE: Status = Status(413, "Payload Too Large");
pub const HEADERS_TOO_LARGE: Status = Status(431, "Request Header Fields Too Large");
pub const INTERNAL: Status = Status(500, "Internal Server Error");
pub const NOT_IMPLEMENTED: Status = Status(501, "Not Implemented");
pub const BAD_GATEWAY: Status = Status(502, "Bad Gateway");
pub const UNAVAILABLE: Status = Status(503, "Service Unavailable");
pub const GATEWAY_TIMEOUT: Status = Status(504, "Gateway Timeout");

pub const TEXT: &str = "text/plain";
pub const HTML: &str = "text/html";
pub const JSON: &str = "application/json";

/// IMDS's own 404 page.
pub const NOT_FOUND_BODY: &[u8] = b"<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n <head>\n  <title>404 - Not Found</title>\n </head>\n <body>\n  <h1>404 - Not Found</h1>\n </body>\n</html>\n";

/// How the connection continues after this response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// HTTP/1.1 default: no header needed.
    KeepAlive,
    /// HTTP/1.0 client that asked for keep-alive.
    KeepAlive10,
    Close,
}

/// An answer being written into the connection's output buffer, with what the request fixed
/// about its framing: whether the connection persists (the `Connection` header) and whether a
/// body follows. To a HEAD none does: the head gives the length a GET's body would have and
/// the body is left out, because a client reads whatever follows as the next answer. Every
/// answer (iamlet's own, the container door's, one relayed from IMDS) is written through
/// here, so HEAD is decided in one place.
pub struct Reply<'o> {
    out: &'o mut Vec<u8>,
    persist: Persist,
    head_only: bool,
}

impl<'o> Reply<'o> {
    /// The answer to a request made with `method`.
    pub fn new(out: &'o mut Vec<u8>, persist: Persist, method: &str) -> Self {
        Self {
            out,
            persist,
            head_only: method == "HEAD",
        }
    }

    /// The answer to a request that could not be parsed: its method is unknown, so the answer
    /// has its body, and the connection closes after it.
    pub fn to_unparsed(out: &'o mut Vec<u8>) -> Self {
        Self {
            out,
            persist: Persist::Close,
            head_only: false,
        }
    }

    /// Whether the request was a HEAD.
    pub fn is_head(&self) -> bool {
        self.head_only
    }

    /// A complete answer.
    pub fn full(&mut self, status: Status, content_type: &str, body: &[u8]) {
        self.parts(status, content_type, &[body]);
    }

    /// A complete answer whose body is `pieces`, copied in order (not joined first).
    pub fn parts(&mut self, status: Status, content_type: &str, pieces: &[&[u8]]) {
        let len = pieces.iter().map(|p| p.len()).sum();
        self.head(status, content_type, len, &[]);
        for p in pieces {
            self.body(p);
        }
    }

    /// iamlet's own head, ending with the blank line: the status line, `Content-Type`,
    /// `Content-Length: len`, `Server`, then `extra`. Plain byte copies: no `fmt` machinery
    /// on the hot path.
    pub fn head(
        &mut self,
        status: Status,
        content_type: &str,
        len: usize,
        extra: &[(&[u8], &[u8])],
    ) {
        self.out.reserve(128 + content_type.len());
        self.status_line(status.0, status.1.as_bytes());
        self.out.extend_from_slice(b"Content-Type: ");
        self.out.extend_from_slice(content_type.as_bytes());
        self.out.extend_from_slice(b"\r\nContent-Length: ");
        push_decimal(self.out, len);
        self.out.extend_from_slice(b"\r\nServer: EC2ws\r\n");
        for (k, v) in extra {
            self.header(k, v);
        }
        self.end_head();
    }

    /// Starts a head: iamlet's own, or a relayed one with the upstream's code and reason.
    pub fn status_line(&mut self, code: u16, reason: &[u8]) {
        self.out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(self.out, usize::from(code));
        self.out.push(b' ');
        self.out.extend_from_slice(reason);
        self.out.extend_from_slice(b"\r\n");
    }

    /// One header line.
    pub fn header(&mut self, name: &[u8], value: &[u8]) {
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value);
        self.out.extend_from_slice(b"\r\n");
    }

    /// The `Content-Length` line.
    pub fn content_length(&mut self, len: usize) {
        self.header(b"Content-Length", decimal(len as u64, &mut [0u8; 20]));
    }

    /// Ends the head: the `Connection` header the client's persistence needs (none for
    /// HTTP/1.1 keep-alive, its default), then the blank line.
    pub fn end_head(&mut self) {
        match self.persist {
            Persist::KeepAlive => {}
            Persist::KeepAlive10 => self.out.extend_from_slice(b"Connection: keep-alive\r\n"),
            Persist::Close => self.out.extend_from_slice(b"Connection: close\r\n"),
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// Body bytes, left out of the answer to a HEAD.
    pub fn body(&mut self, bytes: &[u8]) {
        if !self.head_only {
            self.out.extend_from_slice(bytes);
        }
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(decimal(n as u64, &mut [0u8; 20]));
}

/// `n` in decimal, written at the end of `digits`.
pub fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

/// A small IMDS-style JSON error body (`{"Code": …, "Message": …}`) from static strings.
pub fn error_json(code: &str, message: &str) -> Vec<u8> {
    format!("{{\n  \"Code\" : \"{code}\",\n  \"Message\" : \"{message}\"\n}}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_bytes_are_exact() {
        let mut out = Vec::new();
        Reply::new(&mut out, Persist::KeepAlive, "GET").full(OK, TEXT, b"app");
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nServer: EC2ws\r\n\r\napp");
        out.clear();
        Reply::new(&mut out, Persist::Close, "HEAD").full(NOT_FOUND, HTML, b"x");
        assert_eq!(out, b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 1\r\nServer: EC2ws\r\nConnection: close\r\n\r\n");
        out.clear();
        Reply::new(&mut out, Persist::KeepAlive10, "GET").head(
            Status(431, "Request Header Fields Too Large"),
            JSON,
            1234567,
            &[(b"X-A", b"b")],
        );
        assert_eq!(out, b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\nContent-Length: 1234567\r\nServer: EC2ws\r\nX-A: b\r\nConnection: keep-alive\r\n\r\n");
        out.clear();
        let mut r = Reply::new(&mut out, Persist::KeepAlive, "HEAD");
        r.parts(OK, TEXT, &[b"a", b"bc"]);
        assert!(r.is_head());
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nServer: EC2ws\r\n\r\n");
        out.clear();
        Reply::to_unparsed(&mut out).full(BAD_REQUEST, TEXT, b"no");
        assert_eq!(out, b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nServer: EC2ws\r\nConnection: close\r\n\r\nno");
        out.clear();
        push_decimal(&mut out, 0);
        assert_eq!(out, b"0");
        for n in [0, 7, 10, 21_600, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }
}
