//! The `weir` command line: `run`, `check`, `state`, `upstream`, `demo`, ... Parsing and wiring only;
//! everything it does is a library call.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::signal::shutdown_signal;
use weir::Weir;
use weir::config::{Config, LogFormat, parse_duration};
use weir::state::{self, StateLock};
use weir_testkit::{self as upstream, UpstreamConfig};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Traffic-splitting reverse proxy with progressive delivery"
)]
pub struct Cli {
    /// weir's own log on stderr: `text` (coloured only on a terminal, never with
    /// NO_COLOR set) or `json` (one object per line). Wins over `[log] format`.
    #[arg(
        long,
        global = true,
        env = "WEIR_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run {
        /// Config file (TOML).
        #[arg(long, short, default_value = "config/weir.toml")]
        config: PathBuf,
    },
    /// Validate a config file and everything `weir run` would refuse to start on
    /// (certificate, key and CA files, the admin token, the saved state): print every
    /// problem, or a one-line summary.
    Check {
        #[arg(long, short, default_value = "config/weir.toml")]
        config: PathBuf,
    },
    /// The state directory (`[state] dir`) of a weir that is not running.
    #[command(subcommand)]
    State(StateCommand),
    /// A small fast HTTP backend for tests and demos, with fault injection.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        /// Name reported in the `x-upstream` header and the body.
        #[arg(long, default_value = "upstream")]
        name: String,
        /// Probability (0..1) of answering 500.
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
        error_rate: f64,
        /// Delay added to every response, e.g. "100ms".
        #[arg(long, value_parser = parse_delay)]
        latency: Option<Duration>,
        /// Uniform jitter around the delay, e.g. "20ms".
        #[arg(long, value_parser = parse_delay)]
        latency_jitter: Option<Duration>,
    },
    /// Talk to a running weir through its admin API.
    Ctl(crate::ctl::CtlArgs),
    /// The product tour: a narrated canary rollout over synthetic traffic.
    Demo(crate::demo::DemoOptions),
    /// Steady synthetic load through a proxy, counted by answering pool each second.
    Traffic(crate::traffic::TrafficOptions),
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Move an unusable state file aside so that weir starts from the config's
    /// weights. The file is renamed to `state.json.discarded-<UTC time>` in the same
    /// directory, never deleted. Refused while a weir runs on the directory.
    Discard {
        #[arg(long, short, default_value = "config/weir.toml")]
        config: PathBuf,
    },
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a probability between 0 and 1")),
    }
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

impl Cli {
    /// Worker threads the runtime should have for this command (0 = one per CPU).
    pub fn workers(&self) -> usize {
        match &self.command {
            Command::Run { config } => Config::load(config).map_or(0, |c| c.proxy.workers),
            _ => 0,
        }
    }
}

impl Cli {
    /// The log format: `--log-format`, else `WEIR_LOG_FORMAT` (clap reads both), else
    /// `[log] format` of the config `weir run` is given, else text.
    pub fn log_format(&self) -> LogFormat {
        match (self.log_format, &self.command) {
            (Some(LogFormatArg::Json), _) => LogFormat::Json,
            (Some(LogFormatArg::Text), _) => LogFormat::Text,
            // An unreadable config is reported by `run` itself, in the default format.
            (None, Command::Run { config }) => {
                Config::load(config).map_or(LogFormat::Text, |c| c.log.format)
            }
            (None, _) => LogFormat::Text,
        }
    }
}

/// Set up weir's own log, on stderr, in `format`. `RUST_LOG` filters it as usual
/// (default `weir=info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "weir=info".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Fields at the top level (`message`, `service`, …) next to `timestamp`,
        // `level` and `target`: what log shippers index without a nested path.
        LogFormat::Json => log.json().flatten_event(true).with_ansi(false).init(),
        LogFormat::Text => log
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .init(),
    }
}

