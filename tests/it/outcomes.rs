//! A request's outcome is what happened by the end of its response body, on real
//! sockets: a body the upstream cuts off is the pool's failure (counted, ejected, rolled
//! back), a client that breaks its own request is not the pool's, and an upstream that
//! closes idle keep-alive connections costs clients nothing without a POST ever being
//! sent twice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_testkit::{Faults, UpstreamHandle};

/// The guard settings of tests/it/guard.rs: judged every 500 ms, two breaches to act.
const INTERVAL: Duration = Duration::from_millis(500);

/// `metric`, with a missing series read as 0 (for figures, not for assertions).
fn figure(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

/// `code=count` of every `weir_requests_total` series of a pool, for the log.
fn codes(text: &str, pool: &str) -> String {
    let prefix = "weir_requests_total{";
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        if line.contains(&format!("pool=\"{pool}\""))
            && let Some(code) = line
                .split("code=\"")
                .nth(1)
                .and_then(|c| c.split('"').next())
            && let Some(v) = line.rsplit(' ').next()
        {
            out.push(format!("{code}={v}"));
        }
    }
    out.join(" ")
}

async fn metrics_text(proxy: &Proxy) -> String {
    get(&client(), proxy.admin, "localhost", "/metrics")
        .await
        .text()
}

fn weights(proxy: &Proxy) -> Vec<u32> {
    proxy.controller.snapshot("shop").unwrap().weights()
}

fn pool_toml(name: &str, endpoints: &[&UpstreamHandle], weight: u32) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|u| format!("\"{}\"", u.addr()))
        .collect();
    format!(
        "[service.pools.{name}]\nendpoints = [{}]\nweight = {weight}\n",
        list.join(", ")
    )
}

/// What paced GET clients saw, by how each request ended.
#[derive(Debug, Default)]
struct Seen {
    ok: AtomicU64,
    /// Head received, then the body failed: a truncated response.
    truncated: AtomicU64,
    /// A 5xx answer (weir's own 502 when the upstream reset before the head).
    server_errors: AtomicU64,
    /// No response at all.
    request_errors: AtomicU64,
    /// Failures of any kind that did not come from a canary upstream.
    not_canary_failures: AtomicU64,
}

impl Seen {
    fn failures(&self) -> u64 {
        self.truncated.load(Ordering::Relaxed)
            + self.server_errors.load(Ordering::Relaxed)
            + self.request_errors.load(Ordering::Relaxed)
    }
}

