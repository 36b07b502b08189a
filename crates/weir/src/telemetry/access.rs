//! The access log: one JSON object per request, written off the request path.
//!
//! Off by default, and then it costs the request path one relaxed atomic load: the proxy
//! keeps a request's details (method, URI, a few header values: reference-counted
//! handles, no copies) only while [`AccessLog::enabled`] says so. When on, the request
//! path only decides whether a request is sampled and hands its record (a bounded,
//! owned copy of those details) to a bounded channel without waiting; a dedicated
//! thread formats the line (serde_json, so a hostile path or user agent is escaped and
//! cannot forge a line) and writes it through a buffer, flushed whenever the channel
//! runs dry: batched under load, prompt when idle. When the writer falls behind, records
//! are dropped and counted (`weir_access_log_dropped_total`) rather than slowing
//! requests down.
//!
//! Every reload applies `[log.access]` again and reopens the file, so that after log
//! rotation (rename, then SIGHUP) weir writes to the new file. Neither a reload nor
//! shutdown waits on the writer: new settings and flush requests reach it outside the
//! channel when that is full, since a stuck writer never empties it.

use std::borrow::Cow;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Uri, Version};
use metrics::Counter;
use serde::Serialize;

use crate::config::AccessLogConfig;
use crate::model::{ErrorKind, fast_rand, grpc_code_name, timestamp};
use crate::telemetry::metrics::Metrics;

/// Records the writer could not take in time.
pub(crate) const DROPPED_TOTAL: &str = "weir_access_log_dropped_total";
/// Records waiting for the writer. At 100k requests/s this is ~80 ms of slack for a
/// disk hiccup; each record is a few hundred bytes.
const CAPACITY: usize = 8192;
/// The writer's buffer: one write(2) per this many bytes under load.
const BUFFER: usize = 64 * 1024;
/// Longest wait for the writer to flush at shutdown: a stuck disk must not hold the
/// process up.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// Bounds on what a client controls, so that one request cannot make a huge line.
const MAX_USER_AGENT: usize = 256;
const MAX_PATH: usize = 2048;
const MAX_QUERY: usize = 2048;
const MAX_REQUEST_ID: usize = 128;
const MAX_METHOD: usize = 32;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the access log needs from a request's head, taken when it arrives. Cheap to
/// take: the method, URI and header values share the bytes hyper parsed.
#[derive(Debug)]
pub struct RequestMeta {
    method: Method,
    uri: Uri,
    version: Version,
    user_agent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    client: SocketAddr,
    tls: bool,
}

impl RequestMeta {
    pub fn new<B>(req: &Request<B>, client: SocketAddr, tls: bool) -> RequestMeta {
        RequestMeta {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
            request_id: req.headers().get(&X_REQUEST_ID).cloned(),
            client,
            tls,
        }
    }

    /// The bounded copy a queued record keeps: the URI and header values share hyper's
    /// buffer for the whole request head, which a record waiting in the writer's queue
    /// would otherwise keep alive (kilobytes each, times [`CAPACITY`]).
    pub(crate) fn record(&self) -> Recorded {
        Recorded {
            method: self.method.clone(),
            path: bounded(self.uri.path(), MAX_PATH).into(),
            query: self.uri.query().map(|q| bounded(q, MAX_QUERY).into()),
            version: self.version,
            user_agent: self
                .user_agent
                .as_ref()
                .map(|v| text(v, MAX_USER_AGENT).into()),
            request_id: self
                .request_id
                .as_ref()
                .map(|v| text(v, MAX_REQUEST_ID).into()),
            client: self.client,
            tls: self.tls,
        }
    }
}

/// A request as its access log record keeps it: owned, already bounded, a few hundred
/// bytes.
#[derive(Debug)]
pub(crate) struct Recorded {
    /// Standard methods are constants; others own their bytes (not hyper's buffer).
    method: Method,
    path: Box<str>,
    /// Kept whatever `include_query` says: the writer decides, with the settings in
    /// force when it writes the line.
    query: Option<Box<str>>,
    version: Version,
    user_agent: Option<Box<str>>,
    request_id: Option<Box<str>>,
    client: SocketAddr,
    tls: bool,
}

