//! The built-in HTTP/1.1 test and demo backend: `weir upstream`, `weir demo` and the
//! integration tests all run real upstreams from here instead of depending on an
//! external server on a fixed port.
//!
//! It doubles as the upstream in load runs, so the request path is kept cheap: faults
//! live in atomics (no lock is read per request), the common bodies are built once at
//! spawn time, `/stream` produces its bytes lazily from one static buffer, and `/sink`
//! counts bytes as they arrive without holding them.
//!
//! Routes (every response carries `x-upstream: NAME`):
//!
//! | path | answer |
//! |---|---|
//! | `/` and unknown paths | `200 text/plain` `NAME\n` |
//! | `/echo` | `200 application/json`: method, path, query, version, headers as `[name, value]` pairs |
//! | `/stream?bytes=N[&chunk=C][&length=1]` | `200`, `N` bytes of `x` in frames of `C`; chunked unless `length=1` |
//! | `/sink` | reads the request body; `200 {"bytes":N,"sum":S}` (wrapping byte sum) |
//! | `/status/CODE` | that status (`200..=999`), body `NAME: CODE\n` |
//! | `/__weir/fault` | `GET` current faults, `PUT` a JSON patch of them; exempt from faults |
//!
//! Faults (every path except `/__weir/fault`): first a delay of `latency ± jitter`, then
//! with probability `error_rate` a `500` with body `NAME: injected error\n`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Control endpoint; the only path faults never apply to, so a broken upstream can be healed.
const FAULT_PATH: &str = "/__weir/fault";
const X_UPSTREAM: HeaderName = HeaderName::from_static("x-upstream");
const TEXT: &str = "text/plain";
const JSON: &str = "application/json";
/// Default `/stream` frame size, and the size of the static buffer frames are sliced from.
const DEFAULT_CHUNK: usize = 64 * 1024;
/// Larger `chunk=` values need their own buffer; cap it so a query cannot ask for gigabytes.
const MAX_CHUNK: usize = 16 * 1024 * 1024;
/// A fault patch is three small fields; anything bigger is a mistake, not a patch.
const MAX_FAULT_BODY: usize = 64 * 1024;
/// Pause after an accept error that is not about one connection (EMFILE and friends),
/// so a full fd table does not turn the accept loop into a busy spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Every `/stream` frame up to [`DEFAULT_CHUNK`] bytes is a zero-copy slice of this.
static XS: [u8; DEFAULT_CHUNK] = [b'x'; DEFAULT_CHUNK];

/// How to start an upstream: its name (echoed in `x-upstream` and in bodies) and the
/// faults it starts with.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Probability in `0..=1` of answering `500`; out-of-range values are clamped.
    pub error_rate: f64,
    pub latency: Duration,
    pub latency_jitter: Duration,
}

impl UpstreamConfig {
    /// A healthy upstream: no errors, no added latency.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
        }
    }
}

/// Injected faults. Serialises with humantime durations (`"200ms"`), the same shape
/// `GET /__weir/fault` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Faults {
    pub error_rate: f64,
    #[serde(serialize_with = "ser_humantime")]
    pub latency: Duration,
    #[serde(serialize_with = "ser_humantime")]
    pub latency_jitter: Duration,
}

impl Faults {
    /// Answer 500 with this probability, nothing else.
    pub fn errors(rate: f64) -> Faults {
        Faults {
            error_rate: rate,
            ..Faults::default()
        }
    }

    /// Delay every answer by this much, nothing else.
    pub fn delay(latency: Duration) -> Faults {
        Faults {
            latency,
            ..Faults::default()
        }
    }
}

fn ser_humantime<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// A running upstream. Dropping it kills it, so a test cannot leak a server task.
pub struct UpstreamHandle {
    addr: SocketAddr,
    inner: Arc<Inner>,
    kill: watch::Sender<bool>,
    closed: watch::Receiver<bool>,
}

