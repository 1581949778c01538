//! Hostile and malformed input: each case on its own connection while a keep-alive neighbour
//! keeps getting correct answers between cases. Every case gets its exact 4xx or a clean close
//! (EOF, no bytes), and iamlet stays up.

use iamlet_e2e::rig::data as dataplane;

use dataplane::{POD, Rig, UNAUTHORIZED_CLOSE, ip, metric};
use iamlet_e2e::{Conn, FakeImds, drivers};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The header read timeout iamlet runs with here (slow-drip cases rely on it).
const HEADER_TIMEOUT: Duration = Duration::from_millis(300);
const LIST: &[u8] = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n";

#[derive(Debug, Clone)]
enum Want {
    /// Refused while reading the request (framing, limits, syntax): exactly this status with
    /// its reason phrase as the body, `Connection: close`, then EOF.
    Reject(u16),
    /// An answer to a parsed request: this status and exactly this body.
    Answer(u16, &'static str),
    /// Exactly these bytes, then EOF.
    Exact(&'static [u8]),
    /// No answer at all: the connection is closed (EOF, nothing sent) within the header
    /// timeout plus slack.
    Closed,
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        other => panic!("no reject with {other}"),
    }
}

fn reject_bytes(status: u16) -> Vec<u8> {
    let r = reason(status);
    format!(
        "HTTP/1.1 {status} {r}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nServer: EC2ws\r\nConnection: close\r\n\r\n{r}",
        r.len()
    )
    .into_bytes()
}

fn req(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Deterministic pseudo-random bytes (xorshift), never starting with a token character.
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = vec![0u8];
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.push(seed as u8);
    }
    out
}

