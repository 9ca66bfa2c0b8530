-- Commands to devices (queued until delivered, then answered or expired) and each device's
-- desired and reported configuration with their versions.

CREATE TABLE device_commands (
    id              UUID PRIMARY KEY,
    device_id       UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    params          TEXT NOT NULL,
    state           TEXT NOT NULL
                    CHECK (state IN ('queued', 'delivered', 'succeeded', 'failed', 'expired')),
    idempotency_key TEXT,
    created_by      UUID,
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    delivered_at    TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ,
    output          TEXT,
    UNIQUE (device_id, idempotency_key)
);
CREATE INDEX device_commands_by_device ON device_commands (device_id, created_at);
CREATE INDEX device_commands_pending ON device_commands (expires_at)
    WHERE state IN ('queued', 'delivered');

CREATE TABLE device_config (
    device_id        UUID PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    desired          TEXT NOT NULL,
    desired_version  BIGINT NOT NULL,
    desired_at       TIMESTAMPTZ NOT NULL,
    reported         TEXT,
    reported_version BIGINT,
    reported_at      TIMESTAMPTZ
);

-- Alerts of one device (its listing, and the cascade when it is deleted).
CREATE INDEX device_alerts_by_device ON device_alerts (device_id, opened_at);
