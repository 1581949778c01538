//! An unmodified aws-sdk-rust client for iamlet's tests: credentials from the SDK's default
//! chain (the container-credentials provider, when AWS_CONTAINER_CREDENTIALS_FULL_URI and
//! AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE are set), then STS GetCallerIdentity
//! (AWS_ENDPOINT_URL_STS points at moto); prints the caller's ARN. A process of its own, so
//! its environment is only what the test gives it.

use aws_config::BehaviorVersion;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let arn = rt.block_on(async {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .load()
            .await;
        let who = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            aws_sdk_sts::Client::new(&conf).get_caller_identity().send(),
        )
        .await;
        match who {
            Ok(Ok(out)) => out.arn().unwrap_or_default().to_owned(),
            Ok(Err(e)) => {
                eprintln!("GetCallerIdentity: {e:?}");
                std::process::exit(1)
            }
            Err(_) => {
                eprintln!("GetCallerIdentity: timed out");
                std::process::exit(1)
            }
        }
    });
    println!("{arn}");
}
