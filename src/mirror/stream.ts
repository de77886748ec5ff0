import { connect, connectionUrl, type Sql, transaction } from "../db.js";
import { isConnectionLoss, PgshiftError, sqlState } from "../errors.js";
import { log } from "../log.js";
import { isStreaming, loadMigration, type StreamingMigration } from "../migration/state.js";
import { Applier, FLUSH_MESSAGE, StreamFenced } from "./apply.js";
import { lsnToBigInt, slotState } from "./logical.js";

/** Keeps the shadow following the replication slot for as long as a command needs it. */
export interface StreamFollower {
  /** Whether this process applies the stream (false: another consumer, e.g. `pgshift sync`, does). */
  readonly own: boolean;
  /**
   * Waits until every change up to `lsn` is applied, as the slot's consumer reports it (this process's
   * applier, or the slot's confirmed position when another consumer is attached); false on timeout.
   */
  waitFor(lsn: string, timeoutMs: number): Promise<boolean>;
  /**
   * Waits, within `timeoutMs` in all, until waitFor(lsn) holds and a group of the stream ending at or past
   * `lsn` is committed with its record in the migration row (pgshift.migrations.applied_lsn, written in the
   * same transaction as the shadow's rows). This is the proof the cutover takes: waitFor writes a logical
   * message (flushWal) after `lsn`, which reaches the applier after every transaction committed before
   * `lsn`, in commit order; a group ending past it was committed only once each of those was applied (or
   * was already recorded as applied). It does not rest on the slot's confirmed position (any consumer, a
   * pg_recvlogical attached by mistake, advances that) nor on a keepalive's position.
   * @returns false on timeout.
   */
  waitForRecorded(lsn: string, timeoutMs: number): Promise<boolean>;
  /** Changes applied by this process. */
  changes(): number;
  stop(): Promise<void>;
}

/** The stream did not apply everything up to a position in time (under a lock: release it and try again). */
export class CatchupTimeout extends Error {}

/**
 * Apply errors worth starting again from the slot's confirmed position: a conflict, a lost connection, or a
 * group fenced off because another applier committed first (takeOver re-reads the row, and refuses to
 * start at all once the migration no longer streams).
 */
const retryable = (err: unknown) =>
  ["40P01", "40001", "55P03"].includes(sqlState(err) ?? "") || isConnectionLoss(err) || err instanceof StreamFenced;

/**
 * Keeps the shadow following the slot for as long as a command needs it: applies the stream in this process
 * (an Applier, restarted from the slot's confirmed position after a deadlock or a lost connection) when the
 * slot is free; when another consumer (`pgshift sync`) is attached, watches the slot's confirmed LSN
 * instead, and takes the stream over as soon as that consumer goes away (sync stopped or killed), so a
 * wait never depends on a process that is no longer there.
 * @throws PgshiftError when the stream cannot start for another reason than a consumer attached (the slot
 *   invalidated, the connection lost).
 */
