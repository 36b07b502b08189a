//! `weir ctl`: the command-line client of the admin API (`weir::api`). It decides
//! nothing itself: every answer is the server's, shown as a table or, with `--json`, as
//! the API's own JSON, so the CLI can never disagree with what `curl` would show. It
//! reads answers and writes requests as the types of `weir::api`, the contract
//! the server builds them from. `--json` prints the answer's own JSON (pretty-printed),
//! never a re-encoding of those types, so it shows what the server said, fields this
//! build does not know of included.
//!
//! Everything writes to a `&mut impl Write` and takes its stop signal as a future, so the
//! integration tests drive the same code as the binary against a real weir on port 0.
//!
//! The rollout verbs (`rollout`, `promote`, `pause`, `resume`, `abort`, `retry`) are thin
//! on purpose: the plan, its phases and what a step waits for live in the server, which
//! refuses a verb in the wrong phase (409); the CLI only words the answer.
//!
//! `status --watch` polls instead of streaming because the API has no stream, and a
//! once-a-second GET is negligible load. It clears the screen only on a terminal; into a
//! pipe or file it separates frames with a line, so the output stays readable and
//! testable. Its REQ/S column is the guard window's request count divided by the
//! window's length: those counts are totals over a sliding window, not monotonic
//! counters, so differencing two frames would be wrong, and the window average is what
//! the guard judges anyway.

use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::{Deserialize, DeserializeOwned};
use serde_json::Value;

use weir::api::{self, Event, Phase, RolloutDoc, ServiceDoc};

pub mod releases;
use weir::model::MAX_WEIGHT;

/// Where `weir run` puts the admin API unless `[admin] listen` says otherwise.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9901";
/// A local admin API accepts in microseconds; a few seconds still covers a remote one,
/// and a firewall that drops SYNs fails fast instead of after the kernel's ~2 minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole exchange. A mutation fsyncs the state file and the journal: milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `events --follow` asks for new events. A person is watching; nothing waits
/// on this, so a second is both responsive and negligible load.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);
/// How often `status --watch` redraws: the rollout driver and the guard act on the
/// scale of seconds, so a faster redraw would show nothing new.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Between two `--watch` frames when stdout is not a terminal.
const FRAME_SEPARATOR: &str = "---";
/// Clear the screen and home the cursor: one redraw per frame on a terminal.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";
/// The API's largest page (`admin::MAX_EVENTS`); following drains a backlog in as few
/// requests as possible.
const MAX_PAGE: u64 = 1000;
/// Admin answers are a few KiB (1000 events: well under 1 MiB). The bound is for a wrong
/// `--admin` pointing at something that streams.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Talk to a running weir through its admin API.
#[derive(Debug, Clone, Parser)]
#[command(name = "weir ctl")]
pub struct CtlArgs {
    /// Base URL of the admin API (plain http).
    #[arg(
        long,
        global = true,
        env = "WEIR_ADMIN",
        default_value = DEFAULT_ADMIN,
        value_name = "URL"
    )]
    pub admin: String,
    /// File holding the admin token (else the WEIR_ADMIN_TOKEN environment variable).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables (`events --follow`: one event per line).
    #[arg(long, global = true)]
    pub json: bool,
    /// Who is acting, for the journal and the release history (sent as
    /// `X-Weir-Actor`; default `$USER@hostname`).
    #[arg(long, global = true, env = "WEIR_ACTOR", value_name = "NAME")]
    pub actor: Option<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What `weir ctl fleet` does besides showing the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FleetAction {
    /// Re-seed the fleet's store from this instance's state (an operator's decision
    /// after a store mismatch; every instance then follows the new store).
    Reseed,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Services and their pools: weights, traffic shares, versions, rollouts.
    Status {
        /// Only this service.
        service: Option<String>,
        /// Redraw once a second until Ctrl-C (REQ/S becomes the guard window's average).
        #[arg(long, short)]
        watch: bool,
        /// With --watch: stop after this many frames.
        #[arg(
            long,
            value_name = "N",
            requires = "watch",
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        count: Option<u64>,
        /// Wait for the service's rollout to end, printing each change: exit 0 when it
        /// is promoted (or none runs and the last one was), 1 when it ended degraded or
        /// aborted, 2 on --timeout.
        #[arg(long, requires = "service", conflicts_with = "watch")]
        wait: bool,
        /// With --wait: give up after this long (e.g. 90s, 10m).
        #[arg(long, requires = "wait", value_name = "DURATION", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Set the weight of every pool of a service, as one change.
    #[command(after_help = "Example: weir ctl set-weight shop stable=90 canary=10 \
                            --reason 'canary looks healthy'")]
    SetWeight {
        /// The service, as `status` names it.
        service: String,
        /// One POOL=WEIGHT for every pool of the service.
        #[arg(required = true, value_name = "POOL=WEIGHT", value_parser = parse_pool_weight)]
        weights: Vec<PoolWeight>,
        /// Why, for the audit journal.
        #[arg(long)]
        reason: Option<String>,
        /// Refuse if the service is no longer at this version (see `status`).
        #[arg(long, value_name = "VERSION")]
        if_version: Option<u64>,
    },
    /// Send all traffic to the service's baseline pool.
    Rollback {
        /// The service, as `status` names it.
        service: String,
        /// Why, for the audit journal.
        #[arg(long)]
        reason: Option<String>,
    },
    /// The audit journal, oldest first.
    Events {
        /// Only events after this id.
        #[arg(long, value_name = "ID")]
        since: Option<u64>,
        /// At most this many (the API's default is 100).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_PAGE))]
        limit: Option<u64>,
        /// Only the newest N events.
        #[arg(
            long,
            value_name = "N",
            conflicts_with_all = ["since", "limit"],
            value_parser = clap::value_parser!(u64).range(1..=MAX_PAGE)
        )]
        tail: Option<u64>,
        /// Then keep printing new events as they happen, until Ctrl-C. Without --since it
        /// starts at the newest event (or the --tail newest), not the oldest.
        #[arg(long, short)]
        follow: bool,
    },
    /// Release a new build: record VERSION (and, on a VM fleet, the hosts running it)
    /// on the candidate pool and start the service's rollout plan.
    #[command(after_help = "Example: weir ctl release shop --version v1.4.2 \
                            --endpoints 10.0.2.1:8080,10.0.2.2:8080")]
    Release {
        /// The service, as `status` names it.
        service: String,
        /// The build's version label.
        #[arg(long = "version", value_name = "VERSION")]
        release_version: String,
        /// The pool to release to (default: the plan's candidate, or after a
        /// promotion the pool that is not the baseline).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
        /// The pool's new endpoints, comma-separated host:port (default: unchanged).
        #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
        endpoints: Option<Vec<String>>,
        /// Release during a freeze window anyway, for this reason (recorded in the
        /// journal; the rollout then goes on through the freeze).
        #[arg(long, value_name = "REASON")]
        override_freeze: Option<String>,
    },
    /// The service's releases: revision, version, pool, endpoints, times, outcome, who.
    History {
        /// The service, as `status` names it.
        service: String,
    },
    /// Go back to an earlier release's endpoints, version and weights in one step
    /// (aborting a running rollout).
    Undo {
        /// The service, as `status` names it.
        service: String,
        /// The revision to go back to (see `history`; default: the newest earlier one
        /// that held all the traffic, never a degraded or aborted build).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        to_revision: Option<u64>,
    },
    /// Make weir re-read its config file and apply it.
    Reload,
    /// Fleet mode: the instances, the leader, which revision each one serves; `reseed`
    /// makes this instance's state the fleet's after etcd was wiped or restored.
    Fleet {
        #[arg(value_enum)]
        action: Option<FleetAction>,
    },
    /// Start the service's rollout plan (`[service.rollout]` in the config).
    #[command(after_help = "Example: weir ctl rollout shop --candidate canary")]
    Rollout {
        /// The service, as `status` names it.
        service: String,
        /// Roll out this pool instead of the plan's candidate.
        #[arg(long, value_name = "POOL")]
        candidate: Option<String>,
        /// Go ahead during a freeze window, for this reason (recorded in the journal).
        #[arg(long, value_name = "REASON")]
        override_freeze: Option<String>,
    },
    /// Pass the rollout's current pause or gate, or with --full finish it at once.
    Promote {
        /// The service, as `status` names it.
        service: String,
        /// Skip every remaining step: the candidate takes all traffic and becomes the
        /// baseline.
        #[arg(long)]
        full: bool,
        /// Go ahead during a freeze window, for this reason (recorded in the journal).
        #[arg(long, value_name = "REASON")]
        override_freeze: Option<String>,
    },
    /// Hold a progressing rollout at its current step.
    Pause {
        /// The service, as `status` names it.
        service: String,
    },
    /// Let a paused rollout go on.
    Resume {
        /// The service, as `status` names it.
        service: String,
    },
    /// Stop the rollout and send all traffic back to the stable pool.
    Abort {
        /// The service, as `status` names it.
        service: String,
    },
    /// Start an aborted or degraded rollout again from its first step.
    Retry {
        /// The service, as `status` names it.
        service: String,
        /// Go ahead during a freeze window, for this reason (recorded in the journal).
        #[arg(long, value_name = "REASON")]
        override_freeze: Option<String>,
    },
    /// Whether weir is alive (`/healthz`, or `/readyz` with --ready): exit 0 if so.
    /// Needs no token, so container health checks can use it.
    Health {
        /// Ask whether weir is ready (listeners bound, config loaded) instead.
        #[arg(long)]
        ready: bool,
    },
}

