import postgres from "postgres";
import pRetry, { AbortError } from "p-retry";
import { PgshiftError, explain, isConnectionLoss, sqlState } from "./errors.js";
import { quoteIdent, type QualifiedName } from "./names.js";

export type Sql = postgres.Sql<Record<string, never>>;
/** A connection inside a transaction opened by `transaction()` (a reserved connection of the pool). */
export type TxSql = postgres.ReservedSql<Record<string, never>>;
export type AnySql = Sql | TxSql | postgres.TransactionSql<Record<string, never>>;
export type Fragment = postgres.PendingQuery<postgres.Row[]>;

export interface ConnectOptions {
  /** postgres:// URL; when absent, DATABASE_URL, then libpq's PG* variables (PGHOST, PGPORT, PGUSER, ...). */
  url?: string | undefined;
  /** Pool size (connections). Default 1: each pgshift command works on one session. */
  max?: number;
  /** application_name shown in pg_stat_activity. */
  applicationName?: string;
  /**
   * Send and receive every value as PostgreSQL's text, untouched: no JSON.stringify of json values, no
   * Date round trip of timestamps (which would lose microseconds), no boolean coercion. The applier writes
   * the text pgoutput sent; the server converts it with each column's input function.
   */
  rawText?: boolean;
  /**
   * Called whenever one of the pool's connections closes (the server ended it, the network failed). Such a
   * pool also never closes connections by itself (no max_lifetime), so that every close means a loss.
   * postgres.js 3.4.9 may leave a connection that closed unable to connect again (its next query, even
   * reserve(), can wait for ever): code that must notice a loss at once gives up the pool here.
   */
  onClose?: () => void;
}

/**
 * How every pgshift session writes values as text, whatever the database's or role's settings: values are
 * read back in another session (the applier writes what the replication stream sent), so output must be
 * exact (extra_float_digits) and unambiguous (DateStyle, IntervalStyle). Also sent to the walsender.
 */
export const SESSION_FORMATS = { TimeZone: "UTC", DateStyle: "ISO, YMD", IntervalStyle: "postgres", extra_float_digits: "3" } as const;

const identity = (x: unknown) => x;
/** postgres.js type handlers that leave text as text (see ConnectOptions.rawText). */
const RAW_TEXT_TYPES = {
  jsonText: { to: 114, from: [114, 3802], serialize: identity, parse: identity },
  boolText: { to: 16, from: [16], serialize: identity, parse: identity },
  dateText: { to: 1184, from: [1082, 1114, 1184], serialize: identity, parse: identity },
  byteaText: { to: 17, from: [17], serialize: identity, parse: identity },
};

/**
 * Opens a postgres.js pool and checks that the server answers.
 * @throws PgshiftError with a one-line reason when the server cannot be reached or refuses the login.
 */
export async function connect(opts: ConnectOptions = {}): Promise<Sql> {
  const url = opts.url ?? process.env.DATABASE_URL;
  const closes = { count: 0 };
  const options: postgres.Options<Record<string, never>> = {
    max: opts.max ?? 1,
    onclose: () => {
      closes.count++;
      opts.onClose?.();
    },
    ...(opts.onClose ? { max_lifetime: null } : {}),
    onnotice: () => {},
    connect_timeout: 10,
    idle_timeout: 0,
    connection: { application_name: opts.applicationName ?? "pgshift", ...SESSION_FORMATS },
    ...(opts.rawText ? { types: RAW_TEXT_TYPES as unknown as Record<string, never>, fetch_types: false } : {}),
  };
  let sql: Sql;
  try {
    sql = (url ? postgres(url, options) : postgres(options)) as unknown as Sql;
  } catch (err) {
    throw new PgshiftError(`invalid connection URL: ${err instanceof Error ? err.message : String(err)}`, {
      hint: "use postgres://user:password@host:port/database",
    });
  }
  poolCloses.set(sql, closes);
  try {
    await sql`select 1`;
  } catch (err) {
    await sql.end({ timeout: 1 }).catch(() => {});
    throw explain(err);
  }
  return sql;
}

/**
 * A postgres:// URL for the server and database `sql` is connected to, with its user and password, so that
 * other connections (the replication stream) can reach the same place. SSL settings are not carried over.
 */
export function connectionUrl(sql: AnySql): string {
  const o = (sql as unknown as { options: { host: string[]; port: number[]; user: string; pass: unknown; database: string } }).options;
  const pass = typeof o.pass === "string" ? `:${encodeURIComponent(o.pass)}` : "";
  const host = o.host[0] ?? "localhost";
  const h = host.startsWith("/") ? "localhost" : host.includes(":") ? `[${host}]` : host;
  const socket = host.startsWith("/") ? `?host=${encodeURIComponent(host)}` : "";
  return `postgres://${encodeURIComponent(o.user)}${pass}@${h}:${o.port[0] ?? 5432}/${encodeURIComponent(o.database)}${socket}`;
}

/**
 * An identifier as a postgres.js fragment. Uses `sql(name)`; postgres.js splits names on dots,
 * so a name that contains a dot is quoted here (same rule as quote_ident: `"` doubled).
 */
export function ident(sql: AnySql, name: string): Fragment | postgres.Helper<string> {
  return name.includes(".") ? sql.unsafe(quoteIdent(name)) : sql(name);
}

