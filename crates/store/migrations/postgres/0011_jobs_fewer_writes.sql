-- Fewer writes per job. Every state change writes a new entry in each index whose columns or
-- predicate it touches (on PostgreSQL, in every index whose predicate the new row matches, as
-- no such change can be a HOT update): `jobs_by_state` and `jobs_by_kind` took one at every
-- change of every job, for the admin listing and the stats, which scan `jobs_by_created`
-- (newest first) or the table anyway. What they still served, the dead letters by kind
-- (requeue, purge, the listing of discarded jobs), a partial index holds with an entry per
-- discarded job only.
DROP INDEX jobs_by_state;
DROP INDEX jobs_by_kind;
CREATE INDEX jobs_discarded ON jobs (kind, created_at, id) WHERE state = 'discarded';

-- The leases, by the column only a running job sets, rather than by its state: an index whose
-- predicate is `state = 'running'` is the planner's choice for every statement that changes
-- running jobs by id (the end of a batch, a renewal), and it scans there every entry that the
-- jobs which ran since the last vacuum left dead, where the primary key finds each job at once.
DROP INDEX jobs_leases;
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE lease_until IS NOT NULL;

-- A completed attempt is kept on its job's row, not as a row of `job_attempts` (the history
-- shows it all the same): the worker that ran it and when it began. `attempted_at` now stays
-- set once a job finished: when its last attempt was claimed.
ALTER TABLE jobs ADD COLUMN ran_by TEXT;
ALTER TABLE jobs ADD COLUMN ran_at TIMESTAMPTZ;
