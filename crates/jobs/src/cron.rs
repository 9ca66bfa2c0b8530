//! Cron schedules: a job of a registered kind enqueued at every tick of a standard five-field
//! cron expression read in an IANA time zone, once across every node.
//!
//! Expressions are parsed by `croner` (POSIX/Vixie semantics: a day of month and a day of week
//! that are both restricted match either; daylight saving time handled by the crate, so that a
//! fixed time inside a spring-forward gap runs at the first instant after it, and one in an
//! autumn overlap runs once), after a check here that they are the standard five fields and
//! nothing else: no seconds or years, no `@daily`, no `L`, `W`, `#` or `?`.
//!
//! Every node that runs workers runs the scheduler loop: it keeps the schedules in memory
//! (read again every [`REREAD`], after any tick it claims, and at once after a change on this
//! node), looks at the clock every `poll_interval`, and claims each due tick in the store,
//! which moves the schedule's next tick with a compare-and-set and enqueues the tick's job in
//! the same transaction (see `unhidra_store::cron`). A tick whose next tick has also passed
//! was missed (every node was down): `once` enqueues one job, for the latest tick missed;
//! `skip` enqueues none; both go on from the next tick to come.

use std::collections::{BTreeSet, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use tokio::sync::{Notify, watch};
use unhidra_store::cron::{CronSchedule, NewCronSchedule, TickClaim};
use unhidra_store::jobs::{JobState, NewJob, UniqueStates};

pub use unhidra_store::cron::CatchUp;

use crate::{EnqueueOptions, Jobs, JobsError, valid_name};

/// The longest schedule name, in bytes (the name is part of each tick's unique key).
pub const MAX_CRON_NAME: usize = 100;

/// The longest expression, in bytes.
const MAX_EXPRESSION: usize = 200;

/// How long the scheduler of a node goes without reading the schedules again: how soon it
/// sees a schedule that another node stored.
pub const REREAD: Duration = Duration::from_secs(60);

/// A checked five-field cron expression in its time zone: the ticks of a schedule.
#[derive(Debug, Clone)]
pub struct CronExpr {
    cron: croner::Cron,
    zone: Tz,
}

impl CronExpr {
    /// Parses `expression` (five fields: minute, hour, day of month, month, day of week; each
    /// `*`, numbers, ranges, lists and steps, months and days also as `JAN` and `MON`) read in
    /// the IANA time zone `time_zone`. Refused: other forms (`invalid_cron` on `expression`),
    /// an expression that never matches a date (`30 2 *`: February has no 30th), and an
    /// unknown time zone (`unknown_time_zone` on `time_zone`).
    pub fn parse(expression: &str, time_zone: &str) -> Result<Self, JobsError> {
        let invalid = |why: String| JobsError::Invalid("expression", "invalid_cron", why);
        if expression.len() > MAX_EXPRESSION {
            return Err(invalid(format!(
                "a cron expression has at most {MAX_EXPRESSION} bytes"
            )));
        }
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(invalid(
                "a cron expression has five fields: minute, hour, day of month, month and day \
                 of week (no seconds, years or @-names)"
                    .to_owned(),
            ));
        }
        for (field, text) in FIELDS.iter().zip(&fields) {
            if !standard_field(text, field.names) {
                return Err(invalid(format!(
                    "{text:?} is not a standard {} field: use *, numbers, ranges (1-5), lists \
                     (1,3) and steps (*/15, 1-30/2){}",
                    field.name,
                    if field.names.is_empty() {
                        ""
                    } else {
                        ", or names (JAN, MON)"
                    }
                )));
            }
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(&fields.join(" "))
            .map_err(|e| invalid(format!("{expression:?} is not a cron expression: {e}")))?;
        let zone = Tz::from_str(time_zone).map_err(|_| {
            JobsError::Invalid(
                "time_zone",
                "unknown_time_zone",
                format!("{time_zone:?} is not an IANA time zone such as UTC or Europe/Berlin"),
            )
        })?;
        let parsed = Self { cron, zone };
        // Ticks are searched up to the year 5000: an expression without one never matches.
        let start = DateTime::from_timestamp(0, 0).unwrap_or_default();
        if parsed.next_after(start).is_none() {
            return Err(invalid(format!("{expression:?} never matches a date")));
        }
        Ok(parsed)
    }

    /// The first tick after `t` (strictly), if there is one.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.zone), false)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }

    /// The last tick at or before `t`, if there is one.
    pub fn latest_until(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.zone), true)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }
}

