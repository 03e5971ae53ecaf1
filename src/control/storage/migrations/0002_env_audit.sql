-- Project variables (secrets encrypted with AES-GCM, never in clear) and the
-- audit log of changes to projects, variables, tokens and accounts.

CREATE TABLE project_env (
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name text NOT NULL,
    secret boolean NOT NULL,
    -- Plain value of a non-secret variable; NULL for a secret.
    value text,
    -- AES-GCM of a secret's value: key id, nonce, ciphertext with tag.
    key_id text,
    nonce bytea,
    ciphertext bytea,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, name),
    CHECK ((secret AND value IS NULL AND ciphertext IS NOT NULL)
           OR (NOT secret AND value IS NOT NULL AND ciphertext IS NULL))
);

CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    account_id uuid REFERENCES accounts (id) ON DELETE CASCADE,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    details text NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_account ON audit_log (account_id, at DESC);
