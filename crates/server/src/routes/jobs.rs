//! `/api/v1/jobs/*` and `/api/v1/admin/jobs/*`: background jobs as an operator sees them — a
//! job with its attempts, listings, counts, retries, cancellations and the dead letters in bulk;
//! and `/api/v1/admin/cron/*`, the cron schedules that enqueue jobs. Every handler takes
//! `Auth<Admin>` (a payload may hold personal data), the inputs are checked by `Jobs`, and
//! every change is recorded in the audit log.

use axum::Json as JsonResponse;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use unhidra_jobs::{CatchUp, CronSpec, JobsError, ListQuery};
use unhidra_store::StoreError;
use unhidra_store::cron::CronSchedule;
use unhidra_store::jobs::{AttemptOutcome, AttemptRecord, JobRecord, JobState};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, FieldError, Problem};
use crate::http::auth::{Admin, Auth, Ctx};
use crate::http::extract::{Json, Query};
use crate::state::AppState;

impl From<JobsError> for ApiError {
    fn from(err: JobsError) -> Self {
        match err {
            JobsError::NotFound => Self::not_found("job"),
            JobsError::Invalid(field, code, message) => {
                Self::validation(vec![FieldError::new(field, code, message)])
            }
            JobsError::UnknownKind(kind) => Self::validation(vec![FieldError::new(
                "kind",
                "unknown_kind",
                format!("no job kind {kind:?} is registered"),
            )]),
            JobsError::State(state) => Problem::new(
                StatusCode::CONFLICT,
                "job_state",
                format!(
                    "The job is {}: its state does not allow this.",
                    state.as_str()
                ),
            )
            .with("state", state.as_str())
            .into(),
            JobsError::Store(StoreError::Conflict { source, .. }) => Self::new(Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "Another job holds this job's unique key now; it stays as it is.",
            ))
            .with_source(source),
            JobsError::Store(e) => e.into(),
            JobsError::Configured(name) => Problem::new(
                StatusCode::CONFLICT,
                "cron_configured",
                format!(
                    "The cron schedule {name:?} is defined by the configuration (jobs_cron), \
                     which wins: change it there."
                ),
            )
            .into(),
        }
    }
}

/// A job's state, as the API spells it.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JobStateName {
    Scheduled,
    Available,
    Running,
    Retryable,
    Completed,
    Discarded,
    Cancelled,
}

impl From<JobState> for JobStateName {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Scheduled => Self::Scheduled,
            JobState::Available => Self::Available,
            JobState::Running => Self::Running,
            JobState::Retryable => Self::Retryable,
            JobState::Completed => Self::Completed,
            JobState::Discarded => Self::Discarded,
            JobState::Cancelled => Self::Cancelled,
        }
    }
}

/// A job, without its payload.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobView {
    id: String,
    kind: String,
    queue: String,
    state: JobStateName,
    /// Smaller runs first.
    priority: i16,
    /// When it is (or was last) due.
    run_at: chrono::DateTime<chrono::Utc>,
    /// Attempts so far (counted anew after a retry).
    attempt: i32,
    max_attempts: i32,
    /// How long one attempt may run, in milliseconds.
    timeout_ms: i64,
    unique_key: Option<String>,
    concurrency_key: Option<String>,
    /// The worker holding it while `running`.
    leased_by: Option<String>,
    lease_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The last attempt's error, if it failed.
    last_error: Option<String>,
    /// A cancellation was asked for while it ran; its worker stops it.
    cancel_requested: bool,
    /// The trace id of the request that enqueued it.
    trace_id: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<&JobRecord> for JobView {
    fn from(job: &JobRecord) -> Self {
        Self {
            id: job.id.to_string(),
            kind: job.kind.clone(),
            queue: job.queue.clone(),
            state: job.state.into(),
            priority: job.priority,
            run_at: job.run_at,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            timeout_ms: job.timeout_ms,
            unique_key: job.unique_key.clone(),
            concurrency_key: job.concurrency_key.clone(),
            leased_by: job.leased_by.clone(),
            lease_until: job.lease_until,
            last_error: job.last_error.clone(),
            cancel_requested: job.cancel_requested,
            trace_id: job.trace_id.clone(),
            created_at: job.created_at,
            finished_at: job.finished_at,
        }
    }
}

/// How an attempt ended, as the API spells it.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutcomeName {
    Completed,
    Retried,
    Discarded,
    TimedOut,
    LeaseLost,
    Cancelled,
}