fn cases() -> Vec<(&'static str, Vec<u8>, Want)> {
    use Want::*;
    let invalid_path = "Bad Request: invalid path\n";
    let bad_ttl = "Bad Request: X-aws-ec2-metadata-token-ttl-seconds must be 1..21600\n";
    let many_headers: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let fat_headers: String = (0..20)
        .map(|i| format!("X-F{i}: {}\r\n", "f".repeat(500)))
        .collect();
    vec![
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x11\r\n\r\n".to_vec(),
            Reject(400),
        ),
        ("random binary", noise(600, 0x9e37_79b9_7f4a_7c15), Reject(400)),
        ("NUL bytes", b"\0\0\0\0\0\0\r\n\r\n".to_vec(), Reject(400)),
        ("method only", req("GET\r\n\r\n"), Reject(400)),
        ("HTTP/0.9 request line", req("GET /\r\n\r\n"), Reject(400)),
        ("double space", req("GET  / HTTP/1.1\r\n\r\n"), Reject(400)),
        ("leading space", req(" GET / HTTP/1.1\r\n\r\n"), Reject(400)),
        ("HTTP/2.0 version", req("GET / HTTP/2.0\r\n\r\n"), Reject(400)),
        ("HTTP/1.2 version", req("GET / HTTP/1.2\r\n\r\n"), Reject(400)),
        ("lower-case version", req("GET / http/1.1\r\n\r\n"), Reject(400)),
        (
            "HTTP/2 preface",
            req("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Reject(400),
        ),
        ("bad method character", req("G@T / HTTP/1.1\r\n\r\n"), Reject(400)),
        (
            "header without colon",
            req("GET / HTTP/1.1\r\nHost\r\n\r\n"),
            Reject(400),
        ),
        (
            "space before colon",
            req("GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
            Reject(400),
        ),
        ("empty header name", req("GET / HTTP/1.1\r\n: x\r\n\r\n"), Reject(400)),
        (
            "obsolete line folding",
            req("GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n"),
            Reject(400),
        ),
        (
            "bare CR in a header",
            req("GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n"),
            Reject(400),
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n".to_vec(),
            Reject(400),
        ),
        (
            "DEL in a header value",
            b"GET / HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n".to_vec(),
            Reject(400),
        ),
        (
            "NUL in the path",
            b"GET /lat\0est/meta-data/ HTTP/1.1\r\n\r\n".to_vec(),
            Reject(400),
        ),
        (
            "invalid UTF-8 in the path",
            b"GET /latest/meta-data/\xff\xfe HTTP/1.1\r\n\r\n".to_vec(),
            Reject(400),
        ),
        (
            "invalid UTF-8 in a header name",
            b"GET / HTTP/1.1\r\nX-\xff: a\r\n\r\n".to_vec(),
            Reject(400),
        ),
        (
            "invalid UTF-8 in the token header",
            b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nX-aws-ec2-metadata-token: \xff\xfe\r\nConnection: close\r\n\r\n".to_vec(),
            Exact(UNAUTHORIZED_CLOSE),
        ),
        (
            "invalid UTF-8 in the TTL header",
            b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: \xff1\r\n\r\n".to_vec(),
            Answer(400, bad_ttl),
        ),
        (
            "garbage token",
            req("GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nX-aws-ec2-metadata-token: AAAA\r\nConnection: close\r\n\r\n"),
            Exact(UNAUTHORIZED_CLOSE),
        ),
        (
            "token PUT without TTL",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Answer(400, bad_ttl),
        ),
        (
            "token PUT with TTL 0",
            req("PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 0\r\n\r\n"),
            Answer(400, bad_ttl),
        ),
        (
            "token PUT with TTL 21601",
            req("PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21601\r\n\r\n"),
            Answer(400, bad_ttl),
        ),
        (
            "GET on the token path",
            req("GET /latest/api/token HTTP/1.1\r\n\r\n"),
            Answer(405, "Method Not Allowed\n"),
        ),
        (
            "TRACE",
            req("TRACE /latest/meta-data/ HTTP/1.1\r\n\r\n"),
            Answer(405, "Method Not Allowed\n"),
        ),
        (
            "DELETE",
            req("DELETE /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n\r\n"),
            Answer(405, "Method Not Allowed\n"),
        ),
        (
            "huge header (9 KiB)",
            format!("GET / HTTP/1.1\r\nX-A: {}\r\n\r\n", "a".repeat(9000)).into_bytes(),
            Reject(431),
        ),
        (
            "huge header (60 KiB)",
            format!("GET / HTTP/1.1\r\nX-A: {}\r\n\r\n", "a".repeat(60_000)).into_bytes(),
            Reject(431),
        ),
        (
            "request line too long",
            format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(9000)).into_bytes(),
            Reject(414),
        ),
        (
            "endless request line",
            format!("GET /{}", "p".repeat(32 * 1024)).into_bytes(),
            Reject(414),
        ),
        (
            "too many headers",
            format!("GET / HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            Reject(431),
        ),
        (
            "headers over 8 KiB in total",
            format!("GET / HTTP/1.1\r\n{fat_headers}\r\n").into_bytes(),
            Reject(431),
        ),
        (
            "two different Content-Lengths",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            Reject(400),
        ),
        (
            "two equal Content-Lengths",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"),
            Reject(400),
        ),
        (
            "Content-Length list",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\na"),
            Reject(400),
        ),
        (
            "negative Content-Length",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Reject(400),
        ),
        (
            "Content-Length with a sign",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: +1\r\n\r\na"),
            Reject(400),
        ),
        (
            "hex Content-Length",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 0x1\r\n\r\na"),
            Reject(400),
        ),
        (
            "empty Content-Length",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: \r\n\r\n"),
            Reject(400),
        ),
        (
            "Content-Length of 20 digits",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Reject(400),
        ),
        (
            "Content-Length of 4 GiB",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 4294967296\r\n\r\n"),
            Reject(413),
        ),
        (
            "chunked body",
            req("PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"),
            Reject(400),
        ),
        (
            "Content-Length and Transfer-Encoding",
            req("PUT /latest/api/token HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Reject(400),
        ),
        (
            "Transfer-Encoding identity on GET",
            req("GET / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"),
            Reject(400),
        ),
        (
            "Transfer-Encoding in upper case with a tab",
            req("PUT /latest/api/token HTTP/1.1\r\nTRANSFER-ENCODING:\tCHUNKED\r\n\r\n0\r\n\r\n"),
            Reject(400),
        ),
        (
            "body on a GET",
            req("GET /latest/meta-data/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Reject(400),
        ),
        (
            "PUT body over 1 KiB",
            format!(
                "PUT /latest/api/token HTTP/1.1\r\nContent-Length: 1025\r\n\r\n{}",
                "b".repeat(1025)
            )
            .into_bytes(),
            Reject(413),
        ),
        (
            "CONNECT",
            req("CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n"),
            Answer(400, invalid_path),
        ),
        ("OPTIONS *", req("OPTIONS * HTTP/1.1\r\n\r\n"), Answer(400, invalid_path)),
        (
            "ftp absolute-form",
            req("GET ftp://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n\r\n"),
            Answer(400, invalid_path),
        ),
        (
            "bad percent escape",
            req("GET /latest/meta-data/%zz HTTP/1.1\r\n\r\n"),
            Answer(400, invalid_path),
        ),
        (
            "truncated percent escape",
            req("GET /latest/meta-data/%4 HTTP/1.1\r\n\r\n"),
            Answer(400, invalid_path),
        ),
        (
            "encoded NUL",
            req("GET /latest/meta-data/%00 HTTP/1.1\r\n\r\n"),
            Answer(400, invalid_path),
        ),
        (
            "encoded slash",
            req("GET /latest/meta-data/iam%2Fsecurity-credentials HTTP/1.1\r\n\r\n"),
            Answer(400, invalid_path),
        ),
        (
            "above the root",
            req("GET /../../etc/passwd HTTP/1.1\r\n\r\n"),
            Answer(400, invalid_path),
        ),
        (
            "non-ASCII path",
            "GET /latest/meta-data/\u{fc}ber HTTP/1.1\r\n\r\n".as_bytes().to_vec(),
            Answer(404, dataplane::not_found_body()),
        ),
        (
            "partial head, then silence",
            req("GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n"),
            Closed,
        ),
        ("half a request line, then silence", req("GET /lat"), Closed),
        (
            "incomplete body, then silence",
            req("PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 10\r\n\r\nabc"),
            Closed,
        ),
        ("blank lines only", req("\r\n\r\n\r\n"), Closed),
    ]
}

/// Reads everything until EOF (bounded by the client's read timeout); an error after some
/// bytes counts as their end.
fn read_to_eof(c: &mut Conn) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    loop {
        match c.read_response() {
            Ok(r) => all.extend_from_slice(&r.raw),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(all),
            // iamlet closes right after a reject without reading the rest of a large request;
            // the kernel then resets the connection, after the complete answer.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !all.is_empty() => {
                return Ok(all);
            }
            Err(e) if !all.is_empty() => {
                return Err(io::Error::new(e.kind(), format!("{e} after {all:?}")));
            }
            Err(e) => return Err(e),
        }
    }
}

fn run_case(addr: SocketAddr, name: &str, raw: &[u8], want: &Want) -> Result<(), String> {
    let mut c = Conn::try_open(ip(POD), addr).map_err(|e| format!("connect: {e}"))?;
    let started = Instant::now();
    // A write may fail once iamlet has refused the request and closed; the answer is read
    // regardless.
    let _ = c.write_all(raw);
    let fmt = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match want {
        Want::Reject(status) => {
            let got = read_to_eof(&mut c).map_err(|e| format!("read: {e}"))?;
            let want = reject_bytes(*status);
            if got != want {
                return Err(format!("got {:?}\nwant {:?}", fmt(&got), fmt(&want)));
            }
        }
        Want::Exact(bytes) => {
            let got = read_to_eof(&mut c).map_err(|e| format!("read: {e}"))?;
            if got != *bytes {
                return Err(format!("got {:?}\nwant {:?}", fmt(&got), fmt(bytes)));
            }
        }
        Want::Answer(status, body) => {
            let r = c.read_response().map_err(|e| format!("read: {e}"))?;
            if (r.status, r.body_str().as_str()) != (*status, *body) {
                return Err(format!("got {:?}", fmt(&r.raw)));
            }
        }
        Want::Closed => {
            let got = read_to_eof(&mut c).map_err(|e| format!("read: {e}"))?;
            let took = started.elapsed();
            if !got.is_empty() {
                return Err(format!("expected a silent close, got {:?}", fmt(&got)));
            }
            if took < HEADER_TIMEOUT - Duration::from_millis(50) || took > Duration::from_secs(3) {
                return Err(format!(
                    "closed after {took:?}, expected about {HEADER_TIMEOUT:?}"
                ));
            }
        }
    }
    let _ = name;
    Ok(())
}

/// Drips a valid request one byte per 50 ms: iamlet must close the connection once the head
/// has taken longer than the header timeout, although bytes keep arriving.
fn slow_drip(addr: SocketAddr) -> Result<(), String> {
    let raw = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: slowloris\r\n\r\n";
    let mut c = Conn::try_open(ip(POD), addr).map_err(|e| e.to_string())?;
    let started = Instant::now();
    for (i, b) in raw.iter().enumerate() {
        if c.write_all(&[*b]).is_err() || c.is_closed_by_peer(Duration::from_millis(50)) {
            let took = started.elapsed();
            if took < HEADER_TIMEOUT - Duration::from_millis(50) || took > Duration::from_secs(2) {
                return Err(format!("closed after {took:?} ({i} bytes)"));
            }
            return match read_to_eof(&mut c) {
                Ok(b) if b.is_empty() => Ok(()),
                Ok(b) => Err(format!("answered: {:?}", String::from_utf8_lossy(&b))),
                // The close raced our last byte: a reset is a close too.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
                Err(e) => Err(e.to_string()),
            };
        }
    }
    Err(format!(
        "the whole request was dripped over {:?} without a close",
        started.elapsed()
    ))
}

#[test]
fn malformed_input_gets_exact_4xx_or_a_clean_close_and_neighbours_keep_working() {
    for driver in drivers() {
        let header_timeout = format!("--header-read-timeout={}ms", HEADER_TIMEOUT.as_millis());
        let mut r = Rig::start(driver, FakeImds::start(), &[&header_timeout]);
        let addr = r.addr();
        let mut neighbour = Conn::open(ip(POD), addr);
        let cases = cases();
        assert!(cases.len() >= 40, "{} cases", cases.len());
        println!(
            "driver {driver}: {} malformed cases + slow drip",
            cases.len()
        );
        let mut failures = Vec::new();
        let mut check_neighbour =
            |after: &str, failures: &mut Vec<String>| match neighbour.try_send(LIST) {
                Ok(ok) if (ok.status, ok.body_str().as_str()) == (200, "app-role") => {}
                other => failures.push(format!("neighbour after {after}: {other:?}")),
            };
        for (name, raw, want) in &cases {
            if let Err(e) = run_case(addr, name, raw, want) {
                failures.push(format!("{name}: {e}"));
            }
            check_neighbour(name, &mut failures);
        }
        if let Err(e) = slow_drip(addr) {
            failures.push(format!("slow drip: {e}"));
        }
        check_neighbour("slow drip", &mut failures);

        // Pipelined: a good request, then garbage on the same connection.
        let mut c = Conn::open(ip(POD), addr);
        c.write_all(&[LIST, b"\x00garbage\r\n\r\n"].concat())
            .unwrap();
        let first = c.read_response().unwrap();
        assert_eq!(
            (first.status, first.body_str().as_str()),
            (200, "app-role"),
            "driver {driver}"
        );
        assert_eq!(
            read_to_eof(&mut c).unwrap(),
            reject_bytes(400),
            "driver {driver}: garbage after a good pipelined request"
        );
        check_neighbour("pipelined garbage", &mut failures);

        assert!(
            failures.is_empty(),
            "driver {driver}: {} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
        let health = dataplane::send_get(addr, "/healthz");
        assert_eq!(
            (health.status, health.body_str().as_str()),
            (200, "ok\n"),
            "driver {driver}"
        );
        assert!(
            r.iamlet.try_exit_status().is_none(),
            "driver {driver}: iamlet exited:\n{}",
            r.iamlet.log()
        );
        for kind in [
            "malformed",
            "head_too_large",
            "too_many_headers",
            "transfer_encoding",
        ] {
            let sample = format!("iamlet_errors_total{{class=\"downstream\",kind=\"{kind}\"}}");
            assert!(
                metric(addr, &sample).is_some_and(|v| v >= 1.0),
                "driver {driver}: {sample} missing or 0"
            );
        }
    }
}
