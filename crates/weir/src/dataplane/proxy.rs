//! The data plane: accept connections, route each request to a pool and endpoint, forward
//! it with streaming bodies over pooled keep-alive connections, map failures to 502/503/504
//! and emit one `Outcome` per request.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::{ProxyConfig, UpstreamProtocol};
use crate::dataplane::body::{
    BodyWatch, Exchange, GRPC_STATUS, GrpcState, ProxyBody, TimedBody, UpstreamBody,
};
use crate::dataplane::client::{PooledConn, SendError, UpstreamClient};
use crate::dataplane::outcome::emit;
use crate::dataplane::outcome::{Outcome, OutcomeSink};
use crate::dataplane::pace::{
    GatedIo, H2_CONNECTION_WINDOW, H2_SEND_BUF_BYTES, H2_STREAM_WINDOW, Paced, WriteGate,
};
use crate::dataplane::pool::{InflightGuard, Pool};
use crate::dataplane::routing::Router;
use crate::model::{ErrorKind, GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE, parse_grpc_status};
use crate::telemetry::access::{AccessLog, Entry, RequestMeta};

/// Who a request came from, and whether over TLS.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub addr: SocketAddr,
    pub secure: bool,
    /// The client's IP as an X-Forwarded-For value: made once per connection, not
    /// formatted again for every request.
    pub forwarded_for: HeaderValue,
}

impl Peer {
    fn new(addr: SocketAddr, secure: bool) -> Peer {
        let forwarded_for = HeaderValue::from_maybe_shared(Bytes::from(addr.ip().to_string()))
            .expect("an IP address is a valid header value");
        Peer {
            addr,
            secure,
            forwarded_for,
        }
    }
}

/// The proxy's shared state: router, upstream client, settings and outcome sinks.
pub(crate) struct Proxy {
    router: Arc<Router>,
    client: UpstreamClient,
    request_timeout: Duration,
    upstream_body_timeout: Duration,
    // Shared with every response body in flight: outcomes are recorded when bodies end.
    sinks: Arc<[Arc<dyn OutcomeSink>]>,
    /// Asked once per request whether to keep the request's head for the access log.
    access: Arc<AccessLog>,
    limits: Limits,
    /// Set to `true` at the end of the shutdown grace: every open tunnel closes. Each
    /// tunnel holds a receiver, so the sender also tells when none is left.
    close_tunnels: tokio::sync::watch::Sender<bool>,
}

/// What a request's client connection lends to a tunnel opened from it: the
/// connection-limit permit, so an upgraded connection keeps counting against
/// `max_connections` after hyper has handed its socket over.
type ConnSlot = Arc<tokio::sync::OwnedSemaphorePermit>;

/// Protections against slow and abusive clients.
#[derive(Debug, Clone)]
struct Limits {
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub(crate) fn new(
        config: &ProxyConfig,
        router: Arc<Router>,
        sinks: Vec<Arc<dyn OutcomeSink>>,
        access: Arc<AccessLog>,
    ) -> Proxy {
        let client = UpstreamClient::new(
            config.connect_timeout,
            config.pool_idle_timeout,
            config.pool_max_idle_per_endpoint,
        );
        Proxy {
            router,
            client,
            request_timeout: config.request_timeout,
            upstream_body_timeout: config.upstream_body_timeout,
            sinks: sinks.into(),
            access,
            close_tunnels: tokio::sync::watch::channel(false).0,
            limits: Limits {
                header_read_timeout: config.header_read_timeout,
                body_read_timeout: config.body_read_timeout,
                max_header_bytes: config.max_header_bytes,
                max_connections: config.max_connections,
            },
        }
    }

