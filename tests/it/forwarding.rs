//! Forwarding correctness through a real weir: headers both ways, streamed bodies, and
//! the mapping of upstream failures to 502/503/504 with one outcome each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use weir::model::ErrorKind;
use weir::{Outcome, OutcomeSink};

async fn one_pool(endpoint: String) -> Proxy {
    start(&(proxy_toml("") + &service_toml("svc", None, &[("main", vec![endpoint], 1)]))).await
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_towards_the_upstream() {
    let up = upstream("echo").await;
    let proxy = one_pool(up.addr().to_string()).await;
    let req = Request::get(format!("http://{}/echo?q=1", proxy.addr))
        .header("host", "shop.example.com:8080")
        .header("connection", "x-conn-named, keep-alive")
        .header("x-conn-named", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("upgrade", "websocket")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-end-to-end", "kept")
        .header("x-forwarded-for", "203.0.113.9")
        .body(empty())
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, StatusCode::OK);
    let echo = a.json();
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "q=1");
    let headers: Vec<(String, String)> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_owned(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let get = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for gone in [
        "x-conn-named",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            get(gone).is_empty(),
            "{gone} reached the upstream: {headers:?}"
        );
    }
    // The upstream connection is weir's own keep-alive; no client Connection tokens leak.
    assert!(
        get("connection")
            .iter()
            .all(|v| !v.contains("x-conn-named")),
        "{headers:?}"
    );
    assert_eq!(get("x-end-to-end"), ["kept"]);
    assert_eq!(get("host"), ["shop.example.com:8080"]);
    assert_eq!(get("x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(get("x-forwarded-proto"), ["http"]);
    assert_eq!(get("x-forwarded-host"), ["shop.example.com:8080"]);
}

#[tokio::test]
async fn forwarded_for_is_set_when_absent() {
    let up = upstream("echo").await;
    let proxy = one_pool(up.addr().to_string()).await;
    let a = get(&client(), proxy.addr, "h", "/echo").await;
    let headers = a.json()["headers"].clone();
    let xff: Vec<_> = headers
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0] == "x-forwarded-for")
        .map(|p| p[1].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(xff, ["127.0.0.1"]);
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_towards_the_client() {
    let addr = custom_upstream(|_req| {
        Response::builder()
            .header("connection", "x-up-named")
            .header("x-up-named", "secret")
            .header("keep-alive", "timeout=60")
            .header("proxy-authenticate", "Basic")
            .header("trailer", "x-sum")
            .header("upgrade", "h2c")
            .header("proxy-connection", "keep-alive")
            .header("x-end-to-end", "kept")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap()
    })
    .await;
    let proxy = one_pool(addr.to_string()).await;
    let a = get(&client(), proxy.addr, "h", "/").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "hello");
    for gone in [
        "x-up-named",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
        "proxy-connection",
    ] {
        assert!(
            !a.headers.contains_key(gone),
            "{gone} reached the client: {:?}",
            a.headers
        );
    }
    assert_eq!(a.headers["x-end-to-end"], "kept");
}

const BIG: u64 = 48 * 1024 * 1024 + 12_345;

#[tokio::test]
async fn large_request_bodies_stream_chunked_and_with_length() {
    let up = upstream("sink").await;
    // The sink answers after the last byte, and `request_timeout` runs until the answer:
    // give a 48 MiB upload through a debug build, on a busy 2-core machine, its time.
    let toml = proxy_toml("").replace("request_timeout = \"2s\"", "request_timeout = \"60s\"")
        + &service_toml("svc", None, &[("main", vec![up.addr().to_string()], 1)]);
    let proxy = start(&toml).await;
    let c = client();
    for exact in [false, true] {
        let req = Request::post(format!("http://{}/sink", proxy.addr))
            .body(Generated::new(BIG, exact).boxed())
            .unwrap();
        let a = send(&c, req).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let j = a.json();
        assert_eq!(j["bytes"], BIG, "exact={exact}");
        assert_eq!(j["sum"], BIG * u64::from(b'y'), "exact={exact}");
    }
}

#[tokio::test]
async fn large_response_bodies_stream_chunked_and_with_length() {
    let up = upstream("stream").await;
    let proxy = one_pool(up.addr().to_string()).await;
    let c = client();
    for length in [0, 1] {
        let req = Request::get(format!(
            "http://{}/stream?bytes={BIG}&length={length}",
            proxy.addr
        ))
        .body(empty())
        .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        if length == 1 {
            assert_eq!(resp.headers()["content-length"], BIG.to_string().as_str());
        } else {
            assert!(!resp.headers().contains_key("content-length"));
        }
        // Count frames as they arrive; never hold the body.
        let mut body = resp.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                assert!(data.iter().all(|&b| b == b'x'));
                total += data.len() as u64;
            }
        }
        assert_eq!(total, BIG);
    }
}

