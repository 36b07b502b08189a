//! HTTP/1.1 to upstream endpoints over per-endpoint keep-alive pools, driven inside the
//! request's own task.
//!
//! Why not hyper-util's pooled client: per request it hashes a pool key, locks a shared
//! pool, spawns a task to return the connection, and every request and response crosses
//! from the request task to a separate connection task and back. Profiles of the load
//! comparison showed that machinery as the bulk of weir's user-space time per request.
//! Here an endpoint keeps a LIFO stack of idle connections; the request task pops one,
//! polls the hyper connection itself while it waits for the response head, and the
//! response body keeps polling it until the last byte, then pushes it back. No spawn, no
//! hash, no cross-task wake-up.
//!
//! An idle connection is not polled while it sits in the stack, so an upstream that
//! closed it is noticed on checkout: one poll (no syscall unless the socket is readable)
//! tells a live connection from a closed one. A request that a closing connection refused
//! before sending anything is retried on another connection; it never reached the
//! upstream, so that is safe for any method. A request written into a reused connection
//! that then closed with no answer (the upstream's keep-alive timer fired as the request
//! was on its way) is sent again on a fresh connection only when that is safe: an
//! idempotent method and no body — like HAProxy's `retry-on conn-failure empty-response`.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::dataplane::body::RequestBody;
use crate::dataplane::pool::{EndpointState, RetryBudget};

/// A connection to an endpoint: plain TCP or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Conn = http1::Connection<TokioIo<Stream>, RequestBody>;

/// One upstream connection: the request handle and the connection driver.
pub(crate) struct PooledConn {
    sender: http1::SendRequest<RequestBody>,
    /// The connection driver; dropped as soon as it finishes, which cancels a request
    /// still queued on it (hyper hands it back unsent, and it goes on another
    /// connection) instead of leaving it waiting for `request_timeout`.
    conn: Option<Conn>,
    /// Set once the driver has finished: the connection cannot be used again.
    done: bool,
    /// When it last went idle; `None` for a connection fresh from connect.
    idle_since: Option<Instant>,
}

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledConn")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl PooledConn {
    /// Drive the connection once; returns false once it is finished.
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(conn) = self.conn.as_mut()
            && let Poll::Ready(result) = Pin::new(conn).poll(cx)
        {
            if let Err(e) = result {
                tracing::trace!("upstream connection ended: {e}");
            }
            // An upstream close seen between checkout and the first poll: hyper stops
            // reading and will never write the queued request. Dropping the driver
            // cancels it, so the request comes back unsent.
            self.conn = None;
            self.done = true;
        }
        !self.done
    }
}

/// Idle connections of one endpoint, most recently used on top (warm caches, and the
/// ones at the bottom age out first).
///
/// One stack per worker thread, made on first use: a request takes and returns
/// connections on its own thread's stack, so no lock or cache line is shared by every
/// core's requests. A thread whose stack is empty takes from another's before opening
/// a connection, so a connection idle anywhere is still reused. An endpoint nobody has
/// sent to holds no stacks at all (10,000 idle services stay small).
#[derive(Debug, Default)]
pub struct IdleConns {
    shards: std::sync::OnceLock<Box<[Shard]>>,
}

/// One thread's stack, on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    // Boxed on purpose: connections move between this stack and response bodies, and a
    // box moves as one pointer instead of several hundred bytes.
    #[allow(clippy::vec_box)]
    stack: Mutex<Vec<Box<PooledConn>>>,
}

impl Shard {
    #[allow(clippy::vec_box)] // see `stack`
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<PooledConn>>> {
        self.stack.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many stacks an endpoint keeps: one per CPU the process may use.
fn shard_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(64)))
}

/// This thread's stack number, given out round-robin as threads first ask.
fn shard_index() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % shard_count();
    }
    INDEX.with(|i| *i)
}

impl IdleConns {
    fn shards(&self) -> &[Shard] {
        self.shards
            .get_or_init(|| (0..shard_count()).map(|_| Shard::default()).collect())
    }

    /// The most recently idled connection: this thread's own first, then another's.
    fn pop(&self) -> Option<Box<PooledConn>> {
        let shards = self.shards.get()?;
        let own = shard_index();
        if let Some(c) = shards[own].lock().pop() {
            return Some(c);
        }
        (1..shards.len()).find_map(|k| shards[(own + k) % shards.len()].lock().pop())
    }

