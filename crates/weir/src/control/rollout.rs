//! Rollout plans: the state machine that moves traffic step by step from a service's
//! baseline to a candidate pool (canary), or previews a candidate and switches to it
//! at once (blue/green). Pure: time and evidence are passed in, the result is the next
//! state and the weights to set; the controller applies and persists it.
//!
//! Evidence, not the clock: a gate passes only when the candidate has served enough
//! requests since the gate began and the SLO guard's latest verdict on it is a pass;
//! an inconclusive verdict keeps it waiting, and a breach is the guard's revert, which
//! ends the rollout as `degraded`.
//!
//! External evidence arrives the same way: analysis measurements and webhook answers
//! (made by the driver's tasks, see [`crate::control::analysis`]) are counted here, and
//! a freeze window in force (found by the controller) holds every automatic step.

use crate::model::{EventKind, Phase, Step};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{AnalysisTemplate, HookKind, RolloutConfig};
use crate::control::analysis::{HookCall, Measurement, Standing, Tally};
use crate::control::judge::Verdict;

/// The persisted state of a service's rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub phase: Phase,
    /// The pool being rolled out, and the one it replaces (the baseline at start).
    pub candidate: String,
    pub stable: String,
    /// The plan, fixed when the rollout started (a reload does not change a running
    /// rollout's steps).
    pub steps: Vec<Step>,
    pub step: usize,
    #[serde(with = "system_time")]
    pub step_started: SystemTime,
    /// End of a timed pause, an auto-promotion or a rollback window: absolute, so a
    /// restart keeps it.
    #[serde(default, with = "system_time::option")]
    pub deadline: Option<SystemTime>,
    /// The candidate's request count when the current gate began.
    #[serde(default)]
    pub gate_base: Option<u64>,
    #[serde(with = "system_time")]
    pub started_at: SystemTime,
    /// Analysis measurements so far: the current step's, and the background ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<Tally>,
    /// Where the rollout's webhooks stand.
    #[serde(default, skip_serializing_if = "Hooks::is_unset")]
    pub hooks: Hooks,
    /// Started (or promoted) during a freeze by an operator who gave this reason: the
    /// rollout goes on through freeze windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_override: Option<String>,
}

/// The webhooks a rollout still owes a call, fixed when it starts (a reload does not
/// add a gate to a running rollout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    /// Pre-rollout webhooks must pass before the candidate gets any traffic.
    #[serde(default)]
    pub pre_rollout_pending: bool,
    /// Promotion waits for the confirm-promotion webhooks to answer 2xx.
    #[serde(default)]
    pub confirm_required: bool,
    #[serde(default)]
    pub confirmed: bool,
    /// Post-rollout webhooks are called once the rollout has ended.
    #[serde(default)]
    pub post_rollout_pending: bool,
    /// The latest answer of each webhook called, for status and the dashboard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_calls: Vec<HookCall>,
}

impl Hooks {
    /// Keep `calls` as the latest answers of their webhooks.
    fn note(&mut self, calls: &[HookCall]) {
        for c in calls {
            self.last_calls.retain(|old| old.name != c.name);
            self.last_calls.push(c.clone());
        }
    }
}

impl Hooks {
    fn is_unset(&self) -> bool {
        *self == Hooks::default()
    }
}

mod system_time {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::model::timestamp(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }

    pub(super) mod option {
        use super::*;

        pub(in super::super) fn serialize<S: Serializer>(
            t: &Option<SystemTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|t| humantime::parse_rfc3339_weak(&t).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// The steps a config describes.
pub(crate) fn plan_steps(cfg: &RolloutConfig) -> Vec<Step> {
    match cfg {
        RolloutConfig::Canary { steps, .. } => steps.clone(),
        RolloutConfig::BlueGreen {
            auto_promote_after,
            gate,
            rollback_window,
            ..
        } => {
            let mut steps = vec![
                Step::Preview {
                    auto_promote_after: *auto_promote_after,
                    gate: *gate,
                },
                Step::Percent(100.0),
            ];
            if let Some(w) = rollback_window {
                steps.push(Step::Watch(*w));
            }
            steps
        }
    }
}

/// What the engine sees of the world at a tick.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// Requests the candidate pool has served (a counter that only grows while the
    /// process lives).
    pub candidate_requests: u64,
    /// The guard's latest verdict on the candidate, and when it was made.
    pub verdict: Option<(Verdict, SystemTime)>,
    /// What evidence the guard still misses to conclude, in words.
    pub needs: Option<String>,
    /// A freeze window in force, in words: automatic steps wait for its end.
    pub frozen: Option<String>,
}

/// A change the engine wants applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub rollout: Rollout,
    /// Candidate share to set, in percent (the baseline gets the rest).
    pub percent: Option<f64>,
    /// The candidate becomes the service's baseline (promotion is complete).
    pub promote_baseline: bool,
    pub kind: EventKind,
    pub reason: String,
}

impl Evidence {
    /// What a snapshot and the guard say about `candidate` now.
    pub fn of(
        snapshot: &crate::dataplane::routing::ServiceSnapshot,
        candidate: &str,
        verdict: Option<(Verdict, SystemTime)>,
        needs: Option<String>,
    ) -> Evidence {
        Evidence {
            candidate_requests: snapshot
                .slot(candidate)
                .map_or(0, |s| s.pool.window().total()),
            verdict,
            needs,
            frozen: None,
        }
    }
}

impl Rollout {
    /// A rollout at its first step.
    pub fn start(
        candidate: &str,
        stable: &str,
        steps: Vec<Step>,
        now: SystemTime,
        evidence: &Evidence,
    ) -> Rollout {
        let mut r = Rollout {
            phase: Phase::Progressing,
            candidate: candidate.into(),
            stable: stable.into(),
            steps,
            step: 0,
            step_started: now,
            deadline: None,
            gate_base: None,
            started_at: now,
            analysis: Vec::new(),
            hooks: Hooks::default(),
            freeze_override: None,
        };
        r.enter(0, now, evidence);
        r
    }

