//! Releases: what `weir ctl release` and `weir ctl undo` make of a service, as pure
//! planning on top of the controller's [`Planned`] change. A release puts a new build on
//! the candidate pool (its version label and, on VM fleets, the hosts running it),
//! starts the service's rollout plan and opens a history entry; the rollout's end
//! (promoted, degraded by the guard, aborted, superseded by a newer release) closes it.
//! An undo puts an earlier entry's pool, endpoints and version back with all traffic on
//! that pool, in one change, aborting a running rollout first (as `kubectl argo rollouts
//! undo` replaces one).
//!
//! Endpoints and versions set here are runtime state that overrides the config (until a
//! reload changes the service's set of pools); the controller persists them with the
//! weights, so they survive restarts and travel to a fleet's other instances.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::config::{Endpoint, RolloutConfig, ServiceConfig, check_version};
use crate::control::controller::{ControlError, Planned, all_to, split};
use crate::control::rollout::{Evidence, Rollout, Transition, plan_steps};
use crate::control::store::{Deployed, MAX_RELEASES, Release, ReleaseOutcome, Weights};
use crate::dataplane::routing::ServiceSnapshot;
use crate::model::{EventKind, Phase, timestamp};

/// Most endpoints one release may name: a pool is a set of hosts, not a fleet's
/// inventory, and the list is stored in every history entry.
pub(crate) const MAX_ENDPOINTS: usize = 256;

/// What an operator asks a release to do.
#[derive(Debug, Clone)]
pub(crate) struct ReleaseRequest {
    pub(crate) version: String,
    pub(crate) pool: Option<String>,
    pub(crate) endpoints: Option<Vec<String>>,
    pub(crate) actor: Option<String>,
}

/// Endpoints as the config takes them: `host:port`, at least one, none twice.
pub(crate) fn parse_endpoints(given: &[String]) -> Result<Vec<Endpoint>, String> {
    if given.is_empty() {
        return Err("endpoints must name at least one host:port".into());
    }
    if given.len() > MAX_ENDPOINTS {
        return Err(format!(
            "at most {MAX_ENDPOINTS} endpoints per release, got {}",
            given.len()
        ));
    }
    let mut out: Vec<Endpoint> = Vec::with_capacity(given.len());
    for e in given {
        let endpoint = Endpoint::parse(e).map_err(|msg| format!("endpoint {msg}"))?;
        if out.contains(&endpoint) {
            return Err(format!("endpoint `{endpoint}` is listed twice"));
        }
        out.push(endpoint);
    }
    Ok(out)
}

/// `cfg` with the released pools on their release's endpoints (what a reload builds, so
/// that it keeps them).
pub(crate) fn with_deployed(
    cfg: &ServiceConfig,
    deployed: &BTreeMap<String, Deployed>,
) -> ServiceConfig {
    let mut cfg = cfg.clone();
    for pool in &mut cfg.pools {
        if let Some(d) = deployed.get(&pool.name) {
            match parse_endpoints(&d.endpoints) {
                Ok(endpoints) => pool.endpoints = endpoints,
                // Checked when released; kept from the config should it fail anyway.
                Err(e) => tracing::error!(
                    "service {}: release of pool {} has unusable endpoints ({e}); using the config's",
                    cfg.name,
                    pool.name
                ),
            }
        }
    }
    cfg
}

fn named(current: &ServiceSnapshot, weights: &[u32]) -> Weights {
    current
        .slots()
        .iter()
        .zip(weights)
        .map(|(s, w)| (s.name().to_owned(), *w))
        .collect()
}

fn endpoints_of(current: &ServiceSnapshot, pool: &str) -> Vec<String> {
    current.slot(pool).map_or_else(Vec::new, |s| {
        s.pool
            .endpoints()
            .iter()
            .map(|e| e.endpoint.as_str().to_owned())
            .collect()
    })
}

/// Add `entry` (numbered after the newest) to the history, dropping the oldest beyond
/// [`MAX_RELEASES`]; returns its revision.
fn push(releases: &mut Vec<Release>, mut entry: Release) -> u64 {
    entry.revision = releases.last().map_or(1, |r| r.revision + 1);
    let revision = entry.revision;
    releases.push(entry);
    if releases.len() > MAX_RELEASES {
        let extra = releases.len() - MAX_RELEASES;
        releases.drain(..extra);
    }
    revision
}

/// Close the open (newest, not ended) release, if any.
fn close(
    releases: &mut [Release],
    outcome: ReleaseOutcome,
    reason: Option<String>,
    now: SystemTime,
) -> Option<&Release> {
    let open = releases.last_mut().filter(|r| r.outcome.is_none())?;
    open.outcome = Some(outcome);
    open.ended_at = Some(timestamp(now));
    open.reason = reason;
    Some(open)
}

