//! Cluster mode: a kube-runtime watcher on this node's pods feeding the index. The initial
//! list is buffered and applied at once (`InitDone`); the first publish marks readiness.

use crate::StartError;
use crate::metrics::ResolverMetrics;
use crate::pod::{AnnotationKeys, PodInfo};
use crate::state::State;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use std::path::PathBuf;

/// How to reach the API server (kube2iam's flags).
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
    pub api_token: Option<String>,
    pub insecure: bool,
    /// Watch only pods with `spec.nodeName=<node>`.
    pub node: Option<String>,
}

async fn client(opts: &KubeOptions) -> Result<Client, StartError> {
    let err = |what: &str, e: String| StartError::Source(format!("{what}: {e}"));
    let mut config = if let Some(path) = &opts.kubeconfig {
        let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
            err(
                &format!("cannot read --kubeconfig {}", path.display()),
                e.to_string(),
            )
        })?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| err("invalid --kubeconfig", e.to_string()))?
    } else if let Some(server) = &opts.api_server {
        let uri = server.parse().map_err(|e| {
            err(
                &format!("invalid --api-server {server:?} (expected https://host:port)"),
                format!("{e}"),
            )
        })?;
        let mut c = kube::Config::new(uri);
        if let Some(token) = &opts.api_token {
            c.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
                .map_err(|e| err("invalid --api-token", e.to_string()))?;
        }
        c
    } else {
        kube::Config::infer().await.map_err(|e| {
            err("no Kubernetes API configuration (not in a cluster, no --kubeconfig or --api-server, and no --pods-from)", e.to_string())
        })?
    };
    if opts.insecure {
        config.accept_invalid_certs = true;
    }
    Client::try_from(config).map_err(|e| err("cannot build the Kubernetes client", e.to_string()))
}

/// Watches pods until the process ends; reports the first full list through `first`.
pub(crate) async fn run(
    opts: KubeOptions,
    keys: AnnotationKeys,
    mut state: State,
    metrics: ResolverMetrics,
    first: impl FnOnce(Result<(), StartError>),
) {
    let client = match client(&opts).await {
        Ok(c) => c,
        Err(e) => {
            first(Err(e));
            return;
        }
    };
    let api: Api<Pod> = Api::all(client);
    let mut cfg = watcher::Config::default();
    if let Some(node) = &opts.node {
        cfg = cfg.fields(&format!("spec.nodeName={node}"));
    }
    let mut first = Some(first);
    let mut init: Vec<PodInfo> = Vec::new();
    let mut stream = watcher(api, cfg).boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => init.clear(),
            Ok(Event::InitApply(p)) => init.extend(PodInfo::from_pod(&p, &keys)),
            Ok(Event::InitDone) => {
                let n = init.len();
                state.index.reset(init.drain(..));
                state.publish();
                tracing::info!(
                    pods = n,
                    node = opts.node.as_deref().unwrap_or("<all>"),
                    "pod list synced"
                );
                if let Some(f) = first.take() {
                    f(Ok(()));
                }
            }
            Ok(Event::Apply(p)) => {
                if let Some(info) = PodInfo::from_pod(&p, &keys) {
                    state.index.apply(info);
                    state.publish();
                }
            }
            Ok(Event::Delete(p)) => {
                if let Some(info) = PodInfo::from_pod(&p, &keys) {
                    state.index.delete(&info.uid);
                    state.publish();
                }
            }
            Err(e) => {
                metrics.source_error();
                tracing::warn!(error = %e, "pod watch failed; retrying");
            }
        }
    }
}

use watcher::watcher;
