//! `weir ctl` against a real weir (proxy, admin API, state dir) on 127.0.0.1 port 0:
//! tables, mutations checked through the API itself, errors as operators see them, and
//! the admin token, the rollout verbs against a canary plan, and `status --watch`. The
//! CLI's output is captured through the same `execute` the binary runs.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use weir::Weir;
use weir::config::Config;
use weir_cli::ctl::{self, AdminClient, CtlArgs};
use weir_testkit::{self as upstream, UpstreamConfig, UpstreamHandle};

/// A directory removed when dropped; unique per test within and across processes.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "weir-ctl-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running weir with service `shop` (stable 90, canary 10, or with [`PLAN`]: stable
/// 100, canary 0) on two built-in upstreams. Stops when dropped.
struct Harness {
    admin: String,
    proxy: SocketAddr,
    upstream: SocketAddr,
    config_path: PathBuf,
    dir: TempDir,
    _upstreams: Vec<UpstreamHandle>,
    _stop: oneshot::Sender<()>,
}

const TOKEN: &str = "s3cret-token";

/// A canary plan whose two manual pauses let a test act between steps without racing
/// the rollout driver: 10%, wait, 50%, wait, 100%.
const PLAN: &str = r#"
[service.rollout]
candidate = "canary"
steps = [
  { percent = 10 },
  { pause = "manual" },
  { percent = 50 },
  { pause = "manual" },
  { percent = 100 },
]
"#;

fn config_text(
    dir: &Path,
    token_file: Option<&Path>,
    stable: SocketAddr,
    canary: SocketAddr,
    plan: bool,
) -> String {
    let token = token_file
        .map(|p| format!("token_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
{token}
[state]
dir = "{}"

[[service]]
name = "shop"
baseline = "stable"

[service.pools.stable]
endpoints = ["{stable}"]
weight = 90

[service.pools.canary]
endpoints = ["{canary}"]
weight = 10
"#,
        dir.join("state").display()
    );
    if !plan {
        return text;
    }
    // `strategy` is a key of the `[[service]]` table, so it must come before the first
    // `[service.pools.*]` header; the plan's own table goes last.
    text.replacen(
        "baseline = \"stable\"\n",
        "baseline = \"stable\"\nstrategy = \"canary\"\n",
        1,
    )
    .replacen("weight = 90\n", "weight = 100\n", 1)
    .replacen("weight = 10\n", "weight = 0\n", 1)
        + PLAN
}

async fn start(with_token: bool) -> Harness {
    launch(with_token, false).await
}

async fn start_with_plan() -> Harness {
    launch(false, true).await
}

async fn launch(with_token: bool, plan: bool) -> Harness {
    let dir = TempDir::new();
    let token_file = with_token.then(|| {
        let path = dir.0.join("server-token");
        // Trailing newline on purpose: both ends trim.
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        path
    });
    let stable = upstream::spawn(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        UpstreamConfig::new("stable"),
    )
    .unwrap();
    let canary = upstream::spawn(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        UpstreamConfig::new("canary"),
    )
    .unwrap();
    let text = config_text(
        &dir.0,
        token_file.as_deref(),
        stable.addr(),
        canary.addr(),
        plan,
    );
    let config_path = dir.0.join("weir.toml");
    std::fs::write(&config_path, &text).unwrap();
    let config = Config::parse(&text, "t").unwrap_or_else(|e| panic!("{e}"));
    let weir = Weir::new(config, Some(config_path.clone())).unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        weir.serve(proxy, Some(admin), shutdown).await
    });
    Harness {
        admin: format!("http://{admin_addr}"),
        proxy: proxy_addr,
        upstream: stable.addr(),
        config_path,
        dir,
        _upstreams: vec![stable, canary],
        _stop: stop,
    }
}

/// What one `weir ctl` invocation did.
#[derive(Debug)]
struct Run {
    code: ExitCode,
    out: String,
    err: String,
}

impl Run {
    fn ok(&self) -> &str {
        assert_eq!(self.code, ExitCode::SUCCESS, "stderr: {}", self.err);
        assert!(self.err.is_empty(), "stderr: {}", self.err);
        &self.out
    }

    /// The failure message; asserts exit 1 and nothing on stdout.
    fn failed(&self) -> &str {
        assert_eq!(self.code, ExitCode::FAILURE, "stdout: {}", self.out);
        assert!(self.out.is_empty(), "stdout: {}", self.out);
        &self.err
    }
}

fn parse(admin: &str, args: &[&str]) -> Result<CtlArgs, clap::Error> {
    let mut argv = vec!["weir ctl", "--admin", admin];
    argv.extend_from_slice(args);
    CtlArgs::try_parse_from(argv)
}

