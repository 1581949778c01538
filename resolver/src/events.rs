//! Kubernetes Events on pods: `IamRoleDenied` when a namespace restriction refuses a pod's
//! request, `IamCredentialError` when a pod is answered with an STS failure,
//! `IamRoleConflict` when a pod's role annotation overrides its ServiceAccount's different
//! role. The workers report through [`crate::Handle`], the resolver's state directly (a
//! bounded channel, never blocking); this task, on the resolver thread, rate-limits to one
//! Event per pod and reason per [`EVERY`], logs each one, and creates it through the
//! events.k8s.io API when a Kubernetes client exists.

use crate::creds::CredAnswer;
use crate::snapshot::Identity;
use ahash::AHashMap;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// At most one Event per pod and reason in this interval.
pub const EVERY: Duration = Duration::from_secs(60);
/// Reports queued between the workers and this task; more are dropped.
pub(crate) const QUEUE: usize = 1024;

/// The kinds of report (for the workers' two, the index is the slot in
/// `Identity::reported`; the resolver reports conflicts itself, without that slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReportKind {
    Denied = 0,
    CredentialError = 1,
    Conflict = 2,
}

impl ReportKind {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            ReportKind::Denied => "IamRoleDenied",
            ReportKind::CredentialError => "IamCredentialError",
            ReportKind::Conflict => "IamRoleConflict",
        }
    }

    /// The events.k8s.io `action` (what iamlet was doing).
    fn action(self) -> &'static str {
        match self {
            ReportKind::Denied => "ServeCredentials",
            ReportKind::CredentialError => "AssumeRole",
            ReportKind::Conflict => "ResolveRole",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) kind: ReportKind,
    pub(crate) identity: Arc<Identity>,
    /// The note, when the reporter wrote it (a conflict names both roles).
    pub(crate) detail: Option<String>,
}

/// One Event per (pod UID, kind) per `every`; forgets entries older than that.
#[derive(Debug)]
pub(crate) struct RateLimit {
    every: Duration,
    last: AHashMap<(String, ReportKind), Instant>,
}

impl RateLimit {
    pub(crate) fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: AHashMap::new(),
        }
    }

    pub(crate) fn allow(&mut self, uid: &str, kind: ReportKind, now: Instant) -> bool {
        if self.last.len() > 4096 {
            let every = self.every;
            self.last.retain(|_, t| now.duration_since(*t) < every);
        }
        match self.last.get_mut(&(uid.to_owned(), kind)) {
            Some(t) if now.duration_since(*t) < self.every => false,
            Some(t) => {
                *t = now;
                true
            }
            None => {
                self.last.insert((uid.to_owned(), kind), now);
                true
            }
        }
    }
}

