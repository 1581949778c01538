//! The STS client: aws-sdk-sts over ring-only rustls, with the agent's default credential
//! chain. The agent's own IMDS lookups (region, node credentials) go to `--metadata-addr`.

use crate::creds::slot::CredKey;
use crate::render::Credentials;
use aws_config::meta::region::RegionProviderChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sts::error::ProvideErrorMetadata;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use std::future::Future;
use std::time::{Duration, SystemTime};
use thiserror::Error;

/// Errors building the STS client.
#[derive(Debug, Error)]
pub enum StsSetupError {
    #[error("invalid --metadata-addr {0:?}: {1}")]
    MetadataAddr(String, String),
    #[error(
        "no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION) in the agent's environment, or make the instance metadata at --metadata-addr reachable"
    )]
    NoRegion,
}

/// An AssumeRole failure, classified for the pod's answer and metrics.
#[derive(Debug, Clone, Error)]
#[error("{code}: {message}")]
pub struct StsError {
    /// The AWS error code (`AccessDenied`, `Throttling`, …) or a local one for transport
    /// failures (`ServiceUnavailable`).
    pub code: String,
    pub message: String,
}

/// What the manager needs from STS: one AssumeRole call. A trait so the manager's
/// scheduling can be driven by a scripted stand-in under paused time.
pub trait AssumeRole: Send + Sync {
    /// Calls AssumeRole for `key` with session name `session`, asking for `duration`.
    fn assume_role(
        &self,
        key: &CredKey,
        session: &str,
        duration: Duration,
    ) -> impl Future<Output = Result<Credentials, StsError>> + Send;
}

/// A configured STS client.
#[derive(Clone, Debug)]
pub struct Sts {
    client: aws_sdk_sts::Client,
    region: String,
}

impl Sts {
    /// Builds the client. `metadata_addr` is `host[:port]` of the instance metadata service.
    pub async fn new(metadata_addr: &str, timeout: Duration) -> Result<Sts, StsSetupError> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let provider = ProviderConfig::default().with_http_client(http.clone());
        let imds = aws_config::imds::Client::builder()
            .configure(&provider)
            .endpoint(format!("http://{metadata_addr}"))
            .map_err(|e| StsSetupError::MetadataAddr(metadata_addr.to_owned(), e.to_string()))?
            .build();
        let region = RegionProviderChain::first_try(
            aws_config::environment::region::EnvironmentVariableRegionProvider::new(),
        )
        .or_else(
            aws_config::imds::region::ImdsRegionProvider::builder()
                .imds_client(imds.clone())
                .build(),
        );
        let creds = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
            .configure(provider)
            .imds_client(imds)
            .build()
            .await;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(3)))
            .build();
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(region)
            .credentials_provider(creds)
            .timeout_config(timeouts)
            // The manager retries with its own backoff; one quick SDK retry covers a dropped
            // connection without making a waiting pod wait through three attempts.
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
            .load()
            .await;
        let region = conf
            .region()
            .map(Region::to_string)
            .ok_or(StsSetupError::NoRegion)?;
        Ok(Sts {
            client: aws_sdk_sts::Client::new(&conf),
            region,
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Calls AssumeRole for `key`.
    pub async fn assume_role(
        &self,
        key: &CredKey,
        session_name: &str,
        duration: Duration,
    ) -> Result<Credentials, StsError> {
        let tags = key.session.as_ref().map(|s| {
            s.tags
                .iter()
                .filter_map(|(k, v)| {
                    aws_sdk_sts::types::Tag::builder()
                        .key(k)
                        .value(v)
                        .build()
                        .ok()
                })
                .collect::<Vec<_>>()
        });
        let out = self
            .client
            .assume_role()
            .role_arn(&key.role_arn)
            .role_session_name(session_name)
            .set_external_id(key.external_id.clone())
            .set_tags(tags.filter(|t| !t.is_empty()))
            .duration_seconds(duration.as_secs().clamp(900, 43_200) as i32)
            .send()
            .await
            .map_err(|e| StsError {
                code: e.code().unwrap_or("ServiceUnavailable").to_owned(),
                message: e
                    .message()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("STS request failed: {}", error_chain(&e))),
            })?;
        let c = out.credentials.ok_or_else(|| StsError {
            code: "InvalidResponse".into(),
            message: "STS AssumeRole returned no credentials".into(),
        })?;
        let expiration = SystemTime::try_from(c.expiration).map_err(|_| StsError {
            code: "InvalidResponse".into(),
            message: "STS AssumeRole returned an invalid expiration".into(),
        })?;
        Ok(Credentials {
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            session_token: c.session_token,
            expiration,
        })
    }
}

impl AssumeRole for Sts {
    fn assume_role(
        &self,
        key: &CredKey,
        session: &str,
        duration: Duration,
    ) -> impl Future<Output = Result<Credentials, StsError>> + Send {
        // The inherent method: callers without the trait in scope keep calling it directly.
        Sts::assume_role(self, key, session, duration)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A node-wide STS role session name: `<prefix>-<role name>`, sanitised.
pub fn session_name(prefix: &str, role_arn: &str) -> String {
    let role = role_arn.rsplit('/').next().unwrap_or(role_arn);
    sanitize_session(&format!("{prefix}-{role}"))
}

/// An STS role session name: `[\w+=,.@-]`, 2..=64 characters.
pub fn sanitize_session(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    while s.len() < 2 {
        s.push('-');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_sanitised_and_bounded() {
        assert_eq!(
            session_name("node-1", "arn:aws:iam::1:role/team/app"),
            "node-1-app"
        );
        assert_eq!(
            session_name("ip-10-0-0-1.ec2.internal", "arn:aws:iam::1:role/a b"),
            "ip-10-0-0-1.ec2.internal-a-b"
        );
        let long = session_name(&"n".repeat(100), "arn:aws:iam::1:role/r");
        assert_eq!(long.len(), 64);
        assert_eq!(session_name("", "/"), "--");
    }
}
