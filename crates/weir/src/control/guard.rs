//! The SLO guard: judges every candidate pool on its live traffic, against the SLO and
//! against the baseline, on a timer, and asks the controller to move traffic back after
//! `breaches_to_act` consecutive breaches.
//!
//! The judgement itself is pure and lives in [`crate::control::judge`]. This loop gathers its
//! evidence: it rotates the windows, restarts both pools' exposure whenever the
//! service's weights change (a new rollout step, an operator's weights, a rollback), so
//! the sequential tests compare the two versions over the same stretch of time, and
//! measures the baseline's recent bursts from its history. It records
//! `baseline_unhealthy`/`baseline_recovered` events when blame changes hands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;

use crate::config::{GuardMode, SloConfig};
use crate::control::controller::{Command, ControlError, Controller, rfc3339};
pub(crate) use crate::control::judge::{Evidence, Figures, Judgement, Verdict, judge};
use crate::control::store::Event;
use crate::dataplane::pool::Pool;
use crate::dataplane::routing::{PoolSlot, Service};
pub(crate) use crate::model::Check;
use crate::model::{EventKind, Source};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::Window;

/// A candidate's judgement as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub pool: String,
    pub at: String,
    pub mode: GuardMode,
    #[serde(flatten)]
    pub judgement: Judgement,
}

/// What the guard knows of one service at one moment: see [`Guard::status`].
#[derive(Debug, Clone)]
pub struct GuardStatus {
    /// The service's SLO; `None` when the guard does not judge it.
    pub slo: Option<SloConfig>,
    /// The span `pools` covers: the SLO's window, or 30 s without one.
    pub window: Duration,
    /// Every pool's figures over `window`, in pool order.
    pub pools: Vec<Figures>,
    /// The time each of `pools` really covers, in pool order: shorter than `window`
    /// while a pool is new or after a rollback reset its window. A rate is its count
    /// over this span, never over `window`; `None` before one slice of data.
    pub spans: Vec<Option<Duration>>,
    /// The last decision on each pool that was judged, in pool order.
    pub decisions: Vec<Decision>,
    /// The baseline is failing too: the guard holds its judgement.
    pub baseline_unhealthy: bool,
}

/// One judgement of a candidate, as the charts plot it: the figures the guard compared
/// with the SLO, its confidence bounds, and its verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mark {
    pub at: SystemTime,
    pub verdict: Verdict,
    /// The candidate's error rate over the judged span (the exposure, or the fast
    /// window for a loud failure), and its confidence bounds over the exposure.
    pub error_rate: f64,
    pub error_bounds: [f64; 2],
    pub baseline_error_rate: f64,
    /// The same for the p99, in ms; `None` without latency samples or bound.
    pub p99_ms: Option<f64>,
    pub p99_bounds_ms: [Option<f64>; 2],
    pub baseline_p99_ms: Option<f64>,
}

impl Mark {
    fn of(at: SystemTime, j: &Judgement) -> Mark {
        Mark {
            at,
            verdict: j.verdict,
            error_rate: j.candidate.error_rate,
            error_bounds: j.candidate_bounds.error_rate,
            baseline_error_rate: j.baseline.error_rate,
            p99_ms: j.candidate.p99_ms,
            p99_bounds_ms: j.candidate_bounds.p99_ms,
            baseline_p99_ms: j.baseline.p99_ms,
        }
    }
}

/// How far back each candidate's marks reach: the dashboard's longest chart span.
const MARKS_KEPT: Duration = crate::telemetry::window::HISTORY;
/// At most this many marks per candidate, whatever the SLO's `interval` (ten minutes
/// of 100 ms): a bound on the memory a judged pool costs.
const MAX_MARKS: usize = 6000;

