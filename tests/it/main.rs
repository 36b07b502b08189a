//! The integration tests, one binary: real sockets on 127.0.0.1, real upstreams, real
//! third-party clients and servers (Prometheus, grpcio, Chromium) where a protocol is at
//! stake. One binary so the suite builds and links once; each module is one area, run
//! alone with `cargo test --test it <module>::` (e.g. `cargo test --test it guard::`).

// The wall-clock ban (clippy.toml) is for weir's decision logic; tests read it for
// unique names and for checking timestamps weir wrote.
#![allow(clippy::disallowed_methods)]

mod common;

mod admin;
mod analysis;
mod binary;
mod ctl;
mod dashboard;
#[cfg(feature = "fleet")]
mod fleet;
mod forwarding;
mod grpc;
mod guard;
mod health;
mod hostile;
mod identity;
mod judgement;
mod limits;
mod logs;
mod metrics;
mod outcomes;
mod pooling;
mod protocols;
mod readme;
mod releases;
mod rollout;
mod routing;
mod state;
mod targeting;
mod tls;
