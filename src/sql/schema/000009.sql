-- pgshift schema version 9: the key ranges of a backfill with parallel workers (pgshift backfill --workers N). Each
-- row is one range of the original table's key, (lower, upper] (a null lower: from the first key; a null upper: to
-- the last), copied by one worker at a time: its checkpoint (the last key copied and clean, null: none yet), the rows
-- and batches counted there, and done once the whole range is copied. Written once when the copy is split (never
-- split again), then by the workers; the migration's own checkpoint is not used once ranges exist. Deleted with the
-- migration (ON DELETE CASCADE). CREATE ... IF NOT EXISTS: idempotent.
CREATE TABLE IF NOT EXISTS pgshift.backfill_ranges (
  migration_id bigint NOT NULL REFERENCES pgshift.migrations (id) ON DELETE CASCADE,
  range_no integer NOT NULL CHECK (range_no >= 0),
  lower text[],
  upper text[],
  checkpoint text[],
  rows_copied bigint NOT NULL DEFAULT 0,
  batches bigint NOT NULL DEFAULT 0,
  done boolean NOT NULL DEFAULT false,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (migration_id, range_no)
);

UPDATE pgshift.schema_version SET version = 9 WHERE version < 9;
