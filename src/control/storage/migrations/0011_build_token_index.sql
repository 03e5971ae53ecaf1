-- The edge checks that a build token is live before it reads the request
-- (control/storage/build_tokens.py). Only builds that have not ended hold a
-- token hash, so this index stays as small as the set of running builds.
CREATE INDEX IF NOT EXISTS builds_live_token ON builds (token_hash) WHERE token_hash IS NOT NULL;