#[derive(Debug, Default)]
struct PoolWatch {
    /// The judgements of the last [`MARKS_KEPT`], oldest first.
    marks: std::collections::VecDeque<Mark>,
    streak: u32,
    /// The mode this run of breaches was already acted on in (dry-run: reported). A
    /// switch to enforce by reload acts on a breach that dry-run only reported.
    fired: Option<GuardMode>,
    last: Option<Decision>,
    /// When `last` was made, for rollout gates.
    last_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct ServiceWatch {
    last_eval: Option<Instant>,
    pools: HashMap<String, PoolWatch>,
    baseline_unhealthy: bool,
    /// The weights the current exposure runs under; a change restarts it.
    exposure_weights: Option<Vec<u32>>,
    /// When a rollback last reset the service's windows: their figures start there.
    reset_at: Option<Instant>,
}

/// What an evaluation round wants done (I/O happens outside the lock).
#[derive(Debug)]
enum Action {
    Rollback { service: String, decision: Decision },
    WouldRollback { service: String, decision: Decision },
    Record(Event),
}

/// The guard: evaluates on a timer, acts through the controller.
pub struct Guard {
    controller: Arc<Controller>,
    metrics: Arc<Metrics>,
    watches: Mutex<HashMap<String, ServiceWatch>>,
    sweep: Mutex<Sweep>,
    webhook: crate::control::webhook::Webhook,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

/// A window the guard reads: a pool's own, or the fleet's sum for it.
enum Judged<'a> {
    Local(&'a Window),
    Fleet(Arc<Window>),
}

impl std::ops::Deref for Judged<'_> {
    type Target = Window;

    fn deref(&self) -> &Window {
        match self {
            Judged::Local(w) => w,
            Judged::Fleet(w) => w,
        }
    }
}

/// How often the guard wakes to rotate windows and see which services are due.
const TICK: Duration = Duration::from_millis(100);
/// Every this many rounds every window is looked at (see [`Guard::evaluate`]).
const FULL_EVERY: u64 = 10;

/// Which windows a round turns besides the judged ones.
#[derive(Debug, Default)]
struct Sweep {
    /// The route table `busy` is for (its address).
    table: usize,
    rounds: u64,
    /// Pools whose window had traffic at the last look.
    busy: Vec<Arc<Pool>>,
}

impl Guard {
    pub fn new(controller: Arc<Controller>, metrics: Arc<Metrics>) -> Guard {
        Guard {
            controller,
            metrics,
            watches: Mutex::new(HashMap::new()),
            sweep: Mutex::new(Sweep::default()),
            webhook: crate::control::webhook::Webhook::new(),
        }
    }