/// One field of an expression: its name, and the names its values may have.
struct Field {
    name: &'static str,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        names: &[],
    },
    Field {
        name: "hour",
        names: &[],
    },
    Field {
        name: "day-of-month",
        names: &[],
    },
    Field {
        name: "month",
        names: &[
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ],
    },
    Field {
        name: "day-of-week",
        names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    },
];

/// Whether `text` is a field of the standard grammar: a comma-separated list of `*`, a value
/// or a range of two, each optionally `/step` (after `*` or a range only). Values are numbers,
/// or `names` in any case; whether they are in range is croner's to say.
fn standard_field(text: &str, names: &[&str]) -> bool {
    let value = |v: &str| {
        (!v.is_empty() && v.len() <= 2 && v.bytes().all(|b| b.is_ascii_digit()))
            || names.iter().any(|n| n.eq_ignore_ascii_case(v))
    };
    text.split(',').all(|item| {
        let (base, step) = match item.split_once('/') {
            Some((base, step)) => (base, Some(step)),
            None => (item, None),
        };
        let ranged = match base.split_once('-') {
            _ if base == "*" => true,
            Some((from, to)) => value(from) && value(to),
            None if value(base) => false,
            None => return false,
        };
        match step {
            None => true,
            Some(step) => {
                ranged
                    && !step.is_empty()
                    && step.len() <= 2
                    && step.bytes().all(|b| b.is_ascii_digit())
            }
        }
    })
}

/// A schedule as an operator or the configuration gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct CronSpec {
    /// Its name: 1 to [`MAX_CRON_NAME`] bytes of ASCII letters, digits, `.`, `_` and `-`.
    pub name: String,
    /// The five-field cron expression.
    pub expression: String,
    /// The IANA time zone the expression is read in.
    pub time_zone: String,
    /// The registered job kind each tick enqueues.
    pub kind: String,
    /// The payload of each tick's job.
    pub payload: serde_json::Value,
    /// What to do with ticks missed while no node ran it.
    pub catch_up: CatchUp,
    /// Whether it ticks.
    pub enabled: bool,
}

/// This node's side of the cron schedules, held by [`Jobs`].
#[derive(Debug, Default)]
pub(crate) struct CronState {
    /// Wakes this node's scheduler to read the schedules again (one changed here).
    wake: Notify,
    /// The schedules this node's configuration defines, which the API may not change.
    configured: Mutex<BTreeSet<String>>,
}

impl Jobs {
    /// Stores a schedule (replacing the one of the same name) after checking it all — name,
    /// expression, time zone, kind and payload — so that nothing is stored when it is
    /// refused; answers it as stored and whether it is new. A schedule of the configuration
    /// is refused ([`JobsError::Configured`]): the configuration wins for names it defines.
    pub async fn put_cron(&self, spec: &CronSpec) -> Result<(CronSchedule, bool), JobsError> {
        self.refuse_configured(&spec.name)?;
        self.store_cron(spec).await
    }

    /// Stores a schedule of this node's configuration, as [`Self::put_cron`] does, and keeps
    /// the API from changing it. Storing the same schedule at every start keeps its ticks.
    pub async fn put_configured_cron(&self, spec: &CronSpec) -> Result<CronSchedule, JobsError> {
        let (stored, _) = self.store_cron(spec).await?;
        self.cron
            .configured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(spec.name.clone());
        Ok(stored)
    }