/// A rollout verb of the admin API, with its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutAction {
    Start {
        candidate: Option<String>,
        override_freeze: Option<String>,
    },
    Promote {
        full: bool,
        override_freeze: Option<String>,
    },
    Pause,
    Resume,
    Abort,
    Retry {
        override_freeze: Option<String>,
    },
}

impl RolloutAction {
    /// The last path segment: `POST /api/v1/services/{name}/{verb}`.
    pub fn verb(&self) -> &'static str {
        match self {
            RolloutAction::Start { .. } => "rollout",
            RolloutAction::Promote { .. } => "promote",
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Abort => "abort",
            RolloutAction::Retry { .. } => "retry",
        }
    }

    /// The verb's request body: only the fields that differ from the API's defaults, so
    /// `{}` means the plain verb.
    fn body(&self) -> Value {
        match self {
            RolloutAction::Start {
                candidate,
                override_freeze,
            } => request_json(&api::StartRolloutRequest {
                candidate: candidate.clone(),
                override_freeze: override_freeze.clone(),
            }),
            RolloutAction::Promote {
                full,
                override_freeze,
            } => request_json(&api::PromoteRequest {
                full: *full,
                override_freeze: override_freeze.clone(),
            }),
            RolloutAction::Retry { override_freeze } => request_json(&api::RetryRequest {
                override_freeze: override_freeze.clone(),
            }),
            _ => request_json(&api::EmptyRequest {}),
        }
    }
}

/// One `POOL=WEIGHT` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWeight {
    pub pool: String,
    pub weight: u32,
}

/// Parse `POOL=WEIGHT` before anything is sent, so a typo never reaches the server as
/// some other change.
pub fn parse_pool_weight(s: &str) -> Result<PoolWeight, String> {
    let Some((pool, weight)) = s.split_once('=') else {
        return Err(format!(
            "`{s}` is not POOL=WEIGHT: give a weight, e.g. {}=10",
            s.trim()
        ));
    };
    let (pool, weight) = (pool.trim(), weight.trim());
    if pool.is_empty() {
        return Err(format!("`{s}` has no pool name before `=`, e.g. canary=10"));
    }
    let weight: u64 = weight.parse().map_err(|_| {
        format!("weight of pool `{pool}` must be a whole number 0..={MAX_WEIGHT}, got `{weight}`")
    })?;
    if weight > MAX_WEIGHT {
        return Err(format!(
            "weight of pool `{pool}` is above the maximum of {MAX_WEIGHT}"
        ));
    }
    Ok(PoolWeight {
        pool: pool.to_owned(),
        weight: weight as u32,
    })
}

/// Why a `weir ctl` command failed. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API answered with an error status: `message` and `problems` are its
    /// [`api::ErrorBody`], `body` the JSON it came as.
    #[error("{message} (HTTP {})", .status.as_u16())]
    Api {
        status: StatusCode,
        message: String,
        problems: Vec<String>,
        body: Value,
    },
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin API at {url} did not answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout { url: String },
    #[error("request to the admin API at {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("unexpected answer from {url}: {reason}; is --admin weir's admin address?")]
    NotAdmin { url: String, reason: String },
    /// JSON this build cannot read as the document it asked for.
    #[error("cannot read the admin API's answer: {0}; is the server a weir of another version?")]
    Unreadable(String),
    /// Bad flags or arguments, found before any request.
    #[error("{0}")]
    Usage(String),
    /// Writing to stdout failed.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
}

/// The admin token and where it came from, for the hint when the server refuses it.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub from: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// `--token-file` (trimmed) wins over `WEIR_ADMIN_TOKEN`: a flag is the more deliberate
/// choice. The environment is passed in so tests need not mutate the process's.
pub fn resolve_token(file: Option<&Path>, env: Option<String>) -> Result<Option<Token>, CtlError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CtlError::Usage(format!(
                "cannot read --token-file {}: {}",
                path.display(),
                io_reason(&e)
            ))
        })?;
        let value = text.trim();
        if value.is_empty() {
            return Err(CtlError::Usage(format!(
                "--token-file {} is empty",
                path.display()
            )));
        }
        return Ok(Some(Token {
            value: value.to_owned(),
            from: format!("--token-file {}", path.display()),
        }));
    }
    Ok(env
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(|value| Token {
            value,
            from: "WEIR_ADMIN_TOKEN".into(),
        }))
}

