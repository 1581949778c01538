//! The data-plane rig (leak, malformed, imdsv2, limits, sdk, sdk_matrix): three pods on
//! 127.0.0.x in local mode, moto + fake IMDS + iamlet, token and `/metrics` helpers, a scripted
//! upstream.

use crate::imds::{TOKEN_HEADER, TTL_HEADER};
use crate::{FakeImds, Iamlet, IamletBuilder, Moto, Response, request_from};
use std::net::{Ipv4Addr, SocketAddr};

pub const BASE: &str = "arn:aws:iam::123456789012:role/";
/// The pod with `app-role`.
pub const POD: u8 = 11;
/// Another pod, with `other-role`.
pub const OTHER_POD: u8 = 12;
/// A pod on 127.0.0.1 (where SDK clients connect from), with `sdk-role`.
pub const LOCAL_POD: u8 = 1;
/// No pod has this IP.
pub const UNKNOWN: u8 = 99;

pub fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

pub fn pods() -> String {
    r#"apiVersion: v1
kind: List
items:
- kind: Pod
  metadata: {name: app, namespace: shop, uid: u-app, annotations: {iam.amazonaws.com/role: app-role}}
  status: {phase: Running, podIP: 127.0.0.11}
- kind: Pod
  metadata: {name: other, namespace: shop, uid: u-other, annotations: {iam.amazonaws.com/role: other-role}}
  status: {phase: Running, podIP: 127.0.0.12}
- kind: Pod
  metadata: {name: sdk, namespace: shop, uid: u-sdk, annotations: {iam.amazonaws.com/role: sdk-role}}
  status: {phase: Running, podIP: 127.0.0.1}
"#
    .to_string()
}

/// iamlet in local mode with these pods, moto as STS and `imds` as the upstream (never the
/// real metadata address), on `driver`, with `extra` flags.
pub fn builder(driver: &str, moto: &Moto, imds: &FakeImds, extra: &[&str]) -> IamletBuilder {
    builder_at(driver, moto, imds.addr(), extra)
}

/// As [`builder`], with any loopback address as the upstream metadata service.
pub fn builder_at(
    driver: &str,
    moto: &Moto,
    upstream: SocketAddr,
    extra: &[&str],
) -> IamletBuilder {
    assert!(upstream.ip().is_loopback(), "the upstream must be local");
    let mut b = Iamlet::builder()
        .pods_yaml(&pods())
        .sts(moto)
        .arg(format!("--metadata-addr={upstream}"))
        .driver(driver)
        .arg(format!("--base-role-arn={BASE}"));
    if !extra
        .iter()
        .any(|a| a.starts_with("--backoff-max-elapsed-time"))
    {
        // Also bounds a request's wait for the first AssumeRole of its role.
        b = b.arg("--backoff-max-elapsed-time=2s");
    }
    for a in extra {
        b = b.arg(*a);
    }
    b
}

/// moto, a fake IMDS and iamlet.
pub struct Rig {
    pub moto: Moto,
    pub imds: FakeImds,
    pub iamlet: Iamlet,
}

impl Rig {
    pub fn start(driver: &str, imds: FakeImds, extra: &[&str]) -> Rig {
        let moto = Moto::start();
        let iamlet = builder(driver, &moto, &imds, extra).start();
        Rig { moto, imds, iamlet }
    }

    pub fn addr(&self) -> SocketAddr {
        self.iamlet.addr()
    }

    pub fn send(&self, src: u8, raw: &[u8]) -> Response {
        request_from(ip(src), self.addr(), raw)
    }
}

