//! Routing: Host → service, and the per-request weighted choice of pool from an
//! immutable `ServiceSnapshot`.
//!
//! The request path loads the route table and then the service's snapshot, each one
//! lock-free `ArcSwap` load; it never allocates or takes a lock here. Snapshots are only
//! ever built whole (validated) and stored by the controller.

use crate::model::{Source, fast_rand};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

use arc_swap::ArcSwap;

use crate::dataplane::pool::Pool;

/// A pool as one snapshot sees it: the shared run-time pool plus its weight here.
#[derive(Debug, Clone)]
pub struct PoolSlot {
    pub pool: Arc<Pool>,
    pub weight: u32,
    /// Sum of the weights of this pool and all before it: the pick is a search in these.
    cumulative: u64,
}

impl PoolSlot {
    pub fn name(&self) -> &str {
        &self.pool.name
    }
}

/// Everything a request needs to choose a pool, frozen: pools in config order, their
/// weights and the version. Replaced whole on every change, never mutated.
#[derive(Debug)]
pub struct ServiceSnapshot {
    pub version: u64,
    pub updated_at: SystemTime,
    pub updated_by: Source,
    slots: Box<[PoolSlot]>,
    total: u64,
    /// Index of the pool that takes all traffic on rollback. Runtime state: a promotion
    /// makes the candidate the new baseline.
    baseline: usize,
    /// Sticky assignment: (first bucket past the range, slot), candidates first from
    /// bucket 0, the baseline last. See [`ServiceSnapshot::sticky_slot`].
    sticky: Box<[(u32, usize)]>,
}

/// Why a set of weights cannot become a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("expected {expected} weights, got {got}")]
    Count { expected: usize, got: usize },
    #[error("all weights are zero; at least one pool needs a weight > 0")]
    AllZero,
    #[error("weight {weight} of pool `{pool}` is above the maximum of {max}")]
    TooLarge { pool: String, weight: u32, max: u64 },
    #[error("`{0}` is not a pool of this service")]
    UnknownBaseline(String),
}

/// Sticky keys hash into this many buckets.
pub(crate) const STICKY_BUCKETS: u32 = 10_000;

impl ServiceSnapshot {
    /// Build a snapshot, checking the invariants every request relies on: one weight per
    /// pool, each within bounds, and a total above zero.
    pub fn new(
        pools: Vec<Arc<Pool>>,
        weights: &[u32],
        version: u64,
        updated_by: Source,
    ) -> Result<ServiceSnapshot, WeightError> {
        if pools.len() != weights.len() {
            return Err(WeightError::Count {
                expected: pools.len(),
                got: weights.len(),
            });
        }
        let mut total = 0u64;
        let mut slots = Vec::with_capacity(pools.len());
        for (pool, &weight) in pools.into_iter().zip(weights) {
            if u64::from(weight) > crate::model::MAX_WEIGHT {
                return Err(WeightError::TooLarge {
                    pool: pool.name.to_string(),
                    weight,
                    max: crate::model::MAX_WEIGHT,
                });
            }
            total += u64::from(weight);
            slots.push(PoolSlot {
                pool,
                weight,
                cumulative: total,
            });
        }
        if total == 0 {
            return Err(WeightError::AllZero);
        }
        let mut snapshot = ServiceSnapshot {
            version,
            // Stamped by the controller (`at`), whose clock is injected.
            updated_at: SystemTime::UNIX_EPOCH,
            updated_by,
            slots: slots.into_boxed_slice(),
            total,
            baseline: 0,
            sticky: Box::new([]),
        };
        snapshot.sticky = snapshot.sticky_ranges();
        Ok(snapshot)
    }

    /// When the change this snapshot makes was made.
    pub fn at(mut self, time: SystemTime) -> ServiceSnapshot {
        self.updated_at = time;
        self
    }

    /// Make `name` the baseline pool.
    pub fn with_baseline(mut self, name: &str) -> Result<ServiceSnapshot, WeightError> {
        self.baseline = self
            .slots
            .iter()
            .position(|s| s.name() == name)
            .ok_or_else(|| WeightError::UnknownBaseline(name.to_owned()))?;
        self.sticky = self.sticky_ranges();
        Ok(self)
    }

    /// The pool that takes all traffic on rollback.
    pub fn baseline(&self) -> &PoolSlot {
        &self.slots[self.baseline]
    }

    pub fn baseline_name(&self) -> &str {
        self.baseline().name()
    }

