//! `weir traffic`: steady synthetic load through a proxy, tallied by the pool that
//! answered (the `x-upstream` header `weir upstream` sets), one line a second. The demo
//! and the docker-compose stack use it so charts and judgements have live traffic.
//!
//! A fixed number of clients each send on a fixed period (rate / clients): the load is
//! paced, not closed-loop, so a slow pool does not quietly lower the request rate the
//! way a "send when the last answer came" loop would.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use http::Request;
use http::Uri;
use http::uri::{Authority, PathAndQuery};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What `weir traffic` was asked for (its command-line options).
#[derive(Debug, Clone, clap::Args)]
pub struct TrafficOptions {
    /// The proxy to send to, as host:port.
    #[arg(long, value_parser = parse_target)]
    pub target: Authority,
    /// Host header to send (which service weir routes to); default: the target.
    #[arg(long)]
    pub host: Option<String>,
    /// Path (and query) to request, e.g. "/" or "/api/items?page=2".
    #[arg(long, default_value = "/", value_parser = parse_path)]
    pub path: PathAndQuery,
    /// Requests per second.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub rate: u64,
    /// Concurrent clients sharing the rate.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub clients: u64,
    /// Stop after this long, e.g. "5m" (default: until Ctrl-C).
    #[arg(long, value_parser = weir::config::parse_duration)]
    pub duration: Option<Duration>,
}

fn parse_path(s: &str) -> Result<PathAndQuery, String> {
    if !s.starts_with('/') {
        return Err(format!("`{s}` must start with /, e.g. /{s}"));
    }
    s.parse()
        .map_err(|_| format!("`{s}` is not a valid path (encode spaces as %20)"))
}

fn parse_target(s: &str) -> Result<Authority, String> {
    let a: Authority = s
        .parse()
        .map_err(|_| format!("`{s}` is not host:port, e.g. 127.0.0.1:8080"))?;
    if a.port_u16().is_none() {
        return Err(format!("`{s}` has no port, e.g. {s}:8080"));
    }
    Ok(a)
}

/// Answers and failures per answering pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    /// 5xx answers.
    pub errors: u64,
}

/// Where answers are counted; shared by every client.
#[derive(Debug, Default)]
pub struct Tallies {
    pools: Mutex<BTreeMap<String, Counts>>,
    /// Requests that got no answer at all (connection refused, reset).
    failed: std::sync::atomic::AtomicU64,
}

/// The name answers without an `x-upstream` header are counted under.
pub const UNNAMED: &str = "-";

impl Tallies {
    fn record(&self, pool: &str, error: bool) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        // Look up by &str first: no allocation per request once the pool is known.
        let c = match pools.get_mut(pool) {
            Some(c) => c,
            None => pools.entry(pool.to_owned()).or_default(),
        };
        if error {
            c.errors += 1;
        } else {
            c.ok += 1;
        }
    }

    /// The counts of one pool so far.
    pub fn counts(&self, pool: &str) -> Counts {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(pool).copied().unwrap_or_default()
    }

    /// Every pool's counts so far, by name.
    pub fn all(&self) -> BTreeMap<String, Counts> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests that got no answer.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Paced GETs of `path` on `target` until `stop` is set, tallied by answering pool.
