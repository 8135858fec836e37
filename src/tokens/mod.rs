//! Token limits (TPM), the pure parts: what a request will cost, estimated from its body before
//! admission (`estimate`), and what it did cost, read from the provider's `usage` after, whole or
//! streamed (`usage`). Not wired into admission yet: the README's "Not built yet" says so.

pub mod estimate;
pub mod usage;
