//! Criterion bench of the per-request routing decision: route-table and snapshot loads,
//! the weighted pool draw and the power-of-two-choices endpoint pick (with its in-flight
//! count taken and released), exactly as the proxy does it per request; the same at 1,
//! 100 and 10,000 services (the host lookup is a hash lookup, so the figure should not
//! move); and what recording one request costs in metrics and in the guard's window.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weir::Controller;
use weir::Metrics;
use weir::MetricsSink;
use weir::Window;
use weir::config::Config;
use weir::{Outcome, OutcomeSink};

fn config() -> Config {
    let mut toml = String::new();
    for (name, host) in [("shop", "shop.example.com"), ("api", "api.example.com")] {
        toml += &format!(
            "[[service]]\nname = \"{name}\"\nhosts = [\"{host}\"]\nbaseline = \"stable\"\n\
             [service.pools.stable]\nendpoints = [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\", \"10.0.0.4:80\"]\nweight = 90\n\
             [service.pools.canary]\nendpoints = [\"10.0.1.1:80\", \"10.0.1.2:80\"]\nweight = 10\n"
        );
    }
    Config::parse(&toml, "bench").unwrap()
}

fn routing(c: &mut Criterion) {
    let controller = Controller::in_memory(&config(), Metrics::new());
    let router = controller.router().clone();
    c.bench_function(
        "route: host + snapshot + weighted pool + p2c endpoint",
        |b| {
            b.iter(|| {
                let table = router.table();
                let service = table
                    .route(Some(black_box("API.example.com:8080")))
                    .unwrap();
                let snapshot = service.snapshot();
                let slot = snapshot.pick();
                let guard = slot.pool.pick().unwrap();
                black_box(guard.index());
            })
        },
    );
    c.bench_function("weighted pool draw only", |b| {
        let snapshot = controller.snapshot("shop").unwrap();
        b.iter(|| black_box(snapshot.pick().weight))
    });
}

/// `n` services `svc0.example.com`… of two pools each.
fn services(n: usize) -> Config {
    let mut toml = String::new();
    for i in 0..n {
        toml += &format!(
            "[[service]]\nname = \"svc{i}\"\nhosts = [\"svc{i}.example.com\"]\nbaseline = \"stable\"\n\
             [service.pools.stable]\nendpoints = [\"10.0.0.1:80\", \"10.0.0.2:80\"]\nweight = 90\n\
             [service.pools.canary]\nendpoints = [\"10.0.1.1:80\"]\nweight = 10\n"
        );
    }
    Config::parse(&toml, "bench").unwrap()
}

/// The whole routing decision with 1, 100 and 10,000 services configured, for a host
/// in the middle of the list.
fn routing_by_service_count(c: &mut Criterion) {
    let mut group =
        c.benchmark_group("route: host + snapshot + weighted pool + p2c endpoint, by services");
    for n in [1, 100, 10_000] {
        let controller = Controller::in_memory(&services(n), Metrics::new());
        let router = controller.router().clone();
        let host = format!("svc{}.example.com:8080", n / 2);
        group.bench_with_input(BenchmarkId::from_parameter(n), &host, |b, host| {
            b.iter(|| {
                let table = router.table();
                let service = table.route(Some(black_box(host))).unwrap();
                let snapshot = service.snapshot();
                let slot = snapshot.pick();
                let guard = slot.pool.pick().unwrap();
                black_box(guard.index());
            })
        });
    }
    group.finish();
}

/// What metrics add to one request: the outcome recorded into its pool's counters and
/// both latency histograms (to headers, to last byte), plus the in-flight gauge up and
/// down. Compare with the proxy's CPU per request from `benches/load/compare.sh`.
fn metrics_recording(c: &mut Criterion) {
    let metrics = Metrics::new();
    let controller = Controller::in_memory(&config(), Arc::clone(&metrics));
    let pool = Arc::clone(&controller.snapshot("shop").unwrap().slots()[1].pool);
    let sink = MetricsSink(Arc::clone(&metrics));
    let outcome = Outcome {
        pool: &pool,
        endpoint: Some(0),
        status: 200,
        grpc: None,
        error: None,
        latency: Duration::from_micros(850),
        duration: Duration::from_micros(900),
        retried: None,
        request: None,
        bytes_sent: None,
    };
    c.bench_function(
        "metrics: record one request (counters + 2 histograms + inflight)",
        |b| {
            b.iter(|| {
                pool.metrics().inflight().increment(1.0);
                sink.record(black_box(&outcome));
                pool.metrics().inflight().decrement(1.0);
            })
        },
    );
    // The exporter drains histogram samples at upkeep; keep memory bounded as it runs.
    metrics.render();
}

/// What the SLO guard adds to one request: one record into the pool's sliding window
/// (two counters and a latency-histogram bucket, lock-free).
fn window_recording(c: &mut Criterion) {
    let window = Window::new(Duration::from_secs(30), Duration::from_secs(1));
    let latency = Duration::from_micros(850);
    c.bench_function("guard: record one request into the sliding window", |b| {
        b.iter(|| window.record(black_box(false), black_box(latency)))
    });
}

criterion_group!(
    benches,
    routing,
    routing_by_service_count,
    metrics_recording,
    window_recording
);
criterion_main!(benches);
