import { readRanges } from "./backfill/ranges.js";
import { columnDrift, indexDrift, lateObjectLines } from "./catalog/drift.js";
import type { AnySql, Sql } from "./db.js";
import { pendingValidations } from "./dependents/foreign-keys.js";
import { pendingRebuilds } from "./dependents/materialized-views.js";
import { PgshiftError } from "./errors.js";
import { type Liveness, liveness, nextStepFor } from "./liveness.js";
import { ddlGuardState } from "./migration/ddl-guard.js";
import { leftoverStream } from "./migration/finish.js";
import { type BackfillRangeRow, loadMigration, type Phase, type VerifyResult } from "./migration/state.js";
import { type SlotState, slotState } from "./mirror/logical.js";
import { type MirrorHealth, mirrorFor } from "./mirror/mirror.js";
import { displayName, type QualifiedName, quoteQualified } from "./names.js";
import { formatSpecs } from "./partitioning/spec.js";

export interface StatusReport {
  table: string;
  phase: Phase;
  mode: string;
  partitionBy: string;
  /**
   * The next step, from the phase and from what runs now (nextStepFor): "wait: ..." while a command works on the
   * migration.
   */
  next: string;
  /**
   * Whether a pgshift process works on the migration right now (pid, command, since when), and when its last batch or
   * applied change happened.
   */
  running: Liveness;
  /** Names of the tables as they are now. */
  live: string;
  copy: string;
  partitioned: string;
  partitions: number;
  rowsCopied: number;
  rowsEstimated: number;
  /** 0-100, or null before the backfill starts. */
  percent: number | null;
  /**
   * Backfill rows per second (average since the backfill started, pauses included) while a backfill runs; null when
   * none runs.
   */
  rate: number | null;
  /**
   * Seconds until the copy is done at that rate while a backfill runs (0 once the backfill finished); null when none
   * runs.
   */
  etaSeconds: number | null;
  batches: number;
  /**
   * The key ranges of a backfill with parallel workers (backfill --workers), in order, each with its bounds (key
   * values as text; null: open), checkpoint, rows and batches copied there and whether it is done; empty when the
   * copy is not split.
   */
  ranges: BackfillRangeRow[];
  /**
   * pgshift pause: who paused the copy and the verify (current_user of the pausing session), from where (its
   * application_name and client address) and since when (ISO 8601); null when not paused.
   */
  paused: { by: string | null; client: string | null; since: string } | null;
  /**
   * What a running backfill or verify waits for now (a throttle's reason: the signal, its value and its limit)
   * and since when (ISO 8601); null when nothing runs or it does not wait.
   */
  throttle: { reason: string; since: string } | null;
  /**
   * The backfill's batch size in use (rows, kept by the last batch), its target duration (ms; null: fixed-size
   * batches) and how long the last batch took (ms); null before the first batch.
   */
  batch: { rows: number; targetMs: number | null; lastMs: number | null } | null;
  /** Rows in the DEFAULT partition: rows outside the planned bounds. */
  defaultPartition: { name: string; rows: number } | null;
  /**
   * Rows per partition, both levels (partitionRows): each first-level partition, followed by its own when it
   * is partitioned itself.
   */
  partitionRows: PartitionRows[];
  mirror: MirrorHealth;
  /**
   * Column differences between the live table, its copy and the columns the mirror copies (columnDrift): empty when
   * they agree; cutover, swap-back and verify refuse otherwise.
   */
  schemaDrift: string[];
  /**
   * Indexes created on the live table during the migration that the copy lacks, and what the next cutover or swap-back
   * builds for each before its lock (indexDrift).
   */
  indexDrift: string[];
  /**
   * Other objects created during the migration that the next cutover or swap-back would leave with the other
   * table (views, triggers, policies, functions, foreign keys, row-type columns, ...: it refuses until they are
   * moved; each line says how), and what depends on the copy (lateObjectLines).
   */
  lateObjects: string[];
  /**
   * Work a switch left for carried-over objects (src/dependents) to do after its COMMIT that has not finished, one
   * line each with what finishes it: a materialized view not yet rebuilt from the live table (pendingRebuilds), a
   * foreign key of another table referencing the live table not yet validated (pendingValidations).
   */
  pending: string[];
  /**
   * The DDL guard (event triggers pgshift_ddl_guard, pgshift_drop_guard and pgshift_partition_guard: column
   * changes, DROP of either table, and detaching, dropping or attaching with rows a partition refused during
   * the migration): "on", "disabled" (one of them disabled) or "missing" (one of them missing).
   */
  ddlGuard: "on" | "disabled" | "missing";
  /** Logical mode, while the slot exists: where the stream stands. */
  stream: (SlotState & { appliedCommitTime: string | null; warnings: string[] }) | null;
  lastVerify: VerifyResult | null;
  startedAt: string;
  backfillStartedAt: string | null;
  backfillFinishedAt: string | null;
  cutoverAt: string | null;
  swappedBackAt: string | null;
}

