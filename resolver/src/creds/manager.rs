//! The credential manager: runs AssumeRole for slots that ask, one call per key at a time,
//! renders the answer once, and refreshes ahead of expiry.

use crate::creds::slot::{CredAnswer, CredSlot};
use crate::creds::sts::{Sts, StsError, session_name};
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
    /// Prefix of session names (the node name).
    pub session_prefix: String,
}

impl CredPolicy {
    /// Margin added to the TTL when deciding to refresh.
    pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);
    /// Credentials with less than this left are never served (the JS SDK treats them as
    /// expired).
    pub const MIN_SERVED_LIFETIME: Duration = Duration::from_secs(5 * 60);

    pub fn session_duration(&self) -> Duration {
        (self.session_ttl * 2).clamp(Duration::from_secs(900), Duration::from_secs(43_200))
    }

    /// How long after issuance to refresh credentials that expire in `lifetime`.
    pub fn refresh_after(&self, lifetime: Duration, jitter: Duration) -> Duration {
        lifetime
            .saturating_sub(self.session_ttl + Self::REFRESH_MARGIN + jitter)
            .max(Duration::from_secs(1))
    }
}

/// Runs until every sender is gone.
pub(crate) async fn run(
    mut requests: mpsc::UnboundedReceiver<Arc<CredSlot>>,
    sts: Arc<Sts>,
    policy: Arc<CredPolicy>,
    metrics: ResolverMetrics,
) {
    while let Some(slot) = requests.recv().await {
        tokio::spawn(fetch(slot, sts.clone(), policy.clone(), metrics.clone()));
    }
}

async fn fetch(
    slot: Arc<CredSlot>,
    sts: Arc<Sts>,
    policy: Arc<CredPolicy>,
    metrics: ResolverMetrics,
) {
    let key = slot.key().clone();
    let session = session_name(&policy.session_prefix, &key.role_arn);
    let started = Instant::now();
    let result = sts
        .assume_role(&key, &session, policy.session_duration())
        .await;
    metrics.observe_assume_role(result.is_ok(), started.elapsed());
    let now = Instant::now();
    let wall = SystemTime::now();
    match result {
        Ok(creds) => {
            let lifetime = render::remaining(creds.expiration, wall);
            let serve_for = lifetime.saturating_sub(CredPolicy::MIN_SERVED_LIFETIME);
            tracing::info!(
                role = %key.role_arn,
                external_id = key.external_id.is_some(),
                access_key_id = %creds.access_key_id,
                expiration = %render::imds_timestamp(creds.expiration),
                session_name = %session,
                "credentials issued"
            );
            let answer = CredAnswer::Ready {
                body: credentials_document(&creds, wall),
                expiration: creds.expiration,
                serve_until: now + serve_for,
                access_key_id: creds.access_key_id.clone(),
            };
            slot.publish(Some(Arc::new(answer)));
            let after =
                policy.refresh_after(lifetime, jitter(&key.role_arn, Duration::from_secs(30)));
            schedule(&slot, after);
        }
        Err(StsError { code, message }) => {
            tracing::warn!(role = %key.role_arn, %code, %message, "AssumeRole failed");
            let still_valid = slot
                .current(now)
                .is_some_and(|a| matches!(&*a, CredAnswer::Ready { .. }));
            let retry_in = policy.error_ttl.max(Duration::from_secs(1));
            if still_valid {
                // Static stability: keep serving what we have; try again later.
                slot.publish(None);
            } else {
                let answer = CredAnswer::Failed {
                    status: 500,
                    body: error_document(&code, &message),
                    at: now,
                    retry_after: now + policy.error_ttl,
                };
                slot.publish(Some(Arc::new(answer)));
            }
            schedule(&slot, retry_in + jitter(&key.role_arn, retry_in / 4));
        }
    }
}

/// Re-requests the slot after `after`, unless it was dropped (no pod uses it any more).
fn schedule(slot: &Arc<CredSlot>, after: Duration) {
    let weak = Arc::downgrade(slot);
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        if let Some(slot) = weak.upgrade() {
            slot.request();
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

    fn policy(ttl_min: u64) -> CredPolicy {
        CredPolicy {
            session_ttl: Duration::from_secs(ttl_min * 60),
            error_ttl: Duration::ZERO,
            session_prefix: "n".into(),
        }
    }

    #[test]
    fn session_lasts_twice_the_ttl_within_sts_bounds() {
        assert_eq!(policy(15).session_duration(), Duration::from_secs(1800));
        assert_eq!(policy(1).session_duration(), Duration::from_secs(900));
        assert_eq!(policy(1000).session_duration(), Duration::from_secs(43_200));
    }

    #[test]
    fn refresh_leaves_more_than_ttl_plus_margin() {
        let p = policy(15);
        let life = Duration::from_secs(1800);
        let after = p.refresh_after(life, Duration::from_secs(10));
        assert_eq!(after, Duration::from_secs(1800 - 900 - 60 - 10));
        assert!(life - after > p.session_ttl + CredPolicy::REFRESH_MARGIN);
        // Credentials that already live shorter than the TTL are refreshed almost at once.
        assert_eq!(
            p.refresh_after(Duration::from_secs(600), Duration::ZERO),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        for _ in 0..100 {
            assert!(jitter("r", Duration::from_secs(30)) < Duration::from_secs(30));
        }
        assert_eq!(jitter("r", Duration::ZERO), Duration::ZERO);
    }
}
