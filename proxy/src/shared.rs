//! What every worker shares, by concern: the settings fixed at start ([`Settings`], built by
//! `Config`), the handles the data plane calls (the resolver, the IMDSv2 token key, the
//! per-source connection cap, the metrics), the admin surface ([`Admin`]: the registry, the
//! `/metrics` render cache and [`Readiness`]), and the process's lifecycle ([`Lifecycle`]).

use crate::args::{Imdsv2Mode, MetadataPolicy};
use crate::fairness::SourceLimiter;
use crate::metrics::ProxyMetrics;
use crate::token::TokenKey;
use arc_swap::ArcSwapOption;
use iamlet_resolver::{Handle, RoleRules};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Everything the workers share.
pub struct Shared {
    pub settings: Settings,
    pub handle: Handle,
    pub token_key: TokenKey,
    /// The per-source-address connection cap, over all workers.
    pub sources: &'static SourceLimiter,
    pub metrics: ProxyMetrics,
    pub admin: Admin,
    pub life: Lifecycle,
}

/// The data plane's settings: made from the flags at start, never changed.
pub struct Settings {
    pub rules: RoleRules,
    pub upstream: UpstreamConfig,
    /// How long a request from an unknown IP waits for its pod (`--backoff-max-elapsed-time`).
    pub wait_ip: Duration,
    /// The audience service-account tokens must carry (`--token-audience`).
    pub token_audience: String,
    /// This node (`--node`): a token bound to another node is refused.
    pub node_name: Option<String>,
    pub debug: bool,
    /// Whether the app port also serves `/metrics` and `/debug/store`.
    pub admin_on_app_port: bool,
    pub limits: Limits,
    pub imdsv2: Imdsv2Mode,
    pub policy: MetadataPolicy,
    pub allow_paths: Vec<regex::Regex>,
    /// Forward `user-data` (`--allow-user-data`); refused by default.
    pub forward_user_data: bool,
    /// Forward the node's signed identity (`--allow-instance-identity-signature`).
    pub forward_identity_signature: bool,
    pub shutdown_grace: Duration,
}

/// Request and connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// A write that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    pub max_connections: usize,
    /// Of those, most held by sources that are not known pods (strangers): past it a
    /// stranger's new connection is closed at once, so strangers never take a pod's slot.
    pub max_stranger_connections: usize,
}

impl Limits {
    /// The strangers' share of `max_connections`: a sixteenth, at least 4 (and no more
    /// than the whole).
    pub fn stranger_share(max_connections: usize) -> usize {
        (max_connections / 16).max(4).min(max_connections)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8192,
            max_body: 1024,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_stranger_connections: Limits::stranger_share(4096),
        }
    }
}

/// Where and how the upstream metadata service is reached.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub addr: SocketAddr,
    /// Host header sent upstream.
    pub host: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// Whether the agent is ready, and if not, what it waits for: one answer for `/ready` and
/// for kube2iam's `kube2iam_healthcheck_status`.
#[derive(Debug, Clone)]
pub struct Readiness {
    handle: Handle,
    /// With `--iptables`: the redirect rule is in.
    node_ready: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new(handle: Handle, node_ready: Arc<AtomicBool>) -> Self {
        Readiness { handle, node_ready }
    }

    /// What is missing (`None`: ready).
    pub fn missing(&self) -> Option<&'static str> {
        if !self.handle.is_ready() {
            Some("waiting for the first pod list")
        } else if !self.node_ready.load(Ordering::Acquire) {
            Some("waiting for the redirect rule (--iptables)")
        } else {
            None
        }
    }

    pub fn is_ready(&self) -> bool {
        self.missing().is_none()
    }
}

/// The admin surface: `/metrics` (rendered at most once per `max_age` in the whole process)
/// and readiness.
pub struct Admin {
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
    max_age: Duration,
    renders: Counter,
    /// The last rendering, shared by every scrape younger than `max_age`.
    cache: ArcSwapOption<RenderedMetrics>,
    /// Set while one worker renders; the others serve the previous rendering.
    rendering: AtomicBool,
}

/// One `/metrics` rendering, in both formats.
pub struct RenderedMetrics {
    pub at: Instant,
    pub openmetrics: String,
    pub classic: Vec<u8>,
}

impl Admin {
    /// `renders` counts renderings (`iamlet_metrics_renders_total`).
    pub fn new(
        registry: Registry,
        readiness: Readiness,
        max_age: Duration,
        renders: Counter,
    ) -> Self {
        Admin {
            registry: Arc::new(registry),
            readiness,
            max_age,
            renders,
            cache: ArcSwapOption::empty(),
            rendering: AtomicBool::new(false),
        }
    }

