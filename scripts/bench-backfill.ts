/**
 * Backfill benchmark: how close does pgshift's online, checkpointed copy come to the fastest possible copy, a
 * single `INSERT INTO partitioned SELECT * FROM source`, and what does it write besides the copy?
 *
 *   scripts/bench-backfill [--rows N] [--batch-size N] [--repeat K] [--durable] [--workers 1,2,4] [--json]
 *                          [--strict]
 *
 * One process, one run:
 *  1. starts the embedded PostgreSQL (unless DATABASE_URL is set: then that database is used, and the
 *     bench tables are dropped at the end);
 *  2. builds `bench_source` (bigint primary key, timestamptz over ~2 years, text, numeric, jsonb, an index
 *     on the timestamptz column) with one INSERT ... SELECT generate_series, then VACUUM (FREEZE, ANALYZE);
 *  3. (a) baseline: a partitioned twin (same columns, the same monthly partitions + DEFAULT that pgshift
 *     computes, primary key extended with created_at, the created_at index), then times one
 *     `INSERT INTO twin SELECT * FROM bench_source`;
 *  4. (b) pgshift: startMigration (not timed), then times `backfill(sql, table, { batchSize })`, one worker,
 *     without row locks (the default), sampling the Node process's RSS every 100 ms;
 *  5. (c) the same with `lockRows: true` (backfill --lock-rows: FOR SHARE);
 *  5b. with `--workers 1,2,4`: the same as (b) with each number of workers (backfill --workers N: key ranges copied
 *     on N connections at once, the indexes built over as many; 1 is (b) itself);
 *  6. reports, for each: seconds, rows/s, WAL written (pg_current_wal_insert_lsn() before and after: the whole
 *     phase, index build and pgshift's state included), the rows of the source left with a row lock (xmax set)
 *     and the pages holding them (each such page was dirtied and written again); the ratios to (a) against the
 *     targets of issue 18 (time <= 1.0x, WAL <= 1.2x, no source page dirtied) and the peak RSS.
 *
 * A CHECKPOINT precedes each timed phase, and the source is frozen again after each (b) (whose FOR SHARE
 * locks write every source tuple), so that every phase starts from the same state. Autovacuum is off on
 * the bench tables (the twin and pgshift's shadow partitions inherit the source's storage parameters) so
 * that it cannot run during one phase and not the other.
 * Exit status 0 whatever the ratio, unless --strict (then 1 when the median ratio is above the target).
 */

import { availableParallelism } from "node:os";
import { parseArgs } from "node:util";
import { destination, pino } from "pino";
import {
  abort,
  backfill,
  computePartitions,
  loadMigration,
  on,
  parsePartitionSpec,
  type QualifiedName,
  type Sql,
  setLogger,
  startMigration,
} from "../src/index.js";
import {
  buildEventsTable,
  COMMON_OPTIONS,
  fmtInt,
  median,
  openBenchSession,
  positiveInt,
  printedHelp,
  runBench,
} from "./bench-common.js";

/** Issue 18's targets for one worker on a durable server: time and WAL against (a). */
const TARGET = 1.0;
/** Issue 18's target for 2 workers: time against (a). */
const TARGET_2_WORKERS = 0.7;
const WAL_TARGET = 1.2;
const SOURCE: QualifiedName = { schema: "public", name: "bench_source" };
const TWIN = "bench_twin";
const SPEC = "range:created_at:month";

/** What one phase did: time, WAL, the source's rows left locked and their pages. */
interface Phase {
  seconds: number;
  walBytes: number;
  lockedRows: number;
  lockedPages: number;
  batches: number;
  /** pgshift without row locks: seconds in the cleanups (and waiting for the last ones). */
  cleanupSeconds: number;
  /** pgshift: seconds until the rows were copied (the copyComplete event); the rest is the index build and after. */
  copySeconds: number;
}

interface Run {
  a: Phase;
  b: Phase;
  c: Phase;
  /** (b) with each number of workers asked for (--workers), in that order. */
  w: Phase[];
  ratio: number;
  rssStartBytes: number;
  rssPeakBytes: number;
}

