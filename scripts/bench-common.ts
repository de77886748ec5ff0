/**
 * What the benchmarks under scripts/ share: argument helpers and the server session (embedded PostgreSQL
 * unless DATABASE_URL is set; on Ctrl-C or at the end, the bench tables are dropped on an external server
 * and the embedded one is stopped).
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
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
  /** The server's URL (DATABASE_URL's or the embedded server's), for child processes (the CLI). */
  url: string;
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
  return { sql, url: external ? String(process.env.DATABASE_URL) : server!.url, external, cleanup };
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

/**
 * Builds the benchmarks' `events` table (the one bench-backfill copies): bigint primary key, timestamptz rising
 * with the key over 2 years up to now (with a few hours of jitter), text, numeric, jsonb, an index on the
 * timestamptz column; about 135 bytes of heap a row. `rows` rows from generate_series, in INSERT ... SELECT
 * statements of at most `chunkRows` rows each (progress between them), then VACUUM (FREEZE, ANALYZE).
 * Autovacuum is off on it (and on the shadow partitions, which inherit its storage parameters).
 */
export async function buildEventsTable(
  sql: Sql,
  name: string,
  rows: number,
  opts: { chunkRows?: number; say?: (line: string) => void } = {},
): Promise<void> {
  await sql`
    create table ${sql(name)} (
      id bigint primary key,
      created_at timestamptz not null,
      customer text not null,
      amount numeric(12,2) not null,
      payload jsonb not null
    ) with (autovacuum_enabled = off)`;
  await sql.unsafe(`create index ${name}_created_at_idx on ${name} (created_at)`);
  const chunk = opts.chunkRows ?? 2_500_000;
  for (let from = 1; from <= rows; from += chunk) {
    const to = Math.min(rows, from + chunk - 1);
    opts.say?.(`  rows ${fmtInt(from)} to ${fmtInt(to)} ...`);
    await sql`
      insert into ${sql(name)} (id, created_at, customer, amount, payload)
      select i,
             now() - interval '730 days' + (i - 1) * (interval '730 days' / ${rows}::int) + ((i * 7919) % 21600) *
               interval '1 second',
             'customer-' || lpad((i * 31 % 50000)::text, 6, '0'),
             ((i * 104729) % 10000000) / 100.0,
             jsonb_build_object('sku', 'SKU-' || (i % 5000), 'qty', 1 + i % 9, 'tags', jsonb_build_array(i % 10,
               i % 7), 'note', md5(i::text))
        from generate_series(${from}::bigint, ${to}::bigint) i`;
  }
  await sql.unsafe(`vacuum (freeze, analyze) ${name}`);
}

/** What one pgshift command run as a child process did (runPgshift). */
export interface PgshiftRun {
  args: string[];
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Wall time from spawn to exit, ms. */
  ms: number;
  /**
   * Peak resident set size of the pgshift process, bytes: the larger of its VmHWM in /proc/<pid>/status, read
   * every `pollMs` while it runs, and its own getrusage maxRSS written at exit (bench-peak-rss.mjs). Null when
   * neither could be read.
   */
  peakRssBytes: number | null;
  /** Whether the figure came from the process's exit (exact) or only from polling /proc (may miss the end). */
  peakRssFrom: "exit" | "poll" | "none";
  /**
   * The V8 heap at exit (bench-peak-rss.mjs): its size, what was in use, and what is still alive after a full
   * garbage collection (memory kept, as a leak would be), and the peaks during the run, bytes; null when not written.
   */
  heapAtExit: {
    heapTotalBytes: number;
    heapUsedBytes: number;
    liveHeapBytes: number | null;
    /** Peaks over the run (memoryUsage() every 100 ms): the V8 heap's size, memory outside it, Buffers. */
    peakHeapTotalBytes: number;
    peakExternalBytes: number;
    peakArrayBuffersBytes: number;
    /** V8's peak of memory it allocated outside its heap (v8.getHeapStatistics().peak_malloced_memory). */
    peakMallocedBytes: number;
  } | null;
}

