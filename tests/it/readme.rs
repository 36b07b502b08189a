//! The README's commands, run as written. Every command line of its `sh` blocks is run
//! here, in the README's order, against the example config (`config/weir.toml`, its
//! ports moved to free ones and its state dir to a temp dir), or it is named in
//! `ELSEWHERE` with the test or script that runs it. A README edit that adds a command
//! nothing runs therefore fails this test, and so does one that documents a flag the
//! binary no longer takes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Commands the README shows that this test does not run, with what does. Matched as
/// prefixes of the command line (comments stripped).
const ELSEWHERE: &[(&str, &str)] = &[
    (
        "scripts/test.sh",
        "the test command itself; .ci/run runs it",
    ),
    (
        "cargo run --release -- demo",
        "tests/it/binary.rs (demo_tour_promotes_the_canary and the --fail-canary tour)",
    ),
    (
        "cp weir.env.example weir.env",
        "scripts/check-compose.sh (the compose stack, validated without a Docker engine)",
    ),
    (
        "docker compose ",
        "scripts/check-compose.sh; the same `weir ctl` verbs run here",
    ),
    (
        "cargo build --release && export PATH",
        "this test runs the `weir` binary cargo built for it",
    ),
    (
        "weir ctl fleet",
        "tests/it/fleet.rs against a real etcd cluster: `weir ctl fleet` as written, \
         reseed through its API route (this test's weir is not in a fleet)",
    ),
];

/// Exit codes other than 0 that a README command has by design here.
const EXPECTED_EXIT: &[(&str, i32)] = &[
    // The example plan waits at a 2-minute pause: the wait times out, as it says.
    ("weir ctl status shop --wait --timeout 5s", 2),
];

/// Commands that run until interrupted (servers, watchers) when the README starts them
/// in the foreground: the test waits for their first output, then stops them.
fn runs_until_interrupted(args: &[String]) -> bool {
    matches!(args.get(1).map(String::as_str), Some("upstream" | "run"))
        || args
            .iter()
            .any(|a| a == "--watch" || a == "-w" || a == "--follow" || a == "-f")
}

/// One command line of a `sh` block: the heading it sits under and its words.
#[derive(Debug)]
struct Line {
    heading: String,
    text: String,
    words: Vec<String>,
    background: bool,
}

fn readme_lines(readme: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut heading = String::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for raw in readme.lines() {
        if !in_sh {
            if raw.starts_with('#') {
                heading = raw.trim_start_matches('#').trim().to_owned();
            }
            in_sh = raw.trim() == "```sh";
            continue;
        }
        if raw.trim() == "```" {
            in_sh = false;
            continue;
        }
        // A trailing backslash continues the command on the next line, as in a shell.
        if let Some(head) = raw.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(raw);
        let logical = std::mem::take(&mut pending);
        // shlex drops `# comments`, as a shell would.
        let Some(mut words) = shlex::split(&logical) else {
            panic!("README line does not parse as shell words: {logical}");
        };
        if words.is_empty() {
            continue;
        }
        let background = words.last().is_some_and(|w| w == "&");
        if background {
            words.pop();
        }
        let text = match logical.find(" #") {
            Some(i) if words.iter().all(|w| !w.contains(" #")) => logical[..i].trim().to_owned(),
            _ => logical.trim().to_owned(),
        };
        lines.push(Line {
            heading: heading.clone(),
            text,
            words,
            background,
        });
    }
    lines
}

