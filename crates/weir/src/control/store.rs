//! Crash-safe persistence for the controller: the routing state file (`state.json`) and
//! the append-only event journal (`events.jsonl`), both in the configured `[state] dir`.
//!
//! The controller is the only writer and calls in here under its own lock, a few times per
//! weight change, so this is plain blocking `std::fs`: simpler to reason about for crash
//! safety than async I/O, and never on the request path. Every write returns only once it
//! is durable (fsynced), because an admin call may answer 200 only after that.
//!
//! The controller sees all of it through the [`Store`] trait: apply a change atomically
//! with its journal entry (compare-and-swap on a revision), load, read events, and watch
//! for changes made elsewhere. [`FileStore`] is the local, crash-safe implementation; a
//! shared store (etcd, for a fleet) fits behind the same trait.
//!
//! The state file carries a `format` number; every format weir ever wrote stays loadable
//! (a fixture test proves it), and writing always uses the current one.

use crate::control::rollout::Rollout;
use crate::model::{Clock, EventKind, timestamp};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::model::Source;

/// The state file format this weir writes. Bump it (and keep a loader for the old one,
/// with a fixture) whenever the file's shape changes incompatibly.
pub(crate) const STATE_FORMAT: u64 = 2;
/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the current journal file inside the state directory; rotated ones are
/// `events.1.jsonl` (newest) to `events.<keep_files>.jsonl` (oldest).
pub(crate) const JOURNAL_FILE: &str = "events.jsonl";

/// Name of the lock file inside the state directory; it holds the owner's pid.
pub(crate) const LOCK_FILE: &str = "lock";

/// Prefix of the temp file a save writes; the writer's pid follows, so that even a writer
/// that somehow runs without the lock never shares a half-written file with another.
const STATE_TMP: &str = "state.json.tmp";
/// A rotation writes the first line of the next file here before any rename, so that at
/// every crash point some file still holds the newest acknowledged id.
const JOURNAL_NEXT: &str = "events.jsonl.next";

/// Ordered pool → weight (pool order = config order); serialises as a JSON object.
pub type Weights = indexmap::IndexMap<String, u32>;

/// What is persisted about one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub version: u64,
    pub weights: Weights,
    /// RFC 3339 with milliseconds, see [`timestamp`].
    pub updated_at: String,
    pub updated_by: Source,
    /// What the control plane keeps besides weights, as the file has it: decoded
    /// (strictly, per field) by [`ServiceState::control`], so that a value this weir
    /// cannot read stops the start naming the service and the field, instead of failing
    /// the whole file or being dropped. Absent → Null.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl ServiceState {
    /// The saved baseline, degraded mark and rollout, or what is wrong with them.
    pub fn control(&self) -> Result<SavedControl, String> {
        let field = |name: &str| match &self.extra {
            serde_json::Value::Object(map) => map.get(name).cloned(),
            _ => None,
        };
        // A text field: absent or null is none; anything else but a string is named.
        let text = |name: &str, what: &str, should_be: &str| -> Result<Option<String>, String> {
            match field(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(format!("saved {what} {other} is not {should_be}")),
            }
        };
        match &self.extra {
            serde_json::Value::Null | serde_json::Value::Object(_) => {}
            other => return Err(format!("saved extension data {other} is not an object")),
        }
        // A structured field: absent or null is its default.
        fn decode<T: serde::de::DeserializeOwned + Default>(
            value: Option<serde_json::Value>,
            what: &str,
        ) -> Result<T, String> {
            match value {
                None | Some(serde_json::Value::Null) => Ok(T::default()),
                Some(saved) => serde_json::from_value(saved)
                    .map_err(|e| format!("saved {what} cannot be read by this weir ({e})")),
            }
        }
        Ok(SavedControl {
            baseline: text("baseline", "baseline", "a pool name")?,
            degraded: text("degraded", "`degraded`", "a text")?,
            rollout: decode(field("rollout"), "rollout")?,
            deployed: decode(field("deployed"), "released endpoints (`deployed`)")?,
            releases: decode(field("releases"), "release history (`releases`)")?,
        })
    }

    /// Store `control` as the file's extension data.
    pub fn set_control(&mut self, control: &SavedControl) {
        self.extra = if control.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::to_value(control).unwrap_or_default()
        };
    }
}

/// A service's saved baseline, degraded mark and rollout.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SavedControl {
    /// The baseline, when a promotion moved it away from the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Pools whose endpoints and version a release set, overriding the config's.
    /// Absent in files from before releases: every pool as the config has it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deployed: BTreeMap<String, Deployed>,
    /// The service's releases, oldest first, at most [`MAX_RELEASES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<Release>,
}

/// How many releases a service's history keeps; the oldest go first. Revision numbers
/// keep counting, so `--to-revision` never names a different release than it did.
pub(crate) const MAX_RELEASES: usize = 50;

/// What a release put on a pool, in place of the config's endpoints and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// `None` for a pool put back on endpoints that had no label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub endpoints: Vec<String>,
}

/// How a release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    Promoted,
    /// The SLO guard reverted it (the reason says which check).
    Degraded,
    Aborted,
    /// A newer release replaced it while its rollout ran.
    Superseded,
    /// A release this weir does not know how to describe (written by a newer one).
    #[serde(other)]
    Unknown,
}

impl ReleaseOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseOutcome::Promoted => "promoted",
            ReleaseOutcome::Degraded => "degraded",
            ReleaseOutcome::Aborted => "aborted",
            ReleaseOutcome::Superseded => "superseded",
            ReleaseOutcome::Unknown => "unknown",
        }
    }
}

/// One entry of a service's release history: a release, or an undo (which names the
/// revision it went back to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// 1, 2, 3, … per service.
    pub revision: u64,
    /// `None` for revision 1 when the pool serving before the first release had no
    /// version label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub pool: String,
    pub endpoints: Vec<String>,
    /// The weights in force when it started.
    pub weights: Weights,
    /// RFC 3339, see [`timestamp`].
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// `None` while its rollout runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ReleaseOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// For an undo: the revision whose endpoints and version it put back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_to: Option<u64>,
}

impl SavedControl {
    pub fn is_empty(&self) -> bool {
        *self == SavedControl::default()
    }
}

/// Everything in the state file. Semantic checks (do these pools exist, is some weight
/// above zero) are the controller's: the file may predate a config change.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    pub services: BTreeMap<String, ServiceState>,
}

