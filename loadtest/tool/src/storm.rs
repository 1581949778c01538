//! `storm`: N pods with N distinct roles appear at once (one rewrite of the pods file).
//!
//! Phase A measures, from the moment iamlet publishes the new snapshot (a role-listing request
//! from a new pod's address is answered), how long until every role's AssumeRole has
//! completed (the fake STS's answer count, confirmed by iamlet's /metrics; with moto, /metrics
//! every 50 ms), then sends every pod's first credentials request and counts cache misses
//! (`iamlet_credential_cache_misses_total`; must not move) and AssumeRole calls (must equal N).
//! Phase B replaces them with N new pods / N new roles on other IPs and sends every pod's first
//! request one STS round-trip + 50 ms after the publish: the hits among them are the pods the
//! target holds for.

use crate::args::Args;
use crate::hist::Hist;
use crate::http::{self, Conn, metric_sum};
use crate::pods::{self, Pod};
use crate::procfs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How often /metrics is scraped while waiting for the fetches, where the STS server cannot
/// say how many it answered (moto): with 750 roles a scrape is 1.7 MB and ~5 ms of iamlet's
/// CPU, so scraping faster would slow down what is being measured.
const SCRAPE_POLL: Duration = Duration::from_millis(50);
/// How often the fake STS's answer count is read (it costs iamlet nothing).
const STS_POLL: Duration = Duration::from_millis(1);

/// Median AssumeRole round-trip to the STS endpoint (moto), measured directly.
pub fn sts_rtt(sts: SocketAddr, n: usize) -> Result<Duration, String> {
    let mut v = Vec::new();
    let mut c = Conn::open(None, sts).map_err(|e| format!("connect STS {sts}: {e}"))?;
    for i in 0..n {
        let body = format!(
            "Action=AssumeRole&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Frtt-probe-{i}&RoleSessionName=rtt"
        );
        let req = http::request(
            "POST",
            "/",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=00",
                ),
            ],
            body.as_bytes(),
        );
        let t = Instant::now();
        let r = c
            .round_trip(&req)
            .map_err(|e| format!("STS round trip: {e}"))?;
        let took = t.elapsed();
        if r.status != 200 {
            return Err(format!("STS AssumeRole answered {}", r.status));
        }
        if r.close {
            c = Conn::open(None, sts).map_err(|e| format!("connect STS {sts}: {e}"))?;
        }
        v.push(took);
    }
    v.sort();
    Ok(v[v.len() / 2])
}

pub fn sts_rtt_main(a: &Args) -> Result<(), String> {
    let d = sts_rtt(a.addr("sts")?, a.num("n", 20)?)?;
    println!("{{\"sts_rtt_ms\": {:.2}}}", d.as_secs_f64() * 1e3);
    Ok(())
}

#[derive(Clone, Copy)]
struct Counters {
    assume_ok: f64,
    assume_all: f64,
    hits: f64,
    misses: f64,
}

fn counters(target: SocketAddr) -> Result<Counters, String> {
    let (st, body) = http::fetch(target, "/metrics").map_err(|e| format!("scrape: {e}"))?;
    if st != 200 {
        return Err(format!("/metrics answered {st}"));
    }
    let t = String::from_utf8_lossy(&body);
    Ok(Counters {
        assume_ok: metric_sum(&t, "iamlet_sts_assume_role_total", &["outcome=\"success\""]),
        assume_all: metric_sum(&t, "iamlet_sts_assume_role_total", &[]),
        hits: metric_sum(&t, "iamlet_credential_cache_hits_total", &[]),
        misses: metric_sum(&t, "iamlet_credential_cache_misses_total", &[]),
    })
}

