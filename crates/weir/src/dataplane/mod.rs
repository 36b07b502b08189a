//! The data plane: accept, route, forward, and record one outcome per request. Reads
//! routing state through lock-free snapshots; never writes it and never waits for the disk.

pub(crate) mod body;
pub(crate) mod client;
pub(crate) mod outcome;
pub(crate) mod pace;
pub(crate) mod pool;
pub(crate) mod proxy;
pub(crate) mod routing;
pub(crate) mod sinks;
pub(crate) mod tls;
