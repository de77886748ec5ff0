/**
 * The copy without row locks (the default, in both modes) and the cleanup that keeps it free of ghosts.
 *
 * A batch copies its key range with `INSERT INTO shadow SELECT ... FROM source WHERE key range` and
 * `ON CONFLICT (shadow key) DO NOTHING` (a plain INSERT first, as with row locks), locking and writing nothing in
 * the source. Under READ COMMITTED the SELECT reads one snapshot S; the rows are written, then the batch commits.
 * What the mirror trigger (which writes the shadow in the application's own transaction) does meanwhile:
 * - INSERT into the source, or UPDATE that keeps the shadow key: the trigger upserts (`ON CONFLICT (key) DO
 *   UPDATE`). If the batch's copy of the row is already written (uncommitted), the upsert waits for the batch
 *   and then overwrites it with the new version; if it is not, the batch's insert meets the trigger's row, waits
 *   for its transaction, and does nothing (or fails with unique_violation and runs again with DO NOTHING). Either
 *   way the newest version wins: no stale row.
 * - DELETE, or an UPDATE that changes the shadow key (the original key, or the partition column the key was
 *   widened with, at any level): the trigger deletes the old key from the shadow. If the batch's copy is not
 *   committed yet, that DELETE does not see it (an uncommitted row is invisible to it and it does not wait) and
 *   the batch then commits the old row: a GHOST. This is the only way the copy goes wrong.
 * So each batch's range is cleaned once it can hold no more ghost: the rows of the shadow in the range whose full
 * shadow key the source no longer has are deleted.
 *
 * When is that safe? A ghost needs a writer D that deleted (or moved) a row the batch read, with its trigger run
 * before the batch committed; D therefore had its transaction id before the batch's commit. Once every such D has
 * ended, a cleanup whose snapshot is taken afterwards sees D's deletion in the source and the ghost in the shadow.
 * The suspects are taken after the batch's commit, in the next batch's transaction (or in a last, marking one):
 * that transaction's id X (pg_current_xact_id(): its own is newer than every id handed out before the batch
 * committed) and its snapshot (pg_current_snapshot()): the ids in progress below the snapshot's xmax, and every id
 * from xmax up to X (a transaction can hold an id at or above xmax, which is only one past the latest completed
 * id). The cleanup of the batch runs when pg_xact_status() says none of them is in progress (a null status, an id
 * too old to know, has ended too). The copy does not wait for it: cleanups run between batches, a batch or a few
 * behind, and only the last one, before the copy is marked complete, is waited for.
 *
 * The cleanup, one transaction per run of consecutive due batches:
 * 1. `SELECT tableoid, ctid FROM shadow s WHERE range AND NOT EXISTS (SELECT FROM source o WHERE o.key = s.key
 *    AND o.partition columns IS NOT DISTINCT FROM s's) FOR UPDATE OF s NOWAIT`: the candidates, locked; one
 *    snapshot, in which a mirrored change is in both tables or in neither (the trigger writes both in one
 *    transaction), so a row written by the mirror is never a candidate; NOWAIT: a candidate an application
 *    transaction holds makes the cleanup give up and try again later, so it never waits on the application (and
 *    is never in a deadlock with it);
 * 2. when there are candidates: `DELETE` them by (tableoid, ctid) with the same NOT EXISTS, in a new snapshot.
 *    The re-check matters: a transaction that re-inserts a ghost's key in the source (a row moved back to its old
 *    partition, a key reused) upserts the ghost row through the mirror; had it done so while step 1 ran, step 1's
 *    DELETE would have re-checked only the shadow row (EvalPlanQual), not the source, and deleted the new row.
 *    With the row locked first, such a writer waits for the cleanup and then inserts its row afresh.
 * 3. the checkpoint, rows copied and batches advance to the end of the cleaned range, in the same transaction.
 * So the stored checkpoint is where the copy is clean, never past a batch whose cleanup has not run: after a crash,
 * the next run copies again from there (ON CONFLICT DO NOTHING keeps what is in the shadow), and the cleanup of
 * those batches, whose suspects include every transaction still running that the lost batches may have met, also
 * removes the ghosts of the batches lost. The counters therefore count the re-copied rows once.
 * A row inserted into the range while a cleanup runs is in both tables or in neither of its snapshots: never a
 * candidate. verify --repair compares the tables after the copy is complete, when every cleanup has run.
 *
 * Logical mode (the default there too since issue 18). The shadow's writer is then the applier (src/mirror/apply.ts),
 * which writes after the application's transaction committed, in its own transactions (groups); the batches, the
 * suspects and the cleanup are the same. What changes:
 * - Ghosts. The applier's DELETE (or the delete of a moved row's old version) misses a batch's uncommitted copy just
 *   as the trigger's does. But it applies only committed transactions: a deletion D it applied before the batch
 *   committed was committed before the batch did, so any snapshot taken after the batch's commit sees it, and the
 *   cleanup finds the ghost. Waiting for the suspects is not needed for this (they hold the application's writers
 *   and the applier's open group); it is kept, so that both modes run one proven schedule, at the cost of a copy
 *   that ends only once the writers that ran beside its last batches have ended.
 * - The re-check against the source in a new snapshot, for a key deleted and then inserted again (or a row moved
 *   away and back), applied by the stream between the cleanup's two snapshots: the applier's write of that key
 *   meets the candidate the cleanup has locked, waits, and then either finds it kept (the re-insertion committed
 *   before the second snapshot: the source has the key, the row is not deleted, and the applier overwrites it
 *   whole) or deleted (it inserts its row afresh). A re-insertion committed after the second snapshot is in the
 *   stream, applied after the cleanup. The cleanup itself never waits on the applier (NOWAIT; a candidate the
 *   applier holds makes it try again later), so the two cannot deadlock; only the checkpoint's UPDATE of the
 *   migration row may wait for a group's commit, and a group records its position last, right before COMMIT.
 * - Stale rows. The applier writes whole rows (pgoutput sends every value of an INSERT and of most UPDATEs) with
 *   `ON CONFLICT (key) DO UPDATE`, which waits for a batch's uncommitted copy and overwrites it, as the trigger
 *   does. An UPDATE whose unchanged TOASTed values were not streamed is the exception: merging its sent values
 *   into the shadow's row would keep that row's unsent ones, and the row may be a batch's uncommitted copy (the
 *   merge's UPDATE does not see it; its fallback, an insert read from the source, used to do nothing on the
 *   conflict and keep the batch's older version) or a ghost not cleaned yet whose key a later transaction reused
 *   (a row moved away and back: the merge updated the ghost, keeping its old unsent values; the cleanup then finds
 *   the key in the source and keeps the row). So until the copy is over and the stream has passed its end
 *   (copies_lsn), the applier takes such a row whole from the source, upserting it with DO UPDATE of every column
 *   and deleting its other versions (Applier.applyFromSource): the source's current version is at least as new as
 *   anything in the shadow, and later changes replay on top.
 * The alternative, copying from the snapshot exported when the slot is created (as PostgreSQL's initial table
 * sync does), is not used: the snapshot lives only as long as the slot's creating connection keeps its transaction
 * open, so the whole copy would be one transaction (no checkpoint, no resuming after a crash, the xmin horizon held
 * back for the whole copy, vacuum blocked in the whole database), start and backfill would have to be one process,
 * and the stream could not be applied during the copy (a DELETE applied before its row is copied from the older
 * snapshot leaves a ghost), so the slot would retain the WAL of the whole copy (docs/design.md, "backfill").
 */
