/**
 * What pgshift remembers of each table it partitioned once the migration is finalized (pgshift.partitioned_tables,
 * schema version 7): the spec and the settings of pgshift maintain. finalize writes the row (recordSql), maintain
 * reads it (loadPartitioned, listPartitioned) and keeps its settings and last run there.
 */
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import {
  loadMigration,
  type Migration,
  type PartitionedTableRow,
  PartitionedTableRowSchema,
} from "../migration/state.js";
import { displayName, type QualifiedName, quoteLiteral } from "../names.js";

/**
 * The statement finalize runs in its transaction: remember `m`'s table and spec (a table finalized again, after
 * a new migration, gets the new spec; the maintain settings stay, the hand-off is forgotten).
 */
export function recordSql(m: Migration): string {
  return (
    `INSERT INTO pgshift.partitioned_tables (table_schema, table_name, spec) VALUES (${quoteLiteral(
      m.live.schema,
    )}, ${quoteLiteral(m.live.name)}, ${quoteLiteral(JSON.stringify(m.spec))}::jsonb) ` +
    "ON CONFLICT (table_schema, table_name) DO UPDATE SET spec = EXCLUDED.spec, finalized_at = now(), hand_off = NULL"
  );
}

/**
 * The row of `table`, checking (and, unless `upgrade` is false, upgrading) the pgshift schema first.
 * @throws PgshiftError (exit 2) when pgshift did not partition `table` (no row), or a migration of it is in
 *   progress (finalize it first), or the row is malformed.
 */
export async function loadPartitioned(
  sql: AnySql,
  table: QualifiedName,
  opts: { upgrade?: boolean } = {},
): Promise<PartitionedTableRow> {
  const m = await loadMigration(sql, table, opts);
  if (m)
    throw new PgshiftError(
      `${displayName(table)} is still under migration (phase ${m.phase}): maintain acts after finalize`,
      {
        hint: `finish it first: ${m.phase === "cutover" ? "pgshift finalize --yes" : "pgshift cutover, then finalize"}`,
      },
    );
  const rows = (await hasRegistry(sql))
    ? await sql`select * from pgshift.partitioned_tables
                 where table_schema = ${table.schema} and table_name = ${table.name}`
    : [];
  if (rows.length === 0)
    throw new PgshiftError(`pgshift did not partition ${displayName(table)}: it has no finalized migration of it`, {
      hint: "maintain keeps the tables pgshift finalized (since schema version 7) only; keep this one by hand",
    });
  return parseRow(rows[0], table);
}

/** Every table pgshift partitioned in this database (none when the pgshift schema is missing or older than 7). */
export async function listPartitioned(sql: AnySql): Promise<PartitionedTableRow[]> {
  if (!(await hasRegistry(sql))) return [];
  const rows = await sql`select * from pgshift.partitioned_tables order by table_schema, table_name`;
  return rows.map((r) => parseRow(r, { schema: String(r.table_schema), name: String(r.table_name) }));
}

async function hasRegistry(sql: AnySql): Promise<boolean> {
  const r = await sql`select to_regclass('pgshift.partitioned_tables') is not null as ok`;
  return Boolean(r[0]?.ok);
}

function parseRow(row: unknown, table: QualifiedName): PartitionedTableRow {
  const parsed = PartitionedTableRowSchema.safeParse(row);
  if (!parsed.success)
    throw new PgshiftError(
      `the pgshift.partitioned_tables row of ${displayName(table)} is malformed: ${parsed.error.issues[0]?.message}`,
      { hint: "was it edited by hand? restore it, or delete it and maintain the table by hand" },
    );
  return parsed.data;
}

/** The settings maintain was given, saved for its next runs (only those given). */
export function settingsSql(
  table: QualifiedName,
  s: { premake?: number; retention?: string | null; retentionKeepTable?: boolean; handOff?: string },
): string | null {
  const sets: string[] = [];
  if (s.premake !== undefined) sets.push(`premake = ${Math.trunc(s.premake)}`);
  if (s.retention !== undefined) sets.push(`retention = ${s.retention === null ? "NULL" : quoteLiteral(s.retention)}`);
  if (s.retentionKeepTable !== undefined) sets.push(`retention_keep_table = ${s.retentionKeepTable}`);
  if (s.handOff !== undefined) sets.push(`hand_off = ${quoteLiteral(s.handOff)}`);
  if (sets.length === 0) return null;
  return `UPDATE pgshift.partitioned_tables SET ${sets.join(", ")} WHERE ${whereTable(table)}`;
}

/** Records the end of a maintain run and its summary (JSON). */
export function lastRunSql(table: QualifiedName, summary: unknown): string {
  return (
    `UPDATE pgshift.partitioned_tables SET last_maintained_at = now(), last_result = ` +
    `${quoteLiteral(JSON.stringify(summary))}::jsonb WHERE ${whereTable(table)}`
  );
}

function whereTable(t: QualifiedName): string {
  return `table_schema = ${quoteLiteral(t.schema)} AND table_name = ${quoteLiteral(t.name)}`;
}