/** `"schema"."table"` as a fragment. */
export function table(sql: AnySql, q: QualifiedName): Fragment {
  return sql`${ident(sql, q.schema)}.${ident(sql, q.name)}`;
}

/** Comma-separated identifiers `"a", "b"` as a fragment. */
export function identList(sql: AnySql, names: readonly string[], prefix?: string): Fragment {
  let out: Fragment | undefined;
  for (const n of names) {
    const one = prefix === undefined ? sql`${ident(sql, n)}` : sql`${ident(sql, prefix)}.${ident(sql, n)}`;
    out = out === undefined ? one : sql`${out}, ${one}`;
  }
  if (out === undefined) throw new Error("identList: empty list");
  return out;
}

/** `"a"::text as k0, "b"::text as k1`: key values as text, which round-trips exactly through the column's input function. */
export function textColumns(sql: AnySql, names: readonly string[], prefix?: string): Fragment {
  return joinFragments(
    sql,
    names.map((n, i) => (prefix === undefined ? sql`${ident(sql, n)}::text as ${sql(`k${i}`)}` : sql`${ident(sql, prefix)}.${ident(sql, n)}::text as ${sql(`k${i}`)}`)),
    sql`, `,
  );
}

/** Comma-separated parameters `$1, $2` (values sent as text, typed by the server from context). */
export function valueList(sql: AnySql, values: readonly (string | null)[]): Fragment {
  let out: Fragment | undefined;
  for (const v of values) out = out === undefined ? sql`${v}` : sql`${out}, ${v}`;
  if (out === undefined) throw new Error("valueList: empty list");
  return out;
}

/** Joins fragments with a separator fragment. */
export function joinFragments(sql: AnySql, parts: readonly Fragment[], sep: Fragment): Fragment {
  let out: Fragment | undefined;
  for (const p of parts) out = out === undefined ? p : sql`${out}${sep}${p}`;
  if (out === undefined) throw new Error("joinFragments: empty list");
  return out;
}

/** Connection closes seen by each pool (postgres.js `onclose`), to never write on a closed socket. */
const poolCloses = new WeakMap<object, { count: number }>();

/**
 * A test of whether `sql`'s pool has lost a connection since this call (postgres.js `onclose`). A query sent
 * on a reserved connection after it closed crashes the process (postgres.js writes to a null socket from a
 * timer), so code holding a reserved connection checks this before each statement and after a failure.
 * Always false for a pool not opened by connect().
 */
export function closedSince(sql: AnySql): () => boolean {
  const closes = poolCloses.get(sql);
  const before = closes?.count ?? 0;
  return () => closes !== undefined && closes.count !== before;
}

/**
 * Runs `fn` in one transaction on a reserved connection: BEGIN [options], fn, COMMIT; ROLLBACK on error.
 * Unlike postgres.js's sql.begin, it sends nothing after the connection is lost (sql.begin then still
 * queues a ROLLBACK on the dead socket and crashes the process with a TypeError), so a killed session
 * surfaces as an ordinary error the caller can report.
 * @param options e.g. "isolation level repeatable read read only".
 */
export async function transaction<T>(sql: Sql, fn: (tx: TxSql) => Promise<T>, options = ""): Promise<T> {
  const closed = closedSince(sql);
  const tx = await sql.reserve();
  let lost = false;
  try {
    await tx.unsafe(options ? `begin ${options.replace(/[^a-z ]/gi, "")}` : "begin");
    const result = await fn(tx);
    if (closed()) throw new PgshiftError("the connection to the server was lost before COMMIT", { hint: "re-run the command: the transaction was rolled back by the server" });
    await tx.unsafe("commit");
    return result;
  } catch (err) {
    lost = isConnectionLoss(err) || closed();
    if (!lost) await tx.unsafe("rollback").catch(() => {});
    throw err;
  } finally {
    // A lost connection was already taken back by the pool as closed; releasing it would put a dead
    // socket back among the open ones.
    if (!lost && !closed()) tx.release();
  }
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
 * Runs `fn` in a transaction with `SET LOCAL lock_timeout`, retrying with jittered exponential backoff
 * (p-retry, 50 ms to 2 s) when the lock is not granted in time (SQLSTATE 55P03) or a deadlock is
 * detected (40P01). Other errors are not retried. Keeps the application from queueing behind pgshift
 * for longer than the lock timeout: a waiting ACCESS EXCLUSIVE request blocks every later reader
 * (docs: "Explicit Locking", lock_timeout).
 * @throws PgshiftError (55P03) after the last attempt.
 */
export async function withLockRetry<T>(sql: Sql, fn: (tx: TxSql) => Promise<T>, opts: LockRetryOptions = {}): Promise<T> {
  const lockTimeoutMs = opts.lockTimeoutMs ?? 500;
  const retries = opts.retries ?? 20;
  try {
    return await pRetry(
      async () => {
        try {
          return await transaction(sql, async (tx) => {
            await tx`select set_config('lock_timeout', ${String(lockTimeoutMs) + "ms"}, true)`;
            return fn(tx);
          });
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
        hint: "the tables are busy (a long transaction holds a lock?); check pg_stat_activity, then retry or raise --lock-timeout / --retries",
        cause: err,
      });
    }
    throw err;
  }
}
