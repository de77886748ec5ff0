/**
 * Scale benchmark (issue 18, item 5): does pgshift's memory stay flat in the table's size, does the backfill's
 * time (and WAL) grow linearly with the rows, and how close are plan's predictions to what happened?
 *
 *   scripts/bench-scale [--rows 1000000,10000000] [--durable] [--sample-rows N] [--json] [--strict]
 *
 * One process, one run:
 *  1. starts the embedded PostgreSQL (unless DATABASE_URL is set: then that database is used, and the bench
 *     table is dropped at the end); --durable: fsync, full_page_writes and synchronous_commit on;
 *  2. for each size of --rows, in order: builds the `events` table of bench-backfill (buildEventsTable in
 *     bench-common.ts: bigint key, timestamptz, text, numeric, jsonb, an index on the timestamptz column) as
 *     `bench_scale_events`, in INSERT ... SELECT generate_series statements of 2.5 million rows, then VACUUM
 *     (FREEZE, ANALYZE) and CHECKPOINT;
 *  3. runs, each as a child process `node dist/cli/main.js ...` (the CLI as a user runs it):
 *     - `pgshift plan <table> --partition-by range:created_at:month --json`, and again with `--sample-copy=N`:
 *       their predictions (backfill time, copy and index-build time, disk of the partitioned table, WAL);
 *     - `pgshift start <table> --partition-by range:created_at:month --allow-key-extension`;
 *     - CHECKPOINT, then `pgshift backfill <table>`: its wall time, the WAL written (pg_current_wal_insert_lsn()
 *       before and after), the copy and the index builds (pgshift.migrations: backfill_started_at,
 *       copy_finished_at, backfill_finished_at), the partitioned table's size afterwards (pg_total_relation_size
 *       of every relation of pg_partition_tree: partitions, TOAST, indexes);
 *     - `pgshift verify <table> --json` (must exit 0);
 *     and of each the peak memory: VmHWM of /proc/<pid>/status polled every 50 ms while it runs, and the
 *     process's getrusage maxRSS at exit (scripts/bench-peak-rss.mjs, preloaded);
 *  4. aborts the migration (library call, not measured) and drops the table before the next size;
 *  5. reports per size: rows, backfill seconds, seconds and WAL per million rows, peak RSS of each command,
 *     predicted vs actual with their ratio; then the checks, the largest size against the smallest:
 *     - linear: backfill seconds and WAL per million rows at most 10 % above the smallest size's;
 *     - flat memory: each command's peak RSS at most max(10 %, 20 MB) above the smallest size's;
 *     - predictions: time, disk and WAL within 25 % of what happened (predicted / actual in 0.75 .. 1.25), for
 *       the prediction from statistics and the one from a sample copy, at every size.
 *
 * Times are wall-clock on whatever machine runs this: on a shared machine other work slows some phases and not
 * others. Exit status 0 whatever the checks say, unless --strict (then 1 when one fails).
 */

import { availableParallelism } from "node:os";
import { parseArgs } from "node:util";
import { destination, pino } from "pino";
import { abort, loadMigration, type QualifiedName, type Sql, setLogger } from "../src/index.js";
import type { Prediction } from "../src/plan/predict.js";
import {
  buildEventsTable,
  COMMON_OPTIONS,
  fmtInt,
  openBenchSession,
  type PgshiftRun,
  positiveInt,
  printedHelp,
  requireFreshBuild,
  runBench,
  runPgshift,
} from "./bench-common.js";

const TABLE: QualifiedName = { schema: "public", name: "bench_scale_events" };
const SPEC = "range:created_at:month";
const COMMANDS = ["plan", "planSample", "start", "backfill", "verify"] as const;
type Command = (typeof COMMANDS)[number];
/** Targets of issue 18: linear within 10 %, memory flat within 10 % or 20 MB, predictions within 25 %. */
const LINEAR = 1.1;
const FLAT_FRACTION = 0.1;
const FLAT_BYTES = 20 * 1024 * 1024;
const PREDICTION = 1.25;

