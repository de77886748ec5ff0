import { dependencySnapshot, newDependents, requireNoDrift } from "../catalog/drift.js";
import { type AnySql, DEFAULT_LOCK_TIMEOUT_MS, type LockRetryOptions, type Sql, type TxSql } from "../db.js";
import { liveNamesSql } from "../ddl/shadow.js";
import { type Carried, carryDependents } from "../dependents/index.js";
import { PgshiftError } from "../errors.js";
import { emit } from "../events.js";
import { LockSite, runLocked } from "../locks/holders.js";
import { log } from "../log.js";
import { tablesIn } from "../migration/phases.js";
import {
  loadMigration,
  lockMigration,
  type Migration,
  type Phase,
  requireMigration,
  unlockMigration,
} from "../migration/state.js";
import { dropStreamSql, lsnToBigInt, slotState } from "../mirror/logical.js";
import { mirrorFor } from "../mirror/mirror.js";
import { CatchupTimeout, type StreamFollower } from "../mirror/stream.js";
import { truncateGuardSql } from "../mirror/trigger.js";
import { displayName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import {
  type CheckStep,
  check,
  formatSteps,
  runSteps,
  runTransaction,
  type Step,
  statement,
  statementsOf,
  type TransactionStep,
  transactionStep,
} from "../plan/steps.js";
import {
  type BuiltIndex,
  type CarryOver,
  carryOverPlan,
  carryOverSteps,
  nothingToCarry,
  runCarryOver,
} from "./carry-over.js";

export type { BuiltIndex } from "./carry-over.js";

/** Logical mode: the longest the stream may take, under the live table's lock, to apply the last changes, ms. */
export const DEFAULT_CATCHUP_TIMEOUT_MS = 100;
/** Logical mode: how close behind the stream must be (time to apply up to a fresh WAL position) before locking, ms. */
export const DEFAULT_CLOSE_BEHIND_MS = 50;
/** Logical mode: the longest one attempt waits, before locking, for the stream to be close behind, ms. */
export const DEFAULT_CATCHUP_BEFORE_LOCK_MS = 60_000;

export interface CutoverOptions extends LockRetryOptions {
  /**
   * Logical mode: how long to wait, under the lock, for the stream to apply the last changes (default
   * DEFAULT_CATCHUP_TIMEOUT_MS, 100 ms); past it the locks are released and the attempt runs again.
   */
  catchupTimeoutMs?: number;
  /**
   * Logical mode: before the lock, the stream counts as close behind when it applies everything up to a WAL
   * position read just before within this long (default DEFAULT_CLOSE_BEHIND_MS, 50 ms).
   */
  closeBehindMs?: number;
  /** Logical mode: the longest the wait before the lock may take in one attempt, ms (default 60,000). */
  catchupBeforeLockMs?: number;
  /**
   * Terminate sessions that hold a conflicting lock on the tables (or their partitions) and whose transaction is
   * at least this old, ms, before requesting the lock (src/locks/holders.ts); absent or null: never.
   * CLI: --terminate-holders-after.
   */
  terminateHoldersAfterMs?: number | null;
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
  /**
   * Every statement of the plan that ran, in order, as PostgreSQL received them (the carry-over's, the
   * transaction's BEGIN ... COMMIT, the stream's drop after it).
   */
  statements: string[];
  /** Indexes created on the live table during the migration that were built on the copy before the lock (carryOver). */
  indexesBuilt: BuiltIndex[];
  /** Autovacuum workers cancelled before locking (pid, table or partition). */
  autovacuumCancelled: { pid: number; relation: string }[];
  /** Sessions terminated before locking (--terminate-holders-after). */
  terminated: { pid: number; relation: string; query: string | null }[];
  /**
   * Logical mode, the first cutover: how long the last wait for the stream before the lock took, and how long the
   * one under the lock took (ms); null otherwise.
   */
  catchup: { beforeLockMs: number; underLockMs: number } | null;
}

/** The migration as it will be named in `phase` (names swap at cutover; tablesIn, phases.ts). */
function renamed(m: Migration, phase: Phase): Migration {
  return { ...m, phase, ...tablesIn(m, phase) };
}

/**
 * The statements of the cutover transaction (phase backfilled or swapped_back -> cutover), in order:
 * lock both tables, stop the forward mirror, rename the original to the retired name and the shadow to
 * the original name, give serial sequences to the new live table, start the reverse mirror (new live ->
 * retired) so swap-back loses nothing. The switch's transaction (switchPlan) runs them between its checks,
 * followed by the UPDATE of pgshift.migrations that records the phase.
 */
export function cutoverSql(m: Migration): string[] {
  return switchSql(m, "cutover");
}

/** The statements of swap-back (phase cutover -> swapped_back): the same in reverse. */
export function swapBackSql(m: Migration): string[] {
  return switchSql(m, "swapped_back");
}

/**
 * The statements of one table's switch to phase `to`, in order (cutoverSql): the first locks both tables; a group's
 * switch (src/group/switch.ts) locks every table of the group at once and runs the rest of each table's.
 */
export function switchSql(m: Migration, to: Phase): string[] {
  const mirror = mirrorFor(m.mode);
  const next = renamed(m, to);
  const out: string[] = [`LOCK TABLE ${quoteQualified(m.live)}, ${quoteQualified(m.copy)} IN ACCESS EXCLUSIVE MODE`];
  out.push(...mirror.stopSql(m));
  // m.live (original name) becomes the copy's name in the next phase; m.copy takes the original name.
  out.push(`ALTER TABLE ${quoteQualified(m.live)} RENAME TO ${quoteIdent(next.copy.name)}`);
  out.push(`ALTER TABLE ${quoteQualified(m.copy)} RENAME TO ${quoteIdent(m.source_table)}`);
  // The live table's indexes and statistics take the original names (ON CONFLICT ON CONSTRAINT name), the copy's the
  // shadow's.
  out.push(...liveNamesSql(next.live, next.copy, m.index_renames));
  for (const s of m.sequences) {
    // Serial sequences follow the live table so that finalize (which drops the retired table) keeps them.
    // Identity sequences stay with the original table; finalize re-creates the identity on the new table.
    if (s.identity === "" && s.schema === m.source_schema) {
      out.push(
        `ALTER SEQUENCE ${quoteQualified({ schema: s.schema, name: s.name })} OWNED ` +
          `BY ${quoteQualified(next.live)}.${quoteIdent(s.column)}`,
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
    `cannot ${what}: the last verify (${v.at}) found ${v.missing} missing, ${v.extra} extra and ${v.different} ` +
      `different rows in ${displayName(m.copy)}`,
    {
      hint:
        `run pgshift verify --repair ${displayName({ schema: m.source_schema, name: m.source_table })} (or ` +
        `pgshift verify, if they were repaired since), then again`,
    },
  );
}

/** How a switch's plan waits and locks (from CutoverOptions, defaults applied). */
export interface SwitchOptions {
  catchupMs: number;
  closeBehindMs: number;
  catchupBeforeLockMs: number;
  lockTimeoutMs: number;
  terminateAfterMs: number | null;
}

export function switchOptions(o: CutoverOptions): SwitchOptions {
  return {
    catchupMs: o.catchupTimeoutMs ?? DEFAULT_CATCHUP_TIMEOUT_MS,
    closeBehindMs: o.closeBehindMs ?? DEFAULT_CLOSE_BEHIND_MS,
    catchupBeforeLockMs: o.catchupBeforeLockMs ?? DEFAULT_CATCHUP_BEFORE_LOCK_MS,
    lockTimeoutMs: o.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS,
    terminateAfterMs: o.terminateHoldersAfterMs ?? null,
  };
}

/**
 * Why the stream has not applied up to `target`: how far the slot is behind, or (`unapplied`) that the slot's
 * consumer confirmed it but no pgshift applier recorded it (something else is attached to the slot).
 */
async function lagOf(tx: AnySql, slot: string, target: string): Promise<{ unapplied: boolean; text: string }> {
  const st = await slotState(tx, slot);
  const unapplied = st.confirmedLsn !== null && lsnToBigInt(st.confirmedLsn) >= lsnToBigInt(target);
  return {
    unapplied,
    text: unapplied
      ? `the consumer of slot ${slot}${st.activePid ? ` (pid ${st.activePid})` : ""} confirmed it, but no ` +
        "pgshift applier recorded it in pgshift.migrations: is something other than pgshift sync attached to the slot?"
      : `${st.lagBytes} bytes behind`,
  };
}

/** What a switch's checks need when it runs (not at --dry-run), set as the run goes. */
interface SwitchContext {
  /** Logical mode, the first cutover: what applies the stream to the shadow (started by the plan's follow step). */
  follower: StreamFollower | null;
  /** The WAL position read under the live table's lock (the plan's SELECT pg_current_wal_insert_lsn()). */
  target: string;
  /** The live table's dependents when the carry-over last found nothing to do (dependencySnapshot). */
  snapshot: string[];
  /** performance.now() when the lock that makes the application wait was granted. */
  locked: number;
  /** The WAL position read before the lock (the plan's first SELECT pg_current_wal_insert_lsn()). */
  before: string;
  /** The last catch-up before the lock and the one under it, ms. */
  beforeLockMs: number;
  underLockMs: number;
}

/**
 * A switch's plan (cutover or swap-back), as --dry-run prints it and the command runs it: the carry-over
 * (indexes created on the live table meanwhile, built on the copy), then in logical mode before the first
 * cutover the step that follows the stream, the switch's transaction, and after COMMIT the steps that drop
 * the slot and the publication and clear their names.
 */
export interface SwitchPlan {
  command: "cutover" | "swap-back";
  /** The migration as read when the plan was built (before the carry-over). */
  migration: Migration;
  carryOver: CarryOver;
  /**
   * The dependent objects that follow the live table (src/dependents): their statements run in the switch's
   * transaction after the renames, their `after` steps after COMMIT.
   */
  carried: Carried[];
  /** Start applying the stream (null unless the shadow follows the slot). */
  follow: CheckStep | null;
  /** The switch's transaction: locks, checks, renames, mirror switched, the phase recorded. */
  transaction: TransactionStep;
  /** The look before the lock on the live table (and the lock itself): holders, attempts. */
  lockSite: LockSite;
  after: Step[];
  context: SwitchContext;
}

/** The steps of a switch's plan, in order. */
export function switchSteps(p: SwitchPlan): Step[] {
  return [
    ...carryOverSteps(p.carryOver),
    ...(p.follow ? [p.follow] : []),
    p.transaction,
    ...p.after,
    ...p.carried.flatMap((c) => c.after),
  ];
}

/** The plan as `cutover --dry-run` and `swap-back --dry-run` print it. */
export const formatSwitchPlan = (p: SwitchPlan): string => formatSteps(switchSteps(p));

/** The UPDATE of pgshift.migrations that records a switch (phase and its time). */
export function phaseSql(m: Migration, to: "cutover" | "swapped_back"): string {
  return `UPDATE pgshift.migrations SET phase = '${to}', updated_at = now(), ${to}_at = now() WHERE id = ${m.id}`;
}

/**
 * The check, under the switch's locks, that the columns did not change and that nothing was created on the live
 * table of `m` since `snapshot()` was taken (dependencySnapshot, before the lock); `rerun`: the command to run
 * again, as the hint says it.
 * @returns a check step that throws PgshiftError (nothing changed: the transaction rolls back).
 */
export function lateCheck(
  m: Migration,
  table: QualifiedName,
  command: "cutover" | "swap-back",
  snapshot: () => readonly string[],
  rerun = `pgshift ${command} ${displayName(table)}`,
): CheckStep {
  const what = command === "cutover" ? "cut over" : "swap back";
  return check(
    `refuse if the columns changed, or objects were created on ${displayName(m.live)} ` +
      "after the checks before this transaction",
    async (tx) => {
      await requireNoDrift(tx, m, what);
      const appeared = await newDependents(tx, m.live, snapshot());
      if (appeared.length > 0) {
        throw new PgshiftError(
          `cannot ${what}: created on ${displayName(m.live)} while ${command} prepared: ` +
            `${appeared.join(", ")}; nothing was changed`,
          {
            hint:
              `run ${rerun} again: it builds new indexes on ` +
              `${displayName(m.copy)} first and names anything else, with what to run`,
          },
        );
      }
    },
  );
}

/**
 * The switch's steps after the carry-over `c`, from the migration as the carry-over leaves it (index renames
 * recorded). Logical mode, before the first cutover (the shadow follows the slot): the shadow must have
 * applied every change committed before the lock, so the live table alone is locked first (the applier keeps
 * writing the shadow), pg_current_wal_insert_lsn() read (past every commit record written so far), the
 * stream waited for up to that position, then the shadow locked and the tables renamed; after COMMIT the
 * slot and publication are dropped (the reverse mirror is a trigger).
 */
function buildSwitch(
  sql: Sql,
  m0: Migration,
  c: CarryOver,
  carried: Carried[],
  table: QualifiedName,
  command: "cutover" | "swap-back",
  opts: SwitchOptions,
): SwitchPlan {
  const catchupMs = opts.catchupMs;
  const closeMs = opts.closeBehindMs;
  const beforeMs = opts.catchupBeforeLockMs;
  // Set when the lock that makes the application wait is granted (the lock time is measured from it).
  const markLocked = () => {
    context.locked = performance.now();
  };
  const m = c.migration;
  const to = command === "cutover" ? "cutover" : "swapped_back";
  const context: SwitchContext = {
    follower: null,
    target: "",
    snapshot: [],
    locked: 0,
    before: "",
    beforeLockMs: 0,
    underLockMs: 0,
  };
  // Logical mode before the first cutover: the shadow follows the slot (swap-back's and a later cutover's never do).
  const mirror = mirrorFor(m.mode);
  const stream = mirror.streams(m) ? m : null;
  const slot = stream?.slot_name ?? null;
  const streamed = stream !== null && slot !== null;
  const sw = switchSql(m, to);
  const lockBoth = statement(sw[0]!);
  if (!streamed) lockBoth.read = markLocked;
  // The look before the first lock covers both tables (with the stream, the shadow is locked a moment after the
  // live table: an autovacuum on one of its partitions would hold that second lock up).
  const site = new LockSite(
    [
      { table: m.live, mode: "ACCESS EXCLUSIVE" },
      { table: m.copy, mode: "ACCESS EXCLUSIVE" },
    ],
    { table: displayName(table), command, lockTimeoutMs: opts.lockTimeoutMs, terminateAfterMs: opts.terminateAfterMs },
  );
  const steps: Step[] = [
    check(`refuse if the migration left phase ${m.phase} meanwhile`, async (tx) => {
      const now = await loadMigration(tx, table, { upgrade: false });
      if (now?.phase !== m.phase)
        throw new PgshiftError(`the migration of ${displayName(table)} changed phase meanwhile`);
    }),
  ];
  if (streamed) {
    const lockLive = statement(
      `LOCK TABLE ${quoteQualified(m.live)} IN ACCESS EXCLUSIVE MODE`,
      "transaction",
      "the live table only: the stream keeps writing the shadow",
    );
    lockLive.read = markLocked;
    const before = statement(
      "SELECT pg_current_wal_insert_lsn()",
      "transaction",
      "before any lock: where the stream must be (run again by the check below while it is not close behind)",
    );
    before.read = (rows) => {
      context.before = String(rows[0]!.pg_current_wal_insert_lsn);
    };
    const wal = statement(
      "SELECT pg_current_wal_insert_lsn()",
      "transaction",
      "past every commit record written so far",
    );
    wal.read = (rows) => {
      context.target = String(rows[0]!.pg_current_wal_insert_lsn);
    };
    steps.push(
      before,
      check(
        "wait until the stream has applied every change up to the WAL position read above; while that took longer " +
          `than ${closeMs} ms, read the position again (the statement above) and wait again, at most ${beforeMs} ms ` +
          "in all: the stream is then close behind, and only the last transactions are left for under the lock",
        async (tx) => {
          const f = context.follower;
          if (!f) throw new Error("cutover: the stream is not followed");
          const until = Date.now() + beforeMs;
          for (;;) {
            const t0 = performance.now();
            const ok = await f.waitForRecorded(context.before, Math.min(2000, Math.max(0, until - Date.now())));
            context.beforeLockMs = performance.now() - t0;
            if (ok && context.beforeLockMs <= closeMs) return;
            if (!ok) {
              const why = await lagOf(tx, slot!, context.before);
              if (why.unapplied || Date.now() >= until)
                throw new CatchupTimeout(
                  `the stream did not apply everything up to ${context.before} before the lock, within ` +
                    `${beforeMs} ms (${why.text})`,
                );
            } else if (Date.now() >= until) {
              throw new CatchupTimeout(
                `the stream stayed more than ${closeMs} ms behind for ${beforeMs} ms (last: ` +
                  `${Math.round(context.beforeLockMs)} ms)`,
              );
            }
            const r = await tx.unsafe(before.sql);
            context.before = String(r[0]!.pg_current_wal_insert_lsn);
          }
        },
      ),
      ...site.steps(lockLive),
      wal,
      check(
        "wait until the stream has applied every change up to the WAL position read above, its rows committed and " +
          `recorded in pgshift.migrations (at most ${catchupMs} ms under the lock; else the locks are released ` +
          "and the transaction runs again)",
        async (tx) => {
          const f = context.follower;
          if (!f) throw new Error("cutover: the stream is not followed");
          // Applied means recorded: a group of the stream ending past the target committed, with its rows
          // (see waitForRecorded; not the slot's confirmed position, nor a keepalive's).
          const t0 = performance.now();
          const ok = await f.waitForRecorded(context.target, catchupMs);
          context.underLockMs = performance.now() - t0;
          if (ok) return;
          const lag = await lagOf(tx, slot, context.target);
          throw new CatchupTimeout(
            `the stream did not apply everything up to ${context.target} within ${catchupMs} ms under the lock ` +
              `(${lag.text}); the locks were released`,
          );
        },
      ),
    );
  }
  steps.push(
    // Without the stream the look before the lock comes here (with it, before the live table's lock above).
    ...(streamed ? [lockBoth] : site.steps(lockBoth)),
    // Under both locks no ALTER TABLE can slip in between this check and the renames.
    lateCheck(m, table, command, () => context.snapshot),
    ...sw.slice(1).map((s) => statement(s)),
    ...carried.flatMap((x) => x.inside),
    statement(phaseSql(m, to)),
  );
  const follow = streamed
    ? check(
        "apply the replication slot's changes to the shadow on a connection of its own until the cutover commits " +
          "(or follow pgshift sync doing it)",
        async () => {
          context.follower = await mirror.follow(sql, m);
        },
      )
    : null;
  // The slot and publication are not needed any more once the cutover committed: the reverse mirror is a trigger.
  const after = streamed
    ? dropStreamSql(slot, m.publication_name, renamed(m, "cutover").copy, {
        lockTimeoutMs: opts.lockTimeoutMs,
        lock: { table: displayName(table), command, terminateAfterMs: opts.terminateAfterMs },
        forget: `UPDATE pgshift.migrations SET slot_name = NULL, publication_name = NULL WHERE id = ${m.id}`,
      })
    : [];
  return {
    command,
    migration: m0,
    carryOver: c,
    carried,
    follow,
    transaction: transactionStep(steps, { lockTimeoutMs: opts.lockTimeoutMs }),
    lockSite: site,
    after,
    context,
  };
}

/**
 * Builds the plan of cutover or swap-back (SwitchPlan): refuses first, changing nothing, when the migration
 * is in another phase, the mirror is not healthy, the columns changed, the last verify found differences, or
 * objects other than indexes were created on the live table (carryOverPlan).
 * @param opts `dryRun`: read an older pgshift schema as it is (no upgrade); `catchupTimeoutMs` as for cutover.
 * @throws PhaseError, PgshiftError as above.
 */
export async function switchPlan(
  sql: Sql,
  table: QualifiedName,
  command: "cutover" | "swap-back",
  opts: CutoverOptions & { dryRun?: boolean } = {},
): Promise<SwitchPlan> {
  const m0 = await requireMigration(sql, table, command, { upgrade: !opts.dryRun });
  if (m0.group_name !== null)
    throw new PgshiftError(
      `${displayName(table)} belongs to migration group ${m0.group_name}: its tables switch together`,
      { hint: `run pgshift ${command} --group ${m0.group_name}` },
    );
  const health = await mirrorFor(m0.mode).health(sql, m0);
  if (!health.ok)
    throw new PgshiftError(`the mirror is not healthy: ${health.detail}`, {
      hint: "run pgshift verify --repair after fixing it, or pgshift abort",
    });
  const what = command === "cutover" ? "cut over" : "swap back";
  await requireNoDrift(sql, m0, what);
  requireNoKnownDifferences(m0, what);
  // Objects created on the live table since start: indexes are built on the copy first (never under the
  // lock), anything else refuses.
  const o = switchOptions(opts);
  const c = await carryOverPlan(sql, m0, table, o.lockTimeoutMs);
  const carried = await carryDependents(sql, c.migration, command === "cutover" ? "cutover" : "swapped_back");
  return buildSwitch(sql, m0, c, carried, table, command, o);
}

/**
 * After a switch has committed: runs what each carried object still needs (a foreign key validated, a materialized
 * view rebuilt), without blocking writes. A failure is logged as a warning with the statements to run again (status
 * shows what is pending), never thrown: the switch itself is done.
 * @param where fields for the log line (the table, or the group).
 * @param retries lock-timeout retries of each step (db.ts retryOnLockTimeout).
 * @returns the statements that ran, in order.
 */
export async function runCarriedAfter(
  sql: Sql,
  carried: readonly Carried[],
  command: "cutover" | "swap-back",
  where: Record<string, string>,
  retries: number | undefined,
): Promise<string[]> {
  const statements: string[] = [];
  for (const c of carried) {
    if (c.after.length === 0) continue;
    try {
      await runSteps(sql, c.after, { lockRetry: { retries } });
      statements.push(...statementsOf(c.after));
    } catch (err) {
      log().warn(
        {
          ...where,
          object: c.label,
          statements: statementsOf(c.after),
          err: err instanceof Error ? err.message : String(err),
        },
        `${command} done, but the work left for ${c.label} after it failed; run its statements again`,
      );
    }
  }
  return statements;
}

async function switchTables(
  sql: Sql,
  table: QualifiedName,
  command: "cutover" | "swap-back",
  opts: CutoverOptions,
): Promise<CutoverResult> {
  await lockMigration(sql, table);
  try {
    const o = switchOptions(opts);
    // Under the lock a snapshot of the live table's dependents, taken before the last look for late
    // objects, shows whatever came in between.
    let snapshot = await dependencySnapshot(sql, table);
    let plan = await switchPlan(sql, table, command, opts);
    const built: BuiltIndex[] = [];
    const statements: string[] = [];
    // The carry-over, then a new look: indexes created meanwhile are carried over too (at most 4 rounds).
    for (let round = 0; !nothingToCarry(plan.carryOver); round++) {
      if (round === 4)
        throw new PgshiftError(
          `cannot ${command === "cutover" ? "cut over" : "swap back"}: indexes kept being created on ` +
            `${displayName(table)} while pgshift built their counterparts; nothing was switched`,
          { hint: `run pgshift ${command} ${displayName(table)} again once no more are being created` },
        );
      built.push(...(await runCarryOver(sql, plan.carryOver, table, opts.retries)));
      statements.push(...statementsOf(carryOverSteps(plan.carryOver)));
      snapshot = await dependencySnapshot(sql, table);
      const next = await carryOverPlan(sql, plan.carryOver.migration, table, o.lockTimeoutMs);
      const carried = await carryDependents(sql, next.migration, command === "cutover" ? "cutover" : "swapped_back");
      plan = buildSwitch(sql, plan.migration, next, carried, table, command, o);
    }
    plan.context.snapshot = snapshot;
    await opts.beforeLock?.();
    const attempts = { made: 0 };
    const tx = plan.transaction;
    const lockHeldMs = await (async () => {
      try {
        if (plan.follow) await runSteps(sql, [plan.follow]);
        await runSwitchTransaction(sql, tx, plan.lockSite, opts, attempts, {
          retryOn: (err) => err instanceof CatchupTimeout,
          fields: {},
          retrying:
            `${command}: not done in time (lock or catch-up) or a session holds the lock, locks released, ` +
            "retrying",
        });
        return performance.now() - plan.context.locked;
      } catch (err) {
        if (err instanceof CatchupTimeout) {
          throw new PgshiftError(`cannot cut over: ${err.message}, after ${attempts.made} attempts`, {
            hint:
              "the stream is lagging: let pgshift sync catch up (pgshift status shows the lag), or raise " +
              "--catchup-timeout-ms (the longest writes may be blocked while the last changes are applied)",
          });
        }
        throw err;
      } finally {
        await plan.context.follower?.stop();
      }
    })();
    statements.push(...statementsOf([tx]));
    if (plan.after.length > 0) {
      // The cutover has committed: if the retired table stays too busy to drop the publication now, say so
      // and leave both names in the migration row (status shows them; finalize and abort drop them).
      try {
        await runLocked(sql, plan.after, {
          lockRetry: {
            ...(opts.retries !== undefined ? { retries: opts.retries } : {}),
            ...(opts.deadlineMs !== undefined ? { deadlineMs: opts.deadlineMs } : {}),
          },
        });
        statements.push(...statementsOf(plan.after));
      } catch (err) {
        const m = plan.migration;
        log().warn(
          {
            table: displayName(table),
            slot: m.slot_name,
            publication: m.publication_name,
            err: err instanceof Error ? err.message : String(err),
          },
          "cutover done, but the replication slot or publication could not be dropped yet; pgshift finalize (or " +
            "abort after a swap-back) drops them",
        );
      }
    }
    // The switch has committed: what carried objects still need (a foreign key validated, a materialized view
    // rebuilt) runs now without blocking writes; if it fails it is said, with the statements, and status shows it.
    statements.push(
      ...(await runCarriedAfter(sql, plan.carried, command, { table: displayName(table) }, opts.retries)),
    );
    emit("blocked", { table: displayName(table), command, ms: lockHeldMs });
    const to = command === "cutover" ? "cutover" : "swapped_back";
    emit("phase", { table: displayName(table), command, from: plan.migration.phase, to });
    const ctx = plan.context;
    const catchup = plan.follow
      ? { beforeLockMs: Math.round(ctx.beforeLockMs * 10) / 10, underLockMs: Math.round(ctx.underLockMs * 10) / 10 }
      : null;
    log().info(
      {
        table: displayName(table),
        lockHeldMs: Math.round(lockHeldMs * 10) / 10,
        attempts: attempts.made,
        ...(catchup ?? {}),
      },
      command === "cutover" ? "cutover done" : "swap-back done",
    );
    return {
      lockHeldMs,
      attempts: attempts.made,
      phase: command === "cutover" ? "cutover" : "swapped_back",
      statements,
      indexesBuilt: built,
      autovacuumCancelled: plan.lockSite.cancelled.map((h) => ({ pid: h.pid, relation: h.relation })),
      terminated: plan.lockSite.terminated.map((h) => ({ pid: h.pid, relation: h.relation, query: h.query })),
      catchup,
    };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * Runs a switch's transaction (cutover or swap-back, of one table or of a migration group): its steps, then the
 * `beforeCommit` test hook, retried as runTransaction retries (a lock not granted in time, and whatever
 * `retry.retryOn` adds); each failed attempt is reported to the lock site and to `opts.onFailure`, each retry logged
 * (`retry.fields`, `retry.retrying`) and passed to `opts.onRetry`. `attempts.made` counts the attempts, also when it
 * throws.
 * @throws what the last attempt threw (runTransaction's PgshiftError when the lock is never granted in time).
 */
export async function runSwitchTransaction(
  sql: Sql,
  tx: TransactionStep,
  lockSite: LockSite,
  opts: CutoverOptions,
  attempts: { made: number },
  retry: { retryOn?: (err: unknown) => boolean; fields: Record<string, unknown>; retrying: string },
): Promise<void> {
  await runTransaction(
    sql,
    tx,
    async (t) => {
      attempts.made++;
      await runSteps(t, tx.steps);
      await opts.beforeCommit?.(t);
    },
    {
      ...(opts.retries !== undefined ? { retries: opts.retries } : {}),
      ...(opts.deadlineMs !== undefined ? { deadlineMs: opts.deadlineMs } : {}),
      ...(retry.retryOn ? { retryOn: retry.retryOn } : {}),
      onFailure: (err) => {
        lockSite.failed(err);
        opts.onFailure?.(err);
      },
      onRetry: (n, err) => {
        log().warn(
          { ...retry.fields, attempt: n, err: err instanceof Error ? err.message : String(err) },
          retry.retrying,
        );
        opts.onRetry?.(n, err);
      },
    },
  );
}

/**
 * Cuts over: in one short transaction under `lock_timeout` (default 50 ms per attempt, 100 jittered retries within
 * 60 s, each attempt after a look for sessions the lock would wait for: src/locks/holders.ts), the
 * partitioned table takes the original name and the original table the retired name; writes to the new
 * live table are mirrored into the retired one from then on. Runs the plan switchPlan builds (what
 * `cutover --dry-run` prints).
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
  return switchTables(sql, table, "swap-back", opts);
}
