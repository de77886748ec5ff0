/**
 * The postgres.js adapter: every pgshift session is a postgres.js pool opened here, and the workarounds for
 * postgres.js's behaviours live here, each naming its entry in UPSTREAM (upstream.ts), where a test checks
 * that the behaviour is still there. src/db.ts re-exports what the rest of pgshift uses.
 */
import postgres from "postgres";
import { explain, isConnectionLoss, PgshiftError, sqlState } from "../errors.js";
import { log } from "../log.js";
import { quoteIdent } from "../names.js";
import {
  type ConnSettings,
  DEFAULT_CONNECT_TIMEOUT,
  describeServer,
  planTls,
  probeSsl,
  resolveConnSettings,
  type TlsPlan,
} from "./conninfo.js";

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
   * A pool that lost a connection may never answer again (UPSTREAM.postgresJsReconnectsForEverOnCleanClose):
   * code that must notice a loss at once gives up the pool here (see failOnConnectionLoss).
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
  // UPSTREAM.postgresJsTlsObjectNeverFallsBack: prefer with a client certificate asks the server first.
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
    // UPSTREAM.postgresJsSplitsHostOnColon: arrays are taken as they are.
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
  // UPSTREAM.postgresJsReconnectsForEverOnCleanClose: connect_timeout does not bound the wait when the server
  // (or something else listening there) closes the connection while it starts; the whole wait is bounded here.
  let timer: NodeJS.Timeout | undefined;
  const first = sql<
    { tls: string }[]
  >`select case when coalesce((select ssl from pg_catalog.pg_stat_ssl where pid = pg_catalog.pg_backend_pid()), false)
            then 'on' else 'off' end as tls`;
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
        hint:
          "check the host and port (is PostgreSQL listening there?); " +
          "PGCONNECT_TIMEOUT or connect_timeout=<seconds> in the URL waits longer",
        cause: err,
      },
    );
  }
  if (typeof code === "string" && CERT_ERROR.test(code)) {
    return new PgshiftError(
      `the certificate of the server at ${server} failed verification (sslmode=${s.sslmode}): ${msg}`,
      {
        hint:
          "check sslrootcert / PGSSLROOTCERT (the root certificate that signed the server's) and, for " +
          "verify-full, that the host name is the one in the certificate",
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
  const db = encodeURIComponent(s.database);
  const url = `postgres://${encodeURIComponent(s.user)}${pass}@${h}:${s.port}/${db}?${q.toString()}`;
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
  const db = encodeURIComponent(o.database);
  return `postgres://${encodeURIComponent(o.user)}${pass}@${h}:${o.port[0] ?? 5432}/${db}${socket}`;
}

/**
 * Where and how `url` (default DATABASE_URL, then the PG* variables) connects, as connect() would: the settings
 * and the TLS (sslmode prefer decided by asking the server; a URL from connectionUrl() keeps its pool's decision).
 * For the replication connection (replication.ts), which node-postgres opens.
 * @throws PgshiftError as connect() does for invalid settings or a missing root certificate.
 */
export async function resolvedTarget(url?: string): Promise<{ settings: ConnSettings; tls: TlsPlan }> {
  const u = url ?? process.env.DATABASE_URL;
  const target = (u !== undefined ? derivedTargets.get(u) : undefined) ?? (await resolveTarget(u));
  return { settings: target.settings, tls: await preferDecided(target.settings, target.tls) };
}

/**
 * An identifier as a postgres.js fragment: `sql(name)`, except for a name that contains a dot, quoted here (same
 * rule as quote_ident: `"` doubled), as postgres.js would split it (UPSTREAM.postgresJsSplitsIdentifiersOnDots).
 */
export function ident(sql: AnySql, name: string): Fragment | postgres.Helper<string> {
  return name.includes(".") ? sql.unsafe(quoteIdent(name)) : sql(name);
}

/** Connection closes seen by each pool (postgres.js `onclose`), to never write on a closed socket. */
const poolCloses = new WeakMap<object, { count: number }>();

/**
 * A test of whether `sql`'s pool has lost a connection since this call (postgres.js `onclose`). A statement
 * sent on a reserved connection after it closed, or its release(), crashes the process
 * (UPSTREAM.postgresJsWritesOnClosedReservedConnection), so code holding a reserved connection checks this
 * before each statement and after a failure, and gives a lost connection up without releasing it.
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
 * sends a ROLLBACK on the dead socket and crashes the process, UPSTREAM.postgresJsWritesOnClosedReservedConnection),
 * so a killed session surfaces as an ordinary error the caller can report.
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

/** A watch on a pool's connections (see failOnConnectionLoss). */
export interface LossWatch {
  /** To give connect() as ConnectOptions.onClose. */
  onClose: () => void;
  /** Rejects with an error of code CONNECTION_CLOSED (isConnectionLoss) at the first close, unless ended. */
  lost: Promise<never>;
  /** Stops watching (before the pool is ended on purpose). */
  end: () => void;
}

/**
 * A watch that turns the first lost connection of a pool into an error, whatever the pool's user waits for:
 * a pool that lost a connection may leave its next statement waiting for ever
 * (UPSTREAM.postgresJsReconnectsForEverOnCleanClose), and a command that hangs is worse for an operator than
 * one that says "run me again". Race the work against `lost`; call end() before ending the pool.
 * @param what the message of the error, e.g. "the command's session was lost".
 */
export function failOnConnectionLoss(what: string): LossWatch {
  let ended = false;
  let fail: (err: Error) => void = () => {};
  const lost = new Promise<never>((_, reject) => (fail = reject));
  lost.catch(() => {});
  return {
    onClose: () => {
      if (!ended) fail(Object.assign(new Error(what), { code: "CONNECTION_CLOSED" }));
    },
    lost,
    end: () => {
      ended = true;
    },
  };
}
