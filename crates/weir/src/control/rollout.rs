//! Rollout plans: the state machine that moves traffic step by step from a service's
//! baseline to a candidate pool (canary), or previews a candidate and switches to it
//! at once (blue/green). Pure: time and evidence are passed in, the result is the next
//! state and the weights to set; the controller applies and persists it.
//!
//! Evidence, not the clock: a gate passes only when the candidate has served enough
//! requests since the gate began and the SLO guard's latest verdict on it is a pass;
//! an inconclusive verdict keeps it waiting, and a breach is the guard's revert, which
//! ends the rollout as `degraded`.

use crate::model::{EventKind, Phase, Step};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::RolloutConfig;
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
        };
        r.enter(0, now, evidence);
        r
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
        match (self.phase, self.current_step()) {
            (Phase::Paused, _) => "resume (paused by an operator)".into(),
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

    /// Advance by the clock and the evidence. `None`: nothing to do yet.
    pub fn tick(&self, now: SystemTime, evidence: &Evidence) -> Option<Transition> {
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

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn no_evidence() -> Evidence {
        Evidence {
            candidate_requests: 0,
            verdict: None,
            needs: None,
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
        };
        let r = r.tick(at(5), &start).unwrap().rollout;
        assert_eq!(r.gate_base, Some(1000));
        // Plenty of time, no new requests: waits.
        assert!(r.tick(at(5000), &start).is_none());
        let enough = |verdict, when| Evidence {
            candidate_requests: 1500,
            verdict: Some((verdict, at(when))),
            needs: None,
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

    /// Every change the driver would make from start to end, and the step each one
    /// names: one change per step entered, never a second one for the same step.
    #[test]
    fn every_step_is_entered_by_one_change_naming_it_once() {
        let pass = |when| Evidence {
            candidate_requests: 10_000,
            verdict: Some((Verdict::Pass, at(when))),
            needs: None,
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
