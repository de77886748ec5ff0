import pRetry from "p-retry";
import { inspectTable } from "../catalog/inspect.js";
import type { Sql } from "../db.js";
import {
  type AnySql,
  type Fragment,
  identList,
  joinFragments,
  type LockRetryOptions,
  type TxSql,
  table as tableRef,
  textColumns,
  transaction,
  valueList,
} from "../db.js";
import { afterCopySql, deferredIndexSql } from "../ddl/shadow.js";
import { sqlState } from "../errors.js";
import { log } from "../log.js";
import { lockMigration, type Migration, requireMigration, unlockMigration } from "../migration/state.js";
import { catchUp, followStream } from "../mirror/stream.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";
import { buildDeferredIndexes, finishShadow } from "./indexes.js";

export interface BackfillProgress {
  rowsCopied: number;
  rowsEstimated: number;
  batches: number;
  /** Rows per second since this process started copying. */
  rate: number;
  /** Seconds left at the current rate, or null when unknown. */
  etaSeconds: number | null;
  done: boolean;
}

export interface BackfillOptions extends LockRetryOptions {
  /** Rows per batch (default 10000). */
  batchSize?: number;
  /** Pause between batches, ms (default 0): throttles the copy on a busy server. */
  sleepMs?: number;
  onProgress?: (p: BackfillProgress) => void;
  /** Stop after the current batch (its checkpoint is saved) when aborted. */
  signal?: AbortSignal;
  /** Stop after this many batches (tests, and operators who copy in slices). */
  maxBatches?: number;
  /** Logical mode: return only once the stream applies what is written within this many ms (default 1000). */
  maxLagMs?: number;
}

export interface BackfillResult extends BackfillProgress {
  /** Whether the whole table has been copied (false when stopped early). */
  complete: boolean;
  /** Batches that met rows the mirror had already written and ran with ON CONFLICT DO NOTHING. */
  conflictBatches: number;
  ms: number;
}

/** `(a, b) > ($1, $2)`: keyset predicate on the key columns. */
export function keyAfter(sql: AnySql, key: readonly string[], after: readonly string[]): Fragment {
  return sql`(${identList(sql, key)}) > (${valueList(sql, after)})`;
}

/**
 * Copies the rows of the original table into the shadow in keyset batches, in key order, with a
 * checkpoint after each batch (in the batch's own transaction), so that a crash loses at most the
 * batch in flight and `backfill` run again continues from the checkpoint.
 *
 * Why no ghost or stale row can appear (docs/design.md, "backfill"):
 * each batch is one READ COMMITTED transaction that
 *  1. finds the batch's upper key `hi` (the N-th key after the checkpoint; an index-only scan), then
 *  2. `INSERT INTO shadow SELECT ... FROM source WHERE key > checkpoint AND key <= hi FOR SHARE
 *     ON CONFLICT DO NOTHING`.
 * (Step 2 first runs as a plain INSERT inside a savepoint, which avoids the per-row cost of speculative
 * insertion; if a row the mirror already wrote is in the way it fails with unique_violation, and the batch
 * runs again as written above; after such a conflict the next 10 batches go straight to ON CONFLICT.)
 * FOR SHARE locks every copied source row until the batch commits. An UPDATE or DELETE that committed
 * before the lock is seen at its newest version (PostgreSQL re-reads a concurrently updated row when it
 * locks it, and skips it if it was deleted or left the range); one that comes after the lock waits for the
 * batch to commit, and its mirror trigger then finds the copied row and updates or deletes it. A row the
 * mirror already wrote is the newest version too (the trigger runs in the writer's transaction), so
 * DO NOTHING keeps it. FOR KEY SHARE would not do: it lets non-key updates (including partition-key
 * updates) through. The checkpoint is `hi`, read from the index before locking, never a key value
 * re-read after a concurrent update (which could jump ahead of rows not yet copied).
 *
 * Once every row is copied, the secondary indexes are built (buildDeferredIndexes), the shadow is finished
 * (finishShadow: NOT VALID constraints, which must not meet the old rows during the copy, replica identity
 * and CLUSTER marks, comments, ANALYZE of the partitioned table), then the phase becomes `backfilled`. Memory is flat: rows go from table to table inside PostgreSQL; only `hi` crosses
 * the network.
 * @throws PgshiftError / PhaseError when there is no migration or it is past the backfill.
 */
