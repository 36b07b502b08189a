//! Prometheus metrics: names in one place, explicit histogram buckets, and handles cached
//! per pool so the request path never builds a metric name or label set.
//!
//! Each `Weir` owns its own recorder (no global one), so several instances in one process
//! — tests, mostly — never mix their series.
//!
//! What every request records (counts by status, errors, failures, retries, in flight and
//! the two latency histograms) is not written to the exporter's handles, which every
//! core would share: each thread adds to its own [`shard`] of the pool's
//! [`PoolSeries`], and a scrape adds the shards up. Counters and the in-flight gauge are
//! then handed to the exporter (which renders them with the rest); the histograms, whose
//! buckets the exporter cannot take as counts, are rendered here in the same format.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::formatting::{
    sanitize_label_value, write_help_line, write_type_line,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::telemetry::shard::{self, Padded};

use crate::model::Source;
use crate::model::{Blame, ErrorKind, GRPC_CODES, Phase};

pub(crate) const REQUESTS_TOTAL: &str = "weir_requests_total";
pub(crate) const REQUEST_DURATION: &str = "weir_request_duration_seconds";
pub(crate) const UPSTREAM_ERRORS_TOTAL: &str = "weir_upstream_errors_total";
pub(crate) const INFLIGHT: &str = "weir_inflight_requests";
/// Upgraded connections (WebSocket tunnels) open through a pool.
pub(crate) const TUNNELS_OPEN: &str = "weir_tunnels_open";
pub(crate) const POOL_WEIGHT: &str = "weir_pool_weight";
pub(crate) const POOL_SHARE: &str = "weir_pool_share";
pub(crate) const WEIGHT_CHANGES_TOTAL: &str = "weir_weight_changes_total";
pub(crate) const BUILD_INFO: &str = "weir_build_info";
pub(crate) const ROLLBACKS_TOTAL: &str = "weir_rollbacks_total";
pub(crate) const ROLLOUT_PHASE: &str = "weir_rollout_phase";
pub(crate) const ENDPOINT_HEALTHY: &str = "weir_endpoint_healthy";
pub(crate) const ENDPOINT_EJECTIONS_TOTAL: &str = "weir_endpoint_ejections_total";
pub(crate) const RETRIES_TOTAL: &str = "weir_retries_total";
pub(crate) const ROLLOUT_STEP: &str = "weir_rollout_step";
pub(crate) const WOULD_ROLL_BACK_TOTAL: &str = "weir_guard_dry_run_rollbacks_total";
pub(crate) const REQUEST_FAILURES_TOTAL: &str = "weir_request_failures_total";
pub(crate) const CLIENT_ERRORS_TOTAL: &str = "weir_client_errors_total";
pub(crate) const GRPC_RESPONSES_TOTAL: &str = "weir_grpc_responses_total";
pub(crate) const RESPONSE_DURATION: &str = "weir_response_duration_seconds";
pub(crate) const UNROUTED_TOTAL: &str = "weir_unrouted_requests_total";
pub(crate) const KEEPALIVE_REPLAYS_TOTAL: &str = "weir_keepalive_replays_total";
pub(crate) const STATE_UNSAVED: &str = "weir_state_unsaved_changes";
pub(crate) const STATE_WRITABLE: &str = "weir_state_writable";
pub(crate) const POOL_INFO: &str = "weir_pool_info";
/// A pool's p99 over the guard's window: the one p99 the API, the dashboard and
/// `weir ctl` show, set when `/metrics` is rendered.
pub(crate) const POOL_LATENCY_P99: &str = "weir_pool_latency_p99_seconds";
/// A service's SLO limits, for the lines Grafana draws beside the figures.
pub(crate) const SLO_MAX_ERROR_RATE: &str = "weir_slo_max_error_rate";
pub(crate) const SLO_MAX_P99: &str = "weir_slo_max_p99_seconds";

/// How often the exporter's upkeep drains histogram samples into buckets, so memory
/// stays bounded however fast requests come.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Latency buckets: 0.5 ms to 10 s in 20 exponential steps (×1.68 each), fine enough
/// for p50/p99 of both a 1 ms cache hit and a 5 s slow path.
pub(crate) fn duration_buckets() -> Vec<f64> {
    duration_bounds().to_vec()
}

/// [`duration_buckets`], worked out once.
fn duration_bounds() -> &'static [f64; BUCKETS] {
    static BOUNDS: OnceLock<[f64; BUCKETS]> = OnceLock::new();
    BOUNDS.get_or_init(|| {
        let v = bucket_bounds();
        std::array::from_fn(|i| v[i])
    })
}

/// Latency buckets per histogram (the `+Inf` one aside).
const BUCKETS: usize = 20;

const REQUEST_DURATION_HELP: &str = "Time from request received to response headers sent.";
const RESPONSE_DURATION_HELP: &str =
    "Time from request received to the response's last byte (streams: their whole life).";