/// A small client for the admin API: one keep-alive connection pool, JSON in and out,
/// every failure turned into a one-line [`CtlError`].
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `http://host:port` plus any path prefix, without a trailing slash.
    base: String,
    /// Marked sensitive, so `Debug` shows no secret.
    auth: Option<HeaderValue>,
    /// `X-Weir-Actor`: who the journal says made a change.
    actor: Option<HeaderValue>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// `admin` is a base URL such as `http://127.0.0.1:9901` (`127.0.0.1:9901` also
    /// works). Only plain http: the admin API has no TLS of its own.
    pub fn new(admin: &str, token: Option<&str>) -> Result<AdminClient, CtlError> {
        let admin = admin.trim();
        let with_scheme = if admin.contains("://") {
            admin.to_owned()
        } else {
            format!("http://{admin}")
        };
        let bad = |why: &str| CtlError::Usage(format!("--admin `{admin}`: {why}"));
        let uri: Uri = with_scheme
            .parse()
            .map_err(|_| bad("not a URL; expected e.g. http://127.0.0.1:9901"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "weir ctl speaks plain http only (the admin API has no TLS); \
                     use http://, e.g. through an SSH tunnel",
                ));
            }
            _ => return Err(bad("only http:// URLs are supported")),
        }
        let Some(authority) = uri.authority() else {
            return Err(bad("no host; expected e.g. http://127.0.0.1:9901"));
        };
        if uri.query().is_some() {
            return Err(bad("a base URL takes no query string"));
        }
        let base = format!("http://{authority}{}", uri.path().trim_end_matches('/'));
        let auth = token
            .map(|t| {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    CtlError::Usage(
                        "the admin token contains characters that cannot be sent in a header"
                            .into(),
                    )
                })?;
                v.set_sensitive(true);
                Ok::<_, CtlError>(v)
            })
            .transpose()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(AdminClient {
            base,
            auth,
            actor: None,
            client,
        })
    }

    /// Send `actor` as `X-Weir-Actor` with every request (dropped if it cannot be a
    /// header value; the server bounds and sanitises it anyway).
    pub fn with_actor(mut self, actor: &str) -> AdminClient {
        self.actor = HeaderValue::from_str(actor).ok();
        self
    }

    /// The base URL requests go to.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// `GET /api/v1/services`.
    pub async fn services(&self) -> Result<Reply<api::ServiceList>, CtlError> {
        self.call(Method::GET, "/api/v1/services", None, None).await
    }

    /// `GET /api/v1/services/{name}`.
    pub async fn service(&self, name: &str) -> Result<Reply<ServiceDoc>, CtlError> {
        let path = format!("/api/v1/services/{}", segment(name));
        self.call(Method::GET, &path, None, None).await
    }

    /// `PUT /api/v1/services/{name}/weights`; answers the new service document.
    pub async fn set_weights(
        &self,
        service: &str,
        weights: &[PoolWeight],
        reason: Option<&str>,
        if_version: Option<u64>,
    ) -> Result<Reply<ServiceDoc>, CtlError> {
        let body = api::WeightsRequest {
            weights: weights.iter().map(|w| (w.pool.clone(), w.weight)).collect(),
            reason: reason.map(String::from),
        };
        let path = format!("/api/v1/services/{}/weights", segment(service));
        self.call(Method::PUT, &path, Some(request_json(&body)), if_version)
            .await
    }

    /// `POST /api/v1/services/{name}/rollback`; answers the new service document.
    pub async fn rollback(
        &self,
        service: &str,
        reason: Option<&str>,
    ) -> Result<Reply<ServiceDoc>, CtlError> {
        let body = api::RollbackRequest {
            reason: reason.map(String::from),
        };
        let path = format!("/api/v1/services/{}/rollback", segment(service));
        self.call(Method::POST, &path, Some(request_json(&body)), None)
            .await
    }

    /// `POST /api/v1/services/{name}/{verb}` for a rollout verb; answers the new service
    /// document.
    pub async fn rollout(
        &self,
        service: &str,
        action: &RolloutAction,
    ) -> Result<Reply<ServiceDoc>, CtlError> {
        let path = format!("/api/v1/services/{}/{}", segment(service), action.verb());
        self.call(Method::POST, &path, Some(action.body()), None)
            .await
    }

    /// `POST /api/v1/services/{name}/release`; answers the new service document.
    pub async fn release(
        &self,
        service: &str,
        request: &api::ReleaseRequest,
    ) -> Result<Reply<ServiceDoc>, CtlError> {
        let path = format!("/api/v1/services/{}/release", segment(service));
        self.call(Method::POST, &path, Some(request_json(request)), None)
            .await
    }

    /// `POST /api/v1/services/{name}/undo`; answers the new service document.
    pub async fn undo(
        &self,
        service: &str,
        to_revision: Option<u64>,
    ) -> Result<Reply<ServiceDoc>, CtlError> {
        let path = format!("/api/v1/services/{}/undo", segment(service));
        let body = request_json(&api::UndoRequest { to_revision });
        self.call(Method::POST, &path, Some(body), None).await
    }

    /// `GET /api/v1/services/{name}/history`.
    pub async fn history(&self, service: &str) -> Result<Reply<api::HistoryDoc>, CtlError> {
        let path = format!("/api/v1/services/{}/history", segment(service));
        self.call(Method::GET, &path, None, None).await
    }

    /// `GET /api/v1/events?tail=N`: the newest `n` events, oldest first.
    pub async fn tail(&self, n: u64) -> Result<Reply<api::EventList>, CtlError> {
        self.call(Method::GET, &format!("/api/v1/events?tail={n}"), None, None)
            .await
    }

    /// `GET /api/v1/events`: events after `since`, oldest first.
    pub async fn events(
        &self,
        since: Option<u64>,
        limit: Option<u64>,
    ) -> Result<Reply<api::EventList>, CtlError> {
        let mut query = Vec::new();
        if let Some(s) = since {
            query.push(format!("since={s}"));
        }
        if let Some(l) = limit {
            query.push(format!("limit={l}"));
        }
        let mut path = "/api/v1/events".to_owned();
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        self.call(Method::GET, &path, None, None).await
    }

    /// `POST /api/v1/reload`. The server reads no field; the body is there because a
    /// mutation must be JSON.
    pub async fn reload(&self) -> Result<Reply<api::ReloadDoc>, CtlError> {
        let body = request_json(&api::EmptyRequest {});
        self.call(Method::POST, "/api/v1/reload", Some(body), None)
            .await
    }

    /// `GET /api/v1/fleet`, or `POST /api/v1/fleet/reseed`.
    pub async fn fleet(&self, reseed: bool) -> Result<Reply<weir::FleetStatus>, CtlError> {
        if reseed {
            let body = request_json(&api::EmptyRequest {});
            self.call(Method::POST, "/api/v1/fleet/reseed", Some(body), None)
                .await
        } else {
            self.call(Method::GET, "/api/v1/fleet", None, None).await
        }
    }

    /// `GET /api/v1/version`: which weir answers.
    pub async fn version(&self) -> Result<Reply<api::VersionDoc>, CtlError> {
        self.call(Method::GET, "/api/v1/version", None, None).await
    }

    /// `GET /healthz` (or `/readyz`): the plain-text probe answer, an error unless 200.
    pub async fn health(&self, ready: bool) -> Result<String, CtlError> {
        let path = if ready { "/readyz" } else { "/healthz" };
        let (status, _, body) = self.exchange(Method::GET, path, None, None).await?;
        let text = String::from_utf8_lossy(&body).trim().to_owned();
        if status == StatusCode::OK {
            return Ok(text);
        }
        Err(CtlError::Api {
            status,
            message: format!("{path} answered `{text}`"),
            problems: Vec::new(),
            body: Value::Null,
        })
    }

    /// One exchange with a JSON answer: the document `T`, or for an error status an
    /// [`api::ErrorBody`]. Mutations always carry a JSON body (`{}` at least): the API
    /// refuses any other content type, which is what keeps browser forms out.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_version: Option<u64>,
    ) -> Result<Reply<T>, CtlError> {
        let (status, content_type, body) = self.exchange(method, path, body, if_version).await?;
        let Ok(json) = serde_json::from_slice::<Value>(&body) else {
            return Err(CtlError::NotAdmin {
                url: self.base.clone(),
                reason: format!(
                    "HTTP {} with a non-JSON body ({content_type})",
                    status.as_u16()
                ),
            });
        };
        if status.is_success() {
            return Ok(Reply {
                json,
                doc: PhantomData,
            });
        }
        // Something between us and weir may answer errors of its own: their JSON is
        // shown whole.
        let (message, problems) = match api::ErrorBody::deserialize(&json) {
            Ok(e) => (e.error, e.problems.unwrap_or_default()),
            Err(_) => (json.to_string(), Vec::new()),
        };
        Err(CtlError::Api {
            status,
            message,
            problems,
            body: json,
        })
    }

    /// One request and its whole answer: status, content type, body.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_version: Option<u64>,
    ) -> Result<(StatusCode, String, Bytes), CtlError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("weir-ctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        if let Some(actor) = &self.actor {
            req = req.header("x-weir-actor", actor.clone());
        }
        if let Some(v) = if_version {
            req = req.header(header::IF_MATCH, format!("\"{v}\""));
        }
        let bytes = match &body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| CtlError::Usage(format!("cannot build the request for {path}: {e}")))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let reason = error_reason(&e);
                if e.is_connect() {
                    CtlError::Unreachable {
                        url: self.base.clone(),
                        reason,
                    }
                } else {
                    CtlError::Transport {
                        url: self.base.clone(),
                        reason,
                    }
                }
            })?;
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no content type")
                .to_owned();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| CtlError::Transport {
                    url: self.base.clone(),
                    reason: format!("reading the answer: {}", error_reason(&*e)),
                })?
                .to_bytes();
            Ok::<_, CtlError>((status, content_type, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| CtlError::Timeout {
                url: self.base.clone(),
            })?
    }
}

/// A successful answer of the API: its JSON, to be read as the document `T`. It is read
/// only where something is made of it (a table, a cursor): `--json` prints what the
/// server said even when this build could not read it, as a weir of another version may
/// send.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    /// The answer as received.
    pub json: Value,
    doc: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Reply<T> {
    /// The answer as the API's document type.
    pub fn doc(&self) -> Result<T, CtlError> {
        T::deserialize(&self.json).map_err(|e| CtlError::Unreadable(e.to_string()))
    }
}

/// A request type of the API as the JSON to send. They are structs of strings, numbers,
/// booleans and string-keyed maps, which always serialise.
fn request_json(body: &impl Serialize) -> Value {
    serde_json::to_value(body).expect("an admin request serialises to JSON")
}

