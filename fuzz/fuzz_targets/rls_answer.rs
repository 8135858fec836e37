#![no_main]
// See llm_ratelimit_fuzz::rls_answer for the properties checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_ratelimit_fuzz::rls_answer(data));
