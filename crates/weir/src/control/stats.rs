//! Statistics for the SLO guard: confidence bounds on a pool's error rate and on its latency
//! quantiles, from the counts and latency histogram that [`crate::telemetry::window`] keeps. Pure: no
//! I/O, no clock, no state.
//!
//! # What "anytime-valid" buys
//!
//! The guard does not look once. It looks every second for the whole rollout and acts the
//! first time a canary looks bad. An ordinary 99.5% confidence interval is right 99.5% of the
//! time *for one look, fixed in advance*. Looked at again and again, a perfectly healthy
//! canary's interval will sooner or later stray past the limit by luck alone (the more looks,
//! the surer), and a guard acting on it rolls back good releases: it cries wolf.
//!
//! A *confidence sequence* (CS) is a run of intervals, one per sample count, that are right
//! *all at once*: with probability at least 1 − alpha the true value lies inside every one of
//! them, for as long as the stream runs. So the guard may look every second, for as long as
//! it likes, and stop the first time a bound crosses the limit, and the chance that it ever
//! cries wolf on a healthy pool stays below alpha. The price is width: at a given count a CS
//! is wider than a one-look interval at the same level, by a factor that grows slowly with
//! the count (like √(log n)): at alpha = 0.005, 1.2–1.4× at 100 requests, 1.6× at 10^4,
//! 1.9× at 10^8. So it takes somewhat more requests to convict.
//!
//! The guarantee is about one growing stream of samples. Feed these functions counts that
//! only grow (since the canary started, or since the last reset), not a sliding window:
//! a window that forgets old requests is a new experiment at every look, and the "ever" in
//! the guarantee is lost.
//!
//! # Error rates: [`rate_cs`]
//!
//! Robbins' method of mixtures. For each candidate error rate p, a score M_n(p) compares how
//! well the errors seen so far are explained by "some rate, we don't know which" (a
//! Beta(½, ½) blend of all rates) against p itself. If p is the true rate, M_n(p) is a fair
//! bet: it starts at 1 and on average stays there, so by Ville's inequality it ever reaches
//! 1/alpha with probability at most alpha. The confidence sequence is every p not yet so
//! discredited, `{p : M_n(p) < 1/alpha}`; M is a closed formula (Beta functions), and the
//! ends are found by bisection.
//!
//! # Latency quantiles: [`quantile_cs`]
//!
//! Howard & Ramdas (2022): whether a request is at or below the true p99 is a coin that
//! comes up "yes" 99% of the time. So at any latency x, the number of requests at or below x
//! is a count of such coins, and [`rate_cs`] on it tells whether x is surely below the p99
//! (even allowing for luck, fewer than 99% of requests are at or below x) or surely at or
//! above it. The bounds are the highest bucket end surely below and the lowest bucket end
//! surely above. One CS covers every bucket end at once, because all the bucket claims are
//! consequences of the single coin at the true quantile.
//!
//! # One-look bounds: [`wilson`], [`quantile_fixed`]
//!
//! The classic fixed-sample Wilson score bounds, and the same quantile construction on
//! them. Narrower, but valid only for a single look: meant for loud failures judged over a
//! short window, where an occasional false alarm over many looks is an accepted cost of
//! reacting within seconds.

use histogram::Histogram32;

/// Parameters a = b of the Beta(½, ½) mixing prior (Jeffreys' prior). It puts more weight
/// near 0 and 1 than a flat prior, which is where error rates live: small rates are
/// convicted with fewer samples.
const PRIOR: f64 = 0.5;
/// ln B(½, ½) = ln π.
const LN_BETA_PRIOR: f64 = 1.144_729_885_849_400_2;
/// Bisection stops when the bracket is this small relative to the bound's distance from 0
/// or 1. Relative, not absolute, so bounds on rates of one in a million are as precise as
/// bounds near ½.
const REL_TOL: f64 = 1e-10;
/// Safety cap on bisection steps. Halving 200 times spans any f64 bound.
const MAX_STEPS: u32 = 200;

/// Natural log of the Beta function, via libm::lgamma.
///
/// For a, b of order 10^8 the three terms are ~10^9 and cancel, leaving an absolute error
/// of ~10^-6: harmless next to the ln(1/alpha) ≈ 5 it is compared with.
pub(crate) fn ln_beta(a: f64, b: f64) -> f64 {
    libm::lgamma(a) + libm::lgamma(b) - libm::lgamma(a + b)
}

/// Lower and upper confidence bounds on a rate, each in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateBounds {
    pub lower: f64,
    pub upper: f64,
}

impl RateBounds {
    /// No information: the rate may be anything.
    const ALL: RateBounds = RateBounds {
        lower: 0.0,
        upper: 1.0,
    };
}

/// The mixture score of one (successes, n) at one alpha, as a function of p.
struct Mixture {
    s: f64,
    f: f64,
    /// ln B(a + s, b + f) − ln B(a, b) − ln(1/alpha): the part that does not depend on p.
    k: f64,
}

impl Mixture {
    fn new(s: u64, n: u64, alpha: f64) -> Mixture {
        let (s, f) = (s as f64, (n - s) as f64);
        Mixture {
            s,
            f,
            k: ln_beta(PRIOR + s, PRIOR + f) - LN_BETA_PRIOR + alpha.ln(),
        }
    }

    /// ln M_n(p) − ln(1/alpha): p is excluded from the CS iff this is >= 0.
    fn excess(&self, p: f64) -> f64 {
        // The guards keep 0·ln(0) out: s = 0 at p = 0, or f = 0 at p = 1.
        let mut v = self.k;
        if self.s > 0.0 {
            v -= self.s * p.ln();
        }
        if self.f > 0.0 {
            v -= self.f * (-p).ln_1p();
        }
        v
    }

