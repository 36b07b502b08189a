//! The SLO guard: judges every candidate pool on its live traffic, against the SLO and
//! against the baseline, and asks the controller to move traffic back on a breach.
//!
//! The judgement (`judge`) is pure: window figures in, a `Judgement` out. Two choices
//! keep it from crying wolf on small samples:
//!
//! - An error rate breaches an absolute limit only when the 99% one-sided Wilson lower
//!   bound of the observed rate is above the limit: 3 errors in 50 requests (6%) do not
//!   prove a 5% limit is broken, 30 in 300 do.
//! - "Worse than the baseline" is a one-sided two-proportion z-test at 99% of
//!   `candidate − baseline > max_error_rate_increase`, with the unpooled standard error
//!   (the two rates are not assumed equal).
//!
//! And one keeps it from rolling back what a rollback cannot fix: when the baseline is
//! failing too and the candidate is not significantly worse, the judgement is
//! inconclusive with `baseline_unhealthy`, and the guard records that once as an event.
//!
//! Each check runs on the long window and on a short recent one (`fast_window`), so a
//! version that breaks mid-run is caught in seconds instead of after its good history
//! has aged out of the long window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{GuardMode, SloConfig};
use crate::control::{Command, Controller, rfc3339};
use crate::metrics::Metrics;
use crate::outcome::{Outcome, OutcomeSink};
use crate::routing::{Service, Source};
use crate::state::Event;
use crate::window::Stats;

/// z for 99% one-sided.
const Z: f64 = 2.326_347_874;
/// A baseline whose error rate is surely above this is unhealthy, when the SLO sets no
/// `max_error_rate` of its own.
const UNHEALTHY_ERROR_RATE: f64 = 0.05;
/// Latency ratios only count when the candidate's p99 is at least this much slower:
/// a 1 ms → 2 ms p99 is a ratio of 2 but no regression anyone feels.
const MIN_P99_DIFFERENCE: Duration = Duration::from_millis(5);

/// Which SLO check a breach broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    ErrorRate,
    P99Latency,
    ErrorRateIncrease,
    P99Ratio,
}

impl Check {
    pub const ALL: [Check; 4] = [
        Check::ErrorRate,
        Check::P99Latency,
        Check::ErrorRateIncrease,
        Check::P99Ratio,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::ErrorRate => "error_rate",
            Check::P99Latency => "p99_latency",
            Check::ErrorRateIncrease => "error_rate_increase",
            Check::P99Ratio => "p99_ratio",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Breach,
    Inconclusive,
}

/// One pool's figures over one window, as decisions and the API show them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub pool: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Figures {
    pub fn of(pool: &str, s: &Stats) -> Figures {
        let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e5).round() / 100.0);
        Figures {
            pool: pool.to_string(),
            requests: s.requests,
            errors: s.errors,
            error_rate: s.error_rate(),
            p50_ms: ms(s.p50()),
            p99_ms: ms(s.p99()),
        }
    }
}

/// The outcome of judging one candidate once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// The window the verdict was reached on, in seconds.
    pub window_secs: f64,
    pub candidate: Figures,
    pub baseline: Figures,
    pub baseline_unhealthy: bool,
    /// The verdict in words, e.g. "canary error rate 12.4% > 5% over 312 requests;
    /// stable 0.3% over 2,840".
    pub summary: String,
}

/// Wilson score interval lower bound for `errors` of `n` at `Z`.
pub fn wilson_lower(errors: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    let p = errors as f64 / n;
    let z2 = Z * Z;
    let centre = p + z2 / (2.0 * n);
    let margin = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - margin) / (1.0 + z2 / n)).max(0.0)
}

