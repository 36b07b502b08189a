//! Telemetry: what live traffic looked like — per-pool sliding windows and the
//! Prometheus metrics, and the access log. Depends on `model` and `config` only.

pub(crate) mod access;
pub(crate) mod metrics;
pub(crate) mod window;
