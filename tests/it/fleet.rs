//! Fleet mode against real etcd: three etcd members and three weir instances on
//! loopback (the etcd members started by the tests, `weir_testkit::EtcdCluster`), traffic
//! spread over the instances round-robin.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use weir::config::Config;
use weir_testkit::{EtcdCluster, Faults, TlsFiles, UpstreamHandle};

use crate::common::{
    Proxy, Running, client, free_port, full, get, pool_weights, proxy_toml, send, service_toml,
    start_config, temp_dir, upstream, wait_until,
};

/// How long a test waits for a change to reach every instance. The product's figure
/// (tens of milliseconds; the issue asks for under a second) is measured and printed by
/// `a_change_on_any_instance_is_on_every_instance_within_a_second`; this bound only
/// catches a change that never arrives, on a test machine busy with other tests.
const SPREAD: Duration = Duration::from_secs(5);

/// A fleet: etcd, its weir instances, the shop's two upstreams.
struct Fleet {
    etcd: EtcdCluster,
    weirs: Vec<Proxy>,
    stable: UpstreamHandle,
    canary: UpstreamHandle,
    slo: String,
}

fn fleet_toml(
    endpoints: &[String],
    instance: &str,
    stable: &UpstreamHandle,
    canary: &UpstreamHandle,
    slo: &str,
) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    proxy_toml("")
        + &format!(
            "[fleet]\nendpoints = [{}]\nname = \"test\"\ninstance = \"{instance}\"\nlease_ttl = \"2s\"\ntimeout = \"1s\"\npublish_interval = \"100ms\"\n",
            list.join(", ")
        )
        + &service_toml(
            "shop",
            None,
            &[
                ("stable", vec![stable.addr().to_string()], 90),
                ("canary", vec![canary.addr().to_string()], 10),
            ],
        )
        + slo
}

impl Fleet {
    async fn start(weirs: usize, slo: &str) -> Fleet {
        let etcd = EtcdCluster::start(3).await.expect("etcd starts");
        let stable = upstream("stable").await;
        let canary = upstream("canary").await;
        let mut fleet = Fleet {
            etcd,
            weirs: Vec::new(),
            stable,
            canary,
            slo: slo.to_owned(),
        };
        for i in 0..weirs {
            let dir = temp_dir("fleet");
            let weir = fleet.instance(i, dir).await;
            fleet.weirs.push(weir);
        }
        fleet
    }

    /// Start instance `i` on state directory `dir`.
    async fn instance(&self, i: usize, dir: std::path::PathBuf) -> Proxy {
        let toml = fleet_toml(
            &self.etcd.endpoints(),
            &format!("w{i}"),
            &self.stable,
            &self.canary,
            &self.slo,
        );
        let mut config = Config::parse(&toml, "fleet.toml").unwrap_or_else(|e| panic!("{e}"));
        config.state.dir = dir;
        start_config(config, None, Vec::new()).await
    }

    /// Every instance's weights for the shop.
    async fn weights(&self) -> Vec<Vec<(String, u64)>> {
        let mut all = Vec::new();
        for w in &self.weirs {
            all.push(pool_weights(&w.service("shop").await));
        }
        all
    }

    /// Wait until every instance reports the store as `want` (`reachable`,
    /// `unreachable`, `mismatch`).
    async fn wait_store(&self, want: &str, limit: Duration) -> bool {
        wait_until(limit, || async {
            let mut all = true;
            for w in &self.weirs {
                all &= fleet_doc(w.admin).await["store"] == want;
            }
            all
        })
        .await
    }

    async fn wait_weights(&self, want: &[(&str, u64)], limit: Duration) -> bool {
        let want: Vec<(String, u64)> = want.iter().map(|(p, w)| (p.to_string(), *w)).collect();
        wait_until(limit, || async {
            self.weights().await.iter().all(|w| *w == want)
        })
        .await
    }
}

async fn put_weights(
    admin: std::net::SocketAddr,
    body: &str,
    if_match: Option<&str>,
) -> crate::common::Answer {
    let mut req = Request::put(format!("http://{admin}/api/v1/services/shop/weights"))
        .header("content-type", "application/json");
    if let Some(tag) = if_match {
        req = req.header("if-match", tag);
    }
    send(&client(), req.body(full(body.to_owned())).unwrap()).await
}