    /// What the service's config adds to a new rollout: its webhooks, background
    /// analyses, and an operator's freeze override.
    pub fn with_extras(
        mut self,
        hook_kinds: &[HookKind],
        background: &[&AnalysisTemplate],
        freeze_override: Option<String>,
    ) -> Rollout {
        self.hooks = Hooks {
            pre_rollout_pending: hook_kinds.contains(&HookKind::PreRollout),
            confirm_required: hook_kinds.contains(&HookKind::ConfirmPromotion),
            confirmed: false,
            post_rollout_pending: hook_kinds.contains(&HookKind::PostRollout),
            last_calls: Vec::new(),
        };
        self.analysis = background.iter().map(|t| Tally::new(t, true)).collect();
        self.freeze_override = freeze_override;
        self
    }

    /// Whether a freeze holds this rollout.
    fn held_by_freeze(&self, evidence: &Evidence) -> bool {
        evidence.frozen.is_some() && self.freeze_override.is_none()
    }

    /// The plan would promote now, but the confirm-promotion webhooks have not said yes.
    pub fn awaiting_confirmation(&self, now: SystemTime, evidence: &Evidence) -> bool {
        self.phase == Phase::Progressing
            && !self.hooks.pre_rollout_pending
            && !self.held_by_freeze(evidence)
            && self.hooks.confirm_required
            && !self.hooks.confirmed
            && self
                .step_transition(now, evidence)
                .is_some_and(|t| t.promote_baseline)
    }

    /// The analysis templates that run now (the current step's and the background
    /// ones), with when each was last measured.
    pub fn running_analyses(&self) -> Vec<(String, Option<SystemTime>)> {
        if self.phase != Phase::Progressing || self.hooks.pre_rollout_pending {
            return Vec::new();
        }
        let mut out: Vec<(String, Option<SystemTime>)> = self
            .analysis
            .iter()
            .filter(|t| t.background)
            .map(|t| (t.template.clone(), t.last_at()))
            .collect();
        if let Some(Step::Analysis { template }) = self.current_step() {
            let last = self
                .step_tally(template)
                .and_then(|t| t.last_at())
                .or(Some(self.step_started));
            out.push((template.clone(), last));
        }
        out
    }

    fn step_tally(&self, template: &str) -> Option<&Tally> {
        self.analysis
            .iter()
            .find(|t| t.step == Some(self.step) && t.template == template)
    }

    /// Count one measurement of `template`, made for step `step`. A failure past the
    /// template's limit ends the rollout degraded, all traffic back to stable; a step's
    /// analysis that has its passes moves on at the next tick.
    pub fn measured(
        &self,
        now: SystemTime,
        step: usize,
        m: &Measurement,
        template: &AnalysisTemplate,
    ) -> Result<Transition, String> {
        if self.phase != Phase::Progressing {
            return Err(format!(
                "no rollout is progressing (phase {})",
                self.phase.as_str()
            ));
        }
        let mut next = self.clone();
        let tally = if let Some(i) = next
            .analysis
            .iter()
            .position(|t| t.background && t.template == m.template)
        {
            &mut next.analysis[i]
        } else if step == self.step
            && matches!(self.current_step(), Some(Step::Analysis { template }) if *template == m.template)
        {
            match next
                .analysis
                .iter()
                .position(|t| t.step == Some(step) && t.template == m.template)
            {
                Some(i) => &mut next.analysis[i],
                None => {
                    // An earlier step's results for this template give way.
                    next.analysis
                        .retain(|t| t.background || t.template != m.template);
                    let mut tally = Tally::new(template, false);
                    tally.step = Some(step);
                    next.analysis.push(tally);
                    next.analysis.last_mut().expect("just pushed")
                }
            }
        } else {
            return Err(format!("analysis `{}` is not running now", m.template));
        };
        let standing = tally.record(m.outcome, now);
        tally.last_value = m.value;
        tally.last_detail = Some(m.detail.clone());
        let summary = tally.describe();
        next.hooks.note(&m.webhooks);
        if standing == Standing::Failed {
            next.phase = Phase::Degraded;
            next.step_started = now;
            next.deadline = None;
            return Ok(Transition {
                rollout: next,
                percent: Some(0.0),
                promote_baseline: false,
                kind: EventKind::AnalysisFailed,
                reason: format!(
                    "analysis `{}` failed ({}: {}); {summary}; all traffic to {}",
                    m.template,
                    m.outcome.as_str(),
                    m.detail,
                    self.stable
                ),
            });
        }
        Ok(Transition {
            rollout: next,
            percent: None,
            promote_baseline: false,
            kind: EventKind::AnalysisMeasured,
            reason: format!(
                "analysis `{}`: {} ({}); {summary}",
                m.template,
                m.outcome.as_str(),
                m.detail
            ),
        })
    }