impl UpstreamHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Replaces all faults. `error_rate` is clamped into `0..=1` (NaN counts as 0).
    pub fn set_faults(&self, f: Faults) {
        self.inner.faults.update(|_| f);
    }

    pub fn faults(&self) -> Faults {
        self.inner.faults.load()
    }

    /// Requests received so far, on every path including `/__weir/fault`.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> u64 {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Stop accepting AND abort every open connection at once (simulates a killed host).
    /// Idempotent. Awaits until the listener socket is closed and every connection task
    /// has been torn down, so a connect right after this returns is refused.
    pub async fn kill(&self) {
        self.kill.send_replace(true);
        let mut closed = self.closed.clone();
        // An error means the accept task is gone (its sender dropped, e.g. the runtime is
        // shutting down), and with it the listener: the wait is over either way.
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

impl Drop for UpstreamHandle {
    fn drop(&mut self) {
        // Cannot await here; the accept task sees the flag and tears everything down.
        self.kill.send_replace(true);
    }
}

impl fmt::Debug for UpstreamHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamHandle")
            .field("name", &self.inner.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Serve on an already-bound listener (tests bind `127.0.0.1:0`). Spawns onto the
/// current tokio runtime and returns at once.
///
/// Fails if there is no current runtime, if the listener has no local address, or if
/// the name cannot be sent as a header value.
pub fn spawn(listener: TcpListener, cfg: UpstreamConfig) -> io::Result<UpstreamHandle> {
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let addr = listener.local_addr()?;
    let header = HeaderValue::from_str(&cfg.name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("upstream name {:?} is not a valid header value", cfg.name),
        )
    })?;
    let faults = FaultCell::default();
    faults.update(|_| Faults {
        error_rate: cfg.error_rate,
        latency: cfg.latency,
        latency_jitter: cfg.latency_jitter,
    });
    let inner = Arc::new(Inner {
        root_body: Bytes::from(format!("{}\n", cfg.name)),
        error_body: Bytes::from(format!("{}: injected error\n", cfg.name)),
        name: cfg.name,
        header,
        faults,
        requests: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        open: AtomicU64::new(0),
    });
    let (kill_tx, kill_rx) = watch::channel(false);
    let (closed_tx, closed_rx) = watch::channel(false);
    runtime.spawn(accept_loop(
        listener,
        Arc::clone(&inner),
        kill_rx,
        closed_tx,
    ));
    Ok(UpstreamHandle {
        addr,
        inner,
        kill: kill_tx,
        closed: closed_rx,
    })
}

/// Bind `addr` then [`spawn`].
pub async fn bind(addr: SocketAddr, cfg: UpstreamConfig) -> io::Result<UpstreamHandle> {
    spawn(TcpListener::bind(addr).await?, cfg)
}

/// State shared by the handle and every connection.
struct Inner {
    name: String,
    header: HeaderValue,
    root_body: Bytes,
    error_body: Bytes,
    faults: FaultCell,
    requests: AtomicU64,
    accepted: AtomicU64,
    open: AtomicU64,
}

