import { readFile, statfs } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { z } from "zod";
import type { Sql } from "../db.js";
import { fitName, type QualifiedName, quoteLiteral, quoteQualified } from "../names.js";
import { columnList } from "../sql/statement.js";

/**
 * What `plan` predicts of the backfill (the copy and the index builds after it), and where the figures came from.
 *
 * Two sources:
 * - statistics (always): pg_class.reltuples and relpages, pg_relation_size, pg_indexes_size, pg_stats.avg_width,
 *   the table's fillfactor, the indexes built after the copy, and rates per row and per byte measured on a
 *   2-core machine (PREDICT_RATES): disk and WAL from the row's width, time from those rates;
 * - a sample copy (`plan --sample-copy[=rows]`): the same copy on a few thousand rows into a scratch table in a
 *   transaction that is rolled back, timed, its WAL read from pg_current_wal_insert_lsn() before and after,
 *   its size from pg_total_relation_size(); scaled to the table's rows.
 */
export interface Prediction {
  /** "statistics" or "sample" (a sample copy's measurements, scaled to the table's rows). */
  source: "statistics" | "sample";
  /** Rows the prediction is for: pg_class.reltuples (0 when the table was never analyzed). */
  rows: number;
  /** The backfill's duration: the copy, then the index builds (CREATE INDEX CONCURRENTLY), then ANALYZE, ms. */
  durationMs: number;
  copyMs: number;
  indexBuildMs: number;
  /**
   * The ANALYZE of the partitioned table that ends the backfill, ms: it samples up to 300 x the statistics target
   * rows (30,000 by default) of the whole table and as many again of each leaf partition (docs: ANALYZE, "the
   * partitions are analyzed too"), so it grows with the number of partitions more than with the rows.
   */
  analyzeMs: number;
  /** What the partitioned table will take on disk after the backfill: heap, TOAST and every index, bytes. */
  diskBytes: number;
  heapBytes: number;
  indexBytes: number;
  /** WAL the backfill writes (the copy, the row locks on the source, the index builds), bytes. */
  walBytes: number;
  /**
   * Logical mode: WAL the replication slot may retain by the end of the backfill if nothing consumes it during
   * the copy (pgshift sync not running): the server's WAL rate now times the duration, plus the copy's own WAL;
   * bytes. Null in trigger mode.
   */
  slotRetainedBytes: number | null;
  /** The server's WAL rate, read from two pg_current_wal_lsn() a second apart (logical mode), bytes/s. */
  serverWalBytesPerSecond: number | null;
  /** Free space of the file system that holds the table's tablespace, or why it is unknown. */
  freeDisk: FreeDisk;
  /** Which inputs the prediction came from, one line each for a person. */
  inputs: string[];
  /** What the figures leave out, one line each. */
  excludes: string[];
  /** Estimates above the free disk, and unknown inputs. */
  warnings: string[];
  /** The sample copy, when one ran: its statements (all of them, in order) and what it measured. */
  sample: SampleResult | null;
}

export type FreeDisk =
  | { known: true; bytes: number; path: string; how: string }
  | { known: false; bytes: null; why: string };

/** What a sample copy measured (sampleCopy). */
export interface SampleResult {
  /** Every statement the sample ran, in order, as run: BEGIN ... ROLLBACK. */
  statements: string[];
  /** Rows copied. */
  rows: number;
  /** The INSERT ... SELECT, ms. */
  copyMs: number;
  /** The index builds on the scratch table, ms. */
  indexBuildMs: number;
  /** WAL of the copy, and of the index builds, bytes (pg_current_wal_insert_lsn() differences). */
  copyWalBytes: number;
  indexWalBytes: number;
  /** pg_table_size (heap, TOAST, free space and visibility maps) of the scratch table at the end, bytes. */
  tableBytes: number;
  /** pg_indexes_size of the scratch table at the end (its key and the indexes built after the copy), bytes. */
  indexBytes: number;
  /** ANALYZE of the scratch table (all its rows: fewer than ANALYZE's sample), ms. */
  analyzeMs: number;
}

/**
 * Rates for a prediction from statistics alone, measured on a 2-core machine with PostgreSQL 15 to 17 and
 * production durability (an INSERT ... SELECT of 200,000 to 1,000,000 rows; CREATE INDEX CONCURRENTLY). A
 * faster server takes less time; `--sample-copy` measures the server itself.
 */