async fn ctl_env(admin: &str, env_token: Option<&str>, args: &[&str]) -> Run {
    let args = parse(admin, args).unwrap_or_else(|e| panic!("{e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = ctl::execute(
        &args,
        env_token.map(String::from),
        &mut out,
        &mut err,
        std::future::pending(),
    )
    .await;
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

async fn ctl(admin: &str, args: &[&str]) -> Run {
    ctl_env(admin, None, args).await
}

/// `GET` straight from the API, independent of the CLI's client.
async fn api_get(h: &Harness, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::get(format!("{}{path}", h.admin));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = client
        .request(req.body(Full::default()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// `(version, [(pool, weight)])` of `shop` as the API reports it.
async fn shop(h: &Harness) -> (u64, Vec<(String, u64)>) {
    let (status, s) = api_get(h, "/api/v1/services/shop", None).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    let pools = s["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    (s["version"].as_u64().unwrap(), pools)
}

fn weights(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(p, w)| (p.to_string(), *w)).collect()
}

const STATUS_90_10: &str = "\
SERVICE  POOL    WEIGHT  SHARE %  VERSION  ENDPOINTS  REQ  ERR %  P99 MS
shop     stable      90     90.0        1          1    0    0.0       -
shop     canary      10     10.0        1          1    0    0.0       -
";

#[tokio::test]
async fn status_prints_one_aligned_row_per_pool() {
    let h = start(false).await;
    assert_eq!(ctl(&h.admin, &["status"]).await.ok(), STATUS_90_10);
    assert_eq!(ctl(&h.admin, &["status", "shop"]).await.ok(), STATUS_90_10);
    assert_eq!(
        ctl(&h.admin, &["status", "nope"]).await.failed(),
        "weir ctl: unknown service `nope` (HTTP 404)\n"
    );
}

#[tokio::test]
async fn set_weight_changes_the_split_and_prints_the_new_state() {
    let h = start(false).await;
    let out = ctl(
        &h.admin,
        &[
            "set-weight",
            "shop",
            "stable=75",
            "canary=25",
            "--reason",
            "step 2",
        ],
    )
    .await;
    assert_eq!(
        out.ok(),
        "\
SERVICE  POOL    WEIGHT  SHARE %  VERSION  ENDPOINTS  REQ  ERR %  P99 MS
shop     stable      75     75.0        2          1    0    0.0       -
shop     canary      25     25.0        2          1    0    0.0       -
"
    );
    assert_eq!(
        shop(&h).await,
        (2, weights(&[("stable", 75), ("canary", 25)]))
    );
    // Shares with a fraction, and a zero weight.
    let out = ctl(&h.admin, &["set-weight", "shop", "canary=1", "stable=2"]).await;
    assert!(
        out.ok().contains("shop     stable       2     66.7"),
        "{}",
        out.out
    );
    assert!(
        out.ok().contains("shop     canary       1     33.3"),
        "{}",
        out.out
    );
    ctl(&h.admin, &["set-weight", "shop", "canary=0", "stable=5"])
        .await
        .ok();
    assert_eq!(
        shop(&h).await,
        (4, weights(&[("stable", 5), ("canary", 0)]))
    );
}

#[tokio::test]
async fn malformed_pool_weights_are_refused_before_any_request() {
    for (arg, needle) in [
        (
            "canary=abc",
            "weight of pool `canary` must be a whole number 0..=1000000, got `abc`",
        ),
        (
            "canary",
            "`canary` is not POOL=WEIGHT: give a weight, e.g. canary=10",
        ),
        ("=10", "`=10` has no pool name before `=`"),
        (
            "canary=-1",
            "weight of pool `canary` must be a whole number",
        ),
        (
            "canary=1.5",
            "weight of pool `canary` must be a whole number",
        ),
        (
            "canary=2000000",
            "weight of pool `canary` is above the maximum of 1000000",
        ),
    ] {
        let e = parse(
            "http://127.0.0.1:1",
            &["set-weight", "shop", "stable=1", arg],
        )
        .unwrap_err();
        assert_eq!(
            e.kind(),
            clap::error::ErrorKind::ValueValidation,
            "{arg}: {e}"
        );
        assert!(e.to_string().contains(needle), "{arg}: {e}");
    }
    let e = parse("http://127.0.0.1:1", &["set-weight", "shop"]).unwrap_err();
    assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);

    // A pool named twice parses but is refused locally: a JSON object would silently
    // keep only the last. A listener nobody accepts on proves nothing was sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    let run = ctl(&admin, &["set-weight", "shop", "stable=1", "stable=2"]).await;
    assert_eq!(
        run.failed(),
        "weir ctl: pool `stable` is given more than once\n"
    );
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a connection was made: {accepted:?}"
    );
}

#[tokio::test]
async fn server_side_refusals_show_the_api_message_and_exit_1() {
    let h = start(false).await;
    let run = ctl(&h.admin, &["set-weight", "shop", "stable=50", "blue=50"]).await;
    assert_eq!(
        run.failed(),
        "weir ctl: service `shop` has no pool `blue` (HTTP 400)\n"
    );
    let run = ctl(&h.admin, &["set-weight", "shop", "stable=100"]).await;
    assert_eq!(
        run.failed(),
        "weir ctl: missing weight for pool(s) canary: every pool must be given a weight (HTTP 400)\n"
    );
    let run = ctl(&h.admin, &["set-weight", "nope", "stable=100"]).await;
    assert_eq!(
        run.failed(),
        "weir ctl: unknown service `nope` (HTTP 404)\n"
    );
    let run = ctl(&h.admin, &["set-weight", "shop", "stable=0", "canary=0"]).await;
    assert!(run.failed().ends_with("(HTTP 400)\n"), "{}", run.err);
    assert_eq!(run.err.lines().count(), 1, "{}", run.err);
    assert_eq!(
        shop(&h).await,
        (1, weights(&[("stable", 90), ("canary", 10)]))
    );
}

#[tokio::test]
async fn if_version_refuses_a_stale_change() {
    let h = start(false).await;
    let set = |v: &'static str| {
        [
            "set-weight",
            "shop",
            "stable=80",
            "canary=20",
            "--if-version",
            v,
        ]
    };
    ctl(&h.admin, &set("1")).await.ok();
    assert_eq!(
        shop(&h).await,
        (2, weights(&[("stable", 80), ("canary", 20)]))
    );
    let run = ctl(
        &h.admin,
        &[
            "set-weight",
            "shop",
            "stable=1",
            "canary=1",
            "--if-version",
            "1",
        ],
    )
    .await;
    assert_eq!(
        run.failed(),
        "weir ctl: service `shop` is at version 2, not 1: it changed meanwhile (HTTP 409)\n"
    );
    assert_eq!(
        shop(&h).await,
        (2, weights(&[("stable", 80), ("canary", 20)]))
    );
}

#[tokio::test]
async fn rollback_sends_everything_to_the_baseline() {
    let h = start(false).await;
    ctl(&h.admin, &["set-weight", "shop", "stable=50", "canary=50"])
        .await
        .ok();
    let run = ctl(&h.admin, &["rollback", "shop", "--reason", "errors up"]).await;
    assert_eq!(
        run.ok(),
        "\
SERVICE  POOL    WEIGHT  SHARE %  VERSION  ENDPOINTS  REQ  ERR %  P99 MS
shop     stable     100    100.0        3          1    0    0.0       -
shop     canary       0      0.0        3          1    0    0.0       -
"
    );
    assert_eq!(
        shop(&h).await,
        (3, weights(&[("stable", 100), ("canary", 0)]))
    );
    let run = ctl(&h.admin, &["rollback", "nope"]).await;
    assert_eq!(
        run.failed(),
        "weir ctl: unknown service `nope` (HTTP 404)\n"
    );
}

#[tokio::test]
async fn events_are_listed_one_line_each() {
    let h = start(false).await;
    ctl(
        &h.admin,
        &[
            "set-weight",
            "shop",
            "stable=50",
            "canary=50",
            "--reason",
            "half\nand half",
        ],
    )
    .await
    .ok();
    ctl(&h.admin, &["rollback", "shop"]).await.ok();
    let run = ctl(&h.admin, &["events"]).await;
    let lines: Vec<&str> = run.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.out);

    let first: Vec<&str> = lines[0].split(' ').collect();
    let id: u64 = first[0].strip_prefix('#').unwrap().parse().unwrap();
    assert!(
        first[1].ends_with('Z') && first[1].contains('T'),
        "time: {}",
        lines[0]
    );
    assert_eq!(
        &first[2..5],
        ["shop", "weights_changed", "admin"],
        "{}",
        lines[0]
    );
    // `$USER@host` as `weir ctl` sends it, then the address it came from.
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    assert!(
        first[5].starts_with(&format!("{user}@")) && first[5].contains("/127.0.0.1:"),
        "actor: {}",
        lines[0]
    );
    // The API sends weights as a JSON object; accept either key order.
    assert!(
        first[6] == "canary=10,stable=90→canary=50,stable=50"
            || first[6] == "stable=90,canary=10→stable=50,canary=50",
        "{}",
        lines[0]
    );
    // The reason is quoted and escaped: it cannot break the one-line-per-event rule.
    assert!(lines[0].ends_with(r#" "half\nand half""#), "{}", lines[0]);
    assert!(
        lines[1].starts_with(&format!("#{} ", id + 1)),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains(" shop rolled_back admin "),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains("stable=100"), "{}", lines[1]);

    let since = id.to_string();
    let run = ctl(&h.admin, &["events", "--since", &since, "--limit", "1"]).await;
    assert_eq!(run.ok().lines().count(), 1);
    assert!(run.out.starts_with(&format!("#{} ", id + 1)), "{}", run.out);
    assert!(parse(&h.admin, &["events", "--limit", "0"]).is_err());
    assert!(parse(&h.admin, &["events", "--limit", "1001"]).is_err());
}

/// A `Write` that hands every write to the test while the CLI keeps running.
struct ChannelWriter(mpsc::UnboundedSender<Vec<u8>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `weir ctl` command that keeps printing (`--follow`, `--watch`), run until
/// stopped, with its output collected as it comes.
struct Streaming {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    seen: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(ExitCode, String)>,
}

impl Streaming {
    fn start(args: CtlArgs) -> Streaming {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut out = ChannelWriter(tx);
            let mut err = Vec::new();
            let code = ctl::execute(&args, None, &mut out, &mut err, async {
                let _ = stopped.await;
            })
            .await;
            (code, String::from_utf8(err).unwrap())
        });
        Streaming {
            rx,
            seen: String::new(),
            stop,
            task,
        }
    }

    /// Wait (up to 10 s) until the output so far contains `needle`.
    async fn wait_for(&mut self, needle: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.seen.contains(needle) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(chunk)) => self.seen.push_str(&String::from_utf8(chunk).unwrap()),
                _ => panic!("no `{needle}` in the output; got:\n{}", self.seen),
            }
        }
    }

    /// Stop it (as Ctrl-C would) and return its exit code, stderr and output.
    async fn stop(self) -> (ExitCode, String, String) {
        self.stop.send(()).unwrap();
        let (code, err) = self.task.await.unwrap();
        (code, err, self.seen)
    }
}

