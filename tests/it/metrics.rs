//! `/metrics` against the real tools: promtool lints the exposition, and a real
//! Prometheus server scrapes weir while traffic flows and answers PromQL about it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::{Request, StatusCode};
use serde_json::Value;
use weir_testkit::Faults;

async fn scrape(admin: SocketAddr) -> String {
    let a = get(&client(), admin, "localhost", "/metrics").await;
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
    weir_testkit::UpstreamHandle,
    weir_testkit::UpstreamHandle,
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
        "weir_request_failures_total{service=\"shop\",pool=\"stable\"} 0",
        "weir_client_errors_total{service=\"shop\",pool=\"canary\",kind=\"client_abort\"} 0",
        "weir_response_duration_seconds_bucket{service=\"shop\",pool=\"canary\",le=\"+Inf\"}",
        "weir_keepalive_replays_total{service=\"shop\",pool=\"canary\"} 0",
        "weir_rollbacks_total{service=\"shop\",reason=\"error_rate\"} 0",
        "weir_unrouted_requests_total 0",
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
    let (refused, _held) = refused_addr();
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
        get(&c, proxy.admin, "localhost", "/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    let req = Request::get(format!("http://{}/metrics", proxy.admin))
        .header("authorization", "Bearer tok")
        .body(empty())
        .unwrap();
    assert_eq!(send(&c, req).await.status, StatusCode::OK);
}

/// One series of an instant query's answer: its labels and value.
#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    /// `service/pool` (either part empty when the series has no such label).
    fn key(&self) -> String {
        format!("{}/{}", self.label("service"), self.label("pool"))
    }
}

/// An instant query's answer (a vector: PromQL that does not parse fails the test).
async fn query(p: &Prometheus, promql: &str) -> Vec<Sample> {
    let mut path = "/api/v1/query?query=".to_owned();
    for b in promql.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            path.push(b as char);
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    let v: Value = get(&client(), p.addr, "x", &path).await.json();
    assert_eq!(v["status"], "success", "{promql}: {v}");
    assert_eq!(v["data"]["resultType"], "vector", "{promql}: {v}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Sample {
            labels: serde_json::from_value(r["metric"].clone()).unwrap(),
            value: r["value"][1]
                .as_str()
                .unwrap()
                .parse::<f64>()
                .unwrap_or(f64::NAN),
        })
        .collect()
}

/// `service/pool` → value.
fn by_key(answer: &[Sample]) -> BTreeMap<String, f64> {
    answer.iter().map(|s| (s.key(), s.value)).collect()
}

/// A PromQL expression this repo ships, named for messages and checks.
#[derive(Debug)]
struct Expr {
    name: String,
    promql: String,
}

/// The examples of the README's Metrics section: its one ```promql block, where each
/// example is a `# name` comment line followed by the expression's lines.
fn readme_examples() -> Vec<Expr> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split_once("\n## Metrics\n")
        .expect("README has no `## Metrics` section")
        .1;
    let section = section.split("\n## ").next().unwrap();
    let blocks: Vec<&str> = section
        .split("```promql\n")
        .skip(1)
        .map(|b| b.split_once("```").expect("unclosed ```promql block").0)
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "the Metrics section needs one ```promql block"
    );
    let mut examples: Vec<Expr> = Vec::new();
    let mut named = false;
    for line in blocks[0].lines() {
        if let Some(comment) = line.trim().strip_prefix('#') {
            // A comment after an expression starts the next example; a second comment
            // line right after the name is description.
            if !named {
                examples.push(Expr {
                    name: comment.trim().to_owned(),
                    promql: String::new(),
                });
                named = true;
            }
        } else if !line.trim().is_empty() {
            let e = examples
                .last_mut()
                .unwrap_or_else(|| panic!("README PromQL before any `# name` line: {line}"));
            e.promql.push_str(line);
            e.promql.push('\n');
            named = false;
        }
    }
    for e in &examples {
        assert!(
            !e.promql.is_empty(),
            "README example `{}` has no PromQL",
            e.name
        );
    }
    examples
}

