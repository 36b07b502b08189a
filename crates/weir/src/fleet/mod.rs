//! Fleet mode: several weir instances behave as one, with their routing state, journal,
//! judgement and rollout driver shared through etcd v3 (see docs/fleet.md).
//!
//! Everything that talks to etcd runs on a small runtime of its own, on its own thread:
//! the store's calls come from blocking threads (the controller writes under its lock,
//! off the async workers) and wait for an answer there, and the proxy's workers never
//! run etcd's I/O. The pieces:
//! - [`store::EtcdStore`]: the controller's [`Store`](crate::control::store::Store) on etcd
//!   (compare-and-swap on the state's revision, the journal entry in the same txn);
//! - [`sync`]: the watch that applies other instances' changes, the session lease and the
//!   leader election, and the counters every instance publishes for the fleet's guard.

mod etcd;
mod store;
mod sync;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::FleetConfig;
use crate::control::controller::Controller;
use crate::control::fleet::{FleetHooks, FleetMember, FleetStatus};
use crate::control::store::{State, StateError, StateLock, replace_file};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::window::{Totals, Window};

pub(crate) use store::EtcdStore;

/// What this instance remembers about the store between runs (`fleet.json` beside the
/// state file): which store it followed and how far, so that a wiped or restored store
/// is noticed instead of being followed back in time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Remembered {
    pub(crate) store_id: Option<String>,
    pub(crate) revision: i64,
}

const REMEMBERED_FILE: &str = "fleet.json";

/// Everything the fleet's tasks and the store share.
pub(crate) struct Shared {
    cfg: FleetConfig,
    prefix: String,
    boot_id: u64,
    etcd: etcd::Etcd,
    handle: tokio::runtime::Handle,
    dir: PathBuf,
    metrics: Arc<Metrics>,
    /// Set when the store is not the one this instance followed; writes are refused
    /// until an operator re-seeds it.
    mismatch: Mutex<Option<String>>,
    /// The newest etcd revision heard of.
    store_revision: AtomicI64,
    /// The state revision this instance serves.
    applied: AtomicI64,
    /// The store's identity, once known.
    remembered: Mutex<Remembered>,
    /// The journal's last sequence number and its key's mod_revision (for the CAS).
    journal: Mutex<(u64, i64)>,
    /// This instance's session lease (0: none).
    lease: AtomicI64,
    /// Until when this instance may act as leader: the last renewal's reply, minus a
    /// margin, so that it stands down before etcd could hand the lead to another.
    leads_until: Mutex<Option<Instant>>,
    /// The leader key's create_revision while this instance holds it (0: not leading):
    /// the fence every driver write compares.
    term: AtomicI64,
    /// The instance holding the leader key, as last seen.
    leader: Mutex<Option<String>>,
    /// Peers' last published counters.
    peers: Mutex<BTreeMap<String, Peer>>,
    /// Why the last full read of the state failed; cleared by the next that works.
    last_error: Mutex<Option<String>>,
    /// Set when another process publishes under this instance's id.
    duplicate: Mutex<Option<String>>,
    /// Per service, the state revision at which its weights last changed: counters
    /// published from before it mix the old weights with the new (see `sync::ingest`).
    weights_changed_at: Mutex<HashMap<String, i64>>,
    /// Fleet-wide window per (service, pool).
    windows: Mutex<HashMap<(String, String), Arc<Window>>>,
    /// When this instance last published its counters.
    published: Mutex<Option<Instant>>,
    controller: OnceLock<Weak<Controller>>,
    /// Wakes the lease loop to campaign (the leader key went away).
    campaign: tokio::sync::Notify,
    /// Set once the first full read was applied (or found the store unusable).
    first_sync: (Mutex<bool>, Condvar),
    /// Sending on it (or dropping it) stops the runtime thread.
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .field("instance", &self.cfg.instance)
            .finish_non_exhaustive()
    }
}

