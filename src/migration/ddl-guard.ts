import { z } from "zod";
import type { AnySql } from "../db.js";
import { TRUNCATE_GUARD_FN, TRUNCATE_TRIGGER } from "../mirror/trigger.js";
import type { QualifiedName } from "../names.js";
import { sqlFile } from "../sql/template.js";
import { namesInSql } from "./phases.js";

/** The event trigger that refuses column changes to tables under migration (one per database; named so in
 * src/sql/ddl-guard-triggers.sql, as are the two below). */
export const DDL_GUARD_TRIGGER = "pgshift_ddl_guard";
/** Its companion on sql_drop: refuses to drop the table or its copy while the migration runs. */
export const DROP_GUARD_TRIGGER = "pgshift_drop_guard";
/**
 * Its companion on ddl_command_start: notes the partitions before ALTER TABLE and DROP, and refuses a concurrent
 * detach.
 */
export const PARTITION_GUARD_TRIGGER = "pgshift_partition_guard";
/**
 * Where ddl_command_start keeps the partitions it saw, for the same command's ddl_command_end or sql_drop (session
 * setting).
 */
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
 *
 * The SQL is in src/sql/ddl-guard.sql (the function) and src/sql/ddl-guard-triggers.sql (the event triggers);
 * which table of a migration is partitioned and which is the copy in its phase comes from namesInSql (phases.ts).
 * @returns two statements: the function (CREATE OR REPLACE), then a DO block creating the missing event triggers.
 */
export function ddlGuardSql(): string[] {
  const letThrough = `to let it through anyway, SET ${ALLOW_DDL_SETTING} = on`;
  const hint = `undo the migration (pgshift abort) or finish it (pgshift finalize) first; ${letThrough}`;
  const columnsHint =
    `finish the migration (pgshift finalize) or undo it (pgshift abort) first; ${letThrough} ` +
    "(pgshift status then lists the difference, and verify, cutover and swap-back refuse until it is undone)";
  // Which table is partitioned and which is the copy in a row's phase: the state machine's answer (phases.ts).
  const names = namesInSql();
  return [
    sqlFile("ddl-guard.sql", {
      fn: DDL_GUARD_FN,
      partitioned: names.partitioned,
      copy: names.copy,
      allow_ddl: ALLOW_DDL_SETTING,
      partitions: PARTITIONS_SETTING,
      truncate_trigger: TRUNCATE_TRIGGER,
      truncate_guard_fn: TRUNCATE_GUARD_FN,
      hint,
      columns_hint: columnsHint,
    }),
    sqlFile("ddl-guard-triggers.sql", { fn: DDL_GUARD_FN }),
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
    select (select count(*) from pg_catalog.pg_event_trigger where evtname = any(${GUARD_TRIGGERS})) =
      ${GUARD_TRIGGERS.length} as installed,
           (select count(*) from pg_catalog.pg_event_trigger where evtname = any(${GUARD_TRIGGERS}) and evtenabled <>
             'D') = ${GUARD_TRIGGERS.length} as enabled,
           (select rolsuper from pg_catalog.pg_roles where rolname = current_user) as superuser`;
  return GuardRow.parse(rows[0]);
}