const repoRoot = fileURLToPath(new URL("..", import.meta.url));
/** The built CLI, which benchmarks run as a user would: `node dist/cli/main.js`. */
export const CLI = join(repoRoot, "dist", "cli", "main.js");

/**
 * Refuses to run on a missing or stale build: dist/cli/main.js must exist and be newer than every file of src/.
 * @throws Error naming `npm run build`.
 */
export function requireFreshBuild(): void {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  const built = statSync(CLI).mtimeMs;
  const newest = (dir: string): number =>
    readdirSync(dir, { withFileTypes: true }).reduce((m, e) => {
      const p = join(dir, e.name);
      return Math.max(m, e.isDirectory() ? newest(p) : statSync(p).mtimeMs);
    }, 0);
  if (newest(join(repoRoot, "src")) > built) throw new Error("dist/ is older than src/: run npm run build first");
}

const readHwm = (pid: number): number | null => {
  try {
    const m = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
};

/**
 * Runs `node dist/cli/main.js <args>` as a child process whose pid is node's own (no shell between), with
 * DATABASE_URL set to `url` and JSON log lines (PGSHIFT_LOG_LEVEL, default info) on its stderr, and measures
 * its wall time and peak memory (PgshiftRun.peakRssBytes). `entry` replaces `dist/cli/main.js` (a test runs
 * `["--import", "tsx", "src/cli/main.ts"]`, relative to the repository's root). Never throws on a failing
 * command: see `code`.
 */
export async function runPgshift(
  args: string[],
  opts: { url: string; pollMs?: number; entry?: string[] },
): Promise<PgshiftRun> {
  const dir = mkdtempSync(join(tmpdir(), "pgshift-bench-"));
  const rssFile = join(dir, "peak-rss");
  const preload = pathToFileURL(join(repoRoot, "scripts", "bench-peak-rss.mjs")).href;
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    DATABASE_URL: opts.url,
    PGSHIFT_LOG_LEVEL: process.env.PGSHIFT_LOG_LEVEL ?? "info",
    PGSHIFT_BENCH_PEAK_RSS_FILE: rssFile,
  };
  const t0 = performance.now();
  const child = spawn(process.execPath, ["--expose-gc", "--import", preload, ...(opts.entry ?? [CLI]), ...args], {
    cwd: repoRoot,
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let polled: number | null = null;
  const poll = () => {
    const h = child.pid === undefined ? null : readHwm(child.pid);
    if (h !== null) polled = Math.max(polled ?? 0, h);
  };
  const timer = setInterval(poll, opts.pollMs ?? 50);
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  // Once more when its stdout closes (usually just before it exits and is reaped).
  child.stdout.once("end", poll);
  const { code, signal } = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>(
    (resolve, reject) => {
      child.on("error", reject);
      child.on("close", (c, s) => resolve({ code: c, signal: s }));
    },
  );
  clearInterval(timer);
  const ms = performance.now() - t0;
  let atExit: number | null = null;
  try {
    atExit = Number(readFileSync(rssFile, "utf8"));
  } catch {
    atExit = null;
  }
  let heapAtExit: PgshiftRun["heapAtExit"] = null;
  try {
    heapAtExit = JSON.parse(readFileSync(`${rssFile}.json`, "utf8")) as PgshiftRun["heapAtExit"];
  } catch {
    heapAtExit = null;
  }
  rmSync(dir, { recursive: true, force: true });
  const peak = Math.max(atExit ?? 0, polled ?? 0);
  return {
    args,
    code,
    signal,
    stdout,
    stderr,
    ms,
    peakRssBytes: peak > 0 ? peak : null,
    peakRssFrom: atExit !== null ? "exit" : polled !== null ? "poll" : "none",
    heapAtExit,
  };
}