/// Whether the candidate's error rate exceeds the baseline's by more than `delta`,
/// significantly (one-sided two-proportion z-test, unpooled standard error).
pub fn significantly_higher(c_err: u64, c_n: u64, b_err: u64, b_n: u64, delta: f64) -> bool {
    if c_n == 0 || b_n == 0 {
        return false;
    }
    let pc = c_err as f64 / c_n as f64;
    let pb = b_err as f64 / b_n as f64;
    let diff = pc - pb - delta;
    if diff <= 0.0 {
        return false;
    }
    // A rate of exactly 0 or 1 has no variance; use the Wilson-style continuity of
    // half an event so that 0 errors vs 3 errors is not "infinitely significant".
    let var = |p: f64, n: f64| (p * (1.0 - p)).max(0.5 / n) / n;
    let se = (var(pc, c_n as f64) + var(pb, b_n as f64)).sqrt();
    diff / se > Z
}

fn pct(r: f64) -> String {
    let p = r * 100.0;
    if p != 0.0 && p.abs() < 1.0 {
        format!("{p:.2}%")
    } else {
        format!("{p:.1}%")
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(d: Option<f64>) -> String {
    d.map_or_else(|| "-".into(), |v| format!("{v:.0} ms"))
}

/// Judge a candidate against the SLO and the baseline, on the long window and the fast
/// one.
pub fn judge(
    slo: &SloConfig,
    candidate: (&str, &Stats, &Stats),
    baseline: (&str, &Stats, &Stats),
) -> Judgement {
    let (c_name, c_full, c_fast) = candidate;
    let (b_name, b_full, b_fast) = baseline;
    let mut unhealthy = false;
    // The fast window first: it is the one that sees a fresh breakage.
    for (c, b) in [(c_fast, b_fast), (c_full, b_full)] {
        if c.requests < slo.min_requests {
            continue;
        }
        match check_span(slo, c, b) {
            SpanResult::Breach(check, value, threshold) => {
                let mut j = judgement(Verdict::Breach, (c_name, c), (b_name, b));
                j.check = Some(check);
                j.value = Some(value);
                j.threshold = Some(threshold);
                j.summary = breach_words(check, value, threshold, &j.candidate, &j.baseline);
                return j;
            }
            SpanResult::BaselineUnhealthy => unhealthy = true,
            SpanResult::Pass => {}
        }
    }
    if c_full.requests < slo.min_requests {
        let mut j = judgement(Verdict::Inconclusive, (c_name, c_full), (b_name, b_full));
        j.summary = format!(
            "{c_name}: {} of the {} requests needed in the last {:.0}s",
            thousands(c_full.requests),
            thousands(slo.min_requests),
            c_full.span.as_secs_f64()
        );
        return j;
    }
    let mut j = judgement(
        if unhealthy {
            Verdict::Inconclusive
        } else {
            Verdict::Pass
        },
        (c_name, c_full),
        (b_name, b_full),
    );
    j.baseline_unhealthy = unhealthy;
    j.summary = if unhealthy {
        format!(
            "{b_name} is failing too ({} errors over {} requests), {c_name} {} over {}: \
             not {c_name}'s fault, not rolling back",
            pct(j.baseline.error_rate),
            thousands(j.baseline.requests),
            pct(j.candidate.error_rate),
            thousands(j.candidate.requests)
        )
    } else {
        format!(
            "{c_name} within SLO: errors {} over {} requests, p99 {}; {b_name} {}, p99 {}",
            pct(j.candidate.error_rate),
            thousands(j.candidate.requests),
            ms(j.candidate.p99_ms),
            pct(j.baseline.error_rate),
            ms(j.baseline.p99_ms)
        )
    };
    j
}

fn judgement(verdict: Verdict, c: (&str, &Stats), b: (&str, &Stats)) -> Judgement {
    Judgement {
        verdict,
        check: None,
        value: None,
        threshold: None,
        window_secs: c.1.span.as_secs_f64(),
        candidate: Figures::of(c.0, c.1),
        baseline: Figures::of(b.0, b.1),
        baseline_unhealthy: false,
        summary: String::new(),
    }
}

fn breach_words(check: Check, value: f64, threshold: f64, c: &Figures, b: &Figures) -> String {
    let baseline_figure = match check {
        Check::ErrorRate | Check::ErrorRateIncrease => pct(b.error_rate),
        Check::P99Latency | Check::P99Ratio => format!("p99 {}", ms(b.p99_ms)),
    };
    let tail = format!(
        "; {} {baseline_figure} over {}",
        b.pool,
        thousands(b.requests)
    );
    let head = match check {
        Check::ErrorRate => format!("{} error rate {} > {}", c.pool, pct(value), pct(threshold)),
        Check::ErrorRateIncrease => format!(
            "{} error rate {} is {} above {}'s (limit +{})",
            c.pool,
            pct(c.error_rate),
            pct(value),
            b.pool,
            pct(threshold)
        ),
        Check::P99Latency => format!(
            "{} p99 {:.0} ms > {:.0} ms",
            c.pool,
            value * 1000.0,
            threshold * 1000.0
        ),
        Check::P99Ratio => format!(
            "{} p99 {} is {value:.2}× {}'s (limit {threshold:.2}×)",
            c.pool,
            ms(c.p99_ms),
            b.pool
        ),
    };
    format!("{head} over {} requests{tail}", thousands(c.requests))
}

enum SpanResult {
    Pass,
    Breach(Check, f64, f64),
    BaselineUnhealthy,
}

/// Every configured check on one span.
fn check_span(slo: &SloConfig, c: &Stats, b: &Stats) -> SpanResult {
    let baseline_judgeable = b.requests >= slo.min_requests;
    let unhealthy_limit = slo.max_error_rate.unwrap_or(UNHEALTHY_ERROR_RATE);
    let baseline_failing =
        baseline_judgeable && wilson_lower(b.errors, b.requests) > unhealthy_limit;
    // Not significantly worse than a failing baseline: a rollback would not help.
    let no_worse_than_baseline =
        baseline_failing && !significantly_higher(c.errors, c.requests, b.errors, b.requests, 0.0);
    if let Some(limit) = slo.max_error_rate
        && wilson_lower(c.errors, c.requests) > limit
        && !no_worse_than_baseline
    {
        return SpanResult::Breach(Check::ErrorRate, c.error_rate(), limit);
    }
    if let (Some(limit), Some(p99)) = (slo.max_p99_latency, c.p99()) {
        let baseline_slow_too = baseline_judgeable
            && b.p99()
                .is_some_and(|bp| bp > limit && p99.as_secs_f64() <= bp.as_secs_f64() * 1.2);
        if p99 > limit && !baseline_slow_too {
            return SpanResult::Breach(Check::P99Latency, p99.as_secs_f64(), limit.as_secs_f64());
        }
    }
    if baseline_judgeable {
        if let Some(delta) = slo.max_error_rate_increase
            && significantly_higher(c.errors, c.requests, b.errors, b.requests, delta)
        {
            return SpanResult::Breach(
                Check::ErrorRateIncrease,
                c.error_rate() - b.error_rate(),
                delta,
            );
        }
        if let (Some(limit), Some(cp), Some(bp)) = (slo.max_p99_ratio, c.p99(), b.p99()) {
            let ratio = cp.as_secs_f64() / bp.as_secs_f64().max(1e-6);
            if ratio > limit && cp.saturating_sub(bp) >= MIN_P99_DIFFERENCE {
                return SpanResult::Breach(Check::P99Ratio, ratio, limit);
            }
        }
    }
    if no_worse_than_baseline
        || baseline_failing && wilson_lower(c.errors, c.requests) > unhealthy_limit
    {
        return SpanResult::BaselineUnhealthy;
    }
    SpanResult::Pass
}

/// Feeds every outcome the pool answers for into its window. Client faults stay out
/// entirely: neither an error nor a request, so broken requests from outside can
/// neither fail a version nor dilute its error rate.
#[derive(Debug, Default)]
pub struct WindowSink;

impl OutcomeSink for WindowSink {
    fn record(&self, o: &Outcome<'_>) {
        if o.retried.is_some() {
            o.pool.window().record_failed_attempt();
        }
        if o.is_client_fault() {
            return;
        }
        let latency = if o.pool.judges_last_byte() {
            o.duration
        } else {
            o.latency
        };
        o.pool.window().record(o.is_error(), latency);
    }
}

/// A candidate's judgement as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub pool: String,
    pub at: String,
    pub mode: GuardMode,
    #[serde(flatten)]
    pub judgement: Judgement,
}

#[derive(Debug, Default)]
struct PoolWatch {
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
    webhook: crate::webhook::Webhook,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

/// How often the guard wakes to rotate windows and see which services are due.
const TICK: Duration = Duration::from_millis(100);

impl Guard {
    pub fn new(controller: Arc<Controller>, metrics: Arc<Metrics>) -> Guard {
        Guard {
            controller,
            metrics,
            watches: Mutex::new(HashMap::new()),
            webhook: crate::webhook::Webhook::new(),
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
            let done = tokio::task::spawn_blocking(move || guard.tick(Instant::now())).await;
            if let Err(e) = done {
                tracing::error!("guard evaluation failed: {e}");
            }
        }
    }

    /// One round at `now`: save any rollback the disk refused before, rotate every
    /// window, judge the services that are due, act.
    pub fn tick(&self, now: Instant) {
        self.controller.flush_pending();
        let actions = self.evaluate(now);
        for action in actions {
            self.act(action);
        }
    }

    fn evaluate(&self, now: Instant) -> Vec<Action> {
        let table = self.controller.router().table();
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let mut actions = Vec::new();
        for service in table.services() {
            let snapshot = service.snapshot();
            for slot in snapshot.slots() {
                slot.pool.window().rotate(now);
            }
            let Some(slo) = self.controller.slo(&service.name) else {
                continue;
            };
            let watch = watches.entry(service.name.to_string()).or_default();
            if watch
                .last_eval
                .is_some_and(|t| now.saturating_duration_since(t) < slo.interval)
            {
                continue;
            }
            watch.last_eval = Some(now);
            self.evaluate_service(service, &slo, watch, &mut actions);
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
        let snapshot = service.snapshot();
        let base_slot = snapshot.baseline();
        let baseline = base_slot.name().to_string();
        let b_full = base_slot.pool.window().stats(slo.window);
        let b_fast = base_slot.pool.window().stats(slo.fast_window);
        let mut any_unhealthy = false;
        let mut unhealthy_words = String::new();
        // A blue/green preview is judged on its targeted traffic, weight 0 or not.
        let preview = snapshot
            .rollout
            .as_ref()
            .filter(|r| r.phase.is_running())
            .map(|r| r.candidate.as_str());
        for slot in snapshot.slots() {
            let name = slot.name().to_string();
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
            let c_full = slot.pool.window().stats(slo.window);
            let c_fast = slot.pool.window().stats(slo.fast_window);
            let judgement = judge(
                slo,
                (&name, &c_full, &c_fast),
                (&baseline, &b_full, &b_fast),
            );
            if judgement.baseline_unhealthy {
                any_unhealthy = true;
                unhealthy_words = judgement.summary.clone();
            }
            let decision = Decision {
                pool: name.clone(),
                at: rfc3339(SystemTime::now()),
                mode: slo.mode,
                judgement,
            };
            let w = watch.pools.entry(name).or_default();
            match decision.judgement.verdict {
                Verdict::Breach => w.streak += 1,
                Verdict::Pass => {
                    w.streak = 0;
                    w.fired = None;
                }
                // Inconclusive neither passes nor fails: the streak waits.
                Verdict::Inconclusive => {}
            }
            w.last = Some(decision.clone());
            w.last_at = Some(SystemTime::now());
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
                "baseline_unhealthy"
            } else {
                "baseline_recovered"
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
                            slot.pool.window().reset();
                        }
                        if let (Some(event), Some(url)) = (
                            change.event,
                            self.controller.slo(&service).and_then(|s| s.webhook),
                        ) {
                            self.webhook.post(url, event);
                        }
                    }
                    Err(e) => tracing::error!("guard could not roll back {service}: {e}"),
                }
            }
            Action::WouldRollback { service, decision } => {
                let check = decision.judgement.check.map_or("unknown", Check::as_str);
                let mut e = Event::new(&service, "rollback_dry_run", Source::Guard);
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

    /// The `guard` document of a service for the admin API: each pool's live window,
    /// the last decision per candidate, and the service's health.
    pub fn status(&self, service: &Service) -> Value {
        let snapshot = service.snapshot();
        let slo = self.controller.slo(&service.name);
        let window = slo.as_ref().map_or(Duration::from_secs(30), |s| s.window);
        let pools: Vec<Value> = snapshot
            .slots()
            .iter()
            .map(|slot| json!(Figures::of(slot.name(), &slot.pool.window().stats(window))))
            .collect();
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let watch = watches.get(&*service.name);
        let decisions: Vec<&Decision> = snapshot
            .slots()
            .iter()
            .filter_map(|slot| watch?.pools.get(slot.name())?.last.as_ref())
            .collect();
        json!({
            "enabled": slo.is_some(),
            "mode": slo.as_ref().map(|s| s.mode.as_str()),
            "window_secs": window.as_secs_f64(),
            "slo": slo.as_ref().map(|s| json!({
                "max_error_rate": s.max_error_rate,
                "max_p99_ms": s.max_p99_latency.map(|d| d.as_secs_f64() * 1000.0),
                "max_error_rate_increase": s.max_error_rate_increase,
                "max_p99_ratio": s.max_p99_ratio,
                "min_requests": s.min_requests,
                "breaches_to_act": s.breaches_to_act,
            })),
            "health": if snapshot.degraded.is_some() { "degraded" } else { "healthy" },
            "degraded_reason": snapshot.degraded,
            "baseline_unhealthy": watch.is_some_and(|w| w.baseline_unhealthy),
            "pools": pools,
            "decisions": decisions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Window;
    use rand::{Rng, SeedableRng};

    fn stats(requests: u64, errors: u64, latency_ms: u64) -> Stats {
        let w = Window::new(Duration::from_secs(30), Duration::from_secs(1));
        for i in 0..requests {
            w.record(i < errors, Duration::from_millis(latency_ms));
        }
        w.stats(Duration::from_secs(30))
    }

    fn slo() -> SloConfig {
        SloConfig {
            max_error_rate: Some(0.05),
            max_p99_latency: Some(Duration::from_millis(200)),
            max_error_rate_increase: Some(0.02),
            max_p99_ratio: Some(1.5),
            ..SloConfig::default()
        }
    }

    fn run(slo: &SloConfig, c: &Stats, b: &Stats) -> Judgement {
        judge(slo, ("canary", c, c), ("stable", b, b))
    }

    #[test]
    fn wilson_bound_needs_evidence() {
        assert!(wilson_lower(3, 50) < 0.05);
        assert!(wilson_lower(30, 300) > 0.05);
        assert_eq!(wilson_lower(0, 0), 0.0);
        assert!(wilson_lower(0, 1000) < 1e-9);
    }

    #[test]
    fn too_few_requests_is_inconclusive() {
        let j = run(&slo(), &stats(25, 25, 1), &stats(1000, 0, 1));
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(j.summary.contains("25 of the 50"), "{}", j.summary);
    }

    #[test]
    fn clear_error_breach_names_check_and_figures() {
        let j = run(&slo(), &stats(312, 97, 1), &stats(2840, 8, 1));
        assert_eq!(j.verdict, Verdict::Breach);
        assert_eq!(j.check, Some(Check::ErrorRate));
        assert_eq!(j.threshold, Some(0.05));
        assert_eq!((j.candidate.requests, j.baseline.requests), (312, 2840));
        assert_eq!(
            j.summary,
            "canary error rate 31.1% > 5.0% over 312 requests; stable 0.28% over 2,840"
        );
    }

    #[test]
    fn latency_breaches() {
        let j = run(&slo(), &stats(500, 0, 350), &stats(500, 0, 20));
        assert_eq!(
            (j.verdict, j.check),
            (Verdict::Breach, Some(Check::P99Latency))
        );
        let relative_only = SloConfig {
            max_p99_ratio: Some(1.5),
            ..SloConfig::default()
        };
        let j = run(&relative_only, &stats(500, 0, 90), &stats(500, 0, 40));
        assert_eq!(
            (j.verdict, j.check),
            (Verdict::Breach, Some(Check::P99Ratio))
        );
        // Sub-5 ms differences are noise, whatever the ratio.
        let j = run(&relative_only, &stats(500, 0, 3), &stats(500, 0, 1));
        assert_eq!(j.verdict, Verdict::Pass);
    }

    #[test]
    fn relative_error_increase_uses_a_significance_test() {
        let relative_only = SloConfig {
            max_error_rate_increase: Some(0.02),
            ..SloConfig::default()
        };
        // 4% vs 1% on 100 requests: +3 points, but not significant.
        let j = run(&relative_only, &stats(100, 4, 1), &stats(100, 1, 1));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.summary);
        // The same rates on 10,000 requests are.
        let j = run(
            &relative_only,
            &stats(10_000, 400, 1),
            &stats(10_000, 100, 1),
        );
        assert_eq!(
            (j.verdict, j.check),
            (Verdict::Breach, Some(Check::ErrorRateIncrease))
        );
    }

    #[test]
    fn everything_failing_equally_is_not_the_candidates_fault() {
        let relative_only = SloConfig {
            max_error_rate_increase: Some(0.02),
            max_p99_ratio: Some(1.5),
            ..SloConfig::default()
        };
        let j = run(&relative_only, &stats(1000, 500, 1), &stats(9000, 4500, 1));
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(j.baseline_unhealthy);
        assert!(j.summary.contains("stable is failing too"), "{}", j.summary);
        // With absolute limits as well: still no rollback.
        let j = run(&slo(), &stats(1000, 500, 1), &stats(9000, 4500, 1));
        assert_eq!(j.verdict, Verdict::Inconclusive);
        // But a candidate clearly worse than a failing baseline does breach.
        let j = run(&slo(), &stats(1000, 900, 1), &stats(9000, 900, 1));
        assert_eq!(j.verdict, Verdict::Breach);
    }

    #[test]
    fn no_baseline_traffic_skips_relative_checks() {
        let j = run(&slo(), &stats(1000, 10, 1), &stats(0, 0, 0));
        assert_eq!(j.verdict, Verdict::Pass);
    }

    #[test]
    fn fast_window_catches_a_fresh_breakage() {
        let s = slo();
        // Long window diluted by good history, fast window all bad.
        let full = stats(3000, 60, 1);
        let fast = stats(150, 45, 1);
        let b = stats(27_000, 30, 1);
        let j = judge(&s, ("canary", &full, &fast), ("stable", &b, &b));
        assert_eq!(
            (j.verdict, j.check),
            (Verdict::Breach, Some(Check::ErrorRate))
        );
    }

    /// Sixty evaluations of equal 1% error rates on both pools, fresh random samples
    /// each time (a time-compressed minute at 100 req/s on the canary, 900 on stable):
    /// never a breach.
    #[test]
    fn equal_low_error_rates_never_alarm() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let s = slo();
        for _ in 0..60 {
            let draw = |n: u64, rng: &mut rand::rngs::SmallRng| {
                let errors = (0..n).filter(|_| rng.random_bool(0.01)).count() as u64;
                stats(n, errors, 5)
            };
            let c_fast = draw(500, &mut rng);
            let c_full = draw(3000, &mut rng);
            let b_fast = draw(4500, &mut rng);
            let b_full = draw(27_000, &mut rng);
            let j = judge(
                &s,
                ("canary", &c_full, &c_fast),
                ("stable", &b_full, &b_fast),
            );
            assert_ne!(j.verdict, Verdict::Breach, "{}", j.summary);
        }
    }
}
