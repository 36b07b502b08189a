//! Which weir this is and what ships with it, through the real binary and real tools:
//! `weir --version` against git, the server's version in the admin API and in
//! `weir ctl status`, completion scripts run by bash (and parsed by zsh and fish), man
//! pages rendered by groff, the systemd unit checked by `systemd-analyze`, the packaged
//! config by `weir check`. The .deb itself is scripts/deb-smoke.sh's (it needs root and
//! a release build).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::*;
use weir::model::build;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `weir ARGS`, which must succeed; its stdout.
fn weir(args: &[&str]) -> String {
    let out = Command::new(WEIR).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "weir {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `PROGRAM FLAGS SCRIPT PROGRAM ARG`: a shell running `script` with `$1` = `arg`.
fn shell(program: &str, flags: &[&str], script: &str, arg: &Path) -> Output {
    Command::new(program)
        .args(flags)
        .arg(script)
        .arg(program)
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/test.sh installs it): {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What git says this tree is, when the sources are a git checkout: the short HEAD.
fn git_head() -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn version_names_the_release_and_the_git_revision() {
    let line = format!("weir {} ({})\n", env!("CARGO_PKG_VERSION"), build::REVISION);
    assert_eq!(weir(&["--version"]), line);
    assert_eq!(weir(&["-V"]), line);
    match std::env::var("WEIR_BUILD_REVISION") {
        Ok(given) if !given.trim().is_empty() => assert_eq!(build::REVISION, given.trim()),
        _ => {
            if let Some(head) = git_head() {
                let rest = build::REVISION.strip_prefix(head.as_str());
                assert!(
                    matches!(rest, Some("" | "-dirty")),
                    "built from {}, but git says HEAD is {head}",
                    build::REVISION
                );
            }
        }
    }
}

#[tokio::test]
async fn the_server_reports_its_version_to_the_api_and_ctl_status_but_not_to_clients() {
    let up = upstream("app").await;
    let dir = temp_dir("identity");
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[state]\ndir = \"{}\"\n",
        dir.join("state").display()
    ) + &service_toml("app", None, &[("stable", vec![up.addr().to_string()], 1)]);
    let path = dir.join("weir.toml");
    std::fs::write(&path, toml).unwrap();
    let _weir = Running(
        Command::new(WEIR)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let c = client();
    let up_and_running = wait_until(std::time::Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            let req = http::Request::get(format!("http://{admin_addr}/readyz"))
                .body(empty())
                .unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == http::StatusCode::OK)
        }
    })
    .await;
    assert!(up_and_running, "weir did not become ready");

    // What `weir --version` says, the server says: it is the same build.
    let v = get(&c, admin_addr, "localhost", "/api/v1/version").await;
    assert_eq!(v.status, http::StatusCode::OK, "{}", v.text());
    assert_eq!(
        v.json(),
        serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "revision": build::REVISION})
    );
    let doc: weir::api::VersionDoc = serde_json::from_slice(&v.body).unwrap();
    assert_eq!(
        format!("weir {} ({})\n", doc.version, doc.revision),
        weir(&["-V"])
    );

    let admin_url = format!("http://{admin_addr}");
    let status =
        tokio::task::spawn_blocking(move || weir(&["ctl", "--admin", &admin_url, "status"]))
            .await
            .unwrap();
    assert_eq!(
        status.lines().next(),
        Some(format!("weir {} at http://{admin_addr}", build::DESCRIBE).as_str()),
        "{status}"
    );
    assert!(status.contains("app"), "{status}");

    // Proxied answers name no weir, no version: nothing for a scanner to match on.
    let proxied = get(
        &c,
        format!("127.0.0.1:{port}").parse().unwrap(),
        "example.com",
        "/",
    )
    .await;
    assert_eq!(proxied.status, http::StatusCode::OK);
    assert_eq!(proxied.upstream(), "app");
    assert!(
        proxied.headers.get("server").is_none(),
        "{:?}",
        proxied.headers
    );
    for (name, value) in &proxied.headers {
        let value = value.to_str().unwrap_or_default();
        assert!(
            !value.contains(build::REVISION) && !value.to_ascii_lowercase().contains("weir"),
            "{name}: {value}"
        );
    }
}

