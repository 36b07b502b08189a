//! Prometheus metrics: names in one place, explicit histogram buckets, and handles cached
//! per pool so the request path never builds a metric name or label set.
//!
//! Each `Weir` owns its own recorder (no global one), so several instances in one process
//! — tests, mostly — never mix their series.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::outcome::{ErrorKind, Outcome, OutcomeSink};
use crate::routing::Source;

pub const REQUESTS_TOTAL: &str = "weir_requests_total";
pub const REQUEST_DURATION: &str = "weir_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "weir_upstream_errors_total";
pub const INFLIGHT: &str = "weir_inflight_requests";
pub const POOL_WEIGHT: &str = "weir_pool_weight";
pub const POOL_SHARE: &str = "weir_pool_share";
pub const WEIGHT_CHANGES_TOTAL: &str = "weir_weight_changes_total";
pub const BUILD_INFO: &str = "weir_build_info";
pub const ROLLBACKS_TOTAL: &str = "weir_rollbacks_total";
pub const ROLLOUT_PHASE: &str = "weir_rollout_phase";
pub const ENDPOINT_HEALTHY: &str = "weir_endpoint_healthy";
pub const ENDPOINT_EJECTIONS_TOTAL: &str = "weir_endpoint_ejections_total";
pub const RETRIES_TOTAL: &str = "weir_retries_total";
pub const ROLLOUT_STEP: &str = "weir_rollout_step";
pub const WOULD_ROLL_BACK_TOTAL: &str = "weir_guard_dry_run_rollbacks_total";

/// How often the exporter's upkeep drains histogram samples into buckets, so memory
/// stays bounded however fast requests come.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Latency buckets: 0.5 ms to 10 s in 20 exponential steps (×1.68 each), fine enough
/// for p50/p99 of both a 1 ms cache hit and a 5 s slow path.
pub fn duration_buckets() -> Vec<f64> {
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
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics { recorder, handle };
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
            "Requests answered, by pool and HTTP status (weir's own 502/503/504 included).".into(),
        );
        r.describe_histogram(
            REQUEST_DURATION.into(),
            Some(Unit::Seconds),
            "Time from request received to response headers sent.".into(),
        );
        r.describe_counter(
            UPSTREAM_ERRORS_TOTAL.into(),
            None,
            "Failures on weir's side of a request, by kind: connect, timeout, reset, protocol, no_endpoint.".into(),
        );
        r.describe_gauge(INFLIGHT.into(), None, "Requests in flight per pool.".into());
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
    }

    pub fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
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

    /// Create a service's change counters at 0, so the first change shows in `increase()`.
    pub fn register_service(&self, service: &str) {
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
                    Label::new("service", service.to_string()),
                    Label::new("source", source.as_str()),
                ],
            );
        }
    }

    /// Publish a service's rollout phase (1 for the current one) and step.
    pub fn rollout(&self, service: &str, rollout: Option<&crate::rollout::Rollout>) {
        use crate::rollout::Phase;
        let phase = rollout.map_or(Phase::Idle, |r| r.phase);
        for p in Phase::ALL {
            self.gauge(
                ROLLOUT_PHASE,
                vec![
                    Label::new("service", service.to_string()),
                    Label::new("phase", p.as_str()),
                ],
            )
            .set(if p == phase { 1.0 } else { 0.0 });
        }
        self.gauge(
            ROLLOUT_STEP,
            vec![Label::new("service", service.to_string())],
        )
        .set(rollout.map_or(0.0, |r| r.step as f64));
    }

    /// Count a rollback by the guard, by the check that failed.
    pub fn rollback(&self, service: &str, reason: &'static str) {
        self.counter(
            ROLLBACKS_TOTAL,
            vec![
                Label::new("service", service.to_string()),
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
                Label::new("service", service.to_string()),
                Label::new("reason", reason),
            ],
        )
        .increment(1);
    }

    /// Count a weight change (cold path: labels built here are fine).
    pub fn weight_changed(&self, service: &str, source: Source) {
        self.counter(
            WEIGHT_CHANGES_TOTAL,
            vec![
                Label::new("service", service.to_string()),
                Label::new("source", source.as_str()),
            ],
        )
        .increment(1);
    }
}

/// Status codes 100..=999 get one lazily registered counter each.
const CODES: usize = 900;

/// Every handle one pool's requests touch, registered once.
pub struct PoolMetrics {
    metrics: Arc<Metrics>,
    service: Arc<str>,
    pool: Arc<str>,
    requests: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    errors: [Counter; 5],
    inflight: Gauge,
    weight: Gauge,
    share: Gauge,
    endpoint_up: Box<[Gauge]>,
    ejections: Box<[Counter]>,
    retries: [Counter; 5],
}