function usage(): string {
  return `usage: scripts/bench-scale [--rows N,N,...] [--durable] [--sample-rows N] [--json] [--strict]
  --rows N,N,...   table sizes, smallest first (default 1000000,10000000); the checks compare the last to the first
  --durable        embedded server with production durability (fsync, synchronous_commit, full_page_writes on)
  --sample-rows N  rows of plan --sample-copy (default 20000)
  --json           print the report as JSON on stdout (the table then goes to stderr)
  --strict         exit 1 when a check fails
Uses DATABASE_URL when set, else starts an embedded PostgreSQL. Runs the built CLI (dist/: npm run build).`;
}

const mb = (bytes: number) => (bytes / 1024 / 1024).toFixed(1);
const perMillion = (x: number, rows: number) => (x * 1_000_000) / rows;

/** What was predicted, in the units compared. */
interface Predicted {
  source: Prediction["source"];
  durationMs: number;
  copyMs: number;
  indexBuildMs: number;
  analyzeMs: number;
  diskBytes: number;
  walBytes: number;
}

interface SizeResult {
  rows: number;
  sourceBytes: { heap: number; total: number };
  buildSeconds: number;
  partitions: number;
  backfill: {
    seconds: number;
    /**
     * From pgshift.migrations: backfill_started_at to copy_finished_at, and from there to backfill_finished_at (the
     * index builds, the shadow's last touches and its ANALYZE).
     */
    copySeconds: number;
    indexSeconds: number;
    /** The shadow's ANALYZE timed again after the backfill (about the share of indexSeconds it took). */
    analyzeAgainSeconds: number;
    walBytes: number;
    diskBytes: number;
    secondsPerMillion: number;
    walBytesPerMillion: number;
  };
  peakRssBytes: Record<Command, number | null>;
  peakRssFrom: Record<Command, PgshiftRun["peakRssFrom"]>;
  heapAtExit: Record<Command, PgshiftRun["heapAtExit"]>;
  commandSeconds: Record<Command, number>;
  predicted: { statistics: Predicted; sample: Predicted };
  /** predicted / actual. */
  ratios: {
    statistics: { time: number; disk: number; wal: number };
    sample: { time: number; disk: number; wal: number };
  };
}

async function walLsn(sql: Sql): Promise<string> {
  return String((await sql`select pg_current_wal_insert_lsn()::text as l`)[0]?.l);
}

async function walSince(sql: Sql, from: string): Promise<number> {
  return Number((await sql`select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), ${from}::pg_lsn)::bigint as b`)[0]?.b);
}

async function dropBenchTable(sql: Sql): Promise<void> {
  if (await loadMigration(sql, TABLE)) await abort(sql, TABLE);
  await sql`drop table if exists ${sql(TABLE.name)}`;
}

/** Runs one pgshift command; throws with its output when it does not exit with `expect` (default 0). */
async function pgshift(url: string, args: string[], say: (l: string) => void, expect = 0): Promise<PgshiftRun> {
  say(`  pgshift ${args.join(" ")}`);
  const r = await runPgshift(args, { url });
  if (r.code !== expect)
    throw new Error(
      `pgshift ${args.join(" ")} exited ${r.code ?? r.signal}\n--- stdout\n${r.stdout.slice(-4000)}\n--- stderr\n` +
        `${r.stderr.slice(-4000)}`,
    );
  say(
    `    ${(r.ms / 1000).toFixed(2)} s, peak RSS ${r.peakRssBytes === null ? "?" : mb(r.peakRssBytes)} MB ` +
      `(${r.peakRssFrom})`,
  );
  return r;
}

function predicted(r: PgshiftRun): Predicted {
  const p = (JSON.parse(r.stdout) as { prediction: Prediction | null }).prediction;
  if (!p) throw new Error(`pgshift ${r.args.join(" ")} printed no prediction`);
  return {
    source: p.source,
    durationMs: p.durationMs,
    copyMs: p.copyMs,
    indexBuildMs: p.indexBuildMs,
    analyzeMs: p.analyzeMs,
    diskBytes: p.diskBytes,
    walBytes: p.walBytes,
  };
}

