//! The rollout driver: the task that advances every progressing rollout by time and
//! evidence. The plan itself is pure ([`crate::control::rollout`]); this loop reads the
//! clock and the guard's verdicts, and asks the controller to apply a step when one is
//! due.

use std::sync::Arc;
use std::time::Duration;

use crate::control::controller::{Command, ControlError, Controller, RolloutVerb};
use crate::control::guard::Guard;
use crate::control::rollout::Evidence;
use crate::model::Source;

/// How often the driver looks for rollouts with something due.
const TICK: Duration = Duration::from_millis(100);

/// The rollout driver: advances every progressing rollout by time and evidence, through
/// the controller. Runs until its task is dropped.
pub(crate) async fn drive(controller: Arc<Controller>, guard: Arc<Guard>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // In a fleet only the leader drives; the others see its steps through the store.
        if !controller.drives_rollouts() {
            continue;
        }
        let due: Vec<(String, Evidence)> = {
            // Only services with a rollout: with thousands of services and none rolling
            // out, a round is one look at the controller's map.
            let rollouts = controller.rollouts();
            if rollouts.is_empty() {
                continue;
            }
            let table = controller.router().table();
            let now = controller.clock().now();
            rollouts
                .into_iter()
                .filter_map(|(name, rollout)| {
                    let snapshot = table.service(&name)?.snapshot();
                    let evidence = Evidence::of(
                        &snapshot,
                        &rollout.candidate,
                        guard.verdict(&name, &rollout.candidate),
                        None,
                    );
                    // Only bother the controller (and the disk) when a step is due.
                    rollout.tick(now, &evidence)?;
                    Some((name, evidence))
                })
                .collect()
        };
        for (service, evidence) in due {
            let controller = Arc::clone(&controller);
            let applied = tokio::task::spawn_blocking(move || {
                controller.apply(Command::Rollout {
                    service: service.clone(),
                    verb: RolloutVerb::Tick(evidence),
                    source: Source::Rollout,
                    actor: None,
                })
            })
            .await;
            match applied {
                Ok(Ok(change)) => tracing::info!(
                    "rollout {}: {}",
                    change.service,
                    change
                        .event
                        .as_ref()
                        .and_then(|e| e.reason.as_deref())
                        .unwrap_or("")
                ),
                Ok(Err(ControlError::Unchanged)) => {}
                Ok(Err(e)) => tracing::warn!("rollout step failed: {e}"),
                Err(e) => tracing::error!("rollout driver task failed: {e}"),
            }
        }
    }
}
