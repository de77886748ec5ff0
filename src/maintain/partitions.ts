/**
 * The partitions of a table as maintain sees them: each first-level partition's name and bound, its range as
 * ordinals (epoch seconds for time columns, the value for integer columns) so that ranges compare exactly
 * whatever the column's type, the DEFAULT partition, and the partition column's type.
 */
import { z } from "zod";
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";
import type { PartitionSpec } from "../partitioning/spec.js";

export interface ExistingPartition {
  name: string;
  /** pg_get_expr of the bound: `FOR VALUES FROM (...) TO (...)`, `DEFAULT`, ... */
  bound: string;
  isDefault: boolean;
  /** Range partitions: the bounds as ordinals (null: MINVALUE / MAXVALUE; both null for others). */
  lo: bigint | null;
  hi: bigint | null;
}

export interface TableLayout {
  table: QualifiedName;
  /** pg_type.typname of the partition column. */
  columnType: string;
  partitions: ExistingPartition[];
  defaultPartition: string | null;
  /** Whether a first-level partition is itself partitioned (two levels): maintain then premakes nothing. */
  twoLevel: boolean;
}

const PartRow = z.object({ name: z.string(), bound: z.string(), sub: z.boolean() });

/**
 * The literals of a range bound `FOR VALUES FROM (a) TO (b)` as PostgreSQL prints it (pg_get_expr): the text of a
 * and b, unquoted ('...' literals), or MINVALUE / MAXVALUE; null when the bound is not a one-column range.
 */
export function rangeLiterals(bound: string): { from: string; to: string } | null {
  const m = /^FOR VALUES FROM \((.*)\) TO \((.*)\)$/.exec(bound);
  if (!m) return null;
  const un = (x: string) => (x.startsWith("'") ? x.slice(1, -1).replace(/''/g, "'") : x);
  const from = m[1]!;
  const to = m[2]!;
  if (from.includes(", ") && !from.startsWith("'")) return null;
  return { from: un(from), to: un(to) };
}

/** SQL giving the ordinal of `expr` (text) read as the column's type: epoch seconds, or the integer itself. */
function ordinalSql(expr: string, columnType: string): string {
  const cast = `(${expr})::${columnType === "timestamptz" ? "timestamptz" : columnType}`;
  return /^int[248]$/.test(columnType)
    ? `${cast}::numeric::text`
    : `floor(extract(epoch from ${cast}))::numeric(40,0)::text`;
}

/**
 * The ordinals of `literals` (bound values as text; MINVALUE / MAXVALUE give null), computed by the server so that
 * they agree with its own reading of the values.
 */
export async function ordinals(
  sql: AnySql,
  columnType: string,
  literals: readonly string[],
): Promise<(bigint | null)[]> {
  if (literals.length === 0) return [];
  const rows = await sql.unsafe(
    `SELECT CASE WHEN v IN ('MINVALUE', 'MAXVALUE') THEN NULL ELSE ${ordinalSql("v", columnType)} END AS o
       FROM unnest($1::text[]) WITH ORDINALITY AS x(v, i) ORDER BY i`,
    [literals as string[]],
  );
  return rows.map((r) => (r.o === null ? null : BigInt(String(r.o))));
}

/**
 * Reads the first-level partitions of `table` (pg_inherits, which takes no lock on them) and the partition
 * column's type.
 * @throws PgshiftError when `table` is not a partitioned table partitioned on `spec.column`.
 */
export async function readLayout(sql: AnySql, table: QualifiedName, spec: PartitionSpec): Promise<TableLayout> {
  const t = quoteQualified(table);
  const col = await sql`
    select t.typname::text as type
      from pg_partitioned_table p join pg_attribute a on a.attrelid = p.partrelid and a.attnum = p.partattrs[0]
      join pg_type t on t.oid = a.atttypid
     where p.partrelid = to_regclass(${t}) and a.attname = ${spec.column}`;
  if (col.length === 0)
    throw new PgshiftError(`${displayName(table)} is not partitioned by ${spec.column} as pgshift left it`, {
      hint: "was it re-created or re-partitioned by hand? maintain only keeps the layout pgshift made",
    });
  const columnType = String(col[0]!.type);
  const rows = z.array(PartRow).parse(
    await sql`
      select c.relname::text as name, pg_get_expr(c.relpartbound, c.oid) as bound, c.relkind = 'p' as sub
        from pg_inherits i join pg_class c on c.oid = i.inhrelid
       where i.inhparent = to_regclass(${t}) order by 1`,
  );
  const lits = rows.map((r) => rangeLiterals(r.bound));
  const flat = lits.flatMap((l) => (l ? [l.from, l.to] : []));
  const ords = await ordinals(sql, columnType, flat);
  let k = 0;
  const partitions = rows.map(({ name, bound }, i): ExistingPartition => {
    const isDefault = bound === "DEFAULT";
    if (!lits[i]) return { name, bound, isDefault, lo: null, hi: null };
    const lo = ords[k++]!;
    const hi = ords[k++]!;
    return { name, bound, isDefault, lo, hi };
  });
  return {
    table,
    columnType,
    partitions,
    defaultPartition: partitions.find((p) => p.isDefault)?.name ?? null,
    twoLevel: rows.some((r) => r.sub),
  };
}

/** Whether [lo, hi) overlaps any range partition of `layout` (null ends: unbounded). */
export function overlaps(layout: TableLayout, lo: bigint, hi: bigint): boolean {
  return layout.partitions.some((p) => {
    if (p.isDefault || (p.lo === null && p.hi === null && !p.bound.startsWith("FOR VALUES FROM"))) return false;
    return (p.lo === null || p.lo < hi) && (p.hi === null || lo < p.hi);
  });
}
