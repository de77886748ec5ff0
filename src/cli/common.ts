import { type Command, InvalidArgumentError, Option } from "commander";
import { z } from "zod";
import { connect, DEFAULT_LOCK_RETRIES, DEFAULT_LOCK_TIMEOUT_MS, failOnConnectionLoss, type Sql } from "../db.js";
import { explain, PgshiftError } from "../errors.js";
import { GroupNameSchema } from "../group/members.js";
import { parseTableName, type QualifiedName } from "../names.js";
import { beginObservation, endObservation } from "../observe/session.js";

/** application_name fallback of this process's sessions: `pgshift <command>` once main.ts knows the command. */
let commandAppName = "pgshift";

/**
 * Names the command this process runs (main.ts, before its action), so that its sessions show
 * `pgshift <command>` as application_name (unless the user sets one) and status can say who holds a migration.
 */
export function setCommandName(command: string): void {
  commandAppName = `pgshift ${command}`;
}

/** Options every command that talks to a database accepts. */
export interface ConnOpts {
  url?: string;
}

export function addConnectionOption(cmd: Command): Command {
  return cmd.addOption(
    new Option(
      "--url <url>",
      "postgres:// URL, libpq's parameters allowed (?sslmode=verify-full&sslrootcert=...); default DATABASE_URL; " +
        "completed from the service file, PG* variables and ~/.pgpass as psql does",
    ).argParser((v: string) => {
      const r = UrlSchema.safeParse(v);
      if (!r.success) throw new InvalidArgumentError(`--url ${r.error.issues[0]?.message ?? "is invalid"}`);
      return r.data;
    }),
  );
}

/**
 * Connects, runs `fn` with the parsed table, always closes the connection.
 *
 * When the command's session is lost (terminated, the server restarted, the network cut), the command
 * fails at once with a connection-loss error (code CONNECTION_CLOSED; explain() words it, exit 2), whatever
 * `fn` was waiting for (failOnConnectionLoss: a pool that lost a connection may never answer again). Every
 * step is re-runnable from the state in the database, as after a crash.
 * `keepOnLoss`: `fn` handles losses itself (sync opens connections of its own and connects again).
 * @throws PgshiftError: what went wrong, as explain() words it.
 */
export async function withTable<T>(
  tableArg: string,
  opts: ConnOpts,
  fn: (sql: Sql, table: QualifiedName) => Promise<T>,
  { keepOnLoss = false }: { keepOnLoss?: boolean } = {},
): Promise<T> {
  const table = parseTableName(tableArg);
  return withConnection(opts, (sql) => fn(sql, table), { keepOnLoss });
}

/** Connects, runs `fn`, always closes the connection, as withTable does (without a table). */
export async function withConnection<T>(
  opts: ConnOpts,
  fn: (sql: Sql) => Promise<T>,
  { keepOnLoss = false }: { keepOnLoss?: boolean } = {},
): Promise<T> {
  const watch = keepOnLoss ? null : failOnConnectionLoss("the command's session was lost");
  const sql = await connect({
    url: opts.url,
    fallbackApplicationName: commandAppName,
    ...(watch ? { onClose: watch.onClose } : {}),
  });
  try {
    return await Promise.race(watch ? [fn(sql), watch.lost] : [fn(sql)]);
  } catch (err) {
    throw explain(err);
  } finally {
    watch?.end();
    await sql.end({ timeout: 5 }).catch(() => {});
  }
}

/**
 * A commander option parser for an integer option, validated with zod (digits only, >= min, a safe integer).
 * @throws InvalidArgumentError (commander prints it and pgshift exits 2).
 */
export function intOption(name: string, min = 0) {
  const schema = z
    .string()
    .regex(/^[0-9]+$/, "digits only")
    .transform(Number)
    .pipe(z.number().int().min(min).max(Number.MAX_SAFE_INTEGER));
  return (value: string): number => {
    const r = schema.safeParse(value);
    if (!r.success)
      throw new InvalidArgumentError(`${name} must be an integer >= ${min}, got ${JSON.stringify(value)}`);
    return r.data;
  };
}

