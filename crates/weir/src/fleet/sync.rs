//! The fleet's tasks: follow the store (a full read, then a watch from the next
//! revision, applying every state change in revision order), hold the session lease
//! and campaign for the lead, and publish this instance's per-pool counters while
//! summing everyone's into the fleet windows the guard judges.
//!
//! Anything odd on the watch (a cancel, a compaction, a broken stream, a head from
//! another store) sends the loop back to a full read, which applies only what differs,
//! so nothing is missed and nothing is applied twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use histogram::SparseHistogram;
use serde::{Deserialize, Serialize};

use super::etcd::Failure;
use super::store::{Head, SCHEMA, Schema, Seq, journal_key};
use super::{Peer, Shared};
use crate::control::store::{Event, ServiceState, State};
use crate::model::{EventKind, Source, timestamp};
use crate::telemetry::window::{Totals, Window};

/// Journal entries the leader keeps in etcd; older ones are trimmed.
const JOURNAL_KEEP: u64 = 10_000;

/// What an instance publishes under `members/<instance>`, with its lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    instance: String,
    boot_id: u64,
    #[serde(default)]
    admin: Option<String>,
    version: String,
    applied_revision: i64,
    pools: Vec<PoolTotals>,
}

/// One pool's running sums; the histogram is sparse (bucket index, count).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PoolTotals {
    service: String,
    pool: String,
    requests: u64,
    errors: u64,
    index: Vec<u32>,
    count: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaderValue {
    instance: String,
    boot_id: u64,
}

/// Everything a full read finds, at one revision.
#[derive(Debug, Default)]
struct Snapshot {
    revision: i64,
    schema: Option<Schema>,
    head: Option<(Head, i64)>,
    state: State,
    journal: (u64, i64),
    leader: Option<Holder>,
    members: Vec<Record>,
}

pub(super) fn spawn(shared: &Arc<Shared>) {
    shared.handle.spawn(follow(Arc::clone(shared)));
    shared.handle.spawn(lease(Arc::clone(shared)));
    shared.handle.spawn(publish(Arc::clone(shared)));
}

fn first_synced(shared: &Shared) {
    let (lock, cv) = &shared.first_sync;
    *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
    cv.notify_all();
}

async fn full_read(shared: &Shared) -> Result<Snapshot, Failure> {
    let keys = [
        shared.key("state/"),
        shared.key("journal/seq"),
        shared.key("leader"),
        shared.key("members/"),
    ];
    let r = shared
        .etcd
        .call(|mut c| {
            let keys = keys.clone();
            async move {
                let txn = Txn::new().and_then(vec![
                    TxnOp::get(keys[0].clone(), Some(GetOptions::new().with_prefix())),
                    TxnOp::get(keys[1].clone(), None),
                    TxnOp::get(keys[2].clone(), None),
                    TxnOp::get(keys[3].clone(), Some(GetOptions::new().with_prefix())),
                ]);
                c.txn(txn).await
            }
        })
        .await?;
    let mut snap = Snapshot {
        revision: r.header().map_or(0, |h| h.revision()),
        ..Snapshot::default()
    };
    let services_prefix = shared.key("state/services/");
    for (i, op) in r.op_responses().into_iter().enumerate() {
        let TxnOpResponse::Get(get) = op else {
            continue;
        };
        for kv in get.kvs() {
            let key = kv.key_str().unwrap_or("");
            match i {
                0 if key == shared.key("state/schema") => {
                    snap.schema = serde_json::from_slice(kv.value()).ok();
                }
                0 if key == shared.key("state/head") => {
                    snap.head = serde_json::from_slice(kv.value())
                        .ok()
                        .map(|h| (h, kv.mod_revision()));
                }
                0 => {
                    if let Some(name) = key.strip_prefix(&services_prefix)
                        && let Ok(s) = serde_json::from_slice::<ServiceState>(kv.value())
                    {
                        snap.state.services.insert(name.to_owned(), s);
                    }
                }
                1 => {
                    let seq = serde_json::from_slice::<Seq>(kv.value()).map_or(0, |s| s.seq);
                    snap.journal = (seq, kv.mod_revision());
                }
                2 => {
                    snap.leader = Holder::of(kv);
                }
                _ => {
                    if let Ok(rec) = serde_json::from_slice::<Record>(kv.value()) {
                        snap.members.push(rec);
                    }
                }
            }
        }
    }
    Ok(snap)
}

