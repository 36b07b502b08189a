//! Shell completions and man pages, generated from the clap definition of the command
//! line (`cli::Cli`, `ctl::CtlArgs` under it), so they can never describe flags that
//! the binary does not have. `weir completions SHELL` and `weir man` print them; the
//! .deb build writes them with `weir man --dir` (scripts/deb-smoke.sh).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// The command tree as the pages and scripts describe it. clap's implicit `help`
/// subcommand is left out: it is a way to read these very pages, not a command.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// The completion script for `shell`, for `weir` and every subcommand.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut command(), "weir", out);
}

/// The roff source of weir(1): synopsis, options and one entry per subcommand, each of
/// which has its own page (`weir-ctl(1)`, `weir-ctl-status(1)`, ...) from [`man_pages`].
pub fn man(out: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(command()).render(out)
}

/// Write weir.1 and a page for every subcommand at any depth (`weir-ctl-status.1`)
/// into `dir`, created if missing; answers the files written, the main page first.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(command(), dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    let page = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(page.get_filename());
    let mut text = Vec::new();
    page.render(&mut text)?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    Ok(())
}