/// Why reading or writing the state directory failed. Every message names the file, so
/// that an operator can act on it from a log line alone.
///
/// The underlying error is part of the message rather than `source()`: these messages are
/// shown as-is by the admin API and in logs, and `anyhow`'s `{:#}` would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("state file {} is corrupt: {error}", path.display())]
    Corrupt {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error(
        "state file {} has format {found}, but this weir only knows formats up to {STATE_FORMAT}: \
         it was written by a newer weir, and this weir is too old to read it; upgrade weir",
        path.display()
    )]
    TooNew { path: PathBuf, found: u64 },
    #[error("state file {} is invalid: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot encode data for {}: {error}", path.display())]
    Encode {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error(
        "state directory {} is in use by another weir (pid {holder}, lock file {}): \
         stop that one first, or give this one its own [state] dir",
        dir.display(),
        dir.join(LOCK_FILE).display()
    )]
    Locked { dir: PathBuf, holder: String },
    /// A shared store (etcd, for a fleet) did not answer in time or has no quorum.
    #[error("{0}")]
    Unavailable(String),
    /// A compare-and-swap found the store at another revision than the writer read: a
    /// change was made meanwhile (by another writer, for a shared store).
    #[error("the stored state is at revision {current}, not {expected}: it changed meanwhile")]
    Conflict {
        expected: Revision,
        current: Revision,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    move |error| StateError::Io {
        action,
        path: path.to_path_buf(),
        error,
    }
}

/// A rename or a newly created file is only durable once its directory entry is, which
/// takes an fsync of the directory itself.
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))?;
    // Elsewhere a directory cannot be opened like this; weir's targets are unix.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<(), StateError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Exclusive ownership of one state directory by this process: an OS lock (`flock`) on
/// `<dir>/lock`, released by the kernel when the process exits however it exits, so a
/// crash never leaves a stale lock behind. The file's content (the owner's pid) is only
/// for the error message of whoever is refused.
///
/// Clones share one lock: within a process the lock is taken once per directory and
/// handed out again (a library user, or a test restarting weir in-process, may still hold
/// the previous instance for a moment), since OS locks do not nest within one process.
#[derive(Debug, Clone)]
pub struct StateLock(Arc<HeldLock>);

/// The OS lock goes with the file descriptor, when the last clone is dropped.
#[derive(Debug)]
struct HeldLock {
    dir: PathBuf,
    file: File,
}

/// The directories this process holds, by canonical path.
fn held_locks() -> MutexGuard<'static, BTreeMap<PathBuf, std::sync::Weak<HeldLock>>> {
    static HELD: Mutex<BTreeMap<PathBuf, std::sync::Weak<HeldLock>>> = Mutex::new(BTreeMap::new());
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

