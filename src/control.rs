//! The controller: the one writer of routing state. Every change — admin API, SLO guard,
//! rollout, reload — arrives as a `Command`, is validated whole, becomes a new snapshot
//! and is swapped in atomically. Nothing else stores snapshots.

use std::sync::{Arc, Mutex};

use crate::config::{Config, ServiceConfig};
use crate::pool::Pool;
use crate::routing::{RouteTable, Router, Service, ServiceSnapshot, Source, WeightError};

/// A request to change routing state.
#[derive(Debug, Clone)]
pub enum Command {
    /// Set every pool's weight at once.
    SetWeights {
        service: String,
        weights: Vec<(String, u32)>,
        /// Refuse if the service's version is no longer this (optimistic concurrency).
        if_version: Option<u64>,
        source: Source,
        reason: Option<String>,
    },
    /// All traffic to the baseline pool.
    Rollback {
        service: String,
        source: Source,
        reason: Option<String>,
    },
}

/// What a command changed.
#[derive(Debug, Clone)]
pub struct Change {
    pub service: String,
    pub source: Source,
    pub from: Vec<(String, u32)>,
    pub to: Vec<(String, u32)>,
    pub snapshot: Arc<ServiceSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("unknown service `{0}`")]
    UnknownService(String),
    #[error("service `{service}` has no pool `{pool}`")]
    UnknownPool { service: String, pool: String },
    #[error("pool `{pool}` is named more than once")]
    DuplicatePool { pool: String },
    #[error("missing weight for pool(s) {}: every pool must be given a weight", .pools.join(", "))]
    MissingPools { pools: Vec<String> },
    #[error("service `{service}` is at version {current}, not {expected}: it changed meanwhile")]
    VersionConflict {
        service: String,
        expected: u64,
        current: u64,
    },
    #[error(transparent)]
    Weights(#[from] WeightError),
}

/// The single writer. Holds its lock across validate → build → swap so that two
/// commands can never interleave and lose an update.
#[derive(Debug)]
pub struct Controller {
    router: Arc<Router>,
    write: Mutex<()>,
}

impl Controller {
    /// Build the run-time services of a validated config, with the config's weights.
    pub fn new(config: &Config) -> Controller {
        let services = config.services.iter().map(build_service).collect();
        Controller {
            router: Arc::new(Router::new(RouteTable::new(services))),
            write: Mutex::new(()),
        }
    }

    /// The router the data plane reads.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The current snapshot of a service.
    pub fn snapshot(&self, service: &str) -> Option<Arc<ServiceSnapshot>> {
        self.router
            .table()
            .service(service)
            .map(|s| s.snapshot_full())
    }

    /// Validate and apply one command. On error nothing has changed.
    pub fn apply(&self, command: Command) -> Result<Change, ControlError> {
        let _write = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let table = self.router.table();
        let (name, source) = match &command {
            Command::SetWeights {
                service, source, ..
            }
            | Command::Rollback {
                service, source, ..
            } => (service.clone(), *source),
        };
        let service = table
            .service(&name)
            .ok_or_else(|| ControlError::UnknownService(name.clone()))?;
        let current = service.snapshot_full();
        let weights = match &command {
            Command::SetWeights {
                weights,
                if_version,
                ..
            } => {
                if let Some(expected) = *if_version
                    && expected != current.version
                {
                    return Err(ControlError::VersionConflict {
                        service: name,
                        expected,
                        current: current.version,
                    });
                }
                ordered_weights(&name, &current, weights)?
            }
            // The baseline takes the whole current total, so 90:10 becomes 100:0 and
            // shares stay readable.
            Command::Rollback { .. } => {
                let total = current.total_weight().min(crate::config::MAX_WEIGHT) as u32;
                current
                    .slots()
                    .iter()
                    .map(|s| {
                        if s.name() == service.baseline {
                            total
                        } else {
                            0
                        }
                    })
                    .collect()
            }
        };
        let pools = current.slots().iter().map(|s| s.pool.clone()).collect();
        let next = Arc::new(ServiceSnapshot::new(
            pools,
            &weights,
            current.version + 1,
            source,
        )?);
        service.store(next.clone());
        Ok(Change {
            service: name,
            source,
            from: named(&current),
            to: named(&next),
            snapshot: next,
        })
    }
}

