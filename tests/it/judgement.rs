//! The guard's judgement measured as decisions: simulated streams with known truth fed
//! through the real windows (injected time) and the real pure `judge`, counting false
//! reverts of healthy canaries and measuring how long a broken one takes to revert.
//!
//! The default sizes keep the suite fast; the report's figures come from a longer run:
//!
//! ```text
//! WEIR_SIM_HOURS=2 WEIR_SIM_TRIALS=10 cargo test --release --test it judgement:: -- --nocapture
//! ```
//!
//! (hours per healthy scenario and SLO; trials per failure scenario.)

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use weir::Window;
use weir::config::SloConfig;
use weir::judge::{Evidence, Verdict, dispersion, judge, recent, recent_slices};

/// Simulation step: traffic is generated in 100 ms pieces, so a failure can start at
/// any point of an evaluation interval.
const STEP: Duration = Duration::from_millis(100);
/// ~500 req/s in all, the canary at 10% (as in the issue's measurements).
const BASELINE_RATE: f64 = 450.0;
const CANARY_RATE: f64 = 50.0;
/// The baseline serves alone this long before the canary gets traffic.
const WARM_UP: Duration = Duration::from_secs(300);

/// The example config's SLO (config/weir.toml).
fn example_slo() -> SloConfig {
    SloConfig {
        window: Duration::from_secs(30),
        fast_window: Duration::from_secs(3),
        interval: Duration::from_secs(1),
        min_requests: 50,
        max_error_rate: Some(0.05),
        max_p99_latency: Some(Duration::from_millis(500)),
        max_error_rate_increase: Some(0.02),
        max_p99_ratio: Some(1.5),
        breaches_to_act: 2,
        ..SloConfig::default()
    }
}

/// A tighter SLO, as a careful operator might write it.
fn tight_slo() -> SloConfig {
    SloConfig {
        max_error_rate: Some(0.02),
        max_p99_latency: Some(Duration::from_millis(200)),
        max_error_rate_increase: Some(0.01),
        max_p99_ratio: Some(1.2),
        ..example_slo()
    }
}

/// How one pool behaves at simulated time `t` (seconds).
#[derive(Clone, Copy, Debug)]
struct Behaviour {
    /// Background error probability.
    errors: f64,
    /// Error probability during a burst, and the chance per second that one starts
    /// (bursts last one second, on each pool's own schedule).
    burst: Option<(f64, f64)>,
    /// Median latency (ms) of a log-normal with sigma 0.3 (jitter).
    median_ms: f64,
    /// Share of requests that take `slow_ms` instead (a heavy tail).
    slow: f64,
    slow_ms: f64,
}

impl Behaviour {
    fn healthy() -> Behaviour {
        Behaviour {
            errors: 0.0,
            burst: None,
            median_ms: 20.0,
            slow: 0.0,
            slow_ms: 300.0,
        }
    }
    fn errors(self, p: f64) -> Behaviour {
        Behaviour { errors: p, ..self }
    }
}

/// A pool in the simulation: its window and its burst state.
struct SimPool {
    window: Window,
    rate: f64,
    burst_until: f64,
    carry: f64,
}

impl SimPool {
    fn new(slo: &SloConfig, rate: f64) -> SimPool {
        SimPool {
            window: Window::new(slo.window, slo.interval),
            rate,
            burst_until: -1.0,
            carry: 0.0,
        }
    }

