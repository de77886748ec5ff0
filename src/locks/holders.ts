/**
 * Before pgshift requests a lock on a table the application uses (cutover, swap-back, start, the publication's
 * drop, finalize, abort), it looks at what would make the request wait, so that the request never queues the
 * application behind a session that will not let go soon (a waiting ACCESS EXCLUSIVE request blocks every later
 * request on the table: PostgreSQL documentation, "Explicit Locking").
 *
 * One statement (holdersSql), printed in the plan before the lock and run as printed, reads pg_locks joined with
 * pg_stat_activity for the tables AND their partitions (from pg_inherits, recursively: reading it takes no lock on
 * them), keeping the locks that conflict with
 * the mode pgshift is about to request (the conflict table of "Explicit Locking", Table 13.2), and in the same
 * statement:
 * - cancels autovacuum workers that hold one (pg_cancel_backend; autovacuum starts on the table again later by
 *   itself; PostgreSQL would cancel it only after deadlock_timeout, 1 s by default, of a waiting request);
 * - with `terminateAfterMs`, terminates the other holders whose transaction is older than that
 *   (pg_terminate_backend: like pg-online-schema-change's --kill-backends; off by default).
 * What is done with its rows (LockSite, said in the statement's comment in the plan): each cancelled or terminated
 * session is logged, and each holder whose transaction (or wait) has lasted at least the lock timeout (pid, age,
 * state, query); when one remains, the attempt rolls
 * attempt back without requesting the lock (HoldersPresent): the lock retry waits, jittered, and looks again.
 * Younger holders (the application's short transactions in flight) are waited for by the request itself,
 * under lock_timeout.
 */
import { z } from "zod";
import type { Sql } from "../db.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import { displayName, type QualifiedName, quoteLiteral, quoteQualified } from "../names.js";
import {
  type RunOptions,
  runSteps,
  runTransaction,
  type StatementStep,
  type Step,
  statement,
  type TransactionStep,
  transactionStep,
} from "../plan/steps.js";

/** The table lock modes pgshift requests on the tables the application uses. */
export type LockMode = "ACCESS EXCLUSIVE" | "SHARE ROW EXCLUSIVE" | "SHARE";

/**
 * The held modes (as pg_locks names them) that conflict with each mode pgshift requests: PostgreSQL
 * documentation, "Explicit Locking", Table 13.2 "Conflicting Lock Modes".
 */
export const CONFLICTS: Record<LockMode, readonly string[]> = {
  "ACCESS EXCLUSIVE": [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
  ],
  "SHARE ROW EXCLUSIVE": [
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
  ],
  SHARE: [
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
  ],
};

/** A table pgshift is about to lock, in `mode` (its partitions are looked at too). */
export interface LockTarget {
  table: QualifiedName;
  mode: LockMode;
}

/** One session that holds (or waits for) a conflicting lock on a target table or one of its partitions. */
export const Holder = z.object({
  pid: z.coerce.number(),
  relation: z.string(),
  mode: z.string(),
  granted: z.boolean(),
  backend_type: z.string().nullable(),
  state: z.string().nullable(),
  application_name: z.string().nullable(),
  /** Age of its transaction (granted) or of its wait (not granted), ms. */
  age_ms: z.coerce.number(),
  query: z.string().nullable(),
  cancelled: z.boolean().nullable(),
  terminated: z.boolean().nullable(),
});
export type Holder = z.infer<typeof Holder>;

const AUTOVACUUM = "autovacuum worker";

/**
 * The statement that finds the sessions holding a lock that conflicts with the one about to be requested on each
 * target (its partitions included; targets that do not exist are skipped), cancels the autovacuum workers among
 * them, and, when `terminateAfterMs` is a number, terminates the others whose transaction has run at least that
 * long (ms). One row per session (Holder), oldest lock first. Signalling an autovacuum worker needs superuser, or
 * pg_signal_autovacuum_worker from PostgreSQL 18 on; without them it is reported, not cancelled.
 */
