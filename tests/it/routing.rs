//! Weighted splits and Host routing through a real weir and real upstreams.

use crate::common::*;
use http::StatusCode;

async fn two_pools(
    stable_w: u32,
    canary_w: u32,
) -> (
    Proxy,
    weir_testkit::UpstreamHandle,
    weir_testkit::UpstreamHandle,
) {
    let s = shop(None, (stable_w, canary_w), "").await;
    (s.proxy, s.stable, s.canary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ninety_ten_split_lands_within_one_and_a_half_points() {
    let (proxy, _s, _c) = two_pools(90, 10).await;
    let total = 20_000;
    let seen = split(proxy.addr, total, 32).await;
    let canary = *seen.get("canary").unwrap_or(&0);
    let stable = *seen.get("stable").unwrap_or(&0);
    assert_eq!(canary + stable, total, "failures: {seen:?}");
    let share = canary as f64 / total as f64 * 100.0;
    assert!(
        (8.5..=11.5).contains(&share),
        "canary got {share:.2}%: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_gets_nothing() {
    let (proxy, _s, canary) = two_pools(1, 0).await;
    let seen = split(proxy.addr, 2_000, 8).await;
    assert_eq!(seen.get("stable"), Some(&2_000), "{seen:?}");
    assert_eq!(canary.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_hundred_ninety_nine_to_one_sends_some_but_few() {
    let (proxy, _s, _c) = two_pools(999, 1).await;
    let total = 20_000;
    let seen = split(proxy.addr, total, 32).await;
    let canary = *seen.get("canary").unwrap_or(&0);
    // Expect 20 (0.1%); P(0) = e^-20 and P(>= 60) is below 1e-12.
    assert!((1..60).contains(&canary), "canary got {canary}: {seen:?}");
    assert_eq!(canary + seen.get("stable").copied().unwrap_or(0), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_change_applies_from_the_next_request() {
    let (proxy, _s, _c) = two_pools(100, 0).await;
    let c = client();
    assert_eq!(get(&c, proxy.addr, "x", "/").await.upstream(), "stable");
    let change = proxy.set_weights("shop", &[("stable", 0), ("canary", 1)]);
    assert_eq!(change.snapshot.version, 2);
    // Same keep-alive connection, next request: already the new weights.
    for _ in 0..50 {
        assert_eq!(get(&c, proxy.addr, "x", "/").await.upstream(), "canary");
    }
    proxy.rollback("shop");
    for _ in 0..50 {
        assert_eq!(get(&c, proxy.addr, "x", "/").await.upstream(), "stable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_routing_and_default_service() {
    let shop = upstream("shop").await;
    let api = upstream("api").await;
    let fallback = upstream("fallback").await;
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            Some(&["shop.example.com"]),
            &[("v1", vec![shop.addr().to_string()], 1)],
        )
        + &service_toml(
            "api",
            Some(&["api.example.com", "api2.example.com"]),
            &[("v1", vec![api.addr().to_string()], 1)],
        )
        + &service_toml(
            "fallback",
            None,
            &[("v1", vec![fallback.addr().to_string()], 1)],
        );
    let proxy = start(&toml).await;
    let c = client();
    for (host, want) in [
        ("shop.example.com", "shop"),
        ("SHOP.Example.com:8080", "shop"),
        ("api.example.com", "api"),
        ("api2.example.com:443", "api"),
        ("unknown.example.com", "fallback"),
        ("127.0.0.1", "fallback"),
    ] {
        let a = get(&c, proxy.addr, host, "/").await;
        assert_eq!(
            (a.status, a.upstream()),
            (StatusCode::OK, want),
            "host {host}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_without_default_is_404() {
    let shop = upstream("shop").await;
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            Some(&["shop.example.com"]),
            &[("v1", vec![shop.addr().to_string()], 1)],
        );
    let proxy = start(&toml).await;
    let a = get(&client(), proxy.addr, "elsewhere.example.com", "/").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.text(), "no service for this host\n");
    assert_eq!(shop.requests(), 0);
}