impl From<AttemptOutcome> for OutcomeName {
    fn from(outcome: AttemptOutcome) -> Self {
        match outcome {
            AttemptOutcome::Completed => Self::Completed,
            AttemptOutcome::Retried => Self::Retried,
            AttemptOutcome::Discarded => Self::Discarded,
            AttemptOutcome::TimedOut => Self::TimedOut,
            AttemptOutcome::LeaseLost => Self::LeaseLost,
            AttemptOutcome::Cancelled => Self::Cancelled,
        }
    }
}

/// One attempt of a job.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AttemptView {
    /// Which attempt (1 for the first; counted anew after a retry).
    attempt: i32,
    /// The worker that ran it.
    worker: String,
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: chrono::DateTime<chrono::Utc>,
    outcome: OutcomeName,
    error: Option<String>,
}

impl From<&AttemptRecord> for AttemptView {
    fn from(a: &AttemptRecord) -> Self {
        Self {
            attempt: a.attempt,
            worker: a.worker.clone(),
            started_at: a.started_at,
            finished_at: a.finished_at,
            outcome: a.outcome.into(),
            error: a.error.clone(),
        }
    }
}

/// A job with its payload and attempts.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobDetail {
    #[serde(flatten)]
    job: JobView,
    /// The job's input, as it was enqueued. It may hold personal data: admins only.
    #[schema(value_type = serde_json::Value)]
    payload: serde_json::Value,
    /// Oldest first.
    attempts: Vec<AttemptView>,
}

/// `{id}` of a job.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct JobPath {
    /// Job id: a UUID, hyphenated (the one spelling accepted).
    #[param(
        format = "uuid",
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    id: String,
}

fn job_id(raw: &str) -> Result<uuid::Uuid, ApiError> {
    Ok(unhidra_jobs::parse_id(raw)?)
}

/// A job with its payload and every attempt (outcome, error, times, worker). Admins only for
/// now: a payload may hold personal data.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(JobPath),
    responses(
        (status = 200, description = "The job", body = JobDetail),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    _: Auth<Admin>,
    Path(JobPath { id }): Path<JobPath>,
) -> Result<JsonResponse<JobDetail>, ApiError> {
    let (job, attempts) = state.jobs().job(job_id(&id)?).await?;
    Ok(JsonResponse(JobDetail {
        job: JobView::from(&job),
        payload: serde_json::from_str(&job.payload).unwrap_or(serde_json::Value::Null),
        attempts: attempts.iter().map(AttemptView::from).collect(),
    }))
}

/// `?state=&kind=&queue=&q=&page=&page_size=` of the job listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobListParams {
    /// Only this state.
    #[param(value_type = Option<JobStateName>)]
    state: Option<String>,
    /// Only this kind; empty for every kind.
    #[param(max_length = 200, pattern = "^[A-Za-z0-9._-]*$")]
    kind: Option<String>,
    /// Only this queue; empty for every queue.
    #[param(max_length = 200, pattern = "^[A-Za-z0-9._-]*$")]
    queue: Option<String>,
    /// Matches the kind, unique key or last error, case-insensitively; at most 200
    /// characters, no control characters.
    #[param(
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
    )]
    q: Option<String>,
    /// 1-based page number.
    #[param(minimum = 1, maximum = 1_000_000)]
    page: Option<u64>,
    /// Jobs per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    page_size: Option<u32>,
}

/// One page of jobs.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobPage {
    items: Vec<JobView>,
    page: u64,
    page_size: u32,
    total: u64,
}

/// Jobs, newest first, filtered by state, kind, queue and text; without their payloads.
#[utoipa::path(get, path = "/api/v1/admin/jobs", tag = "jobs", security(("bearer" = [])),
    params(JobListParams),
    responses(
        (status = 200, description = "A page of jobs", body = JobPage),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 422, description = "A filter is invalid; `errors` names it", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    _: Auth<Admin>,
    Query(params): Query<JobListParams>,
) -> Result<JsonResponse<JobPage>, ApiError> {
    let page = state
        .jobs()
        .list(&ListQuery {
            state: params.state,
            kind: params.kind,
            queue: params.queue,
            q: params.q,
            page: params.page,
            page_size: params.page_size,
        })
        .await?;
    Ok(JsonResponse(JobPage {
        items: page.items.iter().map(JobView::from).collect(),
        page: page.page,
        page_size: page.page_size,
        total: page.total,
    }))
}

/// How many jobs of a kind are in a state.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobCountView {
    kind: String,
    state: JobStateName,
    count: i64,
}