pub fn spawn(
    target: Authority,
    host: Option<String>,
    path: PathAndQuery,
    rate: u64,
    clients: u64,
    tallies: Arc<Tallies>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let clients = clients.clamp(1, rate.max(1));
        let period = Duration::from_nanos(1_000_000_000 * clients / rate.max(1));
        let url = Uri::builder()
            .scheme("http")
            .authority(target)
            .path_and_query(path)
            .build()
            .expect("an authority and a path make a URI");
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (tallies, stop, url, host) = (
                Arc::clone(&tallies),
                Arc::clone(&stop),
                url.clone(),
                host.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let client: Client<_, Empty<bytes::Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let mut req = Request::get(url.clone());
                    if let Some(h) = &host {
                        req = req.header(http::header::HOST, h);
                    }
                    let Ok(req) = req.body(Empty::new()) else {
                        return;
                    };
                    let resp = match client.request(req).await {
                        Ok(r) => r,
                        Err(_) => {
                            tallies.failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let failed = resp.status().is_server_error();
                    let pool = resp
                        .headers()
                        .get("x-upstream")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(UNNAMED)
                        .to_owned();
                    if resp.into_body().collect().await.is_err() {
                        tallies.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    tallies.record(&pool, failed);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    })
}

/// Run `weir traffic`, printing one line a second until `duration` or Ctrl-C.
pub async fn run(opts: TrafficOptions, out: &mut (impl Write + Send)) -> Result<()> {
    let host = opts.host.clone();
    if let Some(h) = &host {
        http::HeaderValue::from_str(h)
            .map_err(|_| anyhow::anyhow!("--host `{h}` cannot be sent as a Host header"))?;
    }
    writeln!(
        out,
        "sending {} req/s to http://{}{} (Host: {}) from {} clients; Ctrl-C stops",
        opts.rate,
        opts.target,
        opts.path,
        host.as_deref().unwrap_or(opts.target.as_str()),
        opts.clients
    )?;
    let tallies = Arc::new(Tallies::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn(
        opts.target.clone(),
        host,
        opts.path.clone(),
        opts.rate,
        opts.clients,
        Arc::clone(&tallies),
        Arc::clone(&stop),
    );
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = BTreeMap::new();
    let mut last_failed = 0;
    let ctrl_c = crate::signal::shutdown_signal();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut ctrl_c => break,
        }
        let now = tallies.all();
        let failed = tallies.failed();
        writeln!(
            out,
            "{}",
            line(started.elapsed(), &last, &now, failed - last_failed)
        )?;
        out.flush()?;
        (last, last_failed) = (now, failed);
        if opts.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    Ok(())
}

/// One second of answers: per pool, requests and the error share.
fn line(
    elapsed: Duration,
    before: &BTreeMap<String, Counts>,
    now: &BTreeMap<String, Counts>,
    failed: u64,
) -> String {
    let mut s = format!("[{:>4}s]", elapsed.as_secs());
    for (pool, c) in now {
        let b = before.get(pool).copied().unwrap_or_default();
        let (ok, errors) = (c.ok - b.ok, c.errors - b.errors);
        let total = ok + errors;
        let rate = if total == 0 {
            0.0
        } else {
            100.0 * errors as f64 / total as f64
        };
        s.push_str(&format!("  {pool} {total} req ({rate:.1}% 5xx)"));
    }
    if failed > 0 {
        s.push_str(&format!("  no answer: {failed}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_shows_the_last_second_per_pool() {
        let mut before = BTreeMap::new();
        before.insert("stable".to_owned(), Counts { ok: 10, errors: 0 });
        let mut now = before.clone();
        now.insert("stable".to_owned(), Counts { ok: 55, errors: 5 });
        now.insert("canary".to_owned(), Counts { ok: 4, errors: 0 });
        assert_eq!(
            line(Duration::from_secs(3), &before, &now, 2),
            "[   3s]  canary 4 req (0.0% 5xx)  stable 50 req (10.0% 5xx)  no answer: 2"
        );
    }

    #[test]
    fn paths_start_with_a_slash_and_are_valid() {
        assert_eq!(parse_path("/a?b=1").unwrap().as_str(), "/a?b=1");
        assert!(parse_path("foo").unwrap_err().contains("must start with /"));
        assert!(parse_path("/a b").unwrap_err().contains("not a valid path"));
    }

    #[test]
    fn targets_need_a_port() {
        assert!(parse_target("weir:8080").is_ok());
        assert!(parse_target("weir").unwrap_err().contains("no port"));
        assert!(parse_target("http://x:1").is_err());
    }
}
