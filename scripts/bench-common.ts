/**
 * What the benchmarks under scripts/ share: argument helpers and the server session (embedded PostgreSQL
 * unless DATABASE_URL is set; on Ctrl-C or at the end, the bench tables are dropped on an external server
 * and the embedded one is stopped).
 */
import { connect, type Sql } from "../src/db.js";
import { type EmbeddedServer, startEmbedded } from "../src/embedded.js";

export function positiveInt(name: string, text: string | undefined, dflt: number): number {
  if (text === undefined) return dflt;
  const t = text.replace(/[_,]/g, "");
  if (!/^[1-9][0-9]*$/.test(t)) throw new Error(`${name} must be a positive integer, got ${JSON.stringify(text)}`);
  return Number(t);
}

/** Median of `xs` (NaN when empty). */
export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export const fmtInt = (n: number) => Math.round(n).toLocaleString("en-US");

export interface BenchSession {
  sql: Sql;
  /** Whether the server is DATABASE_URL's (else embedded). */
  external: boolean;
  /** Drops the bench tables (external server), closes the connection, stops the embedded server. Idempotent. */
  cleanup: () => Promise<void>;
}

/**
 * Connects to DATABASE_URL or starts an embedded PostgreSQL, and installs SIGINT/SIGTERM handlers that
 * clean up and exit 130. `dropTables` removes the benchmark's tables (used on an external server only).
 */
export async function openBenchSession(opts: {
  applicationName: string;
  say: (line: string) => void;
  dropTables: (sql: Sql) => Promise<void>;
  /** Start the embedded server with durable commits (fsync on, PostgreSQL's defaults). */
  durable?: boolean;
}): Promise<BenchSession> {
  let server: EmbeddedServer | null = null;
  let sql: Sql | null = null;
  const external = Boolean(process.env.DATABASE_URL);
  const cleanup = async () => {
    const s = sql;
    sql = null;
    if (s) {
      if (external) await opts.dropTables(s).catch(() => {});
      await s.end({ timeout: 5 }).catch(() => {});
    }
    const srv = server;
    server = null;
    await srv?.stop();
  };
  const onSignal = (sig: NodeJS.Signals) => {
    opts.say(`\n${sig}: stopping`);
    void cleanup().finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    if (!external) {
      opts.say("starting the embedded PostgreSQL ...");
      server = await startEmbedded({ durable: opts.durable ?? false });
    }
    sql = await connect({ url: server?.url, applicationName: opts.applicationName });
  } catch (err) {
    await cleanup();
    throw err;
  }
  return { sql, external, cleanup };
}

/**
 * Runs a benchmark's `main` and exits with the code it returns; on an error prints one line (with the hint
 * of a PgshiftError, the stack with PGSHIFT_DEBUG set), the usage after a bad option, and exits 2.
 */
export function runBench(name: string, usage: () => string, main: () => Promise<number>): void {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      const usageError =
        err instanceof Error && ("code" in err ? String(err.code).startsWith("ERR_PARSE_ARGS") : false);
      const text =
        err instanceof Error ? (process.env.PGSHIFT_DEBUG ? (err.stack ?? err.message) : err.message) : String(err);
      const hint = err instanceof Error && "hint" in err && typeof err.hint === "string" ? `\nhint: ${err.hint}` : "";
      process.stderr.write(
        `${name} failed: ${text}${hint}\n${usageError || text.startsWith("--") ? `${usage()}\n` : ""}`,
      );
      process.exit(2);
    },
  );
}

/** Options every benchmark takes: --rows, --repeat, --json, --strict, -h/--help (spread into parseArgs's options). */
export const COMMON_OPTIONS = {
  rows: { type: "string" },
  repeat: { type: "string" },
  json: { type: "boolean", default: false },
  strict: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
} as const;

/** For -h/--help: prints `usage()` and returns true. */
export function printedHelp(values: { help?: boolean | undefined }, usage: () => string): boolean {
  if (values.help) process.stdout.write(`${usage()}\n`);
  return Boolean(values.help);
}
