import { buildDeferredIndexes } from "../backfill/indexes.js";
import {
  dependencySnapshot,
  type LateIndex,
  type LateObjects,
  lateDependentsRefusal,
  lateIndexLine,
  lateObjects,
  newDependents,
  requireNoDrift,
} from "../catalog/drift.js";
import type { AnySql, Sql, TxSql } from "../db.js";
import { type LockRetryOptions, withLockRetry } from "../db.js";
import { deferredIndexSql, liveNamesSql } from "../ddl/shadow.js";
import { PgshiftError } from "../errors.js";
import { log } from "../log.js";
import { allows, tablesIn } from "../migration/phases.js";
import {
  loadMigration,
  lockMigration,
  type Migration,
  type Phase,
  requireMigration,
  unlockMigration,
} from "../migration/state.js";
import { dropStream, dropStreamSql, lsnToBigInt, slotState } from "../mirror/logical.js";
import { mirrorFor } from "../mirror/mirror.js";
import { CatchupTimeout, followStream } from "../mirror/stream.js";
import { truncateGuardSql } from "../mirror/trigger.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";

/** The stream did not catch up while the live table was locked (the locks are released and the attempt retried). */

export interface CutoverOptions extends LockRetryOptions {
  /** Logical mode: how long to wait, under the lock, for the stream to apply every committed change (default 2000 ms). */
  catchupTimeoutMs?: number;
  /** Test hook: runs inside the transaction after every statement, before COMMIT. */
  beforeCommit?: (tx: TxSql) => Promise<void>;
  /** Test hook: runs after the late objects were checked and carried over, before the transaction that locks. */
  beforeLock?: () => Promise<void>;
}

export interface CutoverResult {
  /** From the moment both ACCESS EXCLUSIVE locks were granted to COMMIT: how long writes were blocked, ms. */
  lockHeldMs: number;
  /** Attempts made (1 = the locks were granted at the first try). */
  attempts: number;
  phase: Phase;
  statements: string[];
  /** Indexes created on the live table during the migration that were built on the copy before the lock (carryOver). */
  indexesBuilt: BuiltIndex[];
}

/** An index built on the copy before the switch: its name there, the live table's index it stands for, its definition after USING. */
export interface BuiltIndex {
  name: string;
  on: string;
  original: string;
  definition: string;
  /** Unique, widened with the partition column (the copy is partitioned). */
  widened: boolean;
}

/** The migration as it will be named in `phase` (names swap at cutover; tablesIn, phases.ts). */
function renamed(m: Migration, phase: Phase): Migration {
  return { ...m, phase, ...tablesIn(m, phase) };
}

/**
 * The statements of the cutover transaction (phase backfilled or swapped_back -> cutover), in order:
 * lock both tables, stop the forward mirror, rename the original to the retired name and the shadow to
 * the original name, give serial sequences to the new live table, start the reverse mirror (new live ->
 * retired) so swap-back loses nothing.
 */
export function cutoverSql(m: Migration): string[] {
  return switchSql(m, "cutover");
}

/**
 * Everything `cutover` runs, as SQL text for --dry-run. In logical mode (a slot to catch up with): the lock
 * of the table and the WAL position read first, in the same transaction; between them and the renames, the
 * stream is applied up to that position within --catchup-timeout-ms (a WAL flush is forced on a connection
 * of its own: a logical message committed with synchronous_commit on); after COMMIT, the slot and the
 * publication (now on the retired table) are dropped.
 */
export function cutoverPlanSql(m: Migration): string[] {
  const statements = cutoverSql(m);
  if (m.mode !== "logical" || !m.slot_name) return statements;
  return [
    `LOCK TABLE ${quoteQualified(m.live)} IN ACCESS EXCLUSIVE MODE`,
    "SELECT pg_current_wal_insert_lsn()",
    ...statements,
    ...dropStreamSql(m.slot_name, m.publication_name, renamed(m, "cutover").copy),
  ];
}

/** The statements of swap-back (phase cutover -> swapped_back): the same in reverse. */
export function swapBackSql(m: Migration): string[] {
  return switchSql(m, "swapped_back");
}

