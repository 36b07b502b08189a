//! Endpoint health on real sockets: a dead host is routed around without rolling back a
//! good release, a bad release is rolled back even though ejection and retries could
//! hide it, and the upstream failure modes a proxy meets in production.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weir_testkit::{Faults, UpstreamConfig, UpstreamHandle};

async fn service(proxy: &Proxy) -> Value {
    proxy.service("shop").await
}

async fn events(proxy: &Proxy) -> Vec<Value> {
    proxy.events().await
}

fn endpoint_state(s: &Value, pool: usize, endpoint: usize) -> String {
    s["pools"][pool]["endpoint_states"][endpoint]["state"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

/// Unpaced background GETs counting non-200 answers, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, failed, sent) = (stop.clone(), failed.clone(), sent.clone());
                tokio::spawn(async move {
                    let c = client();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let ok = match c
                            .request(
                                http::Request::get(format!("http://{addr}/"))
                                    .body(empty())
                                    .unwrap(),
                            )
                            .await
                        {
                            Ok(r) => r.status() == StatusCode::OK,
                            Err(_) => false,
                        };
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        // Yield so 2 cores share fairly between load and the proxy.
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            failed,
            sent,
            tasks,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn pool_toml(name: &str, endpoints: &[&UpstreamHandle], weight: u32, extra: &str) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|u| format!("\"{}\"", u.addr()))
        .collect();
    format!(
        "[service.pools.{name}]\nendpoints = [{}]\nweight = {weight}\n{extra}\n",
        list.join(", ")
    )
}

const CHECKS: &str = "[service.pools.stable.health]\npath = \"/\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_is_routed_around_and_comes_back_without_a_rollback() {
    let stable = [
        upstream("s1").await,
        upstream("s2").await,
        upstream("s3").await,
    ];
    let canary = upstream("canary").await;
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml("stable", &stable.iter().collect::<Vec<_>>(), 90, CHECKS)
        + &pool_toml("canary", &[&canary], 10, "")
        + "[service.slo]\ninterval = \"200ms\"\nmin_requests = 20\nmax_error_rate = 0.05\nmax_error_rate_increase = 0.02\n";
    let proxy = start(&toml).await;
    let load = Load::start(proxy.addr, 8);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            stable[2].requests() > 50
        })
        .await
    );
    let dead = stable[2].addr();
    stable[2].kill().await;
    let marked = wait_until(Duration::from_secs(10), || async {
        endpoint_state(&service(&proxy).await, 0, 2) == "down"
    })
    .await;
    assert!(marked, "killed endpoint never marked down");
    let mut table = Vec::new();
    let doc: weir::api::ServiceDoc = serde_json::from_value(service(&proxy).await).unwrap();
    weir_cli::ctl::write_services(&mut table, &[doc]).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.contains(&format!("shop/stable: not taking traffic: {dead} (down)")),
        "{table}"
    );
    assert!(table.contains("2/3 up"), "{table}");
    // Keep serving a while: no rollback, errors only around the kill.
    let more = stable[0].requests() + 300;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            stable[0].requests() >= more
        })
        .await
    );
    let (sent, failed) = load.stop().await;
    println!("killed 1 of 3 stable endpoints: {failed} of {sent} client requests failed");
    // Only requests in flight on the host when it died can fail ("a handful").
    assert!(failed <= 10, "{failed} of {sent} failed");
    let s = service(&proxy).await;
    assert_eq!(
        s["pools"][0]["weight"], 90,
        "a dead host must not roll back a good release"
    );
    assert_eq!(s["health"], "healthy");
    // The health task journals the change just after putting it in force, and event
    // reads do not wait for the writer: wait for it.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            events(&proxy)
                .await
                .iter()
                .any(|e| e["kind"] == "endpoint_down")
        })
        .await,
        "no endpoint_down event"
    );
    // Seen by the active checks: the event says so, not the SLO guard.
    let down: Vec<Value> = events(&proxy)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "endpoint_down")
        .collect();
    assert!(down.iter().all(|e| e["source"] == "health"), "{down:?}");
    let metrics = get(&client(), proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains(&format!(
            "weir_endpoint_healthy{{service=\"shop\",pool=\"stable\",endpoint=\"{dead}\"}} 0"
        )),
        "{metrics}"
    );

    // The host restarts on the same address: traffic again within two intervals
    // (plus the checks' threshold).
    let listener = TcpListener::bind(dead).await.unwrap();
    let back = weir_testkit::spawn(listener, UpstreamConfig::new("s3")).unwrap();
    let restarted = Instant::now();
    let c = client();
    let served = wait_until(Duration::from_secs(10), || {
        let c = c.clone();
        let back = &back;
        async move {
            get(&c, proxy.addr, "x", "/").await;
            back.requests() > 1
        }
    })
    .await;
    assert!(served, "restarted endpoint never got traffic again");
    println!(
        "restarted endpoint served again after {:?}",
        restarted.elapsed()
    );
    assert!(restarted.elapsed() < Duration::from_secs(2));
    // The health task journals the change just after putting it in force, and event
    // reads do not wait for the writer: wait for it.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            events(&proxy)
                .await
                .iter()
                .any(|e| e["kind"] == "endpoint_up")
        })
        .await,
        "no endpoint_up event"
    );
    let up: Vec<Value> = events(&proxy)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "endpoint_up")
        .collect();
    assert!(up.iter().all(|e| e["source"] == "health"), "{up:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_eject_but_never_more_than_half_the_pool() {
    let eps = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
        upstream("d").await,
    ];
    let broken = Faults::errors(1.0);
    // Three of four endpoints answer 500: only two may be ejected (50%).
    for e in &eps[..3] {
        e.set_faults(broken);
    }
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml(
            "stable",
            &eps.iter().collect::<Vec<_>>(),
            1,
            "[service.pools.stable.outlier]\nconsecutive_failures = 3\nbase_ejection_time = \"30s\"\n",
        );
    let proxy = start(&toml).await;
    let c = client();
    let ejected_two = wait_until(Duration::from_secs(10), || {
        let c = c.clone();
        let proxy = &proxy;
        async move {
            for _ in 0..20 {
                get(&c, proxy.addr, "x", "/").await;
            }
            let s = service(proxy).await;
            (0..4)
                .filter(|&i| endpoint_state(&s, 0, i) == "ejected")
                .count()
                == 2
        }
    })
    .await;
    assert!(ejected_two);
    for _ in 0..100 {
        get(&c, proxy.addr, "x", "/").await;
    }
    let s = service(&proxy).await;
    assert_eq!(
        (0..4)
            .filter(|&i| endpoint_state(&s, 0, i) == "ejected")
            .count(),
        2
    );
    assert_eq!(
        endpoint_state(&s, 0, 3),
        "up",
        "the healthy endpoint is never ejected"
    );
    // The health task journals an ejection just after putting it in force, and event
    // reads do not wait for the writer: wait for both (never more).
    let ejected_events = || async {
        events(&proxy)
            .await
            .into_iter()
            .filter(|e| e["kind"] == "endpoint_ejected")
            .collect::<Vec<Value>>()
    };
    wait_until(Duration::from_secs(5), || async {
        ejected_events().await.len() >= 2
    })
    .await;
    let ejections = ejected_events().await;
    assert_eq!(ejections.len(), 2);
    // Passive ejections come from live traffic: source `outlier`.
    assert!(
        ejections.iter().all(|e| e["source"] == "outlier"),
        "{ejections:?}"
    );
    assert!(
        ejections[0]["reason"]
            .as_str()
            .unwrap()
            .contains("for 30s after 3 consecutive failures")
    );
    let metrics = get(&client(), proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(metrics.contains("weir_endpoint_ejections_total{service=\"shop\",pool=\"stable\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_version_is_rolled_back_even_when_ejection_could_hide_it() {
    let stable = [upstream("s1").await, upstream("s2").await];
    let canary = [upstream("c1").await, upstream("c2").await];
    for c in &canary {
        c.set_faults(Faults::errors(1.0));
    }
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml("stable", &stable.iter().collect::<Vec<_>>(), 80, "")
        + &pool_toml(
            "canary",
            &canary.iter().collect::<Vec<_>>(),
            20,
            "[service.pools.canary.outlier]\nconsecutive_failures = 2\n",
        )
        + "[service.slo]\ninterval = \"200ms\"\nmin_requests = 20\nmax_error_rate = 0.05\n";
    let proxy = start(&toml).await;
    let load = Load::start(proxy.addr, 8);
    let started = Instant::now();
    let reverted = wait_until(Duration::from_secs(10), || async {
        proxy.controller.snapshot("shop").unwrap().weights() == [100, 0]
    })
    .await;
    load.stop().await;
    assert!(
        reverted,
        "guard did not roll back a canary whose every endpoint fails"
    );
    println!("all-500 canary rolled back after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_endpoint_and_still_counted() {
    let good = upstream("good").await;
    let (dead, _held) = refused_addr();
    let toml = proxy_toml("")
        + &format!(
            "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n[service.pools.stable]\nendpoints = [\"{dead}\", \"{}\"]\nweight = 1\n[service.pools.stable.outlier]\nenabled = false\n",
            good.addr()
        );
    let proxy = start(&toml).await;
    let c = client();
    // Within the retry budget (a floor of 10 plus 0.2 per request): every request
    // succeeds, even if every one of them first drew the dead endpoint.
    for _ in 0..12 {
        let a = get(&c, proxy.addr, "x", "/").await;
        assert_eq!((a.status, a.upstream()), (StatusCode::OK, "good"));
    }
    let metrics = get(&client(), proxy.admin, "localhost", "/metrics")
        .await
        .text();
    let retries = metrics
        .lines()
        .find(|l| {
            l.starts_with("weir_retries_total{service=\"shop\",pool=\"stable\",kind=\"connect\"}")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(retries > 0, "{metrics}");
    assert!(
        metrics.contains(
            "weir_upstream_errors_total{service=\"shop\",pool=\"stable\",kind=\"connect\"}"
        )
    );
    // The guard's window saw the failed attempts as errors.
    let s = service(&proxy).await;
    let window = &s["guard"]["pools"][0];
    assert_eq!(window["errors"].as_u64(), Some(retries), "{window}");
}

/// An upstream that sends half a response body and then drops the connection.
async fn dies_mid_response() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-upstream: dying\r\n\r\nonly part")
                    .await;
                // Dropped here: the body is cut short.
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_dying_mid_response_truncates_that_response_only() {
    let dying = dies_mid_response().await;
    let good = upstream("good").await;
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            Some(&["dying.example.com"]),
            &[("p", vec![dying.to_string()], 1)],
        )
        + &service_toml("other", None, &[("p", vec![good.addr().to_string()], 1)]);
    let proxy = start(&toml).await;
    let c = client();
    let resp = c
        .request(
            http::Request::get(format!("http://{}/", proxy.addr))
                .header("host", "dying.example.com")
                .body(empty())
                .unwrap(),
        )
        .await;
    // Either the connection is reset before the head is flushed, or the head arrives
    // and the body is cut: never a response that looks complete.
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), StatusCode::OK);
        use http_body_util::BodyExt;
        assert!(
            resp.into_body().collect().await.is_err(),
            "a cut body must not look complete"
        );
    }
    for _ in 0..20 {
        assert_eq!(
            get(&c, proxy.addr, "good.example.com", "/")
                .await
                .upstream(),
            "good"
        );
    }
}

/// An upstream that closes each keep-alive connection after `idle` without a request —
/// the moment weir may be reusing it.
async fn closes_idle_connections(idle: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                loop {
                    if !read_head(&mut s, Some(idle)).await {
                        return;
                    }
                    if s.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-upstream: racy\r\n\r\nok\n",
                    )
                    .await
                    .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_keep_alive_race_never_reaches_the_client() {
    let idle = Duration::from_millis(300);
    let addr = closes_idle_connections(idle).await;
    let proxy =
        start(&(proxy_toml("") + &service_toml("shop", None, &[("p", vec![addr.to_string()], 1)])))
            .await;
    let c = client();
    for i in 0..12 {
        let a = get(&c, proxy.addr, "x", "/").await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
        // Land the next request around the moment the upstream closes the
        // connection: this wait is the scenario, not a synchronisation.
        tokio::time::sleep(idle + Duration::from_millis((i % 3) * 5)).await;
    }
}

/// A pool carrying traffic whose only endpoint fails its health checks makes the
/// service `unavailable` (never `healthy`) in the API, the guard document and `status`;
/// the endpoint passing again makes it healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_pool_with_no_endpoint_up_is_never_reported_healthy() {
    let stable = upstream("s1").await;
    let canary = upstream("canary").await;
    let checks = CHECKS.replace("pools.stable", "pools.canary");
    let toml = proxy_toml("")
        + "[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n"
        + &pool_toml("stable", &[&stable], 90, "")
        + &pool_toml("canary", &[&canary], 10, &checks);
    let proxy = start(&toml).await;
    assert_eq!(service(&proxy).await["health"], "healthy");
    canary.set_faults(Faults::errors(1.0));
    let down = wait_until(Duration::from_secs(10), || async {
        endpoint_state(&service(&proxy).await, 1, 0) == "down"
    })
    .await;
    assert!(down, "the failing endpoint was never marked down");
    let s = service(&proxy).await;
    assert_eq!(s["health"], "unavailable", "{s}");
    assert_eq!(s["guard"]["health"], "unavailable", "{s}");
    let doc: weir::api::ServiceDoc = serde_json::from_value(s).unwrap();
    let mut table = Vec::new();
    weir_cli::ctl::write_services(&mut table, &[doc]).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.contains(&format!(
            "shop/canary: NO ENDPOINT UP; not taking traffic: {} (down)",
            canary.addr()
        )),
        "{table}"
    );
    assert!(table.contains("shop: UNAVAILABLE"), "{table}");
    // Weight 0: the pool carries no traffic, so the service is healthy again even with
    // the endpoint still down.
    let put = http::Request::put(format!(
        "http://{}/api/v1/services/shop/weights",
        proxy.admin
    ))
    .header("content-type", "application/json")
    .body(full(r#"{"weights": {"stable": 100, "canary": 0}}"#))
    .unwrap();
    let answer = send(&client(), put).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["health"], "healthy");
    assert_eq!(endpoint_state(&answer.json(), 1, 0), "down");
}
