/**
 * Rows that sit in DEFAULT: PostgreSQL refuses to attach a partition whose bound covers rows of the DEFAULT
 * partition ("ALTER TABLE ... ATTACH PARTITION": the default partition is scanned, and the attach fails on such a
 * row), so maintain moves them into the new partition in the transaction that attaches it.
 *
 * Why in that transaction, under an ACCESS EXCLUSIVE lock on the table, and not in batches beforehand: a row
 * moved out of DEFAULT into a table not yet attached is invisible to the application until the attach commits;
 * an UPDATE or DELETE of it meanwhile would find nothing and be lost (and a statement planned before the attach,
 * blocked on DEFAULT, runs with the partitions it saw). Under the lock, taken with a short lock_timeout and
 * retried, the application waits (never longer than the lock timeout for the lock itself), the rows move, the
 * partition is attached, and statements that waited see the new partition. The time under the lock grows with
 * the rows to move: maintain moves at most `maxMoveRows` rows for one partition (more are left in DEFAULT and
 * reported; run maintain more often, so that DEFAULT never fills).
 */
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { displayName, quoteIdent, quoteQualified } from "../names.js";
import type { PartitionSpec } from "../partitioning/spec.js";
import type { TableLayout } from "./partitions.js";
import type { NewPartition } from "./premake.js";

/** The oldest row of DEFAULT (its partition column as text, finite values only), or null when none is. */
export async function oldestInDefault(sql: AnySql, layout: TableLayout, spec: PartitionSpec): Promise<string | null> {
  if (!layout.defaultPartition) return null;
  const c = quoteIdent(spec.column);
  const finite = spec.strategy === "range" ? ` AND isfinite(${c})` : "";
  const d = quoteQualified({ schema: layout.table.schema, name: layout.defaultPartition });
  const r = await sql.unsafe(`SELECT min(${c})::text AS v FROM ${d} WHERE ${c} IS NOT NULL${finite}`);
  return (r[0]?.v as string | null) ?? null;
}

/** Rows of DEFAULT in each of `parts` (same order), and in DEFAULT all told. One scan of DEFAULT. */
export async function rowsInDefault(
  sql: AnySql,
  layout: TableLayout,
  spec: PartitionSpec,
  parts: readonly NewPartition[],
): Promise<{ per: number[]; total: number }> {
  if (!layout.defaultPartition) return { per: parts.map(() => 0), total: 0 };
  const d = quoteQualified({ schema: layout.table.schema, name: layout.defaultPartition });
  const c = quoteIdent(spec.column);
  const t = layout.columnType;
  const rows = await sql.unsafe(
    `SELECT x.i::int AS i, count(*)::bigint AS n
       FROM ${d} r JOIN unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(f, t, i)
         ON r.${c} >= x.f::${t} AND r.${c} < x.t::${t}
      GROUP BY x.i`,
    [parts.map((p) => p.from), parts.map((p) => p.to)],
  );
  const per = parts.map(() => 0);
  for (const r of rows) per[Number(r.i) - 1] = Number(r.n);
  const total = Number((await sql.unsafe(`SELECT count(*)::bigint AS n FROM ${d}`))[0]!.n);
  return { per, total };
}

/**
 * Refuses to move rows out of DEFAULT of a table that foreign keys of other tables reference: the DELETE of the
 * move would fire their ON DELETE actions (CASCADE would delete the referencing rows).
 * @throws PgshiftError naming the constraints.
 */
export async function requireMovable(sql: AnySql, layout: TableLayout): Promise<void> {
  const r = await sql`
    select conname::text as name, conrelid::regclass::text as on
      from pg_constraint where contype = 'f' and confrelid = to_regclass(${quoteQualified(layout.table)})
       and conparentid = 0`;
  if (r.length > 0)
    throw new PgshiftError(
      `cannot move rows out of the DEFAULT partition of ${displayName(layout.table)}: foreign keys reference it ` +
        `(${r.map((x) => `${String(x.name)} on ${String(x.on)}`).join(", ")}), and the move's DELETE would fire them`,
      { hint: "run maintain with --no-move (premake and retention only), and move those rows by hand" },
    );
}

/**
 * Refuses to move rows out of DEFAULT when the application's row triggers on DELETE would fire for the move
 * (pg_trigger.tgtype bit 8: DELETE; the clones of the table's triggers on DEFAULT, enabled; before PostgreSQL 15 a
 * clone is marked tgisinternal, with tgparentid set, unlike the foreign keys' internal triggers): an audit
 * trigger would record deletions that never happened.
 * @throws PgshiftError naming the triggers.
 */
export async function requireNoDeleteTriggers(sql: AnySql, layout: TableLayout): Promise<void> {
  const d = quoteQualified({ schema: layout.table.schema, name: layout.defaultPartition! });
  const r = await sql`
    select tgname::text as name from pg_trigger
     where tgrelid = to_regclass(${d}) and tgenabled <> 'D' and (tgtype & 8) <> 0
       and (not tgisinternal or (tgparentid <> 0 and tgconstraint = 0))
       and (tgtype & 1) <> 0 order by 1`;
  if (r.length > 0)
    throw new PgshiftError(
      `cannot move rows out of ${layout.defaultPartition}: row triggers on DELETE would fire for the move ` +
        `(${r.map((x) => String(x.name)).join(", ")})`,
      { hint: "run maintain with --no-move, and move those rows by hand (with the triggers disabled)" },
    );
}

/** The move of `p`'s rows from DEFAULT into the new table (run under the ACCESS EXCLUSIVE lock on the table). */
export function moveSql(layout: TableLayout, spec: PartitionSpec, p: NewPartition, columns: readonly string[]): string {
  const d = quoteQualified({ schema: layout.table.schema, name: layout.defaultPartition! });
  const c = quoteIdent(spec.column);
  const t = layout.columnType;
  const cols = columns.map(quoteIdent).join(", ");
  const lit = (v: string) => `'${v.replace(/'/g, "''")}'::${t}`;
  return (
    `WITH moved AS (DELETE FROM ${d} WHERE ${c} >= ${lit(p.from)} AND ${c} < ${lit(p.to)} RETURNING ${cols}) ` +
    `INSERT INTO ${quoteQualified({ schema: layout.table.schema, name: p.name })} (${cols}) SELECT ${cols} FROM moved`
  );
}
