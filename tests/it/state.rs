//! The state directory as operators meet it, through the real binary: one weir per
//! directory, loud refusal of a state file weir cannot use (and `weir state discard`),
//! a disk that refuses writes, and `weir check` running the start-up checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use http::{Request, StatusCode};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Write a config for service `shop` (stable 90, canary 10) with its state in `state`;
/// returns the file and the admin address.
fn write_config(dir: &Path, state: &Path) -> (PathBuf, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\nworkers = 1\n[admin]\nlisten = \"{admin}\"\n[state]\ndir = \"{}\"\n",
        free_port(),
        state.display()
    ) + &service_toml(
        "shop",
        None,
        &[
            ("stable", vec!["127.0.0.1:1".into()], 90),
            ("canary", vec!["127.0.0.1:2".into()], 10),
        ],
    );
    let path = dir.join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    (path, admin)
}

fn weir(args: &[&str], config: &Path) -> Command {
    let mut c = Command::new(WEIR);
    c.args(args).arg("--config").arg(config);
    c.env_remove("WEIR_ADMIN_TOKEN");
    c
}

fn spawn(mut cmd: Command) -> Running {
    Running(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn ready(admin: SocketAddr) -> bool {
    let c = client();
    wait_until(Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            let req = Request::get(format!("http://{admin}/readyz"))
                .body(empty())
                .unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await
}

/// Every file in `dir` (recursively) and its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn put_weights(admin: SocketAddr, stable: u32, canary: u32) -> Answer {
    let req = Request::put(format!("http://{admin}/api/v1/services/shop/weights"))
        .header("content-type", "application/json")
        .body(full(format!(
            r#"{{"weights":{{"stable":{stable},"canary":{canary}}}}}"#
        )))
        .unwrap();
    send(&client(), req).await
}

async fn weights(admin: SocketAddr) -> Vec<(String, u64)> {
    pool_weights(
        &get(&client(), admin, "localhost", "/api/v1/services/shop")
            .await
            .json(),
    )
}

/// A format-2 state file for `shop` with these weights and extension data.
fn state_file(stable: u32, canary: u32, extra: serde_json::Value) -> String {
    let doc = serde_json::json!({
        "format": 2,
        "services": {"shop": {
            "version": 4,
            "weights": {"stable": stable, "canary": canary},
            "updated_at": "2025-01-02T03:04:05.678Z",
            "updated_by": "admin",
            "extra": extra,
        }}
    });
    serde_json::to_string_pretty(&doc).unwrap()
}

#[tokio::test]
async fn a_second_weir_on_the_same_state_dir_exits_at_once_naming_the_first() {
    let dir = temp_dir("state-lock");
    let state = dir.join("state");
    let (config, admin) = write_config(&dir, &state);
    let first = spawn(weir(&["run"], &config));
    assert!(ready(admin).await, "the first weir did not start");
    assert_eq!(put_weights(admin, 30, 70).await.status, StatusCode::OK);
    let before = files(&state);

    // Same config, so the same ports too: the lock must be what refuses it, first.
    let started = Instant::now();
    let out = weir(&["run"], &config).output().unwrap();
    let elapsed = started.elapsed();
    let (_, err) = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let pid = first.0.id();
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(err.contains("in use by another weir"), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert_eq!(err.lines().count(), 1, "printed once:\n{err}");
    assert_eq!(
        files(&state),
        before,
        "the refused weir wrote to the directory"
    );
    // The first one is unaffected.
    assert_eq!(
        weights(admin).await,
        [("stable".to_owned(), 30), ("canary".to_owned(), 70)]
    );
}

#[tokio::test]
async fn an_unusable_state_file_stops_the_start_until_discarded() {
    let cases = [
        (
            state_file(0, 0, serde_json::Value::Null),
            "saved weights stable=0 canary=0 are invalid: all weights are zero",
        ),
        (
            state_file(50, 50, serde_json::json!({"baseline": "blue"})),
            "saved baseline `blue` is not one of its pools [stable, canary]",
        ),
        (
            state_file(
                50,
                50,
                serde_json::json!({"rollout": {"phase": "sideways"}}),
            ),
            "saved rollout cannot be read by this weir",
        ),
    ];
    for (saved, needle) in cases {
        let dir = temp_dir("state-bad");
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("state.json"), &saved).unwrap();
        let (config, admin) = write_config(&dir, &state);

        let out = weir(&["run"], &config).output().unwrap();
        let (_, err) = text(&out);
        assert!(!out.status.success(), "{err}");
        let file = state.join("state.json").display().to_string();
        assert!(
            err.contains(&format!("state file {file} cannot be used")),
            "{err}"
        );
        assert!(err.contains("service `shop`: "), "{err}");
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
        assert_eq!(err.matches(needle).count(), 1, "printed once:\n{err}");
        let discard = format!("weir state discard --config {}", config.display());
        assert!(err.contains(&discard), "{err}");
        // Nothing written but the (empty) lock file.
        assert_eq!(
            std::fs::read_to_string(state.join("state.json")).unwrap(),
            saved
        );
        assert!(!state.join("events.jsonl").exists());
        assert_eq!(std::fs::read(state.join("lock")).unwrap(), b"");

        // `weir check` sees it too.
        let out = weir(&["check"], &config).output().unwrap();
        let (_, err) = text(&out);
        assert!(!out.status.success());
        assert!(err.contains(needle), "{err}");

        let out = weir(&["state", "discard"], &config).output().unwrap();
        let (said, err) = text(&out);
        assert!(out.status.success(), "{err}");
        assert!(said.contains("aside to"), "{said}");
        assert!(!state.join("state.json").exists());
        let aside: Vec<PathBuf> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("state.json.discarded-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), saved);
        assert!(said.contains(&aside[0].display().to_string()), "{said}");

        let _running = spawn(weir(&["run"], &config));
        assert!(ready(admin).await, "weir did not start after the discard");
        assert_eq!(
            weights(admin).await,
            [("stable".to_owned(), 90), ("canary".to_owned(), 10)]
        );
    }
}

#[tokio::test]
async fn an_unwritable_state_dir_serves_the_saved_weights_and_refuses_changes_until_writable() {
    let dir = temp_dir("state-ro");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("state.json"),
        state_file(25, 75, serde_json::Value::Null),
    )
    .unwrap();
    let (config, admin) = write_config(&dir, &state);

    // Permissions do not stop root, so the disk "refuses" the way a full one would: the
    // path of the save's temp file (`state.json.tmp.<pid>`) is a non-empty directory.
    // The shell makes it with its own pid and then becomes weir, keeping that pid.
    let blocker = |pid: u32| state.join(format!("state.json.tmp.{pid}"));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"mkdir -p "$0/state.json.tmp.$$/x" && exec "$1" run --config "$2""#)
        .arg(&state)
        .arg(WEIR)
        .arg(&config)
        .env_remove("WEIR_ADMIN_TOKEN");
    let running = spawn(cmd);
    let pid = running.0.id();
    assert!(
        ready(admin).await,
        "weir must start on a directory it cannot write"
    );
    assert!(blocker(pid).is_dir());
    assert_eq!(
        weights(admin).await,
        [("stable".to_owned(), 25), ("canary".to_owned(), 75)],
        "the saved weights serve"
    );

    let refused = put_weights(admin, 60, 40).await;
    // The disk refuses writes: 503, weir keeps serving.
    assert!(
        refused.status.as_u16() == 503,
        "{} {}",
        refused.status,
        refused.text()
    );
    assert!(
        refused
            .error()
            .contains("state directory does not take writes"),
        "{}",
        refused.text()
    );
    assert_eq!(
        weights(admin).await,
        [("stable".to_owned(), 25), ("canary".to_owned(), 75)],
        "a refused change changes nothing"
    );

    // The disk recovers: the next change goes through, after the start-up record.
    std::fs::remove_dir_all(blocker(pid)).unwrap();
    let ok = put_weights(admin, 60, 40).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        on_disk["services"]["shop"]["weights"]["stable"], 60,
        "{on_disk}"
    );
    let events = get(&client(), admin, "localhost", "/api/v1/events")
        .await
        .json();
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["state_restored", "weights_changed"], "{events}");
}

