//! The control plane's loops on tokio's paused time: the guard's tick, the rollout
//! driver and the health monitor run as they do in `weir run`, while the test moves a
//! simulated clock. Minutes of timed pauses and judgement pass in milliseconds, and the
//! assertions are about virtual time, which no machine load can stretch.
//!
//! The loops hand their writes to blocking threads, which run in real time: after each
//! step of virtual time the test waits (on a real deadline) until that work is done, so
//! every observation belongs to a known virtual instant.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::control::controller::{Command, Controller, RolloutVerb};
use crate::control::guard::Guard;
use crate::control::{driver, health};
use crate::model::{Clock, Phase, Source, TokioClock};
use crate::telemetry::metrics::Metrics;

/// Wait, on a real-time deadline, until `done` holds. Yielding lets the runtime run the
/// loops and poll their sockets; it does not move the paused clock.
async fn settle(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

fn controller(toml: &str, clock: &Arc<TokioClock>) -> Arc<Controller> {
    let config = Config::parse(toml, "test.toml").unwrap();
    Arc::new(Controller::in_memory_with_clock(
        &config,
        Metrics::new(),
        Arc::clone(clock) as Arc<dyn Clock>,
    ))
}

fn weight(controller: &Controller, pool: &str) -> u32 {
    controller
        .snapshot("shop")
        .unwrap()
        .slot(pool)
        .unwrap()
        .weight
}

const GUARDED: &str = r#"
[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:1"]
weight = 90
[service.pools.canary]
endpoints = ["127.0.0.1:2"]
weight = 10
[service.slo]
window = "30s"
interval = "1s"
min_requests = 50
max_error_rate = 0.05
breaches_to_act = 2
"#;

/// Feed one virtual second of traffic: 100 requests to stable (0.5% errors), 20 to the
/// canary with the given error rate (deterministic patterns, not random draws).
fn one_second(controller: &Controller, canary_errors_per_20: usize) {
    let snap = controller.snapshot("shop").unwrap();
    let stable = snap.slot("stable").unwrap().pool.window();
    let canary = snap.slot("canary").unwrap().pool.window();
    for i in 0..100 {
        stable.record(i == 0 && rand_bit(), Duration::from_millis(20));
    }
    for i in 0..20 {
        canary.record(i < canary_errors_per_20, Duration::from_millis(20));
    }
}

/// One stable error every other second on average, without a random source.
fn rand_bit() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed).is_multiple_of(2)
}

