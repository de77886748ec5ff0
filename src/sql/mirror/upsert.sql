-- The forward mirror's trigger function (mirrorFunctionSql in src/mirror/trigger.ts, writes "upsert"): each row
-- the application writes upserted into the partitioned shadow. Placeholders: :"fn" the function; :"to" the
-- target; :"columns" the columns written; :"key" the target's key; :old_key and :new_key the key as (OLD.k, ...)
-- and (NEW.k, ...); :new_values NEW.c, ... for the columns; :overriding nothing or " OVERRIDING SYSTEM VALUE";
-- :conflict DO NOTHING or DO UPDATE SET c = EXCLUDED.c, ...; :tag the dollar quote, absent from the body.
-- An UPDATE that keeps the key is upserted too: an UPDATE first, the upsert only when it finds no row, would be as
-- correct but was measured no cheaper (scripts/bench-mirror-row; most likely because its generic plan locks every
-- partition of the target, where the upsert's tuple routing opens one).
CREATE OR REPLACE FUNCTION :"fn"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS :tag
#variable_conflict use_column
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM :"to" WHERE (:"key") = :old_key;
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' AND :old_key IS DISTINCT FROM :new_key THEN
    DELETE FROM :"to" WHERE (:"key") = :old_key;
  END IF;
  INSERT INTO :"to" (:"columns"):overriding
    VALUES (:new_values)
    ON CONFLICT (:"key") :conflict;
  RETURN NULL;
END
:tag