#[test]
fn check_runs_the_start_up_checks_and_prints_each_problem_once() {
    let dir = temp_dir("state-check");
    let cert = dir.join("missing-cert.pem");
    let key = dir.join("missing-key.pem");
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\ntls_listen = \"127.0.0.1:{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         [admin]\nlisten = \"0.0.0.0:{}\"\n[state]\ndir = \"{}\"\n",
        free_port(),
        free_port(),
        cert.display(),
        key.display(),
        free_port(),
        dir.join("state").display()
    ) + &service_toml("shop", None, &[("stable", vec!["127.0.0.1:1".into()], 1)]);
    let config = dir.join("weir.toml");
    std::fs::write(&config, toml).unwrap();

    let out = weir(&["check"], &config).output().unwrap();
    let (said, err) = text(&out);
    assert!(!out.status.success(), "{said}");
    let cert = cert.display().to_string();
    assert_eq!(err.matches(&cert).count(), 1, "{err}");
    assert!(err.contains("no admin token is set"), "{err}");
    assert!(err.contains("2 problem(s)"), "{err}");
    // `weir check` reads; it creates no state directory.
    assert!(!dir.join("state").exists());

    // `weir run` stops at the first of them, and says so once.
    let out = weir(&["run"], &config).output().unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert_eq!(err.matches("no admin token is set").count(), 1, "{err}");
}

#[tokio::test]
async fn an_in_process_restart_shares_the_lock_of_the_instance_still_shutting_down() {
    // A library user (or a test) may start weir again in the same process while the
    // previous instance's tasks still hold it: the OS lock does not nest within one
    // process, so the process's one lock is shared instead of refusing itself.
    let toml = proxy_toml("")
        + &service_toml(
            "shop",
            None,
            &[
                ("stable", vec!["127.0.0.1:1".into()], 90),
                ("canary", vec!["127.0.0.1:2".into()], 10),
            ],
        );
    let mut config = weir::config::Config::parse(&toml, "t.toml").unwrap();
    config.state.dir = temp_dir("state-inproc");
    let first = start_config(config.clone(), None, Vec::new()).await;
    first.set_weights("shop", &[("stable", 40), ("canary", 60)]);
    drop(first);
    let second = start_config(config.clone(), None, Vec::new()).await;
    let snap = second.controller.snapshot("shop").unwrap();
    assert_eq!(snap.weights(), [40, 60]);
    // The lock file names this process for whoever is refused.
    let lock = std::fs::read_to_string(config.state.dir.join("lock")).unwrap();
    assert_eq!(lock.trim(), std::process::id().to_string());
}