    /// Every schedule, by name.
    pub async fn cron_schedules(&self) -> Result<Vec<CronSchedule>, JobsError> {
        Ok(self.store.cron_schedules().await?)
    }

    /// Deletes a schedule (the jobs it enqueued stay); [`JobsError::NotFound`] if there is
    /// none, [`JobsError::Configured`] for one of the configuration.
    pub async fn delete_cron(&self, name: &str) -> Result<(), JobsError> {
        if !valid_cron_name(name) {
            return Err(JobsError::NotFound);
        }
        self.refuse_configured(name)?;
        self.store.delete_cron_schedule(name).await?;
        self.cron.wake.notify_one();
        Ok(())
    }

    fn refuse_configured(&self, name: &str) -> Result<(), JobsError> {
        let configured = self
            .cron
            .configured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name);
        if configured {
            return Err(JobsError::Configured(name.to_owned()));
        }
        Ok(())
    }

    async fn store_cron(&self, spec: &CronSpec) -> Result<(CronSchedule, bool), JobsError> {
        if !valid_cron_name(&spec.name) {
            return Err(JobsError::Invalid(
                "name",
                "invalid",
                format!(
                    "a schedule's name has 1 to {MAX_CRON_NAME} ASCII letters, digits, '.', '_' \
                     and '-'"
                ),
            ));
        }
        let expr = CronExpr::parse(&spec.expression, &spec.time_zone)?;
        // The job a tick would enqueue, checked as an enqueue checks it: kind and payload.
        let job = self.new_job(&spec.kind, &spec.payload, EnqueueOptions::default())?;
        let now = self.clock.now();
        let next_tick_at = expr
            .next_after(now)
            .ok_or_else(|| JobsError::Invalid("expression", "invalid_cron", never_again()))?;
        let stored = self
            .store
            .put_cron_schedule(&NewCronSchedule {
                name: spec.name.clone(),
                expression: spec
                    .expression
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                time_zone: spec.time_zone.clone(),
                kind: job.kind,
                payload: job.payload,
                catch_up: spec.catch_up,
                enabled: spec.enabled,
                next_tick_at,
                now,
            })
            .await?;
        self.cron.wake.notify_one();
        Ok(stored)
    }

    /// The job of tick `tick` of `schedule`: its kind and payload, and the unique key
    /// `cron:<name>:<tick in RFC 3339, UTC>`, held in every state until the job is pruned (a
    /// cancelled tick is not brought back).
    fn tick_job(&self, schedule: &CronSchedule, tick: DateTime<Utc>) -> Result<NewJob, JobsError> {
        let payload: serde_json::Value = serde_json::from_str(&schedule.payload).map_err(|e| {
            JobsError::Invalid("payload", "invalid", format!("the stored payload: {e}"))
        })?;
        let options = EnqueueOptions {
            unique_key: Some(format!(
                "cron:{}:{}",
                schedule.name,
                tick.to_rfc3339_opts(SecondsFormat::Secs, true)
            )),
            unique_states: Some(UniqueStates::of(&JobState::ALL)),
            ..EnqueueOptions::default()
        };
        self.new_job(&schedule.kind, &payload, options)
    }

    /// Claims the due tick of `schedule` at `now`: the tick's job (or, for ticks missed, the
    /// catch-up's) and the schedule's next tick, in one step in the store.
    async fn claim_tick(
        &self,
        schedule: &CronSchedule,
        now: DateTime<Utc>,
    ) -> Result<TickClaim, JobsError> {
        let expr = CronExpr::parse(&schedule.expression, &schedule.time_zone)?;
        let due = schedule.next_tick_at;
        let after = expr
            .next_after(due)
            .ok_or_else(|| JobsError::Invalid("expression", "invalid_cron", never_again()))?;
        let (ran, next) = if after > now {
            (Some(due), after)
        } else {
            // More than one tick passed unrun: every node was down.
            let next = expr
                .next_after(now)
                .ok_or_else(|| JobsError::Invalid("expression", "invalid_cron", never_again()))?;
            let latest = match schedule.catch_up {
                CatchUp::Once => expr.latest_until(now).filter(|t| *t >= due),
                CatchUp::Skip => None,
            };
            (latest, next)
        };
        let job = ran
            .map(|tick| Ok::<_, JobsError>((tick, self.tick_job(schedule, tick)?)))
            .transpose()?;
        let claim = self
            .store
            .claim_cron_tick(
                &schedule.name,
                due,
                next,
                job.as_ref().map(|(tick, job)| (*tick, job)),
            )
            .await?;
        match &claim {
            TickClaim::Enqueued(enqueued) => {
                self.enqueued(enqueued);
                tracing::info!(
                    schedule = %schedule.name,
                    kind = %schedule.kind,
                    tick = %ran.unwrap_or(due),
                    late = ran != Some(due),
                    "cron tick enqueued"
                );
            }
            TickClaim::Moved => tracing::info!(
                schedule = %schedule.name,
                missed_from = %due,
                next = %next,
                "cron ticks missed while no node ran; skipped, as the schedule says"
            ),
            TickClaim::Lost => {}
        }
        Ok(claim)
    }
}

