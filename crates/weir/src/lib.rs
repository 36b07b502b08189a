//! weir: an L7 traffic-splitting reverse proxy with progressive delivery built in.
//!
//! Component map. The library is built in layers, bottom up; each imports only from the
//! ones below it (`scripts/layers.py` checks it):
//!
//! ```text
//!  lib.rs     Weir::new / serve (this file): builds the parts and starts the tasks
//!  admin      admin API server, auth, typed API documents, dashboard
//!  control    Controller ── the only holder of the RoutingWriter; persists through Store
//!             rollout · judge · stats · freeze (pure)   analysis (pure + calls)
//!             guard · driver · health · webhook (tasks)
//!  dataplane  proxy ─► routing (Router: ArcSwap snapshots, read only) ─► pool ─► client
//!             outcome ─► sinks (metrics, guard window, passive ejection, access log)
//!  telemetry  window · metrics · access (the access log's writer)
//!  config     TOML → validated Config
//!  model      shared words (Source, ErrorKind, EventKind, Step, Phase, Check), Clock
//! ```
//!
//! Many readers, one writer: the data plane reads routing snapshots without locks; the
//! controller alone swaps them (it owns the only [`dataplane::routing::RoutingWriter`]),
//! after the change is durable in its [`control::store::Store`]. Decisions read time from
//! the injected [`model::Clock`].

// Layers are private; what users of the library get is chosen below, by name. `config`
// (the config file's types) and `model` (the shared words) are public as they are.
mod admin;
pub mod config;
mod control;
mod dataplane;
#[cfg(feature = "fleet")]
mod fleet;
pub mod model;
mod telemetry;

/// The admin API's documents and request bodies (used by `weir ctl` and the tests).
pub use admin::api;
pub use admin::{Admin, AdminError, BODY_READ_TIMEOUT, reload};
pub use control::controller::{
    Change, Command, ControlError, Controller, OpenError, ReloadReport, RolloutVerb,
    ServiceControl, check_state,
};
pub use control::fleet::{FleetHooks, FleetMember, FleetStatus};
pub use control::guard::Guard;
/// The judgement as pure functions: evaluate a candidate against a baseline offline
/// (the simulation tests do, on streams with known truth).
pub use control::judge;
pub use control::rollout::{Hooks, Rollout};
/// External analysis as rollouts, the journal and the API carry it: measurements of
/// Prometheus queries, webhook answers, per-template tallies, and the pure judgement.
pub mod analysis {
    pub use crate::control::analysis::{
        HookCall, Measurement, Outcome, Standing, Tally, judge, parse_answer, render,
    };
    pub use crate::control::freeze::{Frozen, active as active_freeze};
}
pub use dataplane::outcome::{LogSink, Outcome, OutcomeSink};
pub use dataplane::pool::Pool;
pub use dataplane::routing::{
    PoolSlot, RouteTable, Router, RoutingWriter, Service, ServiceSnapshot,
};
pub use dataplane::sinks::{MetricsSink, OutlierSink, WindowSink};
pub use telemetry::metrics::Metrics;
pub use telemetry::window::Window;

/// The state directory: its lock, the store the controller persists through, the
/// journal's events.
pub mod state {
    pub use crate::control::store::{
        Event, EventLog, FileStore, JournalLog, Revision, STATE_FILE, SavedControl, ServiceState,
        State, StateError, StateLock, Store, discard,
    };
}

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::control::store::StateLock;
use crate::control::{driver, health};
use crate::dataplane::proxy::Proxy;
use crate::dataplane::sinks::AccessSink;
use crate::dataplane::tls;
use crate::telemetry::access::AccessLog;

/// Why weir cannot start.
///
/// The wrapped errors are part of the message, not `source()`: the binary prints the
/// whole chain (`{:#}`), which would otherwise show each of them twice.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state: {0}")]
    State(OpenError),
    /// The state file is unusable; the message says how to move it aside.
    #[error(
        "{error}\nweir does not guess: fix the file, or move it aside (it is renamed, not \
         deleted) and start from the config's weights with: weir state discard --config {}",
        config.as_ref().map_or("<config file>".into(), |p| p.display().to_string())
    )]
    UnusableState {
        error: OpenError,
        config: Option<PathBuf>,
    },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("TLS: {0}")]
    Tls(tls::TlsError),
    /// `[fleet]` cannot be used (built without fleet support, unreadable TLS files…).
    #[error("fleet: {0}")]
    Fleet(String),
    /// `[log.access]`: the file cannot be opened.
    #[error("log.access: {0}")]
    AccessLog(io::Error),
}

