//! The credential manager: runs AssumeRole for slots that ask — one call per key at a time,
//! under a node-wide rate limit — renders the answer once, refreshes ahead of expiry, and
//! keeps serving still-valid credentials when STS fails (retrying with backoff and jitter).

use crate::creds::slot::{CredAnswer, CredSlot, Generation};
use crate::creds::sts::{AssumeRole, StsError, session_name};
use crate::metrics::ResolverMetrics;
use crate::render::{self, credentials_document, error_document};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// Timing rules for sessions.
#[derive(Debug, Clone)]
pub struct CredPolicy {
    /// kube2iam's `--iam-role-session-ttl`: sessions last twice this (at least 15 minutes)
    /// and are refreshed when less than this (plus a margin) is left.
    pub session_ttl: Duration,
    /// How long a failure is served before STS is asked again.
    pub error_ttl: Duration,
    /// Prefix of node-wide session names (the node name).
    pub session_prefix: String,
    /// Most AssumeRole calls per second from this node.
    pub rate_limit: f64,
    /// Most AssumeRole calls in flight at once. Each in-flight call holds one pooled STS
    /// connection (HTTP/1.1) with its buffers, so this also bounds the connections (and TLS
    /// handshakes) a storm of new roles costs; the rest queue in FIFO order.
    pub max_in_flight: usize,
}

impl CredPolicy {
    pub fn session_duration(&self) -> Duration {
        (self.session_ttl * 2).clamp(Duration::from_secs(900), Duration::from_secs(43_200))
    }

    /// Margin added to the TTL when deciding to refresh: a minute, less for short-lived
    /// credentials.
    pub fn refresh_margin(lifetime: Duration) -> Duration {
        (lifetime / 10).min(Duration::from_secs(60))
    }

    /// Credentials with less than this left are never served (the JS SDK treats < 5 min as
    /// expired); a quarter of the lifetime for short-lived credentials.
    pub fn min_served_lifetime(lifetime: Duration) -> Duration {
        (lifetime / 4).min(Duration::from_secs(300))
    }

    /// How long after issuance to refresh credentials that expire in `lifetime`, so a served
    /// credential always has more than the TTL plus the margin left.
    pub fn refresh_after(&self, lifetime: Duration, jitter: Duration) -> Duration {
        lifetime
            .saturating_sub(self.session_ttl + Self::refresh_margin(lifetime) + jitter)
            .max(Duration::from_millis(500))
    }

    /// Retry delay after `failures` consecutive failures: the error TTL (at least 1 s),
    /// doubling, at most a minute.
    pub fn retry_after(&self, failures: u32) -> Duration {
        let base = self.error_ttl.max(Duration::from_secs(1));
        base.saturating_mul(1u32 << failures.min(6))
            .min(Duration::from_secs(60).max(base))
    }
}