function usage(): string {
  return `usage: scripts/bench-backfill [--rows N] [--batch-size N] [--repeat K] [--durable] [--json] [--strict]
  --rows N         rows in bench_source (default 1000000)
  --batch-size N   pgshift backfill batch size (default 10000)
  --repeat K       alternate (a), (b) and (c) K times, report the medians (default 1)
  --durable        embedded server with production durability (fsync, synchronous_commit, full_page_writes on)
  --workers LIST   also (b) with each of these numbers of workers, e.g. 1,2,4 (target for 2: <= ${TARGET_2_WORKERS}x)
  --json           print the report as JSON on stdout
  --strict         exit 1 when the ratio is above ${TARGET}
Uses DATABASE_URL when set, else starts an embedded PostgreSQL.`;
}

const mb = (bytes: number) => (bytes / 1024 / 1024).toFixed(1);
const secs = (ms: number) => ms / 1000;

async function checkpoint(sql: Sql): Promise<void> {
  await sql`checkpoint`;
}

async function walLsn(sql: Sql): Promise<string> {
  return String((await sql`select pg_current_wal_insert_lsn()::text as l`)[0]?.l);
}

async function walSince(sql: Sql, from: string): Promise<number> {
  return Number((await sql`select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), ${from}::pg_lsn)::bigint as b`)[0]?.b);
}

/** The source's rows with a row lock left in xmax, and the pages that hold them. */
async function lockedInSource(sql: Sql): Promise<{ rows: number; pages: number }> {
  const r = await sql`select count(*)::bigint as rows, count(distinct (ctid::text::point)[0])::bigint as pages
                        from bench_source where xmax::text <> '0'`;
  return { rows: Number(r[0]?.rows), pages: Number(r[0]?.pages) };
}

/** Drops the bench tables (and a leftover migration of bench_source). */
async function dropBenchTables(sql: Sql): Promise<void> {
  const m = await loadMigration(sql, SOURCE);
  if (m) await abort(sql, SOURCE);
  await sql`drop table if exists ${sql(TWIN)}`;
  await sql`drop table if exists ${sql(SOURCE.name)}`;
}

/**
 * The twin: same columns, the same partitions pgshift computes (monthly over the data + premade + DEFAULT), same
 * indexes.
 */
async function createTwin(sql: Sql): Promise<number> {
  const r = await sql`select min(created_at)::text as min, max(created_at)::text as max from bench_source`;
  const partitions = computePartitions(
    parsePartitionSpec(SPEC),
    TWIN,
    "timestamptz",
    { min: r[0]?.min ?? null, max: r[0]?.max ?? null },
    {
      premake: 3,
      now: new Date(),
    },
  );
  await sql.begin(async (tx) => {
    await tx.unsafe(
      `create table ${TWIN} (like bench_source including defaults including constraints) partition by
        range (created_at)`,
    );
    for (const p of partitions)
      await tx.unsafe(`create table "${p.name}" partition of ${TWIN} ${p.bound} with (autovacuum_enabled = off)`);
    await tx.unsafe(`alter table ${TWIN} add primary key (id, created_at)`);
    await tx.unsafe(`create index on ${TWIN} (created_at)`);
  });
  return partitions.length;
}