fn bucket_bounds() -> Vec<f64> {
    let (lo, hi, n) = (0.0005f64, 10.0f64, BUCKETS as i32);
    let factor = (hi / lo).powf(1.0 / (n - 1) as f64);
    (0..n)
        .map(|i| {
            let b = lo * factor.powi(i);
            // Round to 4 significant digits so `le` labels read well.
            let scale = 10f64.powi(3 - b.log10().floor() as i32);
            (b * scale).round() / scale
        })
        .collect()
}

/// One instance's recorder and the handle that renders it.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    unrouted: Counter,
    unsaved: Gauge,
    /// The services whose rollout gauges exist (see [`Metrics::rollout`]).
    rollouts: Mutex<HashSet<String>>,
    /// Every pool's per-request series, by (service, pool): a pool rebuilt by a reload
    /// carries on with the same series, as the exporter's handles would.
    series: Mutex<HashMap<SeriesKey, Arc<PoolSeries>>>,
}

/// A pool's series are known by its service's and its own name.
type SeriesKey = (Arc<str>, Arc<str>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), ::metrics::Level::INFO, None);

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &duration_buckets())
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(RESPONSE_DURATION.into()),
                    &duration_buckets(),
                )
            })
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let unrouted = recorder.register_counter(&Key::from_name(UNROUTED_TOTAL), &METADATA);
        let unsaved = recorder.register_gauge(&Key::from_name(STATE_UNSAVED), &METADATA);
        unsaved.set(0.0);
        let m = Metrics {
            recorder,
            handle,
            unrouted,
            unsaved,
            rollouts: Mutex::new(HashSet::new()),
            series: Mutex::new(HashMap::new()),
        };
        m.describe();
        m.gauge(
            BUILD_INFO,
            vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        Arc::new(m)
    }

    fn describe(&self) {
        let r = &self.recorder;
        r.describe_counter(
            REQUESTS_TOTAL.into(),
            None,
            "Requests answered, by pool and HTTP status (weir's own 502/503/504 included; 499: the client went away), counted when the exchange ends.".into(),
        );
        r.describe_histogram(
            REQUEST_DURATION.into(),
            Some(Unit::Seconds),
            REQUEST_DURATION_HELP.into(),
        );
        r.describe_histogram(
            RESPONSE_DURATION.into(),
            Some(Unit::Seconds),
            RESPONSE_DURATION_HELP.into(),
        );
        r.describe_counter(
            UPSTREAM_ERRORS_TOTAL.into(),
            None,
            "Failures on the upstream's side of a request, by kind: connect, timeout, reset, protocol, no_endpoint.".into(),
        );
        r.describe_counter(
            REQUEST_FAILURES_TOTAL.into(),
            None,
            "Requests that count as a failure of the pool (what the SLO guard judges): upstream 5xx, upstream errors, broken bodies, gRPC failure codes. Never client faults.".into(),
        );
        r.describe_counter(
            CLIENT_ERRORS_TOTAL.into(),
            None,
            "Exchanges the client broke, never charged to the pool, by kind: client_abort, bad_request_body, client_timeout.".into(),
        );
        r.describe_counter(
            GRPC_RESPONSES_TOTAL.into(),
            None,
            "gRPC calls by the status they ended with (trailers, trailers-only, or derived from HTTP).".into(),
        );
        r.describe_counter(
            UNROUTED_TOTAL.into(),
            None,
            "Requests for a host no service is configured for (answered 404).".into(),
        );
        r.describe_gauge(
            STATE_WRITABLE.into(),
            None,
            "1 while the state dir takes writes; 0 while it refuses them (weir serves the saved routing and refuses changes with 503).".into(),
        );
        r.describe_gauge(
            STATE_UNSAVED.into(),
            None,
            "Changes applied to live routing but not yet saved to the state dir (a rollback is applied even when the disk refuses it, and retried). Alert when above 0.".into(),
        );
        r.describe_counter(
            KEEPALIVE_REPLAYS_TOTAL.into(),
            None,
            "Idempotent requests sent again on a fresh connection after a reused keep-alive connection closed under them with no answer.".into(),
        );
        r.describe_gauge(INFLIGHT.into(), None, "Requests in flight per pool.".into());
        r.describe_gauge(
            TUNNELS_OPEN.into(),
            None,
            "Upgraded connections (WebSocket) open per pool.".into(),
        );
        r.describe_gauge(
            POOL_WEIGHT.into(),
            None,
            "The weight in force per pool.".into(),
        );
        r.describe_gauge(
            POOL_SHARE.into(),
            None,
            "Weight / total weight per pool, 0..1.".into(),
        );
        r.describe_counter(
            WEIGHT_CHANGES_TOTAL.into(),
            None,
            "Weight changes per service, by source: admin, guard, rollout, config.".into(),
        );
        r.describe_gauge(
            BUILD_INFO.into(),
            None,
            "Always 1; the version label says which weir.".into(),
        );
        r.describe_gauge(
            ENDPOINT_HEALTHY.into(),
            None,
            "1 when the endpoint may take traffic (passing health checks, not ejected).".into(),
        );
        r.describe_counter(
            ENDPOINT_EJECTIONS_TOTAL.into(),
            None,
            "Times the endpoint was ejected for consecutive failures.".into(),
        );
        r.describe_counter(
            RETRIES_TOTAL.into(),
            None,
            "Requests retried on another endpoint of the same pool, by the failure that caused it."
                .into(),
        );
        r.describe_gauge(
            ROLLOUT_PHASE.into(),
            None,
            "1 for the service's current rollout phase, 0 for the others.".into(),
        );
        r.describe_gauge(
            ROLLOUT_STEP.into(),
            None,
            "Index of the rollout step in progress (the number of steps when done).".into(),
        );
        r.describe_counter(
            ROLLBACKS_TOTAL.into(),
            None,
            "Rollbacks by the SLO guard, by the check that failed.".into(),
        );
        r.describe_counter(
            WOULD_ROLL_BACK_TOTAL.into(),
            None,
            "Rollbacks the SLO guard would have made in dry-run mode, by check.".into(),
        );
        r.describe_gauge(
            POOL_LATENCY_P99.into(),
            Some(Unit::Seconds),
            "p99 latency over the guard's window (the SLO window, 30 s without one), as the admin API, dashboard and weir ctl show it; NaN without samples.".into(),
        );
        r.describe_gauge(
            SLO_MAX_ERROR_RATE.into(),
            None,
            "The service's SLO max_error_rate (0..1), when it sets one.".into(),
        );
        r.describe_gauge(
            SLO_MAX_P99.into(),
            Some(Unit::Seconds),
            "The service's SLO max_p99_latency, when it sets one.".into(),
        );
    }

    pub fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    /// Give a gauge registered elsewhere (fleet mode's) its help text.
    pub fn describe_gauge(&self, name: &'static str, help: &'static str) {
        self.recorder.describe_gauge(name.into(), None, help.into());
    }

    /// Give a counter registered elsewhere its help text.
    pub fn describe_counter(&self, name: &'static str, help: &'static str) {
        self.recorder
            .describe_counter(name.into(), None, help.into());
    }

    pub fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: Vec<Label>) -> Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels), &METADATA)
    }

    /// The Prometheus text exposition: the pools' shards added up and handed to the
    /// exporter, its rendering, and the latency histograms.
    pub fn render(&self) -> String {
        let mut series: Vec<Arc<PoolSeries>> = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.shards.get().is_some())
            .cloned()
            .collect();
        series.sort_by(|a, b| (&a.service, &a.pool).cmp(&(&b.service, &b.pool)));
        let sums: Vec<Sums> = series.iter().map(|s| s.publish(self)).collect();
        let mut text = self.handle.render();
        for (name, help, of) in [
            (
                REQUEST_DURATION,
                REQUEST_DURATION_HELP,
                (|s: &Sums| &s.duration) as fn(&Sums) -> &BucketSums,
            ),
            (RESPONSE_DURATION, RESPONSE_DURATION_HELP, |s: &Sums| {
                &s.response_duration
            }),
        ] {
            if series.is_empty() {
                break;
            }
            write_help_line(&mut text, name, None, None, help);
            write_type_line(&mut text, name, None, None, "histogram");
            for (s, sums) in series.iter().zip(&sums) {
                of(sums).render(&mut text, name, &s.labels());
            }
            text.push('\n');
        }
        text
    }

    /// The per-request series of `service`'s `pool`, made by the first asking.
    fn pool_series(&self, service: &Arc<str>, pool: &Arc<str>) -> Arc<PoolSeries> {
        let mut all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let key = (Arc::clone(service), Arc::clone(pool));
        Arc::clone(all.entry(key).or_insert_with(|| {
            Arc::new(PoolSeries {
                service: Arc::clone(service),
                pool: Arc::clone(pool),
                shards: OnceLock::new(),
                published: Mutex::new(None),
            })
        }))
    }

    /// Run the exporter's upkeep every few seconds for as long as this instance lives.
    pub fn spawn_upkeep(self: &Arc<Self>) {
        let weak: Weak<Metrics> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(m) => m.handle.run_upkeep(),
                    None => return,
                }
            }
        });
    }

    /// Publish whether the state dir takes writes (read when `/metrics` is rendered).
    pub fn set_state_writable(&self, writable: bool) {
        self.gauge(STATE_WRITABLE, Vec::new())
            .set(if writable { 1.0 } else { 0.0 });
    }

    /// How many applied changes wait to be saved.
    pub fn set_pending_writes(&self, n: usize) {
        self.unsaved.set(n as f64);
    }

    /// A request no service matched.
    pub fn unrouted(&self) {
        self.unrouted.increment(1);
    }

    /// Create a service's change and rollback counters at 0, so the first change or
    /// rollback shows in `increase()`.
    pub fn register_service(&self, service: &str) {
        for check in crate::model::Check::ALL {
            for name in [ROLLBACKS_TOTAL, WOULD_ROLL_BACK_TOTAL] {
                let _ = self.counter(
                    name,
                    vec![
                        Label::new("service", service.to_owned()),
                        Label::new("reason", check.as_str()),
                    ],
                );
            }
        }
        for source in [
            Source::Admin,
            Source::Guard,
            Source::Rollout,
            Source::Config,
        ] {
            // Registering is what creates the series; the handle itself is not needed.
            let _ = self.counter(
                WEIGHT_CHANGES_TOTAL,
                vec![
                    Label::new("service", service.to_owned()),
                    Label::new("source", source.as_str()),
                ],
            );
        }
    }

    /// Publish a service's rollout phase (1 for the current one) and step. A service
    /// that never had a rollout has no rollout series: idle at step 0 is published
    /// only once the service has been published otherwise.
    pub fn rollout(&self, service: &str, phase: Phase, step: usize) {
        {
            let mut seen = self.rollouts.lock().unwrap_or_else(|p| p.into_inner());
            if !seen.contains(service) {
                if phase == Phase::Idle && step == 0 {
                    return;
                }
                seen.insert(service.to_owned());
            }
        }
        for p in Phase::ALL {
            self.gauge(
                ROLLOUT_PHASE,
                vec![
                    Label::new("service", service.to_owned()),
                    Label::new("phase", p.as_str()),
                ],
            )
            .set(if p == phase { 1.0 } else { 0.0 });
        }
        self.gauge(
            ROLLOUT_STEP,
            vec![Label::new("service", service.to_owned())],
        )
        .set(step as f64);
    }

    /// A pool's version label changed (a release, an undo, a reload): its
    /// `weir_pool_info{service,pool,version}` series reads 1, the previous label's 0, so
    /// that a join on it labels any pool series with the version without the request
    /// path carrying one more label.
    pub fn pool_version(
        &self,
        service: &str,
        pool: &str,
        version: Option<&str>,
        previous: Option<&str>,
    ) {
        self.recorder.describe_gauge(
            POOL_INFO.into(),
            None,
            "A pool's version label (1 for the current one, 0 for one it had before).".into(),
        );
        let series = |v: &str| {
            self.gauge(
                POOL_INFO,
                vec![
                    Label::new("service", service.to_owned()),
                    Label::new("pool", pool.to_owned()),
                    Label::new("version", v.to_owned()),
                ],
            )
        };
        if let Some(old) = previous {
            series(old).set(0.0);
        }
        if let Some(v) = version {
            series(v).set(1.0);
        }
    }

    /// Count a rollback by the guard, by the check that failed.
    pub fn rollback(&self, service: &str, reason: &'static str) {
        self.counter(
            ROLLBACKS_TOTAL,
            vec![
                Label::new("service", service.to_owned()),
                Label::new("reason", reason),
            ],
        )
        .increment(1);
    }

    /// Count a rollback the guard would have made in dry-run mode.
    pub fn would_roll_back(&self, service: &str, reason: &'static str) {
        self.counter(
            WOULD_ROLL_BACK_TOTAL,
            vec![
                Label::new("service", service.to_owned()),
                Label::new("reason", reason),
            ],
        )
        .increment(1);
    }

    /// Publish the figures read from a pool's guard window when `/metrics` is rendered
    /// (read side only: nothing on the request path): its p99, NaN while the window
    /// holds no latency.
    pub fn set_pool_window(&self, service: &str, pool: &str, p99: Option<Duration>) {
        self.gauge(
            POOL_LATENCY_P99,
            vec![
                Label::new("service", service.to_owned()),
                Label::new("pool", pool.to_owned()),
            ],
        )
        .set(p99.map_or(f64::NAN, |d| d.as_secs_f64()));
    }

    /// Publish a service's SLO limits (the ones it sets), for dashboards' lines.
    pub fn set_slo(&self, service: &str, max_error_rate: Option<f64>, max_p99: Option<Duration>) {
        let label = || vec![Label::new("service", service.to_owned())];
        if let Some(rate) = max_error_rate {
            self.gauge(SLO_MAX_ERROR_RATE, label()).set(rate);
        }
        if let Some(p99) = max_p99 {
            self.gauge(SLO_MAX_P99, label()).set(p99.as_secs_f64());
        }
    }

    /// Count a weight change (cold path: labels built here are fine).
    pub fn weight_changed(&self, service: &str, source: Source) {
        self.counter(
            WEIGHT_CHANGES_TOTAL,
            vec![
                Label::new("service", service.to_owned()),
                Label::new("source", source.as_str()),
            ],
        )
        .increment(1);
    }
}

