//! Endpoint health: active HTTP checks on a timer, passive ejection from live traffic,
//! and the events both produce.
//!
//! Passive observations come from the request path through `OutlierSink` (atomics only;
//! an ejection is rare and hands its event to a channel). One background task runs the
//! checks, returns ejected endpoints when their time is up, and records every change as
//! an event, so nothing on the request path ever waits for the disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::dataplane::sinks::{EndpointChanges, EndpointChangesRx, OutlierSink};
use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::UpstreamProtocol;
use crate::control::controller::Controller;
use crate::control::store::Event;
use crate::dataplane::pool::{EndpointChange, Pool};
use crate::model::{EventKind, Source};

/// How often the health task looks for due checks and expired ejections.
const TICK: Duration = Duration::from_millis(100);
/// Every this many rounds (3 s), every pool is looked at; in between only the busy
/// ones (see [`Monitor::round`]).
const FULL_EVERY: u64 = 30;

/// The health task and the sink that feeds it.
pub(crate) fn start(controller: Arc<Controller>) -> (OutlierSink, Monitor) {
    let (sink, tx, rx) = OutlierSink::channel();
    (
        sink,
        Monitor {
            controller,
            changes: tx,
            rx: Some(rx),
            rounds: Arc::new(AtomicU64::new(0)),
            busy: Busy::default(),
        },
    )
}

/// Runs the checks and records endpoint changes.
#[derive(Debug)]
pub(crate) struct Monitor {
    controller: Arc<Controller>,
    changes: EndpointChanges,
    rx: Option<EndpointChangesRx>,
    /// Rounds run so far (see [`Monitor::rounds`]).
    rounds: Arc<AtomicU64>,
    busy: Busy,
}

/// The pools a round must look at, so that with thousands of idle pools a round does
/// not touch each of them ten times a second.
#[derive(Debug, Default)]
struct Busy {
    /// The route table these lists are for (its address).
    table: usize,
    /// Pools with health checks: looked at every round.
    checked: Vec<Arc<Pool>>,
    /// Pools with an endpoint ejected (reported through the change channel, or seen at
    /// the last full round) or a retry budget to refill: looked at every round until
    /// neither is true.
    watched: Vec<Arc<Pool>>,
}

impl Busy {
    fn watch(&mut self, pool: &Arc<Pool>) {
        if !self.watched.iter().any(|p| Arc::ptr_eq(p, pool)) {
            self.watched.push(Arc::clone(pool));
        }
    }
}

/// What one round does to one pool: refill its retry budget, return ejected endpoints
/// whose time is up, start its due health checks. Whether the pool still needs looking
/// at (an endpoint still ejected, a budget still to refill).
fn upkeep(pool: &Arc<Pool>, now: Instant, changes: &EndpointChanges) -> bool {
    pool.retry_budget().refill();
    for change in pool.sweep(now) {
        let _ = changes.send((Arc::clone(pool), change));
    }
    for index in pool.due_checks(now) {
        let (pool, changes) = (Arc::clone(pool), changes.clone());
        tokio::spawn(async move {
            let (ok, what) = check(&pool, index).await;
            if let Some(change) = pool.check_result(index, ok, what) {
                let _ = changes.send((pool, change));
            }
        });
    }
    pool.retry_budget().needs_refill() || pool.endpoints().iter().any(|e| e.is_ejected())
}

