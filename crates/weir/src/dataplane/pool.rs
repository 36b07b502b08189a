//! One upstream pool at run time: its endpoints, their in-flight counts and whether they
//! may take traffic, and the choice of endpoint for a request.
//!
//! A `Pool` outlives weight changes: snapshots point at the same `Arc<Pool>` so in-flight
//! counts (and, later, health and metrics handles) survive every swap.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;

use crate::config::{Endpoint, HealthConfig, OutlierConfig, PoolConfig};
use crate::dataplane::client::IdleConns;
use crate::model::fast_rand;
use crate::telemetry::metrics::{Metrics, PoolMetrics};
use crate::telemetry::window::Window;

/// Run-time state of one endpoint. Padded to its own cache line so that two cores
/// updating neighbouring endpoints' counters do not fight over one line.
#[derive(Debug)]
#[repr(align(64))]
pub struct EndpointState {
    pub endpoint: Endpoint,
    inflight: AtomicU32,
    /// Set by active health checks (true until checks say otherwise).
    healthy: AtomicBool,
    /// Set by passive outlier ejection.
    ejected: AtomicBool,
    /// Consecutive 5xx / connect failures seen on live traffic.
    failures: AtomicU32,
    idle: IdleConns,
    /// TLS to this endpoint: `None` for plain TCP; an error when the pool's TLS
    /// settings could not be loaded (connections then fail rather than fall back to
    /// plain text).
    tls: Option<Result<Arc<crate::dataplane::tls::UpstreamTls>, String>>,
    /// The multiplexed HTTP/2 connection, for h2c pools.
    h2: Mutex<Option<hyper::client::conn::http2::SendRequest<crate::dataplane::body::RequestBody>>>,
    /// Cold state: ejection history and health-check counters.
    cold: Mutex<EndpointCold>,
}

/// One endpoint's state at one moment: see [`EndpointState::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    pub address: String,
    /// Passing active health checks (true without them).
    pub healthy: bool,
    /// Ejected by passive outlier detection.
    pub ejected: bool,
    pub ejections: u32,
    pub inflight: u32,
    /// The last health check's result in words; `None` before the first.
    pub last_check: Option<String>,
}

/// The parts only background tasks touch.
#[derive(Debug, Default)]
struct EndpointCold {
    ejections: u32,
    ejected_until: Option<Instant>,
    checks_ok: u32,
    checks_failed: u32,
    next_check: Option<Instant>,
    checking: bool,
    last_check: Option<String>,
}

impl EndpointState {
    fn new(
        endpoint: Endpoint,
        tls: Option<Result<Arc<crate::dataplane::tls::UpstreamTls>, String>>,
    ) -> Self {
        EndpointState {
            endpoint,
            tls,
            inflight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            idle: IdleConns::default(),
            h2: Mutex::new(None),
            cold: Mutex::new(EndpointCold::default()),
        }
    }

