//! Replays the fuzzers' committed corpora through the same harnesses the cargo-fuzz targets
//! run: `corpus/request/` through `harness.rs` (no input may panic, and every canonical path
//! keeps its invariants: no `//`, `/./`, `/../`, `\`, `%2f`; stable; nothing forwarded names
//! a credential path), and `corpus/response/` through `response_harness.rs` (upstream answer
//! framing: 1xx skipped, HEAD bodiless, pooled only when read to the byte).

#[path = "../fuzz/harness.rs"]
mod harness;
#[path = "../fuzz/response_harness.rs"]
mod response_harness;

use std::path::Path;

#[test]
fn every_corpus_input_replays_without_panics_and_keeps_the_invariants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/request");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= 50,
        "only {} corpus files in {}",
        files.len(),
        dir.display()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let outcome = std::panic::catch_unwind(|| harness::check(&data));
        assert!(
            outcome.is_ok(),
            "{} ({:?}) broke the harness",
            f.display(),
            String::from_utf8_lossy(&data)
        );
    }
    println!("replayed {} corpus inputs", files.len());
}

#[test]
fn hand_picked_targets_keep_the_invariants() {
    // Canonical forms of nasty targets hold the invariants (checked inside).
    for t in [
        "/latest/meta-data/iam/security-credentials/x/../../../iam/info",
        "http://169.254.169.254//latest/./meta-data/%69am/info",
        "/latest/meta-data/tags/instance/Diamond",
        "/%7e/%41%2d/./../b/",
    ] {
        harness::check_target(t);
    }
    harness::check(b"GET /latest/meta-data/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
}

#[test]
fn every_upstream_answer_in_the_corpus_is_framed_within_the_invariants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/response");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 16, "only {} corpus files", files.len());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let outcome = std::panic::catch_unwind(|| response_harness::check(&data));
        assert!(
            outcome.is_ok(),
            "{} ({:?}) broke the response harness",
            f.display(),
            String::from_utf8_lossy(&data)
        );
    }
    println!("replayed {} upstream answers", files.len());
}
