-- Files that people upload: their records (the bytes are objects in the configured storage,
-- under `storage_key`), each owner's usage, kept in the transaction that adds or removes a
-- file so that a quota holds for uploads at once and across nodes, and quotas an admin set
-- for one user over their role's.
CREATE TABLE files (
    id           UUID PRIMARY KEY NOT NULL,
    owner_id     UUID REFERENCES users (id) ON DELETE SET NULL,
    state        TEXT NOT NULL
        CHECK (state IN ('pending_scan', 'ready', 'quarantined', 'deleted')),
    access       TEXT NOT NULL CHECK (access IN ('private', 'link', 'public')),
    name         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    storage_key  TEXT NOT NULL UNIQUE,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    deleted_at   TIMESTAMPTZ
);
CREATE INDEX files_by_owner ON files (owner_id, created_at, id);
CREATE INDEX files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE file_usage (
    owner_id UUID PRIMARY KEY NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    bytes    BIGINT NOT NULL,
    files    BIGINT NOT NULL
);

CREATE TABLE file_quotas (
    owner_id  UUID PRIMARY KEY NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    max_bytes BIGINT,
    max_files BIGINT
);