function switchSql(m: Migration, to: Phase): string[] {
  const mirror = mirrorFor(m.mode);
  const next = renamed(m, to);
  const out: string[] = [`LOCK TABLE ${quoteQualified(m.live)}, ${quoteQualified(m.copy)} IN ACCESS EXCLUSIVE MODE`];
  out.push(...mirror.stopSql(m));
  // m.live (original name) becomes the copy's name in the next phase; m.copy takes the original name.
  out.push(`ALTER TABLE ${quoteQualified(m.live)} RENAME TO ${quoteIdent(next.copy.name)}`);
  out.push(`ALTER TABLE ${quoteQualified(m.copy)} RENAME TO ${quoteIdent(m.source_table)}`);
  // The live table's indexes and statistics take the original names (ON CONFLICT ON CONSTRAINT name), the copy's the shadow's.
  out.push(...liveNamesSql(next.live, next.copy, m.index_renames));
  for (const s of m.sequences) {
    // Serial sequences follow the live table so that finalize (which drops the retired table) keeps them.
    // Identity sequences stay with the original table; finalize re-creates the identity on the new table.
    if (s.identity === "" && s.schema === m.source_schema) {
      out.push(
        `ALTER SEQUENCE ${quoteQualified({ schema: s.schema, name: s.name })} OWNED BY ${quoteQualified(next.live)}.${quoteIdent(s.column)}`,
      );
    }
  }
  out.push(...mirror.startSql(next));
  // The copy keeps the TRUNCATE guard it has had since start (a migration started by an older pgshift gets it here).
  out.push(...truncateGuardSql(next.copy));
  return out;
}

/**
 * Refuses (before any change) to switch tables, or to finalize, while the last verify found rows that differ
 * between the live table and its copy and nothing has verified them equal since: the switch would make the
 * copy live, differences and all; finalize would drop the only copy of rows the live table lacks.
 * @param what the refused step, for the message ("cut over", "swap back", "finalize").
 * @throws PgshiftError naming the counts and when the verify ran.
 */
export function requireNoKnownDifferences(m: Migration, what: string): void {
  const v = m.last_verify;
  if (!v || v.equal) return;
  throw new PgshiftError(
    `cannot ${what}: the last verify (${v.at}) found ${v.missing} missing, ${v.extra} extra and ${v.different} different rows in ${displayName(m.copy)}`,
    {
      hint: `run pgshift verify --repair ${displayName({ schema: m.source_schema, name: m.source_table })} (or pgshift verify, if they were repaired since), then again`,
    },
  );
}

/**
 * The statements that build one late index on the copy (lateObjects): on a partitioned copy an invalid index
 * ON ONLY the parent, then per partition CREATE INDEX CONCURRENTLY and ATTACH PARTITION (deferredIndexSql, as
 * the backfill builds the shadow's indexes); on the retired table one CREATE INDEX CONCURRENTLY. None of them
 * blocks the writes the mirror makes to the copy for more than the parent's brief lock (docs: CREATE INDEX,
 * "Building Indexes Concurrently"; ALTER INDEX ... ATTACH PARTITION).
 */
async function lateIndexSql(sql: AnySql, lo: LateObjects, i: LateIndex): Promise<string[]> {
  if (!i.partitioned) {
    return [
      `CREATE ${i.build.unique ? "UNIQUE " : ""}INDEX CONCURRENTLY IF NOT EXISTS ${quoteIdent(i.build.name)} ON ${quoteQualified(lo.copy)} USING ${i.build.definition}`,
    ];
  }
  const parts = await sql`
    select c.relname::text as name from pg_catalog.pg_inherits h join pg_catalog.pg_class c on c.oid = h.inhrelid
     where h.inhparent = to_regclass(${quoteQualified(lo.copy)}) order by c.relname`;
  const d = deferredIndexSql(
    lo.copy.schema,
    lo.copy.name,
    parts.map((p) => String(p.name)),
    i.build,
  );
  return [d.parent, ...d.perPartition.flatMap((x) => [x.create, x.attach])];
}

/** The statement that records renames in the migration (finalize gives each `from` index the name `to`). */
function recordRenamesSql(m: Migration, renames: readonly { from: string; to: string }[]): string {
  return `UPDATE pgshift.migrations SET index_renames = ${quoteLiteral(JSON.stringify([...m.index_renames, ...renames]))}::jsonb, updated_at = now() WHERE id = ${m.id}`;
}