/// `127.0.0.1:PORT` anywhere in `text`: the ports the example setup binds.
fn loopback_ports(text: &str, into: &mut BTreeMap<u16, u16>) {
    for (i, _) in text.match_indices("127.0.0.1:") {
        let digits: String = text[i + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(port) = digits.parse::<u16>() {
            into.entry(port).or_insert_with(free_port);
        }
    }
}

fn remap(text: &str, ports: &BTreeMap<u16, u16>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("127.0.0.1:") {
        out.push_str(&rest[..i + 10]);
        rest = &rest[i + 10..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        match digits.parse::<u16>().ok().and_then(|p| ports.get(&p)) {
            Some(to) => out.push_str(&to.to_string()),
            None => out.push_str(&digits),
        }
        rest = &rest[digits.len()..];
    }
    out.push_str(rest);
    out
}

/// The environment the README's commands run in: the example config with moved ports,
/// and the processes started so far.
struct Stack {
    dir: PathBuf,
    config: PathBuf,
    ports: BTreeMap<u16, u16>,
    admin: String,
    background: Vec<(String, Running)>,
    weir_run: Option<Running>,
    n: usize,
}

impl Stack {
    fn command(&mut self, words: &[String]) -> (Command, PathBuf, PathBuf) {
        let args: Vec<String> = words[1..]
            .iter()
            .map(|w| {
                if w == "config/weir.toml" {
                    self.config.display().to_string()
                } else {
                    remap(w, &self.ports)
                }
            })
            .collect();
        self.n += 1;
        let out = self.dir.join(format!("{}.out", self.n));
        let err = self.dir.join(format!("{}.err", self.n));
        let mut cmd = Command::new(WEIR);
        cmd.args(&args)
            .current_dir(&self.dir)
            .env("WEIR_ADMIN", &self.admin)
            .env_remove("WEIR_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        (cmd, out, err)
    }
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s
}

/// Wait for a child with a deadline; kill it if it outlives it.
fn wait_child(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll `check` every 20 ms until it holds or `limit` passes.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// The admin API's answer to a GET, as JSON (std only: a blocking one-shot exchange).
fn admin_get(admin: &str, path: &str) -> Option<serde_json::Value> {
    use std::io::Write;
    let addr = admin.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let body = answer.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

#[test]
fn every_readme_command_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("config/weir.toml")).unwrap();
    let lines = readme_lines(&readme);
    assert!(
        lines.len() > 20,
        "found only {} README commands",
        lines.len()
    );

    let dir = temp_dir("readme");
    let mut ports = BTreeMap::new();
    loopback_ports(&example, &mut ports);
    for line in &lines {
        loopback_ports(&line.text, &mut ports);
    }
    let state_dir = dir.join("state");
    let config_text = remap(&example, &ports).replace(
        "dir = \"var/weir\"",
        &format!("dir = {:?}", state_dir.display().to_string()),
    );
    assert!(config_text.contains(&state_dir.display().to_string()));
    let config = dir.join("weir.toml");
    std::fs::write(&config, config_text).unwrap();
    let admin = format!("http://127.0.0.1:{}", ports[&9901]);
    let mut stack = Stack {
        dir: dir.clone(),
        config,
        ports,
        admin,
        background: Vec::new(),
        weir_run: None,
        n: 0,
    };

    // `weir state discard` needs weir stopped (it takes the state dir's lock): such
    // commands run after everything else, once `weir run` is stopped.
    let (later, now): (Vec<&Line>, Vec<&Line>) = lines
        .iter()
        .partition(|l| l.words.len() > 2 && l.words[1] == "state" && l.words[2] == "discard");
    let mut ran = 0;
    for line in now.iter().chain(later.iter()) {
        if let Some((_, why)) = ELSEWHERE.iter().find(|(p, _)| line.text.starts_with(p)) {
            eprintln!("readme: elsewhere ({why}): {}", line.text);
            continue;
        }
        assert_eq!(
            line.words[0], "weir",
            "README command under `{}` is neither run here nor listed in ELSEWHERE: {}",
            line.heading, line.text
        );
        // Dropping `weir run` kills it: discard only needs its lock released.
        if later.iter().any(|l| std::ptr::eq(*l, *line)) {
            drop(stack.weir_run.take());
        }
        ran += 1;
        run_line(&mut stack, line);
    }
    assert!(ran > 15, "ran only {ran} README commands");
}

/// What an operator looks at before a command that only applies in some state: wait
/// for that state, as they would wait for `status` to show it.
fn before(stack: &Stack, words: &[String]) {
    if let [_, ctl, promote, service] = words
        && ctl == "ctl"
        && promote == "promote"
    {
        // `promote` passes a pause or a gate; right after `rollout` the plan may still
        // be on its first (percent) step, between steps.
        let path = format!("/api/v1/services/{service}");
        let at_a_pause = eventually(Duration::from_secs(20), || {
            admin_get(&stack.admin, &path).is_some_and(|doc| {
                doc["rollout"]["waiting_for"]
                    .as_str()
                    .is_some_and(|w| w != "next step")
            })
        });
        assert!(
            at_a_pause,
            "{service}'s rollout never reached a pause or gate"
        );
    }
}

fn run_line(stack: &mut Stack, line: &Line) {
    eprintln!("readme: run: {}", line.text);
    before(stack, &line.words);
    let (mut cmd, out, err) = stack.command(&line.words);
    let context = |out: &Path, err: &Path| {
        format!(
            "`{}` (under `{}`)\nstdout:\n{}\nstderr:\n{}",
            line.text,
            line.heading,
            read(out),
            read(err)
        )
    };
    if line.background {
        let child = Running(cmd.spawn().unwrap());
        // A background server is ready when it accepts (upstream, run) — traffic and
        // others when they have said something.
        let sub = line.words.get(1).map(String::as_str);
        let ready = match sub {
            Some("upstream") => {
                let listen = line.words.iter().position(|w| w == "--listen").unwrap();
                let port: u16 = remap(&line.words[listen + 1], &stack.ports)
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                eventually(Duration::from_secs(20), || accepts(port))
            }
            Some("run") => eventually(Duration::from_secs(30), || {
                admin_get(&stack.admin, "/api/v1/services").is_some()
            }),
            _ => eventually(Duration::from_secs(20), || !read(&out).is_empty()),
        };
        assert!(
            ready,
            "background command never became ready: {}",
            context(&out, &err)
        );
        if sub == Some("run") {
            stack.weir_run = Some(child);
        } else {
            stack.background.push((line.text.clone(), child));
        }
        return;
    }
    if runs_until_interrupted(&line.words) {
        let mut child = Running(cmd.spawn().unwrap());
        let spoke = eventually(Duration::from_secs(20), || {
            !read(&out).is_empty() || !read(&err).is_empty()
        });
        let early_exit = child.0.try_wait().unwrap();
        assert!(spoke, "no output from {}", context(&out, &err));
        assert!(
            early_exit.is_none_or(|s| s.success()),
            "{} exited with {early_exit:?}",
            context(&out, &err)
        );
        return;
    }
    let mut child = cmd.spawn().unwrap();
    let code = wait_child(&mut child, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("did not finish in 60 s: {}", context(&out, &err)));
    let expected = EXPECTED_EXIT
        .iter()
        .find(|(p, _)| line.text.starts_with(p))
        .map_or(0, |(_, c)| *c);
    assert_eq!(code, expected, "{}", context(&out, &err));
}
