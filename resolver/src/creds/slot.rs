//! A credential slot: the current answer for one credential key, read lock-free by workers
//! and filled by the resolver thread.

use crate::creds::sts::StsError;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};
use tokio::sync::{Notify, mpsc};

/// What identifies one STS session: kube2iam keyed by role only (kube2iam #98).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredKey {
    pub role_arn: String,
    pub external_id: Option<String>,
    /// `None`: one session per (role, external ID) on the node. `Some`: a per-pod session
    /// (`--session-name pod` or `--session-tags`).
    pub session: Option<PodSession>,
}

/// A per-pod session: its name and its session tags.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodSession {
    /// `<namespace>.<pod>`, sanitised for STS.
    pub name: String,
    /// `kubernetes-namespace`, `kubernetes-pod-name`, `kubernetes-service-account`,
    /// `kubernetes-pod-uid`.
    pub tags: Vec<(String, String)>,
}

/// Who a slot's credentials were first fetched for (for the audit log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub namespace: String,
    pub pod: String,
}

/// A rendered answer for a credential request.
#[derive(Debug)]
pub enum CredAnswer {
    /// Credentials: the exact response body, servable until `serve_until`.
    Ready {
        body: Bytes,
        /// The same credentials as the container-credentials endpoint answers them.
        container: Bytes,
        expiration: SystemTime,
        serve_until: Instant,
        access_key_id: String,
    },
    /// STS failed and nothing valid is cached: an IMDS-style JSON error body.
    Failed {
        status: u16,
        body: Bytes,
        /// The failure the body was rendered from, as data for whoever reports it (the
        /// `IamCredentialError` Event), so nothing parses the body back.
        error: StsError,
        at: Instant,
        retry_after: Instant,
    },
}

impl CredAnswer {
    /// Whether a worker may serve this answer at `now` without asking the resolver.
    pub fn servable(&self, now: Instant) -> bool {
        match self {
            CredAnswer::Ready { serve_until, .. } => now < *serve_until,
            CredAnswer::Failed { retry_after, .. } => now < *retry_after,
        }
    }
}

/// One key's answer and the machinery to wait for it.
pub struct CredSlot {
    key: CredKey,
    origin: Origin,
    hits: crate::metrics::RoleHitCounter,
    answer: ArcSwapOption<CredAnswer>,
    notify: Notify,
    /// Bit 0: a fetch is in flight. The rest: the generation, bumped whenever a fetch starts
    /// or a timer is armed, so only the newest timer may start a fetch and a key never runs
    /// two refresh chains. One word, so that checking and bumping are a single atomic step.
    state: AtomicU64,
    requests: mpsc::UnboundedSender<Arc<CredSlot>>,
}

const IN_FLIGHT: u64 = 1;
const NEXT_GENERATION: u64 = 2;

/// The generation a refresh or retry timer was armed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Generation(u64);

