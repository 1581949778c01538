//! A fault-injecting pass-through in front of moto's STS: counts AssumeRole calls (role,
//! external ID, session name, tags) and can delay, fail with 500, throttle, reset the
//! connection, blackhole, or shorten the credentials' Expiration.

use crate::wire::{read_body, read_head};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the proxy does to AssumeRole calls (other actions always pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Pass after a delay.
    Delay(Duration),
    /// 500 InternalFailure.
    Error500,
    /// 400 Throttling.
    Throttle,
    /// Close the connection without answering.
    Reset,
    /// Hold the connection without answering (until the client gives up, at most 30 s).
    Blackhole,
}

/// One AssumeRole call as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    pub tags: Vec<(String, String)>,
    /// What the proxy did.
    pub fault: Fault,
}

#[derive(Debug)]
struct State {
    fault: Fault,
    expires_in: Option<Duration>,
    calls: Vec<Call>,
    /// AssumeRole calls being answered now, and the most at once.
    in_flight: usize,
    max_in_flight: usize,
}

/// Counts one AssumeRole call as in flight until dropped (just before the answer is written,
/// or when the call is given up).
struct InFlight<'a>(&'a Mutex<State>);

impl<'a> InFlight<'a> {
    fn enter(state: &'a Mutex<State>) -> Self {
        let mut st = state.lock().unwrap();
        st.in_flight += 1;
        st.max_in_flight = st.max_in_flight.max(st.in_flight);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().in_flight -= 1;
    }
}

/// The running proxy; stops on drop.
pub struct StsProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StsProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream` (moto).
    pub fn start(upstream: SocketAddr) -> StsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind sts proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            fault: Fault::Pass,
            expires_in: None,
            calls: Vec::new(),
            in_flight: 0,
            max_in_flight: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (state, stop) = (state.clone(), stop.clone());
                    std::thread::spawn(move || serve(conn, upstream, &state, &stop));
                }
            })
        };
        StsProxy {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_fault(&self, f: Fault) {
        self.state.lock().unwrap().fault = f;
    }

    /// Rewrites AssumeRole's Expiration to now + `d` (short-lived credentials).
    pub fn set_expires_in(&self, d: Option<Duration>) {
        self.state.lock().unwrap().expires_in = d;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Calls that reached moto and succeeded.
    pub fn passed(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c.fault, Fault::Pass | Fault::Delay(_)))
            .collect()
    }

    /// The most AssumeRole calls the proxy was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.lock().unwrap().max_in_flight
    }

    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap();
        st.calls.clear();
        st.max_in_flight = st.in_flight;
    }
}

impl Drop for StsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, upstream: SocketAddr, state: &Mutex<State>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    // One request per connection; the answer says Connection: close.
    let Ok(Some(head)) = read_head(&mut reader) else {
        return;
    };
    let len = head.content_length().unwrap_or(0);
    let Ok(body) = read_body(&mut reader, len) else {
        return;
    };
    let form = parse_form(&String::from_utf8_lossy(&body));
    let get = |k: &str| form.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let is_assume = get("Action").as_deref() == Some("AssumeRole");
    let (fault, expires_in) = {
        let mut st = state.lock().unwrap();
        let fault = if is_assume { st.fault } else { Fault::Pass };
        if is_assume {
            let tags = (1..=50)
                .map_while(|i| {
                    Some((
                        get(&format!("Tags.member.{i}.Key"))?,
                        get(&format!("Tags.member.{i}.Value"))?,
                    ))
                })
                .collect();
            st.calls.push(Call {
                at: Instant::now(),
                role_arn: get("RoleArn").unwrap_or_default(),
                external_id: get("ExternalId"),
                session_name: get("RoleSessionName").unwrap_or_default(),
                tags,
                fault,
            });
        }
        (fault, if is_assume { st.expires_in } else { None })
    };
    let in_flight = is_assume.then(|| InFlight::enter(state));
    match fault {
        Fault::Pass => {}
        Fault::Delay(d) => std::thread::sleep(d),
        Fault::Error500 => {
            return answer(
                &mut conn,
                500,
                "Receiver",
                "InternalFailure",
                "injected failure",
            );
        }
        Fault::Throttle => return answer(&mut conn, 400, "Sender", "Throttling", "Rate exceeded"),
        Fault::Reset => {
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        Fault::Blackhole => {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut buf = [0u8; 64];
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                match conn.read(&mut buf) {
                    Ok(0) => return,
                    _ => continue,
                }
            }
            return;
        }
    }
    // Forward to moto.
    let Ok(mut up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
        return answer(
            &mut conn,
            502,
            "Receiver",
            "InternalFailure",
            "moto unreachable",
        );
    };
    let _ = up.set_read_timeout(Some(Duration::from_secs(30)));
    let mut req = Vec::new();
    let mut lines = head.start.clone();
    lines.push_str("\r\n");
    req.extend_from_slice(lines.as_bytes());
    for (k, v) in &head.headers {
        if k.eq_ignore_ascii_case("connection") {
            continue;
        }
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    req.extend_from_slice(&body);
    if up.write_all(&req).is_err() {
        return;
    }
    let mut resp = Vec::new();
    let _ = up.read_to_end(&mut resp);
    let resp = match expires_in {
        Some(d) => rewrite_expiration(&resp, d),
        None => resp,
    };
    // Answered: out of flight before the bytes go out, since the caller may start its next
    // call the moment it has them, before this thread runs again.
    drop(in_flight);
    let _ = conn.write_all(&resp);
}

fn answer(conn: &mut TcpStream, status: u16, kind: &str, code: &str, msg: &str) {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{msg}</Message></Error><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    );
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Replaces `<Expiration>…</Expiration>` and fixes Content-Length.
fn rewrite_expiration(resp: &[u8], d: Duration) -> Vec<u8> {
    let text = String::from_utf8_lossy(resp).into_owned();
    let Some(split) = text.find("\r\n\r\n") else {
        return resp.to_vec();
    };
    let (head, body) = (&text[..split], &text[split + 4..]);
    let (Some(a), Some(b)) = (body.find("<Expiration>"), body.find("</Expiration>")) else {
        return resp.to_vec();
    };
    let when = SystemTime::now() + d;
    let secs = when.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let new_body = format!(
        "{}<Expiration>{}</Expiration>{}",
        &body[..a],
        iso8601(secs),
        &body[b + "</Expiration>".len()..]
    );
    let head: String = head
        .lines()
        .map(|l| {
            if l.to_ascii_lowercase().starts_with("content-length:") {
                format!("Content-Length: {}", new_body.len())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n");
    format!("{head}\r\n\r\n{new_body}").into_bytes()
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_bodies_decode() {
        let f = parse_form(
            "Action=AssumeRole&RoleArn=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fa&RoleSessionName=n+1&X=%",
        );
        assert_eq!(f[1], ("RoleArn".into(), "arn:aws:iam::1:role/a".into()));
        assert_eq!(f[2], ("RoleSessionName".into(), "n 1".into()));
        assert_eq!(f[3], ("X".into(), "%".into()));
    }

    #[test]
    fn iso8601_formats_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_709_251_199), "2024-02-29T23:59:59Z");
    }
}
