//! Per-pool sliding window of live traffic: a ring of time slices, each holding request
//! and error counts and a latency histogram. Pure: no I/O, time is passed in.
//!
//! Recording is lock-free and touches only the recording thread's own cache lines
//! (issue 17): the open slice's counts and latencies are kept per thread, in
//! [`shard`]s, and one writer (the guard's evaluation loop) rotates the ring: it moves
//! every shard's part into the slice that closes (an atomic swap each, so nothing is
//! lost or counted twice), clears the oldest slice and makes it current. Readers of the
//! open slice add the shards up. A request being recorded just as its shard is moved
//! may have its count in one slice and its latency in the next; it is never lost.
//!
//! Latency is kept by the `histogram` crate's log-linear atomic histogram in
//! microseconds with grouping power 5: every bucket is at most 1/32 (3.1%) wide
//! relative to its value, so p50/p99 are precise to a few percent from 1 µs to 134 s.
//!
//! Each slice, as it closes, is also summed up into a [`Point`] (requests, errors, p99)
//! kept for the last [`HISTORY`]: the dashboard's charts. That costs the request path
//! nothing; the rotating writer does it once per slice. A reset (after a rollback, so
//! the guard judges fresh traffic) hides older slices from [`Window::stats`] but leaves
//! the history whole: what happened stays on the chart.
//!
//! Each closed slice is also added to the pool's **exposure**: everything since the
//! guard last restarted it (when the service's weights changed, a rollout step began, or
//! after a rollback). The guard's sequential tests judge the exposure — evidence that
//! keeps accumulating for as long as the candidate serves unchanged — while the sliding
//! window keeps loud failures fast.
//!
//! Thousands of idle pools must cost little (issue 17), so nothing is allocated before
//! it is needed: a slice's latency histogram (~3 KB) is created by its first sample and
//! kept from then on, the exposure's with its first latency, and the history holds runs
//! of equal points (an idle stretch of any length is one entry), growing as it fills.
//! And an idle window is not rotated slice by slice: while every slice is empty and
//! nothing new was recorded, [`Window::rotate`] only notes the time, and the rotations
//! that were due are made in one step (empty slices closed, history and exposure
//! extended, slices renumbered) before the next change or read — with exactly the
//! figures slice-by-slice rotation would have left.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use histogram::{AtomicHistogram32, Histogram, Histogram32, SparseHistogram};

use crate::telemetry::shard::{self, Padded};

/// Relative precision of latency buckets: 2^-5.
const GROUPING_POWER: u8 = 5;
/// Largest latency kept, in µs: 2^27 µs ≈ 134 s; longer ones count in the top bucket.
const MAX_VALUE_POWER: u8 = 27;
const MAX_MICROS: u64 = (1 << MAX_VALUE_POWER) - 1;

/// How far back the per-slice history reaches.
pub(crate) const HISTORY: Duration = Duration::from_secs(600);
/// At most this many history points, whatever the slice length (10 minutes of 100 ms).
const MAX_POINTS: usize = 6000;

struct Slice {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Allocated by the slice's first latency sample, then kept (and drained on reuse):
    /// an idle pool's slices hold none.
    latency_us: OnceLock<AtomicHistogram32>,
    /// The rotation number at which this slice became current.
    opened: AtomicU64,
}

impl Slice {
    fn new() -> Slice {
        Slice {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_us: OnceLock::new(),
            opened: AtomicU64::new(0),
        }
    }

    /// The slice's histogram, created by the first sample. `get_or_init` is one
    /// acquire load once it exists, so the request path stays lock-free.
    #[inline]
    fn histogram(&self) -> &AtomicHistogram32 {
        self.latency_us.get_or_init(|| {
            AtomicHistogram32::new(GROUPING_POWER, MAX_VALUE_POWER)
                .expect("valid histogram parameters")
        })
    }

    fn clear(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.errors.store(0, Ordering::Relaxed);
        if let Some(h) = self.latency_us.get() {
            let _ = h.drain();
        }
    }

    /// The slice summed up, as the history keeps it, and its latency histogram (None
    /// while it has never had a sample).
    fn point(&self) -> (Point, Option<Histogram32>) {
        let requests = self.requests.load(Ordering::Relaxed);
        let latency = self.latency_us.get().map(AtomicHistogram32::load);
        let p99_us = match &latency {
            Some(h) if requests > 0 => quantile_us(h, 0.99),
            _ => None,
        };
        let point = Point {
            requests,
            errors: self.errors.load(Ordering::Relaxed),
            p99_us,
        };
        (point, latency)
    }
}

/// One thread's part of the open slice, not yet moved into it (see [`Window::record`]).
#[derive(Default)]
struct Live {
    /// Requests (low 32 bits) and errors (high 32 bits): one add counts a request and
    /// its error together, and one swap moves both, so no slice ever holds an error
    /// without its request. A shard cannot reach 2^32 requests in one slice (at most a
    /// minute: 71 million a second from one thread).
    counts: AtomicU64,
    /// Every request this thread ever recorded; [`Window::total`] adds these up.
    total: AtomicU64,
    /// Allocated by the shard's first latency sample.
    latency_us: OnceLock<AtomicHistogram32>,
}

const ONE_REQUEST: u64 = 1;
const ONE_ERROR: u64 = 1 << 32;

impl Live {
    #[inline]
    fn histogram(&self) -> &AtomicHistogram32 {
        self.latency_us.get_or_init(|| {
            AtomicHistogram32::new(GROUPING_POWER, MAX_VALUE_POWER)
                .expect("valid histogram parameters")
        })
    }

    /// Requests and errors not yet moved into the slice.
    fn counts(&self) -> (u64, u64) {
        let c = self.counts.load(Ordering::Acquire);
        (c & 0xffff_ffff, c >> 32)
    }
}

/// Latency quantile (0..=1) in µs, as the midpoint of its bucket; None without samples.
fn quantile_us(h: &Histogram32, q: f64) -> Option<u64> {
    let bucket = h.quantile_bucket(q).ok()??;
    Some(bucket.start() + (bucket.end() - bucket.start()) / 2)
}