/// Whether the shop's weights on the instance at `admin` become `want` (see [`SPREAD`]).
async fn weights_reach(admin: std::net::SocketAddr, want: &[(&str, u64)]) -> bool {
    let want: Vec<(String, u64)> = want.iter().map(|(p, w)| (p.to_string(), *w)).collect();
    wait_until(SPREAD, || async {
        pool_weights(
            &get(&client(), admin, "localhost", "/api/v1/services/shop")
                .await
                .json(),
        ) == want
    })
    .await
}

async fn fleet_doc(admin: std::net::SocketAddr) -> serde_json::Value {
    get(&client(), admin, "localhost", "/api/v1/fleet")
        .await
        .json()
}

/// p50 and p99 of a list of durations.
fn quantiles(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort();
    let at = |q: f64| d[((d.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_any_instance_is_on_every_instance_within_a_second() {
    let f = Fleet::start(3, "").await;
    // Seeded once, followed by all.
    assert!(
        f.wait_weights(&[("stable", 90), ("canary", 10)], Duration::from_secs(5))
            .await
    );
    let mut seen = Vec::new();
    for round in 0..20u64 {
        let by = &f.weirs[round as usize % 3];
        let canary = 10 + round;
        let body = format!(
            r#"{{"weights":{{"stable":{},"canary":{canary}}}}}"#,
            100 - canary
        );
        let t0 = Instant::now();
        let a = put_weights(by.admin, &body, None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let want = [("stable", 100 - canary), ("canary", canary)];
        assert!(
            f.wait_weights(&want, SPREAD).await,
            "round {round}: {:?}",
            f.weights().await
        );
        seen.push(t0.elapsed());
    }
    let (p50, p99) = quantiles(seen);
    println!("fleet: a change visible on all 3 instances: p50 {p50:?}, p99 {p99:?}");

    // Concurrent writes with the same If-Match on two instances: one 200, one 409.
    let doc = f.weirs[0].service("shop").await;
    let tag = format!("\"{}\"", doc["version"]);
    let (a, b) = tokio::join!(
        put_weights(
            f.weirs[0].admin,
            r#"{"weights":{"stable":50,"canary":50}}"#,
            Some(&tag)
        ),
        put_weights(
            f.weirs[1].admin,
            r#"{"weights":{"stable":70,"canary":30}}"#,
            Some(&tag)
        ),
    );
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{} / {}", a.text(), b.text());
    let winner = if a.status == StatusCode::OK { 50 } else { 30 };
    assert!(
        f.wait_weights(&[("stable", 100 - winner), ("canary", winner)], SPREAD)
            .await
    );

    // One journal, which says which instance did what.
    let events = f.weirs[2].events().await;
    let changes: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "weights_changed")
        .collect();
    assert_eq!(changes.len(), 21, "{events:#?}");
    assert!(changes.iter().all(|e| e["instance"].is_string()));
    assert_eq!(changes[0]["instance"], "w0");
    assert_eq!(changes[1]["instance"], "w1");

    // The fleet document: one leader, three members, everyone at the same revision.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let d = fleet_doc(f.weirs[0].admin).await;
            d["store"] == "reachable"
                && d["members"].as_array().is_some_and(|m| m.len() == 3)
                && d["leader"].is_string()
        })
        .await,
        "{:#}",
        fleet_doc(f.weirs[0].admin).await
    );
    let mut leaders = 0;
    for w in &f.weirs {
        let d = fleet_doc(w.admin).await;
        leaders += usize::from(d["leads"] == true);
    }
    assert_eq!(leaders, 1);
}

/// Load spread round-robin over the instances until stopped; counts answers by status.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addrs: Vec<std::net::SocketAddr>, per_second: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (s, o, e) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let task = tokio::spawn(async move {
            let c = client();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let addr = addrs[i % addrs.len()];
                i += 1;
                let c = c.clone();
                let (o, e) = (Arc::clone(&o), Arc::clone(&e));
                tokio::spawn(async move {
                    let req = Request::get(format!("http://{addr}/"))
                        .body(crate::common::empty())
                        .unwrap();
                    let a = send(&c, req).await;
                    if a.status.is_server_error() && a.upstream() != "canary" {
                        e.fetch_add(1, Ordering::Relaxed);
                    } else {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        Load {
            stop,
            ok,
            failed,
            task,
        }
    }

    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_no_instance_sees_alone_is_reverted_on_all() {
    // Each instance gets a third of ~150 req/s, a tenth of it to the canary: ~5 canary
    // requests per instance per second, under the 12-request minimum of one 1 s window;
    // the fleet's sum (~15) is over it.
    let slo = "[service.slo]\ninterval = \"250ms\"\nwindow = \"1s\"\nfast_window = \"1s\"\nmin_requests = 12\nmax_error_rate = 0.2\nbreaches_to_act = 2\n";
    let f = Fleet::start(3, slo).await;
    assert!(
        f.wait_weights(&[("stable", 90), ("canary", 10)], Duration::from_secs(5))
            .await
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let d = fleet_doc(f.weirs[0].admin).await;
            d["judging_fleet"] == true && d["members"].as_array().is_some_and(|m| m.len() == 3)
        })
        .await
    );
    let load = Load::start(f.weirs.iter().map(|w| w.addr).collect(), 150);
    f.canary.set_faults(Faults {
        error_rate: 0.8,
        ..Faults::default()
    });
    let broke = Instant::now();
    assert!(
        f.wait_weights(&[("stable", 100), ("canary", 0)], Duration::from_secs(10))
            .await,
        "not reverted everywhere: {:?}",
        f.weights().await
    );
    let took = broke.elapsed();
    println!("fleet: pooled breach reverted on all 3 instances {took:?} after the canary broke");
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "stable answered with errors ({ok} fine)");
    // Exactly one revert in the journal, whoever's guard got there first.
    let events = f.weirs[0].events().await;
    let reverts: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "rolled_back")
        .collect();
    assert_eq!(reverts.len(), 1, "{events:#?}");
    assert_eq!(reverts[0]["source"], "guard");
    // No single instance saw enough on its own: its own window stayed under the minimum.
    for w in &f.weirs {
        let s = w.service("shop").await;
        assert_eq!(s["health"], "degraded", "{s:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_instances_serve_refuse_writes_revert_locally_and_reconcile() {
    let slo = "[service.slo]\ninterval = \"250ms\"\nwindow = \"1s\"\nfast_window = \"1s\"\nmin_requests = 5\nmax_error_rate = 0.2\nbreaches_to_act = 2\n";
    let mut f = Fleet::start(3, slo).await;
    assert!(
        f.wait_weights(&[("stable", 90), ("canary", 10)], Duration::from_secs(5))
            .await
    );
    let load = Load::start(f.weirs.iter().map(|w| w.addr).collect(), 150);
    // Two of three members gone: no quorum.
    f.etcd.kill(1).await;
    f.etcd.kill(2).await;
    let lost = Instant::now();
    assert!(f.wait_store("unreachable", Duration::from_secs(10)).await);
    println!(
        "fleet: quorum loss noticed by all instances after {:?}",
        lost.elapsed()
    );
    // Writes are refused, saying why; nothing changed.
    let a = put_weights(
        f.weirs[0].admin,
        r#"{"weights":{"stable":50,"canary":50}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert!(a.error().contains("store"), "{}", a.error());
    assert!(
        f.wait_weights(&[("stable", 90), ("canary", 10)], Duration::from_secs(1))
            .await
    );
    // The canary breaks: every instance's own guard reverts locally.
    f.canary.set_faults(Faults {
        error_rate: 0.9,
        ..Faults::default()
    });
    assert!(
        f.wait_weights(&[("stable", 100), ("canary", 0)], Duration::from_secs(10))
            .await,
        "{:?}",
        f.weights().await
    );
    for w in &f.weirs {
        let s = w.service("shop").await;
        assert_eq!(s["health"], "degraded", "{s:#}");
    }
    // Quorum returns: the revert is written once, and everyone agrees.
    f.etcd.restart(1).await.unwrap();
    f.etcd.restart(2).await.unwrap();
    assert!(f.wait_store("reachable", Duration::from_secs(15)).await);
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed during the outage ({ok} fine)");
    assert!(
        f.wait_weights(&[("stable", 100), ("canary", 0)], Duration::from_secs(2))
            .await
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let events = f.weirs[0].events().await;
            events.iter().filter(|e| e["kind"] == "rolled_back").count() >= 1
        })
        .await
    );
    let events = f.weirs[1].events().await;
    let reverts: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "rolled_back")
        .collect();
    assert_eq!(reverts.len(), 1, "{events:#?}");
    assert_eq!(reverts[0]["details"]["local"], true, "{:#}", reverts[0]);
    // Writes work again, everywhere.
    let a = put_weights(
        f.weirs[2].admin,
        r#"{"weights":{"stable":95,"canary":5}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_weights(&[("stable", 95), ("canary", 5)], SPREAD)
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_changes_nothing_and_a_wiped_store_is_refused_until_reseeded() {
    let mut f = Fleet::start(2, "").await;
    assert!(
        f.wait_weights(&[("stable", 90), ("canary", 10)], Duration::from_secs(5))
            .await
    );
    let a = put_weights(
        f.weirs[0].admin,
        r#"{"weights":{"stable":60,"canary":40}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_weights(&[("stable", 60), ("canary", 40)], SPREAD)
            .await
    );
    let before: Vec<serde_json::Value> = {
        let mut v = Vec::new();
        for w in &f.weirs {
            v.push(w.service("shop").await["version"].clone());
        }
        v
    };
    let events_before = f.weirs[1].events().await.len();
    // Compaction: watches are cancelled and re-read; nothing is applied twice.
    f.etcd.compact().await.unwrap();
    let a = put_weights(
        f.weirs[1].admin,
        r#"{"weights":{"stable":61,"canary":39}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_weights(&[("stable", 61), ("canary", 39)], Duration::from_secs(2))
            .await
    );
    for (w, v) in f.weirs.iter().zip(&before) {
        assert_eq!(
            w.service("shop").await["version"],
            v.as_u64().unwrap() + 1,
            "exactly one change since"
        );
    }
    assert_eq!(f.weirs[1].events().await.len(), events_before + 1);

    // Wiped: same cluster id, revision back to 1, no weir keys. Nobody re-seeds it
    // with their (possibly stale) weights; they keep serving and say why.
    f.etcd.wipe().await.unwrap();
    assert!(
        f.wait_store("mismatch", Duration::from_secs(10)).await,
        "{:#}",
        fleet_doc(f.weirs[0].admin).await
    );
    let d = fleet_doc(f.weirs[0].admin).await;
    assert!(d["problem"].as_str().unwrap().contains("wiped"), "{d:#}");
    assert!(
        f.wait_weights(&[("stable", 61), ("canary", 39)], Duration::from_secs(1))
            .await
    );
    let a = put_weights(
        f.weirs[0].admin,
        r#"{"weights":{"stable":10,"canary":90}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    let metrics = get(&client(), f.weirs[0].admin, "localhost", "/metrics")
        .await
        .text();
    assert!(metrics.contains("weir_fleet_store_mismatch 1"), "{metrics}");
    // The operator decides: re-seed from instance 1's state; everyone follows.
    let req = Request::post(format!("http://{}/api/v1/fleet/reseed", f.weirs[1].admin))
        .body(crate::common::empty())
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_store("reachable", Duration::from_secs(10)).await,
        "{:#}",
        fleet_doc(f.weirs[0].admin).await
    );
    let a = put_weights(
        f.weirs[0].admin,
        r#"{"weights":{"stable":10,"canary":90}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_weights(&[("stable", 10), ("canary", 90)], SPREAD)
            .await
    );
}

/// `weir run` as a process (so that it can be killed with SIGKILL), ready when its
/// admin API answers.
struct Process {
    _child: Running,
    admin: std::net::SocketAddr,
}

async fn run_instance(f: &Fleet, i: usize, dir: &std::path::Path) -> Process {
    run_instance_with(f, i, dir, &f.etcd.endpoints(), "", &[]).await
}

/// Three weir processes on the fleet, each with its own state dir: the dirs (to restart
/// one on), the processes (`None` once killed) and their admin addresses.
async fn run_three(
    f: &Fleet,
    tag: &str,
) -> (
    Vec<std::path::PathBuf>,
    Vec<Option<Process>>,
    Vec<std::net::SocketAddr>,
) {
    let dirs: Vec<_> = (0..3).map(|_| temp_dir(tag)).collect();
    let mut procs = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        procs.push(Some(run_instance(f, i, dir).await));
    }
    let admins = procs.iter().map(|p| p.as_ref().unwrap().admin).collect();
    (dirs, procs, admins)
}

