//! Roles from ServiceAccounts (`eks.amazonaws.com/role-arn`) on the IMDS path, in local mode:
//! the real `iamlet` binary reading a `kubectl get pods,namespaces,serviceaccounts -o yaml`
//! file, moto as STS, the fake IMDS upstream, raw clients from the pods' 127.0.0.x addresses
//! and boto3 as an unmodified client. The same rules against the real API server (watching
//! ServiceAccounts, Events, RBAC without `serviceaccounts`) are in `control_plane.rs`.

use iamlet_e2e::{FakeImds, Iamlet, Moto, Response, drivers, get_from, run_python, wait_until};
use std::net::Ipv4Addr;
use std::time::Duration;

const BASE: &str = "arn:aws:iam::123456789012:role/";
const LIST: &str = "/latest/meta-data/iam/security-credentials/";

/// A ServiceAccount `reader` with `sa_role`, one without a role, and three pods: `sdk` on
/// 127.0.0.1 (where boto3 connects from) runs as `reader` without an annotation, `own` runs
/// as `reader` with its own annotation, `plain` runs as the namespace's `default`.
fn pods(sa_role: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ServiceAccount
  metadata: {{name: reader, namespace: shop, uid: sa-reader, annotations: {{eks.amazonaws.com/role-arn: "{sa_role}"}}}}
- apiVersion: v1
  kind: ServiceAccount
  metadata: {{name: default, namespace: shop, uid: sa-default}}
- kind: Pod
  metadata: {{name: sdk, namespace: shop, uid: u-sdk}}
  spec: {{serviceAccountName: reader, containers: []}}
  status: {{phase: Running, podIP: 127.0.0.1}}
- kind: Pod
  metadata: {{name: own, namespace: shop, uid: u-own, annotations: {{iam.amazonaws.com/role: app-role}}}}
  spec: {{serviceAccountName: reader, containers: []}}
  status: {{phase: Running, podIP: 127.0.0.11}}
- kind: Pod
  metadata: {{name: plain, namespace: shop, uid: u-plain}}
  spec: {{serviceAccountName: default, containers: []}}
  status: {{phase: Running, podIP: 127.0.0.12}}
"#
    )
}

struct Rig {
    moto: Moto,
    _imds: FakeImds,
    iamlet: Iamlet,
}

fn rig(sa_role: &str, extra: &[&str]) -> Rig {
    let moto = Moto::start();
    let imds = FakeImds::start();
    let mut b = Iamlet::builder()
        .pods_yaml(&pods(sa_role))
        .sts(&moto)
        .imds(&imds)
        .driver(drivers()[0])
        .arg(format!("--base-role-arn={BASE}"))
        .arg("--default-role=fallback")
        .arg("--backoff-max-elapsed-time=2s");
    for a in extra {
        b = b.arg(*a);
    }
    Rig {
        iamlet: b.start(),
        moto,
        _imds: imds,
    }
}

impl Rig {
    fn get(&self, last: u8, path: &str) -> Response {
        get_from(Ipv4Addr::new(127, 0, 0, last), self.iamlet.addr(), path)
    }
}

#[test]
fn a_pod_without_an_annotation_gets_its_service_accounts_role_and_boto3_assumes_it() {
    let sa_role = format!("{BASE}sa-role");
    let r = rig(&sa_role, &[]);
    let listing = r.get(1, LIST);
    assert_eq!(
        (listing.status, listing.body_str().as_str()),
        (200, "sa-role"),
        "listed below the base ARN"
    );
    // Prefetched when the pod appeared; bounded wait for moto on a busy machine.
    wait_until!(
        Duration::from_secs(20),
        r.get(1, &format!("{LIST}sa-role")).status == 200,
        "the ServiceAccount role's credentials: {}",
        r.iamlet.log()
    );
    let endpoint = format!("http://127.0.0.1:{}/", r.iamlet.addr().port());
    let out = run_python(
        "import boto3\nprint(boto3.client('sts').get_caller_identity()['Arn'])",
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint.as_str()),
            ("AWS_ENDPOINT_URL_STS", r.moto.endpoint().as_str()),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ],
        true,
    );
    assert!(
        out.success(),
        "boto3: {}\n{}\n{}",
        out.stderr,
        out.stdout,
        r.iamlet.log()
    );
    let arn = out.stdout.trim();
    assert!(
        arn.starts_with("arn:aws:sts::123456789012:assumed-role/sa-role/"),
        "boto3 got {arn:?}"
    );

    // The pod's own annotation wins over its ServiceAccount's, and the conflict is reported
    // (local mode logs the Event it would create).
    assert_eq!(r.get(11, LIST).body_str(), "app-role");
    assert!(
        r.iamlet
            .wait_for_log("IamRoleConflict", Duration::from_secs(10)),
        "{}",
        r.iamlet.log()
    );
    let conflict = r
        .iamlet
        .log()
        .lines()
        .find(|l| l.contains("IamRoleConflict"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        conflict.contains("pod=own") && conflict.contains(&sa_role),
        "{conflict}"
    );
    // A ServiceAccount without the annotation: the default role.
    assert_eq!(r.get(12, LIST).body_str(), "fallback");

    // The file changes the ServiceAccount's role (another account's, listed in full): the
    // pod's answer follows without a restart.
    let cross = "arn:aws:iam::210987654321:role/cross-sa";
    let path = r.iamlet.pods_file_path().to_path_buf();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pods(cross)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let moved = wait_until!(
        Duration::from_secs(10),
        Some(r.get(1, LIST)).filter(|x| x.body_str() == cross),
        "the ServiceAccount's new role: {}",
        r.iamlet.log()
    );
    assert_eq!(moved.status, 200);
    assert_eq!(
        r.get(1, &format!("{LIST}sa-role")).status,
        403,
        "the old role is no longer this pod's"
    );
}

#[test]
fn an_empty_service_account_role_key_ignores_service_accounts() {
    // The opt-out for clusters whose ServiceAccounts carry the annotation for IRSA only.
    let r = rig(&format!("{BASE}sa-role"), &["--service-account-role-key="]);
    assert_eq!(r.get(1, LIST).body_str(), "fallback");
    assert_eq!(r.get(11, LIST).body_str(), "app-role");
}