/// One finished exchange as the metrics count it (the data plane's outcome, with its
/// pool's judgement of failure already applied).
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub status: u16,
    pub grpc: Option<u8>,
    pub error: Option<ErrorKind>,
    /// Time to the response head.
    pub latency: Duration,
    /// Time to the last byte.
    pub duration: Duration,
    /// A failure of the pool (see the data plane's `Outcome::is_error`).
    pub failed: bool,
}

/// Status codes 100..=999 get one lazily made counter each, in tables of a hundred
/// codes allocated with their first code (most pools only ever see 2xx–5xx).
const CLASSES: usize = 9;

/// Every handle one pool's requests touch, registered once.
///
/// Only the pool's state is registered up front: its weight and share, and whether each
/// endpoint may take traffic. Everything about requests (counts by status, durations,
/// errors by kind, in flight, tunnels, retries, ejections) and the service's rollback
/// and weight-change counters are registered together, at 0, when the pool is first
/// used — so an idle pool of 10,000 costs a few series, not thirty, while a pool with
/// traffic still shows every series at 0 before its first error (what `increase()`
/// needs).
pub struct PoolMetrics {
    metrics: Arc<Metrics>,
    service: Arc<str>,
    pool: Arc<str>,
    /// The endpoints' addresses, for their ejection counters.
    endpoints: Box<[Box<str>]>,
    weight: Gauge,
    share: Gauge,
    endpoint_up: Box<[Gauge]>,
    /// What requests record, per thread; shared with the exporter's side in `metrics`.
    series: Arc<PoolSeries>,
    active: OnceLock<Active>,
}

