//! Configuration: raw TOML structs (serde, `deny_unknown_fields`) validated into a `Config`.
//!
//! Parsing happens in two stages so that an operator sees every problem at once: serde
//! only checks shapes and types (and stops at the first mismatch, with `file:line:col`),
//! then `validate` walks the whole document and collects every semantic problem with its
//! key path (`service[shop].pools.canary.weight`) and line.

use crate::model::MAX_WEIGHT;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::uri::Authority;
use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

/// A validated configuration. Every field is usable as is: addresses parsed, durations
/// converted, hosts lower-cased, pools in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    /// `[fleet]`: run as one of several instances sharing routing state and judgement
    /// on etcd. `None`: a single weir with its state in `[state] dir`.
    pub fleet: Option<FleetConfig>,
    pub services: Vec<ServiceConfig>,
    /// `[[freeze]]`: windows in which no rollout of any service starts or advances.
    pub freeze: Vec<FreezeWindow>,
    /// `[log]`: the log format and the access log.
    pub log: LogConfig,
}

/// `[log]`: how weir's own log reads, and the per-request access log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogConfig {
    /// `format`: the log's format when neither `--log-format` nor `WEIR_LOG_FORMAT`
    /// says; read at start only.
    pub format: LogFormat,
    /// `[log.access]`: applied again on every reload.
    pub access: AccessLogConfig,
}

/// weir's own log: human-readable lines, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "`{s}` is not a log format; use \"text\" or \"json\""
            )),
        }
    }
}

/// `[log.access]`: one JSON line per request, off unless enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub enabled: bool,
    /// Fraction of requests logged, in (0, 1].
    pub sample: f64,
    /// Failed requests (5xx, upstream and client failures) are logged whatever the
    /// sample (`errors = "all"`, the default), or sampled like the rest (`"sampled"`).
    pub all_errors: bool,
    /// Append to this file; `None`: standard output.
    pub path: Option<PathBuf>,
    /// Log the query string too (it often carries tokens and personal data).
    pub include_query: bool,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            sample: 1.0,
            all_errors: true,
            path: None,
            include_query: false,
        }
    }
}

/// `[fleet]`: where the shared state lives and who this instance is.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// etcd v3 client URLs (`http://host:2379` or `https://…`); tried in order, the next
    /// one when a member does not answer.
    pub endpoints: Vec<String>,
    /// The fleet's name: keys live under `/weir/v1/<name>/`. Lower-case letters, digits
    /// and `-`.
    pub name: String,
    /// This instance's id, unique in the fleet (default: the host name).
    pub instance: String,
    /// The instance's session lease: a leader that stops renewing it loses the lead
    /// within this long; a dead instance's telemetry stops counting after it.
    pub lease_ttl: Duration,
    /// Longest wait for one etcd call; past it the store counts as unreachable.
    pub timeout: Duration,
    /// How often this instance publishes its per-pool counters for the fleet's guard.
    pub publish_interval: Duration,
    /// CA bundle (PEM) to verify etcd's certificate with; `https://` endpoints only.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user; its password is read from the environment variable named by
    /// `password_env` (never from the config file).
    pub username: Option<String>,
    pub password_env: Option<String>,
}

impl FleetConfig {
    /// The key prefix every fleet key lives under.
    pub fn prefix(&self) -> String {
        format!("/weir/v1/{}/", self.name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Tokio worker threads; 0 means one per CPU.
    pub workers: usize,
    pub connect_timeout: Duration,
    /// From the request being sent upstream until its response headers arrive.
    pub request_timeout: Duration,
    /// How long an idle upstream keep-alive connection is kept. Shorter than the 5 s that
    /// Node.js and Apache use by default, so weir closes first and never reuses a
    /// connection the upstream is closing.
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_endpoint: usize,
    /// On SIGTERM/SIGINT: how long open requests may take to finish.
    pub shutdown_grace: Duration,
    /// A client must send a whole request head within this long. hyper starts the same
    /// timer when a keep-alive connection waits for its next request, so it is also
    /// the client idle timeout.
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body; then 408.
    pub body_read_timeout: Duration,
    /// An upstream response body that sends nothing for this long is cut and counted as
    /// the pool's `timeout`.
    pub upstream_body_timeout: Duration,
    /// Largest request head accepted; bigger gets 431.
    pub max_header_bytes: usize,
    /// Client connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// The HTTPS listener, when configured.
    pub tls: Option<TlsConfig>,
}

/// `[proxy] tls_listen` with `tls_cert`/`tls_key` and `[[proxy.certs]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// For clients without SNI or with a name no other certificate covers.
    pub default: Option<CertConfig>,
    /// Chosen by SNI.
    pub certs: Vec<CertConfig>,
}

/// A PEM certificate chain and its key; `hosts` for SNI (empty for the default).
#[derive(Debug, Clone, PartialEq)]
pub struct CertConfig {
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// File holding the bearer token for `/api/` (else `WEIR_ADMIN_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// Put `/metrics` behind the admin token too.
    pub metrics_auth: bool,
    /// Host names (no port) the admin API answers to besides IP literals and
    /// `localhost` (DNS-rebinding defence), e.g. `weir` for Prometheus in a container.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    /// Lower-cased host names without port; empty for the default service.
    pub hosts: Vec<String>,
    pub baseline: String,
    pub pools: Vec<PoolConfig>,
    /// The SLO guard's settings; `None` means the guard only watches, never acts.
    pub slo: Option<SloConfig>,
    pub targeting: TargetingConfig,
    pub sticky: Option<StickyConfig>,
    /// `strategy` with `[service.rollout]`: the plan a rollout follows.
    pub rollout: Option<RolloutConfig>,
    /// gRPC status codes that count as a failure of the pool, one bit per code
    /// (`grpc_failure_codes`; default [`crate::model::GRPC_DEFAULT_FAILURES`]).
    pub grpc_failure_codes: u32,
    /// `[[service.analysis]]`: named Prometheus checks that steps and the whole
    /// rollout can run.
    pub analysis: Vec<AnalysisTemplate>,
    /// `[service.rollout] analysis = [...]`: templates measured all through a rollout
    /// (Argo's background analysis); a failure ends it degraded.
    pub background_analysis: Vec<String>,
    /// `[[service.rollout.webhooks]]`, in file order.
    pub webhooks: Vec<HookConfig>,
    /// `[service.slo] analysis = [...]`: templates the guard measures on any candidate
    /// pool that has traffic, rollout or not; a failure past the limit is a revert.
    pub guard_analysis: Vec<String>,
    /// `[[service.freeze]]`: this service's own freeze windows (besides the global ones).
    pub freeze: Vec<FreezeWindow>,
}

impl ServiceConfig {
    /// The analysis template called `name`.
    pub fn analysis_template(&self, name: &str) -> Option<&AnalysisTemplate> {
        self.analysis.iter().find(|t| t.name == name)
    }

    /// The webhooks of one kind, in file order.
    pub fn hooks(&self, kind: HookKind) -> impl Iterator<Item = &HookConfig> {
        self.webhooks.iter().filter(move |h| h.kind == kind)
    }
}

/// `[[service.analysis]]`: a Prometheus instant query and what its value must be
/// (Argo's AnalysisTemplate, Flagger's metric template).
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisTemplate {
    pub name: String,
    /// Prometheus base URL (`http://host:9090`); the query goes to `/api/v1/query`.
    pub prometheus: String,
    /// PromQL; `{{service}}`, `{{candidate}}` and `{{stable}}` are replaced first.
    pub query: String,
    pub success: Threshold,
    /// Time between measurements (the first is one interval after the step begins, so
    /// the candidate has served traffic by then).
    pub interval: Duration,
    /// Measurements a step needs; a background analysis measures until the rollout ends.
    pub count: u32,
    /// Failed measurements (or errors) tolerated; one more fails the analysis.
    pub failure_limit: u32,
    pub no_data: NoData,
    /// Longest wait for Prometheus' answer; past it the measurement is an error.
    pub timeout: Duration,
}

/// What a measurement's value must satisfy: `">= 0.99"`, `"< 0.5"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub op: Comparison,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Lt,
    Le,
    Gt,
    Ge,
}

impl Threshold {
    pub fn parse(s: &str) -> Result<Threshold, String> {
        let s = s.trim();
        let (op, rest) = if let Some(r) = s.strip_prefix(">=") {
            (Comparison::Ge, r)
        } else if let Some(r) = s.strip_prefix("<=") {
            (Comparison::Le, r)
        } else if let Some(r) = s.strip_prefix('>') {
            (Comparison::Gt, r)
        } else if let Some(r) = s.strip_prefix('<') {
            (Comparison::Lt, r)
        } else {
            return Err(format!(
                "`{s}`: write a comparison and a number, e.g. \">= 0.99\" or \"< 0.5\""
            ));
        };
        let value: f64 = rest
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: `{}` is not a number", rest.trim()))?;
        if !value.is_finite() {
            return Err(format!("`{s}`: the number must be finite"));
        }
        Ok(Threshold { op, value })
    }

    pub fn holds(&self, v: f64) -> bool {
        match self.op {
            Comparison::Lt => v < self.value,
            Comparison::Le => v <= self.value,
            Comparison::Gt => v > self.value,
            Comparison::Ge => v >= self.value,
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Comparison::Lt => "<",
            Comparison::Le => "<=",
            Comparison::Gt => ">",
            Comparison::Ge => ">=",
        };
        write!(f, "{op} {}", self.value)
    }
}

/// What a query that returns no sample counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoData {
    Fail,
    Pass,
    /// Neither: measured again at the next interval, not counted.
    Inconclusive,
}

/// When a rollout webhook is called (Flagger's webhook types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    /// Before the candidate gets any traffic: a failure aborts the rollout.
    PreRollout,
    /// With every analysis measurement (a load test): a failure counts as a failed
    /// measurement.
    Rollout,
    /// Before promotion: anything but 2xx holds the rollout until it answers 2xx.
    ConfirmPromotion,
    /// After the rollout ended (promoted, aborted, degraded): recorded only.
    PostRollout,
}

impl HookKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::PreRollout => "pre-rollout",
            HookKind::Rollout => "rollout",
            HookKind::ConfirmPromotion => "confirm-promotion",
            HookKind::PostRollout => "post-rollout",
        }
    }
}

/// `[[service.rollout.webhooks]]`: an HTTP endpoint weir POSTs JSON to.
#[derive(Debug, Clone, PartialEq)]
pub struct HookConfig {
    /// Names it in events (default: the kind and its position).
    pub name: String,
    pub kind: HookKind,
    pub url: String,
    pub timeout: Duration,
    /// Sent as `metadata` in the body.
    pub metadata: IndexMap<String, String>,
}

/// A period in which rollouts neither start nor advance.
#[derive(Debug, Clone, PartialEq)]
pub struct FreezeWindow {
    /// Shown in refusals and status.
    pub reason: String,
    pub when: FreezeTime,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FreezeTime {
    /// From `start` (inclusive) to `end` (exclusive).
    Absolute {
        start: std::time::SystemTime,
        end: std::time::SystemTime,
    },
    /// Every week on `days` (0 = Monday), from `from` to `to` minutes after midnight in
    /// a fixed UTC offset (`to` may be 1440, the end of the day).
    Weekly {
        days: [bool; 7],
        from: u32,
        to: u32,
        offset_secs: i32,
    },
}

/// A service's rollout plan.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutConfig {
    Canary {
        candidate: String,
        steps: Vec<crate::model::Step>,
    },
    BlueGreen {
        candidate: String,
        auto_promote_after: Option<Duration>,
        gate: Option<u64>,
        rollback_window: Option<Duration>,
    },
}

impl RolloutConfig {
    pub fn candidate(&self) -> &str {
        match self {
            RolloutConfig::Canary { candidate, .. }
            | RolloutConfig::BlueGreen { candidate, .. } => candidate,
        }
    }
}

/// `[service.targeting]`: requests that name a pool go to it, whatever its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetingConfig {
    pub header: String,
    pub cookie: String,
    pub override_token: Option<String>,
}

impl Default for TargetingConfig {
    fn default() -> Self {
        TargetingConfig {
            header: "x-weir-pool".into(),
            cookie: "weir-pool".into(),
            override_token: None,
        }
    }
}

/// `[service.sticky]`: where a user's identity comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum StickyConfig {
    Cookie { name: String, max_age: Duration },
    Header(String),
    ClientIp,
}

