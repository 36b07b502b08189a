//! The model: the words every layer shares — who changed something (`Source`), what went
//! wrong with a request (`ErrorKind`, gRPC codes), what the journal records (`EventKind`),
//! rollout steps and phases, SLO checks, weights, time formats and the clock. It imports
//! nothing from the rest of weir, so any layer may use it.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

pub mod build;
pub mod clock;

pub use clock::{Clock, SystemClock, TokioClock};

std::thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// A fast per-thread random number. Not for secrets: it drives traffic splits, where
/// speed matters and predictability does no harm.
pub fn fast_rand() -> u64 {
    RNG.with(|r| r.borrow_mut().next_u64())
}

/// Upper bound for one pool's weight: keeps every sum of weights far from overflow and is
/// still fine-grained enough for 0.0001% splits.
pub const MAX_WEIGHT: u64 = 1_000_000;

/// `t` as RFC 3339 UTC with milliseconds, the one time format of the state file and the
/// journal. Times before 1970 (a badly set clock or file) are clamped to the epoch rather
/// than allowed to panic in the formatter.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t.max(UNIX_EPOCH)).to_string()
}

/// Who made a change; carried by snapshots and (later) events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Admin,
    Guard,
    Rollout,
    Config,
    Startup,
    /// Active health checks: an endpoint failed them (down) or passes them again (up).
    Health,
    /// Passive outlier detection: an endpoint ejected after consecutive failures on
    /// live traffic, or returned when its ejection ended.
    Outlier,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::Guard => "guard",
            Source::Rollout => "rollout",
            Source::Config => "config",
            Source::Startup => "startup",
            Source::Health => "health",
            Source::Outlier => "outlier",
        }
    }
}

/// A failure weir saw on a request, with whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The TCP connection to the endpoint could not be made (refused, unreachable, timed out).
    Connect,
    /// The endpoint did not answer with response headers within `request_timeout`, or
    /// its response body stalled for longer than `upstream_body_timeout`.
    Timeout,
    /// The connection closed or was reset before the response was complete (before
    /// its head, or in the middle of its body).
    Reset,
    /// The endpoint answered something that is not valid HTTP.
    Protocol,
    /// The pool had no endpoint able to take the request.
    NoEndpoint,
    /// The client went away before the exchange was over: it aborted its upload, reset
    /// its stream, or closed the connection while the response was streaming. Shown as
    /// status 499 (as nginx logs it).
    ClientAbort,
    /// The client's request body was not valid HTTP framing (a bad chunk): answered 400.
    BadRequestBody,
    /// The client stopped sending its body for longer than `body_read_timeout`: 408.
    ClientTimeout,
}

/// Whose fault a failure was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Upstream,
    Client,
}

impl ErrorKind {
    /// Failures charged to the pool.
    pub const UPSTREAM: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Protocol,
        ErrorKind::NoEndpoint,
    ];

    /// Failures of the client's making, never charged to the pool.
    pub const CLIENT: [ErrorKind; 3] = [
        ErrorKind::ClientAbort,
        ErrorKind::BadRequestBody,
        ErrorKind::ClientTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::NoEndpoint => "no_endpoint",
            ErrorKind::ClientAbort => "client_abort",
            ErrorKind::BadRequestBody => "bad_request_body",
            ErrorKind::ClientTimeout => "client_timeout",
        }
    }

    pub fn blame(self) -> Blame {
        match self {
            ErrorKind::ClientAbort | ErrorKind::BadRequestBody | ErrorKind::ClientTimeout => {
                Blame::Client
            }
            _ => Blame::Upstream,
        }
    }

    /// Index into [`ErrorKind::UPSTREAM`] or [`ErrorKind::CLIENT`] (whichever holds it),
    /// for per-kind handle arrays.
    pub fn index(self) -> usize {
        match self {
            ErrorKind::Connect | ErrorKind::ClientAbort => 0,
            ErrorKind::Timeout | ErrorKind::BadRequestBody => 1,
            ErrorKind::Reset | ErrorKind::ClientTimeout => 2,
            ErrorKind::Protocol => 3,
            ErrorKind::NoEndpoint => 4,
        }
    }

    /// The status code logs and metrics show for a failure in the middle of an exchange
    /// whose head was already sent, or that weir answered itself.
    pub fn client_status(self) -> Option<u16> {
        match self {
            ErrorKind::ClientAbort => Some(499),
            ErrorKind::BadRequestBody => Some(400),
            ErrorKind::ClientTimeout => Some(408),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// gRPC status codes (grpc/doc/statuscodes.md), by number.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// gRPC codes that mean the server failed, counted as the pool's failure by default:
/// UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. The
/// others describe the caller's request (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED,
/// …) or its own choice (CANCELLED): a version that answers them is working as designed.
pub const GRPC_DEFAULT_FAILURES: u32 =
    (1 << 2) | (1 << 4) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

pub const GRPC_UNKNOWN: u8 = 2;
pub const GRPC_DEADLINE_EXCEEDED: u8 = 4;
pub const GRPC_UNAVAILABLE: u8 = 14;

/// A gRPC status code's name; codes outside the spec read as UNKNOWN (as clients treat
/// them), which also keeps metric label values bounded.
pub fn grpc_code_name(code: u8) -> &'static str {
    GRPC_CODES
        .get(usize::from(code))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// Parse a `grpc-status` value: a decimal number; anything else is UNKNOWN.
pub fn parse_grpc_status(value: &[u8]) -> u8 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .filter(|&c| usize::from(c) < GRPC_CODES.len())
        .unwrap_or(GRPC_UNKNOWN)
}

/// The gRPC code a client derives from an HTTP status when a response carries no
/// `grpc-status` (grpc/doc/http-grpc-status-mapping.md).
pub fn grpc_from_http(status: u16) -> u8 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => GRPC_UNKNOWN,
    }
}