/// The exporter's handles of a pool that has been used and that requests write to
/// directly: events rarer than requests.
struct Active {
    replays: Counter,
    tunnels: Gauge,
    ejections: Box<[Counter]>,
}

/// The per-request series of one (service, pool): counted per thread, added up and
/// published when `/metrics` is rendered.
struct PoolSeries {
    service: Arc<str>,
    pool: Arc<str>,
    /// One part per thread ([`shard`]): the table is made when the pool is first used,
    /// each part by its thread's first request.
    shards: OnceLock<Box<[CountsShard]>>,
    /// The exporter's handles the sums go to, made by the first publication.
    published: Mutex<Option<Box<Published>>>,
}

/// One thread's counts, made by its first request to the pool.
type CountsShard = OnceLock<Box<Padded<Counts>>>;

/// One thread's counts for one pool.
#[derive(Default)]
struct Counts {
    requests: [OnceLock<Box<[AtomicU64]>>; CLASSES],
    grpc: OnceLock<Box<[AtomicU64]>>,
    errors: [AtomicU64; 5],
    client_errors: [AtomicU64; 3],
    failures: AtomicU64,
    retries: [AtomicU64; 5],
    /// Requests this thread started minus those it ended (a request may end on
    /// another thread, so one shard can go below zero; the sum cannot).
    inflight: AtomicI64,
    duration: Buckets,
    response_duration: Buckets,
}

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Counts {
    #[inline]
    fn request(&self, status: u16) -> Option<&AtomicU64> {
        let i = usize::from(status).checked_sub(100)?;
        let class = self.requests.get(i / 100)?;
        Some(&class.get_or_init(|| counters(100))[i % 100])
    }

    #[inline]
    fn grpc(&self, code: u8) -> &AtomicU64 {
        let code = usize::from(code).min(GRPC_CODES.len() - 1);
        &self.grpc.get_or_init(|| counters(GRPC_CODES.len()))[code]
    }
}