/// The fleet as `weir ctl fleet` shows it; `members`: one line per instance too.
fn write_fleet(out: &mut dyn Write, f: &weir::FleetStatus, members: bool) -> io::Result<()> {
    writeln!(
        out,
        "fleet {} seen from {}: store {} ({}){}",
        f.name,
        f.instance,
        f.store,
        f.endpoint,
        f.problem
            .as_deref()
            .map(|p| format!(": {p}"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "leader {}{}; serving revision {} of {}; guard judges {}; {} member(s)",
        f.leader.as_deref().unwrap_or("none"),
        if f.leads { " (this instance)" } else { "" },
        f.applied_revision,
        f.store_revision,
        if f.judging_fleet {
            "the fleet's traffic"
        } else {
            "this instance's traffic"
        },
        f.members.len()
    )?;
    if members {
        for m in &f.members {
            writeln!(
                out,
                "  {:<20} {:<8} revision {} (lag {}){}{}",
                m.instance,
                m.version,
                m.applied_revision,
                m.lag,
                m.last_seen_ms
                    .map(|ms| format!(", seen {ms} ms ago"))
                    .unwrap_or_default(),
                if m.leader { ", leader" } else { "" }
            )?;
        }
    }
    Ok(())
}

/// `weir 0.1.0 (abc1234) at http://127.0.0.1:9901`: the head of `status`, so that
/// what is shown can be told apart from another weir's answer (a fleet member, a stale
/// port-forward) and a revision mismatch after an upgrade is plain to see. A weir that
/// predates the version route still gets its status shown, the version as unknown.
pub async fn server_line(client: &AdminClient) -> String {
    let version = match client.version().await.and_then(|r| r.doc()) {
        Ok(v) => format!("{} ({})", v.version, v.revision),
        Err(_) => "(version unknown)".to_owned(),
    };
    format!("weir {version} at {}", client.url())
}

/// Percent-encode one path segment. Service names are `[A-Za-z0-9._-]` on the server, so
/// this only matters for a mistyped name, which then reads as unknown, not as some
/// other route.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The most specific cause in an error chain, readable: `connection refused`, not
/// `client error (Connect)` or a Debug dump.
fn error_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    if let Some(io) = innermost.downcast_ref::<io::Error>() {
        return io_reason(io);
    }
    innermost.to_string()
}

/// `Connection refused (os error 111)` → `connection refused`.
fn io_reason(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::TimedOut {
        return format!("no connection within {}s", CONNECT_TIMEOUT.as_secs());
    }
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_owned(),
    }
}

/// `weir ctl …` from the command line: real stdout and stderr, Ctrl-C ends `--follow`
/// and `--watch`.
pub async fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let env_token = std::env::var("WEIR_ADMIN_TOKEN").ok();
    // `ctrl_c` installs its handler on first poll, and only `--follow` and `--watch` poll
    // it: every other command keeps the default Ctrl-C behaviour.
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let screen = if io::stdout().is_terminal() {
        Screen::Terminal
    } else {
        Screen::Plain
    };
    Ok(execute_on(
        &args,
        env_token,
        screen,
        &mut io::stdout(),
        &mut io::stderr(),
        ctrl_c,
    )
    .await)
}

/// Run one command: results to `out`, errors to `err` as `weir ctl: …` lines (with
/// `--json`, an API error's JSON body also goes to `out`). `stop` ends `--follow` and
/// `--watch`. `out` is taken for a pipe, not a terminal: `--watch` separates its frames
/// with a line instead of clearing the screen.
pub async fn execute(
    args: &CtlArgs,
    env_token: Option<String>,
    out: &mut impl Write,
    err: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> ExitCode {
    execute_on(args, env_token, Screen::Plain, out, err, stop).await
}

/// What `out` is, as far as `--watch` cares. The writer is generic, so only the caller
/// that owns the real stdout can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// Redraw in place with ANSI clear-screen.
    Terminal,
    /// Append frames, separated by a `---` line.
    Plain,
}