/// Every panel query of the Grafana dashboard, with its variables as the dashboard
/// defaults them (all services, all pools) and `$__rate_interval` as Grafana makes it for
/// a short scrape interval.
fn dashboard_exprs() -> Vec<Expr> {
    fn walk(panels: &Value, out: &mut Vec<Expr>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let Some(expr) = t["expr"].as_str() else {
                    continue;
                };
                let mut promql = expr.replace("$__rate_interval", "1m");
                for var in ["service", "pool"] {
                    promql = promql
                        .replace(&format!("${{{var}}}"), ".*")
                        .replace(&format!("${var}"), ".*");
                }
                let name = format!(
                    "dashboard: {} [{}]",
                    p["title"].as_str().unwrap_or("?"),
                    t["refId"].as_str().unwrap_or("?")
                );
                assert!(!promql.contains('$'), "{name}: unknown variable in {expr}");
                out.push(Expr { name, promql });
            }
            walk(&p["panels"], out);
        }
    }
    let d: Value =
        serde_json::from_str(include_str!("../../config/grafana/weir-dashboard.json")).unwrap();
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    assert!(!out.is_empty(), "no panel queries in the dashboard");
    out
}

/// The dashboard's Prometheus annotations (rollbacks, promotions), variables as in
/// [`dashboard_exprs`]. They answer only around such an event, so they are checked for
/// parsing and for the metrics they name, not for an answer.
fn dashboard_annotations() -> Vec<Expr> {
    let d: Value =
        serde_json::from_str(include_str!("../../config/grafana/weir-dashboard.json")).unwrap();
    let list = d["annotations"]["list"].as_array().unwrap();
    let out: Vec<Expr> = list
        .iter()
        .filter_map(|a| {
            let promql = a["expr"]
                .as_str()?
                .replace("$__rate_interval", "1m")
                .replace("$service", ".*");
            let name = format!("annotation: {}", a["name"].as_str().unwrap_or("?"));
            assert!(
                !promql.contains('$'),
                "{name}: unknown variable in {promql}"
            );
            Some(Expr { name, promql })
        })
        .collect();
    let names: Vec<&str> = out.iter().map(|e| e.name.as_str()).collect();
    for want in ["Rollbacks", "Dry-run rollbacks", "Promotions"] {
        assert!(
            names.contains(&format!("annotation: {want}").as_str()),
            "{names:?}"
        );
    }
    out
}

/// Grafana is not packaged for Debian, and its dashboard schema is published as CUE
/// (`kinds/dashboard`), not something a test can check offline: the board's structure
/// is checked here, its queries against a real Prometheus below. Every panel has a
/// unique id, a type, a title and a place on the 24-column grid that no other panel
/// takes; every query panel reads the datasource variable with uniquely named queries;
/// every annotation query reads it too.
#[test]
fn dashboard_panels_are_well_formed() {
    let d: Value =
        serde_json::from_str(include_str!("../../config/grafana/weir-dashboard.json")).unwrap();
    let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().expect("a panel without a title");
        assert!(p["type"].is_string(), "{title}: no type");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{title}: id used twice"
        );
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap());
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_owned()) {
                    panic!("{title} overlaps {other}");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], ds, "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        let refs: BTreeSet<&str> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds repeat");
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if a["expr"].is_string() {
            assert_eq!(a["datasource"], ds, "{a}");
            assert!(
                a["titleFormat"].is_string() && a["iconColor"].is_string(),
                "{a}"
            );
        }
    }
}

/// The `weir_*` metric names an expression reads (a histogram's series by its name).
fn metric_names(promql: &str) -> BTreeSet<String> {
    promql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("weir_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

/// The metric names a `/metrics` exposition holds series of.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .flat_map(|l| metric_names(l.split(['{', ' ']).next().unwrap()))
        .collect()
}

/// Metrics with no service: an expression on these alone may answer without one.
const GLOBAL_METRICS: [&str; 2] = ["weir_unrouted_requests_total", "weir_build_info"];

/// What every expression must answer once traffic flowed through every pool: some
/// series, finite values, a service label (per-service metrics are never summed across
/// services), and, when it answers per pool, an answer for every pool.
fn shape_problems(e: &Expr, answer: &[Sample], pools: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    if answer.is_empty() {
        problems.push(format!("{}: no series", e.name));
    }
    for s in answer.iter().filter(|s| !s.value.is_finite()) {
        problems.push(format!("{}: {} for {:?}", e.name, s.value, s.labels));
    }
    let global = e
        .promql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("weir_"))
        .all(|w| GLOBAL_METRICS.contains(&w));
    if !global && answer.iter().any(|s| s.label("service").is_empty()) {
        problems.push(format!("{}: a series without a service label", e.name));
    }
    if answer.iter().any(|s| !s.label("pool").is_empty()) {
        let seen: BTreeSet<String> = answer.iter().map(Sample::key).collect();
        let want: BTreeSet<String> = pools.iter().map(|p| p.to_string()).collect();
        if seen != want {
            problems.push(format!("{}: answers for {seen:?}, not {want:?}", e.name));
        }
    }
    problems
}