async function streamStatus(
  sql: Sql,
  slot: string,
  appliedAt: Date | null,
  maxRetained: number,
): Promise<StatusReport["stream"]> {
  const s = await slotState(sql, slot);
  const warnings: string[] = [];
  if (!s.exists)
    warnings.push(
      `replication slot ${slot} does not exist: the shadow no longer follows the table (pgshift abort, ` +
        `then start again)`,
    );
  if (s.retainedBytes > maxRetained)
    warnings.push(
      `slot ${slot} retains ${s.retainedBytes} bytes of WAL (more than ${maxRetained}): run pgshift sync, or abort`,
    );
  if (s.invalidated !== null) {
    warnings.push(
      `replication slot ${slot} was invalidated by PostgreSQL (${s.invalidated}): the WAL it needed is gone and the ` +
        `shadow can no longer follow the table (pgshift abort, then start again)`,
    );
  } else if (s.walStatus === "unreserved") {
    warnings.push(
      `slot ${slot} retains more WAL than max_slot_wal_keep_size allows: PostgreSQL invalidates it at the next ` +
        `checkpoint unless pgshift sync catches up now`,
    );
  }
  if (s.exists && !s.active && s.invalidated === null)
    warnings.push(
      `no consumer is attached to slot ${slot}: WAL piles up until pgshift sync (or backfill, verify, ` +
        `cutover) streams it`,
    );
  return { ...s, appliedCommitTime: appliedAt?.toISOString() ?? null, warnings };
}

/**
 * The state of the migration of `table`: phase, backfill progress, DEFAULT partition rows, mirror health,
 * last verify result, and whether a pgshift process works on it right now (liveness; rate and ETA only then)
 * with the next step that follows from all that (nextStepFor). Read-only (an older pgshift schema is read as it is, not
 * upgraded); takes no lock, so it
 * works while another command runs.
 * @throws PgshiftError when no migration of `table` exists.
 */
export async function status(
  sql: Sql,
  table: QualifiedName,
  opts: { maxRetainedWalBytes?: number } = {},
): Promise<StatusReport> {
  const m = await loadMigration(sql, table, { upgrade: false });
  if (!m) {
    const left = await leftoverStream(sql, table);
    if (left) {
      throw new PgshiftError(
        `no migration of ${displayName(table)} is in progress, but a crashed start left replication ` +
          `slot ${left.slot ?? "-"} / publication ${left.publication ?? "-"} behind ` +
          `(retaining ${left.retainedBytes} bytes of WAL)`,
        { hint: `remove them with: pgshift abort ${displayName(table)}` },
      );
    }
    throw new PgshiftError(`no migration of ${displayName(table)} is in progress`, {
      hint: `start one with: pgshift start ${displayName(table)} --partition-by <spec>`,
    });
  }
  const parts = await sql`
    select c.relname::text as name, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' as is_default
      from pg_inherits i join pg_class c on c.oid = i.inhrelid
     where i.inhparent = to_regclass(${quoteQualified(m.partitioned)})`;
  const def = parts.find((p) => p.is_default);
  const partitionRowsList = await partitionRows(sql, m.partitioned);
  let defaultPartition: StatusReport["defaultPartition"] = null;
  if (def) {
    const part = quoteQualified({ schema: m.partitioned.schema, name: String(def.name) });
    const r = await sql.unsafe(`select count(*)::bigint as n from ${part}`);
    defaultPartition = { name: String(def.name), rows: Number(r[0]?.n ?? 0) };
  }
  const stream = m.slot_name
    ? await streamStatus(sql, m.slot_name, m.applied_commit_time, opts.maxRetainedWalBytes ?? 1024 ** 3)
    : null;
  const running = await liveness(sql, table, m, stream);
  const started = m.backfill_started_at?.getTime();
  const end = m.backfill_finished_at?.getTime() ?? Date.now();
  const secs = started ? (end - started) / 1000 : 0;
  // A rate and an ETA only while a backfill runs: after a crash they would promise progress nobody makes.
  const rate = started && secs > 0 && running.backfillRunning ? m.rows_copied / secs : null;
  const finished = m.backfill_finished_at !== null;
  const est = Math.max(m.rows_estimated, m.rows_copied);
  return {
    table: displayName(table),
    phase: m.phase,
    mode: m.mode,
    partitionBy: formatSpecs(m.spec),
    next: m.paused_at
      ? `paused (pgshift pause): run pgshift resume ${displayName(table)}; then ${nextStepFor(m, table, running)}`
      : nextStepFor(m, table, running),
    running,
    live: displayName(m.live),
    copy: displayName(m.copy),
    partitioned: displayName(m.partitioned),
    partitions: parts.length,
    rowsCopied: m.rows_copied,
    rowsEstimated: est,
    percent: finished ? 100 : started ? (est > 0 ? Math.min(100, (100 * m.rows_copied) / est) : 0) : null,
    rate,
    etaSeconds: finished ? 0 : rate ? Math.max(0, est - m.rows_copied) / rate : null,
    batches: m.batches,
    ranges: await readRanges(sql, m),
    paused: m.paused_at ? { by: m.paused_by, client: m.paused_client, since: m.paused_at.toISOString() } : null,
    // Kept by the running command; one that died while waiting leaves it behind: shown only while one runs.
    throttle:
      m.throttle_reason && running.holder
        ? { reason: m.throttle_reason, since: (m.throttle_since ?? m.updated_at).toISOString() }
        : null,
    batch: m.batch_rows !== null ? { rows: m.batch_rows, targetMs: m.batch_target_ms, lastMs: m.last_batch_ms } : null,
    defaultPartition,
    partitionRows: partitionRowsList,
    mirror: await mirrorFor(m.mode).health(sql, m),
    schemaDrift: await columnDrift(sql, m),
    indexDrift: await indexDrift(sql, m),
    lateObjects: await lateObjectLines(sql, m),
    pending: [
      ...(await pendingRebuilds(sql, m)).map(
        (p) =>
          `${p.label} still reads ${displayName(m.copy)}: its rebuild from ${displayName(m.live)} after the last ` +
          `switch did not finish; ${m.phase === "cutover" ? "pgshift finalize finishes it first, and " : ""}the next ` +
          `switch makes it read the table then live`,
      ),
      ...(await pendingValidations(sql, m)),
    ],
    ddlGuard: await ddlGuardState(sql).then((g) => (g.enabled ? "on" : g.installed ? "disabled" : "missing")),
    stream,
    lastVerify: m.last_verify,
    startedAt: m.created_at.toISOString(),
    backfillStartedAt: m.backfill_started_at?.toISOString() ?? null,
    backfillFinishedAt: m.backfill_finished_at?.toISOString() ?? null,
    cutoverAt: m.cutover_at?.toISOString() ?? null,
    swappedBackAt: m.swapped_back_at?.toISOString() ?? null,
  };
}

