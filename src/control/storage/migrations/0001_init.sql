-- Conveyor's first schema: accounts own projects, projects own builds, builds
-- own steps and log chunks. Every state change is a row before anyone hears of it.

CREATE TABLE accounts (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    concurrency_limit integer NOT NULL DEFAULT 6 CHECK (concurrency_limit > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_tokens (
    id uuid PRIMARY KEY,
    account_id uuid REFERENCES accounts (id) ON DELETE CASCADE,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('user', 'runner')),
    scopes text[] NOT NULL DEFAULT '{}',
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE TABLE projects (
    id uuid PRIMARY KEY,
    account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name text NOT NULL,
    repo_url text NOT NULL,
    production_branch text NOT NULL,
    build_command text NOT NULL DEFAULT '',
    deploy_command text NOT NULL DEFAULT '',
    preview_command text NOT NULL DEFAULT '',
    webhook_secret text NOT NULL,
    run_timeout_seconds integer NOT NULL,
    cancel_in_progress boolean NOT NULL DEFAULT false,
    build_other_branches boolean NOT NULL DEFAULT true,
    root_directory text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, name)
);

CREATE TABLE runners (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    capacity integer NOT NULL CHECK (capacity >= 0),
    labels text[] NOT NULL DEFAULT '{}',
    launcher text NOT NULL DEFAULT '',
    connected boolean NOT NULL DEFAULT false,
    connected_at timestamptz,
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE builds (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    account_id uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    branch text NOT NULL,
    commit_sha text NOT NULL,
    status text NOT NULL,
    status_reason text NOT NULL DEFAULT '',
    trigger text NOT NULL,
    retry_of uuid REFERENCES builds (id) ON DELETE SET NULL,
    production boolean NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- when the push that caused the build reached us (webhook), for push-to-running.
    received_at timestamptz,
    started_at timestamptz,
    running_at timestamptz,
    finished_at timestamptz,
    runner_id uuid REFERENCES runners (id) ON DELETE SET NULL,
    assigned_at timestamptz,
    dispatched_at timestamptz,
    token_hash bytea,
    cancel_requested_at timestamptz,
    cancel_status text,
    cancel_reason text,
    cancel_sent_at timestamptz,
    log_lines bigint NOT NULL DEFAULT 0,
    log_bytes bigint NOT NULL DEFAULT 0,
    log_closed boolean NOT NULL DEFAULT false,
    last_seq bigint NOT NULL DEFAULT 0,
    warnings text[] NOT NULL DEFAULT '{}'
);

CREATE INDEX builds_queued ON builds (account_id, created_at) WHERE status = 'queued';
CREATE INDEX builds_project ON builds (project_id, created_at DESC);
CREATE INDEX builds_runner ON builds (runner_id) WHERE runner_id IS NOT NULL
    AND status IN ('queued', 'initializing', 'running');

CREATE TABLE build_steps (
    build_id uuid NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    name text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    exit_code integer,
    started_at timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (build_id, idx)
);

-- One row per log batch the runner sent: seq makes a resent batch a no-op,
-- first_line..first_line+line_count-1 are the batch's line numbers.
CREATE TABLE log_chunks (
    build_id uuid NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    first_line bigint NOT NULL,
    line_count integer NOT NULL,
    seq bigint NOT NULL,
    data text NOT NULL,
    PRIMARY KEY (build_id, first_line),
    UNIQUE (build_id, seq)
);

CREATE TABLE webhook_deliveries (
    provider text NOT NULL,
    delivery_id text NOT NULL,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    received_at timestamptz NOT NULL DEFAULT now(),
    build_id uuid,
    PRIMARY KEY (provider, delivery_id)
);

-- Durable per-build alarms: startup deadline and run deadline.
CREATE TABLE alarms (
    build_id uuid NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('startup', 'run', 'kill')),
    fire_at timestamptz NOT NULL,
    PRIMARY KEY (build_id, kind)
);
CREATE INDEX alarms_due ON alarms (fire_at);