/// [`execute`] onto a known kind of output.
pub async fn execute_on(
    args: &CtlArgs,
    env_token: Option<String>,
    screen: Screen,
    out: &mut impl Write,
    err: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> ExitCode {
    let token = match resolve_token(args.token_file.as_deref(), env_token) {
        Ok(t) => t,
        Err(e) => return fail(&e, None, args.json, out, err),
    };
    let client = match AdminClient::new(&args.admin, token.as_ref().map(|t| t.value.as_str())) {
        Ok(c) => c.with_actor(&args.actor.clone().unwrap_or_else(releases::default_actor)),
        Err(e) => return fail(&e, None, args.json, out, err),
    };
    if let CtlCommand::Status {
        service: Some(service),
        wait: true,
        timeout,
        ..
    } = &args.command
    {
        return match releases::wait(&client, service, *timeout, args.json, out, stop).await {
            Ok(code) => code,
            Err(e) => fail(&e, token.as_ref(), args.json, out, err),
        };
    }
    match dispatch(&client, args, screen, out, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        // `weir ctl events | head`: the reader has what it wanted.
        Err(CtlError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&e, token.as_ref(), args.json, out, err),
    }
}

fn fail(
    e: &CtlError,
    token: Option<&Token>,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> ExitCode {
    // Nothing useful is left to do if stderr itself is gone.
    let _ = report(e, token, json, out, err);
    ExitCode::FAILURE
}

fn report(
    e: &CtlError,
    token: Option<&Token>,
    json: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<()> {
    if let CtlError::Api {
        status,
        message,
        problems,
        body,
    } = e
    {
        if json && !body.is_null() {
            write_json(out, body)?;
        }
        // A rejected reload lists every problem; one per line reads better than the
        // `; `-joined summary in `error`.
        if !problems.is_empty() {
            let head = message
                .split_once(": ")
                .map_or(message.as_str(), |(h, _)| h);
            writeln!(err, "weir ctl: {head} (HTTP {}):", status.as_u16())?;
            for p in problems {
                writeln!(err, "  {p}")?;
            }
            return Ok(());
        }
        writeln!(err, "weir ctl: {e}")?;
        if *status == StatusCode::UNAUTHORIZED {
            match token {
                None => writeln!(
                    err,
                    "weir ctl: hint: give the admin token with --token-file FILE or WEIR_ADMIN_TOKEN"
                )?,
                Some(t) => writeln!(
                    err,
                    "weir ctl: hint: the token from {} was refused; it must match the server's \
                     [admin] token_file (or its WEIR_ADMIN_TOKEN)",
                    t.from
                )?,
            }
        }
        return Ok(());
    }
    writeln!(err, "weir ctl: {e}")
}

async fn dispatch(
    client: &AdminClient,
    args: &CtlArgs,
    screen: Screen,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<(), CtlError> {
    let json = args.json;
    match &args.command {
        CtlCommand::Status {
            service,
            watch: true,
            count,
            ..
        } => {
            if let Some(name) = service {
                check_service(name)?;
            }
            let view = Watch {
                service: service.as_deref(),
                count: *count,
                json,
                screen,
            };
            view.run(client, out, stop).await
        }
        CtlCommand::Status {
            service: None,
            watch: false,
            ..
        } => {
            let reply = client.services().await?;
            if json {
                return Ok(write_json(out, &reply.json)?);
            }
            let services = reply.doc()?.services;
            writeln!(out, "{}", server_line(client).await)?;
            if services.is_empty() {
                writeln!(out, "no services")?;
            } else {
                write_services(out, &services)?;
            }
            // In fleet mode, one line on the fleet (404 otherwise: nothing to say).
            if let Ok(fleet) = client.fleet(false).await
                && let Ok(fleet) = fleet.doc()
            {
                write_fleet(out, &fleet, false)?;
            }
            Ok(())
        }
        CtlCommand::Status {
            service: Some(name),
            watch: false,
            ..
        } => {
            check_service(name)?;
            let reply = client.service(name).await?;
            if !json {
                writeln!(out, "{}", server_line(client).await)?;
            }
            show_service(out, &reply, json)
        }
        CtlCommand::SetWeight {
            service,
            weights,
            reason,
            if_version,
        } => {
            check_service(service)?;
            // A JSON object keeps only the last of two equal keys, so the server could
            // not tell the user about `stable=1 stable=2`: refuse it here.
            for (i, w) in weights.iter().enumerate() {
                if weights[..i].iter().any(|o| o.pool == w.pool) {
                    return Err(CtlError::Usage(format!(
                        "pool `{}` is given more than once",
                        w.pool
                    )));
                }
            }
            let reply = client
                .set_weights(service, weights, reason.as_deref(), *if_version)
                .await?;
            show_service(out, &reply, json)
        }
        CtlCommand::Rollback { service, reason } => {
            check_service(service)?;
            let reply = client.rollback(service, reason.as_deref()).await?;
            show_service(out, &reply, json)
        }
        CtlCommand::Events {
            since,
            limit,
            tail,
            follow: false,
        } => {
            let reply = match tail {
                Some(n) => client.tail(*n).await?,
                None => client.events(*since, *limit).await?,
            };
            if json {
                return Ok(write_json(out, &reply.json)?);
            }
            for e in &reply.doc()?.events {
                writeln!(out, "{}", event_line(e))?;
            }
            Ok(())
        }
        CtlCommand::Events {
            since,
            limit,
            tail,
            follow: true,
        } => {
            // Without --since, following starts at the newest event (or the --tail
            // newest), as `tail -f` starts at the end of a file, not the whole journal.
            let since = match since {
                Some(s) => Some(*s),
                None => {
                    let reply = client.tail(tail.unwrap_or(1)).await?;
                    let events = reply.doc()?.events;
                    Some(events.first().map_or(0, |e| e.id.saturating_sub(1)))
                }
            };
            follow_events(client, since, *limit, json, out, stop).await
        }
        CtlCommand::Release {
            service,
            release_version,
            pool,
            endpoints,
            override_freeze,
        } => {
            check_service(service)?;
            let request = api::ReleaseRequest {
                version: release_version.clone(),
                pool: pool.clone(),
                endpoints: endpoints.clone(),
                override_freeze: override_freeze.clone(),
            };
            let reply = client.release(service, &request).await?;
            show_service(out, &reply, json)
        }
        CtlCommand::Undo {
            service,
            to_revision,
        } => {
            check_service(service)?;
            let reply = client.undo(service, *to_revision).await?;
            show_service(out, &reply, json)
        }
        CtlCommand::History { service } => {
            check_service(service)?;
            let reply = client.history(service).await?;
            if json {
                return Ok(write_json(out, &reply.json)?);
            }
            Ok(releases::write_history(out, &reply.doc()?)?)
        }
        CtlCommand::Health { ready } => {
            let text = client.health(*ready).await?;
            Ok(writeln!(out, "{text}")?)
        }
        CtlCommand::Reload => {
            let reply = client.reload().await?;
            if json {
                return Ok(write_json(out, &reply.json)?);
            }
            Ok(write_reload(out, &reply.doc()?)?)
        }
        CtlCommand::Fleet { action } => {
            let reply = client.fleet(action.is_some()).await?;
            if json {
                return Ok(write_json(out, &reply.json)?);
            }
            Ok(write_fleet(out, &reply.doc()?, true)?)
        }
        CtlCommand::Rollout {
            service,
            candidate,
            override_freeze,
        } => {
            let action = RolloutAction::Start {
                candidate: candidate.clone(),
                override_freeze: override_freeze.clone(),
            };
            rollout(client, service, &action, json, out).await
        }
        CtlCommand::Promote {
            service,
            full,
            override_freeze,
        } => {
            let action = RolloutAction::Promote {
                full: *full,
                override_freeze: override_freeze.clone(),
            };
            rollout(client, service, &action, json, out).await
        }
        CtlCommand::Pause { service } => {
            rollout(client, service, &RolloutAction::Pause, json, out).await
        }
        CtlCommand::Resume { service } => {
            rollout(client, service, &RolloutAction::Resume, json, out).await
        }
        CtlCommand::Abort { service } => {
            rollout(client, service, &RolloutAction::Abort, json, out).await
        }
        CtlCommand::Retry {
            service,
            override_freeze,
        } => {
            let action = RolloutAction::Retry {
                override_freeze: override_freeze.clone(),
            };
            rollout(client, service, &action, json, out).await
        }
    }
}

async fn rollout(
    client: &AdminClient,
    service: &str,
    action: &RolloutAction,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    check_service(service)?;
    let reply = client.rollout(service, action).await?;
    show_service(out, &reply, json)
}

fn check_service(name: &str) -> Result<(), CtlError> {
    if name.trim().is_empty() {
        return Err(CtlError::Usage("SERVICE must not be empty".into()));
    }
    Ok(())
}

/// Print events after `since`, then poll for new ones until `stop`. A full page means a
/// backlog, fetched again at once; only a short page waits for the interval.
async fn follow_events(
    client: &AdminClient,
    since: Option<u64>,
    limit: Option<u64>,
    json: bool,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<(), CtlError> {
    tokio::pin!(stop);
    let page = limit.unwrap_or(MAX_PAGE);
    let mut cursor = since.unwrap_or(0);
    loop {
        let reply = tokio::select! {
            reply = client.events(Some(cursor), Some(page)) => reply?,
            () = &mut stop => return Ok(()),
        };
        // Read even for `--json`: the cursor is the events' ids.
        let events = reply.doc()?.events;
        // The same events as received, for `--json`.
        let received = reply
            .json
            .get("events")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (e, as_received) in events.iter().zip(received) {
            if json {
                // One compact event per line: a stream that `jq` or `grep` can follow.
                writeln!(out, "{as_received}")?;
            } else {
                writeln!(out, "{}", event_line(e))?;
            }
            cursor = cursor.max(e.id);
        }
        out.flush()?;
        if events.len() as u64 >= page {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_INTERVAL) => {}
            () = &mut stop => return Ok(()),
        }
    }
}

/// `status --watch`: one frame per [`WATCH_INTERVAL`] until `stop` or `count` frames.
struct Watch<'a> {
    service: Option<&'a str>,
    count: Option<u64>,
    json: bool,
    screen: Screen,
}

impl Watch<'_> {
    /// A failure on the first frame ends the watch like any other command (a wrong
    /// service or token will not fix itself). Later failures are shown in the frame
    /// and retried, so a weir restart mid-rollout does not end the view; with
    /// `--count`, a failed last frame still exits 1.
    async fn run(
        &self,
        client: &AdminClient,
        out: &mut impl Write,
        stop: impl Future<Output = ()>,
    ) -> Result<(), CtlError> {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut frame = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return Ok(()),
            }
            let fetched = tokio::select! {
                body = self.fetch(client) => body,
                () = &mut stop => return Ok(()),
            };
            frame += 1;
            let last = self.count.is_some_and(|n| frame >= n);
            match fetched {
                Err(e) if frame == 1 || last => return Err(e),
                fetched => {
                    let frame = Frame {
                        number: frame,
                        at: weir::model::Clock::now(&weir::model::SystemClock),
                        admin: client.url(),
                        body: fetched,
                    };
                    self.write(out, &frame)?;
                    out.flush()?;
                }
            }
            if last {
                return Ok(());
            }
        }
    }

    /// One poll: the JSON as received and, for the table, the services in it. With
    /// `--json` nothing is read from it: the frame is the JSON.
    async fn fetch(&self, client: &AdminClient) -> Result<Polled, CtlError> {
        Ok(match self.service {
            Some(name) => {
                let reply = client.service(name).await?;
                let services = if self.json {
                    Vec::new()
                } else {
                    vec![reply.doc()?]
                };
                Polled {
                    json: reply.json,
                    services,
                }
            }
            None => {
                let reply = client.services().await?;
                let services = if self.json {
                    Vec::new()
                } else {
                    reply.doc()?.services
                };
                Polled {
                    json: reply.json,
                    services,
                }
            }
        })
    }

    /// One frame. With `--json`, one compact document per line (as `events --follow`
    /// does): neither separators nor escapes, so `jq` can read the stream.
    fn write(&self, out: &mut impl Write, frame: &Frame<'_>) -> io::Result<()> {
        if self.json {
            return match &frame.body {
                Ok(polled) => writeln!(out, "{}", polled.json),
                // Shaped as the API's own errors, so one reader handles both.
                Err(e) => {
                    let line = serde_json::to_string(&api::ErrorBody::new(e.to_string()))
                        .map_err(io::Error::other)?;
                    writeln!(out, "{line}")
                }
            };
        }
        match self.screen {
            Screen::Terminal => write!(out, "{CLEAR_SCREEN}")?,
            Screen::Plain if frame.number > 1 => writeln!(out, "{FRAME_SEPARATOR}")?,
            Screen::Plain => {}
        }
        writeln!(
            out,
            "{}  {}  every {}s; REQ/S is the average over the time the guard window covers",
            humantime::format_rfc3339_seconds(frame.at),
            frame.admin,
            WATCH_INTERVAL.as_secs()
        )?;
        let services = match &frame.body {
            Ok(polled) => &polled.services,
            Err(e) => {
                return writeln!(
                    out,
                    "weir ctl: {e}; retrying every {}s",
                    WATCH_INTERVAL.as_secs()
                );
            }
        };
        if services.is_empty() {
            return writeln!(out, "no services");
        }
        write_view(out, services, Traffic::Rates)
    }
}