    /// Serve HTTP/1.1 on `listener` until `shutdown` resolves, then stop accepting and
    /// let open requests finish for up to `grace`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> io::Result<()> {
        let sweeper = tokio::spawn(sweep_idle(
            Arc::clone(&self.router),
            self.client.idle_timeout(),
        ));
        let graceful = GracefulShutdown::new();
        // HTTP/1.1, and HTTP/2 (h2c with prior knowledge, or h2 by ALPN over TLS), on
        // the same listeners.
        let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // Without the timer hyper silently ignores the header read timeout.
        // Flat writes: head and small bodies go out in one send(), which the load
        // comparison measured ~6% cheaper per request than writev of two slices.
        // A head larger than the buffer is answered 431 by hyper.
        http.http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .writev(false)
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(self.limits.max_header_bytes.max(8192));
        // Explicit HTTP/2 limits: bounded streams and headers, and hyper's defences
        // against rapid-reset floods. Buffering is bounded too: what a client may send
        // ahead of weir reading it (the windows; hyper's default lets one stream take the
        // whole 1 MiB), and what one stream's response may queue for a client that reads
        // slowly (hyper's default is 400 KiB per stream).
        http.http2()
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_SEND_BUF_BYTES)
            .max_concurrent_streams(256)
            .max_header_list_size(self.limits.max_header_bytes as u32)
            .max_pending_accept_reset_streams(64)
            .max_local_error_reset_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let http = Arc::new(http);
        let (tls_listener, acceptor) = match tls {
            Some((l, config)) => (Some(l), Some(tokio_rustls::TlsAcceptor::from(config))),
            None => (None, None),
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(self.limits.max_connections));
        let mut accept_warn = RateLimitedWarn::default();
        tokio::pin!(shutdown);
        loop {
            // At the connection limit, stop accepting: new clients wait in the listen
            // backlog instead of exhausting file descriptors.
            let permit = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let tls_accept = async {
                match &tls_listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            let (accepted, secure) = tokio::select! {
                a = listener.accept() => (a, false),
                a = tls_accept => (a, true),
                () = &mut shutdown => break,
            };
            let (stream, addr) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning,
                    // and say so at most once a second (a full fd table fails every
                    // accept, and a log line per failure would flood the disk).
                    accept_warn.warn(&e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let peer = Peer::new(addr, secure);
            // A reference per connection: each request clones this one, so the count it
            // bumps is the connection's own. Cloning the proxy's Arc per request would
            // write one cache line that every core's requests share.
            let proxy = Arc::new(Arc::clone(&self));
            // Shared with any tunnel the connection upgrades to: the slot is free only
            // when the connection and its tunnel are both gone.
            let permit: ConnSlot = Arc::new(permit);
            let slot = Arc::clone(&permit);
            // HTTP/1.1 responses wait while the client's socket is full (see `pace`).
            let gate = WriteGate::default();
            let io_gate = gate.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let proxy = Arc::clone(&proxy);
                let slot = Arc::clone(&slot);
                let peer = peer.clone();
                let gate = (req.version() < Version::HTTP_2).then(|| gate.clone());
                async move {
                    let resp = proxy.handle_in(req, peer, Some(slot)).await;
                    Ok::<_, Infallible>(resp.map(|body| Paced::new(body, gate)))
                }
            });
            let watcher = graceful.watcher();
            let http = Arc::clone(&http);
            let acceptor = if secure { acceptor.clone() } else { None };
            let handshake_timeout = self.limits.header_read_timeout;
            tokio::spawn(async move {
                // Upgrades (WebSocket) are proxied: connections must let them through.
                let result = match acceptor {
                    // One expression, no named locals: a local moved into `watch` would
                    // still be given its own space in this task, which lives as long as
                    // the connection (~1.7 KB more per idle connection).
                    None => {
                        watcher
                            .watch(
                                http.serve_connection_with_upgrades(
                                    TokioIo::new(GatedIo::new(stream, io_gate)),
                                    service,
                                )
                                .into_owned(),
                            )
                            .await
                    }
                    // Boxed: the TLS handshake and connection states are several KB,
                    // and inline they would size every plain connection's task too.
                    Some(acceptor) => {
                        Box::pin(async move {
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(tls)) => {
                                    let io = TokioIo::new(GatedIo::new(tls, io_gate));
                                    let conn = http.serve_connection_with_upgrades(io, service);
                                    watcher.watch(conn.into_owned()).await
                                }
                                Ok(Err(e)) => Err(format!("TLS handshake: {e}").into()),
                                Err(_) => Err("TLS handshake timed out".into()),
                            }
                        })
                        .await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!("client connection {addr}: {e}");
                }
                drop(permit);
            });
        }
        drop(listener);
        drop(tls_listener);
        sweeper.abort();
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout_at(deadline, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace of {grace:?} elapsed with requests still open");
        }
        // hyper no longer tracks an upgraded connection: tunnels get what is left of the
        // grace to end on their own, then are closed.
        if tokio::time::timeout_at(deadline, self.close_tunnels.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                "shutdown grace of {grace:?} elapsed: closing {} open tunnels",
                self.close_tunnels.receiver_count()
            );
        }
        self.close_tunnels.send_replace(true);
        Ok(())
    }

    /// Proxy one request arriving on a client connection holding `slot` (lent to a
    /// tunnel, if the request opens one).
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    fn handle_in(
        &self,
        mut req: Request<Incoming>,
        peer: Peer,
        slot: Option<ConnSlot>,
    ) -> impl Future<Output = Response<ProxyBody>> {
        // Not an `async fn`: its arguments would be kept twice in the future (as
        // arguments and as moved locals), and this future is built per request.
        async move {
            let start = Instant::now();
            // The one access-log branch a request pays for while the log is off.
            let request = self
                .access
                .enabled()
                .then(|| Arc::new(RequestMeta::new(&req, peer.addr, peer.secure)));
            // Refused before any pool is chosen: a malformed request is nobody's upstream
            // failure. Counted with the unrouted requests.
            let host = match check_request(&mut req) {
                Ok(host) => host,
                Err(resp) => {
                    for sink in self.sinks.iter() {
                        sink.unrouted();
                    }
                    self.log_unrouted(request, resp.status(), start);
                    return resp;
                }
            };
            let upgrade = requested_upgrade(&mut req);
            let (guard, set_cookie) = {
                let table = self.router.table();
                // Routing reads the very value the upstream will get as Host.
                let Some(service) = table.route(host.as_ref().and_then(|h| h.to_str().ok())) else {
                    for sink in self.sinks.iter() {
                        sink.unrouted();
                    }
                    self.log_unrouted(request, StatusCode::NOT_FOUND, start);
                    return local_response(StatusCode::NOT_FOUND, "no service for this host\n");
                };
                let snapshot = service.snapshot();
                let chosen = service
                    .choice
                    .choose(&snapshot, req.headers(), peer.addr.ip());
                // The endpoint is claimed while the snapshot still lends the pool: the
                // guard's clone of `Arc<Pool>` is the only one this request makes (see
                // `Abandoned`).
                match chosen.slot.pool.pick() {
                    Some(guard) => (guard, chosen.set_cookie),
                    None => {
                        let call = Call::new(start, &req, request);
                        let pool = &chosen.slot.pool;
                        let mut resp = self.fail(pool, None, ErrorKind::NoEndpoint, call, None);
                        if let Some(cookie) = chosen.set_cookie {
                            resp.headers_mut().append(header::SET_COOKIE, cookie);
                        }
                        return resp;
                    }
                }
            };
            let call = Call::new(start, &req, request);
            // A client that gives up before the answer's head (an h2 reset, a gRPC deadline,
            // a closed connection) drops this future: the guard records that as its abort.
            let mut abandoned = Abandoned {
                sinks: &self.sinks,
                guard: Some(guard),
                call: call.clone(),
                armed: true,
            };
            let h1_pool = abandoned.pool().protocol == UpstreamProtocol::Http1;
            let mut resp = match upgrade {
                // Upgrades are HTTP/1.1; an HTTP/2 pool gets the request without them (the
                // Upgrade headers are hop-by-hop) and answers it as an ordinary request.
                // Boxed: the upgrade's future (a dedicated connect and handshake) is large
                // and rare, and would otherwise size every request's future, which hyper
                // moves into place per request (and per stream on HTTP/2).
                Some(protocols) if h1_pool => {
                    Box::pin(self.upgrade(req, protocols, &mut abandoned, &peer, call, slot)).await
                }
                _ => self.forward(req, &mut abandoned, &peer, call).await,
            };
            abandoned.disarm();
            if let Some(cookie) = set_cookie {
                resp.headers_mut().append(header::SET_COOKIE, cookie);
            }
            resp
        }
    }

    /// Send a request to the endpoint `attempt` holds; every failure becomes a response.
    /// The guard and its pool are borrowed from `attempt`, never cloned (see
    /// [`Abandoned`]); a response body takes the guard.
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    fn forward(
        &self,
        req: Request<Incoming>,
        attempt: &mut Abandoned<'_>,
        peer: &Peer,
        call: Call,
    ) -> impl Future<Output = Response<ProxyBody>> {
        // Not an `async fn`: its arguments would be kept twice in the future (as
        // arguments and as moved locals), and this future is built per request.
        async move {
            let pool = attempt.pool();
            pool.retry_budget().deposit();
            let body_timeout = self.limits.body_read_timeout;
            let h2 = matches!(pool.protocol, UpstreamProtocol::H2c | UpstreamProtocol::H2);
            // gRPC needs `te: trailers` end to end; on HTTP/1.1 it is hop-by-hop.
            let wants_trailers = h2 && te_trailers(req.headers());
            // Only a request with a body can fail on the client's side.
            let watch = (!req.body().is_end_stream()).then(BodyWatch::default);
            let mut upstream_req = match upstream_request(req, attempt.guard(), peer) {
                Ok(r) => {
                    r.map(|b| Either::Left(TimedBody::new(b, body_timeout).watched(watch.clone())))
                }
                Err(resp) => return resp,
            };
            if h2 {
                let scheme = if pool.protocol == UpstreamProtocol::H2 {
                    http::uri::Scheme::HTTPS
                } else {
                    http::uri::Scheme::HTTP
                };
                upstream_req = for_h2(upstream_req, scheme, wants_trailers);
            } else if watch.is_some()
                && !upstream_req.headers().contains_key(header::CONTENT_LENGTH)
            {
                // A body of unknown length (chunked from the client, or HTTP/2 DATA with no
                // content-length) goes upstream chunked. hyper's client would pick that
                // itself except for GET, HEAD and CONNECT, which it sends with no body at
                // all unless told: the body would vanish while the client got an answer.
                upstream_req.headers_mut().insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            let deadline = tokio::time::Instant::from_std(call.start) + self.request_timeout;
            // The first attempt's failure, when it was retried.
            let mut retried = None;
            loop {
                // Borrowed afresh each time round: a retry replaces the guard.
                let guard = attempt.guard();
                let pool = guard.pool();
                let send = async {
                    if h2 {
                        self.client
                            .send_h2(guard.endpoint(), upstream_req)
                            .await
                            .map(|r| (r, None, false))
                    } else {
                        self.client
                            .send(guard.endpoint(), upstream_req, pool.retry_budget())
                            .await
                            .map(|s| (s.response, Some(s.conn), s.replayed))
                    }
                };
                let sent = tokio::time::timeout_at(deadline, send).await;
                // Whatever the upstream leg reports, a request whose body the client broke
                // (aborted, malformed, stalled) is the client's fault, not the pool's.
                let client_fault = || watch.as_ref().and_then(BodyWatch::fault);
                match sent {
                    Ok(Ok((resp, conn, replayed))) => {
                        if replayed {
                            pool.metrics().replayed();
                        }
                        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                            // The request asked for no upgrade (an h2c one is never passed
                            // on): a switch now would turn the client's connection into a
                            // tunnel nobody asked for. The upstream connection is dropped
                            // with the response.
                            return self.fail(
                                pool,
                                Some(guard.index()),
                                ErrorKind::Protocol,
                                call,
                                retried,
                            );
                        }
                        return self.relay(resp, conn, attempt.answered(), call, retried, watch);
                    }
                    Ok(Err(_)) | Err(_) if client_fault().is_some() => {
                        let kind = client_fault().unwrap_or(ErrorKind::ClientAbort);
                        return self.fail(pool, Some(guard.index()), kind, call, retried);
                    }
                    Ok(Err(e)) => {
                        let (kind, status) = classify(&e);
                        tracing::debug!(
                            "{} → {} failed: {e}",
                            pool.name,
                            guard.endpoint().endpoint
                        );
                        // A connect failure never sent anything: one retry on another
                        // endpoint of the same pool (never another pool: the split stays
                        // honest), within the pool's retry budget.
                        if retried.is_none()
                            && matches!(e, SendError::Connect(..) | SendError::ConnectTimeout(_))
                            && let Some(next) = pool.pick_except(guard.index())
                            && pool.retry_budget().withdraw()
                            && let Some(req) = e.into_request()
                        {
                            retried = Some((guard.index(), kind));
                            attempt.guard = Some(next);
                            upstream_req = req;
                            continue;
                        }
                        return self.fail_with(
                            pool,
                            Some(guard.index()),
                            kind,
                            status,
                            call,
                            retried,
                        );
                    }
                    Err(_elapsed) => {
                        return self.fail(
                            pool,
                            Some(guard.index()),
                            ErrorKind::Timeout,
                            call,
                            retried,
                        );
                    }
                }
            }
        }
    }

    /// Proxy an upgrade (WebSocket and the like): the pool is the usual split's, the
    /// upstream gets HTTP/1.1 with Connection/Upgrade kept for this request only (the
    /// `protocols` asked for, h2c removed), and nothing flows until the upstream's 101
    /// naming one of them; then bytes are copied both ways until either side closes, the
    /// tunnel idles past `upstream_body_timeout`, or the shutdown grace ends. The outcome
    /// is the 101 (or the refusal): a tunnel's life is not a latency, and its end is not
    /// an answer to anything.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        protocols: HeaderValue,
        attempt: &mut Abandoned<'_>,
        peer: &Peer,
        call: Call,
        slot: Option<ConnSlot>,
    ) -> Response<ProxyBody> {
        let guard = attempt.guard();
        let pool = guard.pool();
        let client_side = hyper::upgrade::on(&mut req);
        let body_timeout = self.limits.body_read_timeout;
        let mut upstream_req = match upstream_request(req, guard, peer) {
            Ok(r) => r.map(|b| Either::Left(TimedBody::new(b, body_timeout))),
            Err(resp) => return resp,
        };
        let h = upstream_req.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, protocols.clone());
        let sent = tokio::time::timeout(
            self.request_timeout,
            self.client.send_upgrade(guard.endpoint(), upstream_req),
        )
        .await;
        let mut resp = match sent {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let (kind, status) = classify(&e);
                return self.fail_with(pool, Some(guard.index()), kind, status, call, None);
            }
            Err(_) => {
                return self.fail(pool, Some(guard.index()), ErrorKind::Timeout, call, None);
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The upstream declined: an ordinary response.
            return self.relay(resp, None, attempt.answered(), call, None, None);
        }
        if !switched_to_requested(resp.headers(), &protocols) {
            // A switch to something the client never asked for (or to nothing named):
            // the client could not speak it. The upstream's half-switched connection
            // closes as the response is dropped; the upstream broke the protocol.
            tracing::debug!(
                "{} → {}: 101 to an upgrade the client did not ask for",
                pool.name,
                guard.endpoint().endpoint
            );
            return self.fail(pool, Some(guard.index()), ErrorKind::Protocol, call, None);
        }
        let latency = call.start.elapsed();
        self.emit(&Outcome {
            pool,
            endpoint: Some(guard.index()),
            status: 101,
            grpc: None,
            error: None,
            latency,
            duration: latency,
            retried: None,
            request: call.request.as_ref(),
            bytes_sent: None,
        });
        let upstream_side = hyper::upgrade::on(&mut resp);
        let idle = self.upstream_body_timeout;
        let close = self.close_tunnels.subscribe();
        let open = OpenTunnel::new(pool.metrics().tunnels().clone());
        let guard = attempt.answered();
        tokio::spawn(async move {
            match (client_side.await, upstream_side.await) {
                (Ok(client), Ok(upstream)) => {
                    let (c, u) = (TokioIo::new(client), TokioIo::new(upstream));
                    if let Err(e) = tunnel(c, u, idle, close).await {
                        tracing::debug!("tunnel ended: {e}");
                    }
                }
                (Err(e), _) | (_, Err(e)) => tracing::debug!("upgrade failed: {e}"),
            }
            // The tunnel counts as in flight on its endpoint, open in the pool's gauge,
            // and against the connection limit until it closes.
            drop(open);
            drop(guard);
            drop(slot);
        });
        // 101 with the upstream's headers (Connection and Upgrade included: they are
        // what the switch means).
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, ProxyBody::Local(Full::new(Bytes::new())))
    }

    /// Pass an upstream response on: hop-by-hop headers out, the body streamed (driving
    /// its pooled connection, if any, to the end). The outcome is recorded when the body
    /// ends, breaks or is abandoned.
    fn relay(
        &self,
        mut resp: Response<Incoming>,
        conn: Option<Box<PooledConn>>,
        guard: InflightGuard,
        call: Call,
        retried: Option<(usize, ErrorKind)>,
        client_body: Option<BodyWatch>,
    ) -> Response<ProxyBody> {
        strip_hop_by_hop(resp.headers_mut());
        let status = resp.status().as_u16();
        // Judged as gRPC only when it is gRPC both ways: asked for by the client, and
        // answered as gRPC by an HTTP/2 pool. A client cannot turn a plain answer into
        // a gRPC failure by sending a gRPC content type.
        let grpc_answer = call.grpc
            && matches!(
                guard.pool().protocol,
                UpstreamProtocol::H2c | UpstreamProtocol::H2
            )
            && is_grpc(resp.headers());
        let grpc = grpc_answer.then(|| {
            // A trailers-only answer carries its status in the head.
            resp.headers()
                .get(&GRPC_STATUS)
                .map_or(GrpcState::Pending, |v| {
                    GrpcState::Done(parse_grpc_status(v.as_bytes()))
                })
        });
        let exchange = Exchange {
            sinks: Arc::clone(&self.sinks),
            start: call.start,
            latency: call.start.elapsed(),
            status,
            grpc,
            retried,
            client_body,
            request: call.request,
            sent: 0,
            done: false,
        };
        let max_idle = self.client.max_idle();
        let body_timeout = self.upstream_body_timeout;
        resp.map(|body| {
            ProxyBody::Upstream(Box::new(UpstreamBody {
                body: TimedBody::new(body, body_timeout),
                conn,
                guard,
                max_idle,
                exchange,
            }))
        })
    }

    /// weir answers a failure itself: the status its kind calls for.
    fn fail(
        &self,
        pool: &Arc<Pool>,
        endpoint: Option<usize>,
        kind: ErrorKind,
        call: Call,
        retried: Option<(usize, ErrorKind)>,
    ) -> Response<ProxyBody> {
        let status = match kind {
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::BadRequestBody | ErrorKind::ClientAbort => StatusCode::BAD_REQUEST,
            ErrorKind::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        self.fail_with(pool, endpoint, kind, status, call, retried)
    }

    /// weir answers a failure itself with `status` — or, to a gRPC call, with the gRPC
    /// status a client library expects (trailers-only, HTTP 200).
    fn fail_with(
        &self,
        pool: &Arc<Pool>,
        endpoint: Option<usize>,
        kind: ErrorKind,
        status: StatusCode,
        call: Call,
        retried: Option<(usize, ErrorKind)>,
    ) -> Response<ProxyBody> {
        let latency = call.start.elapsed();
        let grpc = call.grpc.then(|| grpc_failure_code(kind));
        self.emit(&Outcome {
            pool,
            endpoint,
            status: match (kind.client_status(), grpc) {
                (Some(s), _) => s,
                (None, Some(_)) => 200,
                (None, None) => status.as_u16(),
            },
            grpc,
            error: Some(kind),
            latency,
            duration: latency,
            retried,
            request: call.request.as_ref(),
            bytes_sent: None,
        });
        match grpc {
            Some(code) => grpc_response(code, error_body(kind, status)),
            None => local_response(status, error_body(kind, status)),
        }
    }

    fn emit(&self, outcome: &Outcome<'_>) {
        emit(&self.sinks, outcome);
    }

    /// A request answered before any service was chosen, into the access log (when it
    /// kept the request's head); always logged, like every failure.
    fn log_unrouted(&self, request: Option<Arc<RequestMeta>>, status: StatusCode, start: Instant) {
        let Some(request) = request else { return };
        if !self.access.wants(true) {
            return;
        }
        let elapsed = start.elapsed();
        self.access.write(Entry {
            time: crate::model::Clock::now(&crate::model::SystemClock),
            request: request.record(),
            service: None,
            pool: None,
            endpoint: None,
            status: status.as_u16(),
            grpc: None,
            error: None,
            retried: None,
            headers: elapsed,
            duration: elapsed,
            bytes_sent: None,
        });
    }
}