/// `PUT /latest/api/token` with the given TTL header value (None: no TTL header) and extra
/// header lines (each ending in CRLF).
pub fn token_put(ttl: Option<&str>, extra: &str) -> Vec<u8> {
    let ttl = ttl.map_or(String::new(), |t| format!("{TTL_HEADER}: {t}\r\n"));
    format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n{ttl}{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// `GET path` with an optional token and extra header lines.
pub fn get_req(path: &str, token: Option<&str>, extra: &str) -> Vec<u8> {
    let tok = token.map_or(String::new(), |t| format!("{TOKEN_HEADER}: {t}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{tok}{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

/// Mints a token for `src` with `ttl` seconds; asserts the exact answer.
pub fn mint(addr: SocketAddr, src: u8, ttl: u32) -> String {
    let resp = request_from(ip(src), addr, &token_put(Some(&ttl.to_string()), ""));
    let token = resp.body_str();
    let want = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nServer: EC2ws\r\n\
         X-Aws-Ec2-Metadata-Token-Ttl-Seconds: {ttl}\r\nConnection: close\r\n\r\n{token}",
        token.len()
    );
    assert_eq!(
        String::from_utf8_lossy(&resp.raw),
        want,
        "token PUT from 127.0.0.{src}"
    );
    assert_eq!(token.len(), 56, "token {token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    token
}

/// The exact 401 iamlet gives for a missing, bad, expired or foreign token.
pub const UNAUTHORIZED_CLOSE: &[u8] = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/html\r\nContent-Length: 0\r\nServer: EC2ws\r\nConnection: close\r\n\r\n";

/// IMDS's 404 page as iamlet and the fake send it.
pub fn not_found_body() -> &'static str {
    "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n <head>\n  <title>404 - Not Found</title>\n </head>\n <body>\n  <h1>404 - Not Found</h1>\n </body>\n</html>\n"
}

/// `GET path` from 127.0.0.1 with `Connection: close`.
pub fn send_get(addr: SocketAddr, path: &str) -> Response {
    request_from(Ipv4Addr::LOCALHOST, addr, &get_req(path, None, ""))
}

/// The value of one sample line of `/metrics` (`name{labels}` exactly as printed), or None.
pub fn metric(addr: SocketAddr, sample: &str) -> Option<f64> {
    let resp = request_from(
        Ipv4Addr::LOCALHOST,
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200, "/metrics: {}", resp.body_str());
    resp.body_str().lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}

/// As [`metric`], for a sample that must exist: a missing series (a renamed metric, a label
/// that changed) fails the test instead of reading as 0.
pub fn sample(addr: SocketAddr, sample: &str) -> f64 {
    metric(addr, sample).unwrap_or_else(|| panic!("/metrics has no sample `{sample}`"))
}

/// One request as [`Scripted`] saw it: method, target, headers.
pub type Seen = (String, String, Vec<(String, String)>);

/// A tiny upstream for pass-through edge cases: the token PUT gets `put_status` (empty body,
/// or a token when 200), every GET gets `200 upstream-ok`, held until [`Scripted::release`]
/// when built with `hold_gets`. Every request is reported on a channel.
pub struct Scripted {
    pub addr: SocketAddr,
    seen: std::sync::mpsc::Receiver<Seen>,
    gate: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Scripted {
    pub fn start(put_status: u16, hold_gets: bool) -> Scripted {
        Scripted::start_with(put_status, hold_gets, false)
    }

    /// As [`Scripted::start`]; with `forget_first_token`, the first GET carrying a token gets
    /// 401 (as after an upstream restart), and every PUT mints a new token `scripted-token-N`.
    pub fn start_with(put_status: u16, hold_gets: bool, forget_first_token: bool) -> Scripted {
        use std::io::{BufReader, Write};
        use std::sync::{Arc, Condvar, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind scripted");
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = std::sync::mpsc::channel::<Seen>();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, st) = (gate.clone(), stop.clone());
        let forget = Arc::new(std::sync::atomic::AtomicBool::new(forget_first_token));
        let minted = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // Accepts until dropped; each connection thread ends at EOF or after 10 s idle.
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if st.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(s) = s else { return };
                let (tx, g) = (tx.clone(), g.clone());
                let (forget, minted) = (forget.clone(), minted.clone());
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                    let mut out = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    while let Ok(Some(head)) = crate::wire::read_head(&mut r) {
                        let mut parts = head.start.split(' ');
                        let method = parts.next().unwrap_or("").to_string();
                        let path = parts.next().unwrap_or("").to_string();
                        let _ = tx.send((method.clone(), path, head.headers.clone()));
                        let tokened = head.header("x-aws-ec2-metadata-token").is_some();
                        let reply = if method == "PUT" {
                            let n = minted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let body = if put_status == 200 {
                                format!("scripted-token-{n}")
                            } else {
                                String::new()
                            };
                            format!(
                                "HTTP/1.1 {put_status} X\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        } else if tokened && forget.swap(false, std::sync::atomic::Ordering::SeqCst)
                        {
                            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_string()
                        } else {
                            if hold_gets {
                                let (m, c) = &*g;
                                let open = m.lock().unwrap();
                                let _ = c
                                    .wait_timeout_while(
                                        open,
                                        std::time::Duration::from_secs(10),
                                        |open| !*open,
                                    )
                                    .unwrap();
                            }
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nupstream-ok"
                                .to_string()
                        };
                        if out.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            seen,
            gate,
            stop,
        }
    }

    /// The next request the upstream received, waiting at most `timeout`.
    pub fn next(&self, timeout: std::time::Duration) -> Option<Seen> {
        self.seen.recv_timeout(timeout).ok()
    }

    /// Lets held GETs be answered.
    pub fn release(&self) {
        let (m, c) = &*self.gate;
        *m.lock().unwrap() = true;
        c.notify_all();
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.release();
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Unblock accept(); the loop sees the flag and returns.
        let _ = std::net::TcpStream::connect_timeout(&self.addr, std::time::Duration::from_secs(1));
    }
}