export const PREDICT_RATES = {
  /** Copy: µs per row, plus µs per byte of new heap (the row's width). */
  copyUsPerRow: 3,
  copyUsPerHeapByte: 0.02,
  /** Index build: µs per row per index, with CREATE INDEX CONCURRENTLY's second scan and waits. */
  indexUsPerRow: 1.5,
  /** The backfill's fixed cost (connect, state, the steps around the copy), ms. */
  fixedMs: 500,
  /** CREATE INDEX CONCURRENTLY against the sample's plain CREATE INDEX (two scans of the table, waits). */
  concurrentlyFactor: 1.6,
  /**
   * Index build: ms per partition and index besides its rows (CREATE INDEX CONCURRENTLY's three transactions and
   * their waits, the ATTACH PARTITION transaction, the catalog reads), which a sample's plain CREATE INDEX does not
   * show: about 10 ms on an idle machine with fsync off, more with commits flushed and much more under load.
   */
  indexMsPerPartition: 30,
  /**
   * ANALYZE: µs per row it samples (reading the row's page and computing the columns' statistics); measured on the
   * bench-scale `events` table (5 columns, text and jsonb among them), 29 monthly partitions, about 900,000 rows
   * sampled: 4.4 to 5.4 µs on an idle machine, up to 11 under load.
   */
  analyzeUsPerSampledRow: 4.5,
} as const;

/** Rows ANALYZE samples of a table per unit of statistics target (docs: ANALYZE; analyze.c: 300 x target). */
const ANALYZE_ROWS_PER_TARGET = 300;

/**
 * Rows the ANALYZE of the partitioned table samples: up to 300 x `statisticsTarget` of the whole table, and as
 * many again of each leaf partition (the rows taken as spread evenly over `partitions` leaves; 0: one table).
 */
export function analyzeSampledRows(rows: number, partitions: number, statisticsTarget = 100): number {
  const cap = ANALYZE_ROWS_PER_TARGET * statisticsTarget;
  const r = Math.max(0, rows);
  const leaves = Math.max(1, partitions);
  return Math.min(r, cap) + (partitions > 0 ? Math.min(r, cap * leaves) : 0);
}

/** PostgreSQL's page layout (docs: "Database Page Layout"): header 24 bytes, line pointer 4, tuple header 23. */
const PAGE_HEADER = 24;
const LINE_POINTER = 4;
const TUPLE_HEADER = 23;
const MAXALIGN = 8;
/** WAL record overhead of one heap insert: XLogRecord 24, block reference ~5, xl_heap_insert 3, xl_heap_header 5. */
const WAL_INSERT_OVERHEAD = 40;
/** WAL of one btree insert beyond its index tuple: XLogRecord 24, block reference ~5, offset 2, tuple header 8. */
const WAL_BTREE_OVERHEAD = 40;
/** WAL of one row lock (Heap/LOCK, xl_heap_lock): measured 54 bytes a row (issue 18's pg_waldump). */
const WAL_ROW_LOCK = 54;
/** A freshly built btree fills its leaves to 90 % (docs: CREATE INDEX, fillfactor's default for B-trees). */
const BTREE_FILL = 0.9;

const align = (n: number, a = MAXALIGN) => Math.ceil(n / a) * a;

/** The index builds' cost besides the rows: PREDICT_RATES.indexMsPerPartition per partition and index, ms. */
const perPartitionIndexMs = (i: Pick<PredictInputs, "partitions" | "deferredIndexBytes">, rows: number) =>
  rows > 0 ? Math.max(1, i.partitions) * i.deferredIndexBytes.length * PREDICT_RATES.indexMsPerPartition : 0;

