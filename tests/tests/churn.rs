//! Fault injection, on the scripted stand-in API server (a real one cannot cut a stream, send a
//! 410 inside it or serve a stale cache on cue; IP reuse itself is also tested against the real
//! kube-apiserver in `control_plane.rs`).
//!
//! IP reuse churn through the real binary: at least 10,000 pod create/delete events on this
//! node, IPs handed from pod to pod with a different role each time (after plain deletes,
//! graceful terminations and pods left Succeeded/Failed with their IP still in the status),
//! decoy pods on another node claiming the same IPs, and watch faults (dropped streams, 410
//! inside the stream after compaction, HTTP 500s, stalls, re-delivered events, a stale
//! `resourceVersion=0` cache) — while clients keep asking from those IPs.
//!
//! What "correct" means. iamlet cannot know of a change before the watch delivers it, so an
//! answer is judged against what the API server's history allows: each answer must be the
//! role of the IP's owner (Running beats Pending, live beats terminating, newer beats older;
//! terminal and other-node pods never own) at some resourceVersion between
//! - `lo`: the resourceVersion of the last pod event iamlet had applied before the request
//!   (read from `/debug/store` just before; the snapshot reflects at least that), and
//! - `hi`: the API server's resourceVersion when the answer arrived.
//!
//! A wrong answer (another pod's role, a role the IP never had in that window, a 404 while
//! the IP was owned throughout) counts; the test requires zero. Answers that are correct
//! only because iamlet had not yet seen a change made before the request started are
//! counted and printed as watch lag, not as errors. After the churn the published state
//! must equal the API server's final state (nothing lost to the faults).

use iamlet_e2e::rig::control as common;

use common::{LIST, NODE, Rig, ip, rig};
use iamlet_e2e::apiserver::{ApiServer, EventType, Kind, PodBuilder};
use iamlet_e2e::try_request_from;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Pod IPs that churn: 127.30.0.1..=IPS.
const IPS: usize = 24;
const ROLES: [&str; 6] = ["r0", "r1", "r2", "r3", "r4", "r5"];
/// Node-a pod creates + deletes to reach.
const TARGET: usize = 10_000;
/// How long the churn is spread over.
const PACE: Duration = Duration::from_secs(10);
const CLIENTS: usize = 3;
/// A fault every this many events.
const FAULT_EVERY: usize = 900;
/// Hard bound on the churn loop (steps), whatever the pacing.
const MAX_STEPS: usize = 40_000;
/// creationTimestamps: strictly increasing per pod, so ownership never ties.
const T0: i64 = 1_750_000_000;

fn pool_ip(i: usize) -> String {
    format!("127.30.0.{}", i + 1)
}

/// xorshift64*: deterministic, no extra crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

#[derive(Debug, Default)]
struct Counts {
    creates: usize,
    deletes: usize,
    updates: usize,
    decoys: usize,
    faults: usize,
}

/// One request and its answer.
#[derive(Debug)]
struct Sample {
    slot: usize,
    /// iamlet's applied resourceVersion before the request.
    lo: u64,
    /// The API server's resourceVersion when the request started / was answered.
    start: u64,
    hi: u64,
    /// `Some(role)` for a 200 listing, `None` for 404, `Err` for anything else.
    answer: Result<Option<String>, String>,
}

/// The API server's current pods on this node, as iamlet's rules see them.
#[derive(Debug, Clone)]
struct PodState {
    uid: String,
    node: String,
    ips: Vec<String>,
    running: bool,
    terminal: bool,
    terminating: bool,
    host_network: bool,
    created: i64,
    role: Option<String>,
}

impl PodState {
    fn parse(v: &Value) -> PodState {
        let s = |p: &Value| p.as_str().unwrap_or_default().to_owned();
        let phase = s(&v["status"]["phase"]);
        let created = OffsetDateTime::parse(
            v["metadata"]["creationTimestamp"].as_str().unwrap_or(""),
            &Rfc3339,
        )
        .map_or(0, |t| t.unix_timestamp());
        PodState {
            uid: s(&v["metadata"]["uid"]),
            node: s(&v["spec"]["nodeName"]),
            ips: v["status"]["podIPs"]
                .as_array()
                .map(|a| a.iter().map(|i| s(&i["ip"])).collect())
                .unwrap_or_default(),
            running: phase == "Running",
            terminal: phase == "Succeeded" || phase == "Failed",
            terminating: v["metadata"].get("deletionTimestamp").is_some(),
            host_network: v["spec"]["hostNetwork"].as_bool().unwrap_or(false),
            created,
            role: v["metadata"]["annotations"]["iam.amazonaws.com/role"]
                .as_str()
                .map(str::to_owned),
        }
    }

