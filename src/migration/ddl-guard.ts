import { z } from "zod";
import type { AnySql } from "../db.js";
import { quoteQualified, type QualifiedName } from "../names.js";

/** The event trigger that refuses column changes to tables under migration (one per database). */
export const DDL_GUARD_TRIGGER = "pgshift_ddl_guard";
/** Its companion on sql_drop: refuses to drop the table or its copy while the migration runs. */
export const DROP_GUARD_TRIGGER = "pgshift_drop_guard";
export const DDL_GUARD_FN: QualifiedName = { schema: "pgshift", name: "ddl_guard" };
/** The setting that lets a refused ALTER TABLE through: `SET pgshift.allow_ddl = on`. */
export const ALLOW_DDL_SETTING = "pgshift.allow_ddl";

/**
 * The DDL guard: an event trigger on `ddl_command_end` for ALTER TABLE that refuses (rolls back) a change
 * leaving the columns of a table under migration out of step with its copy, while the mirror runs:
 * a column dropped, renamed, added or given another type on the table the application writes or on the
 * table the mirror fills. Without it, dropping a column the trigger mirror names makes every write of the
 * application fail, and the logical applier stops at the first change carrying other columns.
 *
 * The rule is the one columnDrift() (catalog/drift.ts) reports with: the two tables' columns (name, type,
 * generated or not) are the same, every mirrored column exists, and every non-generated column of the live
 * table is mirrored. An ALTER that leaves them so (an index, a default, a constraint, statistics, a rename
 * of the table by cutover) goes through; so does any ALTER when one of the two tables is missing (finalize
 * drops the retired table before it re-creates identity columns).
 *
 * A second event trigger on `sql_drop` (DROP TABLE, DROP SCHEMA) refuses to drop the table or its copy while
 * the migration runs: a dropped shadow makes every write of the application fail in trigger mode.
 * abort and finalize delete the migration's row before they drop its tables.
 *
 * SECURITY DEFINER with a fixed search_path: it runs for whoever alters any table in the database and must
 * read pgshift.migrations, which is private. Creating an event trigger needs superuser ("CREATE EVENT
 * TRIGGER" in the PostgreSQL documentation); `SET pgshift.allow_ddl = on` in the session lets a change
 * through (status then lists the difference, and verify, cutover and swap-back refuse until it is undone).
 */
export function ddlGuardSql(): string[] {
  const fn = quoteQualified(DDL_GUARD_FN);
  return [
    `CREATE OR REPLACE FUNCTION ${fn}() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $pgshift$
DECLARE
  altered oid;
  m record;
  live regclass;
  copy regclass;
  changed text;
BEGIN
  IF coalesce(current_setting('${ALLOW_DDL_SETTING}', true), '') = 'on' OR to_regclass('pgshift.migrations') IS NULL THEN
    RETURN;
  END IF;
  IF TG_EVENT = 'sql_drop' THEN
    FOR m IN SELECT source_schema, source_table, CASE WHEN phase = 'cutover' THEN retired_table ELSE shadow_table END AS copy_table
               FROM pgshift.migrations LOOP
      SELECT string_agg(format('%I.%I', d.schema_name, d.object_name), ', ' ORDER BY d.object_name) INTO changed
        FROM pg_event_trigger_dropped_objects() AS d
       WHERE d.object_type = 'table' AND d.schema_name = m.source_schema AND d.object_name IN (m.source_table, m.copy_table);
      IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'pgshift: DROP refused while % is being migrated: it would drop %', format('%I.%I', m.source_schema, m.source_table), changed
          USING ERRCODE = 'object_in_use',
                HINT = 'undo the migration (pgshift abort) or finish it (pgshift finalize) first; to drop it anyway, SET ${ALLOW_DDL_SETTING} = on';
      END IF;
    END LOOP;
    RETURN;
  END IF;
  FOR altered IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands() WHERE classid = 'pg_catalog.pg_class'::regclass LOOP
    FOR m IN SELECT source_schema, source_table, CASE WHEN phase = 'cutover' THEN retired_table ELSE shadow_table END AS copy_table, copy_columns
               FROM pgshift.migrations LOOP
      live := to_regclass(format('%I.%I', m.source_schema, m.source_table));
      copy := to_regclass(format('%I.%I', m.source_schema, m.copy_table));
      CONTINUE WHEN live IS NULL OR copy IS NULL OR altered NOT IN (live::oid, copy::oid);
      WITH l AS (SELECT attname::text AS n, format_type(atttypid, atttypmod) AS t, attgenerated::text AS g
                   FROM pg_attribute WHERE attrelid = live AND attnum > 0 AND NOT attisdropped),
           c AS (SELECT attname::text AS n, format_type(atttypid, atttypmod) AS t, attgenerated::text AS g
                   FROM pg_attribute WHERE attrelid = copy AND attnum > 0 AND NOT attisdropped)
      SELECT string_agg(DISTINCT n, ', ' ORDER BY n) INTO changed FROM (
        SELECT coalesce(l.n, c.n) AS n FROM l FULL JOIN c ON c.n = l.n
         WHERE l.n IS NULL OR c.n IS NULL OR l.t <> c.t OR l.g <> c.g
        UNION ALL SELECT n FROM l WHERE g = '' AND n <> ALL (m.copy_columns)
        UNION ALL SELECT x FROM unnest(m.copy_columns) AS x WHERE NOT EXISTS (SELECT FROM l WHERE l.n = x)
      ) AS d;
      IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'pgshift: ALTER TABLE refused while % is being migrated: the columns of % and % would differ (%)',
            live, live, copy, changed
          USING ERRCODE = 'object_in_use',
                HINT = 'finish the migration (pgshift finalize) or undo it (pgshift abort) first; to let it through anyway, SET ${ALLOW_DDL_SETTING} = on '
                       '(pgshift status then lists the difference, and verify, cutover and swap-back refuse until it is undone)';
      END IF;
    END LOOP;
  END LOOP;
END
$pgshift$`,
    `DO $pgshift$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = '${DDL_GUARD_TRIGGER}') THEN
    CREATE EVENT TRIGGER ${DDL_GUARD_TRIGGER} ON ddl_command_end WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION ${fn}();
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = '${DROP_GUARD_TRIGGER}') THEN
    CREATE EVENT TRIGGER ${DROP_GUARD_TRIGGER} ON sql_drop WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA') EXECUTE FUNCTION ${fn}();
  END IF;
END $pgshift$`,
  ];
}

const GuardRow = z.object({ installed: z.boolean(), enabled: z.boolean(), superuser: z.boolean() });

/**
 * Whether the DDL guard is in place in the current database, and whether the current user may install it.
 * @returns installed: both event triggers exist; enabled: both fire (evtenabled is not 'D');
 *   superuser: the current user is a superuser (needed to create it).
 */
export async function ddlGuardState(sql: AnySql): Promise<{ installed: boolean; enabled: boolean; superuser: boolean }> {
  const rows = await sql`
    select (select count(*) from pg_catalog.pg_event_trigger where evtname in (${DDL_GUARD_TRIGGER}, ${DROP_GUARD_TRIGGER})) = 2 as installed,
           (select count(*) from pg_catalog.pg_event_trigger where evtname in (${DDL_GUARD_TRIGGER}, ${DROP_GUARD_TRIGGER}) and evtenabled <> 'D') = 2 as enabled,
           (select rolsuper from pg_catalog.pg_roles where rolname = current_user) as superuser`;
  return GuardRow.parse(rows[0]);
}