fn build_service(cfg: &ServiceConfig) -> Arc<Service> {
    let pools: Vec<Arc<Pool>> = cfg
        .pools
        .iter()
        .map(|p| Arc::new(Pool::new(&cfg.name, p)))
        .collect();
    let weights: Vec<u32> = cfg.pools.iter().map(|p| p.weight).collect();
    let snapshot = ServiceSnapshot::new(pools, &weights, 1, Source::Config)
        .expect("validated config has valid weights");
    Arc::new(Service::new(
        &cfg.name,
        cfg.hosts.clone(),
        cfg.baseline.clone(),
        snapshot,
    ))
}

fn named(s: &ServiceSnapshot) -> Vec<(String, u32)> {
    s.slots()
        .iter()
        .map(|p| (p.name().to_string(), p.weight))
        .collect()
}

/// Map named weights onto the snapshot's pool order, requiring each pool exactly once.
fn ordered_weights(
    service: &str,
    current: &ServiceSnapshot,
    given: &[(String, u32)],
) -> Result<Vec<u32>, ControlError> {
    let mut out: Vec<Option<u32>> = vec![None; current.slots().len()];
    for (pool, weight) in given {
        let i = current
            .slots()
            .iter()
            .position(|s| s.name() == pool)
            .ok_or_else(|| ControlError::UnknownPool {
                service: service.to_string(),
                pool: pool.clone(),
            })?;
        if out[i].replace(*weight).is_some() {
            return Err(ControlError::DuplicatePool { pool: pool.clone() });
        }
    }
    let missing: Vec<String> = out
        .iter()
        .zip(current.slots())
        .filter(|(w, _)| w.is_none())
        .map(|(_, s)| s.name().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(ControlError::MissingPools { pools: missing });
    }
    Ok(out.into_iter().map(|w| w.unwrap_or(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        let cfg = Config::parse(
            r#"
[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:1"]
weight = 90
[service.pools.canary]
endpoints = ["127.0.0.1:2"]
weight = 10
"#,
            "t",
        )
        .unwrap();
        Controller::new(&cfg)
    }

    fn set(weights: &[(&str, u32)], if_version: Option<u64>) -> Command {
        Command::SetWeights {
            service: "shop".into(),
            weights: weights.iter().map(|(p, w)| (p.to_string(), *w)).collect(),
            if_version,
            source: Source::Admin,
            reason: None,
        }
    }

    #[test]
    fn set_weights_swaps_a_new_version() {
        let c = controller();
        let before = c.snapshot("shop").unwrap();
        let change = c
            .apply(set(&[("canary", 50), ("stable", 50)], Some(1)))
            .unwrap();
        assert_eq!(
            change.from,
            vec![("stable".into(), 90), ("canary".into(), 10)]
        );
        assert_eq!(
            change.to,
            vec![("stable".into(), 50), ("canary".into(), 50)]
        );
        let after = c.snapshot("shop").unwrap();
        assert_eq!(after.version, 2);
        assert_eq!(after.updated_by, Source::Admin);
        // The pools themselves are shared, not rebuilt.
        assert!(Arc::ptr_eq(&before.slots()[0].pool, &after.slots()[0].pool));
    }

    #[test]
    fn bad_commands_change_nothing() {
        let c = controller();
        let bad = [
            set(&[("stable", 1)], None),
            set(&[("stable", 1), ("canary", 1), ("other", 1)], None),
            set(&[("stable", 1), ("stable", 2)], None),
            set(&[("stable", 0), ("canary", 0)], None),
            set(&[("stable", 1), ("canary", 1)], Some(7)),
        ];
        for cmd in bad {
            assert!(c.apply(cmd).is_err());
        }
        let unknown = Command::Rollback {
            service: "nope".into(),
            source: Source::Admin,
            reason: None,
        };
        assert_eq!(
            c.apply(unknown).unwrap_err(),
            ControlError::UnknownService("nope".into())
        );
        let s = c.snapshot("shop").unwrap();
        assert_eq!((s.version, s.weights()), (1, vec![90, 10]));
    }

    #[test]
    fn rollback_sends_everything_to_baseline() {
        let c = controller();
        let change = c
            .apply(Command::Rollback {
                service: "shop".into(),
                source: Source::Guard,
                reason: Some("test".into()),
            })
            .unwrap();
        assert_eq!(change.snapshot.weights(), vec![100, 0]);
        assert_eq!(change.snapshot.updated_by, Source::Guard);
    }
}