/// Which SLO check a breach broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    ErrorRate,
    P99Latency,
    ErrorRateIncrease,
    P99Ratio,
}

impl Check {
    pub const ALL: [Check; 4] = [
        Check::ErrorRate,
        Check::P99Latency,
        Check::ErrorRateIncrease,
        Check::P99Ratio,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::ErrorRate => "error_rate",
            Check::P99Latency => "p99_latency",
            Check::ErrorRateIncrease => "error_rate_increase",
            Check::P99Ratio => "p99_ratio",
        }
    }
}

/// Weights are set on this scale, so 0.5% is 50:9950.
pub const PERCENT_SCALE: u32 = 100;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Give the candidate this share of traffic (0 < p ≤ 100), then go on.
    Percent(f64),
    /// Wait this long.
    Pause(#[serde(with = "humantime_serde_compat")] Duration),
    /// Wait for an operator's promote.
    Manual,
    /// Wait until the candidate passed the guard on this many requests since the gate
    /// began.
    Gate { min_requests: u64 },
    /// Blue/green: the candidate gets only targeted requests until promoted (by an
    /// operator, or after `auto_promote_after` once the optional gate has passed).
    Preview {
        #[serde(with = "humantime_serde_compat::option")]
        auto_promote_after: Option<Duration>,
        gate: Option<u64>,
    },
    /// Blue/green after the switch: the guard keeps judging the new active pool, and
    /// a breach switches back, until this much time has passed.
    Watch(#[serde(with = "humantime_serde_compat")] Duration),
    /// Measure the candidate with a named `[[service.analysis]]` template (a Prometheus
    /// query) until it has `count` measurements, or fail the rollout past its
    /// `failure_limit`.
    Analysis { template: String },
}

impl Step {
    /// The step in words, for status and events.
    pub fn describe(&self) -> String {
        match self {
            Step::Percent(p) => format!("{}% to the candidate", fmt_percent(*p)),
            Step::Pause(d) => format!("pause {}", humantime::format_duration(*d)),
            Step::Manual => "pause until promoted".into(),
            Step::Gate { min_requests } => {
                format!("gate: {min_requests} requests passing the SLO guard")
            }
            Step::Preview {
                auto_promote_after,
                gate,
            } => {
                let mut s = "preview (targeted requests only)".to_owned();
                if let Some(g) = gate {
                    s += &format!(", gate {g} requests");
                }
                if let Some(a) = auto_promote_after {
                    s += &format!(", auto-promote after {}", humantime::format_duration(*a));
                }
                s
            }
            Step::Watch(d) => format!("rollback window {}", humantime::format_duration(*d)),
            Step::Analysis { template } => format!("analysis `{template}`"),
        }
    }
}

fn fmt_percent(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

/// Durations in the persisted state as humantime strings ("2m 30s").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    pub(super) mod option {
        use super::*;

        pub(in super::super) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Progressing,
    Paused,
    Promoted,
    Aborted,
    Degraded,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Idle,
        Phase::Progressing,
        Phase::Paused,
        Phase::Promoted,
        Phase::Aborted,
        Phase::Degraded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::Aborted => "aborted",
            Phase::Degraded => "degraded",
        }
    }

    /// A rollout that holds the service: no second one may start.
    pub fn is_running(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused)
    }
}

/// What a journal event records. The names are the journal's and the API's `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An operator (or the API) set the weights.
    WeightsChanged,
    /// All traffic to the baseline: an operator's rollback or the guard's revert.
    RolledBack,
    /// The guard in dry-run mode would have rolled back.
    RollbackDryRun,
    RolloutStarted,
    RolloutStep,
    RolloutPromoted,
    RolloutPaused,
    RolloutResumed,
    RolloutAborted,
    ConfigReloaded,
    ConfigRejected,
    /// At start-up: weights restored from the state file.
    StateRestored,
    /// At start-up: the saved state no longer matches the config's pools.
    StateIgnored,
    EndpointEjected,
    EndpointReturned,
    EndpointDown,
    EndpointUp,
    /// The guard holds its judgement: the baseline itself is failing.
    BaselineUnhealthy,
    BaselineRecovered,
    /// Fleet mode: a revert made by one instance while the store was unreachable was
    /// not written on reconnect, because a newer change to the service came first.
    RevertSuperseded,
    /// Fleet mode: this instance's saved state and the store disagree about which store
    /// this is (wiped, restored from an older backup, another cluster).
    StoreMismatch,
    /// Fleet mode: the store was re-seeded from an instance's state by an operator.
    StoreReseeded,
    /// One measurement of an analysis template (value, threshold, status, duration).
    AnalysisMeasured,
    /// An analysis template failed: the rollout ends degraded, traffic back to stable.
    AnalysisFailed,
    /// A rollout webhook (pre-rollout, rollout, confirm-promotion, post-rollout) was
    /// called: status, duration, and whether it counted as a pass.
    WebhookCalled,
    /// A new release of a pool (version, endpoints) started the rollout plan.
    Released,
    /// An earlier release's endpoints, version and weights were put back.
    Undone,
    /// A kind this weir does not know (a journal written by a newer one).
    #[serde(other)]
    Unknown,
}