    fn cold(&self) -> std::sync::MutexGuard<'_, EndpointCold> {
        self.cold.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether a health check of this endpoint is in flight.
    pub fn is_checking(&self) -> bool {
        self.cold().checking
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// The endpoint's state now, for the admin API (which words it).
    pub fn status(&self) -> EndpointStatus {
        let cold = self.cold();
        EndpointStatus {
            address: self.endpoint.as_str().to_owned(),
            healthy: self.is_healthy(),
            ejected: self.is_ejected(),
            ejections: cold.ejections,
            inflight: self.inflight(),
            last_check: cold.last_check.clone(),
        }
    }

    pub fn authority(&self) -> &Authority {
        &self.endpoint.authority
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// May take new requests: healthy and not ejected.
    pub fn is_up(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.ejected.load(Ordering::Relaxed)
    }

    /// Idle keep-alive connections to this endpoint.
    pub fn idle(&self) -> &IdleConns {
        &self.idle
    }

    /// TLS settings for connections to this endpoint, if it is reached over TLS.
    pub fn tls(&self) -> Option<Result<&crate::dataplane::tls::UpstreamTls, String>> {
        self.tls
            .as_ref()
            .map(|t| t.as_deref().map_err(Clone::clone))
    }

    /// The endpoint's HTTP/2 connection slot (h2c pools).
    pub fn h2(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        Option<hyper::client::conn::http2::SendRequest<crate::dataplane::body::RequestBody>>,
    > {
        self.h2.lock().unwrap_or_else(|p| p.into_inner())
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
    pub health: Option<HealthConfig>,
    pub outlier: OutlierConfig,
    pub protocol: crate::config::UpstreamProtocol,
    retry_budget: RetryBudget,
    /// gRPC status codes that count as this pool's failure, one bit per code (the
    /// service's `grpc_failure_codes`; a reload may change it on a kept pool).
    grpc_failures: AtomicU32,
    /// The guard judges time to last byte instead of time to headers
    /// (`[service.slo] latency = "last_byte"`).
    last_byte: AtomicBool,
}

/// Retries allowed per pool: every request deposits 0.2 of a retry, each retry costs
/// one, and a floor of 10 a second is refilled by the health task — so retries stay
/// under 20% of traffic plus a small minimum, and a failing pool cannot start a retry
/// storm.
#[derive(Debug)]
pub struct RetryBudget {
    /// In thousandths of a retry.
    milli: std::sync::atomic::AtomicU64,
}

impl RetryBudget {
    const DEPOSIT: u64 = 200;
    const COST: u64 = 1000;
    /// The most retries saved up (a burst).
    const CAP: u64 = 100 * Self::COST;
    /// The floor refilled each tick (100 ms): 10 retries a second.
    const FLOOR: u64 = 10 * Self::COST;

    fn new() -> RetryBudget {
        RetryBudget {
            milli: std::sync::atomic::AtomicU64::new(Self::FLOOR),
        }
    }

    /// One request's share.
    #[inline]
    pub fn deposit(&self) {
        self.milli.fetch_add(Self::DEPOSIT, Ordering::Relaxed);
    }

    /// Take one retry, if the budget has it.
    pub fn withdraw(&self) -> bool {
        self.milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                m.checked_sub(Self::COST)
            })
            .is_ok()
    }

    /// Whether [`RetryBudget::refill`] would change anything now.
    pub fn needs_refill(&self) -> bool {
        let m = self.milli.load(Ordering::Relaxed);
        !(Self::FLOOR..=Self::CAP).contains(&m)
    }

    /// Called every 100 ms: below the floor, add one retry (so at least 10 a second
    /// are available however little traffic there is); above the cap, drop savings.
    /// A budget already between the two is left alone, unwritten: an idle pool's tick
    /// is one load.
    pub fn refill(&self) {
        let _ = self
            .milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                let next = if m < Self::FLOOR {
                    (m + Self::COST).min(Self::FLOOR)
                } else {
                    m
                }
                .min(Self::CAP);
                (next != m).then_some(next)
            });
    }
}

/// A change in an endpoint's standing, for events and logs.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointChange {
    Ejected {
        endpoint: usize,
        failures: u32,
        duration: Duration,
    },
    Returned {
        endpoint: usize,
    },
    Down {
        endpoint: usize,
        why: String,
    },
    Up {
        endpoint: usize,
    },
}

impl EndpointChange {
    pub fn endpoint(&self) -> usize {
        match self {
            EndpointChange::Ejected { endpoint, .. }
            | EndpointChange::Returned { endpoint }
            | EndpointChange::Down { endpoint, .. }
            | EndpointChange::Up { endpoint } => *endpoint,
        }
    }
}

/// Longest ejection, however often an endpoint is ejected again.
const MAX_EJECTION: Duration = Duration::from_secs(300);

