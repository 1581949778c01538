//! `load`: C connections (one thread each), closed loop or a fixed total rate, keep-alive or a
//! new connection per request, from the sources in `--sources FILE` (`ip path expect` per
//! line; connection k of thread t uses source (t + k·C) mod len) or one `--src`/`--path`.
//!
//! `--imdsv2`: each iteration is the SDK flow on one connection — `PUT /latest/api/token`,
//! then the GET carrying the returned token. Both requests are counted and timed.
//!
//! Fixed rate (`--rate R`): each thread sends at R/C per second on a schedule and latency is
//! measured from the scheduled time (no coordinated omission).

use crate::args::{Args, loopback_ip};
use crate::hist::Hist;
use crate::http::{self, Conn};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Source {
    pub ip: Option<IpAddr>,
    pub path: String,
    pub expect: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct Config {
    pub target: SocketAddr,
    pub sources: Vec<Source>,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub imdsv2: bool,
    pub conns: usize,
    pub duration: Duration,
    pub max_requests: u64,
    pub rate: f64,
    pub keepalive: bool,
    pub expect_status: u16,
}

#[derive(Default)]
pub struct Outcome {
    pub hist: Hist,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub status: BTreeMap<u16, u64>,
    pub connects: u64,
    pub elapsed: Duration,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.hist.merge(&o.hist);
        self.ok += o.ok;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in o.status {
            *self.status.entry(k).or_default() += v;
        }
        self.connects += o.connects;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn json(&self, cfg: &Config) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let total = self.ok + self.error_count();
        let kinds: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        let status: Vec<String> = self
            .status
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        format!(
            "{{\"tool\": \"iamlet-loadtool\", \"requests\": {total}, \"ok\": {}, \"errors\": {}, \"error_kinds\": {{{}}}, \"status\": {{{}}}, \"duration_s\": {:.3}, \"rps\": {:.1}, \"connections\": {}, \"connects\": {}, \"keepalive\": {}, \"imdsv2\": {}, \"rate\": {}, {}}}",
            self.ok,
            self.error_count(),
            kinds.join(", "),
            status.join(", "),
            secs,
            total as f64 / secs,
            cfg.conns,
            self.connects,
            cfg.keepalive,
            cfg.imdsv2,
            cfg.rate,
            self.hist.json_fields()
        )
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

pub fn read_sources(path: &str) -> Result<Vec<Source>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let ip = loopback_ip(f.next().unwrap_or(""))?;
        let path = f.next().unwrap_or("/").to_string();
        let expect = f.next().map(|e| e.as_bytes().to_vec());
        out.push(Source {
            ip: Some(ip),
            path,
            expect,
        });
    }
    if out.is_empty() {
        return Err(format!("{path}: no sources"));
    }
    Ok(out)
}

pub fn config(a: &Args) -> Result<Config, String> {
    let sources = match a.opt("sources") {
        Some(f) => read_sources(f)?,
        None => vec![Source {
            ip: a.opt("src").map(loopback_ip).transpose()?,
            path: a.opt("path").unwrap_or("/").to_string(),
            expect: a.opt("expect").map(|e| e.as_bytes().to_vec()),
        }],
    };
    let headers = a
        .all("header")
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or(format!("--header {h:?}: expected 'Name: value'"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Config {
        target: a.addr("target")?,
        sources,
        method: a.opt("method").unwrap_or("GET").to_string(),
        headers,
        imdsv2: a.flag("imdsv2"),
        conns: a.num("conns", 50usize)?.max(1),
        duration: a.secs("duration", 5.0)?,
        max_requests: a.num("max-requests", 50_000_000u64)?,
        rate: a.num("rate", 0.0f64)?,
        keepalive: !a.flag("no-keepalive"),
        expect_status: a.num("expect-status", 200u16)?,
    })
}

pub fn main(a: &Args) -> Result<(), String> {
    let cfg = config(a)?;
    let out = run(&cfg);
    let json = out.json(&cfg);
    match a.opt("out") {
        Some(f) => std::fs::write(f, json + "\n").map_err(|e| format!("write {f}: {e}"))?,
        None => println!("{json}"),
    }
    Ok(())
}

pub fn run(cfg: &Config) -> Outcome {
    let sent = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(cfg.conns + 1));
    let start_cell = Arc::new(std::sync::OnceLock::<Instant>::new());
    let threads: Vec<_> = (0..cfg.conns)
        .map(|t| {
            let (cfg, sent, barrier, start) = (
                cfg.clone(),
                sent.clone(),
                barrier.clone(),
                start_cell.clone(),
            );
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    let start = *start.get().expect("start set before the barrier");
                    worker(&cfg, t, &sent, start)
                })
                .expect("spawn load thread")
        })
        .collect();
    let _ = start_cell.set(Instant::now());
    barrier.wait();
    let start = *start_cell.get().unwrap();
    let mut total = Outcome::default();
    for th in threads {
        if let Ok(o) = th.join() {
            total.merge(o);
        }
    }
    total.elapsed = start.elapsed();
    total
}

