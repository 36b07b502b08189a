//! weir: an L7 traffic-splitting reverse proxy with progressive delivery built in.
//!
//! Component map (see `../shared/design/DESIGN.md`):
//!
//! ```text
//!  data plane (hot, lock-free)                      control plane (cold, one writer)
//!  proxy ─► routing (Host → service,               control::Controller ◄─ admin, guard,
//!           ArcSwap<ServiceSnapshot> → pool)              │                  rollout, reload
//!        ─► pool (endpoint by P2C) ─► upstream            └─► builds + swaps snapshots
//!        ─► outcome (one per request) ─► sinks
//! ```
//!
//! - [`config`]: TOML → validated [`config::Config`], errors with key path and line.
//! - [`routing`]: route table, immutable service snapshots, weighted pool choice.
//! - [`pool`]: endpoints of a pool, in-flight counts, power-of-two-choices.
//! - [`proxy`]: accept, forward, header rewriting, error mapping, outcomes.
//! - [`outcome`]: the per-request record metrics and the guard consume.
//! - [`control`]: the controller, the only writer of routing state.
//! - [`upstream`]: the built-in test and demo backend with fault injection.
//! - [`cli`]: the `weir` command line.

pub mod cli;
pub mod config;
pub mod control;
pub mod outcome;
pub mod pool;
pub mod proxy;
pub mod routing;
pub mod upstream;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::control::Controller;
use crate::outcome::{LogSink, OutcomeSink};
use crate::proxy::Proxy;

/// A configured weir instance, ready to serve. Built from a validated config; tests and
/// the binary alike bind their own listener and call [`Weir::serve`].
#[derive(Debug)]
pub struct Weir {
    config: Config,
    controller: Arc<Controller>,
    proxy: Arc<Proxy>,
}

impl Weir {
    pub fn new(config: Config) -> Weir {
        Weir::with_sinks(config, Vec::new())
    }

    /// Build with extra outcome sinks (besides the debug log).
    pub fn with_sinks(config: Config, extra: Vec<Arc<dyn OutcomeSink>>) -> Weir {
        let controller = Arc::new(Controller::new(&config));
        let mut sinks: Vec<Arc<dyn OutcomeSink>> = vec![Arc::new(LogSink)];
        sinks.extend(extra);
        let proxy = Arc::new(Proxy::new(
            &config.proxy,
            Arc::clone(controller.router()),
            sinks,
        ));
        Weir {
            config,
            controller,
            proxy,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The controller: the one way to change weights at run time.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    /// Serve proxy traffic on `listener` until `shutdown` resolves; then stop accepting
    /// and give open requests `grace` to finish.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> io::Result<()> {
        Arc::clone(&self.proxy)
            .serve(listener, shutdown, grace)
            .await
    }
}
