-- What a session proved: whether its login finished with a second factor, and when its
-- password was last presented (at login or on re-authentication), for operations that need a
-- recent password. Sessions opened before this migration count as verified with a second
-- factor only if they began after their user enabled TOTP (a login then needed a code), and as
-- authenticated when they began.
ALTER TABLE sessions ADD COLUMN mfa INTEGER NOT NULL DEFAULT 0 CHECK (mfa IN (0, 1));
ALTER TABLE sessions ADD COLUMN authenticated_at INTEGER NOT NULL DEFAULT 0;

UPDATE sessions SET authenticated_at = created_at;
UPDATE sessions SET mfa = 1 WHERE EXISTS (
    SELECT 1 FROM users u
    WHERE u.id = sessions.user_id AND u.totp_enabled_at IS NOT NULL
      AND sessions.created_at > u.totp_enabled_at
);
