//! Real etcd v3 clusters on loopback for fleet-mode integration tests: starts, kills,
//! restarts and wipes members of Debian's `etcd-server` (`/usr/bin/etcd`).
//!
//! Every member listens on `127.0.0.1` with ports picked by the OS, keeps its data and a
//! stderr log in one temporary directory, and is tuned for tests (no fsync, 50 ms
//! heartbeat, 500 ms election timeout). Etcd is reached through its v3 JSON gateway
//! (`POST /v3/...`), so no etcd client library is needed. Dropping the [`EtcdCluster`]
//! kills every member and removes the directory.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Where Debian's `etcd-server` package installs etcd.
const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long [`EtcdCluster::start`] and [`EtcdCluster::wipe`] wait for every member.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long [`EtcdCluster::stop`] waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Limit on every HTTP request to a member.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval between polls of a condition.
const POLL: Duration = Duration::from_millis(20);
/// How much of a member's stderr an error shows.
const TAIL_LINES: usize = 20;

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One etcd process and everything needed to start it again.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    stderr_path: PathBuf,
    child: Option<Child>,
    /// How the last process ended, when it ended on its own or was reaped.
    exited: Option<ExitStatus>,
    /// With [`TlsFiles`]: a second client listener, https, beside the plain one the
    /// harness itself talks to.
    tls_port: Option<u16>,
}

/// Certificates (PEM files) for an etcd cluster that serves clients over TLS and asks
/// them for a certificate signed by `ca`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A running etcd cluster of real `etcd` processes on loopback (see the module docs).
#[derive(Debug)]
pub struct EtcdCluster {
    bin: PathBuf,
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    client: Client<HttpConnector, Full<Bytes>>,
    tls: Option<TlsFiles>,
}

/// Why waiting for health failed, and whether new ports could help.
struct StartFailure {
    error: io::Error,
    address_in_use: bool,
}

impl EtcdCluster {
    /// Start `n` members (1 or 3), wait until every member answers `GET /health` with
    /// `{"health":"true"}` (deadline 20 s; error naming the member and its stderr tail
    /// otherwise). A member that fails with "address already in use" (a port taken
    /// between picking and binding it) makes the whole start retry once with new ports.
    pub async fn start(n: usize) -> io::Result<EtcdCluster> {
        Self::start_with(Path::new(ETCD_BIN), n, None).await
    }

    /// [`EtcdCluster::start`], each member also serving clients over TLS (mutual: a
    /// client certificate signed by `tls.ca` is required) at [`EtcdCluster::tls_endpoints`].
    pub async fn start_tls(n: usize, tls: TlsFiles) -> io::Result<EtcdCluster> {
        Self::start_with(Path::new(ETCD_BIN), n, Some(tls)).await
    }

