//! `weir demo`: the product tour. Two built-in upstreams, the proxy, the admin API,
//! synthetic traffic and a canary plan with short steps, narrated one line a second; with
//! `--fail-canary` the canary breaks mid-run and the guard moves traffic back.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::traffic::{Counts, Tallies};
use weir::Weir;
use weir::config::Config;
use weir::model::Source;
use weir::{Command, RolloutVerb};
use weir_testkit::{self as upstream, Faults, UpstreamConfig};

/// What `weir demo` was asked for (its command-line options).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Where the demo proxy listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the demo admin API listens.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Break the canary mid-run (30% errors) to watch the SLO guard move traffic back.
    #[arg(long)]
    pub fail_canary: bool,
    /// Stop the tour after this long, e.g. "45s".
    #[arg(long, default_value = "45s", value_parser = weir::config::parse_duration)]
    pub duration: Duration,
    /// After the tour, keep serving until Ctrl-C, to poke at it with `weir ctl`.
    #[arg(long)]
    pub keep_running: bool,
    /// Synthetic requests per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
}

/// The demo's plan: short steps so the tour takes seconds, with a timed pause, an
/// evidence gate and the guard watching throughout.
const PLAN: &str = r#"
[service.rollout]
candidate = "canary"
steps = [
  { percent = 10 },
  { pause = "3s" },
  { percent = 25 },
  { gate = { min_requests = 150 } },
  { percent = 50 },
  { pause = "3s" },
  { percent = 100 },
]

[service.slo]
window = "10s"
fast_window = "2s"
interval = "500ms"
min_requests = 30
max_error_rate = 0.05
max_p99_latency = "250ms"
breaches_to_act = 2
"#;

/// Run the tour, narrating to `out`.
pub async fn run(opts: DemoOptions, out: &mut (impl Write + Send)) -> Result<()> {
    let stable = upstream::bind("127.0.0.1:0".parse()?, UpstreamConfig::new("stable")).await?;
    let canary = upstream::bind("127.0.0.1:0".parse()?, UpstreamConfig::new("canary")).await?;
    let state_dir = std::env::temp_dir().join(format!("weir-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let listener = TcpListener::bind(opts.listen).await.with_context(|| {
        format!(
            "cannot listen on {}; pick another with --listen",
            opts.listen
        )
    })?;
    let admin = TcpListener::bind(opts.admin)
        .await
        .with_context(|| format!("cannot listen on {}; pick another with --admin", opts.admin))?;
    let (proxy_addr, admin_addr) = (listener.local_addr()?, admin.local_addr()?);
    let toml = format!(
        "[proxy]\nlisten = \"{proxy_addr}\"\n[admin]\nlisten = \"{admin_addr}\"\n[state]\ndir = \"{}\"\n\n\
         [[service]]\nname = \"demo\"\nbaseline = \"stable\"\nstrategy = \"canary\"\n\n\
         [service.pools.stable]\nendpoints = [\"{}\"]\nweight = 100\n\n\
         [service.pools.canary]\nendpoints = [\"{}\"]\nweight = 0\n{PLAN}",
        state_dir.display(),
        stable.addr(),
        canary.addr(),
    );
    let config = Config::parse(&toml, "demo").map_err(|e| anyhow::anyhow!("{e}"))?;
    let weir = Arc::new(Weir::new(config, None)?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let weir = Arc::clone(&weir);
        tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            weir.serve(listener, Some(admin), stop).await
        })
    };
    let ctl = if admin_addr.to_string() == "127.0.0.1:9901" {
        "weir ctl".to_owned()
    } else {
        format!("weir ctl --admin http://{admin_addr}")
    };
    writeln!(
        out,
        "weir demo: proxy http://{proxy_addr}, admin http://{admin_addr}\n\
         pools: stable ({}) and canary ({}); {} req/s of synthetic traffic\n\
         plan: 10% → pause 3s → 25% → gate 150 requests → 50% → pause 3s → 100%, \
         guarded by: error rate ≤ 5%, p99 ≤ 250ms{}\n",
        stable.addr(),
        canary.addr(),
        opts.rate,
        if opts.fail_canary {
            "; the canary will break mid-run"
        } else {
            ""
        }
    )?;

    let tallies = Arc::new(Tallies::default());
    let stop_traffic = Arc::new(AtomicBool::new(false));
    let traffic = crate::traffic::spawn(
        proxy_addr.to_string().parse()?,
        None,
        http::uri::PathAndQuery::from_static("/"),
        opts.rate,
        8,
        Arc::clone(&tallies),
        Arc::clone(&stop_traffic),
    );

    weir.controller()
        .apply(Command::Rollout {
            service: "demo".into(),
            verb: RolloutVerb::Start {
                candidate: None,
                override_freeze: None,
            },
            source: Source::Admin,
            actor: Some("demo".into()),
        })
        .map_err(|e| anyhow::anyhow!("cannot start the rollout: {e}"))?;

    let started = Instant::now();
    let mut broke_at = None;
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let outcome = loop {
        tick.tick().await;
        let snap = weir
            .controller()
            .snapshot("demo")
            .context("demo service vanished")?;
        let rollout = weir.controller().service_control("demo").rollout;
        let phase = rollout.as_ref().map_or("idle", |r| r.phase.as_str());
        let step = rollout.as_ref().map_or(String::new(), |r| {
            format!(
                "step {}/{} {:<40}",
                (r.step + 1).min(r.steps.len()),
                r.steps.len(),
                r.current_step().map_or("done".into(), |s| s.describe())
            )
        });
        let total = snap.total_weight().max(1) as f64;
        let mut line = format!("[{:>3}s] {phase:<11} {step} ", started.elapsed().as_secs());
        for slot in snap.slots() {
            let name = slot.name();
            let Counts { ok, errors } = tallies.counts(name);
            let (ok0, err0) = last.insert(name.to_owned(), (ok, errors)).unwrap_or((0, 0));
            let (n, e) = (ok - ok0 + errors - err0, errors - err0);
            let p99 = slot
                .pool
                .window()
                .stats(Duration::from_secs(1))
                .p99()
                .map_or("-".into(), |d| format!("{}ms", d.as_millis()));
            line += &format!(
                "| {name} {:>3.0}% {n:>4} req/s {:>5.1}% err p99 {p99:>6} ",
                f64::from(slot.weight) * 100.0 / total,
                if n == 0 {
                    0.0
                } else {
                    e as f64 * 100.0 / n as f64
                }
            );
        }
        writeln!(out, "{}", line.trim_end())?;
        out.flush()?;

        if opts.fail_canary && broke_at.is_none() && rollout.as_ref().is_some_and(|r| r.step >= 3) {
            canary.set_faults(Faults::errors(0.3));
            broke_at = Some(Instant::now());
            writeln!(
                out,
                "        >>> the canary starts failing 30% of its requests"
            )?;
        }
        match phase {
            "promoted" => break Outcome::Promoted,
            "degraded" => break Outcome::RolledBack,
            _ => {}
        }
        if started.elapsed() >= opts.duration {
            break Outcome::TimedOut;
        }
    };
    stop_traffic.store(true, Ordering::Relaxed);
    let _ = traffic.await;

    writeln!(out)?;
    summary(out, &weir, &tallies, outcome, broke_at)?;
    if opts.keep_running {
        writeln!(
            out,
            "\nstill serving (Ctrl-C to stop). Try:\n  curl -s http://{proxy_addr}/\n  {ctl} status\n  {ctl} retry demo\n  {ctl} events"
        )?;
        out.flush()?;
        crate::signal::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    stable.kill().await;
    canary.kill().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Promoted,
    RolledBack,
    TimedOut,
}

