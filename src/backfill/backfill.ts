import pRetry from "p-retry";
import type { LockRetryOptions, Sql } from "../db.js";
import { PgshiftError, sqlState } from "../errors.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import {
  type BackfillRangeRow,
  lockMigration,
  type Migration,
  requireMigration,
  unlockMigration,
} from "../migration/state.js";
import { mirrorFor } from "../mirror/mirror.js";
import { catchUp, type StreamFollower } from "../mirror/stream.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { BatchSizer } from "../pace/batch-size.js";
import { PaceGate, type Waiting } from "../pace/gate.js";
import { Throttle, type ThrottleOptions } from "../pace/throttle.js";
import {
  block,
  check,
  formatSteps,
  lockTimeoutSql,
  runSteps,
  runTransaction,
  type Step,
  statement,
  transactionStep,
} from "../plan/steps.js";
import { columnList, placeholders, rowCompare } from "../sql/statement.js";
import { cleanupTransaction, type PendingBatch, runCleanup, stillRunning, suspectsOf } from "./cleanup.js";
import { deferredIndexSteps, finishShadowSteps } from "./indexes.js";
import { RANGES_PER_WORKER, rangeStatements, readRanges, samplePercent, splitRanges } from "./ranges.js";
import { checkWorkers, runWorkers } from "./workers.js";

export interface BackfillProgress {
  rowsCopied: number;
  rowsEstimated: number;
  batches: number;
  /** Rows per second since this process started copying. */
  rate: number;
  /** Seconds left at the current rate, or null when unknown. */
  etaSeconds: number | null;
  done: boolean;
  /** Rows the next batch asks for (the batch size in use: adapted to --batch-time-ms, at most --batch-size). */
  batchRows: number;
  /** What the copy waits for before its next batch (paused, throttled), or null when it does not wait. */
  waiting: Waiting | null;
}

export interface BackfillOptions extends LockRetryOptions, ThrottleOptions {
  /** Rows per batch (default 10000); with `batchTimeMs`, the first batch's size and the largest. */
  batchSize?: number;
  /**
   * Target duration of one batch, ms: each batch's row count follows the measured duration of the ones before it
   * (BatchSizer: x1.5 up, x0.25 down at most, 100 rows at least, `batchSize` at most), so that an application
   * write meeting the rows a batch holds locked waits at most about this long. Unset: every batch has
   * `batchSize` rows. The CLI's default is 100 ms.
   */
  batchTimeMs?: number;
  /** Pause between batches, ms (default 0): throttles the copy on a busy server. */
  sleepMs?: number;
  onProgress?: (p: BackfillProgress) => void;
  /** Stop after the current batch (its checkpoint is saved) when aborted. */
  signal?: AbortSignal;
  /** Stop after this many batches (tests, and operators who copy in slices). */
  maxBatches?: number;
  /** Logical mode: return only once the stream applies what is written within this many ms (default 1000). */
  maxLagMs?: number;
  /**
   * Lock the rows each batch reads (`FOR SHARE`) instead of cleaning its range afterwards (both modes). Default
   * false: the copy writes nothing to the source (src/backfill/cleanup.ts).
   */
  lockRows?: boolean;
  /**
   * Called inside each batch's transaction once its rows are written, before COMMIT, with the batch's range (the
   * checkpoint it started after, null for the first, and its last key). For tests that provoke the races there.
   */
  onBatchWritten?: (range: { lo: string[] | null; hi: string[] }) => Promise<void>;
  /**
   * Parallel workers (default 1): with more, the key is split into ranges (src/backfill/ranges.ts), each copied
   * from its own checkpoint by one of `workers` loops on connections of their own, and the deferred indexes are
   * built over as many connections. Once a copy is split, every later run goes by its ranges, with any number of
   * workers. An integer from 1 to 64, within the server's free connections (checkWorkers).
   */
  workers?: number;
}

export interface BackfillResult extends BackfillProgress {
  /** Whether the whole table has been copied (false when stopped early). */
  complete: boolean;
  /** Batches that met rows the mirror had already written and ran with ON CONFLICT DO NOTHING. */
  conflictBatches: number;
  /** Without row locks: rows the cleanups deleted from the copy (deleted or moved in the source meanwhile). */
  ghostsDeleted: number;
  /** Without row locks: time spent in the cleanups and waiting for the last ones, ms. */
  cleanupMs: number;
  ms: number;
}

/**
 * The statements of one batch, as printed and as sent (the batch's key values are `$n` parameters):
 * - `upper`: the batch's last key and how many keys it holds (the last of the next N keys after the checkpoint,
 *   an index-only scan; no row when none is left); parameters: the checkpoint (`lower`), then N (the batch's
 *   row count, which changes from batch to batch with --batch-time-ms);
 * - `plain`: the copy as a plain INSERT ... SELECT ... FOR SHARE; parameters: the checkpoint (`lower`), the
 *   batch's last key;
 * - `onConflict`: the same copy with ON CONFLICT (shadow key) DO NOTHING, which also counts the rows read. It
 *   names the shadow's key as its arbiter: PostgreSQL refuses ON CONFLICT without one when the table has a
 *   deferrable unique constraint (docs: INSERT, "ON CONFLICT Clause"), and only the key can legitimately meet
 *   a row the mirror wrote;
 * - `checkpoint`: the migration row's checkpoint (the batch's last key), rows copied and batches, and the
 *   pace: the batch's row count (`batch_rows`), the target duration (`batch_target_ms`, null for fixed-size
 *   batches) and how long the batch took until then (`last_batch_ms`), for pgshift status.
 * With `range` (parallel workers, src/backfill/ranges.ts), the batch is one of a key range's: `upper` also stops at
 * the range's upper bound (with `range.upper`: its key as the parameters after the checkpoint's, N last), and
 * `checkpoint` and `pace` write the range's row (parameters: the batch's last key, rows read, then the range's
 * number; `pace`: the range's number) instead of the migration's.
 * @param lower whether the batch starts after a checkpoint (false for the first batch of a migration).
 */