    async fn start_with(bin: &Path, n: usize, tls: Option<TlsFiles>) -> io::Result<EtcdCluster> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an etcd cluster needs at least one member",
            ));
        }
        if !bin.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "etcd not found at {}: install Debian's etcd-server package \
                     (`apt-get install etcd-server`; scripts/test.sh does)",
                    bin.display()
                ),
            ));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cluster = EtcdCluster::prepare(bin, n, tls.clone())?;
            let started = match cluster.spawn_all() {
                Ok(()) => cluster.await_health(START_DEADLINE).await,
                Err(error) => Err(StartFailure {
                    error,
                    address_in_use: false,
                }),
            };
            match started {
                Ok(()) => return Ok(cluster),
                Err(f) if f.address_in_use && attempt == 1 => drop(cluster),
                Err(f) => return Err(f.error),
            }
        }
    }

    /// A temporary directory, free ports and a token; no process yet.
    fn prepare(bin: &Path, n: usize, tls: Option<TlsFiles>) -> io::Result<EtcdCluster> {
        let ports = free_ports(3 * n)?;
        let dir = std::env::temp_dir().join(format!(
            "weir-etcd-{}-{}-{:016x}",
            std::process::id(),
            DIR_COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir)?;
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[3 * i],
                peer_port: ports[3 * i + 1],
                tls_port: tls.as_ref().map(|_| ports[3 * i + 2]),
                data_dir: dir.join(format!("m{i}")),
                stderr_path: dir.join(format!("m{i}.stderr")),
                child: None,
                exited: None,
            })
            .collect();
        Ok(EtcdCluster {
            bin: bin.to_path_buf(),
            dir,
            token: format!("weir-test-{:016x}", rand::random::<u64>()),
            members,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build_http(),
            tls,
        })
    }

    /// The TLS client URLs (`https://127.0.0.1:PORT`), in member order; empty unless
    /// started with [`EtcdCluster::start_tls`].
    pub fn tls_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter_map(|m| m.tls_port.map(|p| format!("https://127.0.0.1:{p}")))
            .collect()
    }

    /// Turn on etcd's authentication with one user, `root`, holding the `root` role.
    /// Clients must log in from then on (the harness's own calls keep working only for
    /// `/health`, `/version` and maintenance status).
    pub async fn enable_auth(&self, root_password: &str) -> io::Result<()> {
        let steps = [
            ("/v3/auth/role/add", serde_json::json!({ "name": "root" })),
            (
                "/v3/auth/user/add",
                serde_json::json!({ "name": "root", "password": root_password }),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({ "user": "root", "role": "root" }),
            ),
            ("/v3/auth/enable", serde_json::json!({})),
        ];
        for (path, body) in steps {
            let answer = self.post(0, path, &body).await?;
            if answer.get("error").is_some() || answer.get("code").is_some() {
                return Err(io::Error::other(format!("{path}: {answer}")));
            }
        }
        Ok(())
    }

    /// Client URLs (`http://127.0.0.1:PORT`), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`. Panics when `i` is out of range.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILL member `i` and wait for it to exit. No-op when it is not running.
    pub async fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut child) = m.child.take() {
            let _ = child.start_kill();
            m.exited = child.wait().await.ok();
        }
    }

    /// SIGTERM member `i`, wait up to 5 s for it to exit, then SIGKILL it. No-op when it
    /// is not running.
    pub async fn stop(&mut self, i: usize) {
        let m = &mut self.members[i];
        let Some(mut child) = m.child.take() else {
            return;
        };
        let termed = match child.id() {
            Some(pid) => Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success()),
            None => false,
        };
        if termed && let Ok(status) = tokio::time::timeout(STOP_GRACE, child.wait()).await {
            m.exited = status.ok();
            return;
        }
        let _ = child.start_kill();
        m.exited = child.wait().await.ok();
    }

    /// Start member `i` again with the same flags and data directory, so it rejoins the
    /// cluster; stops it first (as [`stop`](Self::stop)) if it is still running. Does not
    /// wait for health, which needs a quorum: use [`wait_healthy`](Self::wait_healthy).
    pub async fn restart(&mut self, i: usize) -> io::Result<()> {
        self.stop(i).await;
        self.spawn(i)
    }

    /// Whether member `i`'s process is alive (it may still be unhealthy).
    pub fn is_running(&mut self, i: usize) -> bool {
        let m = &mut self.members[i];
        let Some(child) = m.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                m.exited = Some(status);
                m.child = None;
                false
            }
            Err(_) => {
                m.child = None;
                false
            }
        }
    }

    /// Poll member `i`'s `GET /health` every 20 ms until it answers `{"health":"true"}`
    /// (true) or `limit` passes (false).
    pub async fn wait_healthy(&self, i: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.is_healthy(i).await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Index of the current raft leader among running members, asked through the v3 JSON
    /// gateway (`POST /v3/maintenance/status`): the member whose `header.member_id` equals
    /// the `leader` it reports, i.e. one that knows itself to be leader (the highest raft
    /// term wins if a stale leader still thinks so). `None` while there is none.
    pub async fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let Ok(status) = self.post(i, "/v3/maintenance/status", &json!({})).await else {
                continue;
            };
            let leader = as_u64(&status["leader"]).unwrap_or(0);
            let me = as_u64(&status["header"]["member_id"]);
            let term = as_u64(&status["raftTerm"]).unwrap_or(0);
            if leader != 0 && Some(leader) == me && best.is_none_or(|(t, _)| term > t) {
                best = Some((term, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Stop every member and delete all data dirs, then start the same members again with
    /// the same flags (same ports, same `--initial-cluster-token`): a wiped cluster,
    /// revision back to 1. Waits for health as [`start`](Self::start) does.
    pub async fn wipe(&mut self) -> io::Result<()> {
        for i in 0..self.members.len() {
            self.kill(i).await;
        }
        for m in &self.members {
            match fs::remove_dir_all(&m.data_dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.spawn_all()?;
        self.await_health(START_DEADLINE).await.map_err(|f| f.error)
    }

    /// Compact the key-value history up to the current revision (read `header.revision`
    /// from `POST /v3/kv/range`, then `POST /v3/kv/compaction` with `physical: true`) and
    /// return that revision. Compacting again at an already compacted revision succeeds.
    pub async fn compact(&self) -> io::Result<i64> {
        let mut last_error = None;
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let result = async {
                let range = self
                    .post(i, "/v3/kv/range", &json!({"key": "AA=="}))
                    .await?;
                let revision = as_u64(&range["header"]["revision"])
                    .and_then(|r| i64::try_from(r).ok())
                    .ok_or_else(|| {
                        io::Error::other(format!("etcd range answer without a revision: {range}"))
                    })?;
                let body = json!({"revision": revision, "physical": true});
                match self.post(i, "/v3/kv/compaction", &body).await {
                    Ok(_) => Ok(revision),
                    Err(e)
                        if e.to_string()
                            .contains("required revision has been compacted") =>
                    {
                        Ok(revision)
                    }
                    Err(e) => Err(e),
                }
            }
            .await;
            match result {
                Ok(revision) => return Ok(revision),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no etcd member is running")))
    }

    /// POST a JSON `body` to member `i`'s v3 gateway at `path` (e.g. `/v3/kv/put`, keys
    /// and values base64) and return the JSON answer; a non-2xx answer, a timeout (2 s)
    /// or a connection failure is an error carrying what etcd said.
    pub async fn post(&self, i: usize, path: &str, body: &Value) -> io::Result<Value> {
        self.request(i, Method::POST, path, body.to_string().into())
            .await
    }

    async fn request(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> io::Result<Value> {
        let uri = format!("{}{path}", self.endpoint(i));
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(io::Error::other)?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(io::Error::other)?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(io::Error::other)?
                .to_bytes();
            Ok::<_, io::Error>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{uri}: timed out")))??;
        if !status.is_success() {
            return Err(io::Error::other(format!(
                "{uri}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{uri}: {e} in {:?}", String::from_utf8_lossy(&bytes)),
            )
        })
    }

    async fn is_healthy(&self, i: usize) -> bool {
        self.request(i, Method::GET, "/health", Bytes::new())
            .await
            .is_ok_and(|v| v["health"] == "true")
    }

    fn spawn_all(&mut self) -> io::Result<()> {
        (0..self.members.len()).try_for_each(|i| self.spawn(i))
    }

    /// Start member `i`'s process; its stderr is appended to its log file.
    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let plain_url = format!("http://127.0.0.1:{}", m.client_port);
        let client_url = match m.tls_port {
            Some(p) => format!("{plain_url},https://127.0.0.1:{p}"),
            None => plain_url,
        };
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let tls_args: Vec<String> = match &self.tls {
            Some(t) => vec![
                "--cert-file".into(),
                t.cert.display().to_string(),
                "--key-file".into(),
                t.key.display().to_string(),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                t.ca.display().to_string(),
            ],
            None => Vec::new(),
        };
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.stderr_path)?;
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .arg("--unsafe-no-fsync")
            .args(["--heartbeat-interval", "50"])
            .args(["--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .args(["--quota-backend-bytes", "268435456"])
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("spawning {} for {}: {e}", self.bin.display(), m.name),
                )
            })?;
        let m = &mut self.members[i];
        m.child = Some(child);
        m.exited = None;
        Ok(())
    }

    /// Poll until every member is healthy; fail as soon as one exits, or at the deadline.
    async fn await_health(&mut self, limit: Duration) -> Result<(), StartFailure> {
        let deadline = Instant::now() + limit;
        let mut healthy = vec![false; self.members.len()];
        loop {
            for (i, ok) in healthy.iter_mut().enumerate() {
                if *ok {
                    continue;
                }
                if !self.is_running(i) {
                    return Err(self.failure(i, "exited during start"));
                }
                *ok = self.is_healthy(i).await;
            }
            if healthy.iter().all(|&h| h) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let i = healthy.iter().position(|&h| !h).unwrap_or(0);
                return Err(self.failure(i, &format!("not healthy after {limit:?}")));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn failure(&self, i: usize, what: &str) -> StartFailure {
        let m = &self.members[i];
        let mut msg = format!(
            "etcd member {} ({}, data dir {}) {what}",
            m.name,
            self.endpoint(i),
            m.data_dir.display()
        );
        if let Some(status) = m.exited {
            let _ = write!(msg, " ({status})");
        }
        let _ = write!(msg, "; stderr tail:\n{}", self.stderr_tail(i));
        let address_in_use =
            (0..self.members.len()).any(|j| self.stderr_tail(j).contains("address already in use"));
        StartFailure {
            error: io::Error::other(msg),
            address_in_use,
        }
    }

    /// The last lines member `i` wrote to stderr.
    fn stderr_tail(&self, i: usize) -> String {
        let text = match fs::read(&self.members[i].stderr_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => return format!("(unreadable: {e})"),
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(child) = m.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        // SIGKILL is asynchronous: give the processes a moment to be gone, so none of them
        // writes into the directory while it is being removed.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline
            && self
                .members
                .iter_mut()
                .filter_map(|m| m.child.as_mut())
                .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if fs::remove_dir_all(&self.dir).is_err() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `count` distinct loopback ports the OS considers free right now.
fn free_ports(count: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// A gateway integer: grpc-gateway writes 64-bit integers as decimal strings.
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        v => v.as_u64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    fn b64(data: &[u8]) -> String {
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for k in 0..4 {
                if k <= chunk.len() {
                    out.push(B64[(n >> (18 - 6 * k) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn unb64(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let digits: Vec<u32> = s
            .bytes()
            .filter(|&c| c != b'=')
            .map(|c| B64.iter().position(|&d| d == c).expect("base64 digit") as u32)
            .collect();
        for chunk in digits.chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0, |n, (k, d)| n | d << (18 - 6 * k));
            for k in 0..chunk.len() - 1 {
                out.push((n >> (16 - 8 * k)) as u8);
            }
        }
        out
    }

    async fn put(c: &EtcdCluster, i: usize, key: &str, value: &str) -> i64 {
        let answer = c
            .post(
                i,
                "/v3/kv/put",
                &json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())}),
            )
            .await
            .expect("put");
        as_u64(&answer["header"]["revision"]).expect("revision") as i64
    }

    /// The value of `key` on member `i` (linearizable read) and the header revision.
    async fn get(c: &EtcdCluster, i: usize, key: &str) -> (Option<String>, i64) {
        let answer = c
            .post(i, "/v3/kv/range", &json!({"key": b64(key.as_bytes())}))
            .await
            .expect("range");
        let value = answer["kvs"][0]["value"]
            .as_str()
            .map(|v| String::from_utf8(unb64(v)).expect("utf-8"));
        let revision = as_u64(&answer["header"]["revision"]).expect("revision") as i64;
        (value, revision)
    }

    async fn wait_leader(c: &EtcdCluster, not: Option<usize>, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = c.leader().await
                && Some(l) != not
            {
                return l;
            }
            assert!(Instant::now() < deadline, "no new leader within {limit:?}");
            tokio::time::sleep(POLL).await;
        }
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"\0"), "AA==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
        for s in [&b"f"[..], b"fo", b"foo", b"fooba", b"\xff\x00\x10"] {
            assert_eq!(unb64(&b64(s)), s);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_members_fail_over_rejoin_compact_and_wipe() {
        let t = Instant::now();
        let mut c = EtcdCluster::start(3).await.expect("start");
        eprintln!("etcd: 3 members healthy after {:?}", t.elapsed());
        assert_eq!(c.len(), 3);
        let endpoints = c.endpoints();
        assert_eq!(endpoints.len(), 3);
        assert!(endpoints[1].starts_with("http://127.0.0.1:"));
        assert_eq!(endpoints[2], c.endpoint(2));

        let leader = wait_leader(&c, None, Duration::from_secs(5)).await;
        let other = (leader + 1) % 3;
        put(&c, leader, "/weir/a", "one").await;
        assert_eq!(get(&c, other, "/weir/a").await.0.as_deref(), Some("one"));

        let t = Instant::now();
        c.kill(leader).await;
        assert!(!c.is_running(leader));
        let new_leader = wait_leader(&c, Some(leader), Duration::from_secs(10)).await;
        eprintln!(
            "etcd: new leader {new_leader} {:?} after killing {leader}",
            t.elapsed()
        );
        assert_ne!(new_leader, leader);
        put(&c, new_leader, "/weir/a", "two").await;

        c.restart(leader).await.expect("restart");
        assert!(c.is_running(leader));
        assert!(c.wait_healthy(leader, Duration::from_secs(10)).await);
        assert_eq!(get(&c, leader, "/weir/a").await.0.as_deref(), Some("two"));

        let compacted = c.compact().await.expect("compact");
        assert!(compacted >= 3, "compacted to {compacted}");
        let old = c
            .post(
                other,
                "/v3/kv/range",
                &json!({"key": b64(b"/weir/a"), "revision": compacted - 1}),
            )
            .await
            .expect_err("history below the compaction is gone");
        assert!(old.to_string().contains("compacted"), "{old}");
        assert_eq!(c.compact().await.expect("compact again"), compacted);

        c.wipe().await.expect("wipe");
        for i in 0..3 {
            assert!(c.is_running(i));
        }
        let (value, revision) = get(&c, 0, "/weir/a").await;
        assert_eq!(value, None);
        assert!(revision <= 2, "revision {revision} after wipe");
        assert!(wait_leader(&c, None, Duration::from_secs(5)).await < 3);

        let dir = c.dir.clone();
        drop(c);
        assert!(!dir.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_member_stops_and_restarts() {
        let mut c = EtcdCluster::start(1).await.expect("start");
        assert_eq!(c.len(), 1);
        assert_eq!(c.leader().await, Some(0));
        put(&c, 0, "k", "v").await;
        c.stop(0).await;
        assert!(!c.is_running(0));
        assert!(!c.wait_healthy(0, Duration::ZERO).await);
        assert_eq!(c.leader().await, None);
        c.restart(0).await.expect("restart");
        assert!(c.wait_healthy(0, Duration::from_secs(10)).await);
        assert_eq!(get(&c, 0, "k").await.0.as_deref(), Some("v"));
    }

    #[tokio::test]
    async fn missing_binary_says_what_to_install() {
        let err = EtcdCluster::start_with(Path::new("/nonexistent/etcd"), 1, None)
            .await
            .expect_err("no binary");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("etcd-server"), "{err}");
    }

    #[tokio::test]
    async fn failed_start_names_the_member_and_its_stderr() {
        // `false` exits at once: the start fails on member m0, with its (empty) stderr.
        let err = EtcdCluster::start_with(Path::new("/bin/false"), 1, None)
            .await
            .expect_err("not etcd");
        let msg = err.to_string();
        assert!(msg.contains("m0") && msg.contains("stderr tail"), "{msg}");
    }
}