/// One request's record, as the outcome sinks know it.
#[derive(Debug)]
pub(crate) struct Entry {
    /// When the exchange ended.
    pub time: SystemTime,
    pub request: Recorded,
    /// `None` for a request no service was found for.
    pub service: Option<Arc<str>>,
    pub pool: Option<Arc<str>>,
    pub endpoint: Option<Authority>,
    pub status: u16,
    pub grpc: Option<u8>,
    pub error: Option<ErrorKind>,
    /// A first attempt's failure, when the request was retried.
    pub retried: Option<ErrorKind>,
    /// To the response headers.
    pub headers: Duration,
    /// To the response's last byte (or its failure).
    pub duration: Duration,
    /// Response body bytes relayed from the upstream; `None` when weir answered.
    pub bytes_sent: Option<u64>,
}

/// What the writer thread is asked to do.
enum Msg {
    Entry(Box<Entry>),
    /// New settings wait in [`Handoff::settings`]: take them here, so that the records
    /// handed over before them still go to the old destination.
    Configure,
    /// Flush, then say so.
    Flush(mpsc::Sender<()>),
}

/// Where the writer should write from now on (after flushing the old destination).
struct Settings {
    out: Box<dyn Write + Send>,
    include_query: bool,
}

/// What reaches the writer without going through the channel: neither a reload nor
/// shutdown may wait for room in a channel that a stuck writer (a pipe nobody reads, a
/// hung NFS mount) never empties. The reload hook runs under the controller's lock, so
/// such a wait would hang every admin change and guard rollback.
#[derive(Default)]
struct Handoff {
    /// The newest settings the writer has not taken yet; a newer configuration
    /// replaces them.
    settings: Mutex<Option<Settings>>,
    /// Set when settings wait in the slot without a [`Msg::Configure`] in the channel
    /// (it was full): the writer then takes them before its next record.
    settings_urgent: AtomicBool,
    /// Flushes asked for when the channel was full: answered when the channel next runs
    /// dry, i.e. once everything handed over before them is written.
    flush_waiters: Mutex<Vec<mpsc::Sender<()>>>,
}

