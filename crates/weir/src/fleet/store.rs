//! The controller's store on etcd: one key per service, a `head` key every state change
//! rewrites (its mod_revision is the state's revision), and the journal, all changed by
//! one transaction per change. The local state file stays as a cache of the last state
//! applied, for a start while etcd is down.
//!
//! Keys, under `/weir/v1/<fleet>/`:
//! - `state/schema`: `{"schema":1,"store_id":…}`, written once when the fleet is seeded;
//! - `state/head`: `{"store_id","at","by"}`, rewritten by every state change;
//! - `state/services/<name>`: the service's [`ServiceState`] (as the state file has it);
//! - `journal/seq`: `{"seq":N}`, the newest event's id; `journal/<id:020>`: the event;
//! - `leader`: `{"instance","boot_id"}` under the leader's lease;
//! - `members/<instance>`: the instance's record and counters, under its lease.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use etcd_client::{
    Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use super::Shared;
use crate::control::store::{
    Event, EventLog, Revision, ServiceState, State, StateError, StateLock, StateStore, Store,
};
use crate::model::{Source, timestamp};

/// The layout's version, in `state/schema`.
pub(crate) const SCHEMA: u64 = 1;
/// Highest ops one etcd txn may hold (etcd's default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Schema {
    pub(crate) schema: u64,
    pub(crate) store_id: String,
    #[serde(default)]
    pub(crate) created_at: String,
    #[serde(default)]
    pub(crate) created_by: String,
    /// The store an operator's re-seed replaced: instances that followed that one
    /// follow this one (the decision was made once, for the whole fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) replaces: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Head {
    pub(crate) store_id: String,
    #[serde(default)]
    pub(crate) at: String,
    #[serde(default)]
    pub(crate) by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Seq {
    pub(crate) seq: u64,
}

pub(crate) fn journal_key(shared: &Shared, id: u64) -> String {
    shared.key(&format!("journal/{id:020}"))
}

/// The controller's [`Store`] in fleet mode.
#[derive(Debug)]
pub(crate) struct EtcdStore {
    shared: Arc<Shared>,
    /// The state as the store has it at `revision`: a commit writes only what differs.
    remote: State,
    revision: Revision,
    cache: Option<StateStore>,
    /// The state directory's lock, held for as long as the store lives.
    _lock: StateLock,
}

impl EtcdStore {
    pub(super) fn new(shared: Arc<Shared>, lock: StateLock) -> EtcdStore {
        let cache = StateStore::open(lock.dir()).ok();
        // For the message of a second weir refused this directory.
        if let Err(e) = lock.record_pid() {
            tracing::warn!("{e}");
        }
        EtcdStore {
            shared,
            remote: State::default(),
            revision: 0,
            cache,
            _lock: lock,
        }
    }

