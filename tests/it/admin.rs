//! The admin API on real sockets: every route and error case, auth, durable state and
//! events, reload, and weight changes under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::common::*;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use weir::config::Config;

struct Admin {
    addr: SocketAddr,
    token: Option<String>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        TestBody,
    >,
}

impl Admin {
    fn new(addr: SocketAddr) -> Admin {
        Admin {
            addr,
            token: None,
            client: client(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let body = body.map_or_else(empty, |b| full(serde_json::to_vec(&b).unwrap()));
        send(&self.client, req.body(body).unwrap()).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None, &[]).await
    }

    async fn put_weights(&self, service: &str, body: Value) -> Answer {
        self.call(
            Method::PUT,
            &format!("/api/v1/services/{service}/weights"),
            Some(body),
            &[],
        )
        .await
    }

    async fn events(&self) -> Vec<Value> {
        self.get("/api/v1/events?limit=1000").await.json()["events"]
            .as_array()
            .unwrap()
            .clone()
    }
}

async fn shop_admin() -> (
    Proxy,
    Admin,
    weir_testkit::UpstreamHandle,
    weir_testkit::UpstreamHandle,
) {
    let s = shop(Some(&["shop.example.com"]), (90, 10), "").await;
    let admin = Admin::new(s.proxy.admin);
    (s.proxy, admin, s.stable, s.canary)
}

#[tokio::test]
async fn health_and_readiness() {
    let (_p, admin, _s, _c) = shop_admin().await;
    let h = admin.get("/healthz").await;
    assert_eq!((h.status, h.text().as_str()), (StatusCode::OK, "ok\n"));
    assert_eq!(admin.get("/readyz").await.status, StatusCode::OK);
    let missing = admin.get("/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.json()["error"].is_string());
}

#[tokio::test]
async fn services_are_listed_with_the_documented_shape() {
    let (_p, admin, stable, _c) = shop_admin().await;
    let all = admin.get("/api/v1/services").await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.headers["content-type"], "application/json");
    let s = &all.json()["services"][0];
    assert_eq!(s["name"], "shop");
    assert_eq!(s["hosts"], json!(["shop.example.com"]));
    assert_eq!(s["baseline"], "stable");
    assert_eq!(s["version"], 1);
    assert_eq!(s["updated_by"], "config");
    assert!(s["updated_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s["pools"][0]["name"], "stable");
    assert_eq!(s["pools"][0]["weight"], 90);
    assert_eq!(s["pools"][0]["share"], 0.9);
    assert_eq!(
        s["pools"][0]["endpoints"],
        json!([stable.addr().to_string()])
    );
    assert_eq!(s["pools"][1]["name"], "canary");
    let one = admin.get("/api/v1/services/shop").await;
    assert_eq!(one.json(), *s);
    assert_eq!(one.headers["etag"], "\"1\"");
    let unknown = admin.get("/api/v1/services/nope").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["error"], "unknown service `nope`");
}

#[tokio::test]
async fn put_weights_changes_routing_and_records_an_event() {
    let (proxy, admin, _s, _c) = shop_admin().await;
    let a = admin
        .put_weights(
            "shop",
            json!({"weights": {"stable": 0, "canary": 5}, "reason": "try canary"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let s = a.json();
    assert_eq!(s["version"], 2);
    assert_eq!(s["updated_by"], "admin");
    assert_eq!(
        pool_weights(&s),
        [("stable".into(), 0), ("canary".into(), 5)]
    );
    assert_eq!(s["pools"][1]["share"], 1.0);
    let c = client();
    for _ in 0..20 {
        assert_eq!(
            get(&c, proxy.addr, "shop.example.com", "/")
                .await
                .upstream(),
            "canary"
        );
    }
    let events = admin.events().await;
    let e = events
        .iter()
        .find(|e| e["kind"] == "weights_changed")
        .expect("event");
    assert_eq!(e["service"], "shop");
    assert_eq!(e["source"], "admin");
    assert_eq!(e["from"], json!({"stable": 90, "canary": 10}));
    assert_eq!(e["to"], json!({"stable": 0, "canary": 5}));
    assert_eq!(e["reason"], "try canary");
    assert!(e["actor"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(e["id"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn bad_weight_requests_are_400_and_change_nothing() {
    let (_p, admin, _s, _c) = shop_admin().await;
    let before_events = admin.events().await.len();
    let cases = [
        (
            json!({"weights": {"stable": 1}}),
            "missing weight for pool(s) canary",
        ),
        (
            json!({"weights": {"stable": 1, "canary": 1, "blue": 1}}),
            "no pool `blue`",
        ),
        (json!({"weights": {"stable": -1, "canary": 1}}), "negative"),
        (
            json!({"weights": {"stable": 1.5, "canary": 1}}),
            "whole number",
        ),
        (
            json!({"weights": {"stable": "ten", "canary": 1}}),
            "must be a number",
        ),
        (
            json!({"weights": {"stable": 0, "canary": 0}}),
            "all weights are zero",
        ),
        (
            json!({"weight": {"stable": 1, "canary": 1}}),
            "unknown field `weight`",
        ),
        (json!([1, 2]), "JSON object"),
    ];
    for (body, needle) in cases {
        let a = admin.put_weights("shop", body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        let msg = a.error();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let malformed = admin
        .call(
            Method::PUT,
            "/api/v1/services/shop/weights",
            None,
            &[("content-type", "application/json")],
        )
        .await;
    // An empty body is `{}`: weights are missing.
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    let mut req = Request::put(format!(
        "http://{}/api/v1/services/shop/weights",
        admin.addr
    ))
    .header("content-type", "application/json")
    .body(full("{\"weights\": {"))
    .unwrap();
    let a = send(
        &admin.client,
        std::mem::replace(&mut req, Request::new(empty())),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.error().starts_with("malformed JSON"), "{}", a.error());
    let unknown = admin
        .put_weights("nope", json!({"weights": {"a": 1}}))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let s = admin.get("/api/v1/services/shop").await.json();
    assert_eq!(s["version"], 1);
    assert_eq!(
        pool_weights(&s),
        [("stable".into(), 90), ("canary".into(), 10)]
    );
    assert_eq!(
        admin.events().await.len(),
        before_events,
        "an error wrote an event"
    );
}

#[tokio::test]
async fn if_match_detects_a_concurrent_change() {
    let (_p, admin, _s, _c) = shop_admin().await;
    let body = json!({"weights": {"stable": 50, "canary": 50}});
    let ok = admin
        .call(
            Method::PUT,
            "/api/v1/services/shop/weights",
            Some(body.clone()),
            &[("if-match", "1")],
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let stale = admin
        .call(
            Method::PUT,
            "/api/v1/services/shop/weights",
            Some(body.clone()),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
    assert!(stale.error().contains("version 2"), "{}", stale.error());
    let bad = admin
        .call(
            Method::PUT,
            "/api/v1/services/shop/weights",
            Some(body),
            &[("if-match", "abc")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        admin.get("/api/v1/services/shop").await.json()["version"],
        2
    );
}

#[tokio::test]
async fn methods_and_content_types_are_enforced() {
    let (_p, admin, _s, _c) = shop_admin().await;
    let get = admin.get("/api/v1/services/shop/weights").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers["allow"], "PUT");
    let get = admin.get("/api/v1/services/shop/rollback").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    let post_ro = admin
        .call(Method::POST, "/api/v1/services", Some(json!({})), &[])
        .await;
    assert_eq!(post_ro.status, StatusCode::METHOD_NOT_ALLOWED);
    let form = Request::put(format!(
        "http://{}/api/v1/services/shop/weights",
        admin.addr
    ))
    .header("content-type", "application/x-www-form-urlencoded")
    .body(full("weights=1"))
    .unwrap();
    let a = send(&admin.client, form).await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // A body without a Content-Type is refused even where the body is optional.
    let no_type = Request::post(format!(
        "http://{}/api/v1/services/shop/rollback",
        admin.addr
    ))
    .body(full("{}"))
    .unwrap();
    let a = send(&admin.client, no_type).await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", a.text());
    assert_eq!(
        admin.get("/api/v1/services/shop").await.json()["version"],
        1
    );
}

#[tokio::test]
async fn rollback_sends_all_traffic_to_the_baseline() {
    let (proxy, admin, _s, _c) = shop_admin().await;
    let a = admin
        .call(
            Method::POST,
            "/api/v1/services/shop/rollback",
            Some(json!({"reason": "bad canary"})),
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(
        pool_weights(&a.json()),
        [("stable".into(), 100), ("canary".into(), 0)]
    );
    let c = client();
    for _ in 0..50 {
        assert_eq!(
            get(&c, proxy.addr, "shop.example.com", "/")
                .await
                .upstream(),
            "stable"
        );
    }
    let e = admin.events().await.pop().unwrap();
    assert_eq!(
        (e["kind"].as_str(), e["reason"].as_str()),
        (Some("rolled_back"), Some("bad canary"))
    );
    let unknown = admin
        .call(
            Method::POST,
            "/api/v1/services/nope/rollback",
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn events_paginate_oldest_first() {
    let (_p, admin, _s, _c) = shop_admin().await;
    for w in 1..=5 {
        let a = admin
            .put_weights("shop", json!({"weights": {"stable": w, "canary": 1}}))
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let all = admin.events().await;
    assert_eq!(all.len(), 5);
    let ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let page = admin
        .get(&format!("/api/v1/events?since={}&limit=2", ids[1]))
        .await
        .json();
    let page_ids: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(page_ids, ids[2..4]);
    assert_eq!(
        admin.get("/api/v1/events?limit=0").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn token_is_required_when_set() {
    let up = upstream("stable").await;
    let dir = temp_dir("token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let toml = format!("[admin]\ntoken_file = \"{}\"\n", token_file.display())
        + &service_toml("shop", None, &[("stable", vec![up.addr().to_string()], 1)]);
    let proxy = start(&toml).await;
    let mut admin = Admin::new(proxy.admin);
    assert_eq!(admin.get("/healthz").await.status, StatusCode::OK);
    let none = admin.get("/api/v1/services").await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(
        none.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert!(none.json()["error"].is_string());
    admin.token = Some("wrong".into());
    let wrong = admin
        .put_weights("shop", json!({"weights": {"stable": 2}}))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    admin.token = Some("s3cret-token".into());
    assert_eq!(admin.get("/api/v1/services").await.status, StatusCode::OK);
    let ok = admin
        .put_weights("shop", json!({"weights": {"stable": 2}}))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["version"], 2);
}

#[test]
fn open_admin_without_token_refuses_to_start() {
    let toml = "[admin]\nlisten = \"0.0.0.0:9901\"\n".to_owned()
        + &service_toml("s", None, &[("p", vec!["127.0.0.1:1".into()], 1)]);
    let mut config = Config::parse(&toml, "t").unwrap();
    config.state.dir = temp_dir("open-admin");
    // Only this test in this binary touches the variable.
    let err = weir::Weir::new(config, None).unwrap_err().to_string();
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("WEIR_ADMIN_TOKEN"), "{err}");
}

#[tokio::test]
async fn reload_applies_a_valid_file_and_rejects_a_bad_one() {
    let stable = upstream("stable").await;
    let canary = upstream("canary").await;
    let green = upstream("green").await;
    let dir = temp_dir("reload");
    let path = dir.join("weir.toml");
    let state = format!("[state]\ndir = \"{}\"\n", dir.join("state").display());
    let v1 = state.clone()
        + &service_toml(
            "shop",
            None,
            &[
                ("stable", vec![stable.addr().to_string()], 100),
                ("canary", vec![canary.addr().to_string()], 0),
            ],
        );
    std::fs::write(&path, &v1).unwrap();
    let config = Config::load(&path).unwrap();
    let proxy = start_config(config, Some(path.clone()), Vec::new()).await;
    let admin = Admin::new(proxy.admin);
    // Operator moves weights at run time; a reload with the same pools keeps them.
    admin
        .put_weights("shop", json!({"weights": {"stable": 0, "canary": 1}}))
        .await;
    let v2 = v1.replace(&canary.addr().to_string(), &green.addr().to_string());
    std::fs::write(&path, &v2).unwrap();
    let r = admin
        .call(Method::POST, "/api/v1/reload", Some(json!({})), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["event"]["kind"], "config_reloaded");
    // The typed view: the event's details are the reload's report.
    let reloaded: weir::api::ReloadDoc = typed(&r);
    let report: weir::api::ReloadReport = serde_json::from_value(reloaded.event.details).unwrap();
    assert_eq!(report.kept, ["shop"]);
    let c = client();
    for _ in 0..20 {
        // Runtime weights kept (all to canary), canary's endpoint replaced by green's.
        assert_eq!(get(&c, proxy.addr, "x", "/").await.upstream(), "green");
    }
    // A broken file: 400 with the same messages as `weir check`, old config kept.
    std::fs::write(&path, v2.replace("weight = 100", "weight = -3")).unwrap();
    let r = admin
        .call(Method::POST, "/api/v1/reload", Some(json!({})), &[])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let body = r.json();
    let problem = body["problems"][0].as_str().unwrap();
    let rejected: weir::api::ErrorBody = typed(&r);
    assert_eq!(rejected.problems.unwrap()[0], problem);
    assert!(
        problem.contains("service[shop].pools.stable.weight"),
        "{problem}"
    );
    assert!(
        problem.starts_with(&path.display().to_string()),
        "{problem}"
    );
    assert_eq!(get(&c, proxy.addr, "x", "/").await.upstream(), "green");
    let kinds: Vec<String> = event_kinds(&admin.events().await);
    assert_eq!(
        kinds,
        ["weights_changed", "config_reloaded", "config_rejected"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_change_200_times_under_load_without_errors_or_misroutes() {
    let (proxy, _admin, _s, _c) = shop_admin().await;
    // Requests to complete inside each phase after its change was acknowledged.
    const PER_PHASE: usize = 100;
    const CHANGES: usize = 200;
    // Phases cycle: all stable, all canary, half/half.
    let phases = [(1u32, 0u32), (0, 1), (1, 1)];
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let epoch = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (done, stop) = (done.clone(), stop.clone());
        let addr = proxy.addr;
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = epoch.elapsed();
                let a = get(&c, addr, "shop.example.com", "/").await;
                let got = epoch.elapsed();
                seen.push((sent, got, a.status, a.upstream().to_owned()));
                done.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    // (time the change was acknowledged, time the next change started, phase)
    let mut windows = Vec::new();
    for i in 0..CHANGES {
        let (s, c) = phases[i % phases.len()];
        let started = epoch.elapsed();
        proxy.set_weights("shop", &[("stable", s), ("canary", c)]);
        if let Some(last) = windows.last_mut() {
            let (_, end, _): &mut (std::time::Duration, std::time::Duration, usize) = last;
            *end = started;
        }
        windows.push((epoch.elapsed(), std::time::Duration::MAX, i % phases.len()));
        // Counted from the acknowledgement: a slow (fsynced) change must not
        // eat the phase, or every request in it would straddle a change.
        let target = done.load(Ordering::Relaxed) + PER_PHASE;
        let reached = wait_until(std::time::Duration::from_secs(30), || {
            let done = done.clone();
            async move { done.load(Ordering::Relaxed) >= target }
        })
        .await;
        assert!(reached, "load stalled at phase {i}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let total = all.len();
    assert!(total >= PER_PHASE * CHANGES);
    let failed: Vec<_> = all.iter().filter(|r| r.2 != StatusCode::OK).collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let (mut half_canary, mut half_total, mut checked) = (0usize, 0usize, 0usize);
    for (sent, got, _, upstream) in &all {
        // Only requests entirely inside one phase can be judged.
        let Some((_, _, phase)) = windows
            .iter()
            .find(|(from, to, _)| sent >= from && got <= to)
        else {
            continue;
        };
        checked += 1;
        match phases[*phase] {
            (1, 0) => assert_eq!(upstream, "stable", "misrouted in an all-stable phase"),
            (0, 1) => assert_eq!(upstream, "canary", "misrouted in an all-canary phase"),
            _ => {
                half_total += 1;
                half_canary += usize::from(upstream == "canary");
            }
        }
    }
    // With 32 requests in flight and 100 completed after each acknowledgement,
    // about a third of those straddle a change; the rest must be enough to judge.
    // (Requests completing while a change is being fsynced straddle it too, and their
    // number depends on the disk: they are not counted against the threshold.)
    assert!(
        checked > CHANGES * PER_PHASE / 3,
        "only {checked} of {total} requests fell inside one phase"
    );
    let share = half_canary as f64 / half_total as f64;
    assert!(
        (0.45..=0.55).contains(&share),
        "50:50 phases gave {share:.3} over {half_total}"
    );
}

#[tokio::test]
async fn series_counts_each_pools_requests_errors_and_p99_per_step() {
    let s = shop(Some(&["shop.example.com"]), (1, 1), "").await;
    let admin = Admin::new(s.proxy.admin);
    s.canary.set_faults(weir_testkit::Faults::errors(1.0));
    let c = client();
    for _ in 0..40 {
        get(&c, s.proxy.addr, "shop.example.com", "/").await;
    }
    let split = admin.get("/api/v1/services/shop").await.json();
    assert_eq!(split["version"], 1);
    // Points appear as the guard closes each (1 s) slice.
    let total = |p: &Value, key: &str| -> u64 {
        p[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum()
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let last = loop {
        let v = admin
            .get("/api/v1/services/shop/series?seconds=60")
            .await
            .json();
        let counted = total(&v["pools"][0], "requests") + total(&v["pools"][1], "requests");
        if counted == 40 {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(last["service"], "shop");
    let pools = last["pools"].as_array().unwrap();
    assert_eq!(pools[0]["name"], "stable");
    assert_eq!(pools[1]["name"], "canary");
    // Every canary answer was a 500; no stable answer was.
    assert_eq!(total(&pools[1], "errors"), total(&pools[1], "requests"));
    assert_eq!(total(&pools[0], "errors"), 0);
    assert!(total(&pools[0], "requests") > 0 && total(&pools[1], "requests") > 0);
    for p in pools {
        assert_eq!(p["step_secs"], 1.0);
        let n = p["requests"].as_array().unwrap().len();
        assert_eq!(p["errors"].as_array().unwrap().len(), n);
        assert_eq!(p["p99_ms"].as_array().unwrap().len(), n);
        assert!(n <= 60, "{p}");
        // A step with requests has a latency; an empty one has none.
        for (r, l) in p["requests"]
            .as_array()
            .unwrap()
            .iter()
            .zip(p["p99_ms"].as_array().unwrap())
        {
            assert_eq!(r.as_u64().unwrap() > 0, l.is_number(), "{p}");
        }
        let end = p["end_ms"].as_u64().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(end <= now && now - end < 10_000, "end {end}, now {now}");
    }
    // Bad queries and unknown services are refused.
    let bad = admin.get("/api/v1/services/shop/series?seconds=0").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.error().contains("seconds must be 1..=600"),
        "{}",
        bad.text()
    );
    let bad = admin.get("/api/v1/services/nope/series").await;
    assert_eq!(bad.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn events_tail_gives_the_newest() {
    let (proxy, admin, _s, _c) = shop_admin().await;
    for w in 1..=5 {
        proxy.set_weights("shop", &[("stable", w), ("canary", 1)]);
    }
    let events = admin.get("/api/v1/events?tail=2").await.json();
    let ids: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    let all = admin.events().await;
    let last = all.last().unwrap()["id"].as_u64().unwrap();
    assert_eq!(ids, [last - 1, last]);
    let bad = admin.get("/api/v1/events?tail=2&since=1").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.error().contains("tail cannot be combined"),
        "{}",
        bad.text()
    );
}

#[tokio::test]
async fn dashboard_page_is_self_contained_and_served_without_the_token() {
    let up = upstream("stable").await;
    let dir = temp_dir("dash-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let toml = format!("[admin]\ntoken_file = \"{}\"\n", token_file.display())
        + &service_toml("shop", None, &[("stable", vec![up.addr().to_string()], 1)]);
    let proxy = start(&toml).await;
    let admin = Admin::new(proxy.admin);
    let page = admin.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    // The SVG namespace is a name, not a fetch.
    let html = page
        .text()
        .replace("\"http://www.w3.org/2000/svg\"", "SVG_NS");
    assert!(html.contains("<title>weir</title>"));
    // Air-gapped: nothing is loaded from anywhere else.
    for needle in ["http://", "https://", "src=\"//", "@import", "url("] {
        assert!(!html.contains(needle), "the page refers to `{needle}`");
    }
    // The data behind it still needs the token.
    assert_eq!(
        admin.get("/api/v1/services").await.status,
        StatusCode::UNAUTHORIZED
    );
    let post = admin.call(Method::POST, "/", None, &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

/// An answer read off a raw connection.
struct Raw {
    status: u16,
    /// The status line and headers, lowercased.
    head: String,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Write `request` byte for byte (Host, Origin and framing exactly as given) on a fresh
/// connection and read until the server closes it, within a deadline.
async fn raw(addr: SocketAddr, request: &[u8]) -> Raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(request).await.unwrap();
        let mut out = Vec::new();
        conn.read_to_end(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .expect("no answer, or the connection stayed open, within 10 s");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    Raw {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// One request with exactly these headers (and `Content-Length` for a body), asking the
/// server to close afterwards.
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        r += &format!("{k}: {v}\r\n");
    }
    if !body.is_empty() {
        r += &format!("Content-Length: {}\r\n", body.len());
    }
    r += "Connection: close\r\n\r\n";
    r += body;
    r.into_bytes()
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const SWAP: &str = r#"{"weights":{"stable":0,"canary":1}}"#;

async fn shop_version(admin: &Admin) -> (u64, Vec<(String, u64)>) {
    let s = admin.get("/api/v1/services/shop").await.json();
    (s["version"].as_u64().unwrap(), pool_weights(&s))
}

#[tokio::test]
async fn foreign_hosts_are_misdirected_with_or_without_the_token() {
    let up = upstream("stable").await;
    let dir = temp_dir("host-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let toml = format!("[admin]\ntoken_file = \"{}\"\n", token_file.display())
        + &service_toml("shop", None, &[("stable", vec![up.addr().to_string()], 1)]);
    let proxy = start(&toml).await;
    let addr = proxy.admin;
    let port = addr.port();
    let bearer = "Bearer s3cret-token";
    let foreign = [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        format!("localhost.evil.example:{port}"),
        "x".to_owned(),
        format!("user@127.0.0.1:{port}"),
    ];
    for host in &foreign {
        for auth in [None, Some(bearer)] {
            for path in ["/api/v1/services", "/", "/metrics", "/nope"] {
                let mut headers = vec![("Host", host.as_str())];
                headers.extend(auth.map(|a| ("Authorization", a)));
                let a = raw(addr, &request("GET", path, &headers, "")).await;
                assert_eq!(a.status, 421, "{host} {path} {auth:?}: {}", a.body);
                assert!(
                    a.head.contains("content-type: application/json"),
                    "{}",
                    a.head
                );
                assert!(
                    a.json()["error"].as_str().unwrap().contains("Host"),
                    "{}",
                    a.body
                );
            }
        }
        // Probes are exempt: an orchestrator may name us as it likes.
        for path in ["/healthz", "/readyz"] {
            let a = raw(addr, &request("GET", path, &[("Host", host)], "")).await;
            assert_eq!(a.status, 200, "{host} {path}");
        }
    }
    // Our own names, with or without the port, in any case.
    let ours = [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("LocalHost.:{port}"),
        format!("[::1]:{port}"),
    ];
    for host in &ours {
        let headers = [("Host", host.as_str()), ("Authorization", bearer)];
        let a = raw(addr, &request("GET", "/api/v1/services", &headers, "")).await;
        assert_eq!(a.status, 200, "{host}: {}", a.body);
        assert_eq!(a.json()["services"][0]["name"], "shop");
        let page = raw(addr, &request("GET", "/", &[("Host", host)], "")).await;
        assert_eq!(page.status, 200, "{host}");
    }
    // The host in an absolute-form target wins over the header, so it must be ours too.
    let host = format!("127.0.0.1:{port}");
    let target = format!("http://evil.example:{port}/api/v1/services");
    let headers = [("Host", host.as_str()), ("Authorization", bearer)];
    let a = raw(addr, &request("GET", &target, &headers, "")).await;
    assert_eq!(a.status, 421, "{}", a.body);
    // No Host at all (HTTP/1.0), or two.
    let a = raw(addr, b"GET /api/v1/services HTTP/1.0\r\n\r\n").await;
    assert_eq!(a.status, 421, "{}", a.body);
    let two = [("Host", host.as_str()), ("Host", "evil.example")];
    let a = raw(addr, &request("GET", "/", &two, "")).await;
    assert_eq!(a.status, 421, "{}", a.body);
}

#[tokio::test]
async fn a_rebound_page_cannot_change_weights() {
    let (_p, admin, _s, _c) = shop_admin().await;
    let before = shop_version(&admin).await;
    // What a browser sends from `http://evil.example:PORT` once the name resolves to
    // 127.0.0.1: to the browser this is a same-origin request.
    let host = format!("evil.example:{}", admin.addr.port());
    let origin = format!("http://{host}");
    let headers = [("Host", host.as_str()), ("Origin", &origin), JSON];
    let put = request("PUT", "/api/v1/services/shop/weights", &headers, SWAP);
    let a = raw(admin.addr, &put).await;
    assert_eq!(a.status, 421, "{}", a.body);
    let post = request("POST", "/api/v1/services/shop/rollback", &headers, "");
    assert_eq!(raw(admin.addr, &post).await.status, 421);
    assert_eq!(shop_version(&admin).await, before);
    assert!(admin.events().await.iter().all(|e| e["source"] != "admin"));
}

#[tokio::test]
async fn cross_site_writes_are_forbidden_and_same_origin_ones_pass() {
    let (_p, admin, _s, _c) = shop_admin().await;
    let port = admin.addr.port();
    let ip_host = format!("127.0.0.1:{port}");
    let ip_origin = format!("http://{ip_host}");
    let before = shop_version(&admin).await;
    let refused: Vec<Vec<(&str, &str)>> = vec![
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "https://evil.example")],
        vec![("Origin", "null")],
        vec![("Origin", "http://127.0.0.1:1")],
        vec![("Origin", "http://127.0.0.1")],
        vec![("Origin", "ftp://127.0.0.1:1")],
        vec![("Origin", "garbage")],
        // Another origin on the same machine: the same site, not the same origin.
        vec![("Origin", "http://localhost:3000")],
        vec![("Origin", &ip_origin), ("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "same-site")],
    ];
    for extra in &refused {
        let mut headers = vec![("Host", ip_host.as_str()), JSON];
        headers.extend(extra.iter().copied());
        let put = request("PUT", "/api/v1/services/shop/weights", &headers, SWAP);
        let a = raw(admin.addr, &put).await;
        assert_eq!(a.status, 403, "{extra:?}: {}", a.body);
        assert!(a.json()["error"].is_string());
        let post = request("POST", "/api/v1/services/shop/rollback", &headers, "");
        assert_eq!(raw(admin.addr, &post).await.status, 403, "{extra:?}");
    }
    assert_eq!(shop_version(&admin).await, before);
    // Reads are not refused (a page cannot read the answer without CORS, never sent).
    let headers = [
        ("Host", ip_host.as_str()),
        ("Origin", "http://evil.example"),
    ];
    let a = raw(
        admin.addr,
        &request("GET", "/api/v1/services", &headers, ""),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(
        !a.head.contains("access-control-allow-origin"),
        "{}",
        a.head
    );
    // The dashboard's own calls: same origin, by IP or by localhost.
    let headers = [
        ("Host", ip_host.as_str()),
        ("Origin", &ip_origin),
        ("Sec-Fetch-Site", "same-origin"),
        JSON,
    ];
    let put = request("PUT", "/api/v1/services/shop/weights", &headers, SWAP);
    let a = raw(admin.addr, &put).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["version"], 2);
    let lh_host = format!("localhost:{port}");
    let lh_origin = format!("http://LOCALHOST:{port}");
    let headers = [("Host", lh_host.as_str()), ("Origin", &lh_origin), JSON];
    let body = r#"{"weights":{"stable":1,"canary":1}}"#;
    let put = request("PUT", "/api/v1/services/shop/weights", &headers, body);
    let a = raw(admin.addr, &put).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["version"], 3);
    // Behind a TLS-terminating proxy the page's origin is https on the same host.
    let headers = [
        ("Host", "localhost"),
        ("Origin", "https://localhost:443"),
        JSON,
    ];
    let put = request("PUT", "/api/v1/services/shop/weights", &headers, SWAP);
    let a = raw(admin.addr, &put).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Clients that are not browsers send no Origin.
    let a = admin
        .put_weights("shop", json!({"weights": {"stable": 9, "canary": 1}}))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
}

/// An admin API of our own, on its own port, with `body_timeout` and `allowed` hosts.
struct OwnAdmin {
    addr: SocketAddr,
    controller: Arc<weir::Controller>,
    _weir: weir::Weir,
    _up: weir_testkit::UpstreamHandle,
}

async fn own_admin(body_timeout: std::time::Duration, allowed: &[&str]) -> OwnAdmin {
    let up = upstream("stable").await;
    let ep = vec![up.addr().to_string()];
    let toml = service_toml(
        "shop",
        None,
        &[("stable", ep.clone(), 9), ("canary", ep, 1)],
    );
    let mut config = Config::parse(&toml, "t").unwrap();
    config.state.dir = temp_dir("own-admin");
    let weir = weir::Weir::new(config, None).unwrap();
    let admin = weir::Admin::new(
        Arc::clone(weir.controller()),
        Arc::clone(weir.guard()),
        weir::Metrics::new(),
        None,
        false,
        None,
    )
    .with_body_read_timeout(body_timeout)
    .with_allowed_hosts(allowed);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Arc::new(admin).serve(listener, std::future::pending()));
    OwnAdmin {
        addr,
        controller: Arc::clone(weir.controller()),
        _weir: weir,
        _up: up,
    }
}

impl OwnAdmin {
    fn version(&self) -> u64 {
        self.controller
            .router()
            .table()
            .service("shop")
            .unwrap()
            .snapshot()
            .version
    }
}

#[tokio::test]
async fn a_stalled_body_is_408_and_the_connection_closed() {
    let own = own_admin(std::time::Duration::from_millis(300), &[]).await;
    let host = format!("127.0.0.1:{}", own.addr.port());
    // Announces 40 bytes, sends 11, then nothing; no `Connection: close` from us, so an
    // EOF within the deadline means the server closed.
    let stalled = format!(
        "PUT /api/v1/services/shop/weights HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{{\"weights\":"
    );
    let started = Instant::now();
    let a = raw(own.addr, stalled.as_bytes()).await;
    assert_eq!(a.status, 408, "{}", a.body);
    assert!(a.head.contains("connection: close"), "{}", a.head);
    assert!(
        a.head.contains("content-type: application/json"),
        "{}",
        a.head
    );
    assert!(
        a.json()["error"].as_str().unwrap().contains("body"),
        "{}",
        a.body
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(own.version(), 1);
    // A body that arrives in time is served as usual.
    let headers = [("Host", host.as_str()), JSON];
    let put = request("PUT", "/api/v1/services/shop/weights", &headers, SWAP);
    let a = raw(own.addr, &put).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(own.version(), 2);
}

#[tokio::test]
async fn allowed_host_names_are_served() {
    let own = own_admin(weir::BODY_READ_TIMEOUT, &["weir", "Admin.Example."]).await;
    let port = own.addr.port();
    for host in [
        "weir".to_owned(),
        format!("weir:{port}"),
        "WEIR:9901".to_owned(),
        format!("admin.example:{port}"),
        "admin.example.".to_owned(),
    ] {
        let a = raw(
            own.addr,
            &request("GET", "/metrics", &[("Host", &host)], ""),
        )
        .await;
        assert_eq!(a.status, 200, "{host}: {}", a.body);
    }
    for host in ["weir.evil.example", "eweir", "example"] {
        let a = raw(own.addr, &request("GET", "/metrics", &[("Host", host)], "")).await;
        assert_eq!(a.status, 421, "{host}");
    }
    // Same origin by an allowed name.
    let host = format!("weir:{port}");
    let origin = format!("http://{host}");
    let headers = [("Host", host.as_str()), ("Origin", &origin), JSON];
    let put = request("PUT", "/api/v1/services/shop/weights", &headers, SWAP);
    assert_eq!(raw(own.addr, &put).await.status, 200);
    assert_eq!(own.version(), 2);
}

#[tokio::test]
async fn duplicate_json_keys_are_400_naming_the_key() {
    let (_p, admin, _s, _c) = shop_admin().await;
    let before = shop_version(&admin).await;
    let host = admin.addr.to_string();
    for (body, key) in [
        (
            r#"{"weights":{"stable":1,"canary":0,"canary":9}}"#,
            "canary",
        ),
        (
            r#"{"weights":{"stable":1,"canary":1},"weights":{"stable":0,"canary":1}}"#,
            "weights",
        ),
        // The same key spelled with an escape is the same key.
        (
            r#"{"weights":{"stable":1,"st\u0061ble":0,"canary":1}}"#,
            "stable",
        ),
    ] {
        let headers = [("Host", host.as_str()), JSON];
        let put = request("PUT", "/api/v1/services/shop/weights", &headers, body);
        let a = raw(admin.addr, &put).await;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        let msg = a.json()["error"].as_str().unwrap().to_owned();
        assert!(
            msg.contains(&format!("duplicate key `{key}`")),
            "{body}: {msg}"
        );
    }
    let headers = [("Host", host.as_str()), JSON];
    let body = r#"{"reason":"a","reason":"b"}"#;
    let post = request("POST", "/api/v1/services/shop/rollback", &headers, body);
    let a = raw(admin.addr, &post).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("duplicate key `reason`")
    );
    assert_eq!(shop_version(&admin).await, before);
}

#[tokio::test]
async fn bodyless_posts_need_no_content_type() {
    let (proxy, admin, _s, _c) = shop_admin().await;
    let host = admin.addr.to_string();
    // No body, no Content-Length, no Content-Type: `curl -X POST …/rollback`.
    let post = request(
        "POST",
        "/api/v1/services/shop/rollback",
        &[("Host", &host)],
        "",
    );
    let a = raw(admin.addr, &post).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        pool_weights(&a.json()),
        [("stable".into(), 100), ("canary".into(), 0)]
    );
    // Content-Length: 0 through a client that adds nothing else.
    proxy.set_weights("shop", &[("stable", 90), ("canary", 10)]);
    let a = admin
        .call(Method::POST, "/api/v1/services/shop/rollback", None, &[])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // The other routes whose body is optional get past the media type check too.
    for (path, status) in [
        ("/api/v1/services/shop/rollout", StatusCode::CONFLICT),
        ("/api/v1/services/shop/promote", StatusCode::CONFLICT),
        ("/api/v1/services/shop/pause", StatusCode::CONFLICT),
        ("/api/v1/reload", StatusCode::CONFLICT),
    ] {
        let a = admin.call(Method::POST, path, None, &[]).await;
        assert_eq!(a.status, status, "{path}: {}", a.text());
    }
    // A form, even an empty one, is still not JSON; nor are weights optional.
    let version = shop_version(&admin).await;
    for ct in ["application/x-www-form-urlencoded", "text/plain"] {
        let headers = [("Host", host.as_str()), ("Content-Type", ct)];
        let post = request("POST", "/api/v1/services/shop/rollback", &headers, "");
        assert_eq!(raw(admin.addr, &post).await.status, 415, "{ct}");
    }
    let put = request(
        "PUT",
        "/api/v1/services/shop/weights",
        &[("Host", &host)],
        "",
    );
    assert_eq!(raw(admin.addr, &put).await.status, 415);
    assert_eq!(shop_version(&admin).await, version);
}

/// The answer read as its `weir::api` type and written back is the answer read
/// untyped and written back: every field, `null` and left-out key the live server sends
/// is in the type, in the server's order.
fn typed<T: serde::Serialize + serde::de::DeserializeOwned>(a: &Answer) -> T {
    let text = a.text();
    let doc: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let untyped: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        serde_json::to_string(&doc).unwrap(),
        serde_json::to_string(&untyped).unwrap()
    );
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_its_api_type_field_for_field() {
    use weir::api;
    let plan = r#"[service.rollout]
candidate = "canary"
steps = [ { percent = 50 }, { pause = "manual" }, { percent = 100 } ]
[service.slo]
interval = "200ms"
min_requests = 20
max_error_rate = 0.05
breaches_to_act = 1
mode = "dry-run"
"#;
    let s = shop(None, (100, 0), plan).await;
    let admin = Admin::new(s.proxy.admin);
    let idle: api::ServiceDoc = typed(&admin.get("/api/v1/services/shop").await);
    assert_eq!(idle.rollout, api::RolloutDoc::Idle);
    assert_eq!(idle.plan.map(|p| p.steps.len()), Some(3));

    let started = admin
        .call(
            Method::POST,
            "/api/v1/services/shop/rollout",
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text());
    let started: api::ServiceDoc = typed(&started);
    assert_eq!(started.rollout.phase(), weir::model::Phase::Progressing);

    // A failing canary, judged (dry-run: nothing moves) until a breach is on record, and
    // in the journal.
    s.canary.set_faults(weir_testkit::Faults::errors(0.5));
    let c = client();
    let breached = wait_until(std::time::Duration::from_secs(30), || {
        let c = c.clone();
        let (admin, addr) = (&admin, s.proxy.addr);
        async move {
            for _ in 0..20 {
                get(&c, addr, "x", "/").await;
            }
            let doc: api::ServiceDoc = typed(&admin.get("/api/v1/services/shop").await);
            let events: api::EventList = typed(&admin.get("/api/v1/events?limit=1000").await);
            doc.guard
                .decisions
                .iter()
                .any(|d| d.verdict == api::Verdict::Breach)
                && events
                    .events
                    .iter()
                    .any(|e| e.kind == weir::model::EventKind::RollbackDryRun)
        }
    })
    .await;
    assert!(breached, "the guard never found the canary's breach");

    let list: api::ServiceList = typed(&admin.get("/api/v1/services").await);
    let shop = &list.services[0];
    assert!(shop.guard.enabled && shop.guard.pools.iter().all(|p| p.requests > 0));
    let api::RolloutDoc::Started(rollout) = &shop.rollout else {
        panic!("{:?}", shop.rollout)
    };
    assert!(rollout.last_decision.is_some());
    let series: api::SeriesDoc = typed(&admin.get("/api/v1/services/shop/series").await);
    assert_eq!(series.pools.len(), 2);
    let events: api::EventList = typed(&admin.get("/api/v1/events?limit=1000").await);
    let dry_run = events
        .events
        .iter()
        .find(|e| e.kind == weir::model::EventKind::RollbackDryRun)
        .expect("a dry-run event");
    // The guard's events carry its decision, as the API shows decisions.
    let decision: api::DecisionDoc = serde_json::from_value(dry_run.details.clone()).unwrap();
    assert_eq!(serde_json::to_value(&decision).unwrap(), dry_run.details);
    let _: api::EventList = typed(&admin.get("/api/v1/events?tail=2").await);

    for (verb, phase) in [
        ("pause", weir::model::Phase::Paused),
        ("abort", weir::model::Phase::Aborted),
    ] {
        let a = admin
            .call(
                Method::POST,
                &format!("/api/v1/services/shop/{verb}"),
                None,
                &[],
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{verb}: {}", a.text());
        assert_eq!(typed::<api::ServiceDoc>(&a).rollout.phase(), phase);
    }
    let set = admin
        .put_weights("shop", json!({"weights": {"stable": 3, "canary": 1}}))
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text());
    assert_eq!(typed::<api::ServiceDoc>(&set).pools[1].weight, 1);
    let rolled_back = admin
        .call(
            Method::POST,
            "/api/v1/services/shop/rollback",
            Some(json!({"reason": "r"})),
            &[],
        )
        .await;
    assert_eq!(typed::<api::ServiceDoc>(&rolled_back).pools[1].weight, 0);

    // Errors, with and without a body to blame.
    let refused = admin
        .put_weights("shop", json!({"weights": {"stable": -1}}))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(typed::<api::ErrorBody>(&refused).error.contains("negative"));
    let missing = admin.get("/api/v1/services/nope").await;
    assert_eq!(typed::<api::ErrorBody>(&missing).problems, None);
    let no_file = admin.call(Method::POST, "/api/v1/reload", None, &[]).await;
    assert_eq!(no_file.status, StatusCode::CONFLICT);
    let _: api::ErrorBody = typed(&no_file);
}
