//! Token limits (TPM), the pure parts: what a request will cost, estimated from its body before
//! admission (`estimate`), what it did cost, read from the provider's `usage` after, whole or
//! streamed (`usage`, a whole body read from its end by `tail`), and one request's reservation against what its answer reports (`meter`).
//! Admission takes the estimate from the token bucket (`admission`); the host settles.

pub mod estimate;
pub mod meter;
pub mod model;
pub mod price;
pub mod tail;
pub mod usage;
