/**
 * Parallel workers of a backfill (`backfill --workers N`): N loops, each on a connection of its own, taking the
 * next unfinished key range (ranges.ts) until none is left; and the same for the deferred index builds (one
 * partition's chain of statements at a time per connection). Also the check of the number of workers against the
 * server's free connections.
 */
import { type AnySql, connect, connectionUrl, failOnConnectionLoss, type Sql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { runSteps, type Step } from "../plan/steps.js";
import { MAX_WORKERS } from "./ranges.js";

/**
 * Refuses a number of workers that is not an integer from 1 to MAX_WORKERS (64), or that is above what the server
 * leaves free: max_connections, less the slots reserved for superusers (superuser_reserved_connections) and for
 * roles with pg_use_reserved_connections (reserved_connections, PostgreSQL 16 and later; docs: "Connections and
 * Authentication"), less the client sessions open now, less `extra` (the stream's connections in logical mode).
 * Each worker opens one connection beside the command's own (and, for the index builds, as many).
 * @throws PgshiftError (exit 2) with a hint; nothing is changed.
 */
export async function checkWorkers(sql: AnySql, workers: number, extra: number): Promise<void> {
  if (!Number.isInteger(workers) || workers < 1 || workers > MAX_WORKERS)
    throw new PgshiftError(`--workers must be an integer from 1 to ${MAX_WORKERS}, got ${String(workers)}`, {
      hint: "each worker copies one key range at a time on a connection of its own; 2 to 8 is usual",
    });
  if (workers === 1) return;
  const rows = await sql.unsafe(
    "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int - " +
      "coalesce(current_setting('reserved_connections', true)::int, 0) - (SELECT count(*)::int FROM " +
      "pg_catalog.pg_stat_activity WHERE backend_type = 'client backend') AS free",
  );
  const free = Number(rows[0]?.free ?? 0) - extra;
  if (workers > free)
    throw new PgshiftError(
      `--workers ${workers} needs ${workers} more connections but the server leaves ${Math.max(0, free)} free ` +
        "(max_connections less the reserved slots and the sessions open now)",
      { hint: `run with --workers ${Math.max(1, free)} or fewer, or raise max_connections` },
    );
}

/**
 * Runs `work` on `items` with `n` connections of their own (opened from `sql`'s target, application_name
 * `pgshift backfill worker`): each takes the next item when it is done with one, and stops when `work` returns
 * false (stopped: Ctrl-C, maxBatches). When a worker fails (an error, its connection lost), `onFail` is called at
 * once (so that the others stop after their current batch), the others are waited for, and the first error is
 * thrown. The connections are closed at the end.
 * @throws the first worker's error.
 */
export async function runWorkers<T>(
  sql: Sql,
  n: number,
  items: readonly T[],
  work: (conn: Sql, item: T) => Promise<boolean>,
  onFail: () => void,
): Promise<void> {
  if (items.length === 0) return;
  const queue = [...items];
  const errors: unknown[] = [];
  let failed = false;
  const url = connectionUrl(sql);
  const one = async (no: number) => {
    const watch = failOnConnectionLoss(`backfill worker ${no}: its connection to the server was lost`);
    let conn: Sql | null = null;
    try {
      conn = await connect({ url, applicationName: "pgshift backfill worker", onClose: watch.onClose });
      const c = conn;
      for (;;) {
        if (failed) return;
        const item = queue.shift();
        if (item === undefined) return;
        if (!(await Promise.race([work(c, item), watch.lost]))) return;
      }
    } catch (err) {
      if (!failed) onFail();
      failed = true;
      errors.push(err);
    } finally {
      watch.end();
      await conn?.end({ timeout: 5 }).catch(() => {});
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(n, items.length)) }, (_, i) => one(i)));
  if (errors.length > 0) throw errors[0];
}

/**
 * Runs each chain of steps (runSteps, in order) with `n` connections at once: each connection takes the next
 * chain when it is done with one. A failure stops the taking of new chains; the first error is thrown once the
 * chains in flight are done.
 */
export async function runChains(sql: Sql, n: number, chains: readonly Step[][]): Promise<void> {
  await runWorkers(
    sql,
    Math.min(n, chains.length),
    chains,
    async (conn, chain) => {
      await runSteps(conn, chain);
      return true;
    },
    () => {},
  );
}
