/**
 * pgshift maintain: keeps the partitions of a table pgshift partitioned in shape after finalize, from cron: premake
 * (premake.ts), the rows of DEFAULT moved into new partitions (default-move.ts), retention (retention.ts). One plan:
 * what --dry-run prints is what runs. Idempotent: a second run right after the first finds nothing to do.
 */
import type { Sql, TxSql } from "../db.js";
import { PgshiftError, sqlState } from "../errors.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import type { PartitionedTableRow } from "../migration/state.js";
import { lockMigration, unlockMigration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import { formatPartitionSpec } from "../partitioning/spec.js";
import {
  check,
  runSteps,
  runTransaction,
  type Step,
  statement,
  statementsOf,
  type TransactionStep,
  transactionStep,
} from "../plan/steps.js";
import { moveSql, oldestInDefault, requireMovable, requireNoDeleteTriggers, rowsInDefault } from "./default-move.js";
import { readLayout, type TableLayout } from "./partitions.js";
import { candidates, type NewPartition, premakes, topOf } from "./premake.js";
import { lastRunSql, listPartitioned, loadPartitioned, settingsSql } from "./registry.js";
import { cutoff, expired, retentionSteps } from "./retention.js";

export interface MaintainOptions {
  /** Partitions to keep ahead of now and of the newest row (default: the saved setting, 3 at first). */
  premake?: number;
  /** Retention (interval, or integer distance); null clears it; undefined: the saved setting. */
  retention?: string | null;
  /** Keep detached tables instead of dropping them (default: the saved setting). */
  retentionKeepTable?: boolean;
  /** Move rows out of DEFAULT (default true). */
  move?: boolean;
  /** Rows moved for one partition at most, under the lock (default 100000). */
  maxMoveRows?: number;
  dryRun?: boolean;
  lockTimeoutMs?: number;
  retries?: number;
  /** "Now" for premake (tests). */
  now?: Date;
}

/** What maintain did to one table (or, with dryRun, would do). */
export interface MaintainResult {
  table: string;
  spec: string;
  /** Partitions created (name, rows moved into it from DEFAULT). */
  created: { name: string; bound: string; rowsMoved: number }[];
  /** Partitions detached by retention, and whether dropped. */
  detached: { name: string; dropped: boolean }[];
  /** Rows left in DEFAULT (no partition for them: NULL, infinity, more than maxMoveRows, or not moved). */
  rowsLeftInDefault: number;
  /** Why nothing was premade (list and hash), when so. */
  note?: string;
  statements: string[];
  steps: Step[];
}

interface Planned {
  layout: TableLayout;
  result: MaintainResult;
  creates: { p: NewPartition; rows: number; step: TransactionStep; columns: string[] }[];
  retention: Step[];
}

async function plainColumns(sql: Sql, table: QualifiedName): Promise<string[]> {
  const r = await sql`
    select attname::text as n from pg_attribute where attrelid = to_regclass(${quoteQualified(table)}) and attnum > 0
       and not attisdropped and attgenerated = '' order by attnum`;
  return r.map((x) => String(x.n));
}

/**
 * The transaction that creates `p` and attaches it: the table standalone (LIKE the partitioned table, its indexes
 * included, so that ATTACH adopts them instead of building them), a CHECK of its bound (so that ATTACH skips the
 * scan of the new table), with `rows` > 0 the lock on the table and the move of DEFAULT's rows, the ATTACH
 * (SHARE UPDATE EXCLUSIVE on the table, ACCESS EXCLUSIVE on DEFAULT while it checks that DEFAULT holds no row of
 * the bound), the CHECK dropped.
 */
export function createStep(
  layout: TableLayout,
  row: PartitionedTableRow,
  p: NewPartition,
  rows: number,
  columns: string[],
  lockTimeoutMs: number,
): TransactionStep {
  const parent = quoteQualified(layout.table);
  const child = quoteQualified({ schema: layout.table.schema, name: p.name });
  const c = quoteIdent(row.spec.column);
  const t = layout.columnType;
  const lit = (v: string) => `'${v.replace(/'/g, "''")}'::${t}`;
  const check = quoteIdent(`${p.name.slice(0, 50)}_pgshift_bound`);
  const steps: Step[] = [];
  if (rows > 0)
    steps.push(statement(`LOCK TABLE ${parent} IN ACCESS EXCLUSIVE MODE`, "transaction", "the rows of DEFAULT move"));
  steps.push(
    statement(
      `CREATE TABLE ${child} (LIKE ${parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES ` +
        "INCLUDING STORAGE INCLUDING COMMENTS INCLUDING GENERATED)",
    ),
    statement(
      `ALTER TABLE ${child} ADD CONSTRAINT ${check} CHECK (${c} IS NOT NULL AND ${c} >= ${lit(p.from)} AND ` +
        `${c} < ${lit(p.to)})`,
    ),
  );
  if (rows > 0) steps.push(statement(moveSql(layout, row.spec, p, columns), "transaction", `about ${rows} rows`));
  steps.push(
    statement(`ALTER TABLE ${parent} ATTACH PARTITION ${child} ${p.bound}`),
    statement(`ALTER TABLE ${child} DROP CONSTRAINT ${check}`),
  );
  return transactionStep(steps, {
    lockTimeoutMs,
    why: rows > 0 ? `partition ${p.name}, with the rows of DEFAULT in its bound` : `premake ${p.name}`,
  });
}

async function planTable(sql: Sql, row: PartitionedTableRow, opts: MaintainOptions): Promise<Planned> {
  const table = { schema: row.table_schema, name: row.table_name };
  const lockTimeoutMs = opts.lockTimeoutMs ?? 500;
  const layout = await readLayout(sql, table, row.spec);
  const premake = opts.premake ?? row.premake;
  const retention = opts.retention === undefined ? row.retention : opts.retention;
  const keepTable = opts.retentionKeepTable ?? row.retention_keep_table;
  const move = opts.move ?? true;
  const maxMove = opts.maxMoveRows ?? 100_000;
  const result: MaintainResult = {
    table: displayName(table),
    spec: formatPartitionSpec(row.spec),
    created: [],
    detached: [],
    rowsLeftInDefault: 0,
    statements: [],
    steps: [],
  };
  const planned: Planned = { layout, result, creates: [], retention: [] };
  if (!premakes(row.spec)) {
    result.note = `${row.spec.strategy} partitioning: nothing to premake (${
      row.spec.strategy === "hash" ? "a hash partition set is complete" : "new values wait in DEFAULT"
    }), no retention by age`;
  } else if (layout.twoLevel) {
    result.note =
      "two levels: maintain premakes no partition and moves no row yet (a new first-level partition needs its " +
      "second level); retention applies";
  } else {
    const from = move ? await oldestInDefault(sql, layout, row.spec) : null;
    const all = await candidates(sql, layout, row.spec, { premake, now: opts.now ?? new Date(), from });
    const counts = await rowsInDefault(sql, layout, row.spec, all);
    const top = topOf(layout);
    if (move && counts.per.some((n) => n > 0)) {
      await requireMovable(sql, layout);
      await requireNoDeleteTriggers(sql, layout);
    }
    const columns = await plainColumns(sql, table);
    let moved = 0;
    all.forEach((p, i) => {
      const n = counts.per[i] ?? 0;
      // Below the top partition, only where DEFAULT holds rows; above it, every interval up to the premake.
      if (n === 0 && top !== null && p.lo < top) return;
      if (n > 0 && (!move || n > maxMove)) return;
      moved += n;
      const step = createStep(layout, row, p, n, columns, lockTimeoutMs);
      planned.creates.push({ p, rows: n, step, columns });
      result.created.push({ name: p.name, bound: p.bound, rowsMoved: n });
    });
    result.rowsLeftInDefault = counts.total - moved;
  }
  if (retention) {
    const cut = await cutoff(sql, layout, row.spec, retention);
    for (const p of expired(layout, cut)) {
      planned.retention.push(...retentionSteps(layout, p, { keepTable, lockTimeoutMs }));
      result.detached.push({ name: p.name, dropped: !keepTable });
    }
  }
  const settings = settingsSql(table, {
    premake: opts.premake,
    retention: opts.retention,
    retentionKeepTable: opts.retentionKeepTable,
  });
  result.steps = [
    check(`maintain ${displayName(table)} (${result.spec}): premake ${premake}, retention ${retention ?? "none"}`),
    ...planned.creates.map((x) => x.step),
    ...planned.retention,
    ...(settings ? [statement(settings, "session")] : []),
  ];
  return planned;
}

/**
 * Maintains `table` (a table pgshift partitioned and finalized): creates the partitions `premake` intervals ahead
 * of now and of the newest row, moves rows of DEFAULT into new partitions of their bound, applies the retention,
 * records the run in pgshift.partitioned_tables. Each partition is created in a transaction of its own (lock_timeout,
 * retries); a partition whose ATTACH finds rows that reached DEFAULT after the plan is created again with the move.
 * Holds the table's pgshift advisory lock meanwhile (two maintains never run at once on one table).
 * @throws PgshiftError (exit 2, nothing changed) when pgshift did not partition `table`, a migration of it is in
 *   progress, or an option is invalid; PgshiftError (55P03) when a lock is never granted in time.
 */
export async function maintain(sql: Sql, table: QualifiedName, opts: MaintainOptions = {}): Promise<MaintainResult> {
  const row = await loadPartitioned(sql, table, { upgrade: !opts.dryRun });
  if (row.hand_off === "pg_partman" && !opts.dryRun)
    throw new PgshiftError(`${displayName(table)} was handed off to pg_partman: its run_maintenance keeps it`, {
      hint: "CALL partman.run_maintenance_proc() from cron instead (or delete its row in pgshift.partitioned_tables)",
    });
  if (opts.dryRun) {
    const p = await planTable(sql, row, opts);
    p.result.statements = statementsOf(p.result.steps);
    return p.result;
  }
  await lockMigration(sql, table);
  try {
    const p = await planTable(sql, row, opts);
    const retry = { retries: opts.retries };
    for (const c of p.creates) {
      const started = Date.now();
      try {
        await runTransaction(sql, c.step, (tx: TxSql) => runSteps(tx, c.step.steps), retry);
      } catch (err) {
        // Rows of the bound reached DEFAULT after the plan: ATTACH refused (check_violation); move them too.
        if (sqlState(err) !== "23514" || c.rows > 0 || opts.move === false) throw err;
        const again = createStep(p.layout, row, c.p, 1, c.columns, opts.lockTimeoutMs ?? 500);
        await runTransaction(sql, again, (tx: TxSql) => runSteps(tx, again.steps), retry);
        c.step = again;
      }
      if (c.rows > 0) emit("blocked", { table: displayName(table), command: "maintain", ms: Date.now() - started });
      log().info({ table: displayName(table), partition: c.p.name, rowsMoved: c.rows }, "partition created");
    }
    await runSteps(sql, p.retention, { lockRetry: retry });
    const settings = p.result.steps.filter((s) => s.kind === "statement");
    await runSteps(sql, settings);
    p.result.steps = [p.result.steps[0]!, ...p.creates.map((c) => c.step), ...p.retention, ...settings];
    p.result.statements = statementsOf(p.result.steps);
    const { steps: _s, statements: _t, ...summary } = p.result;
    await sql.unsafe(lastRunSql(table, summary));
    return p.result;
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/** Maintains every table pgshift partitioned in this database (maintain, in name order). */
export async function maintainAll(sql: Sql, opts: MaintainOptions = {}): Promise<MaintainResult[]> {
  const out: MaintainResult[] = [];
  for (const row of await listPartitioned(sql)) {
    if (row.hand_off === "pg_partman") continue;
    out.push(await maintain(sql, { schema: row.table_schema, name: row.table_name }, opts));
  }
  return out;
}