fn summary(
    out: &mut impl Write,
    weir: &Weir,
    tallies: &Tallies,
    outcome: Outcome,
    broke_at: Option<Instant>,
) -> Result<()> {
    match outcome {
        Outcome::Promoted => writeln!(out, "summary: canary promoted; it is the new baseline")?,
        Outcome::RolledBack => writeln!(out, "summary: the SLO guard rolled the canary back")?,
        Outcome::TimedOut => writeln!(out, "summary: stopped after --duration")?,
    }
    for name in ["stable", "canary"] {
        let Counts { ok, errors } = tallies.counts(name);
        writeln!(
            out,
            "  {name:<7} {:>6} requests, {errors:>4} errors",
            ok + errors
        )?;
    }
    let events = weir.controller().events(0, 1000).unwrap_or_default();
    if let Some(rb) = events
        .iter()
        .find(|e| e.kind == weir::model::EventKind::RolledBack)
    {
        if let Some(at) = broke_at {
            writeln!(
                out,
                "  reverted {:.1}s after the canary broke",
                at.elapsed().as_secs_f64() - rb_age(rb)
            )?;
        }
        writeln!(
            out,
            "  guard decision: {}",
            rb.reason.as_deref().unwrap_or("-")
        )?;
        let d = &rb.details;
        let num = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |f| format!("{f:.3}"));
        writeln!(
            out,
            "  record: check {} value {} threshold {} over {}s; candidate {} requests, baseline {} requests",
            d["check"].as_str().unwrap_or("-"),
            num(&d["value"]),
            num(&d["threshold"]),
            num(&d["window_secs"]),
            d["candidate"]["requests"],
            d["baseline"]["requests"]
        )?;
    }
    writeln!(out, "  events:")?;
    for e in &events {
        writeln!(
            out,
            "    #{} {} {} ({}): {}",
            e.id,
            &e.time[11..19.min(e.time.len())],
            e.kind,
            e.source.as_str(),
            e.reason.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

/// Seconds since an event's time.
fn rb_age(e: &weir::state::Event) -> f64 {
    humantime::parse_rfc3339_weak(&e.time)
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or(0.0, |d| d.as_secs_f64())
}
