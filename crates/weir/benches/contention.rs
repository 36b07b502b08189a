//! Criterion bench of what the per-request path costs when several cores run it at once:
//! the route lookup, the weighted pool draw, the endpoint pick with its in-flight count,
//! and the outcome recorded into the pool's metrics and guard window — all on one hot
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

fn per_request_path(c: &mut Criterion) {
    let metrics = Metrics::new();
    let controller = Controller::in_memory(&config(), Arc::clone(&metrics));
    let router = controller.router().clone();
    let metrics_sink = MetricsSink(Arc::clone(&metrics));
    let window_sink = WindowSink;
    let one_request = || {
        let table = router.table();
        let service = table.route(Some(black_box("shop.example.com"))).unwrap();
        let snapshot = service.snapshot();
        let pool = Arc::clone(&snapshot.pick().pool);
        let guard = pool.pick().unwrap();
        let outcome = Outcome {
            pool: &pool,
            endpoint: Some(guard.index()),
            status: 200,
            grpc: None,
            error: None,
            latency: Duration::from_micros(850),
            duration: Duration::from_micros(900),
            retried: None,
        };
        metrics_sink.record(&outcome);
        window_sink.record(&outcome);
        drop(guard);
    };
    let max = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let mut group = c.benchmark_group("per-request path, time per request on each thread");
    let mut threads = 1;
    while threads <= max {
        group.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, &n| {
            b.iter_custom(|iters| {
                // Every thread does `iters` requests; the slowest one's time is the
                // figure, so sharing shows up as a rise with the thread count.
                let start = Barrier::new(n);
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..n)
                        .map(|_| {
                            s.spawn(|| {
                                start.wait();
                                let t = Instant::now();
                                for _ in 0..iters {
                                    one_request();
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
    // The exporter keeps histogram samples until rendered: drain them.
    metrics.render();
}

criterion_group!(benches, per_request_path);
criterion_main!(benches);
