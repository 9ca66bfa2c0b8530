-- What devices report happening (`event {kind, data}` frames, and each `hello`), kept as long as
-- telemetry. Times are Unix microseconds.

CREATE TABLE device_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    kind      TEXT NOT NULL,
    data      TEXT,
    at        INTEGER NOT NULL
) STRICT;
CREATE INDEX device_events_by_device ON device_events (device_id, id);
CREATE INDEX device_events_by_at ON device_events (at);
