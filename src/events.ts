/**
 * What a running pgshift does, as events: the one place the copy, the verify, the applier and the switches
 * report to, and where metrics (Prometheus) and hooks listen. Emitting never waits and never fails the
 * emitter: a listener that throws is logged and ignored. Events are in-process only; what another process
 * must see (paused, throttled, the batch size in use) is also kept in pgshift's state.
 */
import { EventEmitter } from "node:events";
import { log } from "./log.js";

/** Every event with its payload. `table` is the table under migration as displayed (schema.name). */
export interface PgshiftEvents {
  /** A backfill batch committed: `rows` copied in `ms`; `batchRows` the size asked for (rows). */
  batch: {
    table: string;
    rows: number;
    ms: number;
    batchRows: number;
    rowsCopied: number;
    rowsEstimated: number;
    /** Rows per second since this process started copying. */
    rate: number;
    etaSeconds: number | null;
  };
  /** The copy is complete (all rows copied, before the indexes are built). */
  copyComplete: { table: string; rowsCopied: number; batches: number };
  /** The copy or verify waited `ms` because of `reason` (null reason: the wait ended). */
  throttle: { table: string; step: "backfill" | "verify" | "sync"; reason: string | null; ms: number };
  /** The migration was paused or resumed (by `by`, at `since`, an ISO time). */
  paused: { table: string; paused: boolean; by: string | null; since: string | null };
  /** One attempt to take a lock on a table pgshift moves, in `command`; `waitedMs` until granted or given up. */
  lockAttempt: { table: string; command: string; granted: boolean; waitedMs: number };
  /**
   * Before a lock was requested, a session holding a conflicting lock on the table or a partition was found:
   * `action` cancelled (autovacuum), terminated (--terminate-holders-after), or waited (the lock was not requested).
   */
  lockHolder: {
    table: string;
    command: string;
    pid: number;
    relation: string;
    mode: string;
    /** pg_stat_activity.state, or "autovacuum". */
    state: string | null;
    /** Age of its transaction (or of its wait for a lock), ms. */
    ageMs: number;
    query: string | null;
    action: "cancelled" | "terminated" | "waited";
  };
  /** A switch (or any step holding a lock the application waits on) committed: writes were blocked `ms`. */
  blocked: { table: string; command: string; ms: number };
  /** The logical applier applied changes: `changes` since the last event, the lag behind the server. */
  applied: { table: string; changes: number; lagBytes: number; lagSeconds: number | null };
  /** One verify chunk compared: `rows` of the live table, `differences` found in it. */
  verifyChunk: { table: string; rows: number; differences: number };
  /** A verify finished. */
  verifyDone: { table: string; equal: boolean; missing: number; extra: number; different: number };
  /** The migration changed phase, by `command`. */
  phase: { table: string; command: string; from: string; to: string };
  /** A command failed with `error` (one line). */
  failure: { table: string; command: string; error: string };
}

export type EventName = keyof PgshiftEvents;

const emitter = new EventEmitter();
emitter.setMaxListeners(50);

/** Reports `event`; listeners run at once, in order; one that throws is logged and skipped. */
export function emit<K extends EventName>(event: K, payload: PgshiftEvents[K]): void {
  for (const fn of emitter.listeners(event)) {
    try {
      (fn as (p: PgshiftEvents[K]) => void)(payload);
    } catch (err) {
      log().warn({ event, err: err instanceof Error ? err.message : String(err) }, "an event listener failed");
    }
  }
}

/** Listens to `event`; returns the function that stops listening. */
export function on<K extends EventName>(event: K, fn: (p: PgshiftEvents[K]) => void): () => void {
  emitter.on(event, fn);
  return () => emitter.off(event, fn);
}