/// Counts a connection as open for as long as its task lives (aborted tasks included).
struct OpenConn(Arc<Inner>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Faults as three atomics so the request path never takes a lock.
///
/// A reader may see a mix of an old and a new field while a write is in progress; for
/// fault injection that is harmless. Writers do read-modify-write (a PUT patches only
/// the fields it names), so they serialise on `write`, which readers never touch.
#[derive(Default)]
struct FaultCell {
    error_rate_bits: AtomicU64,
    latency_ns: AtomicU64,
    jitter_ns: AtomicU64,
    write: Mutex<()>,
}

impl FaultCell {
    fn load(&self) -> Faults {
        Faults {
            error_rate: f64::from_bits(self.error_rate_bits.load(Ordering::Relaxed)),
            latency: Duration::from_nanos(self.latency_ns.load(Ordering::Relaxed)),
            latency_jitter: Duration::from_nanos(self.jitter_ns.load(Ordering::Relaxed)),
        }
    }

    /// Applies `f` to the current faults under the writer lock and stores the result.
    fn update(&self, f: impl FnOnce(Faults) -> Faults) -> Faults {
        // The guarded data is `()`, so a poisoned lock holds nothing broken.
        let _guard = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = f(self.load());
        next.error_rate = clamp_rate(next.error_rate);
        self.error_rate_bits
            .store(next.error_rate.to_bits(), Ordering::Relaxed);
        self.latency_ns
            .store(saturating_nanos(next.latency), Ordering::Relaxed);
        self.jitter_ns
            .store(saturating_nanos(next.latency_jitter), Ordering::Relaxed);
        // Report what readers will see (nanosecond-saturated), not what was asked for.
        self.load()
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

/// u64 nanoseconds cover 584 years; anything longer is "forever" anyway.
fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `latency + offset`, where `draw` in `0..=2*jitter` maps to an offset in
/// `-jitter..=+jitter`, clamped at zero. Pure so the arithmetic can be tested.
fn jittered(latency_ns: u64, jitter_ns: u64, draw: u64) -> u64 {
    latency_ns.saturating_add(draw).saturating_sub(jitter_ns)
}

async fn accept_loop(
    listener: TcpListener,
    inner: Arc<Inner>,
    mut kill: watch::Receiver<bool>,
    closed: watch::Sender<bool>,
) {
    // Connection tasks live in a JoinSet so a kill can abort them all at once; finished
    // ones are reaped as we go so a long load run does not accumulate handles.
    let mut conns = JoinSet::new();
    let mut http = http1::Builder::new();
    // Keep-alive is the default; stated because load runs depend on it. No timer is set,
    // so hyper's header-read timeout stays off and idle pooled connections are never
    // closed under a client's feet.
    http.keep_alive(true);
    let mut backoff = false;
    loop {
        tokio::select! {
            biased;
            // Err: every sender is gone, which only happens once the handle is dropped.
            _ = kill.wait_for(|kill| *kill) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    inner.accepted.fetch_add(1, Ordering::Relaxed);
                    inner.open.fetch_add(1, Ordering::Relaxed);
                    let open = OpenConn(Arc::clone(&inner));
                    let conn = serve(stream, Arc::clone(&inner), http.clone());
                    conns.spawn(async move {
                        conn.await;
                        drop(open);
                    });
                }
                Err(e) if is_per_connection(&e) => {
                    tracing::debug!(upstream = %inner.name, error = %e, "accept failed");
                }
                Err(e) => {
                    tracing::warn!(upstream = %inner.name, error = %e, "accept failed; backing off");
                    backoff = true;
                }
            },
        }
        // Outside the select above, which still borrows `kill` inside its arms.
        if std::mem::take(&mut backoff) {
            tokio::select! {
                _ = kill.wait_for(|kill| *kill) => break,
                () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
            }
        }
    }
    // Closing the listener first means new connects are refused from here on; then every
    // live connection is aborted and awaited so their sockets are closed too.
    drop(listener);
    conns.shutdown().await;
    closed.send_replace(true);
}

/// Accept errors that concern one half-open connection, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

async fn serve(stream: TcpStream, inner: Arc<Inner>, http: http1::Builder) {
    // Small responses must not wait on Nagle; latency figures in tests would be noise.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let svc = service_fn(move |req| handle(Arc::clone(&inner), req));
    if let Err(e) = http.serve_connection(TokioIo::new(stream), svc).await {
        tracing::debug!(error = %e, "upstream connection ended with an error");
    }
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    let mut resp = if req.uri().path() == FAULT_PATH {
        fault_endpoint(&inner, req).await
    } else if inject_faults(&inner).await {
        drain(req.into_body()).await;
        respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            Body::full(inner.error_body.clone()),
        )
    } else {
        route(&inner, req).await
    };
    resp.headers_mut().insert(X_UPSTREAM, inner.header.clone());
    Ok(resp)
}

/// Sleeps for the configured latency, then decides whether to fail the request.
async fn inject_faults(inner: &Inner) -> bool {
    let f = inner.faults.load();
    let latency = saturating_nanos(f.latency);
    let jitter = saturating_nanos(f.latency_jitter);
    if latency != 0 || jitter != 0 {
        // The thread-local rng is !Send, so it is used and dropped before the await.
        let draw = if jitter == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter.saturating_mul(2))
        };
        let delay = if jitter == 0 {
            latency
        } else {
            jittered(latency, jitter, draw)
        };
        if delay != 0 {
            tokio::time::sleep(Duration::from_nanos(delay)).await;
        }
    }
    f.error_rate >= 1.0 || (f.error_rate > 0.0 && rand::rng().random::<f64>() < f.error_rate)
}

async fn route(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/sink" {
        return sink(body).await;
    }
    // Every other route ignores the request body but reads it anyway: hyper closes a
    // keep-alive connection whose request body was left unread, and load runs that POST
    // to `/` would otherwise measure reconnects.
    drain(body).await;
    if let Some(code) = path.strip_prefix("/status/") {
        return status(inner, code);
    }
    match path {
        "/echo" => echo(inner, &parts),
        "/stream" => stream(inner, parts.uri.query()),
        _ => respond(StatusCode::OK, TEXT, Body::full(inner.root_body.clone())),
    }
}

