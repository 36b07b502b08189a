//! Rollout plans on real sockets: every step kind, every verb and its errors, restart
//! mid-plan, blue/green preview and switch, and the guard ending a plan.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use weir::config::Config;
use weir_testkit::{Faults, UpstreamHandle};

struct Admin {
    addr: std::net::SocketAddr,
}

impl Admin {
    async fn post(&self, path: &str, body: Value) -> Answer {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/api/v1/services/{path}", self.addr))
            .header("content-type", "application/json")
            .body(full(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        send(&client(), req).await
    }

    async fn service(&self, name: &str) -> Value {
        get(
            &client(),
            self.addr,
            "localhost",
            &format!("/api/v1/services/{name}"),
        )
        .await
        .json()
    }

    async fn events(&self) -> Vec<Value> {
        get(
            &client(),
            self.addr,
            "localhost",
            "/api/v1/events?limit=1000",
        )
        .await
        .json()["events"]
            .as_array()
            .unwrap()
            .clone()
    }
}

fn weights(s: &Value) -> Vec<u64> {
    s["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["weight"].as_u64().unwrap())
        .collect()
}

/// The shop service with both pools; a `strategy = ...` first line of `extra` goes
/// where TOML needs it, among the service's own keys.
fn config(stable: &UpstreamHandle, canary: &UpstreamHandle, extra: &str) -> String {
    let (strategy, extra) = match extra.strip_prefix("strategy") {
        Some(_) => extra.split_once('\n').unwrap(),
        None => ("", extra),
    };
    let service = service_toml(
        "shop",
        None,
        &[
            ("stable", vec![stable.addr().to_string()], 100),
            ("canary", vec![canary.addr().to_string()], 0),
        ],
    )
    .replacen(
        "name = \"shop\"\n",
        &format!("name = \"shop\"\n{strategy}\n"),
        1,
    );
    proxy_toml("") + &service + extra
}

/// Poll the service until `ok` holds (or fail after a deadline); returns it.
async fn wait_shop(admin: &Admin, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_service(admin.addr, "shop", what, Duration::from_secs(20), ok).await
}

async fn wait_phase(admin: &Admin, phase: &str) -> Value {
    wait_shop(admin, &format!("reached {phase}"), |s| {
        s["rollout"]["phase"] == phase
    })
    .await
}

async fn wait_step(admin: &Admin, index: u64) -> Value {
    wait_shop(admin, &format!("reached step {index}"), |s| {
        s["rollout"]["step_index"] == index
    })
    .await
}

const CANARY_PLAN: &str = r#"strategy = "canary"
[service.rollout]
candidate = "canary"
steps = [
  { percent = 10 },
  { pause = "300ms" },
  { percent = 0.5 },
  { pause = "manual" },
  { percent = 100 },
]
"#;

#[tokio::test]
async fn canary_plan_runs_its_steps_and_promotes() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let proxy = start(&config(&stable, &canary, CANARY_PLAN)).await;
    let admin = Admin { addr: proxy.admin };
    let idle = admin.service("shop").await;
    assert_eq!(idle["rollout"]["phase"], "idle");
    assert_eq!(idle["plan"]["strategy"], "canary");
    assert_eq!(idle["plan"]["steps"][1], "pause 300ms");

    let a = admin.post("shop/rollout", json!({})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["rollout"]["phase"], "progressing");
    assert_eq!(
        weights(&a.json()),
        [9000, 1000],
        "the first step applies at once"
    );
    // A second start is refused while the first runs.
    let again = admin.post("shop/rollout", json!({})).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(
        again.error().contains("already progressing"),
        "{}",
        again.error()
    );

    // 10%, then the timed pause, then 0.5%, then the manual pause holds.
    let s = wait_step(&admin, 3).await;
    assert_eq!(weights(&s), [9950, 50]);
    assert_eq!(s["rollout"]["step"], "pause until promoted");
    assert_eq!(s["rollout"]["waiting_for"], "promote (manual pause)");
    let events = admin.events().await;
    let kinds: Vec<String> = event_kinds(&events);
    // The start applied the first percent step at once; the end of the timed pause
    // entered step 3 and applied its 0.5% in one change: one event per step, never a
    // second "step 3" a driver tick later.
    assert_eq!(kinds, ["rollout_started", "rollout_step"]);
    let step = &events[1];
    assert_eq!(
        step["reason"], "timed pause over; step 3: 0.5% to the candidate",
        "{step}"
    );
    assert_eq!(step["source"], "rollout");
    assert_eq!(step["to"], json!({"stable": 9950, "canary": 50}), "{step}");
    let c = client();
    let canary_hits = {
        let mut n = 0;
        for _ in 0..200 {
            n += usize::from(get(&c, proxy.addr, "x", "/").await.upstream() == "canary");
        }
        n
    };
    assert!(canary_hits < 10, "0.5% sent {canary_hits} of 200");

    let p = admin.post("shop/promote", json!({})).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text());
    let done = wait_phase(&admin, "promoted").await;
    assert_eq!(weights(&done), [0, 10000]);
    assert_eq!(
        done["baseline"], "canary",
        "the candidate is the new baseline"
    );
    let events = admin.events().await;
    let promoted = events
        .iter()
        .find(|e| e["kind"] == "rollout_promoted")
        .unwrap();
    // The operator's promote passed the manual pause and the last step applied at once.
    assert_eq!(promoted["source"], "admin");
    let operator = events.iter().filter(|e| e["source"] == "admin").count();
    assert_eq!(operator, 2, "start and promote are the operator's");
    // Metrics say so too.
    let metrics = get(&client(), proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains("weir_rollout_phase{service=\"shop\",phase=\"promoted\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("weir_rollout_phase{service=\"shop\",phase=\"progressing\"} 0"));
    assert!(metrics.contains("weir_rollout_step{service=\"shop\"} 5"));

    // The next release goes the other way: with two pools, the candidate defaults to
    // the one that is not the baseline now.
    let next = admin.post("shop/rollout", json!({})).await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    assert_eq!(next.json()["rollout"]["candidate"], "stable");
    assert_eq!(next.json()["rollout"]["stable"], "canary");
}

#[tokio::test]
async fn verbs_refuse_the_wrong_phase_and_unknown_services() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let toml = config(&stable, &canary, CANARY_PLAN)
        + &service_toml(
            "plain",
            Some(&["plain.example.com"]),
            &[("only", vec![stable.addr().to_string()], 1)],
        );
    let proxy = start(&toml).await;
    let admin = Admin { addr: proxy.admin };
    for verb in ["promote", "pause", "resume", "abort", "retry"] {
        let a = admin.post(&format!("shop/{verb}"), json!({})).await;
        assert_eq!(
            a.status,
            StatusCode::CONFLICT,
            "{verb} before any rollout: {}",
            a.text()
        );
    }
    for verb in ["rollout", "promote", "abort"] {
        let a = admin.post(&format!("nope/{verb}"), json!({})).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{verb}");
    }
    let no_plan = admin.post("plain/rollout", json!({})).await;
    assert_eq!(no_plan.status, StatusCode::CONFLICT);
    assert!(
        no_plan.error().contains("no rollout plan"),
        "{}",
        no_plan.error()
    );
    let bad = admin
        .post("shop/rollout", json!({"candidate": "nope"}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let bad = admin.post("shop/promote", json!({"full": "yes"})).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let get_verb = get(
        &client(),
        proxy.admin,
        "localhost",
        "/api/v1/services/shop/promote",
    )
    .await;
    assert_eq!(get_verb.status, StatusCode::METHOD_NOT_ALLOWED);

    assert_eq!(
        admin.post("shop/rollout", json!({})).await.status,
        StatusCode::OK
    );
    wait_step(&admin, 1).await;
    assert_eq!(
        admin.post("shop/resume", json!({})).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        admin.post("shop/retry", json!({})).await.status,
        StatusCode::CONFLICT
    );
    // Pause holds the plan: the 300 ms pause would long be over.
    let paused = admin.post("shop/pause", json!({})).await;
    assert_eq!(paused.json()["rollout"]["phase"], "paused");
    assert_eq!(
        admin.post("shop/pause", json!({})).await.status,
        StatusCode::CONFLICT
    );
    let held = admin.service("shop").await;
    assert_eq!(
        held["rollout"]["waiting_for"],
        "resume (paused by an operator)"
    );
    let resumed = admin.post("shop/resume", json!({})).await;
    assert_eq!(resumed.json()["rollout"]["phase"], "progressing");
    wait_step(&admin, 3).await;
    // Abort: all traffic back to stable.
    let aborted = admin.post("shop/abort", json!({})).await;
    assert_eq!(aborted.status, StatusCode::OK);
    assert_eq!(aborted.json()["rollout"]["phase"], "aborted");
    assert_eq!(weights(&aborted.json()), [10000, 0]);
    let c = client();
    for _ in 0..30 {
        assert_eq!(get(&c, proxy.addr, "x", "/").await.upstream(), "stable");
    }
    // Retry starts again from step 1.
    let retried = admin.post("shop/retry", json!({})).await;
    assert_eq!(retried.status, StatusCode::OK);
    // Back at step 1, whose 10% is applied in the same answer.
    assert_eq!(retried.json()["rollout"]["step_index"], 1);
    assert_eq!(weights(&retried.json()), [9000, 1000]);
    // Full promote jumps to the end.
    let full = admin.post("shop/promote", json!({"full": true})).await;
    assert_eq!(full.json()["rollout"]["phase"], "promoted");
    assert_eq!(weights(&full.json()), [0, 10000]);
}

#[tokio::test]
async fn a_rollout_resumes_where_it_was_after_a_restart() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let plan = CANARY_PLAN.replace("\"300ms\"", "\"1h\"");
    let toml = config(&stable, &canary, &plan);
    let mut cfg = Config::parse(&toml, "t").unwrap();
    cfg.state.dir = temp_dir("rollout-restart");
    let first = start_config(cfg.clone(), None, Vec::new()).await;
    let admin = Admin { addr: first.admin };
    admin.post("shop/rollout", json!({})).await;
    let before = wait_step(&admin, 1).await;
    let deadline = before["rollout"]["deadline"].clone();
    assert!(deadline.is_string());
    drop(first);
    let second = start_config(cfg, None, Vec::new()).await;
    let admin = Admin { addr: second.admin };
    let after = admin.service("shop").await;
    assert_eq!(after["rollout"]["phase"], "progressing");
    assert_eq!(after["rollout"]["step_index"], 1);
    assert_eq!(
        after["rollout"]["deadline"], deadline,
        "the timed pause kept its deadline"
    );
    assert_eq!(weights(&after), [9000, 1000]);
    assert!(
        after["rollout"]["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("timed pause: 59m")
    );
}

const BLUE_GREEN: &str = r#"strategy = "blue-green"
[service.rollout]
candidate = "canary"
rollback_window = "1h"
[service.slo]
interval = "200ms"
min_requests = 20
max_error_rate = 0.05
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_previews_switches_and_switches_back_on_a_breach() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let proxy = start(&config(&stable, &canary, BLUE_GREEN)).await;
    let admin = Admin { addr: proxy.admin };
    let started = admin.post("shop/rollout", json!({})).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text());
    let s = admin.service("shop").await;
    assert_eq!(s["rollout"]["step"], "preview (targeted requests only)");
    assert_eq!(weights(&s), [10000, 0]);
    let c = client();
    // Live traffic stays on the active pool; testers reach the preview by header.
    for _ in 0..20 {
        assert_eq!(get(&c, proxy.addr, "x", "/").await.upstream(), "stable");
    }
    let preview = send(
        &c,
        Request::get(format!("http://{}/", proxy.addr))
            .header("x-weir-pool", "canary")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(preview.upstream(), "canary");
    // Promote: 100% at once, then the rollback window.
    assert_eq!(
        admin.post("shop/promote", json!({})).await.status,
        StatusCode::OK
    );
    let s = wait_step(&admin, 2).await;
    assert_eq!(weights(&s), [0, 10000]);
    assert!(
        s["rollout"]["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("rollback window")
    );
    // The new active pool breaks inside the window: the guard switches back.
    canary.set_faults(Faults::errors(0.5));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let addr = proxy.addr;
        tokio::spawn(async move {
            let c = client();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                get(&c, addr, "x", "/").await;
            }
        })
    };
    let s = wait_phase(&admin, "degraded").await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(weights(&s), [10000, 0], "back on the old active pool");
    assert_eq!(s["baseline"], "stable");
    assert_eq!(s["health"], "degraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evidence_gate_waits_for_passing_traffic_and_a_breach_ends_the_plan() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let plan = r#"strategy = "canary"
[service.rollout]
candidate = "canary"
steps = [ { percent = 50 }, { gate = { min_requests = 150 } }, { percent = 100 } ]
[service.slo]
interval = "200ms"
min_requests = 20
max_error_rate = 0.05
"#;
    let proxy = start(&config(&stable, &canary, plan)).await;
    let admin = Admin { addr: proxy.admin };
    admin.post("shop/rollout", json!({})).await;
    let s = wait_step(&admin, 1).await;
    assert!(
        s["rollout"]["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("evidence: 0/150"),
        "{}",
        s["rollout"]
    );
    // No traffic: time alone never passes the gate.
    let c = client();
    let held = admin.service("shop").await;
    assert_eq!(held["rollout"]["step_index"], 1);
    // Healthy traffic passes it.
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let passed = wait_until(Duration::from_secs(30), || {
        let c = c.clone();
        let (admin, sent) = (&admin, &sent);
        async move {
            for _ in 0..20 {
                get(&c, proxy.addr, "x", "/").await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            admin.service("shop").await["rollout"]["phase"] == "promoted"
        }
    })
    .await;
    let sent = sent.load(Ordering::Relaxed);
    assert!(passed, "gate never passed after {sent} requests");
    assert!(sent >= 150, "passed after only {sent} requests");
    let events = admin.events().await;
    assert!(events.iter().any(|e| {
        e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("evidence gate passed")
    }));

    // Next release (stable is now the candidate), broken: the guard ends the plan.
    let again = admin.post("shop/rollout", json!({})).await;
    assert_eq!(again.json()["rollout"]["candidate"], "stable");
    stable.set_faults(Faults::errors(0.6));
    let degraded = wait_until(Duration::from_secs(30), || {
        let c = c.clone();
        let admin = &admin;
        async move {
            for _ in 0..20 {
                get(&c, proxy.addr, "x", "/").await;
            }
            admin.service("shop").await["rollout"]["phase"] == "degraded"
        }
    })
    .await;
    assert!(degraded, "guard did not end the broken rollout");
    let s = admin.service("shop").await;
    assert_eq!(weights(&s), [0, 10000], "back on canary, the baseline");
}
