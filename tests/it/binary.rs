//! The `weir` binary as operators run it: `check` on good and bad files, and `run` moving
//! a 1 GiB upload and a 1 GiB download with flat memory (measured on the proxy process
//! alone, which is why this drives the real binary).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

fn check(path: &Path) -> (i32, String, String) {
    let out = Command::new(WEIR)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_config_passes_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/weir.toml");
    let (code, out, err) = check(&path);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: "), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn check_prints_every_problem_and_fails() {
    let dir = tempdir();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[proxy]\nrequest_timeout = \"forever\"\n\n[[service]]\nname = \"shop\"\nbaseline = \"stable\"\n[service.pools.canary]\nendpoints = [\"localhost\"]\nweight = 0\n",
    )
    .unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let file = path.display().to_string();
    for needle in [
        format!("{file}:2: proxy.request_timeout:"),
        format!("{file}:6: service[shop].baseline:"),
        format!("{file}:8: service[shop].pools.canary.endpoints:"),
        format!("{file}:9: service[shop].pools:"),
        "4 problem(s)".to_owned(),
    ] {
        assert!(err.contains(&needle), "missing `{needle}` in:\n{err}");
    }
}

#[test]
fn check_reports_syntax_errors_with_line_and_column() {
    let dir = tempdir();
    let path = dir.join("syntax.toml");
    std::fs::write(&path, "[proxy]\nlisten = \"127.0.0.1:8080\n").unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{}:2:", path.display())), "{err}");
}

fn tempdir() -> std::path::PathBuf {
    temp_dir("binary")
}

/// `weir run --config PATH` in the background, killed when dropped.
fn run_config(path: &Path) -> Running {
    Running(
        Command::new(WEIR)
            .args(["run", "--config"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_streams_with_flat_memory() {
    let up = upstream("big").await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempdir();
    let path = dir.join("weir.toml");
    let admin_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[state]\ndir = \"{}\"\n",
        dir.join("state").display()
    ) + &service_toml("svc", None, &[("main", vec![up.addr().to_string()], 1)]);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(toml.as_bytes())
        .unwrap();
    let child = run_config(&path);
    let pid = child.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c = client();
    let ready = answers_ok(&c, format!("http://{addr}/")).await;
    assert!(ready, "weir did not start");
    let before = peak_rss_kib(pid);

    const GIB: u64 = 1 << 30;
    let req = Request::post(format!("http://{addr}/sink"))
        .body(Generated::new(GIB, false).boxed())
        .unwrap();
    let a = send(&c, req).await;
    assert_eq!(a.json()["bytes"], GIB);

    let req = Request::get(format!("http://{addr}/stream?bytes={GIB}"))
        .body(empty())
        .unwrap();
    let mut body = c.request(req).await.unwrap().into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            total += d.len() as u64;
        }
    }
    assert_eq!(total, GIB);

    let after = peak_rss_kib(pid);
    // Two GiB went through; the proxy's peak memory may grow by buffers, not by bodies.
    assert!(
        after - before < 32 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
}

/// Poll `url` until it answers 200, for up to 20 s (a process starting up).
async fn answers_ok(
    c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        TestBody,
    >,
    url: String,
) -> bool {
    wait_until(Duration::from_secs(20), || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let req = Request::get(url).body(empty()).unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await
}

/// Start `weir run` on a config with the given state dir; returns the process and its
/// admin address once `/readyz` answers.
async fn run_weir(
    dir: &Path,
    state: &Path,
    stable: &str,
    canary: &str,
) -> (Running, std::net::SocketAddr) {
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\nworkers = 1\n[admin]\nlisten = \"{admin}\"\n[state]\ndir = \"{}\"\n",
        free_port(),
        state.display()
    ) + &service_toml(
        "shop",
        None,
        &[
            ("stable", vec![stable.into()], 90),
            ("canary", vec![canary.into()], 10),
        ],
    );
    let path = dir.join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    let child = run_config(&path);
    let c = client();
    let ready = answers_ok(&c, format!("http://{admin}/readyz")).await;
    assert!(ready, "weir did not become ready");
    (child, admin)
}

#[tokio::test]
async fn acknowledged_weights_survive_kill_9() {
    let dir = tempdir();
    let state = dir.join("state");
    let (mut child, admin) = run_weir(&dir, &state, "127.0.0.1:1", "127.0.0.1:2").await;
    let c = client();
    let req = Request::put(format!("http://{admin}/api/v1/services/shop/weights"))
        .header("content-type", "application/json")
        .body(full(
            r#"{"weights":{"stable":25,"canary":75},"reason":"before crash"}"#,
        ))
        .unwrap();
    let a = send(&c, req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // SIGKILL right after the 200: no chance to flush anything.
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    let (_child, admin) = run_weir(&dir, &state, "127.0.0.1:1", "127.0.0.1:2").await;
    let s = get(&c, admin, "localhost", "/api/v1/services/shop")
        .await
        .json();
    assert_eq!(s["pools"][0]["weight"], 25);
    assert_eq!(s["pools"][1]["weight"], 75);
    assert_eq!(s["version"], 2);
    assert_eq!(s["updated_by"], "admin");
    let events = get(&c, admin, "localhost", "/api/v1/events").await.json();
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["weights_changed", "state_restored"]);
    assert_eq!(events["events"][0]["reason"], "before crash");
}

#[tokio::test]
async fn state_file_of_an_older_format_still_loads() {
    let dir = tempdir();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/weir/tests/fixtures/state-v1.json"),
        state.join("state.json"),
    )
    .unwrap();
    // The fixture has shop at stable=90 canary=10, version 3; start with other weights.
    let (_child, admin) = run_weir(&dir, &state, "127.0.0.1:1", "127.0.0.1:2").await;
    let c = client();
    let s = get(&c, admin, "localhost", "/api/v1/services/shop")
        .await
        .json();
    assert_eq!(s["version"], 3);
    assert_eq!(s["pools"][0]["weight"], 90);
    // And it was rewritten in the current format.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("state.json")).unwrap()).unwrap();
    assert_eq!(saved["format"], 2);
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let dir = tempdir();
    let state = dir.join("state");
    let (child, admin) = run_weir(&dir, &state, "127.0.0.1:1", "127.0.0.1:2").await;
    let path = dir.join("weir.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("service.pools.canary", "service.pools.green"),
    )
    .unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let c = client();
    let reloaded = wait_until(Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let s = get(&c, admin, "localhost", "/api/v1/services/shop")
                .await
                .json();
            s["pools"][1]["name"] == "green"
        }
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload the config");
    let events = get(&c, admin, "localhost", "/api/v1/events").await.json();
    let e = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "config_reloaded")
        .cloned()
        .expect("config_reloaded event");
    assert_eq!(e["actor"], "SIGHUP");
    assert_eq!(e["details"]["reset"], serde_json::json!(["shop"]));
}

