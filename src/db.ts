/**
 * The face of the driver adapter (src/driver/) for the rest of pgshift: sessions, transactions and identifiers
 * come from driver/postgres.ts (postgres.js and the workarounds for it), the replication connection's settings
 * from driver/replication.ts; and the lock-timeout retry every locking transaction goes through.
 *
 * Statements are built one way (src/sql/statement.ts): SQL text, identifiers quoted by quoteIdent /
 * quoteQualified, literals by quoteLiteral, longer statements from `.sql` templates, values as `$n` bind
 * parameters, sent with `sql.unsafe(text, values)` (prepared where it runs per batch or per change); that text
 * is what `plan` and `--dry-run` print. The one exception is a read with bound values only and no identifier
 * (`` sql`select ... where id = ${id}` ``: a catalog look, the migration row): a postgres.js tagged template,
 * which binds its values the same way, builds nothing. `table` and `ident` (postgres.js fragments) remain for
 * the reads of migration/plan.ts not yet moved to text, and for tests.
 */
import pRetry, { AbortError } from "p-retry";
import { type AnySql, type Fragment, ident, type Sql, type TxSql, transaction } from "./driver/postgres.js";
import { PgshiftError, sqlState } from "./errors.js";
import type { QualifiedName } from "./names.js";

export {
  type AnySql,
  type ConnectOptions,
  closedSince,
  connect,
  connectionUrl,
  type Fragment,
  failOnConnectionLoss,
  ident,
  type Sql,
  type TxSql,
  transaction,
} from "./driver/postgres.js";
export { replicationConfig } from "./driver/replication.js";

/** `"schema"."table"` as a postgres.js fragment (see the module's comment: not for new code). */
export function table(sql: AnySql, q: QualifiedName): Fragment {
  return sql`${ident(sql, q.schema)}.${ident(sql, q.name)}`;
}

/**
 * lock_timeout of each attempt to lock a table the application uses, ms, when none is given (`--lock-timeout`).
 * Short on purpose: while pgshift's ACCESS EXCLUSIVE request waits, every later statement on the table waits
 * behind it ("Explicit Locking"), so one failed attempt costs the application at most this much; 50 ms is
 * above the few ms an application's write transaction usually holds its lock (the request waits for those in
 * flight) and below what a person notices. See docs/design.md, "Lock timeout and retries".
 */
export const DEFAULT_LOCK_TIMEOUT_MS = 50;
/** Attempts after the first, when none is given (`--retries`). */
export const DEFAULT_LOCK_RETRIES = 100;
/** The longest all attempts together may take, ms (then the last error is reported). */
export const DEFAULT_LOCK_DEADLINE_MS = 60_000;
/** The pause between attempts: from 20 ms, times 1.5 after each, at most 1 s, each times a random 1 to 2. */
export const LOCK_BACKOFF = { minTimeout: 20, maxTimeout: 1000, factor: 1.5, randomize: true } as const;

export interface LockRetryOptions {
  /** lock_timeout for each attempt, in ms (default DEFAULT_LOCK_TIMEOUT_MS, 50). */
  lockTimeoutMs?: number;
  /** Attempts after the first one (default DEFAULT_LOCK_RETRIES, 100). */
  retries?: number;
  /** The longest all attempts may take together, ms (default DEFAULT_LOCK_DEADLINE_MS, 60,000). */
  deadlineMs?: number;
  /** Called after each failed attempt that will be tried again (attempt number from 1, its error). */
  onRetry?: (attempt: number, error: unknown) => void;
  /** Called after every failed attempt, the last one included (its error). */
  onFailure?: (error: unknown) => void;
  /** Other errors worth another attempt (besides lock timeouts, deadlocks and errors marked `lockRetry`). */
  retryOn?: (error: unknown) => boolean;
}

/** Errors a lock retry tries again on its own: lock not granted (55P03), deadlock (40P01), `lockRetry` marked. */
function lockRetryable(err: unknown): boolean {
  const code = sqlState(err);
  return code === "55P03" || code === "40P01" || (err as { lockRetry?: unknown } | null)?.lockRetry === true;
}

/**
 * Runs `attempt` (one transaction that sets `lock_timeout` to `lockTimeoutMs`), again after a jittered pause
 * (LOCK_BACKOFF: 20 ms growing to 1 s) when the lock is not granted in time (SQLSTATE 55P03), a deadlock is
 * detected (40P01), the look before the lock found a session not to queue behind (an error marked `lockRetry`,
 * src/locks/holders.ts), or on an error `opts.retryOn` accepts; `opts.retries` times at most (default 100) and
 * within `opts.deadlineMs` in all (default 60 s). Other errors end it at once. Shared by withLockRetry and the
 * plan runner (runTransaction, plan/steps.ts).
 * @throws PgshiftError (55P03, or naming the sessions that held the lock) after the last attempt; any other
 *   error as is.
 */
export async function retryOnLockTimeout<T>(
  attempt: () => Promise<T>,
  lockTimeoutMs: number,
  opts: Omit<LockRetryOptions, "lockTimeoutMs"> = {},
): Promise<T> {
  const retries = opts.retries ?? DEFAULT_LOCK_RETRIES;
  let attempts = 0;
  try {
    return await pRetry(
      async () => {
        attempts++;
        try {
          return await attempt();
        } catch (err) {
          opts.onFailure?.(err);
          if (lockRetryable(err) || opts.retryOn?.(err)) throw err;
          throw new AbortError(err instanceof Error ? err : new Error(String(err)));
        }
      },
      {
        retries,
        maxRetryTime: opts.deadlineMs ?? DEFAULT_LOCK_DEADLINE_MS,
        ...LOCK_BACKOFF,
        onFailedAttempt: (ctx) => {
          if (ctx.retriesLeft > 0) opts.onRetry?.(ctx.attemptNumber, ctx.error);
        },
      },
    );
  } catch (err) {
    const code = sqlState(err);
    if (code === "55P03") {
      throw new PgshiftError(`could not lock the tables within ${lockTimeoutMs} ms after ${attempts} attempts`, {
        hint:
          "the tables are busy (a long transaction holds a lock?); check pg_stat_activity, then retry or raise " +
          "--lock-timeout / --retries",
        cause: err,
      });
    }
    if ((err as { lockRetry?: unknown } | null)?.lockRetry === true) {
      throw new PgshiftError(
        `could not lock the tables after ${attempts} attempts: ${err instanceof Error ? err.message : String(err)}`,
        {
          hint:
            "end that transaction (COMMIT, or SELECT pg_terminate_backend(pid)) and run the command again, or let " +
            "pgshift end it: --terminate-holders-after <ms>",
          cause: err,
        },
      );
    }
    throw err;
  }
}

/**
 * Runs `fn` in a transaction with `SET LOCAL lock_timeout`, retried by retryOnLockTimeout. Keeps the application
 * from queueing behind pgshift for longer than the lock timeout: a waiting ACCESS EXCLUSIVE request blocks every
 * later reader (docs: "Explicit Locking", lock_timeout).
 * @throws PgshiftError (55P03) after the last attempt.
 */
export async function withLockRetry<T>(
  sql: Sql,
  fn: (tx: TxSql) => Promise<T>,
  opts: LockRetryOptions = {},
): Promise<T> {
  const lockTimeoutMs = opts.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  return retryOnLockTimeout(
    () =>
      transaction(sql, async (tx) => {
        await tx`select set_config('lock_timeout', ${`${String(lockTimeoutMs)}ms`}, true)`;
        return fn(tx);
      }),
    lockTimeoutMs,
    opts,
  );
}