    /// The end of `{p : excess(p) < 0}` between `inside`, a point in the set, and
    /// `outside`, a point excluded (or 0 or 1, which may be neither).
    ///
    /// ln M is convex in p (−s·ln p and −f·ln(1−p) are), and at the observed rate s/n it is
    /// at most 0 (the blend never explains the data better than the best single rate), so
    /// on either side of s/n there is exactly one crossing. Bisection keeps `outside`
    /// excluded and returns it: the reported bound errs wide, never narrow. It stops when
    /// the bracket is within 1e-10 of the distance from the bound to the nearer of 0 and
    /// 1, so an upper bound of 1e-5 is as precise, relatively, as one of 0.5.
    fn crossing(&self, mut inside: f64, mut outside: f64) -> f64 {
        for _ in 0..MAX_STEPS {
            // The distance to 0 or 1 is smallest at an end of the bracket.
            let scale = inside.min(1.0 - inside).min(outside.min(1.0 - outside));
            if (outside - inside).abs() <= REL_TOL * scale {
                break;
            }
            let mid = 0.5 * (inside + outside);
            if mid == inside || mid == outside {
                break;
            }
            if self.excess(mid) >= 0.0 {
                outside = mid;
            } else {
                inside = mid;
            }
        }
        outside
    }
}

/// An anytime-valid two-sided confidence sequence for a Bernoulli mean (here: the error
/// rate, `successes` = errors): Robbins' beta-binomial mixture with a Beta(½, ½) prior,
/// `{p : M_n(p) < 1/alpha}` where
/// ln M_n(p) = ln B(a+s, b+n−s) − ln B(a, b) − s·ln p − (n−s)·ln(1−p), a = b = ½.
///
/// P(there is an n at which the true p is outside the bounds) <= alpha, so either end used
/// alone also holds at alpha. n = 0 gives [0, 1]. Each end is found by bisection (ln M is
/// convex in p) to within 1e-10 of its distance from 0 or 1 (so 1e-15 on a bound of 1e-5),
/// and rounded outwards.
///
/// `successes` above `n` count as `n`. alpha <= 0 (or NaN) gives [0, 1]; alpha >= 1 gives
/// the point s/n. Counts must be cumulative, not a sliding window (see the module docs).
/// Fine for n up to ~10^12; beyond, lgamma's absolute rounding (it grows like n·ln n)
/// starts to matter next to ln(1/alpha).
pub(crate) fn rate_cs(successes: u64, n: u64, alpha: f64) -> RateBounds {
    if n == 0 || alpha.is_nan() || alpha <= 0.0 {
        return RateBounds::ALL;
    }
    let s = successes.min(n);
    let rate = s as f64 / n as f64;
    if alpha >= 1.0 {
        return RateBounds {
            lower: rate,
            upper: rate,
        };
    }
    let m = Mixture::new(s, n, alpha);
    // Without a success p = 0 itself is not excluded (M_n(0) < 1), nor p = 1 without a
    // failure.
    RateBounds {
        lower: if s == 0 { 0.0 } else { m.crossing(rate, 0.0) },
        upper: if s == n { 1.0 } else { m.crossing(rate, 1.0) },
    }
}

/// Fixed-sample (not anytime) Wilson score bounds at one-sided level alpha, for loud
/// failures over short windows, with z = [`z_for`] of alpha.
///
/// Each end alone holds at alpha for one look fixed in advance; the two together at
/// 2·alpha. n = 0 gives [0, 1]; so does alpha <= 0. alpha >= 0.5 gives the point s/n.
pub(crate) fn wilson(successes: u64, n: u64, alpha: f64) -> RateBounds {
    wilson_z(successes, n, z_for(alpha))
}

fn wilson_z(successes: u64, n: u64, z: f64) -> RateBounds {
    // z = ∞ is alpha = 0: no confidence level is ever reached.
    if n == 0 || z.is_nan() || z.is_infinite() {
        return RateBounds::ALL;
    }
    let s = successes.min(n);
    // z < 0 (alpha > 0.5) would swap the ends; no confidence at all is the point estimate.
    let z = z.max(0.0);
    let n = n as f64;
    let rate = s as f64 / n;
    let z2 = z * z;
    let centre = rate + z2 / (2.0 * n);
    let half = z * (rate * (1.0 - rate) / n + z2 / (4.0 * n * n)).sqrt();
    RateBounds {
        // The textbook (centre − half) / (1 + z²/n), rewritten as rate² / (centre + half)
        // (the same number): it subtracts nothing, so rare errors at large n keep their
        // digits.
        lower: if rate == 0.0 {
            0.0
        } else {
            rate * rate / (centre + half)
        },
        upper: if rate == 1.0 {
            1.0
        } else {
            (centre + half) / (1.0 + z2 / n)
        },
    }
}

/// The z with P(Z > z) = alpha for a standard normal Z, by Wichura's AS241 (PPND16),
/// accurate to about 1e-16 relative. alpha <= 0 gives +∞, alpha >= 1 gives −∞.
pub(crate) fn z_for(alpha_one_sided: f64) -> f64 {
    let p = alpha_one_sided;
    if p.is_nan() {
        return f64::NAN;
    }
    if p <= 0.0 {
        return f64::INFINITY;
    }
    if p >= 1.0 {
        return f64::NEG_INFINITY;
    }
    -normal_quantile(p)
}

