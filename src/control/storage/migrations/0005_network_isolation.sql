-- Builds of a project with network_isolated run without network access
-- (the local launcher unshares the network namespace).
ALTER TABLE projects ADD COLUMN network_isolated boolean NOT NULL DEFAULT false;
