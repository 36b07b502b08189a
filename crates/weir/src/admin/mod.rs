//! The admin HTTP API: JSON views of services and events, and mutations translated into
//! controller `Command`s. Holds no routing logic of its own.
//!
//! Safety rules, in the order they are checked:
//! - the `Host` must be an IP literal, `localhost` or an allowed name (else 421), so a
//!   page whose DNS name is rebound to this address cannot talk to it (`/healthz` and
//!   `/readyz` are exempt: probes may name the host in ways we cannot predict, and they
//!   reveal nothing);
//! - a state-changing method from a browser must come from this listener's own origin
//!   (`Origin`, `Sec-Fetch-Site`; else 403);
//! - bearer token (constant-time compare) on every `/api/` route;
//! - mutations only by PUT/POST (else 405); a mutation body must be `application/json`
//!   (else 415), so a form on another site cannot change weights; routes whose body is
//!   optional also take no body and no `Content-Type`;
//! - bodies are bounded in size and in time (408), and a JSON object may not repeat a key.
//!
//! Every document it answers and every body it reads is a type of [`api`], the contract
//! `weir ctl` reads with too; this module fills them from the controller and the guard.

pub mod api;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::config::{Config, RolloutConfig};
use crate::control::controller::{Command, ControlError, Controller, RolloutVerb, rfc3339};
use crate::control::guard::{Decision, Guard, GuardStatus};
use crate::control::judge::{Basis, Bounds, Figures, Judgement, Verdict};
use crate::control::rollout::Rollout;
use crate::control::store::Event;
use crate::dataplane::pool::EndpointStatus;
use crate::dataplane::routing::{Service, ServiceSnapshot};
use crate::model::{Clock, EventKind, Source, Step, build};
use crate::telemetry::metrics::Metrics;

/// Largest admin request body accepted; a weights document is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;
/// How long a request body may take to arrive, all of it: a client that stalls mid-body
/// would otherwise hold a connection (and a task) forever. 64 KiB in 10 s is 6.5 KB/s.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_EVENTS: usize = 100;
const MAX_EVENTS: usize = 1000;
/// What `/series` returns unless asked otherwise: five minutes, the dashboard's charts.
const DEFAULT_SERIES: Duration = Duration::from_secs(300);

/// The dashboard: one self-contained page (inline CSS and script, no external fetch),
/// so it works air-gapped. It reads and changes state only through the API below.
const DASHBOARD: &str = include_str!("dashboard.html");

pub(crate) type AdminResponse = Response<Full<Bytes>>;

/// Everything the admin API needs.
pub struct Admin {
    controller: Arc<Controller>,
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
    token: Option<String>,
    metrics_auth: bool,
    /// The file `POST /api/v1/reload` and SIGHUP re-read.
    config_path: Option<PathBuf>,
    ready: AtomicBool,
    /// Host names (lowercase, no trailing dot) besides IP literals and `localhost` that
    /// the API answers to.
    allowed_hosts: Vec<String>,
    body_timeout: Duration,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("auth", &self.token.is_some())
            .field("config_path", &self.config_path)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("body_timeout", &self.body_timeout)
            .finish_non_exhaustive()
    }
}

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.token_file {path}: {message}")]
    TokenFile { path: String, message: String },
    #[error(
        "admin.listen {0} is not a loopback address and no admin token is set: \
         set [admin] token_file or WEIR_ADMIN_TOKEN, or listen on 127.0.0.1"
    )]
    OpenAdmin(SocketAddr),
}

/// The admin token: `[admin] token_file` if configured, else `WEIR_ADMIN_TOKEN`. Refuses
/// an admin listener off loopback without one.
pub(crate) fn resolve_token(config: &Config) -> Result<Option<String>, AdminError> {
    let token = match &config.admin.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| AdminError::TokenFile {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let t = text.trim().to_owned();
            if t.is_empty() {
                return Err(AdminError::TokenFile {
                    path: path.display().to_string(),
                    message: "the file is empty".into(),
                });
            }
            Some(t)
        }
        None => std::env::var("WEIR_ADMIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    if token.is_none() && !config.admin.listen.ip().is_loopback() {
        return Err(AdminError::OpenAdmin(config.admin.listen));
    }
    Ok(token)
}

impl Admin {
    pub fn new(
        controller: Arc<Controller>,
        guard: Arc<Guard>,
        metrics: Arc<Metrics>,
        token: Option<String>,
        metrics_auth: bool,
        config_path: Option<PathBuf>,
    ) -> Admin {
        Admin {
            controller,
            guard,
            metrics,
            token,
            metrics_auth,
            config_path,
            ready: AtomicBool::new(false),
            allowed_hosts: Vec::new(),
            body_timeout: BODY_READ_TIMEOUT,
        }
    }

    /// Host names (without port) the API answers to besides IP literals and `localhost`,
    /// e.g. the name Prometheus or `weir ctl` uses from another container. Compared
    /// case-insensitively, a trailing dot ignored; any port.
    pub fn with_allowed_hosts<S: AsRef<str>>(
        mut self,
        hosts: impl IntoIterator<Item = S>,
    ) -> Admin {
        self.allowed_hosts = hosts
            .into_iter()
            .map(|h| normal_name(h.as_ref()))
            .filter(|h| !h.is_empty())
            .collect();
        self
    }

    /// How long a request body may take to arrive ([`BODY_READ_TIMEOUT`] by default).
    pub fn with_body_read_timeout(mut self, timeout: Duration) -> Admin {
        self.body_timeout = timeout;
        self
    }