/// Records a request whose client went away before its answer's head as that client's
/// abort (499), unless disarmed once an answer exists (which records its own outcome).
///
/// It holds the request's in-flight guard until an answer (a response body, a tunnel)
/// takes it, and with the guard the request's one reference to its pool: the handler
/// borrows both from here rather than cloning the `Arc<Pool>`, because every clone and
/// drop writes the count in one cache line that all cores' requests share.
struct Abandoned<'a> {
    sinks: &'a Arc<[Arc<dyn OutcomeSink>]>,
    /// `None` only once an answer has taken it.
    guard: Option<InflightGuard>,
    call: Call,
    armed: bool,
}

impl Abandoned<'_> {
    /// The endpoint the request is counted on now.
    fn guard(&self) -> &InflightGuard {
        self.guard
            .as_ref()
            .expect("the guard is taken only by the answer")
    }

    fn pool(&self) -> &Arc<Pool> {
        self.guard().pool()
    }

    /// Hand the guard to the answer, which keeps the request in flight until it ends.
    /// Nothing may await between this and [`Abandoned::disarm`].
    fn answered(&mut self) -> InflightGuard {
        self.guard.take().expect("a request is answered only once")
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(guard) = &self.guard else { return };
        let latency = self.call.start.elapsed();
        emit(
            self.sinks,
            &Outcome {
                pool: guard.pool(),
                endpoint: None,
                status: 499,
                grpc: self.call.grpc.then_some(1), // CANCELLED
                error: Some(ErrorKind::ClientAbort),
                latency,
                duration: latency,
                retried: None,
                request: self.call.request.as_ref(),
                bytes_sent: None,
            },
        );
    }
}