/// Collects every outcome the proxy emits.
#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

/// (pool, error kind, status, endpoint index) of one outcome.
type Seen = (String, Option<ErrorKind>, u16, Option<usize>);

impl OutcomeSink for Recorder {
    fn record(&self, o: &Outcome<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((o.pool_name().to_owned(), o.error, o.status, o.endpoint));
    }
}

async fn one_pool_recorded(endpoint: String) -> (Proxy, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let toml = proxy_toml("") + &service_toml("svc", None, &[("main", vec![endpoint], 1)]);
    (start_with_sinks(&toml, vec![rec.clone()]).await, rec)
}

#[tokio::test]
async fn refused_connection_is_502_connect() {
    let (refused, _held) = refused_addr();
    let (proxy, rec) = one_pool_recorded(refused.to_string()).await;
    let a = get(&client(), proxy.addr, "h", "/").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.text(), "upstream connection failed\n");
    assert_eq!(a.headers["content-type"], "text/plain; charset=utf-8");
    let outcomes = rec.0.lock().unwrap().clone();
    assert_eq!(
        outcomes,
        [("main".to_owned(), Some(ErrorKind::Connect), 502, Some(0))]
    );
}

#[tokio::test]
async fn silent_upstream_is_504_timeout() {
    // Accepts and reads, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let rec = Arc::new(Recorder::default());
    let toml = "[proxy]\nrequest_timeout = \"300ms\"\n".to_owned()
        + &service_toml("svc", None, &[("main", vec![addr.to_string()], 1)]);
    let proxy = start_with_sinks(&toml, vec![rec.clone()]).await;
    let started = std::time::Instant::now();
    let a = get(&client(), proxy.addr, "h", "/").await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.text(), "upstream did not answer in time\n");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(rec.0.lock().unwrap()[0].1, Some(ErrorKind::Timeout));
}

#[tokio::test]
async fn pool_without_usable_endpoint_is_503() {
    let up = upstream("a").await;
    let (proxy, rec) = one_pool_recorded(up.addr().to_string()).await;
    let snapshot = proxy.controller.snapshot("svc").unwrap();
    snapshot.slots()[0].pool.set_endpoint_up(0, false);
    let a = get(&client(), proxy.addr, "h", "/").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.text(), "no upstream endpoint available\n");
    assert_eq!(
        rec.0.lock().unwrap()[0],
        ("main".to_owned(), Some(ErrorKind::NoEndpoint), 503, None)
    );
    assert_eq!(up.requests(), 0);
    snapshot.slots()[0].pool.set_endpoint_up(0, true);
    assert_eq!(
        get(&client(), proxy.addr, "h", "/").await.status,
        StatusCode::OK
    );
}

/// A raw upstream that reads one request head and answers with `reply` (then closes).
async fn raw_upstream(reply: &'static [u8]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_head(&mut s, None).await {
                    return;
                }
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn garbage_answer_is_502_protocol() {
    let addr = raw_upstream(b"this is not http at all\r\n\r\n").await;
    let (proxy, rec) = one_pool_recorded(addr.to_string()).await;
    let a = get(&client(), proxy.addr, "h", "/").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.text(), "upstream sent an invalid response\n");
    assert_eq!(rec.0.lock().unwrap()[0].1, Some(ErrorKind::Protocol));
}

#[tokio::test]
async fn close_before_answer_is_502_reset() {
    let addr = raw_upstream(b"").await;
    let (proxy, rec) = one_pool_recorded(addr.to_string()).await;
    let a = get(&client(), proxy.addr, "h", "/").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.text(), "upstream closed the connection\n");
    assert_eq!(rec.0.lock().unwrap()[0].1, Some(ErrorKind::Reset));
}

#[tokio::test]
async fn upstream_status_passes_through_with_an_outcome() {
    let up = upstream("a").await;
    let (proxy, rec) = one_pool_recorded(up.addr().to_string()).await;
    let a = get(&client(), proxy.addr, "h", "/status/503").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.upstream(), "a");
    assert_eq!(
        rec.0.lock().unwrap()[0],
        ("main".to_owned(), None, 503, Some(0))
    );
}
