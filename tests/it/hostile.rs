//! Hostile and ambiguous requests at the data plane, on real sockets: one Host truth,
//! request-target forms, h2c and mismatched upgrades, framing-header lookalikes, request
//! bodies on bodyless methods, and tunnels' limits. A raw recording backend shows
//! exactly what reached the upstream; raw clients write exact bytes.

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
const LIMIT: Duration = Duration::from_secs(5);

/// weir with a service `a` (host `a.example`) and a default service `d`, each on its
/// own recording backend.
async fn setup(
    extra: &str,
    a: Vec<&'static [u8]>,
    d: Vec<&'static [u8]>,
) -> (Proxy, Recorder, Recorder) {
    let (ra, rd) = (Recorder::start(a).await, Recorder::start(d).await);
    let toml = proxy_toml(extra)
        + &service_toml(
            "a",
            Some(&["a.example"]),
            &[("pa", vec![ra.addr.to_string()], 1)],
        )
        + &service_toml("d", None, &[("pd", vec![rd.addr.to_string()], 1)]);
    (start(&toml).await, ra, rd)
}

async fn failures(proxy: &Proxy) -> f64 {
    metric_sum(proxy.admin, "weir_request_failures_total", &[]).await
}

/// One request on a fresh connection: the response head.
async fn raw(proxy: &Proxy, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    exchange_raw(&mut s, bytes, LIMIT).await
}

fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The Host header lines in what a backend received.
fn host_lines(received: &str) -> Vec<String> {
    received
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("host:"))
        .map(|l| l[5..].trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_target_forms_and_one_host_truth() {
    let (proxy, ra, rd) = setup("", vec![OK], vec![OK]).await;
    // Origin-form routes by Host.
    let h = raw(&proxy, b"GET /o HTTP/1.1\r\nHost: a.example\r\n\r\n").await;
    assert_eq!(status(&h), 200, "{h}");
    // Absolute-form: the authority wins over a differing Host, for routing and for the
    // one Host the backend gets.
    let h = raw(
        &proxy,
        b"GET http://a.example/abs HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(wait_until(LIMIT, || async { ra.requests() == 2 }).await);
    assert_eq!(host_lines(&ra.received()), ["a.example", "a.example"]);
    assert!(
        ra.received().contains("GET /abs HTTP/1.1\r\n"),
        "{}",
        ra.received()
    );
    assert!(!ra.received().contains("evil"), "{}", ra.received());
    // Absolute-form with no Host at all is fine: the authority is the host.
    let h = raw(&proxy, b"GET http://a.example:8080/n HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(wait_until(LIMIT, || async { ra.requests() == 3 }).await);
    assert_eq!(host_lines(&ra.received())[2], "a.example:8080");
    // Authority-form is for CONNECT only, and CONNECT is not for a reverse proxy.
    let h = raw(
        &proxy,
        b"GET a.example:80 HTTP/1.1\r\nHost: a.example\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 400, "{h}");
    let h = raw(
        &proxy,
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 405, "{h}");
    assert!(h.to_ascii_lowercase().contains("\r\nallow: "), "{h}");
    assert_eq!(rd.requests(), 0);
    assert_eq!(ra.requests(), 3);
    assert_eq!(failures(&proxy).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_anomalies_are_refused_before_any_backend() {
    let (proxy, ra, rd) = setup("", vec![OK], vec![OK]).await;
    let unrouted = metric_sum(proxy.admin, "weir_unrouted_requests_total", &[]).await;
    let mut cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: other\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        // An absolute-form target does not excuse a duplicated Host.
        b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
        // Nor a scheme that is not HTTP's.
        b"GET ftp://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec(),
        // Nor userinfo in the target.
        b"GET http://x@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec(),
    ];
    for bad in [
        "a, b",
        "a,b",
        "x@y",
        "[::1",
        "a b",
        "",
        "h:99999",
        "h:x",
        "h:",
        ":80",
        "a.example:80:1",
        "[::1]x",
        "[zz]:80",
        "a%2eb",
    ] {
        cases.push(format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n").into_bytes());
    }
    for case in &cases {
        let h = raw(&proxy, case).await;
        assert_eq!(status(&h), 400, "{}: {h}", String::from_utf8_lossy(case));
    }
    // Valid oddities still pass: IPv6 literal, port, trailing dot, upper case.
    for good in ["[::1]:8080", "A.EXAMPLE", "a.example.:80", "10.0.0.1"] {
        let h = raw(
            &proxy,
            format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&h), 200, "{good}: {h}");
    }
    // HTTP/1.0 may omit Host (the default service; the backend gets a Host anyway).
    let h = raw(&proxy, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(wait_until(LIMIT, || async { ra.requests() + rd.requests() == 5 }).await);
    assert_eq!(ra.requests(), 2, "{}", ra.received());
    let rejected = metric_sum(proxy.admin, "weir_unrouted_requests_total", &[]).await - unrouted;
    assert_eq!(rejected, cases.len() as f64);
    assert_eq!(failures(&proxy).await, 0.0);
    for r in [&ra, &rd] {
        for line in host_lines(&r.received()) {
            assert!(!line.contains(',') && !line.contains('@'), "{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_beats_a_differing_host_header() {
    let (proxy, ra, rd) = setup("", vec![OK], vec![OK]).await;
    let mut h2 =
        h2_handshake::<_, Empty<Bytes>>(TcpStream::connect(proxy.addr).await.unwrap()).await;
    let req = Request::get("http://a.example/h2")
        .header("host", "evil.example")
        .body(Empty::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = resp.into_body().collect().await;
    assert!(wait_until(LIMIT, || async { ra.requests() == 1 }).await);
    assert_eq!(host_lines(&ra.received()), ["a.example"]);
    assert!(!ra.received().contains("evil"));
    assert_eq!(rd.requests(), 0);
    assert_eq!(failures(&proxy).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_never_becomes_a_tunnel() {
    const SWITCH: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    let (proxy, ra, _rd) = setup("", vec![SWITCH, OK], vec![OK]).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let h = exchange_raw(
        &mut s,
        b"GET /1 HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        LIMIT,
    )
    .await;
    // The upstream was asked for no upgrade, so its 101 is a broken answer: 502, and
    // the client's connection stays HTTP/1.1.
    assert_eq!(status(&h), 502, "{h}");
    skip_body(&mut s, &h).await;
    let h = exchange_raw(&mut s, b"GET /2 HTTP/1.1\r\nHost: a.example\r\n\r\n", LIMIT).await;
    assert_eq!(status(&h), 200, "{h}");
    let seen = ra.received().to_ascii_lowercase();
    assert!(seen.contains("get /2 http/1.1"), "{seen}");
    assert!(
        !seen.contains("h2c") && !seen.contains("http2-settings"),
        "{seen}"
    );
    assert!(!seen.contains("upgrade"), "{seen}");
    // A 101 nobody asked for is the upstream breaking HTTP: the pool's `protocol`.
    assert_a_protocol_failure_and_no_tunnel(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_is_stripped_from_a_websocket_upgrade() {
    const SWITCH: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let (proxy, ra, _rd) = setup("", vec![SWITCH], vec![OK]).await;
    let h = raw(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 101, "{h}");
    let seen = ra.received().to_ascii_lowercase();
    assert!(seen.contains("upgrade: websocket\r\n"), "{seen}");
    assert!(!seen.contains("h2c"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_to_an_unrequested_protocol_is_a_502() {
    const SWITCH: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: something-else\r\n\r\n";
    let (proxy, ra, _rd) = setup("", vec![SWITCH], vec![OK]).await;
    let h = raw(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 502, "{h}");
    // The upstream connection is closed, not left half-switched.
    assert!(wait_until(LIMIT, || async { ra.closed() == 1 }).await);
    // The upstream broke the protocol: that one is the pool's failure.
    assert_a_protocol_failure_and_no_tunnel(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_framing_lookalikes_are_refused() {
    let (proxy, ra, rd) = setup("", vec![OK], vec![OK]).await;
    for name in [
        "Transfer_Encoding",
        "transfer_encoding",
        "CONTENT_LENGTH",
        "Content_Length",
        "content-length_",
    ] {
        let h = raw(
            &proxy,
            format!("POST / HTTP/1.1\r\nHost: a.example\r\n{name}: 5\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let want = if name == "content-length_" { 200 } else { 400 };
        assert_eq!(status(&h), want, "{name}: {h}");
    }
    // Other underscores are none of weir's business.
    let h = raw(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: a.example\r\nX_Custom: 1\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(wait_until(LIMIT, || async { ra.requests() == 2 }).await);
    assert!(
        !ra.received()
            .to_ascii_lowercase()
            .contains("transfer_encoding")
    );
    assert_eq!(rd.requests(), 0);
    assert_eq!(failures(&proxy).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_on_get_and_head_reach_the_backend_intact() {
    let (proxy, ra, _rd) = setup("", vec![OK], vec![OK]).await;
    let h = raw(
        &proxy,
        b"GET /chunked HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(wait_until(LIMIT, || async { ra.requests() == 1 }).await);
    let seen = ra.received();
    let body = seen.split_once("\r\n\r\n").unwrap().1;
    let lower = seen.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{seen}");
    assert!(body.contains("hello") && body.contains(" world"), "{seen}");
    assert!(body.ends_with("0\r\n\r\n"), "{seen}");
    let h = raw(
        &proxy,
        b"GET /cl HTTP/1.1\r\nHost: a.example\r\nContent-Length: 11\r\n\r\nhello world",
    )
    .await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(wait_until(LIMIT, || async { ra.requests() == 2 }).await);
    assert!(
        ra.received().ends_with("\r\n\r\nhello world"),
        "{}",
        ra.received()
    );
    let h = raw(
        &proxy,
        b"HEAD /head HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(wait_until(LIMIT, || async { ra.requests() == 3 }).await);
    assert!(
        ra.received().ends_with("3\r\nabc\r\n0\r\n\r\n"),
        "{}",
        ra.received()
    );
    assert_eq!(failures(&proxy).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_counted_hold_a_connection_slot_and_idle_out() {
    const SWITCH: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let (proxy, _ra, _rd) = setup(
        "max_connections = 1\nupstream_body_timeout = \"1s\"",
        vec![SWITCH, OK],
        vec![OK],
    )
    .await;
    let gauge = || metric_sum(proxy.admin, "weir_tunnels_open", &[("pool", "pa")]);
    // Before the pool's first request its request series are not registered yet.
    let text = get(&client(), proxy.admin, &proxy.admin.to_string(), "/metrics")
        .await
        .text();
    assert_eq!(
        metric(&text, "weir_tunnels_open", &[("pool", "pa")]).unwrap_or(0.0),
        0.0
    );
    let mut t = TcpStream::connect(proxy.addr).await.unwrap();
    let h = exchange_raw(
        &mut t,
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
        LIMIT,
    )
    .await;
    assert_eq!(status(&h), 101, "{h}");
    assert!(wait_until(LIMIT, || async { gauge().await == 1.0 }).await);
    // The tunnel holds the only connection slot: a second client waits in the backlog.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte)).await;
    assert!(
        waited.is_err(),
        "second connection served while the tunnel is open"
    );
    // Silent for upstream_body_timeout: the tunnel closes, the slot frees.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(LIMIT, t.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "tunnel did not idle out");
    assert!(wait_until(LIMIT, || async { gauge().await == 0.0 }).await);
    let h = exchange_raw(&mut second, b"", LIMIT).await;
    assert_eq!(status(&h), 200, "{h}");
}

/// Read the body of a response whose head is `head` (Content-Length only).
async fn skip_body(s: &mut TcpStream, head: &str) {
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(LIMIT, s.read_exact(&mut body))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_close_at_the_end_of_the_shutdown_grace() {
    const SWITCH: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let up = Recorder::start(vec![SWITCH]).await;
    let toml = "[proxy]\nshutdown_grace = \"300ms\"\n".to_owned()
        + &service_toml("t", None, &[("p", vec![up.addr.to_string()], 1)]);
    let mut config = weir::config::Config::parse(&toml, "t").unwrap();
    config.state.dir = temp_dir("tunnel-grace");
    let weir = weir::Weir::new(config, None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        weir.serve(listener, None, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let mut t = TcpStream::connect(addr).await.unwrap();
    let h = exchange_raw(
        &mut t,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        LIMIT,
    )
    .await;
    assert_eq!(status(&h), 101, "{h}");
    // The tunnel carries bytes before the shutdown.
    t.write_all(b"ping").await.unwrap();
    assert!(wait_until(LIMIT, || async { up.received().ends_with("ping") }).await);
    stop_tx.send(()).unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(LIMIT, t.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "tunnel still open after the grace");
    let stopped = tokio::time::timeout(LIMIT, server).await;
    assert!(stopped.is_ok(), "weir did not stop");
    assert!(wait_until(LIMIT, || async { up.closed() == 1 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_framing_never_reaches_the_backend_twice_framed() {
    let (proxy, ra, _rd) = setup("", vec![OK], vec![OK]).await;
    for case in [
        &b"POST /cl-te HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /te-cl HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        b"POST /two-cl HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST /te-x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ] {
        let h = raw(&proxy, case).await;
        let code = status(&h);
        println!("{} → {code}", String::from_utf8_lossy(case).lines().next().unwrap());
        assert!(code == 400 || code == 200, "{}: {h}", String::from_utf8_lossy(case));
    }
    let seen = ra.received().to_ascii_lowercase();
    for head in seen.split("post ").filter(|h| !h.is_empty()) {
        let head = head.split("\r\n\r\n").next().unwrap();
        let framings =
            head.matches("content-length:").count() + head.matches("transfer-encoding:").count();
        assert!(framings <= 1, "{head}");
    }
    assert_eq!(failures(&proxy).await, 0.0);
}

/// A backend that broke HTTP (a 101 nobody asked for, or for the wrong protocol): one
/// `protocol` failure for its pool, and no tunnel left open.
async fn assert_a_protocol_failure_and_no_tunnel(proxy: &Proxy) {
    assert_eq!(
        metric_sum(
            proxy.admin,
            "weir_upstream_errors_total",
            &[("kind", "protocol")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric_sum(proxy.admin, "weir_tunnels_open", &[("pool", "pa")]).await,
        0.0
    );
}
