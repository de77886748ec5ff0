import { existsSync, readFileSync, type Stats, statSync } from "node:fs";
import { connect as netConnect } from "node:net";
import { homedir, userInfo } from "node:os";
import { join } from "node:path";
import type { ConnectionOptions } from "node:tls";
import { parse as parseConnectionString } from "pg-connection-string";
import pgpass from "pgpass/lib/helper.js";
import { PgshiftError } from "../errors.js";

/**
 * Connection settings taken the way libpq (and so psql) takes them: the URL's parameters first, then those of
 * the service named by `service` / PGSERVICE, then the PG* environment variables, then the defaults; the
 * password, when none was given, from the password file. PostgreSQL documentation: "Connection Strings",
 * "Parameter Key Words", "Environment Variables", "The Connection Service File", "The Password File" (libpq).
 */

/** libpq's sslmode values, weakest first ("SSL Support", table "SSL Mode Descriptions"). */
export const SSL_MODES = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] as const;
export type SslMode = (typeof SSL_MODES)[number];

/** libpq's connection parameters pgshift takes, with the environment variable each falls back to. */
const PARAMS = {
  host: "PGHOST",
  port: "PGPORT",
  dbname: "PGDATABASE",
  user: "PGUSER",
  password: "PGPASSWORD",
  passfile: "PGPASSFILE",
  service: "PGSERVICE",
  sslmode: "PGSSLMODE",
  sslrootcert: "PGSSLROOTCERT",
  sslcert: "PGSSLCERT",
  sslkey: "PGSSLKEY",
  connect_timeout: "PGCONNECT_TIMEOUT",
  application_name: "PGAPPNAME",
} as const;
type Param = keyof typeof PARAMS;
const isParam = (k: string): k is Param => Object.hasOwn(PARAMS, k);

/** The wait for a server to answer when nothing says otherwise, in seconds (libpq's own default is no limit). */
export const DEFAULT_CONNECT_TIMEOUT = 10;

/** Where libpq builds commonly put the server's Unix socket (the compiled-in DEFAULT_PGSOCKET_DIR). */
const SOCKET_DIRS = ["/var/run/postgresql", "/tmp"];

/** Everything needed to open a connection, resolved. */
export interface ConnSettings {
  /** Host name or IP address; a path (starting with `/`) is the directory of a Unix socket. */
  host: string;
  port: number;
  user: string;
  /** Undefined when none was given anywhere (the server may not ask for one). */
  password: string | undefined;
  /** The password file the password was read from, if it was (for the message when the login fails). */
  passwordFile: string | undefined;
  database: string;
  sslmode: SslMode;
  /** Path of the root certificate file, "system" (the system's trusted roots), or undefined: ~/.postgresql/root.crt. */
  sslrootcert: string | undefined;
  /** Client certificate and key paths, or undefined: ~/.postgresql/postgresql.crt and .key. */
  sslcert: string | undefined;
  sslkey: string | undefined;
  /** Seconds to wait for the server to be ready; 0: no limit. */
  connectTimeout: number;
  /** application_name the user asked for (URL, service, PGAPPNAME), if any. */
  applicationName: string | undefined;
  /** The service the settings were completed from, if any. */
  service: string | undefined;
}

/** Reports a warning that does not stop the connection (a password file ignored), as libpq prints one on stderr. */
export type Warn = (message: string) => void;

function homeDir(env: NodeJS.ProcessEnv): string {
  return env.HOME && env.HOME !== "" ? env.HOME : homedir();
}

function invalid(
  message: string,
  hint = "see pgshift's docs/connecting.md for the parameters pgshift takes",
): PgshiftError {
  return new PgshiftError(message, { hint });
}

/**
 * The parameters written in a postgres:// URL: host, port, user, password and database from the URL itself
 * (pg-connection-string parses it: percent-decoding, `[::1]`, an empty host), and libpq's parameters from its
 * query string (`?sslmode=verify-full&sslrootcert=/path`). A parameter libpq does not know, or that pgshift
 * does not take, is refused, as psql refuses it, rather than silently ignored.
 * @throws PgshiftError for a URL that is not postgres:// or postgresql://, cannot be parsed, or has such a parameter.
 */