    /// Mark the process ready (listeners bound, config loaded): `/readyz` answers 200.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Serve the admin API on `listener` until `shutdown` resolves.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("admin accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let admin = Arc::clone(&self);
            let svc = service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.handle(req, peer).await) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("admin connection {peer}: {e}");
                }
            });
        }
    }

    /// Answer one admin request.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> AdminResponse {
        let path = req.uri().path().to_owned();
        // Probes answer whatever the Host: an orchestrator may address us by a service
        // name we cannot know, a refused probe restarts a healthy process, and one bit of
        // "up" is nothing a rebound page could use.
        match path.as_str() {
            "/healthz" => return text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                // An unwritable state dir does not make weir unready: it serves the
                // saved routing, and taking it out of rotation would turn a disk
                // problem into an outage. It says so (and `weir_state_writable`).
                return if self.ready.load(Ordering::Acquire) {
                    if self.controller.writable() {
                        text(StatusCode::OK, "ready\n")
                    } else {
                        text(
                            StatusCode::OK,
                            "ready; the state dir refuses writes: changes are refused (503) until it takes them\n",
                        )
                    }
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                };
            }
            _ => {}
        }
        // Before the token: a rebound page must learn nothing, not even whether a token
        // is needed, and a valid token does not make a foreign Host ours.
        if let Some(refusal) = self.refuse_foreign_host(&req) {
            return refusal;
        }
        if let Some(refusal) = refuse_cross_origin(&req) {
            return refusal;
        }
        match path.as_str() {
            "/" | "/index.html" => return dashboard(&req),
            "/metrics" => {
                if self.metrics_auth
                    && let Some(refusal) = self.refuse_unauthorized(&req)
                {
                    return refusal;
                }
                if let Some(refusal) = refuse_unless_read(&req, "/metrics") {
                    return refusal;
                }
                self.metrics.set_state_writable(self.controller.writable());
                self.publish_windows();
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                return r;
            }
            _ => {}
        }
        let Some(rest) = path.strip_prefix("/api/") else {
            return error(StatusCode::NOT_FOUND, format!("no such route: {path}"));
        };
        if let Some(refusal) = self.refuse_unauthorized(&req) {
            return refusal;
        }
        let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let route = match segments.as_slice() {
            ["v1", "services"] => Route::Services,
            ["v1", "services", name] => Route::Service(name),
            ["v1", "services", name, "weights"] => Route::Weights(name),
            ["v1", "services", name, "series"] => Route::Series(name),
            ["v1", "services", name, "rollback"] => Route::Rollback(name),
            ["v1", "services", name, "release"] => Route::Release(name),
            ["v1", "services", name, "undo"] => Route::Undo(name),
            ["v1", "services", name, "history"] => Route::History(name),
            [
                "v1",
                "services",
                name,
                verb @ ("rollout" | "promote" | "pause" | "resume" | "abort" | "retry"),
            ] => Route::Rollout(name, verb),
            ["v1", "events"] => Route::Events,
            ["v1", "reload"] => Route::Reload,
            ["v1", "fleet"] => Route::Fleet,
            ["v1", "fleet", "reseed"] => Route::Reseed,
            ["v1", "version"] => Route::Version,
            _ => return error(StatusCode::NOT_FOUND, format!("no such route: {path}")),
        };
        let method = req.method().clone();
        if route.mutates() {
            if method != Method::PUT && method != Method::POST {
                return not_allowed(
                    format!("{path} changes state: use {}", route.method()),
                    route.method(),
                );
            }
            if method.as_str() != route.method() {
                return not_allowed(
                    format!("{path} takes {}, not {method}", route.method()),
                    route.method(),
                );
            }
            // A route whose body is optional may also come without one and without a
            // Content-Type (`curl -X POST …/rollback`); any Content-Type but JSON is still
            // refused, and so, once read, is a body without one (`read_json`).
            let bodyless_ok =
                route.body_optional() && !req.headers().contains_key(header::CONTENT_TYPE);
            if !bodyless_ok && !is_json(&req) {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "request body must be Content-Type: application/json",
                );
            }
        } else if let Some(refusal) = refuse_unless_read(&req, &path) {
            return refusal;
        }
        let actor = Some(actor_of(&req, peer));
        match route {
            Route::Services => {
                let table = self.controller.router().table();
                let services = table
                    .services()
                    .iter()
                    .map(|s| service_doc(s, &self.controller, &self.guard))
                    .collect();
                ok(&api::ServiceList { services })
            }
            Route::Service(name) => match self.controller.router().table().service(name) {
                Some(s) => with_etag(
                    ok(&service_doc(s, &self.controller, &self.guard)),
                    s.snapshot().version,
                ),
                None => error(StatusCode::NOT_FOUND, format!("unknown service `{name}`")),
            },
            Route::Weights(name) => {
                let name = name.to_owned();
                let if_version = match if_match(&req) {
                    Ok(v) => v,
                    Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
                };
                self.command_from(req, api::WeightsRequest::from_json, |r| {
                    Command::SetWeights {
                        service: name,
                        weights: r.weights.into_iter().collect(),
                        if_version,
                        source: Source::Admin,
                        actor,
                        reason: r.reason,
                    }
                })
                .await
            }
            Route::Rollback(name) => {
                let name = name.to_owned();
                self.command_from(req, api::RollbackRequest::from_json, |r| {
                    Command::Rollback {
                        service: name,
                        source: Source::Admin,
                        actor,
                        reason: r.reason,
                        details: None,
                    }
                })
                .await
            }
            Route::Rollout(name, verb) => {
                let name = name.to_owned();
                let verb = verb.to_owned();
                self.command_from(
                    req,
                    |b| rollout_verb(&verb, b),
                    |verb| Command::Rollout {
                        service: name,
                        verb,
                        source: Source::Admin,
                        actor,
                    },
                )
                .await
            }
            Route::Release(name) => {
                let name = name.to_owned();
                self.command_from(req, api::ReleaseRequest::from_json, |r| Command::Release {
                    service: name,
                    version: r.version,
                    pool: r.pool,
                    endpoints: r.endpoints,
                    override_freeze: r.override_freeze,
                    source: Source::Admin,
                    actor,
                })
                .await
            }
            Route::Undo(name) => {
                let name = name.to_owned();
                self.command_from(req, api::UndoRequest::from_json, |r| Command::Undo {
                    service: name,
                    to_revision: r.to_revision,
                    source: Source::Admin,
                    actor,
                })
                .await
            }
            Route::History(name) => match self.controller.router().table().service(name) {
                Some(_) => ok(&api::HistoryDoc {
                    service: name.to_owned(),
                    releases: self.controller.service_control(name).releases,
                }),
                None => error(StatusCode::NOT_FOUND, format!("unknown service `{name}`")),
            },
            Route::Series(name) => {
                let span = match series_query(req.uri().query()) {
                    Ok(s) => s,
                    Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
                };
                match self.controller.router().table().service(name) {
                    Some(s) => ok(&series_doc(
                        s,
                        span,
                        self.controller.clock().as_ref(),
                        &self.guard,
                    )),
                    None => error(StatusCode::NOT_FOUND, format!("unknown service `{name}`")),
                }
            }
            Route::Events => {
                let query = match events_query(req.uri().query()) {
                    Ok(q) => q,
                    Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
                };
                // Never the writer's lock (the journal's read side); recent events come
                // from memory, older ones from the files: a blocking read, so off the
                // async workers.
                let Some(log) = self.controller.event_log() else {
                    return ok(&api::EventList { events: Vec::new() });
                };
                let events = tokio::task::spawn_blocking(move || match query {
                    EventsQuery::Since { since, limit } => log.since(since, limit),
                    EventsQuery::Tail(n) => log.newest(n),
                })
                .await;
                match events {
                    Ok(Ok(events)) => ok(&api::EventList { events }),
                    Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            Route::Reload => {
                // Drain the (ignored) body so the connection stays reusable.
                if let Err(resp) = self.read_json(req).await {
                    return resp;
                }
                self.reload(actor).await
            }
            Route::Version => ok(&api::VersionDoc {
                version: build::VERSION.to_owned(),
                revision: build::REVISION.to_owned(),
            }),
            Route::Fleet => match self.controller.fleet() {
                Some(fleet) => ok(&fleet.status()),
                None => error(
                    StatusCode::NOT_FOUND,
                    "this weir is not in fleet mode (no [fleet] in its config)",
                ),
            },
            Route::Reseed => {
                if let Err(resp) = self.read_json(req).await {
                    return resp;
                }
                let Some(fleet) = self.controller.fleet().cloned() else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "this weir is not in fleet mode (no [fleet] in its config)",
                    );
                };
                // Blocking: it waits for etcd.
                let reseeding = Arc::clone(&fleet);
                match tokio::task::spawn_blocking(move || reseeding.reseed(actor)).await {
                    Ok(Ok(())) => ok(&fleet.status()),
                    Ok(Err(msg)) => error(StatusCode::SERVICE_UNAVAILABLE, msg),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        }
    }

    /// The 421 for a request whose `Host` (or absolute-form target) is not one of ours.
    ///
    /// DNS rebinding: a page on `evil.example` re-points its name at this address, and
    /// the browser, seeing one origin, lets the page call us and read the answers. Its
    /// requests still say `Host: evil.example`, so only names we know are accepted. IP
    /// literals need no list: a browser that asks an IP literal resolved nothing, so the
    /// page it serves came from that very address and port. Any IP (not only the
    /// listener's own) and any port, because NAT and port mapping (`docker run -p
    /// 127.0.0.1:19901:9901`, `kubectl port-forward`) change what the client sees.
    /// `localhost` is always loopback in browsers, so it cannot be rebound either.
    /// Set the gauges read from the guard's windows and the SLOs, just before a scrape:
    /// each pool's p99 over the window the API shows it for (pools that never served a
    /// request are left out, so idle ones cost nothing), and each SLO's limits.
    fn publish_windows(&self) {
        let table = self.controller.router().table();
        for service in table.services() {
            let slo = self.controller.slo(&service.name);
            if let Some(slo) = &slo {
                self.metrics
                    .set_slo(&service.name, slo.max_error_rate, slo.max_p99_latency);
            }
            let window = slo.map_or(Duration::from_secs(30), |s| s.window);
            for slot in service.snapshot().slots() {
                let w = slot.pool.window();
                if w.total() > 0 {
                    self.metrics
                        .set_pool_window(&service.name, slot.name(), w.stats(window).p99());
                }
            }
        }
    }

    fn refuse_foreign_host<B>(&self, req: &Request<B>) -> Option<AdminResponse> {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let (Some(host), None) = (hosts.next(), hosts.next()) else {
            return Some(error(
                StatusCode::MISDIRECTED_REQUEST,
                "exactly one Host header is required",
            ));
        };
        let host = host.to_str().unwrap_or("");
        if !self.is_our_host(host) {
            return Some(error(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host `{}` is not this admin API: use its IP address or localhost, \
                     or add the name to the admin allow-list",
                    host.escape_debug()
                ),
            ));
        }
        // `GET http://other/… HTTP/1.1` names its host in the target, which wins over
        // the header (RFC 9112 §3.2.2): it must be ours too.
        match req.uri().authority() {
            Some(a) if !self.is_our_host(a.as_str()) => Some(error(
                StatusCode::MISDIRECTED_REQUEST,
                format!("request target host `{a}` is not this admin API"),
            )),
            _ => None,
        }
    }

    fn is_our_host(&self, host: &str) -> bool {
        let Some((name, _port)) = split_host(host) else {
            return false;
        };
        is_ip_literal(name) || {
            let name = normal_name(name);
            name == "localhost" || self.allowed_hosts.contains(&name)
        }
    }

    /// The 401 to answer when a token is set and the request lacks it.
    fn refuse_unauthorized<B>(&self, req: &Request<B>) -> Option<AdminResponse> {
        let token = self.token.as_ref()?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 9110 §11.1).
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .map(str::trim);
        let good = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())));
        if good {
            return None;
        }
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            if given.is_some() {
                "wrong admin token"
            } else {
                "admin token required: send Authorization: Bearer <token>"
            },
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"weir\""),
        );
        Some(r)
    }

    /// Run a command on the controller off the async threads: it fsyncs, and the
    /// answer's document (window figures over every slice of each pool) is built there
    /// too, so that a stream of weight changes takes no time from the proxy's workers.
    async fn command(self: &Arc<Self>, command: Command) -> AdminResponse {
        let (controller, guard) = (Arc::clone(&self.controller), Arc::clone(&self.guard));
        let result = tokio::task::spawn_blocking(move || {
            controller.apply(command).map(|change| {
                let doc = controller
                    .router()
                    .table()
                    .service(&change.service)
                    .map(|s| service_doc(s, &controller, &guard));
                (change, doc)
            })
        })
        .await;
        match result {
            // A rollback the disk refused is applied anyway: 202, the document says
            // `not_durable` until the write succeeds.
            Ok(Ok((change, Some(doc)))) => with_etag(
                json_response(
                    if change.durable {
                        StatusCode::OK
                    } else {
                        StatusCode::ACCEPTED
                    },
                    &doc,
                ),
                change.snapshot.version,
            ),
            Ok(Ok((change, None))) => error(
                StatusCode::NOT_FOUND,
                format!("unknown service `{}`", change.service),
            ),
            Ok(Err(e)) => error(control_status(&e), e.to_string()),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("controller task failed: {e}"),
            ),
        }
    }

    /// Re-read the config file and apply it, or record why not.
    pub async fn reload(self: &Arc<Self>, actor: Option<String>) -> AdminResponse {
        let Some(path) = self.config_path.clone() else {
            return error(
                StatusCode::CONFLICT,
                "weir was started without a config file; nothing to reload",
            );
        };
        let controller = Arc::clone(&self.controller);
        let result = tokio::task::spawn_blocking(move || reload(&controller, &path, actor)).await;
        match result {
            Ok(Ok(event)) => ok(&api::ReloadDoc {
                reloaded: true,
                event,
            }),
            Ok(Err((status, body))) => json_response(status, &body),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reload task failed: {e}"),
            ),
        }
    }
}

