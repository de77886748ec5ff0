-- pgshift schema version 8: migration groups (pgshift start --group <name>). group_name names the group a migration
-- belongs to (null: none); the commands given --group act on every migration of the group, and cutover and swap-back
-- switch all of them in one transaction (docs/groups.md). ALTER only when missing: an ALTER takes an exclusive lock
-- on the table.
DO $pgshift$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                  WHERE attrelid = 'pgshift.migrations'::regclass AND attname = 'group_name' AND NOT attisdropped) THEN
    ALTER TABLE pgshift.migrations ADD COLUMN IF NOT EXISTS group_name text;
  END IF;
END $pgshift$;

UPDATE pgshift.schema_version SET version = 8 WHERE version < 8;
