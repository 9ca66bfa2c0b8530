//! The operator's side of the queue: listing, counts, and the dead letters in bulk. Every input
//! an operator types (a state, a kind, a search, a page, an id) is checked here, so that a bad
//! one is a typed [`JobsError::Invalid`] and never reaches the store.

use std::time::Duration;

use unhidra_core::{Controls, forbidden_control};
use unhidra_store::jobs::{JobCount, JobFilter, JobRecord, JobState};
use uuid::Uuid;

use crate::{Jobs, JobsError, valid_name};

/// The longest search of a listing, in characters.
pub const MAX_QUERY: usize = 200;
/// The largest page of a listing.
pub const MAX_PAGE_SIZE: u32 = 200;
/// A listing's page size unless it asks for one.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The last page number accepted; deeper pages are found by filtering.
pub const MAX_PAGE: u64 = 1_000_000;

/// What a listing asks for, as the operator typed it.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this state (`scheduled`, `available`, `running`, `retryable`, `completed`,
    /// `discarded`, `cancelled`).
    pub state: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only jobs whose kind, unique key or last error contains this (case-insensitively);
    /// blank is no filter.
    pub q: Option<String>,
    /// 1-based page number (default 1).
    pub page: Option<u64>,
    /// Jobs per page, 1 to [`MAX_PAGE_SIZE`] (default [`DEFAULT_PAGE_SIZE`]).
    pub page_size: Option<u32>,
}

/// One page of a listing, newest job first.
#[derive(Debug, Clone)]
pub struct JobPage {
    /// The jobs of this page.
    pub items: Vec<JobRecord>,
    /// Its number, from 1.
    pub page: u64,
    /// Jobs per page.
    pub page_size: u32,
    /// Jobs matching the filter, on every page.
    pub total: u64,
}

/// The queue at a glance.
#[derive(Debug, Clone)]
pub struct JobStats {
    /// How many jobs there are per kind and state (pairs with none are left out).
    pub counts: Vec<JobCount>,
    /// How long the oldest due job has waited to be claimed; `None` when none is due. A large
    /// age means the queue's workers do not keep up (or none runs it).
    pub oldest_due_age: Option<Duration>,
}

/// Reads a job id: a UUID in its hyphenated spelling (36 characters), the one every listing
/// shows.
pub fn parse_id(raw: &str) -> Result<Uuid, JobsError> {
    let invalid = || {
        JobsError::Invalid(
            "id",
            "invalid_value",
            "a job id is a hyphenated UUID".to_owned(),
        )
    };
    if raw.len() != 36 {
        return Err(invalid());
    }
    Uuid::try_parse(raw).map_err(|_| invalid())
}

/// Reads a state as an operator names it.
pub fn parse_state(raw: &str) -> Result<JobState, JobsError> {
    JobState::parse(raw).ok_or_else(|| {
        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        JobsError::Invalid(
            "state",
            "unknown_state",
            format!("a state is one of {}", names.join(", ")),
        )
    })
}

/// A kind or queue filter: absent or empty is none; otherwise a valid name, exactly.
fn name_filter(field: &'static str, raw: Option<&str>) -> Result<Option<String>, JobsError> {
    match raw.filter(|n| !n.is_empty()) {
        None => Ok(None),
        Some(name) if valid_name(name) => Ok(Some(name.to_owned())),
        Some(_) => Err(JobsError::Invalid(
            field,
            "invalid_value",
            format!(
                "a {field} has 1 to {} ASCII letters, digits, '.', '_' or '-'",
                crate::MAX_NAME
            ),
        )),
    }
}

/// The search text: at most [`MAX_QUERY`] characters, no control characters, as given; then
/// trimmed, and blank is none.
fn text_filter(raw: Option<&str>) -> Result<Option<String>, JobsError> {
    let Some(q) = raw else {
        return Ok(None);
    };
    if q.chars().count() > MAX_QUERY {
        return Err(JobsError::Invalid(
            "q",
            "invalid_length",
            format!("a search has at most {MAX_QUERY} characters"),
        ));
    }
    if forbidden_control(q, Controls::None).is_some() {
        return Err(JobsError::Invalid(
            "q",
            "invalid_characters",
            "a search has no control characters".to_owned(),
        ));
    }
    let q = q.trim();
    Ok((!q.is_empty()).then(|| q.to_owned()))
}

impl ListQuery {
    /// The store's filter and the page, checked.
    fn parse(&self) -> Result<(JobFilter, u64, u32), JobsError> {
        let state = self.state.as_deref().map(parse_state).transpose()?;
        let filter = JobFilter {
            state,
            kind: name_filter("kind", self.kind.as_deref())?,
            queue: name_filter("queue", self.queue.as_deref())?,
            text: text_filter(self.q.as_deref())?,
        };
        let page = self.page.unwrap_or(1);
        if !(1..=MAX_PAGE).contains(&page) {
            return Err(JobsError::Invalid(
                "page",
                "out_of_range",
                format!("page is between 1 and {MAX_PAGE}"),
            ));
        }
        let page_size = self.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(JobsError::Invalid(
                "page_size",
                "out_of_range",
                format!("page_size is between 1 and {MAX_PAGE_SIZE}"),
            ));
        }
        Ok((filter, page, page_size))
    }
}