/// One closed slice of a pool's traffic: what the dashboard charts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Point {
    pub requests: u64,
    pub errors: u64,
    /// p99 latency in µs; None when the slice saw no request with a latency.
    pub p99_us: Option<u64>,
}

/// The newest history points, oldest first, and when the newest one ended.
#[derive(Debug, Clone)]
pub struct Series {
    pub points: Vec<Point>,
    /// The end of the newest point; None before the first slice has closed.
    pub end: Option<Instant>,
    /// The length of each point.
    pub step: Duration,
}

/// The last `capacity` points, as runs of equal points (oldest first): an idle pool's
/// ten minutes are one entry, not 600. Grows as runs are added, never preallocated.
#[derive(Default)]
struct History {
    runs: VecDeque<(Point, u64)>,
    /// Points held: the sum of the runs' lengths, at most `capacity`.
    len: usize,
    capacity: usize,
}

impl History {
    fn push(&mut self, p: Point) {
        self.push_run(p, 1);
    }

    /// `count` copies of `p`, as the newest points.
    fn push_run(&mut self, p: Point, count: u64) {
        let count = count.min(self.capacity as u64);
        if count == 0 {
            return;
        }
        match self.runs.back_mut() {
            Some((last, n)) if *last == p => *n += count,
            _ => self.runs.push_back((p, count)),
        }
        self.len += count as usize;
        while self.len > self.capacity {
            let over = (self.len - self.capacity) as u64;
            let front = self.runs.front_mut().expect("len > 0 means a run");
            if front.1 <= over {
                self.len -= front.1 as usize;
                self.runs.pop_front();
            } else {
                front.1 -= over;
                self.len -= over as usize;
            }
        }
    }

    /// The newest `n` points (n ≤ len), oldest first.
    fn newest(&self, n: usize) -> Vec<Point> {
        let mut out = Vec::with_capacity(n);
        let mut skip = (self.len - n) as u64;
        for &(p, count) in &self.runs {
            let take = count.saturating_sub(skip);
            skip = skip.saturating_sub(count);
            out.extend(std::iter::repeat_n(p, take as usize));
        }
        out
    }
}

/// The sliding window of one pool.
pub struct Window {
    slice_len: Duration,
    slices: Box<[Slice]>,
    current: AtomicUsize,
    /// The open slice's traffic, one part per thread ([`shard`]), and every request
    /// each thread recorded: allocated by the first request, so an idle pool holds none.
    live: OnceLock<Box<[Padded<Live>]>>,
    /// The rotating writer's clock: the start of the current slice. Locked first by
    /// every method that takes more than one lock.
    current_start: Mutex<Rotation>,
    /// The first rotation's time: what `deferred_ns` counts from.
    epoch: OnceLock<Instant>,
    /// [`Window::total`] as the last rotation left it, if every slice was empty then
    /// ([`NOT_QUIET`] otherwise): while `total` still equals it, rotating would only
    /// close empty slices, and is deferred.
    quiet_total: AtomicU64,
    /// The last time a deferring `rotate` was called (ns since `epoch`, plus one; 0:
    /// none): the rotations due by then are still to be made ([`Window::catch_up`]).
    deferred_ns: AtomicU64,
    /// Rotations so far: the number of the current slice.
    rotations: AtomicU64,
    /// Slices opened before this rotation number are hidden from `stats` (a reset).
    visible_from: AtomicU64,
    history: Mutex<History>,
    exposure: Mutex<Exposure>,
    /// Every slice closed since [`Window::totals`] was first asked for, summed; `None`
    /// until then, so that a window nobody publishes (a single weir) pays nothing.
    cumulative: Mutex<Option<Cumulative>>,
}

/// Where the ring stands in time (see [`Window::rotate`]).
#[derive(Debug, Default)]
struct Rotation {
    /// Start of the current slice; None before the first rotation.
    start: Option<Instant>,
}

/// `quiet_total` when the window is not quiet: `total` never gets there.
const NOT_QUIET: u64 = u64::MAX;

/// Running sums of every closed slice. The histogram is allocated with the first
/// latency, so an idle pool pays nothing for it.
#[derive(Default)]
struct Cumulative {
    requests: u64,
    errors: u64,
    latency_us: Option<Histogram>,
}

impl Cumulative {
    fn add(&mut self, requests: u64, errors: u64, latency: Option<&Histogram32>) {
        if requests == 0 {
            return; // an idle slice: nothing to add, and no latency without a request
        }
        self.requests += requests;
        self.errors += errors;
        let Some(latency) = latency else { return };
        let wide = Histogram::from(latency);
        match &mut self.latency_us {
            Some(h) => {
                let _ = h.checked_add_assign(&wide);
            }
            None => self.latency_us = Some(wide),
        }
    }
}

/// Everything a window ever recorded, as running sums that only grow: what a fleet
/// instance publishes, so that its peers can add up the differences between two
/// readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    /// Latency in µs, in the window's buckets (see [`Window::latency_config`]).
    pub latency_us: SparseHistogram,
}

/// Everything since the exposure was last restarted, in closed slices.
struct Exposure {
    requests: u64,
    errors: u64,
    /// Created with the first closed slice that has latency samples.
    latency_us: Option<Histogram32>,
    slices: u32,
    /// Slices opened before this rotation number are not part of it: the slice open at
    /// a restart holds traffic from before and after, and stays out.
    from: u64,
}

impl Exposure {
    fn new(from: u64) -> Exposure {
        Exposure {
            requests: 0,
            errors: 0,
            latency_us: None,
            slices: 0,
            from,
        }
    }
}

fn empty_histogram() -> Histogram32 {
    Histogram32::new(GROUPING_POWER, MAX_VALUE_POWER).expect("valid histogram parameters")
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("slice_len", &self.slice_len)
            .field("slices", &self.slices.len())
            .finish_non_exhaustive()
    }
}

/// What a window (or part of it) holds.
#[derive(Debug, Clone)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
    latency_us: Histogram32,
    /// The span of time these figures cover.
    pub span: Duration,
}