/// What the handler knows about a request from its head.
#[derive(Debug, Clone)]
struct Call {
    start: Instant,
    /// A gRPC call (`content-type: application/grpc…`): its outcome is its gRPC status.
    grpc: bool,
    /// The head, for the access log (only while it is on).
    request: Option<Arc<RequestMeta>>,
}

impl Call {
    fn new<B>(start: Instant, req: &Request<B>, request: Option<Arc<RequestMeta>>) -> Call {
        Call {
            start,
            grpc: is_grpc(req.headers()),
            request,
        }
    }
}

static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// `application/grpc`, `application/grpc+proto`, `application/grpc;…` — not grpc-web,
/// whose status travels in the body.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .and_then(|v| v.get(..16).map(|head| (head, &v[16..])))
        .is_some_and(|(head, rest)| {
            head.eq_ignore_ascii_case(b"application/grpc")
                && matches!(rest.first(), None | Some(b'+' | b';'))
        })
}

/// The gRPC status for a failure weir answers itself: its own deadline is
/// DEADLINE_EXCEEDED; a client fault is CANCELLED (the call is over on the client's
/// side) or INTERNAL (a malformed body); everything else means "try again": UNAVAILABLE.
fn grpc_failure_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Timeout => GRPC_DEADLINE_EXCEEDED,
        ErrorKind::ClientAbort | ErrorKind::ClientTimeout => 1,
        ErrorKind::BadRequestBody => 13,
        _ => GRPC_UNAVAILABLE,
    }
}