/// The pool a rollout or a release goes to when none is named: the plan's candidate,
/// or, once a promotion made that the baseline, the one other pool (the next release
/// goes the other way). `None` when there are several others to choose from.
pub(crate) fn default_candidate(plan: &RolloutConfig, current: &ServiceSnapshot) -> Option<String> {
    let stable = current.baseline_name();
    if plan.candidate() != stable {
        return Some(plan.candidate().to_owned());
    }
    let mut others = current
        .slots()
        .iter()
        .map(|s| s.name())
        .filter(|n| *n != stable);
    match (others.next(), others.next()) {
        (Some(only), None) => Some(only.to_owned()),
        _ => None,
    }
}

/// Plan a release of `request.version` for `name` into `planned` (which starts as the
/// service's current state).
pub(crate) fn plan_release(
    name: &str,
    current: &ServiceSnapshot,
    plan: &RolloutConfig,
    config_version: impl Fn(&str) -> Option<String>,
    request: ReleaseRequest,
    now: SystemTime,
    planned: &mut Planned,
) -> Result<(), ControlError> {
    let conflict = |msg: String| ControlError::Conflict(format!("service `{name}`: {msg}"));
    check_version(&request.version).map_err(|e| ControlError::Invalid(format!("version: {e}")))?;
    let stable = current.baseline_name().to_owned();
    let pool = match request.pool {
        Some(p) => p,
        None => default_candidate(plan, current).ok_or_else(|| {
            conflict(format!(
                "the plan's candidate `{}` is now the baseline; name the pool to release to (--pool)",
                plan.candidate()
            ))
        })?,
    };
    if current.slot(&pool).is_none() {
        let pools: Vec<&str> = current.slots().iter().map(|s| s.name()).collect();
        return Err(ControlError::NotFound(format!(
            "service `{name}` has no pool `{pool}` (pools: {})",
            pools.join(", ")
        )));
    }
    if pool == stable {
        return Err(conflict(format!(
            "`{pool}` is the baseline and serves the traffic a release is judged against; \
             release to another pool"
        )));
    }
    let endpoints = match request.endpoints {
        Some(given) => {
            let parsed = parse_endpoints(&given)
                .map_err(|e| ControlError::Invalid(format!("endpoints: {e}")))?;
            parsed.iter().map(|e| e.as_str().to_owned()).collect()
        }
        None => endpoints_of(current, &pool),
    };

    // Revision 1 is what served before the first release, so that the first release
    // can be undone too.
    if planned.releases.is_empty() {
        let version = planned
            .deployed
            .get(&stable)
            .and_then(|d| d.version.clone())
            .or_else(|| config_version(&stable));
        let weights = current.weights();
        push(
            &mut planned.releases,
            Release {
                revision: 0,
                version,
                pool: stable.clone(),
                endpoints: endpoints_of(current, &stable),
                weights: named(current, &weights),
                // A service never changed since start-up has no time of its own.
                started_at: timestamp(if current.updated_at > SystemTime::UNIX_EPOCH {
                    current.updated_at
                } else {
                    now
                }),
                ended_at: None,
                outcome: Some(ReleaseOutcome::Promoted),
                reason: Some("in force before the first release".into()),
                actor: None,
                undo_to: None,
            },
        );
    }
    let next_revision = planned.releases.last().map_or(1, |r| r.revision + 1);
    // A newer release replaces a running rollout, as a new image does in Argo Rollouts:
    // its traffic returns to the baseline and the plan starts over for the new build.
    let running = planned
        .rollout
        .as_ref()
        .is_some_and(|r| r.phase.is_running());
    if running {
        close(
            &mut planned.releases,
            ReleaseOutcome::Superseded,
            Some(format!(
                "replaced by revision {next_revision} (version {})",
                request.version
            )),
            now,
        );
    }

    // The candidate pool is new: its window (and so the evidence) starts empty.
    let fresh = Evidence {
        candidate_requests: 0,
        verdict: None,
        needs: None,
        frozen: None,
    };
    let blue_green = matches!(plan, RolloutConfig::BlueGreen { .. });
    let rollout = Rollout::start(&pool, &stable, plan_steps(plan), now, &fresh);
    let first = rollout.current_step().map_or("-".into(), |s| s.describe());
    let t = Rollout::settle(
        Transition {
            percent: blue_green.then_some(0.0),
            rollout,
            promote_baseline: false,
            kind: EventKind::RolloutStarted,
            reason: String::new(),
        },
        now,
        &fresh,
    );
    planned.weights = match t.percent {
        Some(p) => split(current, &t.rollout, p),
        None => all_to(current, &stable),
    };
    planned.degraded = None;
    planned.deployed.insert(
        pool.clone(),
        Deployed {
            version: Some(request.version.clone()),
            endpoints: endpoints.clone(),
        },
    );
    planned.rebuild.push(pool.clone());
    let revision = push(
        &mut planned.releases,
        Release {
            revision: 0,
            version: Some(request.version.clone()),
            pool: pool.clone(),
            endpoints: endpoints.clone(),
            weights: named(current, &planned.weights),
            started_at: timestamp(now),
            ended_at: None,
            outcome: None,
            reason: None,
            actor: request.actor,
            undo_to: None,
        },
    );
    planned.kind = EventKind::Released;
    planned.reason = Some(format!(
        "release {revision}: version {} to pool {pool} ({}); {} rollout started, first step: {first}{}",
        request.version,
        endpoints.join(", "),
        if blue_green { "blue/green" } else { "canary" },
        if running {
            "; the running rollout was superseded"
        } else {
            ""
        }
    ));
    planned.details = Some(serde_json::json!({
        "revision": revision,
        "version": request.version,
        "pool": pool,
        "endpoints": endpoints,
        "phase": t.rollout.phase,
        "step": t.rollout.step,
        "candidate": t.rollout.candidate,
        "stable": t.rollout.stable,
    }));
    planned.rollout = Some(t.rollout);
    Ok(())
}