export async function followStream(sql: Sql, m: StreamingMigration): Promise<StreamFollower> {
  const slot = m.slot_name;
  const url = connectionUrl(sql);
  // A connection of its own to flush WAL and poll the slot: the caller's may be inside a transaction
  // (cutover holds a lock).
  const flusher = await connect({ url, applicationName: "pgshift flush" });
  const flush = () => flushWal(flusher);
  let applier: Applier | null = null;
  let applied = 0;
  let stopped = false;

  /** Starts applying in this process; false when another consumer holds the slot. */
  const takeOver = async (): Promise<boolean> => {
    if (stopped) return false;
    const fresh = await loadMigration(flusher, { schema: m.source_schema, name: m.source_table });
    // Never start an applier for a migration that no longer streams: after a cutover the names point at
    // other tables (the partitioned one is live), and the slot may still exist for a moment.
    if (!fresh || !isStreaming(fresh) || fresh.slot_name !== slot) {
      log().info({ slot, phase: fresh?.phase ?? "gone" }, "stream: the migration no longer streams; not applying here");
      return false;
    }
    const a = new Applier(fresh, { url });
    try {
      await a.start();
    } catch (err) {
      // Attached between the check and the start: follow that consumer. Anything else (the slot
      // invalidated, the connection lost) is the caller's error, not a reason to wait for nobody.
      if (sqlState((err as { cause?: unknown }).cause) !== "55006") throw err;
      return false;
    }
    if (stopped) {
      await a.stop();
      return false;
    }
    applier = a;
    return true;
  };

  try {
    if ((await slotState(flusher, slot)).active || !(await takeOver())) {
      log().info({ slot }, "stream: a consumer is attached to the slot (pgshift sync); following it");
    }
  } catch (err) {
    await flusher.end({ timeout: 5 }).catch(() => {});
    throw err;
  }

  const supervise = setInterval(() => {
    const old = applier;
    const err = old?.error;
    if (!old || !err || stopped) return;
    if (!retryable(err)) return;
    const code = sqlState(err);
    // Roll back to the slot's confirmed position and start again: nothing applied twice, nothing lost.
    applier = null;
    applied += old.changes;
    void (async () => {
      await old.stop();
      if (stopped) return;
      log().warn({ slot, code }, "stream: apply failed with a transient error, restarting from the confirmed position");
      // Not started (the slot busy, the server away): the next wait takes over when it can.
      await takeOver().catch(() => {});
    })();
  }, 200);

  /** Watching another consumer: true once the slot confirmed `lsn`; takes over if the consumer left. */
  const watch = async (target: bigint, until: number): Promise<boolean> => {
    let idleSince: number | null = null;
    // Often at first (cutover waits under its lock, and the consumer confirms as soon as it has applied the
    // flush message), then less.
    const fastUntil = Date.now() + 1000;
    for (;;) {
      const s = await slotState(flusher, slot);
      if (s.confirmedLsn && lsnToBigInt(s.confirmedLsn) >= target) return true;
      if (applier) return false;
      // No consumer for a moment (not a sync between two of its own sessions): apply here.
      if (s.exists && !s.active) {
        idleSince ??= Date.now();
        if (Date.now() - idleSince >= 500 && (await takeOver())) {
          log().warn(
            { slot },
            "stream: the consumer attached to the slot went away; applying the stream in this process",
          );
          return false;
        }
      } else idleSince = null;
      if (Date.now() >= until) return false;
      await new Promise((r) => setTimeout(r, Date.now() < fastUntil ? 5 : 50));
    }
  };

  const waitFor = async (lsn: string, timeoutMs: number): Promise<boolean> => {
    const until = Date.now() + timeoutMs;
    const target = lsnToBigInt(lsn);
    await flush();
    for (;;) {
      const a = applier;
      if (!a) {
        if (await watch(target, until)) return true;
        if (!applier && Date.now() >= until) return false;
        continue;
      }
      try {
        return await a.waitFor(lsn, Math.max(0, until - Date.now()));
      } catch (err) {
        if (!retryable(err) || Date.now() >= until) throw err;
        while (applier === a && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
      }
    }
  };

  /** The applied position the migration row records (committed groups only), as a number; -1 when none. */
  const recorded = async (): Promise<bigint> => {
    const rows = await flusher`select applied_lsn from pgshift.migrations where id = ${m.id}`;
    const lsn = (rows[0] as { applied_lsn: string | null } | undefined)?.applied_lsn ?? null;
    return lsn === null ? -1n : lsnToBigInt(lsn);
  };

  return {
    get own() {
      return applier !== null;
    },
    waitFor,
    waitForRecorded: async (lsn, timeoutMs) => {
      const until = Date.now() + timeoutMs;
      const target = lsnToBigInt(lsn);
      if (!(await waitFor(lsn, timeoutMs))) return false;
      // The group holding the flush message commits at once (see FLUSH_MESSAGE): poll often.
      for (;;) {
        if ((await recorded()) >= target) return true;
        if (Date.now() >= until) return false;
        await new Promise((r) => setTimeout(r, 5));
      }
    },
    changes: () => applied + (applier?.changes ?? 0),
    stop: async () => {
      stopped = true;
      clearInterval(supervise);
      await applier?.stop();
      await flusher.end({ timeout: 5 }).catch(() => {});
    },
  };
}

/**
 * Makes the server flush its WAL now: a transactional logical message (FLUSH_MESSAGE; an applier that reads
 * it commits its group at once) committed with synchronous_commit on. The stream only carries flushed WAL;
 * with asynchronous commits, or after the cutover's own ACCESS EXCLUSIVE lock record (logged for standbys),
 * the last records could otherwise wait for the WAL writer, or for a page to fill, before the stream can
 * reach the LSN a caller waits for.
 */
export async function flushWal(sql: Sql): Promise<void> {
  await transaction(sql, async (tx) => {
    await tx`set local synchronous_commit = on`;
    await tx`select pg_logical_emit_message(true, ${FLUSH_MESSAGE.prefix}, ${FLUSH_MESSAGE.content})`;
  });
}

/**
 * Waits until the stream is caught up: the time to apply everything written up to "now" is at most
 * `maxLagMs`. Returns the last measured catch-up time, ms (above `maxLagMs` only when the stream kept
 * reaching "now", but never that fast, for `timeoutMs`).
 * @throws PgshiftError when the stream never reached the WAL position of "now" within `timeoutMs`.
 */
export async function catchUp(sql: Sql, f: StreamFollower, maxLagMs: number, timeoutMs = 600_000): Promise<number> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const target = String((await sql`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
    const t0 = Date.now();
    const ok = await f.waitFor(target, Math.max(1000, until - Date.now()));
    const took = Date.now() - t0;
    if (ok && took <= maxLagMs) return took;
    if (Date.now() >= until) {
      if (ok) return took;
      throw new PgshiftError(
        `the replication stream did not reach WAL position ${target} within ${Math.round(timeoutMs / 1000)} s`,
        {
          hint: "see pgshift status (lag, consumer attached); verify and cutover wait for the stream again",
        },
      );
    }
  }
}
