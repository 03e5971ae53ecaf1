-- Dashboard sign-ins. The cookie holds a random id; only its SHA-256 is
-- stored, like API tokens. A session lives no longer than expires_at and no
-- longer than the token it was opened with: every lookup joins api_tokens
-- and requires revoked_at IS NULL, and deleting the token deletes it.
CREATE TABLE web_sessions (
    id_hash bytea PRIMARY KEY,
    token_id uuid NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    csrf_token text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);
CREATE INDEX web_sessions_token ON web_sessions (token_id);