export function holdersSql(targets: readonly LockTarget[], terminateAfterMs: number | null = null): string {
  const values = targets
    .map(
      (t) =>
        `(${quoteLiteral(quoteQualified(t.table))}, ` +
        `ARRAY[${CONFLICTS[t.mode].map((m) => quoteLiteral(m)).join(", ")}])`,
    )
    .join(", ");
  const terminate =
    terminateAfterMs === null
      ? "false"
      : `CASE WHEN h.backend_type IS DISTINCT FROM '${AUTOVACUUM}' AND h.age_ms >= ${Math.round(terminateAfterMs)} ` +
        "THEN pg_catalog.pg_terminate_backend(h.pid) ELSE false END";
  return (
    // The partitions from pg_inherits (catalog rows, no lock): pg_partition_tree would take ACCESS SHARE on each,
    // and wait behind an autovacuum truncating one (it holds ACCESS EXCLUSIVE for that moment).
    "WITH RECURSIVE tree (relid, modes) AS (\n" +
    "  SELECT pg_catalog.to_regclass(t.name)::oid, t.modes\n" +
    `    FROM (VALUES ${values}) t (name, modes)\n` +
    "   WHERE pg_catalog.to_regclass(t.name) IS NOT NULL\n" +
    "  UNION\n" +
    "  SELECT i.inhrelid, tree.modes FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid\n" +
    ")\n" +
    "SELECT h.pid, h.relation, h.mode, h.granted, h.backend_type, h.state, h.application_name, h.age_ms, h.query,\n" +
    `       CASE WHEN h.backend_type = '${AUTOVACUUM}' AND h.may_cancel THEN pg_catalog.pg_cancel_backend(h.pid) ` +
    "ELSE false END AS cancelled,\n" +
    `       ${terminate} AS terminated\n` +
    "  FROM (SELECT DISTINCT ON (l.pid) l.pid, c.relname::text AS relation, l.mode, l.granted,\n" +
    "               a.backend_type, a.state, a.application_name, left(a.query, 200) AS query,\n" +
    "               (extract(epoch FROM clock_timestamp() - CASE WHEN l.granted\n" +
    "                  THEN coalesce(a.xact_start, a.query_start, a.backend_start)\n" +
    "                  ELSE coalesce(l.waitstart, clock_timestamp()) END) * 1000)::bigint AS age_ms,\n" +
    "               coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)\n" +
    "                 OR pg_catalog.pg_has_role(pg_catalog.to_regrole('pg_signal_autovacuum_worker'), 'USAGE'),\n" +
    "                 false) AS may_cancel\n" +
    "          FROM pg_catalog.pg_locks l\n" +
    "          JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid\n" +
    "          JOIN tree x ON x.relid = l.relation\n" +
    "          JOIN pg_catalog.pg_class c ON c.oid = l.relation\n" +
    "         WHERE l.locktype = 'relation'\n" +
    "           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())\n" +
    "           AND l.pid <> pg_catalog.pg_backend_pid() AND l.mode = ANY (x.modes)\n" +
    "         ORDER BY l.pid, l.granted, age_ms DESC) h\n" +
    " ORDER BY h.age_ms DESC"
  );
}

/** A session the lock would have queued behind was found: the attempt is rolled back before requesting it. */
export class HoldersPresent extends Error {
  /** Read by the lock retry (db.ts): worth another attempt, after the jittered pause. */
  readonly lockRetry = true;
  readonly holders: Holder[];
  constructor(message: string, holders: Holder[]) {
    super(message);
    this.name = "HoldersPresent";
    this.holders = holders;
  }
}

/** A holder as logs and errors name it: `pid 123 (idle in transaction for 12.3 s, psql: UPDATE ...)`. */
export function describeHolder(h: Holder): string {
  const what = h.backend_type === AUTOVACUUM ? "autovacuum" : (h.state ?? "?");
  const app = h.application_name ? `, ${h.application_name}` : "";
  const q = h.query ? `: ${h.query.replace(/\s+/g, " ").slice(0, 120)}` : "";
  const wait = h.granted ? "" : ", waiting for its lock";
  return `pid ${h.pid} (${what} for ${(h.age_ms / 1000).toFixed(1)} s${wait}, ${h.mode} on ${h.relation}${app}${q})`;
}

/** Where a lock is taken, for the logs and the events (lockAttempt, blocked, lockHolder). */
export interface LockSiteOptions {
  /** The table under migration as displayed (schema.name). */
  table: string;
  /** The command taking the lock: cutover, swap-back, start, finalize, abort (or e.g. "cutover: publication"). */
  command: string;
  /** lock_timeout of each attempt, ms: holders whose transaction is at least this old are not queued behind. */
  lockTimeoutMs: number;
  /** Terminate other holders whose transaction is at least this old, ms (null or absent: never). */
  terminateAfterMs?: number | null;
}

/**
 * One place pgshift locks a table the application uses: the plan's steps that look before the lock and the lock
 * itself (steps), and what each attempt reports (the events lockAttempt, blocked and lockHolder).
 * A LockSite belongs to one plan; the transaction that holds its steps is run by runLocked (or gets `failed` as
 * its lock retry's onFailure), which reports attempts that were not granted, and `blocked` after COMMIT.
 */
