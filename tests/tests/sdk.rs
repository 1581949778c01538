//! Unmodified SDK clients through iamlet over IMDSv2: boto3, the AWS CLI and aws-sdk-rust's
//! IMDS credentials provider each get the pod's credentials and call STS GetCallerIdentity on
//! moto, which names the assumed role. iamlet runs with `--imdsv2=required`, so a client that
//! did not use a token would fail; the Python clients also run with IMDSv1 disabled on their
//! side. Every client connects from 127.0.0.1, the `sdk` pod's IP.

use iamlet_e2e::rig::data as dataplane;

use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_sdk_sts::config::{BehaviorVersion, ProvideCredentials, Region};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use dataplane::Rig;
use iamlet_e2e::process::run_bounded;
use iamlet_e2e::{FakeImds, drivers, run_python, workspace_root};
use std::time::Duration;

const ARN_PREFIX: &str = "arn:aws:sts::123456789012:assumed-role/sdk-role/";

fn rig(driver: &str) -> Rig {
    Rig::start(driver, FakeImds::start(), &["--imdsv2=required"])
}

/// The environment an SDK in the `sdk` pod would see, pointed at iamlet and moto.
fn client_env(r: &Rig) -> Vec<(&'static str, String)> {
    vec![
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{}/", r.addr().port()),
        ),
        ("AWS_EC2_METADATA_V1_DISABLED", "true".into()),
        ("AWS_ENDPOINT_URL_STS", r.moto.endpoint()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ]
}

/// iamlet answered token PUTs and token-carrying requests, and refused none for lack of one.
fn assert_used_imdsv2(r: &Rig, ctx: &str) {
    let addr = r.addr();
    let issued = dataplane::sample(addr, "iamlet_tokens_issued_total");
    assert!(issued >= 1.0, "{ctx}: no IMDSv2 token was minted");
    assert_eq!(
        dataplane::sample(addr, "iamlet_token_rejections_total{outcome=\"missing\"}"),
        0.0,
        "{ctx}: a tokenless request was made"
    );
}

#[test]
fn boto3_over_imdsv2_gets_the_pods_assumed_role() {
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = rig(driver);
        let env = client_env(&r);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let script = "import boto3\nprint(boto3.client('sts').get_caller_identity()['Arn'])";
        let out = run_python(script, &env, true);
        assert!(
            out.success(),
            "{ctx}: boto3 failed: {}\n{}\n{}",
            out.stderr,
            out.stdout,
            r.iamlet.log()
        );
        let arn = out.stdout.trim();
        assert!(arn.starts_with(ARN_PREFIX), "{ctx}: boto3 got {arn:?}");
        assert_used_imdsv2(&r, &ctx);
    }
}

#[test]
fn aws_cli_over_imdsv2_gets_the_pods_assumed_role() {
    let aws = workspace_root().join(".venv/bin/aws");
    if !aws.is_file() {
        assert!(
            !iamlet_e2e::is_ci(),
            "{} missing: run tests/install-python-tools.sh",
            aws.display()
        );
        eprintln!("SKIPPED: {} missing", aws.display());
        return;
    }
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = rig(driver);
        let mut cmd = iamlet_e2e::python::aws_caller_arn();
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(client_env(&r));
        let out = run_bounded(cmd, Duration::from_secs(60));
        assert!(
            out.success(),
            "{ctx}: aws failed ({:?}): {}\n{}\n{}",
            out.code,
            out.stderr,
            out.stdout,
            r.iamlet.log()
        );
        let arn = out.stdout.trim();
        assert!(
            arn.starts_with(ARN_PREFIX),
            "{ctx}: the AWS CLI got {arn:?}"
        );
        assert_used_imdsv2(&r, &ctx);
    }
}

#[test]
fn aws_sdk_rust_imds_credentials_provider_gets_the_pods_assumed_role() {
    // The provider reads this from the real environment and would refuse to run.
    assert!(
        !std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")),
        "unset AWS_EC2_METADATA_DISABLED for this test: aws-sdk-rust's IMDS provider honours it"
    );
    for driver in drivers() {
        let ctx = format!("driver {driver}");
        let r = rig(driver);
        let endpoint = format!("http://127.0.0.1:{}", r.addr().port());
        let moto = r.moto.endpoint();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (access_key, arn) = rt.block_on(async {
            let work = async {
                // default-https-client is off: the HTTP client is given explicitly.
                let http = aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
                    .build_https();
                let conf = ProviderConfig::default().with_http_client(http.clone());
                let imds = aws_config::imds::Client::builder()
                    .configure(&conf)
                    .endpoint(&endpoint)
                    .expect("endpoint")
                    .build();
                let provider = ImdsCredentialsProvider::builder()
                    .configure(&conf)
                    .imds_client(imds)
                    .build();
                let creds = provider
                    .provide_credentials()
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: IMDS credentials: {e:?}"));
                let sts = aws_sdk_sts::Config::builder()
                    .behavior_version(BehaviorVersion::latest())
                    .region(Region::new("us-east-1"))
                    .endpoint_url(&moto)
                    .http_client(http)
                    .credentials_provider(provider)
                    .build();
                let who = aws_sdk_sts::Client::from_conf(sts)
                    .get_caller_identity()
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: GetCallerIdentity: {e:?}"));
                (
                    creds.access_key_id().to_string(),
                    who.arn().unwrap_or_default().to_string(),
                )
            };
            tokio::time::timeout(Duration::from_secs(60), work)
                .await
                .unwrap_or_else(|_| panic!("{ctx}: the SDK did not finish within 60 s"))
        });
        assert!(access_key.starts_with("ASIA"), "{ctx}: {access_key}");
        assert!(
            arn.starts_with(ARN_PREFIX),
            "{ctx}: aws-sdk-rust got {arn:?}\n{}",
            r.iamlet.log()
        );
        assert_used_imdsv2(&r, &ctx);
    }
}