/// Whether the guard moves traffic or only says what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardMode {
    Enforce,
    DryRun,
}

impl GuardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardMode::Enforce => "enforce",
            GuardMode::DryRun => "dry-run",
        }
    }
}

/// `[service.slo]`: what the guard judges each candidate pool against.
#[derive(Debug, Clone, PartialEq)]
pub struct SloConfig {
    /// The long window every check is evaluated over.
    pub window: Duration,
    /// A short recent window checked too, so a sudden breakage is seen in seconds and
    /// not diluted by the long window's good history.
    pub fast_window: Duration,
    /// Evaluation period; also the length of the window's time slices.
    pub interval: Duration,
    /// Fewer requests than this in a window: inconclusive.
    pub min_requests: u64,
    pub max_error_rate: Option<f64>,
    pub max_p99_latency: Option<Duration>,
    /// Candidate error rate minus the baseline's.
    pub max_error_rate_increase: Option<f64>,
    /// Candidate p99 / baseline p99.
    pub max_p99_ratio: Option<f64>,
    /// Consecutive breached evaluations before acting.
    pub breaches_to_act: u32,
    pub mode: GuardMode,
    /// Rollback events are POSTed here as JSON.
    pub webhook: Option<http::Uri>,
    /// Which latency the p99 checks judge.
    pub latency: LatencyMeasure,
    /// The probability that the sequential tests ever blame a candidate that is not
    /// worse, over a whole exposure (one rollout step, or one weight setting).
    pub alpha: f64,
}

/// `[service.slo] latency`: time to response headers (default; what users wait for
/// before anything happens, and unaffected by long downloads and streams) or time to
/// the response's last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyMeasure {
    #[default]
    Headers,
    LastByte,
}

impl Default for SloConfig {
    fn default() -> Self {
        SloConfig {
            window: Duration::from_secs(30),
            fast_window: Duration::from_secs(3),
            interval: Duration::from_secs(1),
            min_requests: 50,
            max_error_rate: None,
            max_p99_latency: None,
            max_error_rate_increase: None,
            max_p99_ratio: None,
            breaches_to_act: 2,
            mode: GuardMode::Enforce,
            webhook: None,
            latency: LatencyMeasure::Headers,
            alpha: 0.01,
        }
    }
}

impl ServiceConfig {
    pub fn is_default(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub weight: u32,
    /// Active health checks; `None`: endpoints are assumed healthy.
    pub health: Option<HealthConfig>,
    /// Passive ejection of endpoints that keep failing.
    pub outlier: OutlierConfig,
    /// How weir talks to this pool's endpoints.
    pub protocol: UpstreamProtocol,
    /// TLS to the endpoints (`tls = true`).
    pub tls: Option<UpstreamTlsConfig>,
    /// The version label the pool starts with (`version`); a release replaces it.
    pub version: Option<String>,
}

/// Longest version label: it is a metric label value and a column of `weir ctl history`.
pub const MAX_VERSION_LEN: usize = 64;

/// Check a version label: 1..=64 visible ASCII characters (no spaces or controls), so
/// that it reads the same in a terminal, a log line and a Prometheus label.
pub fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err("a version must not be empty".into());
    }
    if v.len() > MAX_VERSION_LEN {
        return Err(format!(
            "a version is at most {MAX_VERSION_LEN} characters, got {}",
            v.len()
        ));
    }
    if let Some(c) = v.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "a version is printable ASCII without spaces; {c:?} is not allowed"
        ));
    }
    Ok(())
}

/// TLS to a pool's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamTlsConfig {
    /// PEM CA certificates to trust; the system roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Name to verify the endpoints' certificates against (and send as SNI); the
    /// endpoint's host when absent.
    pub server_name: Option<String>,
}

/// `protocol` of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP (gRPC backends): one multiplexed
    /// connection per endpoint.
    H2c,
    /// HTTP/2 over TLS (ALPN h2), multiplexed like h2c.
    H2,
}

/// `[service.pools.NAME.health]`: an HTTP GET per endpoint on a timer.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Inclusive range of statuses that count as healthy.
    pub expect_status: (u16, u16),
}

/// `[service.pools.NAME.outlier]`: Envoy-style consecutive-failure ejection.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub enabled: bool,
    /// Consecutive 5xx or connect failures from one endpoint that eject it.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further one of the same endpoint doubles it.
    pub base_ejection_time: Duration,
    /// Never eject more than this share of a pool's endpoints.
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            enabled: true,
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }
}

/// An upstream address as `host:port` (an IP or a DNS name, resolved at connect time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub authority: Authority,
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let s = s.trim();
        if s.contains("://") {
            return Err(format!("`{s}` must be host:port without a scheme"));
        }
        if let Some(port) = bad_port(s) {
            return Err(format!("`{s}`: {port}"));
        }
        let authority =
            Authority::from_str(s).map_err(|_| format!("`{s}` is not a valid host:port"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{s}` must not contain user info"));
        }
        match authority.port_u16() {
            Some(0) | None => Err(format!("`{s}` needs a port, e.g. `{s}:8080`")),
            Some(_) if authority.host().is_empty() => Err(format!("`{s}` has no host")),
            Some(_) => Ok(Endpoint { authority }),
        }
    }

    pub fn as_str(&self) -> &str {
        self.authority.as_str()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing wrong with a config file, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `service[shop].pools.canary.weight`; empty for syntax errors.
    pub key: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
                if let Some(col) = p.column {
                    write!(f, ":{col}")?;
                }
            }
            if p.key.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                key: String::new(),
                line: None,
                column: None,
                message: format!("cannot read config file: {e}"),
            }],
        })?;
        Config::parse(&src, &file)
    }

    /// Parse and validate config text; `file` only names the source in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(src).map_err(|e| {
            let (line, column, key) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(src, span.start);
                    (Some(l), Some(c), key_path_at(src, span.start))
                }
                None => (None, None, String::new()),
            };
            ConfigError {
                file: file.to_owned(),
                problems: vec![Problem {
                    key,
                    line,
                    column,
                    message: plain_serde_message(e.message()),
                }],
            }
        })?;
        let mut v = Validator {
            src,
            problems: Vec::new(),
        };
        let config = v.config(raw);
        // Report in file order, whatever order the checks ran in.
        v.problems.sort_by_key(|p| p.line);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: file.to_owned(),
                problems: v.problems,
            })
        }
    }

    /// The one-line summary `weir check` prints for a valid file.
    /// The line `weir check` prints on success. It names the first few services only:
    /// a config of thousands of services would otherwise print one line of megabytes,
    /// which buries the "ok" that a person or a deploy script is looking for.
    pub fn summary(&self) -> String {
        let services: Vec<String> = self
            .services
            .iter()
            .take(SUMMARY_SERVICES)
            .map(|s| {
                let pools: Vec<String> = s
                    .pools
                    .iter()
                    .map(|p| format!("{}={}", p.name, p.weight))
                    .collect();
                let hosts = if s.is_default() {
                    "default".to_owned()
                } else {
                    s.hosts.join(",")
                };
                format!("{} [{}] ({})", s.name, hosts, pools.join(" "))
            })
            .collect();
        let pools: usize = self.services.iter().map(|s| s.pools.len()).sum();
        let more = match self.services.len().saturating_sub(SUMMARY_SERVICES) {
            0 => String::new(),
            n => format!("; and {n} more (`weir ctl status` lists them all)"),
        };
        format!(
            "ok: {} service(s), {} pool(s): {}{more}",
            self.services.len(),
            pools,
            services.join("; ")
        )
    }
}

/// How many services `weir check`'s summary names before it only counts the rest.
const SUMMARY_SERVICES: usize = 10;

/// The key path of whatever sits at byte `pos` of `src`, in the validator's notation
/// (`service[shop].pools.canary.weight`), for the errors serde reports with a span only
/// (type mismatches, unknown keys, integers out of range). Empty when the text does not
/// even parse as TOML (a syntax error has no key to name).
fn key_path_at(src: &str, pos: usize) -> String {
    use toml::de::{DeTable, DeValue};

    /// One key anywhere in the document: its path, spans, and whether its table was
    /// opened by a `[header]` (whose span covers only the header, not the keys below it).
    struct Entry {
        path: String,
        key: std::ops::Range<usize>,
        value: std::ops::Range<usize>,
        header: bool,
    }

    fn walk(src: &str, prefix: &str, value: &Spanned<DeValue<'_>>, out: &mut Vec<Entry>) {
        match value.get_ref() {
            DeValue::Table(table) => {
                for (k, v) in table.iter() {
                    let path = if prefix.is_empty() {
                        k.get_ref().to_string()
                    } else {
                        format!("{prefix}.{}", k.get_ref())
                    };
                    out.push(Entry {
                        path: path.clone(),
                        key: k.span(),
                        value: v.span(),
                        header: v.get_ref().is_table()
                            && src.as_bytes().get(v.span().start) == Some(&b'['),
                    });
                    walk(src, &path, v, out);
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    // Elements with a name are named as the validator names them.
                    let label = match item.get_ref().get("name").map(|n| n.get_ref()) {
                        Some(DeValue::String(name)) => name.to_string(),
                        _ => i.to_string(),
                    };
                    let path = format!("{prefix}[{label}]");
                    out.push(Entry {
                        path: path.clone(),
                        key: item.span(),
                        value: item.span(),
                        header: item.get_ref().is_table()
                            && src.as_bytes().get(item.span().start) == Some(&b'['),
                    });
                    walk(src, &path, item, out);
                }
            }
            _ => {}
        }
    }

    let Ok(doc) = DeTable::parse(src) else {
        return String::new();
    };
    let mut entries = Vec::new();
    let root = Spanned::new(doc.span(), DeValue::Table(doc.into_inner()));
    walk(src, "", &root, &mut entries);
    // The innermost key or value that holds `pos`…
    let exact = entries
        .iter()
        .filter(|e| e.key.contains(&pos) || e.value.contains(&pos))
        .max_by_key(|e| e.path.len());
    if let Some(e) = exact {
        return e.path.clone();
    }
    // …else the `[table]` or `[[array]]` whose header comes last before it (an error
    // about the table as a whole, such as a missing key).
    entries
        .iter()
        .filter(|e| e.header && e.value.start <= pos)
        .max_by_key(|e| e.value.start)
        .map(|e| e.path.clone())
        .unwrap_or_default()
}

/// serde's wording in an operator's terms: Rust type names mean nothing in a config file.
fn plain_serde_message(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: integer `")
        && let Some((n, tail)) = rest.split_once('`')
        && tail.contains("expected i64")
    {
        return format!(
            "integer {n} is out of range (from {} to {})",
            i64::MIN,
            i64::MAX
        );
    }
    message
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number")
        .replace("expected a boolean", "expected true or false")
}

/// `host:port` text whose port is digits but not a usable port, said plainly: the address
/// parsers only report "invalid", which sends an operator looking at the host.
fn bad_port(s: &str) -> Option<String> {
    let (_, port) = s.trim().rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match port.parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => None,
        _ => Some(format!("port {port} is out of range (1–65535)")),
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// This host's name, the default instance id: `HOSTNAME`, else /etc/hostname, else
/// "weir".
fn default_instance() -> String {
    let clean = |s: String| {
        let s: String = s
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .take(128)
            .collect();
        (!s.is_empty()).then_some(s)
    };
    std::env::var("HOSTNAME")
        .ok()
        .and_then(clean)
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .and_then(clean)
        })
        .unwrap_or_else(|| "weir".to_owned())
}

// ---- stage one: raw shapes --------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    state: RawState,
    fleet: Option<Spanned<RawFleet>>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    #[serde(default)]
    freeze: Vec<Spanned<RawFreeze>>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Spanned<String>>,
    access: Option<RawAccessLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFreeze {
    reason: Option<String>,
    start: Option<String>,
    end: Option<String>,
    days: Option<Vec<String>>,
    from: Option<String>,
    to: Option<String>,
    timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    name: Spanned<String>,
    prometheus: Spanned<String>,
    query: Spanned<String>,
    success: Spanned<String>,
    interval: Option<Spanned<String>>,
    count: Option<Spanned<i64>>,
    failure_limit: Option<Spanned<i64>>,
    no_data: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    name: Option<String>,
    kind: Spanned<String>,
    url: Spanned<String>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    metadata: IndexMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    enabled: Option<bool>,
    sample: Option<Spanned<RawNumber>>,
    errors: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    include_query: Option<bool>,
}

