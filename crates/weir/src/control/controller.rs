//! The controller: the one writer of routing state. Every change — admin API, SLO guard,
//! rollout, reload — arrives as a `Command`, is validated whole, made durable (state file
//! and event journal, both fsynced), and only then swapped in and acknowledged. Nothing
//! else stores snapshots.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::SystemTime;

use crate::config::{AnalysisTemplate, HookConfig, HookKind};
use crate::config::{Config, ServiceConfig};
use crate::config::{RolloutConfig, SloConfig, StickyConfig};
use crate::control::analysis::{HookCall, Measurement};
use crate::control::fleet::FleetHooks;
use crate::control::freeze::Frozen;
use crate::control::rollout::{Evidence, Rollout, Transition, plan_steps};
use crate::control::store::{
    Deployed, Event, EventLog, FileStore, Release, Revision, SavedControl, ServiceState, State,
    StateError, StateLock, StateStore, Store, Weights,
};
use crate::dataplane::pool::Pool;
use crate::dataplane::routing::{
    Choice, RouteTable, Router, RoutingWriter, Service, ServiceSnapshot, StickyKey, WeightError,
};
use crate::model::{Clock, EventKind, PERCENT_SCALE, Phase, Source, Step, SystemClock, timestamp};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::Window;

/// Journal files rotate at this size; a weight change is a few hundred bytes.
const JOURNAL_FILE_BYTES: u64 = 8 * 1024 * 1024;
const JOURNAL_FILES_KEPT: usize = 4;
/// Recent events served from memory.
const JOURNAL_MEMORY: usize = 10_000;

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
        actor: Option<String>,
        reason: Option<String>,
    },
    /// All traffic to the baseline pool. From the guard, it also marks the service
    /// degraded; `details` (the guard's decision record) goes into the event.
    Rollback {
        service: String,
        source: Source,
        actor: Option<String>,
        reason: Option<String>,
        details: Option<serde_json::Value>,
    },
    /// Drive the service's rollout plan: an operator verb, or the driver's tick.
    Rollout {
        service: String,
        verb: RolloutVerb,
        source: Source,
        actor: Option<String>,
    },
    /// Record a new release of a pool (its version, and the endpoints running it) and
    /// start the service's rollout plan for it (see [`crate::control::release`]).
    Release {
        service: String,
        version: String,
        /// The pool to release to; the plan's candidate by default.
        pool: Option<String>,
        /// The hosts running the new build; the pool's current ones when absent.
        endpoints: Option<Vec<String>>,
        /// During a freeze window only with this (the operator's reason), which also
        /// lets the release's rollout go on through the freeze.
        override_freeze: Option<String>,
        source: Source,
        actor: Option<String>,
    },
    /// Go back to an earlier release's endpoints, version and weights in one change.
    Undo {
        service: String,
        /// The history revision to go back to; the previous release by default.
        to_revision: Option<u64>,
        source: Source,
        actor: Option<String>,
    },
}

/// What to do with a rollout.
#[derive(Debug, Clone)]
pub enum RolloutVerb {
    /// Start the plan; the candidate defaults to the plan's, or to the other pool when
    /// the plan's candidate is now the baseline (after a promotion).
    ///
    /// During a freeze window only with `override_freeze` (the operator's reason).
    Start {
        candidate: Option<String>,
        override_freeze: Option<String>,
    },
    /// Pass the current pause or gate; `full` jumps to the end. During a freeze only
    /// with `override_freeze`, which also lets the rollout go on through the freeze.
    Promote {
        full: bool,
        override_freeze: Option<String>,
    },
    Pause,
    Resume,
    /// All traffic back to the stable pool.
    Abort,
    /// Start again from step 0 after `aborted` or `degraded` (freeze as for `Start`).
    Retry {
        override_freeze: Option<String>,
    },
    /// Advance by time and evidence (the rollout driver).
    Tick(Evidence),
    /// An analysis measurement the driver made for step `step`.
    Measured {
        /// Which rollout asked (its `started_at`): a measurement made for a rollout
        /// that has since been superseded, undone or retried is not the new one's.
        rollout: SystemTime,
        step: usize,
        measurement: Box<Measurement>,
    },
    /// The answers of the rollout's webhooks of one kind.
    HooksCalled {
        /// Which rollout asked (its `started_at`), as for `Measured`.
        rollout: SystemTime,
        kind: HookKind,
        calls: Vec<HookCall>,
    },
}

/// What a command changed, and the event that records it.
#[derive(Debug, Clone)]
pub struct Change {
    pub service: String,
    pub source: Source,
    pub from: Vec<(String, u32)>,
    pub to: Vec<(String, u32)>,
    pub snapshot: Arc<ServiceSnapshot>,
    pub event: Option<Event>,
    /// False for a rollback applied to live traffic although its state could not be
    /// saved (it is retried until it is).
    pub durable: bool,
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
    /// The command does not fit the current state (e.g. a rollout verb in the wrong
    /// phase).
    #[error("{0}")]
    Conflict(String),
    /// Nothing to do (a rollout tick with nothing due).
    #[error("nothing to do")]
    Unchanged,
    /// A value in the request is not acceptable (a release's version or endpoints).
    #[error("{0}")]
    Invalid(String),
    /// Something a release or undo names that the service does not have (a pool, a
    /// history revision).
    #[error("{0}")]
    NotFound(String),
    /// The change could not be made durable, so it was not applied.
    #[error(
        "state not saved, nothing changed: the state directory does not take writes \
         (weir keeps serving the current weights and refuses changes until it does): {0}"
    )]
    Storage(String),
    /// Fleet mode: the shared store cannot take the change now (unreachable, no
    /// quorum, or not the store this instance knows), so nothing changed.
    #[error(
        "nothing changed: the fleet's store is unreachable or refuses writes (weir keeps \
         serving the current weights): {0}"
    )]
    StoreUnavailable(String),
}

/// Why the controller cannot start on its state directory. Nothing in the directory has
/// been written when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory cannot be taken or read: another weir holds it, an I/O error, a
    /// state file from a newer weir.
    #[error(transparent)]
    Storage(#[from] StateError),
    /// The state file is there but weir cannot use it as it is. Guessing (falling back to
    /// the config's weights) could send traffic where an operator had turned it away, so
    /// this stops the start; the operator fixes the file or discards it explicitly.
    #[error(
        "state file {} cannot be used:{}",
        path.display(),
        problems.iter().map(|p| format!("\n  - {p}")).collect::<String>()
    )]
    Unusable {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl From<StateError> for ControlError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Unavailable(reason) => ControlError::StoreUnavailable(reason),
            e => ControlError::Storage(e.to_string()),
        }
    }
}

/// How many times a command is planned again after another writer's change came first.
const CONFLICT_RETRIES: u32 = 3;

/// Why one try of a command did not apply.
enum Attempt {
    /// The shared store changed since this controller read it: catch up, plan again.
    Conflict,
    Failed(ControlError),
}

impl From<ControlError> for Attempt {
    fn from(e: ControlError) -> Self {
        Attempt::Failed(e)
    }
}

impl From<WeightError> for Attempt {
    fn from(e: WeightError) -> Self {
        Attempt::Failed(e.into())
    }
}

/// What a reload did, for the API answer and the event.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Services whose pool set changed: the config's weights replaced the runtime ones.
    pub reset: Vec<String>,
    /// Services whose runtime weights were kept.
    pub kept: Vec<String>,
    /// Settings a reload cannot change on a running process.
    pub needs_restart: Vec<String>,
}

/// What the control plane keeps about a service besides its routing snapshot: the
/// rollout, and whether the guard degraded it. Not in the snapshot: the data plane has
/// no use for either.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceControl {
    /// The service's rollout, if one was ever started.
    pub rollout: Option<Rollout>,
    /// Set (with the reason) when the SLO guard moved traffic back: the service stays
    /// on its baseline until an operator sets weights or retries.
    pub degraded: Option<String>,
    /// Pools whose endpoints and version a release set (they override the config's).
    pub deployed: BTreeMap<String, Deployed>,
    /// Release history, oldest first (bounded, see [`crate::control::store::MAX_RELEASES`]).
    pub releases: Vec<Release>,
}

/// What a command will make of a service, before it is applied.
pub(crate) struct Planned {
    pub(crate) weights: Vec<u32>,
    pub(crate) baseline: Option<String>,
    pub(crate) degraded: Option<String>,
    pub(crate) rollout: Option<Rollout>,
    pub(crate) kind: EventKind,
    pub(crate) reason: Option<String>,
    pub(crate) details: Option<serde_json::Value>,
    pub(crate) deployed: BTreeMap<String, Deployed>,
    pub(crate) releases: Vec<Release>,
    /// Pools that get a new `Pool` (new endpoints or a new build): fresh endpoint
    /// state and a fresh window for the guard to judge.
    pub(crate) rebuild: Vec<String>,
}

/// Weights with everything on `pool`: it takes the whole current total, so 90:10
/// becomes 100:0 and shares stay readable.
pub(crate) fn all_to(current: &ServiceSnapshot, pool: &str) -> Vec<u32> {
    let total = current.total_weight().min(crate::model::MAX_WEIGHT) as u32;
    current
        .slots()
        .iter()
        .map(|s| if s.name() == pool { total } else { 0 })
        .collect()
}

/// Weights giving the rollout's candidate `percent` and its stable pool the rest, on
/// the scale of `PERCENT_SCALE` (0.5% is 50:9950); other pools get nothing.
pub(crate) fn split(current: &ServiceSnapshot, rollout: &Rollout, percent: f64) -> Vec<u32> {
    let full = 100 * PERCENT_SCALE;
    let candidate = ((percent * f64::from(PERCENT_SCALE)).round() as u32).min(full);
    current
        .slots()
        .iter()
        .map(|s| {
            if s.name() == rollout.candidate {
                candidate
            } else if s.name() == rollout.stable {
                full - candidate
            } else {
                0
            }
        })
        .collect()
}

