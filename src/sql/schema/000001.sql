-- pgshift schema version 1: the state of the migrations, the version table, and the TRUNCATE guard's function.
-- Each file of this folder brings the schema from the version before it to its own (src/migration/state.ts runs
-- them: all in order on a fresh database, the missing ones in one transaction each on an older schema). Every
-- statement is idempotent, and each file ends by raising pgshift.schema_version to its number, never lowering it.
CREATE SCHEMA IF NOT EXISTS pgshift;

CREATE TABLE IF NOT EXISTS pgshift.migrations (
  id bigserial PRIMARY KEY,
  source_schema text NOT NULL,
  source_table text NOT NULL,
  shadow_table text NOT NULL,
  retired_table text NOT NULL,
  spec jsonb NOT NULL,
  mode text NOT NULL,
  phase text NOT NULL,
  key_columns text[] NOT NULL,
  shadow_key text[] NOT NULL,
  copy_columns text[] NOT NULL,
  sequences jsonb NOT NULL,
  mirror_function text NOT NULL,
  deferred_indexes jsonb NOT NULL DEFAULT '[]',
  slot_name text,
  publication_name text,
  applied_lsn text,
  applied_commit_time timestamptz,
  index_renames jsonb NOT NULL DEFAULT '[]',
  checkpoint text[],
  rows_copied bigint NOT NULL DEFAULT 0,
  rows_estimated bigint NOT NULL DEFAULT 0,
  batches bigint NOT NULL DEFAULT 0,
  last_verify jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  backfill_started_at timestamptz,
  copy_finished_at timestamptz,
  backfill_finished_at timestamptz,
  cutover_at timestamptz,
  swapped_back_at timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (source_schema, source_table)
);

CREATE TABLE IF NOT EXISTS pgshift.schema_version (version int NOT NULL);
-- A replica identity, so that a FOR ALL TABLES publication (which publishes this table too) does not make
-- PostgreSQL refuse the files' UPDATE of it ("does not have a replica identity and publishes updates").
DO $$
BEGIN
  IF (SELECT relreplident FROM pg_catalog.pg_class WHERE oid = 'pgshift.schema_version'::regclass) <> 'f' THEN
    ALTER TABLE pgshift.schema_version REPLICA IDENTITY FULL;
  END IF;
END $$;

-- Lets application roles call the identity default functions (pgshift.nextval_*); tables stay private.
GRANT USAGE ON SCHEMA pgshift TO PUBLIC;

INSERT INTO pgshift.schema_version SELECT 1 WHERE NOT EXISTS (SELECT FROM pgshift.schema_version);

-- Refuses TRUNCATE of a table under migration (TRUNCATE_GUARD_FN in src/mirror/trigger.ts): the triggers that
-- call it are created by start, cutover, swap-back and the DDL guard.
CREATE OR REPLACE FUNCTION "pgshift"."truncate_guard"() RETURNS trigger LANGUAGE plpgsql AS $pgshift$
BEGIN
  RAISE EXCEPTION 'pgshift: TRUNCATE of %.% is refused while the table is being migrated',
      TG_TABLE_SCHEMA, TG_TABLE_NAME
    USING ERRCODE = 'object_in_use',
          HINT = 'finish the migration (pgshift finalize) or undo it (pgshift abort) first';
END
$pgshift$;