export class LockSite {
  readonly opts: LockSiteOptions;
  readonly targets: readonly LockTarget[];
  /** performance.now() when the lock was requested in the current attempt (0: not requested). */
  requestedAt = 0;
  /** performance.now() when the lock was granted in the current attempt (0: not granted). */
  grantedAt = 0;
  /** Autovacuum workers cancelled and sessions terminated, over all attempts. */
  readonly cancelled: Holder[] = [];
  readonly terminated: Holder[] = [];
  /** The holders found at the last look that kept the lock from being requested. */
  waitedFor: Holder[] = [];
  /** Attempts made (each look that found the way clear and requested the lock, and each look that did not). */
  attempts = 0;

  constructor(targets: readonly LockTarget[], opts: LockSiteOptions) {
    this.targets = targets;
    this.opts = opts;
  }

  /** The statement that looks (holdersSql; its rows acted on as it is read), then `lock`, the one that locks. */
  steps(lock: StatementStep): StatementStep[] {
    const o = this.opts;
    // One statement, and what is done with its rows said in its comment (no step of its own: start's plan counts
    // its statements and steps alike).
    const probe = statement(
      holdersSql(this.targets, o.terminateAfterMs ?? null),
      "transaction",
      `sessions holding a lock that conflicts with the ${this.targets.map((t) => t.mode).join(" / ")} lock ` +
        "about to be requested, on the tables and their partitions: autovacuum is cancelled" +
        (o.terminateAfterMs != null ? `, holders older than ${o.terminateAfterMs} ms are terminated` : "") +
        `; if another has held its lock, or waited for one, for ${o.lockTimeoutMs} ms or longer, the attempt ` +
        "rolls back without requesting the lock and looks again after a jittered pause; a cancelled or " +
        "terminated one lets go at once: the lock is requested, its wait bounded by lock_timeout",
    );
    probe.read = (rows) => this.decide(z.array(Holder).parse(rows));
    const onGranted = lock.read;
    const granted: StatementStep = {
      ...lock,
      read: (rows) => {
        this.grantedAt = performance.now();
        emit("lockAttempt", {
          table: o.table,
          command: o.command,
          granted: true,
          waitedMs: this.grantedAt - this.requestedAt,
        });
        onGranted?.(rows);
      },
    };
    return [probe, granted];
  }

  /** Acts on the rows of a look: logs, events; throws HoldersPresent unless the lock may be requested. */
  private decide(rows: Holder[]): void {
    const o = this.opts;
    this.attempts++;
    this.requestedAt = 0;
    this.grantedAt = 0;
    const stopped: Holder[] = [];
    for (const h of rows) {
      if (h.cancelled) {
        this.cancelled.push(h);
        stopped.push(h);
        log().info(
          { table: o.table, pid: h.pid, relation: h.relation },
          `${o.command}: cancelled autovacuum on ${h.relation} (pid ${h.pid}) before locking; it starts again later`,
        );
        emit("lockHolder", this.event(h, "cancelled"));
      } else if (h.terminated) {
        this.terminated.push(h);
        stopped.push(h);
        log().warn(
          { table: o.table, pid: h.pid, query: h.query },
          `${o.command}: terminated ${describeHolder(h)}, older than --terminate-holders-after`,
        );
        emit("lockHolder", this.event(h, "terminated"));
      }
    }
    // pg_locks and pg_stat_activity are read one after the other: a session shown idle (outside any transaction)
    // committed in between and holds nothing any more.
    const blocking = rows.filter(
      (h) => !h.cancelled && !h.terminated && h.state !== "idle" && h.age_ms >= o.lockTimeoutMs,
    );
    this.waitedFor = blocking;
    if (blocking.length > 0) {
      for (const h of blocking) emit("lockHolder", this.event(h, "waited"));
      const names = blocking.map(describeHolder).join(", ");
      log().warn(
        {
          table: o.table,
          holders: blocking.map((h) => ({ pid: h.pid, ageMs: h.age_ms, state: h.state, query: h.query })),
        },
        `${o.command}: not requesting the lock while ${blocking.length === 1 ? "this session holds" : "these hold"} ` +
          `a conflicting lock: ${names}; waiting and looking again`,
      );
      throw new HoldersPresent(
        `${blocking.length === 1 ? "a session holds" : "sessions hold"} the lock: ${names}`,
        blocking,
      );
    }
    // A cancelled or terminated session lets go of its locks a moment later: the request may wait for that, under
    // the attempt's lock_timeout. Looking again instead would never end on a busy table: an autovacuum worker
    // cancelled on one table goes on to the next one in its list (the same pid), often another partition of ours.
    this.requestedAt = performance.now();
  }

