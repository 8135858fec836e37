#![no_main]
// See llm_ratelimit_fuzz::usage for the input format and the properties checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_ratelimit_fuzz::usage(data));