    /// Record the answers of the webhooks of `kind`. Pre-rollout: all 2xx lets the plan
    /// begin, anything else aborts it before the candidate gets traffic.
    /// Confirm-promotion: all 2xx lets the plan promote. Post-rollout: recorded only.
    pub fn hooks_called(
        &self,
        now: SystemTime,
        kind: HookKind,
        calls: &[HookCall],
    ) -> Result<Transition, String> {
        let all_ok = calls.iter().all(|c| c.ok);
        let failed: Vec<String> = calls
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("`{}` {}", c.name, c.detail))
            .collect();
        let mut next = self.clone();
        next.hooks.note(calls);
        let mut t = Transition {
            percent: None,
            promote_baseline: false,
            kind: EventKind::WebhookCalled,
            reason: String::new(),
            rollout: self.clone(),
        };
        match kind {
            HookKind::PreRollout => {
                if !(self.phase.is_running() && self.hooks.pre_rollout_pending) {
                    return Err("no pre-rollout webhook is due".into());
                }
                next.hooks.pre_rollout_pending = false;
                if all_ok {
                    t.reason = format!("pre-rollout webhooks passed ({})", calls.len());
                } else {
                    next.phase = Phase::Aborted;
                    next.step_started = now;
                    next.deadline = None;
                    t.percent = Some(0.0);
                    t.kind = EventKind::RolloutAborted;
                    t.reason = format!(
                        "pre-rollout webhook failed: {}; the rollout stopped before {} got traffic",
                        failed.join("; "),
                        self.candidate
                    );
                }
            }
            HookKind::ConfirmPromotion => {
                if !(self.phase == Phase::Progressing
                    && self.hooks.confirm_required
                    && !self.hooks.confirmed)
                {
                    return Err("no promotion awaits confirmation".into());
                }
                if all_ok {
                    next.hooks.confirmed = true;
                    t.reason = "confirm-promotion webhooks answered 2xx: promotion may go ahead"
                        .to_owned();
                } else {
                    t.reason = format!("promotion held: {}", failed.join("; "));
                }
            }
            HookKind::PostRollout => {
                if self.phase.is_running() || !self.hooks.post_rollout_pending {
                    return Err("no post-rollout webhook is due".into());
                }
                next.hooks.post_rollout_pending = false;
                t.reason = if all_ok {
                    format!("post-rollout webhooks called ({})", calls.len())
                } else {
                    format!("post-rollout webhook failed: {}", failed.join("; "))
                };
            }
            HookKind::Rollout => {
                return Err("rollout webhooks are called with analysis measurements".into());
            }
        }
        t.rollout = next;
        Ok(t)
    }

    pub fn current_step(&self) -> Option<&Step> {
        self.steps.get(self.step)
    }

    /// What the rollout is waiting for, in words.
    pub fn waiting_for(&self, now: SystemTime, evidence: Option<&Evidence>) -> String {
        let left = |deadline: SystemTime| {
            let d = deadline.duration_since(now).unwrap_or_default();
            humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
        };
        if self.phase == Phase::Progressing {
            if self.hooks.pre_rollout_pending {
                return "pre-rollout webhooks to pass".into();
            }
            if let Some(frozen) = evidence.and_then(|e| e.frozen.as_deref())
                && self.freeze_override.is_none()
            {
                return format!("the freeze to end: {frozen}");
            }
            if let Some(e) = evidence
                && self.awaiting_confirmation(now, e)
            {
                return "confirm-promotion webhooks to answer 2xx".into();
            }
        }
        match (self.phase, self.current_step()) {
            (Phase::Paused, _) => "resume (paused by an operator)".into(),
            (Phase::Progressing, Some(Step::Analysis { template })) => {
                match self.step_tally(template) {
                    Some(t) => t.describe(),
                    None => format!("analysis `{template}`: first measurement"),
                }
            }
            (Phase::Progressing, Some(Step::Pause(_))) => match self.deadline {
                Some(d) => format!("timed pause: {} left", left(d)),
                None => "timed pause".into(),
            },
            (Phase::Progressing, Some(Step::Manual)) => "promote (manual pause)".into(),
            (Phase::Progressing, Some(Step::Gate { min_requests })) => {
                let seen = evidence
                    .map(|e| {
                        e.candidate_requests
                            .saturating_sub(self.gate_base.unwrap_or(0))
                    })
                    .unwrap_or(0);
                let verdict =
                    evidence
                        .and_then(|e| e.verdict)
                        .map_or("none yet", |(v, _)| match v {
                            Verdict::Pass => "pass",
                            Verdict::Breach => "breach",
                            Verdict::Inconclusive => "inconclusive",
                        });
                let needs = evidence
                    .and_then(|e| e.needs.as_deref())
                    .map(|n| format!("; the guard needs: {n}"))
                    .unwrap_or_default();
                format!(
                    "evidence: {}/{min_requests} requests, guard verdict {verdict}{needs}",
                    seen.min(*min_requests)
                )
            }
            (Phase::Progressing, Some(Step::Preview { .. })) => {
                "promote (preview: targeted requests only)".into()
            }
            (Phase::Progressing, Some(Step::Watch(_))) => match self.deadline {
                Some(d) => format!("rollback window: {} left", left(d)),
                None => "rollback window".into(),
            },
            (Phase::Progressing, _) => "next step".into(),
            (phase, _) => format!("nothing ({})", phase.as_str()),
        }
    }