impl Stats {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// Latency quantile (0..=1), as the midpoint of its bucket; None without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        quantile_us(&self.latency_us, q).map(Duration::from_micros)
    }

    pub fn p50(&self) -> Option<Duration> {
        self.quantile(0.5)
    }

    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }

    /// The latency histogram, in microseconds.
    pub fn latency(&self) -> &Histogram32 {
        &self.latency_us
    }
}

impl Window {
    /// A window covering `length`, in slices of `slice_len`. One slice more than
    /// `length` needs is kept: the current one, still filling.
    pub fn new(length: Duration, slice_len: Duration) -> Window {
        let slice_len = slice_len.max(Duration::from_millis(10));
        let n = (length.as_nanos().div_ceil(slice_len.as_nanos()) as usize).max(1) + 1;
        let capacity =
            (HISTORY.as_nanos().div_ceil(slice_len.as_nanos()) as usize).clamp(1, MAX_POINTS);
        Window {
            slice_len,
            slices: (0..n).map(|_| Slice::new()).collect(),
            current: AtomicUsize::new(0),
            live: OnceLock::new(),
            current_start: Mutex::new(Rotation::default()),
            epoch: OnceLock::new(),
            quiet_total: AtomicU64::new(NOT_QUIET),
            deferred_ns: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            visible_from: AtomicU64::new(0),
            history: Mutex::new(History {
                capacity,
                ..History::default()
            }),
            exposure: Mutex::new(Exposure::new(0)),
            cumulative: Mutex::new(None),
        }
    }

