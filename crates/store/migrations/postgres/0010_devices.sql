-- The device fleet: devices with their owner, tags and hashed API keys; presence (status,
-- last_seen, the last heartbeat's figures); alerts; telemetry points with a latest-value table
-- and the batches already stored, so that a repeated batch is acknowledged and not stored twice.

CREATE TABLE devices (
    id                 UUID PRIMARY KEY,
    owner_id           UUID REFERENCES users (id) ON DELETE SET NULL,
    name               TEXT NOT NULL,
    model              TEXT NOT NULL,
    location           TEXT,
    metadata           TEXT NOT NULL,
    hardware_id        TEXT UNIQUE,
    firmware           TEXT,
    status             TEXT NOT NULL CHECK (status IN ('online', 'offline', 'silent')),
    last_seen          TIMESTAMPTZ,
    inactivity_timeout BIGINT,
    heartbeat          TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX devices_by_owner ON devices (owner_id, name);
CREATE INDEX devices_by_name ON devices (name, id);

CREATE TABLE device_tags (
    device_id UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    tag       TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag);

CREATE TABLE device_keys (
    id         UUID PRIMARY KEY,
    device_id  UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key_hash   TEXT NOT NULL UNIQUE,
    prefix     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);
CREATE INDEX device_keys_by_device ON device_keys (device_id);

CREATE TABLE device_alerts (
    id              UUID PRIMARY KEY,
    device_id       UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    kind            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    detail          TEXT,
    opened_at       TIMESTAMPTZ NOT NULL,
    acknowledged_at TIMESTAMPTZ,
    acknowledged_by UUID,
    resolved_at     TIMESTAMPTZ
);
-- One alert of a kind per device is open (or acknowledged) at a time.
CREATE UNIQUE INDEX device_alerts_live ON device_alerts (device_id, kind) WHERE state <> 'resolved';
CREATE INDEX device_alerts_by_state ON device_alerts (state, opened_at);

-- A point's value is a number (bools as 0/1, kind 'b'), text, or an array: `shape` names its
-- element type and dimensions (`f32:24x32`) and `blob` holds the packed little-endian values.
CREATE TABLE telemetry (
    device_id UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    ts        TIMESTAMPTZ NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('n', 'b', 's', 'a')),
    num       DOUBLE PRECISION,
    text      TEXT,
    shape     TEXT,
    blob      BYTEA,
    PRIMARY KEY (device_id, key, ts)
);
CREATE INDEX telemetry_by_ts ON telemetry (ts);

CREATE TABLE telemetry_latest (
    device_id UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    ts        TIMESTAMPTZ NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('n', 'b', 's', 'a')),
    num       DOUBLE PRECISION,
    text      TEXT,
    shape     TEXT,
    blob      BYTEA,
    PRIMARY KEY (device_id, key)
);

CREATE TABLE telemetry_batches (
    device_id   UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    points      INTEGER NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX telemetry_batches_by_time ON telemetry_batches (received_at);