impl From<tls::TlsError> for StartError {
    fn from(e: tls::TlsError) -> Self {
        StartError::Tls(e)
    }
}

impl StartError {
    fn state(error: OpenError, config: Option<PathBuf>) -> StartError {
        match error {
            OpenError::Unusable { .. } => StartError::UnusableState { error, config },
            error => StartError::State(error),
        }
    }
}

/// Every problem `weir run` would stop at before serving, besides the config file's own
/// (already validated into `config`): the admin token, certificates and keys, CA files.
/// For `weir check`; each problem once.
pub fn preflight(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = admin::resolve_token(config) {
        problems.push(e.to_string());
    }
    // Pair by pair and pool by pool, rather than the one-error-and-stop of the start-up
    // path, so that one run of `weir check` shows every bad file.
    if let Some(t) = &config.proxy.tls {
        let before = problems.len();
        let provider = rustls::crypto::ring::default_provider();
        for c in t.default.iter().chain(&t.certs) {
            if let Err(e) = tls::load_pair(&c.cert, &c.key, &provider) {
                problems.push(format!("TLS: {e}"));
            }
        }
        if problems.len() == before
            && let Err(e) = tls::server_config(t)
        {
            problems.push(format!("TLS: {e}"));
        }
    }
    for service in &config.services {
        for pool in &service.pools {
            if let Some(t) = &pool.tls
                && let Err(e) = tls::upstream(t, pool.protocol)
            {
                problems.push(format!("TLS: {e}"));
            }
        }
    }
    if let Err(e) = telemetry::access::check(&config.log.access) {
        problems.push(format!("log.access: {e}"));
    }
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    problems
}

/// A configured weir instance, ready to serve. Built from a validated config; tests and
/// the binary alike bind their own listeners and call [`Weir::serve`].
#[derive(Debug)]
pub struct Weir {
    /// Fleet mode's connection and tasks.
    #[cfg(feature = "fleet")]
    fleet: Option<fleet::Fleet>,
    /// The HTTPS listener's rustls configuration.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The endpoint-health task, taken by the first `serve`.
    monitor: Mutex<Option<health::Monitor>>,
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
    controller: Arc<Controller>,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    access: Arc<AccessLog>,
    grace: Duration,
}

