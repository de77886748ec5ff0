/**
 * The key ranges of a backfill with parallel workers (`backfill --workers N`), kept in pgshift.backfill_ranges
 * (src/sql/schema/000009.sql): splitting the original table's key into ranges that hold about the same number of
 * rows, and the statements that read and write each range's state.
 *
 * A range is (lower, upper] on the full key (row comparison, as the batches use: composite, text and uuid keys
 * alike); a null lower starts at the first key, a null upper ends after the last. The ranges are split once, in
 * one transaction, and never again: a backfill run later (with any number of workers, one included) copies the
 * unfinished ones from their checkpoints. A migration whose copy began without ranges (one worker) and stopped
 * with a checkpoint keeps what it copied: that part becomes range 0, (null, checkpoint], done, with the
 * migration's counters; the rest is split after the checkpoint.
 *
 * How the split finds its bounds: a sample of the table (`TABLESAMPLE SYSTEM`: whole pages picked at random,
 * about SAMPLE_ROWS rows from the row estimate; docs: SELECT, "TABLESAMPLE"), its keys ordered and cut into equal
 * tiles (`ntile`), the last key of each tile but the last as the upper bound of a range. So each range holds about
 * the same share of the sampled rows, whatever the key's distribution. A table too small to sample gives one
 * range.
 */
import type { Sql, TxSql } from "../db.js";
import { type BackfillRangeRow, BackfillRangeRowSchema, type Migration } from "../migration/state.js";
import { quoteIdent, quoteQualified } from "../names.js";
import { columnList, rowCompare } from "../sql/statement.js";

/** Ranges per worker: more ranges than workers, so that a worker that finishes early takes the next free one. */
export const RANGES_PER_WORKER = 4;
/** The sample the split reads, rows (about). */
const SAMPLE_ROWS = 30_000;
/** The most workers backfill accepts. */
export const MAX_WORKERS = 64;

/** The `TABLESAMPLE SYSTEM` percentage that reads about SAMPLE_ROWS of `rowsEstimated` rows (100: all). */
export function samplePercent(rowsEstimated: number): number {
  if (rowsEstimated <= SAMPLE_ROWS) return 100;
  return Math.max(0.001, Math.min(100, (100 * SAMPLE_ROWS) / rowsEstimated));
}

/**
 * The statements of the ranges, as printed and sent:
 * - `split`: the bounds; parameters: the sample percentage ($1, float), the number of ranges ($2), then (with
 *   `lower`) the key after which to split (the checkpoint of a copy begun without ranges); returns one row per
 *   tile, `k0`, `k1`, ... (the tile's last key as text), in key order;
 * - `insert`: one range; parameters: range_no, lower, upper, checkpoint (text[] or null), rows copied, batches,
 *   done;
 * - `read`: the ranges of the migration, in order;
 * - `done`: marks a range copied; parameter: range_no;
 * - `sync`: the migration's counters from its ranges' (for pgshift status and a run to come), and the pace of the
 *   last batch; parameters: batch_rows, batch_target_ms, last_batch_ms.
 */
export function rangeStatements(m: Migration, lower: boolean) {
  const key = m.key_columns;
  const keyCols = columnList(key);
  return {
    split:
      `SELECT DISTINCT ON (t) t, ${key.map((c, i) => `${quoteIdent(c)}::text AS k${i}`).join(", ")} ` +
      `FROM (SELECT ${keyCols}, ntile($2) OVER (ORDER BY ${keyCols}) AS t ` +
      `FROM ${quoteQualified(m.original)} TABLESAMPLE SYSTEM ($1)` +
      `${lower ? ` WHERE ${rowCompare(key, ">", 3)}` : ""}) s ` +
      `ORDER BY t, ${key.map((c) => `${quoteIdent(c)} DESC`).join(", ")}`,
    insert:
      "INSERT INTO pgshift.backfill_ranges (migration_id, range_no, lower, upper, checkpoint, rows_copied, batches, " +
      `done) VALUES (${m.id}, $1, $2::text[], $3::text[], $4::text[], $5, $6, $7)`,
    read:
      "SELECT range_no, lower, upper, checkpoint, rows_copied, batches, done FROM pgshift.backfill_ranges " +
      `WHERE migration_id = ${m.id} ORDER BY range_no`,
    done:
      "UPDATE pgshift.backfill_ranges SET done = true, updated_at = now() " +
      `WHERE migration_id = ${m.id} AND range_no = $1`,
    sync:
      "UPDATE pgshift.migrations SET rows_copied = r.rows, batches = r.batches, batch_rows = $1, " +
      "batch_target_ms = $2, last_batch_ms = $3, updated_at = now() FROM (SELECT coalesce(sum(rows_copied), 0) AS " +
      `rows, coalesce(sum(batches), 0) AS batches FROM pgshift.backfill_ranges WHERE migration_id = ${m.id}) r ` +
      `WHERE id = ${m.id}`,
  };
}

/**
 * The ranges of migration `m` (none: the copy is not split, or the pgshift schema predates version 9: a dry run
 * or status does not upgrade it), in range order.
 */
export async function readRanges(sql: Sql | TxSql, m: Migration): Promise<BackfillRangeRow[]> {
  const table = await sql.unsafe("SELECT to_regclass('pgshift.backfill_ranges') IS NOT NULL AS ok");
  if (!table[0]?.ok) return [];
  const rows = await sql.unsafe(rangeStatements(m, false).read);
  return rows.map((r) => BackfillRangeRowSchema.parse(r));
}

/**
 * Splits what is left to copy of `m` into about `count` ranges and stores them, in the transaction `tx` (see the
 * module's comment); the migration's checkpoint, when it has one, becomes range 0, done.
 * @param percent the sample's percentage (samplePercent).
 * @returns the ranges stored, in order.
 */
export async function splitRanges(tx: TxSql, m: Migration, count: number, percent: number) {
  const after = m.checkpoint && m.checkpoint.length > 0 ? m.checkpoint : null;
  const s = rangeStatements(m, after !== null);
  const rows = await tx.unsafe(s.split, [percent, count, ...(after ?? [])]);
  const bounds = rows.map((r) => m.key_columns.map((_, i) => String(r[`k${i}`])));
  // The last tile's last key is no bound: the last range is open above (rows written later belong to it).
  bounds.pop();
  const ranges: BackfillRangeRow[] = [];
  if (after)
    ranges.push({
      range_no: 0,
      lower: null,
      upper: after,
      checkpoint: after,
      rows_copied: m.rows_copied,
      batches: m.batches,
      done: true,
    });
  let lower = after;
  for (const upper of [...bounds, null]) {
    ranges.push({ range_no: ranges.length, lower, upper, checkpoint: null, rows_copied: 0, batches: 0, done: false });
    lower = upper;
  }
  for (const r of ranges)
    await tx.unsafe(
      s.insert,
      [r.range_no, r.lower, r.upper, r.checkpoint, r.rows_copied, r.batches, r.done] as never[],
      { prepare: true },
    );
  return ranges;
}

/** Ranges `rows` describe, in one line each, for logs and status: `3 [lower, upper] 120 rows 2 batches done`. */
export function rangeLine(r: BackfillRangeRow): string {
  const b = (k: string[] | null, open: string) => (k === null ? open : `(${k.join(", ")})`);
  return (
    `range ${r.range_no}: ${b(r.lower, "first key")} .. ${b(r.upper, "last key")}, ${r.rows_copied} rows in ` +
    `${r.batches} batches, ${r.done ? "done" : r.checkpoint ? `checkpoint (${r.checkpoint.join(", ")})` : "not begun"}`
  );
}
