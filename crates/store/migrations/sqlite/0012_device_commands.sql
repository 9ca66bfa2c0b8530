-- Commands to devices (queued until delivered, then answered or expired) and each device's
-- desired and reported configuration with their versions. Times are Unix microseconds.

CREATE TABLE device_commands (
    id              TEXT PRIMARY KEY NOT NULL,
    device_id       TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    params          TEXT NOT NULL,
    state           TEXT NOT NULL
                    CHECK (state IN ('queued', 'delivered', 'succeeded', 'failed', 'expired')),
    idempotency_key TEXT,
    created_by      TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    finished_at     INTEGER,
    output          TEXT,
    UNIQUE (device_id, idempotency_key)
) STRICT;
CREATE INDEX device_commands_by_device ON device_commands (device_id, created_at);
CREATE INDEX device_commands_pending ON device_commands (expires_at)
    WHERE state IN ('queued', 'delivered');

CREATE TABLE device_config (
    device_id        TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    desired          TEXT NOT NULL,
    desired_version  INTEGER NOT NULL,
    desired_at       INTEGER NOT NULL,
    reported         TEXT,
    reported_version INTEGER,
    reported_at      INTEGER
) STRICT;

-- Alerts of one device (its listing, and the cascade when it is deleted).
CREATE INDEX device_alerts_by_device ON device_alerts (device_id, opened_at);