export function batchStatements(m: Migration, lower: boolean, lockRows: boolean, range?: { upper: boolean }) {
  const key = m.key_columns;
  const k = key.length;
  const keyCols = columnList(key);
  const src = quoteQualified(m.original);
  const dst = quoteQualified(m.partitioned);
  const cols = columnList(m.copy_columns);
  const after = lower ? rowCompare(key, ">", 1) : null;
  const below = range?.upper ? rowCompare(key, "<=", lower ? k + 1 : 1) : null;
  const bounds = [after, below].filter((x) => x !== null);
  const limit = (lower ? k : 0) + (range?.upper ? k : 0) + 1;
  const rows = `SELECT ${cols} FROM ${src} WHERE ${[
    ...(after ? [after] : []),
    rowCompare(key, "<=", lower ? k + 1 : 1),
  ].join(" AND ")}${lockRows ? " FOR SHARE" : ""}`;
  const rangeRow = `migration_id = ${m.id} AND range_no`;
  return {
    upper:
      `SELECT ${key.map((c, i) => `${quoteIdent(c)}::text AS k${i}`).join(", ")}, count(*) OVER () AS n ` +
      `FROM (SELECT ${keyCols} FROM ${src}${bounds.length > 0 ? ` WHERE ${bounds.join(" AND ")}` : ""} ` +
      `ORDER BY ${keyCols} LIMIT $${limit}) s ` +
      `ORDER BY ${key.map((c) => `${quoteIdent(c)} DESC`).join(", ")} LIMIT 1`,
    plain: `INSERT INTO ${dst} (${cols}) ${rows}`,
    onConflict:
      `WITH batch AS (${rows}), ins AS (INSERT INTO ${dst} (${cols}) SELECT ${cols} FROM batch ` +
      `ON CONFLICT (${columnList(m.shadow_key)}) DO NOTHING RETURNING 1) ` +
      `SELECT (SELECT count(*) FROM batch)::int AS read, (SELECT count(*) FROM ins)::int AS inserted`,
    checkpoint: range
      ? `UPDATE pgshift.backfill_ranges SET checkpoint = ARRAY[${placeholders(1, k)}]::text[], rows_copied = ` +
        `rows_copied + $${k + 1}, batches = batches + 1, updated_at = now() WHERE ${rangeRow} = $${k + 2}`
      : `UPDATE pgshift.migrations SET checkpoint = ARRAY[${placeholders(1, k)}]::text[], ` +
        `rows_copied = rows_copied + $${k + 1}, ` +
        `batches = batches + 1, batch_rows = $${k + 2}, batch_target_ms = $${k + 3}, last_batch_ms = $${k + 4}, ` +
        `updated_at = now() WHERE id = ${m.id}`,
    // Without row locks: the pace only (the checkpoint and the counters advance with the cleanup), and this
    // transaction's id and snapshot: the suspects of the batches committed before it (cleanup.ts).
    pace: range
      ? `UPDATE pgshift.backfill_ranges SET updated_at = now() WHERE ${rangeRow} = $1 RETURNING ${SUSPECTS}`
      : `UPDATE pgshift.migrations SET batch_rows = $1, batch_target_ms = $2, last_batch_ms = $3, updated_at = now() ` +
        `WHERE id = ${m.id} RETURNING ${SUSPECTS}`,
  };
}

const SUSPECTS = "pg_current_xact_id()::text AS xid, pg_current_snapshot()::text AS snap";

/** The longest a batch's COMMIT waits for a writer's uncommitted duplicate in a DEFERRABLE unique constraint. */
const DEFERRED_CHECK_WAIT_MS = 200;
/** Logical mode: a batch's lock_timeout (the applier writes the shadow too; a wait on it is retried quickly). */
const APPLIER_WAIT_MS = 100;
/**
 * A batch's statements are sent prepared (postgres.js `prepare`: parsed and planned once per connection, then
 * only bound and run): the same text runs for every batch, with the batch's keys as its values.
 */
const PREPARED = { prepare: true } as const;
/** Batches after a conflict that go straight to ON CONFLICT DO NOTHING. */
const AFTER_CONFLICT = 10;

/** The steps backfill runs (what backfill --dry-run prints) and what its copy needs while it runs. */
export interface BackfillPlan {
  migration: Migration;
  steps: Step[];
}

/**
 * Builds backfill's plan for migration `m` from the state it is in: the phase change, the copy in batches
 * (unless the copy was finished before a crash), the deferred indexes, the shadow's last touches, the phase
 * `backfilled`; in logical mode the stream followed meanwhile. The copy's block and the checks carry the code
 * that runs them (with the very statements printed); `progress` receives the copy's counters as it goes.
 */