/// A node-wide limit on AssumeRole calls: successive calls are scheduled at least `1 / rate`
/// apart, and waiters queue in FIFO order.
///
/// The spacing runs from each call's scheduled slot, not from when the runtime's timer (1 ms
/// resolution) actually woke it, so rates above 1,000/s are reached rather than capped at one
/// call per timer tick. A wake-up later than [`RateLimiter::SLACK`] after its slot (a stalled
/// runtime) restarts the spacing from then, so no catch-up burst is ever released: at most
/// `rate × SLACK` calls can start closer together than the interval.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    /// How late a wake-up may be and still count as on time (the timer's resolution, and
    /// some).
    pub const SLACK: Duration = Duration::from_millis(2);

    pub fn new(per_second: f64) -> Self {
        let interval = if per_second.is_finite() && per_second > 0.0 {
            Duration::from_secs_f64(1.0 / per_second)
        } else {
            Duration::ZERO
        };
        RateLimiter {
            interval,
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for this caller's turn; true if it had to wait.
    pub async fn acquire(&self) -> bool {
        let mut next = self.next.lock().await;
        let now = tokio::time::Instant::now();
        // Keep to the schedule while within the slack of it (timer rounding); further behind
        // (a quiet period, a stall), start afresh from now: no credit is saved up.
        let slot = if *next + Self::SLACK < now {
            now
        } else {
            *next
        };
        let waited = slot > now;
        if waited {
            tokio::time::sleep_until(slot).await;
        }
        let woke = tokio::time::Instant::now();
        let base = if woke > slot + Self::SLACK {
            woke
        } else {
            slot
        };
        *next = base + self.interval;
        waited
    }
}

struct Manager<S> {
    sts: Arc<S>,
    policy: Arc<CredPolicy>,
    metrics: ResolverMetrics,
    limiter: RateLimiter,
    /// Scheduled refreshes and retries come back to the run loop through here.
    again: mpsc::UnboundedSender<(Arc<CredSlot>, u32)>,
}

/// Runs until every sender is gone.
///
/// A fetch task (with the SDK call's sizeable future) is spawned only once a permit for it
/// is free, so a storm of new roles queues as slots in the channels — a pointer each — not
/// as hundreds of parked calls; timers for refreshes and retries are small tasks that hand
/// the slot back here.
pub(crate) async fn run<S: AssumeRole + 'static>(
    mut requests: mpsc::UnboundedReceiver<Arc<CredSlot>>,
    sts: Arc<S>,
    policy: Arc<CredPolicy>,
    metrics: ResolverMetrics,
) {
    let (again, mut scheduled) = mpsc::unbounded_channel();
    let permits = Arc::new(tokio::sync::Semaphore::new(policy.max_in_flight.max(1)));
    let m = Arc::new(Manager {
        limiter: RateLimiter::new(policy.rate_limit),
        sts,
        policy,
        metrics,
        again,
    });
    loop {
        let (slot, failures) = tokio::select! {
            biased;
            r = requests.recv() => match r {
                Some(slot) => (slot, 0),
                None => break,
            },
            Some(r) = scheduled.recv() => r,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        tokio::spawn(fetch(slot, m.clone(), failures, permit));
    }
}

/// One AssumeRole for `slot`; `failures`: consecutive failures so far. The permit bounds the
/// calls in flight and is returned when the call is done.
async fn fetch<S: AssumeRole>(
    slot: Arc<CredSlot>,
    m: Arc<Manager<S>>,
    failures: u32,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let key = slot.key().clone();
    let session = match &key.session {
        Some(s) => s.name.clone(),
        None => session_name(&m.policy.session_prefix, &key.role_arn),
    };
    if m.limiter.acquire().await {
        m.metrics.rate_limited();
    }
    let refresh = slot.last().is_some();
    m.metrics.in_flight(1);
    let started = Instant::now();
    let result = m
        .sts
        .assume_role(&key, &session, m.policy.session_duration())
        .await;
    m.metrics.in_flight(-1);
    drop(permit);
    let took = started.elapsed();
    let now = Instant::now();
    let wall = SystemTime::now();
    match result {
        Ok(creds) => {
            if refresh {
                m.metrics.refreshed();
            }
            let lifetime = render::remaining(creds.expiration, wall);
            let serve_for = lifetime.saturating_sub(CredPolicy::min_served_lifetime(lifetime));
            let origin = slot.origin();
            tracing::info!(
                namespace = %origin.namespace,
                pod = %origin.pod,
                role = %key.role_arn,
                external_id = key.external_id.is_some(),
                access_key_id = %creds.access_key_id,
                expiration = %render::imds_timestamp(creds.expiration),
                session_name = %session,
                refresh,
                "credentials issued"
            );
            let answer = CredAnswer::Ready {
                body: credentials_document(&creds, wall),
                container: render::container_document(&creds, render::account_of(&key.role_arn)),
                expiration: creds.expiration,
                serve_until: now + serve_for,
                access_key_id: creds.access_key_id.clone(),
            };
            let generation = slot.publish(Some(Arc::new(answer)));
            // Counted once published: a scrape that sees the call can rely on its answer.
            m.metrics.observe_assume_role_for(&key.role_arn, None, took);
            let jitter = jitter(&key.role_arn, (lifetime / 20).min(Duration::from_secs(30)));
            schedule(
                &slot,
                &m,
                generation,
                m.policy.refresh_after(lifetime, jitter),
                0,
            );
        }
        Err(error) => {
            let still_valid = slot
                .current(now)
                .is_some_and(|a| matches!(&*a, CredAnswer::Ready { .. }));
            let retry_in = m.policy.retry_after(failures);
            let StsError { code, message } = &error;
            tracing::warn!(role = %key.role_arn, %code, %message, still_valid, retry_in = ?retry_in, "AssumeRole failed");
            let generation = if still_valid {
                // Static stability: keep serving what we have; try again later.
                m.metrics.kept_stale();
                slot.publish(None)
            } else {
                let answer = CredAnswer::Failed {
                    status: 500,
                    body: error_document(code, message),
                    error: error.clone(),
                    at: now,
                    retry_after: now + m.policy.error_ttl,
                };
                slot.publish(Some(Arc::new(answer)))
            };
            m.metrics
                .observe_assume_role_for(&key.role_arn, Some(code), took);
            schedule(
                &slot,
                &m,
                generation,
                retry_in + jitter(&key.role_arn, retry_in / 4),
                failures + 1,
            );
        }
    }
}

/// Fetches the slot again after `after`, unless it was dropped (no pod uses it any more) or
/// the timer went stale: a pod's request started a fetch meanwhile, whose completion armed
/// a newer timer. Stale timers are left to run out rather than aborted: they only sleep, and
/// at most one is left behind per fetch a pod starts.
fn schedule<S>(
    slot: &Arc<CredSlot>,
    m: &Manager<S>,
    generation: Generation,
    after: Duration,
    failures: u32,
) {
    let weak = Arc::downgrade(slot);
    let again = m.again.clone();
    #[cfg(test)]
    tests::armed(&weak, generation);
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        #[cfg(test)]
        tests::fired(&weak, generation);
        let Some(slot) = weak.upgrade() else {
            return;
        };
        if slot.claim(generation) {
            let _ = again.send((slot, failures));
        }
    });
}