/// A number written either way (`sample = 1` or `sample = 0.5`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum RawNumber {
    Integer(i64),
    Float(f64),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<Spanned<String>>,
    workers: Option<Spanned<i64>>,
    connect_timeout: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    pool_idle_timeout: Option<Spanned<String>>,
    pool_max_idle_per_endpoint: Option<Spanned<i64>>,
    shutdown_grace: Option<Spanned<String>>,
    header_read_timeout: Option<Spanned<String>>,
    body_read_timeout: Option<Spanned<String>>,
    upstream_body_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    tls_listen: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    #[serde(default)]
    certs: Vec<Spanned<RawCert>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    hosts: Vec<String>,
    cert: String,
    key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    metrics_auth: Option<bool>,
    allowed_hosts: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    endpoints: Spanned<Vec<Spanned<String>>>,
    name: Spanned<String>,
    instance: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    publish_interval: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    hosts: Option<Spanned<Vec<Spanned<String>>>>,
    baseline: Spanned<String>,
    pools: Spanned<IndexMap<String, RawPool>>,
    slo: Option<Spanned<RawSlo>>,
    targeting: Option<Spanned<RawTargeting>>,
    sticky: Option<Spanned<RawSticky>>,
    strategy: Option<Spanned<String>>,
    rollout: Option<Spanned<RawRollout>>,
    grpc_failure_codes: Option<Spanned<Vec<Spanned<RawGrpcCode>>>>,
    #[serde(default)]
    analysis: Vec<Spanned<RawAnalysis>>,
    #[serde(default)]
    freeze: Vec<Spanned<RawFreeze>>,
}