/// The queue at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobStatsView {
    /// Per kind and state; pairs without jobs are left out.
    counts: Vec<JobCountView>,
    /// Seconds the oldest due job (available, or scheduled or retryable whose time has come)
    /// has waited to be claimed; `null` when none is due. A growing age means the workers do
    /// not keep up, or no node runs its queue.
    oldest_due_age_seconds: Option<u64>,
}

/// Counts per state and kind, and how long the oldest due job has waited.
#[utoipa::path(get, path = "/api/v1/admin/jobs/stats", tag = "jobs", security(("bearer" = [])),
    responses(
        (status = 200, description = "The counts", body = JobStatsView),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn stats(
    State(state): State<AppState>,
    _: Auth<Admin>,
) -> Result<JsonResponse<JobStatsView>, ApiError> {
    let stats = state.jobs().stats().await?;
    Ok(JsonResponse(JobStatsView {
        counts: stats
            .counts
            .into_iter()
            .map(|c| JobCountView {
                kind: c.kind,
                state: c.state.into(),
                count: c.count,
            })
            .collect(),
        oldest_due_age_seconds: stats.oldest_due_age.map(|age| age.as_secs()),
    }))
}

/// Puts a discarded or cancelled job back in its queue with fresh attempts.
#[utoipa::path(post, path = "/api/v1/admin/jobs/{id}/retry", tag = "jobs",
    security(("bearer" = [])),
    params(JobPath),
    responses(
        (status = 200, description = "The job, available again", body = JobView),
        (status = 404, description = "No such job", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "`job_state`: the job is neither discarded nor cancelled \
            (`state` says what it is; nothing changed); `conflict`: another job holds its \
            unique key now", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(JobPath { id }): Path<JobPath>,
) -> Result<JsonResponse<JobView>, ApiError> {
    let job = state.jobs().retry(job_id(&id)?).await?;
    state
        .identity()
        .audit(
            "job.retried",
            Some(admin.user_id),
            Some(job.id.to_string()),
            &ctx,
            serde_json::json!({ "kind": job.kind }),
        )
        .await;
    Ok(JsonResponse(JobView::from(&job)))
}

/// Cancels a job: one that waits is cancelled at once; a running one is marked
/// (`cancel_requested`) and its worker stops it at its next lease renewal. A cancelled job is
/// answered as it is.
#[utoipa::path(post, path = "/api/v1/admin/jobs/{id}/cancel", tag = "jobs",
    security(("bearer" = [])),
    params(JobPath),
    responses(
        (status = 200, description = "The job as it now is", body = JobView),
        (status = 404, description = "No such job", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "`job_state`: the job completed or was discarded; \
            nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(JobPath { id }): Path<JobPath>,
) -> Result<JsonResponse<JobView>, ApiError> {
    let job = state.jobs().cancel(job_id(&id)?).await?;
    state
        .identity()
        .audit(
            "job.cancelled",
            Some(admin.user_id),
            Some(job.id.to_string()),
            &ctx,
            serde_json::json!({ "kind": job.kind, "state": job.state.as_str() }),
        )
        .await;
    Ok(JsonResponse(JobView::from(&job)))
}

/// `?kind=` of the bulk actions on dead letters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct KindParams {
    /// Only jobs of this kind; absent or empty for every kind.
    #[param(max_length = 200, pattern = "^[A-Za-z0-9._-]*$")]
    kind: Option<String>,
}

/// How many jobs a bulk action changed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkCount {
    count: u64,
}

/// Puts every discarded job (of `kind`) back in its queue with fresh attempts, but for one
/// whose unique key another job holds now (it stays discarded).
#[utoipa::path(post, path = "/api/v1/admin/jobs/requeue", tag = "jobs",
    security(("bearer" = [])), params(KindParams),
    responses(
        (status = 200, description = "How many were requeued", body = BulkCount),
        (status = 422, description = "`kind` is not a job kind's name", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn requeue(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Query(params): Query<KindParams>,
) -> Result<JsonResponse<BulkCount>, ApiError> {
    let count = state
        .jobs()
        .requeue_discarded(params.kind.as_deref())
        .await?;
    bulk_audit(&state, &admin, &ctx, "jobs.requeued", params.kind, count).await;
    Ok(JsonResponse(BulkCount { count }))
}

/// Deletes every discarded job (of `kind`) with its attempts.
#[utoipa::path(delete, path = "/api/v1/admin/jobs/discarded", tag = "jobs",
    security(("bearer" = [])), params(KindParams),
    responses(
        (status = 200, description = "How many were deleted", body = BulkCount),
        (status = 422, description = "`kind` is not a job kind's name", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn purge(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Query(params): Query<KindParams>,
) -> Result<JsonResponse<BulkCount>, ApiError> {
    let count = state.jobs().purge_discarded(params.kind.as_deref()).await?;
    bulk_audit(&state, &admin, &ctx, "jobs.purged", params.kind, count).await;
    Ok(JsonResponse(BulkCount { count }))
}

/// Records a bulk action on dead letters, even one that changed nothing: someone asked.
async fn bulk_audit(
    state: &AppState,
    admin: &crate::identity::Principal,
    ctx: &crate::identity::RequestContext,
    kind: &str,
    job_kind: Option<String>,
    count: u64,
) {
    let job_kind = job_kind
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty());
    state
        .identity()
        .audit(
            kind,
            Some(admin.user_id),
            job_kind.clone(),
            ctx,
            serde_json::json!({ "kind": job_kind, "count": count }),
        )
        .await;
}

/// What a cron schedule does with the ticks missed while every node was down.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CatchUpName {
    /// Run one job, for the latest tick missed.
    #[default]
    Once,
    /// Run none; go on from the next tick.
    Skip,
}

impl From<CatchUpName> for CatchUp {
    fn from(name: CatchUpName) -> Self {
        match name {
            CatchUpName::Once => Self::Once,
            CatchUpName::Skip => Self::Skip,
        }
    }
}

impl From<CatchUp> for CatchUpName {
    fn from(catch_up: CatchUp) -> Self {
        match catch_up {
            CatchUp::Once => Self::Once,
            CatchUp::Skip => Self::Skip,
        }
    }
}

/// A cron schedule to store.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "expression": "0 3 * * *",
    "time_zone": "Europe/Berlin",
    "kind": "rooms.retention",
    "payload": {},
    "catch_up": "once",
    "enabled": true
}))]
pub(crate) struct CronBody {
    /// Five fields — minute, hour, day of month, month, day of week — each `*`, numbers,
    /// ranges, lists and steps (`*/15`, `1-5`, `0,30`); months and days also as `JAN`, `MON`.
    /// No seconds, years, `@daily`, `L`, `W`, `#` or `?`.
    #[schema(example = "0 3 * * *", min_length = 1, max_length = 200)]
    expression: String,
    /// The IANA time zone the expression is read in; ticks follow its daylight saving time.
    #[serde(default = "utc")]
    #[schema(
        example = "Europe/Berlin",
        default = "UTC",
        min_length = 1,
        max_length = 100
    )]
    time_zone: String,
    /// The registered job kind each tick enqueues.
    #[schema(
        example = "rooms.retention",
        max_length = 200,
        pattern = "^[A-Za-z0-9._-]+$"
    )]
    kind: String,
    /// The payload of each tick's job, an object (at most 64 KiB encoded); `{}` if absent.
    #[serde(default)]
    #[schema(value_type = Object, example = json!({}))]
    payload: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    catch_up: CatchUpName,
    /// Whether it ticks; a schedule enabled again goes on from its next tick to come.
    #[serde(default = "enabled")]
    #[schema(default = true)]
    enabled: bool,
}

