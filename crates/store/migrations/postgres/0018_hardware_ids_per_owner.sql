-- A hardware id is unique among one owner's devices, not fleet-wide: a user who registers
-- someone else's MAC address no longer keeps its real owner from registering or claiming it,
-- nor learns that it exists. The ids move to a new column, as on SQLite (which cannot drop the
-- old column's UNIQUE without rebuilding `devices`), and the old column goes.
ALTER TABLE devices ADD COLUMN hw_id TEXT;
UPDATE devices SET hw_id = hardware_id;
ALTER TABLE devices DROP COLUMN hardware_id;
CREATE UNIQUE INDEX devices_hardware_per_owner ON devices (owner_id, hw_id)
    WHERE hw_id IS NOT NULL;
