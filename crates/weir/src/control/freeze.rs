//! Freeze windows (a release checklist's "outside blackout periods"): whether a moment
//! falls in a configured window, and until when. Pure: the controller asks with its
//! injected clock's time, so tests pick the moment.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{FreezeTime, FreezeWindow};

/// A freeze in force: why, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    pub reason: String,
    pub until: SystemTime,
}

impl Frozen {
    /// The refusal text: names the window, its reason and its end.
    pub fn describe(&self) -> String {
        format!(
            "frozen until {} ({})",
            crate::model::timestamp(self.until),
            self.reason
        )
    }
}

/// Consecutive windows are followed this many times to find when a freeze really ends
/// (a Saturday and a Sunday window end on Monday, not at Saturday midnight).
const CHAIN: usize = 16;

/// The freeze in force at `now`, if any, among `windows`.
pub fn active<'a>(
    windows: impl Iterator<Item = &'a FreezeWindow> + Clone,
    now: SystemTime,
) -> Option<Frozen> {
    let (first, mut until) = windows
        .clone()
        .filter_map(|w| end_of(w, now).map(|end| (w, end)))
        .max_by_key(|(_, end)| *end)?;
    // A window that starts the moment another ends extends the freeze.
    for _ in 0..CHAIN {
        match windows.clone().filter_map(|w| end_of(w, until)).max() {
            Some(later) if later > until => until = later,
            _ => break,
        }
    }
    Some(Frozen {
        reason: first.reason.clone(),
        until,
    })
}

/// When `w` ends, if `now` falls in it.
fn end_of(w: &FreezeWindow, now: SystemTime) -> Option<SystemTime> {
    match &w.when {
        FreezeTime::Absolute { start, end } => (now >= *start && now < *end).then_some(*end),
        FreezeTime::Weekly {
            days,
            from,
            to,
            offset_secs,
        } => {
            let secs = now.duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
            let local = secs + i64::from(*offset_secs);
            let day = local.div_euclid(86_400);
            // 1970-01-01 was a Thursday; Monday is 0.
            let weekday = (day + 3).rem_euclid(7) as usize;
            let second_of_day = local.rem_euclid(86_400);
            let (from, to) = (i64::from(*from) * 60, i64::from(*to) * 60);
            if !days[weekday] || second_of_day < from || second_of_day >= to {
                return None;
            }
            let end = day * 86_400 + to - i64::from(*offset_secs);
            Some(UNIX_EPOCH + Duration::from_secs(end.max(0) as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    fn windows(toml: &str) -> Vec<FreezeWindow> {
        let src = format!(
            "{toml}\n[[service]]\nname = \"a\"\nbaseline = \"s\"\n[service.pools.s]\nendpoints = [\"127.0.0.1:1\"]\nweight = 1\n"
        );
        crate::config::Config::parse(&src, "t.toml").unwrap().freeze
    }

    #[test]
    fn absolute_window_covers_start_not_end() {
        let w = windows(
            "[[freeze]]\nstart = \"2026-12-24T00:00:00Z\"\nend = \"2026-12-27T00:00:00Z\"\nreason = \"holidays\"",
        );
        assert_eq!(active(w.iter(), at("2026-12-23T23:59:59Z")), None);
        let f = active(w.iter(), at("2026-12-24T00:00:00Z")).unwrap();
        assert_eq!(f.until, at("2026-12-27T00:00:00Z"));
        assert_eq!(f.reason, "holidays");
        assert!(
            f.describe().contains("2026-12-27T00:00:00"),
            "{}",
            f.describe()
        );
        assert_eq!(active(w.iter(), at("2026-12-27T00:00:00Z")), None);
    }

    #[test]
    fn weekend_windows_chain_into_monday() {
        // 2026-12-05 is a Saturday.
        let w = windows(
            "[[freeze]]\ndays = [\"sat\"]\nreason = \"weekend\"\n[[freeze]]\ndays = [\"sunday\"]\nreason = \"weekend\"",
        );
        assert_eq!(active(w.iter(), at("2026-12-04T23:00:00Z")), None);
        let f = active(w.iter(), at("2026-12-05T10:00:00Z")).unwrap();
        assert_eq!(f.until, at("2026-12-07T00:00:00Z"));
        assert_eq!(active(w.iter(), at("2026-12-07T00:00:00Z")), None);
    }

    #[test]
    fn weekly_hours_in_a_fixed_offset() {
        // Fridays 16:00-24:00 at +02:00 is 14:00-22:00 UTC; 2026-12-04 is a Friday.
        let w = windows(
            "[[freeze]]\ndays = [\"fri\"]\nfrom = \"16:00\"\nto = \"24:00\"\ntimezone = \"+02:00\"",
        );
        assert_eq!(active(w.iter(), at("2026-12-04T13:59:00Z")), None);
        let f = active(w.iter(), at("2026-12-04T14:00:00Z")).unwrap();
        assert_eq!(f.until, at("2026-12-04T22:00:00Z"));
        assert_eq!(f.reason, "freeze window");
        assert_eq!(
            active(w.iter(), at("2026-12-11T21:59:00Z")).unwrap().until,
            at("2026-12-11T22:00:00Z")
        );
        assert_eq!(active(w.iter(), at("2026-12-05T14:00:00Z")), None);
    }
}