/// One thread's part of a latency histogram, in the `le` buckets of
/// [`duration_buckets`] (not cumulative here: one add per sample) and `+Inf`.
#[derive(Default)]
struct Buckets {
    counts: [AtomicU64; BUCKETS + 1],
    /// The sum of the samples in seconds, as `f64` bits.
    sum: AtomicU64,
}

impl Buckets {
    #[inline]
    fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Prometheus's `le`: a sample counts in the first bucket whose bound it does
        // not exceed.
        let i = duration_bounds().partition_point(|&b| b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        // Only this thread writes this shard, so the exchange succeeds the first time.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + secs).to_bits())
            });
    }
}

/// A histogram's shards added up.
#[derive(Default)]
struct BucketSums {
    counts: [u64; BUCKETS + 1],
    sum: f64,
}

impl BucketSums {
    fn add(&mut self, b: &Buckets) {
        for (sum, c) in self.counts.iter_mut().zip(&b.counts) {
            *sum += c.load(Ordering::Relaxed);
        }
        self.sum += f64::from_bits(b.sum.load(Ordering::Relaxed));
    }

    /// The series' lines, as the exporter writes a histogram: cumulative buckets,
    /// `+Inf`, sum and count.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut seen = 0;
        for (le, count) in duration_bounds().iter().zip(&self.counts) {
            seen += count;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {seen}");
        }
        let count = seen + self.counts[BUCKETS];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// One pool's shards added up.
#[derive(Default)]
struct Sums {
    duration: BucketSums,
    response_duration: BucketSums,
}

/// The exporter's handles for a pool's per-request series.
struct Published {
    requests: HashMap<u16, Counter>,
    grpc: HashMap<u8, Counter>,
    errors: [Counter; 5],
    client_errors: [Counter; 3],
    failures: Counter,
    retries: [Counter; 5],
    inflight: Gauge,
}

impl PoolSeries {
    fn labels(&self) -> String {
        format!(
            "service=\"{}\",pool=\"{}\"",
            sanitize_label_value(&self.service),
            sanitize_label_value(&self.pool)
        )
    }

    fn label_vec(&self) -> Vec<Label> {
        vec![
            Label::new("service", self.service.to_string()),
            Label::new("pool", self.pool.to_string()),
        ]
    }

    fn shards(&self) -> &[CountsShard] {
        self.shards
            .get_or_init(|| (0..shard::count()).map(|_| OnceLock::new()).collect())
    }

    /// This thread's counts.
    #[inline]
    fn counts(&self) -> &Counts {
        self.shards()[shard::index()].get_or_init(Box::default)
    }

