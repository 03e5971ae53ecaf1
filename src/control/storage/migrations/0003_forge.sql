-- Forge integration: which pushes build (branch rules, watch paths), where a
-- project's commit statuses go, the pushes that did not build and why,
-- pull-request builds, deploy hooks, and the last commit status delivered
-- for each build.

ALTER TABLE projects
    ADD COLUMN branch_include text[] NOT NULL DEFAULT '{}',
    ADD COLUMN branch_exclude text[] NOT NULL DEFAULT '{}',
    ADD COLUMN watch_include text[] NOT NULL DEFAULT '{}',
    ADD COLUMN watch_exclude text[] NOT NULL DEFAULT '{}',
    ADD COLUMN forge text NOT NULL DEFAULT '' CHECK (forge IN ('', 'github', 'gitlab')),
    ADD COLUMN forge_api_url text NOT NULL DEFAULT '',
    ADD COLUMN forge_repo text NOT NULL DEFAULT '';

-- A forge event that queued nothing, with the reason a user sees in
-- `conveyor builds list --all`. Pruned to the newest rows per project.
CREATE TABLE skipped_pushes (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    provider text NOT NULL,
    event text NOT NULL,
    ref text NOT NULL DEFAULT '',
    branch text NOT NULL DEFAULT '',
    commit_sha text NOT NULL DEFAULT '',
    reason text NOT NULL,
    delivery_id text NOT NULL DEFAULT '',
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX skipped_pushes_account ON skipped_pushes (account_id, received_at DESC);
CREATE INDEX skipped_pushes_project ON skipped_pushes (project_id, received_at DESC);

-- Builds started by a pull (GitHub) or merge (GitLab) request, so closing
-- the request can cancel them.
CREATE TABLE pull_request_builds (
    build_id uuid PRIMARY KEY REFERENCES builds (id) ON DELETE CASCADE,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    number integer NOT NULL
);
CREATE INDEX pull_request_builds_number ON pull_request_builds (project_id, number);

-- Deploy hooks: the URL's key is a secret, stored as its SHA-256 only.
CREATE TABLE deploy_hooks (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name text NOT NULL,
    branch text NOT NULL,
    key_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX deploy_hooks_project ON deploy_hooks (project_id, created_at);

-- The last commit status sent to the forge for a build (in the forge's own
-- words), so a replica never sends the same one twice, and the last
-- delivery error.
CREATE TABLE forge_status_reports (
    build_id uuid PRIMARY KEY REFERENCES builds (id) ON DELETE CASCADE,
    forge text NOT NULL,
    state text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '',
    delivered_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    last_error text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