    /// Refuse early what cannot work: a store this instance does not follow, or one
    /// known to be out of reach (so that a guard tick or an admin call fails at once
    /// instead of waiting for the timeout).
    fn writable(&self) -> Result<String, StateError> {
        if let Some(m) = self
            .shared
            .mismatch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(StateError::Unavailable(m));
        }
        if !self.shared.etcd.reachable() {
            return Err(StateError::Unavailable(
                "the fleet's store (etcd) is unreachable".into(),
            ));
        }
        if self.revision == 0 {
            return Err(StateError::Unavailable(
                "this instance has not caught up with the fleet's store yet".into(),
            ));
        }
        self.shared
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .store_id
            .clone()
            .ok_or_else(|| StateError::Unavailable("the fleet's store is not seeded yet".into()))
    }

    /// Puts for every service of `state` the store has otherwise (or not at all).
    fn changed(&self, state: &State) -> Result<Vec<TxnOp>, StateError> {
        let mut ops = Vec::new();
        for (name, service) in &state.services {
            if self.remote.services.get(name) != Some(service) {
                let value = serde_json::to_vec(service).map_err(|error| StateError::Encode {
                    path: "etcd".into(),
                    error,
                })?;
                ops.push(TxnOp::put(
                    self.shared.key(&format!("state/services/{name}")),
                    value,
                    None,
                ));
            }
        }
        if ops.len() + 4 > MAX_TXN_OPS {
            return Err(StateError::Unavailable(format!(
                "{} services changed at once; one etcd transaction holds at most {}",
                ops.len(),
                MAX_TXN_OPS - 4
            )));
        }
        Ok(ops)
    }

    /// One transaction: the changed services, the head (when the state changed) and
    /// the journal entry, if `expected` still holds and the journal is where this
    /// instance last saw it. A journal that moved (another instance recorded an event)
    /// is read again and the transaction retried; a state that moved is a conflict.
    fn transact(
        &mut self,
        expected: Option<Revision>,
        state: Option<&State>,
        event: Option<Event>,
    ) -> Result<(Revision, Option<Event>), StateError> {
        let store_id = self.writable()?;
        let services = match state {
            Some(s) => self.changed(s)?,
            None => Vec::new(),
        };
        let instance = self.shared.cfg.instance.clone();
        let fenced = event.as_ref().is_some_and(|e| e.source == Source::Rollout);
        let term = self.shared.term.load(Ordering::Relaxed);
        if fenced && (term == 0 || !self.shared.leads()) {
            return Err(StateError::Unavailable(
                "this instance does not lead the fleet: only the leader advances rollouts".into(),
            ));
        }
        for _ in 0..8 {
            let (seq, seq_rev) = *self
                .shared
                .journal
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut compares = Vec::new();
            if let Some(expected) = expected {
                compares.push(Compare::mod_revision(
                    self.shared.key("state/head"),
                    CompareOp::Equal,
                    expected as i64,
                ));
            }
            let mut ops = services.clone();
            let now = timestamp(self.shared.now());
            if state.is_some() {
                let head = Head {
                    store_id: store_id.clone(),
                    at: now.clone(),
                    by: instance.clone(),
                };
                ops.push(TxnOp::put(
                    self.shared.key("state/head"),
                    serde_json::to_vec(&head).unwrap_or_default(),
                    None,
                ));
            }
            let mut written = None;
            if let Some(e) = &event {
                compares.push(Compare::mod_revision(
                    self.shared.key("journal/seq"),
                    CompareOp::Equal,
                    seq_rev,
                ));
                let mut e = e.clone();
                e.id = seq + 1;
                if e.time.is_empty() {
                    e.time = now.clone();
                }
                e.instance = Some(instance.clone());
                ops.push(TxnOp::put(
                    journal_key(&self.shared, e.id),
                    serde_json::to_vec(&e).unwrap_or_default(),
                    None,
                ));
                ops.push(TxnOp::put(
                    self.shared.key("journal/seq"),
                    serde_json::to_vec(&Seq { seq: e.id }).unwrap_or_default(),
                    None,
                ));
                written = Some(e);
            }
            if fenced {
                compares.push(Compare::create_revision(
                    self.shared.key("leader"),
                    CompareOp::Equal,
                    term,
                ));
            }
            let txn = Txn::new().when(compares).and_then(ops).or_else(vec![
                TxnOp::get(self.shared.key("state/head"), None),
                TxnOp::get(self.shared.key("journal/seq"), None),
                TxnOp::get(self.shared.key("leader"), None),
            ]);
            let s = Arc::clone(&self.shared);
            let response = self.shared.block_on(async move {
                s.etcd
                    .call(|mut c| {
                        let txn = txn.clone();
                        async move { c.txn(txn).await }
                    })
                    .await
            })?;
            let revision = response.header().map_or(0, |h| h.revision());
            let state_revision = revision.max(0) as Revision;
            if response.succeeded() {
                if let Some(e) = &written {
                    let mut j = self
                        .shared
                        .journal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if j.0 < e.id {
                        *j = (e.id, revision);
                    }
                }
                if let Some(state) = state {
                    self.shared
                        .note_weight_changes(&self.remote, state, state_revision as i64);
                    self.remote = state.clone();
                    self.revision = state_revision;
                    self.cache(state_revision);
                }
                return Ok((self.revision, written));
            }
            // Which compare failed: read what the else branch returned.
            let mut head_rev = 0;
            let mut new_seq = None;
            let mut leader_rev = 0;
            for (i, op) in response.op_responses().into_iter().enumerate() {
                if let TxnOpResponse::Get(get) = op {
                    let kv = get.kvs().first();
                    match i {
                        0 => head_rev = kv.map_or(0, |kv| kv.mod_revision()),
                        1 => {
                            new_seq = kv.map(|kv| {
                                let seq =
                                    serde_json::from_slice::<Seq>(kv.value()).map_or(0, |s| s.seq);
                                (seq, kv.mod_revision())
                            });
                        }
                        _ => leader_rev = kv.map_or(0, |kv| kv.create_revision()),
                    }
                }
            }
            if let Some(expected) = expected
                && head_rev != expected as i64
            {
                return Err(StateError::Conflict {
                    expected,
                    current: head_rev.max(0) as Revision,
                });
            }
            if fenced && leader_rev != term {
                self.shared.term.store(0, Ordering::Relaxed);
                return Err(StateError::Unavailable(
                    "this instance no longer leads the fleet; the new leader continues".into(),
                ));
            }
            if let Some(seen) = new_seq {
                let mut j = self
                    .shared
                    .journal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if j.1 != seen.1 {
                    *j = seen;
                }
            }
        }
        Err(StateError::Unavailable(
            "the fleet's journal kept moving; try again".into(),
        ))
    }

    /// Keep the local cache in step with what is applied.
    fn cache(&self, revision: Revision) {
        if let Some(cache) = &self.cache
            && let Err(e) = cache.save(&self.remote)
        {
            tracing::warn!("fleet: cannot write the local cache of the state: {e}");
        }
        self.shared.set_applied(revision as i64);
        self.shared.remember(|r| r.revision = revision as i64);
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<(Option<State>, Revision), StateError> {
        let s = Arc::clone(&self.shared);
        let prefix = self.shared.key("state/services/");
        let head = self.shared.key("state/head");
        let (state, revision) = self.shared.block_on(async move {
            s.etcd
                .call(|mut c| {
                    let (prefix, head) = (prefix.clone(), head.clone());
                    async move {
                        let txn = Txn::new().and_then(vec![
                            TxnOp::get(prefix.clone(), Some(GetOptions::new().with_prefix())),
                            TxnOp::get(head, None),
                        ]);
                        let r = c.txn(txn).await?;
                        let mut state = State::default();
                        let mut revision = 0;
                        for (i, op) in r.op_responses().into_iter().enumerate() {
                            if let TxnOpResponse::Get(get) = op {
                                for kv in get.kvs() {
                                    if i == 0 {
                                        let name =
                                            kv.key_str().unwrap_or("").trim_start_matches(&prefix);
                                        if let Ok(service) =
                                            serde_json::from_slice::<ServiceState>(kv.value())
                                        {
                                            state.services.insert(name.to_owned(), service);
                                        }
                                    } else {
                                        revision = kv.mod_revision();
                                    }
                                }
                            }
                        }
                        Ok((state, revision))
                    }
                })
                .await
        })?;
        Ok((Some(state), revision.max(0) as Revision))
    }

    fn revision(&self) -> Revision {
        self.revision
    }

    fn commit(
        &mut self,
        expected: Revision,
        state: &State,
        event: Event,
    ) -> Result<(Revision, Event), StateError> {
        let (revision, event) = self.transact(Some(expected), Some(state), Some(event))?;
        Ok((revision, event.ok_or_else(not_written)?))
    }

    fn save(&mut self, state: &State) -> Result<Revision, StateError> {
        if self.changed(state)?.is_empty() {
            return Ok(self.revision);
        }
        let expected = self.revision;
        let (revision, _) = self.transact(Some(expected), Some(state), None)?;
        Ok(revision)
    }

    fn record(&mut self, event: Event) -> Result<Event, StateError> {
        // A record changes no state: another instance's change is no reason to refuse it.
        let (_, event) = self.transact(None, None, Some(event))?;
        event.ok_or_else(not_written)
    }

    fn events(&self) -> Arc<dyn EventLog> {
        Arc::new(EtcdEventLog {
            shared: Arc::clone(&self.shared),
        })
    }

    fn adopted(&mut self, state: &State, revision: Revision) {
        self.shared
            .note_weight_changes(&self.remote, state, revision as i64);
        self.remote = state.clone();
        // Services this instance has and the store does not are written by the next
        // save; the cache keeps only what the store has.
        self.revision = revision;
        self.cache(revision);
    }
}