/// Plan an undo to `to_revision` (default: the entry before the newest) into `planned`.
pub(crate) fn plan_undo(
    name: &str,
    current: &ServiceSnapshot,
    to_revision: Option<u64>,
    actor: Option<String>,
    now: SystemTime,
    planned: &mut Planned,
) -> Result<(), ControlError> {
    let conflict = |msg: String| ControlError::Conflict(format!("service `{name}`: {msg}"));
    let newest = planned
        .releases
        .last()
        .ok_or_else(|| conflict("has no release history to undo".into()))?;
    let target = match to_revision {
        Some(n) => planned
            .releases
            .iter()
            .find(|r| r.revision == n)
            .ok_or_else(|| {
                let kept = match (planned.releases.first(), planned.releases.last()) {
                    (Some(a), Some(b)) => format!("{}..={}", a.revision, b.revision),
                    _ => "none".into(),
                };
                ControlError::NotFound(format!(
                    "service `{name}` has no revision {n} in its history (kept: {kept})"
                ))
            })?,
        // By default, back to the newest earlier release that held all the traffic
        // (promoted, an undo target, or what served before the first release): never to
        // a build the guard degraded, an aborted or superseded one, or one still open,
        // which "undo" would otherwise put all traffic on. An operator who wants one of
        // those names it with `to_revision`.
        None => planned
            .releases
            .iter()
            .rev()
            .skip(1)
            .find(|r| r.outcome == Some(ReleaseOutcome::Promoted))
            .ok_or_else(|| {
                conflict(format!(
                    "no release before revision {} was promoted; nothing known good to go \
                     back to (name one with to_revision)",
                    newest.revision
                ))
            })?,
    }
    .clone();
    if current.slot(&target.pool).is_none() {
        return Err(conflict(format!(
            "revision {}'s pool `{}` is no longer one of its pools",
            target.revision, target.pool
        )));
    }
    let next_revision = newest.revision + 1;
    // A running rollout ends here: undo replaces it.
    if let Some(r) = &planned.rollout
        && r.phase.is_running()
    {
        let aborted = r
            .abort(now)
            .map_err(|e| conflict(format!("cannot abort the running rollout: {e}")))?;
        planned.rollout = Some(aborted.rollout);
        close(
            &mut planned.releases,
            ReleaseOutcome::Aborted,
            Some(format!(
                "aborted by undo to revision {} (revision {next_revision})",
                target.revision
            )),
            now,
        );
    }
    let wanted = Deployed {
        version: target.version.clone(),
        endpoints: target.endpoints.clone(),
    };
    // Unchanged when the pool runs that very release, or (for the entry of what served
    // before any release) still runs the config's unlabelled endpoints.
    let unchanged = match planned.deployed.get(&target.pool) {
        Some(there) => *there == wanted,
        None => wanted.version.is_none() && wanted.endpoints == endpoints_of(current, &target.pool),
    };
    if !unchanged {
        parse_endpoints(&wanted.endpoints).map_err(|e| {
            conflict(format!(
                "revision {}'s endpoints cannot be used: {e}",
                target.revision
            ))
        })?;
        planned.rebuild.push(target.pool.clone());
        planned.deployed.insert(target.pool.clone(), wanted);
    }
    planned.weights = all_to(current, &target.pool);
    planned.baseline = Some(target.pool.clone());
    planned.degraded = None;
    let revision = push(
        &mut planned.releases,
        Release {
            revision: 0,
            version: target.version.clone(),
            pool: target.pool.clone(),
            endpoints: target.endpoints.clone(),
            weights: named(current, &planned.weights),
            started_at: timestamp(now),
            ended_at: Some(timestamp(now)),
            outcome: Some(ReleaseOutcome::Promoted),
            reason: Some(format!("undo to revision {}", target.revision)),
            actor,
            undo_to: Some(target.revision),
        },
    );
    planned.kind = EventKind::Undone;
    planned.reason = Some(format!(
        "revision {revision}: undo to revision {} — version {} on pool {pool} ({}), all traffic to {pool}",
        target.revision,
        target.version.as_deref().unwrap_or("-"),
        target.endpoints.join(", "),
        pool = target.pool,
    ));
    planned.details = Some(serde_json::json!({
        "revision": revision,
        "undo_to": target.revision,
        "version": target.version,
        "pool": target.pool,
        "endpoints": target.endpoints,
    }));
    Ok(())
}