    /// Advance by the clock and the evidence. `None`: nothing to do yet. A pending
    /// pre-rollout webhook, a freeze window and an unconfirmed promotion hold the plan.
    pub fn tick(&self, now: SystemTime, evidence: &Evidence) -> Option<Transition> {
        if self.phase != Phase::Progressing
            || self.hooks.pre_rollout_pending
            || self.held_by_freeze(evidence)
        {
            return None;
        }
        let t = self.step_transition(now, evidence)?;
        if t.promote_baseline && self.hooks.confirm_required && !self.hooks.confirmed {
            return None;
        }
        Some(t)
    }

    /// What the current step makes of time and evidence, holds aside.
    fn step_transition(&self, now: SystemTime, evidence: &Evidence) -> Option<Transition> {
        if self.phase != Phase::Progressing {
            return None;
        }
        let Some(step) = self.current_step() else {
            return Some(self.finish(now, "every step done"));
        };
        match step {
            Step::Percent(p) => {
                // Set the share, then move on at once.
                let mut next = self.clone();
                let percent = *p;
                next.enter(self.step + 1, now, evidence);
                let kind = EventKind::RolloutStep;
                let reason = format!("step {}: {}", self.step + 1, step.describe());
                if next.step >= next.steps.len() {
                    let mut t = next.finish(now, &reason);
                    t.percent = Some(percent);
                    return Some(t);
                }
                Some(Transition {
                    rollout: next,
                    percent: Some(percent),
                    promote_baseline: false,
                    kind,
                    reason,
                })
            }
            Step::Pause(d) => {
                let deadline = self.deadline.unwrap_or(self.step_started + *d);
                (now >= deadline).then(|| self.advance(now, evidence, "timed pause over"))
            }
            Step::Manual => None,
            Step::Gate { min_requests } => self
                .gate_passed(*min_requests, evidence)
                .then(|| self.advance(now, evidence, "evidence gate passed")),
            Step::Preview {
                auto_promote_after,
                gate,
            } => {
                if auto_promote_after.is_none() && gate.is_none() {
                    return None;
                }
                let time_ok = auto_promote_after
                    .is_none_or(|a| now >= self.deadline.unwrap_or(self.step_started + a));
                let gate_ok = gate.is_none_or(|g| self.gate_passed(g, evidence));
                (time_ok && gate_ok).then(|| self.advance(now, evidence, "preview passed"))
            }
            Step::Watch(d) => {
                let deadline = self.deadline.unwrap_or(self.step_started + *d);
                (now >= deadline).then(|| self.advance(now, evidence, "rollback window over"))
            }
            Step::Analysis { template } => self
                .step_tally(template)
                .is_some_and(|t| t.standing() == Standing::Passed)
                .then(|| self.advance(now, evidence, &format!("analysis `{template}` passed"))),
        }
    }

    /// Apply the percent steps a transition lands on at once, so one change (one
    /// event, one weight change) both enters a step and sets its share: an operator's
    /// answer already shows the new weights, and the driver's "timed pause over; step
    /// 3: 50%" is not followed a tick later by a second "step 3: 50%" event.
    pub fn settle(mut t: Transition, now: SystemTime, evidence: &Evidence) -> Transition {
        while t.rollout.phase == Phase::Progressing
            && matches!(t.rollout.current_step(), Some(Step::Percent(_)))
        {
            let announced = t
                .rollout
                .current_step()
                .map(|s| format!("step {}: {}", t.rollout.step + 1, s.describe()));
            let Some(next) = t.rollout.tick(now, evidence) else {
                break;
            };
            t.rollout = next.rollout;
            t.percent = next.percent.or(t.percent);
            t.promote_baseline |= next.promote_baseline;
            if next.kind == EventKind::RolloutPromoted {
                t.kind = next.kind;
            }
            // The step was named when it was entered ("…; step 3: 50%"): say only what
            // applying it added (a promotion), not the step again.
            match announced.filter(|a| t.reason.ends_with(a.as_str())) {
                Some(a) => {
                    let rest = next.reason.strip_prefix(a.as_str()).unwrap_or("");
                    t.reason.push_str(rest);
                }
                None => t.reason = format!("{}; {}", t.reason, next.reason),
            }
        }
        t
    }

    fn gate_passed(&self, min_requests: u64, evidence: &Evidence) -> bool {
        let base = self.gate_base.unwrap_or(0);
        // A restart resets the counter: count again from zero.
        let base = if evidence.candidate_requests < base {
            0
        } else {
            base
        };
        let seen = evidence.candidate_requests - base;
        let passing = matches!(
            evidence.verdict,
            Some((Verdict::Pass, at)) if at >= self.step_started
        );
        seen >= min_requests && passing
    }

    /// Move to step `index`, setting what that step needs.
    fn enter(&mut self, index: usize, now: SystemTime, evidence: &Evidence) {
        self.step = index;
        self.step_started = now;
        self.gate_base = None;
        self.deadline = None;
        match self.steps.get(index) {
            Some(Step::Pause(d)) | Some(Step::Watch(d)) => self.deadline = Some(now + *d),
            Some(Step::Gate { .. }) => self.gate_base = Some(evidence.candidate_requests),
            Some(Step::Preview {
                auto_promote_after,
                gate,
            }) => {
                self.deadline = auto_promote_after.map(|a| now + a);
                if gate.is_some() {
                    self.gate_base = Some(evidence.candidate_requests);
                }
            }
            _ => {}
        }
    }