fn utc() -> String {
    "UTC".to_owned()
}

fn enabled() -> bool {
    true
}

/// A cron schedule.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CronView {
    name: String,
    expression: String,
    time_zone: String,
    kind: String,
    #[schema(value_type = Object)]
    payload: serde_json::Value,
    catch_up: CatchUpName,
    enabled: bool,
    /// The tick that runs next (UTC).
    next_tick_at: chrono::DateTime<chrono::Utc>,
    /// The tick whose job was enqueued last.
    last_tick_at: Option<chrono::DateTime<chrono::Utc>>,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<&CronSchedule> for CronView {
    fn from(s: &CronSchedule) -> Self {
        Self {
            name: s.name.clone(),
            expression: s.expression.clone(),
            time_zone: s.time_zone.clone(),
            kind: s.kind.clone(),
            payload: serde_json::from_str(&s.payload).unwrap_or(serde_json::Value::Null),
            catch_up: s.catch_up.into(),
            enabled: s.enabled,
            next_tick_at: s.next_tick_at,
            last_tick_at: s.last_tick_at,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// `{name}` of a cron schedule.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct CronPath {
    /// The schedule's name: ASCII letters, digits, `.`, `_` and `-`.
    #[param(
        example = "nightly-report",
        min_length = 1,
        max_length = 100,
        pattern = "^[A-Za-z0-9._-]+$"
    )]
    name: String,
}