/// Φ⁻¹(p) for p in (0, 1): Wichura, "The percentage points of the normal distribution",
/// Applied Statistics 37 (1988), algorithm AS241, PPND16. Three rational approximations:
/// the centre, the tails, and the far tails (beyond ~1e-11).
#[allow(clippy::excessive_precision)]
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 8] = [
        3.387_132_872_796_366_608_0,
        1.331_416_678_917_843_774_5e2,
        1.971_590_950_306_551_442_7e3,
        1.373_169_376_550_946_112_5e4,
        4.592_195_393_154_987_145_7e4,
        6.726_577_092_700_870_085_3e4,
        3.343_057_558_358_812_810_5e4,
        2.509_080_928_730_122_672_7e3,
    ];
    const B: [f64; 8] = [
        1.0,
        4.231_333_070_160_091_125_2e1,
        6.871_870_074_920_579_083_0e2,
        5.394_196_021_424_751_107_7e3,
        2.121_379_430_158_659_586_7e4,
        3.930_789_580_009_271_061_0e4,
        2.872_908_573_572_194_267_4e4,
        5.226_495_278_852_854_561_0e3,
    ];
    const C: [f64; 8] = [
        1.423_437_110_749_683_577_34,
        4.630_337_846_156_545_295_90,
        5.769_497_221_460_691_405_50,
        3.647_848_324_763_204_605_04,
        1.270_458_252_452_368_382_58,
        2.417_807_251_774_506_117_70e-1,
        2.272_384_498_926_918_458_33e-2,
        7.745_450_142_783_414_076_40e-4,
    ];
    const D: [f64; 8] = [
        1.0,
        2.053_191_626_637_758_821_87,
        1.676_384_830_183_803_849_40,
        6.897_673_349_851_000_045_50e-1,
        1.481_039_764_274_800_745_90e-1,
        1.519_866_656_361_645_719_66e-2,
        5.475_938_084_995_344_946_00e-4,
        1.050_750_071_644_416_843_24e-9,
    ];
    const E: [f64; 8] = [
        6.657_904_643_501_103_777_20,
        5.463_784_911_164_114_369_90,
        1.784_826_539_917_291_335_80,
        2.965_605_718_285_048_912_30e-1,
        2.653_218_952_657_612_309_30e-2,
        1.242_660_947_388_078_438_60e-3,
        2.711_555_568_743_487_578_15e-5,
        2.010_334_399_292_288_132_65e-7,
    ];
    const F: [f64; 8] = [
        1.0,
        5.998_322_065_558_879_376_90e-1,
        1.369_298_809_227_358_053_10e-1,
        1.487_536_129_085_061_485_25e-2,
        7.868_691_311_456_132_591_00e-4,
        1.846_318_317_510_054_681_80e-5,
        1.421_511_758_316_445_888_70e-7,
        2.044_263_103_389_939_785_64e-15,
    ];
    // Horner, highest coefficient first.
    fn poly(c: &[f64; 8], x: f64) -> f64 {
        c.iter().rev().fold(0.0, |acc, &c| acc * x + c)
    }

    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180_625 - q * q;
        return q * poly(&A, r) / poly(&B, r);
    }
    // The tail the point is in, measured from its own end: no 1 − p round-off for small p.
    let tail = if q < 0.0 { p } else { 1.0 - p };
    let r = (-tail.ln()).sqrt();
    let x = if r <= 5.0 {
        let r = r - 1.6;
        poly(&C, r) / poly(&D, r)
    } else {
        let r = r - 5.0;
        poly(&E, r) / poly(&F, r)
    };
    if q < 0.0 { -x } else { x }
}

/// Bounds on a latency quantile in µs, at bucket ends of the histogram. `lower_us` is
/// exclusive (the quantile is above it), `upper_us` inclusive (at or below it). None means
/// no bound yet: for `lower_us`, the quantile could be as low as 0; for `upper_us`, there
/// are not enough samples above it to say how high it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuantileBounds {
    pub lower_us: Option<u64>,
    pub upper_us: Option<u64>,
}

impl QuantileBounds {
    const NONE: QuantileBounds = QuantileBounds {
        lower_us: None,
        upper_us: None,
    };
}

/// Anytime-valid bounds for the p-quantile of a latency distribution from a histogram:
/// the fixed-quantile confidence sequence of Howard & Ramdas ("Sequential estimation of quantiles
/// with applications to A/B-testing and best-arm identification", Bernoulli 2022): for the true
/// quantile q, I(X <= q) is Bernoulli(p), so with rate_cs at level alpha on the cumulative count:
/// lower = the end of the last bucket k whose cumulative count C_k has rate_cs(C_k, n).upper < p
///   (then q > that end; None when no bucket qualifies),
/// upper = the end of the first bucket k whose cumulative count has rate_cs(C_k, n).lower > p
///   (then q <= that end; None when none qualifies: not enough samples to bound it).
/// Values in microseconds; buckets as the histogram crate gives them (start/end inclusive, count).
///
/// "No bucket qualifies" is None for both ends. Each end alone holds at alpha. Both at once
/// hold at alpha when latencies have no ties at the quantile (true of continuous latencies);
/// with a lump of identical values exactly at the quantile, the two ends rest on two
/// slightly different coins and the pair holds at 2·alpha at worst. p outside (0, 1) gives
/// no bounds; alpha is meant to be in (0, 1). The histogram's top bucket also holds every
/// latency above its range (the window clamps them), so a bound at the top bucket's end
/// means "at least that".
///
/// Cost: two bisections over the count (≈ 2·log2 n evaluations of the mixture), then one
/// pass over the buckets up to the upper bound; the rate CS is never solved per bucket.
pub(crate) fn quantile_cs(h: &Histogram32, p: f64, alpha: f64) -> QuantileBounds {
    quantile_bounds(h, p, |c, n| {
        // Exactly "is p outside rate_cs(c, n), and on which side": p is excluded iff the
        // mixture has reached 1/alpha at p, and it is above the interval iff above c/n.
        // Testing p directly costs one mixture evaluation instead of a bisection.
        let excluded = Mixture::new(c, n, alpha).excess(p) >= 0.0;
        let observed = c as f64 / n as f64;
        (excluded && observed < p, excluded && observed > p)
    })
}