impl StateLock {
    /// Take `dir` (created if missing) for this process, before anything in it is read or
    /// written. Another process holding it is an error naming that process's pid. Writes
    /// nothing but an empty lock file the first time.
    pub fn acquire(dir: &Path) -> Result<StateLock, StateError> {
        fs::create_dir_all(dir).map_err(io_error("create state directory", dir))?;
        let key = fs::canonicalize(dir).map_err(io_error("resolve", dir))?;
        // This process's own previous lock may be between its last clone's drop and the
        // close of its descriptor: wait that moment out rather than refuse ourselves.
        let mut tries = 0;
        loop {
            let mut held = held_locks();
            if let Some(lock) = held.get(&key).and_then(std::sync::Weak::upgrade) {
                return Ok(StateLock(lock));
            }
            let ours_closing = held.remove(&key).is_some();
            match StateLock::take(dir) {
                Err(StateError::Locked { .. }) if ours_closing && tries < 100 => {
                    tries += 1;
                    held.insert(key.clone(), std::sync::Weak::new());
                    drop(held);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Ok(lock) => {
                    let lock = Arc::new(lock);
                    held.insert(key, Arc::downgrade(&lock));
                    return Ok(StateLock(lock));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The OS lock itself.
    fn take(dir: &Path) -> Result<HeldLock, StateError> {
        let path = dir.join(LOCK_FILE);
        // Not truncated on open: until we hold the lock, the pid in it is the holder's.
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
        {
            Ok(f) => f,
            // A read-only directory still has the lock file from earlier runs, and a
            // lock can be taken through a read-only descriptor: weir then serves the
            // saved state and refuses changes until the disk takes writes again.
            Err(e) if path.exists() => File::open(&path).map_err(|_| io_error("open", &path)(e))?,
            Err(e) => return Err(io_error("create", &path)(e)),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let pid = fs::read_to_string(&path).unwrap_or_default();
                let pid = pid.trim();
                return Err(StateError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if pid.is_empty() {
                        "not recorded yet: it is still starting".to_owned()
                    } else {
                        pid.to_owned()
                    },
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error("lock", &path)(e)),
        }
        Ok(HeldLock {
            dir: dir.to_path_buf(),
            file,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Write this process's pid into the lock file, for the message of the next weir that
    /// is refused. Called once start-up has passed every check, so that a start that
    /// fails writes nothing.
    pub fn record_pid(&self) -> Result<(), StateError> {
        use std::io::{Seek, SeekFrom};
        let path = self.0.dir.join(LOCK_FILE);
        let mut file = &self.0.file;
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.sync_data())
            .map_err(io_error("write", &path))
    }
}

/// Move the state file aside as `state.json.discarded-<UTC time>`, so that the next start
/// uses the config's weights; nothing is deleted. Needs the directory's lock, so it
/// cannot pull the file from under a running weir. `None` when there is no state file.
pub fn discard(lock: &StateLock, now: SystemTime) -> Result<Option<PathBuf>, StateError> {
    let dir = lock.dir();
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let mut aside = dir.join(format!("{STATE_FILE}.discarded-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = dir.join(format!("{STATE_FILE}.discarded-{stamp}-{n}"));
    }
    fs::rename(&path, &aside).map_err(io_error("move aside", &path))?;
    sync_dir(dir)?;
    Ok(Some(aside))
}

/// Only the format number, read first to pick the loader.
#[derive(Deserialize)]
struct FormatProbe {
    format: u64,
}

/// Format 2 (current) as written.
#[derive(Serialize)]
struct StateFileV2Out<'a> {
    format: u64,
    services: &'a BTreeMap<String, ServiceState>,
}

/// Format 2 (current) as read.
#[derive(Deserialize)]
struct StateFileV2 {
    services: BTreeMap<String, ServiceState>,
}

/// Format 1: weights and versions only, no timestamps or sources.
#[derive(Deserialize)]
struct StateFileV1 {
    weights: BTreeMap<String, Weights>,
    versions: BTreeMap<String, u64>,
}

/// The state file in one directory.
///
/// Not internally locked: concurrent `save`s would share the temp file, so the controller
/// (the single writer) serialises them under its own lock.
#[derive(Debug)]
pub(crate) struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Create the directory (and parents) if missing; error names the path.
    pub(crate) fn open(dir: &Path) -> Result<StateStore, StateError> {
        fs::create_dir_all(dir).map_err(io_error("create state directory", dir))?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The store of `dir` without creating it, for reading only (`weir check`).
    pub(crate) fn at(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_path_buf(),
        }
    }

    /// Path of the state file.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// `None` when no state file exists yet. Reads every format weir ever wrote.
    ///
    /// A leftover `state.json.tmp.<pid>` is ignored: it is a save that never completed,
    /// so it was never acknowledged ([`StateStore::remove_stale_temps`] clears it).
    pub(crate) fn load(&self) -> Result<Option<State>, StateError> {
        let path = self.path();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_error("read", &path))?;
        let corrupt = |error| StateError::Corrupt {
            path: path.clone(),
            error,
        };
        let probe: FormatProbe = serde_json::from_slice(&bytes).map_err(corrupt)?;
        let services = match probe.format {
            1 => {
                let v1: StateFileV1 = serde_json::from_slice(&bytes).map_err(corrupt)?;
                // Format 1 did not record when or by whom; the file's own mtime is the
                // best "when", and the change is attributed to this start-up.
                let mtime = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .map_err(io_error("read modification time of", &path))?;
                let updated_at = timestamp(mtime);
                let mut services = BTreeMap::new();
                for (name, weights) in v1.weights {
                    let Some(&version) = v1.versions.get(&name) else {
                        return Err(StateError::Invalid {
                            path,
                            reason: format!("service `{name}` has weights but no version"),
                        });
                    };
                    let service = ServiceState {
                        version,
                        weights,
                        updated_at: updated_at.clone(),
                        updated_by: Source::Startup,
                        extra: serde_json::Value::Null,
                    };
                    services.insert(name, service);
                }
                services
            }
            2 => {
                let v2: StateFileV2 = serde_json::from_slice(&bytes).map_err(corrupt)?;
                v2.services
            }
            found if found > STATE_FORMAT => return Err(StateError::TooNew { path, found }),
            found => {
                return Err(StateError::Invalid {
                    path,
                    reason: format!("unknown format {found}"),
                });
            }
        };
        Ok(Some(State { services }))
    }

    /// The temp file this process's saves go through.
    fn tmp_path(&self) -> PathBuf {
        self.dir.join(format!("{STATE_TMP}.{}", std::process::id()))
    }

    /// Best effort: remove temp files of saves that never completed (their writers died).
    /// Only for the lock holder, once start-up has passed its checks.
    pub(crate) fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = format!("{STATE_TMP}.");
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(&prefix))
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Durable replace: write `state.json.tmp.<pid>` → fsync it → rename over `state.json` →
    /// fsync the directory. A crash at any point leaves either the old or the new file
    /// whole, never a mix; once this returns, the new one survives power loss.
    pub(crate) fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.tmp_path();
        let out = StateFileV2Out {
            format: STATE_FORMAT,
            services: &state.services,
        };
        // Pretty: operators read and diff this file when something went wrong.
        let mut bytes = serde_json::to_vec_pretty(&out).map_err(|error| StateError::Encode {
            path: path.clone(),
            error,
        })?;
        bytes.push(b'\n');

        replace_file(&self.dir, &tmp, &path, &bytes)
    }
}

/// Replace `path` (in `dir`) with `bytes` so that a crash leaves either the old file or
/// the new one, whole: write `tmp`, fsync it, rename it over `path`, fsync the
/// directory. Returns once the new file is durable.
pub(crate) fn replace_file(
    dir: &Path,
    tmp: &Path,
    path: &Path,
    bytes: &[u8],
) -> Result<(), StateError> {
    let written = File::create(tmp)
        .map_err(io_error("create", tmp))
        .and_then(|mut f| {
            f.write_all(bytes).map_err(io_error("write", tmp))?;
            f.sync_all().map_err(io_error("fsync", tmp))
        })
        .and_then(|()| fs::rename(tmp, path).map_err(io_error("replace", path)));
    if let Err(e) = written {
        // Best effort: a stale temp file is harmless, the next save truncates it.
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// One entry of the audit journal: every change to routing, and the notable refusals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Assigned by [`Journal::append`]; increasing across restarts and rotations.
    pub id: u64,
    /// RFC 3339 with milliseconds; set by [`Journal::append`] when empty.
    pub time: String,
    /// `""` for global events such as a config reload.
    pub service: String,
    /// `weights_changed`, `rolled_back`, `config_reloaded`, `config_rejected`,
    /// `state_restored`, ...
    pub kind: EventKind,
    pub source: Source,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Weights>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Weights>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Structured figures (guard decisions etc.).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// Fleet mode: the instance that made the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl Event {
    /// An event with id 0 and no time (both filled in by [`Journal::append`]) and every
    /// optional part empty.
    pub fn new(service: impl Into<String>, kind: EventKind, source: Source) -> Event {
        Event {
            id: 0,
            time: String::new(),
            service: service.into(),
            kind,
            source,
            actor: None,
            from: None,
            to: None,
            reason: None,
            details: serde_json::Value::Null,
            instance: None,
        }
    }
}

/// The append-only event journal: `events.jsonl`, one JSON event per line, rotated to
/// `events.1.jsonl` … `events.<keep_files>.jsonl` by size, plus the most recent events in
/// memory so that pollers (`since`) rarely touch the disk.
///
/// Ids are unique and increasing, and normally consecutive. An append that fails after
/// it may have written still uses up its id, so that a line that did reach the disk is
/// never followed by another with the same id; such a failure leaves a gap.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    max_file_bytes: u64,
    keep_files: usize,
    memory: usize,
    /// What readers share with the writer: the newest events and the files.
    shared: Arc<Shared>,
    last_id: u64,
    /// A failed append may have left a partial line; cut it before writing after it, or
    /// the next line would be glued to it and both lost.
    dirty: bool,
    /// Stamps events that come without a time.
    clock: Arc<dyn Clock>,
}

/// The journal as its readers see it (the admin API, `weir ctl events`): they never wait
/// for the writer's lock, which is held across fsyncs. Recent events come from memory
/// under a lock held only to copy them; older ones from the files, under a lock the
/// writer holds only while it writes or rotates them.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    memory: Mutex<Memory>,
    files: RwLock<()>,
}

#[derive(Debug)]
struct Memory {
    /// The newest `memory` events, oldest first.
    recent: VecDeque<Event>,
    /// `recent` starts at the oldest event the journal still has, so it can answer any
    /// `since` even below its first id.
    recent_is_all: bool,
    last_id: u64,
}

/// The journal as readers see it, whatever store keeps it: the admin API and `weir ctl
/// events` read through this and never wait for the store's writer. Blocking (it may read
/// files, or ask a remote store): call it off the async workers.
pub trait EventLog: Send + Sync + std::fmt::Debug + 'static {
    /// The id of the newest journaled event.
    fn last_id(&self) -> u64;

    /// Events with id > `since`, oldest first, at most `limit`. When events after `since`
    /// are gone (rotated or trimmed), the answer starts at the oldest one kept: a first
    /// id above `since + 1` tells the caller it missed some.
    fn since(&self, since: u64, limit: usize) -> Result<Vec<Event>, StateError>;

    /// The newest `n` events, oldest first.
    fn newest(&self, n: usize) -> Result<Vec<Event>, StateError> {
        self.since(self.last_id().saturating_sub(n as u64), n)
    }
}

/// The file journal's read handle: never blocked by a write in progress except for the
/// moment a file is being written when old events must come from disk.
#[derive(Debug, Clone)]
pub struct JournalLog(Arc<Shared>);

impl EventLog for JournalLog {
    fn last_id(&self) -> u64 {
        self.0.memory().last_id
    }

