-- Rooms with members and roles, and their messages. A message's id is global and increasing:
-- the cursor for history and resume. (room, sender, client_msg_id) is unique, so a retried
-- send is stored once.
CREATE TABLE rooms (
    id                  UUID PRIMARY KEY,
    name                TEXT NOT NULL,
    visibility          TEXT NOT NULL CHECK (visibility IN ('public', 'private')),
    created_by          UUID REFERENCES users (id) ON DELETE SET NULL,
    created_at          TIMESTAMPTZ NOT NULL,
    retention_max_age   BIGINT,
    retention_max_count BIGINT
);

CREATE TABLE room_members (
    room_id   UUID NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id   UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_by_user ON room_members (user_id);

CREATE TABLE messages (
    id            BIGSERIAL PRIMARY KEY,
    room_id       UUID NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    sender_id     UUID NOT NULL,
    client_msg_id TEXT NOT NULL,
    body          TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    UNIQUE (room_id, sender_id, client_msg_id)
);
CREATE INDEX messages_by_room ON messages (room_id, id);
