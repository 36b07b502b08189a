//! The `weir` command line as a library, so that the integration tests drive `weir ctl`
//! and the demo the way the binary does. The product is the `weir` crate.

pub mod cli;
pub mod ctl;
pub mod demo;
pub mod manual;
pub mod signal;
pub mod traffic;