/// A peer's last counters, and what they are made of.
#[derive(Debug, Clone)]
struct Peer {
    boot_id: u64,
    applied_revision: i64,
    admin: Option<String>,
    version: String,
    pools: HashMap<(String, String), Totals>,
    seen: Instant,
}

/// The fleet handle: the hooks the controller gets, and the tasks' owner.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    shared: Arc<Shared>,
}

impl Fleet {
    /// Start the fleet's runtime and etcd connection (lazily connected), and the store
    /// the controller writes through. Nothing is read from etcd yet.
    pub(crate) fn connect(
        cfg: &FleetConfig,
        lock: StateLock,
        metrics: Arc<Metrics>,
    ) -> Result<(Fleet, EtcdStore), String> {
        let state_dir = lock.dir().to_path_buf();
        let etcd = etcd::Etcd::new(cfg, metrics.gauge("weir_fleet_store_reachable", Vec::new()))?;
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("weir-fleet".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("weir-fleet-io")
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| format!("cannot start the fleet thread: {e}"))?;
        let handle = handle_rx
            .recv()
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot start the fleet runtime: {e}"))?;
        let remembered = read_remembered(&state_dir);
        let shared = Arc::new(Shared {
            prefix: cfg.prefix(),
            cfg: cfg.clone(),
            boot_id: rand::random(),
            etcd,
            handle,
            dir: state_dir,
            metrics,
            mismatch: Mutex::new(None),
            store_revision: AtomicI64::new(0),
            applied: AtomicI64::new(0),
            remembered: Mutex::new(remembered),
            journal: Mutex::new((0, 0)),
            lease: AtomicI64::new(0),
            leads_until: Mutex::new(None),
            term: AtomicI64::new(0),
            leader: Mutex::new(None),
            peers: Mutex::new(BTreeMap::new()),
            last_error: Mutex::new(None),
            duplicate: Mutex::new(None),
            weights_changed_at: Mutex::new(HashMap::new()),
            windows: Mutex::new(HashMap::new()),
            published: Mutex::new(None),
            controller: OnceLock::new(),
            campaign: tokio::sync::Notify::new(),
            first_sync: (Mutex::new(false), Condvar::new()),
            stop: Mutex::new(Some(stop_tx)),
        });
        shared.describe_metrics();
        let store = EtcdStore::new(Arc::clone(&shared), lock);
        Ok((Fleet { shared }, store))
    }

    /// Start following the store and publishing for `controller`; waits up to the
    /// configured timeout for the first full read, so that a weir whose store answers
    /// serves the fleet's weights from its first request (else its cached ones).
    pub(crate) fn start(&self, controller: &Arc<Controller>) {
        let _ = self.shared.controller.set(Arc::downgrade(controller));
        controller.set_fleet(Arc::new(self.clone()));
        sync::spawn(&self.shared);
        let (lock, cv) = &self.shared.first_sync;
        let done = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (done, _) = cv
            .wait_timeout_while(done, self.shared.cfg.timeout * 2, |d| !*d)
            .unwrap_or_else(|p| p.into_inner());
        if !*done {
            tracing::warn!(
                "fleet: etcd did not answer within {:?}; serving the cached state until it does",
                self.shared.cfg.timeout * 2
            );
        }
    }

    /// Leave the fleet: give up the lead and the lease at once (a graceful stop hands
    /// the lead over without waiting for the lease to expire), then stop the runtime.
    pub(crate) fn stop(&self) {
        let shared = Arc::clone(&self.shared);
        let lease = shared.lease.swap(0, Ordering::Relaxed);
        shared.term.store(0, Ordering::Relaxed);
        if lease != 0 {
            let s = Arc::clone(&shared);
            let _ = shared.block_on(async move {
                s.etcd
                    .call(|mut c| async move { c.lease_revoke(lease).await })
                    .await
                    .map(|_| ())
            });
        }
        shared.stop_runtime();
    }
}

