-- Devices that joined a deployment after it was made (its `join_new`): when they joined.
ALTER TABLE deployment_devices ADD COLUMN joined_at INTEGER;