    fn advance(&self, now: SystemTime, evidence: &Evidence, why: &str) -> Transition {
        let mut next = self.clone();
        next.enter(self.step + 1, now, evidence);
        if next.step >= next.steps.len() {
            return next.finish(now, why);
        }
        let desc = next.steps[next.step].describe();
        let t = Transition {
            rollout: next,
            percent: None,
            promote_baseline: false,
            kind: EventKind::RolloutStep,
            reason: format!("{why}; step {}: {desc}", self.step + 2),
        };
        // A percent step is applied in the same change that enters it.
        Rollout::settle(t, now, evidence)
    }

    fn finish(&self, now: SystemTime, why: &str) -> Transition {
        let mut done = self.clone();
        done.phase = Phase::Promoted;
        done.step = done.steps.len();
        done.step_started = now;
        done.deadline = None;
        done.gate_base = None;
        Transition {
            percent: Some(100.0),
            promote_baseline: true,
            kind: EventKind::RolloutPromoted,
            reason: format!("{why}; {} is the new baseline", self.candidate),
            rollout: done,
        }
    }

    /// An operator's promote: pass the current pause or gate, or (`full`) jump to the
    /// end. Errors name why not.
    pub fn promote(
        &self,
        full: bool,
        now: SystemTime,
        evidence: &Evidence,
    ) -> Result<Transition, String> {
        if !self.phase.is_running() {
            return Err(format!(
                "no rollout is running (phase {})",
                self.phase.as_str()
            ));
        }
        let mut t = if full {
            let mut t = self.finish(now, "promoted in full by an operator");
            t.kind = EventKind::RolloutPromoted;
            t
        } else {
            match self.current_step() {
                Some(Step::Percent(_)) | None => {
                    return Err("nothing to promote: the rollout is between steps".into());
                }
                Some(_) => self.advance(now, evidence, "promoted by an operator"),
            }
        };
        // Promoting a paused rollout resumes it.
        if t.rollout.phase == Phase::Paused {
            t.rollout.phase = Phase::Progressing;
        }
        Ok(t)
    }

    /// Hold the plan where it is. A timed pause keeps its deadline: if it passes while
    /// paused, the step advances right after the resume.
    pub fn pause(&self) -> Result<Transition, String> {
        if self.phase != Phase::Progressing {
            return Err(format!(
                "only a progressing rollout can pause (phase {})",
                self.phase.as_str()
            ));
        }
        let mut next = self.clone();
        next.phase = Phase::Paused;
        Ok(Transition {
            rollout: next,
            percent: None,
            promote_baseline: false,
            kind: EventKind::RolloutPaused,
            reason: format!("paused at step {}", self.step + 1),
        })
    }

    pub fn resume(&self) -> Result<Transition, String> {
        if self.phase != Phase::Paused {
            return Err(format!(
                "only a paused rollout can resume (phase {})",
                self.phase.as_str()
            ));
        }
        let mut next = self.clone();
        next.phase = Phase::Progressing;
        Ok(Transition {
            rollout: next,
            percent: None,
            promote_baseline: false,
            kind: EventKind::RolloutResumed,
            reason: format!("resumed at step {}", self.step + 1),
        })
    }

    /// All traffic back to the stable pool.
    pub fn abort(&self, now: SystemTime) -> Result<Transition, String> {
        if !self.phase.is_running() {
            return Err(format!(
                "no rollout is running (phase {})",
                self.phase.as_str()
            ));
        }
        let mut next = self.clone();
        next.phase = Phase::Aborted;
        next.step_started = now;
        next.deadline = None;
        Ok(Transition {
            rollout: next,
            percent: Some(0.0),
            promote_baseline: false,
            kind: EventKind::RolloutAborted,
            reason: format!(
                "aborted at step {}; all traffic to {}",
                self.step + 1,
                self.stable
            ),
        })
    }

