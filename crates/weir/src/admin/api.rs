//! The admin API's wire contract: every JSON document its routes answer and every request
//! body they take, as types whose serialisation is exactly what travels. The server
//! (`admin`) fills them from control-plane data; `weir ctl`, the tests and scripts read
//! them back with serde, so a change of shape shows up as a compile error on both sides
//! rather than as a `null` somewhere in a client.
//!
//! The field order of each struct is the order on the wire. An `Option` field travels as
//! `null` unless it is marked to be left out (`skip_serializing_if`), which is how each
//! document always looked: the dashboard and scripts tell the two apart, so neither may
//! change. Vocabulary the lower layers already own (`Source`, `Phase`, `Check`,
//! `GuardMode`, the journal's `Event`) is reused as is; the guard's internal types are
//! mirrored here, so the judgement can change without changing the API by accident.
//!
//! Request bodies are read by `from_json`, with the messages the API answers in a 400;
//! their `Deserialize` is the same reader, so a client that deserialises a body accepts
//! exactly what the server does.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

pub use crate::config::GuardMode;
pub use crate::control::store::{Event, Release, ReleaseOutcome, Weights};
use crate::model::MAX_WEIGHT;
pub use crate::model::{Check, Phase, Source};

/// Longest `reason` a request may carry, in bytes: it is copied into the journal and into
/// every listing of it.
pub const MAX_REASON: usize = 1024;

/// `GET /api/v1/services`: every service, in config order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceList {
    pub services: Vec<ServiceDoc>,
}

/// One service and everything known about it: `GET /api/v1/services/{name}`, and the
/// answer to every verb that changes a service (`PUT …/weights`, `POST …/rollback`, the
/// rollout verbs), so a client sees the outcome of its change without asking again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDoc {
    pub name: String,
    /// The `Host` names it answers to; empty for the default service.
    pub hosts: Vec<String>,
    /// The pool a rollback sends all traffic to.
    pub baseline: String,
    /// Grows with every change; also the answer's `ETag`, for `If-Match`.
    pub version: u64,
    pub pools: Vec<PoolDoc>,
    /// RFC 3339 UTC with milliseconds.
    pub updated_at: String,
    pub updated_by: Source,
    pub health: Health,
    /// Live routing is ahead of the saved state: a rollback the disk refused, being
    /// retried.
    pub not_durable: bool,
    pub guard: GuardDoc,
    /// Absent from a weir that predates rollouts; read as idle then, which is what such a
    /// weir was.
    #[serde(default)]
    pub rollout: RolloutDoc,
    /// The configured plan; `null` without `[service.rollout]`.
    pub plan: Option<PlanDoc>,
    /// A freeze window in force: no rollout starts or advances until it ends. Absent
    /// when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<FreezeDoc>,
}

/// A freeze window in force for a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeDoc {
    pub reason: String,
    /// When it ends (RFC 3339), following back-to-back windows.
    pub until: String,
}

/// An analysis template's measurements in the current rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisDoc {
    pub template: String,
    /// Runs for the whole rollout (`[service.rollout] analysis`) rather than a step.
    pub background: bool,
    pub passed: u32,
    /// Passes a step needs.
    pub count: u32,
    /// Failures and errors so far, and how many are tolerated.
    pub failed: u32,
    pub failure_limit: u32,
    pub inconclusive: u32,
    /// The latest measurement: when, its value, outcome (`pass`, `fail`,
    /// `inconclusive`, `error`) and why.
    pub last_at: Option<String>,
    pub last_value: Option<f64>,
    pub last_outcome: Option<String>,
    pub last_detail: Option<String>,
}

/// A rollout webhook's latest answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDoc {
    pub name: String,
    /// `pre-rollout`, `rollout`, `confirm-promotion` or `post-rollout`.
    pub kind: String,
    /// `null` when it did not answer (refused, timed out).
    pub status: Option<u16>,
    pub ok: bool,
    pub detail: String,
    pub duration_ms: u64,
}

/// A service's health: whether the guard moved its traffic back to its baseline
/// (`degraded`, until a rollout or an operator's weights move it on), else whether a
/// pool that carries traffic has no endpoint up (`unavailable`: its share of requests
/// fails now), else `healthy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Degraded,
    Unavailable,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unavailable => "unavailable",
        }
    }
}

/// One pool of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolDoc {
    pub name: String,
    pub weight: u32,
    /// The pool's weight over the service's total, 0..=1.
    pub share: f64,
    /// Endpoint addresses, in config order.
    pub endpoints: Vec<String>,
    /// The same endpoints' run-time state, in the same order.
    pub endpoint_states: Vec<EndpointDoc>,
    /// The build the pool runs: its last release's version, else the config's
    /// `version`; left out when neither says (and by a weir that predates releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// One endpoint's run-time state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDoc {
    pub address: String,
    /// `healthy` and `ejected` in one word.
    pub state: EndpointCondition,
    /// Passing active health checks (true without them).
    pub healthy: bool,
    /// Ejected by passive outlier detection.
    pub ejected: bool,
    /// Ejections so far; each lasts longer than the one before.
    pub ejections: u32,
    pub inflight: u32,
    /// The last health check's result in words; `null` before the first.
    pub last_check: Option<String>,
}

/// Whether an endpoint takes traffic. `down` (failing health checks) wins over `ejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointCondition {
    Up,
    Ejected,
    Down,
}

impl EndpointCondition {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointCondition::Up => "up",
            EndpointCondition::Ejected => "ejected",
            EndpointCondition::Down => "down",
        }
    }
}

