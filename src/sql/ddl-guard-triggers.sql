-- The DDL guard's three event triggers, each created when missing (ddlGuardSql in src/migration/ddl-guard.ts,
-- whose PARTITION_GUARD_TRIGGER, DDL_GUARD_TRIGGER and DROP_GUARD_TRIGGER name them as here). Placeholder: :"fn"
-- the guard's function.
DO $pgshift$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgshift_partition_guard') THEN
    CREATE EVENT TRIGGER pgshift_partition_guard ON ddl_command_start
      WHEN TAG IN ('ALTER TABLE', 'DROP TABLE', 'DROP SCHEMA') EXECUTE FUNCTION :"fn"();
  END IF;
  -- Up to schema version 2 it fired for ALTER TABLE only.
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger
                  WHERE evtname = 'pgshift_ddl_guard' AND evttags @> ARRAY['ALTER TABLE', 'CREATE TABLE']) THEN
    DROP EVENT TRIGGER IF EXISTS pgshift_ddl_guard;
    CREATE EVENT TRIGGER pgshift_ddl_guard ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
      EXECUTE FUNCTION :"fn"();
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgshift_drop_guard') THEN
    CREATE EVENT TRIGGER pgshift_drop_guard ON sql_drop WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA')
      EXECUTE FUNCTION :"fn"();
  END IF;
END $pgshift$
