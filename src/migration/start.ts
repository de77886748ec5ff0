import { withLockRetry, type LockRetryOptions, type Sql } from "../db.js";
import { BlockedError } from "../errors.js";
import { log } from "../log.js";
import { displayName, type QualifiedName } from "../names.js";
import { planMigration, type MigrationPlan, type PlanOptions } from "./plan.js";
import { lockMigration, logicalNames, unlockMigration } from "./state.js";
import { createSlotWaiting, createsSlot, dropStream } from "../mirror/logical.js";

/** How long start --mode logical waits, by default, for running transactions before the slot exists: 5 minutes. */
export const DEFAULT_SLOT_TIMEOUT_MS = 300_000;

export interface StartOptions extends PlanOptions, LockRetryOptions {
  /** Logical mode: the longest creating the replication slot may wait for transactions already running to end, ms (default 300,000). */
  slotTimeoutMs?: number;
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
 * `opts.slotTimeoutMs` at most (createSlotWaiting).
 * @throws BlockedError listing every blocker (nothing changed); PgshiftError on lock timeout or server errors.
 */
export async function startMigration(sql: Sql, table: QualifiedName, opts: StartOptions): Promise<StartResult> {
  await lockMigration(sql, table);
  try {
    const plan = await planMigration(sql, table, opts);
    if (plan.blockers.length > 0) throw new BlockedError(displayName(table), plan.blockers);
    const t0 = performance.now();
    // Logical mode: the publication, then the slot, before the transaction (a slot cannot be created in a
    // transaction that wrote) and before the backfill reads any row, so that no change falls in between.
    // If anything below fails they are dropped again: nothing is left behind.
    const stream = plan.mode === "logical" ? logicalNames(plan.facts!.oid) : null;
    try {
      for (const stmt of plan.streamStatements) {
        if (createsSlot(stmt)) await createSlotWaiting(sql, stmt, opts.slotTimeoutMs ?? DEFAULT_SLOT_TIMEOUT_MS);
        else await sql.unsafe(stmt);
      }
      await withLockRetry(
        sql,
        async (tx) => {
          for (const stmt of plan.statements) await tx.unsafe(stmt);
        },
        { ...opts, onRetry: (n, err) => log().warn({ attempt: n, err: String(err) }, "start: lock not granted in time, retrying") },
      );
    } catch (err) {
      if (stream) await dropStream(sql, stream.slot, stream.publication, { lockTimeoutMs: 200, retries: 3, force: true }).catch(() => {});
      throw err;
    }
    const ms = performance.now() - t0;
    for (const w of plan.warnings) log().warn(w);
    log().info({ table: displayName(table), partitions: plan.partitions.length, ms: Math.round(ms) }, "migration started: shadow created, mirror installed");
    return { plan, ms };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}