/// The request as received. Headers come in the order hyper's `HeaderMap` yields them:
/// first-seen order of names, with repeated values of one name kept together and in order.
fn echo(inner: &Inner, parts: &http::request::Parts) -> Response<Body> {
    #[derive(Serialize)]
    struct Echo<'a> {
        upstream: &'a str,
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        version: &'static str,
        headers: Vec<(&'a str, Cow<'a, str>)>,
    }
    let version = match parts.version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    };
    json(
        StatusCode::OK,
        &Echo {
            upstream: &inner.name,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            version,
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes())))
                .collect(),
        },
    )
}

fn stream(inner: &Inner, query: Option<&str>) -> Response<Body> {
    let bad = |msg: &str| {
        respond(
            StatusCode::BAD_REQUEST,
            TEXT,
            Body::full(format!("{}: {msg}\n", inner.name)),
        )
    };
    let Some(Ok(bytes)) = query_param(query, "bytes").map(str::parse::<u64>) else {
        return bad("/stream needs bytes=N (a non-negative integer)");
    };
    let chunk = match query_param(query, "chunk").map(str::parse::<usize>) {
        None => DEFAULT_CHUNK,
        Some(Ok(c)) if (1..=MAX_CHUNK).contains(&c) => c,
        Some(_) => return bad("chunk must be an integer in 1..=16777216"),
    };
    let exact = match query_param(query, "length") {
        None | Some("0") => false,
        Some("1") => true,
        Some(_) => return bad("length must be 0 or 1"),
    };
    let chunk = if chunk <= XS.len() {
        Bytes::from_static(&XS[..chunk])
    } else {
        Bytes::from(vec![b'x'; chunk])
    };
    let mut resp = respond(
        StatusCode::OK,
        TEXT,
        Body::Xs {
            remaining: bytes,
            chunk,
            exact,
        },
    );
    if exact {
        resp.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(bytes));
    }
    resp
}

/// Counts and sums the request body frame by frame; nothing is kept beyond one frame.
async fn sink(mut body: Incoming) -> Response<Body> {
    #[derive(Serialize)]
    struct Sink {
        bytes: u64,
        sum: u64,
    }
    let mut total = Sink { bytes: 0, sum: 0 };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    total.bytes += data.len() as u64;
                    total.sum = data
                        .iter()
                        .fold(total.sum, |sum, &b| sum.wrapping_add(u64::from(b)));
                }
            }
            Err(e) => {
                // The client went away mid-body; the answer is unlikely to reach it.
                tracing::debug!(error = %e, "sink body read failed");
                return json_error(StatusCode::BAD_REQUEST, &format!("body read failed: {e}"));
            }
        }
    }
    json(StatusCode::OK, &total)
}

fn status(inner: &Inner, code: &str) -> Response<Body> {
    match code.parse::<u16>().map(StatusCode::from_u16) {
        Ok(Ok(status)) if !status.is_informational() => respond(
            status,
            TEXT,
            Body::full(format!("{}: {}\n", inner.name, status.as_u16())),
        ),
        // 1xx are interim responses, not answers; hyper cannot send one as the final status.
        _ => respond(
            StatusCode::BAD_REQUEST,
            TEXT,
            Body::full(format!(
                "{}: status must be an integer in 200..=999, got {code:?}\n",
                inner.name
            )),
        ),
    }
}

/// A fault patch: absent (or null) fields keep their current value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultPatch {
    error_rate: Option<f64>,
    latency: Option<String>,
    latency_jitter: Option<String>,
}

async fn fault_endpoint(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    match *req.method() {
        Method::GET => {
            drain(req.into_body()).await;
            json(StatusCode::OK, &inner.faults.load())
        }
        Method::PUT => {
            let body = match Limited::new(req.into_body(), MAX_FAULT_BODY)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let status = if e.is::<http_body_util::LengthLimitError>() {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    return json_error(status, &format!("reading body: {e}"));
                }
            };
            match parse_patch(&body) {
                Ok(apply) => json(StatusCode::OK, &inner.faults.update(apply)),
                Err(msg) => json_error(StatusCode::BAD_REQUEST, &msg),
            }
        }
        _ => {
            drain(req.into_body()).await;
            let mut resp = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{FAULT_PATH} accepts GET and PUT"),
            );
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, PUT"));
            resp
        }
    }
}