/// Reload from `path` through the controller; a bad file changes nothing and is recorded
/// as `config_rejected`. Shared by the API and SIGHUP.
pub fn reload(
    controller: &Controller,
    path: &std::path::Path,
    actor: Option<String>,
) -> Result<Event, (StatusCode, api::ErrorBody)> {
    match Config::load(path) {
        Err(e) => {
            let problems: Vec<String> = e.to_string().lines().map(String::from).collect();
            let mut event = Event::new("", EventKind::ConfigRejected, Source::Config);
            event.actor = actor;
            event.reason = Some(format!(
                "{} problem(s) in {}",
                problems.len(),
                path.display()
            ));
            event.details = json!({ "problems": problems });
            if let Err(e) = controller.record(event) {
                tracing::error!("cannot record config_rejected: {e}");
            }
            tracing::warn!("reload rejected, keeping the running config:\n{e}");
            Err((
                StatusCode::BAD_REQUEST,
                api::ErrorBody {
                    error: format!("config rejected, nothing changed: {}", problems.join("; ")),
                    problems: Some(problems),
                },
            ))
        }
        Ok(config) if let Err(e) = crate::dataplane::tls::check_upstreams(&config) => {
            let problems = vec![e.to_string()];
            let mut event = Event::new("", EventKind::ConfigRejected, Source::Config);
            event.actor = actor;
            event.reason = Some(format!("TLS material unusable in {}", path.display()));
            event.details = json!({ "problems": problems });
            if let Err(e) = controller.record(event) {
                tracing::error!("cannot record config_rejected: {e}");
            }
            Err((
                StatusCode::BAD_REQUEST,
                api::ErrorBody {
                    error: format!("config rejected, nothing changed: {e}"),
                    problems: Some(problems),
                },
            ))
        }
        Ok(config) if let Err(e) = crate::telemetry::access::check(&config.log.access) => {
            let problems = vec![format!("log.access: {e}")];
            let mut event = Event::new("", EventKind::ConfigRejected, Source::Config);
            event.actor = actor;
            event.reason = Some(format!("access log unusable in {}", path.display()));
            event.details = json!({ "problems": problems });
            if let Err(e) = controller.record(event) {
                tracing::error!("cannot record config_rejected: {e}");
            }
            Err((
                StatusCode::BAD_REQUEST,
                api::ErrorBody {
                    error: format!("config rejected, nothing changed: {}", problems[0]),
                    problems: Some(problems),
                },
            ))
        }
        Ok(config) => match controller.reload(&config, actor) {
            Ok((report, event)) => {
                tracing::info!("config reloaded: {report:?}");
                Ok(event)
            }
            Err(e) => Err((control_status(&e), api::ErrorBody::new(e.to_string()))),
        },
    }
}

