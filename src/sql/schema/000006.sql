-- pgshift schema version 6: the pace of the copy and the verify, kept where another process sees it
-- (pgshift status, pgshift resume). pgshift pause sets paused_at, paused_by (current_user) and paused_client (the
-- pausing session's application_name and client address); resume clears them; a running backfill or verify waits
-- between batches while paused_at is set. A running copy or verify keeps what it waits for in throttle_reason and
-- since when in throttle_since (both null when it does not wait), and the backfill the batch size in use
-- (batch_rows), its target duration (batch_target_ms, null for fixed-size batches) and how long the last batch
-- took (last_batch_ms). ALTER only when missing: an ALTER takes an exclusive lock on the table.
DO $pgshift$
DECLARE
  col text[];
BEGIN
  FOREACH col SLICE 1 IN ARRAY ARRAY[
    ['paused_at', 'timestamptz'], ['paused_by', 'text'], ['paused_client', 'text'],
    ['throttle_reason', 'text'], ['throttle_since', 'timestamptz'],
    ['batch_rows', 'integer'], ['batch_target_ms', 'integer'], ['last_batch_ms', 'integer']
  ] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                    WHERE attrelid = 'pgshift.migrations'::regclass AND attname = col[1] AND NOT attisdropped) THEN
      EXECUTE format('ALTER TABLE pgshift.migrations ADD COLUMN IF NOT EXISTS %I %s', col[1], col[2]);
    END IF;
  END LOOP;
END $pgshift$;

UPDATE pgshift.schema_version SET version = 6 WHERE version < 6;