import type { Sql } from "../db.js";
import type { Migration } from "../migration/state.js";
import { quoteIdent, quoteQualified } from "../names.js";
import { block, runTransaction, statement, type TransactionStep, transactionStep } from "../plan/steps.js";
import { columnList, placeholders, rowCompare } from "../sql/statement.js";

/** A batch copied without row locks whose range is not cleaned yet. */
export interface PendingBatch {
  /** The checkpoint the batch started after (null: the first batch). */
  lo: string[] | null;
  /** The batch's last key. */
  hi: string[];
  /**
   * Not a batch: the end of the copy, from `lo` (the last key copied) to the end of the key or of the worker's
   * range. A run that crashed may have left uncleaned ghosts there, above every key the source has now: no batch of
   * the next run reaches them, so the last cleanup covers that tail too. `hi` is unused.
   */
  tail?: true;
  rows: number;
  /** The transactions that may have met the batch (ids as text), once known; null until then. */
  suspects: string[] | null;
}

/**
 * The suspects of every batch committed before a transaction: `xid` (its pg_current_xact_id(), as text) and
 * `snapshot` (its pg_current_snapshot() as text, `xmin:xmax:xip,...`). Returns the ids in progress below xmax
 * and each id from xmax up to, not including, `xid`.
 */
export function suspectsOf(xid: string, snapshot: string): string[] {
  const [, xmaxText, xip] = snapshot.split(":");
  const out = new Set((xip ?? "").split(",").filter((x) => x !== ""));
  const top = BigInt(xid);
  for (let x = BigInt(xmaxText ?? xid); x < top; x++) out.add(x.toString());
  return [...out];
}

/** Of `xids` (text), those still in progress (pg_xact_status; PostgreSQL 13 and later). */
export async function stillRunning(sql: Sql, xids: readonly string[]): Promise<Set<string>> {
  if (xids.length === 0) return new Set();
  const rows = await sql.unsafe(RUNNING_SQL, [`{${xids.join(",")}}`]);
  return new Set(rows.map((r) => String(r.x)));
}

const RUNNING_SQL =
  "SELECT x::text AS x FROM unnest($1::text[]) AS t(x) WHERE pg_catalog.pg_xact_status(x::xid8) = 'in progress'";

/**
 * The statements of a cleanup (see the module's comment), as printed and sent:
 * - `candidates`: the ghost rows of the range, locked (NOWAIT); parameters: the lower key (with `lower`) then the
 *   upper key; returns `rel` (tableoid) and `tid` (ctid) as text;
 * - `remove`: deletes those rows if the source still lacks them; parameters: `{oid,...}`, `{"(b,o)",...}`;
 * - `checkpoint`: the checkpoint (the range's upper key), rows copied and batches, absolute; with `ranged` (parallel
 *   workers, ranges.ts), in the key range's row, whose number is the last parameter.
 */
