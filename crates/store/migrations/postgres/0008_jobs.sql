-- The durable job queue and each job's attempts. `unique_live` is the unique key while the
-- job's state is in its `unique_states` mask and NULL otherwise; every query that changes a
-- job's state sets it, so the partial unique index holds at most one live job per key.
-- `attempted_at` is when the current attempt was claimed, for its history entry.
CREATE TABLE jobs (
    id                UUID PRIMARY KEY,
    kind              TEXT NOT NULL,
    queue             TEXT NOT NULL,
    payload           TEXT NOT NULL,
    priority          SMALLINT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('scheduled', 'available', 'running',
                          'retryable', 'completed', 'discarded', 'cancelled')),
    run_at            TIMESTAMPTZ NOT NULL,
    attempt           INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL,
    timeout_ms        BIGINT NOT NULL,
    unique_key        TEXT,
    unique_states     BIGINT NOT NULL,
    unique_live       TEXT,
    concurrency_key   TEXT,
    concurrency_limit INTEGER NOT NULL,
    leased_by         TEXT,
    lease_until       TIMESTAMPTZ,
    attempted_at      TIMESTAMPTZ,
    last_error        TEXT,
    cancel_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    trace_id          TEXT,
    created_at        TIMESTAMPTZ NOT NULL,
    finished_at       TIMESTAMPTZ
);
CREATE UNIQUE INDEX jobs_unique_live ON jobs (kind, unique_live) WHERE unique_live IS NOT NULL;
-- The claim reads this one in order; only waiting jobs are in it, so it stays small.
CREATE INDEX jobs_to_claim ON jobs (queue, priority, run_at, id)
    WHERE state IN ('available', 'scheduled', 'retryable');
-- Running jobs only: the rescue of expired leases, and the running count of a concurrency key.
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_running_by_key ON jobs (concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;
CREATE INDEX jobs_to_prune ON jobs (finished_at)
    WHERE state IN ('completed', 'discarded', 'cancelled');
-- The admin listing (newest first, perhaps of one state), the stats and the dead-letter actions.
CREATE INDEX jobs_by_created ON jobs (created_at, id);
CREATE INDEX jobs_by_state ON jobs (state, created_at, id);
CREATE INDEX jobs_by_kind ON jobs (kind, state);

-- A retried job starts counting its attempts again, so (job_id, attempt) repeats across its
-- runs; the history is ordered by `id`, the order the attempts ended in.
CREATE TABLE job_attempts (
    id          BIGSERIAL PRIMARY KEY,
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    worker      TEXT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('completed', 'retried', 'discarded',
                    'timed_out', 'lease_lost', 'cancelled')),
    error       TEXT
);
CREATE INDEX job_attempts_by_job ON job_attempts (job_id, id);