async function runSize(
  sql: Sql,
  url: string,
  rows: number,
  sampleRows: number,
  say: (l: string) => void,
): Promise<SizeResult> {
  await dropBenchTable(sql);
  say(`building ${TABLE.name} with ${fmtInt(rows)} rows ...`);
  const tb = performance.now();
  await buildEventsTable(sql, TABLE.name, rows, { say });
  const buildSeconds = (performance.now() - tb) / 1000;
  const size = await sql`select pg_total_relation_size(${TABLE.name}::regclass)::bigint as total,
      pg_relation_size(${TABLE.name}::regclass)::bigint as heap`;
  const sourceBytes = { heap: Number(size[0]?.heap), total: Number(size[0]?.total) };
  say(
    `  built in ${buildSeconds.toFixed(1)} s: heap ${mb(sourceBytes.heap)} MB, with indexes ` +
      `${mb(sourceBytes.total)} MB`,
  );
  await sql`checkpoint`;

  const base = [TABLE.name, "--partition-by", SPEC];
  const plan = await pgshift(url, ["plan", ...base, "--json"], say);
  const planSample = await pgshift(url, ["plan", ...base, `--sample-copy=${sampleRows}`, "--json"], say);
  const start = await pgshift(url, ["start", ...base, "--allow-key-extension"], say);
  // As plan-predict.test.ts: the backfill starts after a checkpoint (the sample copy dirtied nothing of the
  // source in trigger mode, but the start's DDL and the sample's rolled-back pages did write).
  await sql`checkpoint`;
  const w0 = await walLsn(sql);
  const backfill = await pgshift(url, ["backfill", TABLE.name], say);
  const walBytes = await walSince(sql, w0);
  const m = await loadMigration(sql, TABLE);
  if (!m) throw new Error("the migration is gone after the backfill");
  const times = await sql`
    select extract(epoch from copy_finished_at - backfill_started_at)::float8 as copy,
           extract(epoch from backfill_finished_at - copy_finished_at)::float8 as idx,
           rows_copied::bigint as copied, phase
      from pgshift.migrations where id = ${m.id}`;
  if (Number(times[0]?.copied) !== rows || times[0]?.phase !== "backfilled")
    throw new Error(`after the backfill: ${JSON.stringify(times[0])}, expected ${rows} rows copied, backfilled`);
  const tree = await sql`
    select count(*) filter (where isleaf)::int as partitions, sum(pg_total_relation_size(relid))::bigint as bytes
      from pg_partition_tree(${`"${m.partitioned.schema}"."${m.partitioned.name}"`}::regclass)`;
  // The backfill ended with ANALYZE of the partitioned table; run again (warm) to see its share of the last phase.
  const ta = performance.now();
  await sql.unsafe(`analyze "${m.partitioned.schema}"."${m.partitioned.name}"`);
  const analyzeAgainSeconds = (performance.now() - ta) / 1000;
  say(`  ANALYZE of the shadow again: ${analyzeAgainSeconds.toFixed(1)} s`);
  const verify = await pgshift(url, ["verify", TABLE.name, "--json"], say);
  await dropBenchTable(sql);

  const runs: Record<Command, PgshiftRun> = { plan, planSample, start, backfill, verify };
  const actual = { ms: backfill.ms, disk: Number(tree[0]?.bytes), wal: walBytes };
  const ratio = (p: Predicted) => ({
    time: p.durationMs / actual.ms,
    disk: p.diskBytes / actual.disk,
    wal: p.walBytes / actual.wal,
  });
  const stats = predicted(plan);
  const sample = predicted(planSample);
  const pick = <T>(f: (r: PgshiftRun) => T) =>
    Object.fromEntries(COMMANDS.map((c) => [c, f(runs[c])])) as Record<Command, T>;
  return {
    rows,
    sourceBytes,
    buildSeconds,
    partitions: Number(tree[0]?.partitions),
    backfill: {
      seconds: backfill.ms / 1000,
      copySeconds: Number(times[0]?.copy),
      indexSeconds: Number(times[0]?.idx),
      analyzeAgainSeconds,
      walBytes,
      diskBytes: actual.disk,
      secondsPerMillion: perMillion(backfill.ms / 1000, rows),
      walBytesPerMillion: perMillion(walBytes, rows),
    },
    peakRssBytes: pick((r) => r.peakRssBytes),
    peakRssFrom: pick((r) => r.peakRssFrom),
    heapAtExit: pick((r) => r.heapAtExit),
    commandSeconds: pick((r) => r.ms / 1000),
    predicted: { statistics: stats, sample },
    ratios: { statistics: ratio(stats), sample: ratio(sample) },
  };
}