/// Every command's page name (`weir-ctl-status`) with its parent's (`weir-ctl`; none for
/// `weir`), from the clap definition the pages are made from.
fn page_names() -> Vec<(String, Option<String>)> {
    fn walk(cmd: &clap::Command, parent: Option<&str>, out: &mut Vec<(String, Option<String>)>) {
        let name = match parent {
            Some(p) => format!("{p}-{}", cmd.get_name()),
            None => cmd.get_name().to_owned(),
        };
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, Some(&name), out);
        }
        out.push((name, parent.map(str::to_owned)));
    }
    let mut names = Vec::new();
    walk(
        &<weir_cli::cli::Cli as clap::CommandFactory>::command(),
        None,
        &mut names,
    );
    names.sort();
    names
}

#[test]
fn bash_completion_completes_subcommands_flags_and_values() {
    let dir = temp_dir("identity");
    let script = dir.join("weir.bash");
    std::fs::write(&script, weir(&["completions", "bash"])).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{}", text(&syntax));
    // Sourced as bash-completion would, then asked the way bash asks on <TAB>.
    let complete = r#"
        source "$1"
        complete -p weir
        ask() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
                COMPREPLY=(); _weir weir "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"; echo "$* => ${COMPREPLY[*]}"; }
        ask weir ct
        ask weir ctl set
        ask weir ctl status --wat
        ask weir completions z
    "#;
    let out = text(&shell("bash", &["-c"], complete, &script));
    for line in [
        "complete -o bashdefault -o default -o nosort -F _weir weir",
        "weir ct => ctl",
        "weir ctl set => set-weight",
        "weir ctl status --wat => --watch",
        "weir completions z => zsh",
    ] {
        assert!(out.lines().any(|l| l == line), "no `{line}` in:\n{out}");
    }
}

#[test]
fn zsh_and_fish_completions_parse_and_every_shell_gets_a_script() {
    let dir = temp_dir("identity");
    let zsh = dir.join("_weir");
    std::fs::write(&zsh, weir(&["completions", "zsh"])).unwrap();
    let out = Command::new("zsh")
        .arg("-n")
        .arg(&zsh)
        .output()
        .expect("zsh (scripts/test.sh installs it)");
    assert!(out.status.success(), "{}", text(&out));
    let fish = dir.join("weir.fish");
    std::fs::write(&fish, weir(&["completions", "fish"])).unwrap();
    let out = Command::new("fish")
        .arg("--no-execute")
        .arg(&fish)
        .output()
        .expect("fish (scripts/test.sh installs it)");
    assert!(out.status.success(), "{}", text(&out));
    // fish, run for real: what it offers after `weir ctl `.
    let out = Command::new("fish")
        .args(["-c", "source $argv[1]; complete -C 'weir ctl '"])
        .arg(&fish)
        .output()
        .unwrap();
    let offered = text(&out);
    for verb in ["status", "set-weight", "rollback", "promote"] {
        assert!(
            offered.lines().any(|l| l.split('\t').next() == Some(verb)),
            "fish does not offer `{verb}`:\n{offered}"
        );
    }
    for shell in ["elvish", "powershell"] {
        let script = weir(&["completions", shell]);
        assert!(script.contains("set-weight"), "{shell}:\n{script}");
    }
    let refused = Command::new(WEIR)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("possible values: bash, elvish, fish"),
        "{}",
        text(&refused)
    );
}