#[tokio::test]
async fn events_follow_prints_new_events_until_stopped() {
    let h = start(false).await;
    ctl(&h.admin, &["set-weight", "shop", "stable=80", "canary=20"])
        .await
        .ok();
    let mut follow = Streaming::start(parse(&h.admin, &["events", "--follow"]).unwrap());
    // History first, then what happens while following.
    follow.wait_for("weights_changed").await;
    ctl(&h.admin, &["rollback", "shop", "--reason", "watch this"])
        .await
        .ok();
    follow.wait_for("\"watch this\"").await;
    let (code, err, seen) = follow.stop().await;
    assert_eq!(seen.lines().count(), 2, "{seen}");
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
}

#[tokio::test]
async fn events_tail_shows_the_newest_and_follow_starts_there() {
    let h = start(false).await;
    for (reason, w) in [
        ("one", "stable=80"),
        ("two", "stable=70"),
        ("three", "stable=60"),
    ] {
        ctl(
            &h.admin,
            &[
                "--actor",
                "ops",
                "set-weight",
                "shop",
                w,
                "canary=20",
                "--reason",
                reason,
            ],
        )
        .await
        .ok();
    }
    let run = ctl(&h.admin, &["events", "--tail", "2"]).await;
    let lines: Vec<&str> = run.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.out);
    assert!(lines[0].ends_with("\"two\""), "{}", run.out);
    assert!(lines[1].ends_with("\"three\""), "{}", run.out);
    assert!(lines[1].contains(" ops/127.0.0.1:"), "{}", run.out);
    assert!(parse(&h.admin, &["events", "--tail", "2", "--since", "1"]).is_err());
    assert!(parse(&h.admin, &["events", "--tail", "0"]).is_err());

    // --follow alone starts at the newest event, not the oldest; --tail N --follow at
    // the newest N. Each then prints what happens next.
    let mut follow = Streaming::start(parse(&h.admin, &["events", "--follow"]).unwrap());
    let mut tail =
        Streaming::start(parse(&h.admin, &["events", "--tail", "2", "--follow"]).unwrap());
    follow.wait_for("\"three\"").await;
    tail.wait_for("\"three\"").await;
    ctl(&h.admin, &["rollback", "shop", "--reason", "four"])
        .await
        .ok();
    follow.wait_for("\"four\"").await;
    tail.wait_for("\"four\"").await;
    let (code, err, seen) = follow.stop().await;
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert_eq!(seen.lines().count(), 2, "{seen}");
    assert!(!seen.contains("\"two\""), "{seen}");
    let (code, err, seen) = tail.stop().await;
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert_eq!(seen.lines().count(), 3, "{seen}");
    assert!(!seen.contains("\"one\""), "{seen}");
}