enum Route<'a> {
    Services,
    Service(&'a str),
    Weights(&'a str),
    Series(&'a str),
    Rollback(&'a str),
    Rollout(&'a str, &'a str),
    Release(&'a str),
    Undo(&'a str),
    History(&'a str),
    Events,
    Reload,
    Fleet,
    Reseed,
    Version,
}

impl Route<'_> {
    fn mutates(&self) -> bool {
        matches!(
            self,
            Route::Weights(_)
                | Route::Rollback(_)
                | Route::Rollout(..)
                | Route::Release(_)
                | Route::Undo(_)
                | Route::Reload
                | Route::Reseed
        )
    }

    /// Whether the README calls this route's body optional (so it may be absent, with
    /// no `Content-Type`).
    fn body_optional(&self) -> bool {
        matches!(
            self,
            Route::Rollback(_)
                | Route::Rollout(..)
                | Route::Undo(_)
                | Route::Reload
                | Route::Reseed
        )
    }

    fn method(&self) -> &'static str {
        match self {
            Route::Weights(_) => "PUT",
            Route::Rollback(_)
            | Route::Rollout(..)
            | Route::Release(_)
            | Route::Undo(_)
            | Route::Reload
            | Route::Reseed => "POST",
            _ => "GET",
        }
    }
}

fn control_status(e: &ControlError) -> StatusCode {
    match e {
        ControlError::UnknownService(_) | ControlError::NotFound(_) => StatusCode::NOT_FOUND,
        ControlError::VersionConflict { .. } | ControlError::Conflict(_) => StatusCode::CONFLICT,
        ControlError::Unchanged => StatusCode::CONFLICT,
        // The disk refuses writes: weir still serves; try again once it takes them.
        ControlError::Storage(_) | ControlError::StoreUnavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ControlError::UnknownPool { .. }
        | ControlError::DuplicatePool { .. }
        | ControlError::MissingPools { .. }
        | ControlError::Invalid(_)
        | ControlError::Weights(_) => StatusCode::BAD_REQUEST,
    }
}

/// Longest actor name recorded, in characters.
const MAX_ACTOR: usize = 64;

/// Who made a request, for the journal and the release history: the `X-Weir-Actor`
/// header (`weir ctl` sends `$USER@host`), kept to visible ASCII (no spaces, so an
/// event stays one line of words) other than `/` and bounded, then `/` and the peer
/// address it came from; the peer address alone without one. `/` is dropped because it
/// separates the name from the peer: `root/127.0.0.1:9901` would otherwise be recorded
/// as `root/127.0.0.1:9901/<peer>`, passing for a call from that address. The header is
/// the client's word, not an identity: the token is what authorises.
fn actor_of<B>(req: &Request<B>, peer: SocketAddr) -> String {
    let named: String = req
        .headers()
        .get("x-weir-actor")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '/')
        .take(MAX_ACTOR)
        .collect();
    if named.is_empty() {
        peer.to_string()
    } else {
        format!("{named}/{peer}")
    }
}

/// 405 with the methods that are allowed.
fn not_allowed(message: String, allow: &'static str) -> AdminResponse {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, message);
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The 405 for anything but GET/HEAD on a read-only resource (`what` names it).
fn refuse_unless_read<B>(req: &Request<B>, what: &str) -> Option<AdminResponse> {
    let m = req.method();
    (m != Method::GET && m != Method::HEAD)
        .then(|| not_allowed(format!("{what} is read-only: use GET"), "GET, HEAD"))
}

/// `k=v` pairs of a query string (`k` alone gives an empty value).
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

fn is_json<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// `If-Match: 3` or `If-Match: "3"` (the ETag we send).
fn if_match<B>(req: &Request<B>) -> Result<Option<u64>, String> {
    let Some(v) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse()
        .map(Some)
        .map_err(|_| format!("If-Match must be a service version number, got `{s}`"))
}

impl Admin {
    /// Read a JSON body (empty = `{}`), bounded in size and time. Only an empty body may
    /// come without `Content-Type: application/json` (the routes that allow that were
    /// checked before); objects may not repeat a key.
    /// Read a request body as JSON and make a request of it with `parse`: a body that
    /// does not read, or does not parse, is the answer (4xx) instead.
    /// Read a request's body with `parse` (400 naming what is wrong), then apply the
    /// command `make` builds from it: what every route that changes state does.
    async fn command_from<T>(
        self: &Arc<Self>,
        req: Request<Incoming>,
        parse: impl FnOnce(&Value) -> Result<T, String>,
        make: impl FnOnce(T) -> Command,
    ) -> AdminResponse {
        match self.read_request(req, parse).await {
            Ok(request) => self.command(make(request)).await,
            Err(resp) => resp,
        }
    }

    async fn read_request<T>(
        &self,
        req: Request<Incoming>,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Result<T, AdminResponse> {
        let body = self.read_json(req).await?;
        parse(&body).map_err(|msg| error(StatusCode::BAD_REQUEST, msg))
    }

    async fn read_json(&self, req: Request<Incoming>) -> Result<Value, AdminResponse> {
        let declared = is_json(&req);
        let collect = Limited::new(req.into_body(), MAX_BODY).collect();
        let Ok(collected) = tokio::time::timeout(self.body_timeout, collect).await else {
            // The rest of the body may still come; the connection cannot be reused.
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {:?}", self.body_timeout),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(r);
        };
        let body = collected
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("body larger than {MAX_BODY} bytes"),
                    )
                } else {
                    error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
                }
            })?
            .to_bytes();
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Object(serde_json::Map::new()));
        }
        if !declared {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "request body must be Content-Type: application/json",
            ));
        }
        parse_json(&body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))
    }
}