/**
 * `--lock-timeout` and `--retries`, shared by every command that takes locks on the tables (defaults: db.ts,
 * DEFAULT_LOCK_TIMEOUT_MS and DEFAULT_LOCK_RETRIES).
 */
export function addLockOptions(cmd: Command, what = "lock_timeout for the locks on the tables"): Command {
  return cmd
    .option("--lock-timeout <ms>", what, intOption("--lock-timeout", 1), DEFAULT_LOCK_TIMEOUT_MS)
    .option(
      "--retries <n>",
      "attempts after a lock timeout, with jittered backoff (all within 60 s)",
      intOption("--retries"),
      DEFAULT_LOCK_RETRIES,
    );
}

/** `--group <name>`: act on every table of a migration group instead of one table (docs/groups.md). */
export function addGroupOption(cmd: Command, what: string): Command {
  return cmd.option("--group <name>", what, (v: string) => {
    const r = GroupNameSchema.safeParse(v);
    if (!r.success) throw new InvalidArgumentError(`--group ${r.error.issues[0]?.message ?? "is invalid"}`);
    return r.data;
  });
}

/**
 * The group a command acts on (--group), or null when it acts on the table `tableArg`.
 * @throws PgshiftError (exit 2) when both or neither are given.
 */
export function groupOf(tableArg: string | undefined, opts: { group?: string }, command: string): string | null {
  if ((tableArg === undefined) === (opts.group === undefined))
    throw new PgshiftError(`pgshift ${command} takes a table or --group <name>, not ${tableArg ? "both" : "neither"}`, {
      hint: `pgshift ${command} orders, or pgshift ${command} --group shop`,
    });
  return opts.group ?? null;
}

/** `--url`: a postgres:// or postgresql:// URL. */
export const UrlSchema = z.string().regex(/^postgres(ql)?:\/\/.+/, "must start with postgres:// or postgresql://");

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** Seconds as "1h02m", "3m05s", "12s". */
export function formatDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds)) return "unknown";
  const s = Math.round(seconds);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

export function formatBytes(n: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/**
 * Adds the observation options to an acting command and starts/stops them around its action (beginObservation
 * before it, endObservation after it; the error handler of main.ts ends them after a failure):
 * `--metrics-port`/`--metrics-host` when `metrics`, `--hooks-dir`/`--hooks-timeout-ms` when `hooks`. The table is
 * the command's first argument.
 */
export function addObserveOptions(cmd: Command, { metrics = false, hooks = true } = {}): Command {
  if (metrics) addMetricsOption(cmd);
  if (hooks) {
    cmd
      .option("--hooks-dir <dir>", "run the executables of <dir> named after events (on-start, on-cutover, ...)")
      .option("--hooks-timeout-ms <ms>", "how long a hook may run", intOption("--hooks-timeout-ms", 1), 60_000);
  }
  return cmd
    .hook("preAction", async (_cmd, action) => {
      // A group's command (--group) is observed under the name "group:<name>" (quoted: it is no table name).
      const group = action.opts().group;
      const arg = action.processedArgs[0] ?? action.args[0];
      const table = group !== undefined ? `"group:${String(group)}"` : Array.isArray(arg) ? arg[0] : arg;
      await beginObservation(action.name(), String(table), action.opts());
    })
    .hook("postAction", () => endObservation());
}

/** `--metrics-port` and `--metrics-host`: serve Prometheus metrics (src/observe/metrics.ts). */
export function addMetricsOption(cmd: Command): Command {
  return cmd
    .option(
      "--metrics-port <port>",
      "serve Prometheus metrics on http://<metrics-host>:<port>/metrics while the command runs (0: any free port)",
      portOption,
    )
    .option("--metrics-host <host>", "address the metrics endpoint listens on (0.0.0.0: every interface)", "127.0.0.1");
}

const portSchema = z
  .string()
  .regex(/^[0-9]+$/, "digits only")
  .transform(Number)
  .pipe(z.number().int().max(65535));

function portOption(value: string): number {
  const r = portSchema.safeParse(value);
  if (!r.success)
    throw new InvalidArgumentError(`--metrics-port must be a port (0-65535), got ${JSON.stringify(value)}`);
  return r.data;
}