    /// Candidates take the lowest buckets, each in proportion to its share, in config
    /// order; the baseline takes the rest. Raising a candidate's share only extends its
    /// range, so its users stay on it; lowering it hands the top of its range back.
    fn sticky_ranges(&self) -> Box<[(u32, usize)]> {
        let mut ranges = Vec::with_capacity(self.slots.len());
        let mut end = 0u32;
        for (i, slot) in self.slots.iter().enumerate() {
            if i == self.baseline {
                continue;
            }
            let width =
                (u64::from(slot.weight) * u64::from(STICKY_BUCKETS)).div_ceil(self.total.max(1));
            end = (end + width as u32).min(STICKY_BUCKETS);
            ranges.push((end, i));
        }
        ranges.push((STICKY_BUCKETS, self.baseline));
        ranges.into_boxed_slice()
    }

    /// The pool a sticky bucket (0..STICKY_BUCKETS) belongs to.
    pub fn sticky_slot(&self, bucket: u32) -> &PoolSlot {
        let i = self
            .sticky
            .iter()
            .find(|(end, _)| bucket < *end)
            .map_or(self.baseline, |(_, i)| *i);
        &self.slots[i]
    }

    pub fn slots(&self) -> &[PoolSlot] {
        &self.slots
    }

    /// Publish this snapshot's weights and shares as gauges.
    fn publish(&self) {
        for (i, slot) in self.slots.iter().enumerate() {
            slot.pool.metrics().set_weight(slot.weight, self.share(i));
        }
    }

    pub fn total_weight(&self) -> u64 {
        self.total
    }

    pub fn weights(&self) -> Vec<u32> {
        self.slots.iter().map(|s| s.weight).collect()
    }

    pub fn slot(&self, name: &str) -> Option<&PoolSlot> {
        self.slots.iter().find(|s| s.name() == name)
    }

    /// Share of traffic of the pool at `index`, 0..=1.
    pub fn share(&self, index: usize) -> f64 {
        self.slots[index].weight as f64 / self.total as f64
    }

    /// Weighted draw: pool `i` is chosen with probability weight_i / total.
    pub fn pick(&self) -> &PoolSlot {
        self.pick_with(fast_rand())
    }

    /// The draw from a given random number (deterministic, for tests and benches).
    /// Multiply-shift maps `r` onto 0..total without the bias or cost of a modulo.
    pub fn pick_with(&self, r: u64) -> &PoolSlot {
        let point = ((u128::from(r) * u128::from(self.total)) >> 64) as u64;
        // Pools per service are few, so a linear scan beats a binary search. Zero-weight
        // pools have the same cumulative as the one before and are never chosen.
        self.slots
            .iter()
            .find(|s| point < s.cumulative)
            .unwrap_or_else(|| &self.slots[self.slots.len() - 1])
    }
}

/// A service at run time: its identity and the swappable snapshot.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub hosts: Vec<String>,
    /// How a request may pick its pool other than by weight.
    pub choice: Choice,
    snapshot: ArcSwap<ServiceSnapshot>,
}

impl Service {
    pub fn new(
        name: &str,
        hosts: Vec<String>,
        choice: Choice,
        snapshot: ServiceSnapshot,
    ) -> Service {
        snapshot.publish();
        Service {
            name: name.into(),
            hosts,
            choice,
            snapshot: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The snapshot in force. Cheap; the request path calls it once per request.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<ServiceSnapshot>> {
        self.snapshot.load()
    }

    pub fn snapshot_full(&self) -> Arc<ServiceSnapshot> {
        self.snapshot.load_full()
    }

    /// Replace the snapshot. Only the controller calls this, under its lock.
    fn store(&self, snapshot: Arc<ServiceSnapshot>) {
        snapshot.publish();
        self.snapshot.store(snapshot);
    }
}

/// How a request may choose its pool other than by weight: targeting (a header or
/// cookie naming a pool, for testers and blue/green previews) and sticky users.
/// Precedence: header > cookie > sticky assignment > weighted draw.
#[derive(Debug, Clone)]
pub struct Choice {
    pub target_header: HeaderName,
    pub target_cookie: String,
    /// When set, targeting is honoured only with a matching `x-weir-override-token`.
    pub override_token: Option<String>,
    pub sticky: Option<StickyKey>,
}

impl Default for Choice {
    fn default() -> Self {
        Choice {
            target_header: HeaderName::from_static("x-weir-pool"),
            target_cookie: "weir-pool".into(),
            override_token: None,
            sticky: None,
        }
    }
}

/// Where a sticky user's identity comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum StickyKey {
    /// A cookie weir sets itself (HttpOnly, SameSite=Lax) when the request lacks it.
    Cookie {
        name: String,
        max_age: Duration,
    },
    Header(HeaderName),
    ClientIp,
}

static OVERRIDE_TOKEN: HeaderName = HeaderName::from_static("x-weir-override-token");

/// The pool chosen for a request, and a cookie to set when a sticky id was assigned.
#[derive(Debug)]
pub struct Chosen<'a> {
    pub slot: &'a PoolSlot,
    pub set_cookie: Option<HeaderValue>,
}

