-- Firmware images, content-addressed by their SHA-256 and immutable: the facts read from the
-- image (or given, for generic images), the signed manifest as uploaded, and retirement (no new
-- deployments). The image's bytes live in the firmware folder, named by the SHA-256.

CREATE TABLE firmware (
    sha256         TEXT PRIMARY KEY NOT NULL,
    size           BIGINT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('esp32', 'generic')),
    project        TEXT NOT NULL,
    target         TEXT NOT NULL,
    version        TEXT NOT NULL,
    secure_version BIGINT NOT NULL,
    idf_version    TEXT,
    elf_sha256     TEXT,
    manifest       TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    uploaded_by    UUID,
    uploaded_at    TIMESTAMPTZ NOT NULL,
    retired_at     TIMESTAMPTZ,
    UNIQUE (project, target, version)
);
CREATE INDEX firmware_by_project ON firmware (project, target, uploaded_at);
