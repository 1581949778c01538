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

/// Runs every file of `corpus/<name>` (at least `min` of them) through `check`; no input may
/// panic. Returns how many were replayed.
fn replay(name: &str, min: usize, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= min,
        "only {} corpus files in {}",
        files.len(),
        dir.display()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{} ({:?}) broke the {name} harness",
            f.display(),
            String::from_utf8_lossy(&data)
        );
    }
    files.len()
}

#[test]
fn every_corpus_input_replays_without_panics_and_keeps_the_invariants() {
    let n = replay("request", 50, harness::check);
    println!("replayed {n} corpus inputs");
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
    let n = replay("response", 16, response_harness::check);
    println!("replayed {n} upstream answers");
}
