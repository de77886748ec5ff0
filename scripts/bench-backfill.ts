/**
 * Backfill benchmark: how close does pgshift's online, checkpointed, row-locking copy come to the fastest
 * possible copy, a single `INSERT INTO partitioned SELECT * FROM source`?
 *
 *   scripts/bench-backfill [--rows N] [--batch-size N] [--repeat K] [--json] [--strict]
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
 *     sampling the Node process's RSS every 100 ms;
 *  5. reports rows, seconds, rows/s, the ratio (b)/(a) against the target (<= 1.25) and the peak RSS.
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
  parsePartitionSpec,
  type QualifiedName,
  type Sql,
  setLogger,
  startMigration,
} from "../src/index.js";
import {
  COMMON_OPTIONS,
  fmtInt,
  median,
  openBenchSession,
  positiveInt,
  printedHelp,
  runBench,
} from "./bench-common.js";

const TARGET = 1.25;
const SOURCE: QualifiedName = { schema: "public", name: "bench_source" };
const TWIN = "bench_twin";
const SPEC = "range:created_at:month";

interface Run {
  aSeconds: number;
  bSeconds: number;
  ratio: number;
  batches: number;
  rssStartBytes: number;
  rssPeakBytes: number;
}

function usage(): string {
  return `usage: scripts/bench-backfill [--rows N] [--batch-size N] [--repeat K] [--json] [--strict]
  --rows N         rows in bench_source (default 1000000)
  --batch-size N   pgshift backfill batch size (default 10000)
  --repeat K       alternate (a) and (b) K times, report the median ratio (default 1)
  --json           print the report as JSON on stdout
  --strict         exit 1 when the ratio is above ${TARGET}
Uses DATABASE_URL when set, else starts an embedded PostgreSQL.`;
}

const mb = (bytes: number) => (bytes / 1024 / 1024).toFixed(1);
const secs = (ms: number) => ms / 1000;

async function checkpoint(sql: Sql): Promise<void> {
  await sql`checkpoint`;
}

/** Drops the bench tables (and a leftover migration of bench_source). */
async function dropBenchTables(sql: Sql): Promise<void> {
  const m = await loadMigration(sql, SOURCE);
  if (m) await abort(sql, SOURCE);
  await sql`drop table if exists ${sql(TWIN)}`;
  await sql`drop table if exists ${sql(SOURCE.name)}`;
}

