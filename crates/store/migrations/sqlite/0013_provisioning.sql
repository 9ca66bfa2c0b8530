-- Provisioning tokens: a device exchanges one (from a QR code) for its own key. Only the
-- token's SHA-256 is kept. A token is for one model, gives its tags to the devices it makes,
-- and is used up after `max_uses` claims or at `expires_at`. Times are Unix microseconds.

CREATE TABLE provisioning_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    owner_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_by   TEXT,
    model        TEXT NOT NULL,
    tags         TEXT NOT NULL,
    max_uses     INTEGER NOT NULL CHECK (max_uses > 0),
    uses         INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    revoked_at   INTEGER,
    last_used_at INTEGER
) STRICT;
CREATE INDEX provisioning_tokens_by_owner ON provisioning_tokens (owner_id, created_at);
