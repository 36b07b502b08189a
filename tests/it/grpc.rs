//! gRPC through a real weir with real grpcio peers on both sides (tests/grpc/server.py
//! behind h2c pools, tests/grpc/client.py in front): gRPC outcomes are judged by
//! grpc-status, not by the HTTP status (always 200 for gRPC), so the guard rolls back a
//! canary answering UNAVAILABLE, leaves alone one answering NOT_FOUND (a client-side
//! status), and weir's own failures reach gRPC clients as proper gRPC statuses.
//!
//! Needs /usr/bin/python3 with grpcio (Debian's python3-grpcio; scripts/test.sh installs
//! it). Without it the tests are skipped with a message, except under `CI`, where a
//! missing dependency must fail rather than pass silently.
//!
//! `cargo test --test it grpc:: -- --nocapture` shows the measured rollback time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Debian's interpreter explicitly: the `python3` first on PATH may be another one
/// (pyenv) that cannot see Debian's python3-grpcio.
const PYTHON: &str = "/usr/bin/python3";
const AUTHORITY: &str = "echo.test";
const SERVICE: &str = "echo";
/// The SLO of tests/it/guard.rs: evaluations every 500 ms, a 3 s fast window, 5% errors.
const SLO: &str = "[service.slo]\ninterval = \"500ms\"\nfast_window = \"3s\"\nmin_requests = 20\nmax_error_rate = 0.05\nbreaches_to_act = 2\n";

/// The load tests measure time to rollback; run with each other they would share two
/// cores among four Python servers and two clients, and the figures would measure the
/// machine. Held across awaits, hence tokio's (unpoisonable) mutex.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/grpc")
        .join(name)
}

/// Whether grpcio can be imported. Skipping is only for a developer's machine; under CI
/// (`CI` set) a missing grpcio fails the test.
fn grpc_available() -> bool {
    let ok = std::process::Command::new(PYTHON)
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{PYTHON} cannot import grpc: run scripts/test.sh, which installs Debian's python3-grpcio"
    );
    eprintln!(
        "SKIPPED: {PYTHON} cannot import grpc (apt-get install python3-grpcio, or run scripts/test.sh)"
    );
    false
}

/// A tests/grpc/server.py child process. Killed when dropped; its stdin is a pipe held
/// by the child handle, so it also exits if this test process dies without cleanup.
struct GrpcServer {
    addr: SocketAddr,
    _child: Child,
}

async fn grpc_server(name: &str) -> GrpcServer {
    let mut child = Command::new(PYTHON)
        .arg(script("server.py"))
        .args(["--name", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start tests/grpc/server.py");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Importing grpcio takes a few hundred ms; 20 s only bounds a hang.
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("server.py {name} printed no port within 20 s"))
        .unwrap()
        .unwrap_or_else(|| panic!("server.py {name} exited before printing its port"));
    let port: u16 = first
        .strip_prefix("PORT ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("server.py {name}: expected \"PORT <n>\", got {first:?}"));
    GrpcServer {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _child: child,
    }
}

/// What a unary gRPC call came back with, as seen on the wire.
struct GrpcAnswer {
    http: StatusCode,
    content_type: String,
    /// From the trailers, or from the headers of a trailers-only answer.
    status: Option<String>,
    message: String,
    trailers_only: bool,
    /// The response message without its 5-byte length prefix.
    payload: Bytes,
}

/// One unary gRPC call made by hand over HTTP/2 with prior knowledge (hyper), for the
/// control methods and for looking at weir's own answers byte by byte.
async fn grpc_unary(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    msg: &[u8],
) -> GrpcAnswer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut sender = h2_handshake(stream).await;
    // gRPC framing: compressed flag, big-endian length, message.
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg);
    let mut req = Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let trailers_only = parts.headers.contains_key("grpc-status");
    let source = trailers.as_ref().unwrap_or(&parts.headers);
    let text = |name: &str| {
        source
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_owned())
    };
    GrpcAnswer {
        http: parts.status,
        content_type: parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_default(),
        status: text("grpc-status"),
        message: text("grpc-message").unwrap_or_default(),
        trailers_only,
        payload: if data.len() >= 5 {
            data.slice(5..)
        } else {
            Bytes::new()
        },
    }
}