/// A schedule's field errors name the body's fields as JSON pointers, the name as the path
/// parameter it is; not found is the schedule's.
fn cron_error(err: JobsError) -> ApiError {
    match err {
        JobsError::NotFound => ApiError::not_found("cron schedule"),
        JobsError::Invalid(field, code, message) => {
            let field = if field == "name" {
                field.to_owned()
            } else {
                format!("/{field}")
            };
            ApiError::validation(vec![FieldError::new(field, code, message)])
        }
        JobsError::UnknownKind(kind) => ApiError::validation(vec![FieldError::new(
            "/kind",
            "unknown_kind",
            format!("no job kind {kind:?} is registered"),
        )]),
        other => other.into(),
    }
}

/// Every cron schedule, by name.
#[utoipa::path(get, path = "/api/v1/admin/cron", tag = "jobs", security(("bearer" = [])),
    responses(
        (status = 200, description = "The schedules", body = [CronView]),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn cron_list(
    State(state): State<AppState>,
    _: Auth<Admin>,
) -> Result<JsonResponse<Vec<CronView>>, ApiError> {
    let schedules = state.jobs().cron_schedules().await.map_err(cron_error)?;
    Ok(JsonResponse(schedules.iter().map(CronView::from).collect()))
}

/// Stores a cron schedule, or replaces the one of this name. A replaced schedule that keeps
/// its expression and time zone keeps its next tick; otherwise it goes on from its first
/// tick after now. Each tick enqueues one job across every node (unique key
/// `cron:<name>:<tick>`).
#[utoipa::path(put, path = "/api/v1/admin/cron/{name}", tag = "jobs",
    security(("bearer" = [])),
    params(CronPath), request_body = CronBody,
    responses(
        (status = 200, description = "The schedule, replaced", body = CronView),
        (status = 201, description = "The schedule, new", body = CronView),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "`cron_configured`: the configuration defines this \
            schedule; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`errors` names the field: `invalid_cron` (`/expression`), \
            `unknown_time_zone` (`/time_zone`), `unknown_kind` (`/kind`), `too_large` \
            (`/payload`), `invalid` (`name`); nothing was stored", body = Problem,
            content_type = "application/problem+json"),
    ))]
pub(crate) async fn cron_put(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(CronPath { name }): Path<CronPath>,
    Json(body): Json<CronBody>,
) -> Result<(StatusCode, JsonResponse<CronView>), ApiError> {
    let spec = CronSpec {
        name,
        expression: body.expression,
        time_zone: body.time_zone,
        kind: body.kind,
        payload: serde_json::Value::Object(body.payload),
        catch_up: body.catch_up.into(),
        enabled: body.enabled,
    };
    let (stored, created) = state.jobs().put_cron(&spec).await.map_err(cron_error)?;
    state
        .identity()
        .audit(
            "cron.saved",
            Some(admin.user_id),
            Some(stored.name.clone()),
            &ctx,
            serde_json::json!({
                "expression": stored.expression,
                "time_zone": stored.time_zone,
                "kind": stored.kind,
                "enabled": stored.enabled,
                "created": created,
            }),
        )
        .await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, JsonResponse(CronView::from(&stored))))
}

/// Deletes a cron schedule; the jobs it enqueued stay.
#[utoipa::path(delete, path = "/api/v1/admin/cron/{name}", tag = "jobs",
    security(("bearer" = [])),
    params(CronPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not an admin", body = Problem,
            content_type = "application/problem+json"),
        (status = 404, description = "No such schedule", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "`cron_configured`: the configuration defines this \
            schedule; nothing changed", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn cron_delete(
    State(state): State<AppState>,
    Auth(admin, ..): Auth<Admin>,
    Ctx(ctx): Ctx,
    Path(CronPath { name }): Path<CronPath>,
) -> Result<StatusCode, ApiError> {
    state.jobs().delete_cron(&name).await.map_err(cron_error)?;
    state
        .identity()
        .audit(
            "cron.deleted",
            Some(admin.user_id),
            Some(name),
            &ctx,
            serde_json::json!({}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_store() {
        for state in JobState::ALL {
            let name = serde_json::to_value(JobStateName::from(state)).unwrap();
            assert_eq!(name, state.as_str());
        }
        for outcome in [
            AttemptOutcome::Completed,
            AttemptOutcome::Retried,
            AttemptOutcome::Discarded,
            AttemptOutcome::TimedOut,
            AttemptOutcome::LeaseLost,
            AttemptOutcome::Cancelled,
        ] {
            let name = serde_json::to_value(OutcomeName::from(outcome)).unwrap();
            assert_eq!(name, outcome.as_str());
        }
    }
}
