//! Targeting (a header or cookie naming a pool) and sticky users, through a real weir.

use crate::common::*;
use http::Request;
use weir_testkit::UpstreamHandle;

async fn three(extra: &str) -> (Proxy, Vec<UpstreamHandle>) {
    let ups = vec![
        upstream("stable").await,
        upstream("canary").await,
        upstream("preview").await,
    ];
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            None,
            &[
                ("stable", vec![ups[0].addr().to_string()], 100),
                ("canary", vec![ups[1].addr().to_string()], 0),
                ("preview", vec![ups[2].addr().to_string()], 0),
            ],
        )
        + extra;
    (start(&toml).await, ups)
}

async fn pool_for(proxy: &Proxy, headers: &[(&str, &str)]) -> String {
    let mut req = Request::get(format!("http://{}/", proxy.addr));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&client(), req.body(empty()).unwrap())
        .await
        .upstream()
        .to_owned()
}

#[tokio::test]
async fn header_beats_cookie_beats_weights() {
    let (proxy, _ups) = three("").await;
    assert_eq!(pool_for(&proxy, &[]).await, "stable");
    // Weight 0 does not matter to a targeted request.
    assert_eq!(
        pool_for(&proxy, &[("x-weir-pool", "canary")]).await,
        "canary"
    );
    assert_eq!(
        pool_for(&proxy, &[("cookie", "a=b; weir-pool=preview")]).await,
        "preview"
    );
    assert_eq!(
        pool_for(
            &proxy,
            &[("x-weir-pool", "canary"), ("cookie", "weir-pool=preview")]
        )
        .await,
        "canary"
    );
    // An unknown pool name is ignored: normal routing.
    assert_eq!(pool_for(&proxy, &[("x-weir-pool", "nope")]).await, "stable");
    assert_eq!(
        pool_for(
            &proxy,
            &[("x-weir-pool", "nope"), ("cookie", "weir-pool=preview")]
        )
        .await,
        "preview"
    );
}

#[tokio::test]
async fn override_token_keeps_the_public_off_the_canary() {
    let (proxy, _ups) = three(
        "[service.targeting]\nheader = \"X-Pool\"\ncookie = \"pool\"\noverride_token = \"0123456789abcdef-secret\"\n",
    )
    .await;
    assert_eq!(pool_for(&proxy, &[("x-pool", "canary")]).await, "stable");
    assert_eq!(
        pool_for(
            &proxy,
            &[("x-pool", "canary"), ("x-weir-override-token", "guess")]
        )
        .await,
        "stable"
    );
    assert_eq!(
        pool_for(
            &proxy,
            &[
                ("x-pool", "canary"),
                ("x-weir-override-token", "0123456789abcdef-secret")
            ]
        )
        .await,
        "canary"
    );
    assert_eq!(
        pool_for(
            &proxy,
            &[
                ("cookie", "pool=preview"),
                ("x-weir-override-token", "0123456789abcdef-secret")
            ]
        )
        .await,
        "preview"
    );
}

fn set(proxy: &Proxy, stable: u32, canary: u32) {
    proxy.set_weights(
        "shop",
        &[("stable", stable), ("canary", canary), ("preview", 0)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_header_users_stay_put_and_only_move_towards_the_canary() {
    let (proxy, _ups) = three("[service.sticky]\nheader = \"x-user-id\"\n").await;
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut previous: Option<Vec<String>> = None;
    for (stable, canary) in [(95, 5), (75, 25), (50, 50)] {
        set(&proxy, stable, canary);
        let mut now = Vec::new();
        for u in &users {
            let first = pool_for(&proxy, &[("x-user-id", u)]).await;
            // At fixed weights a user always lands on the same pool.
            for _ in 0..3 {
                assert_eq!(pool_for(&proxy, &[("x-user-id", u)]).await, first, "{u}");
            }
            now.push(first);
        }
        if let Some(prev) = &previous {
            for (u, (was, is)) in users.iter().zip(prev.iter().zip(&now)) {
                assert!(
                    was != "canary" || is == "canary",
                    "{u} left the canary at {canary}%"
                );
            }
        }
        let share = now.iter().filter(|p| *p == "canary").count() as f64 / 3.0;
        assert!(
            (share - f64::from(canary)).abs() < 8.0,
            "{canary}% → {share:.1}%"
        );
        previous = Some(now);
    }
    proxy.rollback("shop");
    for u in &users {
        assert_eq!(pool_for(&proxy, &[("x-user-id", u)]).await, "stable");
    }
    // Targeting still beats stickiness.
    assert_eq!(
        pool_for(
            &proxy,
            &[("x-user-id", "user-1"), ("x-weir-pool", "preview")]
        )
        .await,
        "preview"
    );
}

#[tokio::test]
async fn sticky_cookie_is_assigned_once_and_then_followed() {
    let (proxy, _ups) = three("[service.sticky]\ncookie = \"weir_uid\"\nmax_age = \"1h\"\n").await;
    set(&proxy, 50, 50);
    let c = client();
    let first = send(
        &c,
        Request::get(format!("http://{}/", proxy.addr))
            .body(empty())
            .unwrap(),
    )
    .await;
    let cookie = first.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("weir_uid="), "{cookie}");
    for attr in ["Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let id = cookie.split(';').next().unwrap().to_owned();
    for _ in 0..30 {
        let a = send(
            &c,
            Request::get(format!("http://{}/", proxy.addr))
                .header("cookie", &id)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(a.upstream(), first.upstream());
        assert!(!a.headers.contains_key("set-cookie"));
    }
}
