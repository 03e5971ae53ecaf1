-- The isolation a runner gives builds, as it says in its hello:
-- 'bubblewrap', 'none' (the operator chose --sandbox none) or 'nomad'; ''
-- for a runner too old to say.
ALTER TABLE runners ADD COLUMN sandbox text NOT NULL DEFAULT '';

-- The same, recorded on each build when it is given to a runner, so
-- `builds show` tells how that build was isolated even after its runner
-- restarts with another mode. A trigger rather than a column in each
-- assignment statement: every path that assigns a build records it.
ALTER TABLE builds ADD COLUMN runner_sandbox text NOT NULL DEFAULT '';

CREATE FUNCTION builds_record_runner_sandbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.runner_id IS NOT NULL AND NEW.runner_id IS DISTINCT FROM OLD.runner_id THEN
        NEW.runner_sandbox := coalesce(
            (SELECT sandbox FROM runners WHERE id = NEW.runner_id), '');
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER builds_record_runner_sandbox
    BEFORE UPDATE OF runner_id ON builds
    FOR EACH ROW EXECUTE FUNCTION builds_record_runner_sandbox();