fn never_again() -> String {
    "the expression has no tick after now".to_owned()
}

fn valid_cron_name(name: &str) -> bool {
    name.len() <= MAX_CRON_NAME && valid_name(name)
}

/// This node's scheduler: claims the due ticks of every enabled schedule until shutdown.
pub(crate) async fn schedule(jobs: Arc<Jobs>, mut shutdown: watch::Receiver<bool>) {
    if *shutdown.borrow() {
        return;
    }
    let poll = jobs
        .config
        .poll_interval
        .clamp(Duration::from_millis(1), REREAD);
    let mut known: Vec<CronSchedule> = Vec::new();
    let mut read_at: Option<tokio::time::Instant> = None;
    // The schedules this node cannot run (a kind it does not know, during a rolling upgrade),
    // as they were stored: said once each, not at every poll.
    let mut refused: HashSet<(String, DateTime<Utc>)> = HashSet::new();
    loop {
        if read_at.is_none_or(|at| at.elapsed() >= REREAD) {
            match jobs.store.cron_schedules().await {
                Ok(all) => {
                    known = all.into_iter().filter(|s| s.enabled).collect();
                    read_at = Some(tokio::time::Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the cron schedules"),
            }
        }
        let now = jobs.clock.now();
        for schedule in known.iter().filter(|s| s.next_tick_at <= now) {
            let key = (schedule.name.clone(), schedule.updated_at);
            if refused.contains(&key) {
                continue;
            }
            // Whatever happens, the schedules are read again: this tick moved, here or on
            // another node.
            read_at = None;
            match jobs.claim_tick(schedule, now).await {
                Ok(_) => {}
                Err(JobsError::Store(e)) => {
                    tracing::warn!(schedule = %schedule.name, error = %e, "cannot claim a cron tick; trying again");
                }
                Err(e) => {
                    tracing::warn!(schedule = %schedule.name, error = %e, "this node cannot run the cron schedule; another node may");
                    refused.insert(key);
                }
            }
        }
        let until_next = known
            .iter()
            .map(|s| s.next_tick_at)
            .filter(|t| *t > now)
            .min()
            .and_then(|t| (t - now).to_std().ok())
            .unwrap_or(poll);
        tokio::select! {
            () = tokio::time::sleep(poll.min(until_next)) => {}
            () = jobs.cron.wake.notified() => read_at = None,
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap_or_default()
    }

    fn refused(expression: &str) -> bool {
        matches!(
            CronExpr::parse(expression, "UTC"),
            Err(JobsError::Invalid("expression", "invalid_cron", _))
        )
    }

    #[test]
    fn standard_five_field_expressions_are_read() {
        for good in [
            "* * * * *",
            "*/15 * * * *",
            "0 3 * * *",
            "0,30 8-18 * * 1-5",
            "0 0 1 jan,Jul *",
            "15 14 1 * MON-FRI",
            "0 22 * * 0,7",
            "1-59/2 * * * *",
            "  5   4 * *   sun ",
        ] {
            assert!(CronExpr::parse(good, "UTC").is_ok(), "{good}");
        }
    }

    #[test]
    fn other_forms_are_refused_as_invalid_cron() {
        for bad in [
            "",
            "* * * *",
            "0 * * * * *",
            "0 0 * * * * 2030",
            "@daily",
            "@every 5m",
            "0 0 L * *",
            "0 0 15W * *",
            "0 0 * * 5#3",
            "0 0 ? * *",
            "0 0 * * +1",
            "5/10 * * * *",
            "/10 * * * *",
            "*/ * * * *",
            "61 * * * *",
            "0 24 * * *",
            "0 0 0 * *",
            "0 0 * 13 *",
            "0 0 * * 8",
            "0 0 * FOO *",
            "0 0 * * MON-",
            "0 0 30 2 *",
            "0 0 * * MON\u{0}",
        ] {
            assert!(refused(bad), "{bad:?}");
        }
        assert!(refused(&format!("{} * * * *", "1,".repeat(120))));
    }

    #[test]
    fn an_unknown_time_zone_is_refused() {
        for zone in ["Mars/Olympus", "", "utc+1", "Europe/berlin"] {
            assert!(
                matches!(
                    CronExpr::parse("0 3 * * *", zone),
                    Err(JobsError::Invalid("time_zone", "unknown_time_zone", _))
                ),
                "{zone:?}"
            );
        }
        assert!(CronExpr::parse("0 3 * * *", "America/New_York").is_ok());
    }

    #[test]
    fn ticks_follow_the_time_zone_across_daylight_saving_time() {
        let nine = CronExpr::parse("0 9 * * *", "Europe/Berlin").unwrap();
        // 09:00 CET is 08:00 UTC; from 29 March 2026 it is CEST, 07:00 UTC.
        assert_eq!(
            nine.next_after(utc(2026, 3, 27, 12, 0)),
            Some(utc(2026, 3, 28, 8, 0))
        );
        assert_eq!(
            nine.next_after(utc(2026, 3, 28, 8, 0)),
            Some(utc(2026, 3, 29, 7, 0))
        );
        // And back on 25 October: 09:00 CEST on the 24th, 09:00 CET on the 25th.
        assert_eq!(
            nine.next_after(utc(2026, 10, 24, 7, 0)),
            Some(utc(2026, 10, 25, 8, 0))
        );
        // 02:30 does not exist on 29 March (02:00 → 03:00): the tick is the first instant
        // after the gap, 03:00 CEST.
        let half_past_two = CronExpr::parse("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            half_past_two.next_after(utc(2026, 3, 28, 12, 0)),
            Some(utc(2026, 3, 29, 1, 0))
        );
        // 02:30 happens twice on 25 October: it ticks once.
        let first = half_past_two.next_after(utc(2026, 10, 24, 12, 0));
        assert_eq!(first, Some(utc(2026, 10, 25, 0, 30)));
        assert_eq!(
            half_past_two.next_after(first.unwrap()),
            Some(utc(2026, 10, 26, 1, 30))
        );
        // The latest tick at or before a time, for a catch-up.
        assert_eq!(
            nine.latest_until(utc(2026, 3, 29, 7, 0)),
            Some(utc(2026, 3, 29, 7, 0))
        );
        assert_eq!(
            nine.latest_until(utc(2026, 3, 29, 6, 59)),
            Some(utc(2026, 3, 28, 8, 0))
        );
    }
}