impl Handoff {
    /// The settings waiting in the slot, if any.
    fn take_settings(&self) -> Option<Settings> {
        // Cleared before taking: a configuration racing with this leaves the flag set
        // and, at worst, costs one more look at an empty slot.
        self.settings_urgent.store(false, Ordering::Release);
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// The access log's request-path side and its writer thread.
pub(crate) struct AccessLog {
    enabled: AtomicBool,
    all_errors: AtomicBool,
    /// A request is sampled when a uniform `u64` is at most this (`u64::MAX`: all).
    threshold: AtomicU64,
    /// Started by the first configuration that enables the log: a weir that never
    /// logs requests has no writer thread.
    tx: OnceLock<SyncSender<Msg>>,
    /// Settings and flush requests for the writer that must not wait for the channel.
    handoff: Arc<Handoff>,
    /// One configuration at a time (start-up, reloads).
    configuring: Mutex<()>,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// An access log that is off until [`AccessLog::configure`] turns it on.
    pub(crate) fn new(metrics: &Metrics) -> Arc<AccessLog> {
        metrics.describe_counter(
            DROPPED_TOTAL,
            "Access log records dropped because the writer fell behind (or the log could not be written).",
        );
        Arc::new(AccessLog {
            enabled: AtomicBool::new(false),
            all_errors: AtomicBool::new(true),
            threshold: AtomicU64::new(u64::MAX),
            tx: OnceLock::new(),
            handoff: Arc::default(),
            configuring: Mutex::new(()),
            dropped: metrics.counter(DROPPED_TOTAL, Vec::new()),
        })
    }

    /// Whether requests should be recorded at all: the one check on the request path
    /// when the log is off.
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Apply `[log.access]`: open (or reopen) the destination and hand it to the
    /// writer. On an error (the file cannot be opened) nothing changes.
    pub(crate) fn configure(&self, config: &AccessLogConfig) -> io::Result<()> {
        let _one = self.configuring.lock().unwrap_or_else(|p| p.into_inner());
        if !config.enabled {
            self.enabled.store(false, Ordering::Relaxed);
            // Let go of the file (lines already handed over are written first, unless the
            // writer is a full queue behind), so that a log turned off can be moved or
            // deleted and its space freed.
            if let Some(tx) = self.tx.get() {
                let _ = self.hand_over(
                    tx,
                    Settings {
                        out: Box::new(io::sink()),
                        include_query: false,
                    },
                );
            }
            return Ok(());
        }
        let out: Box<dyn Write + Send> = match &config.path {
            Some(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot open access log {}: {e}", path.display()),
                        )
                    })?,
            ),
            None => Box::new(io::stdout()),
        };
        let tx = match self.tx.get() {
            Some(tx) => tx,
            None => {
                let (tx, rx) = mpsc::sync_channel(CAPACITY);
                let handoff = Arc::clone(&self.handoff);
                std::thread::Builder::new()
                    .name("weir-access-log".into())
                    .spawn(move || write_loop(rx, &handoff))?;
                self.tx.get_or_init(|| tx)
            }
        };
        self.hand_over(
            tx,
            Settings {
                out,
                include_query: config.include_query,
            },
        )?;
        let threshold = if config.sample >= 1.0 {
            u64::MAX
        } else {
            (config.sample * u64::MAX as f64) as u64
        };
        self.threshold.store(threshold, Ordering::Relaxed);
        self.all_errors.store(config.all_errors, Ordering::Relaxed);
        self.enabled.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Give the writer new settings without waiting for it: they go into the slot, and
    /// a [`Msg::Configure`] follows the records already queued if there is room for it;
    /// if not, the writer takes them before its next record.
    fn hand_over(&self, tx: &SyncSender<Msg>, settings: Settings) -> io::Result<()> {
        // Settings the writer never took are dropped (their file closed) outside the lock
        // the writer takes.
        let _replaced = self
            .handoff
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(settings);
        match tx.try_send(Msg::Configure) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.handoff.settings_urgent.store(true, Ordering::Release);
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => {
                Err(io::Error::other("the access log writer has stopped"))
            }
        }
    }

    /// Whether a request that ended this way goes into the log: failed ones always
    /// (unless `errors = "sampled"`), the others by the sample.
    #[inline]
    pub(crate) fn wants(&self, failed: bool) -> bool {
        (failed && self.all_errors.load(Ordering::Relaxed))
            || fast_rand() <= self.threshold.load(Ordering::Relaxed)
    }

    /// Hand a record to the writer; never waits (a full channel drops and counts it).
    pub(crate) fn write(&self, entry: Entry) {
        let Some(tx) = self.tx.get() else { return };
        match tx.try_send(Msg::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.increment(1),
        }
    }

    /// Wait (a little) until everything handed over so far is written out: at shutdown.
    /// Never longer than [`FLUSH_WAIT`], even when the writer is stuck with the channel
    /// full.
    pub(crate) fn flush(&self) {
        let Some(tx) = self.tx.get() else { return };
        let (ack, done) = mpsc::channel();
        match tx.try_send(Msg::Flush(ack)) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Flush(ack))) => {
                // No waiting for room: the writer answers when the channel runs dry.
                self.handoff
                    .flush_waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ack);
                // The writer may have run dry between the two: wake it (an empty slot
                // makes `Msg::Configure` a no-op). Still full: it has not run dry yet
                // and will see the request when it does.
                let _ = tx.try_send(Msg::Configure);
            }
            Err(_) => return,
        }
        let _ = done.recv_timeout(FLUSH_WAIT);
    }
}