/// A service's `guard` document: each pool's live window, the SLO, the last decision per
/// candidate. Present for every service; `enabled` says whether the guard judges it
/// (without an SLO the windows still show its traffic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardDoc {
    pub enabled: bool,
    /// `null` when not enabled.
    pub mode: Option<GuardMode>,
    /// The span `pools` covers: the SLO's window, or 30 s without one.
    pub window_secs: f64,
    pub slo: Option<SloDoc>,
    /// The service's health, as in [`ServiceDoc::health`].
    pub health: Health,
    /// Why the service is degraded (the guard's summary of the breach); `null` if healthy.
    pub degraded_reason: Option<String>,
    /// The baseline is failing too: the guard holds its judgement and rolls nothing back.
    pub baseline_unhealthy: bool,
    /// Every pool's figures over the window, in pool order.
    pub pools: Vec<WindowFigures>,
    /// The last decision on each pool that was judged, in pool order.
    pub decisions: Vec<DecisionDoc>,
}

/// `[service.slo]` as the guard applies it; a limit not configured is `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SloDoc {
    pub max_error_rate: Option<f64>,
    pub max_p99_ms: Option<f64>,
    pub max_error_rate_increase: Option<f64>,
    pub max_p99_ratio: Option<f64>,
    pub min_requests: u64,
    pub breaches_to_act: u32,
}

/// One pool's traffic over one span.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowFigures {
    pub pool: String,
    pub requests: u64,
    pub errors: u64,
    /// errors / requests; 0 without requests.
    pub error_rate: f64,
    /// `null` without latency samples.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// In the `guard` document's `pools`: the time these figures really cover, at most
    /// `window_secs` (less for a new pool, or after a rollback reset the window); a rate
    /// is `requests / span_secs`. Left out before one slice of data (no rate can be had
    /// yet) and in decisions (their `window_secs` says it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_secs: Option<f64>,
}

/// The guard's judgement of one candidate at one evaluation. The same figures are the
/// `details` of the `rolled_back` and `rollback_dry_run` events it causes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionDoc {
    pub pool: String,
    /// When it was made, RFC 3339.
    pub at: String,
    pub mode: GuardMode,
    pub verdict: Verdict,
    /// For a breach: which check broke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// For a breach: the candidate's figure the check judged (rate, seconds or ratio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// For a breach: the confident bound that crossed the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<f64>,
    pub basis: Basis,
    /// The span `candidate` and `baseline` cover.
    pub window_secs: f64,
    /// How long the exposure (both pools at the current weights) has run.
    pub exposure_secs: f64,
    /// The false-verdict probability the exposure's tests hold over their whole life.
    pub alpha: f64,
    pub candidate: WindowFigures,
    pub baseline: WindowFigures,
    pub candidate_bounds: Bounds,
    pub baseline_bounds: Bounds,
    pub baseline_unhealthy: bool,
    /// When inconclusive: what more evidence would settle it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<String>,
    /// The verdict in words.
    pub summary: String,
}

/// A verdict of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within every limit and no worse than the baseline, with confidence.
    Pass,
    /// A limit broken, with confidence.
    Breach,
    /// Not settled yet, or a failure that is not the candidate's fault.
    Inconclusive,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Breach => "breach",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// Which evidence a verdict rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The sequential tests over the exposure.
    Exposure,
    /// A loud failure over the fast window.
    FastWindow,
}

/// A pool's confidence bounds over the exposure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// The error rate lies in [lower, upper].
    pub error_rate: [f64; 2],
    /// The p99 lies above the first and at or below the second (ms); `null` where the
    /// evidence does not bound it yet.
    pub p99_ms: [Option<f64>; 2],
}

/// A service's rollout: `{"phase": "idle"}` alone when none was ever started, the whole
/// [`RolloutProgress`] once one was (running or ended).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RolloutDoc {
    #[default]
    Idle,
    /// Boxed: most services are idle most of the time.
    Started(Box<RolloutProgress>),
}

impl RolloutDoc {
    pub fn phase(&self) -> Phase {
        match self {
            RolloutDoc::Idle => Phase::Idle,
            RolloutDoc::Started(r) => r.phase,
        }
    }
}

/// The idle document, `{"phase": "idle"}`.
#[derive(Serialize)]
struct IdleRollout {
    phase: Phase,
}

impl Serialize for RolloutDoc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RolloutDoc::Idle => IdleRollout { phase: Phase::Idle }.serialize(s),
            RolloutDoc::Started(r) => r.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RolloutDoc {
    /// Told apart by shape, not by phase: a started rollout carries every field (its
    /// `step` and `deadline` may be `null`), the idle document nothing but its phase.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RolloutDoc, D::Error> {
        let value = Value::deserialize(d)?;
        let idle = value.as_object().is_some_and(|o| {
            o.len() == 1 && o.get("phase").and_then(Value::as_str) == Some("idle")
        });
        if idle {
            return Ok(RolloutDoc::Idle);
        }
        serde_json::from_value(value)
            .map(|r| RolloutDoc::Started(Box::new(r)))
            .map_err(D::Error::custom)
    }
}

