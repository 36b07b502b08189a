//! The rollout driver: the task that advances every progressing rollout by time and
//! evidence. The plan itself is pure ([`crate::control::rollout`]); this loop reads the
//! clock, the guard's verdicts and the freeze windows, and asks the controller to apply
//! a step when one is due.
//!
//! It also makes the external checks a rollout asks for — analysis queries and webhook
//! calls ([`crate::control::analysis`]) — each on its own task with its own timeout, so
//! a slow Prometheus or webhook never delays a step of another rollout (or the guard).
//! Their results reach the rollout as commands, and so are journaled and persisted
//! like any other change.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{AnalysisTemplate, GuardMode, HookKind};
use crate::control::analysis::{self, Caller, Outcome, Standing, Tally};
use crate::control::controller::{Command, ControlError, Controller, RolloutVerb};
use crate::control::guard::Guard;
use crate::control::rollout::{Evidence, Rollout};
use crate::control::store::Event;
use crate::model::{EventKind, Source, Step};

/// How often the driver looks for rollouts with something due.
const TICK: Duration = Duration::from_millis(100);
/// How often a held promotion asks its confirm-promotion webhooks again.
const CONFIRM_RETRY: Duration = Duration::from_secs(1);

/// The rollout driver: advances every progressing rollout by time and evidence, through
/// the controller. Runs until its task is dropped.
pub(crate) async fn drive(controller: Arc<Controller>, guard: Arc<Guard>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let external = External::default();
    loop {
        tick.tick().await;
        // In a fleet only the leader drives; the others see its steps through the store.
        if !controller.drives_rollouts() {
            continue;
        }
        external.guard(&controller);
        let due: Vec<(String, Evidence)> = {
            // Only services with a rollout: with thousands of services and none rolling
            // out, a round is one look at the controller's map.
            let rollouts = controller.rollouts();
            if rollouts.is_empty() {
                continue;
            }
            let table = controller.router().table();
            let now = controller.clock().now();
            let mut due = Vec::new();
            for (name, rollout) in rollouts {
                if !rollout.phase.is_running() {
                    if rollout.hooks.post_rollout_pending {
                        external.hooks(&controller, &name, &rollout, HookKind::PostRollout);
                    }
                    continue;
                }
                let Some(service) = table.service(&name) else {
                    continue;
                };
                let snapshot = service.snapshot();
                let mut evidence = Evidence::of(
                    &snapshot,
                    &rollout.candidate,
                    guard.verdict(&name, &rollout.candidate),
                    None,
                );
                evidence.frozen = controller.freeze(&name).map(|f| f.describe());
                external.schedule(&controller, &name, &rollout, now, &evidence);
                // Only bother the controller (and the disk) when a step is due.
                if rollout.tick(now, &evidence).is_some() {
                    due.push((name, evidence));
                }
            }
            due
        };
        for (service, evidence) in due {
            apply(&controller, service, RolloutVerb::Tick(evidence)).await;
        }
    }
}