    /// One step of traffic at time `t` (s).
    fn serve(&mut self, b: &Behaviour, t: f64, rng: &mut SmallRng) {
        let step = STEP.as_secs_f64();
        if let Some((_, per_second)) = b.burst
            && t >= self.burst_until
            && rng.random_bool((per_second * step).min(1.0))
        {
            self.burst_until = t + 1.0;
        }
        let p = match b.burst {
            Some((burst_p, _)) if t < self.burst_until => burst_p,
            _ => b.errors,
        };
        self.carry += self.rate * step;
        let n = self.carry.floor();
        self.carry -= n;
        for _ in 0..n as u64 {
            let latency_ms = if b.slow > 0.0 && rng.random_bool(b.slow) {
                b.slow_ms
            } else {
                b.median_ms * (0.3 * normal(rng)).exp()
            };
            self.window.record(
                p > 0.0 && rng.random_bool(p),
                Duration::from_secs_f64(latency_ms / 1e3),
            );
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// What one simulated run came to.
#[derive(Debug, Default)]
struct Run {
    /// Seconds (from the start) at which the guard would have reverted.
    reverts: Vec<f64>,
    /// Each revert's decision, in words.
    why: Vec<String>,
}

/// Run `secs` of simulated traffic: the baseline behaves as `baseline(t)`, the canary
/// as `canary(t)`; the guard's loop (rotate, judge every interval, act after
/// `breaches_to_act` consecutive breaches, reset both windows after a revert) as in
/// `weir::Guard`, with the pure parts being the real ones.
fn simulate(
    slo: &SloConfig,
    secs: f64,
    seed: u64,
    rates: (f64, f64),
    baseline: impl Fn(f64) -> Behaviour,
    canary: impl Fn(f64) -> Behaviour,
    stop_at_first_revert: bool,
) -> Run {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut b = SimPool::new(slo, rates.0);
    let mut c = SimPool::new(slo, rates.1);
    let t0 = Instant::now();
    b.window.rotate(t0);
    c.window.rotate(t0);
    let steps_per_eval = (slo.interval.as_nanos() / STEP.as_nanos()) as u64;
    let mut streak = 0;
    let mut started = false;
    let mut run = Run::default();
    let warm_up = WARM_UP.as_secs_f64();
    let steps = ((secs + warm_up) / STEP.as_secs_f64()) as u64;
    for k in 1..=steps {
        let t = (k - 1) as f64 * STEP.as_secs_f64();
        if t >= warm_up && !started {
            // The canary gets its weight: a new exposure for both pools.
            started = true;
            b.window.restart_exposure();
            c.window.restart_exposure();
        }
        b.serve(&baseline(t), t, &mut rng);
        if t >= warm_up {
            c.serve(&canary(t - warm_up), t - warm_up, &mut rng);
        }
        if k % steps_per_eval != 0 {
            continue;
        }
        let now = t0 + STEP * k as u32;
        b.window.rotate(now);
        c.window.rotate(now);
        if t < warm_up {
            // The baseline serves alone first, as stable does before a rollout: its
            // history (and bursts) exist when the canary starts.
            continue;
        }
        let b_fast = recent(&b.window, slo.fast_window);
        let c_fast = recent(&c.window, slo.fast_window);
        let b_slices = recent_slices(&b.window);
        let (b_exp, c_exp) = (b.window.exposure(), c.window.exposure());
        let j = judge(
            slo,
            Evidence {
                name: "canary",
                fast: &c_fast,
                exposure: &c_exp,
                slices: &[],
                dispersion: 1.0,
            },
            Evidence {
                name: "stable",
                fast: &b_fast,
                exposure: &b_exp,
                slices: &b_slices,
                dispersion: dispersion(&b.window),
            },
        );
        if j.verdict == Verdict::Breach {
            streak += 1;
        } else {
            streak = 0;
        }
        if streak >= slo.breaches_to_act {
            run.reverts.push(k as f64 * STEP.as_secs_f64() - warm_up);
            run.why.push(j.summary.clone());
            if stop_at_first_revert {
                return run;
            }
            streak = 0;
            b.window.reset();
            c.window.reset();
        }
    }
    run
}

fn env(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Equal behaviour on both pools, in every way the issue names: no revert, ever.
#[test]
fn healthy_canaries_are_never_reverted() {
    let hours = env("WEIR_SIM_HOURS", 0.05);
    let secs = hours * 3600.0;
    let jitter = Behaviour::healthy();
    let heavy_tail = Behaviour {
        slow: 0.005,
        ..jitter
    };
    let bursts = |p: f64| Behaviour {
        burst: Some((p, 1.0 / 30.0)),
        ..jitter.errors(0.005)
    };
    let scenarios: Vec<(&str, Behaviour)> = vec![
        ("latency jitter", jitter),
        ("heavy tail (0.5% at 300 ms)", heavy_tail),
        ("1% errors on both", jitter.errors(0.01)),
        ("5% errors on both", jitter.errors(0.05)),
        ("independent 1 s bursts of 25% errors", bursts(0.25)),
        ("independent 1 s bursts of 60% errors", bursts(0.6)),
        ("shared failure: both 30%", jitter.errors(0.3)),
    ];
    let mut total = 0;
    for (slo_name, slo) in [("example", example_slo()), ("tight", tight_slo())] {
        for (i, (name, behaviour)) in scenarios.iter().enumerate() {
            let run = simulate(
                &slo,
                secs,
                1000 + i as u64,
                (BASELINE_RATE, CANARY_RATE),
                |_| *behaviour,
                |_| *behaviour,
                false,
            );
            eprintln!(
                "healthy [{slo_name} SLO] {name}: {} reverts in {hours} simulated hours{}",
                run.reverts.len(),
                run.why
                    .iter()
                    .map(|w| format!("\n  {w}"))
                    .collect::<String>()
            );
            total += run.reverts.len();
        }
        // Only the stable pool failing: rolling back would move everyone onto it.
        let run = simulate(
            &slo,
            secs,
            77,
            (BASELINE_RATE, CANARY_RATE),
            |_| jitter.errors(0.3),
            |_| jitter.errors(0.005),
            false,
        );
        eprintln!(
            "healthy [{slo_name} SLO] stable-only failure (30%): {} reverts in {hours} simulated hours",
            run.reverts.len()
        );
        total += run.reverts.len();
    }
    assert_eq!(total, 0, "healthy canaries were reverted");
}

/// Time from the break to the revert, over several trials: (median, worst, median
/// failed requests).
fn detection(
    slo: &SloConfig,
    trials: u64,
    rates: (f64, f64),
    before: Behaviour,
    after: Behaviour,
    limit_secs: f64,
) -> Option<(f64, f64, usize)> {
    let mut delays = Vec::new();
    for seed in 0..trials {
        // Break after a warm-up, at a point inside an evaluation interval.
        let change = 30.0 + (seed % 10) as f64 * 0.1;
        let run = simulate(
            slo,
            change + limit_secs,
            seed,
            rates,
            |_| before,
            |t| if t >= change { after } else { before },
            true,
        );
        delays.push(run.reverts.first().map(|r| r - change)?);
    }
    delays.sort_by(f64::total_cmp);
    Some((
        delays[delays.len() / 2],
        delays[delays.len() - 1],
        delays.len(),
    ))
}

#[test]
fn broken_canaries_are_reverted_fast() {
    let trials = env("WEIR_SIM_TRIALS", 3.0) as u64;
    let slo = example_slo();
    let healthy = Behaviour::healthy().errors(0.001);
    // Bounds on the median in simulated seconds (deterministic for a seed). The issue's
    // goals are 3 s at 10% and 2 s at 30-40%; the fast window's strict one-look level
    // (which keeps healthy canaries from ever being reverted) costs the 10% case.
    for (p, bound) in [(0.1, 6.0), (0.3, 3.0), (0.4, 3.0)] {
        let (median, worst, n) = detection(
            &slo,
            trials,
            (BASELINE_RATE, CANARY_RATE),
            healthy,
            healthy.errors(p),
            30.0,
        )
        .unwrap_or_else(|| panic!("{p} errors never reverted"));
        eprintln!(
            "sudden {:.0}% canary errors: reverted after {median:.1} s median, {worst:.1} s worst ({n} trials)",
            p * 100.0
        );
        // Counts, not time on a shared machine: simulated seconds are deterministic.
        assert!(median <= bound, "{p}: median {median}");
    }
}

#[test]
fn a_thin_canary_failing_everything_is_reverted_within_thirty_seconds() {
    let slo = example_slo();
    let healthy = Behaviour::healthy();
    // 1 req/s on the canary.
    let (median, worst, _) = detection(
        &slo,
        3,
        (BASELINE_RATE, 1.0),
        healthy,
        healthy.errors(1.0),
        60.0,
    )
    .expect("a 1 req/s canary failing 100% was never reverted");
    eprintln!(
        "1 req/s canary failing 100%: reverted after {median:.1} s median, {worst:.1} s worst"
    );
    assert!(worst <= 30.0);
    // And a healthy thin canary is never reverted.
    let run = simulate(
        &slo,
        600.0,
        5,
        (BASELINE_RATE, 1.0),
        |_| healthy.errors(0.01),
        |_| healthy.errors(0.01),
        false,
    );
    assert!(run.reverts.is_empty());
}

#[test]
fn subtle_regressions_are_found_by_the_sequential_tests() {
    let trials = env("WEIR_SIM_TRIALS", 3.0) as u64;
    let healthy = Behaviour::healthy().errors(0.01);
    let cases: Vec<(&str, SloConfig, Behaviour)> = vec![
        (
            "1% -> 3% errors (tight SLO, margin +1%)",
            tight_slo(),
            healthy.errors(0.03),
        ),
        (
            "+50 ms latency (example SLO, p99 ratio 1.5)",
            example_slo(),
            Behaviour {
                median_ms: 70.0,
                ..healthy
            },
        ),
        (
            "+200 ms latency (example SLO)",
            example_slo(),
            Behaviour {
                median_ms: 220.0,
                ..healthy
            },
        ),
    ];
    for (name, slo, after) in cases {
        let found = detection(
            &slo,
            trials,
            (BASELINE_RATE, CANARY_RATE),
            healthy,
            after,
            600.0,
        );
        match found {
            Some((median, worst, n)) => eprintln!(
                "{name}: reverted after {median:.1} s median, {worst:.1} s worst ({n} trials)"
            ),
            None => panic!("{name}: not detected within 10 simulated minutes"),
        }
    }
}
