-- A hardware id is unique among one owner's devices, not fleet-wide: a user who registers
-- someone else's MAC address no longer keeps its real owner from registering or claiming it,
-- nor learns that it exists. SQLite cannot drop the inline UNIQUE of `devices.hardware_id`
-- without rebuilding `devices`, which every device table references, so the ids move to a new
-- column and the old one stays empty (NULL, which UNIQUE allows any number of times).
ALTER TABLE devices ADD COLUMN hw_id TEXT;
UPDATE devices SET hw_id = hardware_id, hardware_id = NULL;
CREATE UNIQUE INDEX devices_hardware_per_owner ON devices (owner_id, hw_id)
    WHERE hw_id IS NOT NULL;
