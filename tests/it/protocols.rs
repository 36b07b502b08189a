//! WebSocket upgrades and HTTP/2 (h2c) clients through a real weir, with real
//! WebSocket peers (tokio-tungstenite) and hyper's HTTP/2 client.

use std::net::SocketAddr;

use crate::common::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server that prefixes text with its name; "bye" makes it close.
async fn ws_upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(t) if t.as_str() == "bye" => {
                            let _ = ws.close(None).await;
                            return;
                        }
                        Message::Text(t) => {
                            let _ = ws
                                .send(Message::text(format!("{name}: {}", t.as_str())))
                                .await;
                        }
                        Message::Binary(b) => {
                            let _ = ws.send(Message::Binary(b)).await;
                        }
                        Message::Close(_) => return,
                        _ => {}
                    }
                }
            });
        }
    });
    addr
}

async fn ws_proxy(stable_weight: u32, canary_weight: u32) -> Proxy {
    let stable = ws_upstream("stable").await;
    let canary = ws_upstream("canary").await;
    start(
        &(proxy_toml("")
            + &service_toml(
                "chat",
                None,
                &[
                    ("stable", vec![stable.to_string()], stable_weight),
                    ("canary", vec![canary.to_string()], canary_weight),
                ],
            )),
    )
    .await
}

#[tokio::test]
async fn websocket_echo_text_binary_and_close_from_either_side() {
    let proxy = ws_proxy(1, 0).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/socket", proxy.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("stable: hello")
    );
    let blob: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    // Close from the client side.
    ws.close(None).await.unwrap();
    while let Some(Ok(m)) = ws.next().await {
        assert!(m.is_close(), "{m:?}");
    }

    // Close from the server side.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/socket", proxy.addr))
        .await
        .unwrap();
    ws.send(Message::text("bye")).await.unwrap();
    // The server's close reaches the client (as a Close frame, or the end of the stream).
    match ws.next().await {
        None | Some(Ok(Message::Close(_))) | Some(Err(_)) => {}
        Some(Ok(other)) => panic!("unexpected {other:?}"),
    }
    // The proxy is unharmed: a new upgrade works.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/again", proxy.addr))
        .await
        .unwrap();
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("stable: again")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_follow_the_weights() {
    let proxy = ws_proxy(75, 25).await;
    let mut canary = 0;
    let total = 400;
    for _ in 0..total {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr))
            .await
            .unwrap();
        ws.send(Message::text("who")).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        if reply.to_text().unwrap().starts_with("canary") {
            canary += 1;
        }
        let _ = ws.close(None).await;
    }
    let share = canary as f64 / total as f64;
    // 25% of 400: sd ≈ 2.2 points; ±8 points is over 3.5 sd.
    assert!(
        (0.17..=0.33).contains(&share),
        "canary took {share:.3} of upgrades"
    );
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_proxied() {
    let up = upstream("h1-upstream").await;
    let proxy = start(
        &(proxy_toml("") + &service_toml("shop", None, &[("p", vec![up.addr().to_string()], 1)])),
    )
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut sender = h2_handshake(stream).await;
    for i in 0..20 {
        let req = Request::get(format!("http://shop.example.com/echo?i={i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.headers()["x-upstream"], "h1-upstream");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
        // The upstream got HTTP/1.1 with the authority as Host.
        assert_eq!(echo["version"], "HTTP/1.1");
        let host: Vec<&str> = echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0] == "host")
            .map(|h| h[1].as_str().unwrap())
            .collect();
        assert_eq!(host, ["shop.example.com"]);
    }
}

/// An HTTP/2 (h2c) gRPC-shaped upstream: echoes the length-prefixed message and ends
/// with `grpc-status` trailers; reports what it saw of `te`, Host and `:authority`.
async fn grpc_upstream() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, bool, String)>,
) {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let te = req
                            .headers()
                            .get("te")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let has_host = req.headers().contains_key("host");
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let _ = tx.send((te, has_host, authority));
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("grpc-message", "ok".parse().unwrap());
                        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                            vec![Ok(Frame::data(body)), Ok(Frame::trailers(trailers))];
                        let resp = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(StreamBody::new(futures_util::stream::iter(frames)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn grpc_over_h2c_keeps_trailers_both_ways() {
    let (upstream_addr, mut seen) = grpc_upstream().await;
    let toml = proxy_toml("")
        + &service_toml("grpc", None, &[("v1", vec![upstream_addr.to_string()], 1)])
        + "protocol = \"h2c\"\n";
    let proxy = start(&toml).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut sender = h2_handshake(stream).await;
    for i in 0..5u8 {
        // A gRPC message: compressed flag, big-endian length, payload.
        let payload = vec![i; 10];
        let mut msg = vec![0u8];
        msg.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        msg.extend_from_slice(&payload);
        let req = Request::post("http://grpc.example.com/pkg.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(Bytes::from(msg.clone())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers arrive");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "ok");
        assert_eq!(collected.to_bytes(), Bytes::from(msg));
        let (te, has_host, authority) = seen.recv().await.unwrap();
        assert_eq!(te, "trailers");
        assert!(!has_host, "Host and :authority must not both go upstream");
        assert_eq!(authority, "grpc.example.com");
    }
}
