-- Per-project build-cache settings. Empty lists mean the defaults the
-- control plane hands to runners; cache_generation goes up by one with each
-- purge, and runners collect the objects of older generations.
ALTER TABLE projects
    ADD COLUMN cache_disabled boolean NOT NULL DEFAULT false,
    ADD COLUMN cache_lockfiles text[] NOT NULL DEFAULT '{}',
    ADD COLUMN cache_paths text[] NOT NULL DEFAULT '{}',
    ADD COLUMN cache_generation bigint NOT NULL DEFAULT 1;
