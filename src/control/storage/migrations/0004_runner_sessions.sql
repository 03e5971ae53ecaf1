-- The runner's current stream. A runner that reconnects starts a new
-- session; an older stream still open (half-open after a network cut) sees
-- that it was superseded and stops taking assignments, so none is sent into
-- a dead stream.
ALTER TABLE runners ADD COLUMN session_id uuid;