export async function planBackfill(sql: Sql, m: Migration, opts: BackfillOptions = {}): Promise<BackfillPlan> {
  const batchSize = opts.batchSize ?? 10000;
  const lockTimeoutMs = opts.lockTimeoutMs ?? 500;
  if (m.phase === "backfilled" || m.phase === "swapped_back") return { migration: m, steps: [] };
  const mirror = mirrorFor(m.mode);
  const logical = mirror.streams(m);
  // No row locks by default, in both modes: see src/backfill/cleanup.ts and docs/design.md ("backfill").
  const lockRows = opts.lockRows ?? false;
  // A DEFERRABLE unique constraint of the shadow (created at start) is checked at the batch's COMMIT, and
  // that check waits for a writer's uncommitted row with the same value; that writer may itself be waiting
  // for a row the batch locked FOR SHARE: a deadlock, whose victim could be the application. So every
  // check is deferred to COMMIT, and COMMIT waits at most DEFERRED_CHECK_WAIT_MS: past it the batch rolls
  // back (lock_timeout, retried) and the writer goes on.
  const deferrable = await sql`
    select exists (select from pg_constraint where conrelid = to_regclass(${quoteQualified(m.partitioned)}) and
      condeferrable and contype in ('u', 'p', 'x')) as d`;
  const hasDeferrable = Boolean(deferrable[0]?.d);
  const workers = opts.workers ?? 1;
  // Parallel workers, or ranges an earlier run split: the copy goes by key ranges (ranges.ts), never split again.
  const split = workers > 1 || (await readRanges(sql, m)).length > 0;
  const run: CopyRun = {
    follower: null,
    copiedHere: 0,
    batches: 0,
    conflictBatches: 0,
    ghosts: 0,
    cleanupMs: 0,
    complete: m.copy_finished_at !== null,
    t0: performance.now(),
    gate: null,
    stop: false,
    batchRows: opts.batchTimeMs && m.batch_target_ms !== null ? (m.batch_rows ?? batchSize) : batchSize,
  };
  const id = m.id;
  const steps: Step[] = [
    {
      ...statement(
        `UPDATE pgshift.migrations SET phase = 'backfilling', backfill_started_at = coalesce(backfill_started_at, ` +
          `now()), ` +
          `rows_estimated = greatest(coalesce((SELECT greatest(reltuples, 0)::bigint FROM pg_catalog.pg_class ` +
          `WHERE oid = to_regclass(${quoteLiteral(quoteQualified(m.original))})), 0), rows_copied), updated_at = ` +
          `now() ` +
          `WHERE id = ${id} RETURNING rows_estimated`,
        "session",
      ),
      read: (rows) => {
        m.rows_estimated = Number(rows[0]?.rows_estimated ?? m.rows_estimated);
      },
    },
  ];
  if (logical)
    steps.push(
      check(
        "follow the replication stream while the copy runs: apply it in this process, or watch pgshift sync apply it",
        async () => {
          run.follower = await mirror.follow(sql, m);
        },
      ),
    );
  if (!run.complete) {
    const variants = new Map<string, ReturnType<typeof batchTx>>();
    /** A batch's statements and transaction, one per shape: after a checkpoint or not, with a range's upper or not. */
    const batch = (lower: boolean, range?: { upper: boolean }) => {
      const key = `${lower}/${range ? range.upper : "-"}`;
      let v = variants.get(key);
      if (!v) {
        v = batchTx(lower, range);
        variants.set(key, v);
      }
      return v;
    };
    const batchTx = (lower: boolean, range?: { upper: boolean }) => {
      const b = batchStatements(m, lower, lockRows, range);
      const plain = block("at most once", "the copy as a plain INSERT (skipped for 10 batches after a conflict)", [
        statement("SAVEPOINT pgshift_batch"),
        statement(b.plain),
        block("at most once", "only when the INSERT meets a row the mirror wrote (unique_violation)", [
          statement("ROLLBACK TO SAVEPOINT pgshift_batch"),
        ]),
      ]);
      const onConflict = block(
        "at most once",
        "the copy with ON CONFLICT DO NOTHING: after a conflict, and for 10 batches after it",
        [statement(b.onConflict)],
      );
      const pre = [
        ...(logical
          ? [statement(lockTimeoutSql(APPLIER_WAIT_MS), "transaction", "the applier writes the shadow too")]
          : []),
        ...(hasDeferrable ? [statement("SET CONSTRAINTS ALL DEFERRED")] : []),
      ];
      const post = hasDeferrable
        ? [statement(lockTimeoutSql(DEFERRED_CHECK_WAIT_MS), "transaction", "how long COMMIT may wait for a writer")]
        : [];
      const tx = transactionStep([
        ...pre,
        statement(b.upper),
        block("at most once", "when keys remain after the checkpoint", [
          plain,
          onConflict,
          statement(lockRows ? b.checkpoint : b.pace),
        ]),
        ...post,
      ]);
      return { b, tx, pre, post };
    };
    const checkpoint0 = m.checkpoint && m.checkpoint.length > 0 ? m.checkpoint : null;
    const marker = statement(
      `UPDATE pgshift.migrations SET updated_at = now() WHERE id = ${id} RETURNING ${SUSPECTS}`,
      "session",
      "the suspects of the last batches: the transactions still running once they committed",
    );
    const rs = rangeStatements(m, checkpoint0 !== null);
    // An earlier run began the copy (it may have copied without row locks).
    const resumed = m.phase === "backfilling";
    /**
     * With --lock-rows, on a copy an earlier run began: that run may have copied without row locks and stopped with
     * batches not cleaned past the checkpoint (a crash, Ctrl-C), whose ghosts this run's batches (FOR SHARE: no new
     * ghost, no cleanup) would never remove. So the copy is cleaned once first, from the checkpoint (`lo`) to the end
     * of the key or of the range, once every transaction running now has ended (they include every writer that may
     * have met the earlier run's batches, which committed before now); the checkpoint is written back unchanged.
     * @returns false when stopped (signal) before it was done: the copy does not go on.
     */
    const cleanBeforeLockedCopy = async (
      conn: Sql,
      range: BackfillRangeRow | null,
      lo: string[] | null,
      counters: { rowsCopied: number; batches: number },
    ): Promise<boolean> => {
      const t0 = performance.now();
      const rangeNo = range ? [range.range_no] : [];
      const r = (await conn.unsafe(range ? batch(false, { upper: false }).b.pace : marker.sql, rangeNo))[0]!;
      const suspects = suspectsOf(String(r.xid), String(r.snap));
      try {
        for (;;) {
          if ((await stillRunning(conn, suspects)).size === 0) {
            const removed = await runCleanup(conn, m, lo, range ? range.upper : null, counters, range?.range_no, lo);
            if (removed !== null) {
              run.ghosts += removed;
              if (removed > 0)
                log().info(
                  { table: displayName(m.live), ghosts: removed, range: range?.range_no },
                  "backfill: deleted from the copy ghosts an earlier run without row locks left past the checkpoint",
                );
              return true;
            }
          }
          if (opts.signal?.aborted || run.stop) return false;
          await new Promise((res) => setTimeout(res, 50));
        }
      } finally {
        run.cleanupMs += performance.now() - t0;
      }
    };
    let waiting: Waiting | null = null;
    const gate = new PaceGate(sql, m, "backfill", {
      ...opts,
      onWait: (w) => {
        waiting = w;
        opts.onProgress?.({
          ...progress(m, run.copiedHere, performance.now() - run.t0, false),
          batchRows: run.batchRows,
          waiting,
        });
      },
    });
    run.gate = gate;
    const stopped = () =>
      Boolean(opts.signal?.aborted) || run.stop || (opts.maxBatches !== undefined && run.batches >= opts.maxBatches);

    /**
     * The batch loop: copies, on connection `conn`, the migration's key from its checkpoint (`range` null: one
     * worker, the checkpoint in the migration's row) or the range `range` from its own checkpoint (kept in its row),
     * batch after batch until no key is left or the copy is stopped. Without row locks, each batch's key range is
     * cleaned once its suspects have ended (cleanup.ts): the suspects of a worker's batches are read in that
     * worker's next transaction, which begins after they committed, whatever the other workers do; the other
     * workers' transactions are only more suspects to wait for, and their ranges never meet this one.
     * @returns whether everything was copied (and, without row locks, cleaned).
     */
    const copyLoop = async (conn: Sql, range: BackfillRangeRow | null): Promise<boolean> => {
      const sizer = opts.batchTimeMs
        ? new BatchSizer({
            targetMs: opts.batchTimeMs,
            maxRows: batchSize,
            startRows: m.batch_target_ms !== null ? (m.batch_rows ?? undefined) : undefined,
          })
        : null;
      const batchRows = () => sizer?.rows ?? batchSize;
      const rangeNo = range ? [range.range_no] : [];
      // Without row locks: the batches whose range is not cleaned yet, and what the stored state says (the clean end).
      const pending: PendingBatch[] = [];
      let clean = range
        ? { rowsCopied: range.rows_copied, batches: range.batches }
        : { rowsCopied: m.rows_copied, batches: m.batches };
      /** Cleans the longest run of pending batches whose suspects have all ended; returns whether none is left. */
      const cleanDue = async (): Promise<boolean> => {
        const t = performance.now();
        try {
          return await cleanDueNow();
        } finally {
          run.cleanupMs += performance.now() - t;
        }
      };
      const cleanDueNow = async (): Promise<boolean> => {
        const known = pending.filter((p) => p.suspects !== null);
        if (known.length === 0) return pending.length === 0;
        const running = await stillRunning(conn, [...new Set(known.flatMap((p) => p.suspects ?? []))]);
        let n = 0;
        while (n < pending.length && pending[n]!.suspects?.every((x) => !running.has(x))) n++;
        if (n === 0) return false;
        const done = pending.slice(0, n);
        const counters = {
          rowsCopied: clean.rowsCopied + done.reduce((a, p) => a + p.rows, 0),
          batches: clean.batches + done.filter((p) => !p.tail).length,
        };
        // The tail (the copy's end) reaches the range's upper bound, or the end of the key, and keeps the checkpoint
        // at the last key copied (a range's checkpoint at its upper bound: the range is done next).
        const last = done[n - 1]!;
        const hi = last.tail ? (range ? range.upper : null) : last.hi;
        const at = last.tail ? (hi ?? last.lo) : last.hi;
        const removed = await runCleanup(conn, m, done[0]!.lo, hi, counters, range?.range_no, at);
        if (removed === null) return false;
        pending.splice(0, n);
        clean = counters;
        run.ghosts += removed;
        if (removed > 0)
          log().info(
            { table: displayName(m.live), ghosts: removed, batches: n, range: range?.range_no },
            "backfill: deleted from the copy rows deleted or moved in the source while their batch ran",
          );
        return pending.length === 0;
      };
      /**
       * Cleans every pending batch: their suspects are read (marker), then waited for. @returns false when stopped
       * (signal) or past `patienceMs`: the checkpoint stays at the clean end; the next run copies from there again.
       */
      const drain = async (patienceMs: number | null): Promise<boolean> => {
        const r = (await conn.unsafe(range ? batch(false, { upper: false }).b.pace : marker.sql, rangeNo))[0]!;
        const sus = suspectsOf(String(r.xid), String(r.snap));
        for (const p of pending) p.suspects ??= sus;
        const t0 = performance.now();
        let told = t0;
        for (;;) {
          if (await cleanDue()) return true;
          const now = performance.now();
          if (opts.signal?.aborted || run.stop || (patienceMs !== null && now - t0 > patienceMs)) return false;
          if (now - told > 10_000) {
            told = now;
            log().info(
              { table: displayName(m.live), batches: pending.length, waitedSeconds: Math.round((now - t0) / 1000) },
              "backfill: waiting for transactions that ran beside the last batches to end before cleaning their range",
            );
          }
          await new Promise((res) => setTimeout(res, 50));
          run.cleanupMs += performance.now() - now;
        }
      };
      let checkpoint = range ? (range.checkpoint ?? range.lower) : checkpoint0;
      // --lock-rows on a copy an earlier run began: see cleanBeforeLockedCopy.
      if (lockRows && resumed && !(await cleanBeforeLockedCopy(conn, range, checkpoint, clean))) return false;
      let fastPathIn = 0;
      let complete = false;
      while (!complete) {
        if (stopped()) break;
        // Between batches (never inside one): wait while paused or throttled.
        await gate.wait();
        if (opts.signal?.aborted || run.stop) break;
        if (!lockRows) await cleanDue();
        const { b, tx: t, pre, post } = batch(checkpoint !== null, range ? { upper: range.upper !== null } : undefined);
        let n = batchRows();
        const lo = checkpoint;
        const values = lo ?? [];
        let tb = performance.now();
        const r0 = await retryTransient((attempt) => {
          // After conflicts that persist, a smaller batch: fewer of the keys the applier (or a writer) holds just now.
          if (attempt > FULL_SIZE_ATTEMPTS) n = Math.max(MIN_RETRY_BATCH_ROWS, Math.ceil(n / 2));
          return runTransaction(conn, t, async (tx) => {
            tb = performance.now();
            for (const x of pre) await tx.unsafe(x.sql);
            const hiRow = (await tx.unsafe(b.upper, [...values, ...(range?.upper ?? []), n], PREPARED))[0];
            let r = {
              read: 0,
              keys: 0,
              hi: null as string[] | null,
              last: true,
              conflict: false,
              suspects: null as string[] | null,
            };
            if (hiRow) {
              const hi = m.key_columns.map((_, i) => String(hiRow[`k${i}`]));
              const keys = [...values, ...hi];
              let read: number;
              let conflict = false;
              if (fastPathIn === 0) {
                // Fast path: a plain INSERT (no speculative insertion per row). A row the mirror already wrote
                // makes it fail with unique_violation; the batch then runs again with ON CONFLICT DO NOTHING.
                await tx.unsafe("SAVEPOINT pgshift_batch");
                try {
                  read = (await tx.unsafe(b.plain, keys, PREPARED)).count;
                } catch (err) {
                  if (sqlState(err) !== "23505") throw err;
                  await tx.unsafe("ROLLBACK TO SAVEPOINT pgshift_batch");
                  read = Number((await tx.unsafe(b.onConflict, keys, PREPARED))[0]?.read ?? 0);
                  conflict = true;
                }
              } else read = Number((await tx.unsafe(b.onConflict, keys, PREPARED))[0]?.read ?? 0);
              await opts.onBatchWritten?.({ lo, hi });
              const pace = [n, opts.batchTimeMs ?? null, Math.round(performance.now() - tb)];
              let suspects: string[] | null = null;
              if (lockRows)
                await tx.unsafe(b.checkpoint, range ? [...hi, read, ...rangeNo] : [...hi, read, ...pace], PREPARED);
              else {
                const x = (await tx.unsafe(b.pace, range ? rangeNo : pace, PREPARED))[0]!;
                suspects = suspectsOf(String(x.xid), String(x.snap));
              }
              r = { read, keys: Number(hiRow.n), hi, last: Number(hiRow.n) < n, conflict, suspects };
            }
            for (const x of post) await tx.unsafe(x.sql);
            return r;
          });
        });
        const result = { ...r0, ms: performance.now() - tb };
        // The next batch's size from this one's duration (the time its rows were locked, COMMIT included).
        if (result.hi) sizer?.observe(result.keys, result.ms);
        if (result.conflict) {
          fastPathIn = AFTER_CONFLICT;
          run.conflictBatches++;
        } else if (fastPathIn > 0 && result.hi) fastPathIn--;
        run.copiedHere += result.read;
        if (result.suspects) {
          // This batch's transaction began after the pending batches committed: their suspects.
          for (const p of pending) p.suspects ??= result.suspects;
          if (result.hi) pending.push({ lo, hi: result.hi, rows: result.read, suspects: null });
        }
        if (result.hi) {
          run.batches++;
          m.rows_copied += result.read;
          m.batches += 1;
          m.batch_rows = n;
          checkpoint = result.hi;
          // The migration's counters and pace, for pgshift status (a range keeps only its own).
          if (range) await conn.unsafe(rs.sync, [n, opts.batchTimeMs ?? null, Math.round(result.ms)], PREPARED);
        }
        run.batchRows = batchRows();
        const p = { ...progress(m, run.copiedHere, performance.now() - run.t0, false), batchRows: batchRows() };
        if (result.hi)
          emit("batch", {
            table: displayName(m.live),
            rows: result.read,
            ms: result.ms,
            batchRows: n,
            rowsCopied: p.rowsCopied,
            rowsEstimated: p.rowsEstimated,
            rate: p.rate,
            etaSeconds: p.etaSeconds,
          });
        if (result.last) {
          complete = true;
          // Without row locks, the last cleanup goes on to the end of the key (or of the range): see PendingBatch.
          if (!lockRows) pending.push({ lo: checkpoint, hi: checkpoint ?? [], rows: 0, suspects: null, tail: true });
          break;
        }
        opts.onProgress?.(p);
        if (opts.sleepMs) await new Promise((r) => setTimeout(r, opts.sleepMs));
      }
      // The last cleanups. Complete: waited for (the copy is not complete before); stopped: a few seconds at most.
      if (!lockRows && !(await drain(complete ? null : 5000)) && complete) complete = false;
      if (complete && range) {
        await conn.unsafe(rs.done, rangeNo, PREPARED);
        await conn.unsafe(rs.sync, [batchRows(), opts.batchTimeMs ?? null, m.last_batch_ms], PREPARED);
      }
      return complete;
    };
    const cleanups = block(
      "any number of times",
      "the cleanup of earlier batches once every transaction that may have met them has ended (pg_xact_status " +
        "of the suspects, a read); the first range from the start of the key, the others from a checkpoint",
      [
        block("at most once", "from the start", [cleanupTransaction(m, false, split)]),
        block("at most once", "from a checkpoint", [cleanupTransaction(m, true, split)]),
        block("at most once", "the last, to the end of the key, from the start", [
          cleanupTransaction(m, false, split, true),
        ]),
        block("at most once", "the last, to the end of the key, from a checkpoint", [
          cleanupTransaction(m, true, split, true),
        ]),
      ],
    );
    const sized = opts.batchTimeMs
      ? `batches of at most ${batchSize} rows sized to last about ${opts.batchTimeMs} ms each (the row count is ` +
        `the upper key's last $n)`
      : `batches of ${batchSize} rows`;
    const locking = lockRows ? "its rows locked FOR SHARE" : "without row locks";
    /** --lock-rows on a copy an earlier run began: cleanBeforeLockedCopy's steps (`first`: the suspects' read). */
    const lockedResume = (first: Step, each: string) =>
      lockRows && resumed
        ? [
            block(
              "at most once",
              `first, as an earlier run began the copy (it may have copied without row locks and stopped with ` +
                `batches not cleaned): the copy cleaned once from the checkpoint to the end of ${each}, once ` +
                `every transaction running now has ended (the checkpoint written back unchanged)`,
              [first, cleanups],
            ),
          ]
        : [];
    if (!split) {
      const first = checkpoint0 ? null : batch(false);
      const next = batch(true);
      steps.push(
        block(
          "once",
          `the copy, in ${sized} in key order, one transaction each (a batch that meets a deadlock ` +
            `or a lock timeout runs again), ${locking}`,
          [
            ...lockedResume(marker, "the key"),
            ...gate.steps(),
            ...(first ? [block("at most once", "the first batch (no checkpoint yet)", [first.tx])] : []),
            block("any number of times", "each next batch, from the checkpoint ($1 ...: the checkpoint's key)", [
              ...(lockRows ? [] : [cleanups]),
              next.tx,
            ]),
            ...(lockRows
              ? []
              : [
                  block(
                    "at most once",
                    "once the copy ends (or stops: then for 5 s at most), the cleanup of the batches not cleaned yet",
                    [marker, cleanups],
                  ),
                ]),
          ],
          async () => {
            run.complete = await copyLoop(sql, null);
            if (run.complete)
              emit("copyComplete", { table: displayName(m.live), rowsCopied: m.rows_copied, batches: m.batches });
          },
        ),
      );
    } else {
      const count = workers * RANGES_PER_WORKER;
      const splitTx = transactionStep(
        [
          statement(rs.split),
          block("once or more", "each range (with a checkpoint already: range 0, it, done)", [statement(rs.insert)]),
        ],
        {
          why:
            `split the key into about ${count} ranges of as many rows each from a sample of the table (the bounds: ` +
            `$1 the sample's percentage, $2 the number of ranges${checkpoint0 ? ", then the checkpoint" : ""})`,
        },
      );
      const rangeBatches = (upper: boolean) => {
        const first = batch(false, { upper });
        const next = batch(true, { upper });
        return [
          block("at most once", "its first batch when it starts at the first key", [first.tx]),
          block("any number of times", "each next batch, from its checkpoint or lower bound ($1 ...)", [
            ...(lockRows ? [] : [cleanups]),
            next.tx,
          ]),
        ];
      };
      const known = await readRanges(sql, m);
      steps.push(
        block(
          "once",
          `the copy by ${workers} worker${workers > 1 ? "s" : ""}, each on a connection of its own, each taking ` +
            `the next unfinished key range (pgshift.backfill_ranges) and copying it from its checkpoint in ${sized} ` +
            `in key order, one transaction each (a batch that meets a deadlock or a lock timeout runs again), ` +
            locking,
          [
            ...(known.length === 0
              ? [splitTx]
              : [
                  check(
                    `the key is split already (${known.length} ranges, ${known.filter((r) => !r.done).length} ` +
                      `unfinished; looked up with: ${rs.read}): never split again`,
                  ),
                ]),
            ...lockedResume(statement(batch(false, { upper: false }).b.pace, "session"), "each unfinished range"),
            ...gate.steps(),
            block("any number of times", "in each range with an upper bound ($n after the lower key)", [
              ...rangeBatches(true),
            ]),
            block("at most once", "in the last range (no upper bound)", rangeBatches(false)),
            block("any number of times", "after each batch", [statement(rs.sync, "session")]),
            ...(lockRows
              ? []
              : [
                  block(
                    "any number of times",
                    "once a range's copy ends (or stops: then for 5 s at most), the cleanup of its batches not " +
                      "cleaned yet ($1: the range)",
                    [statement(batch(false, { upper: false }).b.pace, "session"), cleanups],
                  ),
                ]),
            block("any number of times", "once a range is copied: it is done", [
              statement(rs.done, "session"),
              statement(rs.sync, "session"),
            ]),
          ],
          async () => {
            let ranges = await readRanges(sql, m);
            if (ranges.length === 0)
              ranges = await runTransaction(sql, splitTx, (tx) =>
                splitRanges(tx, m, count, samplePercent(m.rows_estimated)),
              );
            m.rows_copied = ranges.reduce((a, r) => a + r.rows_copied, 0);
            m.batches = ranges.reduce((a, r) => a + r.batches, 0);
            const todo = ranges.filter((r) => !r.done);
            log().info(
              { table: displayName(m.live), ranges: ranges.length, unfinished: todo.length, workers },
              "backfill: copying the key ranges",
            );
            await runWorkers(sql, Math.min(workers, todo.length), todo, copyLoop, () => {
              run.stop = true;
            });
            run.complete = (await readRanges(sql, m)).every((r) => r.done);
            if (run.complete)
              emit("copyComplete", { table: displayName(m.live), rowsCopied: m.rows_copied, batches: m.batches });
          },
        ),
      );
    }
  }
  // Until the copy is complete (stopped early: Ctrl-C, maxBatches) nothing below runs.
  const after: Step[] = [
    // copies_lsn: read after the last batch committed (see the applier's exact mode). Set once: the copy
    // never runs again once copy_finished_at is set.
    statement(
      `UPDATE pgshift.migrations SET copy_finished_at = coalesce(copy_finished_at, now()), ` +
        `copies_lsn = coalesce(copies_lsn, pg_current_wal_insert_lsn()::text), updated_at = now() WHERE id = ${id}`,
      "session",
    ),
    ...(await deferredIndexSteps(sql, m, lockTimeoutMs, workers)),
    // NOT VALID constraints, index marks and comments, then ANALYZE of the partitioned table.
    ...(await finishShadowSteps(sql, m, lockTimeoutMs)),
    statement(
      `UPDATE pgshift.migrations SET phase = 'backfilled', backfill_finished_at = now(), ` +
        `rows_estimated = greatest(rows_estimated, rows_copied), updated_at = now() WHERE id = ${id}`,
      "session",
    ),
  ];
  steps.push(
    block("once", "once every row is copied: the secondary indexes, the shadow's last touches", after, async () => {
      if (run.complete) await runSteps(sql, after);
    }),
  );
  if (logical)
    steps.push(
      check(`wait until the stream applies what is written within ${opts.maxLagMs ?? 1000} ms`, async () => {
        if (!run.complete || !run.follower) return;
        const took = await catchUp(sql, run.follower, opts.maxLagMs ?? 1000);
        log().info(
          { table: displayName(m.original), catchUpMs: took, applied: run.follower.changes(), own: run.follower.own },
          "backfill: stream caught up",
        );
      }),
    );
  runs.set(steps, run);
  return { migration: m, steps };
}

