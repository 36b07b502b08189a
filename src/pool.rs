//! One upstream pool at run time: its endpoints, their in-flight counts and whether they
//! may take traffic, and the choice of endpoint for a request.
//!
//! A `Pool` outlives weight changes: snapshots point at the same `Arc<Pool>` so in-flight
//! counts (and, later, health and metrics handles) survive every swap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use http::uri::Authority;

use crate::client::IdleConns;
use crate::config::{Endpoint, PoolConfig};
use crate::metrics::{Metrics, PoolMetrics};
use crate::routing::fast_rand;
use crate::window::Window;

/// Run-time state of one endpoint. Padded to its own cache line so that two cores
/// updating neighbouring endpoints' counters do not fight over one line.
#[derive(Debug)]
#[repr(align(64))]
pub struct EndpointState {
    pub endpoint: Endpoint,
    inflight: AtomicU32,
    up: AtomicBool,
    idle: IdleConns,
}

impl EndpointState {
    fn new(endpoint: Endpoint) -> Self {
        EndpointState {
            endpoint,
            inflight: AtomicU32::new(0),
            up: AtomicBool::new(true),
            idle: IdleConns::default(),
        }
    }

    pub fn authority(&self) -> &Authority {
        &self.endpoint.authority
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Idle keep-alive connections to this endpoint.
    pub fn idle(&self) -> &IdleConns {
        &self.idle
    }
}

/// A pool of interchangeable endpoints serving one version of a service.
#[derive(Debug)]
pub struct Pool {
    pub service: Arc<str>,
    pub name: Arc<str>,
    endpoints: Box<[EndpointState]>,
    metrics: PoolMetrics,
    window: Window,
}

impl Pool {
    pub fn new(service: &str, config: &PoolConfig, metrics: &Arc<Metrics>, window: Window) -> Pool {
        let service: Arc<str> = service.into();
        let name: Arc<str> = config.name.as_str().into();
        Pool {
            metrics: PoolMetrics::new(metrics, &service, &name),
            window,
            service,
            name,
            endpoints: config
                .endpoints
                .iter()
                .cloned()
                .map(EndpointState::new)
                .collect(),
        }
    }

    /// This pool's sliding window of live traffic, which the SLO guard judges.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// This pool's metric handles.
    pub fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }

    pub fn endpoints(&self) -> &[EndpointState] {
        &self.endpoints
    }

    /// Whether this pool was built from the same endpoint list (a reload may keep it).
    pub fn same_endpoints(&self, endpoints: &[Endpoint]) -> bool {
        self.endpoints.len() == endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(endpoints)
                .all(|(s, e)| s.endpoint == *e)
    }

    /// Mark an endpoint usable or not. Health checking drives this; an endpoint that is
    /// down gets no new requests.
    pub fn set_endpoint_up(&self, index: usize, up: bool) {
        if let Some(e) = self.endpoints.get(index) {
            e.up.store(up, Ordering::Relaxed);
        }
    }

    /// Choose an endpoint by power of two choices on in-flight requests: two distinct
    /// endpoints drawn at random, the less busy one wins. It tracks load as well as
    /// least-requests without scanning the pool, and unlike round-robin it steers away
    /// from a slow endpoint as soon as requests pile up on it. Down endpoints are
    /// skipped; `None` means no endpoint is usable.
    pub fn pick(self: &Arc<Self>) -> Option<InflightGuard> {
        let index = self.pick_index(fast_rand())?;
        self.endpoints[index]
            .inflight
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.inflight().increment(1.0);
        Some(InflightGuard {
            pool: Arc::clone(self),
            index,
        })
    }

    /// The choice itself, from one random draw (split into two indices).
    fn pick_index(&self, r: u64) -> Option<usize> {
        let n = self.endpoints.len();
        match n {
            0 => None,
            1 => self.endpoints[0].is_up().then_some(0),
            _ => {
                let a = (((r & 0xffff_ffff) * n as u64) >> 32) as usize;
                // Second index drawn from the n-1 others so the two are always distinct.
                let mut b = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                match (ea.is_up(), eb.is_up()) {
                    (true, true) => Some(if eb.inflight() < ea.inflight() { b } else { a }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    // Both draws were down: fall back to the first usable one after `a`.
                    (false, false) => (1..n)
                        .map(|k| (a + k) % n)
                        .find(|&i| self.endpoints[i].is_up()),
                }
            }
        }
    }
}

/// Counts one request against its endpoint until dropped (when the response body has
/// been sent, or the request failed).
#[derive(Debug)]
pub struct InflightGuard {
    pool: Arc<Pool>,
    index: usize,
}

impl InflightGuard {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn endpoint(&self) -> &EndpointState {
        &self.pool.endpoints[self.index]
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.pool.endpoints[self.index]
            .inflight
            .fetch_sub(1, Ordering::Relaxed);
        self.pool.metrics.inflight().decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S30: std::time::Duration = std::time::Duration::from_secs(30);
    const S1: std::time::Duration = std::time::Duration::from_secs(1);

    fn pool(n: usize) -> Arc<Pool> {
        let cfg = PoolConfig {
            name: "p".into(),
            endpoints: (0..n)
                .map(|i| Endpoint::parse(&format!("127.0.0.1:{}", 1000 + i)).unwrap())
                .collect(),
            weight: 1,
        };
        Arc::new(Pool::new("s", &cfg, &Metrics::new(), Window::new(S30, S1)))
    }

    #[test]
    fn two_choices_are_distinct_and_prefer_less_busy() {
        let p = pool(2);
        // Whatever the draw, endpoint 1 is chosen once endpoint 0 is busier.
        p.endpoints[0].inflight.store(5, Ordering::Relaxed);
        for r in [0u64, u64::MAX, 0x1234_5678_9abc_def0, 1 << 40] {
            assert_eq!(p.pick_index(r), Some(1));
        }
    }

    #[test]
    fn spreads_evenly_when_idle() {
        let p = pool(4);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[p.pick_index(fast_rand()).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn skips_down_endpoints_and_reports_none_when_all_down() {
        let p = pool(3);
        p.set_endpoint_up(0, false);
        p.set_endpoint_up(2, false);
        for _ in 0..1000 {
            assert_eq!(p.pick_index(fast_rand()), Some(1));
        }
        p.set_endpoint_up(1, false);
        assert!(p.pick().is_none());
        let single = pool(1);
        single.set_endpoint_up(0, false);
        assert!(single.pick().is_none());
    }

    #[test]
    fn guard_counts_inflight() {
        let p = pool(1);
        let g = p.pick().unwrap();
        assert_eq!(g.endpoint().inflight(), 1);
        drop(g);
        assert_eq!(p.endpoints[0].inflight(), 0);
    }
}