/// What one `--watch` poll got.
struct Frame<'a> {
    number: u64,
    at: SystemTime,
    admin: &'a str,
    body: Result<Polled, CtlError>,
}

/// What a `--watch` poll got: see [`Watch::fetch`].
struct Polled {
    json: Value,
    services: Vec<ServiceDoc>,
}

fn write_json(out: &mut impl Write, body: &Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(body).map_err(io::Error::other)?;
    writeln!(out, "{text}")
}

fn show_service(
    out: &mut impl Write,
    reply: &Reply<ServiceDoc>,
    json: bool,
) -> Result<(), CtlError> {
    if json {
        write_json(out, &reply.json)?;
    } else {
        write_services(out, &[reply.doc()?])?;
    }
    Ok(())
}

/// The status table: one row per pool, the service and version repeated on every row so
/// that `grep canary` still shows them. Under it, per service, its rollout in one line
/// and its guard's health and last decisions.
pub fn write_services(out: &mut impl Write, services: &[ServiceDoc]) -> io::Result<()> {
    write_view(out, services, Traffic::Totals)
}

/// How the table shows each pool's guard window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// REQ: requests in the window, as the guard counts them.
    Totals,
    /// REQ/S: those requests over the window's length (`--watch`).
    Rates,
}

fn write_view(out: &mut impl Write, services: &[ServiceDoc], traffic: Traffic) -> io::Result<()> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for s in services {
        // The guard's live window per pool, matched by name.
        let live = |pool: &str| s.guard.pools.iter().find(|p| p.pool == pool);
        notes.extend(rollout_line(s));
        notes.extend(freeze_line(s));
        notes.extend(releases::versions_line(s));
        notes.extend(guard_notes(s));
        for p in &s.pools {
            let share = format!("{:.1}", p.share * 100.0);
            let endpoints = p.endpoints.len().to_string();
            // Endpoints not taking traffic are named under the table.
            let states = &p.endpoint_states;
            let down: Vec<String> = states
                .iter()
                .filter(|e| e.state != api::EndpointCondition::Up)
                .map(|e| format!("{} ({})", e.address, e.state.as_str()))
                .collect();
            let endpoints = if down.is_empty() {
                endpoints
            } else {
                // A pool with none up fails every request it is given: said first.
                let none = if down.len() == states.len() {
                    "NO ENDPOINT UP; "
                } else {
                    ""
                };
                notes.push(format!(
                    "{}/{}: {none}not taking traffic: {}",
                    s.name,
                    p.name,
                    down.join(", ")
                ));
                format!("{}/{endpoints} up", states.len() - down.len())
            };
            let w = live(&p.name);
            let requests = match traffic {
                Traffic::Totals => w.map_or_else(|| "-".into(), |w| w.requests.to_string()),
                // Over the time the window really covers (a new pool's, or one a
                // rollback just reset, is shorter than `window_secs`), and no rate
                // before it covers one slice.
                Traffic::Rates => w
                    .and_then(|w| Some((w.requests, w.span_secs.filter(|s| *s > 0.0)?)))
                    .map_or_else(|| "-".into(), |(n, secs)| format!("{:.1}", n as f64 / secs)),
            };
            let errors = w.map_or_else(|| "-".into(), |w| format!("{:.1}", w.error_rate * 100.0));
            let p99 = w
                .and_then(|w| w.p99_ms)
                .map_or_else(|| "-".into(), |v| format!("{v:.1}"));
            rows.push(vec![
                s.name.clone(),
                p.name.clone(),
                p.weight.to_string(),
                share,
                s.version.to_string(),
                endpoints,
                requests,
                errors,
                p99,
            ]);
        }
    }
    write_table(
        out,
        &[
            ("SERVICE", Align::Left),
            ("POOL", Align::Left),
            ("WEIGHT", Align::Right),
            ("SHARE %", Align::Right),
            ("VERSION", Align::Right),
            ("ENDPOINTS", Align::Right),
            (
                match traffic {
                    Traffic::Totals => "REQ",
                    Traffic::Rates => "REQ/S",
                },
                Align::Right,
            ),
            ("ERR %", Align::Right),
            ("P99 MS", Align::Right),
        ],
        &rows,
    )?;
    for note in notes {
        writeln!(out, "{note}")?;
    }
    Ok(())
}

/// A service's rollout in one line: phase, step, time in the step and what it waits for;
/// for an idle service, its plan if it has one. `None`: idle without a plan (or a server
/// too old to report rollouts, which reads as idle).
pub fn rollout_line(s: &ServiceDoc) -> Option<String> {
    let name = &s.name;
    let r = match &s.rollout {
        RolloutDoc::Started(r) if r.phase != Phase::Idle => r,
        _ => {
            let plan = s.plan.as_ref()?;
            let steps = plan.steps.len();
            return Some(format!(
                "{name}: no rollout (plan: {}, {steps} step{})",
                plan.strategy.as_str(),
                if steps == 1 { "" } else { "s" }
            ));
        }
    };
    // `step_index` counts from 0; people count steps from 1.
    let mut step = format!("step {}/{}", r.step_index + 1, r.steps_total);
    if let Some(what) = &r.step {
        let _ = write!(step, " ({what})");
    }
    let stable = &r.stable;
    Some(match r.phase {
        Phase::Progressing | Phase::Paused => format!(
            "{name}: rollout {}, {step}, {} in step; waiting for: {}",
            r.phase.as_str(),
            whole_seconds(r.time_in_step_secs),
            r.waiting_for
        ),
        Phase::Promoted => format!(
            "{name}: rollout promoted: {} is the new baseline, replacing {stable}",
            r.candidate
        ),
        Phase::Aborted => format!(
            "{name}: rollout aborted at {step}: all traffic back to {stable}; retry starts it again"
        ),
        Phase::Degraded => {
            // Who ended it: an analysis template past its failure limit, or the guard.
            let by = match r.analysis.iter().find(|a| a.failed > a.failure_limit) {
                Some(a) => format!(
                    "analysis `{}` failed {} time(s), over its limit of {}{}",
                    a.template,
                    a.failed,
                    a.failure_limit,
                    a.last_detail
                        .as_deref()
                        .map(|d| format!(" (last: {d})"))
                        .unwrap_or_default()
                ),
                None => "the guard".to_owned(),
            };
            format!(
                "{name}: rollout degraded at {step}: {by} sent all traffic back to {stable}; \
                 retry starts it again"
            )
        }
        // Told apart above: an idle rollout shows the plan instead.
        Phase::Idle => format!("{name}: rollout idle, {step}"),
    })
}

/// A freeze window in force: no rollout starts or advances until it ends.
fn freeze_line(s: &ServiceDoc) -> Option<String> {
    let f = s.freeze.as_ref()?;
    Some(format!(
        "{}: FROZEN until {} ({}); rollout verbs need --override-freeze \"reason\"",
        s.name, f.until, f.reason
    ))
}

/// `72.4` → `1m 12s`: a person reads a step's age, nobody needs the fraction.
fn whole_seconds(secs: f64) -> String {
    let secs = if secs.is_finite() { secs.max(0.0) } else { 0.0 };
    humantime::format_duration(Duration::from_secs(secs as u64)).to_string()
}

/// Lines under the table about a service's guard: health, then the last decision per
/// candidate in words. Nothing for a service without a guard that is healthy.
fn guard_notes(s: &ServiceDoc) -> Vec<String> {
    let name = &s.name;
    let guard = &s.guard;
    if !guard.enabled && s.health == api::Health::Healthy {
        return Vec::new();
    }
    let mut lines = Vec::new();
    let mode = guard.mode.map_or("off", api::GuardMode::as_str);
    match s.health {
        api::Health::Degraded => {
            let why = guard.degraded_reason.as_deref().unwrap_or("SLO breached");
            lines.push(format!(
                "{name}: DEGRADED (guard {mode}) — on the baseline since: {why}"
            ));
        }
        api::Health::Unavailable => lines.push(format!(
            "{name}: UNAVAILABLE (guard {mode}) — a pool with traffic has no endpoint up"
        )),
        api::Health::Healthy => lines.push(format!("{name}: healthy (guard {mode})")),
    }
    if guard.baseline_unhealthy {
        lines.push(format!("  {name}: the baseline is failing too"));
    }
    for d in &guard.decisions {
        lines.push(format!(
            "  {} {}: {}",
            d.pool,
            d.verdict.as_str(),
            d.summary
        ));
        lines.push(format!("    {}", judged_basis(d)));
    }
    lines
}