impl Pool {
    pub fn new(service: &str, config: &PoolConfig, metrics: &Arc<Metrics>, window: Window) -> Pool {
        let service: Arc<str> = service.into();
        let name: Arc<str> = config.name.as_str().into();
        let addresses: Vec<&str> = config.endpoints.iter().map(|e| e.as_str()).collect();
        Pool {
            metrics: PoolMetrics::new(metrics, &service, &name, &addresses),
            window,
            health: config.health.clone(),
            outlier: config.outlier.clone(),
            protocol: config.protocol,
            retry_budget: RetryBudget::new(),
            grpc_failures: AtomicU32::new(crate::model::GRPC_DEFAULT_FAILURES),
            last_byte: AtomicBool::new(false),
            service,
            name,
            endpoints: {
                // Checked at startup and reload; kept as an error (never plain text)
                // should it fail here anyway.
                let tls = config.tls.as_ref().map(|t| {
                    crate::dataplane::tls::upstream(t, config.protocol)
                        .map(Arc::new)
                        .map_err(|e| e.to_string())
                });
                config
                    .endpoints
                    .iter()
                    .cloned()
                    .map(|e| EndpointState::new(e, tls.clone()))
                    .collect()
            },
        }
    }

    /// Whether a call ending with this gRPC status is a failure of the pool.
    #[inline]
    pub fn grpc_failure(&self, code: u8) -> bool {
        code < 32 && self.grpc_failures.load(Ordering::Relaxed) & (1 << code) != 0
    }

    /// Set the gRPC codes that count as failures (one bit per code) and which latency
    /// the guard's window records: the service's settings, applied to new and kept pools.
    pub fn set_judging(&self, grpc_failures: u32, last_byte: bool) {
        self.grpc_failures.store(grpc_failures, Ordering::Relaxed);
        self.last_byte.store(last_byte, Ordering::Relaxed);
    }

    /// Whether the guard's window records time to last byte.
    #[inline]
    pub fn judges_last_byte(&self) -> bool {
        self.last_byte.load(Ordering::Relaxed)
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

    /// Mark an endpoint healthy or not (what active health checks decide); a down
    /// endpoint gets no new requests.
    pub fn set_endpoint_up(&self, index: usize, up: bool) {
        if let Some(e) = self.endpoints.get(index) {
            e.healthy.store(up, Ordering::Relaxed);
            self.publish_endpoint(index);
        }
    }

    fn publish_endpoint(&self, index: usize) {
        self.metrics
            .set_endpoint_up(index, self.endpoints[index].is_up());
    }

    /// Live traffic on an endpoint: a 5xx or connect failure (`failed`) or a good
    /// answer. Consecutive failures eject it (Envoy's consecutive-5xx), unless that
    /// would eject more than `max_ejection_percent` of the pool.
    pub fn observe(&self, index: usize, failed: bool) -> Option<EndpointChange> {
        let e = self.endpoints.get(index)?;
        if !failed {
            if e.failures.load(Ordering::Relaxed) != 0 {
                e.failures.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let failures = e.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.outlier.enabled || failures < self.outlier.consecutive_failures || e.is_ejected() {
            return None;
        }
        let allowed = self.endpoints.len() * self.outlier.max_ejection_percent as usize / 100;
        let ejected = self.endpoints.iter().filter(|x| x.is_ejected()).count();
        if ejected >= allowed {
            return None;
        }
        let mut cold = e.cold();
        if e.ejected.swap(true, Ordering::Relaxed) {
            return None;
        }
        // The clock is read only here, on an ejection, never per request.
        let now = Instant::now();
        cold.ejections += 1;
        let factor = 1u32 << (cold.ejections - 1).min(16);
        let duration = self
            .outlier
            .base_ejection_time
            .saturating_mul(factor)
            .min(MAX_EJECTION);
        cold.ejected_until = Some(now + duration);
        e.failures.store(0, Ordering::Relaxed);
        drop(cold);
        self.metrics.ejected(index);
        self.publish_endpoint(index);
        Some(EndpointChange::Ejected {
            endpoint: index,
            failures,
            duration,
        })
    }

    pub fn retry_budget(&self) -> &RetryBudget {
        &self.retry_budget
    }

    /// An endpoint other than `exclude` that may take a request (for a retry).
    pub fn pick_except(self: &Arc<Self>, exclude: usize) -> Option<InflightGuard> {
        let n = self.endpoints.len();
        let start = (fast_rand() % n.max(1) as u64) as usize;
        let index = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| i != exclude && self.endpoints[i].is_up())
            .min_by_key(|&i| self.endpoints[i].inflight())?;
        Some(self.claim(index))
    }

    /// Return ejected endpoints whose time is up.
    pub fn sweep(&self, now: Instant) -> Vec<EndpointChange> {
        let mut back = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            if !e.is_ejected() {
                continue;
            }
            let mut cold = e.cold();
            if cold.ejected_until.is_some_and(|t| now >= t) {
                cold.ejected_until = None;
                e.ejected.store(false, Ordering::Relaxed);
                e.failures.store(0, Ordering::Relaxed);
                drop(cold);
                self.publish_endpoint(i);
                back.push(EndpointChange::Returned { endpoint: i });
            }
        }
        back
    }

    /// Endpoints whose health check is due at `now` (and marks them as being checked).
    pub fn due_checks(&self, now: Instant) -> Vec<usize> {
        let Some(health) = &self.health else {
            return Vec::new();
        };
        let mut due = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let mut cold = e.cold();
            if cold.checking || cold.next_check.is_some_and(|t| now < t) {
                continue;
            }
            cold.checking = true;
            cold.next_check = Some(now + health.interval);
            due.push(i);
        }
        due
    }

