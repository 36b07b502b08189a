//! The clock every decision reads: injected, so that the guard, the rollout driver and
//! the health monitor can be tested on tokio's paused time instead of waiting.
//!
//! `SystemTime::now()` is banned elsewhere (clippy's `disallowed-methods`, see
//! `clippy.toml`): a decision that read the wall clock directly could not be tested
//! with simulated time.

use std::fmt;
use std::time::{Instant, SystemTime};

/// Where decision logic gets the time from.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Wall-clock time: event timestamps, rollout deadlines (absolute, so that they
    /// survive a restart).
    fn now(&self) -> SystemTime;
    /// Monotonic time: windows, ejections, check schedules.
    fn instant(&self) -> Instant;
}

/// The machine's clocks: what `weir run` uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place that reads the wall clock
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// Follows tokio's clock, which a test can pause and advance: wall time is the wall time
/// at creation plus the tokio time elapsed since. Monotonic time is tokio's.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> TokioClock {
        TokioClock {
            wall: SystemClock.now(),
            start: tokio::time::Instant::now(),
        }
    }

    /// Starting at a given wall time (tests that need fixed timestamps).
    pub fn starting_at(wall: SystemTime) -> TokioClock {
        TokioClock {
            wall,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }

    fn instant(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::starting_at(SystemTime::UNIX_EPOCH);
        let i0 = clock.instant();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(
            clock.now(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(3600)
        );
        assert_eq!(clock.instant() - i0, Duration::from_secs(3600));
    }
}
