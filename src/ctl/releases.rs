//! `weir ctl` for releases and CI: the `history` table, the versions line of `status`,
//! the default actor, and `status SERVICE --wait`, which polls the service (as
//! `--watch` does) until its rollout ends and says so in its exit code, like
//! `kubectl argo rollouts status --timeout`: 0 promoted, 1 degraded or aborted (with
//! why), 2 when `--timeout` passes first. A service with no rollout running reports how
//! the last one ended instead of waiting for one that may never start.

use std::future::Future;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use weir::api::{self, Phase, ReleaseOutcome, RolloutDoc, ServiceDoc};

use super::{AdminClient, Align, CtlError, WATCH_INTERVAL, rollout_line, write_table};

/// Exit code of `status --wait` when the rollout ended degraded or aborted.
const EXIT_FAILED: u8 = 1;
/// Exit code of `status --wait` when `--timeout` passed (or it was interrupted) first.
const EXIT_TIMEOUT: u8 = 2;

/// `$USER@hostname`, what the journal records as the actor unless `--actor` says.
pub fn default_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    match host {
        Some(host) => format!("{user}@{host}"),
        None => user,
    }
}

/// `shop: running stable=v1.4.1 canary=v1.4.2` under the status table, when any pool has
/// a version label.
pub fn versions_line(s: &ServiceDoc) -> Option<String> {
    if s.pools.iter().all(|p| p.version.is_none()) {
        return None;
    }
    let pools: Vec<String> = s
        .pools
        .iter()
        .map(|p| format!("{}={}", p.name, p.version.as_deref().unwrap_or("-")))
        .collect();
    Some(format!("{}: running {}", s.name, pools.join(" ")))
}

/// The history table, oldest first, one row per revision.
pub fn write_history(out: &mut impl Write, doc: &api::HistoryDoc) -> io::Result<()> {
    if doc.releases.is_empty() {
        return writeln!(out, "{}: no releases yet", doc.service);
    }
    let rows: Vec<Vec<String>> = doc
        .releases
        .iter()
        .map(|r| {
            vec![
                r.revision.to_string(),
                r.version.clone().unwrap_or_else(|| "-".into()),
                r.pool.clone(),
                r.endpoints.join(","),
                r.started_at.clone(),
                r.ended_at.clone().unwrap_or_else(|| "-".into()),
                r.outcome
                    .map_or("running", ReleaseOutcome::as_str)
                    .to_owned(),
                r.actor.clone().unwrap_or_else(|| "-".into()),
                // Quoted and escaped: it may carry text from a request.
                r.reason
                    .as_ref()
                    .map_or_else(|| "-".into(), |s| format!("{s:?}")),
            ]
        })
        .collect();
    write_table(
        out,
        &[
            ("REV", Align::Right),
            ("VERSION", Align::Left),
            ("POOL", Align::Left),
            ("ENDPOINTS", Align::Left),
            ("STARTED", Align::Left),
            ("ENDED", Align::Left),
            ("OUTCOME", Align::Left),
            ("ACTOR", Align::Left),
            ("REASON", Align::Left),
        ],
        &rows,
    )
}

/// How a finished (or absent) rollout reads, and the exit code it means.
fn verdict(s: &ServiceDoc, newest: Option<&api::Release>) -> Option<(u8, String)> {
    let name = &s.name;
    let release = newest
        .and_then(|r| r.version.as_ref().map(|v| (r.revision, v)))
        .map_or_else(String::new, |(n, v)| {
            format!(" (revision {n}, version {v})")
        });
    let why = |fallback: &str| {
        newest
            .and_then(|r| r.reason.clone())
            .unwrap_or_else(|| fallback.to_owned())
    };
    match s.rollout.phase() {
        Phase::Progressing | Phase::Paused => None,
        Phase::Promoted => Some((0, format!("{name}: rollout promoted{release}"))),
        Phase::Idle => Some((
            0,
            format!("{name}: no rollout has run; nothing to wait for"),
        )),
        Phase::Degraded => {
            let reason = s
                .guard
                .degraded_reason
                .clone()
                .unwrap_or_else(|| why("the SLO guard reverted it"));
            Some((
                EXIT_FAILED,
                format!("{name}: rollout degraded{release}: {reason}"),
            ))
        }
        Phase::Aborted => Some((
            EXIT_FAILED,
            format!(
                "{name}: rollout aborted{release}: {}",
                why("aborted by an operator")
            ),
        )),
    }
}

/// `status SERVICE --wait [--timeout D]`: see the module's note. A failure of the first
/// poll ends it like any other command (exit 1); later ones are printed and retried, so
/// a weir restart in the middle of a rollout does not fail a pipeline.
pub async fn wait(
    client: &AdminClient,
    service: &str,
    timeout: Option<Duration>,
    json: bool,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<ExitCode, CtlError> {
    tokio::pin!(stop);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last_line = String::new();
    let mut first = true;
    loop {
        match client.service(service).await {
            Ok(reply) => {
                let doc = reply.doc()?;
                // The newest history entry names the release and why it ended.
                let history = match &doc.rollout {
                    RolloutDoc::Started(r) if !r.phase.is_running() => client
                        .history(service)
                        .await
                        .ok()
                        .and_then(|h| h.doc().ok()),
                    _ => None,
                };
                let newest = history.as_ref().and_then(|h| h.releases.last());
                let line = rollout_line(&doc).unwrap_or_else(|| format!("{service}: idle"));
                if line != last_line {
                    if json {
                        writeln!(out, "{}", reply.json)?;
                    } else {
                        writeln!(out, "{line}")?;
                    }
                    out.flush()?;
                    last_line = line;
                }
                if let Some((code, message)) = verdict(&doc, newest) {
                    if !json {
                        writeln!(out, "{message}")?;
                    }
                    return Ok(ExitCode::from(code));
                }
            }
            Err(e) if first => return Err(e),
            Err(e) => {
                writeln!(out, "weir ctl: {e}; retrying")?;
                last_line.clear();
            }
        }
        first = false;
        let pause = tokio::time::sleep(WATCH_INTERVAL);
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = pause => {}
            () = expired => {
                let after = timeout.map_or_else(String::new, |t| {
                    format!(" after {}", humantime::format_duration(t))
                });
                writeln!(out, "{service}: timed out{after}; the rollout is still running")?;
                return Ok(ExitCode::from(EXIT_TIMEOUT));
            }
            () = &mut stop => {
                writeln!(out, "{service}: interrupted; the rollout is still running")?;
                return Ok(ExitCode::from(EXIT_TIMEOUT));
            }
        }
    }
}