async function runOnce(
  sql: Sql,
  rows: number,
  batchSize: number,
  say: (l: string) => void,
  k: number,
  workerCounts: number[],
): Promise<Run & { partitions: number }> {
  // (a) the single-statement limit
  const partitions = await createTwin(sql);
  await checkpoint(sql);
  say(`[${k}] (a) INSERT INTO ${TWIN} SELECT * FROM bench_source ...`);
  const w0 = await walLsn(sql);
  const t0 = performance.now();
  const ins = await sql.unsafe(`insert into ${TWIN} select * from bench_source`);
  const aMs = performance.now() - t0;
  const aWal = await walSince(sql, w0);
  if (ins.count !== rows) throw new Error(`baseline copied ${ins.count} rows, expected ${rows}`);
  const aLocked = await lockedInSource(sql);
  await sql.unsafe(`drop table ${TWIN}`);
  const a: Phase = {
    seconds: secs(aMs),
    walBytes: aWal,
    lockedRows: aLocked.rows,
    lockedPages: aLocked.pages,
    batches: 1,
    cleanupSeconds: 0,
    copySeconds: secs(aMs),
  };

  const rssStart = process.memoryUsage().rss;
  let rssPeak = rssStart;
  const pgshift = async (label: string, lockRows: boolean, workers = 1): Promise<Phase> => {
    await startMigration(sql, SOURCE, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
    await checkpoint(sql);
    say(
      `[${k}] ${label} pgshift backfill${lockRows ? " --lock-rows" : ""}${workers > 1 ? ` --workers ${workers}` : ""}` +
        `, batch size ${batchSize} ...`,
    );
    const sampler = setInterval(() => {
      rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
    }, 100);
    let result: Awaited<ReturnType<typeof backfill>>;
    const w = await walLsn(sql);
    const t = performance.now();
    let copyMs = Number.NaN;
    const off = on("copyComplete", () => {
      copyMs = performance.now() - t;
    });
    try {
      result = await backfill(sql, SOURCE, { batchSize, lockRows, workers });
    } finally {
      clearInterval(sampler);
      off();
    }
    const ms = performance.now() - t;
    const wal = await walSince(sql, w);
    rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
    if (!result.complete || result.rowsCopied !== rows)
      throw new Error(`backfill copied ${result.rowsCopied} rows (complete: ${result.complete}), expected ${rows}`);
    const m = await loadMigration(sql, SOURCE);
    const copied = await sql.unsafe(`select count(*)::bigint as n from "${m!.partitioned.name}"`);
    if (Number(copied[0]?.n) !== rows)
      throw new Error(`the shadow holds ${String(copied[0]?.n)} rows, expected ${rows}`);
    const locked = await lockedInSource(sql);
    // back to the starting state: no shadow, source frozen again (FOR SHARE leaves a locker xmax on every tuple)
    await abort(sql, SOURCE);
    await sql`vacuum (freeze) bench_source`;
    return {
      seconds: secs(ms),
      walBytes: wal,
      lockedRows: locked.rows,
      lockedPages: locked.pages,
      batches: result.batches,
      cleanupSeconds: result.cleanupMs / 1000,
      copySeconds: secs(copyMs),
    };
  };
  const b = await pgshift("(b)", false);
  const c = await pgshift("(c)", true);
  const w: Phase[] = [];
  for (const n of workerCounts) w.push(n === 1 ? b : await pgshift(`(w${n})`, false, n));
  return { a, b, c, w, ratio: b.seconds / a.seconds, rssStartBytes: rssStart, rssPeakBytes: rssPeak, partitions };
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      ...COMMON_OPTIONS,
      "batch-size": { type: "string" },
      durable: { type: "boolean", default: false },
      workers: { type: "string" },
    },
    strict: true,
    allowPositionals: false,
  });
  if (printedHelp(values, usage)) return 0;
  const rows = positiveInt("--rows", values.rows, 1_000_000);
  const batchSize = positiveInt("--batch-size", values["batch-size"], 10_000);
  const repeat = positiveInt("--repeat", values.repeat, 1);
  const workerCounts =
    values.workers === undefined ? [] : values.workers.split(",").map((x) => positiveInt("--workers", x.trim(), 1));
  const json = values.json === true;
  // progress lines go to stderr, so that --json output stays clean
  const say = (l: string) => process.stderr.write(`${l}\n`);
  setLogger(pino({ level: process.env.PGSHIFT_LOG_LEVEL ?? "error" }, destination(2)));

  const { sql, external, cleanup } = await openBenchSession({
    applicationName: "pgshift-bench",
    say,
    dropTables: dropBenchTables,
    durable: values.durable === true,
  });
  try {
    const v = await sql`select current_setting('server_version') as v, current_setting('shared_buffers') as sb,
                               current_setting('fsync') as fsync, current_setting('synchronous_commit') as sc`;
    const serverInfo =
      `PostgreSQL ${String(v[0]?.v)}${external ? "" : " (embedded)"}, ` +
      `shared_buffers=${String(v[0]?.sb)}, fsync=${String(v[0]?.fsync)}, synchronous_commit=${String(v[0]?.sc)}`;
    say(serverInfo);

    await dropBenchTables(sql);
    say(`building bench_source with ${fmtInt(rows)} rows ...`);
    const tb = performance.now();
    // Keys in insertion order, created_at rising with the key over 2 years up to now (with a few hours of jitter),
    // so both copies route rows to the partitions in the same, realistic order.
    await buildEventsTable(sql, SOURCE.name, rows);
    const size = await sql`select pg_total_relation_size('bench_source')::bigint as total,
        pg_relation_size('bench_source')::bigint as heap`;
    say(
      `built in ${secs(performance.now() - tb).toFixed(1)} s: heap ${mb(Number(size[0]?.heap))} MB, with ` +
        `indexes ${mb(Number(size[0]?.total))} MB`,
    );

    const runs: (Run & { partitions: number })[] = [];
    for (let k = 1; k <= repeat; k++) {
      const r = await runOnce(sql, rows, batchSize, say, k, workerCounts);
      say(
        `[${k}] a ${r.a.seconds.toFixed(2)} s, b ${r.b.seconds.toFixed(2)} s, c ${r.c.seconds.toFixed(2)} s, ` +
          `ratio b/a ${r.ratio.toFixed(2)}`,
      );
      runs.push(r);
    }

    const med = (f: (r: Run) => number) => median(runs.map(f));
    const phase = (p: "a" | "b" | "c") => ({
      seconds: med((r) => r[p].seconds),
      rowsPerSecond: rows / med((r) => r[p].seconds),
      walBytes: med((r) => r[p].walBytes),
      sourceRowsLocked: Math.max(...runs.map((r) => r[p].lockedRows)),
      sourcePagesDirtied: Math.max(...runs.map((r) => r[p].lockedPages)),
      batches: runs[0]![p].batches,
      cleanupSeconds: med((r) => r[p].cleanupSeconds),
    });
    const a = phase("a");
    const b = phase("b");
    const c = phase("c");
    const ratio = med((r) => r.ratio);
    const walRatio = med((r) => r.b.walBytes / r.a.walBytes);
    const rssStart = Math.min(...runs.map((r) => r.rssStartBytes));
    const rssPeak = Math.max(...runs.map((r) => r.rssPeakBytes));
    const pass =
      Number(ratio.toFixed(2)) <= TARGET && Number(walRatio.toFixed(2)) <= WAL_TARGET && b.sourcePagesDirtied === 0;
    const report = {
      rows,
      batchSize,
      repeat,
      durable: values.durable === true,
      partitions: runs[0]!.partitions,
      server: serverInfo,
      cpus: availableParallelism(),
      sourceBytes: { heap: Number(size[0]?.heap), total: Number(size[0]?.total) },
      a: { label: "INSERT INTO twin SELECT * FROM bench_source", ...a },
      b: { label: `pgshift backfill (no row locks), batch size ${batchSize}, 1 worker`, ...b },
      c: { label: `pgshift backfill --lock-rows (FOR SHARE), batch size ${batchSize}, 1 worker`, ...c },
      ratio: Number(ratio.toFixed(2)),
      lockRowsRatio: Number(med((r) => r.c.seconds / r.a.seconds).toFixed(2)),
      walRatio: Number(walRatio.toFixed(2)),
      lockRowsWalRatio: Number(med((r) => r.c.walBytes / r.a.walBytes).toFixed(2)),
      target: { time: TARGET, wal: WAL_TARGET, sourcePagesDirtied: 0 },
      pass,
      rss: { startBytes: rssStart, peakBytes: rssPeak, growthBytes: rssPeak - rssStart },
      workers: workerCounts.map((n, i) => ({
        workers: n,
        seconds: med((r) => r.w[i]!.seconds),
        copySeconds: med((r) => r.w[i]!.copySeconds),
        ratio: Number(med((r) => r.w[i]!.seconds / r.a.seconds).toFixed(2)),
        walBytes: med((r) => r.w[i]!.walBytes),
        walRatio: Number(med((r) => r.w[i]!.walBytes / r.a.walBytes).toFixed(2)),
        sourcePagesDirtied: Math.max(...runs.map((r) => r.w[i]!.lockedPages)),
        ...(n === 2 ? { target: TARGET_2_WORKERS } : {}),
      })),
      runs: runs.map((r) => ({
        a: r.a,
        b: r.b,
        c: r.c,
        w: r.w,
        ratio: Number(r.ratio.toFixed(3)),
        rssPeakBytes: r.rssPeakBytes,
      })),
    };

    if (json) {
      process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    } else {
      const out: string[] = [];
      const line = (label: string, value: string) => out.push(`${label.padEnd(30)}${value}`);
      out.push("", `pgshift backfill benchmark: ${serverInfo}, ${report.cpus} CPUs`);
      line(
        "rows",
        `${fmtInt(rows)} (heap ${mb(report.sourceBytes.heap)} MB, ${report.partitions} partitions incl. DEFAULT)`,
      );
      const show = (label: string, p: typeof a, extra = "") =>
        line(
          label,
          `${p.seconds.toFixed(2)} s   ${fmtInt(p.rowsPerSecond)} rows/s   WAL ${mb(p.walBytes)} MB   source rows ` +
            `locked ${fmtInt(p.sourceRowsLocked)}, pages dirtied ${fmtInt(p.sourcePagesDirtied)}${extra}`,
        );
      show("(a) INSERT ... SELECT", a);
      show(
        "(b) pgshift backfill",
        b,
        `   (${b.batches} batches of ${fmtInt(batchSize)}, cleanups ${b.cleanupSeconds.toFixed(2)} s, then the ` +
          `index build)`,
      );
      show("(c) backfill --lock-rows", c);
      line(
        "ratio (b)/(a)",
        `time ${ratio.toFixed(2)} (target <= ${TARGET.toFixed(2)}), WAL ${walRatio.toFixed(2)} (target <= ` +
          `${WAL_TARGET.toFixed(2)}), pages dirtied ${fmtInt(b.sourcePagesDirtied)} (target 0)   ` +
          `${pass ? "PASS" : "FAIL"}` +
          `${repeat > 1 ? `   (medians of ${repeat})` : ""}`,
      );
      line("ratio (c)/(a)", `time ${report.lockRowsRatio.toFixed(2)}, WAL ${report.lockRowsWalRatio.toFixed(2)}`);
      if (repeat > 1) line("ratios (b)/(a)", runs.map((r) => r.ratio.toFixed(2)).join(", "));
      for (const x of report.workers)
        line(
          `(b) with ${x.workers} worker${x.workers > 1 ? "s" : ""}`,
          `${x.seconds.toFixed(2)} s (copy ${x.copySeconds.toFixed(2)} s)   ratio to (a) ${x.ratio.toFixed(2)}` +
            (x.target !== undefined
              ? ` (target <= ${x.target.toFixed(2)}: ${x.ratio <= x.target ? "PASS" : "FAIL"})`
              : "") +
            `   WAL ${mb(x.walBytes)} MB (${x.walRatio.toFixed(2)}x)   source pages dirtied ` +
            fmtInt(x.sourcePagesDirtied),
        );
      line(
        "peak RSS during (b), (c)",
        `${mb(rssPeak)} MB (at start of (b): ${mb(rssStart)} MB, growth ${mb(rssPeak - rssStart)} MB)`,
      );
      process.stdout.write(`${out.join("\n")}\n`);
    }
    return values.strict && !pass ? 1 : 0;
  } finally {
    await cleanup();
  }
}

runBench("bench-backfill", usage, main);
