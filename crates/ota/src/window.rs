//! Maintenance windows: the daily hours in a time zone when devices may install an update they
//! downloaded at once. A window may wrap midnight (`22:00`–`02:00`); its times are the wall
//! clock of its time zone, so it follows daylight-saving changes.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::deploy::DeployError;

/// A daily window, as a deployment is given it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// When it opens, `HH:MM` (24-hour) on the zone's wall clock.
    pub start: String,
    /// When it closes, `HH:MM`; before `start` means the next day.
    pub end: String,
    /// An IANA time zone, e.g. `Europe/Berlin` (default `UTC`).
    #[serde(default = "utc")]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".into()
}

/// One opening of a window, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    /// When it opens.
    pub start: DateTime<Utc>,
    /// When it closes.
    pub end: DateTime<Utc>,
}

/// A window checked once: its times and zone parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: NaiveTime,
    end: NaiveTime,
    zone: Tz,
}

fn invalid(field: &'static str, code: &'static str, message: &str) -> DeployError {
    DeployError::Invalid(field, code, message.to_owned())
}

fn clock_time(field: &'static str, text: &str) -> Result<NaiveTime, DeployError> {
    let bad = || invalid(field, "invalid_format", "a time is HH:MM, 00:00 to 23:59");
    if text.len() != 5 {
        return Err(bad());
    }
    NaiveTime::parse_from_str(text, "%H:%M").map_err(|_| bad())
}

impl Window {
    /// Checks a window: both times `HH:MM`, different, and a known time zone.
    pub fn parse(window: &MaintenanceWindow) -> Result<Self, DeployError> {
        let start = clock_time("/maintenance_window/start", &window.start)?;
        let end = clock_time("/maintenance_window/end", &window.end)?;
        if start == end {
            return Err(invalid(
                "/maintenance_window/end",
                "out_of_range",
                "a window ends at another time than it starts",
            ));
        }
        let zone: Tz = window.time_zone.parse().map_err(|_| {
            invalid(
                "/maintenance_window/time_zone",
                "unknown_time_zone",
                "the time zone is an IANA name such as Europe/Berlin",
            )
        })?;
        Ok(Self { start, end, zone })
    }

    /// The zone's wall-clock time `at` on `day` in UTC: in a daylight-saving gap, the first
    /// minute after it; in an overlap, the earlier one.
    fn instant(&self, day: NaiveDate, at: NaiveTime) -> DateTime<Utc> {
        let mut local = day.and_time(at);
        // Gaps are whole minutes, at most a few hours long.
        for _ in 0..=240 {
            if let Some(t) = self.zone.from_local_datetime(&local).earliest() {
                return t.with_timezone(&Utc);
            }
            local += Duration::minutes(1);
        }
        // No zone has a gap longer than two hours; fall back to reading it as UTC.
        Utc.from_utc_datetime(&day.and_time(at))
    }

    /// The opening that is open at `now`, or the next one.
    pub fn next_opening(&self, now: DateTime<Utc>) -> Opening {
        let today = now.with_timezone(&self.zone).date_naive();
        let wraps = self.end < self.start;
        // An opening that began yesterday may still be open (a window past midnight).
        let mut day = today.pred_opt().unwrap_or(today);
        loop {
            let start = self.instant(day, self.start);
            let end_day = if wraps {
                day.succ_opt().unwrap_or(day)
            } else {
                day
            };
            let end = self.instant(end_day, self.end);
            if end > now && end > start {
                return Opening { start, end };
            }
            match day.succ_opt() {
                Some(next) if next <= today + Duration::days(2) => day = next,
                _ => return Opening { start, end },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, end: &str, zone: &str) -> Window {
        Window::parse(&MaintenanceWindow {
            start: start.into(),
            end: end.into(),
            time_zone: zone.into(),
        })
        .unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn windows_are_checked() {
        for (start, end, zone, field) in [
            ("2:00", "04:00", "UTC", "/maintenance_window/start"),
            ("02:00", "24:00", "UTC", "/maintenance_window/end"),
            ("02:00", "02:00", "UTC", "/maintenance_window/end"),
            (
                "02:00",
                "04:00",
                "Mars/Olympus",
                "/maintenance_window/time_zone",
            ),
            ("02:00:00", "04:00", "UTC", "/maintenance_window/start"),
        ] {
            let refused = Window::parse(&MaintenanceWindow {
                start: start.into(),
                end: end.into(),
                time_zone: zone.into(),
            });
            match refused {
                Err(DeployError::Invalid(f, _, _)) => assert_eq!(f, field, "{start}-{end} {zone}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_next_opening_is_today_tomorrow_or_the_one_open_now() {
        let w = window("02:00", "04:00", "UTC");
        // Before it opens today, while open, after it closed.
        assert_eq!(
            w.next_opening(at("2026-03-10T01:00:00Z")),
            Opening {
                start: at("2026-03-10T02:00:00Z"),
                end: at("2026-03-10T04:00:00Z")
            }
        );
        assert_eq!(
            w.next_opening(at("2026-03-10T03:00:00Z")).start,
            at("2026-03-10T02:00:00Z")
        );
        assert_eq!(
            w.next_opening(at("2026-03-10T04:00:00Z")).start,
            at("2026-03-11T02:00:00Z")
        );
    }

    #[test]
    fn a_window_past_midnight_is_open_on_both_sides_of_it() {
        let w = window("22:00", "02:00", "UTC");
        assert_eq!(
            w.next_opening(at("2026-03-11T01:00:00Z")),
            Opening {
                start: at("2026-03-10T22:00:00Z"),
                end: at("2026-03-11T02:00:00Z")
            }
        );
        assert_eq!(
            w.next_opening(at("2026-03-11T12:00:00Z")).start,
            at("2026-03-11T22:00:00Z")
        );
    }

    #[test]
    fn windows_follow_the_zone_and_its_daylight_saving() {
        let w = window("02:30", "04:00", "Europe/Berlin");
        // Winter: UTC+1.
        assert_eq!(
            w.next_opening(at("2026-03-20T12:00:00Z")).start,
            at("2026-03-21T01:30:00Z")
        );
        // 2026-03-29 02:30 does not exist in Berlin (02:00 → 03:00): the window opens at 03:00
        // local, 01:00 UTC, and closes at 04:00 local (UTC+2).
        assert_eq!(
            w.next_opening(at("2026-03-28T12:00:00Z")),
            Opening {
                start: at("2026-03-29T01:00:00Z"),
                end: at("2026-03-29T02:00:00Z")
            }
        );
        // 02:15 in the gap opens at 03:00 too, not half an hour later.
        let quarter = window("02:15", "03:05", "Europe/Berlin");
        assert_eq!(
            quarter.next_opening(at("2026-03-28T12:00:00Z")),
            Opening {
                start: at("2026-03-29T01:00:00Z"),
                end: at("2026-03-29T01:05:00Z")
            }
        );
        // Summer: UTC+2.
        assert_eq!(
            w.next_opening(at("2026-06-01T12:00:00Z")).start,
            at("2026-06-02T00:30:00Z")
        );
    }
}
