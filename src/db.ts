import pRetry, { AbortError } from "p-retry";
import type { ClientConfig } from "pg";
import postgres from "postgres";
import {
  type ConnSettings,
  DEFAULT_CONNECT_TIMEOUT,
  describeServer,
  planTls,
  probeSsl,
  resolveConnSettings,
  type TlsPlan,
} from "./conninfo.js";
import { explain, isConnectionLoss, PgshiftError, sqlState } from "./errors.js";
import { log } from "./log.js";
import { type QualifiedName, quoteIdent } from "./names.js";

export type Sql = postgres.Sql<Record<string, never>>;
/** A connection inside a transaction opened by `transaction()` (a reserved connection of the pool). */
export type TxSql = postgres.ReservedSql<Record<string, never>>;
export type AnySql = Sql | TxSql | postgres.TransactionSql<Record<string, never>>;
export type Fragment = postgres.PendingQuery<postgres.Row[]>;

export interface ConnectOptions {
  /**
   * postgres:// URL, with libpq's parameters in its query string (sslmode, sslrootcert, connect_timeout, ...);
   * when absent, DATABASE_URL; either way completed as libpq does (service file, PG* variables, password file).
   */
  url?: string | undefined;
  /** Pool size (connections). Default 1: each pgshift command works on one session. */
  max?: number;
  /** application_name shown in pg_stat_activity (default: the user's application_name / PGAPPNAME, else "pgshift"). */
  applicationName?: string;
  /**
   * application_name when neither `applicationName` nor the user (URL, service, PGAPPNAME) sets one, as
   * libpq's fallback_application_name: each CLI command passes `pgshift <command>` so that status can say
   * which command holds a migration.
   */
  fallbackApplicationName?: string;
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
export const SESSION_FORMATS = {
  TimeZone: "UTC",
  DateStyle: "ISO, YMD",
  IntervalStyle: "postgres",
  extra_float_digits: "3",
} as const;

const identity = (x: unknown) => x;
/** postgres.js type handlers that leave text as text (see ConnectOptions.rawText). */
const RAW_TEXT_TYPES = {
  jsonText: { to: 114, from: [114, 3802], serialize: identity, parse: identity },
  boolText: { to: 16, from: [16], serialize: identity, parse: identity },
  dateText: { to: 1184, from: [1082, 1114, 1184], serialize: identity, parse: identity },
  byteaText: { to: 17, from: [17], serialize: identity, parse: identity },
};

/** Where and how a pool connects: the settings as resolved, and the TLS its connections use. */
interface Target {
  settings: ConnSettings;
  tls: TlsPlan;
}

/** The target of each pool opened by connect(), with the TLS it ended up using (see connectionUrl). */
const poolTargets = new WeakMap<object, Target>();
/** The targets behind the URLs connectionUrl() handed out: connect() and replicationConfig() reuse them as they are. */
const derivedTargets = new Map<string, Target>();

async function resolveTarget(url: string | undefined): Promise<Target> {
  const settings = await resolveConnSettings(url, process.env, (message) => log().warn(message));
  return { settings, tls: planTls(settings) };
}

/** prefer: TLS when the server offers it (asked with an SSLRequest of its own), else none. */
async function preferDecided(s: ConnSettings, tls: TlsPlan): Promise<TlsPlan> {
  if (tls.kind !== "prefer") return tls;
  const answer = await probeSsl(s.host, s.port, (s.connectTimeout || DEFAULT_CONNECT_TIMEOUT) * 1000).catch(
    () => "N" as const,
  );
  return answer === "S" ? { kind: "on", verify: "none", options: tls.options } : { kind: "off" };
}

/**
 * Opens a postgres.js pool and checks that the server answers, within the connect timeout.
 *
 * Where and how it connects follows libpq (see resolveConnSettings and planTls in conninfo.ts): the URL, else
 * DATABASE_URL, else nothing, completed by the service file, the PG* variables, the password file; TLS as
 * sslmode asks (prefer by default), a missing root certificate under verify-ca/verify-full refusing the
 * connection. A URL returned by connectionUrl() connects exactly as the pool it came from (same password,
 * same TLS).
 * @throws PgshiftError with a one-line reason when the settings are invalid, the server cannot be reached,
 *   does not answer as PostgreSQL within connect_timeout (default 10 s), refuses TLS that sslmode requires,
 *   presents a certificate that fails verification, or refuses the login. A server that cannot be reached
 *   or did not answer in time has a `cause` with a socket error code or CONNECT_TIMEOUT (isConnectionLoss).
 */
export async function connect(opts: ConnectOptions = {}): Promise<Sql> {
  const url = opts.url ?? process.env.DATABASE_URL;
  const target = (url !== undefined ? derivedTargets.get(url) : undefined) ?? (await resolveTarget(url));
  let tls = target.tls;
  // postgres.js's own "prefer" sends no client certificate: with one, ask the server first.
  if (tls.kind === "prefer" && tls.options.cert !== undefined) tls = await preferDecided(target.settings, tls);
  try {
    return await openPool(opts, target.settings, tls);
  } catch (err) {
    // allow: without TLS first, then with it when the server refused the plain connection (pg_hba hostssl).
    if (tls.kind === "allow" && sqlState((err as { cause?: unknown }).cause) === "28000") {
      return await openPool(opts, target.settings, { kind: "on", verify: "none", options: tls.options });
    }
    throw err;
  }
}

async function openPool(opts: ConnectOptions, s: ConnSettings, tls: TlsPlan): Promise<Sql> {
  const closes = { count: 0 };
  const options: postgres.Options<Record<string, never>> = {
    // Arrays: postgres.js splits a host string on ":" (an IPv6 address would be cut).
    host: [s.host] as unknown as string,
    port: [s.port] as unknown as number,
    ...(s.host.startsWith("/") ? { path: `${s.host}/.s.PGSQL.${s.port}` } : {}),
    user: s.user,
    ...(s.password !== undefined ? { pass: s.password } : {}),
    database: s.database,
    ssl: tls.kind === "off" || tls.kind === "allow" ? false : tls.kind === "prefer" ? "prefer" : tls.options,
    max: opts.max ?? 1,
    onclose: () => {
      closes.count++;
      opts.onClose?.();
    },
    ...(opts.onClose ? { max_lifetime: null } : {}),
    onnotice: () => {},
    connect_timeout: s.connectTimeout,
    idle_timeout: 0,
    connection: {
      application_name: opts.applicationName ?? s.applicationName ?? opts.fallbackApplicationName ?? "pgshift",
      ...SESSION_FORMATS,
    },
    ...(opts.rawText ? { types: RAW_TEXT_TYPES as unknown as Record<string, never>, fetch_types: false } : {}),
  };
  let sql: Sql;
  try {
    sql = postgres(options) as unknown as Sql;
  } catch (err) {
    throw new PgshiftError(`invalid connection settings: ${err instanceof Error ? err.message : String(err)}`, {
      hint: "use postgres://user:password@host:port/database",
    });
  }
  poolCloses.set(sql, closes);
  // postgres.js's connect_timeout covers one attempt, but it connects again for ever when a server that
  // is not PostgreSQL closes the connection: the whole wait is bounded here.
  let timer: NodeJS.Timeout | undefined;
  const first = sql<
    { tls: string }[]
  >`select case when coalesce((select ssl from pg_catalog.pg_stat_ssl where pid = pg_catalog.pg_backend_pid()), false) then 'on' else 'off' end as tls`;
  try {
    const deadline = new Promise<never>((_, reject) => {
      if (s.connectTimeout > 0)
        timer = setTimeout(
          () => reject(Object.assign(new Error("connect_timeout reached"), { code: "CONNECT_TIMEOUT" })),
          s.connectTimeout * 1000,
        );
    });
    const rows = await Promise.race([first, deadline]);
    const used: TlsPlan =
      tls.kind === "on"
        ? tls
        : rows[0]?.tls === "on"
          ? { kind: "on", verify: "none", options: "options" in tls ? tls.options : {} }
          : { kind: "off" };
    poolTargets.set(sql, { settings: s, tls: used });
    return sql;
  } catch (err) {
    first.catch(() => {});
    await sql.end({ timeout: 0 }).catch(() => {});
    throw await connectFailure(err, s, tls);
  } finally {
    clearTimeout(timer);
  }
}

/** Error codes of Node's TLS layer when the server's certificate fails verification. */
const CERT_ERROR = /CERT|SELF_SIGNED|UNABLE_TO_(GET|VERIFY)|ERR_TLS_CERT_ALTNAME_INVALID|HOSTNAME|ISSUER/;

/** One line for a failed connection attempt (see connect). */
async function connectFailure(err: unknown, s: ConnSettings, tls: TlsPlan): Promise<PgshiftError> {
  const server = describeServer(s);
  const code = (err as { code?: unknown } | null)?.code;
  const msg = err instanceof Error ? err.message : String(err);
  if (code === "CONNECT_TIMEOUT") {
    return new PgshiftError(
      `no answer from a PostgreSQL server at ${server} within ${s.connectTimeout} s (connect_timeout)`,
      {
        hint: "check the host and port (is PostgreSQL listening there?); PGCONNECT_TIMEOUT or connect_timeout=<seconds> in the URL waits longer",
        cause: err,
      },
    );
  }
  if (typeof code === "string" && CERT_ERROR.test(code)) {
    return new PgshiftError(
      `the certificate of the server at ${server} failed verification (sslmode=${s.sslmode}): ${msg}`,
      {
        hint: "check sslrootcert / PGSSLROOTCERT (the root certificate that signed the server's) and, for verify-full, that the host name is the one in the certificate",
        cause: err,
      },
    );
  }
  if (sqlState(err) === "28P01" && s.passwordFile) {
    return new PgshiftError(`authentication failed: ${msg} (password retrieved from file "${s.passwordFile}")`, {
      hint: "check the line for this host, port, database and user in the password file",
      cause: err,
    });
  }
  const lostEarly =
    code === "ECONNRESET" ||
    code === "CONNECTION_CLOSED" ||
    code === "EPIPE" ||
    /secure TLS connection|before the connection was established/i.test(msg);
  if (
    !s.host.startsWith("/") &&
    (lostEarly || (sqlState(err) === undefined && !(typeof code === "string" && /^E[A-Z]+$/.test(code))))
  ) {
    // The server hung up or sent something postgres.js could not read: ask it plainly what it is.
    const answer = await probeSsl(s.host, s.port, 2000).catch(() => undefined);
    if (typeof answer === "object") {
      return new PgshiftError(
        `the server at ${server} does not speak the PostgreSQL protocol (it answered "${answer.other}")`,
        {
          hint: "check the host and port: something else listens there",
          cause: Object.assign(new Error(msg), { code: "CONNECT_TIMEOUT" }),
        },
      );
    }
    if (answer === "N" && tls.kind === "on") {
      return new PgshiftError(`the server at ${server} does not support SSL, but sslmode=${s.sslmode} requires it`, {
        hint: "enable ssl on the server, or choose sslmode=prefer (or disable) knowingly",
        cause: err,
      });
    }
  }
  return explain(err);
}

/**
 * A postgres:// URL for the server and database `sql` is connected to, with its user and password, its TLS
 * settings (sslmode as the pool's connections use it: disable, require, verify-ca or verify-full; the
 * certificate files) and connect_timeout, so that other connections (the replication stream, sync's
 * sessions) reach the same place the same way. Within this process, connect() and replicationConfig() given
 * this URL reuse the pool's settings exactly (the certificates read once, the TLS decision of prefer kept).
 * For a pool not opened by connect(), the URL is built from its postgres.js options (no TLS settings).
 */
export function connectionUrl(sql: AnySql): string {
  const target = poolTargets.get(sql);
  if (target === undefined) return plainConnectionUrl(sql);
  const s = target.settings;
  const tls = target.tls;
  const socket = s.host.startsWith("/");
  const h = socket ? "" : s.host.includes(":") ? `[${s.host}]` : s.host;
  const q = new URLSearchParams();
  if (socket) q.set("host", s.host);
  q.set(
    "sslmode",
    tls.kind !== "on"
      ? "disable"
      : tls.verify === "full"
        ? "verify-full"
        : tls.verify === "ca"
          ? "verify-ca"
          : "require",
  );
  if (tls.kind === "on" && tls.verify !== "none" && s.sslrootcert !== undefined) q.set("sslrootcert", s.sslrootcert);
  if (tls.kind === "on" && s.sslcert !== undefined) q.set("sslcert", s.sslcert);
  if (tls.kind === "on" && s.sslkey !== undefined) q.set("sslkey", s.sslkey);
  q.set("connect_timeout", String(s.connectTimeout));
  const pass = s.password !== undefined ? `:${encodeURIComponent(s.password)}` : "";
  const url = `postgres://${encodeURIComponent(s.user)}${pass}@${h}:${s.port}/${encodeURIComponent(s.database)}?${q.toString()}`;
  derivedTargets.set(url, { settings: { ...s, applicationName: undefined }, tls });
  return url;
}

function plainConnectionUrl(sql: AnySql): string {
  const o = (
    sql as unknown as { options: { host: string[]; port: number[]; user: string; pass: unknown; database: string } }
  ).options;
  const pass = typeof o.pass === "string" ? `:${encodeURIComponent(o.pass)}` : "";
  const host = o.host[0] ?? "localhost";
  const h = host.startsWith("/") ? "localhost" : host.includes(":") ? `[${host}]` : host;
  const socket = host.startsWith("/") ? `?host=${encodeURIComponent(host)}` : "";
  return `postgres://${encodeURIComponent(o.user)}${pass}@${h}:${o.port[0] ?? 5432}/${encodeURIComponent(o.database)}${socket}`;
}

/**
 * node-postgres client settings (for pg-logical-replication's replication connection) that reach the server
 * the way connect() does for `url` (default DATABASE_URL, then the PG* variables): host, port, user, password
 * (password file included), database, TLS (sslmode prefer decided by asking the server; a URL from
 * connectionUrl() keeps its pool's decision) and connect_timeout as connectionTimeoutMillis.
 * @throws PgshiftError as connect() does for invalid settings or a missing root certificate.
 */
export async function replicationConfig(url?: string): Promise<ClientConfig> {
  const u = url ?? process.env.DATABASE_URL;
  const target = (u !== undefined ? derivedTargets.get(u) : undefined) ?? (await resolveTarget(u));
  const s = target.settings;
  const tls = await preferDecided(s, target.tls);
  return {
    host: s.host,
    port: s.port,
    user: s.user,
    ...(s.password !== undefined ? { password: s.password } : {}),
    database: s.database,
    ssl: tls.kind === "on" ? tls.options : false,
    connectionTimeoutMillis: s.connectTimeout * 1000,
  };
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
    names.map((n, i) =>
      prefix === undefined
        ? sql`${ident(sql, n)}::text as ${sql(`k${i}`)}`
        : sql`${ident(sql, prefix)}.${ident(sql, n)}::text as ${sql(`k${i}`)}`,
    ),
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
    if (closed())
      throw new PgshiftError("the connection to the server was lost before COMMIT", {
        hint: "re-run the command: the transaction was rolled back by the server",
      });
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
export async function withLockRetry<T>(
  sql: Sql,
  fn: (tx: TxSql) => Promise<T>,
  opts: LockRetryOptions = {},
): Promise<T> {
  const lockTimeoutMs = opts.lockTimeoutMs ?? 500;
  const retries = opts.retries ?? 20;
  try {
    return await pRetry(
      async () => {
        try {
          return await transaction(sql, async (tx) => {
            await tx`select set_config('lock_timeout', ${`${String(lockTimeoutMs)}ms`}, true)`;
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
