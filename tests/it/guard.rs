//! The SLO guard on real sockets: how fast it moves traffic back from a broken canary,
//! and that it does not when the canary is not to blame or the evidence is thin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use weir_testkit::{Faults, UpstreamHandle};

async fn setup(weights: (u32, u32), slo: &str) -> Shop {
    shop(
        None,
        weights,
        &format!(
            "[service.slo]
{slo}"
        ),
    )
    .await
}

/// Paced load: `rate` requests/s spread over `clients`, until stopped. Counts 5xx
/// answers from the canary.
struct Load {
    stop: Arc<AtomicBool>,
    canary_failures: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, rate: u64, clients: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let canary_failures = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let period = Duration::from_micros(1_000_000 * clients / rate);
        let tasks = (0..clients)
            .map(|_| {
                let (stop, failures, sent) = (stop.clone(), canary_failures.clone(), sent.clone());
                tokio::spawn(async move {
                    let c = client();
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    // Bounded: a test that forgets to stop still ends.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        tick.tick().await;
                        let a = get(&c, addr, "x", "/").await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if a.status.is_server_error() && a.upstream() == "canary" {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            canary_failures,
            sent,
            tasks,
        }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.canary_failures.load(Ordering::Relaxed)
    }
}

fn weights(proxy: &Proxy) -> Vec<u32> {
    proxy.controller.snapshot("shop").unwrap().weights()
}

async fn service(proxy: &Proxy) -> Value {
    proxy.service("shop").await
}

async fn events(proxy: &Proxy) -> Vec<Value> {
    proxy.events().await
}

/// Wait until `n` canary requests have been judged, so the switch happens mid-run.
async fn warm_up(proxy: &Proxy, canary: &UpstreamHandle, n: u64) {
    assert!(wait_until(Duration::from_secs(20), || async { canary.requests() >= n }).await);
    assert_eq!(weights(proxy), [90, 10]);
}

/// Records what a webhook receives.
async fn webhook_sink() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    let addr = custom_upstream(move |req| {
        let seen = seen.clone();
        // The body arrives asynchronously; record the headers now and read it in a task.
        let ct = req.headers().get("content-type").cloned();
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            if let Ok(b) = req.into_body().collect().await {
                let mut text = String::from_utf8_lossy(&b.to_bytes()).into_owned();
                if ct.is_some_and(|v| v == "application/json") {
                    text.insert_str(0, "json:");
                }
                seen.lock().unwrap().push(text);
            }
        });
        Response::new(Full::new(Bytes::from_static(b"ok")))
    })
    .await;
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_canary_is_rolled_back_within_three_seconds() {
    let (hook, received) = webhook_sink().await;
    let s = setup(
        (90, 10),
        &format!(
            "interval = \"500ms\"\nmin_requests = 20\nmax_error_rate = 0.05\nbreaches_to_act = 2\nwebhook = \"http://{hook}/hook\"\n"
        ),
    )
    .await;
    let load = Load::start(s.proxy.addr, 500, 16);
    warm_up(&s.proxy, &s.canary, 100).await;
    let failures_before = load.canary_failures.load(Ordering::Relaxed);
    s.canary.set_faults(Faults::errors(0.3));
    let switched = Instant::now();
    let reverted = wait_until(Duration::from_secs(10), || async {
        weights(&s.proxy) == [100, 0]
    })
    .await;
    let took = switched.elapsed();
    let failed = load.canary_failures.load(Ordering::Relaxed) - failures_before;
    let sent = load.sent.load(Ordering::Relaxed);
    load.stop().await;
    assert!(reverted, "never reverted");
    println!(
        "reverted {took:?} after the canary broke; {failed} canary requests failed meanwhile ({sent} sent in all)"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");

    let svc = service(&s.proxy).await;
    assert_eq!(svc["health"], "degraded");
    assert_eq!(svc["guard"]["health"], "degraded");
    // The rollback reset the windows: their figures cover only the time since (a rate
    // over the whole window would be understated), or nothing yet.
    let since_switch = switched.elapsed().as_secs_f64();
    for p in svc["guard"]["pools"].as_array().unwrap() {
        let span = p["span_secs"].as_f64();
        assert!(
            span.is_none_or(|s| s <= since_switch + 0.5),
            "{p} vs {since_switch}s"
        );
    }
    // The charts get the guard's judgements of the canary: what it compared with the
    // SLO at each evaluation, ending with the breach it acted on.
    let series = get(
        &client(),
        s.proxy.admin,
        "localhost",
        "/api/v1/services/shop/series",
    )
    .await
    .json();
    let canary = &series["pools"][1];
    assert_eq!(canary["name"], "canary");
    let judged = &canary["judged"];
    assert_eq!(judged["baseline"], "stable", "{judged}");
    let n = judged["at_ms"].as_array().unwrap().len();
    for key in [
        "verdict",
        "error_rate",
        "error_rate_bounds",
        "baseline_error_rate",
        "p99_ms",
    ] {
        assert_eq!(judged[key].as_array().unwrap().len(), n, "{key}: {judged}");
    }
    assert_eq!(judged["verdict"][n - 1], "breach", "{judged}");
    assert!(
        series["pools"][0].get("judged").is_none(),
        "the baseline is not judged"
    );
    // `weir ctl status` says so in words.
    let mut table = Vec::new();
    let doc: weir::api::ServiceDoc = serde_json::from_value(svc.clone()).unwrap();
    weir_cli::ctl::write_services(&mut table, &[doc]).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.contains("shop: DEGRADED (guard enforce) — on the baseline since: canary error rate"),
        "{table}"
    );
    let e = events(&s.proxy)
        .await
        .into_iter()
        .find(|e| e["kind"] == "rolled_back")
        .expect("rolled_back event");
    assert_eq!(e["source"], "guard");
    assert_eq!(e["details"]["check"], "error_rate");
    assert_eq!(e["details"]["pool"], "canary");
    assert_eq!(e["details"]["threshold"], 0.05);
    assert!(e["details"]["candidate"]["requests"].as_u64().unwrap() >= 20);
    assert!(e["details"]["baseline"]["requests"].as_u64().unwrap() > 0);
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .starts_with("canary error rate"),
        "{e}"
    );
    // Durable: the state file says degraded too.
    let state = std::fs::read_to_string(s.proxy.state_dir.join("state.json")).unwrap();
    assert!(state.contains("\"degraded\""), "{state}");
    // Metric and webhook.
    let metrics = get(&client(), s.proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains("weir_rollbacks_total{service=\"shop\",reason=\"error_rate\"} 1"),
        "{metrics}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            !received.lock().unwrap().is_empty()
        })
        .await,
        "webhook got nothing"
    );
    let body = received.lock().unwrap()[0].clone();
    assert!(
        body.starts_with("json:") && body.contains("\"rolled_back\""),
        "{body}"
    );
    // Stays on the baseline: no flapping back while the canary recovers.
    s.canary.set_faults(Faults::default());
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, s.proxy.addr, "x", "/").await.upstream(), "stable");
    }
    assert_eq!(weights(&s.proxy), [100, 0]);
    // An operator setting weights clears the degraded mark.
    let req = http::Request::put(format!(
        "http://{}/api/v1/services/shop/weights",
        s.proxy.admin
    ))
    .header("content-type", "application/json")
    .body(full(r#"{"weights":{"stable":90,"canary":10}}"#))
    .unwrap();
    assert_eq!(send(&c, req).await.status, StatusCode::OK);
    assert_eq!(service(&s.proxy).await["health"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_canary_is_rolled_back_within_three_seconds() {
    let s = setup(
        (90, 10),
        // The webhook is dead: it must not delay the revert.
        "interval = \"500ms\"\nmin_requests = 20\nmax_p99_latency = \"200ms\"\nwebhook = \"http://127.0.0.1:9/none\"\n",
    )
    .await;
    let load = Load::start(s.proxy.addr, 500, 32);
    warm_up(&s.proxy, &s.canary, 100).await;
    s.canary
        .set_faults(Faults::delay(Duration::from_millis(300)));
    let switched = Instant::now();
    let reverted = wait_until(Duration::from_secs(10), || async {
        weights(&s.proxy) == [100, 0]
    })
    .await;
    let took = switched.elapsed();
    load.stop().await;
    assert!(reverted, "never reverted");
    println!("latency regression reverted after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let e = events(&s.proxy)
        .await
        .into_iter()
        .find(|e| e["kind"] == "rolled_back")
        .unwrap();
    assert_eq!(e["details"]["check"], "p99_latency");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_low_error_rates_are_never_rolled_back() {
    let s = setup(
        (50, 50),
        "interval = \"200ms\"\nwindow = \"5s\"\nfast_window = \"1s\"\nmin_requests = 20\nmax_error_rate = 0.05\nmax_error_rate_increase = 0.02\n",
    )
    .await;
    let one_percent = Faults::errors(0.01);
    s.stable.set_faults(one_percent);
    s.canary.set_faults(one_percent);
    let load = Load::start(s.proxy.addr, 600, 16);
    // Evaluations every 200 ms while evidence builds up: the guard stays quiet
    // throughout, and once there is enough of it, concludes the canary is no worse.
    let passed = wait_until(Duration::from_secs(40), || async {
        service(&s.proxy).await["guard"]["decisions"][0]["verdict"] == "pass"
    })
    .await;
    load.stop().await;
    let d = &service(&s.proxy).await["guard"]["decisions"][0];
    assert!(passed, "never concluded: {d}");
    assert_eq!(weights(&s.proxy), [50, 50]);
    let kinds: Vec<String> = events(&s.proxy)
        .await
        .iter()
        .map(|e| e["kind"].to_string())
        .collect();
    assert!(kinds.is_empty(), "{kinds:?}");
    eprintln!(
        "equal 1% errors: concluded no worse after {} canary requests: {}",
        d["candidate"]["requests"], d["summary"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_failing_is_not_the_canarys_fault() {
    let s = setup(
        (50, 50),
        "interval = \"200ms\"\nwindow = \"5s\"\nmin_requests = 20\nmax_error_rate_increase = 0.02\nmax_p99_ratio = 1.5\n",
    )
    .await;
    let broken = Faults::errors(0.5);
    s.stable.set_faults(broken);
    s.canary.set_faults(broken);
    let load = Load::start(s.proxy.addr, 400, 16);
    let noticed = wait_until(Duration::from_secs(20), || async {
        events(&s.proxy)
            .await
            .iter()
            .any(|e| e["kind"] == "baseline_unhealthy")
    })
    .await;
    // Keep judging a while longer: still no rollback.
    let more = s.canary.requests() + 500;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            s.canary.requests() >= more
        })
        .await
    );
    load.stop().await;
    assert!(noticed, "no baseline_unhealthy event");
    assert_eq!(weights(&s.proxy), [50, 50]);
    let all = events(&s.proxy).await;
    let e = all
        .iter()
        .find(|e| e["kind"] == "baseline_unhealthy")
        .unwrap();
    assert_eq!(e["source"], "guard");
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("stable is failing too"),
        "{e}"
    );
    assert!(all.iter().all(|e| e["kind"] != "rolled_back"));
    let svc = service(&s.proxy).await;
    assert_eq!(svc["guard"]["baseline_unhealthy"], true);
    assert_eq!(svc["guard"]["decisions"][0]["verdict"], "inconclusive");
}

/// A canary at a few requests a second never fills `min_requests` in any window, but
/// its evidence accumulates over the exposure: failing every request, it is rolled back
/// after a handful of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_canary_failing_everything_is_rolled_back() {
    let s = setup(
        (50, 50),
        "interval = \"500ms\"\nwindow = \"5s\"\nfast_window = \"2s\"\nmin_requests = 50\nmax_error_rate = 0.05\n",
    )
    .await;
    s.canary.set_faults(Faults::errors(1.0));
    // 4 req/s in all: about 2 on the canary.
    let load = Load::start(s.proxy.addr, 4, 2);
    let started = Instant::now();
    let reverted = wait_until(Duration::from_secs(30), || async {
        weights(&s.proxy) == [100, 0]
    })
    .await;
    let failed = load.stop().await;
    assert!(
        reverted,
        "a thin canary failing every request was never rolled back"
    );
    eprintln!(
        "thin canary (~2 req/s, 100% failing): rolled back after {:.1}s and {failed} failed requests",
        started.elapsed().as_secs_f64()
    );
    let rolled = events(&s.proxy)
        .await
        .into_iter()
        .find(|e| e["kind"] == "rolled_back")
        .unwrap();
    assert_eq!(rolled["details"]["basis"], "exposure", "{rolled}");
    assert!(
        rolled["details"]["candidate"]["requests"].as_u64().unwrap() < 50,
        "{rolled}"
    );
}

/// The canary fails half its requests under load until the dry-run guard reports it;
/// weights stay. The load keeps going.
async fn break_canary_in_dry_run(s: &Shop, rate: u64, clients: u64) -> Load {
    s.canary.set_faults(Faults::errors(0.5));
    let load = Load::start(s.proxy.addr, rate, clients);
    let reported = wait_until(Duration::from_secs(20), || async {
        events(&s.proxy)
            .await
            .iter()
            .any(|e| e["kind"] == "rollback_dry_run")
    })
    .await;
    assert!(reported);
    assert_eq!(weights(&s.proxy), [90, 10]);
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_and_keeps_weights() {
    let s = setup(
        (90, 10),
        "mode = \"dry-run\"\ninterval = \"200ms\"\nmin_requests = 20\nmax_error_rate = 0.05\n",
    )
    .await;
    let load = break_canary_in_dry_run(&s, 500, 16).await;
    load.stop().await;
    let metrics = get(&client(), s.proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains(
            "weir_guard_dry_run_rollbacks_total{service=\"shop\",reason=\"error_rate\"} 1"
        ),
        "{metrics}"
    );
    // The enforce-mode counters exist from the start (so `increase()` sees a first
    // rollback) and stay at 0 in dry-run.
    let rollbacks: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("weir_rollbacks_total{"))
        .collect();
    assert_eq!(rollbacks.len(), 4, "{metrics}");
    assert!(rollbacks.iter().all(|l| l.ends_with(" 0")), "{metrics}");
    assert_eq!(service(&s.proxy).await["health"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_the_disk_refuses_still_moves_traffic_and_is_saved_later() {
    let s = setup(
        (90, 10),
        "interval = \"200ms\"\nmin_requests = 20\nmax_error_rate = 0.05\n",
    )
    .await;
    let load = Load::start(s.proxy.addr, 300, 8);
    warm_up(&s.proxy, &s.canary, 30).await;
    // The state file's temp path becomes a non-empty directory: every save fails (as
    // on a full or broken disk), while the saved state stays readable.
    let blocker = s
        .proxy
        .state_dir
        .join(format!("state.json.tmp.{}", std::process::id()));
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let saved = std::fs::read_to_string(s.proxy.state_dir.join("state.json")).unwrap();
    s.canary.set_faults(Faults::errors(1.0));
    let reverted = wait_until(Duration::from_secs(10), || async {
        weights(&s.proxy) == [100, 0]
    })
    .await;
    load.stop().await;
    assert!(
        reverted,
        "a rollback that cannot be saved must still move traffic"
    );
    let doc = service(&s.proxy).await;
    assert_eq!(doc["not_durable"], true, "{doc}");
    assert_eq!(doc["health"], "degraded");
    let metrics = get(&client(), s.proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains("weir_state_unsaved_changes 1"),
        "{metrics}"
    );
    // Nothing was written: the file on disk still has the old weights.
    assert_eq!(
        std::fs::read_to_string(s.proxy.state_dir.join("state.json")).unwrap(),
        saved
    );
    // The disk recovers: the guard's loop saves the rollback and journals its event.
    std::fs::remove_dir_all(&blocker).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            service(&s.proxy).await["not_durable"] == false
        })
        .await
    );
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(s.proxy.state_dir.join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        on_disk["services"]["shop"]["weights"]["canary"], 0,
        "{on_disk}"
    );
    let rolled = events(&s.proxy)
        .await
        .into_iter()
        .find(|e| e["kind"] == "rolled_back")
        .expect("the rollback is journaled once the disk allows");
    assert_eq!(rolled["details"]["not_durable"], true, "{rolled}");
    let metrics = get(&client(), s.proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains("weir_state_unsaved_changes 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_dry_run_to_enforce_by_reload_acts_on_a_breach_already_reported() {
    let slo = |mode: &str| {
        format!(
            "[service.slo]\nmode = \"{mode}\"\ninterval = \"200ms\"\nmin_requests = 20\nmax_error_rate = 0.05\n"
        )
    };
    let s = shop(None, (90, 10), &slo("dry-run")).await;
    let load = break_canary_in_dry_run(&s, 300, 8).await;
    // Same config, now enforcing: the breach that is still going on is acted on.
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            None,
            &[
                ("stable", vec![s.stable.addr().to_string()], 90),
                ("canary", vec![s.canary.addr().to_string()], 10),
            ],
        )
        + &slo("enforce");
    let mut config = weir::config::Config::parse(&toml, "reload.toml").unwrap();
    config.state.dir = s.proxy.state_dir.clone();
    s.proxy.controller.reload(&config, None).unwrap();
    let reverted = wait_until(Duration::from_secs(10), || async {
        weights(&s.proxy) == [100, 0]
    })
    .await;
    load.stop().await;
    assert!(
        reverted,
        "enforce mode after a reload must act on the breach"
    );
}
