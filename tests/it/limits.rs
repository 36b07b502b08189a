//! Lifecycle and abuse: graceful drain, slow and oversized clients, stalled bodies,
//! and the connection limit — on real sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir::Weir;
use weir::config::Config;
use weir_testkit::Faults;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    let up = upstream("slow").await;
    up.set_faults(Faults::delay(Duration::from_secs(1)));
    let toml = "[proxy]\nshutdown_grace = \"30s\"\nrequest_timeout = \"10s\"\n".to_owned()
        + &service_toml("shop", None, &[("p", vec![up.addr().to_string()], 1)]);
    let mut config = Config::parse(&toml, "t").unwrap();
    config.state.dir = temp_dir("drain");
    let weir = Weir::new(config, None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        weir.serve(listener, None, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let requests: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(async move {
                let c = client();
                get(&c, addr, "x", "/").await.status
            })
        })
        .collect();
    // All 50 are in flight at the upstream before the shutdown begins.
    assert!(wait_until(Duration::from_secs(10), || async { up.requests() >= 50 }).await);
    let stopping = Instant::now();
    stop_tx.send(()).unwrap();
    // New connections are refused once the listener is gone.
    let refused = wait_until(Duration::from_secs(5), || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(refused, "still accepting after shutdown");
    for r in requests {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    server.await.unwrap().unwrap();
    let took = stopping.elapsed();
    println!("drained 50 in-flight requests in {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "waited {took:?}, the grace is 30 s"
    );
}

async fn limited(extra: &str) -> (Proxy, weir_testkit::UpstreamHandle) {
    let up = upstream("up").await;
    let toml = format!("[proxy]\n{extra}\n")
        + &service_toml("shop", None, &[("p", vec![up.addr().to_string()], 1)]);
    (start(&toml).await, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_and_do_not_starve_normal_clients() {
    let (proxy, _up) = limited("header_read_timeout = \"1s\"").await;
    let addr = proxy.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = Vec::new();
    for _ in 0..200 {
        let stop = stop.clone();
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            let mut buf = [0u8; 64];
            for b in head.iter().cycle() {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(15) {
                    return None;
                }
                if s.write_all(&[*b]).await.is_err() {
                    return Some(started.elapsed());
                }
                // One byte a second is the attack; a closed socket ends it.
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                    Ok(Ok(_)) => return Some(started.elapsed()),
                    Err(_) => {}
                }
            }
            None
        }));
    }
    // Meanwhile a normal client is served.
    let c = client();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get(&c, addr, "x", "/").await.status, StatusCode::OK);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "normal request took {:?}",
            t.elapsed()
        );
    }
    let mut cut = 0;
    for s in slow {
        if let Some(after) = s.await.unwrap() {
            assert!(
                after < Duration::from_secs(5),
                "closed only after {after:?}"
            );
            cut += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        cut, 200,
        "every slow connection is closed after the header timeout"
    );
}

#[tokio::test]
async fn an_oversized_header_block_gets_431() {
    let (proxy, up) = limited("max_header_bytes = 8192").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let big = "a".repeat(16 * 1024);
    s.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_the_upstream_sees_the_request_aborted() {
    // An upstream that reads a request head and then its body, reporting how it ended.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<(usize, bool)>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut aborted = false;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    aborted = true;
                    break;
                }
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.len() > 1000 {
                break;
            }
        }
        let _ = tx.send((seen.len(), aborted));
    });
    let toml = "[proxy]\nbody_read_timeout = \"500ms\"\n".to_owned()
        + &service_toml("shop", None, &[("p", vec![upstream_addr.to_string()], 1)]);
    let proxy = start(&toml).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    // ...and nothing more.
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request body timed out"), "{text}");
    let (bytes, aborted) = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();
    assert!(
        aborted,
        "upstream connection was not aborted ({bytes} bytes seen)"
    );
}

#[tokio::test]
async fn clients_beyond_the_connection_limit_wait_their_turn() {
    let (proxy, _up) = limited("max_connections = 2").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third client connects (the kernel queues it) but is not served yet.
    let third = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let c = client();
            get(&c, addr, "x", "/").await.status
        }
    });
    let waited = tokio::time::timeout(Duration::from_millis(300), async {
        while !third.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(waited.is_err(), "served beyond the limit");
    // One slot frees up: the waiting client is served.
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// A client that does not read a large response: weir stops reading the upstream (the
/// upstream's sends block) instead of taking the body into memory, and relays the rest
/// once the client reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_stops_the_upstream_instead_of_buffering_its_body() {
    // Far more than any socket buffers between the upstream and the client hold.
    const BODY: u64 = 1 << 30;
    const CHUNK: usize = 64 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<u64>();
    let up_written = Arc::clone(&written);
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = socket2::SockRef::from(&s).set_send_buffer_size(16 * 1024);
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed before sending a request");
            head.extend_from_slice(&buf[..n]);
        }
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
        s.write_all(answer.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; CHUNK];
        let mut stalled = Some(stalled_tx);
        let mut sent = 0u64;
        while sent < BODY {
            let n = (BODY - sent).min(CHUNK as u64) as usize;
            let write = s.write_all(&chunk[..n]);
            tokio::pin!(write);
            // A send that does not complete for a second: the proxy stopped reading.
            // (On a loaded machine a pause can come early; the assertion below only
            // gets easier then, never harder.)
            if let Some(tx) = stalled.take() {
                match tokio::time::timeout(Duration::from_secs(1), &mut write).await {
                    Ok(r) => {
                        stalled = Some(tx);
                        if r.is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = tx.send(sent);
                        if write.await.is_err() {
                            return;
                        }
                    }
                }
            } else if write.await.is_err() {
                return;
            }
            sent += n as u64;
            up_written.store(sent, Ordering::Relaxed);
        }
    });
    let toml = "[proxy]\nrequest_timeout = \"60s\"\n".to_owned()
        + &service_toml("shop", None, &[("p", vec![up_addr.to_string()], 1)]);
    let proxy = start(&toml).await;

    // A small receive buffer, set before connecting so the window stays small.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&proxy.addr.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut client = TcpStream::from_std(sock.into()).unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nhost: shop\r\n\r\n")
        .await
        .unwrap();

    let at_stall = tokio::time::timeout(Duration::from_secs(60), stalled_rx)
        .await
        .expect("the upstream never blocked: weir kept reading for a client that does not")
        .unwrap();
    println!("the upstream blocked after sending {at_stall} bytes of {BODY}");
    assert!(
        at_stall < 64 << 20,
        "weir took {at_stall} bytes from the upstream for a client that read none"
    );

    // Reading again lets the upstream go on.
    let target = at_stall + (8 << 20);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; CHUNK];
    let mut read = 0u64;
    while written.load(Ordering::Relaxed) <= target {
        let n = tokio::time::timeout_at(deadline, client.read(&mut buf))
            .await
            .expect("the upstream did not resume when the client read again")
            .unwrap();
        assert!(n > 0, "the proxy closed the response after {read} bytes");
        read += n as u64;
    }
}