    /// The bucket layout of every latency histogram a window keeps.
    pub fn latency_config() -> histogram::Config {
        histogram::Config::new(GROUPING_POWER, MAX_VALUE_POWER).expect("valid histogram parameters")
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, Rotation> {
        self.current_start.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything recorded since the first call (which starts the sums with the slice
    /// still open), as sums that never go down (a reset does not touch them): the
    /// closed slices plus the current one, read while no rotation runs.
    pub fn totals(&self) -> Totals {
        let _clock = self.clock();
        let mut kept = self.cumulative.lock().unwrap_or_else(|p| p.into_inner());
        let cumulative = kept.get_or_insert_with(Cumulative::default);
        let current = &self.slices[self.current.load(Ordering::Acquire)];
        let mut latency = cumulative
            .latency_us
            .clone()
            .unwrap_or_else(|| Histogram::with_config(&Window::latency_config()));
        if let Some(h) = current.latency_us.get() {
            let _ = latency.checked_add_assign(&Histogram::from(&h.load()));
        }
        let (mut requests, mut errors) = (
            current.requests.load(Ordering::Relaxed),
            current.errors.load(Ordering::Relaxed),
        );
        for live in self.live_shards() {
            let (r, e) = live.counts();
            requests += r;
            errors += e;
            if let Some(h) = live.latency_us.get() {
                let _ = latency.checked_add_assign(&Histogram::from(&h.load()));
            }
        }
        Totals {
            requests: cumulative.requests + requests,
            errors: cumulative.errors + errors,
            latency_us: SparseHistogram::from(&latency),
        }
    }

    /// Add traffic recorded elsewhere (a fleet peer's requests since its last reading)
    /// to the current slice, as if it had been recorded here.
    pub fn add(&self, requests: u64, errors: u64, latency_us: &SparseHistogram) {
        // Straight into the open slice (this is a background task's once-a-tick call,
        // not the request path), latency and errors first, then the requests and last
        // the total, as in `record`.
        let slice = &self.slices[self.current.load(Ordering::Acquire)];
        for bucket in latency_us.iter() {
            let mut count = bucket.count();
            // Bucket counts are 32-bit here; a peer's half-second never comes near that.
            while count > 0 {
                let step = count.min(u64::from(u32::MAX));
                let _ = slice.histogram().add(bucket.start(), step as u32);
                count -= step;
            }
        }
        slice.errors.fetch_add(errors, Ordering::Relaxed);
        slice.requests.fetch_add(requests, Ordering::Release);
        self.live()[shard::index()]
            .total
            .fetch_add(requests, Ordering::Release);
    }

    /// The per-thread parts, made by the first request.
    #[inline]
    fn live(&self) -> &[Padded<Live>] {
        self.live
            .get_or_init(|| (0..shard::count()).map(|_| Padded::default()).collect())
    }

    /// The per-thread parts if any request made them (none for an idle pool).
    fn live_shards(&self) -> &[Padded<Live>] {
        self.live.get().map_or(&[], |l| l)
    }

    /// Move every thread's part of the open slice into `slice`: one swap of each
    /// shard's counts, and its latencies when it had requests (a shard without
    /// requests since the last move has no latency of this slice; one whose count
    /// comes just after the swap keeps its latency until the next).
    fn drain_live(&self, slice: &Slice) {
        let mut scratch: Option<Histogram32> = None;
        for live in self.live_shards() {
            let counts = live.counts.swap(0, Ordering::AcqRel);
            if counts == 0 {
                continue;
            }
            slice
                .requests
                .fetch_add(counts & 0xffff_ffff, Ordering::Relaxed);
            slice.errors.fetch_add(counts >> 32, Ordering::Relaxed);
            let Some(h) = live.latency_us.get() else {
                continue;
            };
            // Read every bucket, then take from each non-empty one exactly what was read
            // (a wrapping add of its negation): a sample added in between stays. A swap
            // of every bucket would write ~700 of them, most of them empty.
            let moved = scratch.get_or_insert_with(empty_histogram);
            if h.load_into(moved).is_err() {
                continue;
            }
            for bucket in moved.iter().filter(|b| b.count() > 0) {
                // Read from 32-bit buckets: the count fits.
                let count = u32::try_from(bucket.count()).unwrap_or(u32::MAX);
                let _ = h.add(bucket.start(), count.wrapping_neg());
                let _ = slice.histogram().add(bucket.start(), count);
            }
        }
    }

    pub fn slice_len(&self) -> Duration {
        self.slice_len
    }

    /// The window's full length (all slices but the current one).
    pub fn length(&self) -> Duration {
        self.slice_len * (self.slices.len() as u32 - 1)
    }

    /// Record one request. Lock-free; called on the request path.
    #[inline]
    pub fn record(&self, error: bool, latency: Duration) {
        let live = &self.live()[shard::index()];
        let us = (latency.as_micros() as u64).min(MAX_MICROS);
        // The latency before the count (Release: a rotation that moves the count sees
        // the latency, and moves it with it), and the count before `total`: a rotation
        // that reads the total and then finds every slice and shard empty knows that
        // any request it missed moves the total on afterwards, so the next rotation is
        // not deferred with that request left unclosed.
        let _ = live.histogram().increment(us);
        let counts = ONE_REQUEST + if error { ONE_ERROR } else { 0 };
        live.counts.fetch_add(counts, Ordering::Release);
        live.total.fetch_add(1, Ordering::Release);
    }

    /// Count a failed attempt that was retried: a request and an error, with no latency
    /// sample (the attempt's answer never reached the client).
    pub fn record_failed_attempt(&self) {
        let live = &self.live()[shard::index()];
        // Count before total, as in `record`.
        live.counts
            .fetch_add(ONE_REQUEST + ONE_ERROR, Ordering::Release);
        live.total.fetch_add(1, Ordering::Release);
    }

    /// Advance the ring to `now`: every slice that ended is closed (and kept in the
    /// history) and the oldest is cleared to become current. The first call only starts
    /// the clock.
    ///
    /// While every slice is empty and nothing was recorded since the last call, the
    /// rotations due would only close empty slices: they are deferred, and `now` noted
    /// as a time the window was still empty. The next call that finds traffic, or the
    /// next read, makes them first (see [`Window::catch_up`]). An idle pool's rotation
    /// is three loads and a store, with no lock.
    pub fn rotate(&self, now: Instant) {
        // The idle case: nothing recorded since the last rotation left every slice
        // empty. Only the rotating writer stores `quiet_total`, so it reads its own last
        // word here; and its `now` only grows, so a plain store keeps the latest.
        if let Some(epoch) = self.epoch.get()
            && self.quiet_total.load(Ordering::Relaxed) == self.total()
        {
            let ns = now.saturating_duration_since(*epoch).as_nanos() as u64;
            self.deferred_ns
                .store(ns.saturating_add(1), Ordering::Relaxed);
            return;
        }
        let mut clock = self.clock();
        if clock.start.is_none() {
            clock.start = Some(now);
            let _ = self.epoch.set(now);
            self.note_quiet(self.total());
            return;
        }
        // Every count made before a shard's total was read here is seen by
        // `note_quiet` (recorders add to the total with Release, after their count,
        // and `total` reads with Acquire). A shard read before a request's add misses
        // it, and then the sum moves past this one later: totals only grow.
        let total = self.total();
        self.catch_up(&mut clock);
        self.rotate_locked(&mut clock, now);
        self.note_quiet(total);
    }

    /// After a rotation that started with `total` requests recorded: whether the next
    /// ones may be deferred. A request recorded meanwhile moved `total` past it.
    fn note_quiet(&self, total: u64) {
        let quiet = if self.ring_empty() { total } else { NOT_QUIET };
        self.quiet_total.store(quiet, Ordering::Relaxed);
    }

    /// No slice or shard holds a request. A shard may hold a latency sample whose
    /// count is still to come, and then the total moves on with that count.
    fn ring_empty(&self) -> bool {
        self.slices
            .iter()
            .all(|s| s.requests.load(Ordering::Relaxed) == 0)
            && self.live_shards().iter().all(|l| l.counts().0 == 0)
    }

    /// Make the rotations deferred while the window was quiet, as of the last time it
    /// was seen quiet: every slice closed in between was empty (so the history and the
    /// exposure's span grow by that many empty slices, as they would have one by one),
    /// and the slice open then is the current one now — it holds whatever came since.
    /// Its contents stay where recorders put them; the ring is renumbered around it.
    fn catch_up(&self, clock: &mut Rotation) {
        let deferred = self.deferred_ns.swap(0, Ordering::Relaxed);
        let (Some(epoch), Some(start)) = (self.epoch.get(), clock.start) else {
            return;
        };
        if deferred == 0 {
            return;
        }
        let until = *epoch + Duration::from_nanos(deferred - 1);
        let steps =
            (until.saturating_duration_since(start).as_nanos() / self.slice_len.as_nanos()) as u64;
        if steps == 0 {
            return;
        }
        let first = self.rotations.load(Ordering::Relaxed);
        let number = first + steps;
        let current = self.current.load(Ordering::Relaxed);
        let n = self.slices.len();
        // The slice `k` behind the current one was opened `k` rotations earlier, as if
        // the ring had turned one slice at a time. All but the current one are empty.
        for k in 0..n {
            self.slices[(current + n - k) % n]
                .opened
                .store(number.saturating_sub(k as u64), Ordering::Relaxed);
        }
        self.rotations.store(number, Ordering::Relaxed);
        let skipped = self.slice_len.as_nanos() * u128::from(steps);
        clock.start = Some(start + Duration::from_nanos(skipped as u64));
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.push_run(Point::default(), steps);
        drop(history);
        // The closed slices are numbered first..number-1; the exposure counts those
        // opened since both its start and the last reset.
        let mut exposure = self.exposure.lock().unwrap_or_else(|p| p.into_inner());
        let from = exposure
            .from
            .max(self.visible_from.load(Ordering::Relaxed))
            .max(first);
        exposure.slices = exposure
            .slices
            .saturating_add(number.saturating_sub(from).min(u64::from(u32::MAX)) as u32);
    }

    fn rotate_locked(&self, clock: &mut Rotation, now: Instant) {
        let Some(mut s) = clock.start else { return };
        if now.saturating_duration_since(s) < self.slice_len {
            return;
        }
        // The open slice closes now: it takes every thread's part first. What threads
        // record from here on belongs to the slice current when this call ends.
        self.drain_live(&self.slices[self.current.load(Ordering::Relaxed)]);
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let mut steps = 0;
        while now.saturating_duration_since(s) >= self.slice_len {
            s += self.slice_len;
            steps += 1;
            if steps > self.slices.len() {
                // Idle for longer than the whole window: everything is stale, and every
                // slice since (this one included) was empty. The current slice was never
                // closed: its traffic still goes into the running sums.
                let open = &self.slices[self.current.load(Ordering::Relaxed)];
                if let Some(c) = self
                    .cumulative
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                {
                    let (point, latency) = open.point();
                    c.add(point.requests, point.errors, latency.as_ref());
                }
                for slice in self.slices.iter() {
                    slice.clear();
                }
                let elapsed = now.saturating_duration_since(s);
                let whole = (elapsed.as_nanos() / self.slice_len.as_nanos()) as u32;
                s += self.slice_len * whole;
                history.push_run(Point::default(), u64::from(whole) + 1);
                let number = self
                    .rotations
                    .fetch_add(u64::from(whole) + 1, Ordering::Relaxed)
                    + u64::from(whole)
                    + 1;
                let current = self.current.load(Ordering::Relaxed);
                self.slices[current].opened.store(number, Ordering::Relaxed);
                break;
            }
            let current = self.current.load(Ordering::Relaxed);
            let next = (current + 1) % self.slices.len();
            self.slices[next].clear();
            let number = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
            self.slices[next].opened.store(number, Ordering::Relaxed);
            // Release: whoever sees the new index (Acquire) sees the slice cleared, so
            // no increment lands before the clear and is lost.
            self.current.store(next, Ordering::Release);
            // Summed up after the switch: recorders have moved on, so the point holds
            // (nearly) everything the slice will ever get.
            let closed = &self.slices[current];
            let (point, latency) = closed.point();
            history.push(point);
            if let Some(c) = self
                .cumulative
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                c.add(point.requests, point.errors, latency.as_ref());
            }
            let mut exposure = self.exposure.lock().unwrap_or_else(|p| p.into_inner());
            if closed.opened.load(Ordering::Relaxed) >= exposure.from
                && closed.opened.load(Ordering::Relaxed)
                    >= self.visible_from.load(Ordering::Relaxed)
            {
                exposure.requests += point.requests;
                exposure.errors += point.errors;
                exposure.slices += 1;
                // Past ~4 billion samples in one bucket the latency evidence stops
                // growing (the counts above keep going); a restart clears it.
                if let Some(latency) = latency {
                    match &mut exposure.latency_us {
                        Some(h) => {
                            let _ = h.checked_add_assign(&latency);
                        }
                        None => exposure.latency_us = Some(latency),
                    }
                }
            }
        }
        clock.start = Some(s);
    }

    /// The newest history points covering at most `span`, oldest first.
    pub fn series(&self, span: Duration) -> Series {
        // The newest point ends where the current slice starts. Locked in `rotate`'s
        // order: start, then history.
        let mut clock = self.clock();
        self.catch_up(&mut clock);
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let n = (span.as_nanos().div_ceil(self.slice_len.as_nanos()) as usize).min(history.len);
        Series {
            points: history.newest(n),
            end: if history.len == 0 { None } else { clock.start },
            step: self.slice_len,
        }
    }

    /// Figures over at least the most recent `span`: the current slice, still filling,
    /// plus enough closed slices to cover `span`; the whole ring when `span` is the
    /// window's length or more.
    pub fn stats(&self, span: Duration) -> Stats {
        let wanted = (span.as_nanos().div_ceil(self.slice_len.as_nanos()) as usize + 1)
            .min(self.slices.len());
        let current = self.current.load(Ordering::Acquire);
        let visible_from = self.visible_from.load(Ordering::Relaxed);
        let mut stats = Stats {
            requests: 0,
            errors: 0,
            latency_us: empty_histogram(),
            span: self.slice_len * wanted as u32,
        };
        // Deferred rotations need no catching up here: they only stand for empty
        // slices, and the sums over empty slices are the same wherever they sit.
        for k in 0..wanted {
            let slice = &self.slices[(current + self.slices.len() - k) % self.slices.len()];
            if slice.opened.load(Ordering::Relaxed) < visible_from {
                // Older slices are older still: nothing further back is visible.
                break;
            }
            stats.requests += slice.requests.load(Ordering::Relaxed);
            stats.errors += slice.errors.load(Ordering::Relaxed);
            if let Some(h) = slice.latency_us.get() {
                let _ = stats.latency_us.checked_add_assign(&h.load());
            }
            if k == 0 {
                // The open slice's parts still with the threads.
                for live in self.live_shards() {
                    let (r, e) = live.counts();
                    stats.requests += r;
                    stats.errors += e;
                    if let Some(h) = live.latency_us.get() {
                        let _ = stats.latency_us.checked_add_assign(&h.load());
                    }
                }
            }
        }
        stats
    }

    /// Figures over the exposure: every closed slice since [`Window::restart_exposure`]
    /// (or a reset). `span` is the time they cover.
    pub fn exposure(&self) -> Stats {
        let mut clock = self.clock();
        self.catch_up(&mut clock);
        let e = self.exposure.lock().unwrap_or_else(|p| p.into_inner());
        Stats {
            requests: e.requests,
            errors: e.errors,
            latency_us: e.latency_us.clone().unwrap_or_else(empty_histogram),
            span: self.slice_len * e.slices,
        }
    }

    /// Start a new exposure from the next slice on: what the candidate serves from now
    /// is judged on its own (the slice open now mixes before and after, so it is left
    /// out).
    pub fn restart_exposure(&self) {
        let mut clock = self.clock();
        self.catch_up(&mut clock);
        let from = self.rotations.load(Ordering::Relaxed) + 1;
        *self.exposure.lock().unwrap_or_else(|p| p.into_inner()) = Exposure::new(from);
    }

    /// Every slice was empty at the last rotation and nothing was recorded since: the
    /// next rotations would be deferred.
    pub fn is_quiet(&self) -> bool {
        self.quiet_total.load(Ordering::Relaxed) == self.total()
    }

    /// Requests recorded since the pool was created; never reset. The sum of every
    /// thread's count (Acquire: see [`Window::rotate`]).
    pub fn total(&self) -> u64 {
        self.live_shards()
            .iter()
            .map(|l| l.total.load(Ordering::Acquire))
            .sum()
    }

    /// Forget everything recorded so far (e.g. after a rollback, so the next judgement
    /// is about the next traffic only): `stats` sees only slices opened from the next
    /// rotation on. Requests landing in the current slice are left out of judgements
    /// too — at most one slice of them — because the slice cannot be split; the history
    /// keeps them.
    pub fn reset(&self) {
        let mut clock = self.clock();
        self.catch_up(&mut clock);
        let from = self.rotations.load(Ordering::Relaxed) + 1;
        self.visible_from.store(from, Ordering::Relaxed);
        *self.exposure.lock().unwrap_or_else(|p| p.into_inner()) = Exposure::new(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn totals_only_grow_across_rotations_resets_and_idle_gaps() {
        let w = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        w.rotate(t0);
        let mut last = w.totals();
        assert_eq!((last.requests, last.errors), (0, 0));
        let mut t = t0;
        for k in 1..=20u64 {
            w.record(k % 4 == 0, Duration::from_millis(k));
            if k == 10 {
                w.reset();
            }
            if k % 3 == 0 {
                t += S;
                w.rotate(t);
            }
            let now = w.totals();
            assert_eq!((now.requests, now.errors), (k, k / 4), "after request {k}");
            let counted: u64 = now.latency_us.iter().map(|b| b.count()).sum();
            assert_eq!(counted, k);
            assert!(now.requests >= last.requests);
            last = now;
        }
        // Idle far longer than the window: the open slice's traffic stays counted.
        w.record(true, Duration::from_millis(1));
        w.rotate(t + S * 100);
        assert_eq!((w.totals().requests, w.totals().errors), (21, 6));
    }

    #[test]
    fn added_traffic_counts_like_recorded_traffic() {
        let here = Window::new(Duration::from_secs(3), S);
        let there = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        here.rotate(t0);
        there.rotate(t0);
        for k in 0..50u64 {
            there.record(k % 5 == 0, Duration::from_millis(10 + k));
        }
        let delta = there.totals();
        here.add(delta.requests, delta.errors, &delta.latency_us);
        let (a, b) = (here.stats(S), there.stats(S));
        assert_eq!((a.requests, a.errors), (b.requests, b.errors));
        assert_eq!(a.p99(), b.p99());
        assert_eq!(here.total(), 50);
    }

    #[test]
    fn counts_and_rates() {
        let w = Window::new(Duration::from_secs(5), S);
        let t0 = Instant::now();
        w.rotate(t0);
        for i in 0..100 {
            w.record(i % 10 == 0, Duration::from_millis(2));
        }
        let s = w.stats(Duration::from_secs(5));
        assert_eq!((s.requests, s.errors), (100, 10));
        assert!((s.error_rate() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn exposure_accumulates_closed_slices_until_restarted() {
        let w = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        w.rotate(t0);
        for k in 1..=10u32 {
            w.record(k % 2 == 0, Duration::from_millis(u64::from(k)));
            w.rotate(t0 + S * k);
        }
        // Ten closed slices, far more than the 3 s window holds.
        let e = w.exposure();
        assert_eq!((e.requests, e.errors), (10, 5));
        assert_eq!(e.span, S * 10);
        assert_eq!(w.stats(Duration::from_secs(3)).requests, 3);
        // A restart leaves out the slice open at the time (it mixes before and after).
        w.record(true, Duration::from_millis(1));
        w.restart_exposure();
        w.record(true, Duration::from_millis(1));
        w.rotate(t0 + S * 11);
        assert_eq!(w.exposure().requests, 0);
        w.record(false, Duration::from_millis(1));
        w.rotate(t0 + S * 12);
        let e = w.exposure();
        assert_eq!((e.requests, e.errors), (1, 0));
        assert!(e.p99().is_some());
        // A reset (after a rollback) restarts it too.
        w.reset();
        w.rotate(t0 + S * 13);
        assert_eq!(w.exposure().requests, 0);
    }

    #[test]
    fn old_slices_fall_out_of_the_window() {
        let w = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        w.rotate(t0);
        w.record(true, Duration::from_millis(1));
        for k in 1..=3 {
            w.rotate(t0 + S * k);
            w.record(false, Duration::from_millis(1));
        }
        // Four slices: the error one is still the oldest of 3 s + current.
        assert_eq!(w.stats(Duration::from_secs(3)).errors, 1);
        w.rotate(t0 + S * 4);
        let s = w.stats(Duration::from_secs(3));
        assert_eq!((s.requests, s.errors), (3, 0));
        // A shorter span sees only the newest slices: the (empty) current one plus
        // enough closed ones.
        assert_eq!(w.stats(S).requests, 1);
        assert_eq!(w.stats(S * 2).requests, 2);
    }

    #[test]
    fn a_long_idle_gap_clears_everything() {
        let w = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        w.rotate(t0);
        w.record(true, Duration::from_millis(1));
        w.rotate(t0 + Duration::from_secs(3600));
        assert_eq!(w.stats(Duration::from_secs(3)).requests, 0);
        w.record(false, Duration::from_millis(1));
        assert_eq!(w.stats(S).requests, 1);
    }

    #[test]
    fn rotation_keeps_its_phase() {
        let w = Window::new(Duration::from_secs(2), S);
        let t0 = Instant::now();
        w.rotate(t0);
        w.record(false, Duration::ZERO);
        // Not yet a full slice: nothing rotates, the request is in the current slice.
        w.rotate(t0 + Duration::from_millis(999));
        w.record(false, Duration::ZERO);
        w.rotate(t0 + Duration::from_millis(1500));
        // Rotated once at 1 s: slices [2 requests], [] (current).
        w.record(false, Duration::ZERO);
        // The next boundary is at 2 s, not 2.5 s: at 2 s the ring turns again and
        // the oldest slice (2 requests) falls out of the three-slice ring.
        w.rotate(t0 + Duration::from_millis(2000));
        w.rotate(t0 + Duration::from_millis(2999));
        assert_eq!(w.stats(S * 2).requests, 3);
        w.rotate(t0 + Duration::from_millis(3000));
        assert_eq!(w.stats(S * 2).requests, 1);
    }

    #[test]
    fn quantiles_are_within_a_few_percent() {
        let w = Window::new(Duration::from_secs(5), S);
        w.rotate(Instant::now());
        for ms in 1..=1000u64 {
            w.record(false, Duration::from_millis(ms));
        }
        let s = w.stats(Duration::from_secs(5));
        let p50 = s.p50().unwrap().as_secs_f64() * 1000.0;
        let p99 = s.p99().unwrap().as_secs_f64() * 1000.0;
        assert!((p50 / 500.0 - 1.0).abs() < 0.04, "p50 {p50}");
        assert!((p99 / 990.0 - 1.0).abs() < 0.04, "p99 {p99}");
        assert!(Window::new(S, S).stats(S).p99().is_none());
    }

    #[test]
    fn reset_forgets_for_judgements_but_not_for_the_history() {
        let w = Window::new(Duration::from_secs(5), S);
        let t0 = Instant::now();
        w.rotate(t0);
        w.record(true, Duration::ZERO);
        w.rotate(t0 + S);
        w.record(true, Duration::ZERO);
        w.reset();
        assert_eq!(w.stats(Duration::from_secs(5)).requests, 0);
        // The slice current at the reset stays hidden; the next ones count.
        w.record(false, Duration::ZERO);
        w.rotate(t0 + S * 2);
        assert_eq!(w.stats(Duration::from_secs(5)).requests, 0);
        w.record(false, Duration::ZERO);
        assert_eq!(w.stats(Duration::from_secs(5)).requests, 1);
        let points = w.series(Duration::from_secs(60)).points;
        assert_eq!(
            points
                .iter()
                .map(|p| (p.requests, p.errors))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 1)]
        );
        // Seen through a whole ring turn later, nothing old comes back.
        w.rotate(t0 + S * 3);
        assert_eq!(w.stats(Duration::from_secs(5)).requests, 1);
    }

    #[test]
    fn history_keeps_one_point_per_closed_slice() {
        let w = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        assert!(w.series(HISTORY).end.is_none());
        w.rotate(t0);
        for ms in 1..=100u64 {
            w.record(ms > 90, Duration::from_millis(ms));
        }
        w.rotate(t0 + S);
        let s = w.series(HISTORY);
        assert_eq!(s.end, Some(t0 + S));
        assert_eq!(s.step, S);
        assert_eq!(s.points.len(), 1);
        let p = s.points[0];
        assert_eq!((p.requests, p.errors), (100, 10));
        let p99 = p.p99_us.unwrap() as f64 / 1000.0;
        assert!((p99 / 99.0 - 1.0).abs() < 0.04, "p99 {p99}");
        // Idle slices are points too (zero requests, no latency), and the history
        // outlives the ring.
        w.rotate(t0 + S * 10);
        let s = w.series(HISTORY);
        assert_eq!(s.points.len(), 10);
        assert_eq!(s.end, Some(t0 + S * 10));
        assert!(s.points[1..].iter().all(|p| *p == Point::default()));
        // A span asks for the newest points only.
        assert_eq!(w.series(S * 2).points.len(), 2);
        // An hour idle: the history holds HISTORY's worth of empty points, no more.
        w.rotate(t0 + Duration::from_secs(3600));
        let s = w.series(Duration::from_secs(3600));
        assert_eq!(s.points.len(), HISTORY.as_secs() as usize);
        assert!(s.points.iter().all(|p| p.requests == 0));
        assert_eq!(s.end, Some(t0 + Duration::from_secs(3600)));
    }

    /// Everything a reader can see of a window, to compare two of them.
    fn seen(w: &Window) -> String {
        let fig = |s: &Stats| (s.requests, s.errors, s.span, s.p50(), s.p99());
        let t = w.totals();
        format!(
            "stats {:?} {:?} {:?}\nexposure {:?}\nseries {:?}\ntotals {} {} {}",
            fig(&w.stats(S)),
            fig(&w.stats(S * 3)),
            fig(&w.stats(S * 30)),
            fig(&w.exposure()),
            w.series(HISTORY),
            t.requests,
            t.errors,
            t.latency_us.iter().map(|b| b.count()).sum::<u64>(),
        )
    }

    #[test]
    fn deferred_idle_rotation_leaves_the_same_figures_as_turning_every_slice() {
        // Two windows fed the same traffic and the same rotation calls (every 100 ms,
        // as the guard makes them); one is kept from deferring. Long idle stretches,
        // bursts at odd offsets, resets and exposure restarts, and reads in between.
        let lazy = Window::new(Duration::from_secs(3), S);
        let eager = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        let tick = Duration::from_millis(100);
        let mut deferred = 0;
        for k in 0..1200u32 {
            let now = t0 + tick * k;
            // Traffic in a few bursts, with gaps longer than the ring and shorter.
            let busy = matches!(k, 3..=14 | 95..=97 | 131 | 402..=460 | 461 | 1000..=1003);
            if busy {
                let feed = || {
                    for w in [&lazy, &eager] {
                        w.record(k % 3 == 0, Duration::from_millis(u64::from(k % 17) + 1));
                        if k % 5 == 0 {
                            w.record_failed_attempt();
                        }
                    }
                };
                // Every other busy tick from a thread of its own: traffic spread over
                // several per-thread parts must defer and catch up the same way.
                if k % 2 == 1 {
                    std::thread::scope(|s| {
                        s.spawn(feed);
                    });
                } else {
                    feed();
                }
            }
            if matches!(k, 200 | 700) {
                lazy.reset();
                eager.reset();
            }
            if matches!(k, 300 | 455 | 900) {
                lazy.restart_exposure();
                eager.restart_exposure();
            }
            eager.quiet_total.store(NOT_QUIET, Ordering::Relaxed);
            eager.rotate(now);
            lazy.rotate(now);
            if lazy.deferred_ns.load(Ordering::Relaxed) != 0 {
                deferred += 1;
            }
            // Reads at a few moments only: a read catches up, and the point is to
            // compare after long deferred stretches too.
            if k % 97 == 0 || busy || k == 1199 {
                assert_eq!(seen(&lazy), seen(&eager), "at tick {k}");
            }
        }
        assert!(deferred > 500, "idle rotations were deferred: {deferred}");
        let parts = lazy
            .live_shards()
            .iter()
            .filter(|l| l.total.load(Ordering::Relaxed) > 0);
        assert!(
            parts.count() >= shard::count().min(2),
            "traffic came from several parts"
        );
    }

    #[test]
    fn an_idle_window_allocates_no_latency_histogram() {
        let w = Window::new(Duration::from_secs(30), S);
        let t0 = Instant::now();
        for k in 0..100 {
            w.rotate(t0 + S * k);
        }
        assert!(w.slices.iter().all(|s| s.latency_us.get().is_none()));
        assert!(
            w.live.get().is_none(),
            "no per-thread parts before a request"
        );
        assert!(w.exposure.lock().unwrap().latency_us.is_none());
        // A hundred idle seconds are one run of empty points in the history.
        assert_eq!(w.series(HISTORY).points.len(), 99);
        assert_eq!(w.history.lock().unwrap().runs.len(), 1);
        // The first request allocates its thread's histogram, and only that one; the
        // rotation that closes its slice, that slice's.
        w.record(false, Duration::from_millis(5));
        let allocated = || {
            let slices = w.slices.iter().filter(|s| s.latency_us.get().is_some());
            let live = w
                .live_shards()
                .iter()
                .filter(|l| l.latency_us.get().is_some());
            (slices.count(), live.count())
        };
        assert_eq!(allocated(), (0, 1));
        w.rotate(t0 + S * 100);
        assert!(w.exposure().p99().is_some());
        assert_eq!(allocated(), (1, 1));
    }

    #[test]
    fn threads_record_into_their_own_shards_and_readers_see_the_sum() {
        let w = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        w.rotate(t0);
        let _ = w.totals(); // starts the running sums
        let mut used: Vec<usize> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4u64)
                .map(|k| {
                    let w = &w;
                    s.spawn(move || {
                        for i in 0..1000u64 {
                            w.record(i % 10 == 0, Duration::from_millis(k + 1));
                        }
                        shard::index()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        // Every thread wrote its own shard only.
        used.sort_unstable();
        used.dedup();
        let busy: Vec<usize> = (0..shard::count())
            .filter(|&i| w.live_shards()[i].total.load(Ordering::Relaxed) > 0)
            .collect();
        assert_eq!(busy, used);
        assert_eq!(w.total(), 4000);
        let open = w.stats(S);
        assert_eq!((open.requests, open.errors), (4000, 400));
        assert_eq!(
            open.latency().into_iter().map(|b| b.count()).sum::<u64>(),
            4000
        );
        // The rotation moves them into the slice that closes: the same figures,
        // nothing left with the threads.
        w.rotate(t0 + S);
        assert!(w.live_shards().iter().all(|l| l.counts() == (0, 0)));
        let closed = w.stats(S);
        assert_eq!((closed.requests, closed.errors), (4000, 400));
        assert_eq!(closed.p50(), open.p50());
        assert_eq!(w.series(S).points[0].requests, 4000);
        assert_eq!(w.totals().requests, 4000);
    }

    #[test]
    fn requests_recorded_while_the_ring_turns_are_each_counted_once() {
        // Recorders on several threads race a rotator that turns the ring (and defers
        // idle turns) as fast as it can: at the end every request is in exactly one
        // closed slice or the open one, and the deferral never skipped one.
        let w = Window::new(Duration::from_secs(3), S);
        let t0 = Instant::now();
        w.rotate(t0);
        let _ = w.totals(); // starts the running sums
        let done = AtomicUsize::new(0);
        let mut turns = 0u32;
        std::thread::scope(|s| {
            for k in 0..3u64 {
                let (w, done) = (&w, &done);
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        if i % 7 == 0 {
                            w.record_failed_attempt();
                        } else {
                            w.record(i % 5 == 0, Duration::from_micros(100 * (k + 1)));
                        }
                        if i % 4096 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
            while done.load(Ordering::Relaxed) < 3 {
                turns += 1;
                w.rotate(t0 + S * turns);
            }
        });
        let sent = 3 * 20_000u64;
        let errors_sent = 3 * (0..20_000u64).filter(|i| i % 7 == 0 || i % 5 == 0).count() as u64;
        assert_eq!(w.total(), sent);
        let t = w.totals();
        assert_eq!((t.requests, t.errors), (sent, errors_sent));
        // Once the open slice closes too, the closed slices hold them all, once.
        turns += 1;
        w.rotate(t0 + S * turns);
        let e = w.exposure();
        assert_eq!(
            (e.requests, e.errors),
            (sent, errors_sent),
            "after {turns} turns"
        );
        assert_eq!(w.totals().requests, sent);
        // Once those slices have left the ring, the window is quiet again.
        for k in 1..=4 {
            w.rotate(t0 + S * (turns + k));
        }
        assert!(w.is_quiet());
    }

    #[test]
    fn history_runs_hold_the_newest_points_up_to_capacity() {
        let mut h = History {
            capacity: 5,
            ..History::default()
        };
        let p = |requests| Point {
            requests,
            ..Point::default()
        };
        h.push(p(1));
        h.push_run(p(0), 3);
        h.push(p(2));
        h.push(p(2));
        assert_eq!(h.len, 5);
        let n = |v: Vec<Point>| v.iter().map(|p| p.requests).collect::<Vec<_>>();
        assert_eq!(n(h.newest(5)), [0, 0, 0, 2, 2]);
        assert_eq!(n(h.newest(2)), [2, 2]);
        assert_eq!(n(h.newest(0)), Vec::<u64>::new());
        h.push_run(p(0), 1_000_000);
        assert_eq!((h.len, h.runs.len()), (5, 1));
        assert_eq!(n(h.newest(5)), [0; 5]);
    }
}
