//! Fuzzes how iamlet frames an upstream metadata answer: interim 1xx answers, Content-Length
//! framing, HEAD, and when a pooled connection may be reused. See `../response_harness.rs`.
#![no_main]

#[path = "../response_harness.rs"]
mod response_harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| response_harness::check(data));
