//! iamlet's control plane. It learns the node's pods (from the Kubernetes API or a file),
//! decides each pod IP's role, keeps STS credentials ready for those roles, and publishes an
//! immutable IP → identity snapshot the data plane reads without locks. It serves no HTTP.

pub mod creds;
mod events;
pub mod handle;
pub mod index;
pub mod metrics;
pub mod pod;
pub mod probe;
pub mod render;
pub mod restrict;
pub mod roles;
pub mod snapshot;
pub mod source;
#[doc(hidden)]
pub mod standalone;
mod state;
pub mod tally;
pub mod tokens;

pub use creds::manager::CredPolicy;
pub use creds::{CredAnswer, CredKey, CredSlot};
pub use handle::{Handle, SnapshotReader};
pub use pod::AnnotationKeys;
pub use restrict::{NamespaceRestrictions, RestrictionFormat};
pub use roles::RoleRules;
pub use snapshot::{Identity, RoleEntry, Snapshot};
pub use state::SessionMode;

use metrics::ResolverMetrics;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use thiserror::Error;

/// Fatal start-up problems, each one sentence with the fix.
#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Sts(#[from] creds::sts::StsSetupError),
    #[error(transparent)]
    Kube(#[from] source::kube::KubeSetupError),
    #[error(transparent)]
    PodsFile(#[from] source::file::PodsFileError),
    #[error("cannot start the resolver thread: {0}")]
    Thread(std::io::Error),
    #[error("the resolver thread stopped before its first sync")]
    Stopped,
}

/// Where pods come from.
#[derive(Debug, Clone)]
pub enum PodSource {
    /// `--pods-from FILE`; with `node`, only pods scheduled there (or not scheduled yet).
    File { path: PathBuf, node: Option<String> },
    /// The Kubernetes API.
    Kube(source::kube::KubeOptions),
}

/// Everything the resolver needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub rules: RoleRules,
    pub keys: AnnotationKeys,
    /// `--namespace-restrictions` (with its key and format); `None` when off.
    pub restrictions: Option<NamespaceRestrictions>,
    pub source: PodSource,
    pub creds: CredPolicy,
    /// `host[:port]` of the instance metadata service, for the agent's own region and
    /// credentials lookups.
    pub metadata_addr: String,
    pub sts_timeout: Duration,
    pub sessions: SessionMode,
    /// Where service-account token keys come from (the container-credentials door).
    pub tokens: tokens::TokenConfig,
    /// `--cluster-name` (a session tag with `--session-tags`).
    pub cluster_name: Option<String>,
}

/// A running resolver.
pub struct Resolver {
    pub handle: Handle,
    first_sync: std_mpsc::Receiver<Result<(), StartError>>,
}

impl Resolver {
    /// Blocks until the first full list is published, or start-up failed.
    pub fn wait_first_sync(&self) -> Result<(), StartError> {
        self.first_sync.recv().unwrap_or(Err(StartError::Stopped))
    }

    /// As [`Resolver::wait_first_sync`], at most `timeout`: `None` when it has not happened
    /// yet (call again to keep waiting).
    pub fn wait_first_sync_for(&self, timeout: Duration) -> Option<Result<(), StartError>> {
        match self.first_sync.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Some(Err(StartError::Stopped)),
        }
    }
}

/// Starts the resolver on its own thread (`iamlet-resolver`, a current-thread tokio runtime).
pub fn start(config: Config, registry: &mut Registry) -> Result<Resolver, StartError> {
    let metrics = ResolverMetrics::register(registry);
    let watch = metrics::WatchMetrics::register(registry);
    let shared = handle::Shared::new();
    let key_metrics = tokens::KeyMetrics::register(registry, shared.keys.clone());
    let handle = Handle::new(shared.clone());
    let (tx, rx) = std_mpsc::channel();
    std::thread::Builder::new()
        .name("iamlet-resolver".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(StartError::Thread(e)));
                    return;
                }
            };
            rt.block_on(run(config, shared, metrics, watch, key_metrics, tx));
        })
        .map_err(StartError::Thread)?;
    Ok(Resolver {
        handle,
        first_sync: rx,
    })
}

async fn run(
    config: Config,
    shared: Arc<handle::Shared>,
    metrics: ResolverMetrics,
    watch: metrics::WatchMetrics,
    key_metrics: tokens::KeyMetrics,
    tx: std_mpsc::Sender<Result<(), StartError>>,
) {
    let Config {
        rules,
        keys: annotation_keys,
        restrictions,
        source,
        creds,
        metadata_addr,
        sts_timeout,
        sessions,
        tokens: token_config,
        cluster_name,
    } = config;
    let keys = shared.keys.clone();
    let sts = match creds::sts::Sts::new(&metadata_addr, sts_timeout).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Err(e.into()));
            return;
        }
    };
    tracing::info!(region = sts.region(), "STS client ready");
    let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(creds::manager::run(
        req_rx,
        Arc::new(sts),
        Arc::new(creds),
        metrics.clone(),
    ));
    let (report_tx, report_rx) = tokio::sync::mpsc::channel(events::QUEUE);
    let _ = shared.reports.set(report_tx);
    let st = state::State::new(rules, req_tx, shared, metrics.clone())
        .with_sessions(sessions)
        .with_cluster_name(cluster_name)
        .with_restrictions(restrictions);
    let first = move |r| {
        let _ = tx.send(r);
    };
    match source {
        PodSource::File { path, node } => {
            if let (Some(file), Some(issuer)) = (token_config.jwks_file, token_config.issuer) {
                tokio::spawn(tokens::from_file(file, issuer, keys));
            }
            tokio::spawn(events::run(report_rx, None, String::new()));
            source::file::run(path, node, annotation_keys, st, metrics, first).await
        }
        PodSource::Kube(opts) => {
            match source::kube::client(&opts, None).await {
                Ok(client) => {
                    if let Some(audience) = token_config.review_audience {
                        let (tx, rx) = tokio::sync::mpsc::channel(tokens::REVIEW_QUEUE);
                        let _ = keys.reviews.set(tx);
                        tokio::spawn(tokens::serve_reviews(client.clone(), audience, rx));
                    }
                    tokio::spawn(tokens::from_api_server(
                        client,
                        keys,
                        token_config.keys_cache,
                        key_metrics,
                    ));
                }
                // The pod watch below meets the same problem and reports it.
                Err(e) => tracing::debug!(error = %e, "no client for the service-account keys"),
            }
            source::kube::run(opts, annotation_keys, st, metrics, watch, report_rx, first).await
        }
    }
}