/// The Event's note: the denial reason, or the STS error the pod was answered with (and,
/// for a door other than IMDS, which door and token, in parentheses).
pub(crate) fn note(report: &Report) -> String {
    let id = &report.identity;
    let via = match (report.kind, &report.detail) {
        (ReportKind::Denied | ReportKind::CredentialError, Some(via)) => format!(" ({via})"),
        _ => String::new(),
    };
    let text = match report.kind {
        ReportKind::Denied => id
            .denied
            .as_deref()
            .unwrap_or("the pod's role is not allowed")
            .to_owned(),
        ReportKind::CredentialError => {
            let role = id.role.as_ref();
            let arn = role.map_or("<none>", |r| r.arn.as_str());
            let why = role
                .and_then(|r| r.slot.last())
                .and_then(|a| match &*a {
                    // `code: message`, as STS (or the local failure) said it.
                    CredAnswer::Failed { error, .. } => Some(error.to_string()),
                    CredAnswer::Ready { .. } => None,
                })
                .unwrap_or_else(|| "unknown error".into());
            format!("AssumeRole of {arn} failed: {why}")
        }
        ReportKind::Conflict => report
            .detail
            .clone()
            .unwrap_or_else(|| "the pod's role annotation overrides its ServiceAccount's".into()),
    } + &via;
    // events.k8s.io limits the note to 1 kB.
    let mut end = text.len().min(1000);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Creates Events for reports until every sender is gone. `client` is `None` in local mode
/// (`--pods-from`): the reports are only logged.
pub(crate) async fn run(
    mut rx: mpsc::Receiver<Report>,
    client: Option<kube::Client>,
    instance: String,
) {
    let recorder = client.map(|c| {
        Recorder::new(
            c,
            Reporter {
                controller: "iamlet".into(),
                instance: Some(instance),
            },
        )
    });
    let mut limit = RateLimit::new(EVERY);
    while let Some(report) = rx.recv().await {
        let id = &report.identity;
        if !limit.allow(&id.uid, report.kind, Instant::now()) {
            continue;
        }
        let note = note(&report);
        let reason = report.kind.reason();
        tracing::warn!(namespace = %id.namespace, pod = %id.pod, reason, note = %note, "pod event");
        let Some(recorder) = &recorder else { continue };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: report.kind.action().into(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(id.pod.clone()),
            namespace: Some(id.namespace.clone()),
            uid: Some(id.uid.clone()),
            ..Default::default()
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason, pod = %id.pod, "cannot create the Kubernetes Event (RBAC needs create/patch on events.k8s.io events)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_pod_and_kind_per_interval() {
        let mut l = RateLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(l.allow("a", ReportKind::Denied, t0));
        assert!(!l.allow("a", ReportKind::Denied, t0 + Duration::from_secs(59)));
        assert!(l.allow("a", ReportKind::CredentialError, t0));
        assert!(l.allow("b", ReportKind::Denied, t0));
        assert!(l.allow("a", ReportKind::Denied, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn the_denied_note_is_the_reason_and_fits_the_api_limit() {
        let id = Identity::new(
            "u".into(),
            "ns".into(),
            "p".into(),
            None,
            Some(Arc::from("é".repeat(800).as_str())),
        );
        let n = note(&Report {
            kind: ReportKind::Denied,
            identity: Arc::new(id),
            detail: None,
        });
        assert!(n.len() <= 1000 && n.starts_with('é'));
    }

    #[test]
    fn the_credential_error_note_names_the_sts_code_and_message() {
        use crate::creds::sts::StsError;
        use crate::creds::{CredKey, CredSlot, Origin};
        use crate::snapshot::RoleEntry;
        let arn = "arn:aws:iam::123456789012:role/app";
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let key = CredKey {
            role_arn: arn.into(),
            external_id: None,
            session: None,
        };
        let slot = CredSlot::new(key, Origin::default(), tx);
        let identity = |slot: &Arc<CredSlot>| {
            let role = RoleEntry {
                arn: arn.into(),
                listing: "app".into(),
                slot: slot.clone(),
            };
            Arc::new(Identity::new(
                "u".into(),
                "ns".into(),
                "p".into(),
                Some(Arc::new(role)),
                None,
            ))
        };
        let report = |identity, detail: Option<&str>| Report {
            kind: ReportKind::CredentialError,
            identity,
            detail: detail.map(Into::into),
        };
        assert_eq!(
            note(&report(identity(&slot), None)),
            format!("AssumeRole of {arn} failed: unknown error")
        );
        let now = Instant::now();
        // A message with JSON's special characters: the note has it as STS said it.
        let message = r#"User: arn:aws:sts::1:assumed-role/node/i-1 is not authorized to perform: sts:AssumeRole on "app""#;
        slot.publish(Some(Arc::new(CredAnswer::Failed {
            status: 500,
            body: crate::render::error_document("AccessDenied", message),
            error: StsError {
                code: "AccessDenied".into(),
                message: message.into(),
            },
            at: now,
            retry_after: now,
        })));
        assert_eq!(
            note(&report(identity(&slot), Some("container door"))),
            format!("AssumeRole of {arn} failed: AccessDenied: {message} (container door)")
        );
    }
}