/** One partition in status (StatusReport.partitionRows). */
export interface PartitionRows {
  name: string;
  /** 1: a partition of the partitioned table; 2: a partition of a first-level partition (two levels). */
  level: number;
  /** The first-level partition a second-level one belongs to; null at level 1. */
  parent: string | null;
  /** `FOR VALUES ...` or `DEFAULT`, as pg_get_expr prints it. */
  bound: string;
  /** Whether it is partitioned itself (its rows are the sum of its partitions'). */
  partitioned: boolean;
  /**
   * Rows: for a DEFAULT partition counted (count(*): rows outside the planned bounds, expected few); for
   * the others the live-row estimate of the cumulative statistics (pg_stat_all_tables.n_live_tup, kept by
   * every insert and delete, reported within a second or so; a partitioned one: the sum over its partitions).
   */
  rows: number;
  /** Whether `rows` is a count (DEFAULT) rather than the estimate. */
  exact: boolean;
}

/**
 * Rows per partition of `table` at every level (pg_partition_tree), in tree order: a first-level partition, then
 * its own partitions. DEFAULT partitions are counted (count(*)), the others estimated (PartitionRows.rows).
 */
export async function partitionRows(sql: AnySql, table: QualifiedName): Promise<PartitionRows[]> {
  const rows = await sql`
    select c.relname::text as name, t.level, p.relname::text as parent, not t.isleaf as partitioned,
           coalesce(pg_catalog.pg_get_expr(c.relpartbound, c.oid), '') as bound,
           coalesce((select sum(s.n_live_tup) from pg_catalog.pg_partition_tree(t.relid) l
                       join pg_catalog.pg_stat_all_tables s on s.relid = l.relid where l.isleaf), 0)::bigint as est,
           n.nspname::text as schema
      from pg_catalog.pg_partition_tree(to_regclass(${quoteQualified(table)})) t
      join pg_catalog.pg_class c on c.oid = t.relid
      join pg_catalog.pg_namespace n on n.oid = c.relnamespace
      left join pg_catalog.pg_class p on p.oid = t.parentrelid
     where t.level > 0
     order by case when t.level = 1 then c.relname else p.relname end, t.level, c.relname`;
  const out: PartitionRows[] = [];
  for (const r of rows) {
    const bound = String(r.bound);
    const isDefault = bound === "DEFAULT";
    let n = Number(r.est);
    if (isDefault) {
      const q = quoteQualified({ schema: String(r.schema), name: String(r.name) });
      n = Number((await sql.unsafe(`select count(*)::bigint as n from ${q}`))[0]?.n ?? 0);
    }
    out.push({
      name: String(r.name),
      level: Number(r.level),
      parent: Number(r.level) > 1 ? String(r.parent) : null,
      bound,
      partitioned: Boolean(r.partitioned),
      rows: n,
      exact: isDefault,
    });
  }
  return out;
}
