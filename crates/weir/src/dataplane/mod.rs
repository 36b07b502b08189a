//! The data plane: accept, route, forward, and record one outcome per request. Reads
//! routing state through lock-free snapshots; never writes it and never waits for the disk.

pub mod body;
pub mod client;
pub mod outcome;
pub mod pool;
pub mod proxy;
pub mod routing;
pub mod sinks;
pub mod tls;