/// Apply a rollout verb from the driver (or one of its checks) off the async workers.
async fn apply(controller: &Arc<Controller>, service: String, verb: RolloutVerb) {
    let controller = Arc::clone(controller);
    let applied = tokio::task::spawn_blocking(move || {
        controller.apply(Command::Rollout {
            service,
            verb,
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

/// The external checks in flight, so that a slow one is not started twice.
#[derive(Default)]
struct External {
    caller: Caller,
    /// (service, check) pairs running now.
    running: Arc<Mutex<HashSet<(String, String)>>>,
    /// Per service: when its confirm-promotion webhooks were last asked, and whether
    /// the refusal was journaled (a held promotion asks every second; the journal
    /// records the first refusal, not each).
    confirm: Arc<Mutex<HashMap<String, (Instant, bool)>>>,
    /// The guard's analyses, per (service, template, candidate pool): the tally since
    /// the pool got traffic, and when it was last measured. In memory, as the guard's
    /// own judgement is: a restart starts the count again.
    guarded: Arc<Mutex<HashMap<GuardKey, (Tally, Instant)>>>,
    /// (service, template) pairs a running rollout names but the config no longer has
    /// (a reload took the template away): warned about once, not at every tick, while
    /// the step waits for the template to come back or an operator to move it on.
    missing: Mutex<HashSet<(String, String)>>,
}

/// A guard analysis: (service, template, candidate pool).
type GuardKey = (String, String, String);

/// Takes a check off the running set when its task ends, however it ends.
struct Running {
    set: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl Drop for Running {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl External {
    /// Mark `check` of `service` as running; `None` if it already is.
    fn claim(&self, service: &str, check: &str) -> Option<Running> {
        let key = (service.to_owned(), check.to_owned());
        let mut set = self.running.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(key.clone()).then(|| Running {
            set: Arc::clone(&self.running),
            key,
        })
    }

    /// Start whatever a running rollout needs now: its pre-rollout webhooks, a held
    /// promotion's confirmation, the analysis measurements that are due.
    fn schedule(
        &self,
        controller: &Arc<Controller>,
        service: &str,
        rollout: &Rollout,
        now: SystemTime,
        evidence: &Evidence,
    ) {
        if rollout.hooks.pre_rollout_pending {
            self.hooks(controller, service, rollout, HookKind::PreRollout);
            return;
        }
        if rollout.awaiting_confirmation(now, evidence) {
            self.confirm(controller, service, rollout);
        }
        if evidence.frozen.is_some() && rollout.freeze_override.is_none() {
            // Measurements would only pile up against a step that cannot move.
            return;
        }
        for (template, last) in rollout.running_analyses() {
            let key = (service.to_owned(), template.clone());
            let Some(t) = controller.analysis_template(service, &template) else {
                let mut missing = self.missing.lock().unwrap_or_else(|p| p.into_inner());
                if missing.insert(key) {
                    tracing::warn!(
                        "rollout {service}: analysis `{template}` is no longer in the config; \
                         its measurements wait until it is back (or promote, abort the rollout)"
                    );
                }
                continue;
            };
            self.missing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            let since = last.unwrap_or(rollout.started_at);
            if now < since + t.interval {
                continue;
            }
            let Some(running) = self.claim(service, &format!("analysis:{template}")) else {
                continue;
            };
            let background = !matches!(
                rollout.current_step(),
                Some(Step::Analysis { template: s }) if *s == template
            );
            // Load tests run with the step's measurements, before the query, so the
            // query sees the traffic they made.
            let hooks = if background {
                Vec::new()
            } else {
                controller
                    .webhooks(service)
                    .into_iter()
                    .filter(|h| h.kind == HookKind::Rollout)
                    .collect()
            };
            let (caller, controller) = (self.caller.clone(), Arc::clone(controller));
            let (service, payload, step, started) = (
                service.to_owned(),
                payload(service, rollout),
                rollout.step,
                rollout.started_at,
            );
            let (candidate, stable) = (rollout.candidate.clone(), rollout.stable.clone());
            tokio::spawn(async move {
                let _running = running;
                let calls = caller.call_all(hooks.iter(), &payload).await;
                let mut m = caller.measure(&t, &service, &candidate, &stable).await;
                if let Some(bad) = calls.iter().find(|c| !c.ok)
                    && m.outcome != Outcome::Error
                {
                    m.outcome = Outcome::Fail;
                    m.detail = format!(
                        "rollout webhook `{}` {}; {}",
                        bad.name, bad.detail, m.detail
                    );
                }
                m.webhooks = calls;
                let verb = RolloutVerb::Measured {
                    rollout: started,
                    step,
                    measurement: Box::new(m),
                };
                apply(&controller, service, verb).await;
            });
        }
    }

    /// The guard's analyses (`[service.slo] analysis`): measure each template on every
    /// candidate pool with traffic, rollout or not; past its failure limit the guard
    /// reverts the service (or, in dry-run, records that it would have).
    fn guard(&self, controller: &Arc<Controller>) {
        let analysed = controller.guard_analyses();
        if analysed.is_empty() {
            return;
        }
        let table = controller.router().table();
        let now = controller.clock().instant();
        let mut live = HashSet::new();
        for (service, templates) in analysed.iter() {
            let Some(s) = table.service(service) else {
                continue;
            };
            let snapshot = s.snapshot();
            let baseline = snapshot.baseline_name().to_owned();
            for slot in snapshot.slots() {
                if slot.name() == baseline || slot.weight == 0 {
                    continue;
                }
                for t in templates {
                    let key = (service.clone(), t.name.clone(), slot.name().to_owned());
                    live.insert(key.clone());
                    let due = {
                        let mut guarded = self.guarded.lock().unwrap_or_else(|p| p.into_inner());
                        // The first measurement is one interval after the pool got
                        // traffic, as for a step.
                        let (_, last) = guarded
                            .entry(key.clone())
                            .or_insert_with(|| (Tally::new(t, true), now));
                        now.duration_since(*last) >= t.interval
                    };
                    if due {
                        self.guard_measure(controller, key, t.clone(), baseline.clone());
                    }
                }
            }
        }
        // A pool that lost its traffic starts its count again when it gets some.
        self.guarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| live.contains(k));
    }

    fn guard_measure(
        &self,
        controller: &Arc<Controller>,
        key: GuardKey,
        t: AnalysisTemplate,
        baseline: String,
    ) {
        let Some(running) = self.claim(&key.0, &format!("guard:{}:{}", key.1, key.2)) else {
            return;
        };
        let (caller, controller) = (self.caller.clone(), Arc::clone(controller));
        let guarded = Arc::clone(&self.guarded);
        tokio::spawn(async move {
            let _running = running;
            let (service, _, pool) = &key;
            let m = caller.measure(&t, service, pool, &baseline).await;
            let now = controller.clock().instant();
            let (standing, summary) = {
                let mut guarded = guarded.lock().unwrap_or_else(|p| p.into_inner());
                let Some((tally, last)) = guarded.get_mut(&key) else {
                    // The pool lost its traffic meanwhile.
                    return;
                };
                *last = now;
                let standing = tally.record(m.outcome, controller.clock().now());
                let summary = tally.describe();
                if standing == Standing::Failed {
                    *tally = Tally::new(&t, true);
                }
                (standing, summary)
            };
            let details = serde_json::json!({ "pool": pool, "analysis": m });
            let mut e = Event::new(service, EventKind::AnalysisMeasured, Source::Guard);
            e.reason = Some(format!(
                "guard analysis `{}` on {pool}: {} ({}); {summary}",
                m.template,
                m.outcome.as_str(),
                m.detail
            ));
            e.details = details.clone();
            let reason = format!(
                "guard analysis `{}` failed on {pool}: {}",
                m.template, m.detail
            );
            let service = service.clone();
            let c = Arc::clone(&controller);
            let done = tokio::task::spawn_blocking(move || {
                if let Err(err) = c.record(e) {
                    tracing::warn!("guard analysis of {service}: not journaled: {err}");
                }
                if standing != Standing::Failed {
                    return None;
                }
                if c.slo(&service).is_some_and(|s| s.mode == GuardMode::DryRun) {
                    let mut e = Event::new(&service, EventKind::RollbackDryRun, Source::Guard);
                    e.reason = Some(reason);
                    e.details = details;
                    return Some(c.record(e).map(|_| ()));
                }
                Some(
                    c.apply(Command::Rollback {
                        service,
                        source: Source::Guard,
                        actor: None,
                        reason: Some(reason),
                        details: Some(details),
                    })
                    .map(|_| ()),
                )
            })
            .await;
            match done {
                Ok(Some(Err(e))) if e != ControlError::Unchanged => {
                    tracing::error!("guard analysis revert failed: {e}")
                }
                Err(e) => tracing::error!("guard analysis task failed: {e}"),
                _ => {}
            }
        });
    }

    /// Call every webhook of `kind` once and hand the answers to the rollout.
    fn hooks(
        &self,
        controller: &Arc<Controller>,
        service: &str,
        rollout: &Rollout,
        kind: HookKind,
    ) {
        let Some(running) = self.claim(service, kind.as_str()) else {
            return;
        };
        let hooks = controller.webhooks(service);
        let (caller, controller) = (self.caller.clone(), Arc::clone(controller));
        let (service, payload) = (service.to_owned(), payload(service, rollout));
        let started = rollout.started_at;
        tokio::spawn(async move {
            let _running = running;
            let calls = caller
                .call_all(analysis::of_kind(&hooks, kind), &payload)
                .await;
            let verb = RolloutVerb::HooksCalled {
                rollout: started,
                kind,
                calls,
            };
            apply(&controller, service, verb).await;
        });
    }

    /// Ask the confirm-promotion webhooks whether a held promotion may go ahead.
    fn confirm(&self, controller: &Arc<Controller>, service: &str, rollout: &Rollout) {
        {
            let asked = self.confirm.lock().unwrap_or_else(|p| p.into_inner());
            if asked
                .get(service)
                .is_some_and(|(at, _)| at.elapsed() < CONFIRM_RETRY)
            {
                return;
            }
        }
        let Some(running) = self.claim(service, "confirm-promotion") else {
            return;
        };
        let hooks = controller.webhooks(service);
        let (caller, controller) = (self.caller.clone(), Arc::clone(controller));
        let confirm = Arc::clone(&self.confirm);
        let (service, payload) = (service.to_owned(), payload(service, rollout));
        let started = rollout.started_at;
        tokio::spawn(async move {
            let _running = running;
            let calls = caller
                .call_all(
                    analysis::of_kind(&hooks, HookKind::ConfirmPromotion),
                    &payload,
                )
                .await;
            let ok = calls.iter().all(|c| c.ok);
            let journaled = {
                let mut asked = confirm.lock().unwrap_or_else(|p| p.into_inner());
                let before = asked.get(&service).is_some_and(|(_, j)| *j);
                if ok {
                    asked.remove(&service);
                } else {
                    asked.insert(service.clone(), (Instant::now(), true));
                }
                before
            };
            if ok || !journaled {
                let verb = RolloutVerb::HooksCalled {
                    rollout: started,
                    kind: HookKind::ConfirmPromotion,
                    calls,
                };
                apply(&controller, service, verb).await;
            }
        });
    }
}

/// What a webhook is told about the rollout (besides its own name, kind and metadata).
fn payload(service: &str, r: &Rollout) -> serde_json::Value {
    serde_json::json!({
        "service": service,
        "candidate": r.candidate,
        "stable": r.stable,
        "phase": r.phase,
        "step": r.step,
        "steps_total": r.steps.len(),
        "started_at": crate::model::timestamp(r.started_at),
    })
}
