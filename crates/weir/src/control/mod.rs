//! The control plane: the controller (the only writer of routing state), the store it
//! persists through, rollouts and judgement as pure logic, and the tasks that drive them
//! (guard, health, webhook).

pub mod controller;
pub mod driver;
pub mod guard;
pub mod health;
pub mod judge;
pub mod rollout;
pub mod stats;
pub mod store;
pub mod webhook;

#[cfg(test)]
mod loops_tests;