async function buildSource(sql: Sql, rows: number): Promise<void> {
  await sql`
    create table bench_source (
      id bigint primary key,
      created_at timestamptz not null,
      customer text not null,
      amount numeric(12,2) not null,
      payload jsonb not null
    ) with (autovacuum_enabled = off)`;
  await sql`create index bench_source_created_at_idx on bench_source (created_at)`;
  // Keys in insertion order, created_at rising with the key over 2 years up to now (with a few hours of
  // jitter, as in a real table), so both copies route rows to the partitions in the same, realistic order.
  await sql`
    insert into bench_source (id, created_at, customer, amount, payload)
    select i,
           now() - interval '730 days' + (i - 1) * (interval '730 days' / ${rows}::int) + ((i * 7919) % 21600) *
             interval '1 second',
           'customer-' || lpad((i * 31 % 50000)::text, 6, '0'),
           ((i * 104729) % 10000000) / 100.0,
           jsonb_build_object('sku', 'SKU-' || (i % 5000), 'qty', 1 + i % 9, 'tags', jsonb_build_array(i % 10, i % 7),
             'note', md5(i::text))
      from generate_series(1, ${rows}::bigint) i`;
  await sql`vacuum (freeze, analyze) bench_source`;
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
): Promise<Run & { partitions: number }> {
  // (a) the single-statement limit
  const partitions = await createTwin(sql);
  await checkpoint(sql);
  say(`[${k}] (a) INSERT INTO ${TWIN} SELECT * FROM bench_source ...`);
  let t0 = performance.now();
  const ins = await sql.unsafe(`insert into ${TWIN} select * from bench_source`);
  const aMs = performance.now() - t0;
  if (ins.count !== rows) throw new Error(`baseline copied ${ins.count} rows, expected ${rows}`);
  await sql.unsafe(`drop table ${TWIN}`);

  // (b) pgshift
  await startMigration(sql, SOURCE, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
  await checkpoint(sql);
  say(`[${k}] (b) pgshift backfill, batch size ${batchSize} ...`);
  const rssStart = process.memoryUsage().rss;
  let rssPeak = rssStart;
  const sampler = setInterval(() => {
    rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
  }, 100);
  let result: Awaited<ReturnType<typeof backfill>>;
  t0 = performance.now();
  try {
    result = await backfill(sql, SOURCE, { batchSize });
  } finally {
    clearInterval(sampler);
  }
  const bMs = performance.now() - t0;
  rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
  if (!result.complete || result.rowsCopied !== rows)
    throw new Error(`backfill copied ${result.rowsCopied} rows (complete: ${result.complete}), expected ${rows}`);
  const m = await loadMigration(sql, SOURCE);
  const copied = await sql.unsafe(`select count(*)::bigint as n from "${m!.partitioned.name}"`);
  if (Number(copied[0]?.n) !== rows) throw new Error(`the shadow holds ${String(copied[0]?.n)} rows, expected ${rows}`);

  // back to the starting state: no shadow, source frozen again (FOR SHARE left a locker xmax on every tuple)
  await abort(sql, SOURCE);
  await sql`vacuum (freeze) bench_source`;

  return {
    aSeconds: secs(aMs),
    bSeconds: secs(bMs),
    ratio: bMs / aMs,
    batches: result.batches,
    rssStartBytes: rssStart,
    rssPeakBytes: rssPeak,
    partitions,
  };
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      ...COMMON_OPTIONS,
      "batch-size": { type: "string" },
    },
    strict: true,
    allowPositionals: false,
  });
  if (printedHelp(values, usage)) return 0;
  const rows = positiveInt("--rows", values.rows, 1_000_000);
  const batchSize = positiveInt("--batch-size", values["batch-size"], 10_000);
  const repeat = positiveInt("--repeat", values.repeat, 1);
  const json = values.json === true;
  // progress lines go to stderr, so that --json output stays clean
  const say = (l: string) => process.stderr.write(`${l}\n`);
  setLogger(pino({ level: process.env.PGSHIFT_LOG_LEVEL ?? "error" }, destination(2)));

  const { sql, external, cleanup } = await openBenchSession({
    applicationName: "pgshift-bench",
    say,
    dropTables: dropBenchTables,
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
    await buildSource(sql, rows);
    const size = await sql`select pg_total_relation_size('bench_source')::bigint as total,
        pg_relation_size('bench_source')::bigint as heap`;
    say(
      `built in ${secs(performance.now() - tb).toFixed(1)} s: heap ${mb(Number(size[0]?.heap))} MB, with ` +
        `indexes ${mb(Number(size[0]?.total))} MB`,
    );

    const runs: (Run & { partitions: number })[] = [];
    for (let k = 1; k <= repeat; k++) {
      const r = await runOnce(sql, rows, batchSize, say, k);
      say(`[${k}] a ${r.aSeconds.toFixed(2)} s, b ${r.bSeconds.toFixed(2)} s, ratio ${r.ratio.toFixed(2)}`);
      runs.push(r);
    }

    const ratio = median(runs.map((r) => r.ratio));
    const aSeconds = median(runs.map((r) => r.aSeconds));
    const bSeconds = median(runs.map((r) => r.bSeconds));
    const rssStart = Math.min(...runs.map((r) => r.rssStartBytes));
    const rssPeak = Math.max(...runs.map((r) => r.rssPeakBytes));
    const pass = Number(ratio.toFixed(2)) <= TARGET;
    const report = {
      rows,
      batchSize,
      repeat,
      partitions: runs[0]!.partitions,
      server: serverInfo,
      cpus: availableParallelism(),
      sourceBytes: { heap: Number(size[0]?.heap), total: Number(size[0]?.total) },
      a: { label: "INSERT INTO twin SELECT * FROM bench_source", seconds: aSeconds, rowsPerSecond: rows / aSeconds },
      b: {
        label: `pgshift backfill, batch size ${batchSize}, 1 worker`,
        seconds: bSeconds,
        rowsPerSecond: rows / bSeconds,
        batches: runs[0]!.batches,
      },
      ratio: Number(ratio.toFixed(2)),
      target: TARGET,
      pass,
      rss: { startBytes: rssStart, peakBytes: rssPeak, growthBytes: rssPeak - rssStart },
      runs: runs.map((r) => ({
        aSeconds: r.aSeconds,
        bSeconds: r.bSeconds,
        ratio: Number(r.ratio.toFixed(3)),
        rssPeakBytes: r.rssPeakBytes,
      })),
    };

    if (json) {
      process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    } else {
      const out: string[] = [];
      const line = (label: string, value: string) => out.push(`${label.padEnd(26)}${value}`);
      out.push("", `pgshift backfill benchmark: ${serverInfo}, ${report.cpus} CPUs`);
      line(
        "rows",
        `${fmtInt(rows)} (heap ${mb(report.sourceBytes.heap)} MB, ${report.partitions} partitions incl. DEFAULT)`,
      );
      line("(a) INSERT ... SELECT", `${aSeconds.toFixed(2)} s   ${fmtInt(report.a.rowsPerSecond)} rows/s`);
      line(
        "(b) pgshift backfill",
        `${bSeconds.toFixed(2)} s   ${fmtInt(report.b.rowsPerSecond)} rows/s   (${report.b.batches} batches ` +
          `of ${fmtInt(batchSize)}, then the secondary index built CONCURRENTLY per partition)`,
      );
      line(
        "ratio (b)/(a)",
        `${ratio.toFixed(2)}   target <= ${TARGET.toFixed(2)}   ` +
          `${pass ? "PASS" : "FAIL"}${repeat > 1 ? `   (median of ${repeat})` : ""}`,
      );
      if (repeat > 1) line("ratios", runs.map((r) => r.ratio.toFixed(2)).join(", "));
      line(
        "peak RSS during (b)",
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