impl std::fmt::Debug for CredSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredSlot")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CredSlot {
    #[cfg(test)]
    pub(crate) fn new(
        key: CredKey,
        origin: Origin,
        requests: mpsc::UnboundedSender<Arc<CredSlot>>,
    ) -> Arc<Self> {
        Self::with_hits(key, origin, requests, Default::default())
    }

    pub(crate) fn with_hits(
        key: CredKey,
        origin: Origin,
        requests: mpsc::UnboundedSender<Arc<CredSlot>>,
        hits: crate::metrics::RoleHitCounter,
    ) -> Arc<Self> {
        Arc::new(CredSlot {
            key,
            origin,
            hits,
            answer: ArcSwapOption::empty(),
            notify: Notify::new(),
            state: AtomicU64::new(0),
            requests,
        })
    }

    pub fn key(&self) -> &CredKey {
        &self.key
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Counts a request answered from this slot's cache (`kube2iam_iam_cache_hits_total`).
    #[inline]
    pub fn hit(&self) {
        self.hits.inc();
    }

    /// The answer if it may be served now (lock-free; the hot path).
    pub fn current(&self, now: Instant) -> Option<Arc<CredAnswer>> {
        let a = self.answer.load_full()?;
        a.servable(now).then_some(a)
    }

    /// [`CredSlot::current`] without taking a reference count: the request path borrows
    /// the answer, so workers serving one role do not all write its count.
    pub fn current_ref(&self, now: Instant) -> Option<arc_swap::Guard<Option<Arc<CredAnswer>>>> {
        let a = self.answer.load();
        a.as_ref().is_some_and(|a| a.servable(now)).then_some(a)
    }

    /// The last answer whatever its age (for refresh decisions and debugging).
    pub fn last(&self) -> Option<Arc<CredAnswer>> {
        self.answer.load_full()
    }

    /// Waits until the resolver has an answer for this key, asking it to fetch one.
    /// Never polls: it sleeps on a notification. Callers bound it with their own timeout;
    /// dropping the future does not cancel the fetch.
    pub async fn get(self: &Arc<Self>) -> Arc<CredAnswer> {
        let mut asked_at: Option<Instant> = None;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            if let Some(a) = self.answer.load_full() {
                if a.servable(now) {
                    return a;
                }
                // A failure that happened after we asked is our answer, even with a zero
                // error TTL; asking again would spin on STS.
                if let (CredAnswer::Failed { at, .. }, Some(asked)) = (&*a, asked_at)
                    && *at >= asked
                {
                    return a;
                }
            }
            if asked_at.is_none() {
                asked_at = Some(now);
                self.request();
            }
            notified.await;
        }
    }

    /// Asks the resolver to fetch, unless a fetch for this key is already in flight.
    ///
    /// The fetch supersedes any pending refresh or retry: it arms its own timer when done.
    pub fn request(self: &Arc<Self>) {
        let started = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & IN_FLIGHT == 0).then(|| s.wrapping_add(NEXT_GENERATION) | IN_FLIGHT)
            })
            .is_ok();
        if started && self.requests.send(self.clone()).is_err() {
            self.state.fetch_and(!IN_FLIGHT, Ordering::AcqRel);
        }
    }

    /// For a timer armed with `armed` that has fired: starts its fetch if nothing has
    /// happened since it was armed (no fetch started, no newer timer armed); true when the
    /// caller now owns the fetch. A stale timer gets false and must do nothing.
    pub(crate) fn claim(&self, armed: Generation) -> bool {
        self.state
            .compare_exchange(
                armed.0,
                armed.0.wrapping_add(NEXT_GENERATION) | IN_FLIGHT,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Stores a new answer, ends the in-flight fetch and wakes every waiter. Returns the
    /// generation for the one timer the caller arms next; ending the fetch and starting that
    /// generation are one step, so a pod's request that starts a fetch right after makes
    /// the timer stale.
    pub(crate) fn publish(&self, answer: Option<Arc<CredAnswer>>) -> Generation {
        if let Some(a) = answer {
            self.answer.store(Some(a));
        }
        let next = |s: u64| (s & !IN_FLIGHT).wrapping_add(NEXT_GENERATION);
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(next(s)))
            .unwrap_or_else(|s| s);
        self.notify.notify_waiters();
        Generation(next(before))
    }

    /// Refreshes pending for this key, given the generations of its timers armed and not yet
    /// fired: a fetch in flight, or timers that are not stale. Exactly one once the key has
    /// been asked for.
    #[cfg(test)]
    pub(crate) fn pending_refreshes(&self, armed: impl Iterator<Item = Generation>) -> usize {
        let s = self.state.load(Ordering::Acquire);
        let live = armed.filter(|g| g.0 == s).count();
        (s & IN_FLIGHT) as usize + live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ready(valid_for: Duration) -> Arc<CredAnswer> {
        Arc::new(CredAnswer::Ready {
            body: Bytes::from_static(b"{}"),
            container: Bytes::from_static(b"{}"),
            expiration: SystemTime::now() + valid_for,
            serve_until: Instant::now() + valid_for,
            access_key_id: "AK".into(),
        })
    }

    fn key() -> CredKey {
        CredKey {
            role_arn: "arn:aws:iam::123456789012:role/a".into(),
            external_id: None,
            session: None,
        }
    }

    #[tokio::test]
    async fn concurrent_waiters_cause_one_request_and_all_get_the_answer() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let slot = CredSlot::new(key(), Origin::default(), tx);
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                tokio::spawn({
                    let s = slot.clone();
                    async move { s.get().await }
                })
            })
            .collect();
        let asked = rx.recv().await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            rx.try_recv().is_err(),
            "a second fetch was requested while one was in flight"
        );
        asked.publish(Some(ready(Duration::from_secs(60))));
        for w in waiters {
            assert!(matches!(&*w.await.unwrap(), CredAnswer::Ready { .. }));
        }
        assert!(slot.current(Instant::now()).is_some());
    }

    #[tokio::test]
    async fn a_failure_with_zero_ttl_is_returned_once_not_retried_in_a_loop() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let slot = CredSlot::new(key(), Origin::default(), tx);
        let w = tokio::spawn({
            let s = slot.clone();
            async move { s.get().await }
        });
        let asked = rx.recv().await.unwrap();
        let now = Instant::now();
        asked.publish(Some(Arc::new(CredAnswer::Failed {
            status: 500,
            body: Bytes::from_static(b"e"),
            error: StsError {
                code: "Throttling".into(),
                message: "e".into(),
            },
            at: now,
            retry_after: now,
        })));
        assert!(matches!(
            &*w.await.unwrap(),
            CredAnswer::Failed { status: 500, .. }
        ));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn expired_answers_are_not_current() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let slot = CredSlot::new(key(), Origin::default(), tx);
        slot.publish(Some(ready(Duration::ZERO)));
        assert!(slot.current(Instant::now()).is_none());
        assert!(slot.last().is_some());
    }

    #[test]
    fn only_the_newest_timer_may_start_a_fetch() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let slot = CredSlot::new(key(), Origin::default(), tx);
        slot.request();
        assert!(rx.try_recv().is_ok());
        // A failure arms a retry; a pod's request during the wait supersedes it.
        let retry = slot.publish(None);
        slot.request();
        assert!(rx.try_recv().is_ok());
        assert!(!slot.claim(retry), "a timer fired during a fetch");
        let refresh = slot.publish(Some(ready(Duration::from_secs(60))));
        assert!(
            !slot.claim(retry),
            "a superseded retry started a second chain"
        );
        assert!(slot.claim(refresh));
        assert!(!slot.claim(refresh), "one timer started two fetches");
        // The timer's fetch is in flight: pods' requests join it.
        slot.request();
        assert!(rx.try_recv().is_err());
        let next = slot.publish(None);
        assert_ne!(next, refresh);
        // A pod's request that starts a fetch outruns the timer armed just before it.
        slot.request();
        assert!(rx.try_recv().is_ok());
        assert!(!slot.claim(next));
    }
}