/// Parse JSON, refusing an object that repeats a key at any depth. serde_json keeps the
/// last of duplicates, so `{"weights":{"canary":0,"canary":100}}` would mean something a
/// reader of the first line does not expect, and a proxy or logger in between may read
/// the first.
fn parse_json(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Unique>(bytes).map(|u| u.0)
}

/// A JSON value deserialized without duplicate object keys.
struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Unique, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        // JSON text cannot spell NaN or infinity; null is unreachable.
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key `{}`",
                    key.escape_debug()
                )));
            }
            let Unique(v) = map.next_value()?;
            obj.insert(key, v);
        }
        Ok(Value::Object(obj))
    }
}

/// The 403 for a state-changing request a browser sent on behalf of another origin.
///
/// Browsers send `Origin` with every POST/PUT/DELETE/PATCH (`null` from sandboxes and
/// `file:`), and `Sec-Fetch-Site` with every request; neither can be forged by a page.
/// Same origin means the origin's host and port are the `Host` the browser sent us
/// (already checked to be ours), so this holds behind NAT too. `https` is admitted for a
/// TLS-terminating proxy in front of the listener: only it could serve a page on that
/// host and port. Clients that are not browsers send neither header and pass; they still
/// need the token.
fn refuse_cross_origin<B>(req: &Request<B>) -> Option<AdminResponse> {
    let m = req.method();
    if m == Method::GET || m == Method::HEAD || m == Method::OPTIONS || m == Method::TRACE {
        return None;
    }
    let h = req.headers();
    let site = h
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // `same-site` is another port or subdomain: another origin all the same.
    if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
        return Some(error(
            StatusCode::FORBIDDEN,
            format!("{site} request refused: the admin API changes state only for its own pages"),
        ));
    }
    let origin = h.get(header::ORIGIN)?;
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let same = origin
        .to_str()
        .ok()
        .zip(host)
        .is_some_and(|(origin, host)| same_origin(origin, host));
    (!same).then(|| {
        error(
            StatusCode::FORBIDDEN,
            format!(
                "Origin `{}` is not this admin API: it changes state only for its own pages",
                String::from_utf8_lossy(origin.as_bytes()).escape_debug()
            ),
        )
    })
}

/// Whether `origin` (`scheme://host[:port]`) is the origin of a request to `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false; // `null`, or garbage
    };
    let default = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return false;
    };
    match (split_host(rest), split_host(host)) {
        (Some((a, ap)), Some((b, bp))) => {
            normal_name(a) == normal_name(b) && ap.unwrap_or(default) == bp.unwrap_or(default)
        }
        _ => false,
    }
}

/// `host[:port]` → (host, port), IPv6 in brackets; `None` if it is not an authority
/// without user info.
fn split_host(s: &str) -> Option<(&str, Option<u16>)> {
    if s.is_empty() || s.contains(['@', '/', '?', '#', ' ']) {
        return None;
    }
    let (name, port) = if let Some(v6) = s.strip_prefix('[') {
        let end = v6.find(']')? + 2;
        let port = match &s[end..] {
            "" => None,
            rest => Some(rest.strip_prefix(':')?),
        };
        (&s[..end], port)
    } else {
        match s.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (s, None),
        }
    };
    if name.is_empty() || name.contains(':') && !name.starts_with('[') {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
    };
    Some((name, port))
}

/// `1.2.3.4` or `[::1]` (not a name that looks like one: `1.2.3.4.nip.io` is a name).
fn is_ip_literal(name: &str) -> bool {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => name.parse::<std::net::Ipv4Addr>().is_ok(),
    }
}

/// A host name as compared: lowercase, without the root's trailing dot.
fn normal_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// A rollout verb and its body: `rollout` takes [`api::StartRolloutRequest`], `promote`
/// [`api::PromoteRequest`], the others nothing.
fn rollout_verb(verb: &str, body: &Value) -> Result<RolloutVerb, String> {
    Ok(match verb {
        "rollout" => {
            let r = api::StartRolloutRequest::from_json(body)?;
            RolloutVerb::Start {
                candidate: r.candidate,
                override_freeze: r.override_freeze,
            }
        }
        "promote" => {
            let r = api::PromoteRequest::from_json(body)?;
            RolloutVerb::Promote {
                full: r.full,
                override_freeze: r.override_freeze,
            }
        }
        "retry" => RolloutVerb::Retry {
            override_freeze: api::RetryRequest::from_json(body)?.override_freeze,
        },
        _ => {
            api::EmptyRequest::from_json(body, verb)?;
            match verb {
                "pause" => RolloutVerb::Pause,
                "resume" => RolloutVerb::Resume,
                _ => RolloutVerb::Abort,
            }
        }
    })
}

/// Which events a `GET /api/v1/events` asks for.
#[derive(Debug, PartialEq, Eq)]
enum EventsQuery {
    /// `since=ID&limit=N`: the oldest `limit` events after `since`.
    Since { since: u64, limit: usize },
    /// `tail=N`: the newest `N` events.
    Tail(usize),
}

fn events_query(query: Option<&str>) -> Result<EventsQuery, String> {
    let mut since = None;
    let mut limit = None;
    let mut tail = None;
    let count = |name: &str, v: &str| {
        v.parse()
            .ok()
            .filter(|l| (1..=MAX_EVENTS).contains(l))
            .ok_or_else(|| format!("{name} must be 1..={MAX_EVENTS}, got `{v}`"))
    };
    for (k, v) in query_pairs(query) {
        match k {
            "since" => {
                since = Some(
                    v.parse()
                        .map_err(|_| format!("since must be an event id, got `{v}`"))?,
                )
            }
            "limit" => limit = Some(count("limit", v)?),
            "tail" => tail = Some(count("tail", v)?),
            other => {
                return Err(format!(
                    "unknown query parameter `{other}` (since, limit, tail)"
                ));
            }
        }
    }
    match tail {
        Some(_) if since.is_some() || limit.is_some() => {
            Err("tail cannot be combined with since or limit".into())
        }
        Some(n) => Ok(EventsQuery::Tail(n)),
        None => Ok(EventsQuery::Since {
            since: since.unwrap_or(0),
            limit: limit.unwrap_or(DEFAULT_EVENTS),
        }),
    }
}