    /// Served from memory when it covers `since`, else from the files.
    fn since(&self, since: u64, limit: usize) -> Result<Vec<Event>, StateError> {
        {
            let m = self.0.memory();
            if since >= m.last_id || limit == 0 {
                return Ok(Vec::new());
            }
            if let Some(first) = m.recent.front()
                && (first.id <= since.saturating_add(1) || m.recent_is_all)
            {
                let start = m.recent.partition_point(|e| e.id <= since);
                return Ok(m.recent.range(start..).take(limit).cloned().collect());
            }
        }
        let _files = self.0.files.read().unwrap_or_else(|p| p.into_inner());
        let dir = &self.0.dir;
        // Newest file first, until one starts at or before the first wanted id.
        let current = dir.join(JOURNAL_FILE);
        let mut chunks = vec![read_events(&current)?];
        let covered = |chunk: &[Event]| chunk.first().is_some_and(|e| e.id <= since + 1);
        if !covered(&chunks[0]) {
            for (_, path) in rotated_files(dir)? {
                let events = read_events(&path)?;
                let done = covered(&events);
                chunks.push(events);
                if done {
                    break;
                }
            }
        }
        Ok(chunks
            .into_iter()
            .rev()
            .flatten()
            .filter(|e| e.id > since)
            .take(limit)
            .collect())
    }
}

impl Shared {
    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Journal {
    /// Open `events.jsonl` in `dir` (created by the first append) and recover the last
    /// id from it and the rotated files. A torn last line (a crash mid-append) is cut off and ignored: its
    /// append never returned, so it was never acknowledged. Other unreadable lines are
    /// skipped with a warning rather than failing start-up over the audit trail.
    pub(crate) fn open(
        dir: &Path,
        max_file_bytes: u64,
        keep_files: usize,
        memory: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<Journal, StateError> {
        fs::create_dir_all(dir).map_err(io_error("create state directory", dir))?;
        // Reading must work; writing may not (a full or read-only disk). Then the journal
        // opens anyway, so that weir can serve the saved state, and every append fails
        // (refusing changes) until the disk takes writes again.
        // A leftover from a rotation cut short: its one event was never acknowledged,
        // and no reader looks at it; the next rotation removes it if this cannot.
        if let Err(e) = remove_if_exists(&dir.join(JOURNAL_NEXT)) {
            tracing::warn!("{e}");
        }
        let current = dir.join(JOURNAL_FILE);
        let (good, repaired) = read_complete_lines(&current)?;
        // A torn tail that cannot be cut now is cut before the next append.
        let dirty = repaired.is_err();
        if let Err(e) = repaired {
            tracing::warn!("{e}");
        }

        // Newest file first; stop once we have the last id and enough events for memory.
        let mut chunks = vec![parse_events(&current, &good)];
        let mut have = chunks[0].len();
        let mut recent_is_all = true;
        for (_, path) in rotated_files(dir)? {
            if have > 0 && have >= memory {
                recent_is_all = false;
                break;
            }
            let events = read_events(&path)?;
            have += events.len();
            chunks.push(events);
        }
        let last_id = chunks.iter().flatten().map(|e| e.id).max().unwrap_or(0);
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            max_file_bytes,
            keep_files,
            memory,
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                memory: Mutex::new(Memory {
                    recent: VecDeque::with_capacity(memory.min(have)),
                    recent_is_all,
                    last_id,
                }),
                files: RwLock::new(()),
            }),
            last_id,
            dirty,
            clock,
        };
        for event in chunks.into_iter().rev().flatten() {
            journal.remember(event);
        }
        Ok(journal)
    }

    pub(crate) fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Assign the id (last + 1) and the time (now, if empty), append one JSON line, fsync,
    /// then return the stored event. When the line would take the file past
    /// `max_file_bytes`, rotate first (`events.jsonl` → `events.1.jsonl`, shifting the
    /// older ones up and dropping those beyond `keep_files`).
    pub(crate) fn append(&mut self, mut event: Event) -> Result<Event, StateError> {
        event.id = self.last_id + 1;
        if event.time.is_empty() {
            event.time = timestamp(self.clock.now());
        }
        let current = self.dir.join(JOURNAL_FILE);
        let mut line = serde_json::to_vec(&event).map_err(|error| StateError::Encode {
            path: current.clone(),
            error,
        })?;
        line.push(b'\n');

        let written = {
            let shared = Arc::clone(&self.shared);
            let _files = shared.files.write().unwrap_or_else(|p| p.into_inner());
            self.write_line(&current, &line)
        };
        self.last_id = event.id;
        if let Err(e) = written {
            self.dirty = true;
            return Err(e);
        }
        self.remember(event.clone());
        Ok(event)
    }

    /// Events with id > `since`, oldest first, at most `limit` (see [`EventLog::since`]).
    #[cfg(test)]
    pub(crate) fn since(&self, since: u64, limit: usize) -> Result<Vec<Event>, StateError> {
        self.log().since(since, limit)
    }

    /// A read handle for callers that must not wait for this writer.
    pub(crate) fn log(&self) -> JournalLog {
        JournalLog(Arc::clone(&self.shared))
    }

    fn remember(&mut self, event: Event) {
        let mut m = self.shared.memory();
        m.last_id = m.last_id.max(event.id);
        if self.memory == 0 {
            m.recent_is_all = false;
            return;
        }
        if m.recent.len() == self.memory {
            m.recent.pop_front();
            m.recent_is_all = false;
        }
        m.recent.push_back(event);
    }

    fn write_line(&mut self, current: &Path, line: &[u8]) -> Result<(), StateError> {
        if self.dirty {
            repair_tail(current)?;
            self.dirty = false;
        }
        let len = file_len(current)?;
        match len {
            // An oversized line still goes into an empty file rather than rotating forever.
            Some(len) if len > 0 && len + line.len() as u64 > self.max_file_bytes => {
                self.rotate_with(current, line)
            }
            _ => {
                let mut file = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(current)
                    .map_err(io_error("open", current))?;
                file.write_all(line).map_err(io_error("write", current))?;
                file.sync_data().map_err(io_error("fsync", current))?;
                if len.is_none() {
                    sync_dir(&self.dir)?;
                }
                Ok(())
            }
        }
    }

    /// Start a new current file holding `line`. The new file is written and fsynced under
    /// a side name before any rename, and the shift runs oldest first, so that at every
    /// crash point the newest acknowledged event is still in `events.jsonl` or
    /// `events.1.jsonl` — which keeps ids increasing across a restart even with
    /// `keep_files = 0`.
    fn rotate_with(&mut self, current: &Path, line: &[u8]) -> Result<(), StateError> {
        let next = self.dir.join(JOURNAL_NEXT);
        remove_if_exists(&next)?;
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&next)
            .map_err(io_error("create", &next))
            .and_then(|mut f| {
                f.write_all(line).map_err(io_error("write", &next))?;
                f.sync_all().map_err(io_error("fsync", &next))
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&next);
            return Err(e);
        }

