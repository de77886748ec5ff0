import type { LockRetryOptions, Sql } from "../db.js";
import { BlockedError, PgshiftError, sqlState } from "../errors.js";
import { runLocked } from "../locks/holders.js";
import { log } from "../log.js";
import { describeTransactions, dropStream, transactionsHoldingXids } from "../mirror/logical.js";
import { displayName, type QualifiedName } from "../names.js";
import { partitionColumns } from "../partitioning/spec.js";
import { runSteps, type Step } from "../plan/steps.js";
import { DEFAULT_SLOT_TIMEOUT_MS, type MigrationPlan, type PlanOptions, planMigration } from "./plan.js";
import { lockMigration, logicalNames, unlockMigration } from "./state.js";

export { DEFAULT_SLOT_TIMEOUT_MS } from "./plan.js";

export interface StartOptions extends PlanOptions, LockRetryOptions {
  /**
   * Start although the partition column must be added to unique keys (plan.widenedKeys): each then loses
   * its uniqueness on its own at finalize, and ON CONFLICT targets naming it stop working at cutover.
   * Default false: such a spec is refused (keyExtensionRefusal). CLI: --allow-key-extension.
   */
  allowKeyExtension?: boolean;
}

export interface StartResult {
  plan: MigrationPlan;
  /** Wall time of the start transaction, ms. */
  ms: number;
}

/**
 * Starts the migration of `table`: creates the shadow (partitions, indexes, constraints, grants),
 * installs the mirror and records the migration, all in one transaction, so a crash leaves nothing.
 * In logical mode the publication and the replication slot are created first and dropped again if the
 * transaction fails (a slot left by a crash in between is reported by status and removed by abort).
 * Locks on the source (CREATE TRIGGER takes SHARE ROW EXCLUSIVE) are requested last and under
 * `lock_timeout`, with jittered retries. Creating the slot waits for transactions already running to end,
 * `opts.slotTimeoutMs` at most (statement_timeout of its transaction).
 * A spec that adds the partition column to a unique key is refused unless `opts.allowKeyExtension`
 * (keyExtensionRefusal), before anything changes.
 * @throws BlockedError listing every blocker (nothing changed); PgshiftError when keys would be widened
 *   without allowKeyExtension (nothing changed), on lock timeout or server errors.
 */
export async function startMigration(sql: Sql, table: QualifiedName, opts: StartOptions): Promise<StartResult> {
  await lockMigration(sql, table);
  try {
    const plan = await planMigration(sql, table, opts);
    if (plan.blockers.length > 0) throw new BlockedError(displayName(table), plan.blockers);
    if (!opts.allowKeyExtension) {
      const refusal = keyExtensionRefusal(plan);
      if (refusal) throw refusal;
    }
    const t0 = performance.now();
    // Logical mode: the publication, then the slot, before the transaction (a slot cannot be created in a
    // transaction that wrote) and before the backfill reads any row, so that no change falls in between.
    // If anything below fails they are dropped again: nothing is left behind.
    const stream = plan.mode === "logical" ? logicalNames(plan.facts!.oid) : null;
    try {
      // The steps start --dry-run prints (plan.steps): the stream's, then the one transaction.
      for (const step of plan.streamSteps)
        await runStreamStep(sql, step, opts.slotTimeoutMs ?? DEFAULT_SLOT_TIMEOUT_MS);
      await runLocked(sql, [plan.transaction], {
        lockRetry: {
          ...(opts.retries !== undefined ? { retries: opts.retries } : {}),
          ...(opts.deadlineMs !== undefined ? { deadlineMs: opts.deadlineMs } : {}),
          onRetry: (n, err) =>
            log().warn({ attempt: n, err: String(err) }, "start: lock not granted in time, retrying"),
        },
      });
    } catch (err) {
      if (stream)
        await dropStream(sql, stream.slot, stream.publication, { lockTimeoutMs: 200, retries: 3, force: true }).catch(
          () => {},
        );
      throw err;
    }
    const ms = performance.now() - t0;
    for (const w of plan.warnings) log().warn(w);
    log().info(
      { table: displayName(table), partitions: plan.partitions.length, ms: Math.round(ms) },
      "migration started: shadow created, mirror installed",
    );
    return { plan, ms };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * Runs one of start's stream steps (the publication, the slot's transaction). The slot's creation waits for
 * the transactions that hold a transaction id when it begins to end (PostgreSQL documentation, "Logical
 * Decoding" > "Replication Slots"): those are logged before, and named in the error when statement_timeout
 * (`timeoutMs`, the transaction's SET LOCAL) ends the wait.
 * @throws PgshiftError when the slot was not created in time (no slot is left: the server drops it).
 */
async function runStreamStep(sql: Sql, step: Step, timeoutMs: number): Promise<void> {
  if (step.kind !== "transaction") return runSteps(sql, [step]);
  const before = await transactionsHoldingXids(sql);
  if (before.length > 0) {
    log().warn(
      { sessions: before.map((t) => t.pid) },
      `creating the replication slot waits until these transactions end: ${describeTransactions(before)}`,
    );
  }
  try {
    await runSteps(sql, [step]);
  } catch (err) {
    if (sqlState(err) !== "57014") throw err;
    const still = await transactionsHoldingXids(sql);
    throw new PgshiftError(
      `the replication slot was not created within ${timeoutMs} ms: it waits for transactions that were running when ` +
        `it began to end${still.length > 0 ? `, still open: ${describeTransactions(still)}` : ""}`,
      {
        hint:
          "end them (COMMIT, or SELECT pg_terminate_backend(pid)) and run start again, or give them longer with " +
          "--slot-timeout-ms",
      },
    );
  }
}

/**
 * The refusal of a spec that widens unique keys (plan.widenedKeys), or null when none is widened: one line
 * naming the keys, the ON CONFLICT targets that stop working at cutover and the application statements
 * found failing (pg_stat_statements), and a hint with the option that accepts it.
 */
export function keyExtensionRefusal(plan: MigrationPlan): PgshiftError | null {
  const keys = plan.widenedKeys;
  if (keys.length === 0) return null;
  const col = partitionColumns(plan.spec).join(" and ");
  const named = keys.map((k) => `${k.kind} ${k.name} (${k.columns.join(", ")})`).join(", ");
  const targets = keys.flatMap((k) => k.onConflictTargets);
  const failing = plan.applicationStatements.statements.filter((s) => s.effect === "fails").length;
  return new PgshiftError(
    `partitioning ${displayName(plan.source)} by ${col} adds ${col} to ${
      keys.length === 1 ? "a unique key" : `${keys.length} unique keys`
    }: ${named}; ` +
      `after finalize the database enforces them only together with ${col}` +
      (targets.length > 0 ? `, and ${targets.join(", ")} stop working at cutover` : "") +
      (failing > 0 ? ` (${failing} of the application's statements in pg_stat_statements would fail)` : ""),
    {
      hint:
        `read what the application will notice with pgshift plan, then start again with --allow-key-extension; ` +
        `or partition by a column of the key (e.g. hash:${keys[0]!.columns[0] ?? "id"}:16); nothing was changed`,
    },
  );
}