fn jitter(seed: &str, max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let h = ahash::RandomState::new().hash_one(seed);
    Duration::from_millis(h % (max.as_millis() as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::slot::{CredKey, Origin};
    use crate::render::Credentials;
    use std::future::Future;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

    thread_local! {
        /// The refresh and retry timers armed and not yet fired, by slot, so that tests can
        /// count a key's live ones. Per thread: each test's runtime runs on its own.
        static ARMED: std::cell::RefCell<Vec<(*const CredSlot, Generation)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    pub(super) fn armed(slot: &std::sync::Weak<CredSlot>, generation: Generation) {
        ARMED.with_borrow_mut(|a| a.push((slot.as_ptr(), generation)));
    }

    pub(super) fn fired(slot: &std::sync::Weak<CredSlot>, generation: Generation) {
        ARMED.with_borrow_mut(|a| a.retain(|t| *t != (slot.as_ptr(), generation)));
    }

    /// `slot`'s refreshes pending: a fetch in flight, or live timers.
    fn pending_refreshes(slot: &Arc<CredSlot>) -> usize {
        ARMED.with_borrow(|a| {
            let mine = a.iter().filter(|(s, _)| *s == Arc::as_ptr(slot));
            slot.pending_refreshes(mine.map(|(_, g)| *g))
        })
    }

    fn policy(ttl_secs: u64) -> CredPolicy {
        CredPolicy {
            session_ttl: Duration::from_secs(ttl_secs),
            error_ttl: Duration::from_secs(2),
            session_prefix: "n".into(),
            rate_limit: 10.0,
            max_in_flight: 32,
        }
    }

    #[test]
    fn session_lasts_twice_the_ttl_within_sts_bounds() {
        assert_eq!(policy(900).session_duration(), Duration::from_secs(1800));
        assert_eq!(policy(60).session_duration(), Duration::from_secs(900));
        assert_eq!(
            policy(60_000).session_duration(),
            Duration::from_secs(43_200)
        );
    }

    #[test]
    fn refresh_leaves_more_than_ttl_plus_margin() {
        let p = policy(900);
        let life = Duration::from_secs(1800);
        let after = p.refresh_after(life, Duration::from_secs(10));
        assert_eq!(after, Duration::from_secs(1800 - 900 - 60 - 10));
        assert!(life - after > p.session_ttl + CredPolicy::refresh_margin(life));
        // Served credentials keep more than 15 minutes: refresh happens before
        // min_served_lifetime is reached.
        assert!(life - after > CredPolicy::min_served_lifetime(life));
        // Credentials that already live shorter than the TTL are refreshed almost at once.
        assert_eq!(
            p.refresh_after(Duration::from_secs(600), Duration::ZERO),
            Duration::from_millis(500)
        );
        // Short-lived credentials scale the margins down.
        let short = policy(4);
        assert_eq!(
            CredPolicy::refresh_margin(Duration::from_secs(12)),
            Duration::from_millis(1200)
        );
        assert_eq!(
            short.refresh_after(Duration::from_secs(12), Duration::ZERO),
            Duration::from_millis(6800)
        );
    }

    #[test]
    fn retries_back_off_exponentially_to_a_minute() {
        let p = policy(900);
        let waits: Vec<u64> = (0..8).map(|f| p.retry_after(f).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spaces_calls_and_never_bursts_to_catch_up() {
        let r = Arc::new(RateLimiter::new(10.0));
        let t0 = tokio::time::Instant::now();
        let mut starts = Vec::new();
        for _ in 0..5 {
            r.acquire().await;
            starts.push(t0.elapsed());
        }
        let ms: Vec<u128> = starts.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 100, 200, 300, 400]);
        // Concurrent callers are let through one interval apart, in order.
        let t1 = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.acquire().await;
                    t1.elapsed().as_millis()
                })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        got.sort();
        assert_eq!(got, [100, 200, 300, 400]);
        // A quiet period gives no burst credit beyond one call.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t2 = tokio::time::Instant::now();
        assert!(!r.acquire().await);
        assert!(r.acquire().await);
        assert_eq!(t2.elapsed().as_millis(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_reaches_rates_above_the_timer_resolution() {
        // 10,000/s with a 1 ms timer: 1,000 calls take 100 ms, not one tick each (1 s).
        let r = RateLimiter::new(10_000.0);
        let t0 = tokio::time::Instant::now();
        for _ in 0..1000 {
            r.acquire().await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(99) && took <= Duration::from_millis(102),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_wake_up_restarts_the_spacing() {
        // A caller that was scheduled but ran 500 ms late (a stalled runtime) does not let the
        // calls that queued behind it through at once.
        let r = RateLimiter::new(10.0);
        r.acquire().await;
        *r.next.lock().await -= Duration::from_millis(500);
        let t0 = tokio::time::Instant::now();
        r.acquire().await;
        r.acquire().await;
        assert_eq!(t0.elapsed().as_millis(), 100);
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        for _ in 0..100 {
            assert!(jitter("r", Duration::from_secs(30)) < Duration::from_secs(30));
        }
        assert_eq!(jitter("r", Duration::ZERO), Duration::ZERO);
    }

    /// A scripted STS: fails as many calls as it was told to, succeeds otherwise, and
    /// records when each call started (paused time since it was made).
    struct FakeSts {
        t0: tokio::time::Instant,
        latency: Duration,
        failures_left: Mutex<u32>,
        calls: Mutex<Vec<Duration>>,
    }

    /// What the fake's credentials last: with `policy(900)` they are refreshed 810 s to
    /// 840 s after they arrive.
    const LIFETIME: Duration = Duration::from_secs(1800);

    impl FakeSts {
        fn new(latency: Duration) -> Arc<Self> {
            Arc::new(FakeSts {
                t0: tokio::time::Instant::now(),
                latency,
                failures_left: Mutex::new(0),
                calls: Mutex::new(Vec::new()),
            })
        }

        fn fail_next(&self, n: u32) {
            *self.failures_left.lock().unwrap() += n;
        }

        /// Call start times, in seconds.
        fn calls(&self) -> Vec<f64> {
            let calls = self.calls.lock().unwrap();
            calls.iter().map(Duration::as_secs_f64).collect()
        }
    }

    impl AssumeRole for FakeSts {
        fn assume_role(
            &self,
            _key: &CredKey,
            _session: &str,
            _duration: Duration,
        ) -> impl Future<Output = Result<Credentials, StsError>> + Send {
            self.calls.lock().unwrap().push(self.t0.elapsed());
            let fail = {
                let mut left = self.failures_left.lock().unwrap();
                let fail = *left > 0;
                *left = left.saturating_sub(1);
                fail
            };
            let latency = self.latency;
            async move {
                tokio::time::sleep(latency).await;
                if fail {
                    return Err(StsError {
                        code: "Throttling".into(),
                        message: "scripted failure".into(),
                    });
                }
                Ok(Credentials {
                    access_key_id: "AKIAFAKE".into(),
                    secret_access_key: "secret".into(),
                    session_token: "token".into(),
                    // Wall clock: the manager measures the lifetime against it.
                    expiration: SystemTime::now() + LIFETIME,
                })
            }
        }
    }

    /// A manager over `sts` and one slot for it (kept alive by the caller: timers hold only
    /// a weak reference).
    fn start(sts: &Arc<FakeSts>) -> Arc<CredSlot> {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics =
            ResolverMetrics::register(&mut prometheus_client::registry::Registry::default());
        tokio::spawn(run(rx, sts.clone(), Arc::new(policy(900)), metrics));
        let key = CredKey {
            role_arn: "arn:aws:iam::123456789012:role/a".into(),
            external_id: None,
            session: None,
        };
        CredSlot::new(key, Origin::default(), tx)
    }

    async fn until(sts: &FakeSts, secs: f64) {
        tokio::time::sleep_until(sts.t0 + Duration::from_secs_f64(secs)).await;
    }

    /// Waits (in paused time, at most `limit` seconds) until `n` calls have started.
    async fn calls_reach(sts: &FakeSts, n: usize, limit: u64) -> Vec<f64> {
        for _ in 0..limit * 10 {
            let calls = sts.calls();
            if calls.len() >= n {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("fewer than {n} calls within {limit} s: {:?}", sts.calls());
    }

    /// Whether the gap from one call's start to the next's is one refresh: the fake's
    /// latency, then 810 s to 840 s (the jitter is random, up to 30 s), with a second's
    /// slack for the lifetime being measured on the wall clock.
    fn refresh_gap(gap: f64, latency: f64) -> bool {
        gap >= latency + 809.0 && gap <= latency + 841.0
    }

    /// Whether the gap is one retry after `failures` consecutive failures: the latency, then
    /// the backoff plus a random jitter of up to a quarter of it.
    fn retry_gap(gap: f64, latency: f64, failures: u32) -> bool {
        let backoff = policy(900).retry_after(failures).as_secs_f64();
        gap >= latency + backoff - 1e-3 && gap <= latency + backoff * 1.25 + 1e-3
    }

    /// Samples `slot`'s pending refreshes every 250 ms of paused time until `stop` is
    /// called, and returns the samples that were not exactly one (time, count).
    struct Watch {
        stop: Arc<std::sync::atomic::AtomicBool>,
        task: tokio::task::JoinHandle<(usize, Vec<(f64, usize)>)>,
    }

    impl Watch {
        fn start(sts: &Arc<FakeSts>, slot: &Arc<CredSlot>) -> Watch {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (sts, slot, flag) = (sts.clone(), slot.clone(), stop.clone());
            let task = tokio::spawn(async move {
                let mut wrong = Vec::new();
                let mut samples = 0;
                while samples < 200_000 && !flag.load(Ordering::Relaxed) {
                    let n = pending_refreshes(&slot);
                    if n != 1 && wrong.len() < 20 {
                        wrong.push((sts.t0.elapsed().as_secs_f64(), n));
                    }
                    samples += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                (samples, wrong)
            });
            Watch { stop, task }
        }

        /// Asserts every sample saw exactly one pending refresh, and that it sampled at all.
        async fn stop(self) {
            self.stop.store(true, Ordering::Relaxed);
            let (samples, wrong) = self.task.await.unwrap();
            assert!(samples > 1_000, "only {samples} samples");
            assert!(wrong.is_empty(), "not one pending refresh at {wrong:?}");
        }
    }

    fn gaps(calls: &[f64]) -> Vec<f64> {
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// STS answering after `latency`: a pod's first request fails, a second request comes
    /// at `request_at` s (paused time) and succeeds; the call times up to `end` s, with the
    /// one-pending-refresh invariant watched throughout.
    async fn failure_then_request(latency: Duration, request_at: f64, end: f64) -> Vec<f64> {
        let sts = FakeSts::new(latency);
        let slot = start(&sts);
        sts.fail_next(1);
        slot.request();
        let watch = Watch::start(&sts, &slot);
        until(&sts, request_at).await;
        slot.request();
        until(&sts, end).await;
        watch.stop().await;
        sts.calls()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_request_during_the_retry_wait_leaves_one_refresh_chain() {
        // Fails at 1 s; its retry is due at 3 s to 3.5 s. The second request succeeds at
        // 2.5 s, before the retry is due: the retry must do nothing. Refreshes come 811 s to
        // 841 s apart: five of them by the end, and never a sixth.
        let calls = failure_then_request(Duration::from_secs(1), 1.5, 2.5 + 5.0 * 841.0).await;
        assert_eq!(calls.len(), 2 + 5, "calls at {calls:?}");
        assert_eq!(&calls[..2], [0.0, 1.5], "calls at {calls:?}");
        assert!(
            gaps(&calls[1..]).iter().all(|g| refresh_gap(*g, 1.0)),
            "calls at {calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_firing_during_a_fetch_does_nothing_and_the_fetch_rearms() {
        // Fails at 5 s; its retry is due at 7 s to 7.5 s, while the second request's fetch
        // (6 s to 11 s) runs. Refreshes come 815 s to 845 s apart: three of them by the end,
        // and never a fourth.
        let calls = failure_then_request(Duration::from_secs(5), 6.0, 11.0 + 3.0 * 846.0).await;
        assert_eq!(calls.len(), 2 + 3, "calls at {calls:?}");
        assert_eq!(&calls[..2], [0.0, 6.0], "calls at {calls:?}");
        assert!(
            gaps(&calls[1..]).iter().all(|g| refresh_gap(*g, 5.0)),
            "calls at {calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_request_during_an_outage_restarts_the_backoff_and_replaces_the_retry() {
        let sts = FakeSts::new(Duration::from_secs(1));
        let slot = start(&sts);
        slot.request();
        let watch = Watch::start(&sts, &slot);
        until(&sts, 100.0).await;
        // The refresh fails, then its retries (the pod's call among them): nine failures.
        sts.fail_next(9);
        let calls = calls_reach(&sts, 4, 2_000).await;
        let second_retry = calls[3];
        // Mid-wait for the third retry, due 8 s to 10 s after the second fails.
        until(&sts, second_retry + 3.0).await;
        slot.request();
        // The backoff starts over after the pod's failure (2 s, 4 s, … 60 s), the superseded
        // retry never calls, and after the ninth failure a success and a refresh follow.
        let calls = calls_reach(&sts, 11, 2_000).await;
        until(&sts, calls[10] + 1.0 + 841.0 + 0.5).await;
        watch.stop().await;
        let calls = sts.calls();
        assert_eq!(calls.len(), 12, "calls at {calls:?}");
        let g = gaps(&calls);
        assert!(refresh_gap(g[0], 1.0), "calls at {calls:?}");
        for (i, failures) in [(1, 0), (2, 1)] {
            assert!(
                retry_gap(g[i], 1.0, failures),
                "gap {i}: calls at {calls:?}"
            );
        }
        assert_eq!(calls[4], second_retry + 3.0, "calls at {calls:?}");
        for (i, failures) in [(4, 0), (5, 1), (6, 2), (7, 3), (8, 4), (9, 5)] {
            assert!(
                retry_gap(g[i], 1.0, failures),
                "gap {i}: calls at {calls:?}"
            );
        }
        assert!(refresh_gap(g[10], 1.0), "calls at {calls:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_refresh_chain_survives_failures_pod_requests_and_outages() {
        let sts = FakeSts::new(Duration::from_secs(1));
        let slot = start(&sts);
        // A failure, and a pod's request during the retry wait that recovers.
        sts.fail_next(1);
        slot.request();
        let watch = Watch::start(&sts, &slot);
        until(&sts, 1.5).await;
        slot.request();
        // Another pod's request between refreshes.
        until(&sts, 100.0).await;
        slot.request();
        // An outage of four failures from the next refresh on, then recovery.
        until(&sts, 200.0).await;
        sts.fail_next(4);
        let calls = calls_reach(&sts, 8, 2_000).await;
        let recovered = calls[7];
        // Refreshes come 811 s to 841 s apart: exactly ten more calls in 8,420 s; a second
        // chain would make about twenty.
        until(&sts, recovered + 10.0 * 842.0).await;
        watch.stop().await;
        let calls = sts.calls();
        assert_eq!(&calls[..3], [0.0, 1.5, 100.0], "calls at {calls:?}");
        let g = gaps(&calls);
        assert!(refresh_gap(calls[3] - 100.0, 1.0), "calls at {calls:?}");
        for (i, failures) in [(3, 0), (4, 1), (5, 2), (6, 3)] {
            assert!(
                retry_gap(g[i], 1.0, failures),
                "gap {i}: calls at {calls:?}"
            );
        }
        assert_eq!(calls.len(), 8 + 10, "calls at {calls:?}");
        assert!(
            g[7..].iter().all(|g| refresh_gap(*g, 1.0)),
            "calls at {calls:?}"
        );
    }
}