export function cleanupStatements(m: Migration, lower: boolean, ranged = false, open = false) {
  const key = m.key_columns;
  const k = key.length;
  const src = quoteQualified(m.original);
  const dst = quoteQualified(m.partitioned);
  const rest = m.shadow_key.filter((c) => !key.includes(c));
  const match = [
    ...key.map((c) => `o.${quoteIdent(c)} = s.${quoteIdent(c)}`),
    ...rest.map((c) => `o.${quoteIdent(c)} IS NOT DISTINCT FROM s.${quoteIdent(c)}`),
  ].join(" AND ");
  const range =
    [...(lower ? [rowCompare(key, ">", 1)] : []), ...(open ? [] : [rowCompare(key, "<=", lower ? k + 1 : 1)])].join(
      " AND ",
    ) || "TRUE";
  // The range on the source's side too: one range scan of each table joined by hash or merge, rather than one
  // probe of the source's key index per row of the shadow.
  const inRange = (alias: string) =>
    [
      ...(lower ? [`(${columnList(key, alias)}) > (${placeholders(1, k)})`] : []),
      ...(open ? [] : [`(${columnList(key, alias)}) <= (${placeholders(lower ? k + 1 : 1, k)})`]),
    ].join(" AND ") || "TRUE";
  const gone = (ranged: boolean) =>
    `NOT EXISTS (SELECT FROM ${src} o WHERE ${match}${ranged ? ` AND ${inRange("o")}` : ""})`;
  return {
    candidates:
      `SELECT s.tableoid::oid::text AS rel, s.ctid::text AS tid FROM ${dst} s WHERE ${range} AND ${gone(true)} ` +
      `FOR UPDATE OF s NOWAIT`,
    remove:
      `DELETE FROM ${dst} s WHERE s.ctid = ANY ($2::tid[]) AND (s.tableoid, s.ctid) IN ` +
      `(SELECT * FROM unnest($1::oid[], $2::tid[])) AND ${gone(false)}`,
    checkpoint:
      `UPDATE pgshift.${ranged ? "backfill_ranges" : "migrations"} SET checkpoint = ARRAY[${placeholders(1, k)}]` +
      `::text[], rows_copied = $${k + 1}, batches = $${k + 2}, updated_at = now() WHERE ` +
      (ranged ? `migration_id = ${m.id} AND range_no = $${k + 3}` : `id = ${m.id}`),
  };
}

/**
 * The transaction of a cleanup, as printed and run (the DELETE only when there are candidates). `open`: the last
 * cleanup of a copy with no upper key (to the end of the key); its checkpoint is written only when a key was copied.
 */
export function cleanupTransaction(m: Migration, lower: boolean, ranged = false, open = false): TransactionStep {
  const c = cleanupStatements(m, lower, ranged, open);
  return transactionStep(
    [
      statement(c.candidates),
      block("at most once", "only when there are candidates", [statement(c.remove)]),
      open ? block("at most once", "when a key was copied", [statement(c.checkpoint)]) : statement(c.checkpoint),
    ],
    {
      why: open
        ? "delete the rows the source no longer has from the last key copied to the end of the key (ghosts a " +
          "crashed run may have left above every key the source has now)"
        : "delete the rows of the range the source no longer has (ghosts), advance the checkpoint",
    },
  );
}

/**
 * Runs one cleanup of the range (lo, hi] (hi null: to the end of the key) in one transaction and advances the
 * checkpoint to `at` (default `hi`; not written when null) with the counters given (in range `rangeNo`'s row when
 * given). @returns the ghosts deleted, or null when a candidate was locked by another transaction (nothing done;
 * try again later).
 */
export async function runCleanup(
  sql: Sql,
  m: Migration,
  lo: string[] | null,
  hi: string[] | null,
  counters: { rowsCopied: number; batches: number },
  rangeNo?: number,
  at: string[] | null = hi,
): Promise<number | null> {
  const ranged = rangeNo !== undefined;
  const open = hi === null;
  const c = cleanupStatements(m, lo !== null, ranged, open);
  try {
    return await runTransaction(sql, cleanupTransaction(m, lo !== null, ranged, open), async (tx) => {
      const found = await tx.unsafe(c.candidates, [...(lo ?? []), ...(hi ?? [])], { prepare: true });
      let removed = 0;
      if (found.length > 0) {
        const rels = `{${found.map((r) => String(r.rel)).join(",")}}`;
        const tids = `{${found.map((r) => `"${String(r.tid)}"`).join(",")}}`;
        removed = (await tx.unsafe(c.remove, [rels, tids])).count;
      }
      if (at !== null)
        await tx.unsafe(c.checkpoint, [...at, counters.rowsCopied, counters.batches, ...(ranged ? [rangeNo] : [])], {
          prepare: true,
        });
      return removed;
    });
  } catch (err) {
    if ((err as { code?: string }).code === "55P03") return null;
    throw err;
  }
}