/// Paced load: `rate` GETs/s spread over `clients` keep-alive clients, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, rate: u64, clients: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let period = Duration::from_micros(1_000_000 * clients / rate);
        let tasks = (0..clients)
            .map(|_| {
                let (stop, seen) = (stop.clone(), seen.clone());
                tokio::spawn(async move {
                    let c = client();
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    // Bounded: a test that forgets to stop still ends.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        tick.tick().await;
                        let req = Request::get(format!("http://{addr}/"))
                            .body(empty())
                            .unwrap();
                        let resp = match c.request(req).await {
                            Ok(r) => r,
                            Err(_) => {
                                seen.request_errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        };
                        let status = resp.status();
                        let canary = resp
                            .headers()
                            .get("x-upstream")
                            .is_some_and(|v| v.as_bytes().starts_with(b"canary"));
                        let failed = match resp.into_body().collect().await {
                            Err(_) => {
                                seen.truncated.fetch_add(1, Ordering::Relaxed);
                                true
                            }
                            Ok(_) if status.is_server_error() => {
                                seen.server_errors.fetch_add(1, Ordering::Relaxed);
                                true
                            }
                            Ok(_) => {
                                seen.ok.fetch_add(1, Ordering::Relaxed);
                                false
                            }
                        };
                        // weir's own 502 names no upstream; only a failure with a
                        // non-canary upstream header is surely not the canary's.
                        let named = status != StatusCode::BAD_GATEWAY;
                        if failed && named && !canary {
                            seen.not_canary_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Load { stop, seen, tasks }
    }

    async fn stop(self) -> Arc<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_bodies_are_the_canarys_failures_and_roll_it_back() {
    let stable = upstream("stable").await;
    let canary = [upstream("canary-1").await, upstream("canary-2").await];
    for c in &canary {
        c.set_faults(Faults::truncate(1.0));
    }
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml("stable", &[&stable], 80)
        + &pool_toml("canary", &canary.iter().collect::<Vec<_>>(), 20)
        + "[service.slo]\ninterval = \"500ms\"\nmin_requests = 20\nmax_error_rate = 0.05\nbreaches_to_act = 2\n";
    let proxy = start(&toml).await;

    let load = Load::start(proxy.addr, 200, 4);
    let started = Instant::now();
    let rolled_back = wait_until(Duration::from_secs(10), || async {
        weights(&proxy) == [100, 0]
    })
    .await;
    let took = started.elapsed();
    let seen = load.stop().await;
    let failures = seen.failures();

    // The outcome of a cut-off body is recorded when weir sees the upstream's reset,
    // which may land a moment after the client saw its connection end.
    let labels = [("service", "shop"), ("pool", "canary")];
    let reset = [("service", "shop"), ("pool", "canary"), ("kind", "reset")];
    let close_to =
        |counted: f64| (counted - failures as f64).abs() <= (failures as f64 * 0.02).max(2.0);
    wait_until(Duration::from_secs(5), || async {
        let m = metrics_text(&proxy).await;
        close_to(figure(&m, "weir_upstream_errors_total", &reset))
            && close_to(figure(&m, "weir_request_failures_total", &labels))
    })
    .await;
    let m = metrics_text(&proxy).await;
    let events = proxy.events().await;
    let ejected = events
        .iter()
        .filter(|e| e["kind"] == "endpoint_ejected" && e["details"]["pool"] == "canary")
        .count();
    let svc = proxy.service("shop").await;
    let ejected_now = svc["pools"][1]["endpoint_states"]
        .as_array()
        .map_or(0, |s| s.iter().filter(|e| e["state"] == "ejected").count());
    eprintln!(
        "truncation: rolled back {rolled_back} after {took:?}; clients saw {} ok, {} truncated, {} 5xx, {} without answer ({} not the canary's); canary reset errors {}, request failures {:?}, requests by code [{}]; stable [{}]; {ejected} canary ejection events, {ejected_now} ejected now",
        seen.ok.load(Ordering::Relaxed),
        seen.truncated.load(Ordering::Relaxed),
        seen.server_errors.load(Ordering::Relaxed),
        seen.request_errors.load(Ordering::Relaxed),
        seen.not_canary_failures.load(Ordering::Relaxed),
        figure(&m, "weir_upstream_errors_total", &reset),
        metric(&m, "weir_request_failures_total", &labels),
        codes(&m, "canary"),
        codes(&m, "stable"),
    );

    assert!(failures > 0, "no client ever met a truncated canary body");
    assert_eq!(seen.not_canary_failures.load(Ordering::Relaxed), 0);
    assert!(
        close_to(figure(&m, "weir_upstream_errors_total", &reset)),
        "{failures} truncations seen by clients, reset errors counted: {}",
        figure(&m, "weir_upstream_errors_total", &reset)
    );
    let counted = metric(&m, "weir_request_failures_total", &labels)
        .expect("weir_request_failures_total{pool=\"canary\"} exists");
    assert!(
        close_to(counted),
        "{failures} truncations seen by clients, request failures counted: {counted}"
    );
    assert_eq!(
        metric(
            &m,
            "weir_request_failures_total",
            &[("service", "shop"), ("pool", "stable")]
        ),
        Some(0.0),
        "created at 0, and stable never failed"
    );
    assert!(
        ejected > 0 || ejected_now > 0,
        "no canary endpoint ejected: {svc}"
    );
    assert!(rolled_back, "the canary was never rolled back");
    let rollback = events
        .iter()
        .find(|e| e["kind"] == "rolled_back")
        .expect("rolled_back event");
    assert_eq!(rollback["source"], "guard");
    assert_eq!(rollback["details"]["pool"], "canary");
    assert_eq!(
        pool_weights(&svc),
        [("stable".to_owned(), 100), ("canary".to_owned(), 0)]
    );
}

/// Sends `head` and `body` on a fresh connection and reads the status line of the
/// answer: `None` when the connection ends without one.
async fn raw_status(addr: SocketAddr, head: &str, body: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
        let line = String::from_utf8_lossy(&got);
        line.split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no answer and no close within 5s")
}

/// The time of the guard's last decision on `pool`, if it made one.
fn decided_at(svc: &Value, pool: &str) -> Option<SystemTime> {
    svc["guard"]["decisions"]
        .as_array()?
        .iter()
        .find(|d| d["pool"] == pool)
        .and_then(|d| humantime::parse_rfc3339(d["at"].as_str()?).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_are_not_the_canarys() {
    let s = shop(
        None,
        (90, 10),
        "[service.targeting]\nheader = \"x-weir-pool\"\n[service.slo]\ninterval = \"500ms\"\nmin_requests = 10\nmax_error_rate = 0.01\nbreaches_to_act = 2\n",
    )
    .await;
    let addr = s.proxy.addr;
    let head = "POST /sink HTTP/1.1\r\nhost: x\r\nx-weir-pool: canary\r\n";
    let chunked = format!("{head}transfer-encoding: chunked\r\n\r\n");
    let aborted = format!("{head}content-length: 100000\r\n\r\n");
    let mut chunked_answers = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..200 {
        if i % 2 == 0 {
            // A chunk-size line that is not hex: the client's body is malformed.
            let status = raw_status(addr, &chunked, b"zz\r\n").await;
            let key = status.map_or_else(|| "no answer".to_owned(), |c| c.to_string());
            *chunked_answers.entry(key).or_default() += 1;
        } else {
            // 1,000 of 100,000 bytes, then the client goes away while the canary is
            // reading the body.
            let posts = s.canary.requests_by_method().post;
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(aborted.as_bytes()).await.unwrap();
            c.write_all(&[b'a'; 1000]).await.unwrap();
            assert!(
                wait_until(Duration::from_secs(5), || async {
                    s.canary.requests_by_method().post > posts
                })
                .await,
                "the upload never reached the canary"
            );
            drop(c);
        }
    }
    let last = SystemTime::now();

    // At least three guard rounds after the last request: time for any breach streak
    // to be acted on. (A rollback ends the wait early: the canary is no longer judged.)
    let judged = wait_until(Duration::from_secs(10), || async {
        let svc = s.proxy.service("shop").await;
        weights(&s.proxy) != [90, 10]
            || decided_at(&svc, "canary").is_some_and(|at| at >= last + INTERVAL * 3)
    })
    .await;
    let m = metrics_text(&s.proxy).await;
    let canary = |kind: &str| {
        metric(
            &m,
            "weir_client_errors_total",
            &[("service", "shop"), ("pool", "canary"), ("kind", kind)],
        )
    };
    let failures = metric(
        &m,
        "weir_request_failures_total",
        &[("service", "shop"), ("pool", "canary")],
    );
    let events = s.proxy.events().await;
    let rolled_back = events.iter().any(|e| e["kind"] == "rolled_back");
    let svc = s.proxy.service("shop").await;
    eprintln!(
        "client faults: invalid chunked answered {chunked_answers:?}; client_abort {:?}, bad_request_body {:?}, client_timeout {:?}; canary request failures {failures:?}, upstream errors {}, requests by code [{}]; rolled back: {rolled_back}, weights {:?}; last decision {}",
        canary("client_abort"),
        canary("bad_request_body"),
        canary("client_timeout"),
        figure(
            &m,
            "weir_upstream_errors_total",
            &[("service", "shop"), ("pool", "canary")]
        ),
        codes(&m, "canary"),
        weights(&s.proxy),
        svc["guard"]["decisions"][0]["summary"],
    );

    assert!(
        judged,
        "the guard made no decision 3 intervals after the last request"
    );
    assert_eq!(
        chunked_answers.get("400"),
        Some(&100),
        "every malformed chunked body answered 400: {chunked_answers:?}"
    );
    assert_eq!(canary("client_abort"), Some(100.0));
    assert_eq!(canary("bad_request_body"), Some(100.0));
    assert_eq!(canary("client_timeout"), Some(0.0), "created at 0");
    assert_eq!(
        figure(
            &m,
            "weir_requests_total",
            &[("service", "shop"), ("pool", "canary"), ("code", "499")]
        ),
        100.0
    );
    assert_eq!(failures, Some(0.0), "client faults are not the canary's");
    assert!(!rolled_back, "rolled back for client faults: {events:?}");
    assert_eq!(weights(&s.proxy), [90, 10]);
}

/// What the chaos clients saw, per method.
#[derive(Debug, Default)]
struct Tally {
    sent: [AtomicU64; 3],
    failed: [AtomicU64; 3],
}

const METHODS: [Method; 3] = [Method::GET, Method::HEAD, Method::POST];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_closing_upstreams_cost_clients_nothing() {
    const TOTAL: u64 = 20_000;
    const CONNS: usize = 16;
    let eps = [upstream("s1").await, upstream("s2").await];
    for e in &eps {
        e.set_faults(Faults::close_idle(
            Duration::ZERO,
            Duration::from_millis(50),
        ));
    }
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml("stable", &eps.iter().collect::<Vec<_>>(), 1);
    let proxy = start(&toml).await;
    let addr = proxy.addr;

    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNS)
        .map(|_| {
            let (next, tally) = (next.clone(), tally.clone());
            tokio::spawn(async move {
                let c = client();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TOTAL {
                        return;
                    }
                    // 60% GET, 20% HEAD, 20% POST with a small body.
                    let m = match i % 10 {
                        0..6 => 0,
                        6..8 => 1,
                        _ => 2,
                    };
                    let body = if m == 2 {
                        full(format!("order {i}"))
                    } else {
                        empty()
                    };
                    let req = Request::builder()
                        .method(METHODS[m].clone())
                        .uri(format!("http://{addr}/"))
                        .body(body)
                        .unwrap();
                    tally.sent[m].fetch_add(1, Ordering::Relaxed);
                    let ok = match c.request(req).await {
                        Ok(resp) => {
                            resp.status() == StatusCode::OK
                                && resp.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    if !ok {
                        tally.failed[m].fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();

    let n = |a: &[AtomicU64; 3], m: usize| a[m].load(Ordering::Relaxed);
    let received: u64 = eps.iter().map(|e| e.requests_by_method().post).sum();
    let connections: u64 = eps.iter().map(|e| e.connections()).sum();
    let m = metrics_text(&proxy).await;
    let pool = [("service", "shop"), ("pool", "stable")];
    let errors: Vec<String> = ["connect", "timeout", "reset", "protocol"]
        .iter()
        .map(|k| {
            let labels = [pool[0], pool[1], ("kind", k)];
            format!("{k}={}", figure(&m, "weir_upstream_errors_total", &labels))
        })
        .collect();
    eprintln!(
        "keep-alive chaos: {TOTAL} requests in {took:?} over {connections} upstream connections; GET {}/{} failed, HEAD {}/{} failed, POST {}/{} failed; POSTs sent {}, received {received}; replays {:?}; upstream errors [{}]; codes [{}]",
        n(&tally.failed, 0),
        n(&tally.sent, 0),
        n(&tally.failed, 1),
        n(&tally.sent, 1),
        n(&tally.failed, 2),
        n(&tally.sent, 2),
        n(&tally.sent, 2),
        metric(&m, "weir_keepalive_replays_total", &pool),
        errors.join(" "),
        codes(&m, "stable"),
    );

    assert!(
        received <= n(&tally.sent, 2),
        "a POST was sent upstream twice: {received} received for {} sent",
        n(&tally.sent, 2)
    );
    assert!(
        received >= n(&tally.sent, 2) - n(&tally.failed, 2),
        "every POST that succeeded was received"
    );
    assert_eq!(n(&tally.failed, 0), 0, "GETs failed");
    assert_eq!(n(&tally.failed, 1), 0, "HEADs failed");
}

/// A gRPC content type sent to a plain HTTP/1 pool does not make its answers gRPC
/// failures: only a gRPC answer from an HTTP/2 pool is judged by `grpc-status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_content_type_cannot_fail_a_plain_pool() {
    let up = upstream("plain").await;
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml("stable", &[&up], 1);
    let proxy = start(&toml).await;
    let c = client();
    for path in ["/", "/status/404"] {
        let req = Request::post(format!("http://{}{path}", proxy.addr))
            .header("host", "shop")
            .header("content-type", "application/grpc")
            .body(full("x"))
            .unwrap();
        let a = send(&c, req).await;
        assert!(
            a.status.as_u16() == 200 || a.status.as_u16() == 404,
            "{}",
            a.status
        );
    }
    let text = metrics_text(&proxy).await;
    assert_eq!(
        figure(&text, "weir_request_failures_total", &[("pool", "stable")]),
        0.0,
        "{text}"
    );
    assert!(!text.contains("weir_grpc_responses_total{"), "{text}");
}

/// A client that gives up before the answer's head is recorded as its own abort (499),
/// not as nothing and not against the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_answer_is_a_client_abort() {
    let slow = upstream("slow").await;
    slow.set_faults(Faults::delay(Duration::from_secs(5)));
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml("stable", &[&slow], 1);
    let proxy = start(&toml).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || async { slow.requests() >= 1 }).await);
    drop(s);
    let recorded = wait_until(Duration::from_secs(5), || async {
        metric(
            &metrics_text(&proxy).await,
            "weir_client_errors_total",
            &[("pool", "stable"), ("kind", "client_abort")],
        ) == Some(1.0)
    })
    .await;
    let text = metrics_text(&proxy).await;
    assert!(recorded, "{text}");
    assert_eq!(
        figure(&text, "weir_request_failures_total", &[("pool", "stable")]),
        0.0
    );
}