/// `seconds=N` (1..=600): how far back `/series` reaches.
fn series_query(query: Option<&str>) -> Result<Duration, String> {
    let mut span = DEFAULT_SERIES;
    let most = crate::telemetry::window::HISTORY.as_secs();
    for (k, v) in query_pairs(query) {
        match k {
            "seconds" => {
                span = v
                    .parse()
                    .ok()
                    .filter(|s| (1..=most).contains(s))
                    .map(Duration::from_secs)
                    .ok_or_else(|| format!("seconds must be 1..={most}, got `{v}`"))?
            }
            other => return Err(format!("unknown query parameter `{other}` (seconds)")),
        }
    }
    Ok(span)
}

/// Per-pool time series for charts (see [`api::PoolSeries`]), ending at each pool's
/// newest closed step, with the guard's judgements of each candidate over the span.
fn series_doc(s: &Service, span: Duration, clock: &dyn Clock, guard: &Guard) -> api::SeriesDoc {
    let snap = s.snapshot();
    // One clock reading pair turns the windows' Instants into wall-clock times.
    let (now, wall) = (clock.instant(), clock.now());
    let unix_ms = |at: Option<std::time::Instant>| {
        at.map(|at| {
            let t = wall - now.saturating_duration_since(at);
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64
        })
    };
    let pools = snap
        .slots()
        .iter()
        .map(|slot| {
            let series = slot.pool.window().series(span);
            api::PoolSeries {
                name: slot.name().to_owned(),
                step_secs: series.step.as_secs_f64(),
                end_ms: unix_ms(series.end),
                requests: series.points.iter().map(|p| p.requests).collect(),
                errors: series.points.iter().map(|p| p.errors).collect(),
                p99_ms: series
                    .points
                    .iter()
                    .map(|p| p.p99_us.map(|us| (us as f64 / 100.0).round() / 10.0))
                    .collect(),
                judged: judged_series(
                    guard,
                    s,
                    slot.name(),
                    snap.baseline_name(),
                    wall.checked_sub(span).unwrap_or(std::time::UNIX_EPOCH),
                ),
            }
        })
        .collect();
    api::SeriesDoc {
        service: s.name.to_string(),
        pools,
    }
}

/// The guard's judgements of `pool` since `since`, or `None` if it made none.
fn judged_series(
    guard: &Guard,
    s: &Service,
    pool: &str,
    baseline: &str,
    since: std::time::SystemTime,
) -> Option<api::JudgedSeries> {
    let marks = guard.marks(&s.name, pool, since);
    if marks.is_empty() {
        return None;
    }
    let at_ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64
    };
    Some(api::JudgedSeries {
        baseline: baseline.to_owned(),
        at_ms: marks.iter().map(|m| at_ms(m.at)).collect(),
        verdict: marks.iter().map(|m| verdict_doc(m.verdict)).collect(),
        error_rate: marks.iter().map(|m| m.error_rate).collect(),
        error_rate_bounds: marks.iter().map(|m| m.error_bounds).collect(),
        baseline_error_rate: marks.iter().map(|m| m.baseline_error_rate).collect(),
        p99_ms: marks.iter().map(|m| m.p99_ms).collect(),
        p99_ms_bounds: marks.iter().map(|m| m.p99_bounds_ms).collect(),
        baseline_p99_ms: marks.iter().map(|m| m.baseline_p99_ms).collect(),
    })
}

/// Nothing but the page's own script and style (by hash: an injected `<script>` or
/// inline handler would not run), same-origin API calls, and no framing (clickjacking
/// the controls).
static DASHBOARD_CSP: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    let csp = format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
         img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        inline_hash(DASHBOARD, "script").expect("the dashboard has one <script>"),
        inline_hash(DASHBOARD, "style").expect("the dashboard has one <style>"),
    );
    HeaderValue::from_str(&csp).expect("a CSP is ASCII")
});