fn demo(extra: &[&str]) -> String {
    let out = Command::new(WEIR)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--duration",
            "40s",
        ])
        .args(extra)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn demo_tour_promotes_the_canary() {
    let out = demo(&[]);
    assert!(out.contains("summary: canary promoted"), "{out}");
    assert!(
        out.contains("step 4/7 gate: 150 requests passing the SLO guard"),
        "{out}"
    );
    assert!(out.contains("rollout_promoted (rollout)"), "{out}");
    // The journal names each step once: a step entered and applied is one event
    // ("timed pause over; step 3: …"), never followed by a second "step 3".
    let journal: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with('#'))
        .collect();
    for step in 1..=7 {
        let named = journal
            .iter()
            .map(|l| l.matches(&format!("step {step}: ")).count())
            .sum::<usize>();
        assert!(
            named <= 1,
            "step {step} named {named} times:\n{}",
            journal.join("\n")
        );
    }
    assert!(
        journal
            .iter()
            .any(|l| l.contains("timed pause over; step 3: 25% to the candidate")),
        "{out}"
    );
}

#[test]
fn demo_with_a_failing_canary_shows_the_guard_revert() {
    let out = demo(&["--fail-canary"]);
    assert!(out.contains(">>> the canary starts failing"), "{out}");
    assert!(
        out.contains("summary: the SLO guard rolled the canary back"),
        "{out}"
    );
    assert!(out.contains("guard decision: canary error rate"), "{out}");
    assert!(out.contains("record: check error_rate"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let up = upstream("slow").await;
    up.set_faults(weir_testkit::Faults::delay(Duration::from_millis(800)));
    let dir = tempdir();
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"20s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[state]\ndir = \"{}\"\n",
        dir.join("state").display()
    ) + &service_toml("svc", None, &[("p", vec![up.addr().to_string()], 1)]);
    let path = dir.join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = run_config(&path);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c = client();
    let ready = answers_ok(&c, format!("http://127.0.0.1:{admin}/readyz")).await;
    assert!(ready);
    let inflight: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(&client(), addr, "x", "/").await.status }))
        .collect();
    assert!(wait_until(Duration::from_secs(10), || async { up.requests() >= 10 }).await);
    let stopping = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    for r in inflight {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_sends_paced_load_counted_by_pool() {
    let shop = shop(Some(&["shop.example.com"]), (1, 1), "").await;
    let target = shop.proxy.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(WEIR)
            .args(["traffic", "--target", &target, "--host", "shop.example.com"])
            .args(["--rate", "200", "--duration", "2s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    // Both pools of a 1:1 split answer within a second's worth of 200 requests.
    assert!(last.starts_with("[   2s]"), "{text}");
    assert!(
        last.contains("stable ") && last.contains("canary "),
        "{text}"
    );
    assert!(!text.contains("no answer"), "{text}");
    // A wrong Host gets weir's 404, counted under no pool name.
    let target = shop.proxy.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(WEIR)
            .args(["traffic", "--target", &target, "--host", "nope.example.com"])
            .args(["--rate", "50", "--duration", "1s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("  - "), "{text}");
}