/// A rollout that was started: where it stands and what it waits for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutProgress {
    pub phase: Phase,
    pub candidate: String,
    /// The pool it replaces (the baseline when it started).
    pub stable: String,
    /// Counts from 0; equals `steps_total` once every step is done.
    pub step_index: usize,
    pub steps_total: usize,
    /// The current step in words; `null` once every step is done.
    pub step: Option<String>,
    /// Every step of the plan it runs, in words.
    pub steps: Vec<String>,
    pub time_in_step_secs: f64,
    pub waiting_for: String,
    /// End of a timed pause, an auto-promotion or a rollback window, RFC 3339.
    pub deadline: Option<String>,
    pub started_at: String,
    /// The guard's latest decision on the candidate.
    pub last_decision: Option<LastDecision>,
    /// Analysis measurements of the current step and the background ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<AnalysisDoc>,
    /// The latest answer of each webhook called during this rollout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookDoc>,
    /// The reason an operator gave to run this rollout through a freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_override: Option<String>,
}

/// The gist of the guard's latest decision on a rollout's candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastDecision {
    pub verdict: Verdict,
    pub summary: String,
    pub at: String,
}

/// The rollout plan a service's config describes (what `rollout` would start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDoc {
    pub strategy: Strategy,
    pub candidate: String,
    /// Every step, in words.
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Canary,
    BlueGreen,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Canary => "canary",
            Strategy::BlueGreen => "blue-green",
        }
    }
}

/// `GET /api/v1/services/{name}/series`: per-pool time series for charts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesDoc {
    pub service: String,
    pub pools: Vec<PoolSeries>,
}

/// One pool's series, compact: parallel arrays, one entry per step, oldest first. Rates
/// are counts / `step_secs`. Each pool has its own step: a pool kept across a reload
/// keeps the window it was built with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSeries {
    pub name: String,
    pub step_secs: f64,
    /// The end of the newest step, Unix milliseconds; `null` before the first one closed.
    pub end_ms: Option<u64>,
    pub requests: Vec<u64>,
    pub errors: Vec<u64>,
    /// `null` for a step without latency samples.
    pub p99_ms: Vec<Option<f64>>,
    /// For a pool the guard judged in the span: each judgement, oldest first — the
    /// figures it compared with the SLO and its verdict. Left out for other pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged: Option<JudgedSeries>,
}

/// The guard's judgements of one candidate, as parallel arrays, one entry per
/// evaluation. The error-rate and p99 figures are over the judged span (the exposure
/// since the weights last changed, or the fast window for a loud failure); the bounds
/// are the exposure's confidence bounds, the ones compared with the SLO: a breach when
/// the lower bound is above the limit, a pass once the upper bound is below it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgedSeries {
    /// The pool it was judged against.
    pub baseline: String,
    /// When each judgement was made, Unix milliseconds.
    pub at_ms: Vec<u64>,
    pub verdict: Vec<Verdict>,
    pub error_rate: Vec<f64>,
    pub error_rate_bounds: Vec<[f64; 2]>,
    pub baseline_error_rate: Vec<f64>,
    pub p99_ms: Vec<Option<f64>>,
    pub p99_ms_bounds: Vec<[Option<f64>; 2]>,
    pub baseline_p99_ms: Vec<Option<f64>>,
}

/// `GET /api/v1/events`: journal entries, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<Event>,
}

/// `POST /api/v1/reload` when the file was applied: the `config_reloaded` event, whose
/// `details` are a [`ReloadReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadDoc {
    /// Always `true`: a reload that fails answers an [`ErrorBody`].
    pub reloaded: bool,
    pub event: Event,
}

/// What a reload did: the `details` of a `config_reloaded` event. Service names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// The pool set changed: the config's weights replaced the run-time ones.
    pub reset: Vec<String>,
    /// The run-time weights were kept.
    pub kept: Vec<String>,
    /// Settings a reload cannot change on a running process.
    pub needs_restart: Vec<String>,
}

/// `GET /api/v1/version`: which weir answers, as `weir --version` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDoc {
    /// The release, e.g. `0.1.0`.
    pub version: String,
    /// The git revision it was built from, `-dirty` if the tree had changes; `unknown`
    /// for a build that could not tell.
    pub revision: String,
}

/// Every error answer (4xx, 5xx) of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// A rejected reload: every problem with the file, one per entry (`error` joins them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            problems: None,
        }
    }
}

/// `PUT /api/v1/services/{name}/weights`: every pool's weight, as one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightsRequest {
    /// Pool → weight (0..=1,000,000), in the order given, which is the order applied.
    pub weights: Weights,
    /// Why, for the journal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl WeightsRequest {
    /// Read a weights body: every value a whole number in 0..=`MAX_WEIGHT`, no field but
    /// `weights` and `reason`. Pool names and the total are the controller's to check.
    pub fn from_json(body: &Value) -> Result<WeightsRequest, String> {
        let obj = fields(body, &["weights", "reason"])?;
        let reason = reason(obj)?;
        let given = obj
            .get("weights")
            .ok_or("missing `weights`: send {\"weights\": {\"pool\": weight, ...}}")?
            .as_object()
            .ok_or("`weights` must be an object of pool name → integer weight")?;
        let mut weights = Weights::with_capacity(given.len());
        for (pool, w) in given {
            let n = match w {
                Value::Number(n) => n,
                other => {
                    return Err(format!(
                        "weight of pool `{pool}` must be a number, got {other}"
                    ));
                }
            };
            let w = if let Some(u) = n.as_u64() {
                u
            } else if n.as_i64().is_some() {
                return Err(format!("weight of pool `{pool}` is negative: {n}"));
            } else {
                return Err(format!(
                    "weight of pool `{pool}` must be a whole number, got {n}"
                ));
            };
            if w > MAX_WEIGHT {
                return Err(format!(
                    "weight of pool `{pool}` is above the maximum of {MAX_WEIGHT}"
                ));
            }
            weights.insert(pool.clone(), w as u32);
        }
        Ok(WeightsRequest { weights, reason })
    }
}

