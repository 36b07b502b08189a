//! Upstream keep-alive: connections are reused, expire after `pool_idle_timeout`, and a
//! pooled connection the upstream closed is never turned into a client-visible error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = upstream("a").await;
    let proxy = start(
        &(proxy_toml("") + &service_toml("s", None, &[("p", vec![up.addr().to_string()], 1)])),
    )
    .await;
    let c = client();
    for _ in 0..200 {
        assert_eq!(get(&c, proxy.addr, "x", "/").await.status, StatusCode::OK);
    }
    assert_eq!(up.requests(), 200);
    assert_eq!(
        up.connections(),
        1,
        "keep-alive to the upstream was not reused"
    );
}

#[tokio::test]
async fn idle_upstream_connections_close_after_the_idle_timeout() {
    let up = upstream("a").await;
    let toml = "[proxy]\npool_idle_timeout = \"300ms\"\n".to_owned()
        + &service_toml("s", None, &[("p", vec![up.addr().to_string()], 1)]);
    let proxy = start(&toml).await;
    assert_eq!(
        get(&client(), proxy.addr, "x", "/").await.status,
        StatusCode::OK
    );
    assert_eq!(up.open_connections(), 1);
    let started = std::time::Instant::now();
    let closed = wait_until(Duration::from_secs(5), || async {
        up.open_connections() == 0
    })
    .await;
    assert!(closed, "idle upstream connection never closed");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the timeout"
    );
}

/// An upstream that answers one request per connection as if keep-alive, then closes:
/// every pooled connection is dead by the time weir reuses it.
async fn one_shot_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let counter = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                if !read_head(&mut s, None).await {
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-upstream: once\r\n\r\nok\n",
                    )
                    .await;
                drop(s);
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, closed)
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_an_error() {
    let (addr, closed) = one_shot_upstream().await;
    let proxy =
        start(&(proxy_toml("") + &service_toml("s", None, &[("p", vec![addr.to_string()], 1)])))
            .await;
    let c = client();
    for i in 0..100 {
        let a = get(&c, proxy.addr, "x", "/").await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
        assert_eq!(a.body, "ok\n");
        // The upstream has closed this connection before weir's next request.
        let gone = wait_until(Duration::from_secs(5), || {
            let closed = closed.clone();
            async move { closed.load(Ordering::SeqCst) > i }
        })
        .await;
        assert!(gone);
    }
}
