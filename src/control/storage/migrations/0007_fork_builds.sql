-- Pull-request builds from another repository (a fork) run without the
-- project's secrets and its preview step unless the project opts in with
-- fork_secrets; pull_request_builds remembers which builds are a fork's so
-- their retries stay fenced too.
ALTER TABLE projects
    ADD COLUMN fork_secrets boolean NOT NULL DEFAULT false;
ALTER TABLE pull_request_builds
    ADD COLUMN fork boolean NOT NULL DEFAULT false;