impl Choice {
    /// Choose the pool for a request. The common case (no targeting header or cookie,
    /// no stickiness) costs two header lookups and the weighted draw.
    pub fn choose<'a>(
        &self,
        snap: &'a ServiceSnapshot,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Chosen<'a> {
        let weighted = |slot| Chosen {
            slot,
            set_cookie: None,
        };
        if let Some(slot) = self.target(snap, headers) {
            return weighted(slot);
        }
        let Some(sticky) = &self.sticky else {
            return weighted(snap.pick());
        };
        let mut set_cookie = None;
        let bucket = match sticky {
            StickyKey::Header(name) => match headers.get(name) {
                Some(v) => bucket_of(v.as_bytes()),
                None => return weighted(snap.pick()),
            },
            StickyKey::ClientIp => match client {
                IpAddr::V4(ip) => bucket_of(&ip.octets()),
                IpAddr::V6(ip) => bucket_of(&ip.octets()),
            },
            StickyKey::Cookie { name, max_age } => match cookie(headers, name) {
                Some(id) if !id.is_empty() => bucket_of(id.as_bytes()),
                _ => {
                    let id = format!("{:016x}{:016x}", fast_rand(), fast_rand());
                    set_cookie = HeaderValue::from_str(&format!(
                        "{name}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
                        max_age.as_secs()
                    ))
                    .ok();
                    bucket_of(id.as_bytes())
                }
            },
        };
        Chosen {
            slot: snap.sticky_slot(bucket),
            set_cookie,
        }
    }

    /// The pool a request names by header or cookie, if it may.
    fn target<'a>(&self, snap: &'a ServiceSnapshot, headers: &HeaderMap) -> Option<&'a PoolSlot> {
        let named = headers
            .get(&self.target_header)
            .and_then(|v| v.to_str().ok())
            .and_then(|name| snap.slot(name.trim()))
            .or_else(|| cookie(headers, &self.target_cookie).and_then(|name| snap.slot(name)))?;
        if let Some(token) = &self.override_token {
            let given = headers.get(&OVERRIDE_TOKEN)?.as_bytes();
            if !bool::from(subtle::ConstantTimeEq::ct_eq(given, token.as_bytes())) {
                return None;
            }
        }
        Some(named)
    }
}

/// A stable bucket for a sticky key: SipHash-1-3 with fixed keys, so a user lands in
/// the same bucket across restarts and weir instances.
pub(crate) fn bucket_of(key: &[u8]) -> u32 {
    use std::hash::Hasher;
    let mut h =
        siphasher::sip::SipHasher13::new_with_keys(0x7765_6972_5f73_7469, 0x636b_795f_6275_636b);
    h.write(key);
    (h.finish() % u64::from(STICKY_BUCKETS)) as u32
}

/// The value of cookie `name` in the request's Cookie header(s).
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

/// Host → service map, replaced whole when the set of services changes (reload).
/// Both lookups (by host for requests, by name for the control plane) are hash lookups,
/// so neither a request nor a reload of 10,000 services scans the list.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: Vec<Arc<Service>>,
    by_host: HashMap<String, usize>,
    by_name: HashMap<Arc<str>, usize>,
    default: Option<usize>,
    /// Every service's pools, flat: what the background loops sweep without loading
    /// each snapshot. A service's snapshots all share the pools it was built with (only
    /// weights change), so this stays true until the next table.
    pools: Vec<Arc<Pool>>,
}