export function parseUrlParams(url: string): Partial<Record<Param, string>> {
  if (!/^postgres(ql)?:\/\//i.test(url))
    throw invalid(
      "the connection URL must start with postgres:// or postgresql://",
      "use postgres://user:password@host:port/database?sslmode=...",
    );
  const q = url.indexOf("?");
  const query = new URLSearchParams(q < 0 ? "" : url.slice(q + 1));
  const out: Partial<Record<Param, string>> = {};
  for (const [k, v] of query) {
    if (!isParam(k)) {
      throw invalid(
        `unsupported connection parameter "${k}" in the URL`,
        `pgshift takes libpq's ${Object.keys(PARAMS).join(", ")}; remove "${k}"`,
      );
    }
    out[k] = v;
  }
  // UPSTREAM.pgConnectionStringReadsCertificateFiles (upstream.ts): it only gets the URL without its query
  // (the query was read above).
  let parsed: ReturnType<typeof parseConnectionString>;
  try {
    parsed = parseConnectionString(q < 0 ? url : url.slice(0, q));
  } catch (err) {
    throw invalid(
      `invalid connection URL: ${err instanceof Error ? err.message : String(err)}`,
      "use postgres://user:password@host:port/database",
    );
  }
  const set = (k: Param, v: string | null | undefined) => {
    if (out[k] === undefined && v !== undefined && v !== null && v !== "") out[k] = v;
  };
  set("host", parsed.host);
  set("port", parsed.port);
  set("user", parsed.user);
  set("password", parsed.password);
  set("dbname", parsed.database);
  return out;
}

/**
 * The sections of a connection service file: `[name]` lines start a service, `key=value` lines give its
 * parameters, `#` starts a comment line ("The Connection Service File").
 * @throws PgshiftError naming the file and line for a line that is neither, or a parameter pgshift does not take.
 */
export function parseServiceFile(text: string, file: string): Map<string, Partial<Record<Param, string>>> {
  const services = new Map<string, Partial<Record<Param, string>>>();
  let current: Partial<Record<Param, string>> | undefined;
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    const section = /^\[(.+)\]$/.exec(line);
    if (section) {
      current = {};
      services.set(section[1]!, current);
      return;
    }
    const eq = line.indexOf("=");
    if (eq <= 0) throw invalid(`syntax error in service file "${file}", line ${i + 1}`);
    const key = line.slice(0, eq).trim();
    const value = line.slice(eq + 1).trim();
    if (key === "service")
      throw invalid(`nested service specifications not supported in service file "${file}", line ${i + 1}`);
    if (!isParam(key))
      throw invalid(`unsupported connection parameter "${key}" in service file "${file}", line ${i + 1}`);
    if (current === undefined)
      throw invalid(`syntax error in service file "${file}", line ${i + 1}: a parameter outside any [service]`);
    current[key] = value;
  });
  return services;
}

