-- What devices report happening (`event {kind, data}` frames, and each `hello`), kept as long as
-- telemetry.

CREATE TABLE device_events (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id UUID NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    kind      TEXT NOT NULL,
    data      TEXT,
    at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX device_events_by_device ON device_events (device_id, id);
CREATE INDEX device_events_by_at ON device_events (at);