    /// Keep `conn` on this thread's stack, within an equal part of the endpoint's
    /// `max` idle connections.
    fn push(&self, conn: Box<PooledConn>, max: usize) {
        let shards = self.shards();
        let per_shard = max.div_ceil(shards.len());
        let mut stack = shards[shard_index()].lock();
        if stack.len() < per_shard {
            stack.push(conn);
        }
    }

    /// Close connections idle for longer than `timeout`.
    pub fn evict(&self, timeout: Duration) {
        let Some(shards) = self.shards.get() else {
            return;
        };
        let now = Instant::now();
        for shard in shards.iter() {
            shard.lock().retain(|c| {
                c.idle_since
                    .is_some_and(|t| now.duration_since(t) < timeout)
            });
        }
    }
}

/// Why a request got no response head.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No TCP connection could be made. The request never left: it comes back, for a
    /// retry on another endpoint.
    Connect(io::Error, Box<Request<RequestBody>>),
    /// The TCP connect did not finish within `connect_timeout`; the request comes back.
    ConnectTimeout(Box<Request<RequestBody>>),
    /// The connection failed while the request or response head was in flight.
    Http(hyper::Error),
}

impl SendError {
    /// The request, when it never reached the endpoint.
    pub(crate) fn into_request(self) -> Option<Request<RequestBody>> {
        match self {
            SendError::Connect(_, req) | SendError::ConnectTimeout(req) => Some(*req),
            SendError::Http(_) => None,
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e, _) => write!(f, "connect: {e}"),
            SendError::ConnectTimeout(_) => f.write_str("connect timed out"),
            SendError::Http(e) => write!(f, "{e}"),
        }
    }
}

/// Settings shared by every upstream connection.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamClient {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    http: http1::Builder,
}

/// Open a connection to an endpoint: TCP, then the TLS handshake when its pool uses TLS
/// (verifying the configured server name, or the endpoint's host). Shared by requests
/// and health checks.
pub(crate) async fn open(endpoint: &EndpointState) -> io::Result<Stream> {
    let authority = endpoint.authority();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let tcp = TcpStream::connect((host, port)).await?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = endpoint.tls() else {
        return Ok(Stream::Plain(tcp));
    };
    let tls = tls.map_err(io::Error::other)?;
    let name = match &tls.server_name {
        Some(n) => n.clone(),
        None => rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
    };
    let stream = tls.connector.connect(name, tcp).await?;
    Ok(Stream::Tls(Box::new(stream)))
}

/// Why a connect failed (the caller still holds the request).
enum Failed {
    Connect(io::Error),
    Timeout,
    Http(hyper::Error),
}

/// A copy of a bodyless request's head, sendable again.
fn head_of(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(Either::Right(Full::new(Bytes::new())));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The connection closed (or was reset) before any response byte.
fn closed_unanswered(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    e.is_incomplete_message()
        || e.is_canceled()
        || e.is_closed()
        || e.source()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                )
            })
}

/// What an upstream connection's read (and write) buffer may grow to, and so the
/// largest response head weir accepts from an upstream.
const UPSTREAM_BUF_BYTES: usize = 16 * 1024;

/// The window of each HTTP/2 stream to an upstream.
const UPSTREAM_H2_STREAM_WINDOW: u32 = 256 * 1024;

/// How often a request may find a pooled connection closing under it before weir
/// stops trying pooled ones and opens a fresh connection.
const STALE_RETRIES: usize = 4;

/// Methods whose request can be sent twice with the effect of once (RFC 9110 §9.2.2).
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A response head and the connection its body arrives on.
#[derive(Debug)]
pub(crate) struct Sent {
    pub response: Response<Incoming>,
    pub conn: Box<PooledConn>,
    /// The request was sent again on a fresh connection after a keep-alive race.
    pub replayed: bool,
}