/// Validates a whole patch before anything is applied, so a bad field changes nothing.
fn parse_patch(body: &[u8]) -> Result<impl FnOnce(Faults) -> Faults + use<>, String> {
    let patch: FaultPatch = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    if let Some(rate) = patch.error_rate
        && !(0.0..=1.0).contains(&rate)
    {
        return Err(format!("error_rate must be in 0..=1, got {rate}"));
    }
    let duration = |field: &str, value: Option<String>| {
        value
            .map(|s| {
                humantime::parse_duration(&s)
                    .map_err(|e| format!("{field}: {e} in {s:?} (use e.g. \"200ms\", \"2s\")"))
            })
            .transpose()
    };
    let latency = duration("latency", patch.latency)?;
    let latency_jitter = duration("latency_jitter", patch.latency_jitter)?;
    let error_rate = patch.error_rate;
    Ok(move |current: Faults| Faults {
        error_rate: error_rate.unwrap_or(current.error_rate),
        latency: latency.unwrap_or(current.latency),
        latency_jitter: latency_jitter.unwrap_or(current.latency_jitter),
    })
}

/// Reads and discards a request body; see [`route`] for why it is read at all.
async fn drain(mut body: Incoming) {
    use http_body::Body as _;
    if body.is_end_stream() {
        return;
    }
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if pair == key => Some(""),
            _ => None,
        })
}

fn respond(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(v) => respond(status, JSON, Body::full(v)),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            Body::full(format!("serialising response: {e}\n")),
        ),
    }
}

fn json_error(status: StatusCode, msg: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg }))
}

/// Response body: one buffer, or a lazily produced run of `x`.
///
/// An enum rather than a boxed body: no allocation per response, and the size hint is
/// ours to choose. hyper sends `content-length` for an exact hint and chunked encoding
/// otherwise, which is exactly the `/stream` `length=` switch.
enum Body {
    Full(Option<Bytes>),
    Xs {
        remaining: u64,
        /// A buffer of `x`; each frame is a refcounted slice of it, never a copy.
        chunk: Bytes,
        exact: bool,
    },
}

