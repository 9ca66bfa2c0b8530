-- Firmware deployments: a signed image rolled out to a cohort resolved when the deployment is
-- made, in stages, each device's update followed through its states. A device's `hello` also
-- reports its anti-rollback version and the partition it booted from, which a deployment checks
-- (no downgrade below it) and compares after the reboot (the new image runs from the other one).

ALTER TABLE devices ADD COLUMN secure_version BIGINT;
ALTER TABLE devices ADD COLUMN partition TEXT;

CREATE TABLE deployments (
    id               UUID PRIMARY KEY NOT NULL,
    name             TEXT NOT NULL,
    firmware_sha256  TEXT NOT NULL REFERENCES firmware (sha256),
    target           TEXT NOT NULL,
    stages           TEXT NOT NULL,
    policy           TEXT NOT NULL,
    state            TEXT NOT NULL
        CHECK (state IN ('scheduled', 'running', 'paused', 'halted', 'cancelled', 'completed')),
    stage            BIGINT NOT NULL,
    stage_started_at TIMESTAMPTZ,
    reason           TEXT,
    created_by       UUID,
    created_at       TIMESTAMPTZ NOT NULL,
    start_at         TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ
);
CREATE INDEX deployments_by_state ON deployments (state, start_at);

CREATE TABLE deployment_devices (
    deployment_id  UUID NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    device_id      UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    stage          BIGINT NOT NULL,
    state          TEXT NOT NULL
        CHECK (state IN ('waiting', 'offered', 'downloading', 'downloaded', 'verifying',
                         'installing', 'rebooting', 'confirmed', 'failed', 'rolled_back',
                         'cancelled')),
    progress       BIGINT,
    reason         TEXT,
    command_id     UUID,
    from_version   TEXT,
    from_partition TEXT,
    offered_at     TIMESTAMPTZ,
    deadline       TIMESTAMPTZ,
    updated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_devices_by_device ON deployment_devices (device_id, state);
CREATE INDEX deployment_devices_by_deadline ON deployment_devices (deadline);
-- A device has at most one update in progress, whatever deployment it belongs to.
CREATE UNIQUE INDEX deployment_devices_one_open ON deployment_devices (device_id)
    WHERE state NOT IN ('confirmed', 'failed', 'rolled_back', 'cancelled');
