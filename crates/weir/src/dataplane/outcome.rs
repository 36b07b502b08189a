//! The one record every proxied request ends in, and the sinks that consume it.
//!
//! Metrics, the SLO guard, endpoint ejection and logs all read the same `Outcome`, so
//! they can never disagree about what happened to a request. An outcome is emitted when
//! the exchange is over — the response body ended, broke or was abandoned — not when
//! the response head arrives: a body an upstream cuts short is a failure users felt.
//!
//! Blame is part of the record: a failure is either the upstream's (it counts against
//! the pool: guard, ejection, error metrics) or the client's (an aborted upload, a
//! malformed body, a stalled upload; counted on its own, never against the pool), so
//! nobody outside can roll a healthy version back by sending broken requests.

use crate::model::{Blame, ErrorKind, grpc_code_name};
use std::sync::Arc;
use std::time::Duration;

use crate::dataplane::pool::Pool;
use crate::telemetry::access::RequestMeta;

/// What one request came to.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    pub pool: &'a Arc<Pool>,
    /// Index of the endpoint in the pool, when one was chosen.
    pub endpoint: Option<usize>,
    /// The status code the client was answered with (the upstream's, or weir's own
    /// 4xx/5xx; 499 when the client went away).
    pub status: u16,
    /// For gRPC requests: the gRPC status the call ended with (from the trailers, a
    /// trailers-only response, or derived from the HTTP status).
    pub grpc: Option<u8>,
    /// Set when the exchange failed, with whose fault it was ([`ErrorKind::blame`]).
    pub error: Option<ErrorKind>,
    /// From the request being received to the response headers being ready.
    pub latency: Duration,
    /// From the request being received to the response's last byte (or its failure);
    /// equal to `latency` when weir answered itself.
    pub duration: Duration,
    /// When a first attempt failed and the request was retried: that attempt's
    /// endpoint and failure. It counts as an error for the guard and metrics, so a
    /// retry never hides a failing version.
    pub retried: Option<(usize, ErrorKind)>,
    /// The request's head, kept only while the access log is on.
    pub request: Option<&'a Arc<RequestMeta>>,
    /// Response body bytes relayed from the upstream to the client; `None` when weir
    /// answered itself.
    pub bytes_sent: Option<u64>,
}

impl Outcome<'_> {
    pub fn service(&self) -> &str {
        &self.pool.service
    }

    pub fn pool_name(&self) -> &str {
        &self.pool.name
    }

    /// A failure of the client's making: counted on its own, never against the pool.
    pub fn is_client_fault(&self) -> bool {
        self.error.is_some_and(|k| k.blame() == Blame::Client)
    }

    /// A failure of the pool, for the SLO guard and error metrics: any failure on the
    /// upstream's side, an upstream 5xx, or (for gRPC) a status in the service's set of
    /// failure codes. Never a client fault.
    pub fn is_error(&self) -> bool {
        match self.error {
            Some(kind) => kind.blame() == Blame::Upstream,
            None => match self.grpc {
                Some(code) => self.pool.grpc_failure(code),
                None => self.status >= 500,
            },
        }
    }
}

/// Something that consumes outcomes. Called on the request path: must be quick and
/// must not block.
pub trait OutcomeSink: Send + Sync + 'static {
    fn record(&self, outcome: &Outcome<'_>);

    /// A request no service was found for (answered 404 before any pool was chosen).
    fn unrouted(&self) {}
}

/// Writes one debug-level log line per request (enable with `RUST_LOG=weir=debug`).
#[derive(Debug, Default)]
pub struct LogSink;

impl OutcomeSink for LogSink {
    fn record(&self, o: &Outcome<'_>) {
        tracing::debug!(
            service = o.service(),
            pool = o.pool_name(),
            endpoint = o.endpoint.map(|i| o.pool.endpoints()[i].endpoint.as_str()),
            status = o.status,
            grpc = o.grpc.map(grpc_code_name),
            error = o.error.map(ErrorKind::as_str),
            retried = o.retried.map(|(_, k)| k.as_str()),
            latency_us = o.latency.as_micros() as u64,
            duration_us = o.duration.as_micros() as u64,
            "request"
        );
    }

    fn unrouted(&self) {
        tracing::debug!("request for an unknown host");
    }
}

/// Hand one outcome to every sink.
pub(crate) fn emit(sinks: &[Arc<dyn OutcomeSink>], outcome: &Outcome<'_>) {
    for sink in sinks {
        sink.record(outcome);
    }
}