/// Keep the newest release in step with its rollout after a rollout verb, a tick or
/// a revert: its end (promoted, degraded with the guard's reason, aborted) closes it;
/// a retry of its pool reopens it.
pub(crate) fn follow_rollout(before: Option<Phase>, now: SystemTime, planned: &mut Planned) {
    let Some(rollout) = &planned.rollout else {
        return;
    };
    let Some(newest) = planned.releases.last() else {
        return;
    };
    if newest.pool != rollout.candidate || newest.undo_to.is_some() {
        return;
    }
    let was_running = before.is_some_and(Phase::is_running);
    let outcome = match rollout.phase {
        Phase::Promoted => ReleaseOutcome::Promoted,
        Phase::Degraded => ReleaseOutcome::Degraded,
        Phase::Aborted => ReleaseOutcome::Aborted,
        Phase::Progressing | Phase::Paused
            if planned.kind == EventKind::RolloutStarted && newest.outcome.is_some() =>
        {
            // Retried (or started again) on the released pool: the release is live again.
            let reopened = planned.releases.last_mut().expect("checked above");
            reopened.outcome = None;
            reopened.ended_at = None;
            reopened.reason = None;
            return;
        }
        _ => return,
    };
    if !was_running {
        return;
    }
    let reason = match outcome {
        ReleaseOutcome::Degraded => planned.degraded.clone().or(planned.reason.clone()),
        _ => planned.reason.clone(),
    };
    let version = newest.version.clone();
    let revision = newest.revision;
    if close(&mut planned.releases, outcome, reason, now).is_some() {
        // The event that ends a release says which one.
        let mut details = planned
            .details
            .take()
            .unwrap_or_else(|| serde_json::json!({}));
        if let serde_json::Value::Object(map) = &mut details {
            map.insert(
                "release".into(),
                serde_json::json!({ "revision": revision, "version": version, "outcome": outcome }),
            );
        }
        planned.details = Some(details);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: &str) -> Release {
        Release {
            revision: 0,
            version: Some(version.into()),
            pool: "canary".into(),
            endpoints: vec!["10.0.0.1:80".into()],
            weights: Weights::new(),
            started_at: "2025-01-02T03:04:05.678Z".into(),
            ended_at: None,
            outcome: None,
            reason: None,
            actor: None,
            undo_to: None,
        }
    }

    #[test]
    fn history_is_bounded_and_revisions_keep_counting() {
        let mut releases = Vec::new();
        for n in 1..=(MAX_RELEASES as u64 + 5) {
            assert_eq!(push(&mut releases, entry(&format!("v{n}"))), n);
        }
        assert_eq!(releases.len(), MAX_RELEASES);
        assert_eq!(releases[0].revision, 6);
        assert_eq!(releases.last().unwrap().revision, MAX_RELEASES as u64 + 5);
        // Closing touches only an open newest entry.
        let now = SystemTime::UNIX_EPOCH;
        assert!(close(&mut releases, ReleaseOutcome::Promoted, None, now).is_some());
        assert!(close(&mut releases, ReleaseOutcome::Aborted, None, now).is_none());
        assert_eq!(
            releases.last().unwrap().outcome,
            Some(ReleaseOutcome::Promoted)
        );
    }

    #[test]
    fn endpoints_follow_the_config_rules() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            parse_endpoints(&list(&["10.0.0.1:80", "[::1]:8080", "app.internal:9000"])).is_ok()
        );
        for (bad, says) in [
            (list(&[]), "at least one"),
            (list(&["10.0.0.1"]), "needs a port"),
            (list(&["a:1", "a:1"]), "listed twice"),
            (list(&["u@a:1"]), "user info"),
            (list(&["a:99999"]), "out of range"),
        ] {
            let err = parse_endpoints(&bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        let many: Vec<String> = (0..=MAX_ENDPOINTS)
            .map(|i| format!("10.0.{}.{}:80", i / 250, i % 250))
            .collect();
        assert!(parse_endpoints(&many).unwrap_err().contains("at most"));
    }
}