interface Check {
  what: string;
  value: string;
  target: string;
  pass: boolean;
}

function checks(sizes: SizeResult[]): Check[] {
  const out: Check[] = [];
  const first = sizes[0]!;
  const last = sizes[sizes.length - 1]!;
  if (sizes.length > 1) {
    const t = last.backfill.secondsPerMillion / first.backfill.secondsPerMillion;
    const w = last.backfill.walBytesPerMillion / first.backfill.walBytesPerMillion;
    const vs = `${fmtInt(last.rows)} vs ${fmtInt(first.rows)} rows`;
    out.push({
      what: `backfill seconds per million rows, ${vs}`,
      value: `${t.toFixed(2)}x`,
      target: `<= ${LINEAR}x`,
      pass: t <= LINEAR,
    });
    out.push({
      what: `WAL per million rows, ${vs}`,
      value: `${w.toFixed(2)}x`,
      target: `<= ${LINEAR}x`,
      pass: w <= LINEAR,
    });
    for (const c of COMMANDS) {
      const a = first.peakRssBytes[c];
      const b = last.peakRssBytes[c];
      const allowed = a === null ? 0 : Math.max(a * FLAT_FRACTION, FLAT_BYTES);
      out.push({
        what: `peak RSS of ${label(c)}, ${vs}`,
        value: a === null || b === null ? "unknown" : `${mb(b)} vs ${mb(a)} MB (${b >= a ? "+" : ""}${mb(b - a)})`,
        target: `<= +${mb(allowed)} MB`,
        pass: a !== null && b !== null && b - a <= allowed,
      });
    }
  }
  for (const s of sizes)
    for (const src of ["statistics", "sample"] as const)
      for (const k of ["time", "disk", "wal"] as const) {
        const r = s.ratios[src][k];
        out.push({
          what: `${fmtInt(s.rows)} rows: ${k} predicted from ${src} / actual`,
          value: r.toFixed(2),
          target: `${(2 - PREDICTION).toFixed(2)} .. ${PREDICTION.toFixed(2)}`,
          pass: Math.abs(r - 1) <= PREDICTION - 1,
        });
      }
  return out;
}

const label = (c: Command) => (c === "planSample" ? "plan --sample-copy" : c);