    /// Add the shards up, hand the counters and the in-flight gauge to the exporter,
    /// and return the histograms' sums for rendering.
    fn publish(&self, metrics: &Metrics) -> Sums {
        let mut sums = Sums::default();
        let mut requests: HashMap<u16, u64> = HashMap::new();
        let mut grpc: HashMap<u8, u64> = HashMap::new();
        let (mut errors, mut client_errors, mut retries) = ([0u64; 5], [0u64; 3], [0u64; 5]);
        let (mut failures, mut inflight) = (0u64, 0i64);
        let add = |to: &mut [u64], from: &[AtomicU64]| {
            for (t, f) in to.iter_mut().zip(from) {
                *t += f.load(Ordering::Relaxed);
            }
        };
        for c in self.shards().iter().filter_map(OnceLock::get) {
            for (class, table) in c.requests.iter().enumerate() {
                for (k, n) in table.get().into_iter().flat_map(|t| t.iter().enumerate()) {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        *requests.entry((100 + class * 100 + k) as u16).or_default() += n;
                    }
                }
            }
            for (code, n) in c.grpc.get().into_iter().flat_map(|t| t.iter().enumerate()) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    *grpc.entry(code as u8).or_default() += n;
                }
            }
            add(&mut errors, &c.errors);
            add(&mut client_errors, &c.client_errors);
            add(&mut retries, &c.retries);
            failures += c.failures.load(Ordering::Relaxed);
            inflight += c.inflight.load(Ordering::Relaxed);
            sums.duration.add(&c.duration);
            sums.response_duration.add(&c.response_duration);
        }
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let p = published.get_or_insert_with(|| Box::new(self.handles(metrics)));
        // The sums only grow, and this series is the counters' only writer: `absolute`
        // sets them.
        for (status, n) in requests {
            p.requests
                .entry(status)
                .or_insert_with(|| {
                    let mut labels = self.label_vec();
                    labels.push(Label::new("code", status.to_string()));
                    metrics.counter(REQUESTS_TOTAL, labels)
                })
                .absolute(n);
        }
        for (code, n) in grpc {
            p.grpc
                .entry(code)
                .or_insert_with(|| {
                    let mut labels = self.label_vec();
                    labels.push(Label::new("code", crate::model::grpc_code_name(code)));
                    metrics.counter(GRPC_RESPONSES_TOTAL, labels)
                })
                .absolute(n);
        }
        for (counter, n) in p.errors.iter().zip(errors) {
            counter.absolute(n);
        }
        for (counter, n) in p.client_errors.iter().zip(client_errors) {
            counter.absolute(n);
        }
        for (counter, n) in p.retries.iter().zip(retries) {
            counter.absolute(n);
        }
        p.failures.absolute(failures);
        p.inflight.set(inflight as f64);
        sums
    }

    #[cold]
    fn handles(&self, metrics: &Metrics) -> Published {
        let by_kind = |name: &'static str, kind: ErrorKind| {
            let mut l = self.label_vec();
            l.push(Label::new("kind", kind.as_str()));
            metrics.counter(name, l)
        };
        Published {
            requests: HashMap::new(),
            grpc: HashMap::new(),
            errors: ErrorKind::UPSTREAM.map(|k| by_kind(UPSTREAM_ERRORS_TOTAL, k)),
            client_errors: ErrorKind::CLIENT.map(|k| by_kind(CLIENT_ERRORS_TOTAL, k)),
            failures: metrics.counter(REQUEST_FAILURES_TOTAL, self.label_vec()),
            retries: ErrorKind::UPSTREAM.map(|k| by_kind(RETRIES_TOTAL, k)),
            inflight: metrics.gauge(INFLIGHT, self.label_vec()),
        }
    }
}

impl std::fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetrics")
            .field("service", &self.service)
            .field("pool", &self.pool)
            .field("active", &self.active.get().is_some())
            .finish_non_exhaustive()
    }
}

impl PoolMetrics {
    pub fn new(
        metrics: &Arc<Metrics>,
        service: &Arc<str>,
        pool: &Arc<str>,
        endpoints: &[&str],
    ) -> PoolMetrics {
        let labels = || {
            vec![
                Label::new("service", service.to_string()),
                Label::new("pool", pool.to_string()),
            ]
        };
        let m = PoolMetrics {
            metrics: Arc::clone(metrics),
            service: Arc::clone(service),
            pool: Arc::clone(pool),
            endpoints: endpoints.iter().map(|&e| e.into()).collect(),
            weight: metrics.gauge(POOL_WEIGHT, labels()),
            share: metrics.gauge(POOL_SHARE, labels()),
            endpoint_up: Box::new([]),
            series: metrics.pool_series(service, pool),
            active: OnceLock::new(),
        };
        let endpoint_up: Box<[Gauge]> = m
            .per_endpoint(ENDPOINT_HEALTHY)
            .iter()
            .map(|k| metrics.recorder.register_gauge(k, &METADATA))
            .collect();
        for g in endpoint_up.iter() {
            g.set(1.0);
        }
        PoolMetrics { endpoint_up, ..m }
    }