impl Body {
    fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Xs {
                remaining, chunk, ..
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = usize::try_from(*remaining).map_or(chunk.len(), |r| r.min(chunk.len()));
                *remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk.slice(..n)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Self::Xs { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Xs {
                remaining, exact, ..
            } if *exact => SizeHint::with_exact(*remaining),
            Self::Xs { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use serde_json::{Value, json};
    use std::time::Instant;

    type TestClient = Client<HttpConnector, Body>;

    async fn start(name: &str) -> (UpstreamHandle, TestClient) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = spawn(listener, UpstreamConfig::new(name)).unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        (up, client)
    }

    async fn call(
        client: &TestClient,
        up: &UpstreamHandle,
        method: Method,
        path: &str,
        body: Body,
    ) -> (http::response::Parts, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", up.addr()))
            .body(body)
            .unwrap();
        let (parts, body) = client.request(req).await.unwrap().into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    }

    async fn get(
        client: &TestClient,
        up: &UpstreamHandle,
        path: &str,
    ) -> (http::response::Parts, Bytes) {
        call(client, up, Method::GET, path, Body::Full(None)).await
    }

    fn as_json(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    /// Waits for a condition without a fixed sleep; bounded so a bug fails instead of hanging.
    async fn wait_until(mut cond: impl AsyncFnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !cond().await {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition not met within 5s");
    }

    async fn refused(addr: SocketAddr) -> bool {
        matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    #[tokio::test]
    async fn root_answers_name_with_header() {
        let (up, client) = start("blue").await;
        let (parts, body) = get(&client, &up, "/").await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["x-upstream"], "blue");
        assert_eq!(parts.headers[CONTENT_TYPE], "text/plain");
        assert_eq!(body, "blue\n");
        let (parts, body) = get(&client, &up, "/no/such/path").await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "blue\n");
        assert_eq!(up.requests(), 2);
        assert_eq!(up.name(), "blue");
    }

    #[tokio::test]
    async fn echo_reports_request_with_repeated_headers() {
        let (up, client) = start("green").await;
        let req = Request::post(format!("http://{}/echo?a=1&b", up.addr()))
            .header("x-rep", "one")
            .header("x-other", "o")
            .header("x-rep", "two")
            .header("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .body(Body::full("ignored body"))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.headers()["x-upstream"], "green");
        assert_eq!(resp.headers()[CONTENT_TYPE], JSON);
        let v = as_json(&resp.into_body().collect().await.unwrap().to_bytes());
        assert_eq!(v["upstream"], "green");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/echo");
        assert_eq!(v["query"], "a=1&b");
        assert_eq!(v["version"], "HTTP/1.1");
        let headers = v["headers"].as_array().unwrap();
        let values = |name: &str| -> Vec<Value> {
            headers
                .iter()
                .filter(|h| h[0] == name)
                .map(|h| h[1].clone())
                .collect()
        };
        assert_eq!(values("x-rep"), [json!("one"), json!("two")]);
        assert_eq!(values("x-bin"), [json!("caf\u{fffd}")]);
        assert!(headers.iter().all(|h| h.as_array().unwrap().len() == 2));

        let (_, body) = get(&client, &up, "/echo").await;
        assert_eq!(as_json(&body)["query"], Value::Null);
    }

    #[tokio::test]
    async fn stream_chunked_and_with_length() {
        let (up, client) = start("s").await;
        let n = 1_000_003u64;

        let (parts, body) = get(&client, &up, &format!("/stream?bytes={n}&chunk=4096")).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert!(parts.headers.get(CONTENT_LENGTH).is_none());
        assert_eq!(parts.headers["transfer-encoding"], "chunked");
        assert_eq!(body.len() as u64, n);
        assert!(body.iter().all(|&b| b == b'x'));

        let (parts, body) = get(&client, &up, &format!("/stream?bytes={n}&length=1")).await;
        assert_eq!(parts.headers[CONTENT_LENGTH], n.to_string().as_str());
        assert!(parts.headers.get("transfer-encoding").is_none());
        assert_eq!(body.len() as u64, n);

        // Chunks bigger than the static buffer get their own.
        let (_, body) = get(&client, &up, "/stream?bytes=200000&chunk=100000").await;
        assert_eq!(body.len(), 200_000);

        for bad in [
            "/stream",
            "/stream?bytes=-1",
            "/stream?bytes=1&chunk=0",
            "/stream?bytes=1&length=2",
        ] {
            let (parts, _) = get(&client, &up, bad).await;
            assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[tokio::test]
    async fn sink_counts_and_sums() {
        let (up, client) = start("sink").await;
        let payload: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(31) % 251) as u8)
            .collect();
        let sum = payload.iter().map(|&b| u64::from(b)).sum::<u64>();
        let (parts, body) = call(
            &client,
            &up,
            Method::PUT,
            "/sink",
            Body::full(payload.clone()),
        )
        .await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers[CONTENT_TYPE], JSON);
        assert_eq!(
            as_json(&body),
            json!({ "bytes": payload.len(), "sum": sum })
        );

        // A chunked upload (inexact size hint) is counted the same way.
        let upload = Body::Xs {
            remaining: 500_000,
            chunk: Bytes::from_static(&XS[..1000]),
            exact: false,
        };
        let (_, body) = call(&client, &up, Method::POST, "/sink", upload).await;
        assert_eq!(
            as_json(&body),
            json!({ "bytes": 500_000, "sum": 500_000 * u64::from(b'x') })
        );
    }

    #[tokio::test]
    async fn status_codes() {
        let (up, client) = start("st").await;
        let (parts, body) = get(&client, &up, "/status/503").await;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(parts.headers["x-upstream"], "st");
        assert_eq!(body, "st: 503\n");
        let (parts, _) = get(&client, &up, "/status/799").await;
        assert_eq!(parts.status.as_u16(), 799);
        for bad in ["/status/101", "/status/1000", "/status/abc", "/status/"] {
            let (parts, _) = get(&client, &up, bad).await;
            assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[tokio::test]
    async fn fault_put_valid_and_invalid() {
        let (up, client) = start("f").await;
        let put = async |body: &'static str| {
            call(&client, &up, Method::PUT, FAULT_PATH, Body::full(body)).await
        };

        let (parts, body) =
            put(r#"{"error_rate":0.25,"latency":"5ms","latency_jitter":"1ms"}"#).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["x-upstream"], "f");
        let expected = json!({ "error_rate": 0.25, "latency": "5ms", "latency_jitter": "1ms" });
        assert_eq!(as_json(&body), expected);

        // A partial patch keeps the other fields.
        let (_, body) = put(r#"{"latency":"2s"}"#).await;
        let expected = json!({ "error_rate": 0.25, "latency": "2s", "latency_jitter": "1ms" });
        assert_eq!(as_json(&body), expected);
        let before = up.faults();

        for bad in [
            "not json",
            r#"{"error_rate":1.5}"#,
            r#"{"error_rate":-0.1}"#,
            r#"{"latency":"soon"}"#,
            r#"{"error_rate":0.5,"latency_jitter":"1 parsec"}"#,
            r#"{"unknown":1}"#,
        ] {
            let (parts, body) = put(bad).await;
            assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(as_json(&body)["error"].is_string(), "{bad}");
            assert_eq!(up.faults(), before, "{bad} must change nothing");
        }

        let (parts, body) = get(&client, &up, FAULT_PATH).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(as_json(&body), expected);

        let (parts, _) = call(&client, &up, Method::DELETE, FAULT_PATH, Body::Full(None)).await;
        assert_eq!(parts.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(parts.headers[ALLOW], "GET, PUT");
    }

    #[tokio::test]
    async fn error_rate_one_fails_everything_but_the_fault_endpoint() {
        let (up, client) = start("bad").await;
        let (parts, _) = call(
            &client,
            &up,
            Method::PUT,
            FAULT_PATH,
            Body::full(r#"{"error_rate":1.0}"#),
        )
        .await;
        assert_eq!(parts.status, StatusCode::OK);
        for path in ["/", "/echo", "/status/200"] {
            let (parts, body) = get(&client, &up, path).await;
            assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert_eq!(parts.headers["x-upstream"], "bad");
            assert_eq!(body, "bad: injected error\n");
        }
        let (parts, _) = get(&client, &up, FAULT_PATH).await;
        assert_eq!(parts.status, StatusCode::OK);

        up.set_faults(Faults::default());
        let (parts, _) = get(&client, &up, "/").await;
        assert_eq!(parts.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn latency_delays_responses() {
        let (up, client) = start("slow").await;
        up.set_faults(Faults {
            latency: Duration::from_millis(40),
            ..Faults::default()
        });
        let started = Instant::now();
        let (parts, _) = get(&client, &up, "/").await;
        assert_eq!(parts.status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn jitter_spans_both_sides_and_clamps_at_zero() {
        assert_eq!(jittered(100, 20, 0), 80);
        assert_eq!(jittered(100, 20, 20), 100);
        assert_eq!(jittered(100, 20, 40), 120);
        assert_eq!(jittered(10, 20, 0), 0);
        assert_eq!(jittered(u64::MAX, 5, 10), u64::MAX - 5);
    }

    #[test]
    fn set_faults_clamps_error_rate() {
        let cell = FaultCell::default();
        let stored = cell.update(|f| Faults {
            error_rate: 7.0,
            ..f
        });
        assert_eq!(stored.error_rate, 1.0);
        let stored = cell.update(|f| Faults {
            error_rate: f64::NAN,
            ..f
        });
        assert_eq!(stored.error_rate, 0.0);
    }

    #[tokio::test]
    async fn kill_refuses_new_and_aborts_open_connections() {
        let (up, client) = start("doomed").await;
        let addr = up.addr();
        let (parts, _) = get(&client, &up, "/").await;
        assert_eq!(parts.status, StatusCode::OK);

        // An in-flight request that would otherwise wait an hour.
        up.set_faults(Faults {
            latency: Duration::from_secs(3600),
            ..Faults::default()
        });
        let in_flight = tokio::spawn({
            let client = client.clone();
            let uri = format!("http://{addr}/");
            async move {
                let req = Request::get(uri).body(Body::Full(None)).unwrap();
                client.request(req).await
            }
        });
        wait_until(async || up.requests() == 2).await;

        up.kill().await;
        assert!(refused(addr).await);
        let outcome = tokio::time::timeout(Duration::from_secs(5), in_flight)
            .await
            .expect("kill must abort the in-flight request")
            .unwrap();
        assert!(outcome.is_err());
        up.kill().await; // idempotent
    }

    #[tokio::test]
    async fn drop_kills() {
        let (up, client) = start("dropped").await;
        let addr = up.addr();
        let (parts, _) = get(&client, &up, "/").await;
        assert_eq!(parts.status, StatusCode::OK);
        drop(up);
        wait_until(async || refused(addr).await).await;
    }

    #[tokio::test]
    async fn invalid_name_is_rejected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = spawn(listener, UpstreamConfig::new("bad\nname")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
