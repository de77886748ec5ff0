import { z } from "zod";
import type { AnySql } from "../db.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import type { Migration } from "../migration/state.js";
import { displayName } from "../names.js";
import { block, check, type Step, statement } from "../plan/steps.js";
import { Throttle, type ThrottleOptions } from "./throttle.js";

/** What a running backfill or verify waits for between two batches (or chunks). */
export interface Waiting {
  /** `paused`: pgshift pause; `throttled`: a throttle's limit is passed. */
  kind: "paused" | "throttled";
  /** One line: who paused it and from where, or the throttle's signal with its value and limit. */
  reason: string;
  /** Since when (ISO 8601). */
  since: string;
}

const PauseRow = z.object({
  paused_at: z.date().nullable().optional(),
  paused_by: z.string().nullable().optional(),
  paused_client: z.string().nullable().optional(),
});

/** The statements of the gate, as printed (dry runs) and as sent; `$1` the throttle's reason. */
export function gateStatements(m: Migration) {
  return {
    paused: `SELECT paused_at, paused_by, paused_client FROM pgshift.migrations WHERE id = ${m.id}`,
    throttled:
      `UPDATE pgshift.migrations SET throttle_reason = $1, throttle_since = coalesce(throttle_since, now()) ` +
      `WHERE id = ${m.id}`,
    clear: `UPDATE pgshift.migrations SET throttle_reason = NULL, throttle_since = NULL WHERE id = ${m.id}`,
  };
}

/** "paused by alice (psql from 10.0.0.7) since 2026-...": who paused, from where, since when. */
export function pausedLine(by: string | null, client: string | null, since: Date | string): string {
  const at = since instanceof Date ? since.toISOString() : since;
  return `paused by ${by ?? "?"}${client ? ` (${client})` : ""} since ${at}`;
}

/**
 * The wait between two batches of a backfill (or chunks of a verify): while the migration is paused (pgshift
 * pause, kept in pgshift.migrations) and while a throttle holds (Throttle), the command waits, looking again every
 * `checkEveryMs` (default 500 ms), and says so: a log line when a wait starts and ends, the `onWait` callback
 * (progress), the `throttle` and `paused` events, and for a throttle its reason and since-when in the migration's
 * row (throttle_reason, throttle_since) for pgshift status. The applier of logical mode is never held here.
 */
export class PaceGate {
  private readonly throttle: Throttle;
  private readonly sql: AnySql;
  private recorded = false;

  constructor(
    sql: AnySql,
    readonly m: Migration,
    readonly step: "backfill" | "verify",
    opts: ThrottleOptions & { signal?: AbortSignal; onWait?: (w: Waiting | null) => void } = {},
  ) {
    this.sql = sql;
    this.throttle = new Throttle(opts, m.slot_name);
    this.opts = opts;
  }

  private readonly opts: ThrottleOptions & { signal?: AbortSignal; onWait?: (w: Waiting | null) => void };

  /** The steps the gate may run, for the plan: printed inside the loop of batches (or chunks). */
  steps(): Step[] {
    const g = gateStatements(this.m);
    const throttles = this.throttle.describe();
    return [
      check(
        `before each ${this.step === "backfill" ? "batch" : "chunk"}: wait while the migration is paused ` +
          `(pgshift pause; looked up with: ${g.paused})` +
          (throttles.length > 0 ? `, or while ${throttles.join(", or ")}` : ""),
      ),
      ...(throttles.length > 0
        ? [
            block("any number of times", "while a throttle holds: its reason ($1) kept for pgshift status", [
              statement(g.throttled, "session"),
            ]),
          ]
        : []),
      block("at most once", "when a throttle's wait ends (or the command stops while it waits): its reason cleared", [
        statement(g.clear, "session"),
      ]),
    ];
  }

  /**
   * Returns once the next batch may run: at once when nothing holds it, else after waiting (see the class), or as
   * soon as `signal` is aborted.
   * @throws PgshiftError when the throttle query fails.
   */
  async wait(): Promise<void> {
    const table = displayName(this.m.original);
    let current = null as Waiting | null;
    let t0 = 0;
    for (;;) {
      if (this.opts.signal?.aborted) break;
      const p = PauseRow.parse((await this.sql.unsafe(gateStatements(this.m).paused))[0] ?? {});
      let next: Waiting | null = null;
      if (p.paused_at) {
        next = {
          kind: "paused",
          reason: pausedLine(p.paused_by ?? null, p.paused_client ?? null, p.paused_at),
          since: p.paused_at.toISOString(),
        };
      } else {
        const reason = await this.throttle.reason(this.sql);
        if (reason !== null)
          next = {
            kind: "throttled",
            reason,
            since: current?.kind === "throttled" ? current.since : new Date().toISOString(),
          };
      }
      if (next?.kind === "throttled") {
        await this.sql.unsafe(gateStatements(this.m).throttled, [next.reason]);
        this.recorded = true;
      } else if (this.recorded) await this.clear();
      if (current?.kind !== next?.kind) {
        if (current) this.ended(table, current, performance.now() - t0);
        if (next) {
          t0 = performance.now();
          this.started(table, next, p.paused_by ?? null);
        }
      }
      current = next;
      this.opts.onWait?.(next);
      if (!next) return;
      await this.sleep(this.throttle.checkEveryMs);
    }
    if (current) {
      this.ended(table, current, performance.now() - t0);
      this.opts.onWait?.(null);
    }
    if (this.recorded) await this.clear();
  }

  /** Clears the throttle's reason kept in the migration's row, if this gate wrote one (at the command's end too). */
  async clear(): Promise<void> {
    if (!this.recorded) return;
    await this.sql.unsafe(gateStatements(this.m).clear);
    this.recorded = false;
  }

  private started(table: string, w: Waiting, by: string | null): void {
    if (w.kind === "paused") {
      emit("paused", { table, paused: true, by, since: w.since });
      log().warn(
        { table, step: this.step, since: w.since },
        `${this.step}: ${w.reason}; waiting (before the next ${this.unit()}) for: pgshift resume ${table}`,
      );
    } else {
      emit("throttle", { table, step: this.step, reason: w.reason, ms: 0 });
      log().warn({ table, step: this.step, reason: w.reason }, `${this.step}: throttled: ${w.reason}; waiting`);
    }
  }

  private ended(table: string, w: Waiting, ms: number): void {
    if (w.kind === "paused") {
      emit("paused", { table, paused: false, by: null, since: null });
      log().info({ table, step: this.step, pausedMs: Math.round(ms) }, `${this.step}: resumed`);
    } else {
      emit("throttle", { table, step: this.step, reason: null, ms });
      log().info({ table, step: this.step, waitedMs: Math.round(ms) }, `${this.step}: throttle lifted, going on`);
    }
  }

  private unit(): string {
    return this.step === "backfill" ? "batch" : "chunk";
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const signal = this.opts.signal;
      const done = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal?.addEventListener("abort", done, { once: true });
    });
  }
}
