//! One-shot, blocking checks of what the control plane depends on, for `iamlet doctor`: the
//! API server with the RBAC the watchers need, and AssumeRole with the agent's own
//! credentials. They build the same clients the resolver runs with, so a check passes exactly
//! when the agent would work.

use crate::creds::CredKey;
use crate::creds::sts::{Sts, StsError, StsSetupError};
use crate::source::kube::{KubeOptions, KubeSetupError, client};
use std::time::Duration;
use thiserror::Error;

/// Bound on each API server or STS step: a doctor run answers in seconds.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why the API server check did not get as far as RBAC.
#[derive(Debug, Error)]
pub enum KubeProbeError {
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Setup(#[from] KubeSetupError),
    /// 401: the credentials were rejected.
    #[error("the API server rejected iamlet's credentials (401)")]
    Unauthorized,
    /// 403 on listing pods.
    #[error("RBAC denies listing pods (403: {0})")]
    Forbidden(String),
    #[error("the API server answered {code} ({message})")]
    Status { code: u16, message: String },
    #[error("cannot reach the API server: {0}")]
    Unreachable(String),
}

/// The API server answered the pod list; `denied` lists the verbs (`list pods`, …) that RBAC
/// refuses the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeAccess {
    pub denied: Vec<String>,
}

/// Lists one pod (of `opts.node`'s, if set) and asks SelfSubjectAccessReview for every verb
/// the watchers use (namespaces too with `namespaces`).
pub fn kubernetes(opts: &KubeOptions, namespaces: bool) -> Result<KubeAccess, KubeProbeError> {
    runtime()
        .map_err(KubeProbeError::Runtime)?
        .block_on(kube_access(opts, namespaces))
}

async fn kube_access(opts: &KubeOptions, namespaces: bool) -> Result<KubeAccess, KubeProbeError> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ListParams, PostParams};
    let client = client(opts, Some(TIMEOUT)).await?;
    let mut lp = ListParams::default().limit(1);
    if let Some(node) = &opts.node {
        lp = lp.fields(&format!("spec.nodeName={node}"));
    }
    if let Err(e) = kube::Api::<Pod>::all(client.clone()).list(&lp).await {
        return Err(match e {
            kube::Error::Api(s) if s.code == 401 => KubeProbeError::Unauthorized,
            kube::Error::Api(s) if s.code == 403 => KubeProbeError::Forbidden(s.message),
            kube::Error::Api(s) => KubeProbeError::Status {
                code: s.code,
                message: s.message,
            },
            other => KubeProbeError::Unreachable(other.to_string()),
        });
    }
    let mut needed = vec![("pods", "list"), ("pods", "watch")];
    if namespaces {
        needed.extend([("namespaces", "list"), ("namespaces", "watch")]);
    }
    let mut denied = Vec::new();
    for (resource, verb) in needed {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    resource: Some(resource.into()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match kube::Api::<SelfSubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
        {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push(format!("{verb} {resource}")),
            // An API server without the review API: the pod list above already answered.
            Err(_) => {}
        }
    }
    Ok(KubeAccess { denied })
}

/// Why AssumeRole could not be checked or failed.
#[derive(Debug, Error)]
pub enum StsProbeError {
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Setup(#[from] StsSetupError),
    #[error(transparent)]
    Call(#[from] StsError),
}

/// AssumeRole of `role_arn` (15 minutes, session `iamlet-doctor`) with the agent's default
/// credential chain, the metadata service at `metadata_addr` (`host:port`); the region used.
pub fn assume_role(metadata_addr: &str, role_arn: &str) -> Result<String, StsProbeError> {
    runtime().map_err(StsProbeError::Runtime)?.block_on(async {
        let sts = Sts::new(metadata_addr, TIMEOUT).await?;
        let key = CredKey {
            role_arn: role_arn.to_owned(),
            external_id: None,
            session: None,
        };
        sts.assume_role(&key, "iamlet-doctor", Duration::from_secs(900))
            .await?;
        Ok(sts.region().to_owned())
    })
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