#[tokio::test]
async fn release_history_and_undo_from_the_command_line() {
    let h = start_with_plan().await;
    let run = ctl(&h.admin, &["history", "shop"]).await;
    assert_eq!(run.ok(), "shop: no releases yet\n");
    let endpoint = h.upstream.to_string();
    let run = ctl(
        &h.admin,
        &[
            "--actor",
            "bob",
            "release",
            "shop",
            "--version",
            "2.0.1",
            "--endpoints",
            &endpoint,
        ],
    )
    .await;
    assert!(
        run.ok().contains("shop: running stable=- canary=2.0.1"),
        "{}",
        run.out
    );
    let run = ctl(&h.admin, &["history", "shop"]).await;
    let lines: Vec<&str> = run.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.out);
    assert!(lines[0].starts_with("REV  VERSION  POOL"), "{}", run.out);
    assert!(lines[1].trim_start().starts_with("1  -"), "{}", run.out);
    assert!(lines[1].contains("promoted"), "{}", run.out);
    assert!(!lines[1].contains("1970-"), "{}", run.out);
    assert!(lines[2].contains(" running "), "{}", run.out);
    assert!(lines[2].contains(" bob/127.0.0.1:"), "{}", run.out);
    // Server refusals are one line and exit 1; bad flags never reach the server.
    let run = ctl(&h.admin, &["undo", "shop", "--to-revision", "7"]).await;
    assert!(run.failed().contains("no revision 7"), "{}", run.err);
    assert!(
        parse(&h.admin, &["release", "shop"]).is_err(),
        "--version is required"
    );
    assert!(parse(&h.admin, &["undo", "shop", "--to-revision", "0"]).is_err());
    assert!(
        parse(&h.admin, &["status", "--wait"]).is_err(),
        "--wait needs a service"
    );
    assert!(parse(&h.admin, &["status", "shop", "--timeout", "1s"]).is_err());
    assert!(parse(&h.admin, &["status", "shop", "--wait", "--timeout", "soon"]).is_err());
    let run = ctl(&h.admin, &["--json", "undo", "shop"]).await;
    let doc: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(doc["rollout"]["phase"], "aborted");
    assert_eq!(doc["pools"][0]["weight"], 10000);
}

