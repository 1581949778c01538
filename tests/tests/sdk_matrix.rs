//! The rest of the SDK matrix: aws-sdk-js v3 (`fromInstanceMetadata`, Node from the machine)
//! over IMDSv2 with IMDSv1 disabled client-side, and the SDKs that fall back to IMDSv1 doing
//! so when iamlet runs `--imdsv2=disabled` (the token PUT answered 403). Each asserts the
//! assumed-role ARN moto reports. Clients connect from 127.0.0.1, the `sdk` pod's IP.

use iamlet_e2e::rig::data as dataplane;

use dataplane::Rig;
use iamlet_e2e::process::{Output, run_bounded};
use iamlet_e2e::{FakeImds, drivers, is_ci, run_python, workspace_root};
use std::process::Command;
use std::time::Duration;

const ARN_PREFIX: &str = "arn:aws:sts::123456789012:assumed-role/sdk-role/";

fn env(r: &Rig, v1_disabled: bool) -> Vec<(&'static str, String)> {
    let mut v = vec![
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{}/", r.addr().port()),
        ),
        ("AWS_ENDPOINT_URL_STS", r.moto.endpoint()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ];
    if v1_disabled {
        v.push(("AWS_EC2_METADATA_V1_DISABLED", "true".into()));
    }
    v
}

fn metric(r: &Rig, sample: &str) -> f64 {
    dataplane::sample(r.addr(), sample)
}

/// Runs `node tests/js/caller.mjs` with only the given environment (plus PATH and HOME).
fn node_caller(envs: &[(&'static str, String)]) -> Option<Output> {
    let dir = workspace_root().join("tests/js");
    if !dir
        .join("node_modules/@aws-sdk/credential-providers")
        .is_dir()
    {
        assert!(
            !is_ci(),
            "tests/js/node_modules is missing in CI: tests/install-python-tools.sh runs `npm ci` there"
        );
        eprintln!("SKIPPED: aws-sdk-js v3 not installed (run tests/install-python-tools.sh)");
        return None;
    }
    let mut cmd = Command::new("node");
    cmd.arg("caller.mjs").current_dir(&dir).env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir());
    cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    Some(run_bounded(cmd, Duration::from_secs(60)))
}

fn aws_cli(envs: &[(&'static str, String)]) -> Output {
    let aws = workspace_root().join(".venv/bin/aws");
    assert!(
        aws.is_file(),
        "the AWS CLI is missing: run tests/install-python-tools.sh"
    );
    let mut cmd = iamlet_e2e::python::aws_caller_arn();
    cmd.env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir());
    cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    run_bounded(cmd, Duration::from_secs(60))
}

fn boto3(envs: &[(&'static str, String)]) -> Output {
    let e: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_python(
        "import boto3\nprint(boto3.client('sts').get_caller_identity()['Arn'])",
        &e,
        true,
    )
}

fn assert_arn(out: &Output, who: &str, r: &Rig) {
    assert!(
        out.success(),
        "{who} failed: {}\n{}\n{}",
        out.stderr,
        out.stdout,
        r.iamlet.log()
    );
    let arn = out.stdout.trim();
    assert!(arn.starts_with(ARN_PREFIX), "{who} got {arn:?}");
}

#[test]
fn aws_sdk_js_v3_over_imdsv2_gets_the_pods_assumed_role() {
    for driver in drivers() {
        // Tokens required: a tokenless request would be refused with 401.
        let r = Rig::start(driver, FakeImds::start(), &["--imdsv2=required"]);
        let Some(out) = node_caller(&env(&r, true)) else {
            return;
        };
        assert_arn(&out, &format!("aws-sdk-js v3 ({driver})"), &r);
        assert!(
            metric(&r, "iamlet_tokens_issued_total") >= 1.0,
            "no token was minted"
        );
        assert_eq!(
            metric(&r, "iamlet_token_rejections_total{outcome=\"missing\"}"),
            0.0
        );
    }
}

#[test]
fn sdks_fall_back_to_imdsv1_when_iamlet_disables_tokens() {
    for driver in drivers() {
        let r = Rig::start(driver, FakeImds::start(), &["--imdsv2=disabled"]);
        let e = env(&r, false);
        assert_arn(&boto3(&e), &format!("boto3 over IMDSv1 ({driver})"), &r);
        assert_arn(&aws_cli(&e), &format!("AWS CLI over IMDSv1 ({driver})"), &r);
        if let Some(out) = node_caller(&e) {
            assert_arn(&out, &format!("aws-sdk-js v3 over IMDSv1 ({driver})"), &r);
        }
        // Every token PUT was refused (403) and nothing was minted.
        assert_eq!(metric(&r, "iamlet_tokens_issued_total"), 0.0);
        assert!(
            metric(
                &r,
                "iamlet_http_requests_total{route=\"token\",status=\"4xx\"}"
            ) >= 1.0,
            "the SDKs should have tried IMDSv2 first"
        );
    }
}

#[test]
fn required_tokens_refuse_tokenless_requests_while_sdks_succeed() {
    let r = Rig::start(drivers()[0], FakeImds::start(), &["--imdsv2=required"]);
    let tokenless = dataplane::send_get(
        r.addr(),
        "/latest/meta-data/iam/security-credentials/sdk-role",
    );
    assert_eq!(tokenless.status, 401, "{}", tokenless.body_str());
    assert_arn(&boto3(&env(&r, false)), "boto3 with --imdsv2=required", &r);
    assert_arn(
        &aws_cli(&env(&r, false)),
        "AWS CLI with --imdsv2=required",
        &r,
    );
    if let Some(out) = node_caller(&env(&r, false)) {
        assert_arn(&out, "aws-sdk-js v3 with --imdsv2=required", &r);
    }
}
