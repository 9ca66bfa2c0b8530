-- Rooms with members and roles, and their messages. A message's id is global and increasing:
-- the cursor for history and resume. (room, sender, client_msg_id) is unique, so a retried
-- send is stored once.
CREATE TABLE rooms (
    id                TEXT PRIMARY KEY NOT NULL,
    name              TEXT NOT NULL,
    visibility        TEXT NOT NULL CHECK (visibility IN ('public', 'private')),
    created_by        TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at        INTEGER NOT NULL,
    retention_max_age INTEGER,
    retention_max_count INTEGER
) STRICT;

CREATE TABLE room_members (
    room_id   TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id   TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) STRICT;
CREATE INDEX room_members_by_user ON room_members (user_id);

CREATE TABLE messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id       TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    sender_id     TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    body          TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    UNIQUE (room_id, sender_id, client_msg_id)
) STRICT;
CREATE INDEX messages_by_room ON messages (room_id, id);