/** What predictFromStatistics needs of the table, read by readPredictInputs (or given by a test). */
export interface PredictInputs {
  /** pg_class.reltuples (-1 when never analyzed). */
  rows: number;
  /** pg_class.relpages, and pg_relation_size (main fork), bytes. */
  relpages: number;
  heapBytes: number;
  /** TOAST (with its index), bytes: pg_total_relation_size - pg_relation_size - pg_indexes_size, less FSM and VM. */
  toastBytes: number;
  /** pg_indexes_size of the source, bytes. */
  indexBytes: number;
  /** The sum of pg_stats.avg_width over the copied columns, bytes; null when a column has no statistics. */
  rowWidth: number | null;
  /** avg_width of the shadow's key columns (with the partition columns), bytes; null without statistics. */
  keyWidth: number | null;
  /** Size of the source's key index (the shadow's is created at start and filled by the copy), bytes. */
  keyIndexBytes: number;
  /** Source sizes of the indexes built after the copy, bytes. */
  deferredIndexBytes: number[];
  /** The table's fillfactor (storage parameter), percent; 100 by default. */
  fillfactor: number;
  /** current_setting('block_size'), bytes. */
  blockSize: number;
  /** Leaf partitions of the shadow (empty ones still take a page per index). */
  partitions: number;
  /**
   * Whether the copy locks each source row (FOR SHARE): a Heap/LOCK record a row and, with full_page_writes on,
   * a full-page image of each source page (the first change of a page after a checkpoint writes its image).
   */
  rowLocks: boolean;
  /** current_setting('full_page_writes') = 'on'. */
  fullPageWrites: boolean;
  /** current_setting('default_statistics_target') (100 when not given). */
  statisticsTarget?: number;
}

/**
 * The prediction from statistics alone (pure arithmetic; units: rows, bytes, ms):
 * - heap: rows / floor(usable page / tuple) pages, a tuple being MAXALIGN(23 + row width) + a 4-byte line
 *   pointer and the usable page (block size - 24) x fillfactor; without pg_stats, the source's heap; plus TOAST
 *   as the source has it;
 * - indexes: the key index from the key's width at 90 % leaf fill (or the source's), the deferred ones as the
 *   source's, plus a page per index per partition;
 * - WAL: a heap insert record per row (tuple + 40 bytes) and a btree insert per row (index tuple + 40), a Heap/LOCK
 *   record per row and a full-page image per source page when rows are locked, TOAST and the index builds
 *   (CREATE INDEX writes the whole index to WAL);
 * - time: PREDICT_RATES; ANALYZE from the rows it samples (analyzeSampledRows).
 */
export function predictFromStatistics(i: PredictInputs): {
  copyMs: number;
  indexBuildMs: number;
  analyzeMs: number;
  heapBytes: number;
  indexBytes: number;
  walBytes: number;
} {
  const rows = Math.max(0, i.rows);
  const bs = i.blockSize;
  let heap: number;
  let tupleData: number;
  if (i.rowWidth !== null && rows > 0) {
    // The null bitmap is ignored: a row of nulls is narrower in avg_width by more than its bitmap.
    tupleData = i.rowWidth;
    const tuple = align(TUPLE_HEADER + i.rowWidth) + LINE_POINTER;
    const usable = Math.floor(((bs - PAGE_HEADER) * Math.min(100, Math.max(10, i.fillfactor))) / 100);
    const perPage = Math.max(1, Math.floor(usable / tuple));
    heap = Math.ceil(rows / perPage) * bs;
  } else {
    heap = i.heapBytes;
    tupleData = rows > 0 ? i.heapBytes / rows - TUPLE_HEADER - LINE_POINTER : 0;
  }
  const keyIndex =
    i.keyWidth !== null && rows > 0
      ? Math.ceil((rows * (align(8 + i.keyWidth) + LINE_POINTER)) / ((bs - PAGE_HEADER - 16) * BTREE_FILL)) * bs * 1.01
      : i.keyIndexBytes;
  const deferred = i.deferredIndexBytes.reduce((a, b) => a + b, 0);
  const perPartition = i.partitions * (1 + i.deferredIndexBytes.length) * bs;
  const indexBytes = Math.round(keyIndex + deferred + perPartition);
  const heapBytes = Math.round(heap + i.toastBytes);
  const copyWal =
    rows * (align(tupleData + TUPLE_HEADER) + WAL_INSERT_OVERHEAD) +
    rows * (align(8 + (i.keyWidth ?? 16)) + WAL_BTREE_OVERHEAD) +
    i.toastBytes +
    (i.rowLocks ? rows * WAL_ROW_LOCK + (i.fullPageWrites ? i.relpages * bs : 0) : 0);
  const walBytes = Math.round(copyWal + deferred * 1.02);
  const copyMs = (rows * PREDICT_RATES.copyUsPerRow + heap * PREDICT_RATES.copyUsPerHeapByte) / 1000;
  const indexBuildMs =
    (rows * i.deferredIndexBytes.length * PREDICT_RATES.indexUsPerRow) / 1000 + perPartitionIndexMs(i, rows);
  const analyzeMs =
    rows > 0
      ? (analyzeSampledRows(rows, i.partitions, i.statisticsTarget) * PREDICT_RATES.analyzeUsPerSampledRow) / 1000
      : 0;
  return {
    copyMs: Math.round(copyMs + PREDICT_RATES.fixedMs),
    indexBuildMs: Math.round(indexBuildMs),
    analyzeMs: Math.round(analyzeMs),
    heapBytes,
    indexBytes,
    walBytes,
  };
}