/// Every pod's first credentials request, 50 at a time; returns (ok, errors, latency).
fn first_requests(target: SocketAddr, pods: &[Pod]) -> (usize, usize, Hist) {
    let next = AtomicUsize::new(0);
    let results = Mutex::new((0usize, 0usize, Hist::default()));
    std::thread::scope(|s| {
        for _ in 0..50.min(pods.len()) {
            s.spawn(|| {
                let mut h = Hist::default();
                let (mut ok, mut bad) = (0, 0);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = pods.get(i) else { break };
                    let path = format!("/latest/meta-data/iam/security-credentials/{}", p.role);
                    let t = Instant::now();
                    let r = Conn::open(Some(p.ip.into()), target).and_then(|mut c| {
                        let r = c.round_trip(&http::get(&path, &[]))?;
                        Ok(r.status == 200 && c.body(&r).windows(11).any(|w| w == b"AccessKeyId"))
                    });
                    h.record(t.elapsed().as_nanos() as u64);
                    match r {
                        Ok(true) => ok += 1,
                        _ => bad += 1,
                    }
                }
                let mut g = results.lock().unwrap();
                g.0 += ok;
                g.1 += bad;
                g.2.merge(&h);
            });
        }
    });
    results.into_inner().unwrap()
}

/// Waits until iamlet has published `pod`: a role-listing request from the pod's address is
/// held until its IP is known (or `--backoff-max-elapsed-time` passes; then it asks again) and
/// answered the moment the snapshot with it is published. Cheap, unlike a /metrics scrape,
/// and it touches no credentials (no cache hit or miss is counted).
fn wait_publish(target: SocketAddr, pod: &Pod, limit: Instant) -> Result<Instant, String> {
    let path = "/latest/meta-data/iam/security-credentials/";
    loop {
        let r = Conn::open(Some(pod.ip.into()), target).and_then(|mut c| {
            let r = c.round_trip(&http::get(path, &[]))?;
            Ok(r.status == 200 && c.body(&r) == pod.role.as_bytes())
        });
        if let Ok(true) = r {
            return Ok(Instant::now());
        }
        if Instant::now() > limit {
            return Err("the new pods were never published".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// AssumeRole answers the fake STS has given (`GET /_answered`); None for other STS servers.
fn sts_answered(sts: SocketAddr) -> Option<f64> {
    match http::fetch(sts, "/_answered") {
        Ok((200, body)) => String::from_utf8_lossy(&body).trim().parse().ok(),
        _ => None,
    }
}

pub fn main(a: &Args) -> Result<(), String> {
    let target = a.addr("target")?;
    let sts = a.addr("sts")?;
    let file = a.req("pods-file")?.to_string();
    let count: usize = a.num("count", 750)?;
    let net: u8 = a.num("net", 50)?;
    let local_role = a.opt("local-role").unwrap_or("lt-role").to_string();
    let pid: Option<u32> = a.opt("pid").and_then(|p| p.parse().ok());
    let timeout = a.secs("timeout", 120.0)?;
    let rtt = sts_rtt(sts, 20)?;

    // Phase A.
    let before = counters(target)?;
    let mut pods_a = vec![pods::local_pod(&local_role)];
    let storm_a = pods::generate("storm-a", net, count, count);
    pods_a.extend(storm_a.iter().cloned());
    let t_write = Instant::now();
    pods::write_atomic(Path::new(&file), &pods::render(&pods_a))?;
    let limit = t_write + timeout;
    let t_seen = wait_publish(target, &storm_a[0], limit)?;
    let (mut t50, mut t90, t_all);
    t50 = None;
    t90 = None;
    let mut scrapes = 0usize;
    // With the fake STS: its answer count, read every millisecond, tells when the calls are
    // done; then /metrics confirms iamlet holds them all. Otherwise /metrics every 50 ms.
    let sts_before = sts_answered(sts);
    let mut sts_done: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > limit {
            return Err(format!(
                "not every AssumeRole call succeeded in {timeout:?}"
            ));
        }
        let done = match (sts_before, sts_done) {
            (Some(b), None) => {
                let n = sts_answered(sts).unwrap_or(b) - b;
                if n as usize >= count {
                    sts_done = Some(Instant::now());
                }
                n as usize
            }
            _ => {
                scrapes += 1;
                (counters(target)?.assume_ok - before.assume_ok) as usize
            }
        };
        let now = Instant::now();
        if t50.is_none() && done * 2 >= count {
            t50 = Some(now);
        }
        if t90.is_none() && done * 10 >= count * 9 {
            t90 = Some(now);
        }
        if done >= count && (sts_before.is_none() || scrapes > 0) {
            t_all = now;
            break;
        }
        std::thread::sleep(match (sts_before, sts_done) {
            (Some(_), None) => STS_POLL,
            (Some(_), Some(_)) => Duration::from_millis(2),
            _ => SCRAPE_POLL,
        });
    }
    let mid = counters(target)?;
    let (ok_a, bad_a, lat_a) = first_requests(target, &storm_a);
    std::thread::sleep(Duration::from_millis(500));
    let after_a = counters(target)?;
    let rss_a = pid.and_then(procfs::mem);

    // Phase B: new pods, new roles, new IPs; first requests at publish + RTT + 50 ms.
    let before_b = after_a;
    let mut pods_b = vec![pods::local_pod(&local_role)];
    let storm_b = pods::generate("storm-b", net + 1, count, count);
    pods_b.extend(storm_b.iter().cloned());
    let t_write_b = Instant::now();
    pods::write_atomic(Path::new(&file), &pods::render(&pods_b))?;
    let t_seen_b = wait_publish(target, &storm_b[0], t_write_b + timeout)?;
    let fire_at = t_seen_b + rtt + Duration::from_millis(50);
    if let Some(d) = fire_at.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
    let fired_after = t_seen_b.elapsed();
    let (ok_b, bad_b, lat_b) = first_requests(target, &storm_b);
    std::thread::sleep(Duration::from_millis(500));
    let after_b = counters(target)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let since = |t: Option<Instant>| t.map_or(-1.0, |t| ms(t - t_seen));
    let json = format!(
        concat!(
            "{{\"pods\": {count}, \"roles\": {count}, \"sts_rtt_ms\": {rtt:.2}, ",
            "\"a\": {{\"publish_after_write_ms\": {pub_a:.1}, \"all_cached_after_publish_ms\": {all:.1}, ",
            "\"sts_answered_all_after_publish_ms\": {sts_all:.1}, \"metrics_scrapes_while_waiting\": {scrapes}, ",
            "\"half_cached_ms\": {t50:.1}, \"p90_cached_ms\": {t90:.1}, ",
            "\"first_requests_ok\": {ok_a}, \"first_requests_errors\": {bad_a}, ",
            "\"first_request_misses\": {miss_a}, \"first_request_hits\": {hit_a}, ",
            "\"assume_role_calls\": {calls_a}, \"assume_role_calls_after_first_requests\": {extra_a}, ",
            "\"rss_kib\": {rss}, \"hwm_kib\": {hwm}, \"rss_anon_kib\": {anon}, \"rss_file_kib\": {file}, {lat_a}}}, ",
            "\"b\": {{\"publish_after_write_ms\": {pub_b:.1}, \"first_requests_sent_after_publish_ms\": {fired:.1}, ",
            "\"first_requests_ok\": {ok_b}, \"first_requests_errors\": {bad_b}, ",
            "\"first_request_hits\": {hit_b}, \"first_request_misses\": {miss_b}, ",
            "\"assume_role_calls\": {calls_b}, {lat_b}}}}}"
        ),
        count = count,
        rtt = ms(rtt),
        pub_a = ms(t_seen - t_write),
        all = ms(t_all - t_seen),
        sts_all = sts_done.map_or(-1.0, |t| ms(t - t_seen)),
        scrapes = scrapes,
        t50 = since(t50),
        t90 = since(t90),
        ok_a = ok_a,
        bad_a = bad_a,
        miss_a = after_a.misses - mid.misses,
        hit_a = after_a.hits - mid.hits,
        calls_a = mid.assume_all - before.assume_all,
        extra_a = after_a.assume_all - mid.assume_all,
        rss = rss_a.map_or(-1, |r| r.rss as i64),
        hwm = rss_a.map_or(-1, |r| r.hwm as i64),
        anon = rss_a.map_or(-1, |r| r.anon as i64),
        file = rss_a.map_or(-1, |r| r.file as i64),
        lat_a = lat_a.json_fields(),
        pub_b = ms(t_seen_b - t_write_b),
        fired = ms(fired_after),
        ok_b = ok_b,
        bad_b = bad_b,
        hit_b = after_b.hits - before_b.hits,
        miss_b = after_b.misses - before_b.misses,
        calls_b = after_b.assume_all - before_b.assume_all,
        lat_b = lat_b.json_fields(),
    );
    match a.opt("out") {
        Some(f) => std::fs::write(f, json + "\n").map_err(|e| format!("write {f}: {e}"))?,
        None => println!("{json}"),
    }
    Ok(())
}
