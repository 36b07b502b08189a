//! The dashboard in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver), against a real weir with real upstreams and live traffic. It enters
//! the admin token, reads weights and charts off the page, clicks "Abort", and checks
//! through the API that traffic went back to the baseline. Screenshots land in the
//! test's temp dir (or in `WEIR_SCREENSHOT_DIR`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

const TOKEN: &str = "dashboard-test-token";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// How long the page gets to show something: it refreshes every second.
const PAGE: Duration = Duration::from_secs(20);

/// chromedriver on a free loopback port; killed when dropped.
pub(crate) struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn chromedriver() -> Driver {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
        "this test needs Debian's chromium and chromium-driver: scripts/test.sh installs them"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = wait_until(Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    assert!(up, "chromedriver did not start listening on {addr}");
    driver
}

/// A fresh headless Chromium with the flags these machines need: no sandbox (root), no
/// GPU, and none of the background connections a closed network refuses.
pub(crate) async fn browser(driver: &Driver, profile: &std::path::Path) -> Browser {
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-quic",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1440,1100",
        &format!("--user-data-dir={}", profile.display()),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": CHROMIUM, "args": args }),
    );
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("cannot start headless chromium: {e}"))
}

/// Run a script in the page and return its value.
async fn eval(b: &Browser, script: &str) -> Value {
    b.execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Wait until `script` evaluates to something truthy in the page; returns that value.
pub(crate) async fn page_until(b: &Browser, what: &str, script: &str) -> Value {
    let deadline = std::time::Instant::now() + PAGE;
    loop {
        let v = eval(b, script).await;
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(x) => *x,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never showed {what} (last: {v})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(b: &Browser, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let png = b.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let path = dir.join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    path
}

/// `GET` on the admin API with the token.
async fn api(admin: SocketAddr, path: &str) -> Answer {
    let req = http::Request::get(format!("http://{admin}{path}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(empty())
        .unwrap();
    send(&client(), req).await
}

/// Paced requests through the proxy until stopped: the page needs live numbers.
fn traffic(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let _ = get(&c, addr, "shop.example.com", "/").await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_numbers_and_abort_sends_traffic_to_the_baseline() {
    let dir = temp_dir("dashboard");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // A rollout held at a manual pause with 25% on the canary, guarded by an SLO.
    let extra = format!(
        "[service.slo]\nwindow = \"10s\"\ninterval = \"500ms\"\nmin_requests = 20\n\
         max_error_rate = 0.05\nmax_p99_latency = \"500ms\"\n\
         [service.rollout]\ncandidate = \"canary\"\n\
         steps = [{{ percent = 25 }}, {{ pause = \"manual\" }}, {{ percent = 100 }}]\n\
         [admin]\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    let shop = shop(None, (100, 0), &extra).await;
    let admin = shop.proxy.admin;
    let rollout = http::Request::post(format!("http://{admin}/api/v1/services/shop/rollout"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(full("{}"))
        .unwrap();
    let a = send(&client(), rollout).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(shop.proxy.addr, Arc::clone(&stop));

    let driver = chromedriver().await;
    let b = browser(&driver, &dir.join("chromium-profile")).await;
    let shots = std::env::var_os("WEIR_SCREENSHOT_DIR").map_or(dir.clone(), Into::into);
    let result = async {
        b.goto(&format!("http://{admin}/")).await.expect("open the dashboard");
        assert_eq!(b.title().await.unwrap(), "weir");

        // Without the token the page asks for it and shows no service (and so no control).
        page_until(&b, "the token prompt", "return !document.querySelector('#auth').hidden").await;
        assert_eq!(
            eval(&b, "return document.querySelectorAll('section.service').length").await,
            0
        );
        // A wrong token is refused, with the API's reason, and asked for again.
        b.find(Locator::Css("#token-input")).await.unwrap().send_keys("wrong").await.unwrap();
        b.find(Locator::Css("#token-submit")).await.unwrap().click().await.unwrap();
        let refused = page_until(
            &b,
            "the refusal of a wrong token",
            "const e = document.querySelector('#auth-error'); return !e.hidden && e.textContent",
        )
        .await;
        assert!(refused.as_str().unwrap().contains("wrong admin token"), "{refused}");
        b.find(Locator::Css("#token-input")).await.unwrap().send_keys(TOKEN).await.unwrap();
        b.find(Locator::Css("#token-submit")).await.unwrap().click().await.unwrap();

        // The split as the API has it: 75:25 while the rollout holds at its pause.
        let card = "document.querySelector('section.service[data-service=\"shop\"]')";
        page_until(&b, "the shop service", &format!("return !!{card}")).await;
        // A manual pause keeps the rollout progressing, waiting for a promote.
        page_until(
            &b,
            "the rollout waiting at its manual pause",
            &format!(
                "return {card}.querySelector('.phase').textContent === 'progressing' && \
                 {card}.querySelector('.rollout-kv').textContent.includes('promote (manual pause)')"
            ),
        )
        .await;
        let cell = |pool: &str, class: &str| {
            format!("return {card}.querySelector('tr[data-pool=\"{pool}\"] .{class}').textContent")
        };
        assert_eq!(eval(&b, &cell("stable", "weight")).await, "7500");
        assert_eq!(eval(&b, &cell("canary", "weight")).await, "2500");
        assert_eq!(eval(&b, &cell("canary", "share")).await, "25.0%");
        let bar = eval(
            &b,
            &format!("return [...{card}.querySelectorAll('.weights-bar [data-pool]')].map(s => s.textContent)"),
        )
        .await;
        assert_eq!(bar, json!(["stable 75%", "canary 25%"]));
        // Live numbers: both pools draw a requests-per-second line with several points,
        // and the table's rate is above zero.
        for pool in ["stable", "canary"] {
            let points = page_until(
                &b,
                &format!("a req/s line for {pool}"),
                &format!(
                    "const p = {card}.querySelector('svg[data-metric=\"rps\"] path[data-pool=\"{pool}\"]'); \
                     return p && Number(p.dataset.points) >= 3 && p.getAttribute('d').length > 20 && Number(p.dataset.points)"
                ),
            )
            .await;
            assert!(points.as_f64().unwrap() >= 3.0);
            let rps = page_until(
                &b,
                &format!("a request rate for {pool}"),
                &format!(
                    "const t = {card}.querySelector('tr[data-pool=\"{pool}\"] .rps').textContent; \
                     return parseFloat(t) > 0 && t"
                ),
            )
            .await;
            eprintln!("{pool}: {rps} req/s on the page");
        }
        // The guard's judgement in words, and the step the rollout waits at.
        let decision = page_until(
            &b,
            "a guard decision",
            &format!("const d = {card}.querySelector('.decisions .decision:not(.empty)'); return d && d.textContent"),
        )
        .await;
        assert!(decision.as_str().unwrap().contains("canary"), "{decision}");
        // The error-rate chart draws what the guard judges, not one-slice ratios: the
        // canary's estimate at each evaluation with its confidence band, the SLO line,
        // and the verdict beside the newest value.
        let judged = page_until(
            &b,
            "the error-rate chart on the guard's basis",
            &format!(
                "const c = {card}.querySelector('.chart[data-metric=\"errors\"]'); \
                 return c.dataset.basis === 'guard' && \
                 !!c.querySelector('polygon.band[data-pool=\"canary\"]') && \
                 !!c.querySelector('path[data-pool=\"stable\"]') && \
                 c.querySelector('.basis').textContent + ' | ' + \
                 c.querySelector('.latest [data-pool=\"canary\"]').textContent"
            ),
        )
        .await;
        let judged = judged.as_str().unwrap();
        assert!(judged.starts_with("as the guard judges it"), "{judged}");
        assert!(
            ["pass", "inconclusive", "breach"].iter().any(|v| judged.ends_with(v)),
            "{judged}"
        );
        // The table's figures are the guard window's (the same as the API's), and
        // each weight is shown with the share of traffic it gives.
        let note = eval(&b, &format!("return {card}.querySelector('.window-note').textContent")).await;
        assert!(note.as_str().unwrap().contains("guard's 10s window"), "{note}");
        assert_eq!(
            eval(&b, &format!("return {card}.querySelector('.form-share[data-pool=\"canary\"]').textContent")).await,
            " = 25.0%"
        );
        assert_eq!(eval(&b, &format!("return {card}.querySelector('.health').textContent")).await, "healthy");
        let kv = eval(&b, &format!("return {card}.querySelector('.rollout-kv').textContent")).await;
        assert!(kv.as_str().unwrap().contains("2/3: pause until promoted"), "{kv}");
        // Verbs that do not apply now are disabled, and say why.
        let resume = b
            .find(Locator::Css("section.service[data-service=\"shop\"] button[data-action=\"resume\"]"))
            .await
            .unwrap();
        assert!(!resume.is_enabled().await.unwrap());
        let why = eval(&b, &format!("return {card}.querySelector('.why').textContent")).await;
        assert!(why.as_str().unwrap().contains("Resume: the rollout is not paused"), "{why}");
        // Several refreshes in, with lines drawn: the picture for people to look at.
        page_until(&b, "a few refreshes", "return Number(document.body.dataset.updates) >= 3").await;
        // A single weir has no fleet panel.
        assert_eq!(eval(&b, "return document.querySelector('#fleet').hidden").await, true);
        screenshot(&b, &shots, "dashboard.png").await;

        // Abort, with one click.
        let abort = b
            .find(Locator::Css("section.service[data-service=\"shop\"] button[data-action=\"abort\"]"))
            .await
            .unwrap();
        assert!(abort.is_enabled().await.unwrap());
        abort.click().await.unwrap();
        let said = page_until(
            &b,
            "the result of abort",
            &format!("const r = {card}.querySelector('.result'); return r.classList.contains('ok') && r.textContent"),
        )
        .await;
        assert!(said.as_str().unwrap().contains("abort: done"), "{said}");
        page_until(
            &b,
            "the aborted phase",
            &format!("return {card}.querySelector('.phase').textContent === 'aborted'"),
        )
        .await;
        page_until(
            &b,
            "the rollout_aborted event",
            &format!("return !!{card}.querySelector('.events li[data-kind=\"rollout_aborted\"]')"),
        )
        .await;
        screenshot(&b, &shots, "dashboard-aborted.png").await;
        // The token was asked for once: a reload of the tab keeps it (sessionStorage).
        b.refresh().await.unwrap();
        page_until(&b, "the service after a reload", &format!("return !!{card}")).await;
        assert_eq!(
            eval(&b, "return document.querySelector('#auth').hidden").await,
            true
        );
        Ok::<(), String>(())
    }
    .await;
    let _ = b.close().await;
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    result.unwrap();

    // Through the API: the abort was the dashboard's (an admin change from the page's
    // connection), and every pool but the baseline has weight 0.
    let svc = api(admin, "/api/v1/services/shop").await.json();
    assert_eq!(svc["rollout"]["phase"], "aborted", "{svc}");
    let weights = pool_weights(&svc);
    assert_eq!(weights[1], ("canary".to_owned(), 0), "{svc}");
    assert!(weights[0].1 > 0, "{svc}");
    let events = api(admin, "/api/v1/events?tail=5").await.json();
    let aborted = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "rollout_aborted")
        .cloned()
        .unwrap_or_else(|| panic!("no rollout_aborted event: {events}"));
    assert_eq!(aborted["source"], "admin", "{aborted}");
    // And traffic really goes to the baseline now.
    let seen = split(shop.proxy.addr, 200, 4).await;
    assert_eq!(seen.get("stable"), Some(&200), "{seen:?}");
}
