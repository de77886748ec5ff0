-- pgshift schema version 3: the DDL guard's third event trigger (pgshift_partition_guard, on ddl_command_start),
-- which an older guard function must not serve. The guard is not part of this schema (event triggers belong to
-- the database, and only a superuser creates them): upgrading from version 2 or older, src/migration/state.ts
-- replaces an installed guard with this pgshift's (upgradeDdlGuard) in the transaction of this file.
UPDATE pgshift.schema_version SET version = 3 WHERE version < 3;
