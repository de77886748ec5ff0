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

export interface LockRetryOptions {
  /** lock_timeout for each attempt, in ms (default 500). */
  lockTimeoutMs?: number;
  /** Attempts after the first one (default 20). */
  retries?: number;
  /** Called after each failed attempt that will be tried again (attempt number from 1, its error). */
  onRetry?: (attempt: number, error: unknown) => void;
  /** Other errors worth another attempt (besides lock timeouts and deadlocks). */
  retryOn?: (error: unknown) => boolean;
}

/**
 * Runs `attempt` (one transaction that sets `lock_timeout` to `lockTimeoutMs`), again with jittered exponential
 * backoff (p-retry, 50 ms to 2 s) when the lock is not granted in time (SQLSTATE 55P03) or a deadlock is detected
 * (40P01), or on an error `opts.retryOn` accepts; `opts.retries` times at most (default 20). Other errors end it
 * at once. Shared by withLockRetry and the plan runner (runTransaction, plan/steps.ts).
 * @throws PgshiftError (55P03) after the last attempt; any other error as is.
 */
export async function retryOnLockTimeout<T>(
  attempt: () => Promise<T>,
  lockTimeoutMs: number,
  opts: Omit<LockRetryOptions, "lockTimeoutMs"> = {},
): Promise<T> {
  const retries = opts.retries ?? 20;
  try {
    return await pRetry(
      async () => {
        try {
          return await attempt();
        } catch (err) {
          const code = sqlState(err);
          if (code === "55P03" || code === "40P01" || opts.retryOn?.(err)) throw err;
          throw new AbortError(err instanceof Error ? err : new Error(String(err)));
        }
      },
      {
        retries,
        minTimeout: 50,
        maxTimeout: 2000,
        factor: 1.6,
        randomize: true,
        onFailedAttempt: (ctx) => {
          if (ctx.retriesLeft > 0) opts.onRetry?.(ctx.attemptNumber, ctx.error);
        },
      },
    );
  } catch (err) {
    const code = sqlState(err);
    if (code === "55P03") {
      throw new PgshiftError(`could not lock the tables within ${lockTimeoutMs} ms after ${retries + 1} attempts`, {
        hint:
          "the tables are busy (a long transaction holds a lock?); check pg_stat_activity, then retry or raise " +
          "--lock-timeout / --retries",
        cause: err,
      });
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
  const lockTimeoutMs = opts.lockTimeoutMs ?? 500;
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
