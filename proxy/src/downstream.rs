//! What a pod's connection did wrong: one variant per cause, each with the one status it is
//! answered with (none when the connection is just closed) and the one bounded label it is
//! counted under in `iamlet_errors_total{class="downstream",kind}`.

use crate::respond::{self, Status};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum DownstreamError {
    #[error("the request line does not end within --max-request-head")]
    UriTooLong,
    #[error("the request head is larger than --max-request-head")]
    HeadTooLarge,
    #[error("more header fields than the parser's slots")]
    TooManyHeaders,
    #[error("not an HTTP/1.x request")]
    Malformed,
    #[error("Transfer-Encoding (only Content-Length bodies are accepted)")]
    TransferEncoding,
    #[error("Content-Length given twice")]
    DuplicateContentLength,
    #[error("Content-Length is not a decimal length")]
    BadContentLength,
    #[error("a body on a request other than PUT")]
    BodyNotAllowed,
    #[error("the body is larger than --max-request-body")]
    BodyTooLarge,
    #[error("the path does not canonicalise")]
    InvalidPath,
    #[error("a method other than GET or HEAD on a metadata path")]
    Method,
    #[error("a token request that went through a proxy (X-Forwarded-For)")]
    TokenForwarded,
    #[error("a token request without a valid TTL")]
    TokenTtl,
    #[error("the request head did not arrive within --header-read-timeout")]
    HeaderTimeout,
    #[error("the client read nothing for --write-timeout")]
    WriteStalled,
}

impl DownstreamError {
    /// Every variant (the bounded label set).
    pub const ALL: [DownstreamError; 15] = [
        Self::UriTooLong,
        Self::HeadTooLarge,
        Self::TooManyHeaders,
        Self::Malformed,
        Self::TransferEncoding,
        Self::DuplicateContentLength,
        Self::BadContentLength,
        Self::BodyNotAllowed,
        Self::BodyTooLarge,
        Self::InvalidPath,
        Self::Method,
        Self::TokenForwarded,
        Self::TokenTtl,
        Self::HeaderTimeout,
        Self::WriteStalled,
    ];

    /// The answer's status; None: the connection is closed without one.
    pub fn status(self) -> Option<Status> {
        Some(match self {
            Self::UriTooLong => respond::URI_TOO_LONG,
            Self::HeadTooLarge | Self::TooManyHeaders => respond::HEADERS_TOO_LARGE,
            Self::Malformed
            | Self::TransferEncoding
            | Self::DuplicateContentLength
            | Self::BadContentLength
            | Self::BodyNotAllowed
            | Self::InvalidPath
            | Self::TokenTtl => respond::BAD_REQUEST,
            Self::BodyTooLarge => respond::PAYLOAD_TOO_LARGE,
            Self::Method => respond::METHOD_NOT_ALLOWED,
            Self::TokenForwarded => respond::FORBIDDEN,
            Self::HeaderTimeout | Self::WriteStalled => return None,
        })
    }

    /// The metric label (both head limits count as `head_too_large`).
    pub fn label(self) -> &'static str {
        match self {
            Self::UriTooLong | Self::HeadTooLarge => "head_too_large",
            Self::TooManyHeaders => "too_many_headers",
            Self::Malformed => "malformed",
            Self::TransferEncoding => "transfer_encoding",
            Self::DuplicateContentLength => "duplicate_content_length",
            Self::BadContentLength => "bad_content_length",
            Self::BodyNotAllowed => "body_not_allowed",
            Self::BodyTooLarge => "body_too_large",
            Self::InvalidPath => "invalid_path",
            Self::Method => "method",
            Self::TokenForwarded => "token_forwarded",
            Self::TokenTtl => "token_ttl",
            Self::HeaderTimeout => "header_timeout",
            Self::WriteStalled => "write_stalled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_statuses_are_client_errors() {
        let labels: std::collections::BTreeSet<_> =
            DownstreamError::ALL.iter().map(|e| e.label()).collect();
        assert_eq!(labels.len(), 14, "{labels:?}");
        for e in DownstreamError::ALL {
            assert!(
                e.label()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
            if let Some(s) = e.status() {
                assert!((400..500).contains(&s.0), "{e:?}: {s:?}");
            }
        }
        assert_eq!(DownstreamError::HeaderTimeout.status(), None);
        assert_eq!(
            DownstreamError::Method.status(),
            Some(respond::METHOD_NOT_ALLOWED)
        );
    }
}
