import pRetry from "p-retry";
import { connect, connectionUrl, type Sql } from "../db.js";
import { isConnectionLoss, PgshiftError, sqlState } from "../errors.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import {
  hasStream,
  isStreaming,
  loadMigration,
  requireMigration,
  type StreamingMigration,
} from "../migration/state.js";
import { displayName, type QualifiedName } from "../names.js";
import { Applier, StreamFenced } from "./apply.js";
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

/** A lost connection sync is about to make again. */
export interface SyncReconnect {
  /** 1 for the first attempt after a loss, counting up while the server stays unreachable. */
  attempt: number;
  /** What was lost, as the error said it. */
  error: string;
}

export interface SyncOptions {
  /** Stops cleanly (after the transaction in hand is rolled back, not confirmed) when aborted. */
  signal?: AbortSignal;
  /** Called about once a second. */
  onTick?: (t: SyncTick) => void;
  /**
   * When the connection to the server is lost (restart, failover, network, the walsender terminated),
   * connect again and go on from the slot's confirmed position, waiting 0.5 s doubling up to 5 s between
   * attempts, for as long as it takes (default true; pg_recvlogical's behaviour). false: fail instead
   * (pg_recvlogical --no-loop).
   */
  loop?: boolean;
  /** Called before each attempt to connect again. */
  onReconnect?: (r: SyncReconnect) => void;
}

/** Apply errors worth starting again at once from the confirmed position (deadlock, serialization failure). */
const TRANSIENT = new Set(["40P01", "40001"]);

/** Why a session of the applier ended without error. */
type Stop = { reason: "stopped" | "cut over" | "gone" };

/** The migration's state for sync: a Stop when it no longer streams, else the migration. */
async function current(sql: Sql, table: QualifiedName): Promise<StreamingMigration | Stop> {
  const m = await loadMigration(sql, table);
  if (!m) return { reason: "gone" };
  // Not streaming any more (cut over, or swapped back after it): never attach again, even if the slot is left.
  if (!isStreaming(m)) return { reason: "cut over" };
  return m;
}

/**
 * `pgshift sync`: applies the replication stream of a logical-mode migration to the shadow until stopped,
 * or until the migration no longer streams (cut over, aborted). Takes no migration lock, so backfill,
 * verify and cutover run beside it (they wait for it to catch up instead of taking over the slot).
 *
 * A lost connection (see SyncOptions.loop and isConnectionLoss) does not end it: the apply transaction in
 * hand is lost with the connection (nothing of it was confirmed), and the next session starts again from
 * the slot's confirmed position, skipping what the migration row records as applied. So do a deadlock or
 * serialization failure of the apply (40P01, 40001), and a group fenced off at its commit because another
 * applier recorded a position meanwhile (StreamFenced), at once. A migration that no longer streams (cut
 * over, or swapped back after a cutover even if its slot were left) ends sync: nothing is applied after
 * the cutover (see Applier.commitGroup).
 * @returns why it stopped.
 * @throws PgshiftError when the migration is not in logical mode, the slot is held by another process when
 *   sync starts, the slot was invalidated or is gone, or (loop false) the connection is lost; any other
 *   error of the apply (a schema change of the table, a TRUNCATE) as it is.
 */
