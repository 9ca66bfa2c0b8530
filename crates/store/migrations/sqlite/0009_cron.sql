-- Cron schedules: each enqueues a job of `kind` with `payload` at every tick of `expression`
-- (five fields) in `time_zone` (an IANA name). `next_tick_at` is the tick to run next; a node
-- claims it by moving it on with a compare-and-set, and enqueues the tick's job in the same
-- transaction, so a tick runs once however many nodes are up. `catch_up` says what a node
-- does with ticks missed while every node was down: `once` runs the latest of them, `skip`
-- runs none. `last_tick_at` is the tick whose job was enqueued last.
CREATE TABLE cron_schedules (
    name         TEXT PRIMARY KEY NOT NULL,
    expression   TEXT NOT NULL,
    time_zone    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    payload      TEXT NOT NULL,
    catch_up     TEXT NOT NULL CHECK (catch_up IN ('once', 'skip')),
    enabled      INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    next_tick_at INTEGER NOT NULL,
    last_tick_at INTEGER,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;