struct Persistence {
    store: Box<dyn Store>,
    /// The store's revision as this controller last wrote or read it: every commit is a
    /// compare-and-swap on it, so a change made elsewhere meanwhile is refused, never
    /// overwritten.
    applied: Revision,
    /// Whether the last write to the state directory worked; shared with the controller
    /// so that readiness can be read without waiting for a write in progress.
    writable: Arc<AtomicBool>,
    /// Rollbacks applied to live routing while the disk refused them (safety before
    /// durability, for a revert only): the state file lags routing and these events wait
    /// for the journal. Every later write, and `flush_pending`, tries again first.
    pending: Vec<Event>,
}

impl Persistence {
    /// Remember whether a write attempt worked, for [`Controller::writable`].
    fn note<T, E: std::fmt::Display>(&self, result: &Result<T, E>) {
        let ok = result.is_ok();
        if self.writable.swap(ok, Ordering::Relaxed) != ok {
            match result {
                Ok(_) => tracing::warn!("the state directory takes writes again"),
                Err(e) => tracing::error!(
                    "the state directory refuses writes; weights stay as they are and \
                     changes are refused until it takes writes again: {e}"
                ),
            }
        }
    }

    /// Changes applied but not yet written, for `weir_state_unsaved_changes`. Start-up
    /// records waiting for the journal are not changes: routing matches the state file.
    fn unsaved(&self) -> usize {
        self.pending
            .iter()
            .filter(|e| e.source != Source::Startup)
            .count()
    }

    /// Save `state` and journal `event` as one change.
    fn write(&mut self, state: &State, event: Event) -> Result<Event, StateError> {
        let (revision, event) = self.store.commit(self.applied, state, event)?;
        self.applied = revision;
        Ok(event)
    }

    /// Save `state` alone.
    fn save(&mut self, state: &State) -> Result<(), StateError> {
        self.applied = self.store.save(state)?;
        Ok(())
    }

    /// Journal an event that changes no state.
    fn record(&mut self, event: Event) -> Result<Event, StateError> {
        let event = self.store.record(event)?;
        self.applied = self.store.revision();
        Ok(event)
    }

    /// Write what a refused rollback left unsaved: the whole current state, then its
    /// events in order.
    fn flush(&mut self, state: &State) -> Result<(), StateError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.save(state)?;
        while let Some(event) = self.pending.first().cloned() {
            self.record(event)?;
            self.pending.remove(0);
        }
        Ok(())
    }
}

/// The config in force and its services by name: the guard asks for a service's SLO
/// every round, which must not be a scan of 10,000 services.
#[derive(Debug)]
struct InForce {
    config: Config,
    by_name: HashMap<String, usize>,
    /// The services with an SLO, in config order: the ones the guard judges.
    judged: Arc<[(String, SloConfig)]>,
    /// The services whose guard also runs analysis templates, with them.
    analysed: Arc<[(String, Vec<AnalysisTemplate>)]>,
}

impl InForce {
    fn new(config: Config) -> InForce {
        let mut by_name = HashMap::with_capacity(config.services.len());
        for (i, s) in config.services.iter().enumerate() {
            by_name.entry(s.name.clone()).or_insert(i);
        }
        let judged = config
            .services
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.slo.clone()?)))
            .collect();
        let analysed = config
            .services
            .iter()
            .filter(|s| s.slo.is_some() && !s.guard_analysis.is_empty())
            .map(|s| {
                let templates = s
                    .guard_analysis
                    .iter()
                    .filter_map(|n| s.analysis_template(n).cloned())
                    .collect();
                (s.name.clone(), templates)
            })
            .collect();
        InForce {
            config,
            by_name,
            judged,
            analysed,
        }
    }
}

/// The single writer. Holds its lock across validate → persist → swap so that two
/// commands never interleave and lose an update.
pub struct Controller {
    router: Arc<Router>,
    /// The only writer of routing state (see [`RoutingWriter`]).
    writer: RoutingWriter,
    /// Every time a decision or a record needs.
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    write: Mutex<Option<Persistence>>,
    /// The config in force (last loaded or reloaded).
    config: Mutex<InForce>,
    /// See [`Controller::writable`].
    writable: Arc<AtomicBool>,
    /// The journal's read side, for readers that must not wait for the writer.
    events: RwLock<Option<Arc<dyn EventLog>>>,
    /// Rollout and degraded state per service; written only under the write lock.
    control: RwLock<HashMap<String, ServiceControl>>,
    /// Services with a rollback applied but not saved yet: readable without the write
    /// lock, which a slow disk may hold for long (API reads run on async workers).
    unsaved: Mutex<Vec<String>>,
    /// Fleet mode's hooks; unset for a single weir.
    fleet: OnceLock<Arc<dyn FleetHooks>>,
    /// The version label each pool's `weir_pool_info` series shows, by (service, pool).
    versions: Mutex<HashMap<(String, String), String>>,
    /// Applies what a reload changes outside routing (the access log); see
    /// [`Controller::on_reload`].
    on_reload: OnceLock<ReloadHook>,
}

/// Called with every config a reload puts in force.
type ReloadHook = Box<dyn Fn(&Config) + Send + Sync>;

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

impl Controller {
    /// Build from a config with no persistence (benches, unit tests).
    pub fn in_memory(config: &Config, metrics: Arc<Metrics>) -> Controller {
        Controller::in_memory_with_clock(config, metrics, Arc::new(SystemClock))
    }

    /// [`Controller::in_memory`] on a given clock (tests on paused time).
    pub fn in_memory_with_clock(
        config: &Config,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Controller {
        let services = config
            .services
            .iter()
            .map(|s| build_service(s, &HashMap::new(), &metrics))
            .collect();
        let (router, writer) = Router::new(RouteTable::new(services));
        let controller = Controller {
            router,
            writer,
            clock,
            metrics,
            write: Mutex::new(None),
            config: Mutex::new(InForce::new(config.clone())),
            writable: Arc::new(AtomicBool::new(true)),
            events: RwLock::new(None),
            control: RwLock::new(HashMap::new()),
            unsaved: Mutex::new(Vec::new()),
            fleet: OnceLock::new(),
            versions: Mutex::new(HashMap::new()),
            on_reload: OnceLock::new(),
        };
        for s in &config.services {
            controller.publish_versions(&s.name, &BTreeMap::new());
        }
        controller
    }

    /// Have `hook` called with each config a reload puts in force, after routing has
    /// changed (once per controller; later calls are ignored).
    pub fn on_reload(&self, hook: impl Fn(&Config) + Send + Sync + 'static) {
        let _ = self.on_reload.set(Box::new(hook));
    }

    /// Build from a config with durable state in `[state] dir`: weights saved by an
    /// earlier run are restored for every service whose pools still match the config.
    /// Takes the directory's lock first (see [`StateLock`]).
    pub fn open(config: &Config, metrics: Arc<Metrics>) -> Result<Controller, OpenError> {
        let lock = StateLock::acquire(&config.state.dir)?;
        Controller::open_locked(config, metrics, lock)
    }

    /// [`Controller::open`] with the directory's lock already held (the binary takes it
    /// before binding its listeners, so that a second weir is refused by name first).
    ///
    /// Reads and checks everything before writing anything: a start that fails leaves
    /// the directory as it was. What the state file holds for a service is restored when
    /// its pools still match the config; a service whose pools changed gets the config's
    /// weights (`state_ignored`), and one no longer in the config is dropped. Anything
    /// else wrong with the saved state (all weights zero, a baseline or rollout naming no
    /// pool, a rollout that no longer reads) is an error naming the service: the operator
    /// decides, with `weir state discard`, rather than weir guessing.
    ///
    /// A directory that can be read but not written (a full or read-only disk) still
    /// starts: the saved state serves, start-up records wait for the disk, and every
    /// change is refused until it takes writes again ([`Controller::writable`]).
    pub fn open_locked(
        config: &Config,
        metrics: Arc<Metrics>,
        lock: StateLock,
    ) -> Result<Controller, OpenError> {
        Controller::open_with_clock(config, metrics, lock, Arc::new(SystemClock))
    }

    /// [`Controller::open_locked`] on a given clock.
    pub fn open_with_clock(
        config: &Config,
        metrics: Arc<Metrics>,
        lock: StateLock,
        clock: Arc<dyn Clock>,
    ) -> Result<Controller, OpenError> {
        let saved = match StateStore::open(&config.state.dir)?.load() {
            Ok(saved) => saved.unwrap_or_default(),
            Err(StateError::Corrupt { path, error }) => {
                return Err(OpenError::Unusable {
                    path,
                    problems: vec![format!("it is not a readable state file: {error}")],
                });
            }
            Err(StateError::Invalid { path, reason }) => {
                return Err(OpenError::Unusable {
                    path,
                    problems: vec![reason],
                });
            }
            Err(e) => return Err(e.into()),
        };
        let controller = Controller::in_memory_with_clock(config, metrics, Arc::clone(&clock));
        let (events, restored, problems) = restore_all(&controller, &saved);
        if !problems.is_empty() {
            return Err(OpenError::Unusable {
                path: StateStore::at(&config.state.dir).path(),
                problems,
            });
        }
        let store = FileStore::open(
            lock,
            JOURNAL_FILE_BYTES,
            JOURNAL_FILES_KEPT,
            JOURNAL_MEMORY,
            clock,
        )?;
        for (service, snap, control) in restored {
            controller.publish_control(&service.name, control);
            controller.writer.publish(&service, Arc::new(snap));
        }
        // Released pools were built anew: the table's pool list must have them.
        controller.refresh_table();

        // Every check passed: from here on, writes. None of them may stop the start.
        store.started();
        *controller.events.write().unwrap_or_else(|p| p.into_inner()) = Some(store.events());
        let mut persistence = Persistence {
            applied: store.revision(),
            store: Box::new(store),
            writable: Arc::clone(&controller.writable),
            pending: Vec::new(),
        };
        // The file is rewritten at once: in the current format, and without services the
        // config no longer has. The start-up records follow it into the journal; if the
        // disk refuses either, they wait like a refused rollback's and go out with the
        // first write that works.
        let saved = persistence.save(&controller.state());
        persistence.note(&saved);
        let mut events = events.into_iter();
        if saved.is_ok() {
            for event in events.by_ref() {
                if let Err(e) = persistence.record(event.clone()) {
                    persistence.note(&Err::<(), _>(e));
                    persistence.pending.push(event);
                    break;
                }
            }
        }
        persistence.pending.extend(events);
        *controller.write.lock().unwrap_or_else(|p| p.into_inner()) = Some(persistence);
        Ok(controller)
    }

    /// Fleet mode: build with `store` (etcd) as the store. The local state file is only
    /// a cache of the last state applied: it serves until the store answers (a start
    /// while etcd is down), and the fleet's state replaces it as soon as it does.
    /// Nothing is written here; the fleet's first read decides. The store holds the
    /// state directory's lock, as the file store does.
    pub fn open_shared(
        config: &Config,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        store: Box<dyn Store>,
    ) -> Result<Controller, OpenError> {
        let cached = match StateStore::open(&config.state.dir)?.load() {
            Ok(saved) => saved.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(
                    "fleet: ignoring the unreadable local cache ({e}); the store decides"
                );
                State::default()
            }
        };
        let controller = Controller::in_memory_with_clock(config, metrics, clock);
        let (_, restored, problems) = restore_all(&controller, &cached);
        for problem in problems {
            tracing::warn!(
                "fleet: local cache: {problem}; using the config's weights until the store answers"
            );
        }
        for (service, snap, control) in restored {
            controller.publish_control(&service.name, control);
            controller.writer.publish(&service, Arc::new(snap));
        }
        // Released pools were built anew: the table's pool list must have them.
        controller.refresh_table();
        *controller.events.write().unwrap_or_else(|p| p.into_inner()) = Some(store.events());
        *controller.write.lock().unwrap_or_else(|p| p.into_inner()) = Some(Persistence {
            applied: 0,
            store,
            writable: Arc::clone(&controller.writable),
            pending: Vec::new(),
        });
        Ok(controller)
    }

