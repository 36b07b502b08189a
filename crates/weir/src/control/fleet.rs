//! What the control plane needs from fleet mode, as a trait the `fleet` layer implements:
//! who may drive rollouts, the fleet-wide windows the guard judges, and what the API
//! shows about the fleet. A single weir has none of it and behaves as before.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::telemetry::window::Window;

/// Fleet mode as the controller, the guard and the driver see it.
pub trait FleetHooks: Send + Sync + std::fmt::Debug + 'static {
    /// Whether this instance holds the fleet's lead now (it alone runs the rollout
    /// driver); false as soon as it may have lost it.
    fn leads(&self) -> bool;

    /// Whether the fleet-wide sums are live (the store answers and peers' counters
    /// arrive): the guard judges them; else it judges this instance's own traffic.
    fn judging(&self) -> bool;

    /// The fleet-wide window of a pool (every instance's traffic summed), created on
    /// first use; `None` for a service without an SLO.
    fn window(&self, service: &str, pool: &str) -> Option<Arc<Window>>;

    /// Advance the fleet windows to `now` (called by the guard's loop, with its own).
    fn rotate(&self, now: Instant);

    /// The fleet as the API shows it.
    fn status(&self) -> FleetStatus;

    /// Re-seed the store from this instance's state, after a wipe or a restore that the
    /// instance refused to follow (an operator's decision, never automatic).
    fn reseed(&self, actor: Option<String>) -> Result<(), String>;
}

/// `GET /fleet`: the fleet seen from one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub name: String,
    pub instance: String,
    /// `reachable`, `syncing` (etcd answers; the state is not read yet), `unreachable`
    /// or `mismatch`.
    pub store: String,
    /// Why the store is not `reachable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The endpoint this instance talks to now.
    pub endpoint: String,
    /// The instance leading the fleet (running rollouts), as last seen.
    pub leader: Option<String>,
    /// Whether this instance leads.
    pub leads: bool,
    /// The store revision of the routing state this instance serves.
    pub applied_revision: i64,
    /// The newest store revision this instance has heard of.
    pub store_revision: i64,
    /// Whether the guard judges fleet-wide sums (else this instance's own traffic).
    pub judging_fleet: bool,
    pub members: Vec<FleetMember>,
}

/// One instance of the fleet, as its published record and counters show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetMember {
    pub instance: String,
    /// Its admin address as it announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    pub version: String,
    /// The routing-state revision it reported with its last counters.
    pub applied_revision: i64,
    /// How far behind the newest revision this instance heard of it was then.
    pub lag: i64,
    /// Milliseconds since its last counters arrived; `None` before any.
    pub last_seen_ms: Option<u64>,
    pub leader: bool,
}