impl EventKind {
    pub const ALL: [EventKind; 27] = [
        EventKind::WeightsChanged,
        EventKind::RolledBack,
        EventKind::RollbackDryRun,
        EventKind::RolloutStarted,
        EventKind::RolloutStep,
        EventKind::RolloutPromoted,
        EventKind::RolloutPaused,
        EventKind::RolloutResumed,
        EventKind::RolloutAborted,
        EventKind::ConfigReloaded,
        EventKind::ConfigRejected,
        EventKind::StateRestored,
        EventKind::StateIgnored,
        EventKind::EndpointEjected,
        EventKind::EndpointReturned,
        EventKind::EndpointDown,
        EventKind::EndpointUp,
        EventKind::BaselineUnhealthy,
        EventKind::BaselineRecovered,
        EventKind::RevertSuperseded,
        EventKind::StoreMismatch,
        EventKind::StoreReseeded,
        EventKind::AnalysisMeasured,
        EventKind::AnalysisFailed,
        EventKind::WebhookCalled,
        EventKind::Released,
        EventKind::Undone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::WeightsChanged => "weights_changed",
            EventKind::RolledBack => "rolled_back",
            EventKind::RollbackDryRun => "rollback_dry_run",
            EventKind::RolloutStarted => "rollout_started",
            EventKind::RolloutStep => "rollout_step",
            EventKind::RolloutPromoted => "rollout_promoted",
            EventKind::RolloutPaused => "rollout_paused",
            EventKind::RolloutResumed => "rollout_resumed",
            EventKind::RolloutAborted => "rollout_aborted",
            EventKind::ConfigReloaded => "config_reloaded",
            EventKind::ConfigRejected => "config_rejected",
            EventKind::StateRestored => "state_restored",
            EventKind::StateIgnored => "state_ignored",
            EventKind::EndpointEjected => "endpoint_ejected",
            EventKind::EndpointReturned => "endpoint_returned",
            EventKind::EndpointDown => "endpoint_down",
            EventKind::EndpointUp => "endpoint_up",
            EventKind::BaselineUnhealthy => "baseline_unhealthy",
            EventKind::BaselineRecovered => "baseline_recovered",
            EventKind::RevertSuperseded => "revert_superseded",
            EventKind::StoreMismatch => "store_mismatch",
            EventKind::StoreReseeded => "store_reseeded",
            EventKind::AnalysisMeasured => "analysis_measured",
            EventKind::AnalysisFailed => "analysis_failed",
            EventKind::WebhookCalled => "webhook_called",
            EventKind::Released => "released",
            EventKind::Undone => "undone",
            EventKind::Unknown => "unknown",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_values() {
        assert_eq!(parse_grpc_status(b"14"), 14);
        assert_eq!(parse_grpc_status(b"0"), 0);
        assert_eq!(parse_grpc_status(b"17"), GRPC_UNKNOWN);
        assert_eq!(parse_grpc_status(b"x"), GRPC_UNKNOWN);
        assert_eq!(grpc_code_name(14), "UNAVAILABLE");
        assert_eq!(grpc_code_name(200), "UNKNOWN");
        assert_eq!(grpc_from_http(503), GRPC_UNAVAILABLE);
        assert_eq!(grpc_from_http(404), 12);
    }

    #[test]
    fn default_failure_codes_are_the_server_side_ones() {
        let names: Vec<&str> = (0..17u8)
            .filter(|c| GRPC_DEFAULT_FAILURES & (1 << c) != 0)
            .map(grpc_code_name)
            .collect();
        assert_eq!(
            names,
            [
                "UNKNOWN",
                "DEADLINE_EXCEEDED",
                "UNIMPLEMENTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS"
            ]
        );
    }

    #[test]
    fn kinds_index_their_arrays() {
        for (i, k) in ErrorKind::UPSTREAM.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(k.blame(), Blame::Upstream);
        }
        for (i, k) in ErrorKind::CLIENT.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(k.blame(), Blame::Client);
        }
    }

    #[test]
    fn event_kinds_serialise_as_their_names() {
        for kind in EventKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), kind);
        }
        assert_eq!(
            serde_json::from_str::<EventKind>("\"from_the_future\"").unwrap(),
            EventKind::Unknown
        );
    }
}
