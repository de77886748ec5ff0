import type { Sql } from "../db.js";
import { type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import type { DataRange, GroupData, SubData } from "./bounds.js";
import type { LevelSpec, PartitionSpec } from "./spec.js";

/** Rows fetched per round trip when reading the second level's data (the result is streamed, never held whole). */
const CURSOR_ROWS = 1000;

/**
 * The SQL expression that maps a row to its first-level partition's key (PartitionDef.key), as text: the list
 * value; the range's start as `YYYY-MM-DD` in UTC (timestamptz truncated in UTC, as the bounds are); the
 * integer range's start (floor(value / width) * width). Null for hash (PostgreSQL's hash of a value is not
 * computable before the partitioned table exists: its rows are spread evenly).
 * @param columnType pg_type.typname of the first level's column.
 */
export function levelGroupSql(level: LevelSpec, columnType: string): string | null {
  const c = quoteIdent(level.column);
  switch (level.strategy) {
    case "list":
      return `${c}::text`;
    case "range":
      return columnType === "timestamptz"
        ? `to_char(date_trunc(${quoteLiteral(level.interval)}, ${c}, 'UTC'), 'YYYY-MM-DD')`
        : `to_char(date_trunc(${quoteLiteral(level.interval)}, ${c}::timestamp), 'YYYY-MM-DD')`;
    case "range-int":
      return `(floor(${c}::numeric / ${level.width}) * ${level.width})::text`;
    default:
      return null;
  }
}

/**
 * The query that reads a `range:<col>:rows=<N>` second level: for each first-level key `g`, the sub column's
 * value `k` at the 1st, N+1-th, 2N+1-th ... row in ascending order, and at the last row (`last`), with the
 * key's row count `n`. One pass over the table (a sort by key and value), returning about rows / N rows.
 */
export function rangeRowsSql(table: QualifiedName, group: string, column: string, perBucket: string): string {
  const k = quoteIdent(column);
  return (
    `SELECT g, k::text AS k, n, rn = n AS last FROM (SELECT ${group} AS g, ${k} AS k, ` +
    `row_number() OVER (PARTITION BY ${group} ORDER BY ${k}) AS rn, count(*) OVER (PARTITION BY ${group}) AS n ` +
    `FROM ${quoteQualified(table)}) s WHERE (rn - 1) % ${perBucket} = 0 OR rn = n ORDER BY s.g, s.k`
  );
}

/**
 * Reads what the second level of `spec` is computed from (computeSubPartitions), streamed with a cursor, never
 * the table's rows: for `hash:<col>:rows=<N>` the row count per first-level key (`SELECT key, count(*) ...
 * GROUP BY key`; with a hash first level, count(*) spread evenly over its partitions); for
 * `range:<col>:rows=<N>` every N-th value per key (rangeRowsSql); for a fixed form the sub column's min/max or
 * distinct values (`readRange`, as for the first level).
 * @param columnType pg_type.typname of the first level's column.
 * @throws Error when spec has no second level, or on server errors.
 */
export async function readSubData(
  sql: Sql,
  table: QualifiedName,
  spec: PartitionSpec,
  columnType: string,
  readRange: (sql: Sql, table: QualifiedName, level: LevelSpec) => Promise<DataRange>,
): Promise<SubData> {
  const sub = spec.sub;
  if (!sub) throw new Error("no second level to read");
  if (sub.strategy !== "hash-rows" && sub.strategy !== "range-rows") return { range: await readRange(sql, table, sub) };
  const groups = new Map<string, GroupData>();
  const group = levelGroupSql(spec, columnType);
  if (group === null) {
    if (spec.strategy !== "hash") throw new Error(`no group expression for ${spec.strategy}`);
    const r = await sql.unsafe(`SELECT count(*)::bigint AS n FROM ${quoteQualified(table)}`);
    const each = Math.ceil(Number(r[0]?.n ?? 0) / spec.modulus);
    for (let i = 0; i < spec.modulus; i++) groups.set(String(i), { rows: each });
    return { groups };
  }
  if (sub.strategy === "hash-rows") {
    const q = `SELECT ${group} AS g, count(*)::bigint AS n FROM ${quoteQualified(table)} GROUP BY 1`;
    await sql.unsafe(q).cursor(CURSOR_ROWS, (rows) => {
      for (const r of rows) groups.set(String(r.g), { rows: Number(r.n) });
    });
    return { groups };
  }
  await sql.unsafe(rangeRowsSql(table, group, sub.column, sub.rows)).cursor(CURSOR_ROWS, (rows) => {
    for (const r of rows) {
      const key = String(r.g);
      let g = groups.get(key);
      if (!g) {
        g = { rows: Number(r.n), starts: [] };
        groups.set(key, g);
      }
      // The last row is also a start when (n - 1) is a multiple of N; it is listed once (ORDER BY g, k).
      if (r.last) g.max = String(r.k);
      if (!r.last || (Number(r.n) - 1) % Number(sub.rows) === 0) g.starts!.push(String(r.k));
    }
  });
  return { groups };
}