export async function sync(sql: Sql, table: QualifiedName, opts: SyncOptions = {}): Promise<Stop> {
  const first = await requireMigration(sql, table, "sync");
  if (!hasStream(first)) {
    throw new PgshiftError(
      `the migration of ${displayName(table)} is in ${first.mode} mode: there is no stream to apply`,
      { hint: "sync is for migrations started with --mode logical" },
    );
  }
  const url = connectionUrl(sql);
  const loop = opts.loop ?? true;
  let sessions = 0;
  let base = 0;
  let baseTransactions = 0;
  let lastChanges = 0;
  let lastTick = Date.now();
  let lost = 0;

  /**
   * One attachment to the slot: streams until stopped, cut over or gone, or throws what ended it. Each
   * session opens connections of its own and closes them at its end: a pool that lost a connection may never
   * answer again (UPSTREAM.postgresJsReconnectsForEverOnCleanClose in driver/upstream.ts), so it is not used again.
   */
  const session = async (): Promise<Stop> => {
    const db = await connect({ url, applicationName: `pgshift sync ${displayName(table)}` });
    let applier: Applier | null = null;
    try {
      const m = sessions === 0 ? first : await current(db, table);
      if ("reason" in m) return m;
      // Terminated by abort or cutover, which drop the slot next: do not attach to nothing.
      if (!(await slotState(db, m.slot_name)).exists) return await slotGone(db, m);
      applier = new Applier(m, { url });
      try {
        await applier.start();
      } catch (err) {
        if (!(await slotState(db, m.slot_name)).exists) return await slotGone(db, m);
        throw err;
      }
      sessions++;
      if (sessions === 1) log().info({ table: displayName(table), slot: m.slot_name }, "sync: streaming");
      else
        log().warn(
          { table: displayName(table), slot: m.slot_name },
          "sync: streaming again, from the slot's confirmed position",
        );
      lost = 0;
      return await streamUntilDone(db, m, applier);
    } finally {
      if (applier) {
        base += applier.changes;
        baseTransactions += applier.transactions;
        await applier.stop();
      }
      await db.end({ timeout: 1 }).catch(() => {});
    }
  };

  /**
   * The slot is gone but the migration row still names it: abort or cutover dropped it and is about to
   * commit (abort's transaction may wait for its lock). Waits up to 5 s for the row to say so.
   * @throws PgshiftError when it does not: the slot was dropped by someone else.
   */
  const slotGone = async (db: Sql, m: StreamingMigration): Promise<Stop> => {
    for (let i = 0; i < 50; i++) {
      await pause(100);
      const later = await current(db, table);
      if ("reason" in later) return later;
    }
    throw new PgshiftError(`replication slot ${m.slot_name} is gone but the migration still expects it`, {
      hint: "run pgshift abort and start again",
    });
  };

  /** Reports progress once a second until stopped, cut over or gone; throws the stream's error. */
  const streamUntilDone = async (db: Sql, m: StreamingMigration, applier: Applier): Promise<Stop> => {
    for (let tick = 0; ; tick++) {
      await pause(1000, opts.signal);
      if (opts.signal?.aborted) return { reason: "stopped" };
      const err = applier.error;
      if (err) {
        // The stream may have ended because abort or cutover dropped the slot: then stop, not reconnect.
        const now = await current(db, table);
        if ("reason" in now) return now;
        if (!(await slotState(db, now.slot_name)).exists) return await slotGone(db, now);
        throw err;
      }
      if (tick % 2 === 0) {
        const now = await current(db, table);
        if ("reason" in now) return now;
      }
      const s = await slotState(db, m.slot_name);
      const changes = base + applier.changes;
      const secs = (Date.now() - lastTick) / 1000;
      opts.onTick?.({
        appliedLsn: applier.progress.appliedLsn,
        lagBytes: s.lagBytes,
        lagSeconds: s.lagSeconds,
        changesPerSecond: secs > 0 ? (changes - lastChanges) / secs : 0,
        changes,
        transactions: baseTransactions + applier.transactions,
      });
      emit("applied", {
        table: displayName(table),
        changes: changes - lastChanges,
        lagBytes: s.lagBytes,
        lagSeconds: s.lagSeconds,
      });
      lastChanges = changes;
      lastTick = Date.now();
    }
  };

  // After a lost connection the old walsender may still hold the slot until the server notices (up to
  // wal_sender_timeout): "in use" is then worth waiting for. At the first start it means another consumer.
  const slotBusy = (err: unknown) => sessions > 0 && sqlState((err as { cause?: unknown }).cause) === "55006";
  /** Why a failed session is worth another, or null when the error ends sync. */
  const again = (err: unknown): "transient" | "lost" | null => {
    if (opts.signal?.aborted) return null;
    // Fenced: another applier committed since this session read the row (or the migration moved on, which
    // the next session's first look at the row sees): start again from the confirmed position.
    if (TRANSIENT.has(sqlState(err) ?? "") || err instanceof StreamFenced) return "transient";
    return loop && (isConnectionLoss(err) || slotBusy(err)) ? "lost" : null;
  };
  try {
    return await pRetry(session, {
      retries: Number.POSITIVE_INFINITY,
      minTimeout: 500,
      maxTimeout: 5000,
      factor: 2,
      signal: opts.signal,
      shouldRetry: ({ error }) => again(error) !== null,
      onFailedAttempt: ({ error }) => {
        const why = again(error);
        const code = sqlState(error);
        if (why === "transient")
          log().warn({ code }, "sync: transient apply error, starting again from the confirmed position");
        if (why !== "lost") return;
        lost++;
        log().warn(
          { attempt: lost, code, err: error.message },
          "sync: connection lost; connecting again (nothing unconfirmed is lost: the slot sends it again)",
        );
        opts.onReconnect?.({ attempt: lost, error: error.message });
      },
    });
  } catch (err) {
    if (opts.signal?.aborted) return { reason: "stopped" };
    if (!loop && isConnectionLoss(err) && !(err instanceof PgshiftError)) {
      throw new PgshiftError(
        `sync lost its connection to the server: ${err instanceof Error ? err.message : String(err)}`,
        {
          hint: "run pgshift sync again (without --no-loop it connects again by itself); nothing unconfirmed was lost",
          cause: err,
        },
      );
    }
    throw err;
  }
}

/** Waits `ms`, or less when `signal` aborts. */
function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise<void>((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}