    /// The result of one health check; a change once a threshold is crossed.
    pub fn check_result(&self, index: usize, ok: bool, what: String) -> Option<EndpointChange> {
        let health = self.health.as_ref()?;
        let e = self.endpoints.get(index)?;
        let mut cold = e.cold();
        cold.checking = false;
        cold.last_check = Some(what.clone());
        if ok {
            cold.checks_ok += 1;
            cold.checks_failed = 0;
            if !e.is_healthy() && cold.checks_ok >= health.healthy_threshold {
                e.healthy.store(true, Ordering::Relaxed);
                drop(cold);
                self.publish_endpoint(index);
                return Some(EndpointChange::Up { endpoint: index });
            }
        } else {
            cold.checks_failed += 1;
            cold.checks_ok = 0;
            if e.is_healthy() && cold.checks_failed >= health.unhealthy_threshold {
                e.healthy.store(false, Ordering::Relaxed);
                drop(cold);
                self.publish_endpoint(index);
                return Some(EndpointChange::Down {
                    endpoint: index,
                    why: what,
                });
            }
        }
        None
    }

    /// Choose an endpoint by power of two choices on in-flight requests: two distinct
    /// endpoints drawn at random, the less busy one wins. It tracks load as well as
    /// least-requests without scanning the pool, and unlike round-robin it steers away
    /// from a slow endpoint as soon as requests pile up on it. Down endpoints are
    /// skipped; `None` means no endpoint is usable.
    pub fn pick(self: &Arc<Self>) -> Option<InflightGuard> {
        let index = self.pick_index(fast_rand())?;
        Some(self.claim(index))
    }

    /// Count a request as in flight on endpoint `index`, until the guard drops.
    fn claim(self: &Arc<Self>, index: usize) -> InflightGuard {
        self.endpoints[index]
            .inflight
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.inflight().increment(1.0);
        InflightGuard {
            pool: Arc::clone(self),
            index,
        }
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

    const S30: Duration = Duration::from_secs(30);
    const S1: Duration = Duration::from_secs(1);

    fn pool(n: usize) -> Arc<Pool> {
        let cfg = PoolConfig {
            name: "p".into(),
            endpoints: (0..n)
                .map(|i| Endpoint::parse(&format!("127.0.0.1:{}", 1000 + i)).unwrap())
                .collect(),
            weight: 1,
            health: None,
            outlier: OutlierConfig::default(),
            protocol: Default::default(),
            tls: None,
            version: None,
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
