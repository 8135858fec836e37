//! Each export runs one parser `n` times on the benchmark's bodies and returns a sum of what it
//! read (so nothing is optimized away); run.mjs times them.

use llm_ratelimit::tokens::estimate::{self, EstimateRules};
use llm_ratelimit::tokens::usage;
use std::hint::black_box;

/// What bench/post.lua sends (bench/chat.json without its last newline).
fn request() -> &'static [u8] {
    include_bytes!("../../chat.json").trim_ascii_end()
}

/// The mock provider's answer to it.
const ANSWER: &[u8] = include_bytes!("../answer.json");

/// The request's estimate, as `Request::body_read` makes it.
#[no_mangle]
pub extern "C" fn estimate(n: u32) -> u64 {
    let rules = EstimateRules::default();
    (0..n).map(|_| estimate::from_body(&rules, "/v1/chat/completions", black_box(request())).total()).sum()
}

/// The request body copied into a new `Vec`, as the host hands it over (the copy alone).
#[no_mangle]
pub extern "C" fn copy(n: u32) -> u64 {
    (0..n).map(|_| black_box(request().to_vec()).len() as u64).sum()
}

/// The answer's usage.
#[no_mangle]
pub extern "C" fn usage(n: u32) -> u64 {
    (0..n).map(|_| usage::from_body(black_box(ANSWER)).map_or(0, |u| u.total())).sum()
}

/// The usage of an answer that is nothing but its usage: what reading one costs beside scanning.
#[no_mangle]
pub extern "C" fn usage_only(n: u32) -> u64 {
    let body = br#"{"usage":{"completion_tokens":256,"prompt_tokens":198,"total_tokens":454}}"#;
    (0..n).map(|_| usage::from_body(black_box(body)).map_or(0, |u| u.total())).sum()
}
