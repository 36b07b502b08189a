//! The `weir` binary: parse the command line, build the runtime, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use weir::config::LogFormat;
use weir_cli::cli::Cli;

/// With the `jemalloc` feature: jemalloc, whose background thread returns freed memory
/// to the system (glibc's malloc keeps what thousands of closed connections used).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format();
    weir_cli::cli::init_logging(log_format);
    // A JSON log stays JSON to its last line, the one saying why weir stopped.
    let fatal = |message: std::fmt::Arguments<'_>| match log_format {
        LogFormat::Json => tracing::error!("{message}"),
        LogFormat::Text => eprintln!("weir: {message}"),
    };
    // One worker means one thread: the current-thread scheduler then saves the work
    // stealing and cross-thread wake-ups of the multi-thread one.
    let mut runtime = match cli.workers() {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            fatal(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(weir_cli::cli::main(cli)) {
        Ok(code) => code,
        Err(e) => {
            fatal(format_args!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