/// The CSP source (`'sha256-…'`) of the content of the first `<tag>…</tag>` in `page`.
fn inline_hash(page: &str, tag: &str) -> Option<String> {
    use base64::Engine;
    let open = format!("<{tag}>");
    let start = page.find(&open)? + open.len();
    let end = start + page[start..].find(&format!("</{tag}>"))?;
    // Browsers hash the element's text after the HTML parser turned CRLF into LF; a
    // checkout with CRLF line ends must still match.
    let text = page[start..end].replace("\r\n", "\n");
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    Some(format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// `GET /`: the dashboard page. It holds no data or secret of its own, so it is served
/// without the token; every API call it makes carries the token the user enters.
fn dashboard<B>(req: &Request<B>) -> AdminResponse {
    if let Some(refusal) = refuse_unless_read(req, "the dashboard") {
        return refusal;
    }
    let mut r = Response::new(Full::new(Bytes::from_static(DASHBOARD.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP.clone());
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The service document of the API.
pub(crate) fn service_doc(s: &Service, controller: &Controller, guard: &Guard) -> api::ServiceDoc {
    let snap = s.snapshot();
    let control = controller.service_control(&s.name);
    // One reading of the degraded state, for both places that show it.
    let health = if control.degraded.is_some() {
        api::Health::Degraded
    } else if no_endpoint_up_where_served(&snap) {
        api::Health::Unavailable
    } else {
        api::Health::Healthy
    };
    let pools = snap
        .slots()
        .iter()
        .enumerate()
        .map(|(i, slot)| api::PoolDoc {
            name: slot.name().to_owned(),
            weight: slot.weight,
            share: snap.share(i),
            endpoints: slot
                .pool
                .endpoints()
                .iter()
                .map(|e| e.endpoint.as_str().to_owned())
                .collect(),
            endpoint_states: slot
                .pool
                .endpoints()
                .iter()
                .map(|e| endpoint_doc(e.status()))
                .collect(),
            version: controller.version_of(&s.name, slot.name(), &control.deployed),
        })
        .collect();
    api::ServiceDoc {
        name: s.name.to_string(),
        hosts: s.hosts.clone(),
        baseline: snap.baseline_name().to_owned(),
        version: snap.version,
        pools,
        updated_at: rfc3339(snap.updated_at),
        updated_by: snap.updated_by,
        health,
        not_durable: guard.not_durable(&s.name),
        guard: guard_doc(guard.status(s), health, control.degraded.clone()),
        rollout: rollout_doc(
            s,
            &snap,
            control.rollout.as_ref(),
            controller.clock().now(),
            guard,
            controller.freeze(&s.name).map(|f| f.describe()),
        ),
        plan: controller.plan_of(&s.name).map(|p| plan_doc(&p)),
        freeze: controller.freeze(&s.name).map(|f| api::FreezeDoc {
            reason: f.reason,
            until: rfc3339(f.until),
        }),
    }
}

/// Whether a pool that carries traffic (weight above 0) has no endpoint up: every
/// endpoint failing its health checks or ejected. Such a service is never `healthy`.
fn no_endpoint_up_where_served(snap: &ServiceSnapshot) -> bool {
    snap.slots().iter().any(|slot| {
        slot.weight > 0
            && !slot
                .pool
                .endpoints()
                .iter()
                .any(|e| endpoint_doc(e.status()).state == api::EndpointCondition::Up)
    })
}

fn endpoint_doc(e: EndpointStatus) -> api::EndpointDoc {
    let state = if !e.healthy {
        api::EndpointCondition::Down
    } else if e.ejected {
        api::EndpointCondition::Ejected
    } else {
        api::EndpointCondition::Up
    };
    api::EndpointDoc {
        address: e.address,
        state,
        healthy: e.healthy,
        ejected: e.ejected,
        ejections: e.ejections,
        inflight: e.inflight,
        last_check: e.last_check,
    }
}

/// The `guard` document: what the guard knows, and the service's health as the
/// controller has it.
fn guard_doc(
    status: GuardStatus,
    health: api::Health,
    degraded_reason: Option<String>,
) -> api::GuardDoc {
    let slo = status.slo.as_ref();
    api::GuardDoc {
        enabled: slo.is_some(),
        mode: slo.map(|s| s.mode),
        window_secs: status.window.as_secs_f64(),
        slo: slo.map(|s| api::SloDoc {
            max_error_rate: s.max_error_rate,
            max_p99_ms: s.max_p99_latency.map(|d| d.as_secs_f64() * 1000.0),
            max_error_rate_increase: s.max_error_rate_increase,
            max_p99_ratio: s.max_p99_ratio,
            min_requests: s.min_requests,
            breaches_to_act: s.breaches_to_act,
        }),
        health,
        degraded_reason,
        baseline_unhealthy: status.baseline_unhealthy,
        pools: status
            .pools
            .iter()
            .zip(&status.spans)
            .map(|(f, span)| api::WindowFigures {
                span_secs: span.map(|d| d.as_secs_f64()),
                ..figures_doc(f)
            })
            .collect(),
        decisions: status.decisions.iter().map(decision_doc).collect(),
    }
}

/// A decision as the API shows it: the judgement's fields beside whose and when.
fn decision_doc(d: &Decision) -> api::DecisionDoc {
    // Taken apart without `..`: a field added to the judgement must be placed in the
    // API (or left out) on purpose.
    let Judgement {
        verdict,
        check,
        value,
        threshold,
        bound,
        basis,
        window_secs,
        exposure_secs,
        alpha,
        candidate,
        baseline,
        candidate_bounds,
        baseline_bounds,
        baseline_unhealthy,
        needs,
        summary,
    } = &d.judgement;
    api::DecisionDoc {
        pool: d.pool.clone(),
        at: d.at.clone(),
        mode: d.mode,
        verdict: verdict_doc(*verdict),
        check: *check,
        value: *value,
        threshold: *threshold,
        bound: *bound,
        basis: match basis {
            Basis::Exposure => api::Basis::Exposure,
            Basis::FastWindow => api::Basis::FastWindow,
        },
        window_secs: *window_secs,
        exposure_secs: *exposure_secs,
        alpha: *alpha,
        candidate: figures_doc(candidate),
        baseline: figures_doc(baseline),
        candidate_bounds: bounds_doc(candidate_bounds),
        baseline_bounds: bounds_doc(baseline_bounds),
        baseline_unhealthy: *baseline_unhealthy,
        needs: needs.clone(),
        summary: summary.clone(),
    }
}

fn verdict_doc(v: Verdict) -> api::Verdict {
    match v {
        Verdict::Pass => api::Verdict::Pass,
        Verdict::Breach => api::Verdict::Breach,
        Verdict::Inconclusive => api::Verdict::Inconclusive,
    }
}

fn figures_doc(f: &Figures) -> api::WindowFigures {
    let Figures {
        pool,
        requests,
        errors,
        error_rate,
        p50_ms,
        p99_ms,
    } = f;
    api::WindowFigures {
        pool: pool.clone(),
        requests: *requests,
        errors: *errors,
        error_rate: *error_rate,
        p50_ms: *p50_ms,
        p99_ms: *p99_ms,
        span_secs: None,
    }
}

fn bounds_doc(b: &Bounds) -> api::Bounds {
    let Bounds { error_rate, p99_ms } = b;
    api::Bounds {
        error_rate: *error_rate,
        p99_ms: *p99_ms,
    }
}

/// A service's rollout as the API shows it: phase, step, what it waits for.
fn rollout_doc(
    s: &Service,
    snap: &ServiceSnapshot,
    rollout: Option<&Rollout>,
    now: std::time::SystemTime,
    guard: &Guard,
    frozen: Option<String>,
) -> api::RolloutDoc {
    let Some(r) = rollout else {
        return api::RolloutDoc::Idle;
    };
    let decision = guard.decision(&s.name, &r.candidate);
    let mut evidence = crate::control::rollout::Evidence::of(
        snap,
        &r.candidate,
        guard.verdict(&s.name, &r.candidate),
        decision.as_ref().and_then(|d| d.judgement.needs.clone()),
    );
    evidence.frozen = frozen;
    api::RolloutDoc::Started(Box::new(api::RolloutProgress {
        phase: r.phase,
        candidate: r.candidate.clone(),
        stable: r.stable.clone(),
        step_index: r.step,
        steps_total: r.steps.len(),
        step: r.current_step().map(Step::describe),
        steps: r.steps.iter().map(Step::describe).collect(),
        time_in_step_secs: now
            .duration_since(r.step_started)
            .unwrap_or_default()
            .as_secs_f64(),
        waiting_for: r.waiting_for(now, Some(&evidence)),
        deadline: r.deadline.map(rfc3339),
        started_at: rfc3339(r.started_at),
        last_decision: decision.map(|d| api::LastDecision {
            verdict: verdict_doc(d.judgement.verdict),
            summary: d.judgement.summary,
            at: d.at,
        }),
        analysis: r
            .analysis
            .iter()
            .map(|t| api::AnalysisDoc {
                template: t.template.clone(),
                background: t.background,
                passed: t.passed,
                count: t.count,
                failed: t.failed,
                failure_limit: t.failure_limit,
                inconclusive: t.inconclusive,
                last_at: t.last.clone(),
                last_value: t.last_value,
                last_outcome: t.last_outcome.map(|o| o.as_str().to_owned()),
                last_detail: t.last_detail.clone(),
            })
            .collect(),
        webhooks: r
            .hooks
            .last_calls
            .iter()
            .map(|c| api::WebhookDoc {
                name: c.name.clone(),
                kind: c.kind.clone(),
                status: c.status,
                ok: c.ok,
                detail: c.detail.clone(),
                duration_ms: c.duration_ms,
            })
            .collect(),
        freeze_override: r.freeze_override.clone(),
    }))
}

/// The plan `[service.rollout]` describes.
fn plan_doc(p: &RolloutConfig) -> api::PlanDoc {
    api::PlanDoc {
        strategy: match p {
            RolloutConfig::Canary { .. } => api::Strategy::Canary,
            RolloutConfig::BlueGreen { .. } => api::Strategy::BlueGreen,
        },
        candidate: p.candidate().to_owned(),
        steps: crate::control::rollout::plan_steps(p)
            .iter()
            .map(Step::describe)
            .collect(),
    }
}

/// A document of [`api`] as the answer, one line of compact JSON.
fn json_response(status: StatusCode, body: &impl serde::Serialize) -> AdminResponse {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The service version as an ETag, for `If-Match` on the next change.
fn with_etag(mut r: AdminResponse, version: u64) -> AdminResponse {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

fn ok(body: &impl serde::Serialize) -> AdminResponse {
    json_response(StatusCode::OK, body)
}

fn error(status: StatusCode, message: impl Into<String>) -> AdminResponse {
    json_response(status, &api::ErrorBody::new(message))
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_names_cannot_carry_the_peer_separator() {
        let peer: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        let req = |actor: &str| {
            Request::get("/")
                .header("x-weir-actor", actor)
                .body(())
                .unwrap()
        };
        assert_eq!(
            actor_of(&req("root/127.0.0.1:9901"), peer),
            "root127.0.0.1:9901/10.0.0.7:5000"
        );
        assert_eq!(actor_of(&req("ann@host"), peer), "ann@host/10.0.0.7:5000");
        assert_eq!(actor_of(&req("//"), peer), "10.0.0.7:5000");
    }

    #[test]
    fn events_query_defaults_and_bounds() {
        let since = |since, limit| Ok(EventsQuery::Since { since, limit });
        assert_eq!(events_query(None), since(0, DEFAULT_EVENTS));
        assert_eq!(events_query(Some("since=5&limit=2")), since(5, 2));
        assert_eq!(events_query(Some("tail=20")), Ok(EventsQuery::Tail(20)));
        assert!(events_query(Some("limit=0")).is_err());
        assert!(events_query(Some("tail=0")).is_err());
        assert!(events_query(Some("tail=2000")).is_err());
        assert!(events_query(Some("tail=5&since=1")).is_err());
        assert!(events_query(Some("since=x")).is_err());
        assert!(events_query(Some("foo=1")).is_err());
    }

    #[test]
    fn the_dashboard_csp_admits_its_own_script_and_style_only() {
        let csp = DASHBOARD_CSP.to_str().unwrap();
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
        // One of each: a second would be refused by the browser.
        assert_eq!(DASHBOARD.matches("<script>").count(), 1);
        assert_eq!(DASHBOARD.matches("<style>").count(), 1);
        assert!(
            !DASHBOARD.contains(" style=\""),
            "inline style attributes break the CSP"
        );
        assert!(
            !DASHBOARD.contains(" onclick="),
            "inline handlers break the CSP"
        );
        // Known answer: SHA-256 of "abc", base64.
        assert_eq!(
            inline_hash("<x>abc</x>", "x").unwrap(),
            "'sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0='"
        );
        assert!(inline_hash("<x>abc", "x").is_none());
        assert_eq!(
            inline_hash("<x>a\r\nb</x>", "x"),
            inline_hash("<x>a\nb</x>", "x")
        );
    }

    #[test]
    fn hosts_split_into_name_and_port() {
        assert_eq!(split_host("a.b:80"), Some(("a.b", Some(80))));
        assert_eq!(split_host("a.b"), Some(("a.b", None)));
        assert_eq!(split_host("[::1]:9901"), Some(("[::1]", Some(9901))));
        assert_eq!(split_host("[::1]"), Some(("[::1]", None)));
        for bad in [
            "", "a:", ":80", "a:x", "a:99999", "::1", "[::1]x", "[::1", "u@a", "a/b", "a b",
        ] {
            assert_eq!(split_host(bad), None, "{bad}");
        }
        assert!(is_ip_literal("127.0.0.1") && is_ip_literal("[::1]") && is_ip_literal("[FE80::1]"));
        for name in [
            "::1",
            "[127.0.0.1]",
            "127.0.0.1.nip.io",
            "2130706433",
            "localhost",
        ] {
            assert!(!is_ip_literal(name), "{name}");
        }
    }

    #[test]
    fn origins_match_the_host_with_default_ports() {
        assert!(same_origin("http://127.0.0.1:9901", "127.0.0.1:9901"));
        assert!(same_origin("http://LocalHost:9901", "localhost:9901"));
        assert!(same_origin("http://admin", "admin:80"));
        assert!(same_origin("https://admin", "admin:443"));
        assert!(same_origin("https://admin:443", "admin"));
        assert!(same_origin("http://[::1]:1", "[::1]:1"));
        for (origin, host) in [
            ("http://127.0.0.1:9902", "127.0.0.1:9901"),
            ("http://127.0.0.1", "127.0.0.1:9901"),
            ("http://localhost:9901", "127.0.0.1:9901"),
            ("https://admin", "admin:80"),
            ("ftp://admin", "admin"),
            ("null", "admin"),
            ("admin", "admin"),
            ("http://u@admin", "admin"),
        ] {
            assert!(!same_origin(origin, host), "{origin} vs {host}");
        }
    }

    #[test]
    fn json_with_a_repeated_key_is_refused_at_any_depth() {
        let v = parse_json(br#"{"a":[1,-2,2.5,"s",null,true,{"b":{}}],"c":{"a":1}}"#).unwrap();
        assert_eq!(
            v,
            json!({"a": [1, -2, 2.5, "s", null, true, {"b": {}}], "c": {"a": 1}})
        );
        // Order is kept: weights are applied in the order given.
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "c"]);
        for (text, key) in [
            (r#"{"a":1,"a":1}"#, "a"),
            (r#"{"w":{"x":1,"y":2,"x":3}}"#, "x"),
            (r#"[{"k":1},{"k":1,"k":2}]"#, "k"),
            (r#"{"\u0061":1,"a":2}"#, "a"),
            (r#"{"q\"":1,"q\"":2}"#, "q\\\""),
        ] {
            let e = parse_json(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(&format!("duplicate key `{key}`")), "{text}: {e}");
        }
        assert!(parse_json(b"{\"a\":1").is_err());
        assert!(parse_json(b"{} x").is_err());
    }

    #[test]
    fn series_query_bounds() {
        assert_eq!(series_query(None), Ok(DEFAULT_SERIES));
        assert_eq!(
            series_query(Some("seconds=60")),
            Ok(Duration::from_secs(60))
        );
        assert!(series_query(Some("seconds=0")).is_err());
        assert!(series_query(Some("seconds=601")).is_err());
        assert!(series_query(Some("span=5")).is_err());
    }
}