/// The page as `man` shows it, rendered by groff with every warning on: any warning (a
/// roff mistake) fails.
fn render(page: &Path) -> String {
    let out = Command::new("groff")
        // Plain text: no bold or underline (-P-cbu), lines wide enough to keep names whole.
        .args(["-man", "-Tutf8", "-ww", "-rLL=200n", "-P-cbu"])
        .arg(page)
        .output()
        .expect("groff (package groff-base; scripts/test.sh installs it)");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stderr.is_empty(),
        "{}: {}",
        page.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn man_pages_render_and_cover_every_subcommand() {
    let dir = temp_dir("identity");
    let listed = weir(&["man", "--dir", dir.to_str().unwrap()]);
    let mut written: Vec<String> = listed
        .lines()
        .map(|l| {
            let p = Path::new(l);
            assert_eq!(p.parent(), Some(dir.as_path()));
            p.file_stem().unwrap().to_str().unwrap().to_owned()
        })
        .collect();
    written.sort();
    // A page per subcommand at any depth (weir-ctl-set-weight), and no other.
    let names: Vec<String> = page_names().into_iter().map(|(n, _)| n).collect();
    assert_eq!(written, names);
    assert_eq!(
        weir(&["man"]),
        std::fs::read_to_string(dir.join("weir.1")).unwrap()
    );

    let main = render(&dir.join("weir.1"));
    assert!(
        main.contains("weir - Traffic-splitting reverse proxy"),
        "{main}"
    );
    assert!(main.contains(build::REVISION), "{main}");
    for (name, parent) in page_names() {
        // Each page renders cleanly and is listed on its parent's page.
        let page = render(&dir.join(format!("{name}.1")));
        assert!(page.contains("SYNOPSIS"), "{name}:\n{page}");
        if let Some(parent) = parent {
            let parent_page = render(&dir.join(format!("{parent}.1")));
            assert!(
                parent_page.contains(&format!("{name}(1)")),
                "{parent}(1) does not list {name}(1):\n{parent_page}"
            );
        }
    }
    let set_weight = render(&dir.join("weir-ctl-set-weight.1"));
    assert!(set_weight.contains("--if-version"), "{set_weight}");
    assert!(set_weight.contains("POOL=WEIGHT"), "{set_weight}");
}

/// The unit file as `systemd-analyze verify` sees it, with ExecStart pointing at this
/// build (the packaged path, /usr/bin/weir, exists only once the .deb is installed).
#[test]
fn the_systemd_unit_verifies_and_keeps_its_hardening() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/weir.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert_eq!(exec, "/usr/bin/weir run --config /etc/weir/weir.toml");
    let dir = temp_dir("identity");
    let path = dir.join("weir.service");
    std::fs::write(&path, unit.replace("/usr/bin/weir ", &format!("{WEIR} "))).unwrap();
    // Unknown keys and bad values are warnings on stderr with exit 0: any output fails.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd; scripts/test.sh installs it)");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
    // The hardening score: 0 is best, 10 worst; above 2.0 something was dropped.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // systemd says what it parsed: the settings the README promises, as systemd read
    // them (a typo in a key would be missing here even though verify only warns).
    let report = text(&out);
    for setting in [
        "NoNewPrivileges=",
        "ProtectSystem=                                              Service has strict",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "RestrictNamespaces=",
        "MemoryDenyWriteExecute=",
        "SystemCallArchitectures=",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with('✓') && l.contains(setting)),
            "{setting} is not in force:\n{report}"
        );
    }
    for (key, value) in [
        ("User", "weir"),
        ("Type", "exec"),
        ("StateDirectory", "weir"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
    ] {
        assert!(
            unit.lines().any(|l| l == format!("{key}={value}")),
            "no {key}={value}"
        );
    }
}

#[test]
fn the_unit_stops_weir_after_its_shutdown_grace_not_before() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/weir.service")).unwrap();
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    let stop = weir::config::parse_duration(stop).unwrap();
    let config = weir::config::Config::load(&repo("deploy/deb/weir.toml")).unwrap();
    assert!(
        stop > config.proxy.shutdown_grace,
        "TimeoutStopSec {stop:?} must exceed shutdown_grace {:?}",
        config.proxy.shutdown_grace
    );
    assert_eq!(config.state.dir, Path::new("/var/lib/weir"));
    assert!(config.proxy.listen.ip().is_loopback());
    assert!(config.admin.listen.ip().is_loopback());
    let out = Command::new(WEIR)
        .args(["check", "--config"])
        .arg(repo("deploy/deb/weir.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}
