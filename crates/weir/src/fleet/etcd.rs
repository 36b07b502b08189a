//! The etcd connection: one client per configured endpoint, sticking to one and moving
//! on to the next when it does not answer, every call bounded by `[fleet] timeout`.
//!
//! Why not etcd-client's own endpoint list: it balances calls over all endpoints and a
//! call that lands on a dead member fails instead of moving on (the crate leaves
//! failover to its user). Every call here goes to the current endpoint; an answer that
//! says "unavailable" (transport error, no leader, deadline) rotates to the next one
//! and tries again until the deadline.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, Error};
use tokio::time::Instant;

use crate::config::FleetConfig;

/// The connection to the fleet's etcd cluster.
pub(crate) struct Etcd {
    endpoints: Vec<String>,
    clients: Mutex<Vec<Option<Client>>>,
    options: ConnectOptions,
    current: AtomicUsize,
    pub(crate) timeout: Duration,
    /// Whether the last call got an answer: every call says, whoever makes it (the
    /// watch, the lease, the publisher, a write), so the flag recovers with the first
    /// answer after an outage and writes may fail fast while it is down.
    reachable: AtomicBool,
    /// `weir_fleet_store_reachable`.
    gauge: metrics::Gauge,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Connection settings from `[fleet]`; connects lazily, on the first call.
    pub(crate) fn new(cfg: &FleetConfig, gauge: metrics::Gauge) -> Result<Etcd, String> {
        // HTTP/2 pings no more often than etcd accepts (its minimum is 5 s; faster ones
        // are answered with GOAWAY), and every stream asks for a member with a leader,
        // so that a member cut off from its quorum fails calls instead of hanging.
        let mut options = ConnectOptions::new()
            .with_require_leader(true)
            .with_keep_alive(
                Duration::from_secs(10),
                cfg.timeout.max(Duration::from_secs(1)),
            )
            .with_keep_alive_while_idle(false)
            .with_connect_timeout(cfg.timeout);
        if let (Some(user), Some(var)) = (&cfg.username, &cfg.password_env) {
            let password = std::env::var(var).map_err(|_| {
                format!("[fleet] password_env names {var}, which is not set in the environment")
            })?;
            options = options.with_user(user.clone(), password);
        }
        if cfg.endpoints.iter().any(|e| e.starts_with("https://")) {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("[fleet] ca_file {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
                let cert_pem = std::fs::read(cert)
                    .map_err(|e| format!("[fleet] cert_file {}: {e}", cert.display()))?;
                let key_pem = std::fs::read(key)
                    .map_err(|e| format!("[fleet] key_file {}: {e}", key.display()))?;
                tls = tls.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
            }
            options = options.with_tls(tls);
        }
        Ok(Etcd {
            clients: Mutex::new(vec![None; cfg.endpoints.len()]),
            endpoints: cfg.endpoints.clone(),
            options,
            current: AtomicUsize::new(0),
            timeout: cfg.timeout,
            reachable: AtomicBool::new(false),
            gauge,
        })
    }

    /// Whether etcd answered the last call.
    pub(crate) fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    pub(crate) fn set_reachable(&self, ok: bool) {
        if self.reachable.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::warn!("fleet: etcd answers again ({})", self.endpoint());
            } else {
                tracing::error!(
                    "fleet: etcd is unreachable; serving the last applied state, refusing \
                     changes, rollouts hold, the guard judges this instance's traffic"
                );
            }
        }
        self.gauge.set(f64::from(u8::from(ok)));
    }

    /// The index of the endpoint calls go to now.
    pub(crate) fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.endpoints.len()
    }

    /// The endpoint calls go to now.
    pub(crate) fn endpoint(&self) -> String {
        self.endpoints[self.current()].clone()
    }

    /// The client for the current endpoint, connecting it if needed.
    pub(crate) async fn client(&self) -> Result<(usize, Client), Error> {
        let i = self.current();
        if let Some(c) = self.clients.lock().unwrap_or_else(|p| p.into_inner())[i].clone() {
            return Ok((i, c));
        }
        let c = Client::connect([self.endpoints[i].as_str()], Some(self.options.clone())).await?;
        self.clients.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(c.clone());
        Ok((i, c))
    }

    /// Move on from endpoint `i` (if no other call did already).
    pub(crate) fn rotate(&self, i: usize) {
        let _ = self.current.compare_exchange(
            i,
            (i + 1) % self.endpoints.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Run `op` against the current endpoint, moving on to the next while the answer is
    /// "unavailable", until the deadline.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T, Failure>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut last = String::from("no answer");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.set_reachable(false);
                return Err(Failure::Unavailable(format!(
                    "etcd did not answer within {:?} ({last})",
                    self.timeout
                )));
            }
            let attempt = async {
                let (i, client) = self.client().await.map_err(|e| (0, e))?;
                op(client).await.map_err(|e| (i, e))
            };
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(v)) => {
                    self.set_reachable(true);
                    return Ok(v);
                }
                Ok(Err((i, e))) if retryable(&e) => {
                    last = format!("{}: {e}", self.endpoints[i]);
                    self.rotate(i);
                    // A short pause, so that a cluster electing a leader is not hammered.
                    tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                }
                Ok(Err((_, e))) => {
                    // A member answered, if only to refuse.
                    self.set_reachable(true);
                    return Err(Failure::Refused(e.to_string()));
                }
                Err(_) => {
                    let i = self.current();
                    self.rotate(i);
                    last = format!("{}: timed out", self.endpoints[i]);
                }
            }
        }
    }
}

/// Why an etcd call failed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// No member answered in time (or none has a leader): try again later.
    Unavailable(String),
    /// A member answered with an error that trying again will not change.
    Refused(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unavailable(m) | Failure::Refused(m) => f.write_str(m),
        }
    }
}

/// Errors another endpoint (or a moment later) may not give.
pub(crate) fn retryable(e: &Error) -> bool {
    // gRPC codes by number (etcd-client does not re-export tonic's names): cancelled,
    // unknown, deadline exceeded, resource exhausted, aborted, unavailable.
    const RETRY: [i32; 6] = [1, 2, 4, 8, 10, 14];
    match e {
        Error::TransportError(_) | Error::IoError(_) | Error::WatchError(_) => true,
        Error::GRpcStatus(status) => {
            let code: i32 = status.code().into();
            RETRY.contains(&code)
                || status.message().contains("no leader")
                || status.message().contains("leader changed")
        }
        _ => false,
    }
}