impl Shared {
    /// Stop the fleet runtime (its tasks end with it).
    fn stop_runtime(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(());
        }
    }

    /// Run `fut` on the fleet runtime and wait for it here (a blocking thread; never
    /// the fleet runtime's own). Bounded by the etcd timeout plus a second.
    fn block_on<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, etcd::Failure>> + Send + 'static,
    ) -> Result<T, StateError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv_timeout(self.etcd.timeout + Duration::from_secs(1)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(etcd::Failure::Unavailable(m))) => Err(StateError::Unavailable(format!(
                "the fleet's store (etcd) is unreachable: {m}"
            ))),
            Ok(Err(etcd::Failure::Refused(m))) => Err(StateError::Unavailable(format!(
                "etcd refused the request: {m}"
            ))),
            Err(_) => {
                self.etcd.set_reachable(false);
                Err(StateError::Unavailable(
                    "the fleet's store (etcd) did not answer in time".into(),
                ))
            }
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The wall clock every decision reads (the controller's; injected in tests).
    fn now(&self) -> std::time::SystemTime {
        use crate::model::Clock;
        match self.controller() {
            Some(c) => c.clock().now(),
            None => crate::model::SystemClock.now(),
        }
    }

    fn controller(&self) -> Option<Arc<Controller>> {
        self.controller.get().and_then(Weak::upgrade)
    }

    /// Another process publishes under this instance's id: say so (log, metric,
    /// status). Its records are not summed: they would count as this instance's.
    fn duplicate(&self, boot_id: u64, admin: Option<&str>) {
        let problem = format!(
            "another process publishes as instance `{}` (boot {:x}, admin {}): give each \
             instance its own [fleet] instance id",
            self.cfg.instance,
            boot_id,
            admin.unwrap_or("unknown")
        );
        let mut d = self.duplicate.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            tracing::error!("fleet: {problem}");
        }
        *d = Some(problem);
        self.gauge("weir_fleet_duplicate_instance", 1.0);
    }

    /// Remember which services' weights differ between two states, and from when.
    fn note_weight_changes(&self, before: &State, after: &State, revision: i64) {
        let mut at = self
            .weights_changed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (name, service) in &after.services {
            if before.services.get(name).map(|s| &s.weights) != Some(&service.weights) {
                at.insert(name.clone(), revision);
            }
        }
    }

    /// The state revision this instance serves from now on.
    fn set_applied(&self, revision: i64) {
        self.applied.store(revision, Ordering::Relaxed);
        self.gauge("weir_fleet_applied_revision", revision as f64);
        self.note_revision(revision);
    }

    /// A store revision heard of (a response header, a watch event): the lag gauge.
    fn note_revision(&self, revision: i64) {
        let newest = self
            .store_revision
            .fetch_max(revision, Ordering::Relaxed)
            .max(revision);
        let applied = self.applied.load(Ordering::Relaxed);
        self.gauge("weir_fleet_lag_revisions", (newest - applied).max(0) as f64);
    }

    fn gauge(&self, name: &'static str, value: f64) {
        self.metrics.gauge(name, Vec::new()).set(value);
    }

    fn describe_metrics(&self) {
        let m = &self.metrics;
        m.describe_gauge(
            "weir_fleet_store_reachable",
            "1 while etcd answers this instance; 0 while it serves its last applied state and refuses changes.",
        );
        m.describe_gauge(
            "weir_fleet_store_mismatch",
            "1 when etcd is not the store this instance followed (wiped, restored, another cluster): writes are refused until an operator re-seeds it.",
        );
        m.describe_gauge(
            "weir_fleet_leader",
            "1 while this instance leads the fleet (runs rollouts and journal trimming).",
        );
        m.describe_gauge(
            "weir_fleet_applied_revision",
            "The etcd revision of the routing state this instance serves.",
        );
        m.describe_gauge(
            "weir_fleet_lag_revisions",
            "The newest etcd revision this instance heard of, minus the one it serves.",
        );
        m.describe_gauge(
            "weir_fleet_members",
            "Instances whose published counters are live (this one included).",
        );
        m.describe_gauge(
            "weir_fleet_duplicate_instance",
            "1 when another process publishes under this instance's [fleet] instance id.",
        );
        m.describe_counter(
            "weir_fleet_resyncs_total",
            "Full re-reads of the shared state (start, reconnect, compaction, watch cancelled).",
        );
        self.gauge("weir_fleet_store_mismatch", 0.0);
        self.gauge("weir_fleet_leader", 0.0);
    }

    fn leads(&self) -> bool {
        self.term.load(Ordering::Relaxed) != 0
            && self
                .leads_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| Instant::now() < t)
    }

    fn remember(&self, f: impl FnOnce(&mut Remembered)) {
        let mut r = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        let before = r.clone();
        f(&mut r);
        if *r != before {
            write_remembered(&self.dir, &r);
        }
    }
}