/**
 * The prediction from a sample copy (pure arithmetic): each measurement divided by the sample's rows, times the
 * table's rows; the index builds' time times PREDICT_RATES.concurrentlyFactor (the real builds run CONCURRENTLY,
 * partition by partition); plus a page per index per partition and the fixed cost; ANALYZE: the sample's ANALYZE per
 * row times the rows the partitioned table's ANALYZE samples (analyzeSampledRows).
 */
export function predictFromSample(
  i: Pick<PredictInputs, "rows" | "partitions" | "deferredIndexBytes" | "blockSize" | "statisticsTarget">,
  s: SampleResult,
): ReturnType<typeof predictFromStatistics> {
  const rows = Math.max(0, i.rows);
  const scale = s.rows > 0 ? rows / s.rows : 0;
  const perPartition = i.partitions * (1 + i.deferredIndexBytes.length) * i.blockSize;
  return {
    copyMs: Math.round(s.copyMs * scale + PREDICT_RATES.fixedMs),
    indexBuildMs: Math.round(s.indexBuildMs * scale * PREDICT_RATES.concurrentlyFactor + perPartitionIndexMs(i, rows)),
    analyzeMs:
      s.rows > 0 ? Math.round((s.analyzeMs / s.rows) * analyzeSampledRows(rows, i.partitions, i.statisticsTarget)) : 0,
    heapBytes: Math.round(s.tableBytes * scale),
    indexBytes: Math.round(s.indexBytes * scale + perPartition),
    walBytes: Math.round((s.copyWalBytes + s.indexWalBytes) * scale),
  };
}

const Stats = z.object({
  reltuples: z.coerce.number(),
  relpages: z.coerce.number(),
  heap: z.coerce.number(),
  total: z.coerce.number(),
  indexes: z.coerce.number(),
  fsm_vm: z.coerce.number(),
  block_size: z.coerce.number(),
  fpw: z.boolean(),
  stats_target: z.coerce.number(),
  fillfactor: z.coerce.number().nullable(),
  spcoid: z.coerce.number(),
  spclocation: z.string().nullable(),
});

/** What readPredictInputs needs of the plan. */
export interface PredictTarget {
  source: QualifiedName;
  oid: number;
  copyColumns: string[];
  shadowKey: string[];
  /** Original index names of the indexes built after the copy. */
  deferredOriginals: string[];
  partitions: number;
  rowLocks: boolean;
}