/// `POST /api/v1/services/{name}/rollback`: all traffic to the baseline. The body is
/// optional (none is `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RollbackRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RollbackRequest {
    pub fn from_json(body: &Value) -> Result<RollbackRequest, String> {
        let obj = fields(body, &["reason"])?;
        Ok(RollbackRequest {
            reason: reason(obj)?,
        })
    }
}

/// `POST /api/v1/services/{name}/rollout`: start the plan. Optional body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StartRolloutRequest {
    /// Roll out this pool instead of the plan's candidate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// Start during a freeze window anyway, for this reason (recorded in the journal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_freeze: Option<String>,
}

impl StartRolloutRequest {
    pub fn from_json(body: &Value) -> Result<StartRolloutRequest, String> {
        let obj = fields(body, &["candidate", "override_freeze"])?;
        let candidate = match obj.get("candidate") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("candidate must be a pool name".into()),
        };
        Ok(StartRolloutRequest {
            candidate,
            override_freeze: override_freeze(obj)?,
        })
    }
}

/// `POST /api/v1/services/{name}/retry`: start an aborted or degraded rollout again.
/// Optional body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryRequest {
    /// Retry during a freeze window anyway, for this reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_freeze: Option<String>,
}

impl RetryRequest {
    pub fn from_json(body: &Value) -> Result<RetryRequest, String> {
        let obj = fields(body, &["override_freeze"])?;
        Ok(RetryRequest {
            override_freeze: override_freeze(obj)?,
        })
    }
}

/// The optional `override_freeze`: a non-empty reason of at most [`MAX_REASON`] bytes.
fn override_freeze(obj: &Map<String, Value>) -> Result<Option<String>, String> {
    match obj.get("override_freeze") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err("override_freeze must give a reason".into())
        }
        Some(Value::String(s)) if s.len() <= MAX_REASON => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(format!("override_freeze is longer than {MAX_REASON} bytes")),
        Some(_) => Err("override_freeze must be a string (the reason)".into()),
    }
}

/// `POST /api/v1/services/{name}/release`: a new build on a pool, and the rollout plan
/// started for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReleaseRequest {
    /// The build's version label (1..=64 visible ASCII characters).
    pub version: String,
    /// The pool to release to; the plan's candidate (or, after a promotion, the pool
    /// that is not the baseline) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `host:port` of the hosts running the build; the pool's current endpoints when
    /// absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    /// Release during a freeze window anyway, for this reason (recorded in the journal;
    /// the rollout it starts then goes on through the freeze).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_freeze: Option<String>,
}

impl ReleaseRequest {
    pub fn from_json(body: &Value) -> Result<ReleaseRequest, String> {
        let obj = fields(body, &["version", "pool", "endpoints", "override_freeze"])?;
        let version = match obj.get("version") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => {
                return Err("missing `version`: send {\"version\": \"v2\"}".into());
            }
            Some(_) => return Err("version must be a string".into()),
        };
        crate::config::check_version(&version).map_err(|e| format!("version: {e}"))?;
        let pool = match obj.get("pool") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("pool must be a pool name".into()),
        };
        let endpoints = match obj.get("endpoints") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                let endpoints = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>()
                    .ok_or("endpoints must be a list of \"host:port\" strings")?;
                crate::control::release::parse_endpoints(&endpoints)
                    .map_err(|e| format!("endpoints: {e}"))?;
                Some(endpoints)
            }
            Some(_) => return Err("endpoints must be a list of \"host:port\" strings".into()),
        };
        Ok(ReleaseRequest {
            version,
            pool,
            endpoints,
            override_freeze: override_freeze(obj)?,
        })
    }
}

/// `POST /api/v1/services/{name}/undo`: back to an earlier release. Optional body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UndoRequest {
    /// The history revision to go back to; when absent, the newest earlier one that held
    /// all the traffic (promoted, an undo's target, or what served before the first
    /// release).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_revision: Option<u64>,
}

impl UndoRequest {
    pub fn from_json(body: &Value) -> Result<UndoRequest, String> {
        let obj = fields(body, &["to_revision"])?;
        let to_revision =
            match obj.get("to_revision") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(n.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                    format!("to_revision must be a revision number ≥ 1, got {n}")
                })?),
                Some(other) => return Err(format!("to_revision must be a number, got {other}")),
            };
        Ok(UndoRequest { to_revision })
    }
}

/// `GET /api/v1/services/{name}/history`: the service's releases, oldest first (the
/// newest 50 are kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryDoc {
    pub service: String,
    pub releases: Vec<Release>,
}

/// `POST /api/v1/services/{name}/promote`: pass the current pause or gate, or with
/// `full` finish the rollout at once. Optional body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PromoteRequest {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
    /// Promote during a freeze window anyway, for this reason; the rollout then goes
    /// on through the freeze.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_freeze: Option<String>,
}

impl PromoteRequest {
    pub fn from_json(body: &Value) -> Result<PromoteRequest, String> {
        let obj = fields(body, &["full", "override_freeze"])?;
        let full = match obj.get("full") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("full must be true or false".into()),
        };
        Ok(PromoteRequest {
            full,
            override_freeze: override_freeze(obj)?,
        })
    }
}

/// The body of a verb that takes no fields: `pause`, `resume`, `abort`, `retry` (and
/// `reload`, which reads none): `{}`, or no body at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EmptyRequest {}

