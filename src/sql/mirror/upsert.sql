-- The forward mirror's trigger function (mirrorFunctionSql in src/mirror/trigger.ts, writes "upsert"): each row
-- the application writes upserted into the partitioned shadow. Placeholders: :"fn" the function; :old_key and
-- :new_key the key as (OLD.k, ...) and (NEW.k, ...); :tag the dollar quote, absent from the body; :declare nothing,
-- or the DECLARE section of the routed function (route.sql); :delete_old the delete of the old row (delete.sql) or
-- the routed deletes; :upsert_new the upsert of the new row (upsert-row.sql) or the routed upserts.
CREATE OR REPLACE FUNCTION :"fn"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS :tag
#variable_conflict use_column:declare
BEGIN
  IF TG_OP = 'DELETE' THEN
:delete_old
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' AND :old_key IS DISTINCT FROM :new_key THEN
:delete_old
  END IF;
:upsert_new
  RETURN NULL;
END
:tag