/** Reads the statistics the prediction uses (PredictInputs) and the table's tablespace location. */
export async function readPredictInputs(
  sql: Sql,
  t: PredictTarget,
): Promise<{ inputs: PredictInputs; tablespace: string | null; missingStats: string[] }> {
  const r = Stats.parse(
    (
      await sql`
    select c.reltuples, c.relpages, pg_relation_size(c.oid) as heap, pg_total_relation_size(c.oid) as total,
           pg_indexes_size(c.oid) as indexes,
           pg_relation_size(c.oid, 'fsm') + pg_relation_size(c.oid, 'vm') as fsm_vm,
           current_setting('block_size')::int as block_size, current_setting('full_page_writes') = 'on' as fpw,
           current_setting('default_statistics_target')::int as stats_target,
           (select split_part(o, '=', 2)::int from unnest(c.reloptions) o where o like 'fillfactor=%') as fillfactor,
           c.reltablespace as spcoid,
           case when c.reltablespace = 0 then null else pg_tablespace_location(c.reltablespace) end as spclocation
      from pg_class c where c.oid = ${t.oid}`
    )[0],
  );
  const widths = await sql`
    select a.attname::text as name, s.avg_width
      from pg_attribute a left join pg_stats s
        on s.schemaname = ${t.source.schema} and s.tablename = ${t.source.name} and s.attname = a.attname
     where a.attrelid = ${t.oid} and a.attnum > 0 and not a.attisdropped`;
  const width = new Map(widths.map((w) => [String(w.name), w.avg_width === null ? null : Number(w.avg_width)]));
  const sum = (cols: string[]) =>
    cols.every((c) => typeof width.get(c) === "number") ? cols.reduce((a, c) => a + (width.get(c) ?? 0), 0) : null;
  const missingStats = t.copyColumns.filter((c) => typeof width.get(c) !== "number");
  const idx = await sql`
    select i.indexrelid::regclass::text as name, c.relname::text as relname, i.indisprimary as primary,
           pg_relation_size(i.indexrelid) as bytes
      from pg_index i join pg_class c on c.oid = i.indexrelid where i.indrelid = ${t.oid}`;
  const key = idx.find((x) => x.primary) ?? null;
  const deferredIndexBytes = t.deferredOriginals.map((n) => Number(idx.find((x) => x.relname === n)?.bytes ?? 0));
  return {
    inputs: {
      rows: r.reltuples,
      relpages: r.relpages,
      heapBytes: r.heap,
      toastBytes: Math.max(0, r.total - r.heap - r.indexes - r.fsm_vm),
      indexBytes: r.indexes,
      rowWidth: sum(t.copyColumns),
      keyWidth: sum(t.shadowKey),
      keyIndexBytes: Number(key?.bytes ?? 0),
      deferredIndexBytes,
      fillfactor: r.fillfactor ?? 100,
      blockSize: r.block_size,
      fullPageWrites: r.fpw,
      statisticsTarget: r.stats_target,
      partitions: t.partitions,
      rowLocks: t.rowLocks,
    },
    tablespace: r.spclocation,
    missingStats,
  };
}

/**
 * The free space of the file system that holds the table's tablespace, when this process can see it: the
 * tablespace's location (pg_tablespace_location, readable by everyone) or, for the default tablespace, the
 * server's data_directory (readable by superusers and members of pg_read_all_settings), if that directory exists
 * on this host and its PG_VERSION is the server's major version (fs.statfs: available blocks x block size).
 * Otherwise unknown, with the reason.
 */
export async function readFreeDisk(sql: Sql, tablespace: string | null): Promise<FreeDisk> {
  let path = tablespace;
  let how = "the table's tablespace location";
  if (!path) {
    const r = await sql`
      select case when (select rolsuper from pg_roles where rolname = current_user)
                    or pg_has_role(current_user, 'pg_read_all_settings', 'usage')
                  then current_setting('data_directory') end as dir,
             current_setting('server_version_num')::int / 10000 as major`;
    const dir = r[0]?.dir as string | null;
    if (!dir)
      return {
        known: false,
        bytes: null,
        why:
          "the server's data_directory is readable only by superusers and members of pg_read_all_settings; " +
          "check the free space of the server's disk yourself",
      };
    const major = Number(r[0]?.major);
    const version = await readFile(join(dir, "PG_VERSION"), "utf8").catch(() => null);
    if (version === null || Number(version.trim()) !== major)
      return {
        known: false,
        bytes: null,
        why: `the server's data directory (${dir}) is not readable on this host (the server runs elsewhere)`,
      };
    path = dir;
    how = "the server's data_directory, on this host";
  }
  try {
    const s = await statfs(path);
    return { known: true, bytes: Number(s.bavail) * Number(s.bsize), path, how };
  } catch (err) {
    return {
      known: false,
      bytes: null,
      why: `${path} is not readable on this host (${err instanceof Error ? err.message : String(err)})`,
    };
  }
}

