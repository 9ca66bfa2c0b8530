-- Firmware deployments: a signed image rolled out to a cohort resolved when the deployment is
-- made, in stages, each device's update followed through its states. A device's `hello` also
-- reports its anti-rollback version and the partition it booted from, which a deployment checks
-- (no downgrade below it) and compares after the reboot (the new image runs from the other one).

ALTER TABLE devices ADD COLUMN secure_version INTEGER;
ALTER TABLE devices ADD COLUMN partition TEXT;

CREATE TABLE deployments (
    id               TEXT PRIMARY KEY NOT NULL,
    name             TEXT NOT NULL,
    firmware_sha256  TEXT NOT NULL REFERENCES firmware (sha256),
    target           TEXT NOT NULL,
    stages           TEXT NOT NULL,
    policy           TEXT NOT NULL,
    state            TEXT NOT NULL
        CHECK (state IN ('scheduled', 'running', 'paused', 'halted', 'cancelled', 'completed')),
    stage            INTEGER NOT NULL,
    stage_started_at INTEGER,
    reason           TEXT,
    created_by       TEXT,
    created_at       INTEGER NOT NULL,
    start_at         INTEGER NOT NULL,
    finished_at      INTEGER
) STRICT;
CREATE INDEX deployments_by_state ON deployments (state, start_at);

CREATE TABLE deployment_devices (
    deployment_id  TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    device_id      TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    stage          INTEGER NOT NULL,
    state          TEXT NOT NULL
        CHECK (state IN ('waiting', 'offered', 'downloading', 'downloaded', 'verifying',
                         'installing', 'rebooting', 'confirmed', 'failed', 'rolled_back',
                         'cancelled')),
    progress       INTEGER,
    reason         TEXT,
    command_id     TEXT,
    from_version   TEXT,
    from_partition TEXT,
    offered_at     INTEGER,
    deadline       INTEGER,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
) STRICT;
CREATE INDEX deployment_devices_by_device ON deployment_devices (device_id, state);
CREATE INDEX deployment_devices_by_deadline ON deployment_devices (deadline);
-- A device has at most one update in progress, whatever deployment it belongs to.
CREATE UNIQUE INDEX deployment_devices_one_open ON deployment_devices (device_id)
    WHERE state NOT IN ('confirmed', 'failed', 'rolled_back', 'cancelled');