/// Advance one virtual second with traffic, and wait until the guard has judged it.
async fn guarded_second(controller: &Controller, guard: &Guard, errors: usize) {
    one_second(controller, errors);
    tokio::time::advance(Duration::from_secs(1)).await;
    let now = controller.clock().now();
    let deadline = Instant::now() + Duration::from_secs(20);
    // A verdict on this second, or the revert (after which the canary, at weight 0, is
    // no longer judged): the revert is acted on just after the verdict that called it.
    while !(guard
        .verdict("shop", "canary")
        .is_some_and(|(_, at)| at >= now)
        || weight(controller, "canary") == 0)
    {
        assert!(
            Instant::now() < deadline,
            "no verdict at {now:?}: {:?}, canary weight {}",
            guard.verdict("shop", "canary"),
            weight(controller, "canary")
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_guard_loop_reverts_a_failing_canary_and_leaves_a_healthy_one() {
    let clock = Arc::new(TokioClock::new());
    let controller = controller(GUARDED, &clock);
    let guard = Arc::new(Guard::new(Arc::clone(&controller), Metrics::new()));
    let task = tokio::spawn(Arc::clone(&guard).run());

    // Ten healthy virtual minutes: judged 600 times, never reverted.
    for _ in 0..600 {
        guarded_second(&controller, &guard, 0).await;
        assert_eq!(
            weight(&controller, "canary"),
            10,
            "a healthy canary was reverted"
        );
    }
    // Then the canary fails 30% of its requests: reverted within seconds of virtual
    // time, however slow this machine is.
    let broke = controller.clock().now();
    let mut reverted = None;
    for _ in 0..60 {
        guarded_second(&controller, &guard, 6).await;
        if weight(&controller, "canary") == 0 {
            reverted = Some(controller.clock().now());
            break;
        }
    }
    let reverted = reverted.expect("a canary failing 30% was not reverted in 60 s");
    let took = reverted.duration_since(broke).unwrap();
    assert!(took <= Duration::from_secs(10), "reverted after {took:?}");
    // The revert marks the service degraded (published just after the weights).
    settle("the degraded mark", || {
        controller.service_control("shop").degraded.is_some()
    })
    .await;
    task.abort();
}

const PLANNED: &str = r#"
[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:1"]
weight = 100
[service.pools.canary]
endpoints = ["127.0.0.1:2"]
weight = 0
[service.rollout]
candidate = "canary"
steps = [{ percent = 10 }, { pause = "5m" }, { percent = 50 }, { pause = "manual" }, { percent = 100 }]
"#;

#[tokio::test(start_paused = true)]
async fn the_rollout_driver_takes_a_timed_pause_on_the_clock_not_before() {
    let clock = Arc::new(TokioClock::new());
    let controller = controller(PLANNED, &clock);
    let guard = Arc::new(Guard::new(Arc::clone(&controller), Metrics::new()));
    controller
        .apply(Command::Rollout {
            service: "shop".into(),
            verb: RolloutVerb::Start {
                candidate: None,
                override_freeze: None,
            },
            source: Source::Admin,
            actor: None,
        })
        .unwrap();
    assert_eq!(weight(&controller, "canary"), 1000);
    let step = || controller.service_control("shop").rollout.unwrap().step;
    assert_eq!(step(), 1, "waiting in the timed pause");
    let task = tokio::spawn(driver::drive(Arc::clone(&controller), guard));

    // 4 min 59.9 s of virtual time, a tenth of a second at a time: still paused.
    for _ in 0..2999 {
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(step(), 1, "the pause ended early");
    assert_eq!(weight(&controller, "canary"), 1000);

    // The pause ends at 5 min: the driver enters the 50% step, applies it at its next
    // tick and stops at the manual pause, which holds for as long as anyone waits.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(100)).await;
        let before = step();
        settle("the driver's tick", || step() > before || before >= 3).await;
    }
    assert_eq!(step(), 3);
    assert_eq!(
        weight(&controller, "canary"),
        5000,
        "{:?}",
        controller.service_control("shop")
    );
    for _ in 0..36_000 {
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let rollout = controller.service_control("shop").rollout.unwrap();
    assert_eq!((rollout.phase, rollout.step), (Phase::Progressing, 3));
    assert_eq!(
        weight(&controller, "canary"),
        5000,
        "nothing past the manual pause"
    );
    task.abort();
}

const CHECKED: &str = r#"
[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["ENDPOINT"]
weight = 100
[service.pools.stable.health]
path = "/"
interval = "5s"
timeout = "2s"
healthy_threshold = 2
unhealthy_threshold = 3
"#;

#[tokio::test(start_paused = true)]
async fn the_health_monitor_counts_checks_on_the_clock() {
    let upstream = weir_testkit::bind(
        "127.0.0.1:0".parse().unwrap(),
        weir_testkit::UpstreamConfig::new("stable"),
    )
    .await
    .unwrap();
    let clock = Arc::new(TokioClock::new());
    let toml = CHECKED.replace("ENDPOINT", &upstream.addr().to_string());
    let controller = controller(&toml, &clock);
    let pool = Arc::clone(
        &controller
            .snapshot("shop")
            .unwrap()
            .slot("stable")
            .unwrap()
            .pool,
    );
    let (_sink, monitor) = health::start(Arc::clone(&controller));
    let rounds = monitor.rounds();
    let task = tokio::spawn(monitor.run());

    // Virtual time in tenths of a second; each check's real exchange finishes before the
    // clock moves on, so a check never times out for the test's sake.
    let step = async |n: usize| {
        for _ in 0..n {
            let before = rounds.load(std::sync::atomic::Ordering::Acquire);
            tokio::time::advance(Duration::from_millis(100)).await;
            settle("the monitor's round and its checks", || {
                rounds.load(std::sync::atomic::Ordering::Acquire) > before
                    && !pool.endpoints()[0].is_checking()
            })
            .await;
        }
    };
    step(1).await;
    assert!(pool.endpoints()[0].is_healthy());

    // Failing checks from now: down after the third one, 5 s apart — not earlier.
    upstream.set_faults(weir_testkit::Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    step(100).await; // 10 s: two failed checks
    assert!(
        pool.endpoints()[0].is_healthy(),
        "down before the third failure"
    );
    step(60).await; // 16 s: the third
    assert!(
        !pool.endpoints()[0].is_healthy(),
        "still up after three failures"
    );

    // Passing again: up after two passes, 5 s apart.
    upstream.set_faults(weir_testkit::Faults::default());
    step(50).await;
    assert!(!pool.endpoints()[0].is_healthy(), "up after one pass");
    step(60).await;
    assert!(
        pool.endpoints()[0].is_healthy(),
        "still down after two passes: {:?}",
        pool.endpoints()[0].status()
    );
    task.abort();
}
