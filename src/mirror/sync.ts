import { connectionUrl, type Sql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { log } from "../log.js";
import { displayName, type QualifiedName } from "../names.js";
import { loadMigration, requireMigration } from "../migration/state.js";
import { Applier } from "./apply.js";
import { slotState } from "./logical.js";

export interface SyncTick {
  appliedLsn: string;
  /** Bytes of WAL not yet confirmed by the slot, and PostgreSQL's replay lag, seconds. */
  lagBytes: number;
  lagSeconds: number | null;
  /** Row changes applied per second over the last tick. */
  changesPerSecond: number;
  changes: number;
  transactions: number;
}

export interface SyncOptions {
  /** Stops cleanly (after the transaction in hand is rolled back, not confirmed) when aborted. */
  signal?: AbortSignal;
  /** Called about once a second. */
  onTick?: (t: SyncTick) => void;
}

const TRANSIENT = new Set(["40P01", "40001", "57P01", "CONNECTION_CLOSED", "ECONNRESET"]);

/**
 * `pgshift sync`: applies the replication stream of a logical-mode migration to the shadow until stopped,
 * or until the migration no longer streams (cut over, aborted). Takes no migration lock, so backfill,
 * verify and cutover run beside it (they wait for it to catch up instead of taking over the slot).
 * @returns why it stopped.
 * @throws PgshiftError when the migration is not in logical mode or the slot is held by another process.
 */
export async function sync(sql: Sql, table: QualifiedName, opts: SyncOptions = {}): Promise<{ reason: "stopped" | "cut over" | "gone" }> {
  let m = await requireMigration(sql, table, "sync", ["started", "backfilling", "backfilled"]);
  if (m.mode !== "logical" || !m.slot_name) {
    throw new PgshiftError(`the migration of ${displayName(table)} is in ${m.mode} mode: there is no stream to apply`, { hint: "sync is for migrations started with --mode logical" });
  }
  const url = connectionUrl(sql);
  let applier = new Applier(m, { url });
  await applier.start();
  log().info({ table: displayName(table), slot: m.slot_name }, "sync: streaming");
  let lastChanges = 0;
  let base = 0;
  let lastTick = Date.now();
  try {
    for (let tick = 0; ; tick++) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(t);
          opts.signal?.removeEventListener("abort", done);
          resolve();
        };
        const t = setTimeout(done, 1000);
        opts.signal?.addEventListener("abort", done, { once: true });
      });
      if (opts.signal?.aborted) return { reason: "stopped" };
      const err = applier.error;
      if (err) {
        const code = String((err as { code?: string }).code ?? "");
        const now = await loadMigration(sql, table);
        if (!now || !now.slot_name) return { reason: now ? "cut over" : "gone" };
        // The slot may be gone because abort or cutover dropped it just before updating the migration:
        // give them a moment to commit rather than attach to nothing.
        if (!(await slotState(sql, now.slot_name)).exists) {
          for (let i = 0; i < 50; i++) {
            await new Promise((r) => setTimeout(r, 100));
            const later = await loadMigration(sql, table);
            if (!later) return { reason: "gone" };
            if (!later.slot_name || later.phase === "cutover") return { reason: "cut over" };
          }
          throw new PgshiftError(`replication slot ${now.slot_name} is gone but the migration still expects it`, { hint: "run pgshift abort and start again" });
        }
        if (!TRANSIENT.has(code)) throw err;
        log().warn({ code }, "sync: transient apply error, restarting from the confirmed position");
        base += applier.changes;
        await applier.stop();
        applier = new Applier(now, { url });
        await applier.start();
      }
      if (tick % 2 === 0) {
        const now = await loadMigration(sql, table);
        if (!now) return { reason: "gone" };
        if (!now.slot_name || now.phase === "cutover") return { reason: "cut over" };
        m = now;
      }
      const s = await slotState(sql, m.slot_name!);
      const changes = base + applier.changes;
      const secs = (Date.now() - lastTick) / 1000;
      opts.onTick?.({
        appliedLsn: applier.progress.appliedLsn,
        lagBytes: s.lagBytes,
        lagSeconds: s.lagSeconds,
        changesPerSecond: secs > 0 ? (changes - lastChanges) / secs : 0,
        changes,
        transactions: applier.transactions,
      });
      lastChanges = changes;
      lastTick = Date.now();
    }
  } finally {
    await applier.stop();
  }
}