function readIfExists(file: string): string | undefined {
  try {
    return readFileSync(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw invalid(`cannot read service file "${file}": ${(err as Error).message}`);
  }
}

/**
 * The parameters of service `name`: from PGSERVICEFILE (default ~/.pg_service.conf), else from
 * pg_service.conf in PGSYSCONFDIR (default /etc/postgresql-common, where Debian's libpq looks).
 * @throws PgshiftError when neither file defines it.
 */
export function serviceParams(name: string, env: NodeJS.ProcessEnv = process.env): Partial<Record<Param, string>> {
  const userFile = env.PGSERVICEFILE || join(homeDir(env), ".pg_service.conf");
  const sysFile = join(env.PGSYSCONFDIR || "/etc/postgresql-common", "pg_service.conf");
  for (const file of [userFile, sysFile]) {
    const text = readIfExists(file);
    if (text === undefined) continue;
    const found = parseServiceFile(text, file).get(name);
    if (found) return found;
  }
  throw invalid(
    `definition of service "${name}" not found`,
    `define [${name}] in ${userFile} (PGSERVICEFILE) or ${sysFile}, or name another service`,
  );
}

/**
 * libpq's check of a password file: a plain file with no group or world access, else ignored with a warning
 * ("The Password File": "If the permissions are less strict than this, the file will be ignored").
 */
function usablePasswordFile(file: string, warn: Warn): boolean {
  let st: Stats;
  try {
    st = statSync(file);
  } catch {
    return false;
  }
  if (!st.isFile()) {
    warn(`password file "${file}" is not a plain file`);
    return false;
  }
  if (process.platform !== "win32" && (st.mode & 0o077) !== 0) {
    warn(`password file "${file}" has group or world access; permissions should be u=rw (0600) or less`);
    return false;
  }
  return true;
}

/**
 * The password of the first line of `file` that matches host, port, database and user (each field literal or
 * `*`; `localhost` also matches a connection through the default Unix socket directory), parsed by the
 * `pgpass` package. Undefined when the file is missing, unusable (see usablePasswordFile) or has no match.
 */
export async function passwordFromFile(
  file: string,
  s: Pick<ConnSettings, "host" | "port" | "database" | "user">,
  warn: Warn,
): Promise<string | undefined> {
  if (!usablePasswordFile(file, warn)) return undefined;
  const host = s.host === "" || SOCKET_DIRS.includes(s.host.replace(/\/+$/, "")) ? "localhost" : s.host;
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch {
    return undefined;
  }
  // The pgpass package parses and matches each line; the first match wins, as in libpq (its own reader lets a
  // later matching line win: UPSTREAM.pgpassLaterLineWins in upstream.ts). Comment lines start with #.
  const conn = { host, port: s.port, database: s.database, user: s.user };
  for (const line of text.split(/\r?\n/)) {
    if (line.startsWith("#")) continue;
    const entry = pgpass.parseLine(line);
    if (entry && pgpass.isValidEntry(entry) && pgpass.match(conn, entry)) return entry.password;
  }
  return undefined;
}

function defaultHost(port: number): string {
  for (const dir of SOCKET_DIRS) if (existsSync(join(dir, `.s.PGSQL.${port}`))) return dir;
  return "localhost";
}

/**
 * Resolves where and how to connect, as psql would: `url` (when given) first, then the service it or
 * PGSERVICE names, then PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGPASSFILE, PGSSLMODE, PGSSLROOTCERT,
 * PGSSLCERT, PGSSLKEY, PGCONNECT_TIMEOUT, PGAPPNAME from `env`, then the defaults (a Unix socket in
 * /var/run/postgresql or /tmp if there is one, else localhost; port 5432; the OS user; a database named
 * after the user; sslmode prefer; connect_timeout 10 s, pgshift's choice where libpq waits for ever). With
 * no password given, the password file (passfile, PGPASSFILE, ~/.pgpass) is read; one readable by group or
 * others is ignored with a warning through `warn`, as libpq does.
 * @throws PgshiftError (one line and a hint) for an invalid value: an unknown sslmode, a port or
 *   connect_timeout that is not an integer, several hosts, a service not defined, sslrootcert=system with
 *   an sslmode weaker than verify-full (PostgreSQL 16's rule).
 */
export async function resolveConnSettings(
  url: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
  warn: Warn = () => {},
): Promise<ConnSettings> {
  const p: Partial<Record<Param, string>> = url ? parseUrlParams(url) : {};
  const service = p.service ?? (env.PGSERVICE || undefined);
  if (service) for (const [k, v] of Object.entries(serviceParams(service, env))) p[k as Param] ??= v;
  for (const [k, envVar] of Object.entries(PARAMS) as [Param, string][]) {
    if (p[k] === undefined && env[envVar] !== undefined && env[envVar] !== "") p[k] = env[envVar];
  }

  const portText = p.port ?? "5432";
  if (!/^\d+$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535)
    throw invalid(`invalid port number: "${portText}"`);
  const port = Number(portText);
  if (p.host?.includes(",") || p.port?.includes(","))
    throw invalid(`several hosts are not supported: "${p.host}"`, "give one host and port");
  const host = p.host ?? defaultHost(port);
  const user = p.user ?? userInfo().username;
  const database = p.dbname ?? user;

  const sslrootcert = p.sslrootcert;
  const sslmodeText = p.sslmode ?? (sslrootcert === "system" ? "verify-full" : "prefer");
  if (!(SSL_MODES as readonly string[]).includes(sslmodeText))
    throw invalid(`invalid sslmode value: "${sslmodeText}"`, `use one of ${SSL_MODES.join(", ")}`);
  const sslmode = sslmodeText as SslMode;
  if (sslrootcert === "system" && sslmode !== "verify-full") {
    throw invalid(
      `weak sslmode "${sslmode}" may not be used with sslrootcert=system (use "verify-full")`,
      "the system's trusted roots are only meaningful with the host name checked",
    );
  }

  const timeoutText = p.connect_timeout ?? String(DEFAULT_CONNECT_TIMEOUT);
  if (!/^\s*-?\d+\s*$/.test(timeoutText))
    throw invalid(
      `invalid integer value "${timeoutText}" for connection option "connect_timeout"`,
      "connect_timeout is in whole seconds; 0 waits for ever",
    );
  const t = Number(timeoutText);
  // libpq: 0 or less waits for ever; less than 2 s is raised to 2 s.
  const connectTimeout = t <= 0 ? 0 : Math.max(2, t);

  let password = p.password;
  let passwordFile: string | undefined;
  if (password === undefined) {
    const file = p.passfile ?? join(homeDir(env), ".pgpass");
    password = await passwordFromFile(file, { host, port, database, user }, warn);
    if (password !== undefined) passwordFile = file;
  }
  return {
    host,
    port,
    user,
    password,
    passwordFile,
    database,
    sslmode,
    sslrootcert,
    sslcert: p.sslcert,
    sslkey: p.sslkey,
    connectTimeout,
    applicationName: p.application_name,
    service,
  };
}

/** How a connection uses TLS, decided from sslmode and the certificate files. */
export type TlsPlan =
  /** No TLS: sslmode disable, or a Unix socket (libpq never uses TLS there). */
  | { kind: "off" }
  /** TLS required, with `options` for tls.connect (root, client certificate, checks). */
  | { kind: "on"; verify: "none" | "ca" | "full"; options: ConnectionOptions }
  /** prefer: TLS when the server offers it, else none; allow: none unless the server demands it. Never verified. */
  | { kind: "prefer" | "allow"; options: ConnectionOptions };

/**
 * The TLS a connection to `s` uses, libpq's rules ("SSL Support": "Client Verification of Server
 * Certificates", "Client Certificates", table "SSL Mode Descriptions"):
 * - disable, or a Unix socket: none. allow, prefer: unverified TLS if the server wants or offers it.
 * - require: TLS, unverified, unless a root certificate file exists (sslrootcert, default
 *   ~/.postgresql/root.crt): then verified as verify-ca is.
 * - verify-ca: the server's certificate must chain to the root certificate; verify-full: and name the host.
 *   The root certificate file must exist (or sslrootcert=system: the system's trusted roots): a missing one
 *   refuses the connection, never a weaker one.
 * - A client certificate (sslcert, default ~/.postgresql/postgresql.crt) is sent when its file exists; its key
 *   (sslkey, default ~/.postgresql/postgresql.key) must then exist and not be readable by group or others
 *   (0640 allowed when root owns it).
 * @throws PgshiftError (one line, a hint) for a missing root certificate under verify-ca/verify-full, a
 *   certificate without its key, a key readable by others, a file that cannot be read.
 */
export function planTls(s: ConnSettings, env: NodeJS.ProcessEnv = process.env): TlsPlan {
  if (s.sslmode === "disable" || s.host.startsWith("/")) return { kind: "off" };
  const dir = join(homeDir(env), ".postgresql");
  const read = (file: string, what: string): string => {
    try {
      return readFileSync(file, "utf8");
    } catch (err) {
      throw invalid(`could not read ${what} "${file}": ${(err as Error).message}`);
    }
  };
  const client: ConnectionOptions = {};
  const certFile = s.sslcert ?? join(dir, "postgresql.crt");
  if (existsSync(certFile)) {
    const keyFile = s.sslkey ?? join(dir, "postgresql.key");
    if (!existsSync(keyFile))
      throw invalid(
        `certificate present, but not private key file "${keyFile}"`,
        "give the client key with sslkey / PGSSLKEY",
      );
    const st = statSync(keyFile);
    const mine = typeof process.getuid === "function" && st.uid === process.getuid();
    if (process.platform !== "win32" && (st.uid === 0 && !mine ? (st.mode & 0o037) !== 0 : (st.mode & 0o077) !== 0)) {
      throw invalid(
        `private key file "${keyFile}" has group or world access; file must have permissions u=rw (0600) or less if ` +
          `owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root`,
        `chmod 0600 ${keyFile}`,
      );
    }
    client.cert = read(certFile, "certificate file");
    client.key = read(keyFile, "private key file");
  }
  if (s.sslmode === "allow" || s.sslmode === "prefer")
    return { kind: s.sslmode, options: { ...client, rejectUnauthorized: false } };

  // The host the certificate must name (verify-full): tls.connect checks `servername || host`.
  const named: ConnectionOptions = { ...client, host: s.host };
  if (s.sslrootcert === "system") return { kind: "on", verify: "full", options: named };
  const rootFile = s.sslrootcert ?? join(dir, "root.crt");
  if (!existsSync(rootFile)) {
    if (s.sslmode === "require")
      return { kind: "on", verify: "none", options: { ...named, rejectUnauthorized: false } };
    throw new PgshiftError(
      `root certificate file "${rootFile}" does not exist, and sslmode=${s.sslmode} needs it to verify the server`,
      {
        hint:
          "give the file with sslrootcert / PGSSLROOTCERT, or sslrootcert=system for the system's trusted roots; " +
          "pgshift never falls back to an unverified connection",
      },
    );
  }
  const ca = read(rootFile, "root certificate file");
  const verify = s.sslmode === "verify-full" ? "full" : "ca";
  return {
    kind: "on",
    verify,
    options: {
      ...named,
      ca,
      rejectUnauthorized: true,
      ...(verify === "ca" ? { checkServerIdentity: () => undefined } : {}),
    },
  };
}

/** What a server answered to an SSLRequest: `S` (TLS offered), `N` (not), or something that is not PostgreSQL. */
export type SslAnswer = "S" | "N" | { other: string } | "timeout" | "closed";

/**
 * Sends PostgreSQL's SSLRequest (protocol "Message Formats": Int32 8, Int32 80877103) on a new TCP connection
 * and reads the first byte of the answer, then closes the connection.
 * @param timeoutMs how long to wait for the connection and the answer.
 * @throws the socket's error when the connection cannot be made (ECONNREFUSED, ENOTFOUND, ...).
 */
export function probeSsl(host: string, port: number, timeoutMs: number): Promise<SslAnswer> {
  return new Promise((resolve, reject) => {
    const socket = netConnect(port, host);
    let done = false;
    const finish = (r: SslAnswer | Error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      if (r instanceof Error) reject(r);
      else resolve(r);
    };
    const timer = setTimeout(() => finish("timeout"), timeoutMs);
    socket.on("connect", () => socket.write(Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])));
    socket.once("data", (d: Buffer) => {
      const c = String.fromCharCode(d[0]!);
      finish(
        c === "S" || c === "N"
          ? c
          : {
              other: d
                .subarray(0, 60)
                .toString("latin1")
                .split(/[\r\n]/)[0]!
                .replace(/[^\x20-\x7e]+/g, " ")
                .trim(),
            },
      );
    });
    socket.on("error", (err) => finish(err));
    socket.on("close", () => finish("closed"));
  });
}

/** `host:port`, or the socket's path, for messages. */
export function describeServer(s: Pick<ConnSettings, "host" | "port">): string {
  return s.host.startsWith("/")
    ? `${s.host}/.s.PGSQL.${s.port}`
    : `${s.host.includes(":") ? `[${s.host}]` : s.host}:${s.port}`;
}
