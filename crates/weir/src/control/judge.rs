//! The guard's judgement of one candidate against the SLO and its baseline: pure code,
//! figures in, a [`Judgement`] out (no clock, no I/O), so it is tested on simulated
//! streams with known truth.
//!
//! Two kinds of evidence, for two kinds of failure:
//!
//! - **The exposure** — everything both pools served since the candidate's weight last
//!   changed (a rollout step began, an operator set weights, a rollback). Every check is
//!   a sequential, anytime-valid test on it (confidence sequences, [`crate::control::stats`]): the
//!   guard looks every `interval` for the whole rollout, and the chance that it ever
//!   blames a candidate that is not worse stays below the service's `alpha`. Evidence
//!   accumulates as long as the candidate serves, so a canary at 1 request a second still
//!   reaches a verdict, and "no worse than the baseline by more than the margin" can be
//!   *concluded* (that is what [`Verdict::Pass`] means, and what evidence gates wait for).
//! - **The fast window** — the last few seconds, judged over each span from the last
//!   interval up to `fast_window`. A version that breaks loudly in the middle of a long,
//!   healthy exposure is caught there in seconds: an absolute limit (error rate, p99)
//!   broken with 99.99% one-look confidence. It is not anytime-valid, so it holds itself
//!   back where noise could fool it: never when the baseline is as bad right now, nor
//!   when the candidate's failing slices are a run that the baseline's own rate of
//!   failing slices makes likely (GC pauses and flapping dependencies hit both
//!   versions, each on its own schedule).
//!
//! Errors that come in clumps carry less evidence than independent ones: both pools'
//! counts are divided by the baseline's dispersion (how much more its per-slice error
//! counts vary than independent requests would) before the sequential tests.
//!
//! Blame: a rollback moves traffic to the baseline, so it must help. When the baseline is
//! failing too and the candidate is not surely worse, or the baseline is surely worse
//! than the candidate, there is no rollback: the verdict is inconclusive with
//! `baseline_unhealthy`, for as long as that lasts.
//!
//! How `alpha` is spent: the error checks share one confidence sequence per pool, and the
//! latency checks another; each family gets half of `alpha` (all of it when only one is
//! configured), split evenly between the two pools. So the chance of any false verdict
//! from the exposure, over its whole life, is at most `alpha`.

use crate::model::Check;
use std::time::Duration;

use serde::Serialize;

use crate::config::SloConfig;
use crate::control::stats::{self, QuantileBounds, RateBounds};
use crate::telemetry::window::{Stats, Window};

/// A baseline whose error rate is surely above this is unhealthy, when the SLO sets no
/// `max_error_rate` of its own.
const UNHEALTHY_ERROR_RATE: f64 = 0.05;
/// Latency ratios only count when the candidate's p99 is at least this much slower:
/// a 1 ms → 2 ms p99 is a ratio of 2 but no regression anyone feels.
const MIN_P99_DIFFERENCE: Duration = Duration::from_millis(5);
/// One-look level of the fast window's loud-failure checks: strict, because they look
/// at several spans every interval for as long as the candidate runs.
const FAST_ALPHA: f64 = 1e-4;
/// A run of failing slices on the candidate at least this likely under the baseline's
/// own rate of failing slices is a burst both versions live with, not a failure.
const BURST_LIKELIHOOD: f64 = 1e-5;
/// The quantile the latency checks judge.
const P99: f64 = 0.99;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Concluded: within every limit, and no worse than the baseline by more than the
    /// margins, with confidence over the exposure.
    Pass,
    /// A limit broken (with confidence): the guard counts it towards `breaches_to_act`.
    Breach,
    /// Not enough evidence either way yet, or a failure that is not the candidate's
    /// fault (`baseline_unhealthy`).
    Inconclusive,
}

/// Which evidence a verdict rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The sequential tests over the exposure.
    Exposure,
    /// A loud failure over the fast window.
    FastWindow,
}

/// One pool's figures over one span, as decisions and the API show them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub pool: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

impl Figures {
    pub fn of(pool: &str, s: &Stats) -> Figures {
        Figures {
            pool: pool.to_owned(),
            requests: s.requests,
            errors: s.errors,
            error_rate: s.error_rate(),
            p50_ms: s.p50().map(round_ms),
            p99_ms: s.p99().map(round_ms),
        }
    }
}

/// A pool's confidence bounds over the exposure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bounds {
    /// The error rate lies in [lower, upper].
    pub error_rate: [f64; 2],
    /// The p99 lies above the first and at or below the second (ms); `None` where the
    /// evidence does not bound it yet.
    pub p99_ms: [Option<f64>; 2],
}

