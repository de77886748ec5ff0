-- pgshift schema version 4: both tables of a migration carry the TRUNCATE guard, and the DDL guard gives it to
-- new partitions of the shadow too (an older pgshift would put back a guard function that does not). Upgrading
-- from version 3 or older, src/migration/state.ts gives the copy of each migration in progress the TRUNCATE guard
-- before this file (guardCopies: per table, under lock_timeout with retries) and replaces an installed DDL guard
-- in its transaction (upgradeDdlGuard).
UPDATE pgshift.schema_version SET version = 4 WHERE version < 4;
