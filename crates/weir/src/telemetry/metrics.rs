//! Prometheus metrics: names in one place, explicit histogram buckets, and handles cached
//! per pool so the request path never builds a metric name or label set.
//!
//! Each `Weir` owns its own recorder (no global one), so several instances in one process
//! — tests, mostly — never mix their series.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

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
    let (lo, hi, n) = (0.0005f64, 10.0f64, 20);
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
}

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
            "Time from request received to response headers sent.".into(),
        );
        r.describe_histogram(
            RESPONSE_DURATION.into(),
            Some(Unit::Seconds),
            "Time from request received to the response's last byte (streams: their whole life)."
                .into(),
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

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
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

/// Status codes 100..=999 get one lazily registered counter each, in tables of a
/// hundred codes allocated with their first code (most pools only ever see 2xx–5xx).
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
    active: OnceLock<Active>,
}

/// The series of a pool that has been used.
struct Active {
    requests: [OnceLock<Box<[OnceLock<Counter>]>>; CLASSES],
    grpc: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    response_duration: Histogram,
    errors: [Counter; 5],
    client_errors: [Counter; 3],
    failures: Counter,
    replays: Counter,
    inflight: Gauge,
    tunnels: Gauge,
    ejections: Box<[Counter]>,
    retries: [Counter; 5],
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

    /// The request series, registered (at 0) by the first call. After that, one
    /// acquire load: the request path stays lock-free.
    #[inline]
    fn active(&self) -> &Active {
        self.active.get_or_init(|| self.register())
    }

    #[cold]
    fn register(&self) -> Active {
        let metrics = &self.metrics;
        metrics.register_service(&self.service);
        let by_kind = |name: &'static str, kind: ErrorKind| {
            let mut l = self.labels();
            l.push(Label::new("kind", kind.as_str()));
            metrics.counter(name, l)
        };
        Active {
            requests: std::array::from_fn(|_| OnceLock::new()),
            grpc: (0..GRPC_CODES.len()).map(|_| OnceLock::new()).collect(),
            duration: metrics.histogram(REQUEST_DURATION, self.labels()),
            response_duration: metrics.histogram(RESPONSE_DURATION, self.labels()),
            errors: ErrorKind::UPSTREAM.map(|k| by_kind(UPSTREAM_ERRORS_TOTAL, k)),
            client_errors: ErrorKind::CLIENT.map(|k| by_kind(CLIENT_ERRORS_TOTAL, k)),
            failures: metrics.counter(REQUEST_FAILURES_TOTAL, self.labels()),
            replays: metrics.counter(KEEPALIVE_REPLAYS_TOTAL, self.labels()),
            inflight: metrics.gauge(INFLIGHT, self.labels()),
            tunnels: metrics.gauge(TUNNELS_OPEN, self.labels()),
            ejections: self
                .per_endpoint(ENDPOINT_EJECTIONS_TOTAL)
                .iter()
                .map(|k| metrics.recorder.register_counter(k, &METADATA))
                .collect(),
            retries: ErrorKind::UPSTREAM.map(|k| by_kind(RETRIES_TOTAL, k)),
        }
    }

    fn requests(&self, status: u16) -> Option<&Counter> {
        let i = usize::from(status).checked_sub(100)?;
        let class = self.active().requests.get(i / 100)?;
        let table = class.get_or_init(|| (0..100).map(|_| OnceLock::new()).collect());
        Some(table[i % 100].get_or_init(|| {
            let mut labels = self.labels();
            labels.push(Label::new("code", status.to_string()));
            self.metrics.counter(REQUESTS_TOTAL, labels)
        }))
    }

    fn grpc(&self, code: u8) -> &Counter {
        let code = usize::from(code).min(GRPC_CODES.len() - 1);
        self.active().grpc[code].get_or_init(|| {
            let mut labels = self.labels();
            labels.push(Label::new("code", crate::model::grpc_code_name(code as u8)));
            self.metrics.counter(GRPC_RESPONSES_TOTAL, labels)
        })
    }

    /// Record one finished exchange.
    pub fn record(&self, o: &Observed) {
        if let Some(c) = self.requests(o.status) {
            c.increment(1);
        }
        if let Some(code) = o.grpc {
            self.grpc(code).increment(1);
        }
        let a = self.active();
        a.duration.record(o.latency.as_secs_f64());
        a.response_duration.record(o.duration.as_secs_f64());
        match o.error {
            Some(kind) if kind.blame() == Blame::Client => {
                a.client_errors[kind.index()].increment(1);
            }
            Some(kind) => a.errors[kind.index()].increment(1),
            None => {}
        }
        if o.failed {
            a.failures.increment(1);
        }
    }

    /// A failed attempt that was retried: counted as an upstream error of its kind,
    /// a failure of the pool, and a retry.
    pub fn retried(&self, kind: ErrorKind) {
        let (a, i) = (self.active(), kind.index());
        a.errors[i].increment(1);
        a.retries[i].increment(1);
        a.failures.increment(1);
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

    pub fn inflight(&self) -> &Gauge {
        &self.active().inflight
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
