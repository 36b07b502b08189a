//! weir's own log (JSON or text, colour only for a terminal) and the access log: real
//! `weir run` processes for the log format, a real pty (`script` from bsdutils) for
//! colour, and real requests through real upstreams for the access log's lines.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use weir::config::Config;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// The JSON lines of an access log file (empty when the file does not exist); panics on
/// a line that is not one JSON object.
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            assert!(v.is_object(), "{l}");
            v
        })
        .collect()
}

/// Wait until the file holds at least `n` lines; then return them.
async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let ok = wait_until(Duration::from_secs(10), || async {
        std::fs::read_to_string(path).is_ok_and(|t| t.lines().count() >= n)
    })
    .await;
    let got = lines(path);
    assert!(
        ok,
        "expected {n} lines in {}, got {}",
        path.display(),
        got.len()
    );
    got
}

fn access_toml(path: &Path, extra: &str) -> String {
    format!(
        "[log.access]\nenabled = true\npath = \"{}\"\n{extra}\n",
        path.display()
    )
}

#[tokio::test]
async fn access_log_is_off_by_default_and_when_disabled() {
    let dir = temp_dir("access-off");
    let path = dir.join("access.log");
    let shop = shop(
        None,
        (1, 1),
        &format!(
            "[log.access]\nenabled = false\npath = \"{}\"\n",
            path.display()
        ),
    )
    .await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(
            get(&c, shop.proxy.addr, "x", "/").await.status,
            StatusCode::OK
        );
    }
    // Off means not even opened.
    assert!(!path.exists());
    let metrics = get(&c, shop.proxy.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains("weir_access_log_dropped_total 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn every_request_gets_one_line_naming_its_service_pool_and_status() {
    let dir = temp_dir("access-all");
    let path = dir.join("access.log");
    let shop = shop(None, (1, 1), &access_toml(&path, "sample = 1")).await;
    let c = client();
    let mut answered = std::collections::HashMap::new();
    for i in 0..40 {
        let req = Request::get(format!("http://{}/item/{i}?token=secret", shop.proxy.addr))
            .header("user-agent", "weir-test/1.0")
            .header("x-request-id", format!("req-{i}"))
            .body(empty())
            .unwrap();
        let a = send(&c, req).await;
        assert_eq!(a.status, StatusCode::OK);
        answered.insert(
            format!("/item/{i}"),
            (a.upstream().to_owned(), a.body.len()),
        );
    }
    let got = wait_lines(&path, 40).await;
    assert_eq!(got.len(), 40);
    let stable = shop.stable.addr().to_string();
    let canary = shop.canary.addr().to_string();
    for line in &got {
        let path = line["path"].as_str().unwrap();
        let (pool, body) = &answered[path];
        assert_eq!(line["bytes_sent"], *body, "{line}");
        assert_eq!(line["service"], "shop");
        assert_eq!(line["pool"], pool.as_str(), "{line}");
        let endpoint = if pool == "stable" { &stable } else { &canary };
        assert_eq!(line["endpoint"], endpoint.as_str());
        assert_eq!(line["status"], 200);
        assert_eq!(line["method"], "GET");
        assert_eq!(line["http_version"], "HTTP/1.1");
        assert_eq!(line["tls"], false);
        assert_eq!(line["error"], Value::Null);
        assert_eq!(line["user_agent"], "weir-test/1.0");
        assert_eq!(
            line["request_id"],
            format!("req-{}", path.trim_start_matches("/item/"))
        );
        assert!(line.get("query").is_none(), "query logged: {line}");
        assert!(
            line["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        let (headers, total) = (
            line["headers_ms"].as_f64().unwrap(),
            line["duration_ms"].as_f64().unwrap(),
        );
        assert!(headers >= 0.0 && headers <= total, "{line}");
        let time = line["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    }
    // Both pools served, and each line says which.
    assert!(got.iter().any(|l| l["pool"] == "stable"));
    assert!(got.iter().any(|l| l["pool"] == "canary"));
}

#[tokio::test]
async fn the_query_is_logged_only_when_asked() {
    let dir = temp_dir("access-query");
    let path = dir.join("access.log");
    let shop = shop(None, (1, 0), &access_toml(&path, "include_query = true")).await;
    let c = client();
    get(&c, shop.proxy.addr, "x", "/search?q=shoes&page=2").await;
    let got = wait_lines(&path, 1).await;
    assert_eq!(got[0]["path"], "/search");
    assert_eq!(got[0]["query"], "q=shoes&page=2");
}

/// One raw HTTP/1.1 exchange: whatever bytes the test wants, answered or refused.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    answer
}

#[tokio::test]
async fn hostile_requests_stay_valid_bounded_json() {
    let dir = temp_dir("access-hostile");
    let path = dir.join("access.log");
    let shop = shop(None, (1, 0), &access_toml(&path, "")).await;
    let addr = shop.proxy.addr;
    let huge_ua = "A".repeat(7000);
    let long_path = format!("/{}", "p".repeat(5000));
    let requests: Vec<Vec<u8>> = vec![
        // A user agent trying to end the line and start a forged one.
        b"GET /forge HTTP/1.1\r\nHost: x\r\nUser-Agent: a\"}, {\"status\": 200, \"x\": \"\tz\r\nConnection: close\r\n\r\n"
            .to_vec(),
        format!("GET /huge HTTP/1.1\r\nHost: x\r\nUser-Agent: {huge_ua}\r\nConnection: close\r\n\r\n")
            .into_bytes(),
        // obs-text: bytes that are not UTF-8 in a header value, and in the path.
        b"GET /bytes HTTP/1.1\r\nHost: x\r\nUser-Agent: \xff\xfe\x80ua\r\nConnection: close\r\n\r\n"
            .to_vec(),
        b"GET /caf\xc3\xa9/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        // Escaped control characters in the path, and a long one.
        b"GET /nul%00%0d%0a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        format!("GET {long_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes(),
        // A method nobody uses, and one hyper refuses before weir sees it.
        b"BREW /pot HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /ctl\x01 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    ];
    for r in &requests {
        raw(addr, r).await;
    }
    // A well-formed request last: once its line is there, every earlier one that weir
    // answered is written (one writer, in order).
    get(&client(), addr, "x", "/last").await;
    let ok = wait_until(Duration::from_secs(10), || async {
        lines(&path).iter().any(|l| l["path"] == "/last")
    })
    .await;
    assert!(ok);
    let text = std::fs::read_to_string(&path).unwrap();
    let got = lines(&path);
    assert_eq!(text.lines().count(), got.len());
    for (raw_line, l) in text.lines().zip(&got) {
        // Bounded: nothing a client sends makes a line longer than a few KiB.
        assert!(
            raw_line.len() < 4096,
            "{} bytes: {raw_line:.200}",
            raw_line.len()
        );
        assert!(l["status"].is_u64(), "{l}");
        assert!(l["user_agent"].as_str().is_none_or(|ua| ua.len() <= 256));
    }
    let by_path = |p: &str| got.iter().find(|l| l["path"] == p).cloned();
    let forge = by_path("/forge").expect("the forging request is logged");
    assert!(forge["user_agent"].as_str().unwrap().starts_with("a\"}, {"));
    // The forged `"status": 200` stayed inside the user agent string.
    assert_eq!(forge["status"], 200);
    assert_eq!(got.iter().filter(|l| l["path"] == "/forge").count(), 1);
    let huge = by_path("/huge").expect("the huge user agent is logged");
    assert_eq!(huge["user_agent"].as_str().unwrap().len(), 256);
    let bytes = by_path("/bytes").expect("obs-text user agent is logged");
    assert!(bytes["user_agent"].as_str().unwrap().contains('\u{fffd}'));
    assert!(by_path("/nul%00%0d%0a").is_some());
    assert!(
        got.iter()
            .any(|l| l["path"].as_str().unwrap().starts_with("/ppp")
                && l["path"].as_str().unwrap().len() <= 2048)
    );
    let brew = by_path("/pot").expect("an unknown method is logged");
    assert_eq!(brew["method"], "BREW");
}

#[tokio::test]
async fn failures_are_logged_whatever_the_sample() {
    let dir = temp_dir("access-errors");
    let path = dir.join("access.log");
    let good = upstream("good").await;
    // Port 1 on loopback: connection refused, weir's 502.
    let toml = proxy_toml("")
        + &service_toml(
            "broken",
            Some(&["broken"]),
            &[("dead", vec!["127.0.0.1:1".into()], 1)],
        )
        + &service_toml(
            "fine",
            Some(&["fine"]),
            &[("live", vec![good.addr().to_string()], 1)],
        )
        + &access_toml(&path, "sample = 0.000000001");
    let proxy = start(&toml).await;
    let c = client();
    for _ in 0..30 {
        assert_eq!(
            get(&c, proxy.addr, "fine", "/").await.status,
            StatusCode::OK
        );
        assert_eq!(
            get(&c, proxy.addr, "broken", "/").await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    // No service for this host: logged too, with no service or pool.
    assert_eq!(
        get(&c, proxy.addr, "nobody.example", "/who").await.status,
        StatusCode::NOT_FOUND
    );
    let got = wait_lines(&path, 31).await;
    let broken: Vec<&Value> = got.iter().filter(|l| l["service"] == "broken").collect();
    assert_eq!(broken.len(), 30);
    for l in &broken {
        // weir answered itself: no upstream body relayed.
        assert_eq!(l["bytes_sent"], Value::Null);
        assert_eq!(l["pool"], "dead");
        assert_eq!(l["status"], 502);
        assert_eq!(l["error"], "connect");
    }
    // Successes were sampled at one in a billion.
    assert!(got.iter().all(|l| l["service"] != "fine"), "{got:?}");
    let unrouted = got
        .iter()
        .find(|l| l["path"] == "/who")
        .expect("404 logged");
    assert_eq!(unrouted["service"], Value::Null);
    assert_eq!(unrouted["pool"], Value::Null);
    assert_eq!(unrouted["status"], 404);
    assert_eq!(got.len(), 31);
}

#[tokio::test]
async fn a_sample_of_half_logs_about_half() {
    let dir = temp_dir("access-sample");
    let path = dir.join("access.log");
    let shop = shop(None, (1, 1), &access_toml(&path, "sample = 0.5")).await;
    const N: usize = 400;
    let c = client();
    for _ in 0..N {
        assert_eq!(
            get(&c, shop.proxy.addr, "x", "/").await.status,
            StatusCode::OK
        );
    }
    // A marker no sample can drop: a failure, logged whatever the sample.
    shop.canary.set_faults(weir_testkit::Faults::errors(1.0));
    shop.proxy
        .set_weights("shop", &[("stable", 0), ("canary", 1)]);
    assert_eq!(
        get(&c, shop.proxy.addr, "x", "/marker").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let ok = wait_until(Duration::from_secs(10), || async {
        lines(&path).iter().any(|l| l["path"] == "/marker")
    })
    .await;
    assert!(ok);
    let sampled = lines(&path).iter().filter(|l| l["path"] == "/").count() as f64;
    // Binomial(400, 0.5): mean 200, sigma 10; six sigma either way cannot flake.
    let (mean, sigma) = (N as f64 * 0.5, (N as f64 * 0.25).sqrt());
    assert!(
        (sampled - mean).abs() <= 6.0 * sigma,
        "{sampled} of {N} logged at sample 0.5"
    );
}

#[tokio::test]
async fn reload_reopens_the_file_and_applies_new_settings() {
    let dir = temp_dir("access-reload");
    let log = dir.join("access.log");
    let up = upstream("only").await;
    let base = proxy_toml("")
        + &format!("[state]\ndir = \"{}\"\n", dir.join("state").display())
        + &service_toml("svc", None, &[("p", vec![up.addr().to_string()], 1)]);
    let config_path = dir.join("weir.toml");
    std::fs::write(&config_path, base.clone() + &access_toml(&log, "")).unwrap();
    let config = Config::load(&config_path).unwrap();
    let proxy = start_config(config, Some(config_path.clone()), Vec::new()).await;
    let c = client();
    get(&c, proxy.addr, "x", "/before").await;
    wait_lines(&log, 1).await;
    // logrotate without copytruncate: move the file, then reload (SIGHUP does the same).
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    weir::reload(&proxy.controller, &config_path, None).unwrap();
    get(&c, proxy.addr, "x", "/after").await;
    let fresh = wait_lines(&log, 1).await;
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0]["path"], "/after");
    let old = lines(&rotated);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["path"], "/before");
    // New settings: the query now, then off.
    std::fs::write(
        &config_path,
        base.clone() + &access_toml(&log, "include_query = true"),
    )
    .unwrap();
    weir::reload(&proxy.controller, &config_path, None).unwrap();
    get(&c, proxy.addr, "x", "/q?x=1").await;
    let got = wait_lines(&log, 2).await;
    assert_eq!(got[1]["query"], "x=1");
    std::fs::write(&config_path, base.clone()).unwrap();
    weir::reload(&proxy.controller, &config_path, None).unwrap();
    for _ in 0..10 {
        get(&c, proxy.addr, "x", "/off").await;
    }
    // Whatever is written is written in order: once a line sent after them shows up
    // (in another file, to tell them apart), the /off requests would have been too.
    let other = dir.join("other.log");
    std::fs::write(&config_path, base.clone() + &access_toml(&other, "")).unwrap();
    weir::reload(&proxy.controller, &config_path, None).unwrap();
    get(&c, proxy.addr, "x", "/on-again").await;
    let again = wait_lines(&other, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["path"], "/on-again");
    assert_eq!(lines(&log).len(), 2, "lines written while off");
    // A file that cannot be opened: the reload is refused and nothing changes.
    let nowhere = dir.join("missing").join("access.log");
    std::fs::write(
        &config_path,
        base.replace("service.pools.p]", "service.pools.q]")
            .replace("baseline = \"p\"", "baseline = \"q\"")
            + &access_toml(&nowhere, ""),
    )
    .unwrap();
    let (status, body) = weir::reload(&proxy.controller, &config_path, None).unwrap_err();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.error.contains("log.access: cannot open access log"),
        "{}",
        body.error
    );
    assert_eq!(proxy.service("svc").await["pools"][0]["name"], "p");
    get(&c, proxy.addr, "x", "/still-here").await;
    let again = wait_lines(&other, 2).await;
    assert_eq!(again[1]["path"], "/still-here");
    assert!(!nowhere.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_writer_drops_and_counts_instead_of_blocking_requests() {
    let dir = temp_dir("access-stuck");
    let fifo = dir.join("access.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Opened for reading and never read: once the pipe's buffer is full the writer
    // thread blocks in write(2), as it would on a hung disk.
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::File::open(fifo).unwrap())
    };
    let up = upstream("only").await;
    let toml = proxy_toml("")
        + &service_toml("svc", None, &[("p", vec![up.addr().to_string()], 1)])
        + &access_toml(&fifo, "");
    let proxy = start(&toml).await;
    let _reader = reader.join().unwrap();
    // Enough to fill the pipe (64 KiB, a few hundred lines) and the channel (8192).
    let c = client();
    let addr = proxy.addr;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..1250 {
                assert_eq!(get(&c, addr, "x", "/").await.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let metrics = get(&c, proxy.admin, "localhost", "/metrics").await.text();
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weir_access_log_dropped_total "))
        .expect("drop counter")
        .parse()
        .unwrap();
    assert!(dropped > 0.0, "{metrics}");
    // With the writer stuck and its queue full, a reload (which reopens the access log)
    // and the admin changes after it still answer: the controller never waits for the
    // writer. On threads of their own (not spawn_blocking, which the runtime would wait
    // for at the end), so that a hang fails the test; the timeouts only bound a hang.
    let config = Config::parse(&toml, "t").unwrap();
    let controller = Arc::clone(&proxy.controller);
    let (done, reloaded) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done.send(controller.reload(&config, None).map(drop));
    });
    tokio::time::timeout(Duration::from_secs(20), reloaded)
        .await
        .expect("a reload hangs on a stuck access log writer")
        .unwrap()
        .unwrap();
    let controller = Arc::clone(&proxy.controller);
    let (done, set) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done.send(
            controller
                .apply(weir::Command::SetWeights {
                    service: "svc".into(),
                    weights: vec![("p".into(), 1)],
                    if_version: None,
                    source: weir::model::Source::Admin,
                    actor: None,
                    reason: None,
                })
                .map(drop),
        );
    });
    tokio::time::timeout(Duration::from_secs(20), set)
        .await
        .expect("an admin change hangs after a reload")
        .unwrap()
        .unwrap();
}

/// A `weir run` process logging to files, and the upstream it proxies to.
struct Logged {
    child: Running,
    addr: std::net::SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
    _upstream: weir_testkit::UpstreamHandle,
}

/// Start `weir run` on a fresh config (`extra` appended) with stderr and stdout going
/// to files.
async fn run_logged(dir: &Path, extra: &str, args: &[&str], env: &[(&str, &str)]) -> Logged {
    let up = upstream("only").await;
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[state]\ndir = \"{}\"\n",
        dir.join("state").display()
    ) + &service_toml("svc", None, &[("p", vec![up.addr().to_string()], 1)])
        + extra;
    let path = dir.join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut cmd = Command::new(WEIR);
    cmd.args(["run", "--config"])
        .arg(&path)
        .args(args)
        .env("RUST_LOG", "weir=debug")
        .env_remove("WEIR_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = Running(cmd.spawn().unwrap());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c = client();
    let ready = wait_until(Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            let req = Request::get(format!("http://127.0.0.1:{admin}/readyz"))
                .body(empty())
                .unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await;
    assert!(ready, "weir did not start");
    Logged {
        child,
        addr,
        stdout: out,
        stderr: err,
        _upstream: up,
    }
}

/// SIGTERM, then wait for a clean exit.
async fn stop(weir: Logged) {
    let Logged { mut child, .. } = weir;
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_from_the_config_makes_every_stderr_line_json() {
    let dir = temp_dir("log-json");
    // The access log to stdout (its default), next to weir's own log on stderr.
    let weir = run_logged(
        &dir,
        "[log]\nformat = \"json\"\n[log.access]\nenabled = true\n",
        &[],
        &[],
    )
    .await;
    let c = client();
    for i in 0..5 {
        assert_eq!(
            get(&c, weir.addr, "x", &format!("/json/{i}")).await.status,
            StatusCode::OK
        );
    }
    let (out, err) = (weir.stdout.clone(), weir.stderr.clone());
    stop(weir).await;
    let text = std::fs::read_to_string(&err).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(!events.is_empty());
    for e in &events {
        assert!(e["level"].is_string(), "{e}");
        assert!(e["message"].is_string(), "{e}");
        assert!(e["timestamp"].is_string(), "{e}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("serving on"))
    );
    // RUST_LOG still filters: the per-request debug lines are there, fields flat.
    let requests: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 5, "{text}");
    assert_eq!(requests[0]["service"], "svc");
    assert_eq!(requests[0]["level"], "DEBUG");
    assert!(!text.contains('\x1b'));
    // The access log went to stdout, flushed before exit.
    let access = lines(&out);
    assert_eq!(access.len(), 5);
    assert!(
        access
            .iter()
            .all(|l| l["pool"] == "p" && l["status"] == 200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_wins_over_the_config_and_text_has_no_colour_in_a_file() {
    let dir = temp_dir("log-text");
    let weir = run_logged(
        &dir,
        "[log]\nformat = \"json\"\n",
        &[],
        &[("WEIR_LOG_FORMAT", "text")],
    )
    .await;
    get(&client(), weir.addr, "x", "/").await;
    let err = weir.stderr.clone();
    stop(weir).await;
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(text.contains("serving on"), "{text}");
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_err())
    );
    assert!(!text.contains('\x1b'), "ANSI escapes in a file: {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flag_wins_over_the_environment() {
    let dir = temp_dir("log-flag");
    let weir = run_logged(
        &dir,
        "",
        &["--log-format", "json"],
        &[("WEIR_LOG_FORMAT", "text")],
    )
    .await;
    let err = weir.stderr.clone();
    stop(weir).await;
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["level"].is_string())),
        "{text}"
    );
}

/// Run `weir run` on a pseudo-terminal (util-linux `script`), stop it once it logged
/// that it serves, and return everything it wrote to the terminal.
async fn on_a_terminal(dir: &Path, no_color: Option<&str>) -> String {
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[state]\ndir = \"{}\"\n",
        dir.join("state").display()
    ) + &service_toml("svc", None, &[("p", vec!["127.0.0.1:1".into()], 1)]);
    let path = dir.join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    // The shell prints weir's pid so that the test can stop weir itself (closing the
    // terminal would send SIGHUP, which weir takes as "reload").
    let inner = format!(
        "{WEIR} run --config {} & echo weir-pid=$!; wait",
        path.display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-f", "-e", "-c", &inner, "/dev/null"])
        .env_remove("WEIR_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut child = Running(cmd.spawn().unwrap());
    let mut stdout = child.0.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let serving = wait_until(Duration::from_secs(20), || async {
        text().contains("serving on")
    })
    .await;
    assert!(serving, "weir did not start on the terminal: {}", text());
    let pid = text()
        .split("weir-pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next().map(str::to_owned))
        .expect("weir's pid");
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{}", text());
    reader.join().unwrap();
    text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_on_a_terminal_unless_no_color() {
    let coloured = on_a_terminal(&temp_dir("log-tty"), None).await;
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(&temp_dir("log-tty-nocolor"), Some("1")).await;
    assert!(plain.contains("serving on"));
    assert!(
        !plain.contains("\x1b["),
        "colour despite NO_COLOR: {plain:?}"
    );
    // NO_COLOR set but empty counts as unset.
    let empty = on_a_terminal(&temp_dir("log-tty-empty"), Some("")).await;
    assert!(empty.contains("\x1b["), "{empty:?}");
}

#[test]
fn check_reports_an_access_log_that_cannot_be_opened() {
    let dir = temp_dir("log-check-path");
    let path = dir.join("weir.toml");
    let log = dir.join("no-such-dir").join("access.log");
    std::fs::write(
        &path,
        service_toml("svc", None, &[("p", vec!["127.0.0.1:1".into()], 1)]) + &access_toml(&log, ""),
    )
    .unwrap();
    let out = Command::new(WEIR)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "log.access: cannot open access log {}",
            log.display()
        )),
        "{err}"
    );
    assert!(!log.exists());
}

#[test]
fn a_bad_sample_names_file_line_and_key() {
    let dir = temp_dir("log-check");
    let path = dir.join("weir.toml");
    let text = service_toml("svc", None, &[("p", vec!["127.0.0.1:1".into()], 1)])
        + "[log.access]\nenabled = true\nsample = 1.5\n";
    std::fs::write(&path, &text).unwrap();
    let line = text.lines().count();
    let out = Command::new(WEIR)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:{line}: log.access.sample: `1.5`", path.display());
    assert!(err.contains(&want), "missing {want} in {err}");
}
