//! Pre-rendered answers: the exact bytes the workers send for credentials and errors.
//!
//! Rendering happens once per issuance on the resolver thread; workers only copy bytes.

use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use time::macros::format_description;

/// Temporary credentials as STS returned them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// When STS says the credentials expire.
    pub expiration: SystemTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &imds_timestamp(self.expiration))
            .finish_non_exhaustive()
    }
}

/// Formats a time as IMDS does: `YYYY-MM-DDTHH:MM:SSZ`, UTC, whole seconds (fractions are
/// truncated, never rounded up, so an expiry is never reported later than it is).
pub fn imds_timestamp(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    };
    let dt = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    dt.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// The body of `GET …/security-credentials/<role>`, byte for byte as EC2's IMDS writes it.
pub fn credentials_document(creds: &Credentials, last_updated: SystemTime) -> Bytes {
    let doc = format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : {},\n  \"SecretAccessKey\" : {},\n  \"Token\" : {},\n  \"Expiration\" : \"{}\"\n}}",
        imds_timestamp(last_updated),
        json_string(&creds.access_key_id),
        json_string(&creds.secret_access_key),
        json_string(&creds.session_token),
        imds_timestamp(creds.expiration),
    );
    Bytes::from(doc)
}

/// The body of the container-credentials endpoint (what `AWS_CONTAINER_CREDENTIALS_FULL_URI`
/// points SDKs at): the four members every SDK requires, with a whole-second `Z` expiry
/// (JS and Rust parse only that form), and the role's account for SDKs that route by it.
pub fn container_document(creds: &Credentials, account_id: &str) -> Bytes {
    let doc = format!(
        "{{\"AccessKeyId\":{},\"SecretAccessKey\":{},\"Token\":{},\"Expiration\":\"{}\",\"AccountId\":{}}}",
        json_string(&creds.access_key_id),
        json_string(&creds.secret_access_key),
        json_string(&creds.session_token),
        imds_timestamp(creds.expiration),
        json_string(account_id),
    );
    Bytes::from(doc)
}

/// The account ID in a role ARN (`arn:aws:iam::123456789012:role/x`), empty if none.
pub fn account_of(arn: &str) -> &str {
    arn.split(':').nth(4).unwrap_or("")
}

/// The IMDS-style JSON error body served with a 5xx when no valid credentials exist.
pub fn error_document(code: &str, message: &str) -> Bytes {
    let doc = format!(
        "{{\n  \"Code\" : {},\n  \"Message\" : {}\n}}",
        json_string(code),
        json_string(message)
    );
    Bytes::from(doc)
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Seconds from `now` until `t`, zero when `t` has passed.
pub fn remaining(t: SystemTime, now: SystemTime) -> Duration {
    t.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn timestamps_are_whole_seconds_utc_with_literal_z() {
        // 2024-02-29T23:59:59.999Z from STS must not become 2024-03-01T00:00:00Z.
        assert_eq!(
            imds_timestamp(at(1_709_251_199, 999_000_000)),
            "2024-02-29T23:59:59Z"
        );
        assert_eq!(imds_timestamp(at(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(imds_timestamp(at(1_893_456_000, 1)), "2030-01-01T00:00:00Z");
    }

    #[test]
    fn credentials_document_matches_imds_bytes() {
        let creds = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "se/cr+et".into(),
            session_token: "tok\"en".into(),
            expiration: at(1_700_003_600, 123_456_789),
        };
        let body = credentials_document(&creds, at(1_700_000_000, 500_000_000));
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2023-11-14T22:13:20Z\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIAEXAMPLE\",\n  \"SecretAccessKey\" : \"se/cr+et\",\n  \"Token\" : \"tok\\\"en\",\n  \"Expiration\" : \"2023-11-14T23:13:20Z\"\n}"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Token"], "tok\"en");
    }

    #[test]
    fn the_container_document_has_exactly_what_every_sdk_reads() {
        let creds = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "se/cr+et".into(),
            session_token: "tok\"en".into(),
            expiration: at(1_700_003_600, 123_456_789),
        };
        let body = container_document(&creds, account_of("arn:aws:iam::210987654321:role/x"));
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\"AccessKeyId\":\"ASIAEXAMPLE\",\"SecretAccessKey\":\"se/cr+et\",\"Token\":\"tok\\\"en\",\"Expiration\":\"2023-11-14T23:13:20Z\",\"AccountId\":\"210987654321\"}"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Token"], "tok\"en");
    }

    #[test]
    fn error_document_is_json_with_code_and_message() {
        let body = error_document("AccessDenied", "not \"allowed\"");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Code"], "AccessDenied");
        assert_eq!(v["Message"], "not \"allowed\"");
    }

    #[test]
    fn debug_never_prints_secrets() {
        let creds = Credentials {
            access_key_id: "AK".into(),
            secret_access_key: "SECRET".into(),
            session_token: "TOKEN".into(),
            expiration: at(0, 0),
        };
        let s = format!("{creds:?}");
        assert!(!s.contains("SECRET") && !s.contains("TOKEN"), "{s}");
    }
}