        for (n, path) in rotated_files(&self.dir)?.into_iter().rev() {
            // `>=` also trims files left over from a larger keep_files.
            if n >= self.keep_files {
                fs::remove_file(&path).map_err(io_error("remove", &path))?;
            } else {
                fs::rename(&path, rotated_path(&self.dir, n + 1))
                    .map_err(io_error("rotate", &path))?;
            }
        }
        if self.keep_files > 0 {
            fs::rename(current, rotated_path(&self.dir, 1)).map_err(io_error("rotate", current))?;
        }
        // With keep_files = 0 this rename is what drops the old file, in one atomic step.
        fs::rename(&next, current).map_err(io_error("replace", current))?;
        sync_dir(&self.dir)
    }
}

fn rotated_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("events.{n}.jsonl"))
}

/// Rotated journal files present in `dir`, newest (`.1`) first. Listed rather than probed
/// by number so that a gap left by a crash mid-rotation hides nothing.
fn rotated_files(dir: &Path) -> Result<Vec<(usize, PathBuf)>, StateError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        let name = entry.file_name();
        let n = name
            .to_str()
            .and_then(|s| s.strip_prefix("events.")?.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(n) = n.filter(|&n| n > 0) {
            files.push((n, entry.path()));
        }
    }
    files.sort_unstable_by_key(|&(n, _)| n);
    Ok(files)
}

fn file_len(path: &Path) -> Result<Option<u64>, StateError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read metadata of", path)(e)),
    }
}

/// Cut anything after the last newline (a line whose append was interrupted) and return
/// the complete lines. Every line is written with its newline in one `write`, so a line
/// without one was never acknowledged.
fn repair_tail(path: &Path) -> Result<Vec<u8>, StateError> {
    let (good, repaired) = read_complete_lines(path)?;
    repaired.map(|()| good)
}

/// The complete lines of `path` (empty if it does not exist), and whether cutting a
/// torn tail off the file worked: reading needs only a readable file, the cut needs a
/// writable one.
fn read_complete_lines(path: &Path) -> Result<(Vec<u8>, Result<(), StateError>), StateError> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Ok(()))),
        Err(e) => return Err(io_error("read", path)(e)),
    };
    if bytes.last().is_none_or(|&b| b == b'\n') {
        return Ok((bytes, Ok(())));
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(
        file = %path.display(),
        bytes = bytes.len() - keep,
        "journal ends in a torn line (interrupted append); dropping it"
    );
    bytes.truncate(keep);
    let cut = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error("open", path))
        .and_then(|file| {
            file.set_len(keep as u64)
                .map_err(io_error("truncate", path))?;
            file.sync_all().map_err(io_error("fsync", path))
        });
    Ok((bytes, cut))
}

fn read_events(path: &Path) -> Result<Vec<Event>, StateError> {
    match fs::read(path) {
        Ok(bytes) => Ok(parse_events(path, &bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_error("read", path)(e)),
    }
}

fn parse_events(path: &Path, bytes: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<Event>(line) {
            Ok(event) => events.push(event),
            Err(error) => tracing::warn!(
                file = %path.display(),
                line = i + 1,
                %error,
                "skipping unreadable journal line"
            ),
        }
    }
    events
}

/// A revision of the stored routing state: it grows with every committed change. For
/// the file store it is the id of the last journaled event; a shared store uses its own
/// (etcd's revision), which is why the controller never does arithmetic on it.
pub type Revision = u64;

/// Where the controller persists routing state and its journal. Every method blocks until
/// the store has answered (durably, for writes): the controller calls it from its writer,
/// off the async workers.
///
/// Designed for a shared store as well as the local one: writes are compare-and-swap on
/// the revision the writer last saw, and changes made by others arrive through
/// [`Store::watch`].
pub trait Store: Send + std::fmt::Debug + 'static {
    /// The saved state, if any, and the revision it is at.
    fn load(&self) -> Result<(Option<State>, Revision), StateError>;

    /// The revision of the last change this store committed or loaded.
    fn revision(&self) -> Revision;

    /// Replace the state and journal `event` as one change, if the store is still at
    /// `expected` (else [`StateError::Conflict`], nothing written). On any error nothing
    /// of the change is visible: the state and the journal stay in step.
    fn commit(
        &mut self,
        expected: Revision,
        state: &State,
        event: Event,
    ) -> Result<(Revision, Event), StateError>;

    /// Replace the state without an event (start-up rewrite, catching up after the disk
    /// refused writes).
    fn save(&mut self, state: &State) -> Result<Revision, StateError>;

    /// Journal an event that changes no state (a rejected reload, a health change).
    fn record(&mut self, event: Event) -> Result<Event, StateError>;

    /// A read handle on the journal that never waits for this writer.
    fn events(&self) -> Arc<dyn EventLog>;

    /// A state this store's writer caught up with, read from the store at `revision`
    /// (a shared store remembers it as the base of its next commit and caches it).
    fn adopted(&mut self, _state: &State, _revision: Revision) {}

    /// Revisions committed by other writers, as they happen. `None` for a store that
    /// only this process writes (the file store: its directory lock guarantees it).
    fn watch(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Revision>> {
        None
    }
}

/// The local store: `state.json` and the event journal in the state directory, held
/// with its [`StateLock`] for as long as the store lives.
#[derive(Debug)]
pub struct FileStore {
    _lock: StateLock,
    state: StateStore,
    journal: Journal,
    /// The state last written successfully: what an unfinished commit is rolled back to.
    committed: Option<State>,
}

