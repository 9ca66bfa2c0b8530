-- What a session proved: whether its login finished with a second factor, and when its
-- password was last presented (at login or on re-authentication), for operations that need a
-- recent password. Sessions opened before this migration count as verified with a second
-- factor only if they began after their user enabled TOTP (a login then needed a code), and as
-- authenticated when they began.
ALTER TABLE sessions ADD COLUMN mfa BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE sessions ADD COLUMN authenticated_at TIMESTAMPTZ;

UPDATE sessions SET authenticated_at = created_at;
ALTER TABLE sessions ALTER COLUMN authenticated_at SET NOT NULL;
UPDATE sessions SET mfa = TRUE WHERE EXISTS (
    SELECT 1 FROM users u
    WHERE u.id = sessions.user_id AND u.totp_enabled_at IS NOT NULL
      AND sessions.created_at > u.totp_enabled_at
);
