-- pgshift schema version 2: pgshift.migrations.copies_lsn (the WAL position after the backfill's copy, logical
-- mode). ALTER only when missing: an ALTER takes an exclusive lock on the table.
DO $pgshift$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                  WHERE attrelid = 'pgshift.migrations'::regclass AND attname = 'copies_lsn') THEN
    ALTER TABLE pgshift.migrations ADD COLUMN IF NOT EXISTS copies_lsn text;
  END IF;
END $pgshift$;

UPDATE pgshift.schema_version SET version = 2 WHERE version < 2;
