import { z } from "zod";
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";

/**
 * What makes the copy and the verify wait between batches (each off when unset). Checked before each batch or
 * chunk, never inside one; while one holds, pgshift waits and looks again every `checkEveryMs`.
 */
export interface ThrottleOptions {
  /** Wait while a physical standby replays more than this many ms behind (pg_stat_replication). */
  maxReplicaLagMs?: number;
  /** Wait while another logical replication slot is more than this many bytes of WAL behind (pg_replication_slots). */
  maxSlotLagBytes?: number;
  /** Wait while more than this many sessions are active (pg_stat_activity), pgshift's own left out. */
  maxActiveSessions?: number;
  /** The operator's SQL: wait while its first row's first column is true. */
  throttleQuery?: string;
  /** How often to look again while waiting, ms (default 500). */
  checkEveryMs?: number;
}

/** Whether any throttle is set. */
export function throttles(opts: ThrottleOptions): boolean {
  return (
    opts.maxReplicaLagMs !== undefined ||
    opts.maxSlotLagBytes !== undefined ||
    opts.maxActiveSessions !== undefined ||
    (opts.throttleQuery ?? "").trim() !== ""
  );
}

const StandbyRow = z.object({
  name: z.string(),
  lag_ms: z.coerce.number().nullable(),
  replay_lsn: z.string().nullable(),
  behind: z.boolean(),
});
const SlotRow = z.object({ slot_name: z.string(), lag_bytes: z.coerce.number() });
const CountRow = z.object({ n: z.coerce.number() });

/**
 * The statements a Throttle runs, as printed (dry runs) and as sent. `$1` of `slots`: pgshift's own slot (or
 * null), left out. Active sessions are client backends in state `active`, in every database, other than this
 * session and sessions whose application_name starts with `pgshift` (pgshift's own commands).
 */
export const THROTTLE_SQL = {
  // Physical standbys only: a WAL sender streaming a logical slot (a subscriber, pgshift's own stream) is left out.
  standbys:
    "SELECT coalesce(nullif(r.application_name, ''), host(r.client_addr), r.pid::text) AS name, " +
    "(extract(epoch FROM r.replay_lag) * 1000)::float8 AS lag_ms, r.replay_lsn::text AS replay_lsn, " +
    "coalesce(r.replay_lsn < pg_current_wal_lsn(), true) AS behind " +
    "FROM pg_catalog.pg_stat_replication r LEFT JOIN pg_catalog.pg_replication_slots s ON s.active_pid = r.pid " +
    "WHERE s.slot_type IS DISTINCT FROM 'logical'",
  slots:
    "SELECT slot_name::text, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 AS lag_bytes " +
    "FROM pg_catalog.pg_replication_slots WHERE slot_type = 'logical' AND confirmed_flush_lsn IS NOT NULL " +
    "AND slot_name IS DISTINCT FROM $1 ORDER BY 2 DESC LIMIT 1",
  sessions:
    "SELECT count(*)::int AS n FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend' " +
    "AND state = 'active' AND pid <> pg_backend_pid() AND coalesce(application_name, '') NOT LIKE 'pgshift%'",
  lsn: "SELECT pg_current_wal_lsn()::text AS lsn",
} as const;

/** An LSN as a number of bytes (exact up to 2^53: 8 PB of WAL). */
function lsnBytes(lsn: string): number {
  const [hi = "0", lo = "0"] = lsn.split("/");
  return Number.parseInt(hi, 16) * 2 ** 32 + Number.parseInt(lo, 16);
}

/**
 * Answers, between two batches, whether the copy or the verify should wait and why. One Throttle per running
 * command: it keeps samples of the WAL position over time, to tell how long ago a standby's replay position was
 * current. PostgreSQL's replay_lag (pg_stat_replication) only changes when the standby reports progress: a
 * standby whose replay is paused keeps the last value; pgshift therefore takes the larger of replay_lag and the
 * age of the oldest sample the standby has not replayed yet, and 0 for a standby that replayed everything.
 */
export class Throttle {
  private samples: { lsn: number; at: number }[] = [];

  constructor(
    readonly opts: ThrottleOptions,
    /** pgshift's own replication slot (logical mode), never counted as another slot. */
    readonly ownSlot: string | null = null,
  ) {}

  /** Whether any throttle is set. */
  get active(): boolean {
    return throttles(this.opts);
  }

  /** How long to wait before looking again, ms. */
  get checkEveryMs(): number {
    return this.opts.checkEveryMs ?? 500;
  }