/**
 * What cutover (or swap-back) runs before its transaction to carry the objects created on the live table
 * during the migration over to the copy (lateObjects): the index builds, then the statement that records the
 * partitioned table's new indexes in the migration's index renames. For --dry-run; carryOver runs the same.
 * @returns the statements, and the migration as the switch's transaction then reads it (index renames recorded).
 * @throws PgshiftError (exit 2) naming every other object that would be left behind, with the statements to
 *   run (lateDependentsRefusal).
 */
export async function carryOverSql(
  sql: AnySql,
  m: Migration,
  table: QualifiedName,
): Promise<{ statements: string[]; migration: Migration }> {
  const lo = await lateObjects(sql, m);
  const refusal = lateDependentsRefusal(lo, table);
  if (refusal) throw refusal;
  const out: string[] = [];
  for (const i of lo.indexes) out.push(...(await lateIndexSql(sql, lo, i)));
  const renames = [
    ...lo.renames,
    ...(lo.step === "cutover" ? lo.indexes.map((i) => ({ from: i.build.name, to: i.name })) : []),
  ];
  if (renames.length > 0) out.push(recordRenamesSql(m, renames));
  return { statements: out, migration: { ...m, index_renames: [...m.index_renames, ...renames] } };
}

/**
 * Carries the objects created on the live table since start over to the copy, before the switch takes its
 * lock: builds each late index there (lateIndexSql; re-runnable: an index left INVALID by an interrupted
 * build is dropped and built again), records those of a partitioned copy in `index_renames` so that
 * finalize gives them the original names, and checks again until nothing new appeared (at most 4 rounds).
 * @returns the indexes built, and a snapshot of the live table's dependents (dependencySnapshot) taken
 *   before the last check, for the re-check under the lock.
 * @throws PgshiftError (exit 2) when anything else depends on the live table (lateDependentsRefusal; nothing
 *   changed), when a build fails (the switch has not happened), or when indexes keep appearing.
 */
async function carryOver(
  sql: Sql,
  m0: Migration,
  table: QualifiedName,
  opts: LockRetryOptions,
): Promise<{ built: BuiltIndex[]; snapshot: string[] }> {
  let m = m0;
  const built: BuiltIndex[] = [];
  for (let round = 0; round < 4; round++) {
    const snapshot = await dependencySnapshot(sql, m.live);
    const lo = await lateObjects(sql, m);
    const refusal = lateDependentsRefusal(lo, table);
    if (refusal) throw refusal;
    if (lo.indexes.length === 0 && lo.renames.length === 0) return { built, snapshot };
    const renames = [...lo.renames];
    for (const i of lo.indexes) {
      log().info({ table: displayName(table) }, lateIndexLine(lo, i));
      if (i.widened)
        log().warn(
          { index: i.name, on: displayName(lo.copy), definition: i.build.definition },
          `unique index ${i.name} is built on the partitioned table with the partition column added to its key: unique only together with it`,
        );
      try {
        if (i.partitioned) {
          await buildDeferredIndexes(sql, { ...m, partitioned: lo.copy, deferred_indexes: [i.build] }, opts);
        } else {
          const q = quoteQualified({ schema: lo.copy.schema, name: i.build.name });
          const st =
            await sql`select indisvalid as valid from pg_catalog.pg_index where indexrelid = to_regclass(${q})`;
          if (st[0] && !st[0].valid) await sql.unsafe(`DROP INDEX CONCURRENTLY IF EXISTS ${q}`);
          for (const stmt of await lateIndexSql(sql, lo, i)) await sql.unsafe(stmt);
        }
      } catch (err) {
        if (err instanceof PgshiftError) throw err;
        throw new PgshiftError(
          `cannot ${lo.step === "cutover" ? "cut over" : "swap back"}: building index ${i.build.name} on ${displayName(lo.copy)} (for index ${i.name} of ${displayName(lo.live)}) failed: ${err instanceof Error ? err.message : String(err)}`,
          {
            hint: `nothing was switched; fix the cause (or drop index ${i.name}), then run pgshift ${lo.step} ${displayName(table)} again`,
            cause: err,
          },
        );
      }
      built.push({
        name: i.build.name,
        on: displayName(lo.copy),
        original: i.name,
        definition: i.build.definition,
        widened: i.widened,
      });
      if (lo.step === "cutover") renames.push({ from: i.build.name, to: i.name });
    }
    if (renames.length > 0) {
      await sql.unsafe(recordRenamesSql(m, renames));
      m = { ...m, index_renames: [...m.index_renames, ...renames] };
    }
  }
  throw new PgshiftError(
    `cannot ${m0.phase === "cutover" ? "swap back" : "cut over"}: indexes kept being created on ${displayName(m0.live)} while pgshift built their counterparts; nothing was switched`,
    {
      hint: `run pgshift ${m0.phase === "cutover" ? "swap-back" : "cutover"} ${displayName(table)} again once no more are being created`,
    },
  );
}