    /// Whether the state directory took the last write (at start-up, a change, or the
    /// retry of unsaved records). While false, weir serves the weights it has and refuses
    /// changes (`ControlError::Storage`); a rollback still moves traffic.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// The clock every decision reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The router the data plane reads.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Something from a service's entry in the config in force.
    fn service_config<T>(
        &self,
        service: &str,
        get: impl FnOnce(&ServiceConfig) -> Option<T>,
    ) -> Option<T> {
        let in_force = self.config.lock().unwrap_or_else(|p| p.into_inner());
        in_force
            .by_name
            .get(service)
            .and_then(|&i| get(&in_force.config.services[i]))
    }

    /// The SLO of a service in the config in force, if it has one.
    pub fn slo(&self, service: &str) -> Option<SloConfig> {
        self.service_config(service, |s| s.slo.clone())
    }

    /// Every service with an SLO in the config in force, with it (cheap: shared).
    pub fn slos(&self) -> Arc<[(String, SloConfig)]> {
        Arc::clone(&self.config.lock().unwrap_or_else(|p| p.into_inner()).judged)
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone()
    }

    /// The current snapshot of a service.
    pub fn snapshot(&self, service: &str) -> Option<Arc<ServiceSnapshot>> {
        self.router
            .table()
            .service(service)
            .map(|s| s.snapshot_full())
    }

    fn lock(&self) -> MutexGuard<'_, Option<Persistence>> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fleet mode: hand the controller the fleet's hooks (once, at start).
    pub fn set_fleet(&self, fleet: Arc<dyn FleetHooks>) {
        let _ = self.fleet.set(fleet);
    }

    /// The fleet's hooks, in fleet mode.
    pub fn fleet(&self) -> Option<&Arc<dyn FleetHooks>> {
        self.fleet.get()
    }

    /// Whether this instance runs the rollout driver: always alone, the leader only in
    /// a fleet.
    pub fn drives_rollouts(&self) -> bool {
        self.fleet().is_none_or(|f| f.leads())
    }

    /// Read the whole state from the store and put it in force (after a refused
    /// compare-and-swap).
    fn catch_up(&self, p: &mut Persistence) -> Result<(), ControlError> {
        let (state, revision) = p.store.load()?;
        self.adopt_locked(p, &state.unwrap_or_default(), revision);
        Ok(())
    }

    /// The persistent view of every service as it is now (what a fleet seeds its store
    /// with).
    pub fn current_state(&self) -> State {
        self.state()
    }

    /// Forget the applied revision: the store was replaced (re-seeded), and its
    /// revisions start afresh.
    pub fn forget_applied(&self) {
        if let Some(p) = self.lock().as_mut() {
            p.applied = 0;
        }
    }

    /// Put in force a state another writer committed to the shared store, read at
    /// `revision` (the fleet's watch calls this for every change, in revision order).
    /// Returns the services whose routing changed. A revision at or below the one
    /// applied is already in force and changes nothing.
    pub fn adopt(&self, state: &State, revision: Revision) -> Vec<String> {
        let mut persistence = self.lock();
        let Some(p) = persistence.as_mut() else {
            return Vec::new();
        };
        let changed = self.adopt_locked(p, state, revision);
        let missing = self
            .router
            .table()
            .services()
            .iter()
            .any(|s| !state.services.contains_key(&*s.name));
        if missing && p.pending.is_empty() {
            // Services this instance's config has and the store does not yet: written
            // with the config's weights (a compare-and-swap, like any change). With
            // reverts pending, the flush below writes them too.
            let saved = p.save(&self.state());
            if let Err(e) = saved {
                tracing::warn!("could not add this instance's new services to the store: {e}");
            }
        }
        // Reverts made while the store was out of reach that still stand go out now.
        self.flush_locked(p);
        changed
    }

    /// [`Controller::adopt`] under the write lock. A revert this instance applied while
    /// the store was out of reach stands if the store still has the version it reverted
    /// from (it is written by the next flush); if another change to the service came
    /// first, that one wins and the revert is journaled as superseded.
    fn adopt_locked(&self, p: &mut Persistence, remote: &State, revision: Revision) -> Vec<String> {
        if revision != 0 && revision <= p.applied {
            return Vec::new();
        }
        let table = self.router.table();
        let mut keep_local: Vec<String> = Vec::new();
        let mut superseded = Vec::new();
        let pending = std::mem::take(&mut p.pending);
        for event in pending {
            let standing = event.kind == EventKind::RolledBack
                && table.service(&event.service).is_some_and(|s| {
                    let local = s.snapshot().version;
                    remote
                        .services
                        .get(&event.service)
                        .is_none_or(|r| r.version + 1 == local)
                });
            let same = table.service(&event.service).is_some_and(|s| {
                remote
                    .services
                    .get(&event.service)
                    .is_some_and(|r| r.weights == weights_of(&s.snapshot()))
            });
            if standing || event.source == Source::Startup {
                keep_local.push(event.service.clone());
                p.pending.push(event);
            } else if !same {
                superseded.push(event);
            }
            // Else another instance made the same revert first: nothing left to write.
        }
        let mut changed = Vec::new();
        let mut rebuilt = false;
        for service in table.services() {
            if keep_local.iter().any(|s| **s == *service.name) {
                continue;
            }
            let Some(state) = remote.services.get(&*service.name) else {
                continue;
            };
            let current = service.snapshot_full();
            let control = self.service_control(&service.name);
            if service_state(&current, &control) == *state {
                continue;
            }
            let names: Vec<&str> = current.slots().iter().map(|s| s.name()).collect();
            let saved: Vec<&str> = state.weights.keys().map(String::as_str).collect();
            if sorted(&names) != sorted(&saved) {
                tracing::warn!(
                    "service {}: the fleet's state has pools [{}], this instance's config [{}]; \
                     keeping this instance's weights until the configs agree",
                    service.name,
                    saved.join(", "),
                    names.join(", ")
                );
                continue;
            }
            let build = |pool: &str, endpoints: Option<&[String]>| {
                self.build_pool(&service.name, pool, endpoints)
            };
            match restore(&current, &control, state, &names, &build) {
                Ok((snap, control)) => {
                    let moved = snap.weights() != current.weights();
                    rebuilt |= snap
                        .slots()
                        .iter()
                        .zip(current.slots())
                        .any(|(a, b)| !Arc::ptr_eq(&a.pool, &b.pool));
                    self.writer.publish(service, Arc::new(snap));
                    self.publish_control(&service.name, control);
                    if moved {
                        self.metrics.weight_changed(&service.name, state.updated_by);
                    }
                    changed.push(service.name.to_string());
                }
                Err(problem) => tracing::error!(
                    "service {}: the fleet's state cannot be used here: {problem}",
                    service.name
                ),
            }
        }
        if rebuilt {
            self.refresh_table();
        }
        p.applied = revision;
        p.store.adopted(remote, revision);
        for event in superseded {
            let mut note = Event::new(&event.service, EventKind::RevertSuperseded, Source::Guard);
            note.reason = Some(format!(
                "a revert made while the store was unreachable ({}) was not written: a newer \
                 change to the service came first",
                event.reason.as_deref().unwrap_or("no reason given")
            ));
            note.details = serde_json::to_value(&event).unwrap_or_default();
            if let Err(e) = p.record(note) {
                tracing::warn!("could not journal a superseded revert: {e}");
            }
        }
        self.publish_unsaved(Some(p));
        changed
    }

