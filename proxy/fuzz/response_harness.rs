//! The upstream answer framing of iamlet's pass-through (`iamlet::upstream::settle`), with the
//! invariants that must hold for any bytes a metadata service (or something posing as one)
//! sends. Shared by the cargo-fuzz target (`fuzz_targets/response.rs`) and the corpus replay
//! test (`proxy/tests/fuzz_corpus.rs`). A panic here is a bug.

use iamlet::upstream::{MAX_RESPONSE, Settled, settle};

/// Frames `data` as the answer to a GET and to a HEAD, and as it arrives in two reads.
pub fn check(data: &[u8]) {
    for head in [false, true] {
        check_one(data, head);
        if data.len() > 1 {
            // Whatever arrived first must not be taken for more than it is.
            let cut = data.len() / 2;
            let mut first = data[..cut].to_vec();
            if let Settled::Complete { total, .. } = settle(&mut first, head) {
                assert!(total <= first.len());
            }
        }
    }
}

fn check_one(data: &[u8], head: bool) {
    let mut buf = data.to_vec();
    match settle(&mut buf, head) {
        Settled::Complete {
            head_len,
            total,
            status,
            reusable,
            ..
        } => {
            // What is left after the skipped interim answers is a suffix of the input.
            assert!(data.ends_with(&buf));
            assert!(head_len <= total && total <= buf.len());
            assert!((200..=599).contains(&status), "status {status}");
            assert!(total - head_len <= MAX_RESPONSE);
            if head {
                assert_eq!(total, head_len, "a HEAD answer has no body");
                assert!(!reusable, "no connection is pooled after a HEAD");
            }
            // Pooled only when nothing follows the answer.
            if reusable {
                assert_eq!(total, buf.len());
            }
            // The head it framed is a complete HTTP response head.
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            assert_eq!(
                resp.parse(&buf[..head_len]),
                Ok(httparse::Status::Complete(head_len))
            );
            assert_eq!(resp.code, Some(status));
        }
        Settled::Partial | Settled::Invalid => assert!(data.ends_with(&buf)),
    }
}
