//! The control plane: the controller (the only writer of routing state), the store it
//! persists through, rollouts and judgement as pure logic, and the tasks that drive them
//! (guard, health, webhook).

pub(crate) mod analysis;
pub(crate) mod controller;
pub(crate) mod driver;
pub(crate) mod fleet;
pub(crate) mod freeze;
pub(crate) mod guard;
pub(crate) mod health;
pub mod judge;
pub(crate) mod release;
pub(crate) mod rollout;
pub(crate) mod stats;
pub(crate) mod store;
pub(crate) mod webhook;

#[cfg(test)]
mod loops_tests;
