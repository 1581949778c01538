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

/// Appends a complete response. `head_only` answers HEAD (headers, no body).
pub fn write(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &str,
    body: &[u8],
    persist: Persist,
    head_only: bool,
) {
    write_head(out, status, content_type, body.len(), persist, &[]);
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// Appends the status line and headers, ending with the blank line. Plain byte copies: no
/// `fmt` machinery on the hot path.
pub fn write_head(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &str,
    len: usize,
    persist: Persist,
    extra: &[(&[u8], &[u8])],
) {
    out.reserve(128 + content_type.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, usize::from(status.0));
    out.push(b' ');
    out.extend_from_slice(status.1.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    push_decimal(out, len);
    out.extend_from_slice(b"\r\nServer: EC2ws\r\n");
    for (k, v) in extra {
        out.extend_from_slice(k);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    end_head(out, persist);
}

/// Ends a response head, iamlet's own or a relayed one: the `Connection` header the client's
/// persistence needs (none for HTTP/1.1 keep-alive, its default), then the blank line.
pub fn end_head(out: &mut Vec<u8>, persist: Persist) {
    match persist {
        Persist::KeepAlive => {}
        Persist::KeepAlive10 => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        Persist::Close => out.extend_from_slice(b"Connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, n: usize) {
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
        write(&mut out, OK, TEXT, b"app", Persist::KeepAlive, false);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nServer: EC2ws\r\n\r\napp");
        out.clear();
        write(&mut out, NOT_FOUND, HTML, b"x", Persist::Close, true);
        assert_eq!(out, b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 1\r\nServer: EC2ws\r\nConnection: close\r\n\r\n");
        out.clear();
        write_head(
            &mut out,
            Status(431, "Request Header Fields Too Large"),
            JSON,
            1234567,
            Persist::KeepAlive10,
            &[(b"X-A", b"b")],
        );
        assert_eq!(out, b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\nContent-Length: 1234567\r\nServer: EC2ws\r\nX-A: b\r\nConnection: keep-alive\r\n\r\n");
        out.clear();
        push_decimal(&mut out, 0);
        assert_eq!(out, b"0");
        for n in [0, 7, 10, 21_600, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }
}