impl RouteTable {
    pub fn new(services: Vec<Arc<Service>>) -> RouteTable {
        let mut by_host = HashMap::with_capacity(services.len());
        let mut by_name = HashMap::with_capacity(services.len());
        let mut default = None;
        let mut pools = Vec::with_capacity(services.len() * 2);
        for (i, s) in services.iter().enumerate() {
            by_name.entry(Arc::clone(&s.name)).or_insert(i);
            pools.extend(
                s.snapshot()
                    .slots()
                    .iter()
                    .map(|slot| Arc::clone(&slot.pool)),
            );
            if s.hosts.is_empty() {
                default = Some(i);
            }
            for h in &s.hosts {
                by_host.insert(h.clone(), i);
            }
        }
        RouteTable {
            services,
            by_host,
            by_name,
            default,
            pools,
        }
    }

    /// Every pool of every service.
    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(name).map(|&i| &self.services[i])
    }

    /// The service for a request's host (as received: any case, maybe with a port), or
    /// the default service.
    pub fn route(&self, host: Option<&str>) -> Option<&Arc<Service>> {
        let found = host.and_then(|h| {
            let h = strip_port(h);
            let h = h.strip_suffix('.').unwrap_or(h);
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&h.to_ascii_lowercase())
            } else {
                self.by_host.get(h)
            }
        });
        found.or(self.default.as_ref()).map(|&i| &self.services[i])
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) => &host[..i],
        None => host,
    }
}

/// The live route table; swapped whole on reload, read by every request.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<RouteTable>,
}

impl Router {
    /// A router and its one writer. Whoever builds the router holds the writer (the
    /// controller); everyone else gets the `Arc<Router>`, which can only read.
    pub fn new(table: RouteTable) -> (Arc<Router>, RoutingWriter) {
        let router = Arc::new(Router {
            table: ArcSwap::from_pointee(table),
        });
        let writer = RoutingWriter {
            router: Arc::clone(&router),
        };
        (router, writer)
    }

    pub fn table(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }
}

/// The write side of a [`Router`]: the only way to put a route table or a service
/// snapshot in force. Not `Clone`, and made only by [`Router::new`], so "one writer" is a
/// fact of the types: the controller owns it, and the data plane, the admin API and the
/// tasks only ever see the read side.
#[derive(Debug)]
pub struct RoutingWriter {
    router: Arc<Router>,
}

impl RoutingWriter {
    /// The read side this writer writes to.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Replace the whole table (a reload).
    pub fn publish_table(&self, table: RouteTable) {
        self.router.table.store(Arc::new(table));
    }

