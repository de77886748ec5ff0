/**
 * pgshift maintain: keeps the partitions of a table pgshift partitioned in shape after finalize, from cron: premake
 * (premake.ts), the rows of DEFAULT moved into new partitions (default-move.ts), retention (retention.ts). One plan:
 * what --dry-run prints is what runs. Idempotent: a second run right after the first finds nothing to do.
 */
import type { Sql } from "../db.js";
import { PgshiftError, sqlState } from "../errors.js";
import { LockSite, lockedTransaction, runLocked } from "../locks/holders.js";
import { log } from "../log.js";
import type { PartitionedTableRow } from "../migration/state.js";
import { lockMigration, unlockMigration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import { formatPartitionSpec } from "../partitioning/spec.js";
import { check, type Step, statement, statementsOf, type TransactionStep } from "../plan/steps.js";
import {
  boundCheckName,
  boundCheckSql,
  foreignKeysOf,
  leftoverSteps,
  likeParentSql,
  type MoveRun,
  oldestInDefault,
  planMove,
  primaryKey,
  requireMovable,
  rowsInDefault,
  stagedMove,
} from "./default-move.js";
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
  /** Move rows out of DEFAULT (default true), online (default-move.ts). */
  move?: boolean;
  /** Target duration of one batch of the move's copy, ms (default 50). */
  batchTimeMs?: number;
  /** Rows per batch of the move's copy at most (default 5000). */
  batchSize?: number;
  dryRun?: boolean;
  /** lock_timeout of each lock on the table, ms (default 500). */
  lockTimeoutMs?: number;
  /** Attempts after a lock timeout (default: db.ts's). */
  retries?: number;
  /** Terminate sessions holding a conflicting lock for at least this long, ms (default: never). */
  terminateAfterMs?: number | null;
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
  /** Rows left in DEFAULT (no partition for them: infinite values, or --no-move). */
  rowsLeftInDefault: number;
  /**
   * The online move of DEFAULT's rows, when one ran: rows copied (the count of DEFAULT's rows when the copy read
   * them), batches, and how long the switch held the table locked (writes blocked), ms.
   */
  move?: MoveRun;
  /** Why nothing was premade (list and hash), when so. */
  note?: string;
  statements: string[];
  steps: Step[];
}

interface Planned {
  layout: TableLayout;
  result: MaintainResult;
  /** What an interrupted move left, removed first. */
  leftovers: Step[];
  /** The partitions' creation: the online move's steps, or one transaction per premade partition. */
  creates: Step[];
  move: MoveRun | null;
  /** Whether the plan resumes an interrupted move (and only that: maintain then plans again). */
  resumed: boolean;
  retention: Step[];
  settings: Step[];
}

async function plainColumns(sql: Sql, table: QualifiedName): Promise<string[]> {
  const r = await sql`
    select attname::text as n from pg_attribute where attrelid = to_regclass(${quoteQualified(table)}) and attnum > 0
       and not attisdropped and attgenerated = '' order by attnum`;
  return r.map((x) => String(x.n));
}

/**
 * The transaction that premakes `p` (no row of DEFAULT in its bound): the table standalone (LIKE the partitioned
 * table, its indexes included, so that ATTACH adopts them instead of building them), a CHECK of its bound (so
 * that ATTACH skips the scan of the new table), the ATTACH (SHARE UPDATE EXCLUSIVE on the table, ACCESS
 * EXCLUSIVE on DEFAULT while it checks that DEFAULT holds no row of the bound: that lock looked at before and
 * requested with LockSite), the CHECK dropped.
 */