/// A gRPC status code in config: its name (`"UNAVAILABLE"`, any case) or number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawGrpcCode {
    Number(i64),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    candidate: Spanned<String>,
    steps: Option<Spanned<Vec<Spanned<RawStep>>>>,
    auto_promote_after: Option<Spanned<String>>,
    gate: Option<Spanned<RawGate>>,
    rollback_window: Option<Spanned<String>>,
    analysis: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    webhooks: Vec<Spanned<RawHook>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    percent: Option<f64>,
    pause: Option<String>,
    gate: Option<RawGate>,
    analysis: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    min_requests: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargeting {
    header: Option<Spanned<String>>,
    cookie: Option<Spanned<String>>,
    override_token: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSticky {
    cookie: Option<Spanned<String>>,
    header: Option<Spanned<String>>,
    client_ip: Option<Spanned<bool>>,
    max_age: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlo {
    window: Option<Spanned<String>>,
    fast_window: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    min_requests: Option<Spanned<i64>>,
    max_error_rate: Option<Spanned<f64>>,
    max_p99_latency: Option<Spanned<String>>,
    max_error_rate_increase: Option<Spanned<f64>>,
    max_p99_ratio: Option<Spanned<f64>>,
    breaches_to_act: Option<Spanned<i64>>,
    mode: Option<GuardMode>,
    webhook: Option<Spanned<String>>,
    latency: Option<LatencyMeasure>,
    alpha: Option<Spanned<f64>>,
    analysis: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    endpoints: Spanned<Vec<Spanned<String>>>,
    weight: Spanned<i64>,
    health: Option<Spanned<RawHealth>>,
    outlier: Option<Spanned<RawOutlier>>,
    protocol: Option<Spanned<String>>,
    tls: Option<Spanned<bool>>,
    ca_file: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    healthy_threshold: Option<Spanned<i64>>,
    unhealthy_threshold: Option<Spanned<i64>>,
    expect_status: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    enabled: Option<bool>,
    consecutive_failures: Option<Spanned<i64>>,
    base_ejection_time: Option<Spanned<String>>,
    max_ejection_percent: Option<Spanned<i64>>,
}

// ---- stage two: meaning -----------------------------------------------------------

struct Validator<'a> {
    src: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn problem<T>(&mut self, key: impl Into<String>, at: &Spanned<T>, message: impl Into<String>) {
        let (line, _) = line_col(self.src, at.span().start);
        self.problems.push(Problem {
            key: key.into(),
            line: Some(line),
            column: None,
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let proxy = self.proxy(raw.proxy);
        let admin = AdminConfig {
            listen: self.addr("admin.listen", raw.admin.listen.as_ref(), "127.0.0.1:9901"),
            token_file: raw
                .admin
                .token_file
                .as_ref()
                .map(|t| PathBuf::from(t.get_ref())),
            metrics_auth: raw.admin.metrics_auth.unwrap_or(false),
            allowed_hosts: raw
                .admin
                .allowed_hosts
                .as_ref()
                .map(|list| {
                    list.get_ref()
                        .iter()
                        .filter_map(|h| match normalize_host(h.get_ref()) {
                            Ok(name) if name != "*" && !name.starts_with('[') => Some(name),
                            Ok(_) => {
                                self.problem(
                                    "admin.allowed_hosts",
                                    h,
                                    format!(
                                        "`{}`: list host names; IP literals are always allowed and wildcards never",
                                        h.get_ref()
                                    ),
                                );
                                None
                            }
                            Err(msg) => {
                                self.problem("admin.allowed_hosts", h, msg);
                                None
                            }
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        if let Some(t) = &raw.admin.token_file
            && t.get_ref().trim().is_empty()
        {
            self.problem(
                "admin.token_file",
                t,
                "must not be empty; omit it to use WEIR_ADMIN_TOKEN",
            );
        }
        let state = StateConfig {
            dir: PathBuf::from(
                raw.state
                    .dir
                    .as_ref()
                    .map_or("var/weir", |d| d.get_ref().as_str()),
            ),
        };
        if let Some(dir) = &raw.state.dir
            && dir.get_ref().trim().is_empty()
        {
            self.problem("state.dir", dir, "must not be empty");
        }
        let fleet = raw.fleet.as_ref().map(|f| self.fleet(f));
        let services = self.services(raw.services);
        let freeze = self.freeze_windows("freeze", &raw.freeze);
        let log = self.log(raw.log);
        Config {
            proxy,
            admin,
            state,
            fleet,
            services,
            freeze,
            log,
        }
    }

    fn log(&mut self, raw: RawLog) -> LogConfig {
        let format = match &raw.format {
            Some(f) => f.get_ref().parse().unwrap_or_else(|msg| {
                self.problem("log.format", f, msg);
                LogFormat::Text
            }),
            None => LogFormat::Text,
        };
        let mut access = AccessLogConfig::default();
        if let Some(a) = raw.access {
            access.enabled = a.enabled.unwrap_or(false);
            access.include_query = a.include_query.unwrap_or(false);
            if let Some(sample) = &a.sample {
                let value = match *sample.get_ref() {
                    RawNumber::Integer(i) => i as f64,
                    RawNumber::Float(f) => f,
                };
                // `!(> 0)` also catches NaN.
                if !(value > 0.0 && value <= 1.0) {
                    self.problem(
                        "log.access.sample",
                        sample,
                        format!(
                            "`{value}` is not a fraction of requests: use a number above 0 \
                             and at most 1 (0.1 logs one request in ten)"
                        ),
                    );
                } else {
                    access.sample = value;
                }
            }
            if let Some(errors) = &a.errors {
                match errors.get_ref().as_str() {
                    "all" => access.all_errors = true,
                    "sampled" => access.all_errors = false,
                    other => self.problem(
                        "log.access.errors",
                        errors,
                        format!(
                            "`{other}`: use \"all\" (every failed request is logged) or \
                             \"sampled\" (failed requests are sampled like the rest)"
                        ),
                    ),
                }
            }
            if let Some(path) = &a.path {
                if path.get_ref().trim().is_empty() {
                    self.problem(
                        "log.access.path",
                        path,
                        "must not be empty; omit it to log to standard output",
                    );
                } else {
                    access.path = Some(PathBuf::from(path.get_ref()));
                }
            }
        }
        LogConfig { format, access }
    }

    fn fleet(&mut self, raw: &Spanned<RawFleet>) -> FleetConfig {
        let f = raw.get_ref();
        let endpoints: Vec<String> = f
            .endpoints
            .get_ref()
            .iter()
            .filter_map(|e| {
                let url = e.get_ref().trim().trim_end_matches('/');
                let ok = ["http://", "https://"].iter().any(|scheme| {
                    url.strip_prefix(scheme).is_some_and(|rest| {
                        !rest.is_empty() && !rest.contains('/') && !rest.contains('@')
                    })
                });
                if ok {
                    Some(url.to_owned())
                } else {
                    self.problem(
                        "fleet.endpoints",
                        e,
                        format!(
                            "`{}` is not an etcd client URL (e.g. \"http://10.0.0.1:2379\")",
                            e.get_ref()
                        ),
                    );
                    None
                }
            })
            .collect();
        if f.endpoints.get_ref().is_empty() {
            self.problem(
                "fleet.endpoints",
                &f.endpoints,
                "name at least one etcd endpoint",
            );
        }
        let name = f.name.get_ref().clone();
        if name.is_empty()
            || name.len() > 63
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            self.problem(
                "fleet.name",
                &f.name,
                format!("`{name}`: use 1 to 63 lower-case letters, digits and `-`"),
            );
        }
        let instance = match &f.instance {
            Some(i) => {
                let id = i.get_ref().clone();
                if id.is_empty()
                    || id.len() > 128
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    self.problem(
                        "fleet.instance",
                        i,
                        format!("`{id}`: use 1 to 128 letters, digits, `-`, `_` and `.`"),
                    );
                }
                id
            }
            None => default_instance(),
        };
        let lease_ttl = self.duration(
            "fleet.lease_ttl",
            f.lease_ttl.as_ref(),
            Duration::from_secs(3),
        );
        if let Some(l) = &f.lease_ttl
            && !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&lease_ttl)
        {
            self.problem(
                "fleet.lease_ttl",
                l,
                "must be between 1s and 60s (etcd raises shorter leases to its own minimum)",
            );
        }
        let timeout = self.duration("fleet.timeout", f.timeout.as_ref(), Duration::from_secs(2));
        if let Some(t) = &f.timeout
            && !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timeout)
        {
            self.problem("fleet.timeout", t, "must be between 100ms and 60s");
        }
        let publish_interval = self.duration(
            "fleet.publish_interval",
            f.publish_interval.as_ref(),
            Duration::from_millis(500),
        );
        if let Some(p) = &f.publish_interval
            && !(Duration::from_millis(50)..=Duration::from_millis(500)).contains(&publish_interval)
        {
            self.problem(
                "fleet.publish_interval",
                p,
                "must be between 50ms and 500ms: the fleet's guard judges what was published",
            );
        }
        let path = |this: &mut Self, key: &str, v: &Option<Spanned<String>>| {
            v.as_ref().and_then(|p| {
                if p.get_ref().trim().is_empty() {
                    this.problem(key, p, "must not be empty");
                    None
                } else {
                    Some(PathBuf::from(p.get_ref()))
                }
            })
        };
        let ca_file = path(self, "fleet.ca_file", &f.ca_file);
        let cert_file = path(self, "fleet.cert_file", &f.cert_file);
        let key_file = path(self, "fleet.key_file", &f.key_file);
        if cert_file.is_some() != key_file.is_some() {
            self.problem(
                "fleet",
                raw,
                "cert_file and key_file go together (mutual TLS with etcd)",
            );
        }
        if (ca_file.is_some() || cert_file.is_some())
            && endpoints.iter().any(|e| e.starts_with("http://"))
        {
            self.problem(
                "fleet.endpoints",
                &f.endpoints,
                "TLS files are set, so every endpoint must be https://",
            );
        }
        if f.username.is_some() != f.password_env.is_some() {
            self.problem(
                "fleet",
                raw,
                "username and password_env go together (the password is read from that \
                 environment variable)",
            );
        }
        FleetConfig {
            endpoints,
            name,
            instance,
            lease_ttl,
            timeout,
            publish_interval,
            ca_file,
            cert_file,
            key_file,
            username: f.username.as_ref().map(|u| u.get_ref().clone()),
            password_env: f.password_env.as_ref().map(|u| u.get_ref().clone()),
        }
    }

    fn proxy(&mut self, raw: RawProxy) -> ProxyConfig {
        let listen = self.addr("proxy.listen", raw.listen.as_ref(), "127.0.0.1:8080");
        let workers = match &raw.workers {
            Some(w) if !(0..=1024).contains(w.get_ref()) => {
                self.problem(
                    "proxy.workers",
                    w,
                    "must be between 0 (one per CPU) and 1024",
                );
                0
            }
            Some(w) => *w.get_ref() as usize,
            None => 0,
        };
        let pool_max_idle_per_endpoint = match &raw.pool_max_idle_per_endpoint {
            Some(n) if !(0..=65_536).contains(n.get_ref()) => {
                self.problem(
                    "proxy.pool_max_idle_per_endpoint",
                    n,
                    "must be between 0 and 65536",
                );
                0
            }
            Some(n) => *n.get_ref() as usize,
            None => 1024,
        };
        ProxyConfig {
            listen,
            workers,
            connect_timeout: self.duration(
                "proxy.connect_timeout",
                raw.connect_timeout.as_ref(),
                Duration::from_secs(2),
            ),
            request_timeout: self.duration(
                "proxy.request_timeout",
                raw.request_timeout.as_ref(),
                Duration::from_secs(30),
            ),
            pool_idle_timeout: self.duration(
                "proxy.pool_idle_timeout",
                raw.pool_idle_timeout.as_ref(),
                Duration::from_secs(4),
            ),
            pool_max_idle_per_endpoint,
            header_read_timeout: self.duration(
                "proxy.header_read_timeout",
                raw.header_read_timeout.as_ref(),
                Duration::from_secs(10),
            ),
            body_read_timeout: self.duration(
                "proxy.body_read_timeout",
                raw.body_read_timeout.as_ref(),
                Duration::from_secs(30),
            ),
            upstream_body_timeout: self.duration(
                "proxy.upstream_body_timeout",
                raw.upstream_body_timeout.as_ref(),
                Duration::from_secs(60),
            ),
            max_header_bytes: self.count(
                "proxy.max_header_bytes".into(),
                raw.max_header_bytes.as_ref(),
                64 * 1024,
                (8192, 1 << 24),
            ) as usize,
            max_connections: self.count(
                "proxy.max_connections".into(),
                raw.max_connections.as_ref(),
                10_000,
                (1, 1_000_000),
            ) as usize,
            tls: self.tls(&raw),
            shutdown_grace: self.duration(
                "proxy.shutdown_grace",
                raw.shutdown_grace.as_ref(),
                Duration::from_secs(30),
            ),
        }
    }

    fn addr(&mut self, key: &str, raw: Option<&Spanned<String>>, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default.parse().expect("default address parses");
        let Some(raw) = raw else { return fallback };
        match raw.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let msg = match bad_port(raw.get_ref()) {
                    Some(port) => format!("`{}`: {port}", raw.get_ref()),
                    None => format!(
                        "`{}` is not an IP:port address (e.g. \"{default}\")",
                        raw.get_ref()
                    ),
                };
                self.problem(key, raw, msg);
                fallback
            }
        }
    }

    fn duration(
        &mut self,
        key: &str,
        raw: Option<&Spanned<String>>,
        default: Duration,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match parse_duration(raw.get_ref()) {
            Ok(d) => d,
            Err(msg) => {
                self.problem(key, raw, msg);
                default
            }
        }
    }

    fn services(&mut self, raw: Vec<RawService>) -> Vec<ServiceConfig> {
        if raw.is_empty() {
            self.problems.push(Problem {
                key: "service".into(),
                line: None,
                column: None,
                message: "no [[service]] defined; weir needs at least one".into(),
            });
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut hosts: HashMap<String, (usize, String)> = HashMap::new();
        let mut default: Option<String> = None;
        let mut out = Vec::with_capacity(raw.len());
        for (i, rs) in raw.into_iter().enumerate() {
            let name = rs.name.get_ref().clone();
            let key = if name.is_empty() {
                format!("service[{i}]")
            } else {
                format!("service[{name}]")
            };
            if let Err(msg) = check_name(&name) {
                self.problem(format!("{key}.name"), &rs.name, msg);
            }
            if let Some(first) = names.insert(name.clone(), i) {
                self.problem(
                    format!("{key}.name"),
                    &rs.name,
                    format!(
                        "duplicate service name `{name}` (also service #{})",
                        first + 1
                    ),
                );
            }
            let mut svc_hosts = Vec::new();
            match &rs.hosts {
                None => {
                    if let Some(other) = &default {
                        self.problem(
                            format!("{key}.hosts"),
                            &rs.name,
                            format!(
                                "more than one default service (`{other}` has no hosts either); \
                                 give one of them `hosts = [...]`"
                            ),
                        );
                    } else {
                        default = Some(name.clone());
                    }
                }
                Some(list) if list.get_ref().is_empty() => self.problem(
                    format!("{key}.hosts"),
                    list,
                    "is empty; omit the key to make this the default service",
                ),
                Some(list) => {
                    for h in list.get_ref() {
                        match normalize_host(h.get_ref()) {
                            Err(msg) => self.problem(format!("{key}.hosts"), h, msg),
                            Ok(host) => {
                                if let Some((owner_index, owner)) = hosts.get(&host) {
                                    let msg = if *owner_index == i {
                                        format!("host `{host}` is listed twice")
                                    } else {
                                        format!(
                                            "host `{host}` is already used by service `{owner}`"
                                        )
                                    };
                                    self.problem(format!("{key}.hosts"), h, msg);
                                } else {
                                    hosts.insert(host.clone(), (i, name.clone()));
                                    svc_hosts.push(host);
                                }
                            }
                        }
                    }
                }
            }
            let pools = self.pools(&key, &rs.pools);
            let baseline = rs.baseline.get_ref().clone();
            if !rs.pools.get_ref().contains_key(&baseline) {
                let known: Vec<&str> = rs.pools.get_ref().keys().map(String::as_str).collect();
                self.problem(
                    format!("{key}.baseline"),
                    &rs.baseline,
                    format!(
                        "`{baseline}` is not a pool of this service (pools: {})",
                        known.join(", ")
                    ),
                );
            }
            let slo = rs.slo.as_ref().map(|raw| self.slo(&key, raw));
            let targeting = self.targeting(&key, rs.targeting.as_ref());
            let sticky = rs.sticky.as_ref().and_then(|raw| self.sticky(&key, raw));
            let rollout = self.rollout(&key, &rs, slo.is_some());
            let grpc_failure_codes = self.grpc_codes(&key, rs.grpc_failure_codes.as_ref());
            let analysis = self.analysis_templates(&key, &rs.analysis);
            let (background_analysis, webhooks) =
                self.rollout_extras(&key, &rs, rollout.as_ref(), &analysis);
            let freeze = self.freeze_windows(&format!("{key}.freeze"), &rs.freeze);
            let guard_analysis = self.guard_analysis(&key, &rs, &analysis);
            out.push(ServiceConfig {
                guard_analysis,
                analysis,
                background_analysis,
                webhooks,
                freeze,
                rollout,
                grpc_failure_codes,
                name,
                hosts: svc_hosts,
                baseline,
                pools,
                slo,
                targeting,
                sticky,
            });
        }
        out
    }

    fn pools(&mut self, key: &str, raw: &Spanned<IndexMap<String, RawPool>>) -> Vec<PoolConfig> {
        if raw.get_ref().is_empty() {
            self.problem(
                format!("{key}.pools"),
                raw,
                "a service needs at least one pool",
            );
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut total: u64 = 0;
        for (pname, rp) in raw.get_ref() {
            let pkey = format!("{key}.pools.{pname}");
            if let Err(msg) = check_name(pname) {
                self.problem(pkey.clone(), &rp.weight, msg);
            }
            let w = *rp.weight.get_ref();
            let weight = if w < 0 {
                self.problem(
                    format!("{pkey}.weight"),
                    &rp.weight,
                    format!("{w} is negative; weights are integers >= 0"),
                );
                0
            } else if w as u64 > MAX_WEIGHT {
                self.problem(
                    format!("{pkey}.weight"),
                    &rp.weight,
                    format!("{w} is above the maximum of {MAX_WEIGHT}"),
                );
                0
            } else {
                w as u32
            };
            total += u64::from(weight);
            if rp.endpoints.get_ref().is_empty() {
                self.problem(
                    format!("{pkey}.endpoints"),
                    &rp.endpoints,
                    "a pool needs at least one endpoint",
                );
            }
            let mut endpoints: Vec<Endpoint> = Vec::new();
            for ep in rp.endpoints.get_ref() {
                match Endpoint::parse(ep.get_ref()) {
                    Ok(e) if endpoints.contains(&e) => self.problem(
                        format!("{pkey}.endpoints"),
                        ep,
                        format!("endpoint `{e}` is listed twice"),
                    ),
                    Ok(e) => endpoints.push(e),
                    Err(msg) => self.problem(format!("{pkey}.endpoints"), ep, msg),
                }
            }
            let health = rp.health.as_ref().map(|h| self.health(&pkey, h));
            let outlier = self.outlier(&pkey, rp.outlier.as_ref());
            let protocol = match &rp.protocol {
                None => UpstreamProtocol::Http1,
                Some(p) => match p.get_ref().as_str() {
                    "http1" => UpstreamProtocol::Http1,
                    "h2c" => UpstreamProtocol::H2c,
                    "h2" => UpstreamProtocol::H2,
                    other => {
                        self.problem(
                            format!("{pkey}.protocol"),
                            p,
                            format!(
                                "`{other}` is not a protocol: use \"http1\", \"h2c\" or \"h2\""
                            ),
                        );
                        UpstreamProtocol::Http1
                    }
                },
            };
            let tls_on = rp.tls.as_ref().is_some_and(|t| *t.get_ref());
            if let Some(p) = &rp.protocol {
                match (protocol, tls_on) {
                    (UpstreamProtocol::H2, false) => self.problem(
                        format!("{pkey}.protocol"),
                        p,
                        "\"h2\" needs tls = true (or use \"h2c\")",
                    ),
                    (UpstreamProtocol::H2c, true) => self.problem(
                        format!("{pkey}.protocol"),
                        p,
                        "\"h2c\" is cleartext: with tls = true use \"h2\"",
                    ),
                    _ => {}
                }
            }
            if !tls_on {
                for (name, v) in [("ca_file", &rp.ca_file), ("server_name", &rp.server_name)] {
                    if let Some(v) = v {
                        self.problem(format!("{pkey}.{name}"), v, "only applies with tls = true");
                    }
                }
            }
            if let Some(sn) = &rp.server_name
                && rustls::pki_types::ServerName::try_from(sn.get_ref().as_str()).is_err()
            {
                self.problem(
                    format!("{pkey}.server_name"),
                    sn,
                    format!("`{}` is not a DNS name or IP", sn.get_ref()),
                );
            }
            let tls = tls_on.then(|| UpstreamTlsConfig {
                ca_file: rp.ca_file.as_ref().map(|c| PathBuf::from(c.get_ref())),
                server_name: rp.server_name.as_ref().map(|s| s.get_ref().clone()),
            });
            let version = rp.version.as_ref().and_then(|v| {
                check_version(v.get_ref())
                    .map_err(|msg| self.problem(format!("{pkey}.version"), v, msg))
                    .ok()
                    .map(|()| v.get_ref().clone())
            });
            out.push(PoolConfig {
                name: pname.clone(),
                endpoints,
                weight,
                health,
                outlier,
                protocol,
                tls,
                version,
            });
        }
        if total == 0
            && let Some((_, first)) = raw.get_ref().first()
        {
            self.problem(
                format!("{key}.pools"),
                &first.weight,
                "all weights are zero; at least one pool needs a weight > 0",
            );
        }
        out
    }
}

impl Validator<'_> {
    fn tls(&mut self, raw: &RawProxy) -> Option<TlsConfig> {
        let Some(listen) = &raw.tls_listen else {
            for (key, v) in [
                ("proxy.tls_cert", &raw.tls_cert),
                ("proxy.tls_key", &raw.tls_key),
            ] {
                if let Some(v) = v {
                    self.problem(key, v, "needs proxy.tls_listen");
                }
            }
            if let Some(c) = raw.certs.first() {
                self.problem("proxy.certs", c, "needs proxy.tls_listen");
            }
            return None;
        };
        let addr = self.addr("proxy.tls_listen", Some(listen), "127.0.0.1:8443");
        let default = match (&raw.tls_cert, &raw.tls_key) {
            (Some(c), Some(k)) => Some(CertConfig {
                hosts: Vec::new(),
                cert: PathBuf::from(c.get_ref()),
                key: PathBuf::from(k.get_ref()),
            }),
            (Some(c), None) => {
                self.problem("proxy.tls_key", c, "tls_cert needs its tls_key");
                None
            }
            (None, Some(k)) => {
                self.problem("proxy.tls_cert", k, "tls_key needs its tls_cert");
                None
            }
            (None, None) => None,
        };
        let mut certs = Vec::new();
        for (i, c) in raw.certs.iter().enumerate() {
            let r = c.get_ref();
            if r.hosts.is_empty() {
                self.problem(
                    format!("proxy.certs[{i}].hosts"),
                    c,
                    "name the SNI hosts this certificate serves",
                );
            }
            let mut hosts = Vec::new();
            for h in &r.hosts {
                match normalize_host(h) {
                    Ok(h) => hosts.push(h),
                    Err(msg) => self.problem(format!("proxy.certs[{i}].hosts"), c, msg),
                }
            }
            certs.push(CertConfig {
                hosts,
                cert: PathBuf::from(&r.cert),
                key: PathBuf::from(&r.key),
            });
        }
        if default.is_none() && certs.is_empty() {
            self.problem(
                "proxy.tls_listen",
                listen,
                "needs a certificate: set tls_cert and tls_key, or add [[proxy.certs]]",
            );
        }
        Some(TlsConfig {
            listen: addr,
            default,
            certs,
        })
    }

    fn count(
        &mut self,
        key: String,
        raw: Option<&Spanned<i64>>,
        default: u32,
        range: (i64, i64),
    ) -> u32 {
        match raw {
            Some(n) if !(range.0..=range.1).contains(n.get_ref()) => {
                self.problem(
                    key,
                    n,
                    format!("must be between {} and {}", range.0, range.1),
                );
                default
            }
            Some(n) => *n.get_ref() as u32,
            None => default,
        }
    }

    fn health(&mut self, pool_key: &str, raw: &Spanned<RawHealth>) -> HealthConfig {
        let key = format!("{pool_key}.health");
        let r = raw.get_ref();
        let path = r
            .path
            .as_ref()
            .map_or("/".to_owned(), |p| p.get_ref().clone());
        if let Some(p) = &r.path
            && (!path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err())
        {
            self.problem(
                format!("{key}.path"),
                p,
                "must be a path starting with /, e.g. \"/healthz\"",
            );
        }
        let interval = self.duration(
            &format!("{key}.interval"),
            r.interval.as_ref(),
            Duration::from_secs(5),
        );
        let timeout = self.duration(
            &format!("{key}.timeout"),
            r.timeout.as_ref(),
            Duration::from_secs(1),
        );
        if timeout > interval
            && let Some(t) = &r.timeout
        {
            self.problem(
                format!("{key}.timeout"),
                t,
                "must not be longer than interval",
            );
        }
        let healthy_threshold = self.count(
            format!("{key}.healthy_threshold"),
            r.healthy_threshold.as_ref(),
            2,
            (1, 100),
        );
        let unhealthy_threshold = self.count(
            format!("{key}.unhealthy_threshold"),
            r.unhealthy_threshold.as_ref(),
            3,
            (1, 100),
        );
        let expect_status = match &r.expect_status {
            None => (200, 399),
            Some(s) => {
                let text = s.get_ref().trim();
                let parsed = match text.split_once('-') {
                    Some((a, b)) => a
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .zip(b.trim().parse::<u16>().ok()),
                    None => text.parse::<u16>().ok().map(|c| (c, c)),
                };
                match parsed {
                    Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => (a, b),
                    _ => {
                        self.problem(
                            format!("{key}.expect_status"),
                            s,
                            format!("`{text}` is not a status or range like \"200-399\""),
                        );
                        (200, 399)
                    }
                }
            }
        };
        HealthConfig {
            path,
            interval,
            timeout,
            healthy_threshold,
            unhealthy_threshold,
            expect_status,
        }
    }

    fn outlier(&mut self, pool_key: &str, raw: Option<&Spanned<RawOutlier>>) -> OutlierConfig {
        let d = OutlierConfig::default();
        let Some(raw) = raw else { return d };
        let key = format!("{pool_key}.outlier");
        let r = raw.get_ref();
        OutlierConfig {
            enabled: r.enabled.unwrap_or(true),
            consecutive_failures: self.count(
                format!("{key}.consecutive_failures"),
                r.consecutive_failures.as_ref(),
                d.consecutive_failures,
                (1, 10_000),
            ),
            base_ejection_time: self.duration(
                &format!("{key}.base_ejection_time"),
                r.base_ejection_time.as_ref(),
                d.base_ejection_time,
            ),
            max_ejection_percent: self.count(
                format!("{key}.max_ejection_percent"),
                r.max_ejection_percent.as_ref(),
                d.max_ejection_percent,
                (0, 100),
            ),
        }
    }

    fn rollout(&mut self, key: &str, rs: &RawService, has_slo: bool) -> Option<RolloutConfig> {
        use crate::model::Step;
        let strategy = match &rs.strategy {
            None => "canary",
            Some(s) if s.get_ref() == "canary" || s.get_ref() == "blue-green" => {
                s.get_ref().as_str()
            }
            Some(s) => {
                self.problem(
                    format!("{key}.strategy"),
                    s,
                    format!(
                        "`{}` is not a strategy: use \"canary\" or \"blue-green\"",
                        s.get_ref()
                    ),
                );
                return None;
            }
        };
        let Some(raw) = &rs.rollout else {
            if let Some(s) = &rs.strategy {
                self.problem(
                    format!("{key}.rollout"),
                    s,
                    "a strategy needs a [service.rollout] table",
                );
            }
            return None;
        };
        let rkey = format!("{key}.rollout");
        let r = raw.get_ref();
        let candidate = r.candidate.get_ref().clone();
        if !rs.pools.get_ref().contains_key(&candidate) {
            self.problem(
                format!("{rkey}.candidate"),
                &r.candidate,
                format!("`{candidate}` is not a pool of this service"),
            );
        } else if candidate == *rs.baseline.get_ref() {
            self.problem(
                format!("{rkey}.candidate"),
                &r.candidate,
                "the candidate must not be the baseline pool",
            );
        }
        let gate_needs_slo = |v: &mut Self, at: &Spanned<RawGate>, name: &str| {
            if at.get_ref().min_requests < 1 {
                v.problem(
                    format!("{rkey}.{name}"),
                    at,
                    "min_requests must be at least 1",
                );
            }
            if !has_slo {
                v.problem(
                    format!("{rkey}.{name}"),
                    at,
                    "an evidence gate needs the SLO guard: add a [service.slo] table",
                );
            }
        };
        if strategy == "blue-green" {
            if let Some(s) = &r.steps {
                self.problem(
                    format!("{rkey}.steps"),
                    s,
                    "blue-green has no steps: it previews, then switches at once",
                );
            }
            if let Some(g) = &r.gate {
                gate_needs_slo(self, g, "gate");
            }
            if let (Some(w), false) = (&r.rollback_window, has_slo) {
                self.problem(
                    format!("{rkey}.rollback_window"),
                    w,
                    "a rollback window needs the SLO guard: add a [service.slo] table",
                );
            }
            let auto = r.auto_promote_after.as_ref().map(|d| {
                self.duration(
                    &format!("{rkey}.auto_promote_after"),
                    Some(d),
                    Duration::ZERO,
                )
            });
            let window = r.rollback_window.as_ref().map(|d| {
                self.duration(&format!("{rkey}.rollback_window"), Some(d), Duration::ZERO)
            });
            return Some(RolloutConfig::BlueGreen {
                candidate,
                auto_promote_after: auto,
                gate: r
                    .gate
                    .as_ref()
                    .map(|g| g.get_ref().min_requests.max(1) as u64),
                rollback_window: window,
            });
        }
        for (name, present) in [
            ("auto_promote_after", r.auto_promote_after.is_some()),
            ("gate", r.gate.is_some()),
            ("rollback_window", r.rollback_window.is_some()),
        ] {
            if present {
                self.problem(
                    format!("{rkey}.{name}"),
                    raw,
                    "only for strategy = \"blue-green\"; a canary plan puts gates in its steps",
                );
            }
        }
        let Some(raw_steps) = &r.steps else {
            self.problem(format!("{rkey}.steps"), raw, "a canary plan needs steps, e.g. [{ percent = 10 }, { pause = \"manual\" }, { percent = 100 }]");
            return None;
        };
        if raw_steps.get_ref().is_empty() {
            self.problem(
                format!("{rkey}.steps"),
                raw_steps,
                "a canary plan needs at least one step",
            );
        }
        let mut steps = Vec::new();
        for (i, st) in raw_steps.get_ref().iter().enumerate() {
            let skey = format!("{rkey}.steps[{i}]");
            let s = st.get_ref();
            let set = [
                s.percent.is_some(),
                s.pause.is_some(),
                s.gate.is_some(),
                s.analysis.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                self.problem(skey, st, "a step is exactly one of { percent = N }, { pause = \"2m\" | \"manual\" }, { gate = { min_requests = N } }, { analysis = \"template\" }");
                continue;
            }
            if let Some(template) = &s.analysis {
                let known = rs
                    .analysis
                    .iter()
                    .any(|t| t.get_ref().name.get_ref() == template);
                if !known {
                    self.problem(
                        format!("{skey}.analysis"),
                        st,
                        format!("`{template}` is not a [[service.analysis]] name of this service"),
                    );
                }
                steps.push(Step::Analysis {
                    template: template.clone(),
                });
            } else if let Some(p) = s.percent {
                if !(p > 0.0 && p <= 100.0) {
                    self.problem(
                        format!("{skey}.percent"),
                        st,
                        format!("{p} must be above 0 and at most 100"),
                    );
                    continue;
                }
                steps.push(Step::Percent(p));
            } else if let Some(pause) = &s.pause {
                if pause.trim() == "manual" {
                    steps.push(Step::Manual);
                } else {
                    match parse_duration(pause) {
                        Ok(d) => steps.push(Step::Pause(d)),
                        Err(msg) => self.problem(
                            format!("{skey}.pause"),
                            st,
                            format!("{msg}, or \"manual\""),
                        ),
                    }
                }
            } else if let Some(g) = &s.gate {
                if g.min_requests < 1 {
                    self.problem(
                        format!("{skey}.gate.min_requests"),
                        st,
                        "must be at least 1",
                    );
                    continue;
                }
                if !has_slo {
                    self.problem(
                        format!("{skey}.gate"),
                        st,
                        "an evidence gate needs the SLO guard: add a [service.slo] table",
                    );
                }
                steps.push(Step::Gate {
                    min_requests: g.min_requests as u64,
                });
            }
        }
        Some(RolloutConfig::Canary { candidate, steps })
    }

    /// `[[service.analysis]]` templates, checked whole.
    fn analysis_templates(
        &mut self,
        key: &str,
        raw: &[Spanned<RawAnalysis>],
    ) -> Vec<AnalysisTemplate> {
        let mut out: Vec<AnalysisTemplate> = Vec::new();
        for (i, at) in raw.iter().enumerate() {
            let a = at.get_ref();
            let name = a.name.get_ref().clone();
            let akey = format!("{key}.analysis[{i}]");
            if let Err(msg) = check_name(&name) {
                self.problem(format!("{akey}.name"), &a.name, msg);
            }
            if out.iter().any(|t| t.name == name) {
                self.problem(
                    format!("{akey}.name"),
                    &a.name,
                    format!("`{name}` names two analysis templates"),
                );
            }
            let prometheus = a
                .prometheus
                .get_ref()
                .trim()
                .trim_end_matches('/')
                .to_owned();
            if !prometheus.starts_with("http://") || prometheus.parse::<http::Uri>().is_err() {
                self.problem(
                    format!("{akey}.prometheus"),
                    &a.prometheus,
                    format!("`{prometheus}` is not an http:// URL of a Prometheus server"),
                );
            }
            if a.query.get_ref().trim().is_empty() {
                self.problem(format!("{akey}.query"), &a.query, "must not be empty");
            }
            let success = match Threshold::parse(a.success.get_ref()) {
                Ok(t) => t,
                Err(msg) => {
                    self.problem(format!("{akey}.success"), &a.success, msg);
                    Threshold {
                        op: Comparison::Ge,
                        value: 0.0,
                    }
                }
            };
            let interval = self.duration(
                &format!("{akey}.interval"),
                a.interval.as_ref(),
                Duration::from_secs(30),
            );
            if let (Some(at), true) = (&a.interval, interval.is_zero()) {
                self.problem(format!("{akey}.interval"), at, "must be above zero");
            }
            let timeout = self.duration(
                &format!("{akey}.timeout"),
                a.timeout.as_ref(),
                Duration::from_secs(5),
            );
            if let (Some(at), true) = (&a.timeout, timeout.is_zero()) {
                self.problem(format!("{akey}.timeout"), at, "must be above zero");
            }
            let count = match &a.count {
                None => 3,
                Some(c) if (1..=10_000).contains(c.get_ref()) => *c.get_ref() as u32,
                Some(c) => {
                    self.problem(
                        format!("{akey}.count"),
                        c,
                        "must be between 1 and 10000 measurements",
                    );
                    1
                }
            };
            let failure_limit = match &a.failure_limit {
                None => 0,
                Some(c) if (0..=10_000).contains(c.get_ref()) => *c.get_ref() as u32,
                Some(c) => {
                    self.problem(
                        format!("{akey}.failure_limit"),
                        c,
                        "must be between 0 and 10000",
                    );
                    0
                }
            };
            let no_data = match a.no_data.as_ref().map(|n| (n, n.get_ref().as_str())) {
                None | Some((_, "fail")) => NoData::Fail,
                Some((_, "pass")) => NoData::Pass,
                Some((_, "inconclusive")) => NoData::Inconclusive,
                Some((n, other)) => {
                    self.problem(
                        format!("{akey}.no_data"),
                        n,
                        format!("`{other}`: use \"fail\", \"pass\" or \"inconclusive\""),
                    );
                    NoData::Fail
                }
            };
            out.push(AnalysisTemplate {
                name,
                prometheus,
                query: a.query.get_ref().clone(),
                success,
                interval,
                count,
                failure_limit,
                no_data,
                timeout,
            });
        }
        out
    }

    /// `[service.rollout] analysis` and `[[service.rollout.webhooks]]`, for either
    /// strategy.
    fn rollout_extras(
        &mut self,
        key: &str,
        rs: &RawService,
        plan: Option<&RolloutConfig>,
        templates: &[AnalysisTemplate],
    ) -> (Vec<String>, Vec<HookConfig>) {
        let (Some(raw), Some(_)) = (&rs.rollout, plan) else {
            return (Vec::new(), Vec::new());
        };
        let rkey = format!("{key}.rollout");
        let r = raw.get_ref();
        let mut background = Vec::new();
        if let Some(list) = &r.analysis {
            for name in list.get_ref() {
                if templates.iter().any(|t| &t.name == name) {
                    background.push(name.clone());
                } else {
                    self.problem(
                        format!("{rkey}.analysis"),
                        list,
                        format!("`{name}` is not a [[service.analysis]] name of this service"),
                    );
                }
            }
        }
        let mut hooks: Vec<HookConfig> = Vec::new();
        for (i, h) in r.webhooks.iter().enumerate() {
            let hkey = format!("{rkey}.webhooks[{i}]");
            let w = h.get_ref();
            let kind = match w.kind.get_ref().as_str() {
                "pre-rollout" => HookKind::PreRollout,
                "rollout" => HookKind::Rollout,
                "confirm-promotion" => HookKind::ConfirmPromotion,
                "post-rollout" => HookKind::PostRollout,
                other => {
                    self.problem(
                        format!("{hkey}.kind"),
                        &w.kind,
                        format!(
                            "`{other}`: use \"pre-rollout\", \"rollout\", \"confirm-promotion\" or \"post-rollout\""
                        ),
                    );
                    continue;
                }
            };
            let url = w.url.get_ref().trim().to_owned();
            if !url.starts_with("http://") || url.parse::<http::Uri>().is_err() {
                self.problem(
                    format!("{hkey}.url"),
                    &w.url,
                    format!("`{url}` is not an http:// URL"),
                );
            }
            let timeout = self.duration(
                &format!("{hkey}.timeout"),
                w.timeout.as_ref(),
                Duration::from_secs(10),
            );
            if let (Some(at), true) = (&w.timeout, timeout.is_zero()) {
                self.problem(format!("{hkey}.timeout"), at, "must be above zero");
            }
            let name = w
                .name
                .clone()
                .unwrap_or_else(|| format!("{}#{}", kind.as_str(), i + 1));
            if hooks.iter().any(|o| o.name == name) {
                self.problem(
                    format!("{hkey}.name"),
                    h,
                    format!("`{name}` names two webhooks"),
                );
            }
            hooks.push(HookConfig {
                name,
                kind,
                url,
                timeout,
                metadata: w.metadata.clone(),
            });
        }
        (background, hooks)
    }

    /// `[service.slo] analysis`: names of this service's templates.
    fn guard_analysis(
        &mut self,
        key: &str,
        rs: &RawService,
        templates: &[AnalysisTemplate],
    ) -> Vec<String> {
        let Some(list) = rs.slo.as_ref().and_then(|s| s.get_ref().analysis.as_ref()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for name in list.get_ref() {
            if templates.iter().any(|t| &t.name == name) {
                out.push(name.clone());
            } else {
                self.problem(
                    format!("{key}.slo.analysis"),
                    list,
                    format!("`{name}` is not a [[service.analysis]] name of this service"),
                );
            }
        }
        out
    }

    /// `[[freeze]]` or `[[service.freeze]]` windows.
    fn freeze_windows(&mut self, key: &str, raw: &[Spanned<RawFreeze>]) -> Vec<FreezeWindow> {
        let mut out = Vec::new();
        for (i, at) in raw.iter().enumerate() {
            let fkey = format!("{key}[{i}]");
            match freeze_window(at.get_ref()) {
                Ok(w) => out.push(w),
                Err(msg) => self.problem(fkey, at, msg),
            }
        }
        out
    }

    fn header_name(&mut self, key: String, raw: &Spanned<String>) -> String {
        let name = raw.get_ref().trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            self.problem(
                key,
                raw,
                format!("`{}` is not a valid header name", raw.get_ref()),
            );
        }
        name
    }

    fn cookie_name(&mut self, key: String, raw: &Spanned<String>) -> String {
        let name = raw.get_ref().trim().to_owned();
        let bad = name.is_empty()
            || name
                .bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b)));
        if bad {
            self.problem(
                key,
                raw,
                format!("`{}` is not a valid cookie name", raw.get_ref()),
            );
        }
        name
    }

    fn targeting(
        &mut self,
        service_key: &str,
        raw: Option<&Spanned<RawTargeting>>,
    ) -> TargetingConfig {
        let mut t = TargetingConfig::default();
        let Some(raw) = raw else { return t };
        let key = format!("{service_key}.targeting");
        let r = raw.get_ref();
        if let Some(h) = &r.header {
            t.header = self.header_name(format!("{key}.header"), h);
        }
        if let Some(c) = &r.cookie {
            t.cookie = self.cookie_name(format!("{key}.cookie"), c);
        }
        if let Some(tok) = &r.override_token {
            if tok.get_ref().len() < 16 {
                self.problem(
                    format!("{key}.override_token"),
                    tok,
                    "must be at least 16 characters: it is what keeps the public off the canary",
                );
            }
            t.override_token = Some(tok.get_ref().clone());
        }
        t
    }

    fn sticky(&mut self, service_key: &str, raw: &Spanned<RawSticky>) -> Option<StickyConfig> {
        let key = format!("{service_key}.sticky");
        let r = raw.get_ref();
        let chosen = [
            r.cookie.is_some(),
            r.header.is_some(),
            r.client_ip.as_ref().is_some_and(|b| *b.get_ref()),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if chosen != 1 {
            self.problem(
                key.clone(),
                raw,
                "set exactly one of cookie = \"name\", header = \"name\" or client_ip = true",
            );
            return None;
        }
        if r.max_age.is_some()
            && r.cookie.is_none()
            && let Some(m) = &r.max_age
        {
            self.problem(
                format!("{key}.max_age"),
                m,
                "only applies with cookie = \"name\"",
            );
        }
        if let Some(c) = &r.cookie {
            let name = self.cookie_name(format!("{key}.cookie"), c);
            let max_age = self.duration(
                &format!("{key}.max_age"),
                r.max_age.as_ref(),
                Duration::from_secs(30 * 24 * 3600),
            );
            return Some(StickyConfig::Cookie { name, max_age });
        }
        if let Some(h) = &r.header {
            return Some(StickyConfig::Header(
                self.header_name(format!("{key}.header"), h),
            ));
        }
        Some(StickyConfig::ClientIp)
    }

    fn slo(&mut self, service_key: &str, raw: &Spanned<RawSlo>) -> SloConfig {
        let key = format!("{service_key}.slo");
        let r = raw.get_ref();
        let d = SloConfig::default();
        let window = self.duration(&format!("{key}.window"), r.window.as_ref(), d.window);
        let interval = self.duration(&format!("{key}.interval"), r.interval.as_ref(), d.interval);
        let fast_window = self.duration(
            &format!("{key}.fast_window"),
            r.fast_window.as_ref(),
            d.fast_window.min(window),
        );
        if interval < Duration::from_millis(100) || interval > Duration::from_secs(60) {
            if let Some(i) = &r.interval {
                self.problem(format!("{key}.interval"), i, "must be between 100ms and 1m");
            }
        } else if interval > window
            && let Some(w) = r.window.as_ref().or(r.interval.as_ref())
        {
            self.problem(
                format!("{key}.window"),
                w,
                "must be at least one interval long",
            );
        }
        if fast_window > window
            && let Some(f) = &r.fast_window
        {
            self.problem(
                format!("{key}.fast_window"),
                f,
                "must not be longer than window",
            );
        }
        if window > Duration::from_secs(3600)
            && let Some(w) = &r.window
        {
            self.problem(format!("{key}.window"), w, "must be at most 1h");
        }
        let min_requests = match &r.min_requests {
            Some(n) if *n.get_ref() < 1 => {
                self.problem(format!("{key}.min_requests"), n, "must be at least 1");
                d.min_requests
            }
            Some(n) => *n.get_ref() as u64,
            None => d.min_requests,
        };
        let breaches_to_act = match &r.breaches_to_act {
            Some(n) if !(1..=1000).contains(n.get_ref()) => {
                self.problem(
                    format!("{key}.breaches_to_act"),
                    n,
                    "must be between 1 and 1000",
                );
                d.breaches_to_act
            }
            Some(n) => *n.get_ref() as u32,
            None => d.breaches_to_act,
        };
        let mut rate = |name: &str, v: &Option<Spanned<f64>>| -> Option<f64> {
            let v = v.as_ref()?;
            if !(0.0..=1.0).contains(v.get_ref()) {
                self.problem(
                    format!("{key}.{name}"),
                    v,
                    format!(
                        "{} is not a fraction between 0 and 1 (5% is 0.05)",
                        v.get_ref()
                    ),
                );
                return None;
            }
            Some(*v.get_ref())
        };
        let max_error_rate = rate("max_error_rate", &r.max_error_rate);
        let max_error_rate_increase = rate("max_error_rate_increase", &r.max_error_rate_increase);
        let max_p99_ratio = match &r.max_p99_ratio {
            Some(v) if !(*v.get_ref() >= 1.0 && v.get_ref().is_finite()) => {
                self.problem(
                    format!("{key}.max_p99_ratio"),
                    v,
                    "must be a ratio of at least 1.0 (1.5 = 50% slower than the baseline)",
                );
                None
            }
            Some(v) => Some(*v.get_ref()),
            None => None,
        };
        let max_p99_latency = r
            .max_p99_latency
            .as_ref()
            .map(|v| self.duration(&format!("{key}.max_p99_latency"), Some(v), Duration::ZERO));
        if max_error_rate.is_none()
            && max_p99_latency.is_none()
            && max_error_rate_increase.is_none()
            && max_p99_ratio.is_none()
            && r.max_error_rate.is_none()
            && r.max_p99_latency.is_none()
            && r.max_error_rate_increase.is_none()
            && r.max_p99_ratio.is_none()
        {
            self.problem(
                key.clone(),
                raw,
                "no check configured: set at least one of max_error_rate, max_p99_latency, \
                 max_error_rate_increase, max_p99_ratio",
            );
        }
        let webhook = r
            .webhook
            .as_ref()
            .and_then(|w| match w.get_ref().parse::<http::Uri>() {
                Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => Some(u),
                Ok(_) | Err(_) => {
                    self.problem(
                        format!("{key}.webhook"),
                        w,
                        format!("`{}` is not an http:// URL", w.get_ref()),
                    );
                    None
                }
            });
        SloConfig {
            window,
            fast_window,
            interval,
            min_requests,
            max_error_rate,
            max_p99_latency,
            max_error_rate_increase,
            max_p99_ratio,
            breaches_to_act,
            mode: r.mode.unwrap_or(GuardMode::Enforce),
            webhook,
            latency: r.latency.unwrap_or_default(),
            alpha: match &r.alpha {
                None => d.alpha,
                Some(a) if *a.get_ref() > 0.0 && *a.get_ref() <= 0.2 => *a.get_ref(),
                Some(a) => {
                    self.problem(
                        format!("{key}.alpha"),
                        a,
                        format!(
                            "{} is not a probability between 0 (excluded) and 0.2; e.g. 0.01",
                            a.get_ref()
                        ),
                    );
                    d.alpha
                }
            },
        }
    }

    /// `grpc_failure_codes`: names or numbers of gRPC status codes, as a bit set.
    fn grpc_codes(
        &mut self,
        service_key: &str,
        raw: Option<&Spanned<Vec<Spanned<RawGrpcCode>>>>,
    ) -> u32 {
        use crate::model::{GRPC_CODES, GRPC_DEFAULT_FAILURES};
        let Some(raw) = raw else {
            return GRPC_DEFAULT_FAILURES;
        };
        let key = format!("{service_key}.grpc_failure_codes");
        let mut mask = 0u32;
        for code in raw.get_ref() {
            let found = match code.get_ref() {
                RawGrpcCode::Number(n) => {
                    usize::try_from(*n).ok().filter(|&n| n < GRPC_CODES.len())
                }
                RawGrpcCode::Name(name) => GRPC_CODES
                    .iter()
                    .position(|c| c.eq_ignore_ascii_case(name.trim())),
            };
            match found {
                Some(0) => self.problem(key.clone(), code, "OK (0) cannot be a failure code"),
                Some(i) => mask |= 1 << i,
                None => {
                    let what = match code.get_ref() {
                        RawGrpcCode::Number(n) => n.to_string(),
                        RawGrpcCode::Name(s) => format!("`{s}`"),
                    };
                    self.problem(
                        key.clone(),
                        code,
                        format!(
                            "{what} is not a gRPC status code (0–16 or a name such as \
                             UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED)"
                        ),
                    );
                }
            }
        }
        mask
    }
}

/// Service and pool names appear in URLs, metric labels and state files.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 64 {
        return Err(format!("`{name}` is longer than 64 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "`{name}` contains `{c}`; use letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

fn normalize_host(raw: &str) -> Result<String, String> {
    let host = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err("empty host name".into());
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "`{raw}`: hosts are matched without the port; write just the name"
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '[' | ']' | ':')))
    {
        return Err(format!("`{raw}` contains `{c}`, which a host name cannot"));
    }
    Ok(host)
}

