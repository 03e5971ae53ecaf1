-- Retention (control/retention.py) deletes old rows in small batches; these
-- indexes keep each batch an index scan instead of a scan of a large table.

-- Old builds, oldest first, walked in (created_at, id) order across batches.
CREATE INDEX IF NOT EXISTS builds_created ON builds (created_at, id);
-- The newest builds of a branch, which retention keeps.
CREATE INDEX IF NOT EXISTS builds_branch ON builds (project_id, branch, created_at, id);
-- Deleting a build sets retry_of to NULL in its retries (ON DELETE SET
-- NULL) and checks for an active retry first: without this index both are a
-- scan of every build, once per deleted build.
CREATE INDEX IF NOT EXISTS builds_retry_of ON builds (retry_of) WHERE retry_of IS NOT NULL;
CREATE INDEX IF NOT EXISTS webhook_deliveries_received ON webhook_deliveries (received_at);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
CREATE INDEX IF NOT EXISTS skipped_pushes_received ON skipped_pushes (received_at);