export function premakeStep(
  layout: TableLayout,
  row: PartitionedTableRow,
  p: NewPartition,
  opts: { lockTimeoutMs: number; terminateAfterMs?: number | null },
): TransactionStep {
  const parent = quoteQualified(layout.table);
  const child = { schema: layout.table.schema, name: p.name };
  const steps: Step[] = [statement(likeParentSql(layout.table, child)), statement(boundCheckSql(layout, row.spec, p))];
  const sites: LockSite[] = [];
  if (layout.defaultPartition) {
    const def = { schema: layout.table.schema, name: layout.defaultPartition };
    const site = new LockSite([{ table: def, mode: "ACCESS EXCLUSIVE" }], {
      table: displayName(layout.table),
      command: "maintain: premake",
      lockTimeoutMs: opts.lockTimeoutMs,
      terminateAfterMs: opts.terminateAfterMs ?? null,
    });
    sites.push(site);
    steps.push(...site.steps(statement(`LOCK TABLE ${quoteQualified(def)} IN ACCESS EXCLUSIVE MODE`)));
  }
  steps.push(
    statement(`ALTER TABLE ${parent} ATTACH PARTITION ${quoteQualified(child)} ${p.bound}`),
    statement(`ALTER TABLE ${quoteQualified(child)} DROP CONSTRAINT ${quoteIdent(boundCheckName(p))}`),
  );
  return lockedTransaction(steps, { lockTimeoutMs: opts.lockTimeoutMs, why: `premake ${p.name}` }, sites);
}

async function planTable(sql: Sql, row: PartitionedTableRow, opts: MaintainOptions): Promise<Planned> {
  const table = { schema: row.table_schema, name: row.table_name };
  const lockTimeoutMs = opts.lockTimeoutMs ?? 500;
  const locks = { lockTimeoutMs, terminateAfterMs: opts.terminateAfterMs ?? null };
  const layout = await readLayout(sql, table, row.spec);
  const premake = opts.premake ?? row.premake;
  const retention = opts.retention === undefined ? row.retention : opts.retention;
  const keepTable = opts.retentionKeepTable ?? row.retention_keep_table;
  const move = opts.move ?? true;
  const result: MaintainResult = {
    table: displayName(table),
    spec: formatPartitionSpec(row.spec),
    created: [],
    detached: [],
    rowsLeftInDefault: 0,
    statements: [],
    steps: [],
  };
  const staged = move && premakes(row.spec) && !layout.twoLevel ? await stagedMove(sql, layout) : null;
  const planned: Planned = {
    layout,
    result,
    leftovers: staged ? [] : await leftoverSteps(sql, layout, locks),
    creates: [],
    move: null,
    resumed: false,
    retention: [],
    settings: [],
  };
  if (staged) {
    // A move interrupted before its switch, whole: its copy runs again, then the switch; then the plan again.
    const counts = await rowsInDefault(sql, layout, row.spec, staged);
    result.created = staged.map((p, i) => ({ name: p.name, bound: p.bound, rowsMoved: counts.per[i] ?? 0 }));
    result.rowsLeftInDefault = counts.total - counts.per.reduce((a, b) => a + b, 0);
    const mp = planMove(
      sql,
      {
        layout,
        spec: row.spec,
        columns: await plainColumns(sql, table),
        key: await primaryKey(sql, table),
        foreignKeys: [],
      },
      staged,
      { ...locks, batchTimeMs: opts.batchTimeMs, batchSize: opts.batchSize, resume: true },
    );
    planned.creates = mp.steps;
    planned.move = mp.run;
    planned.resumed = true;
    result.steps = [
      check(`maintain ${displayName(table)}: resume the move of DEFAULT's rows interrupted before its switch`),
      ...planned.creates,
      check("then maintain plans again, from the partitions the switch leaves (premake, moves, retention)"),
    ];
    return planned;
  }
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
    const parts: NewPartition[] = [];
    let moved = 0;
    all.forEach((p, i) => {
      const n = counts.per[i] ?? 0;
      // Below the top partition, only where DEFAULT holds rows; above it, every interval up to the premake.
      if (n === 0 && top !== null && p.lo < top) return;
      if (n > 0 && !move) return;
      moved += n;
      parts.push(p);
      result.created.push({ name: p.name, bound: p.bound, rowsMoved: n });
    });
    result.rowsLeftInDefault = counts.total - moved;
    if (moved > 0) {
      // Rows of DEFAULT in the new partitions: every new partition goes through the online move.
      await requireMovable(sql, layout);
      const columns = await plainColumns(sql, table);
      const key = await primaryKey(sql, table);
      const foreignKeys = await foreignKeysOf(sql, table);
      const mp = planMove(sql, { layout, spec: row.spec, columns, key, foreignKeys }, parts, {
        ...locks,
        batchTimeMs: opts.batchTimeMs,
        batchSize: opts.batchSize,
      });
      planned.creates = mp.steps;
      planned.move = mp.run;
    } else planned.creates = parts.map((p) => premakeStep(layout, row, p, locks));
  }
  if (retention) {
    const cut = await cutoff(sql, layout, row.spec, retention);
    for (const p of expired(layout, cut)) {
      planned.retention.push(...retentionSteps(layout, p, { keepTable, ...locks }));
      result.detached.push({ name: p.name, dropped: !keepTable });
    }
  }
  const settings = settingsSql(table, {
    premake: opts.premake,
    retention: opts.retention,
    retentionKeepTable: opts.retentionKeepTable,
  });
  if (settings) planned.settings = [statement(settings, "session")];
  result.steps = [
    check(`maintain ${displayName(table)} (${result.spec}): premake ${premake}, retention ${retention ?? "none"}`),
    ...planned.leftovers,
    ...planned.creates,
    ...planned.retention,
    ...planned.settings,
  ];
  return planned;
}