fn not_written() -> StateError {
    StateError::Unavailable("the journal entry was not written".into())
}

/// The journal's read side on etcd: reads from the store (serializable, answered by
/// the member this instance talks to).
#[derive(Debug)]
pub(crate) struct EtcdEventLog {
    shared: Arc<Shared>,
}

impl EtcdEventLog {
    fn range(&self, from: u64, limit: usize, newest_first: bool) -> Result<Vec<Event>, StateError> {
        let start = journal_key(&self.shared, from);
        // Ids are 20 digits: `:` sorts right after `9` and before `seq`.
        let end = self.shared.key("journal/:");
        let s = Arc::clone(&self.shared);
        let events = self.shared.block_on(async move {
            s.etcd
                .call(|mut c| {
                    let (start, end) = (start.clone(), end.clone());
                    async move {
                        let mut options = GetOptions::new()
                            .with_range(end)
                            .with_limit(limit as i64)
                            .with_serializable();
                        if newest_first {
                            options = options.with_sort(SortTarget::Key, SortOrder::Descend);
                        }
                        let r = c.get(start, Some(options)).await?;
                        Ok(r.kvs()
                            .iter()
                            .filter_map(|kv| serde_json::from_slice::<Event>(kv.value()).ok())
                            .collect::<Vec<_>>())
                    }
                })
                .await
        })?;
        Ok(events)
    }
}

impl EventLog for EtcdEventLog {
    fn last_id(&self) -> u64 {
        self.shared
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    fn since(&self, since: u64, limit: usize) -> Result<Vec<Event>, StateError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.range(since + 1, limit, false)
    }

    fn newest(&self, n: usize) -> Result<Vec<Event>, StateError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut events = self.range(0, n, true)?;
        events.reverse();
        Ok(events)
    }
}
