//! Telemetry: what live traffic looked like — per-pool sliding windows and the
//! Prometheus metrics. Depends on `model` and `config` only.

pub(crate) mod metrics;
pub(crate) mod shard;
pub(crate) mod window;