/// How long any load in these tests may run, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(90);

/// Clients sending GETs through the proxy until stopped (or [`LOAD_LIMIT`]).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<BTreeMap<u16, usize>>)>,
}

impl Load {
    fn new() -> Load {
        Load {
            stop: Arc::new(AtomicBool::new(false)),
            tasks: Vec::new(),
        }
    }

    /// `conns` clients, each sending one GET with Host `host` every `every` (or as soon
    /// as the last was answered, when that took longer).
    fn add(&mut self, addr: SocketAddr, host: &'static str, conns: usize, every: Duration) {
        for _ in 0..conns {
            let stop = self.stop.clone();
            self.tasks.push((
                host,
                tokio::spawn(async move {
                    let c = client();
                    let deadline = Instant::now() + LOAD_LIMIT;
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut seen = BTreeMap::new();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        tick.tick().await;
                        *seen
                            .entry(get(&c, addr, host, "/").await.status.as_u16())
                            .or_default() += 1;
                    }
                    seen
                }),
            ));
        }
    }

    /// Stop every client; the statuses each host got, with their counts.
    async fn finish(self) -> BTreeMap<&'static str, BTreeMap<u16, usize>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: BTreeMap<_, BTreeMap<u16, usize>> = BTreeMap::new();
        for (host, t) in self.tasks {
            for (status, n) in t.await.unwrap() {
                *all.entry(host).or_default().entry(status).or_default() += n;
            }
        }
        all
    }
}

/// README example names (and dashboard panels) the test checks figures of.
const REQUEST_RATE: &str = "requests per second per pool";
const ERROR_RATIOS: [&str; 3] = [
    "error ratio per pool",
    "error ratio per pool, as the SLO guard counts it",
    "dashboard: Error ratio by pool (failures / requests) [A]",
];
const CANARY_MINUS_BASELINE: &str = "canary minus baseline error ratio per service";
const P99S: [&str; 3] = [
    "p99 latency per pool, to response headers",
    "p99 latency per pool, to last byte",
    "dashboard: p99 latency by pool [A]",
];
/// Dashboard queries of the SLO limits of `shop` (error rate 0.5, p99 5 s).
const SLO_LINES: [&str; 2] = [
    "dashboard: Error ratio by pool (failures / requests) [B]",
    "dashboard: p99 latency by pool [B]",
];
const SERVED_SHARE: &str = "share of requests served per pool";
const CONFIGURED_SHARE: &str = "configured share per pool";
const CLIENT_FAULTS: &str = "client faults per second per pool, by kind";
const UNROUTED: &str = "unrouted requests per second";
const ROLLBACKS: [&str; 4] = [
    "rollbacks in the last hour per service",
    "dry-run rollbacks in the last hour per service",
    "dashboard: Rollbacks in the last hour [A]",
    "dashboard: Rollbacks in the last hour [B]",
];