/// The outcome of judging one candidate once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// The candidate's figure the check judged (rate, seconds or ratio), and the
    /// threshold it was judged against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// For a breach: the confident bound that crossed the threshold (the candidate's
    /// lower bound, or its lower bound minus the baseline's upper bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound: Option<f64>,
    pub basis: Basis,
    /// The span the figures below cover, in seconds (the exposure, or the fast window
    /// for a loud failure).
    pub window_secs: f64,
    /// How long the exposure has run, in seconds.
    pub exposure_secs: f64,
    /// The false-verdict probability the exposure's tests hold over their whole life.
    pub alpha: f64,
    pub candidate: Figures,
    pub baseline: Figures,
    pub candidate_bounds: Bounds,
    pub baseline_bounds: Bounds,
    pub baseline_unhealthy: bool,
    /// When inconclusive: what more evidence would settle it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs: Option<String>,
    /// The verdict in words, e.g. "canary error rate 12.4% > 5% over 312 requests;
    /// stable 0.3% over 2,840".
    pub summary: String,
}

/// What the guard knows about one pool when it judges.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    pub name: &'a str,
    /// The most recent traffic over growing spans, shortest first: the last interval,
    /// the last two, … up to the whole `fast_window`. A failure that started a moment
    /// ago shows loudest in the shortest span that holds all of it.
    pub fast: &'a [Stats],
    /// Since the exposure began.
    pub exposure: &'a Stats,
    /// For the baseline: its per-slice (requests, errors) over the last few minutes.
    /// How often its own slices fail loudly is what a burst on the candidate is
    /// measured against. Empty for the candidate.
    pub slices: &'a [(u64, u64)],
    /// For the baseline: how much more its errors vary from slice to slice than
    /// independent requests would (1 = not at all; see [`dispersion`]). Both pools'
    /// counts are divided by it before the sequential tests, so errors that come in
    /// clumps count as the fewer independent events they are. Ignored for the candidate.
    pub dispersion: f64,
}

/// The levels the exposure's confidence sequences are computed at (per pool).
#[derive(Debug, Clone, Copy)]
struct Levels {
    errors: f64,
    latency: f64,
}

fn levels(slo: &SloConfig) -> Levels {
    let errors = slo.max_error_rate.is_some() || slo.max_error_rate_increase.is_some();
    let latency = slo.max_p99_latency.is_some() || slo.max_p99_ratio.is_some();
    let families = f64::from(u8::from(errors) + u8::from(latency)).max(1.0);
    // Each family's share of alpha, split between the two pools.
    let per_pool = slo.alpha / families / 2.0;
    Levels {
        errors: per_pool,
        latency: per_pool,
    }
}

/// One pool's confidence sequences over the exposure.
#[derive(Debug, Clone, Copy)]
struct Sequence {
    rate: RateBounds,
    p99: QuantileBounds,
}

