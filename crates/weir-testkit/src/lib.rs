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
//! Faults (every path except `/__weir/fault`; JSON field names, also [`Faults`]):
//!
//! | field | effect |
//! |---|---|
//! | `latency`, `latency_jitter` | first, a delay of `latency ± jitter` (`"200ms"`) |
//! | `error_rate` | then, with this probability, `500` with body `NAME: injected error\n` |
//! | `truncate_rate` | else, with this probability, `200` with `content-length: 65536`, the first 16 KiB of it, then a TCP reset (`SO_LINGER` 0): a response cut off mid-body. A HEAD answer has no body to cut and goes out whole |
//! | `close_idle_after` | `"MIN..MAX"` (e.g. `"0ms..50ms"`), `"D"` or `"off"`: after each response, once nothing is in flight, the connection is closed after a delay drawn uniformly from the range unless a new request started on it meanwhile |
//!
//! `close_idle_after` is an upstream with a short keep-alive timeout: the close is a plain
//! `close()` with no `Connection: close` warning, so a request a client writes just then
//! meets a FIN (EOF, no answer) or, when its bytes already arrived, a reset. Nothing is
//! refused deterministically; it is the race real pools meet.
//!
//! Every request is counted, in total and by method ([`UpstreamHandle::requests`],
//! [`UpstreamHandle::requests_by_method`]), when hyper hands it over: a test can prove that
//! a proxy never sent a POST twice by comparing POSTs received with POSTs sent.

pub mod etcd;

pub use etcd::{EtcdCluster, TlsFiles};

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use tokio::sync::{Notify, watch};
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
/// A fault patch is a handful of small fields; anything bigger is a mistake, not a patch.
const MAX_FAULT_BODY: usize = 64 * 1024;
/// What a truncated answer declares in `content-length`.
const TRUNCATE_DECLARED: u64 = 64 * 1024;
/// What a truncated answer sends of it before the reset: enough that the client has
/// surely started on the body, small enough to sit in any socket buffer at once.
const TRUNCATE_SENT: usize = 16 * 1024;
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

/// Injected faults (see the module docs for what each does). Serialises with humantime
/// durations (`"200ms"`), the same shape `GET /__weir/fault` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Faults {
    /// Probability in `0..=1` of answering `500`.
    pub error_rate: f64,
    #[serde(serialize_with = "ser_humantime")]
    pub latency: Duration,
    #[serde(serialize_with = "ser_humantime")]
    pub latency_jitter: Duration,
    /// Probability in `0..=1` of a `200` whose body is cut off by a reset.
    pub truncate_rate: f64,
    /// Close a keep-alive connection this long after it went idle; `None`: never.
    #[serde(serialize_with = "ser_idle_close")]
    pub close_idle_after: Option<DurationRange>,
}

/// A range of durations to draw from uniformly, `min..=max`; written `"0ms..50ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
}

impl DurationRange {
    /// The range between `a` and `b`, whichever is smaller first.
    pub fn new(a: Duration, b: Duration) -> DurationRange {
        DurationRange {
            min: a.min(b),
            max: a.max(b),
        }
    }
}

impl fmt::Display for DurationRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}..{}",
            humantime::format_duration(self.min),
            humantime::format_duration(self.max)
        )
    }
}

impl std::str::FromStr for DurationRange {
    type Err = String;

    /// `"MIN..MAX"` or a single duration (a range of one); `MIN` may not exceed `MAX`.
    fn from_str(s: &str) -> Result<DurationRange, String> {
        let parse = |d: &str| {
            let d = d.trim();
            if d == "0" {
                return Ok(Duration::ZERO);
            }
            humantime::parse_duration(d)
                .map_err(|e| format!("{e} in {d:?} (use e.g. \"0ms..50ms\" or \"20ms\")"))
        };
        let (min, max) = match s.split_once("..") {
            Some((lo, hi)) => (parse(lo)?, parse(hi)?),
            None => {
                let d = parse(s)?;
                (d, d)
            }
        };
        if min > max {
            return Err(format!("{s:?}: the minimum is above the maximum"));
        }
        Ok(DurationRange { min, max })
    }
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