    /// The guard reverted the service: the rollout ends as degraded.
    pub fn degrade(&self, now: SystemTime) -> Rollout {
        let mut next = self.clone();
        next.phase = Phase::Degraded;
        next.step_started = now;
        next.deadline = None;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::analysis::Outcome;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn no_evidence() -> Evidence {
        Evidence {
            candidate_requests: 0,
            verdict: None,
            needs: None,
            frozen: None,
        }
    }

    fn canary(steps: Vec<Step>) -> Rollout {
        Rollout::start("canary", "stable", steps, at(0), &no_evidence())
    }

    #[test]
    fn percent_steps_set_weights_and_move_on() {
        let r = canary(vec![Step::Percent(5.0), Step::Percent(0.5), Step::Manual]);
        let t = r.tick(at(0), &no_evidence()).unwrap();
        assert_eq!(
            (t.percent, t.rollout.step, t.kind),
            (Some(5.0), 1, EventKind::RolloutStep)
        );
        let t = t.rollout.tick(at(1), &no_evidence()).unwrap();
        assert_eq!((t.percent, t.rollout.step), (Some(0.5), 2));
        // A manual pause waits for ever.
        assert!(t.rollout.tick(at(10_000), &no_evidence()).is_none());
    }

    #[test]
    fn timed_pause_keeps_its_deadline() {
        let r = canary(vec![
            Step::Percent(5.0),
            Step::Pause(Duration::from_secs(120)),
            Step::Percent(50.0),
        ]);
        let r = r.tick(at(10), &no_evidence()).unwrap().rollout;
        assert_eq!(r.deadline, Some(at(130)));
        // Persisted and restored: the deadline is absolute.
        let restored: Rollout = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(restored, r);
        assert!(restored.tick(at(129), &no_evidence()).is_none());
        // The pause ends into the last step, applied in the same change.
        let t = restored.tick(at(130), &no_evidence()).unwrap();
        assert_eq!((t.rollout.phase, t.percent), (Phase::Promoted, Some(50.0)));
    }

    #[test]
    fn gate_needs_requests_and_a_pass_after_it_began() {
        let r = canary(vec![
            Step::Percent(25.0),
            Step::Gate { min_requests: 500 },
            Step::Percent(50.0),
        ]);
        let start = Evidence {
            candidate_requests: 1000,
            verdict: Some((Verdict::Pass, at(0))),
            needs: None,
            frozen: None,
        };
        let r = r.tick(at(5), &start).unwrap().rollout;
        assert_eq!(r.gate_base, Some(1000));
        // Plenty of time, no new requests: waits.
        assert!(r.tick(at(5000), &start).is_none());
        let enough = |verdict, when| Evidence {
            candidate_requests: 1500,
            verdict: Some((verdict, at(when))),
            needs: None,
            frozen: None,
        };
        // Enough requests, but the pass predates the gate.
        assert!(r.tick(at(60), &enough(Verdict::Pass, 1)).is_none());
        // Inconclusive extends the gate.
        assert!(r.tick(at(60), &enough(Verdict::Inconclusive, 59)).is_none());
        let t = r.tick(at(60), &enough(Verdict::Pass, 59)).unwrap();
        assert_eq!((t.rollout.step, t.percent), (3, Some(50.0)));
        assert!(t.reason.contains("evidence gate passed"), "{}", t.reason);
    }

    #[test]
    fn last_step_promotes_and_moves_the_baseline() {
        let r = canary(vec![Step::Percent(100.0)]);
        let t = r.tick(at(0), &no_evidence()).unwrap();
        assert_eq!(t.rollout.phase, Phase::Promoted);
        assert!(t.promote_baseline);
        assert_eq!(t.percent, Some(100.0));
        assert_eq!(t.kind, EventKind::RolloutPromoted);
    }

    #[test]
    fn operator_verbs_and_their_errors() {
        let r = canary(vec![
            Step::Percent(5.0),
            Step::Manual,
            Step::Percent(50.0),
            Step::Percent(100.0),
        ]);
        let r = r.tick(at(0), &no_evidence()).unwrap().rollout;
        assert!(r.resume().is_err());
        let paused = r.pause().unwrap().rollout;
        assert_eq!(paused.phase, Phase::Paused);
        assert!(paused.tick(at(2), &no_evidence()).is_none());
        assert!(paused.pause().is_err());
        let r = paused.resume().unwrap().rollout;
        // Passing the manual pause applies the percent steps after it at once.
        let t = r.promote(false, at(3), &no_evidence()).unwrap();
        assert_eq!((t.rollout.phase, t.percent), (Phase::Promoted, Some(100.0)));
        let full = r.promote(true, at(3), &no_evidence()).unwrap();
        assert_eq!(
            (full.rollout.phase, full.percent),
            (Phase::Promoted, Some(100.0))
        );
        let aborted = r.abort(at(4)).unwrap();
        assert_eq!(
            (aborted.rollout.phase, aborted.percent),
            (Phase::Aborted, Some(0.0))
        );
        assert!(aborted.rollout.abort(at(5)).is_err());
        assert!(
            aborted
                .rollout
                .promote(false, at(5), &no_evidence())
                .is_err()
        );
    }

    #[test]
    fn blue_green_previews_then_switches_then_watches() {
        let cfg = RolloutConfig::BlueGreen {
            candidate: "green".into(),
            auto_promote_after: Some(Duration::from_secs(600)),
            gate: Some(100),
            rollback_window: Some(Duration::from_secs(900)),
        };
        let steps = plan_steps(&cfg);
        let r = Rollout::start("green", "blue", steps, at(0), &no_evidence());
        // Time alone is not enough: the gate needs evidence.
        assert!(r.tick(at(601), &no_evidence()).is_none());
        let ev = Evidence {
            candidate_requests: 150,
            verdict: Some((Verdict::Pass, at(500))),
            needs: None,
            frozen: None,
        };
        assert!(r.tick(at(500), &ev).is_none(), "before auto_promote_after");
        // Passing the preview switches all traffic in the same change.
        let t = r.tick(at(601), &ev).unwrap();
        assert_eq!((t.percent, t.rollout.step), (Some(100.0), 2));
        assert_eq!(t.rollout.deadline, Some(at(601 + 900)));
        assert!(t.rollout.tick(at(1000), &ev).is_none());
        let t = t.rollout.tick(at(1501), &ev).unwrap();
        assert_eq!(t.rollout.phase, Phase::Promoted);
        assert!(t.promote_baseline);
    }

    fn template(count: u32, failure_limit: u32) -> AnalysisTemplate {
        AnalysisTemplate {
            name: "ok-rate".into(),
            prometheus: "http://127.0.0.1:9090".into(),
            query: "x".into(),
            success: crate::config::Threshold::parse(">= 0.99").unwrap(),
            interval: Duration::from_secs(30),
            count,
            failure_limit,
            no_data: crate::config::NoData::Inconclusive,
            timeout: Duration::from_secs(5),
        }
    }

    fn measurement(outcome: Outcome) -> Measurement {
        Measurement {
            template: "ok-rate".into(),
            value: (outcome == Outcome::Pass).then_some(0.995),
            threshold: ">= 0.99".into(),
            outcome,
            detail: outcome.as_str().into(),
            duration_ms: 3,
            webhooks: Vec::new(),
        }
    }

    fn analysed() -> Rollout {
        canary(vec![
            Step::Percent(10.0),
            Step::Analysis {
                template: "ok-rate".into(),
            },
            Step::Percent(100.0),
        ])
        .tick(at(0), &no_evidence())
        .unwrap()
        .rollout
    }

    #[test]
    fn analysis_step_counts_measurements_and_survives_a_restart() {
        let t = template(2, 1);
        let r = analysed();
        assert_eq!(r.step, 1);
        // Nothing measured yet: the step waits, whatever the time.
        assert!(r.tick(at(10_000), &no_evidence()).is_none());
        assert_eq!(r.running_analyses(), vec![("ok-rate".into(), Some(at(0)))]);
        let r = r
            .measured(at(30), 1, &measurement(Outcome::Pass), &t)
            .unwrap()
            .rollout;
        // Inconclusive and error: the first is not counted, the second is a failure.
        let r = r
            .measured(at(60), 1, &measurement(Outcome::Inconclusive), &t)
            .unwrap()
            .rollout;
        let t2 = r
            .measured(at(90), 1, &measurement(Outcome::Error), &t)
            .unwrap();
        assert_eq!(t2.kind, EventKind::AnalysisMeasured);
        let r = t2.rollout;
        assert!(r.tick(at(91), &no_evidence()).is_none());
        assert_eq!(r.running_analyses()[0].1, Some(at(90)));
        assert!(
            r.waiting_for(at(91), None).contains("1/2 passed, 1/1"),
            "{}",
            r.waiting_for(at(91), None)
        );
        // Persisted and restored mid-step: the counts are kept.
        let r: Rollout = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        let r = r
            .measured(at(120), 1, &measurement(Outcome::Pass), &t)
            .unwrap()
            .rollout;
        let next = r.tick(at(121), &no_evidence()).unwrap();
        assert!(
            next.reason.contains("analysis `ok-rate` passed"),
            "{}",
            next.reason
        );
        // The next step (100%) is entered in the same change, which promotes.
        assert_eq!(
            (next.rollout.phase, next.percent),
            (Phase::Promoted, Some(100.0))
        );
        // A measurement made for a step that is over is not counted.
        assert!(
            r.measured(at(122), 0, &measurement(Outcome::Pass), &t)
                .is_err()
        );
    }

    #[test]
    fn analysis_failing_past_its_limit_degrades_to_stable() {
        let t = template(5, 1);
        let r = analysed();
        let r = r
            .measured(at(30), 1, &measurement(Outcome::Fail), &t)
            .unwrap()
            .rollout;
        let t2 = r
            .measured(at(60), 1, &measurement(Outcome::Error), &t)
            .unwrap();
        assert_eq!(
            (t2.kind, t2.rollout.phase, t2.percent),
            (EventKind::AnalysisFailed, Phase::Degraded, Some(0.0))
        );
        assert!(
            t2.reason.contains("analysis `ok-rate` failed"),
            "{}",
            t2.reason
        );
    }

    #[test]
    fn background_analysis_runs_through_steps_and_can_fail_the_rollout() {
        let t = template(1, 0);
        let r = canary(vec![
            Step::Percent(10.0),
            Step::Pause(Duration::from_secs(60)),
            Step::Percent(100.0),
        ])
        .with_extras(&[], &[&t], None);
        let r = r.tick(at(0), &no_evidence()).unwrap().rollout;
        assert_eq!(r.running_analyses(), vec![("ok-rate".into(), None)]);
        // Passing background measurements never move the plan on their own.
        let r = r
            .measured(at(30), 99, &measurement(Outcome::Pass), &t)
            .unwrap()
            .rollout;
        assert!(r.tick(at(31), &no_evidence()).is_none());
        let failed = r
            .measured(at(40), 99, &measurement(Outcome::Fail), &t)
            .unwrap();
        assert_eq!(failed.rollout.phase, Phase::Degraded);
    }

    fn call(ok: bool) -> HookCall {
        HookCall {
            name: "hook".into(),
            kind: "x".into(),
            status: Some(if ok { 200 } else { 503 }),
            ok,
            detail: if ok { "answered 200" } else { "answered 503" }.into(),
            duration_ms: 1,
        }
    }

    #[test]
    fn pre_rollout_webhooks_hold_the_first_step_and_abort_on_failure() {
        let kinds = [HookKind::PreRollout, HookKind::PostRollout];
        let r =
            canary(vec![Step::Percent(10.0), Step::Percent(100.0)]).with_extras(&kinds, &[], None);
        assert!(r.tick(at(0), &no_evidence()).is_none());
        assert!(r.waiting_for(at(0), None).contains("pre-rollout"));
        let ok = r
            .hooks_called(at(1), HookKind::PreRollout, &[call(true)])
            .unwrap();
        assert_eq!((ok.kind, ok.percent), (EventKind::WebhookCalled, None));
        assert_eq!(
            ok.rollout.tick(at(1), &no_evidence()).unwrap().percent,
            Some(10.0)
        );
        let bad = r
            .hooks_called(at(1), HookKind::PreRollout, &[call(true), call(false)])
            .unwrap();
        assert_eq!(
            (bad.kind, bad.rollout.phase, bad.percent),
            (EventKind::RolloutAborted, Phase::Aborted, Some(0.0))
        );
        assert!(bad.reason.contains("503"), "{}", bad.reason);
        // Post-rollout is owed once the rollout has ended, and recorded once.
        assert!(r.hooks_called(at(2), HookKind::PostRollout, &[]).is_err());
        let post = bad
            .rollout
            .hooks_called(at(2), HookKind::PostRollout, &[call(false)])
            .unwrap();
        assert_eq!(post.rollout.phase, Phase::Aborted);
        assert!(!post.rollout.hooks.post_rollout_pending);
        assert!(
            post.rollout
                .hooks_called(at(3), HookKind::PostRollout, &[])
                .is_err()
        );
    }

    #[test]
    fn confirm_promotion_holds_the_last_step_until_confirmed() {
        let r = canary(vec![Step::Percent(10.0), Step::Percent(100.0)]).with_extras(
            &[HookKind::ConfirmPromotion],
            &[],
            None,
        );
        let r = r.tick(at(0), &no_evidence()).unwrap().rollout;
        assert!(r.tick(at(1), &no_evidence()).is_none());
        assert!(r.awaiting_confirmation(at(1), &no_evidence()));
        assert!(
            r.waiting_for(at(1), Some(&no_evidence()))
                .contains("confirm-promotion")
        );
        let held = r
            .hooks_called(at(2), HookKind::ConfirmPromotion, &[call(false)])
            .unwrap();
        assert!(held.reason.contains("promotion held"), "{}", held.reason);
        assert!(held.rollout.tick(at(3), &no_evidence()).is_none());
        let ok = held
            .rollout
            .hooks_called(at(4), HookKind::ConfirmPromotion, &[call(true)])
            .unwrap();
        let done = ok.rollout.tick(at(5), &no_evidence()).unwrap();
        assert_eq!(done.rollout.phase, Phase::Promoted);
    }

    #[test]
    fn a_freeze_holds_steps_unless_the_rollout_overrides_it() {
        let frozen = Evidence {
            frozen: Some("frozen until 2026-12-27T00:00:00.000Z (holidays)".into()),
            ..no_evidence()
        };
        let r = canary(vec![
            Step::Percent(10.0),
            Step::Pause(Duration::from_secs(60)),
            Step::Percent(100.0),
        ]);
        let r = r.tick(at(0), &no_evidence()).unwrap().rollout;
        // The pause's time passes, but the freeze holds the next step.
        assert!(r.tick(at(120), &frozen).is_none());
        assert!(r.waiting_for(at(120), Some(&frozen)).contains("holidays"));
        let thawed = r.tick(at(121), &no_evidence()).unwrap();
        assert_eq!(thawed.rollout.phase, Phase::Promoted);
        let overriding = r.with_extras(&[], &[], Some("hotfix".into()));
        assert_eq!(
            overriding.tick(at(120), &frozen).unwrap().rollout.phase,
            Phase::Promoted
        );
    }

    /// Every change the driver would make from start to end, and the step each one
    /// names: one change per step entered, never a second one for the same step.
    #[test]
    fn every_step_is_entered_by_one_change_naming_it_once() {
        let pass = |when| Evidence {
            candidate_requests: 10_000,
            verdict: Some((Verdict::Pass, at(when))),
            needs: None,
            frozen: None,
        };
        let start = canary(vec![
            Step::Percent(10.0),
            Step::Pause(Duration::from_secs(60)),
            Step::Percent(50.0),
            Step::Gate { min_requests: 0 },
            Step::Percent(75.0),
            Step::Pause(Duration::from_secs(60)),
            Step::Percent(100.0),
        ]);
        let mut r = start;
        let mut changes = Vec::new();
        for second in 0..1000 {
            if let Some(t) = r.tick(at(second), &pass(second)) {
                changes.push((t.percent, t.kind, t.reason.clone()));
                r = t.rollout;
            }
        }
        let reasons: Vec<&str> = changes.iter().map(|c| c.2.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "step 1: 10% to the candidate",
                "timed pause over; step 3: 50% to the candidate",
                "evidence gate passed; step 5: 75% to the candidate",
                "timed pause over; step 7: 100% to the candidate; canary is the new baseline",
            ],
            "{changes:?}"
        );
        let percents: Vec<Option<f64>> = changes.iter().map(|c| c.0).collect();
        assert_eq!(percents, [Some(10.0), Some(50.0), Some(75.0), Some(100.0)]);
        assert_eq!(changes[3].1, EventKind::RolloutPromoted);
        assert_eq!(r.phase, Phase::Promoted);
    }
}