    /// `/metrics`: a flood of scrapes costs copies, not renders. While one worker renders,
    /// the others answer with the previous rendering (or render their own when there is none
    /// yet).
    pub fn rendered_metrics(&self) -> Arc<RenderedMetrics> {
        let now = Instant::now();
        let cached = self.cache.load_full();
        if let Some(c) = &cached
            && now.duration_since(c.at) < self.max_age
        {
            return c.clone();
        }
        let mine = self
            .rendering
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !mine && let Some(c) = cached {
            return c;
        }
        let r = Arc::new(self.render(now));
        if mine {
            self.cache.store(Some(r.clone()));
            self.rendering.store(false, Ordering::Release);
        }
        r
    }

    fn render(&self, at: Instant) -> RenderedMetrics {
        self.renders.inc();
        // Sized from the last rendering: with many roles the exposition is megabytes, and
        // growing a String by doubling would hold up to twice that.
        let hint = self
            .cache
            .load()
            .as_ref()
            .map_or(16 * 1024, |c| c.openmetrics.len());
        let mut openmetrics = String::with_capacity(hint + hint / 16);
        let _ = prometheus_client::encoding::text::encode(&mut openmetrics, &self.registry);
        let converted = crate::metrics::Classic::new(&openmetrics);
        let mut classic = Vec::with_capacity(converted.len());
        converted.write_into(&mut classic);
        RenderedMetrics {
            at,
            openmetrics,
            classic,
        }
    }
}

/// The process's lifecycle, as the workers see it.
pub struct Lifecycle {
    /// Set on SIGTERM/SIGINT: stop accepting, finish in-flight requests.
    pub stopping: Arc<AtomicBool>,
    /// Until when (nanoseconds after `born`; 0: not at all) the accept loops also sweep their
    /// listener's queue after a listener handover (`server::sweep`), for a connection whose
    /// wake-up the previous process took with it. Each loop checks it as it goes round.
    sweep_until: AtomicU64,
    born: Instant,
    /// Why a worker could not go on, if one could not.
    fatal: OnceLock<String>,
}

impl Lifecycle {
    pub fn new(stopping: Arc<AtomicBool>) -> Self {
        Lifecycle {
            stopping,
            sweep_until: AtomicU64::new(0),
            born: Instant::now(),
            fatal: OnceLock::new(),
        }
    }

    /// A worker cannot serve: records why (the first reason wins) and asks `main` to stop,
    /// with the SIGTERM it already waits for, so the redirect and the other workers stop
    /// the usual way rather than by an exit from a worker thread.
    pub fn fail(&self, why: String) {
        tracing::error!(error = %why, "a worker cannot serve; stopping");
        let _ = self.fatal.set(why);
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM);
    }

    /// The accept loops sweep their listeners' queues for `d` from now.
    pub fn sweep_for(&self, d: Duration) {
        let until = (self.born.elapsed() + d).as_nanos().max(1);
        self.sweep_until
            .store(u64::try_from(until).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether the accept loops sweep now (a clock read only until the sweep is over).
    pub fn sweeping(&self) -> bool {
        let until = self.sweep_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.born.elapsed().as_nanos() < u128::from(until) {
            return true;
        }
        // Over: later ticks need no clock read (unless another sweep was asked for meanwhile).
        let _ = self
            .sweep_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// Why the agent stopped, when a worker could not go on: `main` exits 1 with it.
    pub fn fatal(&self) -> Option<&String> {
        self.fatal.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iamlet_resolver::standalone::Standalone;

    #[test]
    fn readiness_says_what_is_missing_first_pod_list_then_redirect_rule() {
        let rules = RoleRules::new(Some("arn:aws:iam::123456789012:role/"), None).unwrap();
        let mut resolver = Standalone::new(rules, None);
        let rule_in = Arc::new(AtomicBool::new(false));
        let r = Readiness::new(resolver.handle(), rule_in.clone());
        assert_eq!(r.missing(), Some("waiting for the first pod list"));
        resolver.publish();
        assert_eq!(
            r.missing(),
            Some("waiting for the redirect rule (--iptables)")
        );
        assert!(!r.is_ready());
        rule_in.store(true, Ordering::Release);
        assert_eq!(r.missing(), None);
        assert!(r.is_ready());
    }

    #[test]
    fn a_sweep_lasts_until_its_deadline_and_then_reads_no_clock() {
        let life = Lifecycle::new(Arc::new(AtomicBool::new(false)));
        assert!(!life.sweeping());
        life.sweep_for(Duration::from_secs(3600));
        assert!(life.sweeping());
        life.sweep_for(Duration::ZERO);
        assert!(!life.sweeping());
        assert_eq!(
            life.sweep_until.load(Ordering::Relaxed),
            0,
            "reset once over"
        );
    }
}
