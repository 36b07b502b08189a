//! Criterion bench of what the per-request path costs when several cores run it at once:
//! the route lookup, the weighted pool draw, the endpoint pick with its in-flight count
//! and its one clone of the pool's `Arc`, the retry budget's deposit, and the outcome
//! recorded into the pool's metrics and guard window — all on one hot
//! service, the worst case for sharing. The figure is the time per request on each
//! thread: flat from 1 to N threads means no cache line is fought over; a rise is the
//! cost of the writes every core shares.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weir::config::Config;
use weir::{Controller, Metrics, MetricsSink, Outcome, OutcomeSink, WindowSink};

fn config() -> Config {
    let toml = "[[service]]\nname = \"shop\"\nhosts = [\"shop.example.com\"]\nbaseline = \"stable\"\n\
        [service.slo]\nmax_error_rate = 0.05\n\
        [service.pools.stable]\nendpoints = [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\", \"10.0.0.4:80\"]\nweight = 90\n\
        [service.pools.canary]\nendpoints = [\"10.0.1.1:80\", \"10.0.1.2:80\"]\nweight = 10\n";
    Config::parse(toml, "bench").unwrap()
}

/// Time per call of `one` on each of 1, 2, 4 … N threads running it at once.
fn scaling(c: &mut Criterion, name: &str, one: &(dyn Fn() + Sync)) {
    let max = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let mut group = c.benchmark_group(name);
    let mut threads = 1;
    while threads <= max {
        group.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, &n| {
            b.iter_custom(|iters| {
                // Every thread makes `iters` calls; the slowest one's time is the
                // figure, so sharing shows up as a rise with the thread count.
                let start = Barrier::new(n);
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..n)
                        .map(|_| {
                            s.spawn(|| {
                                start.wait();
                                let t = Instant::now();
                                for _ in 0..iters {
                                    one();
                                }
                                t.elapsed()
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap())
                        .max()
                        .unwrap()
                })
            })
        });
        threads *= 2;
    }
    group.finish();
}

fn per_request_path(c: &mut Criterion) {
    let metrics = Metrics::new();
    let controller = Controller::in_memory(&config(), Arc::clone(&metrics));
    let router = controller.router().clone();
    let metrics_sink = MetricsSink(Arc::clone(&metrics));
    let window_sink = WindowSink;
    let record = |pool: &Arc<weir::Pool>, endpoint: usize, sinks: &[&dyn OutcomeSink]| {
        let outcome = Outcome {
            pool,
            endpoint: Some(endpoint),
            status: 200,
            grpc: None,
            error: None,
            latency: Duration::from_micros(850),
            duration: Duration::from_micros(900),
            retried: None,
            request: None,
            bytes_sent: None,
        };
        for sink in sinks {
            sink.record(&outcome);
        }
    };
    // As the proxy does it: the endpoint is claimed while the snapshot lends the pool,
    // so the in-flight guard's clone is the request's one write to the pool's `Arc`
    // count (and its drop, when the response ends, the other).
    let route_and_pick = || {
        let table = router.table();
        let service = table.route(Some(black_box("shop.example.com"))).unwrap();
        let snapshot = service.snapshot();
        let guard = snapshot.pick().pool.pick().unwrap();
        guard.pool().retry_budget().deposit();
        guard
    };
    scaling(
        c,
        "per-request path, time per request on each thread",
        &|| {
            let guard = route_and_pick();
            record(guard.pool(), guard.index(), &[&metrics_sink, &window_sink]);
        },
    );
    // The same path in parts, to see which one's shared writes cost the most.
    scaling(c, "part: route, draw, pick, deposit", &|| {
        black_box(route_and_pick());
    });
    let shop = Arc::clone(&controller.snapshot("shop").unwrap().slots()[0].pool);
    scaling(c, "part: metrics recording", &|| {
        record(&shop, 0, &[&metrics_sink]);
    });
    scaling(c, "part: window recording", &|| {
        record(&shop, 0, &[&window_sink]);
    });
    scaling(c, "part: retry budget deposit", &|| {
        shop.retry_budget().deposit();
    });
    // The exporter keeps histogram samples until rendered: drain them.
    metrics.render();
}

criterion_group!(benches, per_request_path);
criterion_main!(benches);