#[tokio::test]
async fn json_prints_the_api_answer() {
    let h = start(false).await;
    let run = ctl(&h.admin, &["--json", "status"]).await;
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["services"][0]["name"], "shop");
    assert_eq!(v["services"][0]["pools"][1]["share"], 0.1);
    // `--json` is global: it may follow the subcommand too.
    let run = ctl(
        &h.admin,
        &["set-weight", "shop", "stable=60", "canary=40", "--json"],
    )
    .await;
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["version"].as_u64()),
        (Some("shop"), Some(2))
    );
    let run = ctl(&h.admin, &["--json", "events"]).await;
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["events"][0]["kind"], "weights_changed");
    // An error: the API's body on stdout for scripts, the message on stderr for people.
    let run = ctl(&h.admin, &["--json", "status", "nope"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    let v: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(v["error"], "unknown service `nope`");
    assert_eq!(run.err, "weir ctl: unknown service `nope` (HTTP 404)\n");
}

#[tokio::test]
async fn the_admin_token_is_required_when_configured() {
    let h = start(true).await;
    let run = ctl(&h.admin, &["status"]).await;
    assert_eq!(
        run.failed(),
        "weir ctl: admin token required: send Authorization: Bearer <token> (HTTP 401)\n\
         weir ctl: hint: give the admin token with --token-file FILE or WEIR_ADMIN_TOKEN\n"
    );

    let good = h.dir.0.join("client-token");
    std::fs::write(&good, format!("  {TOKEN}\n\n")).unwrap();
    let good = good.display().to_string();
    assert_eq!(
        ctl(&h.admin, &["--token-file", &good, "status"]).await.ok(),
        STATUS_90_10
    );
    ctl(
        &h.admin,
        &[
            "--token-file",
            &good,
            "set-weight",
            "shop",
            "stable=1",
            "canary=1",
        ],
    )
    .await
    .ok();
    let (_, v) = api_get(&h, "/api/v1/services/shop", Some(TOKEN)).await;
    assert_eq!(v["version"], 2);
    // From the environment (passed in, so the test leaves the process's alone).
    assert!(
        ctl_env(&h.admin, Some(TOKEN), &["status"])
            .await
            .ok()
            .contains("shop")
    );

    let bad = h.dir.0.join("bad-token");
    std::fs::write(&bad, "nope").unwrap();
    let bad = bad.display().to_string();
    let run = ctl(&h.admin, &["--token-file", &bad, "status"]).await;
    assert_eq!(
        run.failed(),
        format!(
            "weir ctl: wrong admin token (HTTP 401)\n\
             weir ctl: hint: the token from --token-file {bad} was refused; it must match \
             the server's [admin] token_file (or its WEIR_ADMIN_TOKEN)\n"
        )
    );
    let run = ctl_env(&h.admin, Some("nope"), &["status"]).await;
    assert!(
        run.failed()
            .contains("the token from WEIR_ADMIN_TOKEN was refused"),
        "{}",
        run.err
    );

    let missing = h.dir.0.join("missing").display().to_string();
    let run = ctl(&h.admin, &["--token-file", &missing, "status"]).await;
    assert_eq!(
        run.failed(),
        format!("weir ctl: cannot read --token-file {missing}: no such file or directory\n")
    );
    let empty = h.dir.0.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.display().to_string();
    let run = ctl(&h.admin, &["--token-file", &empty, "status"]).await;
    assert_eq!(
        run.failed(),
        format!("weir ctl: --token-file {empty} is empty\n")
    );
}

#[tokio::test]
async fn an_unreachable_admin_api_is_one_line() {
    let (refused, _held) = crate::common::refused_addr();
    let admin = format!("http://{refused}");
    let run = ctl(&admin, &["status"]).await;
    assert_eq!(
        run.failed(),
        format!("weir ctl: cannot reach the admin API at {admin}: connection refused\n")
    );
    // A URL without a scheme means http.
    let run = ctl(&refused.to_string(), &["status"]).await;
    assert_eq!(
        run.failed(),
        format!("weir ctl: cannot reach the admin API at {admin}: connection refused\n")
    );
    let run = ctl("https://127.0.0.1:9901", &["status"]).await;
    assert!(run.failed().contains("plain http only"), "{}", run.err);
    assert!(run.err.contains("use http://"), "{}", run.err);
    assert_eq!(run.err.lines().count(), 1);
    assert!(AdminClient::new("ftp://x", None).is_err());
}

#[tokio::test]
async fn health_needs_no_token_and_fails_when_weir_is_down() {
    let h = start(true).await;
    assert_eq!(ctl(&h.admin, &["health"]).await.ok(), "ok\n");
    assert_eq!(ctl(&h.admin, &["health", "--ready"]).await.ok(), "ready\n");
    drop(h);
    let (refused, _held) = crate::common::refused_addr();
    let run = ctl(&refused.to_string(), &["health"]).await;
    assert!(run.failed().contains("cannot reach"), "{}", run.err);
}

#[tokio::test]
async fn something_other_than_the_admin_api_is_named_as_such() {
    let h = start(false).await;
    // The built-in upstream answers, but not with the admin API's JSON.
    let run = ctl(&format!("http://{}", h.upstream), &["status"]).await;
    let err = run.failed();
    assert!(
        err.starts_with(&format!(
            "weir ctl: unexpected answer from http://{}: HTTP ",
            h.upstream
        )),
        "{err}"
    );
    assert!(err.ends_with("is --admin weir's admin address?\n"), "{err}");
}

#[tokio::test]
async fn reload_reports_the_event_or_every_problem() {
    let h = start(false).await;
    let run = ctl(&h.admin, &["reload"]).await;
    let out = run.ok();
    assert!(out.starts_with("config reloaded (event #"), "{out}");
    assert!(out.contains("\n  run-time weights kept: shop\n"), "{out}");

    let good = std::fs::read_to_string(&h.config_path).unwrap();
    let bad = good
        .replace("weight = 10", "weight = \"ten\"")
        .replace("baseline = \"stable\"", "baseline = \"green\"");
    std::fs::write(&h.config_path, bad).unwrap();
    let run = ctl(&h.admin, &["reload"]).await;
    let err = run.failed();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0], "weir ctl: config rejected, nothing changed (HTTP 400):",
        "{err}"
    );
    assert!(lines.len() >= 2, "{err}");
    assert!(lines[1..].iter().all(|l| l.starts_with("  ")), "{err}");
    let run = ctl(&h.admin, &["--json", "reload"]).await;
    let v: Value = serde_json::from_str(&run.out).unwrap();
    assert!(!v["problems"].as_array().unwrap().is_empty(), "{v}");
    // The running config and weights are untouched.
    assert_eq!(
        shop(&h).await,
        (1, weights(&[("stable", 90), ("canary", 10)]))
    );
}