    fn labels(&self) -> Vec<Label> {
        vec![
            Label::new("service", self.service.to_string()),
            Label::new("pool", self.pool.to_string()),
        ]
    }

    /// Endpoint labels are fine here: these are per-endpoint state, not per-request
    /// series.
    fn per_endpoint(&self, name: &'static str) -> Vec<Key> {
        self.endpoints
            .iter()
            .map(|e| {
                let mut labels = self.labels();
                labels.push(Label::new("endpoint", e.to_string()));
                Key::from_parts(name, labels)
            })
            .collect()
    }

    /// The series, registered (at 0) by the first call. After that, one acquire load:
    /// the request path stays lock-free.
    #[inline]
    fn active(&self) -> &Active {
        self.active.get_or_init(|| self.register())
    }

    #[cold]
    fn register(&self) -> Active {
        let metrics = &self.metrics;
        metrics.register_service(&self.service);
        // The per-request counters and the in-flight gauge at 0, and the histograms
        // from the next scrape on (they are rendered for every series with shards).
        let mut published = self
            .series
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if published.is_none() {
            *published = Some(Box::new(self.series.handles(metrics)));
        }
        drop(published);
        let _ = self.series.shards();
        Active {
            replays: metrics.counter(KEEPALIVE_REPLAYS_TOTAL, self.labels()),
            tunnels: metrics.gauge(TUNNELS_OPEN, self.labels()),
            ejections: self
                .per_endpoint(ENDPOINT_EJECTIONS_TOTAL)
                .iter()
                .map(|k| metrics.recorder.register_counter(k, &METADATA))
                .collect(),
        }
    }

    /// This thread's counts, the series registered first if this is the pool's first
    /// use.
    #[inline]
    fn counts(&self) -> &Counts {
        let _ = self.active();
        self.series.counts()
    }