function report(sizes: SizeResult[], cs: Check[], header: string): string {
  const out: string[] = ["", header];
  const cols = sizes.map((s) => fmtInt(s.rows).padStart(16));
  const row = (name: string, f: (s: SizeResult) => string) =>
    out.push(`${name.padEnd(44)}${sizes.map((s) => f(s).padStart(16)).join("")}`);
  out.push(`${"rows".padEnd(44)}${cols.join("")}`);
  row("source heap / with indexes, MB", (s) => `${mb(s.sourceBytes.heap)} / ${mb(s.sourceBytes.total)}`);
  row("partitions (leaves, DEFAULT included)", (s) => String(s.partitions));
  row("backfill, s", (s) => s.backfill.seconds.toFixed(2));
  row(
    "  copy / index builds + ANALYZE, s",
    (s) => `${s.backfill.copySeconds.toFixed(1)} / ${s.backfill.indexSeconds.toFixed(1)}`,
  );
  row("  ANALYZE of the shadow timed again, s", (s) => s.backfill.analyzeAgainSeconds.toFixed(1));
  row("backfill s per million rows", (s) => s.backfill.secondsPerMillion.toFixed(2));
  row("WAL, MB", (s) => mb(s.backfill.walBytes));
  row("WAL per million rows, MB", (s) => mb(s.backfill.walBytesPerMillion));
  row("partitioned table + indexes, MB", (s) => mb(s.backfill.diskBytes));
  for (const c of COMMANDS)
    row(`${label(c)}: peak RSS, MB (wall s)`, (s) => {
      const b = s.peakRssBytes[c];
      return `${b === null ? "?" : mb(b)} (${s.commandSeconds[c].toFixed(1)})`;
    });
  row("backfill: V8 heap peak / live at exit, MB", (s) => {
    const h = s.heapAtExit.backfill;
    return h === null ? "?" : `${mb(h.peakHeapTotalBytes)} / ${h.liveHeapBytes === null ? "?" : mb(h.liveHeapBytes)}`;
  });
  row("backfill: peak Buffers / V8's malloc, MB", (s) => {
    const h = s.heapAtExit.backfill;
    return h === null ? "?" : `${mb(h.peakExternalBytes)} / ${mb(h.peakMallocedBytes)}`;
  });
  for (const src of ["statistics", "sample"] as const) {
    row(`predicted from ${src}: time, s (ratio)`, (s) => {
      const p = s.predicted[src];
      return `${(p.durationMs / 1000).toFixed(1)} (${s.ratios[src].time.toFixed(2)})`;
    });
    row("  copy / index builds + ANALYZE, s", (s) => {
      const p = s.predicted[src];
      const s1 = (ms: number) => (ms / 1000).toFixed(1);
      return `${s1(p.copyMs)} / ${s1(p.indexBuildMs + p.analyzeMs)}`;
    });
    row("  disk, MB (ratio)", (s) => `${mb(s.predicted[src].diskBytes)} (${s.ratios[src].disk.toFixed(2)})`);
    row("  WAL, MB (ratio)", (s) => `${mb(s.predicted[src].walBytes)} (${s.ratios[src].wal.toFixed(2)})`);
  }
  out.push("", "checks:");
  for (const c of cs) out.push(`  ${c.pass ? "PASS" : "FAIL"}  ${c.what}: ${c.value} (target ${c.target})`);
  return out.join("\n");
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      ...COMMON_OPTIONS,
      durable: { type: "boolean", default: false },
      "sample-rows": { type: "string" },
    },
    strict: true,
    allowPositionals: false,
  });
  if (printedHelp(values, usage)) return 0;
  if (values.repeat !== undefined) throw new Error("--repeat is not supported by bench-scale (one run per size)");
  const sizes = (values.rows ?? "1000000,10000000")
    .split(/\s*,\s*(?=\d)/)
    .filter((x) => x !== "")
    .map((x) => positiveInt("--rows", x, 0));
  if (sizes.length === 0) throw new Error("--rows needs at least one size");
  const sampleRows = positiveInt("--sample-rows", values["sample-rows"], 20_000);
  const durable = values.durable === true;
  requireFreshBuild();
  const say = (l: string) => process.stderr.write(`${l}\n`);
  setLogger(pino({ level: process.env.PGSHIFT_LOG_LEVEL ?? "error" }, destination(2)));

  const { sql, url, external, cleanup } = await openBenchSession({
    applicationName: "pgshift-bench",
    say,
    dropTables: dropBenchTable,
    durable,
  });
  try {
    const v = await sql`select current_setting('server_version') as v, current_setting('shared_buffers') as sb,
                               current_setting('fsync') as fsync, current_setting('synchronous_commit') as sc,
                               current_setting('full_page_writes') as fpw, current_setting('max_wal_size') as mws`;
    const server =
      `PostgreSQL ${String(v[0]?.v)}${external ? "" : " (embedded)"}, shared_buffers=${String(v[0]?.sb)}, ` +
      `fsync=${String(v[0]?.fsync)}, synchronous_commit=${String(v[0]?.sc)}, full_page_writes=${String(v[0]?.fpw)}, ` +
      `max_wal_size=${String(v[0]?.mws)}`;
    say(server);
    const results: SizeResult[] = [];
    for (const rows of sizes) results.push(await runSize(sql, url, rows, sampleRows, say));
    const cs = checks(results);
    const pass = cs.every((c) => c.pass);
    const header = `pgshift scale benchmark: ${server}, ${availableParallelism()} CPUs, ${SPEC}`;
    const table = `${report(results, cs, header)}\n${pass ? "all checks pass" : "some checks FAIL"}\n`;
    if (values.json) {
      // the table on stderr, beside the progress lines
      process.stderr.write(table);
      const out = {
        server,
        durable,
        cpus: availableParallelism(),
        spec: SPEC,
        sampleRows,
        sizes: results,
        checks: cs,
        pass,
      };
      process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    } else process.stdout.write(table);
    return values.strict && !pass ? 1 : 0;
  } finally {
    await cleanup();
  }
}

runBench("bench-scale", usage, main);
