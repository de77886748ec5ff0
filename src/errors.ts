import { nodePostgresTerminated } from "./driver/upstream.js";

/**
 * Typed errors. Every error a person can act on carries a one-line message and a hint;
 * the CLI prints `error: <message>` and `hint: <hint>` and exits with `exitCode`.
 *
 * Exit codes (documented in docs/commands/README.md):
 *   0 success, 1 verify found differences, 2 any error (bad input, wrong phase, connection, privilege).
 */
export class PgshiftError extends Error {
  readonly hint: string | undefined;
  readonly exitCode: number;
  constructor(message: string, opts: { hint?: string; exitCode?: number; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "PgshiftError";
    this.hint = opts.hint;
    this.exitCode = opts.exitCode ?? 2;
  }
}

/** The table cannot be migrated as it is; `blockers` lists every reason, one per entry. */
export class BlockedError extends PgshiftError {
  readonly blockers: string[];
  constructor(table: string, blockers: string[]) {
    super(`${table} cannot be migrated: ${blockers.join("; ")}`, {
      hint:
        "fix the listed blockers (or choose another partition spec), then run the command again; " +
        "nothing was changed",
    });
    this.name = "BlockedError";
    this.blockers = blockers;
  }
}

/** The command does not fit the migration's current phase (cutover before backfill, ...). */
export class PhaseError extends PgshiftError {
  constructor(message: string, hint: string) {
    super(message, { hint });
    this.name = "PhaseError";
  }
}

/** SQLSTATE of a PostgreSQL error thrown by postgres.js, or undefined. */
export function sqlState(err: unknown): string | undefined {
  if (err && typeof err === "object" && "code" in err && typeof (err as { code: unknown }).code === "string") {
    return (err as { code: string }).code;
  }
  return undefined;
}

/** Error codes of a connection that could not be made: postgres.js's own, Node's socket errors. */
const UNREACHABLE_CODES = new Set([
  "CONNECT_TIMEOUT",
  "ECONNREFUSED",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
]);
/** Error codes of a connection lost once made (the session terminated, the server gone, the network cut). */
const LOST_CODES = new Set(["CONNECTION_CLOSED", "CONNECTION_ENDED", "CONNECTION_DESTROYED", "ECONNRESET", "EPIPE"]);
const CONNECTION_CODES = new Set([...UNREACHABLE_CODES, ...LOST_CODES]);

const RERUN = "re-run the same command once the server is reachable: every step resumes or is undone cleanly";

/**
 * Turns connection and server errors into one clear line for a person.
 * Returns a PgshiftError (unchanged if it already is one).
 */
export function explain(err: unknown): PgshiftError {
  if (err instanceof PgshiftError) return err;
  const code = sqlState(err);
  const msg = err instanceof Error ? err.message : String(err);
  switch (code) {
    case "28P01":
    case "28000":
      return new PgshiftError(`authentication failed: ${msg}`, {
        hint: "check the user and password in --url / DATABASE_URL / PGUSER, PGPASSWORD",
        cause: err,
      });
    case "3D000":
      return new PgshiftError(`database does not exist: ${msg}`, {
        hint: "check the database name in --url / DATABASE_URL / PGDATABASE",
        cause: err,
      });
    case "42501":
      return new PgshiftError(`permission denied: ${msg}`, {
        hint:
          "run pgshift as the table owner (or a role with the needed privileges: CREATE on the schema, " +
          "ownership of the table)",
        cause: err,
      });
    case "55P03":
      return new PgshiftError(`could not get a lock in time: ${msg}`, {
        hint: "the table is busy; retry later or raise --lock-timeout / --retries",
        cause: err,
      });
    case "57P01":
    case "57P02":
    case "57P03":
      return new PgshiftError(`the server closed the connection: ${msg}`, { hint: RERUN, cause: err });
  }
  if (err && typeof err === "object" && "code" in err) {
    const c = String((err as { code: unknown }).code);
    if (UNREACHABLE_CODES.has(c)) {
      return new PgshiftError(`cannot reach the PostgreSQL server (${c}): ${msg}`, {
        hint: "check --url / DATABASE_URL / PGHOST and PGPORT, and that the server is running",
        cause: err,
      });
    }
    if (LOST_CODES.has(c)) {
      // Terminated by an administrator, the server restarted, the network cut: the same words as 57P01.
      return new PgshiftError(`the server closed the connection (${c}): ${msg}`, { hint: RERUN, cause: err });
    }
  }
  return new PgshiftError(msg, { cause: err });
}

/**
 * Whether `err` (or an error in its `cause` chain) means the connection to the server was lost or could not
 * be made, so that the same work may succeed on a new connection: a socket error, the server shutting down
 * or terminating the session (SQLSTATE 57P01 admin_shutdown, 57P02 crash_shutdown), starting up (57P03
 * cannot_connect_now), a connection exception (class 08), or node-postgres's "Connection terminated"
 * (the replication connection, which carries no code: UPSTREAM.nodePostgresTerminationHasNoCode). SQLSTATEs: PostgreSQL
 * documentation, Appendix A.
 */
export function isConnectionLoss(err: unknown): boolean {
  let e: unknown = err;
  for (let depth = 0; e && typeof e === "object" && depth < 8; depth++) {
    const code = sqlState(e);
    if (
      code !== undefined &&
      (CONNECTION_CODES.has(code) || code.startsWith("08") || code === "57P01" || code === "57P02" || code === "57P03")
    )
      return true;
    if (nodePostgresTerminated(e)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}
