-- The forward mirror's trigger function (mirrorFunctionSql in src/mirror/trigger.ts, writes "upsert"): each row
-- the application writes upserted into the partitioned shadow. Placeholders: :"fn" the function; :"to" the
-- target; :"columns" the columns written; :"key" the target's key; :old_key and :new_key the key as (OLD.k, ...)
-- and (NEW.k, ...); :new_values NEW.c, ... for the columns; :overriding nothing or " OVERRIDING SYSTEM VALUE";
-- :conflict DO NOTHING or DO UPDATE SET c = EXCLUDED.c, ...; :set c = NEW.c, ... for the columns outside the key
-- (the key's own when every column is in it); :tag the dollar quote, absent from the body.
--
-- An UPDATE that keeps the key updates the row in place, and upserts only when it found none: no speculative
-- insertion, no second probe of the key's index, no row lock (and its WAL record) before the update. It leaves
-- what the upsert leaves, in every race: a row found gets NEW's values outside the key, as DO UPDATE sets them; no
-- row found takes the upsert itself. Who else writes the row's key in the target meanwhile:
-- - the application: its writers of this row wait for the source row's lock, which this transaction holds;
-- - a backfill batch (no row lock on the source, ON CONFLICT DO NOTHING) or the DEFAULT move's copy: they only
--   insert. Their uncommitted copy is invisible to the UPDATE, which does not wait for it: the upsert does, and
--   overwrites it (an insert that did nothing on that conflict would keep the copy, a stale row: the fallback
--   must be the upsert). A copy not written yet meets this row and does nothing;
-- - the cleanup (src/backfill/cleanup.ts): it deletes only rows whose key the source lacks, after locking them;
--   the UPDATE waits for that lock, then updates the row kept or, deleted, finds none and upserts.
-- Under REPEATABLE READ it fails (serialization) where the upsert fails, and nowhere else: the key's row can be
-- deleted after this transaction's snapshot only with the source row, which this transaction could not update.
CREATE OR REPLACE FUNCTION :"fn"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS :tag
#variable_conflict use_column
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM :"to" WHERE (:"key") = :old_key;
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    IF :old_key IS DISTINCT FROM :new_key THEN
      DELETE FROM :"to" WHERE (:"key") = :old_key;
    ELSE
      UPDATE :"to" SET :set
        WHERE (:"key") = :new_key;
      IF FOUND THEN
        RETURN NULL;
      END IF;
    END IF;
  END IF;
  INSERT INTO :"to" (:"columns"):overriding
    VALUES (:new_values)
    ON CONFLICT (:"key") :conflict;
  RETURN NULL;
END
:tag