/** What the copy of a plan being run has done so far. */
interface CopyRun {
  follower: StreamFollower | null;
  copiedHere: number;
  batches: number;
  conflictBatches: number;
  complete: boolean;
  /** Rows deleted from the copy by the cleanups (without row locks): ghosts of deletes and moves. */
  ghosts: number;
  cleanupMs: number;
  t0: number;
  /** The wait between batches (pause, throttles); its reason is cleared from the state when the command ends. */
  gate: PaceGate | null;
  /** Set when a worker failed: the others stop after their batch in flight. */
  stop: boolean;
  /** The size of the last batch asked for, rows (progress). */
  batchRows: number;
}
const runs = new WeakMap<Step[], CopyRun>();

/**
 * Copies the rows of the original table into the shadow in keyset batches, in key order, with a
 * checkpoint after each batch (in the batch's own transaction), so that a crash loses at most the
 * batch in flight and `backfill` run again continues from the checkpoint. Runs planBackfill's steps, the
 * ones backfill --dry-run prints.
 *
 * Why no ghost or stale row can appear (docs/design.md, "backfill"):
 * each batch is one READ COMMITTED transaction that
 *  1. finds the batch's last key `hi` (the last of the next N keys after the checkpoint; an index-only scan),
 *  2. `INSERT INTO shadow SELECT ... FROM source WHERE key > checkpoint AND key <= hi FOR SHARE`.
 * (Step 2 first runs as a plain INSERT inside a savepoint, which avoids the per-row cost of speculative
 * insertion; if a row the mirror already wrote is in the way it fails with unique_violation, and the batch
 * runs again with ON CONFLICT DO NOTHING; after such a conflict the next 10 batches go straight to it.)
 * FOR SHARE locks every copied source row until the batch commits. An UPDATE or DELETE that committed
 * before the lock is seen at its newest version (PostgreSQL re-reads a concurrently updated row when it
 * locks it, and skips it if it was deleted or left the range); one that comes after the lock waits for the
 * batch to commit, and its mirror trigger then finds the copied row and updates or deletes it. A row the
 * mirror already wrote is the newest version too (the trigger runs in the writer's transaction), so
 * DO NOTHING keeps it. FOR KEY SHARE would not do: it lets non-key updates (including partition-key
 * updates) through. The checkpoint is `hi`, read from the index before locking, never a key value
 * re-read after a concurrent update (which could jump ahead of rows not yet copied). The batch that finds
 * fewer than N keys is the last: a row written after it read its keys was written with the mirror in place
 * (installed by start, whose lock waited for every earlier writer), so the mirror copies it.
 *
 * Once every row is copied, the secondary indexes are built (deferredIndexSteps), the shadow is finished
 * (finishShadowSteps: NOT VALID constraints, which must not meet the old rows during the copy, replica
 * identity and CLUSTER marks, comments, ANALYZE of the partitioned table), then the phase becomes
 * `backfilled`. Memory is flat: rows go from table to table inside PostgreSQL; only `hi` crosses the network.
 * @throws PgshiftError / PhaseError when there is no migration or it is past the backfill.
 */