    fn owns_candidate(&self, ip: &str) -> bool {
        self.node == NODE
            && !self.host_network
            && !self.terminal
            && self.ips.iter().any(|i| i == ip)
    }

    fn rank(&self) -> (bool, bool, i64, &str) {
        (!self.terminating, self.running, self.created, &self.uid)
    }
}

/// Per pool IP: the owner's role after every change of owner, by resourceVersion.
struct History {
    by_ip: HashMap<String, Vec<(u64, Option<String>)>>,
    /// The final owner of every IP (pool and anchors).
    last: BTreeMap<String, Option<String>>,
}

impl History {
    fn build(api: &ApiServer) -> History {
        let mut pods: HashMap<(String, String), PodState> = HashMap::new();
        let mut by_ip: HashMap<String, Vec<(u64, Option<String>)>> = HashMap::new();
        let mut last = BTreeMap::new();
        for rec in api.log() {
            if rec.kind != Kind::Pod {
                continue;
            }
            let key = (rec.key.1.clone(), rec.key.2.clone());
            let obj: Value = serde_json::from_str(&rec.json).unwrap();
            let new = PodState::parse(&obj);
            let mut affected: Vec<String> = new.ips.clone();
            if let Some(old) = pods.get(&key) {
                affected.extend(old.ips.iter().cloned());
            }
            if rec.event == EventType::Deleted {
                pods.remove(&key);
            } else {
                pods.insert(key, new);
            }
            for ipx in affected {
                let owner = pods
                    .values()
                    .filter(|p| p.owns_candidate(&ipx))
                    .max_by(|a, b| a.rank().cmp(&b.rank()))
                    .map(|p| p.role.clone().unwrap_or_default());
                let h = by_ip.entry(ipx.clone()).or_default();
                if h.last().map(|(_, o)| o) != Some(&owner) {
                    h.push((rec.rv, owner.clone()));
                }
                last.insert(ipx, owner);
            }
        }
        History { by_ip, last }
    }

    fn owner_at(&self, ip: &str, rv: u64) -> Option<String> {
        let h = self.by_ip.get(ip)?;
        let i = h.partition_point(|(r, _)| *r <= rv);
        if i == 0 { None } else { h[i - 1].1.clone() }
    }

    /// Owners the IP had at some version in `[lo, hi]`.
    fn owners_between(&self, ip: &str, lo: u64, hi: u64) -> Vec<Option<String>> {
        let mut out = vec![self.owner_at(ip, lo)];
        if let Some(h) = self.by_ip.get(ip) {
            out.extend(
                h.iter()
                    .filter(|(r, _)| *r > lo && *r <= hi)
                    .map(|(_, o)| o.clone()),
            );
        }
        out
    }
}

