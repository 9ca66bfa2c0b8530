-- Fewer index entries per change of a job's state. Every state change writes a new entry in
-- each index whose columns or predicate it touches (on PostgreSQL, in every index whose
-- predicate the new row matches, as no such change can be a HOT update): `jobs_by_state` and
-- `jobs_by_kind` took one at every change of every job, for the admin listing and the stats,
-- which scan `jobs_by_created` (newest first) or the table anyway. What they still served, the
-- dead letters by kind (requeue, purge, the listing of discarded jobs), a partial index holds
-- with an entry per discarded job only.
DROP INDEX jobs_by_state;
DROP INDEX jobs_by_kind;
CREATE INDEX jobs_discarded ON jobs (kind, created_at, id) WHERE state = 'discarded';