/// Every PromQL example of the README and every dashboard query, evaluated by a real
/// Prometheus scraping weir: `shop` split 50:50 with a canary answering 20% 500s 100 ms
/// late, `api` with one healthy pool, and requests for a host nobody serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_and_dashboard_promql_answer_per_pool_through_a_real_prometheus() {
    let exprs: Vec<Expr> = readme_examples()
        .into_iter()
        .chain(dashboard_exprs())
        .collect();
    let annotations = dashboard_annotations();
    let names: BTreeSet<&str> = exprs.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.len(), exprs.len(), "two expressions share a name");
    for name in [REQUEST_RATE, CANARY_MINUS_BASELINE, SERVED_SHARE]
        .into_iter()
        .chain([CONFIGURED_SHARE, CLIENT_FAULTS, UNROUTED])
        .chain(ERROR_RATIOS)
        .chain(P99S)
        .chain(ROLLBACKS)
        .chain(SLO_LINES)
    {
        assert!(
            names.contains(name),
            "no expression named `{name}` in {names:?}"
        );
    }

    let stable = upstream("stable").await;
    let canary = upstream("canary").await;
    canary.set_faults(Faults {
        error_rate: 0.2,
        latency: Duration::from_millis(100),
        ..Faults::default()
    });
    let main = upstream("main").await;
    // `shop` is guarded (limits its canary stays within: no rollback) and runs a
    // rollout held at a manual pause, so the SLO and rollout panels have series.
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            Some(&["shop"]),
            &[
                ("stable", vec![stable.addr().to_string()], 50),
                ("canary", vec![canary.addr().to_string()], 50),
            ],
        )
        + "[service.slo]\nmax_error_rate = 0.5\nmax_p99_latency = \"5s\"\n\
           [service.rollout]\ncandidate = \"canary\"\n\
           steps = [{ percent = 50 }, { pause = \"manual\" }]\n"
        + &service_toml(
            "api",
            Some(&["api"]),
            &[("main", vec![main.addr().to_string()], 1)],
        );
    // Every pool carries a build label, so the versions panel answers for each.
    let toml = [("stable", "v1"), ("canary", "v2"), ("main", "v7")]
        .iter()
        .fold(toml, |t, (pool, version)| {
            let table = format!("[service.pools.{pool}]\n");
            t.replace(&table, &format!("{table}version = \"{version}\"\n"))
        });
    let proxy = start(&toml).await;
    let pools = ["api/main", "shop/canary", "shop/stable"];
    let started = send(
        &client(),
        Request::post(format!(
            "http://{}/api/v1/services/shop/rollout",
            proxy.admin
        ))
        .header("content-type", "application/json")
        .body(full("{}"))
        .unwrap(),
    )
    .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text());
    let prom = start_prometheus(proxy.admin).await;
    // Every metric the dashboard and the README name is one weir exports (with the
    // rollout and the SLO of `shop`, every one has series from the start, except the
    // request metrics, registered with a pool's first request: checked after the load).
    let exported = || async { exported_names(&scrape(proxy.admin).await) };
    // Load only once Prometheus has the counters at 0, so rates see every request.
    let scraped = wait_until(Duration::from_secs(30), || async {
        query(&prom, "up").await.iter().any(|s| s.value == 1.0)
    })
    .await;
    assert!(scraped, "Prometheus never scraped weir");

    let mut load = Load::new();
    load.add(proxy.addr, "shop", 16, Duration::from_millis(10));
    load.add(proxy.addr, "api", 2, Duration::from_millis(5));
    load.add(proxy.addr, "nowhere.example", 1, Duration::from_millis(50));
    // Poll until Prometheus holds enough requests of every pool to judge ratios, and
    // every expression answers in shape; then judge the figures of that same round.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let answers: BTreeMap<&str, Vec<Sample>> = loop {
        tick.tick().await;
        let counts = by_key(&query(&prom, "sum by (service, pool) (weir_requests_total)").await);
        let unrouted = query(&prom, "sum(weir_unrouted_requests_total)").await;
        let mut problems: Vec<String> = pools
            .iter()
            .filter(|p| counts.get(**p).is_none_or(|&n| n < 600.0))
            .map(|p| format!("{p}: {:?} requests so far", counts.get(*p)))
            .collect();
        if unrouted.first().is_none_or(|s| s.value < 10.0) {
            problems.push(format!("unrouted: {unrouted:?}"));
        }
        let mut answers = BTreeMap::new();
        if problems.is_empty() {
            for e in &exprs {
                let a = query(&prom, &e.promql).await;
                problems.extend(shape_problems(e, &a, &pools));
                answers.insert(e.name.as_str(), a);
            }
        }
        if problems.is_empty() {
            break answers;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s:\n{}",
            problems.join("\n")
        );
    };
    let statuses = load.finish().await;
    let names = exported().await;
    for e in exprs.iter().chain(&annotations) {
        for n in metric_names(&e.promql) {
            assert!(names.contains(&n), "{}: weir exports no `{n}`", e.name);
        }
    }
    // Annotations parse (`query` fails the test otherwise); none fires: no rollback,
    // no promotion happened.
    for e in &annotations {
        let a = query(&prom, &e.promql).await;
        assert!(a.is_empty(), "{}: {a:?}", e.name);
    }
    eprintln!("client saw: {statuses:?}");
    for e in &exprs {
        let shown: Vec<String> =
            answers[e.name.as_str()]
                .iter()
                .map(|s| {
                    let mut key = s.key();
                    for (k, v) in s.labels.iter().filter(|(k, _)| {
                        !["service", "pool", "instance", "job"].contains(&k.as_str())
                    }) {
                        key += &format!(" {k}={v}");
                    }
                    format!("{key}: {:.4}", s.value)
                })
                .collect();
        eprintln!("{}: {}", e.name, shown.join(", "));
    }
    let only = |host: &str, allowed: &[u16]| {
        assert!(
            statuses[host].keys().all(|s| allowed.contains(s)),
            "{host}: {statuses:?}"
        );
    };
    only("shop", &[200, 500]);
    only("api", &[200]);
    only("nowhere.example", &[404]);

    let v = |name: &str| by_key(&answers[name]);
    assert!(
        v(REQUEST_RATE).values().all(|&r| r > 0.0),
        "{:?}",
        v(REQUEST_RATE)
    );
    for name in ERROR_RATIOS {
        let r = v(name);
        assert!((0.1..=0.3).contains(&r["shop/canary"]), "{name}: {r:?}");
        assert_eq!(r["shop/stable"], 0.0, "{name}: {r:?}");
        assert_eq!(r["api/main"], 0.0, "{name}: {r:?}");
    }
    let diff = v(CANARY_MINUS_BASELINE);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert!((0.1..=0.3).contains(&diff["shop/"]), "{diff:?}");
    for name in P99S {
        // Every canary answer is 100 ms late; the others are not.
        let p = v(name);
        assert!(p["shop/canary"] >= 0.1, "{name}: {p:?}");
        assert!(p["shop/stable"] < p["shop/canary"], "{name}: {p:?}");
        assert!(p["api/main"] < p["shop/canary"], "{name}: {p:?}");
    }
    let served = v(SERVED_SHARE);
    assert!((0.4..=0.6).contains(&served["shop/canary"]), "{served:?}");
    assert_eq!(served["api/main"], 1.0, "{served:?}");
    let configured = v(CONFIGURED_SHARE);
    assert_eq!(configured["shop/canary"], 0.5, "{configured:?}");
    assert_eq!(configured["shop/stable"], 0.5, "{configured:?}");
    assert_eq!(configured["api/main"], 1.0, "{configured:?}");
    // Clean clients: no client fault, for any pool or kind.
    let faults = &answers[CLIENT_FAULTS];
    assert!(faults.iter().all(|s| s.value == 0.0), "{faults:?}");
    assert!(answers[UNROUTED][0].value > 0.0, "{:?}", answers[UNROUTED]);
    for name in ROLLBACKS {
        let r = v(name);
        let want = BTreeMap::from([("api/".to_owned(), 0.0), ("shop/".to_owned(), 0.0)]);
        assert_eq!(r, want, "{name}");
    }
    // The SLO lines are `shop`'s limits; `api` has no SLO and no line.
    assert_eq!(v(SLO_LINES[0]), BTreeMap::from([("shop/".to_owned(), 0.5)]));
    assert_eq!(v(SLO_LINES[1]), BTreeMap::from([("shop/".to_owned(), 5.0)]));

    // One p99 per pool: the gauge is the p99 the admin API shows for the guard's window
    // (read by both at the same moment: retried across a window rotation).
    let same = wait_until(Duration::from_secs(10), || async {
        let text = scrape(proxy.admin).await;
        let svc = get(&client(), proxy.admin, "localhost", "/api/v1/services/shop")
            .await
            .json();
        svc["guard"]["pools"].as_array().unwrap().iter().all(|p| {
            let pool = p["pool"].as_str().unwrap();
            let gauge = metric(
                &text,
                "weir_pool_latency_p99_seconds",
                &[("service", "shop"), ("pool", pool)],
            );
            let api = p["p99_ms"].as_f64();
            matches!((gauge, api), (Some(g), Some(a)) if ((g * 1e5).round() / 100.0 - a).abs() < 1e-9)
        })
    })
    .await;
    assert!(
        same,
        "weir_pool_latency_p99_seconds differs from the API's p99_ms"
    );
}