async function switchTables(
  sql: Sql,
  table: QualifiedName,
  to: "cutover" | "swapped_back",
  opts: CutoverOptions,
): Promise<CutoverResult> {
  await lockMigration(sql, table);
  try {
    const command = to === "cutover" ? "cutover" : "swap-back";
    const m0 = await requireMigration(sql, table, command);
    const health = await mirrorFor(m0.mode).health(sql, m0);
    if (!health.ok)
      throw new PgshiftError(`the mirror is not healthy: ${health.detail}`, {
        hint: "run pgshift verify --repair after fixing it, or pgshift abort",
      });
    const what = to === "cutover" ? "cut over" : "swap back";
    await requireNoDrift(sql, m0, what);
    requireNoKnownDifferences(m0, what);
    // Objects created on the live table since start: indexes are built on the copy now (never under the lock),
    // anything else refuses; under the lock a snapshot of its dependents shows whatever came in between.
    const carried = await carryOver(sql, m0, table, opts);
    await opts.beforeLock?.();
    let attempts = 0;
    let statements: string[] = [];
    // Logical mode, before the first cutover: the shadow follows the slot; it must have applied every change
    // committed before the lock. Lock the live table only (the applier keeps writing the shadow), read
    // pg_current_wal_insert_lsn() (past every commit record written so far), wait for the stream to pass it, then lock the shadow and rename.
    const streamed = to === "cutover" && m0.mode === "logical" && m0.phase === "backfilled" && m0.slot_name !== null;
    const follower = streamed ? await followStream(sql, m0) : null;
    const catchupMs = opts.catchupTimeoutMs ?? 2000;
    let lastLag: string | null = null;
    const { lockHeldMs } = await withLockRetry(
      sql,
      async (tx) => {
        attempts++;
        const m = await loadMigration(tx, table);
        if (!m || !allows(command, m.phase))
          throw new PgshiftError(`the migration of ${displayName(table)} changed phase meanwhile`);
        statements = to === "cutover" ? cutoverSql(m) : swapBackSql(m);
        let locked: number;
        if (follower) {
          await tx.unsafe(`LOCK TABLE ${quoteQualified(m.live)} IN ACCESS EXCLUSIVE MODE`);
          locked = performance.now();
          const target = String((await tx`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
          // Applied means recorded: a group of the stream ending past the target committed, with its rows
          // (see waitForRecorded; not the slot's confirmed position, nor a keepalive's).
          if (!(await follower.waitForRecorded(target, catchupMs))) {
            const st = await slotState(tx, m.slot_name!);
            // The slot confirmed the position but no pgshift applier recorded it: its consumer applies nothing.
            const unapplied = st.confirmedLsn !== null && lsnToBigInt(st.confirmedLsn) >= lsnToBigInt(target);
            lastLag = unapplied
              ? `the consumer of slot ${m.slot_name!}${st.activePid ? ` (pid ${st.activePid})` : ""} confirmed it, but no pgshift applier recorded it in pgshift.migrations: is something other than pgshift sync attached to the slot?`
              : `${st.lagBytes} bytes behind`;
            throw new CatchupTimeout(
              `the stream did not apply everything up to ${target} within ${catchupMs} ms (${lastLag})`,
            );
          }
          await tx.unsafe(statements[0]!);
        } else {
          await tx.unsafe(statements[0]!);
          locked = performance.now();
        }
        // Under both locks no ALTER TABLE can slip in between this check and the renames.
        await requireNoDrift(tx, m, what);
        const appeared = await newDependents(tx, m.live, carried.snapshot);
        if (appeared.length > 0) {
          throw new PgshiftError(
            `cannot ${what}: created on ${displayName(m.live)} while ${to === "cutover" ? "cutover" : "swap-back"} prepared: ${appeared.join(", ")}; nothing was changed`,
            {
              hint: `run pgshift ${to === "cutover" ? "cutover" : "swap-back"} ${displayName(table)} again: it builds new indexes on ${displayName(m.copy)} first and names anything else, with what to run`,
            },
          );
        }
        for (const stmt of statements.slice(1)) await tx.unsafe(stmt);
        await tx`
          update pgshift.migrations set phase = ${to}, updated_at = now(),
                 cutover_at = case when ${to} = 'cutover' then now() else cutover_at end,
                 swapped_back_at = case when ${to} = 'swapped_back' then now() else swapped_back_at end
           where id = ${m.id}`;
        await opts.beforeCommit?.(tx);
        return { locked };
      },
      {
        ...opts,
        retryOn: (err) => err instanceof CatchupTimeout,
        onRetry: (n, err) => {
          log().warn(
            { attempt: n, err: err instanceof Error ? err.message : String(err) },
            `${to}: not done in time (lock or catch-up), locks released, retrying`,
          );
          opts.onRetry?.(n, err);
        },
      },
    )
      .then((r) => ({ lockHeldMs: performance.now() - r.locked }))
      .catch((err: unknown) => {
        if (err instanceof CatchupTimeout) {
          throw new PgshiftError(`cannot cut over: ${err.message}, after ${attempts} attempts`, {
            hint: "the stream is lagging: let pgshift sync catch up (pgshift status shows the lag), or raise --catchup-timeout-ms",
          });
        }
        throw err;
      })
      .finally(() => follower?.stop());
    if (streamed) {
      // The slot and publication are not needed any more: the reverse mirror is a trigger. The cutover has
      // committed: if the retired table stays too busy to drop the publication now, say so and leave both
      // names in the migration row (status shows them; finalize and abort drop them).
      try {
        await dropStream(sql, m0.slot_name, m0.publication_name, {
          lockTimeoutMs: opts.lockTimeoutMs,
          retries: opts.retries,
        });
        await sql`update pgshift.migrations set slot_name = null, publication_name = null where id = ${m0.id}`;
      } catch (err) {
        log().warn(
          {
            table: displayName(table),
            slot: m0.slot_name,
            publication: m0.publication_name,
            err: err instanceof Error ? err.message : String(err),
          },
          "cutover done, but the replication slot or publication could not be dropped yet; pgshift finalize (or abort after a swap-back) drops them",
        );
      }
    }
    log().info(
      { table: displayName(table), lockHeldMs: Math.round(lockHeldMs * 10) / 10, attempts },
      to === "cutover" ? "cutover done" : "swap-back done",
    );
    return { lockHeldMs, attempts, phase: to, statements, indexesBuilt: carried.built };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * Cuts over: in one short transaction under `lock_timeout` (default 500 ms, 20 jittered retries), the
 * partitioned table takes the original name and the original table the retired name; writes to the new
 * live table are mirrored into the retired one from then on.
 * @throws PhaseError before the backfill is complete; PgshiftError when the locks are never granted in time.
 */
export function cutover(sql: Sql, table: QualifiedName, opts: CutoverOptions = {}): Promise<CutoverResult> {
  return switchTables(sql, table, "cutover", opts);
}

/**
 * Swaps back after a cutover: the original table is live again, with every write made since the cutover
 * (the reverse mirror kept it current), and the partitioned table is the shadow again, still mirrored.
 * @throws PhaseError unless the migration is in phase cutover.
 */
export function swapBack(sql: Sql, table: QualifiedName, opts: CutoverOptions = {}): Promise<CutoverResult> {
  return switchTables(sql, table, "swapped_back", opts);
}