    /// Put a snapshot in force for `service` (in the table or about to be).
    pub fn publish(&self, service: &Service, snapshot: Arc<ServiceSnapshot>) {
        service.store(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Endpoint, PoolConfig};

    fn pools(names: &[&str]) -> Vec<Arc<Pool>> {
        names
            .iter()
            .map(|n| {
                Arc::new(Pool::new(
                    "svc",
                    &PoolConfig {
                        name: n.to_string(),
                        endpoints: vec![Endpoint::parse("127.0.0.1:1").unwrap()],
                        weight: 1,
                        health: None,
                        outlier: crate::config::OutlierConfig::default(),
                        protocol: Default::default(),
                        tls: None,
                        version: None,
                    },
                    &crate::telemetry::metrics::Metrics::new(),
                    crate::telemetry::window::Window::new(
                        Duration::from_secs(30),
                        Duration::from_secs(1),
                    ),
                ))
            })
            .collect()
    }

    fn snap(weights: &[u32]) -> ServiceSnapshot {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("p{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        ServiceSnapshot::new(pools(&names), weights, 1, Source::Config).unwrap()
    }

    #[test]
    fn pick_covers_the_range_exactly() {
        let s = snap(&[90, 10]);
        assert_eq!(s.pick_with(0).name(), "p0");
        assert_eq!(s.pick_with(u64::MAX).name(), "p1");
        // The boundary: r / 2^64 < 0.9 goes to p0.
        let edge = (0.9 * u64::MAX as f64) as u64;
        assert_eq!(s.pick_with(edge - 4096).name(), "p0");
        assert_eq!(s.pick_with(edge + 4096).name(), "p1");
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let s = snap(&[0, 5, 0]);
        for _ in 0..10_000 {
            assert_eq!(s.pick().name(), "p1");
        }
        assert_eq!(s.pick_with(0).name(), "p1");
        assert_eq!(s.pick_with(u64::MAX).name(), "p1");
    }

    #[test]
    fn split_follows_weights() {
        let s = snap(&[999, 1]);
        let n = 2_000_000;
        let minority = (0..n).filter(|_| s.pick().name() == "p1").count();
        // Expected 2000; four standard deviations is about ±180.
        assert!((1_800..2_200).contains(&minority), "{minority}");
    }

    #[test]
    fn invalid_weights_are_refused() {
        let p = pools(&["a", "b"]);
        assert_eq!(
            ServiceSnapshot::new(p.clone(), &[0, 0], 1, Source::Admin).unwrap_err(),
            WeightError::AllZero
        );
        assert!(matches!(
            ServiceSnapshot::new(p.clone(), &[1], 1, Source::Admin),
            Err(WeightError::Count { .. })
        ));
        assert!(matches!(
            ServiceSnapshot::new(p, &[1, u32::MAX], 1, Source::Admin),
            Err(WeightError::TooLarge { .. })
        ));
    }

    fn two(stable: u32, canary: u32) -> ServiceSnapshot {
        ServiceSnapshot::new(
            pools(&["stable", "canary"]),
            &[stable, canary],
            1,
            Source::Admin,
        )
        .unwrap()
        .with_baseline("stable")
        .unwrap()
    }

    /// 10,000 synthetic users through 5% → 25% → 50%, then a rollback.
    #[test]
    fn sticky_users_only_ever_move_towards_a_growing_canary() {
        let users: Vec<u32> = (0..10_000)
            .map(|i| bucket_of(format!("user-{i}").as_bytes()))
            .collect();
        let on_canary = |snap: &ServiceSnapshot| -> Vec<bool> {
            users
                .iter()
                .map(|&b| snap.sticky_slot(b).name() == "canary")
                .collect()
        };
        let mut before: Option<Vec<bool>> = None;
        for (stable, canary) in [(95, 5), (75, 25), (50, 50)] {
            let now = on_canary(&two(stable, canary));
            let share = now.iter().filter(|c| **c).count() as f64 / 100.0;
            assert!(
                (share - f64::from(canary)).abs() <= 1.5,
                "{canary}% → {share:.2}%"
            );
            if let Some(before) = &before {
                for (i, (was, is)) in before.iter().zip(&now).enumerate() {
                    assert!(!was || *is, "user {i} left the canary at {canary}%");
                }
            }
            before = Some(now);
        }
        assert!(
            on_canary(&two(100, 0)).iter().all(|c| !c),
            "rollback left users on canary"
        );
    }

    #[test]
    fn sticky_ranges_follow_the_baseline_not_the_order() {
        // Baseline listed second: the candidate still takes the lowest buckets.
        let snap = ServiceSnapshot::new(pools(&["green", "blue"]), &[30, 70], 1, Source::Admin)
            .unwrap()
            .with_baseline("blue")
            .unwrap();
        assert_eq!(snap.sticky_slot(0).name(), "green");
        assert_eq!(snap.sticky_slot(2_999).name(), "green");
        assert_eq!(snap.sticky_slot(3_000).name(), "blue");
        assert_eq!(snap.sticky_slot(9_999).name(), "blue");
        assert_eq!(snap.baseline_name(), "blue");
    }

    #[test]
    fn cookies_are_parsed_from_every_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; weir-pool=canary"),
        );
        h.append(http::header::COOKIE, HeaderValue::from_static("uid=\"x9\""));
        assert_eq!(cookie(&h, "weir-pool"), Some("canary"));
        assert_eq!(cookie(&h, "uid"), Some("x9"));
        assert_eq!(cookie(&h, "nope"), None);
    }

    #[test]
    fn host_routing_strips_port_and_case() {
        let mk = |name: &str, hosts: &[&str]| {
            Arc::new(Service::new(
                name,
                hosts.iter().map(|h| h.to_string()).collect(),
                Choice::default(),
                snap(&[1]),
            ))
        };
        let t = RouteTable::new(vec![
            mk("shop", &["shop.example.com", "[::1]"]),
            mk("dflt", &[]),
        ]);
        let name = |h: Option<&str>| t.route(h).map(|s| s.name.to_string());
        assert_eq!(name(Some("shop.example.com")).as_deref(), Some("shop"));
        assert_eq!(name(Some("SHOP.example.COM:8080")).as_deref(), Some("shop"));
        assert_eq!(name(Some("shop.example.com.")).as_deref(), Some("shop"));
        assert_eq!(name(Some("[::1]:8080")).as_deref(), Some("shop"));
        assert_eq!(name(Some("other.com")).as_deref(), Some("dflt"));
        assert_eq!(name(None).as_deref(), Some("dflt"));
        let no_default = RouteTable::new(vec![mk("shop", &["shop.example.com"])]);
        assert!(no_default.route(Some("other.com")).is_none());
    }
}