/// `shop` from the API once `ok` holds for it. Polls (the rollout driver acts on its own
/// tick) and fails after a deadline, naming what never happened.
async fn wait_shop(h: &Harness, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, s) = api_get(h, "/api/v1/services/shop", None).await;
        assert_eq!(status, StatusCode::OK, "{s}");
        if ok(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {what}: {}",
            s["rollout"]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `shop`'s rollout is in `phase` at `step_index` (0-based).
async fn wait_step(h: &Harness, phase: &str, index: u64) -> Value {
    wait_shop(h, &format!("{phase} at step index {index}"), |s| {
        s["rollout"]["phase"] == phase && s["rollout"]["step_index"] == index
    })
    .await
}

/// The rollout line of `shop` in a table's output.
fn rollout_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("shop: "))
        .unwrap_or_else(|| panic!("no rollout line in:\n{out}"))
}

/// A running rollout's line, whose time in step depends on the machine's speed.
fn assert_running_line(line: &str, head: &str, waiting_for: &str) {
    assert!(
        line.starts_with(head),
        "{line}\nexpected it to start: {head}"
    );
    assert!(
        line.ends_with(&format!(" in step; waiting for: {waiting_for}")),
        "{line}\nexpected it to wait for: {waiting_for}"
    );
}

/// Scaled weights as the rollout sets them (percent × 100).
fn split(stable: u64, canary: u64) -> Vec<(String, u64)> {
    weights(&[("stable", stable), ("canary", canary)])
}