impl std::fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetrics")
            .field("service", &self.service)
            .field("pool", &self.pool)
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
        // Endpoint labels are fine here: these are per-endpoint state, not per-request
        // series.
        let per_endpoint = |name: &'static str| -> Vec<Key> {
            endpoints
                .iter()
                .map(|e| {
                    Key::from_parts(
                        name,
                        vec![
                            Label::new("service", service.to_string()),
                            Label::new("pool", pool.to_string()),
                            Label::new("endpoint", e.to_string()),
                        ],
                    )
                })
                .collect()
        };
        let endpoint_up: Box<[Gauge]> = per_endpoint(ENDPOINT_HEALTHY)
            .iter()
            .map(|k| metrics.recorder.register_gauge(k, &METADATA))
            .collect();
        for g in endpoint_up.iter() {
            g.set(1.0);
        }
        let ejections = per_endpoint(ENDPOINT_EJECTIONS_TOTAL)
            .iter()
            .map(|k| metrics.recorder.register_counter(k, &METADATA))
            .collect();
        let labels = || {
            vec![
                Label::new("service", service.to_string()),
                Label::new("pool", pool.to_string()),
            ]
        };
        let error = |kind: ErrorKind| {
            let mut l = labels();
            l.push(Label::new("kind", kind.as_str()));
            metrics.counter(UPSTREAM_ERRORS_TOTAL, l)
        };
        let retry = |kind: ErrorKind| {
            let mut l = labels();
            l.push(Label::new("kind", kind.as_str()));
            metrics.counter(RETRIES_TOTAL, l)
        };
        PoolMetrics {
            metrics: Arc::clone(metrics),
            service: Arc::clone(service),
            pool: Arc::clone(pool),
            requests: (0..CODES).map(|_| OnceLock::new()).collect(),
            duration: metrics.histogram(REQUEST_DURATION, labels()),
            errors: ErrorKind::ALL.map(error),
            inflight: metrics.gauge(INFLIGHT, labels()),
            weight: metrics.gauge(POOL_WEIGHT, labels()),
            share: metrics.gauge(POOL_SHARE, labels()),
            endpoint_up,
            ejections,
            retries: ErrorKind::ALL.map(retry),
        }
    }

    fn requests(&self, status: u16) -> Option<&Counter> {
        let i = usize::from(status)
            .checked_sub(100)
            .filter(|&i| i < CODES)?;
        Some(self.requests[i].get_or_init(|| {
            self.metrics.counter(
                REQUESTS_TOTAL,
                vec![
                    Label::new("service", self.service.to_string()),
                    Label::new("pool", self.pool.to_string()),
                    Label::new("code", status.to_string()),
                ],
            )
        }))
    }

    /// Record one finished request.
    pub fn record(&self, status: u16, error: Option<ErrorKind>, latency: Duration) {
        if let Some(c) = self.requests(status) {
            c.increment(1);
        }
        self.duration.record(latency.as_secs_f64());
        if let Some(kind) = error {
            let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
            self.errors[i].increment(1);
        }
    }

    /// A failed attempt that was retried: counted as an upstream error of its kind,
    /// and as a retry.
    pub fn retried(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].increment(1);
        self.retries[i].increment(1);
    }

    pub fn set_endpoint_up(&self, index: usize, up: bool) {
        if let Some(g) = self.endpoint_up.get(index) {
            g.set(if up { 1.0 } else { 0.0 });
        }
    }

    pub fn ejected(&self, index: usize) {
        if let Some(c) = self.ejections.get(index) {
            c.increment(1);
        }
    }

    pub fn inflight(&self) -> &Gauge {
        &self.inflight
    }

    /// Publish the weight and share in force.
    pub fn set_weight(&self, weight: u32, share: f64) {
        self.weight.set(f64::from(weight));
        self.share.set(share);
    }
}

/// Feeds every outcome into its pool's metrics.
#[derive(Debug, Default)]
pub struct MetricsSink;

impl OutcomeSink for MetricsSink {
    fn record(&self, o: &Outcome<'_>) {
        if let Some((_, kind)) = o.retried {
            o.pool.metrics().retried(kind);
        }
        o.pool.metrics().record(o.status, o.error, o.latency);
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
    fn pool_metrics_render_as_prometheus_series() {
        let m = Metrics::new();
        let pm = PoolMetrics::new(&m, &"shop".into(), &"canary".into(), &["10.0.0.1:80"]);
        pm.record(200, None, Duration::from_millis(3));
        pm.record(502, Some(ErrorKind::Connect), Duration::from_millis(1));
        pm.set_weight(10, 0.1);
        let text = m.render();
        for needle in [
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"200\"} 1",
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"502\"} 1",
            "weir_upstream_errors_total{service=\"shop\",pool=\"canary\",kind=\"connect\"} 1",
            "weir_request_duration_seconds_bucket{service=\"shop\",pool=\"canary\",le=\"+Inf\"} 2",
            "weir_request_duration_seconds_count{service=\"shop\",pool=\"canary\"} 2",
            "weir_pool_share{service=\"shop\",pool=\"canary\"} 0.1",
            "weir_build_info{version=",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