    /// Evaluate until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let guard = Arc::clone(&self);
            // Acting fsyncs state: off the async threads.
            let now = guard.controller.clock().instant();
            let done = tokio::task::spawn_blocking(move || guard.tick(now)).await;
            if let Err(e) = done {
                tracing::error!("guard evaluation failed: {e}");
            }
        }
    }

    /// One round at `now`: rotate every window, judge the services that are due, save
    /// any rollback the disk refused before, act.
    pub fn tick(&self, now: Instant) {
        // Judge first: a slow disk retrying an unsaved rollback must not delay the next
        // decision.
        let actions = self.evaluate(now);
        self.controller.flush_pending();
        for action in actions {
            self.act(action);
        }
    }

    fn evaluate(&self, now: Instant) -> Vec<Action> {
        let table = self.controller.router().table();
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let mut actions = Vec::new();
        if let Some(fleet) = self.controller.fleet() {
            fleet.rotate(now);
        }
        // Every window turns, judged or not (the dashboard charts them all); an idle
        // one only notes the time (see `Window::rotate`). A judged service's windows
        // turn every round, below. The others turn every round while they have
        // traffic, and otherwise only every `FULL_EVERY` rounds (and with a new table):
        // with thousands of idle pools a round must not touch each of them ten times a
        // second. The price: a chart-only pool's first request after a quiet spell is
        // placed up to one second early in its history.
        let mut sweep = self.sweep.lock().unwrap_or_else(|p| p.into_inner());
        let address = Arc::as_ptr(&*table) as usize;
        if sweep.table != address || sweep.rounds.is_multiple_of(FULL_EVERY) {
            sweep.table = address;
            sweep.busy.clear();
            for pool in table.pools() {
                pool.window().rotate(now);
                if !pool.window().is_quiet() {
                    sweep.busy.push(Arc::clone(pool));
                }
            }
        } else {
            sweep.busy.retain(|pool| {
                pool.window().rotate(now);
                !pool.window().is_quiet()
            });
        }
        sweep.rounds += 1;
        drop(sweep);
        // Then only the services with an SLO are looked at: a round costs what their
        // traffic costs, not a walk through every service's settings.
        for (name, slo) in self.controller.slos().iter() {
            let Some(service) = table.service(name) else {
                continue;
            };
            for slot in service.snapshot().slots() {
                slot.pool.window().rotate(now);
            }
            let watch = watches.entry(name.clone()).or_default();
            if watch
                .last_eval
                .is_some_and(|t| now.saturating_duration_since(t) < slo.interval)
            {
                continue;
            }
            watch.last_eval = Some(now);
            self.evaluate_service(service, slo, watch, &mut actions);
        }
        watches.retain(|name, _| table.service(name).is_some());
        actions
    }

    fn evaluate_service(
        &self,
        service: &Service,
        slo: &SloConfig,
        watch: &mut ServiceWatch,
        actions: &mut Vec<Action>,
    ) {
        let wall = self.controller.clock().now();
        let snapshot = service.snapshot();
        // A new weight setting is a new exposure, for every pool at once: the two
        // versions are compared over the same stretch of time.
        let weights = snapshot.weights();
        if watch
            .exposure_weights
            .as_ref()
            .is_some_and(|w| *w != weights)
        {
            for slot in snapshot.slots() {
                for window in self.windows(&service.name, slot) {
                    window.restart_exposure();
                }
            }
        }
        watch.exposure_weights = Some(weights);
        let base_slot = snapshot.baseline();
        let baseline = base_slot.name().to_owned();
        let base_window = self.judged(&service.name, base_slot);
        let b_exposure = base_window.exposure();
        let b_fast = crate::control::judge::recent(&base_window, slo.fast_window);
        let b_slices = crate::control::judge::recent_slices(&base_window);
        let b_dispersion = crate::control::judge::dispersion(&base_window);
        let mut any_unhealthy = false;
        let mut unhealthy_words = String::new();
        // A blue/green preview is judged on its targeted traffic, weight 0 or not.
        let control = self.controller.service_control(&service.name);
        let preview = control
            .rollout
            .as_ref()
            .filter(|r| r.phase.is_running())
            .map(|r| r.candidate.as_str());
        for slot in snapshot.slots() {
            let name = slot.name().to_owned();
            if name == baseline {
                // The baseline is judged against, not judged: a decision from when it
                // was a candidate no longer applies.
                watch.pools.remove(&name);
                continue;
            }
            if slot.weight == 0 && preview != Some(name.as_str()) {
                // Not a candidate now: forget its streak, keep its last decision.
                if let Some(w) = watch.pools.get_mut(&name) {
                    w.streak = 0;
                    w.fired = None;
                }
                continue;
            }
            let window = self.judged(&service.name, slot);
            let c_exposure = window.exposure();
            let c_fast = crate::control::judge::recent(&window, slo.fast_window);
            let judgement = judge(
                slo,
                Evidence {
                    name: &name,
                    fast: &c_fast,
                    exposure: &c_exposure,
                    slices: &[],
                    dispersion: 1.0,
                },
                Evidence {
                    name: &baseline,
                    fast: &b_fast,
                    exposure: &b_exposure,
                    slices: &b_slices,
                    dispersion: b_dispersion,
                },
            );
            if judgement.baseline_unhealthy {
                any_unhealthy = true;
                unhealthy_words = judgement.summary.clone();
            }
            let decision = Decision {
                pool: name.clone(),
                at: rfc3339(wall),
                mode: slo.mode,
                judgement,
            };
            let w = watch.pools.entry(name).or_default();
            // Only consecutive breaches count: anything else ends the run.
            match decision.judgement.verdict {
                Verdict::Breach => w.streak += 1,
                Verdict::Pass | Verdict::Inconclusive => {
                    w.streak = 0;
                    w.fired = None;
                }
            }
            w.marks.push_back(Mark::of(wall, &decision.judgement));
            while w.marks.len() > MAX_MARKS
                || w.marks
                    .front()
                    .is_some_and(|m| wall.duration_since(m.at).unwrap_or_default() > MARKS_KEPT)
            {
                w.marks.pop_front();
            }
            w.last = Some(decision.clone());
            w.last_at = Some(wall);
            if w.streak >= slo.breaches_to_act && w.fired != Some(slo.mode) {
                w.fired = Some(slo.mode);
                let service = service.name.to_string();
                actions.push(match slo.mode {
                    GuardMode::Enforce => Action::Rollback { service, decision },
                    GuardMode::DryRun => Action::WouldRollback { service, decision },
                });
            }
        }
        if any_unhealthy != watch.baseline_unhealthy {
            watch.baseline_unhealthy = any_unhealthy;
            let kind = if any_unhealthy {
                EventKind::BaselineUnhealthy
            } else {
                EventKind::BaselineRecovered
            };
            let mut e = Event::new(&*service.name, kind, Source::Guard);
            e.reason = Some(if any_unhealthy {
                unhealthy_words
            } else {
                format!("{baseline} is no longer failing")
            });
            actions.push(Action::Record(e));
        }
    }

    fn act(&self, action: Action) {
        match action {
            Action::Rollback { service, decision } => {
                let check = decision.judgement.check.map_or("unknown", Check::as_str);
                let details = serde_json::to_value(&decision).unwrap_or(Value::Null);
                let command = Command::Rollback {
                    service: service.clone(),
                    source: Source::Guard,
                    actor: None,
                    reason: Some(decision.judgement.summary.clone()),
                    details: Some(details),
                };
                match self.controller.apply(command) {
                    Ok(change) => {
                        tracing::warn!(
                            "guard rolled back {service}: {}",
                            decision.judgement.summary
                        );
                        self.metrics.rollback(&service, check);
                        // Judge the next traffic only, not what led to this.
                        for slot in change.snapshot.slots() {
                            for window in self.windows(&service, slot) {
                                window.reset();
                            }
                        }
                        let now = self.controller.clock().instant();
                        self.watches
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(service.clone())
                            .or_default()
                            .reset_at = Some(now);
                        if let (Some(event), Some(url)) = (
                            change.event,
                            self.controller.slo(&service).and_then(|s| s.webhook),
                        ) {
                            self.webhook.post(url, event);
                        }
                    }
                    Err(ControlError::Unchanged) => {
                        tracing::info!("{service} was already reverted (by another instance)");
                    }
                    Err(e) => tracing::error!("guard could not roll back {service}: {e}"),
                }
            }
            Action::WouldRollback { service, decision } => {
                let check = decision.judgement.check.map_or("unknown", Check::as_str);
                let mut e = Event::new(&service, EventKind::RollbackDryRun, Source::Guard);
                e.reason = Some(format!(
                    "dry-run, weights unchanged; would roll back: {}",
                    decision.judgement.summary
                ));
                e.details = serde_json::to_value(&decision).unwrap_or(Value::Null);
                self.metrics.would_roll_back(&service, check);
                match self.controller.record(e) {
                    Ok(event) => {
                        if let Some(url) = self.controller.slo(&service).and_then(|s| s.webhook) {
                            self.webhook.post(url, event);
                        }
                    }
                    Err(e) => tracing::error!("guard could not record a dry-run decision: {e}"),
                }
            }
            Action::Record(e) => {
                if let Err(err) = self.controller.record(e) {
                    tracing::error!("guard could not record an event: {err}");
                }
            }
        }
    }

    /// The window a pool is judged on: the fleet's sums when they are live, else this
    /// instance's own traffic.
    fn judged<'a>(&self, service: &str, slot: &'a PoolSlot) -> Judged<'a> {
        match self
            .controller
            .fleet()
            .filter(|f| f.judging())
            .and_then(|f| f.window(service, slot.name()))
        {
            Some(fleet) => Judged::Fleet(fleet),
            None => Judged::Local(slot.pool.window()),
        }
    }

    /// Every window kept for a pool (its own, and the fleet's in fleet mode): a new
    /// exposure or a reset applies to all of them.
    fn windows<'a>(&self, service: &str, slot: &'a PoolSlot) -> Vec<Judged<'a>> {
        let mut all = vec![Judged::Local(slot.pool.window())];
        if let Some(fleet) = self
            .controller
            .fleet()
            .and_then(|f| f.window(service, slot.name()))
        {
            all.push(Judged::Fleet(fleet));
        }
        all
    }

    /// Whether the service's live routing is ahead of its saved state (a rollback the
    /// disk refused, being retried).
    pub fn not_durable(&self, service: &str) -> bool {
        self.controller.not_durable(service)
    }

    /// The latest verdict on a pool of a service, and when it was made.
    pub fn verdict(&self, service: &str, pool: &str) -> Option<(Verdict, SystemTime)> {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let w = watches.get(service)?.pools.get(pool)?;
        Some((w.last.as_ref()?.judgement.verdict, w.last_at?))
    }

    /// The latest decision on a pool of a service.
    pub fn decision(&self, service: &str, pool: &str) -> Option<Decision> {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.get(service)?.pools.get(pool)?.last.clone()
    }

    /// What the guard knows of a service, for the admin API's `guard` document: each
    /// pool's live window and the last decision per candidate.
    pub fn status(&self, service: &Service) -> GuardStatus {
        let snapshot = service.snapshot();
        let slo = self.controller.slo(&service.name);
        // An unguarded service still shows its traffic, over the default window.
        let window = slo.as_ref().map_or(Duration::from_secs(30), |s| s.window);
        let pools = snapshot
            .slots()
            .iter()
            .map(|slot| Figures::of(slot.name(), &slot.pool.window().stats(window)))
            .collect();
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let watch = watches.get(&*service.name);
        let now = self.controller.clock().instant();
        let since_reset = watch
            .and_then(|w| w.reset_at)
            .map(|t| now.saturating_duration_since(t));
        let spans = snapshot
            .slots()
            .iter()
            .map(|slot| covered(slot.pool.window(), window, since_reset))
            .collect();
        let decisions = snapshot
            .slots()
            .iter()
            .filter_map(|slot| watch?.pools.get(slot.name())?.last.clone())
            .collect();
        GuardStatus {
            window,
            baseline_unhealthy: watch.is_some_and(|w| w.baseline_unhealthy),
            slo,
            pools,
            spans,
            decisions,
        }
    }

    /// The judgements of a service's candidate `pool` made at or after `since`,
    /// oldest first: what the dashboard charts against the SLO.
    pub fn marks(&self, service: &str, pool: &str, since: SystemTime) -> Vec<Mark> {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches
            .get(service)
            .and_then(|w| w.pools.get(pool))
            .map(|w| w.marks.iter().filter(|m| m.at >= since).copied().collect())
            .unwrap_or_default()
    }
}

