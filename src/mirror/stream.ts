import { connect, connectionUrl, transaction, type Sql } from "../db.js";
import { sqlState } from "../errors.js";
import { log } from "../log.js";
import { loadMigration, type Migration } from "../migration/state.js";
import { Applier } from "./apply.js";
import { lsnToBigInt, slotState } from "./logical.js";

/** Keeps the shadow following the replication slot for as long as a command needs it. */
export interface StreamFollower {
  /** Whether this process applies the stream (false: another consumer, e.g. `pgshift sync`, does). */
  readonly own: boolean;
  /** Waits until every change up to `lsn` is applied; false on timeout. */
  waitFor(lsn: string, timeoutMs: number): Promise<boolean>;
  /** Changes applied by this process. */
  changes(): number;
  stop(): Promise<void>;
}

/** The stream did not apply everything up to a position in time (under a lock: release it and try again). */
export class CatchupTimeout extends Error {}

const RETRYABLE = new Set(["40P01", "40001", "55P03", "57P01", "CONNECTION_CLOSED", "ECONNRESET"]);

/**
 * Takes over the stream when the slot is free (an Applier in this process, restarted from the slot's
 * confirmed position after a deadlock or a lost connection), or, when another consumer is attached, only
 * watches the slot's confirmed LSN.
 */
export async function followStream(sql: Sql, m: Migration): Promise<StreamFollower> {
  const slot = m.slot_name!;
  const url = connectionUrl(sql);
  // A connection of its own to flush WAL: the caller's may be inside a transaction (cutover holds a lock).
  const flusher = await connect({ url, applicationName: "pgshift flush" });
  const flush = () => flushWal(flusher);
  const state = await slotState(sql, slot);
  if (state.active) return watcher(slot, flush, flusher);
  let applier = new Applier(m, { url });
  try {
    await applier.start();
  } catch (err) {
    // Attached between the check and the start: follow that consumer. Anything else (the slot
    // invalidated, the connection lost) is the caller's error, not a reason to wait for nobody.
    if (sqlState((err as { cause?: unknown }).cause) !== "55006") {
      await flusher.end({ timeout: 5 }).catch(() => {});
      throw err;
    }
    log().info({ slot }, "stream: slot busy, following the consumer attached to it");
    return watcher(slot, flush, flusher);
  }
  let stopped = false;
  let applied = 0;
  const supervise = setInterval(() => {
    const err = applier.error;
    if (!err || stopped) return;
    const code = String((err as { code?: string }).code ?? "");
    if (!RETRYABLE.has(code)) return;
    // Roll back to the slot's confirmed position and start again: nothing applied twice, nothing lost.
    const old = applier;
    applied += old.changes;
    void (async () => {
      await old.stop();
      const fresh = await loadMigration(sql, { schema: m.source_schema, name: m.source_table });
      if (!fresh || stopped) return;
      log().warn({ slot, code }, "stream: apply failed with a transient error, restarting from the confirmed position");
      applier = new Applier(fresh, { url });
      await applier.start().catch(() => {});
    })();
  }, 200);
  return {
    own: true,
    waitFor: async (lsn, timeoutMs) => {
      const until = Date.now() + timeoutMs;
      await flush();
      for (;;) {
        const a = applier;
        try {
          if (await a.waitFor(lsn, Math.max(0, until - Date.now()))) return true;
          return false;
        } catch (err) {
          const code = String((err as { code?: string }).code ?? "");
          if (!RETRYABLE.has(code) || Date.now() >= until) throw err;
          while (applier === a && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
        }
      }
    },
    changes: () => applied + applier.changes,
    stop: async () => {
      stopped = true;
      clearInterval(supervise);
      await applier.stop();
      await flusher.end({ timeout: 5 }).catch(() => {});
    },
  };
}

/**
 * Makes the server flush its WAL now: a transactional logical message (ignored by pgoutput) committed with
 * synchronous_commit on. The stream only carries flushed WAL; with asynchronous commits, or after the
 * cutover's own ACCESS EXCLUSIVE lock record (logged for standbys), the last records could otherwise wait
 * for the WAL writer, or for a page to fill, before the stream can reach the LSN a caller waits for.
 */
export async function flushWal(sql: Sql): Promise<void> {
  await transaction(sql, async (tx) => {
    await tx`set local synchronous_commit = on`;
    await tx`select pg_logical_emit_message(true, 'pgshift', 'flush')`;
  });
}

/** Follows a consumer attached elsewhere (pgshift sync) by polling the slot on the follower's own connection. */
function watcher(slot: string, flush: () => Promise<void>, flusher: Sql): StreamFollower {
  return {
    own: false,
    waitFor: async (lsn, timeoutMs) => {
      const until = Date.now() + timeoutMs;
      const target = lsnToBigInt(lsn);
      await flush();
      for (;;) {
        const s = await slotState(flusher, slot);
        if (s.confirmedLsn && lsnToBigInt(s.confirmedLsn) >= target) return true;
        if (Date.now() >= until) return false;
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    changes: () => 0,
    stop: async () => {
      await flusher.end({ timeout: 5 }).catch(() => {});
    },
  };
}

/**
 * Waits until the stream is caught up: the time to apply everything written up to "now" is at most
 * `maxLagMs`. Returns the last measured catch-up time, ms.
 */
export async function catchUp(sql: Sql, f: StreamFollower, maxLagMs: number, timeoutMs = 600_000): Promise<number> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const target = String((await sql`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
    const t0 = Date.now();
    const ok = await f.waitFor(target, Math.max(1000, until - Date.now()));
    const took = Date.now() - t0;
    if (ok && took <= maxLagMs) return took;
    if (Date.now() >= until) return took;
  }
}
