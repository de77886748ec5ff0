-- pgshift schema version 7: what pgshift remembers of each table it partitioned, once the migration is finalized,
-- so that pgshift maintain can keep its partitions in shape (premake, rows moved out of DEFAULT, retention) and
-- pgshift maintain --all knows which tables are pgshift's. One row per table, written by finalize (spec: the
-- --partition-by spec as JSON, as in pgshift.migrations), updated by maintain (its settings when given, the time
-- and the summary of its last run) and by the pg_partman hand-off (hand_off). CREATE ... IF NOT EXISTS: idempotent.
CREATE TABLE IF NOT EXISTS pgshift.partitioned_tables (
  table_schema text NOT NULL,
  table_name text NOT NULL,
  spec jsonb NOT NULL,
  premake integer NOT NULL DEFAULT 3 CHECK (premake >= 0),
  retention text,
  retention_keep_table boolean NOT NULL DEFAULT false,
  hand_off text,
  finalized_at timestamptz NOT NULL DEFAULT now(),
  last_maintained_at timestamptz,
  last_result jsonb,
  PRIMARY KEY (table_schema, table_name)
);

UPDATE pgshift.schema_version SET version = 7 WHERE version < 7;