/// Which of `admins` says it leads the fleet, if one does.
async fn leading(admins: &[std::net::SocketAddr]) -> Option<usize> {
    for (i, a) in admins.iter().enumerate() {
        if fleet_doc(*a).await["leads"] == true {
            return Some(i);
        }
    }
    None
}

/// [`run_instance`] on given endpoints, with more `[fleet]` settings and environment.
async fn run_instance_with(
    f: &Fleet,
    i: usize,
    dir: &std::path::Path,
    endpoints: &[String],
    fleet_extra: &str,
    env: &[(&str, &str)],
) -> Process {
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = fleet_toml(endpoints, &format!("p{i}"), &f.stable, &f.canary, &f.slo)
        .replace(
            "publish_interval = \"100ms\"\n",
            &format!("publish_interval = \"100ms\"\n{fleet_extra}"),
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{}\"", free_port()),
        )
        + &format!(
            "[admin]\nlisten = \"{admin}\"\n[state]\ndir = \"{}\"\n",
            dir.join("state").display()
        );
    let path = dir.join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = client();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let req = Request::get(format!("http://{admin}/readyz"))
                .body(crate::common::empty())
                .unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        })
        .await,
        "weir {i} did not become ready"
    );
    Process {
        _child: Running(child),
        admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_a_200_loses_nothing_and_a_killed_leader_is_replaced() {
    let f = Fleet::start(0, "").await;
    let (dirs, mut procs, admins) = run_three(&f, "fleet-bin").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            leading(&admins).await.is_some()
        })
        .await,
        "{:#}",
        fleet_doc(admins[0]).await
    );
    let first = leading(&admins).await.unwrap();
    // A change acknowledged by the leader, which is killed at once: on every instance.
    let a = put_weights(
        admins[first],
        r#"{"weights":{"stable":33,"canary":67}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let killed = Instant::now();
    procs[first].take();
    let others: Vec<_> = (0..3).filter(|i| *i != first).collect();
    for i in &others {
        assert!(weights_reach(admins[*i], &[("stable", 33), ("canary", 67)]).await);
    }
    // A new leader: within the lease's TTL (2 s) and a second on an idle machine (the
    // time is printed; the bound here only catches a fleet that stays leaderless).
    let rest: Vec<_> = others.iter().map(|i| admins[*i]).collect();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            leading(&rest).await.is_some()
        })
        .await,
        "no new leader"
    );
    println!(
        "fleet: new leader {:?} after the leader was killed",
        killed.elapsed()
    );
    // The same for an instance that does not lead: its acknowledged change survives it.
    let new_leader = others[leading(&rest).await.unwrap()];
    let follower = others.iter().copied().find(|i| *i != new_leader).unwrap();
    let a = put_weights(
        admins[follower],
        r#"{"weights":{"stable":44,"canary":56}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    procs[follower].take();
    assert!(weights_reach(admins[new_leader], &[("stable", 44), ("canary", 56)]).await);
    procs[follower] = Some(run_instance(&f, follower, &dirs[follower]).await);
    // The killed leader comes back with the fleet's state, both changes in.
    procs[first] = Some(run_instance(&f, first, &dirs[first]).await);
    let back = procs[first].as_ref().unwrap().admin;
    let s = get(&client(), back, "localhost", "/api/v1/services/shop")
        .await
        .json();
    assert_eq!(
        pool_weights(&s),
        [("stable".to_owned(), 44), ("canary".to_owned(), 56)]
    );
    // `weir ctl fleet` shows the members and the leader; `weir ctl status` names the
    // fleet under the services.
    let ctl = |verb: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["ctl", "--admin", &format!("http://{back}"), verb])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = ctl("fleet");
    assert!(
        text.contains("store reachable")
            && text.contains("leader p")
            && text.contains("3 member(s)"),
        "{text}"
    );
    let text = ctl("status");
    assert!(
        text.contains("shop") && text.contains(&format!("fleet test seen from p{first}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_costs_no_client_request() {
    let mut f = Fleet::start(3, "").await;
    assert!(
        f.wait_weights(&[("stable", 90), ("canary", 10)], Duration::from_secs(5))
            .await
    );
    let load = Load::start(f.weirs.iter().map(|w| w.addr).collect(), 150);
    let leader = f.etcd.leader().await.expect("etcd has a leader");
    f.etcd.kill(leader).await;
    let killed = Instant::now();
    // Writes go through again once the two members left elect a leader; each 503 in
    // the meantime says why and changes nothing.
    let mut written = None;
    while killed.elapsed() < Duration::from_secs(10) {
        let a = put_weights(
            f.weirs[0].admin,
            r#"{"weights":{"stable":80,"canary":20}}"#,
            None,
        )
        .await;
        if a.status == StatusCode::OK {
            written = Some(killed.elapsed());
            break;
        }
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = written.expect("writes resume after the etcd leader is killed");
    println!("fleet: etcd leader killed; a write succeeded again after {written:?}");
    assert!(
        f.wait_weights(&[("stable", 80), ("canary", 20)], Duration::from_secs(2))
            .await,
        "{:?}",
        f.weights().await
    );
    assert!(f.wait_store("reachable", Duration::from_secs(5)).await);
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "client requests failed ({ok} fine)");
    assert!(ok > 100, "the load ran ({ok} answers)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_restarted_without_etcd_serves_its_cached_state() {
    let mut f = Fleet::start(2, "").await;
    let a = put_weights(
        f.weirs[0].admin,
        r#"{"weights":{"stable":30,"canary":70}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_weights(&[("stable", 30), ("canary", 70)], SPREAD)
            .await
    );
    // No quorum, then instance 1 restarts (same state directory).
    f.etcd.kill(1).await;
    f.etcd.kill(2).await;
    let dir = f.weirs[1].state_dir.clone();
    drop(f.weirs.remove(1));
    let back = f.instance(1, dir).await;
    let s = back.service("shop").await;
    assert_eq!(
        pool_weights(&s),
        [("stable".to_owned(), 30), ("canary".to_owned(), 70)]
    );
    // And it serves them.
    let seen = crate::common::split(back.addr, 200, 4).await;
    let canary = seen.get("canary").copied().unwrap_or(0);
    assert!(
        (100..=180).contains(&canary),
        "70% of 200 to the canary, roughly: {seen:?}"
    );
    assert_eq!(fleet_doc(back.admin).await["store"], "unreachable");
    // Quorum back: it follows the store again, and takes writes.
    f.weirs.push(back);
    f.etcd.restart(1).await.unwrap();
    f.etcd.restart(2).await.unwrap();
    assert!(f.wait_store("reachable", Duration::from_secs(15)).await);
    let a = put_weights(
        f.weirs[1].admin,
        r#"{"weights":{"stable":40,"canary":60}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_weights(&[("stable", 40), ("canary", 60)], SPREAD)
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_continues_under_a_new_leader_without_doubling_or_skipping_a_step() {
    let plan = "[service.rollout]\ncandidate = \"canary\"\nsteps = [{ percent = 10 }, { pause = \"3s\" }, { percent = 30 }, { pause = \"3s\" }, { percent = 60 }, { pause = \"1s\" }, { percent = 100 }]\n";
    let f = Fleet::start(0, plan).await;
    let (_dirs, mut procs, admins) = run_three(&f, "fleet-plan").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            leading(&admins).await.is_some()
        })
        .await
    );
    let first = leading(&admins).await.unwrap();
    // Started on a follower; the leader drives it.
    let starter = (first + 1) % 3;
    let req = Request::post(format!(
        "http://{}/api/v1/services/shop/rollout",
        admins[starter]
    ))
    .body(crate::common::empty())
    .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // During the first pause, the leader dies.
    procs[first].take();
    let rest: Vec<_> = (0..3).filter(|i| *i != first).map(|i| admins[i]).collect();
    let promoted = wait_until(Duration::from_secs(30), || async {
        get(&client(), rest[0], "localhost", "/api/v1/services/shop")
            .await
            .json()["rollout"]["phase"]
            == "promoted"
    })
    .await;
    let events = get(&client(), rest[0], "localhost", "/api/v1/events?limit=1000")
        .await
        .json()["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(promoted, "{events:#?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "rollout_step" || e["kind"] == "rollout_started")
        .map(|e| e["details"]["step"].as_u64().unwrap_or(u64::MAX))
        .collect();
    let mut unique = steps.clone();
    unique.dedup();
    assert_eq!(steps, unique, "a step journaled twice: {events:#?}");
    // Each change applies a percent step and enters the pause after it (the start
    // lands at index 1, each pause's end at the next pause): every pause once, in order.
    assert_eq!(steps, [1, 3, 5], "a step doubled or skipped: {events:#?}");
    let by: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| e["kind"] == "rollout_step")
        .filter_map(|e| e["instance"].as_str())
        .collect();
    println!("fleet: rollout steps {steps:?} driven by {by:?}");
    assert!(
        !by.contains(format!("p{first}").as_str()) || by.len() > 1,
        "the plan went on after its leader died: {by:?}"
    );
    let weights = pool_weights(
        &get(&client(), rest[1], "localhost", "/api/v1/services/shop")
            .await
            .json(),
    );
    // Rollout weights are on the percent scale (100% = 10000).
    assert_eq!(
        weights,
        [("stable".to_owned(), 0), ("canary".to_owned(), 10000)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet() {
    use crate::dashboard::{browser, chromedriver, page_until};
    let f = Fleet::start(2, "").await;
    assert!(f.wait_store("reachable", Duration::from_secs(5)).await);
    let driver = chromedriver().await;
    let dir = temp_dir("fleet-dashboard");
    let b = browser(&driver, &dir.join("chromium-profile")).await;
    let result = async {
        b.goto(&format!("http://{}/", f.weirs[0].admin))
            .await
            .expect("open the dashboard");
        page_until(
            &b,
            "both members in the fleet panel",
            "return !document.querySelector('#fleet').hidden \
             && document.querySelectorAll('#fleet-members li').length === 2",
        )
        .await;
        let summary = page_until(
            &b,
            "the store and the leader",
            "const t = document.querySelector('#fleet-summary').textContent; \
             return t.includes('store reachable') && t.includes('leader w') ? t : ''",
        )
        .await;
        let name = page_until(
            &b,
            "which instance the page talks to",
            "return document.querySelector('#fleet-name').textContent",
        )
        .await;
        assert_eq!(name, "test · seen from w0", "{summary}");
    }
    .await;
    let _ = b.close().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_one_id_are_told_apart_and_reported() {
    let f = Fleet::start(1, "").await;
    assert!(f.wait_store("reachable", SPREAD).await);
    // A second process configured with the same instance id.
    let twin = f.instance(0, temp_dir("fleet-twin")).await;
    let said = |admin| async move {
        fleet_doc(admin).await["problem"]
            .as_str()
            .is_some_and(|p| p.contains("another process publishes as instance `w0`"))
    };
    assert!(
        wait_until(SPREAD, || async {
            said(f.weirs[0].admin).await && said(twin.admin).await
        })
        .await,
        "{:#}",
        fleet_doc(f.weirs[0].admin).await
    );
    let metrics = get(&client(), twin.admin, "localhost", "/metrics")
        .await
        .text();
    assert!(
        metrics.contains("weir_fleet_duplicate_instance 1"),
        "{metrics}"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, as PEM
/// files in `dir`: (the server's files for etcd, client cert, client key).
fn pki(dir: &std::path::Path) -> (TlsFiles, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(vec!["weir".into()], ExtendedKeyUsagePurpose::ClientAuth);
    (
        TlsFiles {
            cert: write("server.crt", server_cert),
            key: write("server.key", server_key),
            ca: write("ca.crt", ca.pem()),
        },
        write("client.crt", client_cert),
        write("client.key", client_key),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_mutual_tls_with_a_password() {
    let dir = temp_dir("fleet-tls");
    let (server, client_cert, client_key) = pki(&dir);
    let etcd = EtcdCluster::start_tls(1, server.clone())
        .await
        .expect("etcd starts");
    etcd.enable_auth("s3cret").await.expect("etcd auth");
    let f = Fleet {
        etcd,
        weirs: Vec::new(),
        stable: upstream("stable").await,
        canary: upstream("canary").await,
        slo: String::new(),
    };
    let tls = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nusername = \"root\"\npassword_env = \"WEIR_ETCD_PASSWORD\"\n",
        server.ca.display(),
        client_cert.display(),
        client_key.display()
    );
    let endpoints = f.etcd.tls_endpoints();
    let mut procs = Vec::new();
    for i in 0..2 {
        procs.push(
            run_instance_with(
                &f,
                i,
                &temp_dir("fleet-tls-weir"),
                &endpoints,
                &tls,
                &[("WEIR_ETCD_PASSWORD", "s3cret")],
            )
            .await,
        );
    }
    for p in &procs {
        assert!(
            wait_until(SPREAD, || async {
                fleet_doc(p.admin).await["store"] == "reachable"
            })
            .await,
            "{:#}",
            fleet_doc(p.admin).await
        );
    }
    let a = put_weights(
        procs[0].admin,
        r#"{"weights":{"stable":20,"canary":80}}"#,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(weights_reach(procs[1].admin, &[("stable", 20), ("canary", 80)]).await);
    // A wrong password: the instance serves its config's weights and says why it cannot
    // read the fleet's state.
    let wrong = run_instance_with(
        &f,
        2,
        &temp_dir("fleet-tls-weir"),
        &endpoints,
        &tls,
        &[("WEIR_ETCD_PASSWORD", "wrong")],
    )
    .await;
    assert!(
        wait_until(SPREAD, || async {
            let d = fleet_doc(wrong.admin).await;
            d["store"] != "reachable"
                && d["problem"]
                    .as_str()
                    .is_some_and(|p| p.contains("authentication failed"))
        })
        .await,
        "{:#}",
        fleet_doc(wrong.admin).await
    );
    let s = get(&client(), wrong.admin, "localhost", "/api/v1/services/shop")
        .await
        .json();
    assert_eq!(
        pool_weights(&s),
        [("stable".to_owned(), 90), ("canary".to_owned(), 10)]
    );
}

/// `POST` to an instance's admin API.
async fn post_admin(admin: std::net::SocketAddr, path: &str, body: &str) -> crate::common::Answer {
    let req = Request::post(format!("http://{admin}/api/v1/services/{path}"))
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap();
    send(&client(), req).await
}

/// The canary pool's endpoints and version on one instance.
async fn canary_release(admin: std::net::SocketAddr) -> (serde_json::Value, serde_json::Value) {
    let doc = get(&client(), admin, "localhost", "/api/v1/services/shop")
        .await
        .json();
    let canary = doc["pools"][1].clone();
    (canary["endpoints"].clone(), canary["version"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_one_instance_moves_the_endpoints_on_every_instance() {
    let plan = "[service.rollout]\ncandidate = \"canary\"\nsteps = [{ percent = 50 }, { pause = \"manual\" }]\n";
    let f = Fleet::start(2, plan).await;
    assert!(
        f.wait_weights(&[("stable", 90), ("canary", 10)], Duration::from_secs(5))
            .await
    );
    let build = upstream("v2").await;
    let body = format!(r#"{{"version": "v2", "endpoints": ["{}"]}}"#, build.addr());
    let a = post_admin(f.weirs[0].admin, "shop/release", &body).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let want = (
        serde_json::json!([build.addr().to_string()]),
        serde_json::json!("v2"),
    );
    let other = f.weirs[1].admin;
    assert!(
        wait_until(SPREAD, || async { canary_release(other).await == want }).await,
        "{:?}",
        canary_release(other).await
    );
    assert!(
        f.wait_weights(&[("stable", 5000), ("canary", 5000)], SPREAD)
            .await
    );
    // Traffic through the other instance reaches the new build, not the old canary.
    let before = f.canary.requests();
    let c = client();
    let mut reached = false;
    for _ in 0..50 {
        let r = get(&c, f.weirs[1].addr, "x", "/").await;
        assert_eq!(r.status, StatusCode::OK);
        reached |= r.upstream() == "v2";
    }
    assert!(
        reached,
        "the new build got no traffic through the other instance"
    );
    assert_eq!(f.canary.requests(), before);
    // The history is the fleet's: an undo on the other instance moves the first.
    let a = post_admin(other, "shop/undo", "{}").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(
        f.wait_weights(&[("stable", 10000), ("canary", 0)], SPREAD)
            .await
    );
    let history = get(
        &client(),
        f.weirs[0].admin,
        "localhost",
        "/api/v1/services/shop/history",
    )
    .await
    .json();
    let releases = history["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 3, "{history}");
    assert_eq!(releases[1]["outcome"], "aborted");
    assert_eq!(releases[2]["undo_to"], 1);
}