impl FileStore {
    /// The store in the locked directory. Reads the state file and the journal's tail (ids,
    /// recent events); writes nothing but the cut of a torn journal line.
    pub fn open(
        lock: StateLock,
        journal_file_bytes: u64,
        journal_files_kept: usize,
        journal_memory: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<FileStore, StateError> {
        let dir = lock.dir().to_path_buf();
        let state = StateStore::open(&dir)?;
        let journal = Journal::open(
            &dir,
            journal_file_bytes,
            journal_files_kept,
            journal_memory,
            clock,
        )?;
        // What a failed commit goes back to until this store has written anything: the
        // file as it is (an unreadable one is the controller's to refuse, before this).
        let committed = state.load().ok().flatten();
        Ok(FileStore {
            _lock: lock,
            state,
            journal,
            committed,
        })
    }

    /// The state file's path, for messages.
    pub fn path(&self) -> PathBuf {
        self.state.path()
    }

    /// After a start that read everything: record the pid in the lock file and remove
    /// temp files a crashed writer left.
    pub fn started(&self) {
        if let Err(e) = self._lock.record_pid() {
            tracing::warn!("{e}");
        }
        self.state.remove_stale_temps();
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<(Option<State>, Revision), StateError> {
        Ok((self.state.load()?, self.journal.last_id()))
    }

    fn revision(&self) -> Revision {
        self.journal.last_id()
    }

    fn commit(
        &mut self,
        expected: Revision,
        state: &State,
        event: Event,
    ) -> Result<(Revision, Event), StateError> {
        let current = self.revision();
        if expected != current {
            return Err(StateError::Conflict { expected, current });
        }
        self.state.save(state)?;
        match self.journal.append(event) {
            Ok(event) => {
                self.committed = Some(state.clone());
                Ok((event.id, event))
            }
            Err(e) => {
                // Keep state and journal in step: put the last committed state back.
                if let Some(before) = &self.committed
                    && let Err(undo) = self.state.save(before)
                {
                    tracing::error!("cannot restore the state file after a failed write: {undo}");
                }
                Err(e)
            }
        }
    }

    fn save(&mut self, state: &State) -> Result<Revision, StateError> {
        self.state.save(state)?;
        self.committed = Some(state.clone());
        Ok(self.revision())
    }

    fn record(&mut self, event: Event) -> Result<Event, StateError> {
        self.journal.append(event)
    }

    fn events(&self) -> Arc<dyn EventLog> {
        Arc::new(self.journal.log())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::model::SystemClock;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("weir-state-{name}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn weights(pairs: &[(&str, u32)]) -> Weights {
        pairs.iter().map(|&(p, w)| (p.to_owned(), w)).collect()
    }

    #[test]
    fn releases_round_trip_and_older_extension_data_reads_without_them() {
        let mut state = ServiceState {
            version: 3,
            weights: weights(&[("stable", 100), ("canary", 0)]),
            updated_at: "2025-01-02T03:04:05.678Z".into(),
            updated_by: Source::Admin,
            extra: serde_json::json!({"baseline": "stable"}),
        };
        // A file from before releases: no released pools, no history.
        let old = state.control().unwrap();
        assert!(old.deployed.is_empty() && old.releases.is_empty());

        let mut control = old;
        control.deployed.insert(
            "canary".into(),
            Deployed {
                version: Some("v2".into()),
                endpoints: vec!["10.0.0.7:80".into()],
            },
        );
        control.releases.push(Release {
            revision: 1,
            version: Some("v2".into()),
            pool: "canary".into(),
            endpoints: vec!["10.0.0.7:80".into()],
            weights: weights(&[("stable", 90), ("canary", 10)]),
            started_at: "2025-01-02T03:04:05.678Z".into(),
            ended_at: None,
            outcome: None,
            reason: None,
            actor: Some("alice".into()),
            undo_to: None,
        });
        state.set_control(&control);
        let text = serde_json::to_string(&state).unwrap();
        let back: ServiceState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.control().unwrap(), control);
        // An outcome a newer weir wrote reads as unknown rather than failing the file.
        let newer = text.replace("\"actor\":\"alice\"", "\"outcome\":\"paused_forever\"");
        let back: ServiceState = serde_json::from_str(&newer).unwrap();
        assert_eq!(
            back.control().unwrap().releases[0].outcome,
            Some(ReleaseOutcome::Unknown)
        );
        // A history that is not one is named.
        state.extra["releases"] = serde_json::json!("yesterday");
        let err = state.control().unwrap_err();
        assert!(err.contains("release history"), "{err}");
    }

    fn sample_state() -> State {
        let mut services = BTreeMap::new();
        services.insert(
            "shop".to_owned(),
            ServiceState {
                version: 3,
                // Not alphabetical, to prove config order survives the round trip.
                weights: weights(&[("stable", 90), ("canary", 10)]),
                updated_at: "2025-01-02T03:04:05.678Z".to_owned(),
                updated_by: Source::Admin,
                extra: serde_json::Value::Null,
            },
        );
        services.insert(
            "api".to_owned(),
            ServiceState {
                version: 1,
                weights: weights(&[("blue", 0), ("green", 1)]),
                updated_at: "2025-01-02T03:04:06.000Z".to_owned(),
                updated_by: Source::Rollout,
                extra: serde_json::json!({
                    "baseline": "green",
                    "degraded": "guard: error rate above the SLO",
                }),
            },
        );
        State { services }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn load_without_file_is_none() {
        let tmp = TempDir::new("empty");
        let store = StateStore::open(&tmp.path().join("a/b")).unwrap();
        assert!(
            tmp.path().join("a/b").is_dir(),
            "open creates the directory"
        );
        assert_eq!(store.load().unwrap(), None);
    }

    #[test]
    fn save_load_round_trip() {
        let tmp = TempDir::new("roundtrip");
        let store = StateStore::open(tmp.path()).unwrap();
        let state = sample_state();
        store.save(&state).unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded, state);
        let order: Vec<&str> = loaded.services["shop"]
            .weights
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(order, ["stable", "canary"]);

        let raw: serde_json::Value =
            serde_json::from_slice(&fs::read(store.path()).unwrap()).unwrap();
        assert_eq!(raw["format"], 2);
        assert_eq!(raw["services"]["shop"]["updated_by"], "admin");
        // Null extension data is left out of the file, not written as `null`.
        assert!(raw["services"]["shop"].get("extra").is_none());
    }

    #[test]
    fn save_replaces_whole_file_and_leaves_no_temp() {
        let tmp = TempDir::new("replace");
        let store = StateStore::open(tmp.path()).unwrap();
        store.save(&sample_state()).unwrap();
        // A stale temp from an interrupted save must neither break nor survive a save.
        fs::write(store.tmp_path(), b"{\"format\": 2, \"serv").unwrap();

        let mut next = sample_state();
        next.services.remove("api");
        next.services.get_mut("shop").unwrap().version = 4;
        store.save(&next).unwrap();

        assert_eq!(store.load().unwrap().unwrap(), next);
        assert_eq!(names(tmp.path()), [STATE_FILE]);
    }

    #[test]
    fn format_1_fixture_loads() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v1.json");
        let tmp = TempDir::new("v1");
        fs::copy(&fixture, tmp.path().join(STATE_FILE)).unwrap();
        let store = StateStore::open(tmp.path()).unwrap();
        let mtime = fs::metadata(store.path()).unwrap().modified().unwrap();

        let state = store.load().unwrap().unwrap();
        assert_eq!(state.services.len(), 2);
        let shop = &state.services["shop"];
        assert_eq!(shop.version, 3);
        assert_eq!(shop.weights, weights(&[("stable", 90), ("canary", 10)]));
        let order: Vec<&str> = shop.weights.keys().map(String::as_str).collect();
        assert_eq!(order, ["stable", "canary"]);
        assert_eq!(shop.updated_by, Source::Startup);
        assert_eq!(shop.updated_at, timestamp(mtime));
        assert_eq!(shop.extra, serde_json::Value::Null);
        assert_eq!(state.services["api"].version, 7);

        // Writing upgrades to the current format, and that reads back the same.
        store.save(&state).unwrap();
        let raw: serde_json::Value =
            serde_json::from_slice(&fs::read(store.path()).unwrap()).unwrap();
        assert_eq!(raw["format"], STATE_FORMAT);
        assert_eq!(store.load().unwrap().unwrap(), state);
    }

    #[test]
    fn format_1_without_version_is_invalid() {
        let tmp = TempDir::new("v1bad");
        let store = StateStore::open(tmp.path()).unwrap();
        fs::write(
            store.path(),
            br#"{"format":1,"weights":{"shop":{"a":1}},"versions":{}}"#,
        )
        .unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StateError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("`shop`"), "{err}");
    }

