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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::pool::Pool;

/// A failure weir saw on a request, with whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The TCP connection to the endpoint could not be made (refused, unreachable, timed out).
    Connect,
    /// The endpoint did not answer with response headers within `request_timeout`, or
    /// its response body stalled for longer than `upstream_body_timeout`.
    Timeout,
    /// The connection closed or was reset before the response was complete (before
    /// its head, or in the middle of its body).
    Reset,
    /// The endpoint answered something that is not valid HTTP.
    Protocol,
    /// The pool had no endpoint able to take the request.
    NoEndpoint,
    /// The client went away before the exchange was over: it aborted its upload, reset
    /// its stream, or closed the connection while the response was streaming. Shown as
    /// status 499 (as nginx logs it).
    ClientAbort,
    /// The client's request body was not valid HTTP framing (a bad chunk): answered 400.
    BadRequestBody,
    /// The client stopped sending its body for longer than `body_read_timeout`: 408.
    ClientTimeout,
}

/// Whose fault a failure was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Upstream,
    Client,
}

impl ErrorKind {
    /// Failures charged to the pool.
    pub const UPSTREAM: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Protocol,
        ErrorKind::NoEndpoint,
    ];

    /// Failures of the client's making, never charged to the pool.
    pub const CLIENT: [ErrorKind; 3] = [
        ErrorKind::ClientAbort,
        ErrorKind::BadRequestBody,
        ErrorKind::ClientTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::NoEndpoint => "no_endpoint",
            ErrorKind::ClientAbort => "client_abort",
            ErrorKind::BadRequestBody => "bad_request_body",
            ErrorKind::ClientTimeout => "client_timeout",
        }
    }

    pub fn blame(self) -> Blame {
        match self {
            ErrorKind::ClientAbort | ErrorKind::BadRequestBody | ErrorKind::ClientTimeout => {
                Blame::Client
            }
            _ => Blame::Upstream,
        }
    }

    /// Index into [`ErrorKind::UPSTREAM`] or [`ErrorKind::CLIENT`] (whichever holds it),
    /// for per-kind handle arrays.
    pub fn index(self) -> usize {
        match self {
            ErrorKind::Connect | ErrorKind::ClientAbort => 0,
            ErrorKind::Timeout | ErrorKind::BadRequestBody => 1,
            ErrorKind::Reset | ErrorKind::ClientTimeout => 2,
            ErrorKind::Protocol => 3,
            ErrorKind::NoEndpoint => 4,
        }
    }

    /// The status code logs and metrics show for a failure in the middle of an exchange
    /// whose head was already sent, or that weir answered itself.
    pub fn client_status(self) -> Option<u16> {
        match self {
            ErrorKind::ClientAbort => Some(499),
            ErrorKind::BadRequestBody => Some(400),
            ErrorKind::ClientTimeout => Some(408),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// gRPC status codes (grpc/doc/statuscodes.md), by number.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// gRPC codes that mean the server failed, counted as the pool's failure by default:
/// UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. The
/// others describe the caller's request (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED,
/// …) or its own choice (CANCELLED): a version that answers them is working as designed.
pub const GRPC_DEFAULT_FAILURES: u32 =
    (1 << 2) | (1 << 4) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

pub const GRPC_UNKNOWN: u8 = 2;
pub const GRPC_DEADLINE_EXCEEDED: u8 = 4;
pub const GRPC_UNAVAILABLE: u8 = 14;

/// A gRPC status code's name; codes outside the spec read as UNKNOWN (as clients treat
/// them), which also keeps metric label values bounded.
pub fn grpc_code_name(code: u8) -> &'static str {
    GRPC_CODES
        .get(usize::from(code))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// Parse a `grpc-status` value: a decimal number; anything else is UNKNOWN.
pub fn parse_grpc_status(value: &[u8]) -> u8 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .filter(|&c| usize::from(c) < GRPC_CODES.len())
        .unwrap_or(GRPC_UNKNOWN)
}

/// The gRPC code a client derives from an HTTP status when a response carries no
/// `grpc-status` (grpc/doc/http-grpc-status-mapping.md).
pub fn grpc_from_http(status: u16) -> u8 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => GRPC_UNKNOWN,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_values() {
        assert_eq!(parse_grpc_status(b"14"), 14);
        assert_eq!(parse_grpc_status(b"0"), 0);
        assert_eq!(parse_grpc_status(b"17"), GRPC_UNKNOWN);
        assert_eq!(parse_grpc_status(b"x"), GRPC_UNKNOWN);
        assert_eq!(grpc_code_name(14), "UNAVAILABLE");
        assert_eq!(grpc_code_name(200), "UNKNOWN");
        assert_eq!(grpc_from_http(503), GRPC_UNAVAILABLE);
        assert_eq!(grpc_from_http(404), 12);
    }

    #[test]
    fn default_failure_codes_are_the_server_side_ones() {
        let names: Vec<&str> = (0..17u8)
            .filter(|c| GRPC_DEFAULT_FAILURES & (1 << c) != 0)
            .map(grpc_code_name)
            .collect();
        assert_eq!(
            names,
            [
                "UNKNOWN",
                "DEADLINE_EXCEEDED",
                "UNIMPLEMENTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS"
            ]
        );
    }

    #[test]
    fn kinds_index_their_arrays() {
        for (i, k) in ErrorKind::UPSTREAM.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(k.blame(), Blame::Upstream);
        }
        for (i, k) in ErrorKind::CLIENT.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(k.blame(), Blame::Client);
        }
    }
}