/// The time a pool's window figures over `window` really cover: no more than the
/// closed slices its history holds (a new pool has few) nor than the time since a
/// rollback reset it. `None` before one closed slice: no rate can be had from that.
fn covered(w: &Window, window: Duration, since_reset: Option<Duration>) -> Option<Duration> {
    let closed = w.series(window).points.len() as u32;
    let span = (w.slice_len() * closed).min(window);
    let span = since_reset.map_or(span, |r| span.min(r));
    (span >= w.slice_len()).then_some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// The span a rate is taken over: the closed slices there are, at most the window,
    /// at most the time since a reset; none before one slice.
    #[test]
    fn a_window_covers_its_closed_slices_and_the_time_since_a_reset() {
        let window = Duration::from_secs(10);
        let w = Window::new(window, S);
        let t0 = Instant::now();
        w.rotate(t0);
        w.record(false, Duration::from_millis(1));
        assert_eq!(covered(&w, window, None), None, "no closed slice yet");
        w.rotate(t0 + S);
        assert_eq!(covered(&w, window, None), Some(S));
        for i in 2..=25 {
            w.record(false, Duration::from_millis(1));
            w.rotate(t0 + S * i);
        }
        assert_eq!(covered(&w, window, None), Some(window));
        let reset = Duration::from_millis(3500);
        assert_eq!(covered(&w, window, Some(reset)), Some(reset));
        assert_eq!(
            covered(&w, window, Some(Duration::from_millis(200))),
            None,
            "less than a slice since the reset"
        );
    }
}