/// What a full read means for this instance.
enum Verdict {
    Follow,
    /// A store an operator re-seeded in place of the one this instance followed.
    FollowReplacement,
    Seed,
    Mismatch(String),
}

fn judge_store(shared: &Shared, snap: &Snapshot) -> Verdict {
    let remembered = shared
        .remembered
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match (&snap.schema, &remembered.store_id) {
        (None, None) if snap.head.is_none() && snap.state.services.is_empty() => Verdict::Seed,
        (None, None) => Verdict::Mismatch(format!(
            "etcd has weir state under {} but no schema key: not written by a weir this \
             version knows; refusing to follow or overwrite it",
            shared.prefix
        )),
        (None, Some(id)) => Verdict::Mismatch(format!(
            "etcd has no weir state under {}, but this instance followed store {id} up to \
             revision {}: etcd was wiped or this is another cluster. Not re-seeding it with \
             this instance's (possibly stale) weights: check, then run `weir ctl fleet reseed` \
             on the instance whose state should win",
            shared.prefix, remembered.revision
        )),
        (Some(schema), _) if schema.schema > SCHEMA => Verdict::Mismatch(format!(
            "the fleet's store has schema {}, newer than this weir's {SCHEMA}: upgrade weir",
            schema.schema
        )),
        (Some(schema), Some(id))
            if schema.store_id != *id && schema.replaces.as_deref() == Some(id.as_str()) =>
        {
            Verdict::FollowReplacement
        }
        (Some(schema), Some(id)) if schema.store_id != *id => Verdict::Mismatch(format!(
            "etcd holds store {}, but this instance followed store {id}: etcd was wiped and \
             re-seeded, restored, or this is another cluster. Check, then run `weir ctl fleet \
             reseed` on the instance whose state should win (or discard this instance's \
             state directory to follow the new store)",
            schema.store_id
        )),
        (Some(_), Some(_)) if snap.head.as_ref().map_or(0, |h| h.1) < remembered.revision => {
            Verdict::Mismatch(format!(
                "the fleet's state is at revision {}, older than revision {} this instance \
                 already applied: etcd was restored from an older backup. Not following it \
                 back in time; check, then run `weir ctl fleet reseed`",
                snap.head.as_ref().map_or(0, |h| h.1),
                remembered.revision
            ))
        }
        (Some(_), _) => Verdict::Follow,
    }
}

fn set_mismatch(shared: &Shared, reason: Option<String>) {
    let mut m = shared.mismatch.lock().unwrap_or_else(|p| p.into_inner());
    if *m != reason {
        match &reason {
            Some(r) => tracing::error!("fleet: store mismatch: {r}"),
            None if m.is_some() => tracing::warn!("fleet: store mismatch resolved"),
            None => {}
        }
        *m = reason;
    }
    shared.gauge(
        "weir_fleet_store_mismatch",
        f64::from(u8::from(m.is_some())),
    );
}

/// Write this instance's state as the fleet's first (the store under the prefix is
/// empty): only if nobody seeded it meanwhile.
async fn seed(shared: &Arc<Shared>, replace: bool) -> Result<(), Failure> {
    let Some(controller) = shared.controller() else {
        return Err(Failure::Refused("not started".into()));
    };
    let state = controller.current_state();
    let store_id = format!("{:032x}", rand::random::<u128>());
    let now = timestamp(shared.now());
    let replaces = if replace {
        shared
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .store_id
            .clone()
    } else {
        None
    };
    let schema = Schema {
        schema: SCHEMA,
        store_id: store_id.clone(),
        created_at: now.clone(),
        created_by: shared.cfg.instance.clone(),
        replaces,
    };
    let head = Head {
        store_id: store_id.clone(),
        at: now,
        by: shared.cfg.instance.clone(),
    };
    // Re-seeding overwrites schema, head and this instance's services (etcd refuses a
    // txn that deletes and puts the same key); a service only the old store had stays,
    // and instances without it in their config ignore it.
    let mut ops = Vec::new();
    ops.push(TxnOp::put(
        shared.key("state/schema"),
        serde_json::to_vec(&schema).unwrap_or_default(),
        None,
    ));
    ops.push(TxnOp::put(
        shared.key("state/head"),
        serde_json::to_vec(&head).unwrap_or_default(),
        None,
    ));
    for (name, service) in &state.services {
        ops.push(TxnOp::put(
            shared.key(&format!("state/services/{name}")),
            serde_json::to_vec(service).unwrap_or_default(),
            None,
        ));
    }
    if ops.len() > 127 {
        return Err(Failure::Refused(format!(
            "{} services do not fit one etcd transaction (128 operations)",
            state.services.len()
        )));
    }
    let compares = if replace {
        Vec::new()
    } else {
        vec![Compare::create_revision(
            shared.key("state/schema"),
            CompareOp::Equal,
            0,
        )]
    };
    let txn = Txn::new().when(compares).and_then(ops);
    let r = shared
        .etcd
        .call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
    if !r.succeeded() {
        return Ok(()); // another instance seeded first: follow it
    }
    shared.remember(|r| {
        r.store_id = Some(store_id.clone());
        r.revision = 0;
    });
    tracing::warn!(
        "fleet: seeded store {store_id} under {} with this instance's state ({} services)",
        shared.prefix,
        state.services.len()
    );
    Ok(())
}