    #[test]
    fn future_format_is_refused_by_number() {
        let tmp = TempDir::new("future");
        let store = StateStore::open(tmp.path()).unwrap();
        fs::write(
            store.path(),
            br#"{"format": 3, "services": {}, "new": true}"#,
        )
        .unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(err, StateError::TooNew { found: 3, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("format 3"), "{msg}");
        assert!(msg.contains("too old"), "{msg}");
        assert!(msg.contains(&store.path().display().to_string()), "{msg}");
    }

    #[test]
    fn corrupt_file_error_names_it() {
        let tmp = TempDir::new("corrupt");
        let store = StateStore::open(tmp.path()).unwrap();
        for bytes in [&b"{\"format\": 2, \"servi"[..], b"", b"[1, 2]"] {
            fs::write(store.path(), bytes).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
            assert!(
                err.to_string()
                    .contains(&store.path().display().to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn lock_is_shared_within_a_process_and_released_with_the_last_holder() {
        let tmp = TempDir::new("lock");
        let dir = tmp.path().join("s");
        let a = StateLock::acquire(&dir).unwrap();
        // Acquiring creates only an empty lock file; the pid is written on request.
        assert_eq!(fs::read(dir.join(LOCK_FILE)).unwrap(), b"");
        let b = StateLock::acquire(&dir).unwrap();
        assert!(Arc::ptr_eq(&a.0, &b.0));
        a.record_pid().unwrap();
        b.record_pid().unwrap();
        let pid = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid, format!("{}\n", std::process::id()));
        drop((a, b));
        let key = fs::canonicalize(&dir).unwrap();
        assert!(
            held_locks()
                .get(&key)
                .and_then(std::sync::Weak::upgrade)
                .is_none()
        );
        // Released: a separate descriptor (as another process would have) can take it.
        let other = File::open(dir.join(LOCK_FILE)).unwrap();
        other.try_lock().unwrap();
    }

    #[test]
    fn discard_moves_the_state_file_aside_unchanged() {
        let tmp = TempDir::new("discard");
        let lock = StateLock::acquire(tmp.path()).unwrap();
        assert_eq!(discard(&lock, SystemClock.now()).unwrap(), None);
        let store = StateStore::open(tmp.path()).unwrap();
        store.save(&sample_state()).unwrap();
        let bytes = fs::read(store.path()).unwrap();
        let first = discard(&lock, SystemClock.now()).unwrap().unwrap();
        assert!(!store.path().exists());
        assert_eq!(fs::read(&first).unwrap(), bytes);
        let name = first.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with("state.json.discarded-2"), "{name}");
        // A second discard within the same second does not overwrite the first.
        store.save(&sample_state()).unwrap();
        let second = discard(&lock, SystemClock.now()).unwrap().unwrap();
        assert_ne!(first, second);
        assert!(first.exists() && second.exists());
    }

    #[test]
    fn saves_use_a_temp_file_of_their_own_process() {
        let tmp = TempDir::new("tmpname");
        let store = StateStore::open(tmp.path()).unwrap();
        let tmp_name = store.tmp_path();
        assert!(
            tmp_name
                .to_str()
                .unwrap()
                .ends_with(&format!("state.json.tmp.{}", std::process::id()))
        );
        // Another process's leftover is ignored by load and cleared on request.
        let stale = tmp.path().join("state.json.tmp.1");
        fs::write(&stale, b"{").unwrap();
        store.save(&sample_state()).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), sample_state());
        store.remove_stale_temps();
        assert_eq!(names(tmp.path()), [STATE_FILE]);
    }

    fn event(n: u64) -> Event {
        let mut e = Event::new("shop", EventKind::WeightsChanged, Source::Admin);
        e.reason = Some(format!("change {n}"));
        e
    }

    fn ids(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    #[test]
    fn event_serialisation_leaves_out_empty_parts() {
        let mut e = Event::new("", EventKind::ConfigReloaded, Source::Config);
        e.id = 5;
        e.time = "2025-01-02T03:04:05.678Z".to_owned();
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": 5, "time": "2025-01-02T03:04:05.678Z", "service": "",
                "kind": "config_reloaded", "source": "config"
            })
        );
        e.from = Some(weights(&[("stable", 100), ("canary", 0)]));
        e.to = Some(weights(&[("stable", 90), ("canary", 10)]));
        e.actor = Some("ops".to_owned());
        e.details = serde_json::json!({"value": 0.2});
        let back: Event = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn journal_ids_increase_across_reopen() {
        let tmp = TempDir::new("reopen");
        {
            let mut journal =
                Journal::open(tmp.path(), 1 << 20, 3, 100, Arc::new(SystemClock)).unwrap();
            assert_eq!(journal.last_id(), 0);
            for n in 1..=3 {
                let stored = journal.append(event(n)).unwrap();
                assert_eq!(stored.id, n);
                assert!(
                    humantime::parse_rfc3339(&stored.time).is_ok(),
                    "{}",
                    stored.time
                );
            }
        }
        let mut journal =
            Journal::open(tmp.path(), 1 << 20, 3, 100, Arc::new(SystemClock)).unwrap();
        assert_eq!(journal.last_id(), 3);
        let mut given = event(4);
        given.time = "2025-01-02T03:04:05.678Z".to_owned();
        let stored = journal.append(given).unwrap();
        assert_eq!(stored.id, 4);
        assert_eq!(stored.time, "2025-01-02T03:04:05.678Z");
        let all = journal.since(0, 100).unwrap();
        assert_eq!(ids(&all), [1, 2, 3, 4]);
        assert_eq!(all[0].reason.as_deref(), Some("change 1"));
    }

