//! The one record every proxied request ends in, and the sinks that consume it.
//!
//! Metrics, the SLO guard and logs all read the same `Outcome`, so they can never
//! disagree about what happened to a request.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::pool::Pool;

/// A failure on weir's side of the request, attributed to the pool it was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The TCP connection to the endpoint could not be made (refused, unreachable, timed out).
    Connect,
    /// The endpoint did not answer with response headers within `request_timeout`.
    Timeout,
    /// The connection closed or was reset before a complete response head arrived.
    Reset,
    /// The endpoint answered something that is not valid HTTP.
    Protocol,
    /// The pool had no endpoint able to take the request.
    NoEndpoint,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Protocol,
        ErrorKind::NoEndpoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::NoEndpoint => "no_endpoint",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one request came to.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    pub pool: &'a Arc<Pool>,
    /// Index of the endpoint in the pool, when one was chosen.
    pub endpoint: Option<usize>,
    /// The status code the client was answered with (the upstream's, or weir's own
    /// 502/503/504).
    pub status: u16,
    /// Set when weir generated the answer because of a failure.
    pub error: Option<ErrorKind>,
    /// From the request being received to the response headers being ready.
    pub latency: Duration,
    /// When a first attempt failed and the request was retried: that attempt's
    /// endpoint and failure. It counts as an error for the guard and metrics, so a
    /// retry never hides a failing version.
    pub retried: Option<(usize, ErrorKind)>,
}

impl Outcome<'_> {
    pub fn service(&self) -> &str {
        &self.pool.service
    }

    pub fn pool_name(&self) -> &str {
        &self.pool.name
    }

    /// An error for the SLO guard: an upstream 5xx or any failure on weir's side.
    pub fn is_error(&self) -> bool {
        self.error.is_some() || self.status >= 500
    }
}

/// Something that consumes outcomes. Called on the request path: must be quick and
/// must not block.
pub trait OutcomeSink: Send + Sync + 'static {
    fn record(&self, outcome: &Outcome<'_>);
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
            error = o.error.map(ErrorKind::as_str),
            retried = o.retried.map(|(_, k)| k.as_str()),
            latency_us = o.latency.as_micros() as u64,
            "request"
        );
    }
}