    /// Record one finished exchange. Writes only this thread's shard.
    pub fn record(&self, o: &Observed) {
        let c = self.counts();
        if let Some(n) = c.request(o.status) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(code) = o.grpc {
            c.grpc(code).fetch_add(1, Ordering::Relaxed);
        }
        c.duration.record(o.latency);
        c.response_duration.record(o.duration);
        match o.error {
            Some(kind) if kind.blame() == Blame::Client => {
                c.client_errors[kind.index()].fetch_add(1, Ordering::Relaxed);
            }
            Some(kind) => {
                c.errors[kind.index()].fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        if o.failed {
            c.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A failed attempt that was retried: counted as an upstream error of its kind,
    /// a failure of the pool, and a retry.
    pub fn retried(&self, kind: ErrorKind) {
        let (c, i) = (self.counts(), kind.index());
        c.errors[i].fetch_add(1, Ordering::Relaxed);
        c.retries[i].fetch_add(1, Ordering::Relaxed);
        c.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A request replayed after a keep-alive race.
    pub fn replayed(&self) {
        self.active().replays.increment(1);
    }

    pub fn set_endpoint_up(&self, index: usize, up: bool) {
        if let Some(g) = self.endpoint_up.get(index) {
            g.set(if up { 1.0 } else { 0.0 });
        }
    }

    pub fn ejected(&self, index: usize) {
        if let Some(c) = self.active().ejections.get(index) {
            c.increment(1);
        }
    }

    /// A request started (`1`) or ended (`-1`) on this pool: the in-flight gauge,
    /// counted on this thread's shard.
    #[inline]
    pub fn inflight_add(&self, delta: i64) {
        self.counts().inflight.fetch_add(delta, Ordering::Relaxed);
    }

    /// Open upgraded connections (tunnels) through this pool.
    pub fn tunnels(&self) -> &Gauge {
        &self.active().tunnels
    }

    /// Publish the weight and share in force.
    pub fn set_weight(&self, weight: u32, share: f64) {
        self.weight.set(f64::from(weight));
        self.share.set(share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_span_half_a_millisecond_to_ten_seconds() {
        let b = duration_buckets();
        assert_eq!(b.len(), 20);
        assert_eq!(b[0], 0.0005);
        assert_eq!(b[19], 10.0);
        assert!(b.windows(2).all(|w| w[1] > w[0] * 1.6));
    }

    #[test]
    fn an_unused_pool_registers_only_its_state_until_its_first_request() {
        let m = Metrics::new();
        let pm = PoolMetrics::new(&m, &"shop".into(), &"canary".into(), &["10.0.0.1:80"]);
        pm.set_weight(10, 0.1);
        let series = |text: &str| -> Vec<String> {
            let mut names: Vec<String> = text
                .lines()
                .filter(|l| l.contains("service=\"shop\""))
                .map(|l| l.split('{').next().unwrap_or("").to_owned())
                .collect();
            names.sort();
            names.dedup();
            names
        };
        assert_eq!(
            series(&m.render()),
            [ENDPOINT_HEALTHY, POOL_SHARE, POOL_WEIGHT],
            "{}",
            m.render()
        );
        pm.record(&Observed {
            status: 200,
            grpc: None,
            error: None,
            latency: Duration::from_millis(1),
            duration: Duration::from_millis(1),
            failed: false,
        });
        let text = m.render();
        for needle in [
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"200\"} 1",
            "weir_request_failures_total{service=\"shop\",pool=\"canary\"} 0",
            "weir_upstream_errors_total{service=\"shop\",pool=\"canary\",kind=\"connect\"} 0",
            "weir_endpoint_ejections_total{service=\"shop\",pool=\"canary\",endpoint=\"10.0.0.1:80\"} 0",
            "weir_rollbacks_total{service=\"shop\",reason=\"error_rate\"} 0",
            "weir_weight_changes_total{service=\"shop\",source=\"guard\"} 0",
            "weir_inflight_requests{service=\"shop\",pool=\"canary\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn per_thread_counts_render_as_the_exporter_renders_the_same_samples() {
        let m = Metrics::new();
        let pm = PoolMetrics::new(&m, &"shop".into(), &"canary".into(), &["10.0.0.1:80"]);
        // The exporter itself, given every sample, is what `/metrics` showed before.
        let reference = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &duration_buckets())
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(RESPONSE_DURATION.into()),
                    &duration_buckets(),
                )
            })
            .unwrap()
            .build_recorder();
        let key = |name| Key::from_parts(name, pm.labels());
        let (ref_latency, ref_duration) = (
            reference.register_histogram(&key(REQUEST_DURATION), &METADATA),
            reference.register_histogram(&key(RESPONSE_DURATION), &METADATA),
        );
        reference.describe_histogram(
            REQUEST_DURATION.into(),
            Some(Unit::Seconds),
            REQUEST_DURATION_HELP.into(),
        );
        reference.describe_histogram(
            RESPONSE_DURATION.into(),
            Some(Unit::Seconds),
            RESPONSE_DURATION_HELP.into(),
        );
        // k/512 s: exact in binary, so the sums cannot differ by the order of adding.
        // 0 to 11.7 s: every bucket, +Inf included.
        let sample = |k: u64| Duration::from_nanos(k * 1_953_125);
        let used: HashSet<usize> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let pm = &pm;
                    s.spawn(move || {
                        for k in (t..6000).step_by(4) {
                            pm.inflight_add(1);
                            pm.record(&Observed {
                                status: if k % 10 == 0 { 503 } else { 200 },
                                grpc: None,
                                error: (k % 20 == 0).then_some(ErrorKind::Timeout),
                                latency: sample(k),
                                duration: sample(k + 1),
                                failed: k % 10 == 0,
                            });
                            if t != 0 {
                                pm.inflight_add(-1);
                            }
                        }
                        shard::index()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for k in 0..6000 {
            ref_latency.record(sample(k).as_secs_f64());
            ref_duration.record(sample(k + 1).as_secs_f64());
        }
        // Each thread wrote its own shard only.
        let shards = pm.series.shards.get().unwrap();
        let written: HashSet<usize> = (0..shards.len())
            .filter(|&i| shards[i].get().is_some())
            .collect();
        assert_eq!(written, used);
        let text = m.render();
        let family = |text: &str, name: &str| -> Vec<String> {
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| l.contains(name))
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines
        };
        let expected = reference.handle().render();
        for name in [REQUEST_DURATION, RESPONSE_DURATION] {
            let ours = family(&text, name);
            assert_eq!(ours.len(), 2 + BUCKETS + 3, "{text}");
            assert_eq!(ours, family(&expected, name));
        }
        for needle in [
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"200\"} 5400",
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"503\"} 600",
            "weir_request_failures_total{service=\"shop\",pool=\"canary\"} 600",
            "weir_upstream_errors_total{service=\"shop\",pool=\"canary\",kind=\"timeout\"} 300",
            // Thread 0's requests are still in flight, counted on its shard.
            "weir_inflight_requests{service=\"shop\",pool=\"canary\"} 1500",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        // A second scrape shows the same, and a pool built again under the same names
        // (a reload) carries on counting where the first left off.
        assert_eq!(
            family(&m.render(), REQUEST_DURATION),
            family(&text, REQUEST_DURATION)
        );
        let again = PoolMetrics::new(&m, &"shop".into(), &"canary".into(), &["10.0.0.2:80"]);
        again.retried(ErrorKind::Timeout);
        let text = m.render();
        for needle in [
            "weir_request_failures_total{service=\"shop\",pool=\"canary\"} 601",
            "weir_retries_total{service=\"shop\",pool=\"canary\",kind=\"timeout\"} 1",
            "weir_request_duration_seconds_count{service=\"shop\",pool=\"canary\"} 6000",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn rollout_gauges_appear_with_the_first_rollout() {
        let m = Metrics::new();
        m.rollout("shop", Phase::Idle, 0);
        assert!(!m.render().contains(ROLLOUT_PHASE));
        m.rollout("shop", Phase::Progressing, 1);
        m.rollout("shop", Phase::Idle, 0);
        let text = m.render();
        assert!(
            text.contains("weir_rollout_phase{service=\"shop\",phase=\"idle\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("weir_rollout_step{service=\"shop\"} 0"),
            "{text}"
        );
    }
}
