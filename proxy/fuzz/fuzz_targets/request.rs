//! Fuzzes what iamlet does with a pod's bytes before any IO: httparse into the fixed header
//! array, body framing, keep-alive, head limits, path canonicalisation, routing, the
//! sensitive-path deny rule and IMDSv2 token/TTL parsing. See `../harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::check(data));
