//! Shared test harness: real upstreams and a real weir on 127.0.0.1 port 0, a keep-alive
//! client, and waiting on conditions with a deadline instead of sleeping.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use weir::Controller;
use weir::OutcomeSink;
use weir::Weir;
use weir::config::Config;
use weir_testkit::{self as upstream, UpstreamConfig, UpstreamHandle};

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A running weir; stopped (gracefully) when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: std::path::PathBuf,
    pub controller: Arc<Controller>,
    stop: Option<oneshot::Sender<()>>,
}

impl Proxy {
    /// Set a service's weights through the controller, as an operator would.
    pub fn set_weights(&self, service: &str, weights: &[(&str, u32)]) -> weir::Change {
        self.controller
            .apply(weir::Command::SetWeights {
                service: service.into(),
                weights: weights.iter().map(|(p, w)| (p.to_string(), *w)).collect(),
                if_version: None,
                source: weir::model::Source::Admin,
                actor: None,
                reason: None,
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// All of a service's traffic to its baseline, as an operator would.
    pub fn rollback(&self, service: &str) -> weir::Change {
        self.controller
            .apply(weir::Command::Rollback {
                service: service.into(),
                source: weir::model::Source::Admin,
                actor: None,
                reason: None,
                details: None,
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A service's document from the admin API.
    pub async fn service(&self, name: &str) -> serde_json::Value {
        get(
            &client(),
            self.admin,
            "localhost",
            &format!("/api/v1/services/{name}"),
        )
        .await
        .json()
    }

    /// Every event so far (up to 1000), oldest first.
    pub async fn events(&self) -> Vec<serde_json::Value> {
        get(
            &client(),
            self.admin,
            "localhost",
            "/api/v1/events?limit=1000",
        )
        .await
        .json()["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start(toml: &str) -> Proxy {
    start_with_sinks(toml, Vec::new()).await
}

pub async fn start_with_sinks(toml: &str, sinks: Vec<Arc<dyn OutcomeSink>>) -> Proxy {
    let mut config = Config::parse(toml, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    if !toml.contains("[state]") {
        config.state.dir = temp_dir("state");
    }
    start_config(config, None, sinks).await
}

/// Start weir from a parsed config (its state dir as given), on fresh loopback ports.
pub async fn start_config(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    sinks: Vec<Arc<dyn OutcomeSink>>,
) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let state_dir = config.state.dir.clone();
    let weir = Weir::with_sinks(config, config_path, sinks).unwrap_or_else(|e| panic!("{e}"));
    let controller = Arc::clone(weir.controller());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        weir.serve(listener, Some(admin_listener), shutdown)
            .await
            .unwrap();
    });
    Proxy {
        addr,
        admin,
        state_dir,
        controller,
        stop: Some(tx),
    }
}

/// A process (`weir run`, usually) killed when dropped.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free a moment ago, for a config file a child process binds.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "weir-test-{what}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The usual test service: `shop` with a `stable` and a `canary` pool, each on its
/// own built-in upstream.
pub struct Shop {
    pub proxy: Proxy,
    pub stable: UpstreamHandle,
    pub canary: UpstreamHandle,
}

/// Start `shop` with these hosts (`None`: the default service) and weights; `extra` is
/// appended to the config (e.g. a `[service.slo]` table).
pub async fn shop(hosts: Option<&[&str]>, weights: (u32, u32), extra: &str) -> Shop {
    let stable = upstream("stable").await;
    let canary = upstream("canary").await;
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            hosts,
            &[
                ("stable", vec![stable.addr().to_string()], weights.0),
                ("canary", vec![canary.addr().to_string()], weights.1),
            ],
        )
        + extra;
    Shop {
        proxy: start(&toml).await,
        stable,
        canary,
    }
}

pub async fn upstream(name: &str) -> UpstreamHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    upstream::spawn(listener, UpstreamConfig::new(name)).unwrap()
}

/// Config text for one default service with the given pools: (name, endpoints, weight).
pub fn service_toml(
    name: &str,
    hosts: Option<&[&str]>,
    pools: &[(&str, Vec<String>, u32)],
) -> String {
    let mut s = format!(
        "[[service]]\nname = \"{name}\"\nbaseline = \"{}\"\n",
        pools[0].0
    );
    if let Some(hosts) = hosts {
        let list: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        s += &format!("hosts = [{}]\n", list.join(", "));
    }
    for (pool, endpoints, weight) in pools {
        let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        s += &format!(
            "[service.pools.{pool}]\nendpoints = [{}]\nweight = {weight}\n",
            list.join(", ")
        );
    }
    s
}

pub fn proxy_toml(extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nconnect_timeout = \"1s\"\nrequest_timeout = \"2s\"\n{extra}\n"
    )
}

pub fn client() -> Client<HttpConnector, TestBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn upstream(&self) -> &str {
        self.headers
            .get("x-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The message of an admin API error answer (`{"error": "..."}`); empty if none.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

pub async fn send(client: &Client<HttpConnector, TestBody>, req: Request<TestBody>) -> Answer {
    let resp = client.request(req).await.expect("request failed");
    collect(resp).await
}

pub async fn collect(resp: Response<Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(
    client: &Client<HttpConnector, TestBody>,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Answer {
    let req = Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(empty())
        .unwrap();
    send(client, req).await
}

/// Send `total` GETs over `conns` concurrent keep-alive connections; returns how many
/// were answered by each upstream name, and how many failed.
pub async fn split(
    addr: SocketAddr,
    total: usize,
    conns: usize,
) -> std::collections::HashMap<String, usize> {
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let counter = Arc::clone(&counter);
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut seen = std::collections::HashMap::<String, usize>::new();
            while counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let req = Request::get(format!("http://{addr}/"))
                    .body(empty())
                    .unwrap();
                let a = send(&client, req).await;
                let key = if a.status == StatusCode::OK {
                    a.upstream().to_owned()
                } else {
                    format!("status {}", a.status)
                };
                *seen.entry(key).or_default() += 1;
            }
            seen
        }));
    }
    let mut all = std::collections::HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

/// Poll `check` until it returns true or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Poll service `name` at the admin API `admin` until `ok` holds for its document (a
/// rollout driver or guard acts on its own tick), or fail after `limit` naming what
/// never happened; returns the document.
pub async fn wait_service(
    admin: SocketAddr,
    name: &str,
    what: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let path = format!("/api/v1/services/{name}");
    loop {
        let s = get(&client(), admin, "localhost", &path).await.json();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {}", s["rollout"]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `[(pool, weight)]` of a service document from the admin API, in config order.
pub fn pool_weights(service: &serde_json::Value) -> Vec<(String, u64)> {
    service["pools"]
        .as_array()
        .unwrap_or_else(|| panic!("no pools in {service}"))
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Read one request head from a raw upstream connection (through its blank line).
/// False when the peer closed, failed, or (with `idle`) sent nothing for that long.
pub async fn read_head(s: &mut tokio::net::TcpStream, idle: Option<Duration>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = s.read(&mut buf);
        let n = match idle {
            Some(d) => tokio::time::timeout(d, read).await.unwrap_or(Ok(0)),
            None => read.await,
        };
        match n {
            Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

/// An HTTP/2 client connection over `io` (prior knowledge, or TLS after ALPN chose h2),
/// driven in the background.
pub async fn h2_handshake<T, B>(io: T) -> hyper::client::conn::http2::SendRequest<B>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

/// `kind` of each event, in order.
pub fn event_kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// A hand-written HTTP server for tests that need exact control of what an upstream
/// sends (hop-by-hop headers): answers every request with `respond(request)`.
pub async fn custom_upstream<F>(respond: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let respond = Arc::clone(&respond);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = respond(req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A request body of `len` bytes produced lazily in 64 KiB frames, never held whole.
pub struct Generated {
    remaining: u64,
    chunk: Bytes,
    /// Report the exact length (content-length) or not (chunked).
    exact: bool,
}

impl Generated {
    pub fn new(len: u64, exact: bool) -> Generated {
        Generated {
            remaining: len,
            chunk: Bytes::from(vec![b'y'; 64 * 1024]),
            exact,
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// A raw upstream on 127.0.0.1: records every byte it receives (all connections, in
/// arrival order per connection) and answers each complete request with the next of
/// `responses` (the last one repeats). A request is complete at its blank line, or
/// after its Content-Length or its chunked body's last chunk. Tests see exactly what
/// reached the backend.
pub struct Recorder {
    pub addr: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
}

impl Recorder {
    pub async fn start(responses: Vec<&'static [u8]>) -> Recorder {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (r, q, c) = (received.clone(), requests.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (r, q, c, responses) = (r.clone(), q.clone(), c.clone(), responses.clone());
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = vec![0u8; 16384];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        r.lock().unwrap().extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(len) = complete_request(&pending) {
                            pending.drain(..len);
                            let i = q.fetch_add(1, Ordering::SeqCst);
                            let resp = responses[i.min(responses.len() - 1)];
                            if s.write_all(resp).await.is_err() {
                                break;
                            }
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Recorder {
            addr,
            received,
            requests,
            closed,
        }
    }

    /// Everything received so far, lossily as text.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }

    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections the peer (weir) has closed.
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The length of the first complete HTTP/1.1 request in `buf`, if there is one.
fn complete_request(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    if field("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        let end = buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n")?;
        return Some(head_end + end + 5);
    }
    let len: usize = field("content-length:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

/// Write `bytes` on `s` and read one response head (through its blank line); the head
/// as text, or what came before the peer closed or `limit` passed.
pub async fn exchange_raw(s: &mut tokio::net::TcpStream, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(bytes).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1];
    let deadline = tokio::time::Instant::now() + limit;
    // One byte at a time: nothing after the head is consumed, so the next exchange on
    // the same connection starts clean once the body is skipped.
    while !seen.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(1)) => seen.push(buf[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// The sum of the samples of `name` whose labels include all of `labels`; `None` when
/// there is no such series at all (a metric that is not created at 0 is not "0").
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some(split) => split,
                None => continue,
            },
            // `name_suffix` is another metric; only a space may follow a bare name.
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        let has = |(k, v): &(&str, &str)| series.split(',').any(|p| p == format!("{k}=\"{v}\""));
        if labels.iter().all(has)
            && let Ok(v) = value.trim().parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The sum of `name`'s samples on weir's admin `/metrics` whose labels include `labels`
/// (e.g. `[("pool", "p")]`); the series must exist.
pub async fn metric_sum(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    // By address: the admin API may refuse other Host names.
    let text = get(&client(), admin, &admin.to_string(), "/metrics")
        .await
        .text();
    metric(&text, name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in /metrics:\n{text}"))
}

/// An address that refuses connections, and keeps refusing for as long as the returned
/// socket lives: bound but never listening, so no other test (they run in parallel) can
/// be given the port meanwhile, as a dropped listener's port could be.
pub fn refused_addr() -> (SocketAddr, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (addr, socket)
}

/// A program on the PATH, or a failed test that says how to install it.
pub fn tool(name: &str) -> String {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.display().to_string(),
        None => panic!(
            "`{name}` is not installed: run scripts/test.sh, which installs Debian's prometheus package"
        ),
    }
}

/// A real Prometheus server scraping a weir; killed when dropped.
pub struct Prometheus {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start Prometheus (Debian's package) scraping `target` every second; returns once
/// it is ready.
pub async fn start_prometheus(target: SocketAddr) -> Prometheus {
    let dir = temp_dir("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = std::process::Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let p = Prometheus { child, addr };
    let c = client();
    let ready = wait_until(Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            let req = Request::get(format!("http://{addr}/-/ready"))
                .body(empty())
                .unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await;
    assert!(
        ready,
        "prometheus did not become ready (log in {})",
        dir.display()
    );
    p
}