fn sequence(s: &Stats, levels: Levels, dispersion: f64) -> Sequence {
    // Clumped errors carry less evidence than independent ones: count them as the
    // effective number of independent requests (the quasi-binomial correction).
    let phi = dispersion.max(1.0);
    let scale = |n: u64| (n as f64 / phi).round() as u64;
    Sequence {
        rate: stats::rate_cs(scale(s.errors), scale(s.requests), levels.errors),
        p99: stats::quantile_cs(s.latency(), P99, levels.latency),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn bounds(seq: &Sequence) -> Bounds {
    let ms = |v: Option<u64>| v.map(|us| (us as f64 / 10.0).round() / 100.0);
    Bounds {
        error_rate: [seq.rate.lower, seq.rate.upper],
        p99_ms: [ms(seq.p99.lower_us), ms(seq.p99.upper_us)],
    }
}

/// A breach found, before it is put in words.
struct Found {
    check: Check,
    value: f64,
    threshold: f64,
    bound: f64,
    basis: Basis,
    /// For a fast-window breach: which of the spans.
    span: usize,
}

/// Judge a candidate against the SLO and the baseline.
pub fn judge(slo: &SloConfig, c: Evidence<'_>, b: Evidence<'_>) -> Judgement {
    let levels = levels(slo);
    let cs = sequence(c.exposure, levels, b.dispersion);
    let bs = sequence(b.exposure, levels, b.dispersion);
    let baseline_seen = b.exposure.requests > 0;
    let unhealthy_limit = slo.max_error_rate.unwrap_or(UNHEALTHY_ERROR_RATE);

    // Blame over the exposure. The candidate is surely worse only when its lower bound
    // clears the baseline's upper bound; the baseline is surely failing when its lower
    // bound clears the unhealthy limit, and surely worse than the candidate when its
    // lower bound clears the candidate's upper bound.
    let c_surely_worse = baseline_seen && cs.rate.lower > bs.rate.upper;
    let b_failing = baseline_seen && bs.rate.lower > unhealthy_limit;
    let b_surely_worse = baseline_seen && bs.rate.lower > cs.rate.upper;
    let rollback_cannot_help = (b_failing && !c_surely_worse) || b_surely_worse;

    let mut found = None;
    // Raised for as long as the baseline fails and the candidate is not surely worse:
    // the operator must hear of it, and nothing is rolled back onto it.
    let mut unhealthy = b_failing && !c_surely_worse;

    // Sequential checks over the exposure.
    if let Some(limit) = slo.max_error_rate
        && cs.rate.lower > limit
        && !rollback_cannot_help
    {
        found = Some(Found {
            check: Check::ErrorRate,
            value: c.exposure.error_rate(),
            threshold: limit,
            bound: cs.rate.lower,
            basis: Basis::Exposure,
            span: 0,
        });
    }
    if found.is_none()
        && let Some(delta) = slo.max_error_rate_increase
        && baseline_seen
        && cs.rate.lower - bs.rate.upper > delta
    {
        found = Some(Found {
            check: Check::ErrorRateIncrease,
            value: c.exposure.error_rate() - b.exposure.error_rate(),
            threshold: delta,
            bound: cs.rate.lower - bs.rate.upper,
            basis: Basis::Exposure,
            span: 0,
        });
    }
    if found.is_none()
        && let (Some(limit), Some(lower)) = (slo.max_p99_latency, cs.p99.lower_us)
        && lower as f64 > us(limit)
    {
        // A baseline at least as slow: rolling back does not make anyone faster.
        let baseline_as_slow = baseline_seen
            && bs.p99.lower_us.is_some_and(|b| b as f64 > us(limit))
            && bs.p99.upper_us.is_none_or(|b| lower <= b);
        if baseline_as_slow {
            unhealthy = true;
        } else {
            found = Some(Found {
                check: Check::P99Latency,
                value: c.exposure.p99().map_or(0.0, |d| d.as_secs_f64()),
                threshold: limit.as_secs_f64(),
                bound: lower as f64 / 1e6,
                basis: Basis::Exposure,
                span: 0,
            });
        }
    }
    if found.is_none()
        && let (Some(ratio), Some(c_lower), Some(b_upper)) =
            (slo.max_p99_ratio, cs.p99.lower_us, bs.p99.upper_us)
        && c_lower as f64 > ratio * b_upper as f64
        && c_lower.saturating_sub(b_upper) as f64 >= us(MIN_P99_DIFFERENCE)
    {
        let point = match (c.exposure.p99(), b.exposure.p99()) {
            (Some(cp), Some(bp)) => cp.as_secs_f64() / bp.as_secs_f64().max(1e-6),
            _ => 0.0,
        };
        found = Some(Found {
            check: Check::P99Ratio,
            value: point,
            threshold: ratio,
            bound: c_lower as f64 / (b_upper as f64).max(1.0),
            basis: Basis::Exposure,
            span: 0,
        });
    }

    // Loud failures over the fast window.
    if found.is_none() {
        found = fast_breach(slo, &c, &b, &mut unhealthy, rollback_cannot_help);
    }

    let mut j = Judgement {
        verdict: Verdict::Inconclusive,
        check: None,
        value: None,
        threshold: None,
        bound: None,
        basis: Basis::Exposure,
        window_secs: c.exposure.span.as_secs_f64(),
        exposure_secs: c.exposure.span.as_secs_f64(),
        alpha: slo.alpha,
        candidate: Figures::of(c.name, c.exposure),
        baseline: Figures::of(b.name, b.exposure),
        candidate_bounds: bounds(&cs),
        baseline_bounds: bounds(&bs),
        baseline_unhealthy: unhealthy,
        needs: None,
        summary: String::new(),
    };
    if let Some(f) = found {
        j.verdict = Verdict::Breach;
        j.check = Some(f.check);
        j.value = Some(f.value);
        j.threshold = Some(f.threshold);
        j.bound = Some(f.bound);
        j.basis = f.basis;
        if let (Basis::FastWindow, Some(cf), Some(bf)) =
            (f.basis, c.fast.get(f.span), b.fast.get(f.span))
        {
            j.window_secs = cf.span.as_secs_f64();
            j.candidate = Figures::of(c.name, cf);
            j.baseline = Figures::of(b.name, bf);
        }
        j.summary = breach_words(&j, f.check);
        return j;
    }
    if unhealthy {
        j.summary = format!(
            "{} is failing too ({} errors over {} requests), {} {} over {}: \
             not {}'s fault, not rolling back",
            b.name,
            pct(b.exposure.error_rate()),
            thousands(b.exposure.requests),
            c.name,
            pct(c.exposure.error_rate()),
            thousands(c.exposure.requests),
            c.name,
        );
        return j;
    }
    match missing(
        slo,
        c.exposure,
        &cs,
        &bs,
        baseline_seen,
        levels,
        b.dispersion,
    ) {
        None => {
            j.verdict = Verdict::Pass;
            j.summary = pass_words(slo, &j);
        }
        Some(needs) => {
            j.summary = format!(
                "{}: not settled yet over {} requests in {}: {}",
                c.name,
                thousands(c.exposure.requests),
                secs(c.exposure.span),
                needs
            );
            j.needs = Some(needs);
        }
    }
    j
}

/// The fast window's loud-failure checks (absolute limits, one-look bounds) over each
/// recent span with at least `min_requests`. Held back when the baseline is as bad over
/// the same span now, and when the candidate's failing slices in the span are a run the
/// baseline's own rate of failing slices makes likely (independent bursts, as GC pauses
/// and flapping dependencies cause on every version).
fn fast_breach(
    slo: &SloConfig,
    c: &Evidence<'_>,
    b: &Evidence<'_>,
    unhealthy: &mut bool,
    rollback_cannot_help: bool,
) -> Option<Found> {
    for (i, cf) in c.fast.iter().enumerate() {
        if cf.requests < slo.min_requests {
            continue;
        }
        let bf = b.fast.get(i);
        let b_requests = bf.map_or(0, |s| s.requests);
        if let Some(limit) = slo.max_error_rate {
            let cw = stats::wilson(cf.errors, cf.requests, FAST_ALPHA);
            if cw.lower > limit {
                let bw = bf.map(|s| stats::wilson(s.errors, s.requests, FAST_ALPHA));
                let baseline_as_bad_now = b_requests > 0 && bw.is_some_and(|w| w.upper >= cw.lower);
                if rollback_cannot_help || baseline_as_bad_now {
                    *unhealthy = *unhealthy || bw.is_some_and(|w| w.lower > limit);
                } else if !burst_like(c.fast, i, b.slices, limit) {
                    return Some(Found {
                        check: Check::ErrorRate,
                        value: cf.error_rate(),
                        threshold: limit,
                        bound: cw.lower,
                        basis: Basis::FastWindow,
                        span: i,
                    });
                }
            }
        }
        // Far worse than the baseline over the same span: a loud relative failure.
        if let (Some(delta), Some(bf)) = (slo.max_error_rate_increase, bf)
            && b_requests > 0
            && !rollback_cannot_help
        {
            let cw = stats::wilson(cf.errors, cf.requests, FAST_ALPHA);
            let bw = stats::wilson(bf.errors, bf.requests, FAST_ALPHA);
            if cw.lower - bw.upper > delta
                && !burst_like(c.fast, i, b.slices, bf.error_rate() + delta)
            {
                return Some(Found {
                    check: Check::ErrorRateIncrease,
                    value: cf.error_rate() - bf.error_rate(),
                    threshold: delta,
                    bound: cw.lower - bw.upper,
                    basis: Basis::FastWindow,
                    span: i,
                });
            }
        }
        if let Some(limit) = slo.max_p99_latency {
            let cq = stats::quantile_fixed(cf.latency(), P99, FAST_ALPHA);
            if let Some(lower) = cq.lower_us
                && lower as f64 > us(limit)
            {
                // The baseline's p99 over the same span may be as slow: not the
                // candidate's doing.
                let baseline_as_slow = b_requests > 0
                    && bf.is_some_and(|s| {
                        stats::quantile_fixed(s.latency(), P99, FAST_ALPHA)
                            .upper_us
                            .is_none_or(|u| u >= lower)
                    });
                if !baseline_as_slow {
                    return Some(Found {
                        check: Check::P99Latency,
                        value: cf.p99().map_or(0.0, |d| d.as_secs_f64()),
                        threshold: limit.as_secs_f64(),
                        bound: lower as f64 / 1e6,
                        basis: Basis::FastWindow,
                        span: i,
                    });
                }
            }
        }
    }
    None
}

/// A slice fails loudly when its error rate is above `limit` with one-look confidence.
fn failing(requests: u64, errors: u64, limit: f64) -> bool {
    requests > 0 && stats::wilson(errors, requests, FAST_ALPHA).lower > limit
}

/// Whether the candidate's failing slices among the newest `span + 1` are a run the
/// baseline's own rate of failing slices makes likely.
fn burst_like(fast: &[Stats], span: usize, baseline: &[(u64, u64)], limit: f64) -> bool {
    let seen = baseline.iter().filter(|(r, _)| *r > 0).count();
    if seen == 0 {
        return false;
    }
    let rate = baseline
        .iter()
        .filter(|(r, e)| failing(*r, *e, limit))
        .count() as f64
        / seen as f64;
    if rate == 0.0 {
        return false;
    }
    // The suffix spans differ by one slice each: their differences are the slices.
    let k = span + 1;
    let m = (0..k)
        .filter(|&j| {
            let (r, e) = match j {
                0 => (fast[0].requests, fast[0].errors),
                // Saturating: the spans are read while requests are still recorded.
                _ => (
                    fast[j].requests.saturating_sub(fast[j - 1].requests),
                    fast[j].errors.saturating_sub(fast[j - 1].errors),
                ),
            };
            failing(r, e, limit)
        })
        .count();
    binomial_tail(k, rate, m) >= BURST_LIKELIHOOD
}

/// P(X ≥ m) for X ~ Binomial(k, p), k small.
fn binomial_tail(k: usize, p: f64, m: usize) -> f64 {
    let mut total = 0.0;
    let mut choose = 1.0; // C(k, x), built up from C(k, 0)
    for x in 0..=k {
        if x > 0 {
            choose = choose * (k - x + 1) as f64 / x as f64;
        }
        if x >= m {
            total += choose * p.powi(x as i32) * (1.0 - p).powi((k - x) as i32);
        }
    }
    total
}

/// What is still missing to conclude "within limits and no worse than the baseline by
/// more than the margins" over the exposure; `None` when concluded.
fn missing(
    slo: &SloConfig,
    c: &Stats,
    cs: &Sequence,
    bs: &Sequence,
    baseline_seen: bool,
    levels: Levels,
    dispersion: f64,
) -> Option<String> {
    let mut gaps: Vec<String> = Vec::new();
    let error_ok = |rate: RateBounds| {
        slo.max_error_rate.is_none_or(|l| rate.upper <= l)
            && slo
                .max_error_rate_increase
                .is_none_or(|d| !baseline_seen || rate.upper - bs.rate.lower <= d)
    };
    if !error_ok(cs.rate) {
        // At the candidate's current rate, how many requests would settle it.
        let p = c.error_rate();
        let more = (1..=24)
            .map(|k| c.requests.max(10) << k)
            .find(|&n| {
                let effective = (n as f64 / dispersion.max(1.0)).round() as u64;
                error_ok(stats::rate_cs(
                    (p * effective as f64).round() as u64,
                    effective,
                    levels.errors,
                ))
            })
            .map(|n| n.saturating_sub(c.requests));
        gaps.push(match more {
            Some(n) => format!(
                "error rate {} (at most {}), needs about {} more requests",
                pct(c.error_rate()),
                pct(cs.rate.upper),
                thousands(n)
            ),
            None => format!(
                "error rate {} is too close to the limit to settle",
                pct(c.error_rate())
            ),
        });
    }
    let latency_ok = match (slo.max_p99_latency, cs.p99.upper_us) {
        (None, _) => true,
        (Some(limit), Some(upper)) => upper as f64 <= us(limit),
        (Some(_), None) => false,
    } && match slo.max_p99_ratio {
        None => true,
        Some(_) if !baseline_seen => true,
        Some(ratio) => match (cs.p99.upper_us, bs.p99.lower_us) {
            (Some(cu), Some(bl)) => {
                cu as f64 <= ratio * bl as f64
                    || (cu.saturating_sub(bl) as f64) < us(MIN_P99_DIFFERENCE)
            }
            _ => false,
        },
    };
    if !latency_ok {
        gaps.push(match cs.p99.upper_us {
            None => "p99 not bounded yet (needs more requests)".to_owned(),
            Some(u) => format!(
                "p99 at most {:.0} ms, not yet within the limit",
                u as f64 / 1e3
            ),
        });
    }
    (!gaps.is_empty()).then(|| gaps.join("; "))
}

fn pct(r: f64) -> String {
    let p = r * 100.0;
    if p != 0.0 && p.abs() < 1.0 {
        format!("{p:.2}%")
    } else {
        format!("{p:.1}%")
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(d: Option<f64>) -> String {
    d.map_or_else(|| "-".into(), |v| format!("{v:.0} ms"))
}

fn secs(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 120 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.0}s", d.as_secs_f64())
    }
}

fn breach_words(j: &Judgement, check: Check) -> String {
    let (c, b) = (&j.candidate, &j.baseline);
    let value = j.value.unwrap_or(0.0);
    let threshold = j.threshold.unwrap_or(0.0);
    let baseline_figure = match check {
        Check::ErrorRate | Check::ErrorRateIncrease => pct(b.error_rate),
        Check::P99Latency | Check::P99Ratio => format!("p99 {}", ms(b.p99_ms)),
    };
    let tail = format!(
        "; {} {baseline_figure} over {}",
        b.pool,
        thousands(b.requests)
    );
    let head = match check {
        Check::ErrorRate => format!("{} error rate {} > {}", c.pool, pct(value), pct(threshold)),
        Check::ErrorRateIncrease => format!(
            "{} error rate {} is {} above {}'s (limit +{})",
            c.pool,
            pct(c.error_rate),
            pct(value),
            b.pool,
            pct(threshold)
        ),
        Check::P99Latency => format!(
            "{} p99 {:.0} ms > {:.0} ms",
            c.pool,
            value * 1000.0,
            threshold * 1000.0
        ),
        Check::P99Ratio => format!(
            "{} p99 {} is {value:.2}× {}'s (limit {threshold:.2}×)",
            c.pool,
            ms(c.p99_ms),
            b.pool
        ),
    };
    let how = match j.basis {
        Basis::FastWindow => format!("last {:.0}s, loud failure", j.window_secs),
        Basis::Exposure => format!(
            "sequential test over {}, α {}",
            secs(Duration::from_secs_f64(j.exposure_secs)),
            j.alpha
        ),
    };
    format!(
        "{head} over {} requests{tail} ({how})",
        thousands(c.requests)
    )
}

fn pass_words(slo: &SloConfig, j: &Judgement) -> String {
    let (c, b) = (&j.candidate, &j.baseline);
    let mut parts = vec![format!(
        "errors {} (at most {})",
        pct(c.error_rate),
        pct(j.candidate_bounds.error_rate[1])
    )];
    if slo.max_p99_latency.is_some() || slo.max_p99_ratio.is_some() {
        parts.push(format!(
            "p99 {} (at most {})",
            ms(c.p99_ms),
            ms(j.candidate_bounds.p99_ms[1])
        ));
    }
    format!(
        "{} within SLO and no worse than {} by more than the margins: {} over {} requests \
         in {}; {} {}, p99 {} (α {})",
        c.pool,
        b.pool,
        parts.join(", "),
        thousands(c.requests),
        secs(Duration::from_secs_f64(j.exposure_secs)),
        b.pool,
        pct(b.error_rate),
        ms(b.p99_ms),
        j.alpha
    )
}

/// How far back the baseline's slices are remembered, for its rate of bursts and its
/// dispersion.
pub const BURST_MEMORY: Duration = Duration::from_secs(300);

/// A pool's per-slice (requests, errors) over the last [`BURST_MEMORY`].
pub fn recent_slices(window: &Window) -> Vec<(u64, u64)> {
    window
        .series(BURST_MEMORY)
        .points
        .iter()
        .map(|p| (p.requests, p.errors))
        .collect()
}

/// How much more a pool's errors vary from slice to slice than independent requests
/// would: Pearson's χ² of the per-slice error counts over the last [`BURST_MEMORY`],
/// divided by its degrees of freedom (1 for independent errors; far more when errors
/// come in bursts). At least 1.
pub fn dispersion(window: &Window) -> f64 {
    let series = window.series(BURST_MEMORY);
    let points: Vec<_> = series.points.iter().filter(|p| p.requests > 0).collect();
    if points.len() < 2 {
        return 1.0;
    }
    let requests: u64 = points.iter().map(|p| p.requests).sum();
    let errors: u64 = points.iter().map(|p| p.errors).sum();
    let p = errors as f64 / requests as f64;
    if p <= 0.0 || p >= 1.0 {
        return 1.0;
    }
    let chi2: f64 = points
        .iter()
        .map(|pt| {
            let expected = pt.requests as f64 * p;
            (pt.errors as f64 - expected).powi(2) / (expected * (1.0 - p))
        })
        .sum();
    (chi2 / (points.len() - 1) as f64).max(1.0)
}

/// A pool's recent traffic over 1, 2, … slices up to `fast_window` (what
/// [`Evidence::fast`] holds).
pub fn recent(window: &Window, fast_window: Duration) -> Vec<Stats> {
    let step = window.slice_len();
    let n = (fast_window.as_nanos() / step.as_nanos().max(1)).max(1) as u32;
    (1..=n).map(|k| window.stats(step * k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::window::Window;

    /// Figures of `requests` requests, the first `errors` failed, all at `latency_ms`.
    fn stats(requests: u64, errors: u64, latency_ms: u64) -> Stats {
        let w = Window::new(Duration::from_secs(30), Duration::from_secs(1));
        for i in 0..requests {
            w.record(i < errors, Duration::from_millis(latency_ms));
        }
        w.stats(Duration::from_secs(30))
    }

    fn empty() -> Stats {
        stats(0, 0, 0)
    }

    fn slo() -> SloConfig {
        SloConfig {
            max_error_rate: Some(0.05),
            max_p99_latency: Some(Duration::from_millis(200)),
            max_error_rate_increase: Some(0.02),
            max_p99_ratio: Some(1.5),
            ..SloConfig::default()
        }
    }

    fn ev<'a>(name: &'a str, fast: &'a [Stats], exposure: &'a Stats) -> Evidence<'a> {
        Evidence {
            name,
            fast,
            exposure,
            slices: &[],
            dispersion: 1.0,
        }
    }

    /// Judged on the exposure only (an empty fast window).
    fn run(slo: &SloConfig, c: &Stats, b: &Stats) -> Judgement {
        let none = [empty()];
        judge(slo, ev("canary", &none, c), ev("stable", &none, b))
    }

    #[test]
    fn a_clear_error_breach_names_check_bound_and_figures() {
        let j = run(&slo(), &stats(312, 97, 1), &stats(2840, 8, 1));
        assert_eq!(j.verdict, Verdict::Breach);
        assert_eq!(j.check, Some(Check::ErrorRate));
        assert_eq!(j.basis, Basis::Exposure);
        assert_eq!(j.threshold, Some(0.05));
        assert!(j.bound.unwrap() > 0.05 && j.bound.unwrap() < 0.311);
        assert_eq!((j.candidate.requests, j.baseline.requests), (312, 2840));
        assert!(
            j.summary.starts_with(
                "canary error rate 31.1% > 5.0% over 312 requests; stable 0.28% over 2,840 (sequential test"
            ),
            "{}",
            j.summary
        );
        assert!(j.candidate_bounds.error_rate[0] <= 0.311);
    }

    #[test]
    fn thin_evidence_of_total_failure_is_enough() {
        // Four requests, all failed: the sequential bound alone convicts, no
        // `min_requests` needed.
        let j = run(&slo(), &stats(4, 4, 1), &stats(2000, 2, 1));
        assert_eq!(j.verdict, Verdict::Breach, "{}", j.summary);
        // One failed request is not.
        let j = run(&slo(), &stats(1, 1, 1), &stats(2000, 2, 1));
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.summary);
        assert!(j.needs.is_some());
    }

    #[test]
    fn latency_breaches_on_bounds_not_point_estimates() {
        let j = run(&slo(), &stats(2000, 0, 350), &stats(5000, 0, 20));
        assert_eq!(
            (j.verdict, j.check),
            (Verdict::Breach, Some(Check::P99Latency)),
            "{}",
            j.summary
        );
        let relative_only = SloConfig {
            max_p99_ratio: Some(1.5),
            ..SloConfig::default()
        };
        let j = run(&relative_only, &stats(2000, 0, 90), &stats(5000, 0, 40));
        assert_eq!(
            (j.verdict, j.check),
            (Verdict::Breach, Some(Check::P99Ratio)),
            "{}",
            j.summary
        );
        // Sub-5 ms differences are noise, whatever the ratio.
        let j = run(&relative_only, &stats(5000, 0, 3), &stats(5000, 0, 1));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.summary);
    }

    #[test]
    fn a_small_increase_needs_a_lot_of_evidence() {
        let relative_only = SloConfig {
            max_error_rate_increase: Some(0.02),
            ..SloConfig::default()
        };
        // 6% vs 1% on 100 requests: +5 points, but not proven beyond +2.
        let j = run(&relative_only, &stats(100, 6, 1), &stats(1000, 10, 1));
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.summary);
        // The same rates on 10,000 requests are.
        let j = run(
            &relative_only,
            &stats(10_000, 600, 1),
            &stats(100_000, 1000, 1),
        );
        assert_eq!(
            (j.verdict, j.check),
            (Verdict::Breach, Some(Check::ErrorRateIncrease)),
            "{}",
            j.summary
        );
    }

    #[test]
    fn no_worse_than_the_baseline_can_be_concluded() {
        let j = run(&slo(), &stats(20_000, 200, 5), &stats(100_000, 1000, 5));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.summary);
        assert!(j.summary.contains("no worse than stable"), "{}", j.summary);
        // Too few requests to conclude: inconclusive, saying how many more it needs.
        let j = run(&slo(), &stats(200, 2, 5), &stats(100_000, 1000, 5));
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.summary);
        assert!(
            j.needs.as_deref().unwrap().contains("more requests"),
            "{:?}",
            j.needs
        );
    }

    #[test]
    fn everything_failing_equally_is_not_the_candidates_fault() {
        let relative_only = SloConfig {
            max_error_rate_increase: Some(0.02),
            max_p99_ratio: Some(1.5),
            ..SloConfig::default()
        };
        let j = run(&relative_only, &stats(1000, 500, 1), &stats(9000, 4500, 1));
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(j.baseline_unhealthy);
        assert!(j.summary.contains("stable is failing too"), "{}", j.summary);
        // With absolute limits as well: still no rollback.
        let j = run(&slo(), &stats(1000, 500, 1), &stats(9000, 4500, 1));
        assert_eq!(j.verdict, Verdict::Inconclusive);
        // A candidate clearly worse than a failing baseline does breach.
        let j = run(&slo(), &stats(1000, 900, 1), &stats(9000, 900, 1));
        assert_eq!(j.verdict, Verdict::Breach);
        // Never a rollback onto a baseline failing worse than the candidate.
        let j = run(&slo(), &stats(1000, 100, 1), &stats(9000, 2700, 1));
        assert_ne!(j.verdict, Verdict::Breach, "{}", j.summary);
        assert!(j.baseline_unhealthy);
    }

    #[test]
    fn no_baseline_traffic_skips_relative_checks() {
        let j = run(&slo(), &stats(5000, 10, 1), &empty());
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.summary);
    }

    #[test]
    fn the_fast_window_catches_a_fresh_loud_breakage() {
        let s = slo();
        // A long exposure diluted by good history; the fast window all bad.
        let exposure = stats(30_000, 400, 1);
        let fast = [stats(150, 45, 1)];
        let b = stats(270_000, 300, 1);
        let b_fast = [stats(1350, 2, 1)];
        let j = judge(
            &s,
            ev("canary", &fast, &exposure),
            ev("stable", &b_fast, &b),
        );
        assert_eq!(
            (j.verdict, j.check, j.basis),
            (Verdict::Breach, Some(Check::ErrorRate), Basis::FastWindow),
            "{}",
            j.summary
        );
        // One failing slice where the baseline's own slices fail now and then (1 in
        // 50): a burst, held back.
        let mut bursty = ev("stable", &b_fast, &b);
        let slices: Vec<(u64, u64)> = (0..300)
            .map(|i| if i % 50 == 0 { (450, 200) } else { (450, 2) })
            .collect();
        bursty.slices = &slices;
        let j = judge(&s, ev("canary", &fast, &exposure), bursty);
        assert_ne!(j.verdict, Verdict::Breach, "{}", j.summary);
        // Three failing slices in a row are not a burst of that baseline (p = 1/50³).
        let three = [stats(50, 25, 1), stats(100, 50, 1), stats(150, 75, 1)];
        let j = judge(&s, ev("canary", &three, &exposure), bursty);
        assert_eq!(j.verdict, Verdict::Breach, "{}", j.summary);
        // The baseline as bad right now: held back too.
        let b_bad_now = [stats(1350, 400, 1)];
        let j = judge(
            &s,
            ev("canary", &fast, &exposure),
            ev("stable", &b_bad_now, &b),
        );
        assert_ne!(j.verdict, Verdict::Breach, "{}", j.summary);
    }

    #[test]
    fn alpha_is_split_between_families_and_pools() {
        let l = levels(&slo());
        assert!((l.errors - 0.0025).abs() < 1e-12);
        let errors_only = SloConfig {
            max_error_rate: Some(0.05),
            ..SloConfig::default()
        };
        assert!((levels(&errors_only).errors - 0.005).abs() < 1e-12);
    }
}
