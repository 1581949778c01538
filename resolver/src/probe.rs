//! One-shot, blocking checks of what the control plane depends on, for `iamlet doctor`: the
//! API server with the RBAC the watchers and the Event recorder need, and AssumeRole with the
//! agent's own credentials. They build the same clients the resolver runs with, so a check
//! passes exactly when the agent would work.

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

/// The API server answered the pod list. `denied` lists what RBAC refuses the pod and
/// namespace watchers (`watch pods`, …: without them the agent cannot follow the node's
/// pods); `denied_service_accounts` what it refuses the ServiceAccount watcher (pods are
/// served, but get no role from their ServiceAccount's annotation); `denied_events` what it
/// refuses the Event recorder (`create events.events.k8s.io`: denials and STS failures are
/// only logged); `allowed` what it grants. Each is named as `kubectl auth can-i` takes it:
/// `VERB RESOURCE[.GROUP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeAccess {
    pub denied: Vec<String>,
    pub denied_service_accounts: Vec<String>,
    pub denied_events: Vec<String>,
    pub allowed: Vec<String>,
}

/// What the agent asks of the API server, as (API group, resource, verb): the watchers list
/// and watch pods, namespaces with `--namespace-restrictions`, and ServiceAccounts unless
/// `--service-account-role-key` is empty (metadata only, the same verbs); the Event recorder
/// (kube-runtime's `Recorder`, events.k8s.io/v1) creates an Event, and patches it when the
/// same report recurs (its series). Nothing else the ClusterRole grants is used: no `get`,
/// no core/v1 events.
pub const WATCHED: [(&str, &str, &str); 2] = [("", "pods", "list"), ("", "pods", "watch")];
pub const WATCHED_NAMESPACES: [(&str, &str, &str); 2] =
    [("", "namespaces", "list"), ("", "namespaces", "watch")];
pub const WATCHED_SERVICE_ACCOUNTS: [(&str, &str, &str); 2] = [
    ("", "serviceaccounts", "list"),
    ("", "serviceaccounts", "watch"),
];
pub const EVENTS: [(&str, &str, &str); 2] = [
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

/// Which watchers the agent runs besides the pods'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Watched {
    /// `--namespace-restrictions`.
    pub namespaces: bool,
    /// `--service-account-role-key` is not empty.
    pub service_accounts: bool,
}

/// `VERB RESOURCE[.GROUP]`, as `kubectl auth can-i` takes it.
fn name(group: &str, resource: &str, verb: &str) -> String {
    if group.is_empty() {
        format!("{verb} {resource}")
    } else {
        format!("{verb} {resource}.{group}")
    }
}

/// Lists one pod (of `opts.node`'s, if set) and asks SelfSubjectAccessReview for every verb
/// the agent uses ([`WATCHED`], [`WATCHED_NAMESPACES`] and [`WATCHED_SERVICE_ACCOUNTS`] as
/// `watched` says, [`EVENTS`]), in every namespace (a ClusterRole's grant).
pub fn kubernetes(opts: &KubeOptions, watched: Watched) -> Result<KubeAccess, KubeProbeError> {
    runtime()
        .map_err(KubeProbeError::Runtime)?
        .block_on(kube_access(opts, watched))
}

/// Whether the client's identity may `verb` `resource` in `group`, in every namespace, as
/// SelfSubjectAccessReview says; `None` when it cannot say (no review API, an error).
pub(crate) async fn may(
    client: &kube::Client,
    group: &str,
    resource: &str,
    verb: &str,
) -> Option<bool> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.into()),
                resource: Some(resource.into()),
                verb: Some(verb.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    kube::Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await
        .ok()
        .map(|r| r.status.as_ref().is_some_and(|s| s.allowed))
}

async fn kube_access(opts: &KubeOptions, watched: Watched) -> Result<KubeAccess, KubeProbeError> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ListParams;
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
    let mut needed: Vec<(&str, &str, &str)> = WATCHED.to_vec();
    if watched.namespaces {
        needed.extend(WATCHED_NAMESPACES);
    }
    if watched.service_accounts {
        needed.extend(WATCHED_SERVICE_ACCOUNTS);
    }
    needed.extend(EVENTS);
    let mut access = KubeAccess {
        denied: Vec::new(),
        denied_service_accounts: Vec::new(),
        denied_events: Vec::new(),
        allowed: Vec::new(),
    };
    for (group, resource, verb) in needed {
        match may(&client, group, resource, verb).await {
            Some(true) => access.allowed.push(name(group, resource, verb)),
            Some(false) => match resource {
                "events" => access.denied_events.push(name(group, resource, verb)),
                "serviceaccounts" => access
                    .denied_service_accounts
                    .push(name(group, resource, verb)),
                _ => access.denied.push(name(group, resource, verb)),
            },
            // An API server without the review API: the pod list above already answered.
            None => {}
        }
    }
    Ok(access)
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