#[tokio::test]
async fn rollout_verbs_drive_the_plan_and_show_where_it_stands() {
    let h = start_with_plan().await;
    assert_eq!(
        ctl(&h.admin, &["status"]).await.ok(),
        "\
SERVICE  POOL    WEIGHT  SHARE %  VERSION  ENDPOINTS  REQ  ERR %  P99 MS
shop     stable     100    100.0        1          1    0    0.0       -
shop     canary       0      0.0        1          1    0    0.0       -
shop: no rollout (plan: canary, 5 steps)
"
    );

    // Start. The driver applies the 10% step on its own tick, so the answer may already
    // be past step 1; the API says when it waits at the manual pause.
    let run = ctl(&h.admin, &["rollout", "shop"]).await;
    assert!(run.ok().starts_with("SERVICE  POOL"), "{}", run.out);
    assert!(
        rollout_line(&run.out).starts_with("shop: rollout progressing, step "),
        "{}",
        run.out
    );
    wait_step(&h, "progressing", 1).await;
    assert_eq!(shop(&h).await.1, split(9000, 1000));
    assert_eq!(
        ctl(&h.admin, &["rollout", "shop"]).await.failed(),
        "weir ctl: service `shop`: a rollout is already progressing (step 2 of 5) (HTTP 409)\n"
    );
    let run = ctl(&h.admin, &["status", "shop"]).await;
    assert_running_line(
        rollout_line(run.ok()),
        "shop: rollout progressing, step 2/5 (pause until promoted), ",
        "promote (manual pause)",
    );

    // Pause and resume, each refused in the other's phase.
    let run = ctl(&h.admin, &["pause", "shop"]).await;
    assert_running_line(
        rollout_line(run.ok()),
        "shop: rollout paused, step 2/5 (pause until promoted), ",
        "resume (paused by an operator)",
    );
    wait_step(&h, "paused", 1).await;
    assert_eq!(
        ctl(&h.admin, &["pause", "shop"]).await.failed(),
        "weir ctl: service `shop`: only a progressing rollout can pause (phase paused) (HTTP 409)\n"
    );
    let run = ctl(&h.admin, &["resume", "shop"]).await;
    assert_running_line(
        rollout_line(run.ok()),
        "shop: rollout progressing, step 2/5 (pause until promoted), ",
        "promote (manual pause)",
    );
    assert_eq!(
        ctl(&h.admin, &["resume", "shop"]).await.failed(),
        "weir ctl: service `shop`: only a paused rollout can resume (phase progressing) (HTTP 409)\n"
    );

    // Promote past the first manual pause: the driver sets 50% and stops at the second.
    let run = ctl(&h.admin, &["promote", "shop"]).await;
    assert!(
        rollout_line(run.ok()).starts_with("shop: rollout progressing, step "),
        "{}",
        run.out
    );
    wait_step(&h, "progressing", 3).await;
    assert_eq!(shop(&h).await.1, split(5000, 5000));

    // Then all the way: the candidate takes everything and becomes the baseline.
    let run = ctl(&h.admin, &["promote", "shop", "--full"]).await;
    assert_eq!(
        rollout_line(run.ok()),
        "shop: rollout promoted: canary is the new baseline, replacing stable"
    );
    assert!(
        run.out.contains("\nshop     canary   10000    100.0"),
        "{}",
        run.out
    );
    let s = wait_step(&h, "promoted", 5).await;
    assert_eq!(s["baseline"], "canary");
    assert_eq!(shop(&h).await.1, split(0, 10000));
    assert_eq!(
        ctl(&h.admin, &["promote", "shop", "--full"]).await.failed(),
        "weir ctl: service `shop`: no rollout is running (phase promoted) (HTTP 409)\n"
    );
}

#[tokio::test]
async fn abort_sends_traffic_back_and_retry_starts_again() {
    let h = start_with_plan().await;
    assert_eq!(
        ctl(&h.admin, &["abort", "shop"]).await.failed(),
        "weir ctl: service `shop`: no rollout has been started (HTTP 409)\n"
    );
    assert_eq!(
        ctl(&h.admin, &["rollout", "shop", "--candidate", "blue"])
            .await
            .failed(),
        "weir ctl: service `shop` has no pool `blue` (HTTP 400)\n"
    );
    // `--json`: the API's service document, candidate as asked.
    let run = ctl(
        &h.admin,
        &["--json", "rollout", "shop", "--candidate", "canary"],
    )
    .await;
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["rollout"]["phase"], "progressing", "{v}");
    assert_eq!(v["rollout"]["candidate"], "canary", "{v}");
    assert_eq!(v["rollout"]["steps_total"], 5, "{v}");
    wait_step(&h, "progressing", 1).await;
    assert_eq!(
        ctl(&h.admin, &["retry", "shop"]).await.failed(),
        "weir ctl: service `shop`: retry is for an aborted or degraded rollout \
         (phase progressing) (HTTP 409)\n"
    );

    let run = ctl(&h.admin, &["abort", "shop"]).await;
    assert_eq!(
        rollout_line(run.ok()),
        "shop: rollout aborted at step 2/5 (pause until promoted): all traffic back to stable; \
         retry starts it again"
    );
    wait_step(&h, "aborted", 1).await;
    assert_eq!(shop(&h).await.1, split(10000, 0));
    assert_eq!(
        ctl(&h.admin, &["abort", "shop"]).await.failed(),
        "weir ctl: service `shop`: no rollout is running (phase aborted) (HTTP 409)\n"
    );

    let run = ctl(&h.admin, &["retry", "shop"]).await;
    assert!(
        rollout_line(run.ok()).starts_with("shop: rollout progressing, step "),
        "{}",
        run.out
    );
    wait_step(&h, "progressing", 1).await;
    assert_eq!(shop(&h).await.1, split(9000, 1000));
}