/// Change a server's faults through its Control/Set method, directly (not through weir).
async fn set_faults(server: &GrpcServer, fail_rate: f64, code: &str) {
    let doc = serde_json::json!({ "fail_rate": fail_rate, "code": code }).to_string();
    let a = grpc_unary(
        server.addr,
        "127.0.0.1",
        "/weir.test.Control/Set",
        &[],
        doc.as_bytes(),
    )
    .await;
    assert_eq!(a.status.as_deref(), Some("0"), "Control/Set: {}", a.message);
}

/// A server's own counts: {"calls": n, "codes": {"OK": n, ...}}.
async fn server_stats(server: &GrpcServer) -> Value {
    let a = grpc_unary(
        server.addr,
        "127.0.0.1",
        "/weir.test.Control/Stats",
        &[],
        b"",
    )
    .await;
    assert_eq!(
        a.status.as_deref(),
        Some("0"),
        "Control/Stats: {}",
        a.message
    );
    serde_json::from_slice(&a.payload).unwrap()
}

fn count(codes: &Value, code: &str) -> u64 {
    codes[code].as_u64().unwrap_or(0)
}

/// The service `echo` on host echo.test: `stable` (the baseline) and `canary`, both h2c.
fn echo_toml(stable: &str, canary: &str, weights: (u32, u32), extra: &str) -> String {
    let pool = |name: &str, endpoint: &str, weight: u32| {
        format!(
            "[service.pools.{name}]\nendpoints = [\"{endpoint}\"]\nweight = {weight}\nprotocol = \"h2c\"\n"
        )
    };
    proxy_toml("")
        + &format!(
            "[[service]]\nname = \"{SERVICE}\"\nhosts = [\"{AUTHORITY}\"]\nbaseline = \"stable\"\n"
        )
        + &pool("stable", stable, weights.0)
        + &pool("canary", canary, weights.1)
        + extra
}

struct Echo {
    proxy: Proxy,
    stable: GrpcServer,
    canary: GrpcServer,
}

async fn echo_service(weights: (u32, u32), extra: &str) -> Echo {
    let (stable, canary) = tokio::join!(grpc_server("stable"), grpc_server("canary"));
    let toml = echo_toml(
        &stable.addr.to_string(),
        &canary.addr.to_string(),
        weights,
        extra,
    );
    Echo {
        proxy: start(&toml).await,
        stable,
        canary,
    }
}

fn weights(proxy: &Proxy) -> Vec<u32> {
    proxy.controller.snapshot(SERVICE).unwrap().weights()
}

/// The guard's latest decision on the canary, if any.
fn canary_decision(service: &Value) -> Option<Value> {
    service["guard"]["decisions"]
        .as_array()?
        .iter()
        .find(|d| d["pool"] == "canary")
        .cloned()
}