    #[test]
    fn torn_last_line_is_ignored_and_cut() {
        let tmp = TempDir::new("torn");
        {
            let mut journal =
                Journal::open(tmp.path(), 1 << 20, 3, 100, Arc::new(SystemClock)).unwrap();
            journal.append(event(1)).unwrap();
            journal.append(event(2)).unwrap();
        }
        let path = tmp.path().join(JOURNAL_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"id":3,"time":"2025-01-0"#).unwrap();
        drop(file);

        let mut journal =
            Journal::open(tmp.path(), 1 << 20, 3, 100, Arc::new(SystemClock)).unwrap();
        assert_eq!(journal.last_id(), 2);
        assert_eq!(journal.append(event(3)).unwrap().id, 3);
        // The new line starts on a line of its own, so every line on disk parses.
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        for line in text.lines() {
            serde_json::from_str::<Event>(line).unwrap();
        }
        drop(journal);
        let journal = Journal::open(tmp.path(), 1 << 20, 3, 100, Arc::new(SystemClock)).unwrap();
        assert_eq!(ids(&journal.since(0, 10).unwrap()), [1, 2, 3]);
    }

    #[test]
    fn rotation_keeps_ids_increasing_and_since_reads_rotated_files() {
        let tmp = TempDir::new("rotate");
        let line_len = serde_json::to_vec(&{
            let mut e = event(10);
            e.id = 10;
            e.time = timestamp(SystemClock.now());
            e
        })
        .unwrap()
        .len() as u64
            + 1;
        // Three lines per file; memory smaller than one file so `since` must go to disk.
        let max = line_len * 3 + 2;
        {
            let mut journal = Journal::open(tmp.path(), max, 2, 2, Arc::new(SystemClock)).unwrap();
            for n in 1..=20 {
                assert_eq!(journal.append(event(n)).unwrap().id, n);
            }
            assert_eq!(
                names(tmp.path()),
                ["events.1.jsonl", "events.2.jsonl", "events.jsonl"]
            );
            // Files hold 19..=20 (current), 16..=18, 13..=15.
            let kept = journal.since(0, 100).unwrap();
            assert_eq!(ids(&kept), (13..=20).collect::<Vec<_>>());
            assert_eq!(ids(&journal.since(13, 4).unwrap()), [14, 15, 16, 17]);
            assert_eq!(ids(&journal.since(18, 100).unwrap()), [19, 20]);
        }
        let mut journal = Journal::open(tmp.path(), max, 2, 2, Arc::new(SystemClock)).unwrap();
        assert_eq!(journal.last_id(), 20);
        assert_eq!(ids(&journal.since(14, 3).unwrap()), [15, 16, 17]);
        assert_eq!(journal.append(event(21)).unwrap().id, 21);
        assert_eq!(ids(&journal.since(19, 100).unwrap()), [20, 21]);

        // Shrinking keep_files trims the extra rotated files at the next rotation.
        drop(journal);
        let mut journal = Journal::open(tmp.path(), max, 1, 2, Arc::new(SystemClock)).unwrap();
        for n in 22..=23 {
            assert_eq!(journal.append(event(n)).unwrap().id, n);
        }
        assert_eq!(names(tmp.path()), ["events.1.jsonl", "events.jsonl"]);
        assert_eq!(ids(&journal.since(0, 100).unwrap()), [19, 20, 21, 22, 23]);
    }

    #[test]
    fn rotation_without_kept_files_keeps_ids_across_reopen() {
        let tmp = TempDir::new("keep0");
        {
            // Every line rotates: one event per file, none kept.
            let mut journal = Journal::open(tmp.path(), 1, 0, 10, Arc::new(SystemClock)).unwrap();
            for n in 1..=3 {
                assert_eq!(journal.append(event(n)).unwrap().id, n);
            }
            assert_eq!(names(tmp.path()), [JOURNAL_FILE]);
        }
        let mut journal = Journal::open(tmp.path(), 1, 0, 10, Arc::new(SystemClock)).unwrap();
        assert_eq!(journal.last_id(), 3);
        assert_eq!(journal.append(event(4)).unwrap().id, 4);
        assert_eq!(ids(&journal.since(0, 10).unwrap()), [3, 4]);
    }

    #[test]
    fn interrupted_rotation_leftover_is_discarded() {
        let tmp = TempDir::new("next");
        {
            let mut journal =
                Journal::open(tmp.path(), 1 << 20, 2, 10, Arc::new(SystemClock)).unwrap();
            journal.append(event(1)).unwrap();
        }
        let mut stray = event(2);
        stray.id = 2;
        let mut line = serde_json::to_vec(&stray).unwrap();
        line.push(b'\n');
        fs::write(tmp.path().join(JOURNAL_NEXT), line).unwrap();

        let journal = Journal::open(tmp.path(), 1 << 20, 2, 10, Arc::new(SystemClock)).unwrap();
        assert_eq!(journal.last_id(), 1);
        assert!(!tmp.path().join(JOURNAL_NEXT).exists());
    }

    #[test]
    fn since_limits_and_orders_from_memory_and_from_files() {
        let tmp = TempDir::new("since");
        let mut journal =
            Journal::open(tmp.path(), 1 << 20, 2, 100, Arc::new(SystemClock)).unwrap();
        for n in 1..=10 {
            journal.append(event(n)).unwrap();
        }
        // memory = 0 forces every read to the files; both must answer alike.
        let from_files = Journal::open(tmp.path(), 1 << 20, 2, 0, Arc::new(SystemClock)).unwrap();
        assert_eq!(from_files.last_id(), 10);
        for j in [&journal, &from_files] {
            assert_eq!(ids(&j.since(2, 3).unwrap()), [3, 4, 5]);
            assert_eq!(ids(&j.since(0, 100).unwrap()), (1..=10).collect::<Vec<_>>());
            assert_eq!(ids(&j.since(9, 100).unwrap()), [10]);
            assert!(j.since(10, 100).unwrap().is_empty());
            assert!(j.since(u64::MAX, 100).unwrap().is_empty());
            assert!(j.since(0, 0).unwrap().is_empty());
        }
        assert_eq!(
            journal.since(0, 100).unwrap(),
            from_files.since(0, 100).unwrap()
        );

        // Memory that holds only the newest events still answers older `since` from disk.
        let small = Journal::open(tmp.path(), 1 << 20, 2, 3, Arc::new(SystemClock)).unwrap();
        assert_eq!(ids(&small.since(1, 4).unwrap()), [2, 3, 4, 5]);
        assert_eq!(ids(&small.since(7, 100).unwrap()), [8, 9, 10]);
    }

    fn file_store(dir: &Path) -> FileStore {
        let lock = StateLock::acquire(dir).unwrap();
        FileStore::open(lock, 1 << 20, 3, 100, Arc::new(SystemClock)).unwrap()
    }

    #[test]
    fn file_store_commits_state_and_event_as_one_revision() {
        let tmp = TempDir::new("store-commit");
        let mut store = file_store(tmp.path());
        assert_eq!(store.load().unwrap(), (None, 0));
        let state = sample_state();
        let (revision, stored) = store.commit(0, &state, event(1)).unwrap();
        assert_eq!((revision, stored.id), (1, 1));
        assert_eq!(store.load().unwrap(), (Some(state.clone()), 1));
        // The read handle sees the event without going through the writer.
        let log = store.events();
        assert_eq!(ids(&log.since(0, 10).unwrap()), [1]);
        assert_eq!(log.last_id(), 1);
        // A record moves the revision on; a commit on the old one is a conflict and
        // writes nothing.
        store.record(event(2)).unwrap();
        let mut next = state.clone();
        next.services.get_mut("shop").unwrap().version = 4;
        match store.commit(1, &next, event(3)) {
            Err(StateError::Conflict {
                expected: 1,
                current: 2,
            }) => {}
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(store.load().unwrap(), (Some(state), 2));
        assert_eq!(ids(&log.since(0, 10).unwrap()), [1, 2]);
        assert!(
            store.watch().is_none(),
            "nobody else writes a locked directory"
        );
    }
}