impl Weir {
    /// Build with durable state in `[state] dir` (restoring saved weights). `config_path`
    /// is the file reloads re-read.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Weir, StartError> {
        Weir::with_sinks(config, config_path, Vec::new())
    }

    /// Build with extra outcome sinks (besides the debug log).
    pub fn with_sinks(
        config: Config,
        config_path: Option<PathBuf>,
        extra: Vec<Arc<dyn OutcomeSink>>,
    ) -> Result<Weir, StartError> {
        Weir::build(config, config_path, extra, None)
    }

    /// [`Weir::new`] with the state directory's lock already taken (by the binary,
    /// before it binds its listeners).
    pub fn with_lock(
        config: Config,
        config_path: Option<PathBuf>,
        lock: StateLock,
    ) -> Result<Weir, StartError> {
        Weir::build(config, config_path, Vec::new(), Some(lock))
    }

    fn build(
        config: Config,
        config_path: Option<PathBuf>,
        extra: Vec<Arc<dyn OutcomeSink>>,
        lock: Option<StateLock>,
    ) -> Result<Weir, StartError> {
        let token = admin::resolve_token(&config)?;
        // Bad certificates and keys are startup errors naming the file.
        let tls = config
            .proxy
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()?;
        tls::check_upstreams(&config)?;
        let metrics = Metrics::new();
        #[cfg(feature = "fleet")]
        let mut fleet = None;
        let opened = match (lock, &config.fleet) {
            #[cfg(feature = "fleet")]
            (lock, Some(fleet_config)) => {
                let lock = match lock {
                    Some(lock) => lock,
                    None => StateLock::acquire(&config.state.dir)
                        .map_err(|e| StartError::State(e.into()))?,
                };
                let (handle, store) =
                    fleet::Fleet::connect(fleet_config, lock, Arc::clone(&metrics))
                        .map_err(StartError::Fleet)?;
                fleet = Some(handle);
                Controller::open_shared(
                    &config,
                    Arc::clone(&metrics),
                    Arc::new(model::SystemClock),
                    Box::new(store),
                )
            }
            #[cfg(not(feature = "fleet"))]
            (_, Some(_)) => {
                return Err(StartError::Fleet(
                    "this weir was built without fleet support; build it with \
                     `--features fleet` (the release builds and the Docker image have it)"
                        .into(),
                ));
            }
            (Some(lock), None) => Controller::open_locked(&config, Arc::clone(&metrics), lock),
            (None, None) => Controller::open(&config, Arc::clone(&metrics)),
        };
        let controller = Arc::new(opened.map_err(|e| StartError::state(e, config_path.clone()))?);
        #[cfg(feature = "fleet")]
        if let Some(fleet) = &fleet {
            fleet.start(&controller);
        }
        // Before anything starts: an access log that cannot be opened fails the start.
        let access = AccessLog::new(&metrics);
        access
            .configure(&config.log.access)
            .map_err(StartError::AccessLog)?;
        let reopen = Arc::clone(&access);
        controller.on_reload(move |config| {
            if let Err(e) = reopen.configure(&config.log.access) {
                tracing::error!("{e}; the access log keeps its previous settings");
            }
        });
        let (outliers, monitor) = health::start(Arc::clone(&controller));
        let mut sinks: Vec<Arc<dyn OutcomeSink>> = vec![
            Arc::new(WindowSink),
            Arc::new(outliers),
            Arc::new(MetricsSink(Arc::clone(&metrics))),
            Arc::new(LogSink),
            Arc::new(AccessSink(Arc::clone(&access))),
        ];
        sinks.extend(extra);
        let proxy = Arc::new(Proxy::new(
            &config.proxy,
            Arc::clone(controller.router()),
            sinks,
            Arc::clone(&access),
        ));
        let guard = Arc::new(Guard::new(Arc::clone(&controller), Arc::clone(&metrics)));
        let admin = Arc::new(
            Admin::new(
                Arc::clone(&controller),
                Arc::clone(&guard),
                Arc::clone(&metrics),
                token,
                config.admin.metrics_auth,
                config_path,
            )
            .with_allowed_hosts(&config.admin.allowed_hosts),
        );
        Ok(Weir {
            #[cfg(feature = "fleet")]
            fleet,
            tls,
            monitor: Mutex::new(Some(monitor)),
            guard,
            metrics,
            controller,
            proxy,
            admin,
            access,
            grace: config.proxy.shutdown_grace,
        })
    }

    /// The controller: the one way to change weights at run time.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    /// The SLO guard.
    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    pub fn admin(&self) -> &Arc<Admin> {
        &self.admin
    }

    /// Serve proxy traffic (and the admin API, when given its listener) until `shutdown`
    /// resolves; then stop accepting and give open requests `[proxy] shutdown_grace`.
    pub async fn serve(
        &self,
        proxy: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        self.serve_all(proxy, None, admin, shutdown).await
    }

    /// [`Weir::serve`] with the HTTPS listener too (`[proxy] tls_listen`).
    pub async fn serve_all(
        &self,
        proxy: TcpListener,
        tls: Option<TcpListener>,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let tls = match (tls, &self.tls) {
            (Some(l), Some(config)) => Some((l, Arc::clone(config))),
            (Some(_), None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a TLS listener was given but [proxy] tls_listen is not configured",
                ));
            }
            (None, _) => None,
        };
        self.metrics.spawn_upkeep();
        let guard = tokio::spawn(Arc::clone(&self.guard).run());
        let monitor = self
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|m| tokio::spawn(m.run()));
        let rollouts = tokio::spawn(driver::drive(
            Arc::clone(&self.controller),
            Arc::clone(&self.guard),
        ));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let admin_task = admin.map(|listener| {
            let mut rx = stop_rx.clone();
            tokio::spawn(Arc::clone(&self.admin).serve(listener, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }))
        });
        self.admin.set_ready(true);
        let result = Arc::clone(&self.proxy)
            .serve(
                proxy,
                tls,
                async {
                    shutdown.await;
                    self.admin.set_ready(false);
                },
                self.grace,
            )
            .await;
        guard.abort();
        if let Some(m) = monitor {
            m.abort();
        }
        rollouts.abort();
        let _ = stop_tx.send(true);
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        // The last requests' lines, out of the writer's buffer before the process ends.
        let access = Arc::clone(&self.access);
        let _ = tokio::task::spawn_blocking(move || access.flush()).await;
        #[cfg(feature = "fleet")]
        if let Some(fleet) = self.fleet.clone() {
            // Hand the lead over now rather than when the lease expires.
            let _ = tokio::task::spawn_blocking(move || fleet.stop()).await;
        }
        result
    }
}