/**
 * Maintains `table` (a table pgshift partitioned and finalized): removes what an interrupted move left, creates
 * the partitions `premake` intervals ahead of now and of the newest row, moves the rows of DEFAULT into new
 * partitions of their bound online (default-move.ts: staging table, mirror, batched copy, a switch that holds the
 * table locked for catalog changes only), applies the retention, records the run in pgshift.partitioned_tables.
 * Every lock on the table is looked at before and requested with a short lock_timeout, retried (LockSite). A
 * premade partition whose ATTACH finds rows that reached DEFAULT after the plan (check_violation) makes maintain
 * plan again, and move them. Holds the table's pgshift advisory lock meanwhile (two maintains never run at once on
 * one table).
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
    const lockRetry = opts.retries !== undefined ? { retries: opts.retries } : {};
    let p = await planTable(sql, row, opts);
    let premakeOnly = p.move === null;
    const ran: Step[] = [p.result.steps[0]!];
    const runPart = async (steps: Step[]) => {
      for (const s of steps) {
        await runLocked(sql, [s], { lockRetry });
        ran.push(s);
      }
    };
    if (p.resumed) {
      await runPart(p.creates);
      log().info({ table: displayName(table), ...p.move }, "maintain: an interrupted move of DEFAULT's rows resumed");
      const resumed = p;
      p = await planTable(sql, row, opts);
      ran.push(p.result.steps[0]!);
      p.result.created.unshift(...resumed.result.created);
      premakeOnly = p.move === null;
      p.move = p.move ? mergeRuns(resumed.move!, p.move) : resumed.move;
    }
    await runPart(p.leftovers);
    try {
      await runPart(p.creates);
    } catch (err) {
      // Rows of a premade partition's bound reached DEFAULT after the plan: ATTACH refused; plan again (the
      // partitions attached so far are not planned again), and move them.
      if (sqlState(err) !== "23514" || !premakeOnly || opts.move === false) throw err;
      const done = new Set(ran.flatMap((s) => (s.kind === "transaction" && s.why ? [s.why] : [])));
      const created = p.result.created.filter((c) => done.has(`premake ${c.name}`));
      p = await planTable(sql, row, opts);
      p.result.created.unshift(...created);
      await runPart(p.leftovers);
      await runPart(p.creates);
    }
    if (p.move) {
      p.result.move = p.move;
      log().info({ table: displayName(table), ...p.move }, "maintain: rows of DEFAULT moved");
    }
    await runPart(p.retention);
    await runPart(p.settings);
    p.result.steps = ran;
    p.result.statements = statementsOf(ran);
    const { steps: _s, statements: _t, ...summary } = p.result;
    await sql.unsafe(lastRunSql(table, summary));
    return p.result;
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/** Two moves' counters as one: rows and batches added, the longer time writes were blocked. */
function mergeRuns(a: MoveRun, b: MoveRun): MoveRun {
  return {
    get rowsCopied() {
      return a.rowsCopied + b.rowsCopied;
    },
    get batches() {
      return a.batches + b.batches;
    },
    get blockedMs() {
      return Math.max(a.blockedMs, b.blockedMs);
    },
  };
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