fn read_remembered(dir: &Path) -> Remembered {
    std::fs::read(dir.join(REMEMBERED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Written beside the state file, replaced atomically (like it); a failure only costs
/// the wipe check its memory, so it is logged, not fatal.
fn write_remembered(dir: &Path, r: &Remembered) {
    let path = dir.join(REMEMBERED_FILE);
    let written = serde_json::to_vec_pretty(r)
        .map_err(|error| StateError::Encode {
            path: path.clone(),
            error,
        })
        .and_then(|bytes| {
            replace_file(
                dir,
                &dir.join(format!("{REMEMBERED_FILE}.tmp")),
                &path,
                &bytes,
            )
        });
    if let Err(e) = written {
        tracing::warn!("fleet: {e}");
    }
}

impl FleetHooks for Fleet {
    fn leads(&self) -> bool {
        self.shared.leads()
    }

    fn judging(&self) -> bool {
        let s = &self.shared;
        s.etcd.reachable()
            && s.mismatch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
            && s.published
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < s.cfg.publish_interval * 4)
    }

    fn window(&self, service: &str, pool: &str) -> Option<Arc<Window>> {
        sync::fleet_window(&self.shared, service, pool)
    }

    fn rotate(&self, now: Instant) {
        let windows: Vec<Arc<Window>> = self
            .shared
            .windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for w in windows {
            w.rotate(now);
        }
    }

    fn status(&self) -> FleetStatus {
        let s = &self.shared;
        let store_revision = s.store_revision.load(Ordering::Relaxed);
        let mismatch = s.mismatch.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let reachable = s.etcd.reachable();
        let leader = s.leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let members = s
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, p)| FleetMember {
                instance: id.clone(),
                admin: p.admin.clone(),
                version: p.version.clone(),
                applied_revision: p.applied_revision,
                lag: (store_revision - p.applied_revision).max(0),
                last_seen_ms: Some(p.seen.elapsed().as_millis() as u64),
                leader: leader.as_deref() == Some(id.as_str()),
            })
            .collect();
        FleetStatus {
            name: s.cfg.name.clone(),
            instance: s.cfg.instance.clone(),
            store: if mismatch.is_some() {
                "mismatch".into()
            } else if reachable && s.applied.load(Ordering::Relaxed) == 0 {
                // etcd answers, but this instance has not read the fleet's state yet.
                "syncing".into()
            } else if reachable {
                "reachable".into()
            } else {
                "unreachable".into()
            },
            problem: mismatch
                .or_else(|| {
                    // Why the state cannot be read (unreachable, refused: bad password,
                    // certificate…), until it can.
                    (!reachable || s.applied.load(Ordering::Relaxed) == 0).then(|| {
                        s.last_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                            .unwrap_or_else(|| "etcd does not answer".into())
                    })
                })
                .or_else(|| {
                    s.duplicate
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                }),
            endpoint: s.etcd.endpoint(),
            leader,
            leads: s.leads(),
            applied_revision: s.applied.load(Ordering::Relaxed),
            store_revision,
            judging_fleet: self.judging(),
            members,
        }
    }

    fn reseed(&self, actor: Option<String>) -> Result<(), String> {
        sync::reseed(&self.shared, actor)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop_runtime();
    }
}