/** The rate at which the server writes WAL now: two pg_current_wal_lsn() `intervalMs` apart, bytes/s. */
export async function readServerWalRate(sql: Sql, intervalMs = 1000): Promise<number> {
  const a = await sql`select pg_current_wal_lsn()::text as lsn, clock_timestamp() as at`;
  await new Promise((r) => setTimeout(r, intervalMs));
  const b = await sql`
    select pg_wal_lsn_diff(pg_current_wal_lsn(), ${String(a[0]?.lsn)}::pg_lsn)::float8 as bytes,
           extract(epoch from clock_timestamp() - ${a[0]?.at as Date})::float8 as seconds`;
  const bytes = Number(b[0]?.bytes);
  const seconds = Number(b[0]?.seconds);
  return seconds > 0 ? Math.max(0, bytes / seconds) : 0;
}

/**
 * Whether backfill's copy locks each source row (its batches' `SELECT ... FOR SHARE`, batchStatements in
 * src/backfill/backfill.ts): in either mode only with `backfill --lock-rows`; the default copy takes no row lock and
 * cleans each batch's range afterwards (src/backfill/cleanup.ts), in logical mode as in trigger mode. The sample
 * copy does the same, and the estimate from statistics counts the locks' WAL.
 * plan has no `--lock-rows`: it predicts the default copy, so the answer is false in both modes.
 * @param _mode the migration's mirror mode (kept for callers; since issue 18 the answer no longer depends on it).
 */
export const copyLocksRows = (_mode: string): boolean => false;

/** Rows a sample copy takes when `--sample-copy` is given without a number. */
export const DEFAULT_SAMPLE_ROWS = 20_000;

export interface SampleOptions {
  source: QualifiedName;
  copyColumns: string[];
  shadowKey: string[];
  /** What follows USING of each index built after the copy (DeferredIndex.definition). */
  indexDefinitions: string[];
  /** The table's row estimate (reltuples), for the TABLESAMPLE percentage. */
  estimatedRows: number;
  rows: number;
  rowLocks: boolean;
  /** statement_timeout of the sample's transaction, ms (default 60,000). */
  statementTimeoutMs?: number;
  /** lock_timeout of the sample's transaction, ms (default 1,000). */
  lockTimeoutMs?: number;
}

/** The name of the scratch table of a sample copy: `<table>_pgshift_sample`, in the table's schema. */
export function sampleTableName(source: QualifiedName): QualifiedName {
  return { schema: source.schema, name: fitName(source.name, "_pgshift_sample") };
}

/**
 * The statements of a sample copy, in order, as run: a transaction that creates the scratch table (the copied
 * columns, the shadow's key), copies about `rows` rows sampled by page (TABLESAMPLE SYSTEM, FOR SHARE when the
 * copy locks rows, as backfill's batches do), builds the deferred indexes on it, reads its sizes, ANALYZEs it
 * (timed: the backfill ends with an ANALYZE of the partitioned table), and is rolled back: the scratch table never
 * exists for anyone else, and is gone when the transaction ends, also when a statement fails or the client goes
 * away (the server rolls back a session's transaction when it ends).
 * The measuring queries (pg_current_wal_insert_lsn(), sizes) are in the list too.
 */
export function sampleStatements(o: SampleOptions): string[] {
  const scratch = quoteQualified(sampleTableName(o.source));
  const src = quoteQualified(o.source);
  const cols = columnList(o.copyColumns);
  const pct = o.estimatedRows > 0 ? Math.min(100, Math.max(0.0001, ((o.rows * 1.5) / o.estimatedRows) * 100)) : 100;
  const lsn = "SELECT pg_current_wal_insert_lsn()::text AS lsn";
  const regclass = quoteLiteral(scratch);
  return [
    "BEGIN",
    `SET LOCAL lock_timeout = '${o.lockTimeoutMs ?? 1000}ms'`,
    `SET LOCAL statement_timeout = '${o.statementTimeoutMs ?? 60_000}ms'`,
    `CREATE TABLE ${scratch} (LIKE ${src})`,
    `ALTER TABLE ${scratch} ADD PRIMARY KEY (${columnList(o.shadowKey)})`,
    lsn,
    `INSERT INTO ${scratch} (${cols}) SELECT ${cols} FROM ${src} TABLESAMPLE SYSTEM (${Number(pct.toFixed(4))}) ` +
      `LIMIT ${o.rows}${o.rowLocks ? " FOR SHARE" : ""}`,
    lsn,
    ...o.indexDefinitions.map((d) => `CREATE INDEX ON ${scratch} USING ${d}`),
    lsn,
    `SELECT pg_table_size(${regclass}) AS heap, pg_indexes_size(${regclass}) AS indexes`,
    `ANALYZE ${scratch}`,
    "ROLLBACK",
  ];
}