/// The requests in the canary's live guard window.
fn canary_window_requests(service: &Value) -> u64 {
    service["guard"]["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["pool"] == "canary"))
        .and_then(|p| p["requests"].as_u64())
        .unwrap_or(0)
}

/// The lines of a scrape these tests look at, for failure messages (the whole text is
/// hundreds of lines of histograms).
fn grpc_lines(text: &str) -> String {
    text.lines()
        .filter(|l| {
            [
                "weir_grpc_responses_total",
                "weir_request_failures_total",
                "weir_requests_total",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn scrape(proxy: &Proxy) -> String {
    let a = get(&client(), proxy.admin, "localhost", "/metrics").await;
    assert_eq!(a.status, StatusCode::OK);
    a.text()
}

/// tests/grpc/client.py sending paced calls through weir. Killed when dropped.
struct Load {
    child: Child,
    /// The client's latest JSON line (per-second counts), for failure messages.
    latest: Arc<Mutex<Value>>,
    reader: tokio::task::JoinHandle<Option<Value>>,
}

impl Load {
    fn start(target: SocketAddr, rate: u32, max_secs: u32) -> Load {
        let mut child = Command::new(PYTHON)
            .arg(script("client.py"))
            .args(["--target", &target.to_string(), "--authority", AUTHORITY])
            .args([
                "--rate",
                &rate.to_string(),
                "--duration",
                &max_secs.to_string(),
            ])
            .args(["--deadline-ms", "1000", "--exit-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start tests/grpc/client.py");
        let latest = Arc::new(Mutex::new(Value::Null));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let seen = Arc::clone(&latest);
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let doc: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("client.py printed {line:?}: {e}"));
                *seen.lock().unwrap() = doc.clone();
                if doc["summary"] == true {
                    return Some(doc);
                }
            }
            None
        });
        Load {
            child,
            latest,
            reader,
        }
    }

    fn latest(&self) -> Value {
        self.latest.lock().unwrap().clone()
    }

    /// Close the client's stdin (it stops sending, waits for its open calls) and return
    /// its summary line.
    async fn stop(mut self) -> Value {
        drop(self.child.stdin.take());
        // Open calls end within their 1 s deadline, plus a second of slack in the client.
        let summary = tokio::time::timeout(Duration::from_secs(10), &mut self.reader)
            .await
            .expect("client.py printed no summary within 10 s of stdin closing")
            .unwrap()
            .expect("client.py ended without a summary");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        summary
    }
}

/// One call with client.py --once through weir: {"code", "details", ...}.
async fn call_once(target: SocketAddr, extra: &[&str]) -> Value {
    let out = Command::new(PYTHON)
        .arg(script("client.py"))
        .args(["--target", &target.to_string(), "--authority", AUTHORITY])
        .args(["--once", "--deadline-ms", "3000"])
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("client.py --once took over 30 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "client.py --once: {e}; status {}, stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Load at ~200 calls/s until the guard has judged the canary healthy on real traffic,
/// so the fault starts mid-run, as a bad deploy would.
async fn warm_up(s: &Echo) -> Load {
    let load = Load::start(s.proxy.addr, 200, 60);
    let judged = wait_until(Duration::from_secs(30), || async {
        let svc = s.proxy.service(SERVICE).await;
        canary_window_requests(&svc) >= 100
            && canary_decision(&svc).is_some_and(|d| d["verdict"] == "pass")
    })
    .await;
    assert!(
        judged,
        "no pass verdict on 100 canary calls; guard {}; client {}",
        s.proxy.service(SERVICE).await["guard"],
        load.latest()
    );
    assert_eq!(weights(&s.proxy), [80, 20]);
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_answering_unavailable_is_rolled_back() {
    if !grpc_available() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let s = echo_service((80, 20), SLO).await;
    let load = warm_up(&s).await;

    let switched = Instant::now();
    set_faults(&s.canary, 0.3, "UNAVAILABLE").await;
    let reverted = wait_until(Duration::from_secs(15), || async {
        weights(&s.proxy) == [100, 0]
    })
    .await;
    let took = switched.elapsed();
    let client_then = load.latest();
    let summary = load.stop().await;
    let canary = server_stats(&s.canary).await;
    let failed = count(&canary["codes"], "UNAVAILABLE");
    assert!(
        reverted,
        "never rolled back in {took:?}; guard {}; client {client_then}",
        s.proxy.service(SERVICE).await["guard"]
    );
    eprintln!(
        "grpc: rolled back {took:?} after the canary began answering UNAVAILABLE on 30% of calls; \
         {failed} canary calls failed meanwhile; client summary {summary}"
    );
    // Same bound as tests/it/guard.rs plus room for four Python processes on two cores.
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let events = s.proxy.events().await;
    let e = events
        .iter()
        .find(|e| e["kind"] == "rolled_back")
        .unwrap_or_else(|| panic!("no rolled_back event in {:?}", event_kinds(&events)));
    assert_eq!(e["source"], "guard", "{e}");
    assert_eq!(e["details"]["pool"], "canary", "{e}");
    assert_eq!(e["details"]["check"], "error_rate", "{e}");

    // The client saw the servers' statuses and nothing of weir's making.
    let codes = &summary["codes"];
    assert_eq!(count(codes, "UNAVAILABLE"), failed, "{summary}");
    assert_eq!(
        count(codes, "OK") + failed,
        summary["done"].as_u64().unwrap(),
        "{summary}"
    );

    let metrics = scrape(&s.proxy).await;
    let canary_pool = [("service", SERVICE), ("pool", "canary")];
    let grpc_unavailable = metric(
        &metrics,
        "weir_grpc_responses_total",
        &[canary_pool[0], canary_pool[1], ("code", "UNAVAILABLE")],
    );
    assert_eq!(
        grpc_unavailable,
        Some(failed as f64),
        "weir_grpc_responses_total for the canary's UNAVAILABLE answers:\n{}",
        grpc_lines(&metrics)
    );
    let canary_failures = metric(&metrics, "weir_request_failures_total", &canary_pool);
    assert!(
        canary_failures.is_some_and(|n| n > 0.0),
        "weir_request_failures_total for the canary: {canary_failures:?}\n{}",
        grpc_lines(&metrics)
    );
    // The baseline answered only OK, each counted as such.
    let stable = server_stats(&s.stable).await;
    let stable_calls = stable["calls"].as_u64().unwrap();
    assert_eq!(count(&stable["codes"], "OK"), stable_calls, "{stable}");
    let stable_pool = [("service", SERVICE), ("pool", "stable")];
    assert_eq!(
        metric(
            &metrics,
            "weir_grpc_responses_total",
            &[stable_pool[0], stable_pool[1], ("code", "OK")]
        ),
        Some(stable_calls as f64),
        "{}",
        grpc_lines(&metrics)
    );
    assert_eq!(
        metric(&metrics, "weir_request_failures_total", &stable_pool),
        Some(0.0),
        "{}",
        grpc_lines(&metrics)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_answering_not_found_is_not_rolled_back() {
    if !grpc_available() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let s = echo_service((80, 20), SLO).await;
    let load = warm_up(&s).await;

    set_faults(&s.canary, 0.3, "NOT_FOUND").await;
    let switched = Instant::now();
    // Evidence enough: 12 evaluations after the switch (6 s at 500 ms) — three times the
    // ~2 s an UNAVAILABLE canary needs, and twice the 3 s fast window, so the last ones
    // judged post-switch traffic only. Each decision carries its time; count distinct ones.
    let judged_at = Mutex::new(std::collections::HashSet::new());
    let last = Mutex::new(Value::Null);
    let enough = wait_until(Duration::from_secs(30), || async {
        let svc = s.proxy.service(SERVICE).await;
        if let Some(d) = canary_decision(&svc) {
            judged_at.lock().unwrap().insert(d["at"].to_string());
            *last.lock().unwrap() = d;
        }
        // A rollback ends the wait early; the asserts below report it.
        judged_at.lock().unwrap().len() > 12 || weights(&s.proxy) != [80, 20]
    })
    .await;
    let judged = judged_at.into_inner().unwrap().len();
    let last = last.into_inner().unwrap();
    let took = switched.elapsed();
    let summary = load.stop().await;
    let canary = server_stats(&s.canary).await;
    let not_found = count(&canary["codes"], "NOT_FOUND");
    eprintln!(
        "grpc: canary answered NOT_FOUND on 30% of calls for {took:?} ({not_found} calls, {} \
         guard evaluations): weights {:?}; last decision {last}",
        judged,
        weights(&s.proxy)
    );
    assert!(enough, "only {judged} evaluations in {took:?}");
    assert_eq!(weights(&s.proxy), [80, 20], "last decision {last}");
    let kinds = event_kinds(&s.proxy.events().await);
    assert!(!kinds.iter().any(|k| k == "rolled_back"), "{kinds:?}");
    assert_eq!(last["verdict"], "pass", "{last}");
    assert_eq!(last["candidate"]["errors"], 0, "{last}");
    // ~40 canary calls/s, 30% failing: about 70 in 6 s, where an UNAVAILABLE canary is
    // rolled back after a few dozen.
    assert!(not_found >= 50, "only {not_found} NOT_FOUND answers");

    let codes = &summary["codes"];
    assert_eq!(count(codes, "NOT_FOUND"), not_found, "{summary}");
    assert_eq!(
        count(codes, "OK") + not_found,
        summary["done"].as_u64().unwrap(),
        "{summary}"
    );

    let metrics = scrape(&s.proxy).await;
    let canary_pool = [("service", SERVICE), ("pool", "canary")];
    assert_eq!(
        metric(
            &metrics,
            "weir_grpc_responses_total",
            &[canary_pool[0], canary_pool[1], ("code", "NOT_FOUND")]
        ),
        Some(not_found as f64),
        "{}",
        grpc_lines(&metrics)
    );
    assert_eq!(
        metric(&metrics, "weir_request_failures_total", &canary_pool),
        Some(0.0),
        "{}",
        grpc_lines(&metrics)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weirs_own_failure_is_a_grpc_unavailable() {
    if !grpc_available() {
        return;
    }
    let stable = grpc_server("stable").await;
    // A port nothing listens on: bound, read, released.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // The canary takes no share; a tester reaches it by header, as targeting allows.
    let toml = echo_toml(
        &stable.addr.to_string(),
        &dead.to_string(),
        (100, 0),
        "[service.targeting]\nheader = \"x-weir-pool\"\n",
    );
    let proxy = start(&toml).await;

    let ok = call_once(proxy.addr, &["--data", "hello"]).await;
    assert_eq!(ok["code"], "OK", "{ok}");
    assert_eq!(ok["response"], "hello", "{ok}");

    let failed = call_once(proxy.addr, &["--metadata", "x-weir-pool=canary"]).await;
    assert_eq!(failed["code"], "UNAVAILABLE", "{failed}");
    // grpcio also turns a plain HTTP 502/503 into UNAVAILABLE, with details "Received
    // http2 header with status: 502": the status must come from weir's grpc-status.
    eprintln!("grpc: weir's own failure as grpcio saw it: {failed}");
    let details = failed["details"].as_str().unwrap_or_default();
    assert!(
        !details.is_empty() && !details.contains("http2 header with status"),
        "{failed}"
    );

    // On the wire: a trailers-only answer, HTTP 200, grpc-status 14 and a message.
    let a = grpc_unary(
        proxy.addr,
        AUTHORITY,
        "/weir.test.Echo/Call",
        &[("x-weir-pool", "canary")],
        b"x",
    )
    .await;
    assert_eq!(a.http, StatusCode::OK);
    assert!(
        a.content_type.starts_with("application/grpc"),
        "{}",
        a.content_type
    );
    assert!(a.trailers_only, "grpc-status not in the headers");
    assert_eq!(a.status.as_deref(), Some("14"), "{}", a.message);
    assert!(!a.message.is_empty());

    let metrics = scrape(&proxy).await;
    let failures = metric(
        &metrics,
        "weir_request_failures_total",
        &[("service", SERVICE), ("pool", "canary")],
    );
    assert!(
        failures.is_some_and(|n| n >= 2.0),
        "{failures:?}\n{}",
        grpc_lines(&metrics)
    );
}

/// An upstream slower than `request_timeout`: the gRPC client gets DEADLINE_EXCEEDED
/// from weir (trailers-only, grpc-status 4), not an HTTP 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weirs_own_timeout_is_a_grpc_deadline_exceeded() {
    if !grpc_available() {
        return;
    }
    let stable = grpc_server("stable").await;
    let toml = echo_toml(
        &stable.addr.to_string(),
        &stable.addr.to_string(),
        (100, 0),
        "",
    )
    .replacen("request_timeout = \"2s\"", "request_timeout = \"300ms\"", 1);
    let proxy = start(&toml).await;
    let doc = serde_json::json!({ "fail_rate": 0.0, "code": "UNAVAILABLE", "delay_ms": 1500 });
    let set = grpc_unary(
        stable.addr,
        "127.0.0.1",
        "/weir.test.Control/Set",
        &[],
        doc.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        set.status.as_deref(),
        Some("0"),
        "Control/Set: {}",
        set.message
    );
    let slow = call_once(proxy.addr, &["--data", "slow"]).await;
    assert_eq!(slow["code"], "DEADLINE_EXCEEDED", "{slow}");
    let a = grpc_unary(proxy.addr, AUTHORITY, "/weir.test.Echo/Call", &[], b"x").await;
    assert_eq!(a.http, StatusCode::OK);
    assert!(a.trailers_only, "grpc-status not in the headers");
    assert_eq!(a.status.as_deref(), Some("4"), "{}", a.message);
    let metrics = scrape(&proxy).await;
    assert!(
        metric(
            &metrics,
            "weir_grpc_responses_total",
            &[
                ("service", SERVICE),
                ("pool", "stable"),
                ("code", "DEADLINE_EXCEEDED")
            ],
        )
        .is_some_and(|n| n >= 2.0),
        "{}",
        grpc_lines(&metrics)
    );
}
