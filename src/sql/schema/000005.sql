-- pgshift schema version 5: the reverse mirror of a migration in phase cutover inserts and updates without ever
-- overwriting (an older one upserts, and overwrites a row of the retired table when the application reuses its
-- key with another partition value). Upgrading from version 4 or older, src/migration/state.ts replaces the
-- reverse mirror function of each migration in phase cutover in the transaction of this file
-- (strictReverseMirrors: the function is written from each migration's row).
UPDATE pgshift.schema_version SET version = 5 WHERE version < 5;