/// [`quantile_cs`] with one-look [`wilson`] bounds in place of the confidence sequence:
/// narrower, valid for one look at a time. Each end alone holds at alpha.
pub(crate) fn quantile_fixed(h: &Histogram32, p: f64, alpha: f64) -> QuantileBounds {
    let z = z_for(alpha);
    quantile_bounds(h, p, |c, n| {
        let b = wilson_z(c, n, z);
        (b.upper < p, b.lower > p)
    })
}

/// The quantile construction over any interval for a rate. `sides(c, n)` says whether the
/// interval for c of n lies wholly below p and whether it lies wholly above.
///
/// Both bounds move up with c, so "below p" holds for the counts 0..=c_lo and "above p"
/// for c_hi..=n. Bisection over the count finds c_lo and c_hi once; cumulative counts only
/// grow along the buckets, so the qualifying buckets are the prefix with C_k <= c_lo and
/// the suffix with C_k >= c_hi, and one pass finds the last of one and the first of the
/// other.
fn quantile_bounds(
    h: &Histogram32,
    p: f64,
    sides: impl Fn(u64, u64) -> (bool, bool),
) -> QuantileBounds {
    // Written to catch NaN too.
    if !(p > 0.0 && p < 1.0) {
        return QuantileBounds::NONE;
    }
    let n: u64 = h.as_slice().iter().map(|&c| u64::from(c)).sum();
    if n == 0 {
        return QuantileBounds::NONE;
    }
    let c_lo = last_true(n, |c| sides(c, n).0);
    let c_hi = first_true(n, |c| sides(c, n).1);

    let mut bounds = QuantileBounds::NONE;
    let mut cumulative = 0u64;
    for bucket in h {
        cumulative += bucket.count();
        if c_lo.is_some_and(|c| cumulative <= c) {
            bounds.lower_us = Some(bucket.end());
            continue;
        }
        // Past the lower threshold; c_hi > c_lo, since no interval lies both below and
        // above p, so the upper bound is here or further on.
        match c_hi {
            Some(c) if cumulative >= c => {
                bounds.upper_us = Some(bucket.end());
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    bounds
}

/// The largest c in 0..=n with `pred(c)`, for a `pred` true on a prefix; None if none.
fn last_true(n: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
    if !pred(0) {
        return None;
    }
    if pred(n) {
        return Some(n);
    }
    // pred(lo) holds, pred(hi) does not.
    let (mut lo, mut hi) = (0, n);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The smallest c in 0..=n with `pred(c)`, for a `pred` true on a suffix; None if none.
fn first_true(n: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
    if !pred(n) {
        return None;
    }
    if pred(0) {
        return Some(0);
    }
    // pred(hi) holds, pred(lo) does not.
    let (mut lo, mut hi) = (0, n);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use histogram::Histogram32;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// `a` within `tol` of `b`, relative to `b` (absolute when `b` is 0).
    fn rel_close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(f64::MIN_POSITIVE)
    }

    /// The window's histogram shape: 1 µs to 134 s, buckets at most 1/32 wide.
    fn histogram() -> Histogram32 {
        Histogram32::new(5, 27).unwrap()
    }

    #[test]
    fn ln_beta_known_values() {
        assert!(ln_beta(1.0, 1.0).abs() < 1e-15);
        assert!((ln_beta(PRIOR, PRIOR) - std::f64::consts::PI.ln()).abs() < 1e-15);
        assert_eq!(LN_BETA_PRIOR, std::f64::consts::PI.ln());
        assert!((ln_beta(2.0, 3.0) - (1.0f64 / 12.0).ln()).abs() < 1e-14);
        assert_eq!(ln_beta(2.5, 7.0), ln_beta(7.0, 2.5));
        // Large arguments, as n ~ 1e8 needs: mpmath gives -61086438.496891187892.
        let big = ln_beta(3e7 + 0.5, 7e7 + 0.5);
        assert!((big - -61_086_438.496_891_19).abs() < 1e-6, "{big}");
    }

    #[test]
    // Reference digits as mpmath printed them, more than an f64 holds.
    #[allow(clippy::excessive_precision)]
    fn z_matches_reference_quantiles() {
        // −Φ⁻¹(alpha), from mpmath at 30 digits: the centre, the tails and the far tails.
        let cases = [
            (0.5, 0.0),
            (0.4, 0.253_347_103_135_799_74),
            (0.2, 0.841_621_233_572_914_17),
            (0.1, 1.281_551_565_544_600_4),
            (0.075, 1.439_531_470_938_456),
            (0.05, 1.644_853_626_951_472_7),
            (0.025, 1.959_963_984_540_054_2),
            (0.01, 2.326_347_874_040_841),
            (0.005, 2.575_829_303_548_900_8),
            (0.001, 3.090_232_306_167_813_5),
            (1e-6, 4.753_424_308_822_899),
            (1e-9, 5.997_807_015_007_687),
            (1e-12, 7.034_483_825_301_132),
            (1e-20, 9.262_340_089_798_153),
            (1e-50, 14.933_337_534_788_489),
            (1e-300, 37.047_096_299_361_2),
        ];
        for (alpha, z) in cases {
            let got = z_for(alpha);
            assert!(
                (got - z).abs() <= 1e-13 * z.max(1.0),
                "z_for({alpha}) = {got}, want {z}"
            );
            // And the other tail, by symmetry (where 1 − alpha still has the digits).
            if alpha >= 1e-6 {
                assert!((z_for(1.0 - alpha) + z).abs() <= 1e-9, "z_for(1 - {alpha})");
            }
        }
        assert_eq!(z_for(0.0), f64::INFINITY);
        assert_eq!(z_for(1.0), f64::NEG_INFINITY);
        assert!(z_for(f64::NAN).is_nan());
    }

    #[test]
    // Reference digits as mpmath printed them, more than an f64 holds.
    #[allow(clippy::excessive_precision)]
    fn rate_cs_matches_high_precision_reference() {
        // (s, n, alpha, lower, upper) from an independent mpmath evaluation of the same
        // definition at 50 digits, bisected to 1e-100.
        let cases: [(u64, u64, f64, f64, f64); 7] = [
            (0, 10, 0.05, 0.0, 0.376_987_350_990_677_4),
            (
                10,
                100,
                0.05,
                0.029_060_851_284_072_584,
                0.227_509_949_858_553_42,
            ),
            (
                1,
                1000,
                0.005,
                4.462_182_685_556_247_4e-8,
                0.012_475_156_786_691_028,
            ),
            (
                500,
                1000,
                0.005,
                0.433_298_770_794_038_4,
                0.566_701_229_205_961_6,
            ),
            (3, 3, 0.005, 0.116_039_720_840_319_47, 1.0),
            (
                1000,
                100_000_000,
                0.005,
                8.380_145_826_997_489e-6,
                1.181_624_580_913_577_1e-5,
            ),
            (
                50_000_000,
                100_000_000,
                0.005,
                0.499_728_573_703_165_76,
                0.500_271_426_296_834_2,
            ),
        ];
        for (s, n, alpha, lower, upper) in cases {
            let b = rate_cs(s, n, alpha);
            // Relative to the distance from 0 or 1. lgamma's rounding at n = 1e8 moves ln M
            // by ~1e-6, the bounds by far less.
            let tol = if n > 1_000_000 { 1e-7 } else { 1e-9 };
            for (got, want) in [(b.lower, lower), (b.upper, upper)] {
                let scale = want.min(1.0 - want);
                assert!(
                    (got - want).abs() <= tol * scale,
                    "{s}/{n}: {b:?}, want {want}"
                );
            }
            // Rounded outwards, never inwards (up to the reference's own last digit).
            if n <= 1000 {
                assert!(b.lower <= lower * (1.0 + 1e-15), "{s}/{n}: {b:?}");
                assert!(b.upper >= upper * (1.0 - 1e-15), "{s}/{n}: {b:?}");
            }
        }
    }

    #[test]
    fn rate_cs_known_shapes() {
        assert_eq!(rate_cs(0, 0, 0.005), RateBounds::ALL);
        assert_eq!(rate_cs(3, 0, 0.005), RateBounds::ALL);
        assert_eq!(rate_cs(3, 10, 0.0), RateBounds::ALL);
        assert_eq!(rate_cs(3, 10, f64::NAN), RateBounds::ALL);
        assert_eq!(
            rate_cs(3, 10, 1.0),
            RateBounds {
                lower: 0.3,
                upper: 0.3
            }
        );
        // More successes than trials count as all.
        assert_eq!(rate_cs(12, 10, 0.05), rate_cs(10, 10, 0.05));
        for n in [1, 2, 7, 100, 12_345, 100_000_000] {
            let none = rate_cs(0, n, 0.005);
            assert_eq!(none.lower, 0.0);
            assert!(none.upper > 0.0 && none.upper < 1.0, "{n}: {none:?}");
            let all = rate_cs(n, n, 0.005);
            assert_eq!(all.upper, 1.0);
            assert!(all.lower > 0.0 && all.lower < 1.0, "{n}: {all:?}");
            for s in [0, 1, n / 3, n / 2, n - 1, n] {
                let b = rate_cs(s, n, 0.005);
                let rate = s as f64 / n as f64;
                assert!(b.lower <= rate && rate <= b.upper, "{s}/{n}: {b:?}");
                // Mirror image: s errors of n is n − s successes of n.
                let m = rate_cs(n - s, n, 0.005);
                let w = b.lower.min(1.0 - b.lower) * 1e-9 + 1e-15;
                assert!(
                    (b.lower - (1.0 - m.upper)).abs() <= w,
                    "{s}/{n}: {b:?} {m:?}"
                );
                let w = b.upper.min(1.0 - b.upper) * 1e-9 + 1e-15;
                assert!(
                    (b.upper - (1.0 - m.lower)).abs() <= w,
                    "{s}/{n}: {b:?} {m:?}"
                );
            }
        }
    }

    #[test]
    fn rate_cs_bounds_are_where_the_mixture_crosses() {
        // The ends are the crossings of ln M_n(p) = ln(1/alpha), to ~1e-9 relative: just
        // outside is excluded, a hair inside is not.
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..300 {
            let digits = rng.random_range(1..=8);
            let n = 1 + rng.random_range(0..10u64.pow(digits));
            let s = rng.random_range(0..=n);
            let alpha = [0.05, 0.005, 1e-4][rng.random_range(0..3)];
            let m = Mixture::new(s, n, alpha);
            let b = rate_cs(s, n, alpha);
            if s > 0 {
                let hair = 1e-9 * b.lower.min(1.0 - b.lower);
                assert!(m.excess(b.lower) >= 0.0, "{s}/{n} at {alpha}: {b:?}");
                assert!(m.excess(b.lower + hair) < 0.0, "{s}/{n} at {alpha}: {b:?}");
            }
            if s < n {
                let hair = 1e-9 * b.upper.min(1.0 - b.upper);
                assert!(m.excess(b.upper) >= 0.0, "{s}/{n} at {alpha}: {b:?}");
                assert!(m.excess(b.upper - hair) < 0.0, "{s}/{n} at {alpha}: {b:?}");
            }
        }
    }

    #[test]
    fn rate_cs_is_monotone_in_the_count() {
        // The quantile bounds rest on this: more successes never move either end down.
        for n in 1..=120 {
            let mut last = rate_cs(0, n, 0.05);
            for s in 1..=n {
                let b = rate_cs(s, n, 0.05);
                assert!(b.lower >= last.lower && b.upper >= last.upper, "{s}/{n}");
                last = b;
            }
        }
        let n = 10_000_000;
        let mut last = rate_cs(0, n, 0.005);
        for s in (1..=n).step_by(99_991).chain([n - 1, n]) {
            let b = rate_cs(s, n, 0.005);
            assert!(b.lower >= last.lower && b.upper >= last.upper, "{s}/{n}");
            last = b;
        }
        let mut last = wilson(0, 1000, 0.005);
        for s in 1..=1000 {
            let b = wilson(s, 1000, 0.005);
            assert!(b.lower >= last.lower && b.upper >= last.upper, "{s}/1000");
            last = b;
        }
    }

    #[test]
    fn rate_cs_shrinks_as_n_grows() {
        let mut width = 1.0;
        for k in 1..=8 {
            let n = 10u64.pow(k);
            let b = rate_cs(n / 10, n, 0.005);
            assert!(b.lower < 0.1 && 0.1 < b.upper, "{n}: {b:?}");
            assert!(b.upper - b.lower < width, "{n}: {b:?}");
            width = b.upper - b.lower;
            // Wider than the one-look interval at the same level: the price of looking often.
            let w = wilson(n / 10, n, 0.0025);
            assert!(
                b.lower < w.lower && w.upper < b.upper,
                "{n}: {b:?} vs {w:?}"
            );
        }
        // ±2.7e-4 around ½ at 1e8.
        assert!(width < 6e-4, "{width}");
    }

    #[test]
    fn all_failures_convict_within_a_few_requests() {
        let n = (1..=100)
            .find(|&n| rate_cs(n, n, 0.005).lower > 0.05)
            .unwrap();
        println!("every request failing: rate_cs lower > 5% after {n} requests at alpha 0.005");
        assert!(n <= 5, "{n}");
    }

    #[test]
    // Reference digits as mpmath printed them, more than an f64 holds.
    #[allow(clippy::excessive_precision)]
    fn wilson_known_values() {
        // From the textbook formula evaluated with mpmath.
        let cases = [
            (
                10,
                100,
                0.025,
                0.055_229_137_060_675_085,
                0.174_365_661_504_913_46,
            ),
            (
                1,
                1000,
                0.005,
                1.174_163_536_183_211_1e-4,
                8.460_566_219_981_696e-3,
            ),
            (0, 50, 0.05, 0.0, 0.051_333_185_786_270_15),
            (
                3,
                100_000_000,
                0.005,
                7.577_582_919_285_693e-9,
                1.187_713_747_078_037_6e-7,
            ),
        ];
        for (s, n, alpha, lower, upper) in cases {
            let b = wilson(s, n, alpha);
            assert!(rel_close(b.lower, lower, 1e-12), "{s}/{n}: {b:?}");
            assert!(rel_close(b.upper, upper, 1e-12), "{s}/{n}: {b:?}");
        }
        assert_eq!(wilson(0, 0, 0.005), RateBounds::ALL);
        assert_eq!(wilson(3, 10, 0.0), RateBounds::ALL);
        assert_eq!(
            wilson(3, 10, 0.5),
            RateBounds {
                lower: 0.3,
                upper: 0.3
            }
        );
        let b = wilson(7, 7, 0.005);
        assert_eq!(b.upper, 1.0);
        assert!(b.lower > 0.0);
        for (s, n) in [(0, 10), (3, 10), (10, 10), (17, 1_000_000)] {
            let (b, m) = (wilson(s, n, 0.005), wilson(n - s, n, 0.005));
            assert!((b.lower - (1.0 - m.upper)).abs() <= 1e-15, "{s}/{n}");
            assert!((b.upper - (1.0 - m.lower)).abs() <= 1e-15, "{s}/{n}");
        }
    }

    /// The fraction of `streams` simulated Bernoulli(p) streams whose confidence sequence
    /// ever excludes p, looked at after every one of `horizon` samples.
    ///
    /// Every step is judged by M_n(p) itself, kept as a running product (its one-step
    /// factor is the mixture's predictive probability of the outcome over p's), since
    /// solving for the bounds at each of ~10^7 steps would take minutes in a debug build.
    /// That `rate_cs` agrees with the M_n(p) >= 1/alpha rule is checked along the way: at
    /// every step of the first streams, and where each stream first strays or ends.
    fn ever_excluded(p: f64, alpha: f64, streams: u32, horizon: u64, seed: u64) -> f64 {
        let threshold = -alpha.ln();
        let (ln_p, ln_q) = (p.ln(), (-p).ln_1p());
        let mut rng = SmallRng::seed_from_u64(seed);
        let check = |s: u64, n: u64, ln_m: f64| {
            // The running product against the closed form (ln_beta).
            let direct = Mixture::new(s, n, alpha).excess(p) + threshold;
            assert!(
                (ln_m - direct).abs() < 1e-8 * direct.abs().max(1.0),
                "{s}/{n}"
            );
            let b = rate_cs(s, n, alpha);
            let outside = p < b.lower || p > b.upper;
            // Bounds sit within ~1e-10 of the crossing, rounded outwards; a knife-edge
            // case could go either way and is skipped.
            if (ln_m - threshold).abs() > 1e-6 {
                assert_eq!(outside, ln_m >= threshold, "{s}/{n} at p {p}: {b:?}");
            }
        };
        let mut strayed = 0;
        for stream in 0..streams {
            let (mut s, mut ln_m) = (0u64, 0.0f64);
            for n in 1..=horizon {
                let seen = (n - 1) as f64;
                if rng.random::<f64>() < p {
                    ln_m += ((PRIOR + s as f64) / (2.0 * PRIOR + seen)).ln() - ln_p;
                    s += 1;
                } else {
                    let f = (n - 1 - s) as f64;
                    ln_m += ((PRIOR + f) / (2.0 * PRIOR + seen)).ln() - ln_q;
                }
                if ln_m >= threshold {
                    check(s, n, ln_m);
                    strayed += 1;
                    break;
                }
                if (stream < 3 && n <= 1000) || n == horizon {
                    check(s, n, ln_m);
                }
            }
        }
        f64::from(strayed) / f64::from(streams)
    }

    #[test]
    fn rate_cs_rarely_ever_excludes_the_truth() {
        let alpha = 0.05;
        let streams = 1000;
        let tolerance = tolerance(alpha, streams);
        for (i, (p, horizon)) in [(0.001, 10_000), (0.01, 3000), (0.05, 2000), (0.3, 2000)]
            .into_iter()
            .enumerate()
        {
            let fraction = ever_excluded(p, alpha, streams, horizon, 100 + i as u64);
            println!(
                "p {p}: {fraction:.3} of {streams} streams ever excluded p in {horizon} looks \
                 (alpha {alpha})"
            );
            assert!(fraction <= alpha + tolerance, "p {p}: {fraction}");
        }

        // The control: one-look Wilson bounds at the same level, looked at after every
        // request, cry wolf on most streams. (Also shows the harness can see a breach.)
        let (p, horizon, streams) = (0.05, 2000, 200);
        let mut rng = SmallRng::seed_from_u64(99);
        let mut strayed = 0;
        for _ in 0..streams {
            let mut s = 0;
            for n in 1..=horizon {
                s += u64::from(rng.random::<f64>() < p);
                let b = wilson(s, n, alpha / 2.0);
                if p < b.lower || p > b.upper {
                    strayed += 1;
                    break;
                }
            }
        }
        let fraction = f64::from(strayed) / f64::from(streams);
        println!(
            "p {p}: one-look Wilson (two-sided {alpha}) looked at every request ever excluded \
             p on {fraction:.3} of {streams} streams in {horizon} looks"
        );
        assert!(fraction > 3.0 * alpha, "{fraction}");
    }

    #[test]
    fn detects_a_bad_canary_quickly() {
        // A canary failing 30% of requests against a 5% limit, at the guard's alpha.
        let (p, limit, alpha) = (0.3, 0.05, 0.005);
        let mut rng = SmallRng::seed_from_u64(42);
        let mut cs_needed = Vec::new();
        let mut wilson_needed = Vec::new();
        for _ in 0..400 {
            let (mut s, mut n) = (0, 0);
            let mut wilson_at = None;
            loop {
                n += 1;
                s += u64::from(rng.random::<f64>() < p);
                if wilson_at.is_none() && wilson(s, n, alpha).lower > limit {
                    wilson_at = Some(n);
                }
                if rate_cs(s, n, alpha).lower > limit {
                    break;
                }
                assert!(n < 1000, "never detected");
            }
            cs_needed.push(n);
            wilson_needed.push(wilson_at.unwrap_or(n));
        }
        cs_needed.sort_unstable();
        wilson_needed.sort_unstable();
        let at = |v: &[u64], q: f64| v[((v.len() - 1) as f64 * q) as usize];
        println!(
            "30% errors vs a 5% limit at alpha {alpha}: rate_cs convicts after median {} / \
             p95 {} / max {} requests; one-look Wilson after median {} / p95 {} / max {}",
            at(&cs_needed, 0.5),
            at(&cs_needed, 0.95),
            at(&cs_needed, 1.0),
            at(&wilson_needed, 0.5),
            at(&wilson_needed, 0.95),
            at(&wilson_needed, 1.0),
        );
        assert!(at(&cs_needed, 0.5) <= 40, "{cs_needed:?}");
        assert!(at(&cs_needed, 1.0) <= 100, "{cs_needed:?}");
    }

    /// Reference for the quantile bounds: the definition, with a rate interval solved
    /// per bucket.
    fn quantile_by_definition(
        h: &Histogram32,
        p: f64,
        interval: impl Fn(u64, u64) -> RateBounds,
    ) -> QuantileBounds {
        let n: u64 = h.iter().map(|b| b.count()).sum();
        let mut bounds = QuantileBounds::NONE;
        if n == 0 {
            return bounds;
        }
        let mut cumulative = 0;
        for bucket in h {
            cumulative += bucket.count();
            let b = interval(cumulative, n);
            if b.upper < p {
                bounds.lower_us = Some(bucket.end());
            }
            if b.lower > p && bounds.upper_us.is_none() {
                bounds.upper_us = Some(bucket.end());
            }
        }
        bounds
    }

    #[test]
    fn quantile_bounds_follow_the_definition() {
        let mut rng = SmallRng::seed_from_u64(3);
        for round in 0..12 {
            let mut h = histogram();
            // A few clusters of latencies, some sparse, some dense.
            let samples = [50, 400, 3000, 20_000][round % 4];
            for _ in 0..samples {
                let centre = [900u64, 15_000, 80_000, 2_000_000][rng.random_range(0..4)];
                let v = centre + rng.random_range(0..centre / 4);
                h.increment(v).unwrap();
            }
            for p in [0.5, 0.9, 0.99] {
                let cs = quantile_cs(&h, p, 0.05);
                assert_eq!(
                    cs,
                    quantile_by_definition(&h, p, |c, n| rate_cs(c, n, 0.05))
                );
                let fixed = quantile_fixed(&h, p, 0.05);
                assert_eq!(
                    fixed,
                    quantile_by_definition(&h, p, |c, n| wilson(c, n, 0.05))
                );
                // The one-look bounds are never wider than the sequence's.
                assert!(cs.lower_us <= fixed.lower_us, "{cs:?} vs {fixed:?}");
                assert!(
                    cs.upper_us
                        .is_none_or(|u| fixed.upper_us.is_some_and(|f| f <= u))
                );
            }
        }
    }

    #[test]
    fn quantile_bounds_edge_cases() {
        let mut h = histogram();
        let none = QuantileBounds::NONE;
        assert_eq!(quantile_cs(&h, 0.99, 0.005), none);
        assert_eq!(quantile_fixed(&h, 0.99, 0.005), none);
        h.add(10_000, 1_000_000).unwrap();
        for p in [0.0, 1.0, -0.5, f64::NAN] {
            assert_eq!(quantile_cs(&h, p, 0.005), none);
            assert_eq!(quantile_fixed(&h, p, 0.005), none);
        }
        // Everything in one bucket: the quantile is in it, to the bucket.
        let bucket = h.iter().find(|b| b.count() > 0).unwrap();
        let b = quantile_cs(&h, 0.99, 0.005);
        assert_eq!(b.lower_us, Some(bucket.start() - 1));
        assert_eq!(b.upper_us, Some(bucket.end()));
        // A handful of samples bound nothing from above at p99.
        let mut few = histogram();
        few.add(10_000, 20).unwrap();
        assert_eq!(quantile_cs(&few, 0.99, 0.005).upper_us, None);
        // How many samples before the p99 has any upper bound.
        for alpha in [0.05, 0.005] {
            let cs = (1..).find(|&n| rate_cs(n, n, alpha).lower > 0.99).unwrap();
            let fixed = (1..).find(|&n| wilson(n, n, alpha).lower > 0.99).unwrap();
            println!("p99 upper bound needs {cs} samples (one-look: {fixed}) at alpha {alpha}");
        }
    }

    /// A standard normal draw, by Box–Muller.
    fn normal(rng: &mut SmallRng) -> f64 {
        let u: f64 = 1.0 - rng.random::<f64>();
        let v: f64 = rng.random();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// The fraction of simulated streams of latencies (µs, from `draw`) whose p99 bounds,
    /// looked at every 100 samples, ever leave out `truth`, the true p99.
    fn quantile_ever_wrong(
        draw: impl Fn(&mut SmallRng) -> f64,
        truth: f64,
        alpha: f64,
        streams: u32,
        seed: u64,
    ) -> (f64, u64) {
        // Latencies are recorded as whole µs, so the truth is the recorded value's p99.
        // Bounds are bucket ends, so this is the same as comparing buckets: lower is the
        // end of a bucket wholly below the truth's, upper the end of its bucket or above.
        let truth = truth as u64;
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut wrong = 0;
        let mut widths = 0;
        for _ in 0..streams {
            let mut h = histogram();
            for n in 1..=4000u64 {
                h.increment(draw(&mut rng) as u64).unwrap();
                if n % 100 != 0 {
                    continue;
                }
                let b = quantile_cs(&h, 0.99, alpha);
                let low = b.lower_us.is_some_and(|l| l >= truth);
                let high = b.upper_us.is_some_and(|u| u < truth);
                if low || high {
                    wrong += 1;
                    break;
                }
                if n == 4000 {
                    widths += b.upper_us.unwrap() - b.lower_us.unwrap();
                }
            }
        }
        (
            f64::from(wrong) / f64::from(streams),
            widths / u64::from(streams),
        )
    }

    /// Latencies from a lognormal with median 20 ms and sigma 0.5, in µs.
    fn lognormal(rng: &mut SmallRng) -> f64 {
        (20_000f64.ln() + 0.5 * normal(rng)).exp()
    }

    /// That lognormal's q-quantile.
    fn lognormal_quantile(q: f64) -> f64 {
        (20_000f64.ln() + 0.5 * z_for(1.0 - q)).exp()
    }

    const QUANTILE_ALPHA: f64 = 0.05;
    const QUANTILE_STREAMS: u32 = 300;

    /// Three standard errors of the Monte-Carlo estimate of a rate of alpha.
    fn tolerance(alpha: f64, streams: u32) -> f64 {
        3.0 * (alpha * (1.0 - alpha) / f64::from(streams)).sqrt()
    }

    #[test]
    fn quantile_cs_rarely_ever_excludes_a_lognormal_p99() {
        // p99 = 20 ms · e^(0.5·z(0.01)) ≈ 64 ms.
        let (alpha, streams) = (QUANTILE_ALPHA, QUANTILE_STREAMS);
        let truth = lognormal_quantile(0.99);
        let (fraction, width) = quantile_ever_wrong(lognormal, truth, alpha, streams, 11);
        println!(
            "lognormal p99 {truth:.0} µs: {fraction:.3} of {streams} streams ever excluded it \
             (alpha {alpha}); mean width at 4000 samples {width} µs"
        );
        assert!(fraction <= alpha + tolerance(alpha, streams), "{fraction}");
    }

    #[test]
    fn quantile_cs_rarely_ever_excludes_a_heavy_tailed_p99() {
        // The same, except 0.5% of requests take 300 ms: the p99 is the lognormal's
        // 0.99/0.995 quantile, ≈ 72 ms, with a lump of slow requests just above it.
        let (alpha, streams) = (QUANTILE_ALPHA, QUANTILE_STREAMS);
        let heavy = |rng: &mut SmallRng| {
            if rng.random::<f64>() < 0.005 {
                300_000.0
            } else {
                lognormal(rng)
            }
        };
        let truth = lognormal_quantile(0.99 / 0.995);
        let (fraction, width) = quantile_ever_wrong(heavy, truth, alpha, streams, 12);
        println!(
            "lognormal + 0.5% at 300 ms, p99 {truth:.0} µs: {fraction:.3} of {streams} streams \
             ever excluded it (alpha {alpha}); mean width at 4000 samples {width} µs"
        );
        assert!(fraction <= alpha + tolerance(alpha, streams), "{fraction}");
    }
}