/// Follow the store for as long as the runtime runs.
async fn follow(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let snap = match full_read(&shared).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("fleet: full read failed: {e}");
                *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        shared
            .metrics
            .counter("weir_fleet_resyncs_total", Vec::new())
            .increment(1);
        match judge_store(&shared, &snap) {
            Verdict::Seed => {
                if let Err(e) = seed(&shared, false).await {
                    tracing::error!("fleet: cannot seed the store: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
            Verdict::Mismatch(reason) => {
                set_mismatch(&shared, Some(reason));
                first_synced(&shared);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Verdict::Follow => set_mismatch(&shared, None),
            Verdict::FollowReplacement => {
                tracing::warn!("fleet: following the store an operator re-seeded");
                shared.remember(|r| r.revision = 0);
                if let Some(controller) = shared.controller() {
                    controller.forget_applied();
                }
                set_mismatch(&shared, None);
            }
        }
        if let Some(schema) = &snap.schema {
            shared.remember(|r| r.store_id = Some(schema.store_id.clone()));
        }
        shared.note_revision(snap.revision);
        {
            let mut j = shared.journal.lock().unwrap_or_else(|p| p.into_inner());
            if j.1 != snap.journal.1 {
                *j = snap.journal;
            }
        }
        set_leader(&shared, snap.leader.clone());
        for record in snap.members {
            if record.instance != shared.cfg.instance {
                ingest(&shared, record);
            }
        }
        let mut state = snap.state;
        let head_rev = snap.head.as_ref().map_or(0, |h| h.1);
        let store_id = snap.schema.map(|s| s.store_id).unwrap_or_default();
        adopt(&shared, &state, head_rev).await;
        first_synced(&shared);

        // Watch everything under the prefix from the next revision on.
        let start = snap.revision + 1;
        let prefix = shared.prefix.clone();
        let opened = shared
            .etcd
            .call(|mut c| {
                let prefix = prefix.clone();
                async move {
                    c.watch(
                        prefix,
                        Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                    )
                    .await
                }
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("fleet: cannot open the watch: {e}");
                continue;
            }
        };
        let mut next = start;
        let mut applied = head_rev;
        loop {
            let message = stream.message().await;
            let response = match message {
                Ok(Some(r)) => r,
                Ok(None) => {
                    tracing::debug!("fleet: watch ended");
                    break;
                }
                Err(e) => {
                    tracing::debug!("fleet: watch broke: {e}");
                    break;
                }
            };
            if response.canceled() || response.compact_revision() > 0 {
                tracing::info!(
                    "fleet: watch cancelled ({}; compacted to {}): reading the state again",
                    response.cancel_reason(),
                    response.compact_revision()
                );
                break;
            }
            let header_rev = response.header().map_or(0, |h| h.revision());
            if header_rev != 0 && header_rev < next - 1 {
                // The store went back in time under us (restored or wiped).
                break;
            }
            shared.note_revision(header_rev);
            let mut state_changed = false;
            let mut resync = false;
            // Every event of one txn has the same revision: what counts as seen moves
            // on only after the whole response.
            let mut newest = next - 1;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                if kv.mod_revision() != 0 && kv.mod_revision() < next {
                    continue; // already seen (etcd 3.4 may repeat events)
                }
                let key = kv.key_str().unwrap_or("");
                let Some(rel) = key.strip_prefix(&shared.prefix) else {
                    continue;
                };
                let put = event.event_type() == EventType::Put;
                match rel {
                    "state/head" if put => match serde_json::from_slice::<Head>(kv.value()) {
                        Ok(h) if h.store_id == store_id => {
                            applied = kv.mod_revision();
                            state_changed = true;
                        }
                        _ => resync = true,
                    },
                    "state/head" | "state/schema" => resync = true,
                    "journal/seq" if put => {
                        if let Ok(s) = serde_json::from_slice::<Seq>(kv.value()) {
                            let mut j = shared.journal.lock().unwrap_or_else(|p| p.into_inner());
                            if kv.mod_revision() > j.1 {
                                *j = (s.seq, kv.mod_revision());
                            }
                        }
                    }
                    "leader" => {
                        if put {
                            set_leader(&shared, Holder::of(kv));
                        } else {
                            set_leader(&shared, None);
                            shared.campaign.notify_one();
                        }
                    }
                    _ => {
                        if let Some(name) = rel.strip_prefix("state/services/") {
                            if put {
                                if let Ok(s) = serde_json::from_slice::<ServiceState>(kv.value()) {
                                    state.services.insert(name.to_owned(), s);
                                }
                            } else {
                                state.services.remove(name);
                            }
                        } else if let Some(id) = rel.strip_prefix("members/") {
                            let record = if put {
                                serde_json::from_slice::<Record>(kv.value()).ok()
                            } else {
                                None
                            };
                            if id == shared.cfg.instance {
                                // Its own records are taken in as it publishes them; one
                                // from another process means two instances share an id.
                                if let Some(r) = record
                                    && r.boot_id != shared.boot_id
                                {
                                    shared.duplicate(r.boot_id, r.admin.as_deref());
                                }
                            } else if let Some(record) = record {
                                ingest(&shared, record);
                            } else if !put {
                                shared
                                    .peers
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .remove(id);
                            }
                        }
                    }
                }
                newest = newest.max(kv.mod_revision());
            }
            next = next.max(newest + 1);
            if resync {
                break;
            }
            if state_changed {
                adopt(&shared, &state, applied).await;
            }
        }
        // Another endpoint may serve the watch better; the full read decides.
        let i = shared.etcd.current();
        shared.etcd.rotate(i);
    }
}

/// The leader key as read: whose it is, and its term (create_revision) and lease.
#[derive(Debug, Clone)]
struct Holder {
    value: LeaderValue,
    term: i64,
    lease: i64,
}

impl Holder {
    fn of(kv: &etcd_client::KeyValue) -> Option<Holder> {
        serde_json::from_slice::<LeaderValue>(kv.value())
            .ok()
            .map(|value| Holder {
                value,
                term: kv.create_revision(),
                lease: kv.lease(),
            })
    }
}

fn set_leader(shared: &Shared, leader: Option<Holder>) {
    let mine = shared.term.load(Ordering::Relaxed);
    match &leader {
        // This process's key on its live lease: it leads, even if the campaign's answer
        // was lost (a txn that timed out here may still have committed there; without
        // this the key would stay, renewed, with nobody acting on it).
        Some(h)
            if h.value.instance == shared.cfg.instance
                && h.value.boot_id == shared.boot_id
                && h.lease == shared.lease.load(Ordering::Relaxed) =>
        {
            shared.term.store(h.term, Ordering::Relaxed);
            shared.gauge("weir_fleet_leader", 1.0);
        }
        // No key, someone else's, or a newer term: this instance no longer leads.
        _ if mine != 0 => {
            shared.term.store(0, Ordering::Relaxed);
            shared.gauge("weir_fleet_leader", 0.0);
        }
        _ => {}
    }
    *shared.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader.map(|h| h.value.instance);
}

/// Put a state read from the store in force (on a blocking thread: the controller
/// writes its cache and may flush local reverts).
async fn adopt(shared: &Arc<Shared>, state: &State, revision: i64) {
    let Some(controller) = shared.controller() else {
        return;
    };
    let state = state.clone();
    // The store's cache records the applied revision (and its gauges) as it adopts.
    let changed =
        tokio::task::spawn_blocking(move || controller.adopt(&state, revision.max(0) as u64)).await;
    if let Ok(changed) = changed
        && !changed.is_empty()
    {
        tracing::info!(
            "fleet: applied revision {revision}: {} changed",
            changed.join(", ")
        );
    }
}

/// The fleet window of a pool, made on first use with the service's SLO's shape.
pub(super) fn fleet_window(shared: &Shared, service: &str, pool: &str) -> Option<Arc<Window>> {
    let key = (service.to_owned(), pool.to_owned());
    if let Some(w) = shared
        .windows
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
    {
        return Some(Arc::clone(w));
    }
    let slo = shared.controller()?.slo(service)?;
    let window = Arc::new(Window::new(slo.window, slo.interval));
    Some(Arc::clone(
        shared
            .windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(window),
    ))
}

/// Take a member's record: what grew since its previous one goes into the fleet
/// windows (its first record, or one from a new boot, only sets the starting point).
fn ingest(shared: &Shared, record: Record) {
    let config = Window::latency_config();
    let mut pools = HashMap::new();
    for p in &record.pools {
        let Ok(latency) = SparseHistogram::from_parts(config, p.index.clone(), p.count.clone())
        else {
            continue;
        };
        pools.insert(
            (p.service.clone(), p.pool.clone()),
            Totals {
                requests: p.requests,
                errors: p.errors,
                latency_us: latency,
            },
        );
    }
    // Locked in this order (changes, then peers) wherever both are held.
    let changed_at = shared
        .weights_changed_at
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut peers = shared.peers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(prev) = peers.get(&record.instance)
        && prev.boot_id == record.boot_id
    {
        for (key, now) in &pools {
            let Some(before) = prev.pools.get(key) else {
                continue;
            };
            // The peer began this stretch under weights that have changed since: its
            // traffic mixes the two settings, and stays out of the fleet window (as a
            // local window leaves out the slice open at a change). At most one
            // publishing interval of one peer's traffic.
            if changed_at
                .get(&key.0)
                .is_some_and(|&at| prev.applied_revision < at)
            {
                continue;
            }
            if now.requests < before.requests || now.errors < before.errors {
                continue;
            }
            let requests = now.requests - before.requests;
            if requests == 0 {
                continue;
            }
            let latency = now
                .latency_us
                .checked_sub(&before.latency_us)
                .unwrap_or_else(|_| SparseHistogram::with_config(&config));
            if let Some(w) = fleet_window(shared, &key.0, &key.1) {
                w.add(requests, now.errors - before.errors, &latency);
            }
        }
    }
    peers.insert(
        record.instance.clone(),
        Peer {
            boot_id: record.boot_id,
            applied_revision: record.applied_revision,
            admin: record.admin,
            version: record.version,
            pools,
            seen: Instant::now(),
        },
    );
    let live = peers
        .values()
        .filter(|p| p.seen.elapsed() < shared.cfg.publish_interval * 4)
        .count();
    drop(peers);
    shared.gauge("weir_fleet_members", live as f64);
}

/// Publish this instance's counters every `publish_interval`, and take them into the
/// fleet windows here at once (the same path as a peer's).
async fn publish(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.cfg.publish_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(controller) = shared.controller() else {
            return;
        };
        let mut pools = Vec::new();
        for service in controller.router().table().services() {
            // Only what the guard judges: a service with an SLO and a candidate taking
            // traffic (or a running rollout's preview). The rest would cost every
            // instance a watch event each interval for nothing.
            let snapshot = service.snapshot();
            let candidate_live = snapshot
                .slots()
                .iter()
                .any(|s| s.weight > 0 && s.name() != snapshot.baseline_name());
            let running = controller
                .service_control(&service.name)
                .rollout
                .is_some_and(|r| r.phase.is_running());
            if controller.slo(&service.name).is_none() || !(candidate_live || running) {
                continue;
            }
            for slot in snapshot.slots() {
                let totals = slot.pool.window().totals();
                let (_, index, count) = totals.latency_us.into_parts();
                pools.push(PoolTotals {
                    service: service.name.to_string(),
                    pool: slot.name().to_owned(),
                    requests: totals.requests,
                    errors: totals.errors,
                    index,
                    count,
                });
            }
        }
        let record = Record {
            instance: shared.cfg.instance.clone(),
            boot_id: shared.boot_id,
            admin: Some(controller.config().admin.listen.to_string()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            applied_revision: shared.applied.load(Ordering::Relaxed),
            pools,
        };
        ingest(&shared, record.clone());
        let lease = shared.lease.load(Ordering::Relaxed);
        if lease == 0 {
            continue;
        }
        let key = shared.key(&format!("members/{}", shared.cfg.instance));
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let put = shared
            .etcd
            .call(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await;
        match put {
            Ok(_) => {
                *shared.published.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            }
            Err(e) => tracing::debug!("fleet: cannot publish counters: {e}"),
        }
    }
}

/// Hold the session lease, campaign for the lead whenever nobody holds it, and do the
/// leader's chores.
async fn lease(shared: Arc<Shared>) {
    let ttl = shared.cfg.lease_ttl.as_secs().max(1) as i64;
    let interval = shared.cfg.lease_ttl / 3;
    loop {
        let granted = shared
            .etcd
            .call(|mut c| async move { c.lease_grant(ttl, None).await })
            .await;
        let id = match granted {
            Ok(g) => g.id(),
            Err(e) => {
                tracing::debug!("fleet: cannot get a lease: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        shared.lease.store(id, Ordering::Relaxed);
        let kept = shared
            .etcd
            .call(|mut c| async move { c.lease_keep_alive(id).await })
            .await;
        let (mut keeper, mut replies) = match kept {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!("fleet: cannot keep the lease alive: {e}");
                continue;
            }
        };
        let mut rounds: u64 = 0;
        loop {
            let sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            // A slow answer is not a lost lease: wait for it as long as the lease surely
            // lasts (acting already stops at the last answer's deadline).
            match tokio::time::timeout(shared.cfg.lease_ttl - interval, replies.message()).await {
                Ok(Ok(Some(reply))) if reply.ttl() > 0 => {
                    // etcd keeps the lease at least `ttl` from when it got the renewal;
                    // acting stops one renewal interval before that.
                    let until = sent + Duration::from_secs(reply.ttl() as u64) - interval;
                    *shared.leads_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
                }
                _ => break,
            }
            let leader = shared
                .leader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if shared.term.load(Ordering::Relaxed) == 0 && leader.is_none() {
                campaign(&shared, id).await;
            }
            rounds += 1;
            if shared.leads() && rounds % 60 == 1 {
                trim(&shared).await;
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shared.campaign.notified() => {}
            }
        }
        // The lease is gone or cannot be renewed: stand down at once.
        if shared.term.swap(0, Ordering::Relaxed) != 0 {
            tracing::warn!("fleet: lost the session lease; no longer leading");
        }
        shared.gauge("weir_fleet_leader", 0.0);
        *shared.leads_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        shared.lease.store(0, Ordering::Relaxed);
    }
}

async fn campaign(shared: &Arc<Shared>, lease: i64) {
    let key = shared.key("leader");
    let value = serde_json::to_vec(&LeaderValue {
        instance: shared.cfg.instance.clone(),
        boot_id: shared.boot_id,
    })
    .unwrap_or_default();
    let won = shared
        .etcd
        .call(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(
                        key.clone(),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else(vec![TxnOp::get(key, None)]);
                c.txn(txn).await
            }
        })
        .await;
    match won {
        Ok(r) if r.succeeded() => {
            let term = r.header().map_or(0, |h| h.revision());
            let value = LeaderValue {
                instance: shared.cfg.instance.clone(),
                boot_id: shared.boot_id,
            };
            set_leader(shared, Some(Holder { value, term, lease }));
            tracing::warn!("fleet: this instance leads the fleet (term {term})");
        }
        Ok(r) => {
            for op in r.op_responses() {
                if let TxnOpResponse::Get(get) = op
                    && let Some(kv) = get.kvs().first()
                {
                    set_leader(shared, Holder::of(kv));
                }
            }
        }
        Err(e) => tracing::debug!("fleet: campaign failed: {e}"),
    }
}

/// Drop journal entries older than the newest [`JOURNAL_KEEP`] (leader only).
async fn trim(shared: &Arc<Shared>) {
    let seq = shared.journal.lock().unwrap_or_else(|p| p.into_inner()).0;
    if seq <= JOURNAL_KEEP {
        return;
    }
    let (from, to) = (
        journal_key(shared, 0),
        journal_key(shared, seq - JOURNAL_KEEP),
    );
    let term = shared.term.load(Ordering::Relaxed);
    let leader = shared.key("leader");
    let _ = shared
        .etcd
        .call(|mut c| {
            let (from, to, leader) = (from.clone(), to.clone(), leader.clone());
            async move {
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        leader,
                        CompareOp::Equal,
                        term,
                    )])
                    .and_then(vec![TxnOp::delete(
                        from,
                        Some(DeleteOptions::new().with_range(to)),
                    )]);
                c.txn(txn).await
            }
        })
        .await;
}

/// An operator's decision after a mismatch: make this instance's state the fleet's, in
/// a new store (new id), and follow it.
pub(super) fn reseed(shared: &Arc<Shared>, actor: Option<String>) -> Result<(), String> {
    let s = Arc::clone(shared);
    shared
        .block_on(async move { seed(&s, true).await })
        .map_err(|e| e.to_string())?;
    set_mismatch(shared, None);
    if let Some(controller) = shared.controller() {
        controller.forget_applied();
        let mut e = Event::new("", EventKind::StoreReseeded, Source::Admin);
        e.actor = actor;
        e.reason = Some(format!(
            "the fleet's store was re-seeded from {}'s state",
            shared.cfg.instance
        ));
        let _ = controller.record(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::control::controller::Controller;
    use crate::control::store::StateLock;
    use crate::control::store::tests::TempDir;
    use crate::telemetry::metrics::Metrics;

    const CONFIG: &str = r#"
[fleet]
endpoints = ["http://127.0.0.1:9"]
name = "unit"
instance = "here"
[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:1"]
weight = 90
[service.pools.canary]
endpoints = ["127.0.0.1:2"]
weight = 10
[service.slo]
window = "30s"
interval = "1s"
max_error_rate = 0.05
"#;

    /// A peer's record with `requests` so far on the canary, at `revision`.
    fn record(requests: u64, revision: i64) -> Record {
        let latency = Window::new(Duration::from_secs(1), Duration::from_secs(1));
        for _ in 0..requests {
            latency.record(false, Duration::from_millis(5));
        }
        let (_, index, count) = latency.totals().latency_us.into_parts();
        Record {
            instance: "peer".into(),
            boot_id: 7,
            admin: None,
            version: "test".into(),
            applied_revision: revision,
            pools: vec![PoolTotals {
                service: "shop".into(),
                pool: "canary".into(),
                requests,
                errors: 0,
                index,
                count,
            }],
        }
    }

    #[test]
    fn counters_that_straddle_a_weights_change_stay_out_of_the_fleet_window() {
        let dir = TempDir::new("fleet-ingest");
        let config = Config::parse(CONFIG, "unit.toml").unwrap();
        let metrics = Metrics::new();
        let lock = StateLock::acquire(dir.path()).unwrap();
        let (fleet, _store) = super::super::Fleet::connect(
            config.fleet.as_ref().unwrap(),
            lock,
            Arc::clone(&metrics),
        )
        .unwrap();
        let controller = Arc::new(Controller::in_memory(&config, metrics));
        let shared = &fleet.shared;
        let _ = shared.controller.set(Arc::downgrade(&controller));
        let counted = || fleet_window(shared, "shop", "canary").unwrap().total();

        ingest(shared, record(100, 5)); // the starting point: nothing counted
        assert_eq!(counted(), 0);
        ingest(shared, record(110, 5));
        assert_eq!(counted(), 10);
        // The weights change at revision 7.
        shared
            .weights_changed_at
            .lock()
            .unwrap()
            .insert("shop".into(), 7);
        ingest(shared, record(130, 6)); // began under the old weights: left out
        ingest(shared, record(150, 7)); // began at 6, before the change: left out
        assert_eq!(counted(), 10);
        ingest(shared, record(155, 7)); // wholly under the new weights
        assert_eq!(counted(), 15);
        // A new boot starts a new series: its first record is only a starting point.
        let mut reboot = record(3, 8);
        reboot.boot_id = 8;
        ingest(shared, reboot);
        assert_eq!(counted(), 15);
        fleet.stop();
    }
}