/// Whether `[log.access]` could be applied, without creating or changing anything: an
/// existing file must open for appending, a new one needs an existing directory. For
/// `weir check` and for reloads, which refuse a config before changing anything.
pub(crate) fn check(config: &AccessLogConfig) -> io::Result<()> {
    let Some(path) = config.path.as_ref().filter(|_| config.enabled) else {
        return Ok(());
    };
    let problem = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot open access log {}: {e}", path.display()),
        )
    };
    if path.exists() {
        return OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(problem);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(problem(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no directory {}", dir.display()),
        )))
    }
}

/// The writer thread: until every sender is gone.
fn write_loop(rx: Receiver<Msg>, handoff: &Handoff) {
    let mut out: Option<BufWriter<Box<dyn Write + Send>>> = None;
    let mut include_query = false;
    // One warning per destination, not one per line, when writes fail.
    let mut warned = false;
    let mut line = Vec::with_capacity(512);
    let apply = |settings: Option<Settings>,
                 out: &mut Option<BufWriter<Box<dyn Write + Send>>>,
                 include_query: &mut bool,
                 warned: &mut bool| {
        let Some(Settings {
            out: next_out,
            include_query: q,
        }) = settings
        else {
            return;
        };
        if let Some(mut old) = out.take() {
            let _ = old.flush();
        }
        *out = Some(BufWriter::with_capacity(BUFFER, next_out));
        *include_query = q;
        *warned = false;
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            // Settings that could not be queued (the channel was full) apply from the
            // next record on rather than after the whole backlog.
            if handoff.settings_urgent.load(Ordering::Acquire) {
                apply(
                    handoff.take_settings(),
                    &mut out,
                    &mut include_query,
                    &mut warned,
                );
            }
            match msg {
                Msg::Entry(entry) => {
                    line.clear();
                    if serde_json::to_writer(&mut line, &Line::new(&entry, include_query)).is_ok() {
                        line.push(b'\n');
                        if let Some(out) = out.as_mut()
                            && let Err(e) = out.write_all(&line)
                            && !std::mem::replace(&mut warned, true)
                        {
                            tracing::warn!("cannot write the access log: {e}");
                        }
                    }
                }
                Msg::Configure => apply(
                    handoff.take_settings(),
                    &mut out,
                    &mut include_query,
                    &mut warned,
                ),
                Msg::Flush(ack) => {
                    if let Some(out) = out.as_mut() {
                        let _ = out.flush();
                    }
                    let _ = ack.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        // The channel ran dry. Flushes asked for until now had everything handed over
        // before them in the channel, all taken by now; one asked for later may have
        // records still queued and waits for the next time.
        let waiters = std::mem::take(
            &mut *handoff
                .flush_waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        // Settings handed over while the last records were written (their
        // `Msg::Configure` did not fit) must not wait for a next record: a log turned
        // off would keep its file open until then.
        apply(
            handoff.take_settings(),
            &mut out,
            &mut include_query,
            &mut warned,
        );
        // The channel ran dry: what was batched goes out now.
        if let Some(out) = out.as_mut()
            && let Err(e) = out.flush()
            && !std::mem::replace(&mut warned, true)
        {
            tracing::warn!("cannot write the access log: {e}");
        }
        // Everything handed over before these flushes is written.
        for ack in waiters {
            let _ = ack.send(());
        }
    }
}

/// One line of the access log, as serialised.
#[derive(Debug, Serialize)]
struct Line<'a> {
    timestamp: String,
    service: Option<&'a str>,
    pool: Option<&'a str>,
    endpoint: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    http_version: &'static str,
    tls: bool,
    status: u16,
    grpc_status: Option<&'static str>,
    error: Option<&'static str>,
    retried: Option<&'static str>,
    headers_ms: f64,
    duration_ms: f64,
    bytes_sent: Option<u64>,
    client: SocketAddr,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
}

impl<'a> Line<'a> {
    fn new(e: &'a Entry, include_query: bool) -> Line<'a> {
        let r = &e.request;
        Line {
            timestamp: timestamp(e.time),
            service: e.service.as_deref(),
            pool: e.pool.as_deref(),
            endpoint: e.endpoint.as_ref().map(Authority::as_str),
            method: bounded(r.method.as_str(), MAX_METHOD),
            path: &r.path,
            query: r.query.as_deref().filter(|_| include_query),
            http_version: version(r.version),
            tls: r.tls,
            status: e.status,
            grpc_status: e.grpc.map(grpc_code_name),
            error: e.error.map(ErrorKind::as_str),
            retried: e.retried.map(ErrorKind::as_str),
            headers_ms: millis(e.headers),
            duration_ms: millis(e.duration),
            bytes_sent: e.bytes_sent,
            client: r.client,
            user_agent: r.user_agent.as_deref(),
            request_id: r.request_id.as_deref(),
        }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A header value as text: at most `max` bytes, bytes that are not UTF-8 replaced.
fn text(v: &HeaderValue, max: usize) -> Cow<'_, str> {
    let bytes = v.as_bytes();
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uri: &str, ua: &[u8]) -> Entry {
        let req = Request::builder()
            .uri(uri)
            .header(header::USER_AGENT, HeaderValue::from_bytes(ua).unwrap())
            .body(())
            .unwrap();
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_500),
            request: RequestMeta::new(&req, "10.0.0.7:4321".parse().unwrap(), true).record(),
            service: Some("shop".into()),
            pool: Some("canary".into()),
            endpoint: Some(Authority::from_static("10.0.0.1:80")),
            status: 502,
            grpc: None,
            error: Some(ErrorKind::Connect),
            retried: None,
            headers: Duration::from_micros(1_250),
            duration: Duration::from_micros(1_250),
            bytes_sent: None,
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_bounded_client_values() {
        let long_ua = vec![b'a'; 10_000];
        let e = entry("/cart/%E2%82%AC?token=secret", &long_ua);
        let v = serde_json::to_value(Line::new(&e, false)).unwrap();
        assert_eq!(v["timestamp"], "1970-01-01T00:00:01.500Z");
        assert_eq!(v["service"], "shop");
        assert_eq!(v["pool"], "canary");
        assert_eq!(v["endpoint"], "10.0.0.1:80");
        assert_eq!(v["path"], "/cart/%E2%82%AC");
        assert!(v.get("query").is_none(), "the query is private by default");
        assert_eq!(v["status"], 502);
        assert_eq!(v["error"], "connect");
        assert_eq!(v["headers_ms"], 1.25);
        assert_eq!(v["client"], "10.0.0.7:4321");
        assert_eq!(v["tls"], true);
        assert_eq!(v["http_version"], "HTTP/1.1");
        assert_eq!(v["user_agent"].as_str().unwrap().len(), MAX_USER_AGENT);
        let v = serde_json::to_value(Line::new(&e, true)).unwrap();
        assert_eq!(v["query"], "token=secret");
    }

    #[test]
    fn client_bytes_that_are_not_text_stay_inside_the_line() {
        // obs-text (bytes >= 0x80) is legal in a header value; a tab too.
        let e = entry("/", b"evil\t\xff\xfe\"}{\"status\":200");
        let mut line = Vec::new();
        serde_json::to_writer(&mut line, &Line::new(&e, false)).unwrap();
        let text = String::from_utf8(line).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["status"], 502);
        assert!(
            v["user_agent"]
                .as_str()
                .unwrap()
                .starts_with("evil\t\u{fffd}")
        );
    }

    #[test]
    fn bounded_cuts_at_character_boundaries() {
        assert_eq!(bounded("héllo", 2), "h");
        assert_eq!(bounded("héllo", 3), "hé");
        assert_eq!(bounded("abc", 10), "abc");
    }

    #[test]
    fn sampling_keeps_failures_unless_told_otherwise() {
        let log = AccessLog::new(&Metrics::new());
        // Nothing passes the sample, so only the failure rule lets a request in.
        log.threshold.store(0, Ordering::Relaxed);
        assert!((0..1000).all(|_| log.wants(true)));
        log.all_errors.store(false, Ordering::Relaxed);
        // P(some of 1000 draws <= 0) is 1000 / 2^64.
        assert!(!(0..1000).any(|_| log.wants(true)));
        log.threshold.store(u64::MAX, Ordering::Relaxed);
        assert!((0..1000).all(|_| log.wants(false)));
    }

    /// A destination whose first write(2) says it has started, then blocks until told
    /// to go on: a pipe nobody reads, a hung disk.
    struct Stuck {
        entered: Option<mpsc::Sender<()>>,
        release: Receiver<()>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(entered) = self.entered.take() {
                let _ = entered.send(());
                // Returns when the test drops its sender.
                let _ = self.release.recv();
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_writer_holds_up_neither_configure_nor_flush() {
        let dir = std::env::temp_dir().join(format!("weir-access-stuck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let config = AccessLogConfig {
            enabled: true,
            path: Some(path.clone()),
            ..Default::default()
        };
        let log = AccessLog::new(&Metrics::new());
        log.configure(&config).unwrap();
        let (entered, started) = mpsc::channel();
        let (go_on, release) = mpsc::channel();
        let tx = log.tx.get().unwrap();
        log.hand_over(
            tx,
            Settings {
                out: Box::new(Stuck {
                    entered: Some(entered),
                    release,
                }),
                include_query: false,
            },
        )
        .unwrap();
        // The writer flushes this record when the channel runs dry, and blocks there.
        log.write(entry("/first", b"ua"));
        started.recv().unwrap();
        for _ in 0..CAPACITY {
            log.write(entry("/queued", b"ua"));
        }
        assert!(matches!(
            tx.try_send(Msg::Configure),
            Err(TrySendError::Full(_))
        ));
        // Both on threads of their own, so that a hang fails the test instead of
        // hanging it; the timeouts bound the wait, they are not waited out.
        let log = Arc::new(log);
        let (done, finished) = mpsc::channel();
        let reload = {
            let (log, done, config) = (Arc::clone(&log), done.clone(), config.clone());
            std::thread::spawn(move || {
                log.configure(&config).unwrap();
                let _ = done.send("configure");
            })
        };
        assert_eq!(
            finished.recv_timeout(Duration::from_secs(20)),
            Ok("configure"),
            "a reload waits for a stuck writer"
        );
        reload.join().unwrap();
        let shutdown = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                log.flush();
                let _ = done.send("flush");
            })
        };
        assert_eq!(
            finished.recv_timeout(FLUSH_WAIT + Duration::from_secs(20)),
            Ok("flush"),
            "shutdown waits for a stuck writer"
        );
        shutdown.join().unwrap();
        // Unstuck, the writer catches up: the queued records go to the file the reload
        // opened.
        drop(go_on);
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"/queued\""), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_gets_every_line_and_is_reopened_by_configure() {
        let dir = std::env::temp_dir().join(format!("weir-access-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::new(&Metrics::new());
        let config = AccessLogConfig {
            enabled: true,
            path: Some(path.clone()),
            ..Default::default()
        };
        log.configure(&config).unwrap();
        assert!(log.enabled());
        log.write(entry("/one", b"ua"));
        log.flush();
        // Rotation: the file is moved away; the next configure opens a new one.
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.configure(&config).unwrap();
        log.write(entry("/two", b"ua"));
        log.flush();
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("\"/one\"") && !old.contains("/two"), "{old}");
        assert!(new.contains("\"/two\"") && !new.contains("/one"), "{new}");
        let open = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .any(|target| target == path)
        };
        assert!(open());
        log.configure(&AccessLogConfig::default()).unwrap();
        assert!(!log.enabled());
        log.flush();
        assert!(!open(), "a disabled log keeps its file open");
        // An unopenable path changes nothing.
        let bad = AccessLogConfig {
            path: Some(dir.join("missing/dir/access.log")),
            ..config
        };
        assert!(log.configure(&bad).is_err());
        assert!(!log.enabled());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