/// Durations are written like "500ms", "2s", "1m" or "1h 30m".
/// One freeze window from its raw table: absolute (`start`, `end`) or weekly (`days`,
/// `from`, `to`, `timezone`).
fn freeze_window(f: &RawFreeze) -> Result<FreezeWindow, String> {
    let reason = f.reason.clone().unwrap_or_else(|| "freeze window".into());
    let absolute = f.start.is_some() || f.end.is_some();
    let weekly = f.days.is_some() || f.from.is_some() || f.to.is_some() || f.timezone.is_some();
    let when = match (absolute, weekly) {
        (true, true) => {
            return Err(
                "a window is either absolute (start, end) or weekly (days, from, to, timezone), not both"
                    .into(),
            );
        }
        (false, false) => {
            return Err(
                "give start and end (RFC 3339 UTC), or days with from and to (weekly)".into(),
            );
        }
        (true, false) => {
            let time = |name: &str, v: &Option<String>| -> Result<std::time::SystemTime, String> {
                let v = v.as_deref().ok_or(format!("{name} is missing"))?;
                humantime::parse_rfc3339(v.trim()).map_err(|e| {
                    format!("{name} `{v}`: {e} (write UTC, e.g. 2026-12-24T00:00:00Z)")
                })
            };
            let (start, end) = (time("start", &f.start)?, time("end", &f.end)?);
            if end <= start {
                return Err("end must be after start".into());
            }
            FreezeTime::Absolute { start, end }
        }
        (false, true) => {
            let mut days = [false; 7];
            let list = f
                .days
                .as_ref()
                .ok_or("days is missing, e.g. [\"sat\", \"sun\"]")?;
            if list.is_empty() {
                return Err("days must name at least one day".into());
            }
            for d in list {
                // The name exactly, short or full (any case): a prefix match would read
                // "monkey" or "sunset" as a day and freeze on a typo's guess.
                let lower = d.trim().to_ascii_lowercase();
                let i = [
                    ("mon", "monday"),
                    ("tue", "tuesday"),
                    ("wed", "wednesday"),
                    ("thu", "thursday"),
                    ("fri", "friday"),
                    ("sat", "saturday"),
                    ("sun", "sunday"),
                ]
                .iter()
                .position(|(short, full)| lower == *short || lower == *full)
                .ok_or(format!(
                    "days: `{d}` is not a day: use mon, tue, … sun (or monday, … sunday)"
                ))?;
                days[i] = true;
            }
            let minutes = |name: &str, v: Option<&str>, default: u32| -> Result<u32, String> {
                let Some(v) = v else { return Ok(default) };
                let bad = || format!("{name} `{v}`: write HH:MM, 00:00 to 24:00");
                let (h, m) = v.trim().split_once(':').ok_or_else(bad)?;
                let (h, m): (u32, u32) =
                    (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
                if m >= 60 || h * 60 + m > 24 * 60 {
                    return Err(bad());
                }
                Ok(h * 60 + m)
            };
            let from = minutes("from", f.from.as_deref(), 0)?;
            let to = minutes("to", f.to.as_deref(), 24 * 60)?;
            if to <= from {
                return Err(
                    "to must be after from (for a window past midnight, give two windows)".into(),
                );
            }
            let offset_secs = match f.timezone.as_deref().map(str::trim) {
                None | Some("UTC") | Some("utc") | Some("Z") => 0,
                Some(tz) => parse_offset(tz).ok_or(format!(
                    "timezone `{tz}`: use \"UTC\" or a fixed offset such as \"+02:00\""
                ))?,
            };
            FreezeTime::Weekly {
                days,
                from,
                to,
                offset_secs,
            }
        }
    };
    Ok(FreezeWindow { reason, when })
}

/// `+HH:MM` / `-HH:MM` (or `UTC+HH:MM`) in seconds east of UTC.
fn parse_offset(tz: &str) -> Option<i32> {
    let tz = tz.strip_prefix("UTC").unwrap_or(tz);
    let (sign, rest) = match tz.as_bytes().first()? {
        b'+' => (1, &tz[1..]),
        b'-' => (-1, &tz[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    // Digits only: `parse` takes a sign, so "+-100:00" would read as -100 hours and
    // pass the `h <= 14` bound.
    let digits = |s: &str| !s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || !digits(m) {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 14 && (0..60).contains(&m)).then_some(sign * (h * 3600 + m * 60))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("`{s}` is not a duration ({e}); write e.g. \"500ms\", \"2s\", \"1m\"")
    })?;
    if d.is_zero() {
        return Err(format!("`{s}` must be greater than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[proxy]
listen = "127.0.0.1:8080"
connect_timeout = "500ms"
request_timeout = "1m"

[[service]]
name = "shop"
hosts = ["Shop.Example.com"]
baseline = "stable"

[service.pools.stable]
endpoints = ["127.0.0.1:9001", "localhost:9002"]
weight = 90

[service.pools.canary]
endpoints = ["[::1]:9101"]
weight = 10

[[service]]
name = "fallback"
baseline = "only"
[service.pools.only]
endpoints = ["10.0.0.1:80"]
weight = 1
"#;

    #[test]
    fn summary_of_a_large_config_names_a_few_services_and_counts_the_rest() {
        let mut text = String::new();
        for i in 0..500 {
            text.push_str(&format!(
                "[[service]]\nname = \"svc{i}\"\nhosts = [\"svc{i}.example\"]\n\
                 baseline = \"a\"\n[service.pools.a]\nendpoints = [\"10.0.0.1:80\"]\n\
                 weight = 1\n"
            ));
        }
        let summary = Config::parse(&text, "big.toml").unwrap().summary();
        assert!(summary.starts_with("ok: 500 service(s), 500 pool(s): svc0 "));
        assert!(summary.contains("svc9 ["));
        assert!(!summary.contains("svc10 ["));
        assert!(summary.ends_with("; and 490 more (`weir ctl status` lists them all)"));
        assert!(summary.len() < 1000, "{} bytes", summary.len());
    }

    #[test]
    fn valid_config_keeps_order_and_normalizes() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.proxy.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.proxy.request_timeout, Duration::from_secs(60));
        assert_eq!(c.services[0].hosts, vec!["shop.example.com"]);
        let names: Vec<_> = c.services[0].pools.iter().map(|p| &p.name).collect();
        assert_eq!(names, ["stable", "canary"]);
        assert!(c.services[1].is_default());
        assert_eq!(c.services[0].pools[1].endpoints[0].as_str(), "[::1]:9101");
        assert!(c.summary().starts_with("ok: 2 service(s), 3 pool(s)"));
    }

    fn errors(src: &str) -> Vec<String> {
        Config::parse(src, "t.toml")
            .unwrap_err()
            .to_string()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn log_section_defaults_parses_and_locates_mistakes() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.log, LogConfig::default());
        assert!(!c.log.access.enabled);
        let src = format!(
            "{GOOD}\n[log]\nformat = \"json\"\n[log.access]\nenabled = true\nsample = 1\n\
             errors = \"sampled\"\npath = \"/tmp/a.log\"\ninclude_query = true\n"
        );
        let c = Config::parse(&src, "t.toml").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let a = &c.log.access;
        assert!(a.enabled && a.include_query && !a.all_errors);
        assert_eq!(a.sample, 1.0);
        assert_eq!(a.path.as_deref(), Some(Path::new("/tmp/a.log")));
        // GOOD, a blank line, `[log.access]`, `enabled`, then the bad key.
        let base = GOOD.lines().count();
        for (bad, key) in [
            ("sample = 0", "log.access.sample"),
            ("sample = 1.5", "log.access.sample"),
            ("sample = -0.1", "log.access.sample"),
            ("errors = \"some\"", "log.access.errors"),
            ("path = \" \"", "log.access.path"),
        ] {
            let src = format!("{GOOD}\n[log.access]\nenabled = true\n{bad}\n");
            let errs = errors(&src);
            assert_eq!(errs.len(), 1, "{errs:?}");
            let want = format!("t.toml:{}: {key}: ", base + 4);
            assert!(errs[0].starts_with(&want), "{bad}: {errs:?}, want {want}");
        }
        let errs = errors(&format!("{GOOD}\n[log]\nformat = \"xml\"\n"));
        assert!(errs[0].contains(": log.format: `xml`"), "{errs:?}");
        let errs = errors(&format!("{GOOD}\n[log.access]\nsampel = 0.5\n"));
        assert!(errs[0].contains("log.access"), "{errs:?}");
    }

    #[test]
    fn grpc_failure_codes_by_name_or_number() {
        use crate::model::GRPC_DEFAULT_FAILURES;
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.services[0].grpc_failure_codes, GRPC_DEFAULT_FAILURES);
        assert_eq!(c.proxy.upstream_body_timeout, Duration::from_secs(60));
        let with = |codes: &str| {
            GOOD.replacen(
                "baseline = \"stable\"",
                &format!("baseline = \"stable\"\ngrpc_failure_codes = {codes}"),
                1,
            )
        };
        let c = Config::parse(&with(r#"["unavailable", 13]"#), "t.toml").unwrap();
        assert_eq!(c.services[0].grpc_failure_codes, (1 << 14) | (1 << 13));
        let e = errors(&with(r#"["OK", "NOPE", 17]"#));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("service[shop].grpc_failure_codes"), "{e:?}");
        assert!(e[0].contains("OK (0) cannot be a failure code"), "{e:?}");
        assert!(e[1].contains("`NOPE` is not a gRPC status code"), "{e:?}");
        assert!(e[2].contains("17 is not a gRPC status code"), "{e:?}");
        assert!(e[0].starts_with("t.toml:"), "{e:?}");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = errors("[proxy]\nlisten = \n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
    }

    #[test]
    fn unknown_key_is_rejected_with_location() {
        let e = errors("[proxy]\nlisen = \"x\"\n");
        assert!(e[0].starts_with("t.toml:2:1:"), "{e:?}");
        assert!(e[0].contains("lisen"), "{e:?}");
    }

    #[test]
    fn analysis_webhooks_and_freeze_parse() {
        let src = r#"
[[freeze]]
start = "2026-12-24T00:00:00Z"
end = "2026-12-27T00:00:00Z"
reason = "holidays"

[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:1"]
weight = 100
[service.pools.canary]
endpoints = ["127.0.0.1:2"]
weight = 0
[[service.analysis]]
name = "ok-rate"
prometheus = "http://127.0.0.1:9090/"
query = 'sum(rate(x{pool="{{candidate}}"}[1m]))'
success = ">= 0.99"
interval = "200ms"
count = 2
no_data = "inconclusive"
[service.rollout]
candidate = "canary"
steps = [{ percent = 10 }, { analysis = "ok-rate" }, { percent = 100 }]
analysis = ["ok-rate"]
[[service.rollout.webhooks]]
kind = "pre-rollout"
url = "http://127.0.0.1:8080/check"
metadata = { suite = "smoke" }
[[service.freeze]]
days = ["sat", "sun"]
timezone = "+01:00"
"#;
        let c = Config::parse(src, "t.toml").unwrap();
        assert_eq!(c.freeze.len(), 1);
        let s = &c.services[0];
        let t = s.analysis_template("ok-rate").unwrap();
        assert_eq!(t.prometheus, "http://127.0.0.1:9090");
        assert_eq!(
            (t.count, t.failure_limit, t.no_data),
            (2, 0, NoData::Inconclusive)
        );
        assert_eq!(t.success.to_string(), ">= 0.99");
        assert_eq!(t.interval, Duration::from_millis(200));
        assert_eq!(s.background_analysis, ["ok-rate"]);
        assert_eq!(s.webhooks[0].kind, HookKind::PreRollout);
        assert_eq!(s.webhooks[0].name, "pre-rollout#1");
        assert_eq!(s.webhooks[0].metadata["suite"], "smoke");
        assert!(matches!(
            s.freeze[0].when,
            FreezeTime::Weekly {
                offset_secs: 3600,
                from: 0,
                to: 1440,
                ..
            }
        ));
    }

    #[test]
    fn analysis_webhook_and_freeze_problems_name_their_key() {
        let src = r#"
[[freeze]]
start = "2026-12-27T00:00:00Z"
end = "2026-12-24T00:00:00Z"

[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:1"]
weight = 100
[service.pools.canary]
endpoints = ["127.0.0.1:2"]
weight = 0
[[service.analysis]]
name = "ok-rate"
prometheus = "localhost:9090"
query = "up"
success = "about 1"
no_data = "maybe"
[service.rollout]
candidate = "canary"
steps = [{ analysis = "nope" }]
[[service.rollout.webhooks]]
kind = "pre-flight"
url = "http://127.0.0.1:1/"
[[service.freeze]]
days = ["someday"]
"#;
        let e = errors(src);
        let want = [
            ("t.toml:2: freeze[0]:", "end must be after start"),
            (
                "t.toml:17: service[shop].analysis[0].prometheus:",
                "http://",
            ),
            (
                "t.toml:19: service[shop].analysis[0].success:",
                "comparison",
            ),
            (
                "t.toml:20: service[shop].analysis[0].no_data:",
                "inconclusive",
            ),
            (
                "t.toml:23: service[shop].rollout.steps[0].analysis:",
                "`nope`",
            ),
            (
                "t.toml:25: service[shop].rollout.webhooks[0].kind:",
                "pre-rollout",
            ),
            ("t.toml:27: service[shop].freeze[0]:", "not a day"),
        ];
        for (prefix, needle) in want {
            assert!(
                e.iter()
                    .any(|l| l.starts_with(prefix) && l.contains(needle)),
                "missing {prefix} … {needle} in:\n{}",
                e.join("\n")
            );
        }
        assert_eq!(e.len(), want.len(), "{}", e.join("\n"));
    }

    #[test]
    fn freeze_days_and_offsets_are_read_strictly() {
        let window = |days: &str, tz: &str| {
            freeze_window(&RawFreeze {
                days: Some(vec![days.into()]),
                timezone: Some(tz.into()),
                ..Default::default()
            })
        };
        let day_of = |d: &str| match window(d, "UTC").map(|w| w.when) {
            Ok(FreezeTime::Weekly { days, .. }) => days.iter().position(|&on| on),
            other => panic!("{d}: {other:?}"),
        };
        assert_eq!(day_of("mon"), Some(0));
        assert_eq!(day_of(" Monday "), Some(0));
        assert_eq!(day_of("SUN"), Some(6));
        assert_eq!(day_of("thursday"), Some(3));
        for typo in ["monkey", "sunset", "m", "mo", "frid"] {
            let e = window(typo, "UTC").unwrap_err();
            assert!(
                e.starts_with("days:") && e.contains("not a day"),
                "{typo}: {e}"
            );
        }
        // Sign-bearing or non-digit parts are not an offset.
        for tz in [
            "+-100:00", "-+1:00", "+1:-30", "++01:00", "+ 1:00", "+:30", "+01:",
        ] {
            assert_eq!(parse_offset(tz), None, "{tz}");
            assert!(window("sat", tz).unwrap_err().contains("timezone"), "{tz}");
        }
        assert_eq!(parse_offset("+02:00"), Some(7200));
        assert_eq!(parse_offset("UTC-05:30"), Some(-(5 * 3600 + 30 * 60)));
        assert_eq!(parse_offset("+5"), Some(5 * 3600));
    }

    #[test]
    fn a_mistyped_freeze_day_names_its_key() {
        let src = r#"
[[freeze]]
days = ["sat", "monkey"]
"#;
        let e = errors(src);
        assert!(
            e.iter()
                .any(|l| l.starts_with("t.toml:2: freeze[0]:") && l.contains("`monkey`")),
            "{}",
            e.join("\n")
        );
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let src = r#"
[proxy]
connect_timeout = "soon"

[[service]]
name = "a"
hosts = ["x.com"]
baseline = "nope"
[service.pools.p1]
endpoints = []
weight = 0
[service.pools.p2]
endpoints = ["no-port", "1.2.3.4:80", "1.2.3.4:80"]
weight = -4

[[service]]
name = "a"
hosts = ["X.com"]
baseline = "q"
[service.pools.q]
endpoints = ["1.1.1.1:1"]
weight = 1

[[service]]
name = "d1"
baseline = "q"
[service.pools.q]
endpoints = ["1.1.1.1:1"]
weight = 1

[[service]]
name = "d2"
baseline = "q"
[service.pools.q]
endpoints = ["1.1.1.1:1"]
weight = 1
"#;
        let e = errors(src);
        let want = [
            ("t.toml:3: proxy.connect_timeout:", "soon"),
            (
                "t.toml:10: service[a].pools.p1.endpoints:",
                "at least one endpoint",
            ),
            ("t.toml:13: service[a].pools.p2.endpoints:", "needs a port"),
            ("t.toml:13: service[a].pools.p2.endpoints:", "listed twice"),
            ("t.toml:14: service[a].pools.p2.weight:", "negative"),
            ("t.toml:11: service[a].pools:", "all weights are zero"),
            ("t.toml:8: service[a].baseline:", "not a pool"),
            ("t.toml:17: service[a].name:", "duplicate service name"),
            (
                "t.toml:18: service[a].hosts:",
                "already used by service `a`",
            ),
            (
                "t.toml:32: service[d2].hosts:",
                "more than one default service",
            ),
        ];
        for (prefix, needle) in want {
            assert!(
                e.iter()
                    .any(|l| l.starts_with(prefix) && l.contains(needle)),
                "missing {prefix} … {needle} in:\n{}",
                e.join("\n")
            );
        }
        assert_eq!(e.len(), want.len(), "{}", e.join("\n"));
    }

    #[test]
    fn serde_errors_name_the_key_path() {
        // An unknown key, a wrong type and an integer out of range, each in a different
        // kind of table: a header, an array-of-tables element (named), an inline table.
        let e = errors("[proxy]\nlisen = \"x\"\n");
        assert!(
            e[0].starts_with("t.toml:2:1: proxy.lisen: unknown field"),
            "{e:?}"
        );
        let e = errors("[proxy]\nworkers = \"many\"\n");
        assert!(e[0].starts_with("t.toml:2:11: proxy.workers: "), "{e:?}");
        assert!(e[0].contains("expected an integer"), "{e:?}");
        let src = "[[service]]\nname = \"a\"\nbaseline = \"p\"\n\
                   pools.p = { endpoints = [\"1.1.1.1:1\"], weight = 1 }\n\
                   [[service]]\nname = \"shop\"\nbaseline = \"p\"\n\
                   pools.p = { endpoints = [\"1.1.1.1:1\"], weight = 99999999999999999999 }\n";
        let e = errors(src);
        assert!(
            e[0].starts_with("t.toml:8:") && e[0].contains(" service[shop].pools.p.weight: "),
            "{e:?}"
        );
        assert!(e[0].contains("out of range"), "{e:?}");
        let src = "[[service]]\nname = \"shop\"\nbaseline = \"p\"\n\
                   [service.pools.p]\nendpoints = [\"1.1.1.1:1\"]\nweight = 1\nwieght = 2\n";
        let e = errors(src);
        assert!(
            e[0].starts_with("t.toml:7:1: service[shop].pools.p.wieght: "),
            "{e:?}"
        );
        // A missing key is reported on the table that lacks it.
        let e = errors("[[service]]\nname = \"shop\"\n");
        assert!(
            e[0].contains("service[shop]: missing field `baseline`"),
            "{e:?}"
        );
    }

    #[test]
    fn out_of_range_ports_say_so() {
        let with = |listen: &str| GOOD.replacen("127.0.0.1:8080", listen, 1);
        let e = errors(&with("127.0.0.1:99999"));
        assert!(
            e[0].contains("proxy.listen: `127.0.0.1:99999`: port 99999 is out of range (1–65535)"),
            "{e:?}"
        );
        assert_eq!(
            Endpoint::parse("10.0.0.1:99999").unwrap_err(),
            "`10.0.0.1:99999`: port 99999 is out of range (1–65535)"
        );
        assert!(Endpoint::parse("a:0").unwrap_err().contains("out of range"));
        // Not a port problem: still the general message.
        let e = errors(&with("localhost"));
        assert!(e[0].contains("is not an IP:port address"), "{e:?}");
    }

    #[test]
    fn duplicate_pool_is_a_syntax_error_with_location() {
        let src = "[[service]]\nname='a'\nbaseline='p'\n[service.pools.p]\nendpoints=['1.1.1.1:1']\nweight=1\n[service.pools.p]\nendpoints=['1.1.1.1:1']\nweight=1\n";
        let e = errors(src);
        assert!(e[0].starts_with("t.toml:7:"), "{e:?}");
    }

    #[test]
    fn endpoint_parsing() {
        assert!(Endpoint::parse("127.0.0.1:80").is_ok());
        assert!(Endpoint::parse("backend.internal:8080").is_ok());
        assert!(Endpoint::parse("[::1]:80").is_ok());
        assert!(Endpoint::parse("127.0.0.1").is_err());
        assert!(Endpoint::parse("http://a:1").is_err());
        assert!(Endpoint::parse("a:0").is_err());
        assert!(Endpoint::parse("a:99999").is_err());
        assert!(Endpoint::parse("u@a:1").is_err());
        assert!(Endpoint::parse("a b:1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn no_service_is_an_error() {
        let e = errors("[proxy]\nlisten = \"127.0.0.1:1\"\n");
        assert!(e[0].contains("no [[service]]"), "{e:?}");
    }
}
