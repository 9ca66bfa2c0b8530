-- What each device and each owner stored today, in bytes (keys and values, and a fixed
-- overhead a point), reserved in the same transaction as the points: the daily budgets
-- (`telemetry_bytes_per_day`, `telemetry_bytes_per_owner_per_day`) hold across every node and
-- for batches written at once. `scope` is `device:<id>` or `owner:<id>`; `day` counts days
-- since 1970 (UTC). Days before yesterday are pruned with old telemetry.
CREATE TABLE telemetry_usage (
    scope TEXT NOT NULL,
    day   BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (scope, day)
);
