//! The sinks every outcome flows into on the request path: the pool's metrics, its
//! guard window and passive ejection. Atomics only; an ejection hands its change to the
//! control plane's health task through a channel, so nothing here waits for anything.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::dataplane::outcome::{Outcome, OutcomeSink};
use crate::dataplane::pool::{EndpointChange, Pool};
use crate::model::ErrorKind;
use crate::telemetry::access::{AccessLog, Entry};
use crate::telemetry::metrics::{Metrics, Observed};

/// Endpoint changes passive ejection makes (and the health task's own), in order.
pub(crate) type EndpointChanges = mpsc::UnboundedSender<(Arc<Pool>, EndpointChange)>;
/// Where the health task reads them.
pub(crate) type EndpointChangesRx = mpsc::UnboundedReceiver<(Arc<Pool>, EndpointChange)>;

/// Feeds outcomes into the pools' metrics, and counts unrouted requests.
#[derive(Debug)]
pub struct MetricsSink(pub Arc<Metrics>);

impl OutcomeSink for MetricsSink {
    fn record(&self, o: &Outcome<'_>) {
        if let Some((_, kind)) = o.retried {
            o.pool.metrics().retried(kind);
        }
        o.pool.metrics().record(&Observed {
            status: o.status,
            grpc: o.grpc,
            error: o.error,
            latency: o.latency,
            duration: o.duration,
            failed: o.is_error(),
        });
    }

    fn unrouted(&self) {
        self.0.unrouted();
    }
}

/// Feeds every outcome the pool answers for into its window. Client faults stay out
/// entirely: neither an error nor a request, so broken requests from outside can
/// neither fail a version nor dilute its error rate.
#[derive(Debug, Default)]
pub struct WindowSink;

impl OutcomeSink for WindowSink {
    fn record(&self, o: &Outcome<'_>) {
        if o.retried.is_some() {
            o.pool.window().record_failed_attempt();
        }
        if o.is_client_fault() {
            return;
        }
        let latency = if o.pool.judges_last_byte() {
            o.duration
        } else {
            o.latency
        };
        o.pool.window().record(o.is_error(), latency);
    }
}

/// Feeds the access log: the requests it keeps the head of (only while it is on), as
/// sampled; failed ones whatever the sample unless told otherwise.
#[derive(Debug)]
pub(crate) struct AccessSink(pub(crate) Arc<AccessLog>);

impl OutcomeSink for AccessSink {
    fn record(&self, o: &Outcome<'_>) {
        let Some(request) = o.request else { return };
        if !self
            .0
            .wants(o.error.is_some() || o.status >= 500 || o.is_error())
        {
            return;
        }
        self.0.write(Entry {
            time: crate::model::Clock::now(&crate::model::SystemClock),
            request: request.record(),
            service: Some(Arc::clone(&o.pool.service)),
            pool: Some(Arc::clone(&o.pool.name)),
            endpoint: o
                .endpoint
                .and_then(|i| o.pool.endpoints().get(i))
                .map(|e| e.endpoint.authority.clone()),
            status: o.status,
            grpc: o.grpc,
            error: o.error,
            retried: o.retried.map(|(_, kind)| kind),
            headers: o.latency,
            duration: o.duration,
            bytes_sent: o.bytes_sent,
        });
    }
}

/// Feeds live traffic into passive ejection.
#[derive(Debug, Clone)]
pub struct OutlierSink {
    changes: EndpointChanges,
}

impl OutcomeSink for OutlierSink {
    fn record(&self, o: &Outcome<'_>) {
        if let Some((endpoint, kind)) = o.retried
            && let Some(change) = o.pool.observe(endpoint, kind != ErrorKind::NoEndpoint)
        {
            let _ = self.changes.send((Arc::clone(o.pool), change));
        }
        // A client fault says nothing about the endpoint either way: it neither counts
        // as a failure nor breaks a run of failures. `no_endpoint` is no endpoint's fault.
        if o.is_client_fault() {
            return;
        }
        if let Some(endpoint) = o.endpoint
            && let Some(change) = o.pool.observe(
                endpoint,
                o.is_error() && o.error != Some(ErrorKind::NoEndpoint),
            )
        {
            let _ = self.changes.send((Arc::clone(o.pool), change));
        }
    }
}