class SampleDone extends Error {}

/**
 * Runs a sample copy (sampleStatements) on one connection and returns what it measured. Nothing stays: the
 * transaction is rolled back, on success as on error.
 * @throws the first failing statement's error (e.g. lock_timeout or statement_timeout), after the rollback.
 */
export async function sampleCopy(sql: Sql, o: SampleOptions): Promise<SampleResult> {
  const statements = sampleStatements(o);
  // BEGIN and ROLLBACK are postgres.js's begin(); the body runs in between, one statement at a time.
  const body = statements.slice(1, -1);
  const n = o.indexDefinitions.length;
  let result: SampleResult | null = null;
  try {
    await sql.begin(async (tx) => {
      const run = async (i: number) => {
        const t0 = performance.now();
        const rows = await tx.unsafe(body[i]!);
        return { rows, ms: performance.now() - t0 };
      };
      // 0-1 SET LOCAL, 2 CREATE TABLE, 3 its key, 4 LSN, 5 the copy, 6 LSN, the n indexes, LSN, sizes, ANALYZE.
      for (let i = 0; i < 4; i++) await run(i);
      const l0 = String((await run(4)).rows[0]?.lsn);
      const copy = await run(5);
      const l1 = String((await run(6)).rows[0]?.lsn);
      let indexMs = 0;
      for (let i = 0; i < n; i++) indexMs += (await run(7 + i)).ms;
      const l2 = String((await run(7 + n)).rows[0]?.lsn);
      const sizes = (await run(8 + n)).rows[0];
      const analyze = await run(9 + n);
      const diff = await tx`
        select pg_wal_lsn_diff(${l1}::pg_lsn, ${l0}::pg_lsn)::float8 as copy,
               pg_wal_lsn_diff(${l2}::pg_lsn, ${l1}::pg_lsn)::float8 as idx`;
      result = {
        statements,
        rows: copy.rows.count,
        copyMs: Math.round(copy.ms),
        indexBuildMs: Math.round(indexMs),
        copyWalBytes: Number(diff[0]?.copy),
        indexWalBytes: Number(diff[0]?.idx),
        tableBytes: Number(sizes?.heap),
        indexBytes: Number(sizes?.indexes),
        analyzeMs: Math.round(analyze.ms),
      };
      throw new SampleDone("rolled back");
    });
  } catch (err) {
    if (!(err instanceof SampleDone)) throw err;
  }
  if (!result) throw new Error("the sample copy measured nothing");
  return result;
}

export interface PredictOptions extends PredictTarget {
  mode: "trigger" | "logical";
  /** The plan's index definitions built after the copy (DeferredIndex.definition), for the sample. */
  indexDefinitions: string[];
  /** Rows of a sample copy, or null for statistics alone. */
  sampleRows: number | null;
  /** How long between the two reads of the server's WAL position (logical mode), ms (default 1,000). */
  walRateIntervalMs?: number;
}

/**
 * The prediction for a plan (Prediction): statistics, then (with `sampleRows`) a sample copy, the server's WAL
 * rate in logical mode, and the free disk where it can be read.
 * @throws the sample copy's error (nothing stays of it).
 */