fn worker(cfg: &Config, t: usize, sent: &AtomicU64, start: Instant) -> Outcome {
    let mut o = Outcome::default();
    let deadline = start + cfg.duration;
    let extra: Vec<(&str, &str)> = cfg
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let reqs: Vec<Vec<u8>> = cfg
        .sources
        .iter()
        .map(|s| http::request(&cfg.method, &s.path, &extra, b""))
        .collect();
    let put = http::request(
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        b"",
    );
    let interval = if cfg.rate > 0.0 {
        Some(Duration::from_secs_f64(cfg.conns as f64 / cfg.rate))
    } else {
        None
    };
    // Spread the threads' schedules over one interval.
    let mut next_at =
        start + interval.map_or(Duration::ZERO, |i| i.mul_f64(t as f64 / cfg.conns as f64));
    let mut conn: Option<Conn> = None;
    let mut k = 0usize;
    let mut src_i = t % cfg.sources.len();
    let err = |o: &mut Outcome, kind: &str| *o.errors.entry(kind.to_string()).or_default() += 1;
    loop {
        let now = Instant::now();
        if now >= deadline || sent.fetch_add(1, Ordering::Relaxed) >= cfg.max_requests {
            break;
        }
        let scheduled = match interval {
            Some(iv) => {
                if next_at > now {
                    if next_at >= deadline {
                        break;
                    }
                    std::thread::sleep(next_at - now);
                }
                let s = next_at;
                next_at += iv;
                s
            }
            None => now,
        };
        if conn.is_none() {
            src_i = (t + k * cfg.conns) % cfg.sources.len();
            match Conn::open(cfg.sources[src_i].ip, cfg.target) {
                Ok(c) => {
                    conn = Some(c);
                    o.connects += 1;
                }
                Err(_) => {
                    err(&mut o, "connect");
                    k += 1;
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let src = &cfg.sources[src_i];
        let mut keep = cfg.keepalive;
        let mut t0 = scheduled;
        // The IMDSv2 token step.
        let mut token_req: Option<Vec<u8>> = None;
        if cfg.imdsv2 {
            match c.round_trip(&put) {
                Ok(r) => {
                    *o.status.entry(r.status).or_default() += 1;
                    let tok = c.body(&r).to_vec();
                    if r.status != 200 || tok.is_empty() {
                        err(&mut o, "token_status");
                    } else {
                        o.ok += 1;
                        let tok = String::from_utf8_lossy(&tok).into_owned();
                        let mut h = extra.clone();
                        h.push(("X-aws-ec2-metadata-token", tok.as_str()));
                        token_req = Some(http::request(&cfg.method, &src.path, &h, b""));
                    }
                    keep &= !r.close;
                    let t1 = Instant::now();
                    o.hist.record((t1 - t0).as_nanos() as u64);
                    t0 = t1;
                }
                Err(_) => {
                    err(&mut o, "io");
                    conn = None;
                    k += 1;
                    continue;
                }
            }
            if token_req.is_none() {
                if !keep {
                    conn = None;
                    k += 1;
                }
                continue;
            }
        }
        let req = token_req.as_deref().unwrap_or(&reqs[src_i]);
        match c.round_trip(req) {
            Ok(r) => {
                o.hist.record(t0.elapsed().as_nanos() as u64);
                *o.status.entry(r.status).or_default() += 1;
                if r.status != cfg.expect_status {
                    err(&mut o, &format!("status_{}", r.status));
                } else if src
                    .expect
                    .as_deref()
                    .is_some_and(|e| !contains(c.body(&r), e))
                {
                    err(&mut o, "unexpected_body");
                } else {
                    o.ok += 1;
                }
                keep &= !r.close;
            }
            Err(_) => {
                err(&mut o, "io");
                keep = false;
            }
        }
        if !keep {
            conn = None;
            k += 1;
        }
    }
    o
}
