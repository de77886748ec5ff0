-- The reverse mirror's trigger function (mirrorFunctionSql in src/mirror/trigger.ts, writes "strict"): each row
-- the application writes into the partitioned table after cutover written into the retired table, never
-- overwriting one. Placeholders: :"fn" the function; :"to" the target; :"columns" the columns written; :"key"
-- the target's key; :old_key the key as (OLD.k, ...); :new_values NEW.c, ... for the columns; :overriding nothing
-- or " OVERRIDING SYSTEM VALUE"; :update the UPDATE by the old key; :tag the dollar quote, absent from the body.
CREATE OR REPLACE FUNCTION :"fn"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS :tag
#variable_conflict use_column
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM :"to" WHERE (:"key") = :old_key;
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' THEN
:update
    IF FOUND THEN
      RETURN NULL;
    END IF;
  END IF;
  INSERT INTO :"to" (:"columns"):overriding
    VALUES (:new_values);
  RETURN NULL;
END
:tag
