//! `soak`: steady load from P pods while pods churn: every `--churn-ms`, `--churn` pods are
//! replaced by new pods (new UID, a different role from a pool of M) on the same IPs.
//!
//! Each load thread takes a pod, opens a keep-alive connection from its IP, and alternates the
//! role listing (checked against the pod that owns the IP) and the credentials of the listed
//! role. An answer naming the IP's previous role within `--grace` of the change is a
//! transition (iamlet has not yet seen the new file), not an error; any other role is a
//! wrong-role answer. Timeline samples: RSS, requests, errors, wrong answers.

use crate::args::Args;
use crate::hist::Hist;
use crate::http::{self, Conn};
use crate::pods::{self, Pod};
use crate::procfs;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIST: &str = "/latest/meta-data/iam/security-credentials/";

struct Slot {
    role: String,
    /// Earlier owners' roles and when each stopped being this IP's role.
    past: Vec<(String, Instant)>,
    changed: Instant,
}

#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    transitions: AtomicU64,
}

pub fn main(a: &Args) -> Result<(), String> {
    let target = a.addr("target")?;
    let file = a.req("pods-file")?.to_string();
    let npods: usize = a.num("pods", 200)?;
    let nroles: usize = a.num("roles", 20)?.max(2);
    let net: u8 = a.num("net", 80)?;
    let duration = a.secs("duration", 600.0)?;
    let conns: usize = a.num("conns", 16)?;
    let churn_every = Duration::from_millis(a.num("churn-ms", 500)?);
    let churn: usize = a.num("churn", 5)?;
    let grace = a.secs("grace", 3.0)?;
    let sample = a.secs("sample", 5.0)?;
    let warmup = a.secs("warmup", (duration.as_secs_f64() * 0.2).max(1.0))?;
    let local_role = a.opt("local-role").unwrap_or("lt-role").to_string();
    let pid: Option<u32> = a.opt("pid").and_then(|p| p.parse().ok());
    // Pods and the role each IP should answer with.
    let mut pods: Vec<Pod> = pods::generate("soak", net, npods, nroles);
    let role_name = |k: usize| format!("soak-role-{}", k % nroles);
    let start = Instant::now();
    let slots: Arc<Vec<Mutex<Slot>>> = Arc::new(
        pods.iter()
            .map(|p| {
                Mutex::new(Slot {
                    role: p.role.clone(),
                    past: Vec::new(),
                    changed: start,
                })
            })
            .collect(),
    );
    let write = |pods: &[Pod]| {
        let mut all = vec![pods::local_pod(&local_role)];
        all.extend(pods.iter().cloned());
        pods::write_atomic(Path::new(&file), &pods::render(&all))
    };
    write(&pods)?;
    // Give iamlet a moment to publish and prefetch before the clock starts.
    std::thread::sleep(Duration::from_millis(1500));
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Totals::default());
    let start = Instant::now();
    let deadline = start + duration;
    let threads: Vec<_> = (0..conns)
        .map(|t| {
            let (slots, stop, totals) = (slots.clone(), stop.clone(), totals.clone());
            let ips: Vec<_> = pods.iter().map(|p| p.ip).collect();
            std::thread::spawn(move || {
                load(
                    t, conns, target, &ips, &slots, &stop, &totals, grace, deadline,
                )
            })
        })
        .collect();
    // Churn and sample on this thread.
    let mut timeline = String::new();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut churns = 0u64;
    let mut generation = 0u64;
    let mut next_churn = start + churn_every;
    let mut next_sample = start;
    let mut rss_warm: Option<u64> = None;
    let mut rss_max_after_warm = 0u64;
    let mut rss_last = 0u64;
    let (mut anon_warm, mut anon_last, mut anon_max) = (None::<u64>, 0u64, 0u64);
    let mut write_errors = 0u64;
    loop {
        let now = Instant::now();
        if now >= next_sample {
            let m = pid.and_then(procfs::mem).unwrap_or_default();
            let rss = m.rss;
            let el = now - start;
            if el >= warmup {
                rss_warm.get_or_insert(rss);
                rss_max_after_warm = rss_max_after_warm.max(rss);
                anon_warm.get_or_insert(m.anon);
                anon_max = anon_max.max(m.anon);
            }
            rss_last = rss;
            anon_last = m.anon;
            let _ = write!(
                timeline,
                "{}{{\"t_s\": {:.1}, \"rss_kib\": {rss}, \"rss_anon_kib\": {}, \"requests\": {}, \"errors\": {}, \"wrong_role\": {}, \"transitions\": {}, \"churned_pods\": {churns}}}",
                if timeline.is_empty() { "" } else { ", " },
                el.as_secs_f64(),
                m.anon,
                totals.requests.load(Ordering::Relaxed),
                totals.errors.load(Ordering::Relaxed),
                totals.wrong.load(Ordering::Relaxed),
                totals.transitions.load(Ordering::Relaxed),
            );
            next_sample += sample;
        }
        if now >= deadline {
            break;
        }
        if now >= next_churn {
            generation += 1;
            for _ in 0..churn {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng % npods as u64) as usize;
                let mut s = slots[i].lock().unwrap();
                let old = s.role.clone();
                let mut k = (rng >> 20) as usize;
                while role_name(k) == old {
                    k += 1;
                }
                let new = role_name(k);
                // The expectation changes before the file does: iamlet cannot answer the new
                // role before the checker accepts it.
                let now = Instant::now();
                s.past
                    .retain(|(_, until)| now.duration_since(*until) < grace);
                s.past.push((old, now));
                s.role = new.clone();
                s.changed = now;
                pods[i].role = new;
                pods[i].uid = format!("soak-uid-{i}-g{generation}");
                pods[i].name = format!("soak-{i}-g{generation}");
                churns += 1;
            }
            if write(&pods).is_err() {
                write_errors += 1;
            }
            next_churn += churn_every;
        }
        let wake = next_churn.min(next_sample).min(deadline);
        if let Some(d) = wake.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut hist = Hist::default();
    for th in threads {
        if let Ok(h) = th.join() {
            hist.merge(&h);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let warm = rss_warm.unwrap_or(rss_last).max(1);
    let growth = (rss_last as f64 - warm as f64) / warm as f64 * 100.0;
    let growth_max = (rss_max_after_warm as f64 - warm as f64) / warm as f64 * 100.0;
    let aw = anon_warm.unwrap_or(anon_last).max(1);
    let anon_growth = (anon_last as f64 - aw as f64) / aw as f64 * 100.0;
    let anon_growth_max = (anon_max as f64 - aw as f64) / aw as f64 * 100.0;
    let req = totals.requests.load(Ordering::Relaxed);
    let json = format!(
        "{{\"duration_s\": {secs:.1}, \"pods\": {npods}, \"roles\": {nroles}, \"conns\": {conns}, \"churn_every_ms\": {}, \"churn_per_step\": {churn}, \"churned_pods\": {churns}, \"pods_file_write_errors\": {write_errors}, \"requests\": {req}, \"rps\": {:.1}, \"errors\": {}, \"wrong_role\": {}, \"transitions\": {}, \"warmup_s\": {:.1}, \"rss_after_warmup_kib\": {warm}, \"rss_end_kib\": {rss_last}, \"rss_max_after_warmup_kib\": {rss_max_after_warm}, \"rss_growth_pct\": {growth:.2}, \"rss_max_growth_pct\": {growth_max:.2}, \"anon_after_warmup_kib\": {aw}, \"anon_end_kib\": {anon_last}, \"anon_growth_pct\": {anon_growth:.2}, \"anon_max_growth_pct\": {anon_growth_max:.2}, {}, \"timeline\": [{timeline}]}}",
        churn_every.as_millis(),
        req as f64 / secs,
        totals.errors.load(Ordering::Relaxed),
        totals.wrong.load(Ordering::Relaxed),
        totals.transitions.load(Ordering::Relaxed),
        warmup.as_secs_f64(),
        hist.json_fields(),
    );
    match a.opt("out") {
        Some(f) => std::fs::write(f, json + "\n").map_err(|e| format!("write {f}: {e}"))?,
        None => println!("{json}"),
    }
    Ok(())
}

/// Whether `answer` is acceptable for slot `s` now: the current role, or a role the IP had
/// until less than the grace period ago (a transition: iamlet has not re-read the file yet).
enum Verdict {
    Ok,
    Transition,
    Wrong,
}

fn judge(s: &Slot, answer: &str, grace: Duration) -> Verdict {
    if answer == s.role {
        Verdict::Ok
    } else if s
        .past
        .iter()
        .any(|(r, until)| r == answer && until.elapsed() < grace)
    {
        Verdict::Transition
    } else {
        Verdict::Wrong
    }
}

#[allow(clippy::too_many_arguments)]
fn load(
    t: usize,
    conns: usize,
    target: SocketAddr,
    ips: &[std::net::Ipv4Addr],
    slots: &[Mutex<Slot>],
    stop: &AtomicBool,
    totals: &Totals,
    grace: Duration,
    deadline: Instant,
) -> Hist {
    let mut h = Hist::default();
    let list = http::get(LIST, &[]);
    let mut k = 0usize;
    // Requests per connection before moving to another pod.
    const PER_CONN: usize = 20;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let i = (t + k * conns) % ips.len();
        k += 1;
        let Ok(mut c) = Conn::open(Some(ips[i].into()), target) else {
            totals.errors.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        for _ in 0..PER_CONN / 2 {
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
            // The role listing, judged against the IP's owner.
            let t0 = Instant::now();
            let role = match c.round_trip(&list) {
                Ok(r) if r.status == 200 => String::from_utf8_lossy(c.body(&r)).into_owned(),
                _ => {
                    totals.requests.fetch_add(1, Ordering::Relaxed);
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            h.record(t0.elapsed().as_nanos() as u64);
            totals.requests.fetch_add(1, Ordering::Relaxed);
            let verdict = judge(&slots[i].lock().unwrap(), &role, grace);
            match verdict {
                Verdict::Ok => {}
                Verdict::Transition => {
                    totals.transitions.fetch_add(1, Ordering::Relaxed);
                }
                Verdict::Wrong => {
                    totals.wrong.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            // The credentials of the listed role.
            let t1 = Instant::now();
            let path = format!("{LIST}{role}");
            let r = c.round_trip(&http::get(&path, &[]));
            totals.requests.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(r) if r.status == 200 && c.body(&r).windows(11).any(|w| w == b"AccessKeyId") => {
                    h.record(t1.elapsed().as_nanos() as u64);
                }
                // The pod changed between the two requests: iamlet rightly refuses the old role.
                Ok(r) if r.status == 403 && slots[i].lock().unwrap().changed.elapsed() < grace => {
                    totals.transitions.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    h
}