export async function backfill(sql: Sql, table: QualifiedName, opts: BackfillOptions = {}): Promise<BackfillResult> {
  const batchSize = opts.batchSize ?? 10000;
  await lockMigration(sql, table);
  try {
    let m = await requireMigration(sql, table, "backfill");
    const t0 = performance.now();
    if (m.phase === "backfilled" || m.phase === "swapped_back") {
      const p = progress(m, 0, 0, true);
      opts.onProgress?.(p);
      return { ...p, complete: true, ms: 0, conflictBatches: 0 };
    }
    const est =
      await sql`select greatest(reltuples, 0)::bigint as n from pg_class where oid = to_regclass(${quoteQualified(m.original)})`;
    await sql`
      update pgshift.migrations set phase = 'backfilling', backfill_started_at = coalesce(backfill_started_at, now()),
             rows_estimated = greatest(${Number(est[0]?.n ?? 0)}::bigint, rows_copied), updated_at = now()
       where id = ${m.id}`;
    m = (await requireMigration(sql, table, "backfill"))!;
    const key = m.key_columns;
    const keyCols = identList(sql, key);
    let checkpoint = m.checkpoint && m.checkpoint.length > 0 ? m.checkpoint : null;
    /** Batches left before the plain-INSERT fast path is tried again after a conflict. */
    let fastPathIn = 0;
    let conflictBatches = 0;
    // A DEFERRABLE unique constraint of the shadow (created at start) is checked at the batch's COMMIT, and
    // that check waits for a writer's uncommitted row with the same value; that writer may itself be waiting
    // for a row the batch locked FOR SHARE: a deadlock, whose victim could be the application. So every
    // check is deferred to COMMIT, and COMMIT waits at most DEFERRED_CHECK_WAIT: past it the batch rolls back
    // (lock_timeout, retried) and the writer goes on.
    const deferrable = await sql`
      select exists (select from pg_constraint where conrelid = to_regclass(${quoteQualified(m.partitioned)}) and condeferrable and contype in ('u', 'p', 'x')) as d`;
    const hasDeferrable = Boolean(deferrable[0]?.d);
    const copyOnConflict = async (tx: TxSql, where: Fragment): Promise<number> => {
      const r = await batchSql(tx, m, where).onConflict;
      return Number(r[0]?.read ?? 0);
    };
    let copiedHere = 0;
    let batches = 0;
    // After a crash while the indexes were being built, the copy is not done again.
    let complete = m.copy_finished_at !== null;
    // Logical mode: the stream is applied while the copy runs (by this process when the slot is free).
    const follower = m.mode === "logical" && m.slot_name ? await followStream(sql, m) : null;
    try {
      while (!complete) {
        if (opts.signal?.aborted || (opts.maxBatches !== undefined && batches >= opts.maxBatches)) break;
        const result = await retryTransient(() =>
          transaction(sql, async (tx) => {
            // Logical mode: the applier writes the shadow too. A short lock_timeout turns a wait on its
            // uncommitted rows (a possible deadlock, detected only after deadlock_timeout) into a quick retry.
            if (follower) await tx`select set_config('lock_timeout', '100ms', true)`;
            if (hasDeferrable) await tx`set constraints all deferred`;
            const lower = checkpoint ? sql`where ${keyAfter(tx, key, checkpoint)}` : sql``;
            const hiRows = await upperKeySql(tx, m, lower, batchSize);
            const hiRaw = hiRows[0];
            const hi = hiRaw ? key.map((_, i) => String(hiRaw[`k${i}`])) : null;
            const conds: Fragment[] = [];
            if (checkpoint) conds.push(keyAfter(tx, key, checkpoint));
            if (hi) conds.push(tx`(${keyCols}) <= (${valueList(tx, hi)})`);
            const where = conds.length === 0 ? tx`` : tx`where ${joinFragments(tx, conds, tx` and `)}`;
            let read: number;
            if (fastPathIn === 0) {
              // Fast path: a plain INSERT (no speculative insertion per row). A row the mirror already wrote
              // makes it fail with unique_violation; the batch then runs again with ON CONFLICT DO NOTHING.
              await tx`savepoint pgshift_batch`;
              try {
                const r = await batchSql(tx, m, where).plain;
                read = r.count;
              } catch (err) {
                if (sqlState(err) !== "23505") throw err;
                await tx`rollback to savepoint pgshift_batch`;
                read = await copyOnConflict(tx, where);
                fastPathIn = 10;
                conflictBatches++;
              }
            } else {
              read = await copyOnConflict(tx, where);
              fastPathIn--;
            }
            await tx`
          update pgshift.migrations set checkpoint = ${hi ? tx.array(hi) : tx.array(checkpoint ?? [])}::text[],
                 rows_copied = rows_copied + ${read}, batches = batches + 1, updated_at = now()
           where id = ${m.id}`;
            if (hasDeferrable) await tx`select set_config('lock_timeout', ${DEFERRED_CHECK_WAIT}, true)`;
            return { read, hi };
          }),
        );
        copiedHere += result.read;
        batches++;
        m.rows_copied += result.read;
        m.batches += 1;
        if (!result.hi) {
          complete = true;
          break;
        }
        checkpoint = result.hi;
        opts.onProgress?.(progress(m, copiedHere, performance.now() - t0, false));
        if (opts.sleepMs) await new Promise((r) => setTimeout(r, opts.sleepMs));
      }
      if (complete) {
        // copies_lsn: read after the last batch committed (see the applier's exact mode). Set once: the copy
        // never runs again once copy_finished_at is set.
        await sql`
        update pgshift.migrations set copy_finished_at = coalesce(copy_finished_at, now()),
               copies_lsn = coalesce(copies_lsn, pg_current_wal_insert_lsn()::text), updated_at = now()
         where id = ${m.id}`;
        const built = await buildDeferredIndexes(sql, m, opts);
        if (built > 0) log().info({ table: displayName(table), indexes: built }, "backfill: secondary indexes built");
        // NOT VALID constraints, index marks and comments, then ANALYZE of the partitioned table.
        await finishShadow(sql, m, opts);
        await sql`
        update pgshift.migrations set phase = 'backfilled', backfill_finished_at = now(),
               rows_estimated = greatest(rows_estimated, rows_copied), updated_at = now()
         where id = ${m.id}`;
        log().info({ table: displayName(table), rows: m.rows_copied, batches: m.batches }, "backfill complete");
      }
      if (complete && follower) {
        const took = await catchUp(sql, follower, opts.maxLagMs ?? 1000);
        log().info(
          { table: displayName(table), catchUpMs: took, applied: follower.changes(), own: follower.own },
          "backfill: stream caught up",
        );
      }
    } finally {
      await follower?.stop();
    }
    const ms = performance.now() - t0;
    const p = progress(m, copiedHere, ms, complete);
    opts.onProgress?.(p);
    return { ...p, complete, ms, conflictBatches };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/** The batch's upper key: the N-th key after the checkpoint (key values as text). Not executed until awaited. */
export function upperKeySql(tx: AnySql, m: Migration, lower: Fragment, batchSize: number) {
  const keyCols = identList(tx, m.key_columns);
  return tx`
    select ${textColumns(tx, m.key_columns)} from (
      select ${keyCols} from ${tableRef(tx, m.original)} ${lower} order by ${keyCols} offset ${batchSize - 1} limit 1) s`;
}

/** The longest a batch's COMMIT waits for a writer's uncommitted duplicate in a DEFERRABLE unique constraint. */
const DEFERRED_CHECK_WAIT = "200ms";

/**
 * The two forms of a batch copy: the plain INSERT tried first, and the ON CONFLICT DO NOTHING fallback.
 * The fallback names the shadow's key as its arbiter: PostgreSQL refuses ON CONFLICT without one when the
 * table has a deferrable unique constraint (docs: INSERT, "ON CONFLICT Clause"), and only the key can
 * legitimately meet a row the mirror wrote.
 */
export function batchSql(tx: AnySql, m: Migration, where: Fragment) {
  const src = tableRef(tx, m.original);
  const dst = tableRef(tx, m.partitioned);
  const cols = identList(tx, m.copy_columns);
  return {
    plain: tx`insert into ${dst} (${cols}) select ${cols} from ${src} ${where} for share`,
    onConflict: tx`
        with batch as (select ${cols} from ${src} ${where} for share),
             ins as (insert into ${dst} (${cols}) select ${cols} from batch on conflict (${identList(tx, m.shadow_key)}) do nothing returning 1)
        select (select count(*) from batch)::int as read, (select count(*) from ins)::int as inserted`,
  };
}

/**
 * The statements one batch runs, as PostgreSQL receives them ($n are the key values), and the statements
 * run after the copy. Asks the server to describe each (parse only: nothing is executed).
 */
export async function describeBackfill(sql: Sql, table: QualifiedName, batchSize = 10000): Promise<string[]> {
  const m = await requireMigration(sql, table, "backfill", { upgrade: false });
  const key = m.key_columns;
  const sample = key.map(() => "0");
  const keyCols = identList(sql, key);
  const where = sql`where ${keyAfter(sql, key, sample)} and (${keyCols}) <= (${valueList(sql, sample)})`;
  const b = batchSql(sql, m, where);
  const out: string[] = ["begin"];
  for (const q of [
    upperKeySql(sql, m, sql`where ${keyAfter(sql, key, sample)}`, batchSize),
    sql`savepoint pgshift_batch`,
    b.plain,
  ]) {
    out.push(((await q.describe()) as unknown as { string: string }).string.replace(/\s+/g, " ").trim());
  }
  out.push(
    "-- only when the INSERT meets a row the mirror wrote (unique_violation):",
    "rollback to savepoint pgshift_batch",
  );
  out.push(((await b.onConflict.describe()) as unknown as { string: string }).string.replace(/\s+/g, " ").trim());
  out.push(
    "update pgshift.migrations set checkpoint = $1, rows_copied = rows_copied + $2, batches = batches + 1, updated_at = now() where id = $3",
    "commit",
  );
  const parts =
    await sql`select c.relname::text as name from pg_inherits i join pg_class c on c.oid = i.inhrelid where i.inhparent = to_regclass(${quoteQualified(m.partitioned)}) order by 1`;
  for (const idx of m.deferred_indexes) {
    const d = deferredIndexSql(
      m.partitioned.schema,
      m.partitioned.name,
      parts.map((p) => String(p.name)),
      idx,
    );
    out.push(d.parent, ...d.perPartition.flatMap((x) => [x.create, ...(x.constrain ? [x.constrain] : []), x.attach]));
  }
  const facts = await inspectTable(sql, m.original);
  if (facts) out.push(...afterCopySql(facts, { source: m.original, shadow: m.partitioned }));
  return out;
}

/**
 * Runs `fn` again (up to 20 times, after a short random pause) when it fails with a deadlock, a
 * serialization failure or a lock timeout: in logical mode the applier writes the shadow too, and a batch
 * may collide with it. A batch is one transaction, so a retry starts from the same checkpoint.
 */
async function retryTransient<T>(fn: () => Promise<T>): Promise<T> {
  const transient = (err: unknown) => ["40P01", "40001", "55P03"].includes(sqlState(err) ?? "");
  return pRetry(fn, {
    retries: 19,
    minTimeout: 10,
    maxTimeout: 50,
    factor: 1.3,
    randomize: true,
    shouldRetry: ({ error }) => transient(error),
    onFailedAttempt: ({ error, attemptNumber }) => {
      if (transient(error))
        log().debug(
          { code: sqlState(error), attempt: attemptNumber },
          "backfill: batch rolled back by a transient conflict, retrying",
        );
    },
  });
}

function progress(m: Migration, copiedHere: number, ms: number, done: boolean): BackfillProgress {
  const rate = ms > 0 ? (copiedHere * 1000) / ms : 0;
  const left = Math.max(0, m.rows_estimated - m.rows_copied);
  return {
    rowsCopied: m.rows_copied,
    rowsEstimated: Math.max(m.rows_estimated, m.rows_copied),
    batches: m.batches,
    rate,
    etaSeconds: done ? 0 : rate > 0 ? left / rate : null,
    done,
  };
}
