//! External analysis and freeze windows on real sockets: analysis steps judged by a real
//! Prometheus scraping a real weir, rollout webhooks answered by a real HTTP server (each
//! kind, a refusal and a timeout), and freeze windows refusing, overriding and holding.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use weir_testkit::{Faults, UpstreamHandle};

use crate::common::*;

/// A POST to a service's rollout verb.
async fn verb(proxy: &Proxy, verb: &str, body: Value) -> Answer {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "http://{}/api/v1/services/shop/{verb}",
            proxy.admin
        ))
        .header("content-type", "application/json")
        .body(full(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    send(&client(), req).await
}

/// Poll the shop service until `ok` holds, or fail after a deadline; returns it.
async fn wait_shop(proxy: &Proxy, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_service(proxy.admin, "shop", what, Duration::from_secs(30), ok).await
}

async fn wait_phase(proxy: &Proxy, phase: &str) -> Value {
    wait_shop(proxy, &format!("reached {phase}"), |s| {
        s["rollout"]["phase"] == phase
    })
    .await
}

/// The shop service (stable 100, canary 0) with `extra` appended to its table.
fn shop_toml(stable: &UpstreamHandle, canary: &UpstreamHandle, extra: &str) -> String {
    proxy_toml("")
        + &service_toml(
            "shop",
            None,
            &[
                ("stable", vec![stable.addr().to_string()], 100),
                ("canary", vec![canary.addr().to_string()], 0),
            ],
        )
        + extra
}

/// Requests to weir until dropped, so the candidate has a success rate to measure.
struct Traffic(tokio::task::JoinHandle<()>);

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        Traffic(tokio::spawn(async move {
            let c = client();
            loop {
                let req = Request::get(format!("http://{addr}/"))
                    .body(empty())
                    .unwrap();
                let _ = c.request(req).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The candidate's success ratio over weir's own metrics, as a Flagger or Argo user
/// would write it (`or vector(0)`: with no success at all, the numerator has no series).
const SUCCESS_RATE: &str = r#"(sum(rate(weir_requests_total{service="{{service}}",pool="{{candidate}}",code!~"5.."}[10s])) or vector(0)) / sum(rate(weir_requests_total{service="{{service}}",pool="{{candidate}}"}[10s]))"#;

fn analysis_plan(prometheus: SocketAddr, query: &str, extra: &str) -> String {
    format!(
        r#"[[service.analysis]]
name = "success-rate"
prometheus = "http://{prometheus}"
query = '{query}'
success = ">= 0.99"
interval = "200ms"
count = 3
failure_limit = 0
no_data = "inconclusive"
timeout = "2s"
[service.rollout]
candidate = "canary"
steps = [{{ percent = 50 }}, {{ analysis = "success-rate" }}, {{ percent = 100 }}]
{extra}"#
    )
}

/// The candidate's share of the weights, in percent.
fn canary_percent(s: &Value) -> u64 {
    let w = pool_weights(s);
    let total: u64 = w.iter().map(|(_, w)| w).sum();
    let canary = w.iter().find(|(p, _)| p == "canary").unwrap().1;
    canary * 100 / total
}

fn events_of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// weir and a Prometheus scraping it, with the config `toml` makes for that Prometheus.
/// Prometheus needs weir's admin address, which needs weir: weir starts on the config
/// for no Prometheus (`None`) and is then reloaded onto the real one.
async fn start_with_prometheus(toml: impl Fn(Option<SocketAddr>) -> String) -> (Proxy, Prometheus) {
    let proxy = start(&toml(None)).await;
    let prom = start_prometheus(proxy.admin).await;
    let config = weir::config::Config::parse(&toml(Some(prom.addr)), "t.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    proxy.controller.reload(&config, None).unwrap();
    (proxy, prom)
}

/// The success-rate plan against `prometheus`, or a placeholder address before it runs.
fn success_rate_plan(prometheus: Option<SocketAddr>) -> String {
    let at = prometheus.unwrap_or_else(|| "127.0.0.1:9".parse().unwrap());
    analysis_plan(at, SUCCESS_RATE, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_prometheus_query_promotes() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let (proxy, _prom) =
        start_with_prometheus(|p| shop_toml(&stable, &canary, &success_rate_plan(p))).await;
    let _traffic = Traffic::start(proxy.addr);

    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let done = wait_phase(&proxy, "promoted").await;
    assert_eq!(done["baseline"], "canary");
    let a = &done["rollout"]["analysis"][0];
    assert_eq!(
        (&a["template"], &a["passed"], &a["count"], &a["failed"]),
        (&json!("success-rate"), &json!(3), &json!(3), &json!(0)),
        "{a}"
    );
    assert_eq!(a["last_outcome"], "pass");
    let events = proxy.events().await;
    let measured = events_of(&events, "analysis_measured");
    let passes: Vec<&Value> = measured
        .iter()
        .map(|e| &e["details"]["analysis"])
        .filter(|m| m["outcome"] == "pass")
        .collect();
    assert_eq!(passes.len(), 3, "{measured:?}");
    for m in passes {
        assert_eq!(m["value"], 1.0, "{m}");
        assert_eq!(m["threshold"], ">= 0.99");
        assert!(m["duration_ms"].is_u64(), "{m}");
    }
    // Passing enters the last step (100%) in the same change: the promotion says why.
    assert!(
        events.iter().any(|e| e["kind"] == "rollout_promoted"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("analysis `success-rate` passed")),
        "{:?}",
        event_kinds(&events)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_prometheus_query_ends_the_rollout_with_the_reason() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    canary.set_faults(Faults::errors(1.0));
    let (proxy, _prom) =
        start_with_prometheus(|p| shop_toml(&stable, &canary, &success_rate_plan(p))).await;
    let _traffic = Traffic::start(proxy.addr);

    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let done = wait_phase(&proxy, "degraded").await;
    assert_eq!(canary_percent(&done), 0);
    assert_eq!(done["health"], "degraded");
    let events = proxy.events().await;
    let failed = events_of(&events, "analysis_failed");
    assert_eq!(failed.len(), 1, "{:?}", event_kinds(&events));
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("analysis `success-rate` failed")
            && reason.contains("does not satisfy >= 0.99"),
        "{reason}"
    );
    assert_eq!(failed[0]["details"]["analysis"]["value"], 0.0);
    // Retry starts again, as after a guard revert.
    assert_eq!(
        verb(&proxy, "retry", json!({})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_prometheus_that_is_down_is_an_error_not_a_pass() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let down = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = start(&shop_toml(
        &stable,
        &canary,
        &analysis_plan(down, "vector(1)", ""),
    ))
    .await;
    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let done = wait_phase(&proxy, "degraded").await;
    let a = &done["rollout"]["analysis"][0];
    assert_eq!((&a["passed"], &a["failed"]), (&json!(0), &json!(1)), "{a}");
    assert_eq!(a["last_outcome"], "error");
    let events = proxy.events().await;
    let failed = events_of(&events, "analysis_failed");
    let m = &failed[0]["details"]["analysis"];
    assert_eq!(
        (&m["outcome"], &m["value"]),
        (&json!("error"), &Value::Null),
        "{m}"
    );
    assert!(
        m["detail"].as_str().unwrap().contains("Prometheus at"),
        "{m}"
    );
}

/// A webhook receiver: answers each path with the status set for it (200 unless
/// set; `None`: never answers), and keeps every request's path and JSON body.
#[derive(Clone, Default)]
struct Hooks {
    statuses: Arc<Mutex<HashMap<String, Option<u16>>>>,
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Hooks {
    async fn start() -> (Hooks, SocketAddr) {
        let hooks = Hooks::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let h = hooks.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let h = h.clone();
                            async move {
                                let path = req.uri().path().to_owned();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let body: Value =
                                    serde_json::from_slice(&body).unwrap_or(Value::Null);
                                h.received.lock().unwrap().push((path.clone(), body));
                                let status = h.statuses.lock().unwrap().get(&path).copied();
                                match status.unwrap_or(Some(200)) {
                                    Some(code) => Ok::<_, Infallible>(
                                        Response::builder()
                                            .status(code)
                                            .body(Full::new(Bytes::from(format!(
                                                "{path} says {code}"
                                            ))))
                                            .unwrap(),
                                    ),
                                    None => std::future::pending().await,
                                }
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (hooks, addr)
    }

    fn answer(&self, path: &str, status: Option<u16>) {
        self.statuses.lock().unwrap().insert(path.into(), status);
    }

    fn calls(&self, path: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

fn webhooks(at: SocketAddr, timeout: &str) -> String {
    format!(
        r#"[[service.rollout.webhooks]]
name = "acceptance"
kind = "pre-rollout"
url = "http://{at}/pre"
timeout = "{timeout}"
metadata = {{ suite = "smoke" }}
[[service.rollout.webhooks]]
name = "load"
kind = "rollout"
url = "http://{at}/load"
[[service.rollout.webhooks]]
name = "gate"
kind = "confirm-promotion"
url = "http://{at}/confirm"
[[service.rollout.webhooks]]
name = "notify"
kind = "post-rollout"
url = "http://{at}/post"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_webhook_kind_is_called_and_confirm_promotion_holds_until_2xx() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let (hooks, at) = Hooks::start().await;
    hooks.answer("/confirm", Some(503));
    // `vector(1)`: a real query that needs no scraped data.
    let (proxy, _prom) = start_with_prometheus(|p| match p {
        None => shop_toml(&stable, &canary, ""),
        Some(at_prom) => shop_toml(
            &stable,
            &canary,
            &analysis_plan(at_prom, "vector(1)", &webhooks(at, "5s")),
        ),
    })
    .await;

    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let held = wait_shop(&proxy, "held for confirmation", |s| {
        s["rollout"]["waiting_for"]
            .as_str()
            .unwrap()
            .contains("confirm-promotion")
    })
    .await;
    // Held before promotion: the last step's 100% is not applied.
    assert_eq!(held["rollout"]["step_index"], 2);
    assert_eq!(canary_percent(&held), 50);
    let events = proxy.events().await;
    // The pre-rollout check came before the candidate had any traffic.
    let started = &events_of(&events, "rollout_started")[0];
    assert_eq!(started["to"]["canary"], 0, "{started}");
    let pre = &hooks.calls("/pre")[0];
    assert_eq!(
        (
            &pre["service"],
            &pre["kind"],
            &pre["name"],
            &pre["metadata"]["suite"]
        ),
        (
            &json!("shop"),
            &json!("pre-rollout"),
            &json!("acceptance"),
            &json!("smoke")
        )
    );
    // The load test ran with each of the step's measurements.
    assert_eq!(hooks.calls("/load").len(), 3);
    let measured = events_of(&events, "analysis_measured");
    assert!(
        measured
            .iter()
            .all(|e| e["details"]["analysis"]["webhooks"][0]["status"] == 200),
        "{measured:?}"
    );
    // The refusal is journaled once, however often the webhook is asked again.
    let refused = wait_until(Duration::from_secs(20), || async {
        proxy.events().await.iter().any(|e| {
            e["kind"] == "webhook_called"
                && e["reason"].as_str().unwrap().contains("promotion held")
        })
    })
    .await;
    assert!(refused, "the refusal is not in the journal");
    let held = proxy.service("shop").await;
    assert_eq!(held["rollout"]["phase"], "progressing");
    let shown = &held["rollout"]["webhooks"];
    assert!(
        shown
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "gate" && w["status"] == 503),
        "{shown}"
    );

    hooks.answer("/confirm", Some(200));
    let done = wait_phase(&proxy, "promoted").await;
    let events = proxy.events().await;
    let holds: Vec<&Value> = events_of(&events, "webhook_called")
        .into_iter()
        .filter(|e| e["reason"].as_str().unwrap().contains("promotion held"))
        .collect();
    assert_eq!(holds.len(), 1, "{:?}", event_kinds(&events));
    assert_eq!(holds[0]["details"]["webhooks"][0]["status"], 503);
    assert!(hooks.calls("/confirm").len() >= 2);
    assert_eq!(done["baseline"], "canary");
    let notified = wait_until(Duration::from_secs(20), || {
        let calls = hooks.calls("/post");
        async move { !calls.is_empty() }
    })
    .await;
    assert!(notified, "post-rollout was never called");
    assert_eq!(hooks.calls("/post")[0]["phase"], "promoted");
    let recorded = wait_until(Duration::from_secs(20), || async {
        proxy.events().await.iter().any(|e| {
            e["kind"] == "webhook_called"
                && e["reason"]
                    .as_str()
                    .unwrap()
                    .starts_with("post-rollout webhooks called")
        })
    })
    .await;
    assert!(recorded, "the post-rollout call is not in the journal");
}

#[tokio::test]
async fn a_failing_pre_rollout_webhook_stops_the_rollout_before_any_traffic() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let (hooks, at) = Hooks::start().await;
    hooks.answer("/pre", Some(500));
    let plan = format!(
        "[service.rollout]\ncandidate = \"canary\"\nsteps = [{{ percent = 50 }}, {{ percent = 100 }}]\n{}",
        webhooks(at, "5s")
    );
    let proxy = start(&shop_toml(&stable, &canary, &plan)).await;
    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let done = wait_phase(&proxy, "aborted").await;
    assert_eq!(canary_percent(&done), 0);
    let events = proxy.events().await;
    let aborted = &events_of(&events, "rollout_aborted")[0];
    let reason = aborted["reason"].as_str().unwrap();
    assert!(
        reason.contains("pre-rollout webhook failed")
            && reason.contains("`acceptance` answered 500"),
        "{reason}"
    );
    // No step ever gave the candidate traffic.
    assert!(
        events_of(&events, "rollout_step").is_empty(),
        "{:?}",
        event_kinds(&events)
    );
    // Post-rollout hooks hear of the abort too.
    let notified = wait_until(Duration::from_secs(20), || {
        let calls = hooks.calls("/post");
        async move { !calls.is_empty() }
    })
    .await;
    assert!(notified);
    assert_eq!(hooks.calls("/post")[0]["phase"], "aborted");
}

#[tokio::test]
async fn a_webhook_answer_for_a_replaced_rollout_is_not_taken_for_the_new_ones() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let (hooks, at) = Hooks::start().await;
    // The first rollout's acceptance test hangs until its timeout: a failure that comes
    // back after the rollout was aborted and retried.
    hooks.answer("/pre", None);
    let plan = format!(
        "[service.rollout]\ncandidate = \"canary\"\nsteps = [{{ percent = 100 }}]\n{}",
        webhooks(at, "3s")
    );
    let proxy = start(&shop_toml(&stable, &canary, &plan)).await;
    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let asked = wait_until(Duration::from_secs(20), || {
        let calls = hooks.calls("/pre");
        async move { calls.len() == 1 }
    })
    .await;
    assert!(asked, "the pre-rollout webhook was never called");
    // The new rollout's own acceptance test passes.
    hooks.answer("/pre", Some(200));
    assert_eq!(
        verb(&proxy, "abort", json!({})).await.status,
        StatusCode::OK
    );
    assert_eq!(
        verb(&proxy, "retry", json!({})).await.status,
        StatusCode::OK
    );
    // The old call's timeout must not abort the new rollout; its own call lets it go on.
    let done = wait_shop(&proxy, "promoted or aborted", |s| {
        matches!(s["rollout"]["phase"].as_str(), Some("promoted" | "aborted"))
    })
    .await;
    let events = proxy.events().await;
    assert_eq!(
        done["rollout"]["phase"],
        "promoted",
        "{:?}",
        event_kinds(&events)
    );
    assert_eq!(
        hooks.calls("/pre").len(),
        2,
        "the new rollout asked its own"
    );
}

#[tokio::test]
async fn a_webhook_that_does_not_answer_in_time_fails() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let (hooks, at) = Hooks::start().await;
    hooks.answer("/pre", None);
    let plan = format!(
        "[service.rollout]\ncandidate = \"canary\"\nsteps = [{{ percent = 100 }}]\n{}",
        webhooks(at, "300ms")
    );
    let proxy = start(&shop_toml(&stable, &canary, &plan)).await;
    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let done = wait_phase(&proxy, "aborted").await;
    let shown = &done["rollout"]["webhooks"];
    let pre = shown
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "acceptance")
        .unwrap_or_else(|| panic!("{shown}"));
    assert_eq!((&pre["status"], &pre["ok"]), (&Value::Null, &json!(false)));
    assert!(
        pre["detail"]
            .as_str()
            .unwrap()
            .contains("no answer within 300ms"),
        "{pre}"
    );
}

const FREEZE: &str = r#"
[[freeze]]
start = "2000-01-01T00:00:00Z"
end = "2999-01-01T00:00:00Z"
reason = "year-end change freeze"
"#;

const SIMPLE_PLAN: &str = r#"[service.rollout]
candidate = "canary"
steps = [{ percent = 10 }, { pause = "200ms" }, { percent = 100 }]
"#;

#[tokio::test]
async fn a_freeze_refuses_a_start_with_409_until_overridden_with_a_reason() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let toml = FREEZE.to_owned() + &shop_toml(&stable, &canary, SIMPLE_PLAN);
    let proxy = start(&toml).await;
    let s = proxy.service("shop").await;
    assert_eq!(
        s["freeze"],
        json!({"reason": "year-end change freeze", "until": "2999-01-01T00:00:00.000Z"})
    );

    let refused = verb(&proxy, "rollout", json!({})).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    let e = refused.error();
    for needle in [
        "frozen until 2999-01-01T00:00:00",
        "year-end change freeze",
        "override_freeze",
    ] {
        assert!(e.contains(needle), "{e}");
    }
    assert_eq!(proxy.service("shop").await["rollout"]["phase"], "idle");
    let empty = verb(&proxy, "rollout", json!({"override_freeze": " "})).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST, "{}", empty.error());

    let started = verb(
        &proxy,
        "rollout",
        json!({"override_freeze": "hotfix INC-42"}),
    )
    .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.error());
    let done = wait_phase(&proxy, "promoted").await;
    assert_eq!(done["rollout"]["freeze_override"], "hotfix INC-42");
    let events = proxy.events().await;
    let start = &events_of(&events, "rollout_started")[0];
    assert_eq!(
        start["details"]["freeze_override"],
        json!({
            "reason": "hotfix INC-42",
            "window": "year-end change freeze",
            "until": "2999-01-01T00:00:00.000Z",
        })
    );
}

#[tokio::test]
async fn a_release_in_a_freeze_is_refused_until_overridden_and_its_rollout_goes_through() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let toml = FREEZE.to_owned() + &shop_toml(&stable, &canary, SIMPLE_PLAN);
    let proxy = start(&toml).await;
    let before = proxy.service("shop").await;

    let refused = verb(&proxy, "release", json!({"version": "v2"})).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    let e = refused.error();
    for needle in [
        "cannot release",
        "year-end change freeze",
        "override_freeze",
    ] {
        assert!(e.contains(needle), "{e}");
    }
    // Refused means nothing changed: same change counter, no release in the history.
    assert_eq!(proxy.service("shop").await["version"], before["version"]);
    let blank = verb(
        &proxy,
        "release",
        json!({"version": "v2", "override_freeze": ""}),
    )
    .await;
    assert_eq!(blank.status, StatusCode::BAD_REQUEST, "{}", blank.error());

    let released = verb(
        &proxy,
        "release",
        json!({"version": "v2", "override_freeze": "security fix CVE-1"}),
    )
    .await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.error());
    // The rollout it started carries the override, so the freeze does not hold it.
    let done = wait_phase(&proxy, "promoted").await;
    assert_eq!(done["rollout"]["freeze_override"], "security fix CVE-1");
    let events = proxy.events().await;
    let release = &events_of(&events, "released")[0];
    assert_eq!(
        release["details"]["freeze_override"]["reason"],
        "security fix CVE-1"
    );
}

/// The shop with a plan whose second step is a timed pause, a rollout started, then a
/// freeze brought in by a reload while it runs.
async fn frozen_mid_rollout(pause: &str) -> (Proxy, String, UpstreamHandle, UpstreamHandle) {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    let plan = format!(
        "[service.rollout]\ncandidate = \"canary\"\nsteps = [{{ percent = 10 }}, {{ pause = \"{pause}\" }}, {{ percent = 100 }}]\n"
    );
    let open = shop_toml(&stable, &canary, &plan);
    let proxy = start(&open).await;
    assert_eq!(
        verb(&proxy, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let frozen = weir::config::Config::parse(&(FREEZE.to_owned() + &open), "t.toml").unwrap();
    proxy.controller.reload(&frozen, None).unwrap();
    let s = proxy.service("shop").await;
    assert_eq!(
        (&s["rollout"]["phase"], &s["rollout"]["step_index"]),
        (&json!("progressing"), &json!(1)),
        "the pause is long enough to reload within it"
    );
    (proxy, open, stable, canary)
}

#[tokio::test]
async fn a_running_rollout_holds_in_a_freeze_and_goes_on_after_it() {
    let (proxy, open, _stable, _canary) = frozen_mid_rollout("2s").await;
    // Past the pause's deadline and still on it: the freeze holds the step.
    let held = wait_shop(&proxy, "held by the freeze", |s| {
        let past = s["rollout"]["deadline"].as_str().is_some_and(|d| {
            humantime::parse_rfc3339_weak(d).unwrap() < std::time::SystemTime::now()
        });
        past && s["rollout"]["waiting_for"]
            .as_str()
            .unwrap()
            .contains("the freeze to end: frozen until 2999-01-01")
    })
    .await;
    assert_eq!(held["rollout"]["step_index"], 1);
    assert_eq!(canary_percent(&held), 10);
    // An operator's promote is refused too.
    let refused = verb(&proxy, "promote", json!({})).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert!(
        refused.error().contains("year-end change freeze"),
        "{}",
        refused.error()
    );
    // The freeze ends (a reload takes it out): the held step goes on at once.
    let thawed = weir::config::Config::parse(&open, "t.toml").unwrap();
    proxy.controller.reload(&thawed, None).unwrap();
    let done = wait_phase(&proxy, "promoted").await;
    assert_eq!(done["baseline"], "canary");
    assert!(done["freeze"].is_null(), "{}", done["freeze"]);
}

#[tokio::test]
async fn the_guards_revert_is_never_held_by_a_freeze() {
    let (proxy, _open, _stable, _canary) = frozen_mid_rollout("1h").await;
    let revert = proxy
        .controller
        .apply(weir::Command::Rollback {
            service: "shop".into(),
            source: weir::model::Source::Guard,
            actor: None,
            reason: Some("canary error rate 30% > 5%".into()),
            details: None,
        })
        .unwrap();
    assert!(revert.durable);
    let s = proxy.service("shop").await;
    assert_eq!(s["rollout"]["phase"], "degraded");
    assert_eq!(canary_percent(&s), 0);
    // Starting it again is a new start: refused in the freeze without an override.
    assert_eq!(
        verb(&proxy, "retry", json!({})).await.status,
        StatusCode::CONFLICT
    );
    let retried = verb(&proxy, "retry", json!({"override_freeze": "fix verified"})).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_reverts_a_candidate_whose_analysis_fails_outside_a_rollout() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    // 50:50 by config, no rollout: the guard judges the canary anyway. Its own checks
    // cannot trip here (p99 under an hour), so only the query can revert.
    // Weir starts guarded by its own checks only; the analysis comes in by reload, once
    // Prometheus (which needs weir's address) runs.
    let service = |prometheus: Option<SocketAddr>| {
        let analysis = match prometheus {
            None => String::new(),
            Some(p) => format!(
                r#"[[service.analysis]]
name = "business-kpi"
prometheus = "http://{p}"
query = "vector(0)"
success = ">= 1"
interval = "200ms"
failure_limit = 1
"#
            ),
        };
        let guarded = if prometheus.is_some() {
            "analysis = [\"business-kpi\"]\n"
        } else {
            ""
        };
        proxy_toml("")
            + &service_toml(
                "shop",
                None,
                &[
                    ("stable", vec![stable.addr().to_string()], 50),
                    ("canary", vec![canary.addr().to_string()], 50),
                ],
            )
            + &analysis
            + "[service.slo]\nmax_p99_latency = \"1h\"\n"
            + guarded
    };
    let (proxy, _prom) = start_with_prometheus(service).await;

    let reverted = wait_shop(&proxy, "reverted", |s| s["health"] == "degraded").await;
    assert_eq!(canary_percent(&reverted), 0);
    let events = proxy.events().await;
    let measured: Vec<&Value> = events_of(&events, "analysis_measured")
        .into_iter()
        .filter(|e| e["source"] == "guard")
        .collect();
    // Two failures: the first within the limit, the second past it.
    assert_eq!(measured.len(), 2, "{:?}", event_kinds(&events));
    assert_eq!(measured[0]["details"]["pool"], "canary");
    assert_eq!(measured[0]["details"]["analysis"]["value"], 0.0);
    let revert = events_of(&events, "rolled_back");
    assert_eq!(revert.len(), 1, "{:?}", event_kinds(&events));
    assert_eq!(revert[0]["source"], "guard");
    let reason = revert[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("guard analysis `business-kpi` failed on canary")
            && reason.contains("0 does not satisfy >= 1"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_restart_mid_step_keeps_the_analysis_counts() {
    let (stable, canary) = (upstream("stable").await, upstream("canary").await);
    // Nothing listens there: every measurement is an error, counted, never a pass.
    let down = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plan =
        analysis_plan(down, "vector(1)", "").replace("failure_limit = 0", "failure_limit = 1000");
    let mut cfg =
        weir::config::Config::parse(&shop_toml(&stable, &canary, &plan), "t.toml").unwrap();
    cfg.state.dir = temp_dir("analysis-restart");
    let first = start_config(cfg.clone(), None, Vec::new()).await;
    assert_eq!(
        verb(&first, "rollout", json!({})).await.status,
        StatusCode::OK
    );
    let before = wait_shop(&first, "measured twice", |s| {
        s["rollout"]["analysis"][0]["failed"].as_u64() >= Some(2)
    })
    .await;
    drop(first);
    let second = start_config(cfg, None, Vec::new()).await;
    let after = second.service("shop").await;
    let (was, is) = (
        before["rollout"]["analysis"][0]["failed"].as_u64().unwrap(),
        after["rollout"]["analysis"][0]["failed"].as_u64().unwrap(),
    );
    assert!(is >= was, "the count went back from {was} to {is}");
    assert_eq!(after["rollout"]["step_index"], 1);
    assert_eq!(after["rollout"]["analysis"][0]["passed"], 0);
    // And it goes on counting where it was.
    wait_shop(&second, "measured again", |s| {
        s["rollout"]["analysis"][0]["failed"].as_u64() > Some(is)
    })
    .await;
}