    /// Cut this share of the answers off mid-body, nothing else.
    pub fn truncate(rate: f64) -> Faults {
        Faults {
            truncate_rate: rate,
            ..Faults::default()
        }
    }

    /// Close idle keep-alive connections after a delay between `min` and `max`, nothing else.
    pub fn close_idle(min: Duration, max: Duration) -> Faults {
        Faults {
            close_idle_after: Some(DurationRange::new(min, max)),
            ..Faults::default()
        }
    }
}

fn ser_humantime<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// `"off"` rather than `null`, so a `GET` answer PUT back as a patch changes nothing
/// (a `null` in a patch means "keep").
fn ser_idle_close<S: serde::Serializer>(
    r: &Option<DurationRange>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.collect_str(r),
        None => s.serialize_str("off"),
    }
}

/// Requests received, by method. `other` is every method not named here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MethodCounts {
    pub get: u64,
    pub head: u64,
    pub post: u64,
    pub put: u64,
    pub other: u64,
}

/// [`MethodCounts`] as atomics, bumped once per request.
#[derive(Default)]
struct MethodCounters {
    get: AtomicU64,
    head: AtomicU64,
    post: AtomicU64,
    put: AtomicU64,
    other: AtomicU64,
}

impl MethodCounters {
    fn count(&self, method: &Method) {
        let counter = match *method {
            Method::GET => &self.get,
            Method::HEAD => &self.head,
            Method::POST => &self.post,
            Method::PUT => &self.put,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn load(&self) -> MethodCounts {
        MethodCounts {
            get: self.get.load(Ordering::Relaxed),
            head: self.head.load(Ordering::Relaxed),
            post: self.post.load(Ordering::Relaxed),
            put: self.put.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }
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

    /// Replaces all faults. `error_rate` and `truncate_rate` are clamped into `0..=1`
    /// (NaN counts as 0).
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

    /// [`requests`](Self::requests) by method. A request counts once its head is parsed,
    /// whatever becomes of it (a fault, a body that never arrives).
    pub fn requests_by_method(&self) -> MethodCounts {
        self.inner.by_method.load()
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
        ..Faults::default()
    });
    let inner = Arc::new(Inner {
        root_body: Bytes::from(format!("{}\n", cfg.name)),
        error_body: Bytes::from(format!("{}: injected error\n", cfg.name)),
        name: cfg.name,
        header,
        faults,
        requests: AtomicU64::new(0),
        by_method: MethodCounters::default(),
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
    by_method: MethodCounters,
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

/// Faults as atomics so the request path never takes a lock.
///
/// A reader may see a mix of an old and a new field while a write is in progress; for
/// fault injection that is harmless. Writers do read-modify-write (a PUT patches only
/// the fields it names), so they serialise on `write`, which readers never touch.
#[derive(Default)]
struct FaultCell {
    error_rate_bits: AtomicU64,
    latency_ns: AtomicU64,
    jitter_ns: AtomicU64,
    truncate_rate_bits: AtomicU64,
    /// Read on every response (is anyone waiting for the connection to go idle?), so
    /// the common case of "off" is one load.
    close_idle_on: AtomicBool,
    close_idle_min_ns: AtomicU64,
    close_idle_max_ns: AtomicU64,
    write: Mutex<()>,
}

impl FaultCell {
    fn load(&self) -> Faults {
        Faults {
            error_rate: f64::from_bits(self.error_rate_bits.load(Ordering::Relaxed)),
            latency: Duration::from_nanos(self.latency_ns.load(Ordering::Relaxed)),
            latency_jitter: Duration::from_nanos(self.jitter_ns.load(Ordering::Relaxed)),
            truncate_rate: f64::from_bits(self.truncate_rate_bits.load(Ordering::Relaxed)),
            close_idle_after: self.close_idle(),
        }
    }

    fn close_idle(&self) -> Option<DurationRange> {
        self.close_idle_on
            .load(Ordering::Relaxed)
            .then(|| DurationRange {
                min: Duration::from_nanos(self.close_idle_min_ns.load(Ordering::Relaxed)),
                max: Duration::from_nanos(self.close_idle_max_ns.load(Ordering::Relaxed)),
            })
    }

    /// Applies `f` to the current faults under the writer lock and stores the result.
    fn update(&self, f: impl FnOnce(Faults) -> Faults) -> Faults {
        // The guarded data is `()`, so a poisoned lock holds nothing broken.
        let _guard = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = f(self.load());
        next.error_rate = clamp_rate(next.error_rate);
        next.truncate_rate = clamp_rate(next.truncate_rate);
        self.error_rate_bits
            .store(next.error_rate.to_bits(), Ordering::Relaxed);
        self.latency_ns
            .store(saturating_nanos(next.latency), Ordering::Relaxed);
        self.jitter_ns
            .store(saturating_nanos(next.latency_jitter), Ordering::Relaxed);
        self.truncate_rate_bits
            .store(next.truncate_rate.to_bits(), Ordering::Relaxed);
        // Public fields may hold min > max; the range is the one between them.
        let idle = next
            .close_idle_after
            .map(|r| DurationRange::new(r.min, r.max));
        let (min, max) = idle.map_or((0, 0), |r| {
            (saturating_nanos(r.min), saturating_nanos(r.max))
        });
        self.close_idle_min_ns.store(min, Ordering::Relaxed);
        self.close_idle_max_ns.store(max, Ordering::Relaxed);
        self.close_idle_on.store(idle.is_some(), Ordering::Relaxed);
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

/// What one connection's dispatch, response bodies and socket share. Everything here is
/// touched from the connection's own task only; atomics just make it `Sync`.
struct ConnShared {
    inner: Arc<Inner>,
    /// Requests hyper handed to the service (bumped at dispatch, before the handler runs).
    started: AtomicU64,
    /// Responses hyper is done with: the body ended (it is in hyper's write buffer) or
    /// was never going to be sent.
    finished: AtomicU64,
    /// A response finished since the last flush: the next flush of the socket means its
    /// last byte is on the wire and the connection is idle.
    flush_pending: AtomicBool,
    /// Wakes the connection task to arm the `close_idle_after` timer.
    idle: Notify,
    /// Close with a reset instead of a FIN (a truncated answer).
    reset: AtomicBool,
}

impl ConnShared {
    fn in_flight(&self) -> bool {
        self.started.load(Ordering::Relaxed) != self.finished.load(Ordering::Relaxed)
    }
}

async fn serve(stream: TcpStream, inner: Arc<Inner>, http: http1::Builder) {
    // Small responses must not wait on Nagle; latency figures in tests would be noise.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let shared = Arc::new(ConnShared {
        inner,
        started: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        flush_pending: AtomicBool::new(false),
        idle: Notify::new(),
        reset: AtomicBool::new(false),
    });
    let io = ConnIo {
        stream,
        shared: Arc::clone(&shared),
    };
    let svc = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| {
            // Counted here, synchronously at dispatch, so an idle close that fires before
            // the handler's first poll still sees the request as started.
            shared.started.fetch_add(1, Ordering::Relaxed);
            handle(Arc::clone(&shared), req)
        })
    };
    let mut conn = std::pin::pin!(http.serve_connection(TokioIo::new(io), svc));
    // Armed when the connection went idle with `close_idle_after` on: close at this
    // instant unless a request started after `started` was this value.
    let mut close_at: Option<(tokio::time::Instant, u64)> = None;
    loop {
        let deadline = close_at.map_or_else(tokio::time::Instant::now, |(at, _)| at);
        tokio::select! {
            biased;
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                return;
            }
            () = shared.idle.notified() => {
                close_at = shared.inner.faults.close_idle().map(|range| {
                    (
                        tokio::time::Instant::now() + draw(range),
                        shared.started.load(Ordering::Relaxed),
                    )
                });
            }
            () = tokio::time::sleep_until(deadline), if close_at.is_some() => {
                let mark = close_at.take().map(|(_, mark)| mark);
                // Turning the fault off disarms a timer already running.
                if mark == Some(shared.started.load(Ordering::Relaxed))
                    && shared.inner.faults.close_idle_on.load(Ordering::Relaxed)
                {
                    // Dropping the connection closes the socket: a FIN, or a reset if
                    // a request's bytes are already waiting unread. No `Connection:
                    // close` went out first, as with any keep-alive timeout.
                    tracing::trace!(upstream = %shared.inner.name, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// A uniform draw from `range`.
fn draw(range: DurationRange) -> Duration {
    let (min, max) = (saturating_nanos(range.min), saturating_nanos(range.max));
    if min >= max {
        return range.min;
    }
    Duration::from_nanos(rand::rng().random_range(min..=max))
}

/// The connection's socket, watched: a flush after a finished response marks the
/// connection idle, and a truncated answer turns the close into a reset.
struct ConnIo {
    stream: TcpStream,
    shared: Arc<ConnShared>,
}

impl tokio::io::AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    /// hyper flushes the socket once its own buffer is empty, so after a response
    /// finished this is the moment its last byte left.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        let shared = &this.shared;
        if flushed.is_ready()
            && shared.flush_pending.swap(false, Ordering::Relaxed)
            && shared.inner.faults.close_idle_on.load(Ordering::Relaxed)
            && !shared.in_flight()
        {
            shared.idle.notify_one();
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shared.reset.load(Ordering::Relaxed) {
            // A FIN first would let the peer read a clean end of stream before the reset.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.shared.reset.load(Ordering::Relaxed)
            && let Err(e) = self.stream.set_zero_linger()
        {
            tracing::debug!(error = %e, "SO_LINGER 0 failed; the close will be a FIN");
        }
    }
}

/// A response body tied to its connection: its end is the response's end (for the
/// idle close), and a truncation error turns the connection's close into a reset.
struct Tracked {
    body: Body,
    conn: Arc<ConnShared>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // hyper drops the body once the last frame is in its write buffer (at once for
        // HEAD, 204 and other empty bodies), or when the connection is torn down.
        self.conn.finished.fetch_add(1, Ordering::Relaxed);
        self.conn.flush_pending.store(true, Ordering::Relaxed);
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Truncated;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Truncated>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = frame {
            // hyper answers a body error by dropping the connection without a shutdown;
            // with this set, that drop is a reset.
            this.conn.reset.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The error a truncated answer's body ends with; hyper then drops the connection.
#[derive(Debug, thiserror::Error)]
#[error("response truncated on purpose (truncate_rate)")]
struct Truncated;

async fn handle(
    conn: Arc<ConnShared>,
    req: Request<Incoming>,
) -> Result<Response<Tracked>, Infallible> {
    let inner = &conn.inner;
    inner.requests.fetch_add(1, Ordering::Relaxed);
    inner.by_method.count(req.method());
    let mut resp = if req.uri().path() == FAULT_PATH {
        fault_endpoint(inner, req).await
    } else {
        match inject_faults(inner).await {
            Injected::Error => {
                drain(req.into_body()).await;
                respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    Body::full(inner.error_body.clone()),
                )
            }
            Injected::Truncate => {
                drain(req.into_body()).await;
                truncated()
            }
            Injected::None => route(inner, req).await,
        }
    };
    resp.headers_mut().insert(X_UPSTREAM, inner.header.clone());
    Ok(resp.map(|body| Tracked {
        body,
        conn: Arc::clone(&conn),
    }))
}

/// `200` declaring [`TRUNCATE_DECLARED`] bytes, of which [`TRUNCATE_SENT`] come.
fn truncated() -> Response<Body> {
    let mut resp = respond(
        StatusCode::OK,
        TEXT,
        Body::Truncated {
            sent: Some(Bytes::from_static(&XS[..TRUNCATE_SENT])),
            remaining: TRUNCATE_DECLARED,
            flushed: false,
        },
    );
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(TRUNCATE_DECLARED));
    resp
}

/// Which fault, if any, a request gets.
enum Injected {
    None,
    Error,
    Truncate,
}

/// Sleeps for the configured latency, then decides whether to fail the request.
async fn inject_faults(inner: &Inner) -> Injected {
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
    let hit = |rate: f64| rate >= 1.0 || (rate > 0.0 && rand::rng().random::<f64>() < rate);
    if hit(f.error_rate) {
        Injected::Error
    } else if hit(f.truncate_rate) {
        Injected::Truncate
    } else {
        Injected::None
    }
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
    truncate_rate: Option<f64>,
    /// `"MIN..MAX"`, `"D"`, or `"off"`.
    close_idle_after: Option<String>,
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
    for (field, rate) in [
        ("error_rate", patch.error_rate),
        ("truncate_rate", patch.truncate_rate),
    ] {
        if let Some(rate) = rate
            && !(0.0..=1.0).contains(&rate)
        {
            return Err(format!("{field} must be in 0..=1, got {rate}"));
        }
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
    // Outer `None`: keep; `Some(None)`: off.
    let close_idle_after = patch
        .close_idle_after
        .map(|s| match s.trim() {
            "off" => Ok(None),
            range => range
                .parse::<DurationRange>()
                .map(Some)
                .map_err(|e| format!("close_idle_after: {e}, or \"off\"")),
        })
        .transpose()?;
    let (error_rate, truncate_rate) = (patch.error_rate, patch.truncate_rate);
    Ok(move |current: Faults| Faults {
        error_rate: error_rate.unwrap_or(current.error_rate),
        latency: latency.unwrap_or(current.latency),
        latency_jitter: latency_jitter.unwrap_or(current.latency_jitter),
        truncate_rate: truncate_rate.unwrap_or(current.truncate_rate),
        close_idle_after: close_idle_after.unwrap_or(current.close_idle_after),
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

/// Response body: one buffer, a lazily produced run of `x`, or a truncated answer.
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
    /// `sent`, then one `Pending` (hyper flushes what it buffered when a body is not
    /// ready; an error right after the data would be raised before the data went out),
    /// then [`Truncated`] with `remaining` bytes still declared.
    Truncated {
        sent: Option<Bytes>,
        remaining: u64,
        flushed: bool,
    },
}

impl Body {
    fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Truncated;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Truncated>>> {
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
            Self::Truncated {
                sent,
                remaining,
                flushed,
            } => {
                if let Some(data) = sent.take() {
                    *remaining = remaining.saturating_sub(data.len() as u64);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if !*flushed {
                    *flushed = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(Truncated)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Self::Xs { remaining, .. } => *remaining == 0,
            // Never ends: it fails.
            Self::Truncated { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Xs {
                remaining, exact, ..
            } if *exact => SizeHint::with_exact(*remaining),
            Self::Xs { .. } => SizeHint::default(),
            Self::Truncated { remaining, .. } => SizeHint::with_exact(*remaining),
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
        let expected = json!({
            "error_rate": 0.25, "latency": "5ms", "latency_jitter": "1ms",
            "truncate_rate": 0.0, "close_idle_after": "off",
        });
        assert_eq!(as_json(&body), expected);

        // A partial patch keeps the other fields.
        let (_, body) = put(r#"{"latency":"2s"}"#).await;
        let expected = json!({
            "error_rate": 0.25, "latency": "2s", "latency_jitter": "1ms",
            "truncate_rate": 0.0, "close_idle_after": "off",
        });
        assert_eq!(as_json(&body), expected);

        // Long enough that the client's pooled connection is not closed under this test.
        let (_, body) = put(r#"{"truncate_rate":0.5,"close_idle_after":"30s..1m"}"#).await;
        let expected = json!({
            "error_rate": 0.25, "latency": "2s", "latency_jitter": "1ms",
            "truncate_rate": 0.5, "close_idle_after": "30s..1m",
        });
        assert_eq!(as_json(&body), expected);
        assert_eq!(
            up.faults().close_idle_after,
            Some(DurationRange::new(
                Duration::from_secs(30),
                Duration::from_secs(60)
            ))
        );
        // What GET answers, PUT back, changes nothing; a null keeps the value.
        let (_, again) = put(r#"{"close_idle_after":"30s..1m","truncate_rate":null}"#).await;
        assert_eq!(as_json(&again), expected);
        let (_, body) = put(r#"{"close_idle_after":"off","truncate_rate":0}"#).await;
        let expected = json!({
            "error_rate": 0.25, "latency": "2s", "latency_jitter": "1ms",
            "truncate_rate": 0.0, "close_idle_after": "off",
        });
        assert_eq!(as_json(&body), expected);
        let before = up.faults();

        for bad in [
            "not json",
            r#"{"error_rate":1.5}"#,
            r#"{"error_rate":-0.1}"#,
            r#"{"latency":"soon"}"#,
            r#"{"error_rate":0.5,"latency_jitter":"1 parsec"}"#,
            r#"{"unknown":1}"#,
            r#"{"truncate_rate":1.01}"#,
            r#"{"close_idle_after":"50ms..10ms"}"#,
            r#"{"close_idle_after":"soon"}"#,
            r#"{"close_idle_after":"1ms..later"}"#,
            r#"{"close_idle_after":5}"#,
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
    fn duration_ranges_parse_and_print() {
        let ms = Duration::from_millis;
        let r = |s: &str| s.parse::<DurationRange>();
        assert_eq!(r("0ms..50ms"), Ok(DurationRange::new(ms(0), ms(50))));
        assert_eq!(r("0..1s"), Ok(DurationRange::new(ms(0), ms(1000))));
        assert_eq!(r(" 20ms "), Ok(DurationRange::new(ms(20), ms(20))));
        assert!(r("50ms..10ms").is_err());
        assert!(r("..").is_err());
        assert_eq!(DurationRange::new(ms(50), ms(1)).to_string(), "1ms..50ms");
        for _ in 0..100 {
            let d = draw(DurationRange::new(ms(3), ms(7)));
            assert!((ms(3)..=ms(7)).contains(&d), "{d:?}");
        }
        assert_eq!(draw(DurationRange::new(ms(5), ms(5))), ms(5));
    }

    #[test]
    fn set_faults_clamps_rates_and_orders_ranges() {
        let cell = FaultCell::default();
        let stored = cell.update(|f| Faults {
            truncate_rate: -3.0,
            close_idle_after: Some(DurationRange {
                min: Duration::from_millis(9),
                max: Duration::from_millis(2),
            }),
            ..f
        });
        assert_eq!(stored.truncate_rate, 0.0);
        assert_eq!(
            stored.close_idle_after,
            Some(DurationRange::new(
                Duration::from_millis(2),
                Duration::from_millis(9)
            ))
        );
        let stored = cell.update(|f| Faults {
            close_idle_after: None,
            ..f
        });
        assert_eq!(stored.close_idle_after, None);
    }

    /// Reads one response from a raw connection: head and `content-length` body. `None`
    /// when the connection ends first (EOF or error), with what arrived.
    async fn read_response(s: &mut TcpStream) -> Result<(String, Vec<u8>), Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    return Ok((head, got[end + 4..end + 4 + len].to_vec()));
                }
            }
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return Err(got),
            }
        }
    }

    /// How a raw connection ends once the peer is done: `Ok(())` for a FIN, else the
    /// error kind. Bounded, so a connection left open fails the test.
    async fn connection_end(s: &mut TcpStream) -> Result<(), io::ErrorKind> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.kind()),
                }
            }
        })
        .await
        .expect("the connection stayed open")
    }

    #[tokio::test]
    async fn truncate_sends_part_of_the_body_then_resets() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (up, client) = start("cut").await;
        up.set_faults(Faults::truncate(1.0));
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Some(e.kind()),
                }
            }
        })
        .await
        .expect("a truncated answer must end the connection");
        assert_eq!(
            end,
            Some(io::ErrorKind::ConnectionReset),
            "a reset, not a FIN"
        );
        let head_end = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("the head arrives whole");
        let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200 ok"), "{head}");
        assert!(head.contains("content-length: 65536"), "{head}");
        assert!(head.contains("x-upstream: cut"), "{head}");
        let body = got.len() - head_end - 4;
        assert!(
            body > 0 && (body as u64) < TRUNCATE_DECLARED,
            "{body} body bytes"
        );

        // A client reading the body gets an error, not a short success.
        let req = Request::get(format!("http://{}/", up.addr()))
            .body(Body::Full(None))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.into_body().collect().await.is_err());

        // A HEAD answer has no body to cut: it goes out whole, the connection lives.
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        for _ in 0..2 {
            s.write_all(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after a HEAD");
                head.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            assert!(head.contains("content-length: 65536"), "{head}");
        }
        // The fault endpoint is exempt.
        let (parts, _) = get(&client, &up, FAULT_PATH).await;
        assert_eq!(parts.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn close_idle_after_closes_quiet_connections_only() {
        use tokio::io::AsyncWriteExt;
        const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let (up, _client) = start("idle").await;

        // At once: the answer arrives whole, with no warning, then a plain close (FIN).
        up.set_faults(Faults::close_idle(Duration::ZERO, Duration::ZERO));
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(GET).await.unwrap();
        let (head, body) = read_response(&mut s).await.expect("a whole answer");
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, b"idle\n");
        assert_eq!(connection_end(&mut s).await, Ok(()));
        wait_until(async || up.open_connections() == 0).await;

        // A request that starts within the delay keeps the connection; once it is quiet
        // again, the delay starts over and the connection closes.
        up.set_faults(Faults::close_idle(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        let before = up.connections();
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        for _ in 0..3 {
            s.write_all(GET).await.unwrap();
            read_response(&mut s).await.expect("a whole answer");
        }
        let quiet = Instant::now();
        assert_eq!(connection_end(&mut s).await, Ok(()));
        assert!(
            quiet.elapsed() >= Duration::from_millis(900),
            "{:?}",
            quiet.elapsed()
        );
        assert_eq!(up.connections(), before + 1);

        // Off: an idle connection stays open (a request after a pause still works).
        up.set_faults(Faults::default());
        let mut s = TcpStream::connect(up.addr()).await.unwrap();
        s.write_all(GET).await.unwrap();
        read_response(&mut s).await.expect("a whole answer");
        tokio::task::yield_now().await;
        s.write_all(GET).await.unwrap();
        read_response(&mut s).await.expect("still open");
    }

    #[tokio::test]
    async fn counts_requests_by_method() {
        let (up, client) = start("m").await;
        for (method, path) in [
            (Method::GET, "/"),
            (Method::GET, "/echo"),
            (Method::HEAD, "/"),
            (Method::POST, "/sink"),
            (Method::PUT, "/sink"),
            (Method::DELETE, "/"),
            (Method::OPTIONS, "/"),
            (Method::GET, FAULT_PATH),
        ] {
            call(&client, &up, method, path, Body::full("x")).await;
        }
        // Faulted requests count too: they were received.
        up.set_faults(Faults::errors(1.0));
        call(&client, &up, Method::POST, "/", Body::full("x")).await;
        assert_eq!(
            up.requests_by_method(),
            MethodCounts {
                get: 3,
                head: 1,
                post: 2,
                put: 1,
                other: 2,
            }
        );
        assert_eq!(up.requests(), 9);
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