impl Monitor {
    /// A counter of the rounds the task has run: a round runs only once the task has
    /// recorded every earlier change, so a test on paused time waits for it before
    /// moving the clock again.
    #[cfg(test)]
    pub(crate) fn rounds(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.rounds)
    }

    /// Run until the task is dropped. Only the first call does anything.
    pub(crate) async fn run(mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.round(self.controller.clock().instant());
                    self.rounds.fetch_add(1, Ordering::Release);
                }
                Some((pool, change)) = rx.recv() => {
                    if matches!(change, EndpointChange::Ejected { .. }) {
                        self.busy.watch(&pool);
                    }
                    self.record(&pool, &change).await
                }
            }
        }
    }

    /// One round. Every [`FULL_EVERY`] rounds (and with a new route table) every pool
    /// is looked at; in between only the pools with health checks and the ones the last
    /// look left busy — an ejected endpoint (passive ejections are also reported as
    /// they happen) or a retry budget off its resting range. An idle pool's budget
    /// rests there, so at worst a pool whose budget fell below the floor since gets its
    /// first refill up to a full round's interval (3 s) late.
    fn round(&mut self, now: Instant) {
        let table = self.controller.router().table();
        let address = Arc::as_ptr(&*table) as usize;
        let round = self.rounds.load(Ordering::Relaxed);
        let busy = &mut self.busy;
        if busy.table != address || round.is_multiple_of(FULL_EVERY) {
            busy.table = address;
            busy.checked.clear();
            busy.watched.clear();
            for pool in table.pools() {
                if pool.health.is_some() {
                    busy.checked.push(Arc::clone(pool));
                }
                if upkeep(pool, now, &self.changes) && pool.health.is_none() {
                    busy.watched.push(Arc::clone(pool));
                }
            }
            return;
        }
        for pool in &busy.checked {
            upkeep(pool, now, &self.changes);
        }
        busy.watched
            .retain(|pool| pool.health.is_none() && upkeep(pool, now, &self.changes));
    }

    async fn record(&self, pool: &Pool, change: &EndpointChange) {
        let address = pool.endpoints()[change.endpoint()].endpoint.to_string();
        // Who saw it: the active checks (`health`) or live traffic (`outlier`).
        let (kind, source, reason) = match change {
            EndpointChange::Ejected {
                failures, duration, ..
            } => (
                EventKind::EndpointEjected,
                Source::Outlier,
                format!(
                    "{address} ejected from {} for {} after {failures} consecutive failures",
                    pool.name,
                    humantime::format_duration(*duration)
                ),
            ),
            EndpointChange::Returned { .. } => (
                EventKind::EndpointReturned,
                Source::Outlier,
                format!("{address} back in {} after its ejection", pool.name),
            ),
            EndpointChange::Down { why, .. } => (
                EventKind::EndpointDown,
                Source::Health,
                format!("{address} in {} failed its health checks: {why}", pool.name),
            ),
            EndpointChange::Up { .. } => (
                EventKind::EndpointUp,
                Source::Health,
                format!("{address} in {} passes its health checks again", pool.name),
            ),
        };
        tracing::warn!("{reason}");
        let mut event = Event::new(&*pool.service, kind, source);
        event.reason = Some(reason);
        event.details = serde_json::json!({ "pool": &*pool.name, "endpoint": address });
        let controller = Arc::clone(&self.controller);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = controller.record(event) {
                tracing::error!("cannot record an endpoint event: {e}");
            }
        })
        .await;
    }
}

/// One health check: a GET of the configured path on a fresh connection, within the
/// timeout. Returns whether it passed and what happened, in words.
async fn check(pool: &Pool, index: usize) -> (bool, String) {
    let Some(health) = &pool.health else {
        return (true, "no checks".into());
    };
    let endpoint = &pool.endpoints()[index];
    let authority = endpoint.authority().clone();
    let h2 = matches!(pool.protocol, UpstreamProtocol::H2 | UpstreamProtocol::H2c);
    let attempt = async {
        // Checks speak the pool's protocol, over TLS when the pool uses it.
        let stream = crate::dataplane::client::open(endpoint)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let scheme = if endpoint.tls().is_some() {
            "https"
        } else {
            "http"
        };
        let builder = Request::get(if h2 {
            format!("{scheme}://{authority}{}", health.path)
        } else {
            health.path.clone()
        })
        .header(
            header::USER_AGENT,
            concat!("weir-health/", env!("CARGO_PKG_VERSION")),
        );
        let req = if h2 {
            builder.body(Empty::<Bytes>::new())
        } else {
            builder
                .header(header::HOST, authority.as_str())
                .header(header::CONNECTION, "close")
                .body(Empty::<Bytes>::new())
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = if h2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
            .map_err(|e| format!("handshake: {e}"))?;
            let driver = tokio::spawn(conn);
            let resp = sender.send_request(req).await.map_err(|e| format!("{e}"));
            driver.abort();
            resp?.status().as_u16()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let driver = tokio::spawn(conn);
            let resp = sender.send_request(req).await.map_err(|e| format!("{e}"));
            driver.abort();
            resp?.status().as_u16()
        };
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(health.timeout, attempt).await {
        Err(_) => (false, format!("no answer within {:?}", health.timeout)),
        Ok(Err(e)) => (false, e),
        Ok(Ok(status)) => {
            let (lo, hi) = health.expect_status;
            ((lo..=hi).contains(&status), format!("status {status}"))
        }
    }
}