#[tokio::test]
async fn rollout_verbs_name_an_unknown_service_or_a_missing_plan() {
    let h = start_with_plan().await;
    for verb in [
        &["rollout", "nope"][..],
        &["rollout", "nope", "--candidate", "canary"],
        &["promote", "nope"],
        &["promote", "nope", "--full"],
        &["pause", "nope"],
        &["resume", "nope"],
        &["abort", "nope"],
        &["retry", "nope"],
    ] {
        assert_eq!(
            ctl(&h.admin, verb).await.failed(),
            "weir ctl: unknown service `nope` (HTTP 404)\n",
            "{verb:?}"
        );
    }
    assert_eq!(
        ctl(&h.admin, &["pause", " "]).await.failed(),
        "weir ctl: SERVICE must not be empty\n"
    );
    // Nothing was started by any of that.
    assert_eq!(
        wait_shop(&h, "idle", |s| s["rollout"]["phase"] == "idle").await["version"],
        1
    );

    let h = start(false).await;
    assert_eq!(
        ctl(&h.admin, &["rollout", "shop"]).await.failed(),
        "weir ctl: service `shop`: has no rollout plan: add [service.rollout] (HTTP 409)\n"
    );
    let run = ctl(&h.admin, &["--json", "pause", "shop"]).await;
    assert_eq!(run.code, ExitCode::FAILURE);
    let v: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(v["error"], "service `shop`: no rollout has been started");
}

/// `n` GETs through the proxy, each answered 200.
async fn send_traffic(h: &Harness, n: usize) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for _ in 0..n {
        let req = Request::get(format!("http://{}/", h.proxy))
            .body(Full::default())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
}

#[tokio::test]
async fn status_watch_redraws_the_rollout_until_stopped_or_counted() {
    let h = start_with_plan().await;
    // Traffic while every request goes to stable, counted by the guard window.
    send_traffic(&h, 30).await;
    // Counted, and covered by at least one closed slice: before that there is no rate
    // (the table shows "-").
    let s = wait_shop(&h, "counted 30 requests over a closed slice", |s| {
        s["guard"]["pools"][0]["requests"] == 30 && s["guard"]["pools"][0]["span_secs"].is_number()
    })
    .await;
    // The rate is over the time the window covers so far, which is at most its length
    // and at least one slice: a young window's 30 requests are not spread over 30 s.
    let window_secs = s["guard"]["window_secs"].as_f64().unwrap();
    ctl(&h.admin, &["rollout", "shop"]).await.ok();
    wait_step(&h, "progressing", 1).await;

    // Not a terminal: frames separated by a line, no escapes.
    let run = ctl(&h.admin, &["status", "--watch", "--count", "2"]).await;
    let out = run.ok();
    assert!(!out.contains('\x1b'), "{out}");
    let frames: Vec<&str> = out.split("\n---\n").collect();
    assert_eq!(frames.len(), 2, "{out}");
    for frame in frames {
        let lines: Vec<&str> = frame.lines().collect();
        let time = lines[0].split(' ').next().unwrap();
        assert!(time.contains('T') && time.ends_with('Z'), "{frame}");
        assert!(lines[0].contains(&h.admin), "{frame}");
        assert_eq!(
            lines[1],
            "SERVICE  POOL    WEIGHT  SHARE %  VERSION  ENDPOINTS  REQ/S  ERR %  P99 MS"
        );
        let stable: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(&stable[..3], ["shop", "stable", "9000"], "{frame}");
        let rate: f64 = stable[6].parse().unwrap_or_else(|_| panic!("{frame}"));
        assert!(
            (30.0 / window_secs - 0.05..=30.0).contains(&rate),
            "{rate} req/s for 30 requests in a {window_secs}s window: {frame}"
        );
        assert_running_line(
            rollout_line(frame),
            "shop: rollout progressing, step 2/5 (pause until promoted), ",
            "promote (manual pause)",
        );
    }

    // `--json`: one compact document per frame and line.
    let run = ctl(
        &h.admin,
        &["--json", "status", "shop", "--watch", "--count", "1"],
    )
    .await;
    assert_eq!(run.ok().lines().count(), 1, "{}", run.out);
    let v: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(v["rollout"]["step_index"], 1, "{v}");

    // A first frame that fails is an error like any other command's.
    assert_eq!(
        ctl(&h.admin, &["status", "nope", "--watch"]).await.failed(),
        "weir ctl: unknown service `nope` (HTTP 404)\n"
    );
    assert!(parse(&h.admin, &["status", "--count", "2"]).is_err());
    assert!(parse(&h.admin, &["status", "--watch", "--count", "0"]).is_err());

    // Without --count it follows changes until stopped.
    let mut watch = Streaming::start(parse(&h.admin, &["status", "shop", "-w"]).unwrap());
    watch.wait_for("shop: rollout progressing, step 2/5").await;
    ctl(&h.admin, &["pause", "shop"]).await.ok();
    watch.wait_for("shop: rollout paused, step 2/5").await;
    let (code, err, seen) = watch.stop().await;
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert!(seen.contains("\n---\n"), "{seen}");
}