export async function predictBackfill(sql: Sql, o: PredictOptions): Promise<Prediction> {
  const { inputs, tablespace, missingStats } = await readPredictInputs(sql, o);
  const warnings: string[] = [];
  const inputLines: string[] = [];
  const rows = Math.max(0, inputs.rows);
  if (inputs.rows < 0) warnings.push("the table was never analyzed: run ANALYZE, the prediction assumes 0 rows");
  inputLines.push(
    `statistics: ${rows} rows (pg_class.reltuples), ${inputs.relpages} pages, heap ${inputs.heapBytes} bytes, ` +
      `TOAST ${inputs.toastBytes} bytes, indexes ${inputs.indexBytes} bytes, fillfactor ${inputs.fillfactor}`,
  );
  if (inputs.rowWidth !== null) inputLines.push(`row width: ${inputs.rowWidth} bytes (sum of pg_stats.avg_width)`);
  else
    inputLines.push(
      `row width: from the heap's size (no pg_stats for ${missingStats.join(", ")}; ANALYZE gives a closer figure)`,
    );
  inputLines.push(
    `indexes: the key, filled by the copy, and ${inputs.deferredIndexBytes.length} built after it; ` +
      `${o.partitions} partitions`,
  );
  let sample: SampleResult | null = null;
  let est: ReturnType<typeof predictFromStatistics>;
  if (o.sampleRows !== null) {
    sample = await sampleCopy(sql, {
      source: o.source,
      copyColumns: o.copyColumns,
      shadowKey: o.shadowKey,
      indexDefinitions: o.indexDefinitions,
      estimatedRows: rows,
      rows: o.sampleRows,
      rowLocks: o.rowLocks,
    });
    inputLines.push(
      `sample copy: ${sample.rows} rows in ${sample.copyMs} ms, ${sample.copyWalBytes} bytes of WAL, ` +
        `${sample.tableBytes + sample.indexBytes} bytes; index builds ${sample.indexBuildMs} ms, ` +
        `${sample.indexWalBytes} bytes of WAL; ANALYZE ${sample.analyzeMs} ms (rolled back)`,
    );
    if (sample.rows === 0) warnings.push("the sample copy found no rows: the prediction is from statistics alone");
  }
  if (sample && sample.rows > 0) est = predictFromSample(inputs, sample);
  else {
    est = predictFromStatistics(inputs);
    inputLines.push(
      `rates: ${PREDICT_RATES.copyUsPerRow} µs a row and ${PREDICT_RATES.copyUsPerHeapByte} µs a byte to copy, ` +
        `${PREDICT_RATES.indexUsPerRow} µs a row per index to build, ${PREDICT_RATES.analyzeUsPerSampledRow} µs a ` +
        `row ANALYZE samples (measured on a 2-core machine; --sample-copy measures this server)`,
    );
  }
  let serverWal: number | null = null;
  let retained: number | null = null;
  const durationMs = est.copyMs + est.indexBuildMs + est.analyzeMs;
  if (o.mode === "logical") {
    serverWal = await readServerWalRate(sql, o.walRateIntervalMs ?? 1000);
    retained = Math.round((serverWal * durationMs) / 1000 + est.walBytes);
    inputLines.push(`server's WAL rate: ${Math.round(serverWal)} bytes/s (two pg_current_wal_lsn() a second apart)`);
  }
  const freeDisk = await readFreeDisk(sql, tablespace);
  const diskBytes = est.heapBytes + est.indexBytes;
  if (freeDisk.known) {
    if (diskBytes > freeDisk.bytes)
      warnings.push(
        `the partitioned table needs about ${diskBytes} bytes, more than the ${freeDisk.bytes} bytes free at ` +
          `${freeDisk.path}`,
      );
    else if (retained !== null && diskBytes + retained > freeDisk.bytes)
      warnings.push(
        `the partitioned table and the WAL the slot may retain need about ${diskBytes + retained} bytes, more ` +
          `than the ${freeDisk.bytes} bytes free at ${freeDisk.path} (if pg_wal is on that file system)`,
      );
  }
  return {
    source: sample && sample.rows > 0 ? "sample" : "statistics",
    rows,
    durationMs,
    copyMs: est.copyMs,
    indexBuildMs: est.indexBuildMs,
    analyzeMs: est.analyzeMs,
    diskBytes,
    heapBytes: est.heapBytes,
    indexBytes: est.indexBytes,
    walBytes: est.walBytes,
    slotRetainedBytes: retained,
    serverWalBytesPerSecond: serverWal === null ? null : Math.round(serverWal),
    freeDisk,
    inputs: inputLines,
    excludes: [
      "rows written during the migration (the mirror's writes land in the shadow as they happen)",
      "waits: throttles, pauses, lock waits, and --batch-time-ms pacing between batches",
      "the WAL that checkpoints add as full-page images of the shadow's pages, and pg_wal's own room " +
        "(up to max_wal_size)",
      "the original table, kept as the retired table until finalize (its disk is freed by finalize)",
    ],
    warnings,
    sample,
  };
}