/// A trailers-only gRPC answer: HTTP 200, the status and message in the head, no body.
fn grpc_response(code: u8, message: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(&GRPC_STATUS, HeaderValue::from(u16::from(code)));
    // grpc-message is percent-encoded; these fixed texts need only the newline dropped.
    h.insert(
        &GRPC_MESSAGE,
        HeaderValue::from_static(message.trim_end_matches('\n')),
    );
    resp
}

/// Close upstream connections that sat idle past the timeout, so sockets do not linger
/// on endpoints that stopped getting traffic (checkout also skips expired ones).
async fn sweep_idle(router: Arc<Router>, timeout: Duration) {
    let mut tick = tokio::time::interval((timeout / 2).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        // The table's flat pool list: no snapshot loads, and endpoints nobody has sent
        // to hold no idle stacks to look at.
        let table = router.table();
        for pool in table.pools() {
            for endpoint in pool.endpoints() {
                endpoint.idle().evict(timeout);
            }
        }
    }
}

/// The one-line text weir answers with when it could not get a response upstream. Says
/// what failed without naming addresses.
fn error_body(kind: ErrorKind, status: StatusCode) -> &'static str {
    match (kind, status) {
        (ErrorKind::Connect, StatusCode::GATEWAY_TIMEOUT) => "upstream connect timed out\n",
        (ErrorKind::Connect, _) => "upstream connection failed\n",
        (ErrorKind::Timeout, _) => "upstream did not answer in time\n",
        (ErrorKind::Reset, _) => "upstream closed the connection\n",
        (ErrorKind::Protocol, _) => "upstream sent an invalid response\n",
        (ErrorKind::NoEndpoint, _) => "no upstream endpoint available\n",
        (ErrorKind::BadRequestBody, _) => "invalid request body\n",
        (ErrorKind::ClientAbort, _) => "request body incomplete\n",
        (ErrorKind::ClientTimeout, _) => "request body timed out\n",
    }
}