  private event(h: Holder, action: "cancelled" | "terminated" | "waited") {
    return {
      table: this.opts.table,
      command: this.opts.command,
      pid: h.pid,
      relation: h.relation,
      mode: h.mode,
      state: h.backend_type === AUTOVACUUM ? "autovacuum" : h.state,
      ageMs: h.age_ms,
      query: h.query,
      action,
    };
  }

  /**
   * A failed attempt (the lock retry's onFailure): reports a lock requested and not granted (lockAttempt with
   * granted false and the time waited).
   */
  failed = (_err: unknown): void => {
    if (this.requestedAt > 0 && this.grantedAt === 0) {
      emit("lockAttempt", {
        table: this.opts.table,
        command: this.opts.command,
        granted: false,
        waitedMs: performance.now() - this.requestedAt,
      });
    }
    this.requestedAt = 0;
  };

  /** After COMMIT: reports how long writes were blocked (blocked), ms since the lock was granted; 0 if never. */
  committed(): number {
    if (this.grantedAt === 0) return 0;
    const ms = performance.now() - this.grantedAt;
    emit("blocked", { table: this.opts.table, command: this.opts.command, ms });
    return ms;
  }
}

const sitesOf = new WeakMap<TransactionStep, LockSite[]>();

/** A transaction step (transactionStep) whose lock sites' attempts runLocked reports. */
export function lockedTransaction(
  steps: Step[],
  opts: { modes?: string; lockTimeoutMs?: number; why?: string },
  sites: LockSite[],
): TransactionStep {
  const t = transactionStep(steps, opts);
  sitesOf.set(t, sites);
  return t;
}

/** The lock sites of a transaction step built by lockedTransaction (empty for any other). */
export const lockSitesOf = (t: TransactionStep): LockSite[] => sitesOf.get(t) ?? [];

/**
 * Runs `steps` as runSteps does; a transaction step built by lockedTransaction reports each failed attempt to its
 * lock sites (lockAttempt not granted) and, after COMMIT, how long writes were blocked (blocked).
 * @throws as runSteps.
 */
export async function runLocked(sql: Sql, steps: readonly Step[], opts: RunOptions = {}): Promise<void> {
  for (const s of steps) {
    const sites = s.kind === "transaction" ? lockSitesOf(s) : [];
    if (s.kind !== "transaction" || sites.length === 0) {
      await runSteps(sql, [s], opts);
      continue;
    }
    await runTransaction(sql, s, (tx) => runSteps(tx, s.steps, opts), {
      ...opts.lockRetry,
      onFailure: (err) => {
        for (const site of sites) site.failed(err);
        opts.lockRetry?.onFailure?.(err);
      },
    });
    for (const site of sites) site.committed();
  }
}

/**
 * Start's transaction: `statements` in order, with the look for holders and an explicit
 * `LOCK TABLE <source> IN SHARE ROW EXCLUSIVE MODE` (what CREATE TRIGGER takes) inserted into `statements` (changed
 * in place, so that the list start prints and runs holds them) before the first statement that locks the source
 * (`sourceAt`): the shadow is created before, without holding the source.
 */
export function lockSourceTransaction(
  source: QualifiedName,
  statements: string[],
  sourceAt: number,
  opts: { lockTimeoutMs: number; terminateAfterMs: number | null; why: string },
): TransactionStep {
  if (statements.length === 0) return transactionStep([], { lockTimeoutMs: opts.lockTimeoutMs, why: opts.why });
  const site = new LockSite([{ table: source, mode: "SHARE ROW EXCLUSIVE" }], {
    table: displayName(source),
    command: "start",
    lockTimeoutMs: opts.lockTimeoutMs,
    terminateAfterMs: opts.terminateAfterMs,
  });
  const look = site.steps(statement(`LOCK TABLE ${quoteQualified(source)} IN SHARE ROW EXCLUSIVE MODE`));
  const steps: Step[] = statements.map((s) => statement(s));
  steps.splice(sourceAt, 0, ...look);
  statements.splice(sourceAt, 0, ...look.map((s) => s.sql));
  return lockedTransaction(steps, { lockTimeoutMs: opts.lockTimeoutMs, why: opts.why }, [site]);
}
