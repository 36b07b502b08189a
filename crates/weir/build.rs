//! Build script: the revision this build came from, as `WEIR_REVISION` for
//! `model::build` (`weir --version`, `GET /api/v1/version`, `weir ctl status`).
//!
//! It lives in the library rather than the binary because the server reports its own
//! revision in the admin API: one script feeds both, and the library needs no setter.
//!
//! Where it comes from, first match wins:
//! 1. `WEIR_BUILD_REVISION` in the environment: builds without `.git` (the Dockerfile
//!    copies only the sources) pass the revision in;
//! 2. git: `git rev-parse --short HEAD`, with `-dirty` when tracked files differ from
//!    HEAD, but only if this very file is tracked by that repository (so a copy of weir
//!    inside some other project's work tree does not report that project's commit);
//! 3. `unknown`.
//!
//! It reruns when HEAD moves (commit, checkout), when the index changes (`git add`) and
//! when a source file changes (the dirty flag), never on every build: `git status` is
//! run with `--no-optional-locks` so that it does not rewrite the index it watches.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-env-changed=WEIR_BUILD_REVISION");
    let revision = match std::env::var("WEIR_BUILD_REVISION") {
        Ok(r) if !r.trim().is_empty() => r.trim().to_owned(),
        _ => from_git().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo::rustc-env=WEIR_REVISION={revision}");
}

/// `abc1234` or `abc1234-dirty`; `None` without git or outside weir's repository.
fn from_git() -> Option<String> {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    // Watched before anything can fail, so that the answer is looked for again once
    // it may have changed (this file committed, a repository made).
    watch_git(&here);
    // Tracked here means the repository found is weir's own.
    git(&here, &["ls-files", "--error-unmatch", "build.rs"])?;
    let head = git(&here, &["rev-parse", "--short", "HEAD"])?;
    let changes = git(
        &here,
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )?;
    Some(if changes.is_empty() {
        head
    } else {
        format!("{head}-dirty")
    })
}

/// Rerun when HEAD, the branch it points to or the index change, or any source of the
/// workspace (which may make the tree dirty). Paths that do not exist are left out:
/// cargo would rerun the script on every build for them.
fn watch_git(here: &Path) {
    let mut paths = Vec::new();
    for name in ["HEAD", "index", "packed-refs"] {
        if let Some(p) = git(here, &["rev-parse", "--git-path", name]) {
            paths.push(here.join(p));
        }
    }
    if let Some(branch) = git(here, &["symbolic-ref", "-q", "HEAD"])
        && let Some(p) = git(here, &["rev-parse", "--git-path", &branch])
    {
        paths.push(here.join(p));
    }
    if let Some(top) = git(here, &["rev-parse", "--show-toplevel"]) {
        let top = PathBuf::from(top);
        // Sources and manifests only: a directory such as a target dir written by the
        // build itself would make every build rerun this script.
        for dir in [
            "src",
            "crates/weir/src",
            "crates/weir-testkit/src",
            "tests/it",
            "Cargo.toml",
            "Cargo.lock",
            "crates/weir/Cargo.toml",
            "crates/weir-testkit/Cargo.toml",
        ] {
            paths.push(top.join(dir));
        }
    }
    for p in paths.into_iter().filter(|p| p.exists()) {
        println!("cargo::rerun-if-changed={}", p.display());
    }
}

/// One git command's trimmed stdout, `None` if git is missing or the command fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
