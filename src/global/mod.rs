//! One limit across many Envoy instances: the second gate, after the local buckets, asks a rate
//! limit service (Envoy's RLS v3 protocol; `rls/` is ours, envoyproxy/ratelimit and Limitador work
//! too). `proto` is the wire format, `gate` one worker's leases, waiters and settlements.

pub mod gate;
pub mod proto;