impl UpstreamClient {
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle: usize) -> Self {
        UpstreamClient {
            connect_timeout,
            idle_timeout,
            max_idle,
            http: {
                let mut b = http1::Builder::new();
                // One flat buffer and one send() per message: measured cheaper in the
                // kernel than writev with separate head and body slices.
                b.writev(false);
                // hyper's read buffer grows to ~400 KB while a body arrives faster than
                // the client takes it, and stays that size: per slow reader, with the
                // body parked in it. Bounded, as HAProxy's 16 KiB buffers are; this also
                // caps an upstream's response head (a larger one is a 502).
                b.max_buf_size(UPSTREAM_BUF_BYTES);
                b
            },
        }
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Send `req` to `endpoint` and wait for the response head. The connection comes
    /// back with the response, to be driven by the body and returned with [`release`].
    /// A replay after a keep-alive race is paid for from `budget`.
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    pub(crate) fn send(
        &self,
        endpoint: &EndpointState,
        mut req: Request<RequestBody>,
        budget: &RetryBudget,
    ) -> impl Future<Output = Result<Sent, SendError>> {
        // Not an `async fn`: its arguments would be kept twice in the future (as
        // arguments and as moved locals), and this future is built per request.
        async move {
            let mut stale = 0;
            let mut replayed = false;
            loop {
                let fresh_only = stale >= STALE_RETRIES;
                let mut conn = match self.checkout(endpoint, fresh_only).await {
                    Some(c) => c,
                    // Boxed: a connect (TCP, TLS handshake, HTTP handshake) is the rare
                    // case under keep-alive, and its future is kilobytes that would
                    // otherwise size every request's future.
                    None => match Box::pin(self.connect(endpoint)).await {
                        Ok(c) => c,
                        Err(Failed::Connect(e)) => {
                            return Err(SendError::Connect(e, Box::new(req)));
                        }
                        Err(Failed::Timeout) => {
                            return Err(SendError::ConnectTimeout(Box::new(req)));
                        }
                        Err(Failed::Http(e)) => return Err(SendError::Http(e)),
                    },
                };
                let reused = conn.idle_since.is_some();
                // Any reused connection may be closing under us (an upstream's keep-alive
                // timer, `Connection: close` under load — at any age, so no age threshold):
                // keep what it takes to send an idempotent bodyless request again, so that
                // race never becomes a client-visible error. One replay per request.
                let replay =
                    (reused && !replayed && req.body().is_end_stream() && idempotent(req.method()))
                        .then(|| head_of(&req));
                let mut response = std::pin::pin!(conn.sender.try_send_request(req));
                let result = poll_fn(|cx| {
                    if let Poll::Ready(r) = response.as_mut().poll(cx) {
                        return Poll::Ready(r);
                    }
                    conn.poll_conn(cx);
                    // Polling the driver may have completed the response.
                    response.as_mut().poll(cx)
                })
                .await;
                match result {
                    Ok(response) => {
                        return Ok(Sent {
                            response,
                            conn,
                            replayed,
                        });
                    }
                    Err(mut e) => match (e.take_message(), replay) {
                        // Refused before a byte was written: the connection was closing.
                        (Some(back), _) if reused => {
                            stale += 1;
                            req = back;
                        }
                        // Written, then the connection closed with no answer: a reused
                        // connection the upstream was closing. Send the copy on a new one,
                        // if the pool's retry budget allows.
                        (None, Some(copy)) if closed_unanswered(e.error()) && budget.withdraw() => {
                            stale = STALE_RETRIES;
                            replayed = true;
                            req = copy;
                        }
                        _ => return Err(SendError::Http(e.into_error())),
                    },
                }
            }
        }
    }

    /// A pooled connection that is still open and ready, if any.
    async fn checkout(
        &self,
        endpoint: &EndpointState,
        fresh_only: bool,
    ) -> Option<Box<PooledConn>> {
        if fresh_only {
            return None;
        }
        while let Some(mut conn) = endpoint.idle().pop() {
            if conn
                .idle_since
                .is_none_or(|t| t.elapsed() >= self.idle_timeout)
            {
                continue;
            }
            let ready = poll_fn(|cx| {
                let alive = conn.poll_conn(cx);
                Poll::Ready(alive && matches!(conn.sender.poll_ready(cx), Poll::Ready(Ok(()))))
            })
            .await;
            if ready {
                return Some(conn);
            }
        }
        None
    }

    /// TCP (and, for TLS pools, the TLS handshake) within `connect_timeout`.
    async fn connect_stream(&self, endpoint: &EndpointState) -> Result<Stream, Failed> {
        match tokio::time::timeout(self.connect_timeout, open(endpoint)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Err(Failed::Timeout),
            Ok(Err(e)) => Err(Failed::Connect(e)),
            Err(_) => Err(Failed::Timeout),
        }
    }

    async fn connect(&self, endpoint: &EndpointState) -> Result<Box<PooledConn>, Failed> {
        let stream = self.connect_stream(endpoint).await?;
        let (sender, conn) = self
            .http
            .handshake(TokioIo::new(stream))
            .await
            .map_err(Failed::Http)?;
        // Boxed once per connection: it moves between the idle stack and response
        // bodies on every request, and is several hundred bytes inline.
        Ok(Box::new(PooledConn {
            sender,
            conn: Some(conn),
            done: false,
            idle_since: None,
        }))
    }

    /// Send an upgrade request (WebSocket) on a dedicated connection: never pooled,
    /// driven by its own task so the upgraded stream outlives the request.
    pub(crate) async fn send_upgrade(
        &self,
        endpoint: &EndpointState,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let stream = match self.connect_stream(endpoint).await {
            Ok(s) => s,
            Err(Failed::Connect(e)) => return Err(SendError::Connect(e, Box::new(req))),
            Err(Failed::Timeout) => return Err(SendError::ConnectTimeout(Box::new(req))),
            Err(Failed::Http(e)) => return Err(SendError::Http(e)),
        };
        let (mut sender, conn) = self
            .http
            .handshake::<_, RequestBody>(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upgrade connection ended: {e}");
            }
        });
        sender.send_request(req).await.map_err(SendError::Http)
    }

    /// Send over the endpoint's multiplexed HTTP/2 connection (h2c), opening it when
    /// there is none or it closed. The request needs an absolute URI: its authority
    /// becomes `:authority`.
    pub(crate) async fn send_h2(
        &self,
        endpoint: &EndpointState,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let existing = endpoint.h2().as_ref().filter(|s| !s.is_closed()).cloned();
        let mut sender = match existing {
            Some(s) => s,
            // Boxed, as in `send`: the rare connect would size every request's future.
            None => match Box::pin(self.connect_h2(endpoint)).await {
                Ok(s) => s,
                Err(Failed::Connect(e)) => return Err(SendError::Connect(e, Box::new(req))),
                Err(Failed::Timeout) => return Err(SendError::ConnectTimeout(Box::new(req))),
                Err(Failed::Http(e)) => return Err(SendError::Http(e)),
            },
        };
        sender.ready().await.map_err(SendError::Http)?;
        sender.send_request(req).await.map_err(SendError::Http)
    }

    /// Open the endpoint's HTTP/2 connection, drive it on its own task, and keep its
    /// handle for the requests that follow.
    async fn connect_h2(
        &self,
        endpoint: &EndpointState,
    ) -> Result<http2::SendRequest<RequestBody>, Failed> {
        let stream = self.connect_stream(endpoint).await?;
        // A response stream's window is what the upstream may send ahead of a slow
        // client: hyper's default of 2 MiB per stream would also let three slow readers
        // fill the shared 5 MiB connection window.
        let (sender, conn) = http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(UPSTREAM_H2_STREAM_WINDOW)
            .handshake::<_, RequestBody>(TokioIo::new(stream))
            .await
            .map_err(Failed::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("h2 upstream connection ended: {e}");
            }
        });
        *endpoint.h2() = Some(sender.clone());
        Ok(sender)
    }

    /// Idle connections kept per endpoint.
    pub(crate) fn max_idle(&self) -> usize {
        self.max_idle
    }
}

/// Return a connection whose response is complete to its endpoint's idle stack.
pub(crate) fn release(endpoint: &EndpointState, mut conn: Box<PooledConn>, max_idle: usize) {
    if conn.done || conn.sender.is_closed() {
        return;
    }
    conn.idle_since = Some(Instant::now());
    endpoint.idle().push(conn, max_idle);
}

/// Drives a connection while its response body streams.
pub(crate) fn drive(conn: &mut PooledConn, cx: &mut Context<'_>) {
    conn.poll_conn(cx);
}
