//! Releases on real sockets: `weir ctl release` swaps the candidate pool onto the hosts
//! running a new build and starts the plan; the history records how each release ended
//! (promoted, degraded by the guard with its reason, aborted by an undo) and who made
//! it; `undo` puts an earlier release back and traffic really goes to its hosts; all of
//! it survives a reload and a restart; `status --wait` exits 0/1/2 for CI; bad requests
//! change nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use weir::config::Config;
use weir_cli::ctl::{self, CtlArgs};
use weir_testkit::{Faults, UpstreamHandle};

use crate::common::*;

/// Canary plan with a manual pause, so a test acts between steps without racing the
/// rollout driver: 50%, wait for promote, 100%.
const PLAN: &str = r#"
[service.rollout]
candidate = "canary"
steps = [{ percent = 50 }, { pause = "manual" }, { percent = 100 }]
"#;

const SLO: &str = r#"
[service.slo]
interval = "200ms"
min_requests = 20
max_error_rate = 0.05
"#;

/// `shop`: stable (version v1) on `stable`, canary on `canary`, both weights 100:0,
/// with the state in `state` and the config written to `dir/weir.toml`.
fn config_text(state: &Path, stable: SocketAddr, canary: SocketAddr, extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nconnect_timeout = \"1s\"\nrequest_timeout = \"2s\"\n\
         [state]\ndir = \"{}\"\n\
         [[service]]\nname = \"shop\"\nbaseline = \"stable\"\n\
         [service.pools.stable]\nendpoints = [\"{stable}\"]\nweight = 100\nversion = \"v1\"\n\
         [service.pools.canary]\nendpoints = [\"{canary}\"]\nweight = 0\n{PLAN}{extra}",
        state.display()
    )
}

/// A weir started from a config file (so `reload` re-reads it).
async fn start_file(path: &Path) -> Proxy {
    let text = std::fs::read_to_string(path).unwrap();
    let config = Config::parse(&text, &path.display().to_string()).unwrap();
    start_config(config, Some(path.to_path_buf()), Vec::new()).await
}

struct Run {
    code: ExitCode,
    out: String,
    err: String,
}

async fn ctl(admin: SocketAddr, args: &[&str]) -> Run {
    let admin = format!("http://{admin}");
    let mut argv = vec!["weir ctl", "--admin", &admin];
    argv.extend_from_slice(args);
    let args = CtlArgs::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = ctl::execute(&args, None, &mut out, &mut err, std::future::pending()).await;
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

impl Run {
    fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            ExitCode::SUCCESS,
            "stdout: {}\nstderr: {}",
            self.out,
            self.err
        );
        &self.out
    }
}

async fn post(admin: SocketAddr, path: &str, body: &str) -> Answer {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{admin}/api/v1/services/{path}"))
        .header("content-type", "application/json")
        .header("x-weir-actor", "ci-bot")
        .body(full(body.to_owned()))
        .unwrap();
    send(&client(), req).await
}

async fn history(admin: SocketAddr) -> Vec<Value> {
    let a = get(
        &client(),
        admin,
        "localhost",
        "/api/v1/services/shop/history",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    a.json()["releases"].as_array().cloned().unwrap()
}

/// Which upstreams answer `n` requests through the proxy, sorted and deduplicated.
async fn answering(proxy: SocketAddr, n: usize) -> Vec<String> {
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..n {
        let a = get(&c, proxy, "x", "/").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        seen.push(a.upstream().to_owned());
    }
    seen.sort();
    seen.dedup();
    seen
}

fn pool<'a>(service: &'a Value, name: &str) -> &'a Value {
    service["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
}

struct Fleet {
    stable: UpstreamHandle,
    canary: UpstreamHandle,
    v2a: UpstreamHandle,
    v2b: UpstreamHandle,
    dir: PathBuf,
}