impl OutlierSink {
    /// A sink and the receiving end of its changes (the health task's).
    pub fn channel() -> (OutlierSink, EndpointChanges, EndpointChangesRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            OutlierSink {
                changes: tx.clone(),
            },
            tx,
            rx,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn outcome<'a>(
        pool: &'a Arc<Pool>,
        status: u16,
        grpc: Option<u8>,
        error: Option<ErrorKind>,
    ) -> Outcome<'a> {
        Outcome {
            pool,
            endpoint: Some(0),
            status,
            grpc,
            error,
            latency: Duration::from_millis(3),
            duration: Duration::from_millis(5),
            retried: None,
            request: None,
            bytes_sent: None,
        }
    }

    #[test]
    fn pool_metrics_render_as_prometheus_series() {
        let m = Metrics::new();
        m.register_service("shop");
        let cfg = crate::config::PoolConfig {
            name: "canary".into(),
            endpoints: vec![crate::config::Endpoint::parse("10.0.0.1:80").unwrap()],
            weight: 1,
            health: None,
            outlier: Default::default(),
            protocol: Default::default(),
            tls: None,
            version: None,
        };
        let window =
            crate::telemetry::window::Window::new(Duration::from_secs(30), Duration::from_secs(1));
        let pool = Arc::new(Pool::new("shop", &cfg, &m, window));
        let sink = MetricsSink(Arc::clone(&m));
        // An unused pool has only its state series; its first request registers the
        // rest at 0, so that the first error already shows in `increase()`.
        assert!(!m.render().contains("weir_request_failures_total{"));
        sink.record(&outcome(&pool, 200, None, None));
        let before = m.render();
        for needle in [
            "weir_request_failures_total{service=\"shop\",pool=\"canary\"} 0",
            "weir_client_errors_total{service=\"shop\",pool=\"canary\",kind=\"client_abort\"} 0",
            "weir_rollbacks_total{service=\"shop\",reason=\"error_rate\"} 0",
            "weir_guard_dry_run_rollbacks_total{service=\"shop\",reason=\"p99_ratio\"} 0",
            "weir_unrouted_requests_total 0",
            "weir_keepalive_replays_total{service=\"shop\",pool=\"canary\"} 0",
        ] {
            assert!(before.contains(needle), "missing {needle} in\n{before}");
        }
        sink.record(&outcome(&pool, 502, None, Some(ErrorKind::Connect)));
        sink.record(&outcome(&pool, 499, None, Some(ErrorKind::ClientAbort)));
        sink.record(&outcome(&pool, 200, Some(14), None));
        sink.record(&outcome(&pool, 200, Some(5), None));
        sink.unrouted();
        pool.metrics().set_weight(10, 0.1);
        let text = m.render();
        for needle in [
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"200\"} 3",
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"502\"} 1",
            "weir_requests_total{service=\"shop\",pool=\"canary\",code=\"499\"} 1",
            "weir_upstream_errors_total{service=\"shop\",pool=\"canary\",kind=\"connect\"} 1",
            "weir_client_errors_total{service=\"shop\",pool=\"canary\",kind=\"client_abort\"} 1",
            // connect + UNAVAILABLE; neither the client abort nor NOT_FOUND.
            "weir_request_failures_total{service=\"shop\",pool=\"canary\"} 2",
            "weir_grpc_responses_total{service=\"shop\",pool=\"canary\",code=\"UNAVAILABLE\"} 1",
            "weir_grpc_responses_total{service=\"shop\",pool=\"canary\",code=\"NOT_FOUND\"} 1",
            "weir_request_duration_seconds_bucket{service=\"shop\",pool=\"canary\",le=\"+Inf\"} 5",
            "weir_response_duration_seconds_count{service=\"shop\",pool=\"canary\"} 5",
            "weir_unrouted_requests_total 1",
            "weir_pool_share{service=\"shop\",pool=\"canary\"} 0.1",
            "weir_build_info{version=",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