impl Jobs {
    /// A page of the jobs that `query` asks for, newest first.
    pub async fn list(&self, query: &ListQuery) -> Result<JobPage, JobsError> {
        let (filter, page, page_size) = query.parse()?;
        let offset = (page - 1) * u64::from(page_size);
        let items = self.store.list_jobs(&filter, page_size, offset).await?;
        let total = self.store.count_jobs(&filter).await?;
        Ok(JobPage {
            items,
            page,
            page_size,
            total,
        })
    }

    /// How many jobs there are per kind and state, and how long the oldest due one has waited.
    pub async fn stats(&self) -> Result<JobStats, JobsError> {
        let now = self.clock.now();
        let (counts, oldest) = self.store.job_stats(now).await?;
        let oldest_due_age = oldest.map(|due| (now - due).to_std().unwrap_or_default());
        Ok(JobStats {
            counts,
            oldest_due_age,
        })
    }

    /// Puts every discarded job of `kind` (every kind if `None`) back in its queue with fresh
    /// attempts, but for one whose unique key another job holds now; answers how many.
    pub async fn requeue_discarded(&self, kind: Option<&str>) -> Result<u64, JobsError> {
        let kind = name_filter("kind", kind)?;
        let requeued = self
            .store
            .requeue_discarded(kind.as_deref(), self.clock.now())
            .await?;
        if requeued > 0 {
            // Which queues got work back is not known here: every local worker looks.
            for queue in self.wake.keys() {
                self.wake(queue);
            }
        }
        Ok(requeued)
    }

    /// Deletes every discarded job of `kind` (every kind if `None`) with its attempts; answers
    /// how many.
    pub async fn purge_discarded(&self, kind: Option<&str>) -> Result<u64, JobsError> {
        let kind = name_filter("kind", kind)?;
        Ok(self.store.purge_discarded(kind.as_deref()).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(f: impl FnOnce(&mut ListQuery)) -> ListQuery {
        let mut q = ListQuery::default();
        f(&mut q);
        q
    }

    fn field(result: Result<(JobFilter, u64, u32), JobsError>) -> &'static str {
        match result {
            Err(JobsError::Invalid(field, ..)) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_listing_is_checked_before_the_store() {
        let (filter, page, size) = ListQuery::default().parse().unwrap();
        assert_eq!(
            (filter, page, size),
            (JobFilter::default(), 1, DEFAULT_PAGE_SIZE)
        );
        let (filter, ..) = query(|q| {
            q.state = Some("discarded".into());
            q.kind = Some("rooms.retention".into());
            q.queue = Some(String::new());
            q.q = Some("  ".into());
        })
        .parse()
        .unwrap();
        assert_eq!(filter.state, Some(JobState::Discarded));
        assert_eq!(filter.kind.as_deref(), Some("rooms.retention"));
        assert_eq!(filter.text, None);

        assert_eq!(
            field(query(|q| q.state = Some("dead".into())).parse()),
            "state"
        );
        assert_eq!(
            field(query(|q| q.kind = Some("a b".into())).parse()),
            "kind"
        );
        assert_eq!(
            field(query(|q| q.queue = Some("q/1".into())).parse()),
            "queue"
        );
        assert_eq!(field(query(|q| q.q = Some("x".repeat(201))).parse()), "q");
        assert_eq!(field(query(|q| q.q = Some("a\u{0}b".into())).parse()), "q");
        assert_eq!(field(query(|q| q.page = Some(0)).parse()), "page");
        assert_eq!(
            field(query(|q| q.page = Some(MAX_PAGE + 1)).parse()),
            "page"
        );
        assert_eq!(field(query(|q| q.page_size = Some(0)).parse()), "page_size");
        assert_eq!(
            field(query(|q| q.page_size = Some(201)).parse()),
            "page_size"
        );
        // Two hundred characters of several bytes each are still within the bound.
        assert!(query(|q| q.q = Some("é".repeat(200))).parse().is_ok());
    }

    #[test]
    fn ids_are_hyphenated_uuids() {
        assert!(parse_id("0190a0b0-0000-7000-8000-000000000000").is_ok());
        assert!(parse_id("0190A0B0-0000-7000-8000-00000000000F").is_ok());
        for other in [
            "0190a0b000007000800000000000000f",
            " 0190a0b0-0000-7000-8000-000000000000",
        ] {
            assert!(parse_id(other).is_err(), "{other}");
        }
        assert!(matches!(
            parse_id("nope"),
            Err(JobsError::Invalid("id", "invalid_value", _))
        ));
    }
}