async fn fleet() -> Fleet {
    Fleet {
        stable: upstream("v1").await,
        canary: upstream("old-canary").await,
        v2a: upstream("v2a").await,
        v2b: upstream("v2b").await,
        dir: temp_dir("releases"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_promote_undo_and_restart() {
    let f = fleet().await;
    let path = f.dir.join("weir.toml");
    let text = config_text(&f.dir.join("state"), f.stable.addr(), f.canary.addr(), "");
    std::fs::write(&path, &text).unwrap();
    let proxy = start_file(&path).await;
    let new_hosts = format!("{},{}", f.v2a.addr(), f.v2b.addr());

    // The release swaps the canary onto the new hosts and starts the plan at 50%.
    let out = ctl(
        proxy.admin,
        &[
            "--actor",
            "alice",
            "release",
            "shop",
            "--version",
            "v2",
            "--endpoints",
            &new_hosts,
        ],
    )
    .await;
    let table = out.ok();
    assert!(
        table.contains("shop: running stable=v1 canary=v2"),
        "{table}"
    );
    let svc = proxy.service("shop").await;
    assert_eq!(
        pool_weights(&svc),
        [("stable".into(), 5000), ("canary".into(), 5000)]
    );
    assert_eq!(pool(&svc, "canary")["version"], "v2");
    assert_eq!(pool(&svc, "stable")["version"], "v1");
    assert_eq!(
        pool(&svc, "canary")["endpoints"],
        json!([f.v2a.addr().to_string(), f.v2b.addr().to_string()])
    );
    assert_eq!(svc["rollout"]["phase"], "progressing");
    // The old canary hosts get nothing any more; the new build does.
    assert_eq!(answering(proxy.addr, 60).await, ["v1", "v2a", "v2b"]);
    assert_eq!(f.canary.requests(), 0);

    // A reload keeps the released endpoints over the config's.
    ctl(proxy.admin, &["reload"]).await.ok();
    let svc = proxy.service("shop").await;
    assert_eq!(pool(&svc, "canary")["version"], "v2");
    assert_eq!(answering(proxy.addr, 40).await, ["v1", "v2a", "v2b"]);

    // CI: the rollout waits at its manual pause, so a short --wait times out with 2.
    let waited = ctl(
        proxy.admin,
        &["status", "shop", "--wait", "--timeout", "300ms"],
    )
    .await;
    assert_eq!(waited.code, ExitCode::from(2), "{}", waited.out);
    assert!(
        waited.out.contains("timed out after 300ms"),
        "{}",
        waited.out
    );

    ctl(proxy.admin, &["promote", "shop", "--full"]).await.ok();
    let waited = ctl(proxy.admin, &["status", "shop", "--wait"]).await;
    assert_eq!(waited.code, ExitCode::SUCCESS, "{}", waited.out);
    assert!(
        waited
            .out
            .contains("shop: rollout promoted (revision 2, version v2)"),
        "{}",
        waited.out
    );
    assert_eq!(answering(proxy.addr, 40).await, ["v2a", "v2b"]);

    let h = history(proxy.admin).await;
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(h[0]["revision"], 1);
    assert_eq!(h[0]["version"], "v1");
    assert_eq!(h[0]["pool"], "stable");
    assert_eq!(h[0]["endpoints"], json!([f.stable.addr().to_string()]));
    assert_eq!(h[1]["revision"], 2);
    assert_eq!(h[1]["version"], "v2");
    assert_eq!(h[1]["outcome"], "promoted");
    assert!(h[1]["ended_at"].is_string());
    assert!(
        h[1]["actor"]
            .as_str()
            .unwrap()
            .starts_with("alice/127.0.0.1:"),
        "{}",
        h[1]["actor"]
    );
    let table = ctl(proxy.admin, &["history", "shop"]).await;
    let table = table.ok();
    assert!(table.starts_with("REV  VERSION  POOL"), "{table}");
    assert!(table.contains("promoted  alice"), "{table}");

    // The version is a bounded info series, and the release an event with its actor.
    let metrics = get(&client(), proxy.admin, "localhost", "/metrics")
        .await
        .text();
    let info = |pool: &str, version: &str| {
        metric(
            &metrics,
            "weir_pool_info",
            &[("service", "shop"), ("pool", pool), ("version", version)],
        )
    };
    assert_eq!(info("canary", "v2"), Some(1.0), "{metrics}");
    assert_eq!(info("stable", "v1"), Some(1.0), "{metrics}");
    let released = proxy
        .events()
        .await
        .into_iter()
        .find(|e| e["kind"] == "released")
        .expect("released event");
    assert_eq!(released["details"]["version"], "v2");
    assert!(released["actor"].as_str().unwrap().starts_with("alice"));

    // Undo: back to revision 1 in one step, all traffic on the stable hosts.
    let out = ctl(proxy.admin, &["undo", "shop"]).await;
    out.ok();
    let svc = proxy.service("shop").await;
    assert_eq!(svc["baseline"], "stable");
    assert_eq!(
        pool_weights(&svc),
        [("stable".into(), 10000), ("canary".into(), 0)]
    );
    assert_eq!(answering(proxy.addr, 30).await, ["v1"]);
    let h = history(proxy.admin).await;
    assert_eq!(h.len(), 3);
    assert_eq!(h[2]["undo_to"], 1);
    assert_eq!(h[2]["pool"], "stable");

    // Restart on the same state: endpoints, versions, weights and history are back.
    drop(proxy);
    let proxy = start_file(&path).await;
    let svc = proxy.service("shop").await;
    assert_eq!(
        pool_weights(&svc),
        [("stable".into(), 10000), ("canary".into(), 0)]
    );
    assert_eq!(pool(&svc, "canary")["version"], "v2");
    assert_eq!(
        pool(&svc, "canary")["endpoints"],
        json!([f.v2a.addr().to_string(), f.v2b.addr().to_string()])
    );
    assert_eq!(history(proxy.admin).await.len(), 3);

    // Undo to the promoted release: the canary hosts serve everything again.
    ctl(proxy.admin, &["undo", "shop", "--to-revision", "2"])
        .await
        .ok();
    assert_eq!(answering(proxy.addr, 30).await, ["v2a", "v2b"]);

    // A release while another rollout runs, then an undo: the undo aborts it (as
    // `kubectl argo rollouts undo` replaces a rollout), and the history says so.
    let out = ctl(
        proxy.admin,
        &[
            "release",
            "shop",
            "--version",
            "v3",
            "--endpoints",
            &f.canary.addr().to_string(),
        ],
    )
    .await;
    out.ok();
    let svc = proxy.service("shop").await;
    assert_eq!(
        svc["rollout"]["candidate"], "stable",
        "the pool that is not the baseline"
    );
    assert_eq!(pool(&svc, "stable")["version"], "v3");
    ctl(proxy.admin, &["undo", "shop"]).await.ok();
    let h = history(proxy.admin).await;
    let n = h.len();
    assert_eq!(h[n - 2]["version"], "v3");
    assert_eq!(h[n - 2]["outcome"], "aborted");
    assert!(
        h[n - 2]["reason"]
            .as_str()
            .unwrap()
            .contains("aborted by undo"),
        "{}",
        h[n - 2]
    );
    assert_eq!(h[n - 1]["undo_to"], h[n - 3]["revision"]);
    let svc = proxy.service("shop").await;
    assert_eq!(svc["rollout"]["phase"], "aborted");
    assert_eq!(answering(proxy.addr, 30).await, ["v2a", "v2b"]);
    // With no rollout running, --wait reports how the last one ended.
    let waited = ctl(proxy.admin, &["status", "shop", "--wait"]).await;
    assert_eq!(waited.code, ExitCode::FAILURE, "{}", waited.out);
    assert!(waited.out.contains("rollout aborted"), "{}", waited.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_release_is_degraded_and_wait_exits_1_with_the_reason() {
    let f = fleet().await;
    let broken = upstream("broken").await;
    broken.set_faults(Faults::errors(1.0));
    let text = config_text(&f.dir.join("state"), f.stable.addr(), f.canary.addr(), SLO);
    let proxy = start(&text).await;
    ctl(
        proxy.admin,
        &[
            "release",
            "shop",
            "--version",
            "v2-bad",
            "--endpoints",
            &broken.addr().to_string(),
        ],
    )
    .await
    .ok();

    // Traffic until the wait is over; the guard reverts the broken build meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), proxy.addr);
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                get(&c, addr, "x", "/").await;
            }
        })
    };
    let waited = ctl(
        proxy.admin,
        &["status", "shop", "--wait", "--timeout", "30s"],
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(waited.code, ExitCode::FAILURE, "{}", waited.out);
    assert!(
        waited
            .out
            .contains("shop: rollout degraded (revision 2, version v2-bad): canary error rate"),
        "{}",
        waited.out
    );
    let h = history(proxy.admin).await;
    assert_eq!(h[1]["outcome"], "degraded");
    assert!(
        h[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("canary error rate"),
        "{}",
        h[1]
    );
    let svc = proxy.service("shop").await;
    assert_eq!(
        pool_weights(&svc),
        [("stable".into(), 10000), ("canary".into(), 0)]
    );
    assert_eq!(answering(proxy.addr, 20).await, ["v1"]);
    let degraded_event = proxy
        .events()
        .await
        .into_iter()
        .find(|e| e["kind"] == "rolled_back")
        .expect("the guard's revert");
    assert_eq!(degraded_event["details"]["release"]["version"], "v2-bad");

    // A newer release is under way when someone asks to undo it: the default target is
    // the last build that held all the traffic (revision 1), never the degraded v2.
    let v3 = ctl(
        proxy.admin,
        &[
            "release",
            "shop",
            "--version",
            "v3",
            "--endpoints",
            &f.canary.addr().to_string(),
        ],
    )
    .await;
    assert_eq!(v3.code, ExitCode::SUCCESS, "{}", v3.out);
    let undone = ctl(proxy.admin, &["undo", "shop"]).await;
    assert_eq!(undone.code, ExitCode::SUCCESS, "{}", undone.out);
    let h = history(proxy.admin).await;
    let last = h.last().unwrap();
    assert_eq!(last["undo_to"], 1, "{last}");
    assert_eq!(answering(proxy.addr, 20).await, ["v1"]);
}

#[tokio::test]
async fn hostile_release_and_undo_requests_are_refused_and_change_nothing() {
    let f = fleet().await;
    let text = config_text(&f.dir.join("state"), f.stable.addr(), f.canary.addr(), "");
    let proxy = start(&text).await;
    let before = proxy.service("shop").await;
    let long = format!("{{\"version\": \"{}\"}}", "v".repeat(65));
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "shop/release",
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "missing `version`",
        ),
        (
            "shop/release",
            r#"{"version": ""}"#.into(),
            StatusCode::BAD_REQUEST,
            "must not be empty",
        ),
        (
            "shop/release",
            r#"{"version": "v 2"}"#.into(),
            StatusCode::BAD_REQUEST,
            "without spaces",
        ),
        (
            "shop/release",
            r#"{"version": "v2\u001b[2J"}"#.into(),
            StatusCode::BAD_REQUEST,
            "not allowed",
        ),
        ("shop/release", long, StatusCode::BAD_REQUEST, "at most 64"),
        (
            "shop/release",
            r#"{"version": 2}"#.into(),
            StatusCode::BAD_REQUEST,
            "must be a string",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "endpoints": []}"#.into(),
            StatusCode::BAD_REQUEST,
            "at least one",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "endpoints": ["10.0.0.1"]}"#.into(),
            StatusCode::BAD_REQUEST,
            "needs a port",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "endpoints": ["http://a:1"]}"#.into(),
            StatusCode::BAD_REQUEST,
            "without a scheme",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "endpoints": ["a:1", "a:1"]}"#.into(),
            StatusCode::BAD_REQUEST,
            "listed twice",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "endpoints": "a:1"}"#.into(),
            StatusCode::BAD_REQUEST,
            "must be a list",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "image": "x"}"#.into(),
            StatusCode::BAD_REQUEST,
            "unknown field `image`",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "pool": "nope"}"#.into(),
            StatusCode::NOT_FOUND,
            "has no pool `nope`",
        ),
        (
            "shop/release",
            r#"{"version": "v2", "pool": "stable"}"#.into(),
            StatusCode::CONFLICT,
            "is the baseline",
        ),
        (
            "nope/release",
            r#"{"version": "v2"}"#.into(),
            StatusCode::NOT_FOUND,
            "unknown service `nope`",
        ),
        (
            "shop/undo",
            "{}".into(),
            StatusCode::CONFLICT,
            "no release history",
        ),
        (
            "shop/undo",
            r#"{"to_revision": 0}"#.into(),
            StatusCode::BAD_REQUEST,
            "≥ 1",
        ),
        (
            "shop/undo",
            r#"{"to_revision": "1"}"#.into(),
            StatusCode::BAD_REQUEST,
            "must be a number",
        ),
    ];
    for (path, body, status, says) in &cases {
        let a = post(proxy.admin, path, body).await;
        assert_eq!(a.status, *status, "{path} {body}: {}", a.text());
        assert!(a.error().contains(says), "{path} {body}: {}", a.text());
    }
    let a = get(
        &client(),
        proxy.admin,
        "localhost",
        "/api/v1/services/nope/history",
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(proxy.service("shop").await, before, "nothing changed");
    assert!(history(proxy.admin).await.is_empty());

    // After one release, undo names the revisions it has; a GET cannot release.
    let a = post(proxy.admin, "shop/release", r#"{"version": "v2"}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = post(proxy.admin, "shop/undo", r#"{"to_revision": 9}"#).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.text());
    assert!(
        a.error()
            .contains("no revision 9 in its history (kept: 1..=2)"),
        "{}",
        a.text()
    );
    let a = get(
        &client(),
        proxy.admin,
        "localhost",
        "/api/v1/services/shop/release",
    )
    .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    // The actor header is the client's word: recorded bounded, with the peer.
    let h = history(proxy.admin).await;
    assert!(
        h[1]["actor"]
            .as_str()
            .unwrap()
            .starts_with("ci-bot/127.0.0.1:"),
        "{}",
        h[1]
    );
    // A newer release replaces the running one, which ends `superseded`.
    let a = post(proxy.admin, "shop/release", r#"{"version": "v3"}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let h = history(proxy.admin).await;
    assert_eq!(h.len(), 3);
    assert_eq!(h[1]["outcome"], "superseded");
    assert_eq!(h[1]["reason"], "replaced by revision 3 (version v3)");
    assert!(h[2]["outcome"].is_null(), "{}", h[2]);
    // The config's label is checked like a release's.
    let svc = proxy.service("shop").await;
    assert_eq!(pool(&svc, "stable")["version"], "v1");
    let bad = text.replace("version = \"v1\"", "version = \"v 1\"");
    let err = Config::parse(&bad, "weir.toml").unwrap_err().to_string();
    assert!(err.contains("service[shop].pools.stable.version"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_each_pools_version() {
    let f = fleet().await;
    let text = config_text(&f.dir.join("state"), f.stable.addr(), f.canary.addr(), "");
    let proxy = start(&text).await;
    let a = post(proxy.admin, "shop/release", r#"{"version": "v2.0.0-rc.1"}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());

    let driver = crate::dashboard::chromedriver().await;
    let b = crate::dashboard::browser(&driver, &f.dir.join("chromium-profile")).await;
    let shown = async {
        b.goto(&format!("http://{}/", proxy.admin))
            .await
            .expect("open the dashboard");
        crate::dashboard::page_until(
            &b,
            "each pool's version",
            "const c = document.querySelector('section.service[data-service=\"shop\"]'); \
             const v = c && [...c.querySelectorAll('tr[data-pool]')] \
               .map(r => r.dataset.pool + '=' + ((r.querySelector('.version') || {}).textContent || '').trim()); \
             return v && v.length === 2 && v",
        )
        .await
    }
    .await;
    let _ = b.close().await;
    assert_eq!(shown, json!(["stable=v1", "canary=v2.0.0-rc.1"]));
}