/// The client asked for trailers (`te: trailers`, as gRPC does).
fn te_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Shape a request for an HTTP/2 upstream: the authority moves from Host into the URI
/// (hyper sends it as `:authority`) so the two never both go upstream, and
/// `te: trailers` is kept when the client asked for it.
fn for_h2(
    mut req: Request<crate::dataplane::body::RequestBody>,
    scheme: http::uri::Scheme,
    te_trailers: bool,
) -> Request<crate::dataplane::body::RequestBody> {
    *req.version_mut() = Version::HTTP_2;
    if let Some(host) = req.headers_mut().remove(header::HOST)
        && let Ok(authority) = http::uri::Authority::try_from(host.as_bytes())
    {
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    if te_trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    req
}

/// The protocols a request asks to switch to (`Connection: upgrade` and `Upgrade`, on
/// HTTP/1.1), h2c left out: weir speaks HTTP/2 to clients itself (prior knowledge or
/// ALPN), and an h2c upgrade passed on would hand the client's connection to the upstream
/// as an opaque tunnel, past routing and every limit. `HTTP2-Settings` goes with it. A
/// request that asked for h2c alone is an ordinary request.
fn requested_upgrade<B>(req: &mut Request<B>) -> Option<HeaderValue> {
    req.headers_mut().remove(&HTTP2_SETTINGS);
    let upgrade = req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && tokens(req.headers(), &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !upgrade {
        return None;
    }
    let wanted: Vec<&str> = tokens(req.headers(), &header::UPGRADE)
        .filter(|t| !t.eq_ignore_ascii_case("h2c"))
        .collect();
    if wanted.is_empty() {
        return None;
    }
    HeaderValue::from_str(&wanted.join(", ")).ok()
}

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The comma-separated tokens of every `name` header, trimmed, empty ones skipped.
fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A 101 switches to what was asked for: its `Upgrade` names at least one protocol and
/// only protocols the request offered (compared case-insensitively, RFC 9110 §7.8).
fn switched_to_requested(resp: &HeaderMap, requested: &HeaderValue) -> bool {
    let offered: Vec<&str> = requested
        .to_str()
        .map(|v| v.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let mut chosen = tokens(resp, &header::UPGRADE).peekable();
    chosen.peek().is_some() && chosen.all(|c| offered.iter().any(|o| o.eq_ignore_ascii_case(c)))
}

/// Counts a tunnel in its pool's `weir_tunnels_open` while it lives.
struct OpenTunnel(metrics::Gauge);

impl OpenTunnel {
    fn new(gauge: metrics::Gauge) -> OpenTunnel {
        gauge.increment(1.0);
        OpenTunnel(gauge)
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Copy bytes both ways until both sides have finished, either fails, nothing moves
/// either way for `idle`, or `close` turns true (the end of the shutdown grace). One
/// side's end of stream is passed on as a write shutdown, so half-closed protocols work.
async fn tunnel<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    mut close: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let (mut cbuf, mut ubuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut client_open, mut upstream_open) = (true, true);
    let closing = async move {
        loop {
            let closing = *close.borrow_and_update();
            if closing || close.changed().await.is_err() {
                // Closing, or the proxy is gone (and so is the need to wait).
                return;
            }
        }
    };
    tokio::pin!(closing);
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "tunnel idle");
    while client_open || upstream_open {
        tokio::select! {
            n = cr.read(&mut cbuf), if client_open => match n? {
                0 => {
                    client_open = false;
                    let _ = uw.shutdown().await;
                }
                n => tokio::time::timeout(idle, uw.write_all(&cbuf[..n]))
                    .await
                    .map_err(|_| timed_out())??,
            },
            n = ur.read(&mut ubuf), if upstream_open => match n? {
                0 => {
                    upstream_open = false;
                    let _ = cw.shutdown().await;
                }
                n => tokio::time::timeout(idle, cw.write_all(&ubuf[..n]))
                    .await
                    .map_err(|_| timed_out())??,
            },
            () = tokio::time::sleep(idle) => return Err(timed_out()),
            () = &mut closing => {
                return Err(io::Error::other("closed at the end of the shutdown grace"));
            }
        }
    }
    Ok(())
}

/// Turn a send failure into an outcome kind and status. A connect that timed out is a
/// 504 (as nginx does); every other failure before a response head is a 502.
fn classify(e: &SendError) -> (ErrorKind, StatusCode) {
    match e {
        SendError::ConnectTimeout(_) => (ErrorKind::Connect, StatusCode::GATEWAY_TIMEOUT),
        SendError::Connect(..) => (ErrorKind::Connect, StatusCode::BAD_GATEWAY),
        SendError::Http(h) if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() => {
            (ErrorKind::Protocol, StatusCode::BAD_GATEWAY)
        }
        SendError::Http(h) if h.is_timeout() => (ErrorKind::Timeout, StatusCode::GATEWAY_TIMEOUT),
        SendError::Http(_) => (ErrorKind::Reset, StatusCode::BAD_GATEWAY),
    }
}

/// Check a request head before it is routed and settle the one host it is for, which
/// is written back as its only Host header: routing and the upstream see the same value.
///
/// - An absolute-form target's authority, or HTTP/2's `:authority`, wins over any Host
///   header, which is replaced by it (RFC 9112 §3.2.2, RFC 9113 §8.3.1): a proxy that
///   routed by one and forwarded the other could be steered past its routing.
/// - Two Host headers, an invalid Host value, or no Host at all on HTTP/1.1 (and
///   HTTP/2 without `:authority`) in origin-form: 400 (RFC 9112 §3.2). HTTP/1.0 may
///   omit it (`None`: the default service, if any).
/// - Authority-form (`host:port`) is for CONNECT only: 400 otherwise. CONNECT itself is
///   405: weir is a reverse proxy, not a forward one. An absolute-form target must be
///   `http` or `https`.
/// - Header names that become a framing header once `_` reads as `-`
///   (`Transfer_Encoding`, `Content_Length`): 400. Some servers and CGI-style gateways
///   fold them together, so one message could be framed two ways.
#[allow(clippy::result_large_err)]
fn check_request<B>(req: &mut Request<B>) -> Result<Option<HeaderValue>, Response<ProxyBody>> {
    let bad = |why: &'static str| Err(local_response(StatusCode::BAD_REQUEST, why));
    if req.headers().keys().any(framing_lookalike) {
        return bad("invalid header name\n");
    }
    if req.method() == http::Method::CONNECT {
        let mut resp = local_response(StatusCode::METHOD_NOT_ALLOWED, "CONNECT not allowed\n");
        resp.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"),
        );
        return Err(resp);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return bad("more than one Host\n");
    }
    if host.as_ref().is_some_and(|h| !valid_host(h.as_bytes())) {
        return bad("invalid Host\n");
    }
    let uri = req.uri();
    let authority = match (uri.scheme(), uri.authority()) {
        (None, Some(_)) => return bad("authority-form target is for CONNECT only\n"),
        // `ftp://…` and the like: not a request for an HTTP origin.
        (Some(s), _) if *s != http::uri::Scheme::HTTP && *s != http::uri::Scheme::HTTPS => {
            return bad("request-target scheme must be http or https\n");
        }
        (_, Some(a)) if !valid_host(a.as_str().as_bytes()) => {
            return bad("invalid request-target authority\n");
        }
        (_, Some(a)) => HeaderValue::from_str(a.as_str()).ok(),
        (_, None) => None,
    };
    let from_target = authority.is_some();
    let host = match (authority, host) {
        (Some(a), _) => a,
        (None, Some(h)) => h,
        (None, None) if req.version() == Version::HTTP_10 || req.version() == Version::HTTP_09 => {
            return Ok(None);
        }
        (None, None) => return bad("missing Host\n"),
    };
    if from_target {
        // The target's authority wins over the Host header (RFC 9112 §3.2.2): the
        // upstream gets the value routing used.
        req.headers_mut().insert(header::HOST, host.clone());
    }
    Ok(Some(host))
}

/// `transfer_encoding`, `content_length` (names arrive lowercased): a framing header's
/// name with `_` for `-`.
fn framing_lookalike(name: &HeaderName) -> bool {
    let n = name.as_str().as_bytes();
    n.contains(&b'_')
        && ["transfer-encoding", "content-length"].iter().any(|f| {
            f.len() == n.len()
                && f.bytes()
                    .zip(n)
                    .all(|(f, &c)| f == c || (f == b'-' && c == b'_'))
        })
}

/// A Host value (RFC 9110 §7.2: `uri-host [ ":" port ]`), stricter than the URI
/// grammar where laxity only serves confusion: no userinfo, a registered name of
/// letters, digits and `-._~` only (no `,` — a folded list — no `%`, no spaces), an
/// IPv6 literal that parses, and a port of digits within 0..=65535 when the colon is
/// there. The `http` crate's `Authority` parse comes first, so nothing it would
/// misread gets through.
fn valid_host(value: &[u8]) -> bool {
    let Ok(authority) = http::uri::Authority::try_from(value) else {
        return false;
    };
    let s = authority.as_str();
    if s.contains('@') {
        return false;
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        if rest[..end].parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        (&s[..end + 2], &rest[end + 1..])
    } else {
        match s.find(':') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        }
    };
    let host_ok = !host.is_empty()
        && (host.starts_with('[')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')));
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(p) => {
            !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok()
        }
    };
    host_ok && port_ok
}

/// A warning for a failure that can repeat thousands of times a second: at most one
/// line a second, saying how many were left out since the last one.
#[derive(Debug, Default)]
struct RateLimitedWarn {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    fn warn(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        match std::mem::take(&mut self.suppressed) {
            0 => tracing::warn!("accept failed: {e}"),
            n => tracing::warn!("accept failed: {e} ({n} more failures since the last warning)"),
        }
        self.last = Some(now);
    }
}

/// Rewrite a client request for the chosen endpoint: absolute URI, HTTP/1.1, hop-by-hop
/// headers removed, X-Forwarded-* set.
#[allow(clippy::result_large_err)]
fn upstream_request(
    req: Request<Incoming>,
    guard: &InflightGuard,
    peer: &Peer,
) -> Result<Request<Incoming>, Response<ProxyBody>> {
    let (mut parts, body) = req.into_parts();
    // `check_request` left exactly one Host (the value routing used), or none on an
    // HTTP/1.0 request without one.
    let original_host = parts.headers.get(header::HOST).cloned();
    // Upstreams get origin-form (`/path?query`), whatever form the client used.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
    }
    parts.version = Version::HTTP_11;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    // HTTP/1.1 requires a Host: a client that sent none (HTTP/1.0) gets the endpoint's.
    if original_host.is_none() {
        match HeaderValue::from_str(guard.endpoint().authority().as_str()) {
            Ok(h) => {
                headers.insert(header::HOST, h);
            }
            Err(_) => {
                return Err(local_response(
                    StatusCode::BAD_REQUEST,
                    "bad request target\n",
                ));
            }
        }
    }
    append_forwarded_for(headers, &peer.forwarded_for);
    headers.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if peer.secure { "https" } else { "http" }),
    );
    if let Some(h) = original_host {
        headers.insert(&X_FORWARDED_HOST, h);
    }
    Ok(Request::from_parts(parts, body))
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Append the client address to X-Forwarded-For, folding repeated headers into one.
fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    let mut existing = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if existing.peek().is_none() {
        headers.insert(&X_FORWARDED_FOR, ip.clone());
        return;
    }
    let mut v = String::with_capacity(64);
    for h in existing {
        if let Ok(s) = h.to_str() {
            let s = s.trim();
            if !s.is_empty() {
                v.push_str(s);
                v.push_str(", ");
            }
        }
    }
    v.push_str(ip.to_str().unwrap_or_default());
    // The String's buffer becomes the value's: no second copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(v)) {
        headers.insert(&X_FORWARDED_FOR, v);
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// legacy ones proxies have always dropped.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Remove hop-by-hop headers, including every header the Connection header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry one of these at most (`connection`). One pass over the names
    // (standard names compare as integers) says which, so only those are removed: a
    // remove hashes, nine of them per message add up.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // HOP_BY_HOP[0] is `connection`: the headers it names go too.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !HOP_BY_HOP.contains(n))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

