//! `/metrics` against the real tools: promtool lints the exposition, and a real
//! Prometheus server scrapes weir while traffic flows and answers PromQL about it.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use serde_json::Value;
use weir::upstream::Faults;

fn tool(name: &str) -> String {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.display().to_string(),
        None => panic!(
            "`{name}` is not installed: run scripts/test.sh, which installs Debian's prometheus package"
        ),
    }
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    let a = get(&client(), admin, "x", "/metrics").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    a.text()
}

async fn shop_with(
    canary_faults: Faults,
) -> (
    Proxy,
    weir::upstream::UpstreamHandle,
    weir::upstream::UpstreamHandle,
) {
    let s = shop(None, (50, 50), "").await;
    s.canary.set_faults(canary_faults);
    (s.proxy, s.stable, s.canary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_passes_promtool() {
    let (proxy, _s, _c) = shop_with(Faults::errors(0.3)).await;
    let c = client();
    for i in 0..200 {
        // Varied paths must not become labels.
        get(&c, proxy.addr, "x", &format!("/item/{i}")).await;
    }
    // A pool with no endpoint, a refused connection: error series appear too.
    let text = scrape(proxy.admin).await;
    assert!(!text.contains("/item/"), "a path leaked into labels");
    for needle in [
        "# TYPE weir_requests_total counter",
        "# TYPE weir_request_duration_seconds histogram",
        "weir_request_duration_seconds_bucket{service=\"shop\",pool=\"canary\",le=\"0.0005\"}",
        "weir_request_duration_seconds_bucket{service=\"shop\",pool=\"canary\",le=\"+Inf\"}",
        "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"500\"}",
        "weir_inflight_requests{service=\"shop\",pool=\"stable\"} 0",
        "weir_pool_weight{service=\"shop\",pool=\"canary\"} 50",
        "weir_pool_share{service=\"shop\",pool=\"stable\"} 0.5",
        "weir_build_info{version=\"",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let mut promtool = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let complaints =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}\n{text}"
    );
}

#[tokio::test]
async fn error_kinds_and_weight_changes_are_counted() {
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let up = upstream("a").await;
    let toml = proxy_toml("")
        + &service_toml(
            "errs",
            None,
            &[
                ("good", vec![up.addr().to_string()], 1),
                ("dead", vec![refused.to_string()], 0),
            ],
        );
    let proxy = start(&toml).await;
    proxy.set_weights("errs", &[("good", 0), ("dead", 1)]);
    let c = client();
    for _ in 0..3 {
        assert_eq!(
            get(&c, proxy.addr, "x", "/").await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    let text = scrape(proxy.admin).await;
    for needle in [
        "weir_upstream_errors_total{service=\"errs\",pool=\"dead\",kind=\"connect\"} 3",
        "weir_requests_total{service=\"errs\",pool=\"dead\",code=\"502\"} 3",
        "weir_weight_changes_total{service=\"errs\",source=\"admin\"} 1",
        "weir_weight_changes_total{service=\"errs\",source=\"guard\"} 0",
        "weir_pool_share{service=\"errs\",pool=\"dead\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[tokio::test]
async fn metrics_can_require_the_token() {
    let up = upstream("a").await;
    let dir = temp_dir("metrics-auth");
    std::fs::write(dir.join("token"), "tok").unwrap();
    let toml = format!(
        "[admin]\ntoken_file = \"{}\"\nmetrics_auth = true\n",
        dir.join("token").display()
    ) + &service_toml("s", None, &[("p", vec![up.addr().to_string()], 1)]);
    let proxy = start(&toml).await;
    let c = client();
    assert_eq!(
        get(&c, proxy.admin, "x", "/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    let req = Request::get(format!("http://{}/metrics", proxy.admin))
        .header("authorization", "Bearer tok")
        .body(empty())
        .unwrap();
    assert_eq!(send(&c, req).await.status, StatusCode::OK);
}

struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = temp_dir("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: weir\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let p = Prometheus { child, addr };
    let c = client();
    let ready = wait_until(Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            let req = Request::get(format!("http://{addr}/-/ready"))
                .body(empty())
                .unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await;
    assert!(
        ready,
        "prometheus did not become ready (log in {})",
        dir.display()
    );
    p
}

/// Instant query → pool label → value.
async fn query(p: &Prometheus, promql: &str) -> std::collections::HashMap<String, f64> {
    let mut url = format!("http://{}/api/v1/query?query=", p.addr);
    for b in promql.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    let a = get(&client(), p.addr, "x", &url[url.find("/api").unwrap()..]).await;
    let v: Value = a.json();
    assert_eq!(v["status"], "success", "{promql}: {v}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let pool = r["metric"]["pool"].as_str().unwrap_or("").to_string();
            let value = r["value"][1]
                .as_str()
                .unwrap()
                .parse::<f64>()
                .unwrap_or(f64::NAN);
            (pool, value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_sees_the_canary_errors_and_latency() {
    let (proxy, _s, _c) = shop_with(Faults {
        error_rate: 0.2,
        latency: Duration::from_millis(100),
        ..Faults::default()
    })
    .await;
    let prom = start_prometheus(proxy.admin).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..16 {
        let stop = stop.clone();
        let addr = proxy.addr;
        load.push(tokio::spawn(async move {
            let c = client();
            // Bounded: stops when the test has its answer, or after 90 s at most.
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                get(&c, addr, "x", "/").await;
            }
        }));
    }
    // Wait until Prometheus holds enough canary requests in the 15 s window to judge.
    let enough = wait_until(Duration::from_secs(80), || {
        let prom = &prom;
        async move {
            let n = query(prom, "sum by (pool) (increase(weir_requests_total[15s]))").await;
            n.get("canary").is_some_and(|&c| c >= 600.0)
                && n.get("stable").is_some_and(|&s| s >= 600.0)
        }
    })
    .await;
    assert!(enough, "Prometheus never saw enough traffic");
    let errors = query(
        &prom,
        r#"sum by (pool) (rate(weir_requests_total{code=~"5.."}[15s])) / sum by (pool) (rate(weir_requests_total[15s]))"#,
    )
    .await;
    let p50 = query(
        &prom,
        "histogram_quantile(0.5, sum by (le, pool) (rate(weir_request_duration_seconds_bucket[15s])))",
    )
    .await;
    let share = query(&prom, "weir_pool_share").await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let canary_errors = errors["canary"];
    assert!(
        (0.15..=0.25).contains(&canary_errors),
        "canary error ratio {canary_errors}"
    );
    // No 5xx at all on stable: the ratio is 0 (or absent when no 5xx series exists).
    assert!(
        errors.get("stable").copied().unwrap_or(0.0) < 0.001,
        "{errors:?}"
    );
    assert!(p50["canary"] >= 0.1, "canary p50 {p50:?}");
    assert!(p50["stable"] < 0.05, "stable p50 {p50:?}");
    assert_eq!(share.get("canary"), Some(&0.5));
    assert_eq!(share.get("stable"), Some(&0.5));
}