/// iamlet's applied pod resourceVersion (`/debug/store`), 0 before the first event.
fn applied_rv(r: &Rig) -> u64 {
    let resp = try_request_from(
        ip("127.0.0.1"),
        r.iamlet.addr(),
        b"GET /debug/store HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let Ok(resp) = resp else { return 0 };
    let v: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    v["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The `n`th fault. The slow-to-recover one (HTTP 500s on resume: the watcher backs off
/// 0.25 + 0.5 + 1 + 2 s) comes last, so the others hit a watch that has caught up.
fn inject_fault(api: &ApiServer, n: usize, last: bool) -> &'static str {
    if last {
        api.fail_next(2, 500);
        api.compact();
        api.drop_watches();
        return "500s, then 410 on resume";
    }
    match n % 5 {
        0 => {
            api.drop_watches();
            "dropped streams"
        }
        1 => {
            // A relist (no compaction, so a `resourceVersion=0` list would come from the
            // lagging cache), then the watch is held back: the relisted state is what
            // clients see for a while.
            api.expire_watches();
            api.stall_watches(Duration::from_millis(1200));
            "410 inside the stream, then a slow watch"
        }
        2 => {
            api.duplicate_next(25);
            "re-delivered events"
        }
        3 => {
            api.stall_watches(Duration::from_millis(300));
            "stalled streams"
        }
        _ => {
            api.compact();
            api.expire_watches();
            "compaction and 410 inside the stream"
        }
    }
}

/// The scripted churn; returns the counts.
fn drive(api: &ApiServer, occupied: &[AtomicBool; IPS]) -> Counts {
    let mut rng = Rng(0x5DEE_CE66_D1CE_B00C);
    let mut c = Counts::default();
    let mut seq: i64 = 0;
    // Per pool IP: the current pod (if any) and its role index.
    let mut slots: Vec<(Option<String>, usize)> =
        (0..IPS).map(|i| (None, i % ROLES.len())).collect();
    // Pods left terminating or terminal, deleted a few steps later.
    let mut deferred: VecDeque<(String, usize)> = VecDeque::new();
    let mut decoys: VecDeque<String> = VecDeque::new();
    let started = Instant::now();
    for step in 0..MAX_STEPS {
        let events = c.creates + c.deletes;
        if events >= TARGET {
            break;
        }
        let i = rng.below(IPS);
        let ipx = pool_ip(i);
        match slots[i].0.take() {
            Some(name) => {
                occupied[i].store(false, Ordering::SeqCst);
                match rng.below(10) {
                    0..=5 => {
                        api.delete_pod("churn", &name);
                        c.deletes += 1;
                    }
                    6 | 7 => {
                        api.mark_terminating("churn", &name);
                        c.updates += 1;
                        deferred.push_back((name, step + 1 + rng.below(12)));
                    }
                    _ => {
                        let phase = if rng.below(2) == 0 {
                            "Succeeded"
                        } else {
                            "Failed"
                        };
                        api.set_pod_phase("churn", &name, phase);
                        c.updates += 1;
                        deferred.push_back((name, step + 1 + rng.below(12)));
                    }
                }
            }
            None => {
                let role = (slots[i].1 + 1 + rng.below(ROLES.len() - 1)) % ROLES.len();
                seq += 1;
                let name = format!("p{seq}");
                let pending_first = rng.below(4) == 0;
                let phase = if pending_first { "Pending" } else { "Running" };
                api.create_pod(
                    &PodBuilder::new("churn", &name)
                        .node(NODE)
                        .ip(&ipx)
                        .phase(phase)
                        .role(ROLES[role])
                        .created(T0 + seq),
                );
                c.creates += 1;
                if pending_first {
                    api.set_pod_phase("churn", &name, "Running");
                    c.updates += 1;
                }
                slots[i] = (Some(name), role);
                occupied[i].store(true, Ordering::SeqCst);
            }
        }
        while deferred.front().is_some_and(|(_, due)| *due <= step) {
            let (name, _) = deferred.pop_front().expect("front");
            api.delete_pod("churn", &name);
            c.deletes += 1;
        }
        if rng.below(8) == 0 {
            // Another node's pod on one of our IPs: must never be seen here.
            seq += 1;
            let name = format!("decoy{seq}");
            let dip = pool_ip(rng.below(IPS));
            api.create_pod(
                &PodBuilder::running("churn", &name, "node-b", &dip)
                    .role("decoy")
                    .created(T0 + seq),
            );
            decoys.push_back(name);
            c.decoys += 1;
            if decoys.len() > 8 {
                let old = decoys.pop_front().expect("front");
                api.delete_pod("churn", &old);
            }
        }
        let events = c.creates + c.deletes;
        if events / FAULT_EVERY > c.faults {
            let what = inject_fault(api, c.faults, events + FAULT_EVERY > TARGET);
            c.faults += 1;
            eprintln!("fault {}: {what} after {events} events", c.faults);
        }
        // Spread the events over PACE (bounded sleeps).
        let due = PACE.mul_f64(events as f64 / TARGET as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead.min(Duration::from_millis(20)));
        }
    }
    for (name, _) in deferred {
        api.delete_pod("churn", &name);
        c.deletes += 1;
    }
    c
}

fn client(r: &Rig, seed: u64, occupied: &[AtomicBool; IPS], done: &AtomicBool) -> Vec<Sample> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let req = format!("GET {LIST} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
    while !done.load(Ordering::SeqCst) {
        // Read just before each request, so the allowed window is as tight as it can be.
        let lo = applied_rv(r);
        if lo == 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        // Mostly IPs that have a pod (a pod asks for its own credentials).
        let mut slot = rng.below(IPS);
        for _ in 0..4 {
            if occupied[slot].load(Ordering::SeqCst) {
                break;
            }
            slot = rng.below(IPS);
        }
        let start = r.api.resource_version();
        let res = try_request_from(ip(&pool_ip(slot)), r.iamlet.addr(), req.as_bytes());
        let hi = r.api.resource_version();
        let answer = match res {
            Ok(x) if x.status == 200 => Ok(Some(x.body_str())),
            Ok(x) if x.status == 404 => Ok(None),
            Ok(x) => Err(format!("{} {}", x.status, x.body_str())),
            Err(e) => Err(e.to_string()),
        };
        out.push(Sample {
            slot,
            lo,
            start,
            hi,
            answer,
        });
    }
    out
}

#[test]
fn fault_injection_ip_reuse_churn_never_answers_a_role_the_ips_owner_does_not_have() {
    let api = ApiServer::builder()
        .bookmark_every(Duration::from_millis(250))
        .start();
    // A lagging cache for `resourceVersion=0` lists: a client using them would travel back
    // in time on a relist (iamlet must not).
    api.stale_lists(3000);
    // One long-lived pod per role, so credential keys stay put and STS sees six calls.
    for (k, role) in ROLES.iter().enumerate() {
        api.create_pod(
            &PodBuilder::running(
                "churn",
                &format!("anchor-{k}"),
                NODE,
                &format!("127.31.0.{}", k + 1),
            )
            .role(role)
            .created(T0 - 1000),
        );
    }
    let r = rig(api, &["--backoff-max-elapsed-time=200ms"]);
    let occupied: [AtomicBool; IPS] = std::array::from_fn(|_| AtomicBool::new(false));
    let done = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let began = Instant::now();
    let counts = std::thread::scope(|s| {
        for k in 0..CLIENTS {
            let (r, occupied, done, samples) = (&r, &occupied, &done, &samples);
            s.spawn(move || {
                let got = client(r, 0x1234_5678 + k as u64, occupied, done);
                samples.lock().unwrap().extend(got);
            });
        }
        let c = drive(&r.api, &occupied);
        done.store(true, Ordering::SeqCst);
        c
    });
    let churn_took = began.elapsed();
    let samples = samples.into_inner().unwrap();

    // Nothing lost: the published state converges to the API server's final state.
    let history = History::build(&r.api);
    let want: BTreeMap<String, String> = history
        .last
        .iter()
        .filter_map(|(ipx, o)| Some((ipx.clone(), format!("{}{}", common::BASE, o.as_ref()?))))
        .collect();
    let mut have = BTreeMap::new();
    // Bounded; the assertion on `have` below says what differs if it never converged.
    let _ = iamlet_e2e::wait::poll(Duration::from_secs(20), || {
        have = r.store()["rolesByIP"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        have == want
    });
    let converged = began.elapsed() - churn_took;

    // Judge every answer.
    let (mut wrong, mut lag, mut not_found, mut failed) = (0usize, 0usize, 0usize, Vec::new());
    for s in &samples {
        let ipx = pool_ip(s.slot);
        match &s.answer {
            Err(e) => failed.push(format!("{ipx}: {e}")),
            Ok(answer) => {
                if answer.is_none() {
                    not_found += 1;
                }
                if !history.owners_between(&ipx, s.lo, s.hi).contains(answer) {
                    wrong += 1;
                    if wrong <= 10 {
                        eprintln!(
                            "WRONG: {ipx} answered {answer:?}; owners in [{}, {}]: {:?}",
                            s.lo,
                            s.hi,
                            history.owners_between(&ipx, s.lo, s.hi)
                        );
                    }
                } else if !history.owners_between(&ipx, s.start, s.hi).contains(answer) {
                    lag += 1;
                }
            }
        }
    }
    let lists_at_zero = r
        .api
        .requests()
        .iter()
        .filter(|q| {
            q.path == "/api/v1/pods" && !q.is_watch() && q.param("resourceVersion") == Some("0")
        })
        .count();
    let stats = r.api.stats();
    let metrics = r.metrics();
    eprintln!(
        "churn: {} node-a create/delete events ({} creates, {} deletes) + {} updates, {} decoy pods on node-b, {} faults, in {churn_took:.1?}",
        counts.creates + counts.deletes,
        counts.creates,
        counts.deletes,
        counts.updates,
        counts.decoys,
        counts.faults,
    );
    eprintln!(
        "churn: {} requests from the churning IPs ({not_found} answered 404), wrong-role answers: {wrong}, behind the API server by watch lag only: {lag}, transport/other failures: {}",
        samples.len(),
        failed.len()
    );
    eprintln!(
        "churn: stand-in sent {} expired, cut {} streams, {} re-deliveries, {} injected failures; iamlet relists: {}; final state converged {converged:.1?} after the churn",
        stats.expired_sent.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
        stats.duplicates_sent.load(Ordering::Relaxed),
        stats.failures_sent.load(Ordering::Relaxed),
        metric(&metrics, "iamlet_watch_relists_total{resource=\"pods\"}"),
    );

    assert_eq!(have, want, "the final state must match the API server's");
    assert_eq!(wrong, 0, "answers with a role the IP's owner did not have");
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(10)]);
    assert!(counts.creates + counts.deletes >= TARGET);
    assert!(samples.len() >= 1000, "too few requests: {}", samples.len());
    assert!(counts.faults >= 6, "every fault kind was injected");
    assert_eq!(
        lists_at_zero, 0,
        "iamlet never lists from a possibly stale cache"
    );
    assert!(stats.expired_sent.load(Ordering::Relaxed) >= 1);
    assert!(stats.dropped.load(Ordering::Relaxed) >= 1);
    assert!(metric(&metrics, "iamlet_watch_relists_total{resource=\"pods\"}") >= 2.0);
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no sample `{name}`"))
}