    /// Validate and apply one command. On error nothing has changed; on success the new
    /// state and its event are on disk before the new snapshot serves traffic.
    ///
    /// With a shared store, another instance may have changed the state since this one
    /// last read it: the commit is then refused, the controller catches up with the
    /// store and plans the command again on what it finds (an `If-Match` that no longer
    /// holds is a conflict then, as it would have been here).
    pub fn apply(&self, command: Command) -> Result<Change, ControlError> {
        let mut persistence = self.lock();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt > CONFLICT_RETRIES;
            match self.apply_once(&mut persistence, command.clone(), last) {
                Ok(change) => return Ok(change),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Conflict) => {
                    if let Some(p) = persistence.as_mut() {
                        self.catch_up(p)?;
                    }
                }
            }
        }
    }

    /// One try of [`Controller::apply`]; `last`: a conflict is final.
    fn apply_once(
        &self,
        persistence: &mut Option<Persistence>,
        command: Command,
        last: bool,
    ) -> Result<Change, Attempt> {
        let table = self.router.table();
        let (name, source, actor) = match &command {
            Command::SetWeights {
                service,
                source,
                actor,
                ..
            }
            | Command::Rollback {
                service,
                source,
                actor,
                ..
            }
            | Command::Rollout {
                service,
                source,
                actor,
                ..
            }
            | Command::Release {
                service,
                source,
                actor,
                ..
            }
            | Command::Undo {
                service,
                source,
                actor,
                ..
            } => (service.clone(), *source, actor.clone()),
        };
        let service = table
            .service(&name)
            .ok_or_else(|| ControlError::UnknownService(name.clone()))?;
        let current = service.snapshot_full();
        let current_control = self.service_control(&name);
        let is_rollback = matches!(command, Command::Rollback { .. });
        let change = self.plan(&name, &current, &current_control, command)?;
        let mut pools = Vec::with_capacity(current.slots().len());
        for slot in current.slots() {
            pools.push(if change.rebuild.iter().any(|p| p == slot.name()) {
                let endpoints = change.deployed.get(slot.name()).map(|d| &d.endpoints[..]);
                self.build_pool(&name, slot.name(), endpoints)
                    .map_err(ControlError::Invalid)?
            } else {
                slot.pool.clone()
            });
        }
        let rebuilt = !change.rebuild.is_empty();
        let next = ServiceSnapshot::new(pools, &change.weights, current.version + 1, source)?
            .with_baseline(
                change
                    .baseline
                    .as_deref()
                    .unwrap_or(current.baseline_name()),
            )?
            .at(self.clock.now());
        let next = Arc::new(next);
        let next_control = ServiceControl {
            rollout: change.rollout,
            degraded: change.degraded,
            deployed: change.deployed,
            releases: change.releases,
        };
        let mut event = Event::new(&name, change.kind, source);
        event.actor = actor;
        event.reason = change.reason;
        event.details = change.details.unwrap_or(serde_json::Value::Null);
        event.from = Some(weights_of(&current));
        event.to = Some(weights_of(&next));
        let mut durable = true;
        let event = match persistence.as_mut() {
            Some(p) => {
                let mut state = self.state();
                state
                    .services
                    .insert(name.clone(), service_state(&next, &next_control));
                // Earlier unsaved rollbacks go first; the new state file covers them.
                // Earlier unsaved rollbacks go first (with the state as it is now), then
                // this change as one commit.
                let written = p
                    .flush(&self.state())
                    .and_then(|()| p.write(&state, event.clone()));
                p.note(&written);
                match written {
                    Ok(e) => Some(e),
                    Err(StateError::Conflict { .. }) if !last => return Err(Attempt::Conflict),
                    Err(e) if is_rollback && !matches!(e, StateError::Conflict { .. }) => {
                        // A revert is applied whatever the disk says: traffic leaves the
                        // bad version now, and the write is retried until it succeeds.
                        tracing::error!("rollback of {name} applied but not saved (retrying): {e}");
                        let mut unsaved = event;
                        unsaved.details = with_not_durable(unsaved.details, &ControlError::from(e));
                        p.pending.push(unsaved.clone());
                        durable = false;
                        // Not journaled yet (id 0): the webhook still hears of it now.
                        Some(unsaved)
                    }
                    // Nothing of the change is stored (a commit is all or nothing).
                    Err(e) => return Err(Attempt::Failed(e.into())),
                }
            }
            None => None,
        };
        self.publish_unsaved(persistence.as_ref());
        // Routing first, then the control state that describes it: a reader who sees
        // a rollout's new step also sees its weights.
        self.writer.publish(service, next.clone());
        if rebuilt {
            // The table's flat pool list (what health checks sweep) must hold the new
            // pools: same services, table built again.
            self.refresh_table();
        }
        self.publish_control(&name, next_control);
        if next.weights() != current.weights() {
            self.metrics.weight_changed(&name, source);
        }
        Ok(Change {
            service: name,
            source,
            from: named(&current),
            to: named(&next),
            snapshot: next,
            event,
            durable,
        })
    }

    /// Work out what a command makes of the current snapshot, without changing it.
    fn plan(
        &self,
        name: &str,
        current: &ServiceSnapshot,
        control: &ServiceControl,
        command: Command,
    ) -> Result<Planned, ControlError> {
        let mut planned = Planned {
            weights: current.weights(),
            baseline: None,
            degraded: control.degraded.clone(),
            rollout: control.rollout.clone(),
            kind: EventKind::WeightsChanged,
            reason: None,
            details: None,
            deployed: control.deployed.clone(),
            releases: control.releases.clone(),
            rebuild: Vec::new(),
        };
        let now = self.clock.now();
        let before = control.rollout.as_ref().map(|r| r.phase);
        match command {
            Command::SetWeights {
                weights,
                if_version,
                source,
                reason,
                ..
            } => {
                if let Some(expected) = if_version
                    && expected != current.version
                {
                    return Err(ControlError::VersionConflict {
                        service: name.to_owned(),
                        expected,
                        current: current.version,
                    });
                }
                planned.weights = ordered_weights(name, current, &weights)?;
                planned.reason = reason;
                if source == Source::Admin {
                    // An operator took over: no longer degraded, and a running rollout
                    // pauses rather than overwrite the operator at its next step.
                    planned.degraded = None;
                    if let Some(r) = &mut planned.rollout
                        && r.phase == Phase::Progressing
                    {
                        r.phase = Phase::Paused;
                    }
                }
            }
            Command::Rollback {
                source,
                reason,
                details,
                ..
            } => {
                planned.weights = all_to(current, current.baseline_name());
                // Another fleet instance's guard reverted first: nothing left to do.
                if source == Source::Guard
                    && control.degraded.is_some()
                    && planned.weights == current.weights()
                    && !control
                        .rollout
                        .as_ref()
                        .is_some_and(|r| r.phase.is_running())
                {
                    return Err(ControlError::Unchanged);
                }
                planned.kind = EventKind::RolledBack;
                if source == Source::Guard {
                    planned.degraded =
                        Some(reason.clone().unwrap_or_else(|| "SLO breached".into()));
                    if let Some(r) = &planned.rollout
                        && r.phase.is_running()
                    {
                        planned.rollout = Some(r.degrade(now));
                    }
                }
                planned.reason = reason;
                planned.details = details;
            }
            Command::Rollout { verb, .. } => {
                // What the journal keeps of external evidence, besides the rollout.
                let evidence_details = match &verb {
                    RolloutVerb::Measured { measurement, .. } => {
                        Some(("analysis", serde_json::to_value(measurement).ok()))
                    }
                    RolloutVerb::HooksCalled { calls, .. } => {
                        Some(("webhooks", serde_json::to_value(calls).ok()))
                    }
                    RolloutVerb::Start {
                        override_freeze: Some(why),
                        ..
                    }
                    | RolloutVerb::Retry {
                        override_freeze: Some(why),
                    }
                    | RolloutVerb::Promote {
                        override_freeze: Some(why),
                        ..
                    } => self
                        .freeze(name)
                        .map(|f| ("freeze_override", Some(freeze_override_doc(&f, why)))),
                    _ => None,
                };
                let transition = self.rollout_transition(name, current, control, verb, now)?;
                if let Some(percent) = transition.percent {
                    planned.weights = split(current, &transition.rollout, percent);
                }
                if transition.promote_baseline {
                    planned.baseline = Some(transition.rollout.candidate.clone());
                }
                if transition.kind == EventKind::RolloutStarted {
                    planned.degraded = None;
                }
                if transition.kind == EventKind::AnalysisFailed {
                    // Like the guard's revert: the service stays on its baseline until
                    // an operator moves it on.
                    planned.degraded = Some(transition.reason.clone());
                }
                planned.kind = transition.kind;
                planned.reason = Some(transition.reason);
                planned.details = Some(serde_json::json!({
                    "phase": transition.rollout.phase,
                    "step": transition.rollout.step,
                    "candidate": transition.rollout.candidate,
                    "stable": transition.rollout.stable,
                }));
                if let (Some((key, Some(value))), Some(serde_json::Value::Object(d))) =
                    (evidence_details, planned.details.as_mut())
                {
                    d.insert(key.into(), value);
                }
                planned.rollout = Some(transition.rollout);
            }
            Command::Release {
                version,
                pool,
                endpoints,
                override_freeze,
                actor,
                ..
            } => {
                let plan = self.plan_of(name).ok_or_else(|| {
                    ControlError::Conflict(format!(
                        "service `{name}`: has no rollout plan to release with: add [service.rollout]"
                    ))
                })?;
                // A release starts a rollout: refused during a freeze (starting one
                // with `override_freeze` is the way through).
                self.refuse_if_frozen(name, override_freeze.as_deref(), "release")?;
                let request = crate::control::release::ReleaseRequest {
                    version,
                    pool,
                    endpoints,
                    actor,
                };
                crate::control::release::plan_release(
                    name,
                    current,
                    &plan,
                    |pool| self.service_config(name, |s| s.pool(pool)?.version.clone()),
                    request,
                    now,
                    &mut planned,
                )?;
                if let (Some(why), Some(f)) = (&override_freeze, self.freeze(name))
                    && let Some(serde_json::Value::Object(d)) = planned.details.as_mut()
                {
                    d.insert("freeze_override".into(), freeze_override_doc(&f, why));
                }
                self.release_extras(name, current, now, override_freeze, &mut planned);
                return Ok(planned);
            }
            Command::Undo {
                to_revision, actor, ..
            } => {
                crate::control::release::plan_undo(
                    name,
                    current,
                    to_revision,
                    actor,
                    now,
                    &mut planned,
                )?;
                return Ok(planned);
            }
        }
        crate::control::release::follow_rollout(before, now, &mut planned);
        Ok(planned)
    }

    /// A new pool `pool` of `service` as the config in force describes it, on
    /// `endpoints` instead of the config's when given (a release's).
    fn build_pool(
        &self,
        service: &str,
        pool: &str,
        endpoints: Option<&[String]>,
    ) -> Result<Arc<Pool>, String> {
        let cfg = self
            .service_config(service, |s| Some(s.clone()))
            .ok_or_else(|| format!("unknown service `{service}`"))?;
        let mut pool_cfg = cfg
            .pool(pool)
            .cloned()
            .ok_or_else(|| format!("service `{service}` has no pool `{pool}`"))?;
        if let Some(endpoints) = endpoints {
            pool_cfg.endpoints = crate::control::release::parse_endpoints(endpoints)?;
        }
        Ok(new_pool(&cfg, &pool_cfg, &self.metrics))
    }

    /// Build the route table again from the same services, so that its flat pool list
    /// holds pools a release put in (under the write lock).
    fn refresh_table(&self) {
        let services = self.router.table().services().to_vec();
        self.writer.publish_table(RouteTable::new(services));
    }

    /// The version label of a pool: a release's, else the config's.
    pub fn version_of(
        &self,
        service: &str,
        pool: &str,
        deployed: &BTreeMap<String, Deployed>,
    ) -> Option<String> {
        deployed
            .get(pool)
            .and_then(|d| d.version.clone())
            .or_else(|| self.service_config(service, |s| s.pool(pool)?.version.clone()))
    }

    fn rollout_transition(
        &self,
        name: &str,
        current: &ServiceSnapshot,
        control: &ServiceControl,
        verb: RolloutVerb,
        now: SystemTime,
    ) -> Result<Transition, ControlError> {
        // The driver's own changes leave the next step to its next tick, which honours
        // freeze windows; an operator's verb shows its outcome at once.
        let settle = !matches!(
            verb,
            RolloutVerb::Tick(_) | RolloutVerb::Measured { .. } | RolloutVerb::HooksCalled { .. }
        );
        let t = self.rollout_verb(name, current, control, verb, now)?;
        Ok(if settle {
            let evidence = Evidence::of(current, &t.rollout.candidate, None, None);
            Rollout::settle(t, now, &evidence)
        } else {
            t
        })
    }

    fn rollout_verb(
        &self,
        name: &str,
        current: &ServiceSnapshot,
        control: &ServiceControl,
        verb: RolloutVerb,
        now: SystemTime,
    ) -> Result<Transition, ControlError> {
        let conflict = |msg: String| ControlError::Conflict(format!("service `{name}`: {msg}"));
        let existing = control.rollout.as_ref();
        let evidence_now = |candidate: &str| Evidence::of(current, candidate, None, None);
        match verb {
            RolloutVerb::Start {
                candidate,
                override_freeze,
            } => {
                self.refuse_if_frozen(name, override_freeze.as_deref(), "start a rollout")?;
                if let Some(r) = existing
                    && r.phase.is_running()
                {
                    return Err(conflict(format!(
                        "a rollout is already {} (step {} of {})",
                        r.phase.as_str(),
                        r.step + 1,
                        r.steps.len()
                    )));
                }
                let plan = self
                    .plan_of(name)
                    .ok_or_else(|| conflict("has no rollout plan: add [service.rollout]".into()))?;
                let stable = current.baseline_name().to_owned();
                let candidate = match candidate {
                    Some(c) => c,
                    None => crate::control::release::default_candidate(&plan, current)
                        .ok_or_else(|| {
                            conflict(format!(
                                "the plan's candidate `{}` is now the baseline; name the pool to roll out",
                                plan.candidate()
                            ))
                        })?,
                };
                if current.slot(&candidate).is_none() {
                    return Err(ControlError::UnknownPool {
                        service: name.to_owned(),
                        pool: candidate,
                    });
                }
                if candidate == stable {
                    return Err(conflict(format!("`{candidate}` is already the baseline")));
                }
                let rollout = self.with_extras(
                    name,
                    Rollout::start(
                        &candidate,
                        &stable,
                        plan_steps(&plan),
                        now,
                        &evidence_now(&candidate),
                    ),
                    override_freeze,
                );
                let blue_green = matches!(plan, RolloutConfig::BlueGreen { .. });
                Ok(Transition {
                    // Named as the steps a change enters are, so that applying a first
                    // percent step at once does not name it a second time.
                    reason: format!(
                        "{} rollout started: candidate {candidate}, {} step(s); step 1: {}",
                        if blue_green { "blue/green" } else { "canary" },
                        rollout.steps.len(),
                        rollout.current_step().map_or("-".into(), |s| s.describe())
                    ),
                    // A blue/green preview starts with no live traffic on the candidate,
                    // and neither does a canary until its pre-rollout webhooks pass.
                    percent: (blue_green || rollout.hooks.pre_rollout_pending).then_some(0.0),
                    rollout,
                    promote_baseline: false,
                    kind: EventKind::RolloutStarted,
                })
            }
            RolloutVerb::Retry { override_freeze } => {
                self.refuse_if_frozen(name, override_freeze.as_deref(), "retry a rollout")?;
                let r = existing.ok_or_else(|| conflict("no rollout to retry".into()))?;
                if !matches!(r.phase, Phase::Aborted | Phase::Degraded) {
                    return Err(conflict(format!(
                        "retry is for an aborted or degraded rollout (phase {})",
                        r.phase.as_str()
                    )));
                }
                let rollout = self.with_extras(
                    name,
                    Rollout::start(
                        &r.candidate,
                        &r.stable,
                        r.steps.clone(),
                        now,
                        &evidence_now(&r.candidate),
                    ),
                    override_freeze,
                );
                let preview = matches!(rollout.current_step(), Some(Step::Preview { .. }))
                    || rollout.hooks.pre_rollout_pending;
                Ok(Transition {
                    reason: format!("rollout of {} retried from step 1", r.candidate),
                    percent: preview.then_some(0.0),
                    rollout,
                    promote_baseline: false,
                    kind: EventKind::RolloutStarted,
                })
            }
            verb => {
                let r = existing.ok_or_else(|| conflict("no rollout has been started".into()))?;
                let result = match verb {
                    RolloutVerb::Promote {
                        full,
                        override_freeze,
                    } => {
                        if r.phase.is_running() && r.freeze_override.is_none() {
                            self.refuse_if_frozen(
                                name,
                                override_freeze.as_deref(),
                                "promote a rollout",
                            )?;
                        }
                        r.promote(full, now, &evidence_now(&r.candidate))
                            .map(|mut t| {
                                if override_freeze.is_some() && self.freeze(name).is_some() {
                                    t.rollout.freeze_override = override_freeze;
                                }
                                t
                            })
                    }
                    RolloutVerb::Pause => r.pause(),
                    RolloutVerb::Resume => r.resume(),
                    RolloutVerb::Abort => r.abort(now),
                    RolloutVerb::Tick(evidence) => {
                        return r.tick(now, &evidence).ok_or(ControlError::Unchanged);
                    }
                    // Results of checks made for an earlier rollout of this service
                    // (a release superseded it, an undo or a retry replaced it)
                    // say nothing about this one: a smoke test of v2 that passes
                    // must not let v3 skip its own.
                    // Compared to the millisecond: the state file and the fleet's store
                    // keep start times at that precision.
                    RolloutVerb::Measured { rollout, .. }
                    | RolloutVerb::HooksCalled { rollout, .. }
                        if timestamp(rollout) != timestamp(r.started_at) =>
                    {
                        return Err(ControlError::Unchanged);
                    }
                    RolloutVerb::Measured {
                        step, measurement, ..
                    } => {
                        let template = self
                            .analysis_template(name, &measurement.template)
                            .ok_or(ControlError::Unchanged)?;
                        // A measurement that no longer fits (the step moved on, the
                        // rollout ended) is dropped, not an error.
                        return r
                            .measured(now, step, &measurement, &template)
                            .map_err(|_| ControlError::Unchanged);
                    }
                    RolloutVerb::HooksCalled { kind, calls, .. } => {
                        return r
                            .hooks_called(now, kind, &calls)
                            .map_err(|_| ControlError::Unchanged);
                    }
                    RolloutVerb::Start { .. } | RolloutVerb::Retry { .. } => {
                        unreachable!("handled above")
                    }
                };
                result.map_err(conflict)
            }
        }
    }

    /// The rollout plan of a service in the config in force.
    pub fn plan_of(&self, service: &str) -> Option<RolloutConfig> {
        self.service_config(service, |s| s.rollout.clone())
    }

    /// A service's analysis template, from the config in force.
    pub fn analysis_template(&self, service: &str, name: &str) -> Option<AnalysisTemplate> {
        self.service_config(service, |s| s.analysis_template(name).cloned())
    }

    /// The services whose guard runs analysis templates (`[service.slo] analysis`),
    /// with them (cheap: shared).
    pub(crate) fn guard_analyses(&self) -> Arc<[(String, Vec<AnalysisTemplate>)]> {
        Arc::clone(
            &self
                .config
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .analysed,
        )
    }

    /// A service's rollout webhooks, from the config in force.
    pub fn webhooks(&self, service: &str) -> Vec<HookConfig> {
        self.service_config(service, |s| Some(s.webhooks.clone()))
            .unwrap_or_default()
    }

    /// The freeze in force for a service now (global `[[freeze]]` windows and its
    /// own), if any.
    pub fn freeze(&self, service: &str) -> Option<Frozen> {
        let now = self.clock.now();
        let in_force = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let own = in_force
            .by_name
            .get(service)
            .map(|&i| in_force.config.services[i].freeze.as_slice())
            .unwrap_or_default();
        crate::control::freeze::active(in_force.config.freeze.iter().chain(own), now)
    }

    /// Refuse `what` during a freeze, unless the operator overrides it with a reason.
    fn refuse_if_frozen(
        &self,
        service: &str,
        override_freeze: Option<&str>,
        what: &str,
    ) -> Result<(), ControlError> {
        let Some(frozen) = self.freeze(service) else {
            return Ok(());
        };
        match override_freeze {
            Some(why) if !why.trim().is_empty() => Ok(()),
            _ => Err(ControlError::Conflict(format!(
                "service `{service}`: cannot {what}: {}; to go ahead anyway, override the \
                 freeze with a reason (override_freeze, or --override-freeze \"why\")",
                frozen.describe()
            ))),
        }
    }

    /// A release's rollout gets the service's webhooks and background analyses too; with
    /// pre-rollout webhooks it starts over at its first step with no traffic on the
    /// candidate until they pass.
    fn release_extras(
        &self,
        name: &str,
        current: &ServiceSnapshot,
        now: SystemTime,
        override_freeze: Option<String>,
        planned: &mut Planned,
    ) {
        let Some(r) = planned.rollout.take() else {
            return;
        };
        let r = self.with_extras(name, r, override_freeze.clone());
        if !r.hooks.pre_rollout_pending {
            planned.rollout = Some(r);
            return;
        }
        let fresh = Evidence::of(current, &r.candidate, None, None);
        let start = Rollout::start(&r.candidate, &r.stable, r.steps.clone(), now, &fresh);
        let mut start = self.with_extras(name, start, override_freeze);
        start.started_at = r.started_at;
        planned.weights = all_to(current, &r.stable);
        planned.rollout = Some(start);
    }

    /// A new rollout with what the service's config adds to it: webhooks, background
    /// analyses, the freeze override (kept only if a freeze is in force).
    fn with_extras(&self, service: &str, r: Rollout, override_freeze: Option<String>) -> Rollout {
        let (kinds, background): (Vec<HookKind>, Vec<AnalysisTemplate>) = self
            .service_config(service, |s| {
                Some((
                    s.webhooks.iter().map(|h| h.kind).collect(),
                    s.background_analysis
                        .iter()
                        .filter_map(|n| s.analysis_template(n).cloned())
                        .collect(),
                ))
            })
            .unwrap_or_default();
        let frozen = self.freeze(service).is_some();
        r.with_extras(
            &kinds,
            &background.iter().collect::<Vec<_>>(),
            override_freeze.filter(|_| frozen),
        )
    }

    /// Apply a new config: services, pools and endpoints change atomically (one route
    /// table swap); requests in flight finish on the pools they started on. Services
    /// whose pool names are unchanged keep their runtime weights; pools whose endpoints
    /// are unchanged keep their run-time state.
    pub fn reload(
        &self,
        config: &Config,
        actor: Option<String>,
    ) -> Result<(ReloadReport, Event), ControlError> {
        let mut persistence = self.lock();
        let old_table = self.router.table();
        let mut report = ReloadReport::default();
        let old_config = self.config();
        if old_config.proxy != config.proxy {
            report.needs_restart.push("proxy".into());
        }
        if old_config.admin != config.admin {
            report.needs_restart.push("admin".into());
        }
        if old_config.state != config.state {
            report.needs_restart.push("state".into());
        }
        if old_config.log.format != config.log.format {
            report.needs_restart.push("log.format".into());
        }
        let mut services = Vec::new();
        let mut next_control = HashMap::new();
        for cfg in &config.services {
            let old = old_table.service(&cfg.name);
            // A released pool keeps its release's endpoints over the config's as long
            // as the service keeps its pools (documented precedence).
            let same_pools = old.is_some_and(|old| {
                let snap = old.snapshot();
                snap.slots().len() == cfg.pools.len()
                    && snap
                        .slots()
                        .iter()
                        .zip(&cfg.pools)
                        .all(|(s, p)| s.name() == p.name)
            });
            let released = self.service_control(&cfg.name);
            let effective;
            let cfg = if same_pools && !released.deployed.is_empty() {
                effective = crate::control::release::with_deployed(cfg, &released.deployed);
                &effective
            } else {
                cfg
            };
            let reuse: HashMap<String, Arc<Pool>> = old
                .map(|s| {
                    s.snapshot()
                        .slots()
                        .iter()
                        .filter(|slot| {
                            cfg.pool(slot.name())
                                .is_some_and(|p| slot.pool.same_endpoints(&p.endpoints))
                        })
                        .map(|slot| (slot.name().to_owned(), slot.pool.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let fresh = build_service(cfg, &reuse, &self.metrics);
            match old {
                None => report.added.push(cfg.name.clone()),
                Some(old) => {
                    let old_snap = old.snapshot_full();
                    let old_names: Vec<&str> = old_snap.slots().iter().map(|s| s.name()).collect();
                    let new_names: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
                    if old_names == new_names {
                        let pools = fresh
                            .snapshot()
                            .slots()
                            .iter()
                            .map(|s| s.pool.clone())
                            .collect();
                        let snap = ServiceSnapshot::new(
                            pools,
                            &old_snap.weights(),
                            old_snap.version,
                            old_snap.updated_by,
                        )?
                        .with_baseline(old_snap.baseline_name())?
                        .at(old_snap.updated_at);
                        next_control.insert(cfg.name.clone(), self.service_control(&cfg.name));
                        self.writer.publish(&fresh, Arc::new(snap));
                        report.kept.push(cfg.name.clone());
                    } else {
                        let pools = fresh
                            .snapshot()
                            .slots()
                            .iter()
                            .map(|s| s.pool.clone())
                            .collect();
                        let weights: Vec<u32> = cfg.pools.iter().map(|p| p.weight).collect();
                        let snap = ServiceSnapshot::new(
                            pools,
                            &weights,
                            old_snap.version + 1,
                            Source::Config,
                        )?
                        .with_baseline(&cfg.baseline)?
                        .at(self.clock.now());
                        self.writer.publish(&fresh, Arc::new(snap));
                        self.metrics.weight_changed(&cfg.name, Source::Config);
                        report.reset.push(cfg.name.clone());
                        // The config's pools and endpoints from now on; the history
                        // stays readable.
                        next_control.insert(
                            cfg.name.clone(),
                            ServiceControl {
                                releases: released.releases,
                                ..ServiceControl::default()
                            },
                        );
                    }
                }
            }
            services.push(fresh);
        }
        let names: std::collections::HashSet<&str> =
            config.services.iter().map(|s| s.name.as_str()).collect();
        for old in old_table.services() {
            if !names.contains(&*old.name) {
                report.removed.push(old.name.to_string());
            }
        }
        let table = RouteTable::new(services);
        let mut event = Event::new("", EventKind::ConfigReloaded, Source::Config);
        event.actor = actor;
        event.details = serde_json::to_value(&report).unwrap_or_default();
        let event = match persistence.as_mut() {
            Some(p) => {
                // Unsaved rollbacks are journaled before the reload, in the order
                // they happened.
                let next_state = state_of(&table, &next_control);
                let written = p
                    .flush(&self.state())
                    .and_then(|()| p.write(&next_state, event));
                p.note(&written);
                self.publish_unsaved(Some(p));
                written?
            }
            None => event,
        };
        self.writer.publish_table(table);
        *self.control.write().unwrap_or_else(|p| p.into_inner()) = HashMap::new();
        for cfg in &config.services {
            let control = next_control.remove(&cfg.name).unwrap_or_default();
            self.publish_control(&cfg.name, control);
        }
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = InForce::new(config.clone());
        // Version labels may have changed with the config.
        for cfg in &config.services {
            let deployed = self.service_control(&cfg.name).deployed;
            self.publish_versions(&cfg.name, &deployed);
        }
        if let Some(hook) = self.on_reload.get() {
            hook(config);
        }
        Ok((report, event))
    }

    /// Record an event that changes no routing state (e.g. a rejected reload).
    pub fn record(&self, event: Event) -> Result<Event, ControlError> {
        let mut persistence = self.lock();
        match persistence.as_mut() {
            Some(p) => {
                // Unsaved rollbacks go first, so the journal keeps the order things
                // happened in.
                if !p.pending.is_empty() {
                    let flushed = p.flush(&self.state());
                    p.note(&flushed);
                    self.publish_unsaved(Some(p));
                }
                let written = p.record(event);
                p.note(&written);
                Ok(written?)
            }
            None => Ok(event),
        }
    }

    /// Try again to save rollbacks that were applied while the disk refused them
    /// (called by the guard's loop, off the async workers). True when nothing is left
    /// unsaved.
    pub fn flush_pending(&self) -> bool {
        match self.lock().as_mut() {
            Some(p) => self.flush_locked(p),
            None => true,
        }
    }

    /// [`Controller::flush_pending`] under the write lock.
    fn flush_locked(&self, p: &mut Persistence) -> bool {
        if p.pending.is_empty() {
            return true;
        }
        let flushed = p.flush(&self.state());
        p.note(&flushed);
        let done = match flushed {
            Ok(()) => {
                tracing::warn!("unsaved rollback state written to disk");
                true
            }
            Err(e) => {
                tracing::debug!("unsaved rollback state still not written: {e}");
                false
            }
        };
        self.publish_unsaved(Some(p));
        done
    }

    /// Publish which services' routing is ahead of the state file (API and metric).
    fn publish_unsaved(&self, p: Option<&Persistence>) {
        let services: Vec<String> = p.map_or_else(Vec::new, |p| {
            p.pending
                .iter()
                .filter(|e| e.source != Source::Startup)
                .map(|e| e.service.clone())
                .collect()
        });
        self.metrics
            .set_pending_writes(p.map_or(0, Persistence::unsaved));
        *self.unsaved.lock().unwrap_or_else(|e| e.into_inner()) = services;
    }

    /// Services whose live routing is ahead of the state file (a rollback not saved
    /// yet).
    pub fn not_durable(&self, service: &str) -> bool {
        self.unsaved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s == service)
    }

    /// Events after `since`, oldest first.
    pub fn events(&self, since: u64, limit: usize) -> Result<Vec<Event>, ControlError> {
        match self.event_log() {
            Some(log) => Ok(log.since(since, limit)?),
            None => Ok(Vec::new()),
        }
    }

    /// The newest `n` events, oldest first.
    pub fn recent_events(&self, n: usize) -> Result<Vec<Event>, ControlError> {
        match self.event_log() {
            Some(log) => Ok(log.newest(n)?),
            None => Ok(Vec::new()),
        }
    }

    /// The journal's read handle: never waits for a write in progress (see
    /// [`EventLog`]). `None` without persistence.
    pub fn event_log(&self) -> Option<Arc<dyn EventLog>> {
        self.events
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The persistent view of every service as it is now.
    fn state(&self) -> State {
        state_of(
            &self.router.table(),
            &self.control.read().unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// A service's rollout and degraded state (empty for an unknown service).
    pub fn service_control(&self, service: &str) -> ServiceControl {
        self.control
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Every service with a rollout (running or done), by name, with it: what the
    /// rollout driver looks at, without copying every service's control state.
    pub(crate) fn rollouts(&self) -> Vec<(String, Rollout)> {
        let mut all: Vec<(String, Rollout)> = self
            .control
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(name, c)| Some((name.clone(), c.rollout.clone()?)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Put a service's control state in force (under the write lock) and publish its
    /// rollout metrics.
    fn publish_control(&self, service: &str, control: ServiceControl) {
        let (phase, step) = control
            .rollout
            .as_ref()
            .map_or((Phase::Idle, 0), |r| (r.phase, r.step));
        self.metrics.rollout(service, phase, step);
        self.publish_versions(service, &control.deployed);
        self.control
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_owned(), control);
    }

    /// Put each pool's version label of `service` into `weir_pool_info`, zeroing the
    /// series of a label that changed.
    fn publish_versions(&self, service: &str, deployed: &BTreeMap<String, Deployed>) {
        let Some(pools) = self.service_config(service, |s| {
            Some(s.pools.iter().map(|p| p.name.clone()).collect::<Vec<_>>())
        }) else {
            return;
        };
        let mut shown = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        for pool in pools {
            let version = self.version_of(service, &pool, deployed);
            let key = (service.to_owned(), pool);
            if shown.get(&key) == version.as_ref() {
                continue;
            }
            let previous = shown.remove(&key);
            if let Some(v) = &version {
                shown.insert(key.clone(), v.clone());
            }
            self.metrics
                .pool_version(service, &key.1, version.as_deref(), previous.as_deref());
        }
    }
}

/// Builds a service's pool by name, on a release's endpoints or (`None`) the config's.
type BuildPool<'a> = dyn Fn(&str, Option<&[String]>) -> Result<Arc<Pool>, String> + 'a;

/// A restored snapshot for a service, and its control state.
type Restored = (Arc<Service>, ServiceSnapshot, ServiceControl);

/// What the saved state makes of each service of `controller` (built from the config):
/// start-up events, snapshots to restore, and problems naming the service. Reads only.
fn restore_all(controller: &Controller, saved: &State) -> (Vec<Event>, Vec<Restored>, Vec<String>) {
    let mut events = Vec::new();
    let mut restored = Vec::new();
    let mut problems = Vec::new();
    for service in controller.router.table().services() {
        let Some(state) = saved.services.get(&*service.name) else {
            continue;
        };
        let current = service.snapshot_full();
        let names: Vec<&str> = current.slots().iter().map(|s| s.name()).collect();
        let saved_names: Vec<&str> = state.weights.keys().map(String::as_str).collect();
        if sorted(&names) != sorted(&saved_names) {
            // Documented: a pool set changed in the config wins over the saved one.
            let mut event = Event::new(&*service.name, EventKind::StateIgnored, Source::Startup);
            event.reason = Some(format!(
                "saved pools [{}] differ from the config's [{}]; using the config's weights",
                saved_names.join(", "),
                names.join(", ")
            ));
            tracing::warn!(
                "service {}: {}",
                service.name,
                event.reason.as_deref().unwrap_or("")
            );
            events.push(event);
            continue;
        }
        let build = |pool: &str, endpoints: Option<&[String]>| {
            controller.build_pool(&service.name, pool, endpoints)
        };
        match restore(&current, &ServiceControl::default(), state, &names, &build) {
            Ok((snap, control)) => {
                let mut event =
                    Event::new(&*service.name, EventKind::StateRestored, Source::Startup);
                event.from = Some(weights_of(&current));
                event.to = Some(weights_of(&snap));
                event.reason = Some(format!(
                    "weights from the state file (version {}, set by {})",
                    state.version,
                    state.updated_by.as_str()
                ));
                events.push(event);
                restored.push((Arc::clone(service), snap, control));
            }
            Err(problem) => problems.push(format!("service `{}`: {problem}", service.name)),
        }
    }
    (events, restored, problems)
}

/// The state checks of [`Controller::open`] for `weir check`: reading only, without the
/// lock (a running weir holds it, and its saves replace the file atomically).
pub fn check_state(config: &Config) -> Vec<String> {
    let store = StateStore::at(&config.state.dir);
    let saved = match store.load() {
        Ok(saved) => saved.unwrap_or_default(),
        Err(e) => return vec![format!("state: {e}")],
    };
    let controller = Controller::in_memory(config, Metrics::new());
    let (_, _, problems) = restore_all(&controller, &saved);
    if problems.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "state: {}",
        OpenError::Unusable {
            path: store.path(),
            problems,
        }
    )]
}

/// The snapshot a service's saved state describes, whose pools are the config's (same
/// set, checked by the caller), or what is wrong with it.
///
/// Pools whose release (endpoints, version) differs from `current_control`'s are built
/// anew by `build` (on the release's endpoints, or the config's when the release is
/// gone).
fn restore(
    current: &ServiceSnapshot,
    current_control: &ServiceControl,
    state: &ServiceState,
    names: &[&str],
    build: &BuildPool<'_>,
) -> Result<(ServiceSnapshot, ServiceControl), String> {
    let weights: Vec<u32> = names.iter().map(|n| state.weights[*n]).collect();
    let saved = state.control()?;
    if let Some(pool) = saved.deployed.keys().find(|p| !names.contains(&p.as_str())) {
        return Err(format!(
            "saved release of pool `{pool}`: it is not one of its pools [{}]",
            names.join(", ")
        ));
    }
    let mut pools = Vec::with_capacity(names.len());
    for slot in current.slots() {
        let saved_release = saved.deployed.get(slot.name());
        pools.push(
            if saved_release != current_control.deployed.get(slot.name()) {
                let endpoints = saved_release.map(|d| &d.endpoints[..]);
                build(slot.name(), endpoints).map_err(|e| {
                    format!("saved release of pool `{}` is invalid: {e}", slot.name())
                })?
            } else {
                slot.pool.clone()
            },
        );
    }
    // A promotion may have moved the baseline; else the config's.
    let baseline = match &saved.baseline {
        None => current.baseline_name().to_owned(),
        Some(b) if names.contains(&b.as_str()) => b.clone(),
        Some(b) => {
            return Err(format!(
                "saved baseline `{b}` is not one of its pools [{}]",
                names.join(", ")
            ));
        }
    };
    let degraded = saved.degraded.clone();
    let rollout = saved.rollout.clone();
    if let Some(r) = &rollout {
        for (role, pool) in [("candidate", &r.candidate), ("stable", &r.stable)] {
            if !names.contains(&pool.as_str()) {
                return Err(format!(
                    "saved rollout's {role} `{pool}` is not one of its pools [{}]",
                    names.join(", ")
                ));
            }
        }
    }
    let updated_at = humantime::parse_rfc3339_weak(&state.updated_at).map_err(|e| {
        format!(
            "saved `updated_at` `{}` is not a time ({e})",
            state.updated_at
        )
    })?;
    let snap = ServiceSnapshot::new(pools, &weights, state.version, state.updated_by)
        .and_then(|s| s.with_baseline(&baseline))
        .map_err(|e| {
            format!(
                "saved weights {} are invalid: {e}",
                weights_text(&state.weights)
            )
        })?;
    Ok((
        snap.at(updated_at),
        ServiceControl {
            rollout,
            degraded,
            deployed: saved.deployed,
            releases: saved.releases,
        },
    ))
}

/// `stable=90 canary=10`, for messages.
fn weights_text(weights: &Weights) -> String {
    weights
        .iter()
        .map(|(p, w)| format!("{p}={w}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn state_of(table: &RouteTable, control: &HashMap<String, ServiceControl>) -> State {
    let none = ServiceControl::default();
    State {
        services: table
            .services()
            .iter()
            .map(|s| {
                let c = control.get(&*s.name).unwrap_or(&none);
                (s.name.to_string(), service_state(&s.snapshot(), c))
            })
            .collect(),
    }
}

fn service_state(s: &ServiceSnapshot, c: &ServiceControl) -> ServiceState {
    let mut state = ServiceState {
        version: s.version,
        weights: weights_of(s),
        updated_at: rfc3339(s.updated_at),
        updated_by: s.updated_by,
        extra: serde_json::Value::Null,
    };
    state.set_control(&SavedControl {
        baseline: Some(s.baseline_name().to_owned()),
        degraded: c.degraded.clone(),
        rollout: c.rollout.clone(),
        deployed: c.deployed.clone(),
        releases: c.releases.clone(),
    });
    state
}

/// What a start, retry or promote during a freeze records of the override.
fn freeze_override_doc(frozen: &Frozen, why: &str) -> serde_json::Value {
    serde_json::json!({
        "reason": why,
        "window": frozen.reason,
        "until": rfc3339(frozen.until),
    })
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    timestamp(t)
}

fn sorted<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut v = names.to_vec();
    v.sort_unstable();
    v
}

/// Build a service from config; pools listed in `reuse` are kept (same endpoints).
fn build_service(
    cfg: &ServiceConfig,
    reuse: &HashMap<String, Arc<Pool>>,
    metrics: &Arc<Metrics>,
) -> Arc<Service> {
    let pools: Vec<Arc<Pool>> = cfg
        .pools
        .iter()
        .map(|p| {
            reuse
                .get(&p.name)
                .cloned()
                .unwrap_or_else(|| new_pool(cfg, p, metrics))
        })
        .collect();
    let last_byte = cfg
        .slo
        .as_ref()
        .is_some_and(|s| s.latency == crate::config::LatencyMeasure::LastByte);
    for pool in &pools {
        pool.set_judging(cfg.grpc_failure_codes, last_byte);
    }
    // The service's own series (rollbacks, weight changes) are registered with its
    // pools' first traffic, its rollout gauges with its first rollout (see
    // `PoolMetrics` and `Metrics::rollout`): an idle service registers none.
    let weights: Vec<u32> = cfg.pools.iter().map(|p| p.weight).collect();
    let snapshot = ServiceSnapshot::new(pools, &weights, 1, Source::Config)
        .and_then(|s| s.with_baseline(&cfg.baseline))
        .expect("validated config has valid weights and baseline");
    Arc::new(Service::new(
        &cfg.name,
        cfg.hosts.clone(),
        choice(cfg),
        snapshot,
    ))
}

/// A new pool of service `cfg` from `p`, judged by the service's settings.
fn new_pool(
    cfg: &ServiceConfig,
    p: &crate::config::PoolConfig,
    metrics: &Arc<Metrics>,
) -> Arc<Pool> {
    let slo = cfg.slo.clone().unwrap_or_default();
    let window = Window::new(slo.window, slo.interval);
    let pool = Arc::new(Pool::new(&cfg.name, p, metrics, window));
    let last_byte = cfg
        .slo
        .as_ref()
        .is_some_and(|s| s.latency == crate::config::LatencyMeasure::LastByte);
    pool.set_judging(cfg.grpc_failure_codes, last_byte);
    pool
}

/// The request-level pool choice settings of a service.
fn choice(cfg: &ServiceConfig) -> Choice {
    let header =
        |name: &str| http::HeaderName::from_bytes(name.as_bytes()).expect("validated header name");
    Choice {
        target_header: header(&cfg.targeting.header),
        target_cookie: cfg.targeting.cookie.clone(),
        override_token: cfg.targeting.override_token.clone(),
        sticky: cfg.sticky.as_ref().map(|s| match s {
            StickyConfig::Cookie { name, max_age } => StickyKey::Cookie {
                name: name.clone(),
                max_age: *max_age,
            },
            StickyConfig::Header(h) => StickyKey::Header(header(h)),
            StickyConfig::ClientIp => StickyKey::ClientIp,
        }),
    }
}

pub(crate) fn weights_of(s: &ServiceSnapshot) -> Weights {
    s.slots()
        .iter()
        .map(|p| (p.name().to_owned(), p.weight))
        .collect()
}

fn named(s: &ServiceSnapshot) -> Vec<(String, u32)> {
    weights_of(s).into_iter().collect()
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
                service: service.to_owned(),
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
        .map(|(_, s)| s.name().to_owned())
        .collect();
    if !missing.is_empty() {
        return Err(ControlError::MissingPools { pools: missing });
    }
    Ok(out.into_iter().map(|w| w.unwrap_or(0)).collect())
}

/// Mark an event's details: the change it records was applied before it was saved.
fn with_not_durable(details: serde_json::Value, error: &ControlError) -> serde_json::Value {
    let mut details = match details {
        serde_json::Value::Object(m) => serde_json::Value::Object(m),
        serde_json::Value::Null => serde_json::json!({}),
        other => serde_json::json!({ "details": other }),
    };
    details["not_durable"] = serde_json::json!(true);
    details["save_error"] = serde_json::json!(error.to_string());
    if matches!(error, ControlError::StoreUnavailable(_)) {
        // Fleet mode: made by this instance alone while the store was out of reach;
        // written to the store on reconnect unless a newer change came first.
        details["local"] = serde_json::json!(true);
    }
    details
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:1"]
weight = 90
[service.pools.canary]
endpoints = ["127.0.0.1:2"]
weight = 10
"#;

    fn controller() -> Controller {
        Controller::in_memory(&Config::parse(CONFIG, "t").unwrap(), Metrics::new())
    }

    fn set(weights: &[(&str, u32)], if_version: Option<u64>) -> Command {
        Command::SetWeights {
            service: "shop".into(),
            weights: weights.iter().map(|(p, w)| (p.to_string(), *w)).collect(),
            if_version,
            source: Source::Admin,
            actor: None,
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
            actor: None,
            reason: None,
            details: None,
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
                actor: None,
                reason: Some("test".into()),
                details: None,
            })
            .unwrap();
        assert_eq!(change.snapshot.weights(), vec![100, 0]);
        assert_eq!(change.snapshot.updated_by, Source::Guard);
    }

    #[test]
    fn reload_keeps_runtime_weights_and_unchanged_pools() {
        let c = controller();
        c.apply(set(&[("stable", 70), ("canary", 30)], None))
            .unwrap();
        let before = c.snapshot("shop").unwrap();
        let new = CONFIG.replace("127.0.0.1:2", "127.0.0.1:3");
        let (report, _) = c.reload(&Config::parse(&new, "t").unwrap(), None).unwrap();
        assert_eq!(report.kept, ["shop"]);
        let after = c.snapshot("shop").unwrap();
        assert_eq!(after.weights(), vec![70, 30]);
        assert!(Arc::ptr_eq(&before.slots()[0].pool, &after.slots()[0].pool));
        assert!(!Arc::ptr_eq(
            &before.slots()[1].pool,
            &after.slots()[1].pool
        ));
        // A changed pool set resets to the config's weights.
        let renamed = CONFIG.replace("canary", "green");
        let (report, _) = c
            .reload(&Config::parse(&renamed, "t").unwrap(), None)
            .unwrap();
        assert_eq!(report.reset, ["shop"]);
        assert_eq!(c.snapshot("shop").unwrap().weights(), vec![90, 10]);
    }

    #[test]
    fn events_are_read_while_the_writer_holds_its_lock() {
        let dir = std::env::temp_dir().join(format!("weir-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = Config::parse(CONFIG, "t").unwrap();
        config.state.dir = dir.clone();
        let controller = Arc::new(Controller::open(&config, Metrics::new()).unwrap());
        controller
            .apply(set(&[("stable", 50), ("canary", 50)], None))
            .unwrap();
        // The writer's lock, as a slow fsync would hold it.
        let held = controller.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = Arc::clone(&controller);
        std::thread::spawn(move || {
            let _ = tx.send(reader.events(0, 100).map(|e| e.len()));
        });
        let read = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("GET /events must not wait for the writer");
        drop(held);
        // Start-up records plus the weight change.
        assert!(read.unwrap() >= 1);
        drop(controller);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A state directory as weir wrote it before the layering (format 2, untyped
    /// `extra`): a running rollout, a degraded service, three journaled events.
    #[test]
    fn state_written_by_the_previous_layout_loads() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v2");
        let dir = std::env::temp_dir().join(format!("weir-fixture-v2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["state.json", "events.jsonl"] {
            std::fs::copy(fixtures.join(f), dir.join(f)).unwrap();
        }
        let text = std::fs::read_to_string(fixtures.join("weir.toml")).unwrap();
        let mut config = Config::parse(&text, "weir.toml").unwrap();
        config.state.dir = dir.clone();
        let controller = Controller::open(&config, Metrics::new()).unwrap();

        let shop = controller.snapshot("shop").unwrap();
        assert_eq!(
            named(&shop),
            [("stable".into(), 9500), ("canary".into(), 500)]
        );
        assert_eq!(shop.version, 2);
        let rollout = controller.service_control("shop").rollout.unwrap();
        assert_eq!(rollout.phase, Phase::Progressing);
        assert_eq!((rollout.candidate.as_str(), rollout.step), ("canary", 1));
        assert_eq!(rollout.steps.len(), 5);
        assert_eq!(
            rfc3339(rollout.deadline.unwrap()),
            "2026-12-02T04:19:18.088Z"
        );

        let api = controller.snapshot("api").unwrap();
        assert_eq!(named(&api), [("blue".into(), 100), ("green".into(), 0)]);
        assert_eq!(api.updated_by, Source::Guard);
        assert_eq!(
            controller.service_control("api").degraded.as_deref(),
            Some("guard: error rate 12.0% above the SLO 5.0%")
        );
        // The journal goes on from the old ids; old kinds read as the enum.
        let events = controller.events(0, 100).unwrap();
        assert_eq!(events[0].kind, EventKind::RolloutStarted);
        assert_eq!(events[2].kind, EventKind::RolledBack);
        assert!(
            events[3..]
                .iter()
                .all(|e| e.id > 3 && e.kind == EventKind::StateRestored)
        );
        drop(controller);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