/// What a decision compared with the SLO, in one line: the candidate's figures over
/// the span it judged and the exposure's confidence bounds (a breach when a lower bound
/// is past the limit, a pass once the upper bounds are within it).
fn judged_basis(d: &api::DecisionDoc) -> String {
    let basis = match d.basis {
        api::Basis::Exposure => "exposure",
        api::Basis::FastWindow => "fast window",
    };
    let [lo, hi] = d.candidate_bounds.error_rate;
    let mut line = format!(
        "judged on the {basis} ({}): error rate {:.2}% (bounds {:.2}–{:.2}%)",
        whole_seconds(d.window_secs),
        d.candidate.error_rate * 100.0,
        lo * 100.0,
        hi * 100.0
    );
    if let Some(p99) = d.candidate.p99_ms {
        let _ = write!(line, ", p99 {p99:.1} ms");
        if let [lo, Some(hi)] = d.candidate_bounds.p99_ms {
            let lo = lo.map_or("-".to_owned(), |v| format!("{v:.1}"));
            let _ = write!(line, " (bounds {lo}–{hi:.1} ms)");
        }
    }
    line
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

fn write_table(
    out: &mut impl Write,
    columns: &[(&str, Align)],
    rows: &[Vec<String>],
) -> io::Result<()> {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (head, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let heads: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&heads).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let w = widths[i];
            let _ = match columns[i].1 {
                Align::Left => write!(line, "{cell:<w$}"),
                Align::Right => write!(line, "{cell:>w$}"),
            };
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `#id time service kind source actor from→to "reason" details`, one line per event.
/// Text that came from users (the reason) is quoted and escaped, so a newline or a
/// terminal escape in it cannot forge lines or repaint the screen.
pub fn event_line(e: &Event) -> String {
    let or_dash = |s: Option<&str>| match s {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".to_owned(),
    };
    let mut parts = vec![
        format!("#{}", e.id),
        or_dash(Some(&e.time)),
        or_dash(Some(&e.service)),
        or_dash(Some(e.kind.as_str())),
        or_dash(Some(e.source.as_str())),
        or_dash(e.actor.as_deref()),
    ];
    if let (Some(from), Some(to)) = (&e.from, &e.to) {
        parts.push(format!("{}→{}", weights(from), weights(to)));
    }
    if let Some(reason) = &e.reason {
        parts.push(format!("{reason:?}"));
    }
    // Free-form by design: each kind of event records its own figures.
    if let Some(details) = e.details.as_object() {
        for (key, value) in details {
            let empty = match value {
                Value::Null => true,
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                Value::String(s) => s.is_empty(),
                _ => false,
            };
            if !empty {
                // Compact JSON escapes control characters too.
                parts.push(format!("{key}={value}"));
            }
        }
    }
    parts.join(" ")
}

/// `{"stable":90,"canary":10}` → `stable=90,canary=10`, the `set-weight` syntax.
fn weights(w: &api::Weights) -> String {
    w.iter()
        .map(|(pool, w)| format!("{pool}={w}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn write_reload(out: &mut impl Write, body: &api::ReloadDoc) -> io::Result<()> {
    writeln!(out, "config reloaded (event #{})", body.event.id)?;
    // A `config_reloaded` event's details are the reload's report.
    let Ok(report) = api::ReloadReport::deserialize(&body.event.details) else {
        return Ok(());
    };
    for (label, items) in [
        ("services added", &report.added),
        ("services removed", &report.removed),
        (
            "pools changed, weights reset to the config's",
            &report.reset,
        ),
        ("run-time weights kept", &report.kept),
        (
            "changed, but applied only on restart",
            &report.needs_restart,
        ),
    ] {
        if !items.is_empty() {
            writeln!(out, "  {label}: {}", items.join(", "))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn endpoint(address: &str) -> Value {
        json!({"address": address, "state": "up", "healthy": true, "ejected": false,
               "ejections": 0, "inflight": 0, "last_check": null})
    }

    /// A service document as the API sends it (as JSON, to read like the wire).
    fn service_json(rollout: Value, plan: Value) -> Value {
        json!({
            "name": "shop",
            "hosts": [],
            "baseline": "stable",
            "version": 4,
            "pools": [
                {"name": "stable", "weight": 75, "share": 0.75, "endpoints": ["a"],
                 "endpoint_states": [endpoint("a")]},
                {"name": "canary", "weight": 25, "share": 0.25, "endpoints": ["b"],
                 "endpoint_states": [endpoint("b")]},
            ],
            "updated_at": "2023-11-14T22:13:20.000Z",
            "updated_by": "admin",
            "health": "healthy",
            "not_durable": false,
            "guard": {
                "enabled": false,
                "mode": null,
                "window_secs": 30.0,
                "slo": null,
                "health": "healthy",
                "degraded_reason": null,
                "baseline_unhealthy": false,
                "pools": [
                    {"pool": "stable", "requests": 90, "errors": 0, "error_rate": 0.0,
                     "p50_ms": 1.0, "p99_ms": 2.0, "span_secs": 30.0},
                    // A pool whose window was reset 15 s ago: its rate is over those.
                    {"pool": "canary", "requests": 30, "errors": 3, "error_rate": 0.1,
                     "p50_ms": 1.0, "p99_ms": 4.5, "span_secs": 15.0},
                ],
                "decisions": [],
            },
            "rollout": rollout,
            "plan": plan,
        })
    }

    fn service(rollout: Value, plan: Value) -> ServiceDoc {
        serde_json::from_value(service_json(rollout, plan)).unwrap()
    }

    fn running(phase: &str, waiting_for: &str) -> Value {
        json!({
            "phase": phase,
            "candidate": "canary",
            "stable": "stable",
            "step_index": 2,
            "steps_total": 7,
            "step": "25% to the candidate",
            "steps": ["5%", "pause", "25% to the candidate", "gate", "50%", "manual", "100%"],
            "time_in_step_secs": 72.4,
            "waiting_for": waiting_for,
            "deadline": null,
            "started_at": "2023-11-14T22:00:00.000Z",
            "last_decision": null,
        })
    }

    #[test]
    fn a_frozen_service_says_until_when_and_how_to_override() {
        let mut doc = service_json(json!({"phase": "idle"}), Value::Null);
        assert_eq!(
            freeze_line(&serde_json::from_value(doc.clone()).unwrap()),
            None
        );
        doc["freeze"] = json!({"reason": "holidays", "until": "2026-12-27T00:00:00.000Z"});
        assert_eq!(
            freeze_line(&serde_json::from_value(doc).unwrap()).as_deref(),
            Some(
                "shop: FROZEN until 2026-12-27T00:00:00.000Z (holidays); rollout verbs need \
                 --override-freeze \"reason\""
            )
        );
    }

    #[test]
    fn rollout_line_words_every_phase() {
        let plan = json!({"strategy": "canary", "candidate": "canary", "steps": ["a", "b"]});
        let line = |rollout: Value| rollout_line(&service(rollout, plan.clone()));
        assert_eq!(
            line(running(
                "progressing",
                "evidence: 312/500 requests, guard verdict pass"
            ))
            .as_deref(),
            Some(
                "shop: rollout progressing, step 3/7 (25% to the candidate), 1m 12s in step; \
                 waiting for: evidence: 312/500 requests, guard verdict pass"
            )
        );
        assert_eq!(
            line(running("paused", "resume (paused by an operator)")).as_deref(),
            Some(
                "shop: rollout paused, step 3/7 (25% to the candidate), 1m 12s in step; \
                 waiting for: resume (paused by an operator)"
            )
        );
        assert_eq!(
            line(running("aborted", "nothing (aborted)")).as_deref(),
            Some(
                "shop: rollout aborted at step 3/7 (25% to the candidate): all traffic back \
                 to stable; retry starts it again"
            )
        );
        assert_eq!(
            line(running("degraded", "nothing (degraded)")).as_deref(),
            Some(
                "shop: rollout degraded at step 3/7 (25% to the candidate): the guard sent all \
                 traffic back to stable; retry starts it again"
            )
        );
        // Ended by an analysis template past its failure limit: it says which.
        let mut by_analysis = running("degraded", "nothing (degraded)");
        by_analysis["analysis"] = json!([{
            "template": "http-success", "background": false, "passed": 1, "count": 5,
            "failed": 2, "failure_limit": 1, "inconclusive": 0,
            "last_at": "2023-11-14T22:01:00.000Z", "last_value": 0.93,
            "last_outcome": "fail", "last_detail": "0.93 is not >= 0.99"
        }]);
        assert_eq!(
            line(by_analysis).as_deref(),
            Some(
                "shop: rollout degraded at step 3/7 (25% to the candidate): analysis \
                 `http-success` failed 2 time(s), over its limit of 1 (last: 0.93 is not >= \
                 0.99) sent all traffic back to stable; retry starts it again"
            )
        );
        let mut done = running("promoted", "nothing (promoted)");
        done["step_index"] = json!(7);
        done["step"] = Value::Null;
        assert_eq!(
            line(done).as_deref(),
            Some("shop: rollout promoted: canary is the new baseline, replacing stable")
        );
        assert_eq!(
            line(json!({"phase": "idle"})).as_deref(),
            Some("shop: no rollout (plan: canary, 2 steps)")
        );
        let one = json!({"strategy": "blue-green", "candidate": "green", "steps": ["preview"]});
        assert_eq!(
            rollout_line(&service(json!({"phase": "idle"}), one)).as_deref(),
            Some("shop: no rollout (plan: blue-green, 1 step)")
        );
        // Idle without a plan, or a server that predates rollouts: nothing to say.
        assert_eq!(
            rollout_line(&service(json!({"phase": "idle"}), Value::Null)),
            None
        );
        let mut old = service_json(Value::Null, Value::Null);
        let old_fields = old.as_object_mut().unwrap();
        old_fields.remove("rollout");
        old_fields.remove("plan");
        assert_eq!(rollout_line(&serde_json::from_value(old).unwrap()), None);
    }

    #[test]
    fn an_answer_is_read_only_when_asked_and_says_why_it_cannot_be() {
        // A document this build does not know: still there as JSON for `--json`.
        let newer = json!({"name": "shop", "rollout": {"phase": "canarying"}});
        let reply: Reply<ServiceDoc> = Reply {
            json: newer.clone(),
            doc: PhantomData,
        };
        assert_eq!(reply.json, newer);
        let e = reply.doc().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read the admin API's answer: unknown variant `canarying`"),
            "{e}"
        );
        let fine: Reply<ServiceDoc> = Reply {
            json: service_json(json!({"phase": "idle"}), Value::Null),
            doc: PhantomData,
        };
        assert_eq!(fine.doc().unwrap().name, "shop");
    }

    #[test]
    fn seconds_are_whole_and_never_negative() {
        assert_eq!(whole_seconds(0.4), "0s");
        assert_eq!(whole_seconds(72.9), "1m 12s");
        assert_eq!(whole_seconds(-3.0), "0s");
        assert_eq!(whole_seconds(f64::NAN), "0s");
    }

    #[test]
    fn rollout_actions_send_only_what_differs_from_the_default() {
        // The bodies are the API's request types.
        let start = RolloutAction::Start {
            candidate: None,
            override_freeze: None,
        };
        assert_eq!((start.verb(), start.body()), ("rollout", json!({})));
        let named = RolloutAction::Start {
            candidate: Some("green".into()),
            override_freeze: None,
        };
        assert_eq!(named.body(), json!({"candidate": "green"}));
        let frozen = RolloutAction::Start {
            candidate: None,
            override_freeze: Some("hotfix".into()),
        };
        assert_eq!(frozen.body(), json!({"override_freeze": "hotfix"}));
        let promote = |full| RolloutAction::Promote {
            full,
            override_freeze: None,
        };
        assert_eq!(promote(false).body(), json!({}));
        assert_eq!(promote(true).body(), json!({"full": true}));
        let retry = RolloutAction::Retry {
            override_freeze: Some("hotfix".into()),
        };
        assert_eq!(
            (retry.verb(), retry.body()),
            ("retry", json!({"override_freeze": "hotfix"}))
        );
        for (action, verb) in [
            (RolloutAction::Pause, "pause"),
            (RolloutAction::Resume, "resume"),
            (RolloutAction::Abort, "abort"),
            (
                RolloutAction::Retry {
                    override_freeze: None,
                },
                "retry",
            ),
        ] {
            assert_eq!((action.verb(), action.body()), (verb, json!({})));
        }
    }

    fn frame(number: u64, body: Result<Value, CtlError>) -> Frame<'static> {
        // Read as `status` without a service reads it: the list.
        let body = body.map(|json| Polled {
            services: serde_json::from_value::<api::ServiceList>(json.clone())
                .unwrap()
                .services,
            json,
        });
        Frame {
            number,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            admin: "http://127.0.0.1:9901",
            body,
        }
    }

    fn render(screen: Screen, json: bool, frame: &Frame<'_>) -> String {
        let watch = Watch {
            service: None,
            count: None,
            json,
            screen,
        };
        let mut out = Vec::new();
        watch.write(&mut out, frame).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn watch_frames_redraw_a_terminal_and_separate_in_a_pipe() {
        let body = json!({"services": [service_json(
            running("progressing", "promote (manual pause)"),
            Value::Null
        )]});
        let expected = "\
2023-11-14T22:13:20Z  http://127.0.0.1:9901  every 1s; REQ/S is the average over the time the guard window covers
SERVICE  POOL    WEIGHT  SHARE %  VERSION  ENDPOINTS  REQ/S  ERR %  P99 MS
shop     stable      75     75.0        4          1    3.0    0.0     2.0
shop     canary      25     25.0        4          1    2.0   10.0     4.5
shop: rollout progressing, step 3/7 (25% to the candidate), 1m 12s in step; waiting for: promote (manual pause)
";
        let first = render(Screen::Plain, false, &frame(1, Ok(body.clone())));
        assert_eq!(first, expected);
        let second = render(Screen::Plain, false, &frame(2, Ok(body.clone())));
        assert_eq!(second, format!("{FRAME_SEPARATOR}\n{expected}"));
        for number in [1, 2] {
            let tty = render(Screen::Terminal, false, &frame(number, Ok(body.clone())));
            assert_eq!(tty, format!("\x1b[H\x1b[2J{expected}"));
        }
        // `--json`: the API's document, compact, one per line, never an escape.
        let json = render(Screen::Terminal, true, &frame(2, Ok(body.clone())));
        assert_eq!(json, format!("{body}\n"));
    }

    #[test]
    fn a_pool_with_no_endpoint_up_is_never_shown_healthy() {
        let mut doc = service_json(json!({"phase": "idle"}), Value::Null);
        doc["health"] = json!("unavailable");
        doc["guard"]["health"] = json!("unavailable");
        doc["pools"][1]["endpoint_states"][0]["state"] = json!("down");
        doc["pools"][1]["endpoint_states"][0]["healthy"] = json!(false);
        let doc: ServiceDoc = serde_json::from_value(doc).unwrap();
        let mut out = Vec::new();
        write_services(&mut out, &[doc]).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("shop/canary: NO ENDPOINT UP; not taking traffic: b (down)"),
            "{out}"
        );
        assert!(out.contains("shop: UNAVAILABLE (guard off)"), "{out}");
        assert!(!out.contains("healthy"), "{out}");
    }

    #[test]
    fn a_failed_poll_is_shown_in_its_frame() {
        let gone = || {
            Err(CtlError::Unreachable {
                url: "http://127.0.0.1:9901".into(),
                reason: "connection refused".into(),
            })
        };
        let text = render(Screen::Plain, false, &frame(3, gone()));
        assert_eq!(
            text.lines().collect::<Vec<_>>()[2],
            "weir ctl: cannot reach the admin API at http://127.0.0.1:9901: connection refused; \
             retrying every 1s"
        );
        let json: Value =
            serde_json::from_str(&render(Screen::Plain, true, &frame(3, gone()))).unwrap();
        assert_eq!(
            json["error"],
            "cannot reach the admin API at http://127.0.0.1:9901: connection refused"
        );
        let none = render(Screen::Plain, false, &frame(1, Ok(json!({"services": []}))));
        assert!(none.ends_with("\nno services\n"), "{none}");
    }
}