fn local_response(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-other"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn host_values_are_checked_strictly() {
        for good in [
            "a.example",
            "A.Example:8080",
            "a.example.",
            "[::1]",
            "[::1]:443",
            "10.0.0.1:80",
            "under_score",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "", "a, b", "a,b", "x@y", "u:p@h", "[::1", "[::1]x", "[zz]", "a b", "h:99999", "h:x",
            "h:", ":80", "h:1:2", "a%2eb", "a/b", "h:-1",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn only_framing_headers_spelled_with_underscores_are_lookalikes() {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).unwrap();
        assert!(framing_lookalike(&name("transfer_encoding")));
        assert!(framing_lookalike(&name("Content_Length")));
        assert!(!framing_lookalike(&name("content-length")));
        assert!(!framing_lookalike(&name("x_content_length")));
        assert!(!framing_lookalike(&name("x_custom")));
    }

    #[test]
    fn a_switch_must_name_what_was_asked_for() {
        let resp = |v: &'static str| {
            let mut h = HeaderMap::new();
            if !v.is_empty() {
                h.insert(header::UPGRADE, HeaderValue::from_static(v));
            }
            h
        };
        let asked = HeaderValue::from_static("websocket, foo/2");
        assert!(switched_to_requested(&resp("WebSocket"), &asked));
        assert!(switched_to_requested(&resp("FOO/2"), &asked));
        assert!(!switched_to_requested(&resp("h2c"), &asked));
        assert!(!switched_to_requested(&resp("websocket, h2c"), &asked));
        assert!(!switched_to_requested(&resp(""), &asked));
    }

    #[test]
    fn h2c_is_never_an_upgrade() {
        let req = |upgrade: &'static str| {
            Request::get("/")
                .header(header::CONNECTION, "Upgrade, HTTP2-Settings")
                .header(header::UPGRADE, upgrade)
                .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
                .body(())
                .unwrap()
        };
        let mut r = req("h2c");
        assert_eq!(requested_upgrade(&mut r), None);
        assert!(!r.headers().contains_key("http2-settings"));
        let mut r = req("H2C, websocket");
        assert_eq!(requested_upgrade(&mut r).unwrap(), "websocket");
    }

    #[test]
    fn accept_warnings_are_rate_limited() {
        let mut w = RateLimitedWarn::default();
        let e = io::Error::other("EMFILE");
        for _ in 0..100 {
            w.warn(&e);
        }
        // One line went out; the other 99 wait to be counted in the next one.
        assert_eq!(w.suppressed, 99);
        w.last = Some(Instant::now() - Duration::from_secs(2));
        w.warn(&e);
        assert_eq!(w.suppressed, 0);
    }

    #[test]
    fn forwarded_for_appends_and_folds() {
        let peer = Peer::new("10.1.2.3:5555".parse().unwrap(), false);
        let peer = &peer.forwarded_for;
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, peer);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
        let mut h = HeaderMap::new();
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("3.3.3.3"));
        append_forwarded_for(&mut h, peer);
        let all: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(all, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3"]);
    }
}