impl EmptyRequest {
    /// `verb` names the route in the message.
    pub fn from_json(body: &Value, verb: &str) -> Result<EmptyRequest, String> {
        let obj = body.as_object().ok_or("body must be a JSON object")?;
        match obj.keys().next() {
            Some(k) => Err(format!("unknown field `{k}`: {verb} takes no fields")),
            None => Ok(EmptyRequest {}),
        }
    }
}

/// The body as an object with no field outside `allowed`.
fn fields<'a>(body: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, String> {
    let obj = body.as_object().ok_or("body must be a JSON object")?;
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "unknown field `{k}` (allowed: {})",
            allowed.join(", ")
        ));
    }
    Ok(obj)
}

/// The optional `reason`: a string of at most [`MAX_REASON`] bytes.
fn reason(obj: &Map<String, Value>) -> Result<Option<String>, String> {
    match obj.get("reason") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_REASON => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(format!("reason is longer than {MAX_REASON} bytes")),
        Some(_) => Err("reason must be a string".into()),
    }
}

/// A request body's `Deserialize`: its `from_json`, so serde and the server agree on
/// what is acceptable and say so in the same words. (A JSON text that repeats a key is
/// the server's to refuse before this: by here it is a `Value` that kept the last one.)
fn read_with<'de, D: Deserializer<'de>, T>(
    d: D,
    read: impl FnOnce(&Value) -> Result<T, String>,
) -> Result<T, D::Error> {
    let value = Value::deserialize(d)?;
    read(&value).map_err(D::Error::custom)
}

impl<'de> Deserialize<'de> for WeightsRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, WeightsRequest::from_json)
    }
}

impl<'de> Deserialize<'de> for ReleaseRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, ReleaseRequest::from_json)
    }
}

impl<'de> Deserialize<'de> for UndoRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, UndoRequest::from_json)
    }
}

impl<'de> Deserialize<'de> for RollbackRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, RollbackRequest::from_json)
    }
}

impl<'de> Deserialize<'de> for StartRolloutRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, StartRolloutRequest::from_json)
    }
}

impl<'de> Deserialize<'de> for RetryRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, RetryRequest::from_json)
    }
}

impl<'de> Deserialize<'de> for PromoteRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, PromoteRequest::from_json)
    }
}

