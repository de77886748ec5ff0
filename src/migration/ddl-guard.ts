import { z } from "zod";
import type { AnySql } from "../db.js";
import { TRUNCATE_GUARD_FN, TRUNCATE_TRIGGER } from "../mirror/trigger.js";
import { type QualifiedName, quoteQualified } from "../names.js";

/** The event trigger that refuses column changes to tables under migration (one per database). */
export const DDL_GUARD_TRIGGER = "pgshift_ddl_guard";
/** Its companion on sql_drop: refuses to drop the table or its copy while the migration runs. */
export const DROP_GUARD_TRIGGER = "pgshift_drop_guard";
/** Its companion on ddl_command_start: notes the partitions before ALTER TABLE and DROP, and refuses a concurrent detach. */
export const PARTITION_GUARD_TRIGGER = "pgshift_partition_guard";
/** Where ddl_command_start keeps the partitions it saw, for the same command's ddl_command_end or sql_drop (session setting). */
const PARTITIONS_SETTING = "pgshift.partitions_before";
const GUARD_TRIGGERS = [PARTITION_GUARD_TRIGGER, DDL_GUARD_TRIGGER, DROP_GUARD_TRIGGER];
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
 * Partitions of the partitioned table under migration (the shadow before cutover, the live table after):
 * a partition detached or dropped takes its rows out of one table and not the other (lost at cutover, or
 * brought back by swap-back), and a table attached with rows in it adds rows the other table never had.
 * A third event trigger, on `ddl_command_start` (ALTER TABLE, DROP TABLE, DROP SCHEMA), notes the
 * partitions in a session setting; ddl_command_end (ALTER TABLE) refuses when one of them is no longer
 * attached or a new one holds rows, and sql_drop when one of them is dropped. An event trigger cannot tell
 * ATTACH from DETACH from the command (pg_event_trigger_ddl_commands() names only the parent), hence the
 * snapshot. `DETACH PARTITION ... CONCURRENTLY` commits its first transaction (the partition detach-pending,
 * its rows already out of the parent) before ddl_command_end, so it is refused at ddl_command_start when the
 * statement's text names a partitioned table under migration ("ALTER TABLE", DETACH PARTITION, in the
 * PostgreSQL documentation). Empty partitions may be created and attached (CREATE TABLE ... PARTITION OF);
 * ddl_command_end (ALTER TABLE, CREATE TABLE) gives each new partition of the partitioned table (the shadow
 * before cutover, the live table after) the TRUNCATE guard the others have (a TRUNCATE of a partition fires
 * only that partition's triggers).
 *
 * SECURITY DEFINER with a fixed search_path: it runs for whoever alters any table in the database and must
 * read pgshift.migrations, which is private. Creating an event trigger needs superuser ("CREATE EVENT
 * TRIGGER" in the PostgreSQL documentation); `SET pgshift.allow_ddl = on` in the session lets a change
 * through (status then lists the difference, and verify, cutover and swap-back refuse until it is undone);
 * a partition detached that way loses its TRUNCATE guard, as it is no longer part of the migration.
 */
export function ddlGuardSql(): string[] {
  const fn = quoteQualified(DDL_GUARD_FN);
  const hint = `'undo the migration (pgshift abort) or finish it (pgshift finalize) first; to let it through anyway, SET ${ALLOW_DDL_SETTING} = on'`;
  return [
    `CREATE OR REPLACE FUNCTION ${fn}() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $pgshift$
DECLARE
  allowed boolean;
  snapshot text;
  altered oid;
  m record;
  live regclass;
  copy regclass;
  changed text;
  part regclass;
  has_rows boolean;
BEGIN
  IF to_regclass('pgshift.migrations') IS NULL THEN
    RETURN;
  END IF;
  allowed := coalesce(current_setting('${ALLOW_DDL_SETTING}', true), '') = 'on';
  IF TG_EVENT = 'ddl_command_start' THEN
    -- The partitions of each partitioned table under migration (the shadow before cutover, the live table
    -- after), as root oid:member oid, the root included. Kept for the session, not the transaction:
    -- DETACH PARTITION ... CONCURRENTLY ends in another transaction than the one it starts in.
    SELECT coalesce(string_agg(format('%s:%s', r.root::oid, t.relid::oid), ','), '') INTO snapshot
      FROM (SELECT to_regclass(format('%I.%I', source_schema, CASE WHEN phase = 'cutover' THEN source_table ELSE shadow_table END)) AS root
              FROM pgshift.migrations) AS r
      CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
     WHERE r.root IS NOT NULL;
    PERFORM set_config('${PARTITIONS_SETTING}', snapshot, false);
    -- A concurrent detach commits its first transaction before ddl_command_end: refused there, it would leave
    -- the partition detach-pending (its rows already gone from the table). Refused here instead, when the
    -- statement names a partitioned table under migration.
    IF TG_TAG = 'ALTER TABLE' AND NOT allowed AND current_query() ~* 'detach[[:space:]]+partition.*concurrently' THEN
      FOR m IN SELECT CASE WHEN phase = 'cutover' THEN source_table ELSE shadow_table END AS parted, source_schema, source_table
                 FROM pgshift.migrations LOOP
        IF strpos(lower(current_query()), lower(m.parted)) > 0 THEN
          RAISE EXCEPTION 'pgshift: DETACH PARTITION CONCURRENTLY refused while % is being migrated: the statement names %, whose partitions hold the rows of the migration',
              format('%I.%I', m.source_schema, m.source_table), format('%I.%I', m.source_schema, m.parted)
            USING ERRCODE = 'object_in_use', HINT = ${hint};
        END IF;
      END LOOP;
    END IF;
    RETURN;
  END IF;
  -- Both tables of a migration carry the TRUNCATE guard, and TRUNCATE of one partition fires only that
  -- partition's triggers: a partition this command created or attached (in the shadow, or in the live table
  -- after cutover) gets the guard too. Only those: this runs for every CREATE and ALTER TABLE in the
  -- database, and must not lock other tables (the command already holds the new partition's lock).
  IF TG_EVENT = 'ddl_command_end' AND TG_TAG = 'CREATE TABLE' THEN
    FOR part IN SELECT t.relid
                  FROM (SELECT to_regclass(format('%I.%I', source_schema, CASE WHEN phase = 'cutover' THEN source_table ELSE shadow_table END)) AS root
                          FROM pgshift.migrations) AS r
                  CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
                 WHERE r.root IS NOT NULL AND t.level > 0
                   AND t.relid::oid IN (SELECT c.objid FROM pg_event_trigger_ddl_commands() AS c WHERE c.classid = 'pg_catalog.pg_class'::regclass)
                   AND NOT EXISTS (SELECT FROM pg_trigger AS g WHERE g.tgrelid = t.relid AND g.tgname = '${TRUNCATE_TRIGGER}') LOOP
      EXECUTE format('CREATE TRIGGER ${TRUNCATE_TRIGGER} BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION ${quoteQualified(TRUNCATE_GUARD_FN)}()', part);
    END LOOP;
    RETURN;
  END IF;
  snapshot := coalesce(current_setting('${PARTITIONS_SETTING}', true), '');
  IF snapshot <> '' THEN
    PERFORM set_config('${PARTITIONS_SETTING}', '', false);
  END IF;
  IF TG_EVENT = 'ddl_command_end' THEN
    -- ALTER TABLE: the members that were not there at ddl_command_start (ATTACH PARTITION).
    FOR part IN SELECT t.relid
                  FROM (SELECT DISTINCT split_part(pair, ':', 1)::oid::regclass AS root FROM unnest(string_to_array(snapshot, ',')) AS pair) AS r
                  CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
                 WHERE t.level > 0
                   AND t.relid::oid::text <> ALL (SELECT split_part(pair, ':', 2) FROM unnest(string_to_array(snapshot, ',')) AS pair)
                   AND NOT EXISTS (SELECT FROM pg_trigger AS g WHERE g.tgrelid = t.relid AND g.tgname = '${TRUNCATE_TRIGGER}') LOOP
      EXECUTE format('CREATE TRIGGER ${TRUNCATE_TRIGGER} BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION ${quoteQualified(TRUNCATE_GUARD_FN)}()', part);
    END LOOP;
  END IF;
  IF allowed THEN
    -- Let through. A partition detached this way leaves the migration, and its TRUNCATE guard with it.
    IF TG_EVENT = 'ddl_command_end' THEN
      FOR part IN SELECT split_part(s.pair, ':', 2)::oid::regclass
                    FROM unnest(string_to_array(snapshot, ',')) AS s(pair)
                   WHERE EXISTS (SELECT FROM pg_trigger AS g WHERE g.tgrelid = split_part(s.pair, ':', 2)::oid AND g.tgname = '${TRUNCATE_TRIGGER}')
                     AND NOT EXISTS (SELECT FROM pg_partition_tree(split_part(s.pair, ':', 1)::oid::regclass) AS t
                                      WHERE t.relid::oid = split_part(s.pair, ':', 2)::oid) LOOP
        EXECUTE format('DROP TRIGGER ${TRUNCATE_TRIGGER} ON %s', part);
      END LOOP;
    END IF;
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
          USING ERRCODE = 'object_in_use', HINT = ${hint};
      END IF;
    END LOOP;
    -- A partition of a partitioned table under migration (its oid is gone from the catalog by now: the
    -- snapshot of ddl_command_start knows it).
    SELECT string_agg(format('%I.%I (a partition of %s)', d.schema_name, d.object_name, split_part(s.pair, ':', 1)::oid::regclass), ', ' ORDER BY d.object_name) INTO changed
      FROM pg_event_trigger_dropped_objects() AS d
      JOIN unnest(string_to_array(snapshot, ',')) AS s(pair) ON split_part(s.pair, ':', 2)::oid = d.objid
     WHERE d.object_type = 'table' AND split_part(s.pair, ':', 1) <> split_part(s.pair, ':', 2);
    IF changed IS NOT NULL THEN
      RAISE EXCEPTION 'pgshift: DROP refused while a table is being migrated: it would drop %, and the rows in it with it', changed
        USING ERRCODE = 'object_in_use', HINT = ${hint};
    END IF;
    RETURN;
  END IF;
  -- ddl_command_end of ALTER TABLE. Partitions: none detached, none attached with rows in it.
  SELECT string_agg(format('%s (from %s)', split_part(s.pair, ':', 2)::oid::regclass, split_part(s.pair, ':', 1)::oid::regclass), ', ') INTO changed
    FROM unnest(string_to_array(snapshot, ',')) AS s(pair)
   WHERE NOT EXISTS (SELECT FROM pg_partition_tree(split_part(s.pair, ':', 1)::oid::regclass) AS t
                      WHERE t.relid::oid = split_part(s.pair, ':', 2)::oid);
  IF changed IS NOT NULL THEN
    RAISE EXCEPTION 'pgshift: ALTER TABLE refused while a table is being migrated: it would detach %, and the rows in it with it', changed
      USING ERRCODE = 'object_in_use', HINT = ${hint};
  END IF;
  FOR part IN SELECT t.relid
                FROM (SELECT DISTINCT split_part(pair, ':', 1)::oid::regclass AS root FROM unnest(string_to_array(snapshot, ',')) AS pair) AS r
                CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
                JOIN pg_class AS c ON c.oid = t.relid
               WHERE t.level > 0 AND c.relkind = 'r'
                 AND t.relid::oid::text <> ALL (SELECT split_part(pair, ':', 2) FROM unnest(string_to_array(snapshot, ',')) AS pair) LOOP
    EXECUTE format('SELECT EXISTS (SELECT FROM ONLY %s)', part) INTO has_rows;
    IF has_rows THEN
      RAISE EXCEPTION 'pgshift: ALTER TABLE refused while a table is being migrated: it would attach %, which holds rows the other table of the migration does not have, to %',
          part, (SELECT inhparent::regclass FROM pg_inherits WHERE inhrelid = part)
        USING ERRCODE = 'object_in_use', HINT = ${hint};
    END IF;
  END LOOP;
  -- Columns.
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
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = '${PARTITION_GUARD_TRIGGER}') THEN
    CREATE EVENT TRIGGER ${PARTITION_GUARD_TRIGGER} ON ddl_command_start WHEN TAG IN ('ALTER TABLE', 'DROP TABLE', 'DROP SCHEMA') EXECUTE FUNCTION ${fn}();
  END IF;
  -- Up to schema version 2 it fired for ALTER TABLE only.
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = '${DDL_GUARD_TRIGGER}' AND evttags @> ARRAY['ALTER TABLE', 'CREATE TABLE']) THEN
    DROP EVENT TRIGGER IF EXISTS ${DDL_GUARD_TRIGGER};
    CREATE EVENT TRIGGER ${DDL_GUARD_TRIGGER} ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE') EXECUTE FUNCTION ${fn}();
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = '${DROP_GUARD_TRIGGER}') THEN
    CREATE EVENT TRIGGER ${DROP_GUARD_TRIGGER} ON sql_drop WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA') EXECUTE FUNCTION ${fn}();
  END IF;
END $pgshift$`,
  ];
}

/**
 * Brings a DDL guard an older pgshift installed (schema version 2: no partition guard) to this one: the
 * function replaced and the missing event triggers created, when the current user is a superuser and some
 * guard is installed. Nothing otherwise (status then reports the guard missing).
 * @throws PostgresError when a statement fails.
 */
export async function upgradeDdlGuard(sql: AnySql): Promise<void> {
  const rows = await sql`
    select exists (select from pg_catalog.pg_event_trigger where evtname = any(${GUARD_TRIGGERS}))
           and (select rolsuper from pg_catalog.pg_roles where rolname = current_user) as upgrade`;
  if (!z.object({ upgrade: z.boolean() }).parse(rows[0]).upgrade) return;
  for (const stmt of ddlGuardSql()) await sql.unsafe(stmt);
}

const GuardRow = z.object({ installed: z.boolean(), enabled: z.boolean(), superuser: z.boolean() });

/**
 * Whether the DDL guard is in place in the current database, and whether the current user may install it.
 * @returns installed: all three event triggers exist; enabled: all three fire (evtenabled is not 'D');
 *   superuser: the current user is a superuser (needed to create it).
 */
export async function ddlGuardState(
  sql: AnySql,
): Promise<{ installed: boolean; enabled: boolean; superuser: boolean }> {
  const rows = await sql`
    select (select count(*) from pg_catalog.pg_event_trigger where evtname = any(${GUARD_TRIGGERS})) = ${GUARD_TRIGGERS.length} as installed,
           (select count(*) from pg_catalog.pg_event_trigger where evtname = any(${GUARD_TRIGGERS}) and evtenabled <> 'D') = ${GUARD_TRIGGERS.length} as enabled,
           (select rolsuper from pg_catalog.pg_roles where rolname = current_user) as superuser`;
  return GuardRow.parse(rows[0]);
}