/// Colour only for a person at a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (https://no-color.org).
pub fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Run a parsed command to completion.
pub async fn main(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check { config } => Ok(check(&config)),
        Command::State(StateCommand::Discard { config }) => {
            let config = Config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let lock = StateLock::acquire(&config.state.dir)?;
            match state::discard(&lock, weir::model::Clock::now(&weir::model::SystemClock))? {
                Some(aside) => println!(
                    "moved {} aside to {}; the next start uses the config's weights",
                    config.state.dir.join(state::STATE_FILE).display(),
                    aside.display()
                ),
                None => println!(
                    "no state file in {}; nothing to discard",
                    config.state.dir.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config: path } => {
            let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            run(config, path).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Upstream {
            listen,
            name,
            error_rate,
            latency,
            latency_jitter,
        } => {
            let cfg = UpstreamConfig {
                name,
                error_rate,
                latency: latency.unwrap_or_default(),
                latency_jitter: latency_jitter.unwrap_or_default(),
            };
            let handle = upstream::bind(listen, cfg)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!(
                "weir upstream `{}` listening on {}",
                handle.name(),
                handle.addr()
            );
            shutdown_signal().await;
            handle.kill().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl(args) => crate::ctl::run(args).await,
        Command::Demo(opts) => {
            crate::demo::run(opts, &mut std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Traffic(opts) => {
            crate::traffic::run(opts, &mut std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let (config, mut problems) = match Config::load(path) {
        Ok(c) => (c, Vec::new()),
        Err(e) => {
            // Without a valid config, the files it names cannot be trusted to be the
            // right ones: report the config's own problems only.
            eprintln!("{e}");
            eprintln!("{}: {} problem(s)", path.display(), e.problems.len());
            return ExitCode::FAILURE;
        }
    };
    problems.extend(weir::preflight(&config));
    problems.extend(weir::check_state(&config));
    if problems.is_empty() {
        println!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("{}: {p}", path.display());
    }
    eprintln!("{}: {} problem(s)", path.display(), problems.len());
    ExitCode::FAILURE
}

async fn run(config: Config, path: PathBuf) -> Result<()> {
    let listen = config.proxy.listen;
    let admin_listen = config.admin.listen;
    let weir_tls_listen = config.proxy.tls.as_ref().map(|t| t.listen);
    // Order matters. The state directory's lock comes first, so that a second weir on
    // the same directory is refused by the first one's pid rather than by a port
    // clash; the listeners next, so that a start that cannot bind has written nothing;
    // only then are the state read and start-up records written.
    let lock = StateLock::acquire(&config.state.dir)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (proxy.listen)"))?;
    let admin = TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("cannot listen on {admin_listen} (admin.listen)"))?;
    let tls = match &weir_tls_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (proxy.tls_listen)"))?,
        ),
        None => None,
    };
    let weir = Weir::with_lock(config, Some(path.clone()), lock)?;
    reload_on_sighup(&weir, path);
    tracing::info!(
        "weir {} serving on {listen}, admin on {admin_listen}",
        env!("CARGO_PKG_VERSION")
    );
    weir.serve_all(listener, tls, Some(admin), shutdown_signal())
        .await?;
    tracing::info!("weir stopped");
    Ok(())
}

/// SIGHUP re-reads the config file, exactly like `POST /api/v1/reload`.
fn reload_on_sighup(weir: &Weir, path: PathBuf) {
    #[cfg(unix)]
    {
        let controller = std::sync::Arc::clone(weir.controller());
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; reload through the admin API");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let controller = std::sync::Arc::clone(&controller);
                let path = path.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    weir::reload(&controller, &path, Some("SIGHUP".into()))
                })
                .await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (weir, path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        // NO_COLOR set to the empty string counts as unset (no-color.org).
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(true, Some("0".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn log_format_flag_wins_over_the_config() {
        let dir = std::env::temp_dir().join(format!("weir-cli-logfmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weir.toml");
        std::fs::write(
            &path,
            "[log]\nformat = \"json\"\n[[service]]\nname = \"a\"\nbaseline = \"b\"\n\
             [service.pools.b]\nendpoints = [\"127.0.0.1:1\"]\nweight = 1\n",
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap().log_format();
        assert_eq!(parse(&["weir", "run", "-c", config]), LogFormat::Json);
        assert_eq!(
            parse(&["weir", "run", "-c", config, "--log-format", "text"]),
            LogFormat::Text
        );
        assert_eq!(
            parse(&["weir", "--log-format", "json", "check", "-c", config]),
            LogFormat::Json
        );
        assert_eq!(parse(&["weir", "check", "-c", config]), LogFormat::Text);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
