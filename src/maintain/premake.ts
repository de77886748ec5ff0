/**
 * Premake: the range partitions maintain creates ahead of now and of the newest row, `premake` intervals (time
 * ranges) or widths (integer ranges) past them, named and bounded as pgshift start names and bounds them
 * (computePartitions). List and hash partitioning have nothing to premake: a hash partition set is complete, and
 * a list partition is made for a value, not ahead of time (new values wait in DEFAULT).
 */
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { quoteIdent, quoteQualified } from "../names.js";
import { computePartitions } from "../partitioning/bounds.js";
import type { PartitionSpec } from "../partitioning/spec.js";
import { type ExistingPartition, ordinals, overlaps, rangeLiterals, type TableLayout } from "./partitions.js";

/** A range partition maintain would create: pgshift's name and bound, its literals and ordinals. */
export interface NewPartition {
  name: string;
  bound: string;
  from: string;
  to: string;
  lo: bigint;
  hi: bigint;
}

/** Whether maintain premakes for `spec` (time and integer ranges only). */
export function premakes(spec: PartitionSpec): boolean {
  return spec.strategy === "range" || spec.strategy === "range-int";
}

/**
 * The range partitions from the interval of `from` (the oldest row waiting in DEFAULT, or null) to `premake`
 * intervals past the later of now and the newest row, that no partition covers yet; in bound order. Reads the
 * newest row with max() (an index on the partition column makes it one probe per partition).
 * @throws PgshiftError when more than MAX_PARTITIONS would be computed.
 */
export async function candidates(
  sql: AnySql,
  layout: TableLayout,
  spec: PartitionSpec,
  opts: { premake: number; now: Date; from: string | null },
): Promise<NewPartition[]> {
  if (!premakes(spec)) return [];
  const c = quoteIdent(spec.column);
  const finite = spec.strategy === "range" ? ` WHERE isfinite(${c})` : "";
  const r = await sql.unsafe(`SELECT max(${c})::text AS max FROM ${quoteQualified(layout.table)}${finite}`);
  const newest = (r[0]?.max as string | null) ?? null;
  // From the end of the highest partition (no gap above it), or earlier where DEFAULT holds rows.
  const top = topPartition(layout);
  const topTo = top ? (rangeLiterals(top.bound)?.to ?? null) : null;
  let min = opts.from ?? topTo ?? newest;
  if (opts.from !== null && topTo !== null) {
    const [a, b] = await ordinals(sql, layout.columnType, [opts.from, topTo]);
    if (a !== null && a !== undefined && b !== null && b !== undefined && b < a) min = topTo;
  }
  let defs: ReturnType<typeof computePartitions>;
  try {
    defs = computePartitions(spec, layout.table.name, layout.columnType, { min, max: newest ?? min }, opts);
  } catch (err) {
    throw new PgshiftError(`cannot maintain ${layout.table.name}: ${(err as Error).message}`, {
      hint: "rows far from the others sit in DEFAULT (look at it); maintain creates at most 5000 partitions",
    });
  }
  const ranges = defs.filter((d) => !d.isDefault).map((d) => ({ d, l: rangeLiterals(d.bound)! }));
  const ords = await ordinals(
    sql,
    layout.columnType,
    ranges.flatMap((x) => [x.l.from, x.l.to]),
  );
  const out: NewPartition[] = [];
  ranges.forEach((x, i) => {
    const lo = ords[2 * i];
    const hi = ords[2 * i + 1];
    if (lo === null || lo === undefined || hi === null || hi === undefined) return;
    if (overlaps(layout, lo, hi)) return;
    out.push({ name: x.d.name, bound: x.d.bound, from: x.l.from, to: x.l.to, lo, hi });
  });
  return out;
}

/** The upper end of the highest range partition (null: none). */
export function topOf(layout: TableLayout): bigint | null {
  return topPartition(layout)?.hi ?? null;
}

/** The range partition with the highest upper end (a MAXVALUE end aside), or null. */
function topPartition(layout: TableLayout): ExistingPartition | null {
  let top: ExistingPartition | null = null;
  for (const p of layout.partitions) if (p.hi !== null && (top === null || p.hi > top.hi!)) top = p;
  return top;
}