impl<'de> Deserialize<'de> for EmptyRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_with(d, |v| EmptyRequest::from_json(v, "this request"))
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

    /// Serialise, read back, compare: the type keeps everything it sends. Returns the JSON
    /// for checks of its shape.
    fn round_trip<T>(doc: &T) -> Value
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(doc).unwrap();
        let back: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(&back, doc, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    fn figures(pool: &str, requests: u64, errors: u64) -> WindowFigures {
        WindowFigures {
            pool: pool.into(),
            requests,
            errors,
            error_rate: errors as f64 / requests as f64,
            p50_ms: Some(1.25),
            p99_ms: None,
            span_secs: None,
        }
    }

    fn breach() -> DecisionDoc {
        DecisionDoc {
            pool: "canary".into(),
            at: "2026-01-02T03:04:05.678Z".into(),
            mode: GuardMode::Enforce,
            verdict: Verdict::Breach,
            check: Some(Check::ErrorRate),
            value: Some(0.25),
            threshold: Some(0.05),
            bound: Some(0.125),
            basis: Basis::FastWindow,
            window_secs: 3.0,
            exposure_secs: 41.5,
            alpha: 0.01,
            candidate: figures("canary", 400, 100),
            baseline: figures("stable", 1600, 2),
            candidate_bounds: Bounds {
                error_rate: [0.125, 0.375],
                p99_ms: [Some(2.5), None],
            },
            baseline_bounds: Bounds {
                error_rate: [0.0, 0.0625],
                p99_ms: [None, None],
            },
            baseline_unhealthy: false,
            needs: None,
            summary: "canary error rate 25.0% > 5.0% over 400 requests".into(),
        }
    }

    fn inconclusive() -> DecisionDoc {
        DecisionDoc {
            pool: "preview".into(),
            verdict: Verdict::Inconclusive,
            check: None,
            value: None,
            threshold: None,
            bound: None,
            basis: Basis::Exposure,
            needs: Some("more requests".into()),
            summary: "preview: not settled yet".into(),
            ..breach()
        }
    }

    fn pool(name: &str, weight: u32, share: f64) -> PoolDoc {
        PoolDoc {
            name: name.into(),
            weight,
            share,
            endpoints: vec!["10.0.0.1:80".into(), "10.0.0.2:80".into()],
            endpoint_states: vec![
                EndpointDoc {
                    address: "10.0.0.1:80".into(),
                    state: EndpointCondition::Up,
                    healthy: true,
                    ejected: false,
                    ejections: 0,
                    inflight: 3,
                    last_check: None,
                },
                EndpointDoc {
                    address: "10.0.0.2:80".into(),
                    state: EndpointCondition::Down,
                    healthy: false,
                    ejected: true,
                    ejections: 2,
                    inflight: 0,
                    last_check: Some("status 503".into()),
                },
            ],
            version: None,
        }
    }

    /// A guarded service halfway through a canary rollout, with both kinds of decision.
    fn rolling() -> ServiceDoc {
        let steps: Vec<String> = vec!["25% to the candidate".into(), "pause 1m".into()];
        ServiceDoc {
            name: "shop".into(),
            hosts: vec!["shop.example.com".into()],
            baseline: "stable".into(),
            version: 7,
            pools: vec![pool("stable", 75, 0.75), pool("canary", 25, 0.25)],
            updated_at: "2026-01-02T03:04:05.678Z".into(),
            updated_by: Source::Rollout,
            health: Health::Degraded,
            not_durable: true,
            guard: GuardDoc {
                enabled: true,
                mode: Some(GuardMode::DryRun),
                window_secs: 30.0,
                slo: Some(SloDoc {
                    max_error_rate: Some(0.05),
                    max_p99_ms: None,
                    max_error_rate_increase: Some(0.02),
                    max_p99_ratio: None,
                    min_requests: 50,
                    breaches_to_act: 2,
                }),
                health: Health::Degraded,
                degraded_reason: Some("canary error rate 25.0% > 5.0%".into()),
                baseline_unhealthy: true,
                pools: vec![figures("stable", 90, 0), figures("canary", 30, 3)],
                decisions: vec![breach(), inconclusive()],
            },
            rollout: RolloutDoc::Started(Box::new(RolloutProgress {
                phase: Phase::Paused,
                candidate: "canary".into(),
                stable: "stable".into(),
                step_index: 1,
                steps_total: 2,
                step: Some("pause 1m".into()),
                steps: steps.clone(),
                time_in_step_secs: 12.5,
                waiting_for: "resume (paused by an operator)".into(),
                deadline: None,
                started_at: "2026-01-02T03:00:00.000Z".into(),
                last_decision: Some(LastDecision {
                    verdict: Verdict::Breach,
                    summary: "canary error rate 25.0% > 5.0%".into(),
                    at: "2026-01-02T03:04:05.678Z".into(),
                }),
                analysis: vec![AnalysisDoc {
                    template: "ok-rate".into(),
                    background: true,
                    passed: 2,
                    count: 3,
                    failed: 1,
                    failure_limit: 1,
                    inconclusive: 0,
                    last_at: Some("2026-01-02T03:04:00.000Z".into()),
                    last_value: Some(0.995),
                    last_outcome: Some("pass".into()),
                    last_detail: Some("0.995 >= 0.99".into()),
                }],
                webhooks: vec![WebhookDoc {
                    name: "smoke".into(),
                    kind: "pre-rollout".into(),
                    status: None,
                    ok: false,
                    detail: "no answer within 1s".into(),
                    duration_ms: 1000,
                }],
                freeze_override: Some("hotfix INC-42".into()),
            })),
            plan: Some(PlanDoc {
                strategy: Strategy::Canary,
                candidate: "canary".into(),
                steps,
            }),
            freeze: Some(FreezeDoc {
                reason: "holidays".into(),
                until: "2026-12-27T00:00:00.000Z".into(),
            }),
        }
    }

    /// An unguarded service that never rolled out and has no plan.
    fn quiet() -> ServiceDoc {
        ServiceDoc {
            name: "api".into(),
            hosts: Vec::new(),
            version: 1,
            updated_by: Source::Config,
            health: Health::Healthy,
            not_durable: false,
            guard: GuardDoc {
                enabled: false,
                mode: None,
                slo: None,
                health: Health::Healthy,
                degraded_reason: None,
                baseline_unhealthy: false,
                decisions: Vec::new(),
                ..rolling().guard
            },
            rollout: RolloutDoc::Idle,
            plan: None,
            freeze: None,
            ..rolling()
        }
    }

    #[test]
    fn documents_round_trip_with_their_shape() {
        let v = round_trip(&rolling());
        // A breach carries its check and figures; an inconclusive verdict leaves them out
        // and says what it needs instead.
        let broke = &v["guard"]["decisions"][0];
        assert_eq!(
            (&broke["check"], &broke["basis"], &broke["bound"]),
            (&json!("error_rate"), &json!("fast_window"), &json!(0.125))
        );
        assert!(broke.get("needs").is_none(), "{broke}");
        let unsure = v["guard"]["decisions"][1].as_object().unwrap();
        for key in ["check", "value", "threshold", "bound"] {
            assert!(!unsure.contains_key(key), "{key}: {unsure:?}");
        }
        assert_eq!(unsure["needs"], "more requests");
        assert_eq!(v["guard"]["mode"], "dry-run");
        assert_eq!(v["guard"]["slo"]["max_p99_ms"], Value::Null);
        assert_eq!(v["guard"]["pools"][0]["p99_ms"], Value::Null);
        assert_eq!(v["rollout"]["phase"], "paused");
        // A started rollout sends its empty fields as null, never leaves them out.
        assert_eq!(v["rollout"].get("deadline"), Some(&Value::Null));
        assert_eq!(v["rollout"]["last_decision"]["verdict"], "breach");
        assert_eq!(v["pools"][1]["endpoint_states"][1]["state"], "down");
        assert_eq!(v["updated_by"], "rollout");
        assert_eq!(v["health"], "degraded");

        let v = round_trip(&quiet());
        assert_eq!(v["rollout"], json!({"phase": "idle"}));
        assert_eq!(v.get("plan"), Some(&Value::Null));
        assert_eq!(v["guard"].get("mode"), Some(&Value::Null));
        assert_eq!(v["guard"].get("slo"), Some(&Value::Null));

        round_trip(&ServiceList {
            services: vec![rolling(), quiet()],
        });
        round_trip(&SeriesDoc {
            service: "shop".into(),
            pools: vec![
                PoolSeries {
                    name: "stable".into(),
                    step_secs: 1.0,
                    end_ms: Some(1_767_322_445_678),
                    requests: vec![10, 0],
                    errors: vec![1, 0],
                    p99_ms: vec![Some(4.5), None],
                    judged: None,
                },
                PoolSeries {
                    name: "canary".into(),
                    step_secs: 1.0,
                    end_ms: Some(1_767_322_445_678),
                    requests: vec![3, 1],
                    errors: vec![1, 1],
                    p99_ms: vec![Some(9.5), Some(8.0)],
                    judged: Some(JudgedSeries {
                        baseline: "stable".into(),
                        at_ms: vec![1_767_322_445_000],
                        verdict: vec![Verdict::Inconclusive],
                        error_rate: vec![0.5],
                        error_rate_bounds: vec![[0.01, 0.99]],
                        baseline_error_rate: vec![0.1],
                        p99_ms: vec![Some(9.5)],
                        p99_ms_bounds: vec![[Some(1.0), None]],
                        baseline_p99_ms: vec![None],
                    }),
                },
            ],
        });
        let mut event = Event::new("shop", crate::model::EventKind::RolledBack, Source::Guard);
        event.id = 9;
        event.time = "2026-01-02T03:04:05.678Z".into();
        event.from = Some([("stable".to_owned(), 75), ("canary".to_owned(), 25)].into());
        event.to = Some([("stable".to_owned(), 100), ("canary".to_owned(), 0)].into());
        event.reason = Some("canary error rate 25.0% > 5.0%".into());
        event.details = serde_json::to_value(breach()).unwrap();
        round_trip(&EventList {
            events: vec![event.clone()],
        });
        round_trip(&ReloadDoc {
            reloaded: true,
            event,
        });
        let report = ReloadReport {
            kept: vec!["shop".into()],
            needs_restart: vec!["proxy.listen".into()],
            ..ReloadReport::default()
        };
        assert_eq!(
            round_trip(&report),
            json!({"added": [], "removed": [], "reset": [], "kept": ["shop"],
                   "needs_restart": ["proxy.listen"]})
        );

        // Errors: `problems` only where there are some.
        assert_eq!(
            round_trip(&ErrorBody::new("unknown service `x`")),
            json!({"error": "unknown service `x`"})
        );
        let rejected = ErrorBody {
            error: "config rejected, nothing changed: a; b".into(),
            problems: Some(vec!["a".into(), "b".into()]),
        };
        assert_eq!(round_trip(&rejected)["problems"], json!(["a", "b"]));
    }

    #[test]
    fn request_bodies_round_trip_sending_only_what_is_set() {
        let weights = WeightsRequest {
            weights: [("stable".to_owned(), 90), ("canary".to_owned(), 10)].into(),
            reason: Some("step 2".into()),
        };
        // The order given is the order sent, and applied.
        assert_eq!(
            serde_json::to_string(&weights).unwrap(),
            r#"{"weights":{"stable":90,"canary":10},"reason":"step 2"}"#
        );
        round_trip(&weights);
        let bare = WeightsRequest {
            reason: None,
            ..weights
        };
        assert_eq!(
            round_trip(&bare),
            json!({"weights": {"stable": 90, "canary": 10}})
        );
        assert_eq!(round_trip(&RollbackRequest::default()), json!({}));
        let why = RollbackRequest {
            reason: Some("canary 5xx".into()),
        };
        assert_eq!(round_trip(&why), json!({"reason": "canary 5xx"}));
        assert_eq!(round_trip(&StartRolloutRequest::default()), json!({}));
        let green = StartRolloutRequest {
            candidate: Some("green".into()),
            ..Default::default()
        };
        assert_eq!(round_trip(&green), json!({"candidate": "green"}));
        let frozen = StartRolloutRequest {
            override_freeze: Some("hotfix INC-42".into()),
            ..Default::default()
        };
        assert_eq!(
            round_trip(&frozen),
            json!({"override_freeze": "hotfix INC-42"})
        );
        assert_eq!(round_trip(&RetryRequest::default()), json!({}));
        assert_eq!(round_trip(&PromoteRequest::default()), json!({}));
        assert_eq!(
            round_trip(&PromoteRequest {
                full: true,
                ..Default::default()
            }),
            json!({"full": true})
        );
        assert_eq!(round_trip(&EmptyRequest {}), json!({}));
    }

    /// Read a document as the server sent it, and write it back: the same text as the
    /// same document read untyped and written back. (Not the captured bytes themselves:
    /// serde_json's fast float parser may land one ulp off the shortest digits, on both
    /// paths alike.) Key order, nulls and left-out keys all count.
    fn pinned<T: Serialize + DeserializeOwned>(captured: &str) -> T {
        let doc: T = serde_json::from_str(captured).unwrap_or_else(|e| panic!("{e}"));
        let untyped: Value = serde_json::from_str(captured).unwrap();
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            serde_json::to_string(&untyped).unwrap()
        );
        doc
    }

    /// `testdata/` holds answers of a weir (before these types existed) to curl: a guarded
    /// canary, degraded by the guard mid-rollout with an endpoint down, and an unguarded
    /// blue/green service.
    #[test]
    fn documents_captured_from_a_running_weir_read_back_unchanged() {
        let list: ServiceList = pinned(include_str!("testdata/services.json"));
        let [shop, api] = &list.services[..] else {
            panic!("{list:?}")
        };
        // What the capture covers, so that it keeps pinning those shapes.
        assert_eq!(shop.health, Health::Degraded);
        assert!(shop.guard.degraded_reason.is_some());
        assert_eq!(shop.guard.decisions[0].verdict, Verdict::Breach);
        assert_eq!(shop.guard.decisions[0].check, Some(Check::ErrorRate));
        let RolloutDoc::Started(rollout) = &shop.rollout else {
            panic!("{:?}", shop.rollout)
        };
        assert_eq!(rollout.phase, Phase::Degraded);
        assert!(rollout.last_decision.is_some() && rollout.deadline.is_none());
        assert_eq!(
            shop.pools[0].endpoint_states[1].state,
            EndpointCondition::Down
        );
        assert!(!api.guard.enabled && api.guard.slo.is_none());
        assert_eq!(api.rollout, RolloutDoc::Idle);
        assert_eq!(api.plan.as_ref().unwrap().strategy, Strategy::BlueGreen);

        let events: EventList = pinned(include_str!("testdata/events.json"));
        // The guard's events carry its decision as their details; a reload its report.
        let kinds: Vec<&str> = events.events.iter().map(|e| e.kind.as_str()).collect();
        assert!(kinds.contains(&"rolled_back"), "{kinds:?}");
        for e in &events.events {
            match e.kind.as_str() {
                "rolled_back" | "rollback_dry_run" => {
                    let d: DecisionDoc = serde_json::from_value(e.details.clone()).unwrap();
                    assert_eq!(serde_json::to_value(&d).unwrap(), e.details);
                }
                "config_reloaded" => {
                    let r: ReloadReport = serde_json::from_value(e.details.clone()).unwrap();
                    assert_eq!(serde_json::to_value(&r).unwrap(), e.details);
                }
                _ => {}
            }
        }
        let series: SeriesDoc = pinned(include_str!("testdata/series.json"));
        assert_eq!(series.pools.len(), 2);
        let reload: ReloadDoc = pinned(include_str!("testdata/reload.json"));
        assert!(reload.reloaded);
        let rejected: ErrorBody = pinned(include_str!("testdata/reload_rejected.json"));
        assert_eq!(rejected.problems.map(|p| p.len()), Some(1));
        let refused: ErrorBody = pinned(include_str!("testdata/err_weights.json"));
        assert_eq!(refused.problems, None);
    }

    #[test]
    fn a_document_without_a_rollout_reads_as_idle() {
        let mut v = serde_json::to_value(quiet()).unwrap();
        v.as_object_mut().unwrap().remove("rollout");
        let doc: ServiceDoc = serde_json::from_value(v).unwrap();
        assert_eq!(doc.rollout, RolloutDoc::Idle);
        // A started rollout with a field missing is an error, not an idle one.
        let mut v = serde_json::to_value(rolling().rollout).unwrap();
        v.as_object_mut().unwrap().remove("waiting_for");
        let e = serde_json::from_value::<RolloutDoc>(v).unwrap_err();
        assert!(e.to_string().contains("waiting_for"), "{e}");
    }

    #[test]
    fn weights_are_parsed_strictly() {
        let ok = WeightsRequest::from_json(&json!({"weights": {"a": 1, "b": 0}, "reason": "r"}))
            .unwrap();
        let weights: Vec<(String, u32)> = ok.weights.into_iter().collect();
        assert_eq!(weights, vec![("a".to_owned(), 1), ("b".to_owned(), 0)]);
        assert_eq!(ok.reason.as_deref(), Some("r"));
        for (body, needle) in [
            (json!({}), "missing `weights`"),
            (json!({"weights": [1]}), "must be an object"),
            (json!({"weights": {"a": -1}}), "negative"),
            (json!({"weights": {"a": 1.5}}), "whole number"),
            (json!({"weights": {"a": "9"}}), "must be a number"),
            (
                json!({"weights": {"a": 1}, "extra": 1}),
                "unknown field `extra`",
            ),
            (
                json!({"weights": {"a": 1}, "reason": 5}),
                "reason must be a string",
            ),
            (json!({"weights": {"a": 2_000_000}}), "maximum"),
        ] {
            let e = WeightsRequest::from_json(&body).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
            // Deserialising is the same reader, in the same words.
            let de = serde_json::from_value::<WeightsRequest>(body.clone()).unwrap_err();
            assert_eq!(de.to_string(), e, "{body}");
        }
    }

    #[test]
    fn verb_bodies_refuse_what_the_verb_does_not_take() {
        let long = "x".repeat(MAX_REASON + 1);
        for (result, needle) in [
            (
                RollbackRequest::from_json(&json!({"why": "x"})).map(drop),
                "unknown field `why` (allowed: reason)",
            ),
            (
                RollbackRequest::from_json(&json!({"reason": long})).map(drop),
                "longer than 1024 bytes",
            ),
            (
                StartRolloutRequest::from_json(&json!({"candidate": 1})).map(drop),
                "candidate must be a pool name",
            ),
            (
                PromoteRequest::from_json(&json!({"full": "yes"})).map(drop),
                "full must be true or false",
            ),
            (
                PromoteRequest::from_json(&json!({"candidate": "x"})).map(drop),
                "unknown field `candidate` (allowed: full, override_freeze)",
            ),
            (
                EmptyRequest::from_json(&json!({"full": true}), "pause").map(drop),
                "unknown field `full`: pause takes no fields",
            ),
            (
                EmptyRequest::from_json(&json!([]), "abort").map(drop),
                "body must be a JSON object",
            ),
        ] {
            let e = result.unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let null = json!({"reason": null, "candidate": null, "full": null});
        assert_eq!(
            RollbackRequest::from_json(&json!({"reason": null})),
            Ok(RollbackRequest::default())
        );
        assert!(
            StartRolloutRequest::from_json(&null).is_err(),
            "reason is not a rollout field"
        );
        assert_eq!(
            StartRolloutRequest::from_json(&json!({"candidate": null})),
            Ok(StartRolloutRequest::default())
        );
        assert_eq!(
            PromoteRequest::from_json(&json!({"full": null})),
            Ok(PromoteRequest::default())
        );
    }
}