  /** One line per throttle set, for plans (what is checked between batches). */
  describe(): string[] {
    const o = this.opts;
    return [
      ...(o.maxReplicaLagMs !== undefined
        ? [`a physical standby replays more than ${o.maxReplicaLagMs} ms behind (pg_stat_replication)`]
        : []),
      ...(o.maxSlotLagBytes !== undefined
        ? [`another logical replication slot is more than ${o.maxSlotLagBytes} bytes behind`]
        : []),
      ...(o.maxActiveSessions !== undefined
        ? [`more than ${o.maxActiveSessions} sessions are active (pgshift's own left out)`]
        : []),
      ...((o.throttleQuery ?? "").trim() !== "" ? [`the throttle query returns true: ${o.throttleQuery}`] : []),
    ];
  }

  /**
   * Runs the throttle query once (if any), so that a query that fails is refused before anything changes.
   * @throws PgshiftError when it fails.
   */
  async validate(sql: AnySql): Promise<void> {
    if ((this.opts.throttleQuery ?? "").trim() !== "") await this.query(sql);
  }

  /** The throttle query's answer: whether its first row's first column is true. */
  private async query(sql: AnySql): Promise<boolean> {
    let rows: readonly Record<string, unknown>[];
    try {
      rows = await sql.unsafe((this.opts.throttleQuery ?? "").trim());
    } catch (err) {
      throw new PgshiftError(`--throttle-query failed: ${err instanceof Error ? err.message : String(err)}`, {
        hint:
          "give a query whose first column is true while the copy should wait, e.g. --throttle-query " +
          '"select exists (select from ops.freeze)"',
        cause: err,
      });
    }
    const first = rows[0] ? Object.values(rows[0])[0] : null;
    return first === true || first === "t" || first === "true";
  }

  /**
   * Why to wait now, in one line (which signal, its value and the limit), or null to go on. Runs one short query
   * per throttle set, on `sql` (outside any batch's transaction).
   * @throws PgshiftError when the throttle query fails (bad SQL, a missing table): the operator must fix it.
   */
  async reason(sql: AnySql): Promise<string | null> {
    const o = this.opts;
    if (o.maxReplicaLagMs !== undefined) {
      const now = Date.now();
      const cur = String((await sql.unsafe(THROTTLE_SQL.lsn))[0]?.lsn ?? "0/0");
      this.samples.push({ lsn: lsnBytes(cur), at: now });
      // Keep the samples of the last hour, at most 4096.
      while (this.samples.length > 4096 || (this.samples[0] && now - this.samples[0].at > 3_600_000))
        this.samples.shift();
      for (const row of await sql.unsafe(THROTTLE_SQL.standbys)) {
        const s = StandbyRow.parse(row);
        // A standby that replayed everything written is not behind, whatever replay_lag still shows (PostgreSQL
        // keeps the last measured value for a while after the standby caught up).
        let lag = 0;
        if (s.behind) {
          const replayed = s.replay_lsn === null ? -1 : lsnBytes(s.replay_lsn);
          const oldest = this.samples.find((x) => x.lsn > replayed);
          lag = Math.max(s.lag_ms ?? 0, oldest ? now - oldest.at : 0);
        }
        if (lag > o.maxReplicaLagMs)
          return `replica lag: standby ${s.name} replays ${Math.round(lag)} ms behind (limit ${o.maxReplicaLagMs} ms)`;
      }
    }
    if (o.maxSlotLagBytes !== undefined) {
      const row = (await sql.unsafe(THROTTLE_SQL.slots, [this.ownSlot]))[0];
      if (row) {
        const s = SlotRow.parse(row);
        if (s.lag_bytes > o.maxSlotLagBytes)
          return (
            `slot lag: replication slot ${s.slot_name} is ${Math.round(s.lag_bytes)} bytes behind ` +
            `(limit ${o.maxSlotLagBytes} bytes)`
          );
      }
    }
    if (o.maxActiveSessions !== undefined) {
      const n = CountRow.parse((await sql.unsafe(THROTTLE_SQL.sessions))[0]).n;
      if (n > o.maxActiveSessions) return `active sessions: ${n} sessions are active (limit ${o.maxActiveSessions})`;
    }
    const q = (o.throttleQuery ?? "").trim();
    if (q !== "" && (await this.query(sql)))
      return `throttle query: true (${q.length > 80 ? `${q.slice(0, 77)}...` : q})`;
    return null;
  }
}