export async function backfill(sql: Sql, table: QualifiedName, opts: BackfillOptions = {}): Promise<BackfillResult> {
  await lockMigration(sql, table);
  try {
    const m = await requireMigration(sql, table, "backfill");
    // A throttle query that fails, or workers the server has no connections for, are refused before anything
    // changes (logical mode: the stream takes two connections of its own).
    await new Throttle(opts).validate(sql);
    await checkWorkers(sql, opts.workers ?? 1, mirrorFor(m.mode).streams(m) ? 2 : 0);
    const t0 = performance.now();
    const plan = await planBackfill(sql, m, opts);
    const run = runs.get(plan.steps);
    if (!run) {
      const p = progress(m, 0, 0, true);
      opts.onProgress?.(p);
      return { ...p, complete: true, ms: 0, conflictBatches: 0, ghostsDeleted: 0, cleanupMs: 0 };
    }
    try {
      await runSteps(sql, plan.steps, { lockRetry: opts.retries !== undefined ? { retries: opts.retries } : {} });
    } finally {
      await run.gate?.clear().catch(() => {});
      await run.follower?.stop();
    }
    if (run.complete)
      log().info({ table: displayName(table), rows: m.rows_copied, batches: m.batches }, "backfill complete");
    const ms = performance.now() - t0;
    const p = progress(m, run.copiedHere, ms, run.complete);
    opts.onProgress?.(p);
    const cleaning = { ghostsDeleted: run.ghosts, cleanupMs: Math.round(run.cleanupMs) };
    return { ...p, complete: run.complete, ms, conflictBatches: run.conflictBatches, ...cleaning };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * What backfill would run for `table` now, as backfill --dry-run prints it (formatSteps of planBackfill's
 * steps: a batch's statements once, its key values as `$n`). Changes nothing (the schema is not upgraded).
 */
export async function describeBackfill(sql: Sql, table: QualifiedName, opts: BackfillOptions = {}): Promise<string> {
  const m = await requireMigration(sql, table, "backfill", { upgrade: false });
  const plan = await planBackfill(sql, m, opts);
  if (plan.steps.length === 0)
    return `-- nothing to do: the rows of ${displayName(table)} are copied (phase ${m.phase})\n`;
  return formatSteps(plan.steps);
}

/** Attempts of a batch at its full size; each later attempt after a transient conflict is half as large. */
const FULL_SIZE_ATTEMPTS = 10;
/** The smallest a batch gets when it runs again after transient conflicts, rows. */
const MIN_RETRY_BATCH_ROWS = 100;
/** How long a batch keeps running again after transient conflicts before backfill gives up, ms. */
const TRANSIENT_DEADLINE_MS = 120_000;

/**
 * Runs `fn(attempt)` (attempt 1, 2, ...) again, after a short random pause (10 ms growing to 250 ms), when it
 * fails with a deadlock, a serialization failure or a lock timeout, for up to TRANSIENT_DEADLINE_MS in all: in
 * logical mode the applier writes the shadow too, and a batch may collide with its open group again and again
 * while the application writes fast (the caller makes the batch smaller after FULL_SIZE_ATTEMPTS). A batch is one
 * transaction, so a retry starts from the same checkpoint.
 * @throws PgshiftError (with the last conflict as cause) past the deadline; any other error of `fn` as is.
 */
async function retryTransient<T>(fn: (attempt: number) => Promise<T>): Promise<T> {
  const transient = (err: unknown) => ["40P01", "40001", "55P03"].includes(sqlState(err) ?? "");
  let attempts = 0;
  try {
    return await pRetry(() => fn(++attempts), {
      retries: 10_000,
      maxRetryTime: TRANSIENT_DEADLINE_MS,
      minTimeout: 10,
      maxTimeout: 250,
      factor: 1.3,
      randomize: true,
      shouldRetry: ({ error }) => transient(error),
      onFailedAttempt: ({ error, attemptNumber }) => {
        if (!transient(error)) return;
        const at = { code: sqlState(error), attempt: attemptNumber };
        const what = "backfill: batch rolled back by a transient conflict, retrying";
        if (attemptNumber % 50 === 0) log().info(at, `${what} (a smaller batch)`);
        else log().debug(at, what);
      },
    });
  } catch (err) {
    if (!transient(err)) throw err;
    throw new PgshiftError(
      `a batch of the copy met a lock held by another session in each of ${attempts} attempts over ` +
        `${TRANSIENT_DEADLINE_MS / 1000} s (${sqlState(err)})`,
      {
        hint:
          "the applier or a writer keeps the shadow's rows locked; check pg_stat_activity for long transactions on " +
          "the shadow, then run pgshift backfill again (it resumes from its checkpoint)",
        cause: err,
      },
    );
  }
}

function progress(m: Migration, copiedHere: number, ms: number, done: boolean): BackfillProgress {
  const batchRows = m.batch_rows ?? 0;
  const rate = ms > 0 ? (copiedHere * 1000) / ms : 0;
  const left = Math.max(0, m.rows_estimated - m.rows_copied);
  return {
    rowsCopied: m.rows_copied,
    rowsEstimated: Math.max(m.rows_estimated, m.rows_copied),
    batches: m.batches,
    rate,
    etaSeconds: done ? 0 : rate > 0 ? left / rate : null,
    done,
    batchRows,
    waiting: null,
  };
}
