/**
 * Rows that sit in DEFAULT, moved ONLINE into new partitions. PostgreSQL refuses to attach a partition whose bound
 * covers rows of the DEFAULT partition ("ALTER TABLE ... ATTACH PARTITION": the default partition is scanned, and
 * the attach fails on such a row). Moving them inside the attach's transaction would hold the table locked for as
 * long as the move takes; instead (docs/design.md, "maintain: the move out of DEFAULT"):
 *
 * 1. setup (one transaction): a staging table partitioned like the table (`<table>_pgshift_move`), whose
 *    partitions are the new partitions (standalone tables LIKE the table, its indexes included, each with a CHECK
 *    of its bound) and a new empty default (`<table>_pgshift_default`); the mirror, a row trigger on DEFAULT
 *    (`pgshift_move`, src/sql/mirror/upsert.sql as pgshift's forward mirror uses it) that upserts each row written
 *    into DEFAULT into the staging table and deletes the rows deleted from it (an UPDATE that moves a row out of
 *    DEFAULT fires DELETE there). CREATE TRIGGER takes SHARE ROW EXCLUSIVE on DEFAULT: looked at before
 *    (LockSite), short lock_timeout, retried; it waits for every earlier writer of DEFAULT, so that every write
 *    committed after it is mirrored.
 * 2. the copy: DEFAULT's rows into the staging table in keyset batches, race-free as pgshift's backfill
 *    (src/backfill/backfill.ts): `FOR SHARE` on the batch's rows (a concurrent UPDATE or DELETE waits for the
 *    batch, then its trigger finds the copied row), `ON CONFLICT DO NOTHING` (a row the mirror wrote is newer);
 *    batches sized by time (BatchSizer), each with a short lock_timeout so that it never takes part in a deadlock
 *    with the application (it rolls back and runs again instead).
 * 3. the switch (one short transaction, LockSite): ACCESS EXCLUSIVE on the table alone (`ONLY`), DEFAULT and the
 *    staging table; the trigger dropped, DEFAULT detached and renamed `<table>_pgshift_old`, the staging table's
 *    partitions detached from it and attached to the table (their CHECK implies the bound: no scan; no default
 *    partition at that moment: no scan of one), the new default attached as DEFAULT (PostgreSQL scans it: it holds
 *    only the rows no new partition covers, NULL or infinite keys and the rows written meanwhile outside every
 *    partition) and renamed as DEFAULT was. Catalog changes only: the time under the lock does not grow with the
 *    rows moved. Locks (PostgreSQL 14-18, "ALTER TABLE"): DETACH PARTITION takes ACCESS EXCLUSIVE on the table
 *    and the partition, ATTACH PARTITION SHARE UPDATE EXCLUSIVE on the table and ACCESS EXCLUSIVE on the attached
 *    table (and on a default partition, when there is one).
 * 4. after COMMIT: the old DEFAULT, the staging table and the trigger function dropped.
 *
 * Crash safety: the objects are named after the table; maintain run again finds what a crash left. A move stopped
 * after its mirror was in place and before its switch committed (killed during the copy, or its switch never got
 * its lock) resumes (stagedMove: the copy again, ON CONFLICT DO NOTHING skipping what was copied, then the switch).
 * Anything else (a staging table without its mirror, the old DEFAULT and the empty staging table after a switch,
 * the function) is removed before anything else (leftoverSteps), then maintain plans from what DEFAULT holds.
 */
import type { AnySql, Sql } from "../db.js";
import { PgshiftError, sqlState } from "../errors.js";
import { emit } from "../events.js";
import { LockSite, lockedTransaction } from "../locks/holders.js";
import { log } from "../log.js";
import { mirrorFunctionSql } from "../mirror/trigger.js";
import { displayName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import { BatchSizer } from "../pace/batch-size.js";
import type { PartitionSpec } from "../partitioning/spec.js";
import { block, runTransaction, type Step, statement, type TransactionStep, transactionStep } from "../plan/steps.js";
import { columnList, rowCompare } from "../sql/statement.js";
import { ordinals, rangeLiterals, type TableLayout } from "./partitions.js";
import type { NewPartition } from "./premake.js";

/** The oldest row of DEFAULT (its partition column as text, finite values only), or null when none is. */
export async function oldestInDefault(sql: AnySql, layout: TableLayout, spec: PartitionSpec): Promise<string | null> {
  if (!layout.defaultPartition) return null;
  const c = quoteIdent(spec.column);
  const finite = spec.strategy === "range" ? ` AND isfinite(${c})` : "";
  const d = quoteQualified({ schema: layout.table.schema, name: layout.defaultPartition });
  const r = await sql.unsafe(`SELECT min(${c})::text AS v FROM ${d} WHERE ${c} IS NOT NULL${finite}`);
  return (r[0]?.v as string | null) ?? null;
}

/** Rows of DEFAULT in each of `parts` (same order), and in DEFAULT all told. One scan of DEFAULT. */
export async function rowsInDefault(
  sql: AnySql,
  layout: TableLayout,
  spec: PartitionSpec,
  parts: readonly NewPartition[],
): Promise<{ per: number[]; total: number }> {
  if (!layout.defaultPartition) return { per: parts.map(() => 0), total: 0 };
  const d = quoteQualified({ schema: layout.table.schema, name: layout.defaultPartition });
  const c = quoteIdent(spec.column);
  const t = layout.columnType;
  const rows = await sql.unsafe(
    `SELECT x.i::int AS i, count(*)::bigint AS n
       FROM ${d} r JOIN unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(f, t, i)
         ON r.${c} >= x.f::${t} AND r.${c} < x.t::${t}
      GROUP BY x.i`,
    [parts.map((p) => p.from), parts.map((p) => p.to)],
  );
  const per = parts.map(() => 0);
  for (const r of rows) per[Number(r.i) - 1] = Number(r.n);
  const total = Number((await sql.unsafe(`SELECT count(*)::bigint AS n FROM ${d}`))[0]!.n);
  return { per, total };
}

/**
 * Refuses to move rows out of DEFAULT of a table that foreign keys of other tables reference: the switch detaches
 * DEFAULT, and PostgreSQL then checks that no referencing row points into it (a scan under the lock, which fails
 * since the rows' new partitions are not attached yet).
 * @throws PgshiftError naming the constraints.
 */
export async function requireMovable(sql: AnySql, layout: TableLayout): Promise<void> {
  const r = await sql`
    select conname::text as name, conrelid::regclass::text as on
      from pg_constraint where contype = 'f' and confrelid = to_regclass(${quoteQualified(layout.table)})
       and conparentid = 0`;
  if (r.length > 0)
    throw new PgshiftError(
      `cannot move rows out of the DEFAULT partition of ${displayName(layout.table)}: foreign keys reference it ` +
        `(${r.map((x) => `${String(x.name)} on ${String(x.on)}`).join(", ")}), and the detach of DEFAULT would ` +
        "check them",
      { hint: "run maintain with --no-move (premake and retention only), and move those rows by hand" },
    );
}

/** The names of the move's objects, derived from the table's (what a run after a crash looks for). */
export function moveNames(table: QualifiedName) {
  const at = (suffix: string) => ({
    schema: table.schema,
    name: `${table.name.slice(0, 63 - suffix.length)}${suffix}`,
  });
  return {
    staging: at("_pgshift_move"),
    newDefault: at("_pgshift_default"),
    oldDefault: at("_pgshift_old"),
    fn: at("_pgshift_move_fn"),
    trigger: "pgshift_move",
  };
}

/** The CHECK constraint of a new partition's bound (it lets ATTACH skip the scan of the partition). */
export function boundCheckName(p: NewPartition): string {
  return `${p.name.slice(0, 50)}_pgshift_bound`;
}

/** CREATE TABLE of a standalone table shaped as a partition of `parent` (its indexes included: ATTACH adopts them). */
export function likeParentSql(parent: QualifiedName, child: QualifiedName): string {
  return (
    `CREATE TABLE ${quoteQualified(child)} (LIKE ${quoteQualified(parent)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS ` +
    "INCLUDING INDEXES INCLUDING STORAGE INCLUDING COMMENTS INCLUDING GENERATED)"
  );
}

/** ALTER TABLE ... ADD CONSTRAINT ... CHECK of `p`'s bound (the partition column NOT NULL and in [from, to)). */
export function boundCheckSql(layout: TableLayout, spec: PartitionSpec, p: NewPartition): string {
  const c = quoteIdent(spec.column);
  const lit = (v: string) => `'${v.replace(/'/g, "''")}'::${layout.columnType}`;
  return (
    `ALTER TABLE ${quoteQualified({ schema: layout.table.schema, name: p.name })} ADD CONSTRAINT ` +
    `${quoteIdent(boundCheckName(p))} CHECK (${c} IS NOT NULL AND ${c} >= ${lit(p.from)} AND ${c} < ${lit(p.to)})`
  );
}

/** What the move needs to know of the table besides its layout. */
export interface MoveTable {
  layout: TableLayout;
  spec: PartitionSpec;
  /** The columns copied (generated ones left out), in table order. */
  columns: string[];
  /** The table's unique key (its primary key): ON CONFLICT arbiter, batch order, the mirror's row identity. */
  key: string[];
  /** The table's own foreign keys (name, pg_get_constraintdef, referenced table). */
  foreignKeys: ForeignKey[];
}

/** A foreign key of the table: its name, its definition as pg_get_constraintdef prints it, the table it references. */
export interface ForeignKey {
  name: string;
  definition: string;
  references: QualifiedName;
}

/** The foreign keys of `table` itself (not those inherited from a parent). */
export async function foreignKeysOf(sql: AnySql, table: QualifiedName): Promise<ForeignKey[]> {
  const r = await sql`
    select c.conname::text as name, pg_get_constraintdef(c.oid) as def, n.nspname::text as s, r.relname::text as t
      from pg_constraint c join pg_class r on r.oid = c.confrelid join pg_namespace n on n.oid = r.relnamespace
     where c.contype = 'f' and c.conrelid = to_regclass(${quoteQualified(table)}) and c.conparentid = 0
     order by 1`;
  return r.map((x) => ({
    name: String(x.name),
    definition: String(x.def),
    references: { schema: String(x.s), name: String(x.t) },
  }));
}

/**
 * The table's primary key columns (a table pgshift partitioned has one, extended with the partition column).
 * @throws PgshiftError when it has none.
 */
export async function primaryKey(sql: AnySql, table: QualifiedName): Promise<string[]> {
  const r = await sql`
    select a.attname::text as n from pg_index i
      join lateral unnest(i.indkey) with ordinality as k(attnum, ord) on true
      join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
     where i.indrelid = to_regclass(${quoteQualified(table)}) and i.indisprimary order by k.ord`;
  if (r.length === 0)
    throw new PgshiftError(`cannot move rows out of DEFAULT of ${displayName(table)}: it has no primary key`, {
      hint: "run maintain with --no-move (premake and retention only)",
    });
  return r.map((x) => String(x.n));
}

/** Options of the move. */
export interface MoveOptions {
  /** lock_timeout of the setup's and the switch's lock, ms. */
  lockTimeoutMs: number;
  terminateAfterMs?: number | null;
  /** Target duration of one copy batch, ms (default 50). */
  batchTimeMs?: number;
  /** Rows per copy batch at most (default 5000). */
  batchSize?: number;
  /** Resume a move whose staging table and mirror are in place (stagedMove): the copy and the switch only. */
  resume?: boolean;
}

/** A batch's lock_timeout: it gives way (rolls back, runs again) rather than queue behind a writer for longer. */
const BATCH_LOCK_TIMEOUT_MS = 100;

/** What the move did, read after its steps ran. */
export interface MoveRun {
  rowsCopied: number;
  batches: number;
  /** How long the switch held the table locked (writes blocked), ms; 0 before it ran. */
  blockedMs: number;
}

/** The move's steps (setup, copy, switch, drops: what --dry-run prints and what runs) and its counters. */
export interface MovePlan {
  steps: Step[];
  run: MoveRun;
}

/**
 * Plans the online move of DEFAULT's rows into `parts` (the new partitions: those with rows in DEFAULT, and
 * premade ones, which thus need no scan of DEFAULT either). The copy's block carries the code that runs its
 * batches (the very statements printed; key values as `$n`). Run the steps with runLocked.
 */
export function planMove(sql: Sql, t: MoveTable, parts: readonly NewPartition[], opts: MoveOptions): MovePlan {
  const { layout, spec, columns, key } = t;
  const table = layout.table;
  const names = moveNames(table);
  const parent = quoteQualified(table);
  const def = { schema: table.schema, name: layout.defaultPartition! };
  const d = quoteQualified(def);
  const staging = quoteQualified(names.staging);
  const newDefault = quoteQualified(names.newDefault);
  const child = (p: NewPartition) => quoteQualified({ schema: table.schema, name: p.name });
  const run: MoveRun = { rowsCopied: 0, batches: 0, blockedMs: 0 };
  const shown = displayName(table);

  // 1. setup
  const setupSite = new LockSite([{ table: def, mode: "SHARE ROW EXCLUSIVE" }], {
    table: shown,
    command: "maintain: mirror of DEFAULT",
    lockTimeoutMs: opts.lockTimeoutMs,
    terminateAfterMs: opts.terminateAfterMs ?? null,
  });
  const targets = (p: QualifiedName[]) => p.map((t) => ({ table: t, mode: "SHARE ROW EXCLUSIVE" as const }));
  const refs = [...new Map(t.foreignKeys.map((f) => [quoteQualified(f.references), f.references])).values()];
  const refSite =
    refs.length > 0
      ? new LockSite(targets(refs), {
          table: shown,
          command: "maintain: foreign keys of the new partitions",
          lockTimeoutMs: opts.lockTimeoutMs,
          terminateAfterMs: opts.terminateAfterMs ?? null,
        })
      : null;
  const tables = [...parts.map((p) => ({ schema: table.schema, name: p.name })), names.newDefault];
  const create = lockedTransaction(
    [
      statement(
        `CREATE TABLE ${staging} (LIKE ${parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES ` +
          `INCLUDING GENERATED) PARTITION BY RANGE (${quoteIdent(spec.column)})`,
      ),
      ...parts.flatMap((p) => [
        statement(likeParentSql(table, { schema: table.schema, name: p.name })),
        statement(boundCheckSql(layout, spec, p)),
      ]),
      statement(likeParentSql(table, names.newDefault)),
      // The table's foreign keys on each new table while it is empty (validated at once): ATTACH then adopts them
      // instead of validating them on the moved rows under the switch's lock. ADD FOREIGN KEY takes SHARE ROW
      // EXCLUSIVE on the referenced table ("ALTER TABLE"), looked at before and requested as every lock.
      ...(refSite
        ? [
            ...refSite.steps(
              statement(`LOCK TABLE ${refs.map(quoteQualified).join(", ")} IN SHARE ROW EXCLUSIVE MODE`),
            ),
            ...tables.flatMap((x) =>
              t.foreignKeys.map((f) =>
                statement(`ALTER TABLE ${quoteQualified(x)} ADD CONSTRAINT ${quoteIdent(f.name)} ${f.definition}`),
              ),
            ),
          ]
        : []),
      ...parts.map((p) => statement(`ALTER TABLE ${staging} ATTACH PARTITION ${child(p)} ${p.bound}`)),
      statement(`ALTER TABLE ${staging} ATTACH PARTITION ${newDefault} DEFAULT`),
    ],
    {
      lockTimeoutMs: opts.lockTimeoutMs,
      why: `the staging table ${names.staging.name}: the new partitions and a new default`,
    },
    refSite ? [refSite] : [],
  );
  const mirror = lockedTransaction(
    [
      statement(
        mirrorFunctionSql({
          fn: names.fn,
          from: def,
          to: names.staging,
          columns,
          key,
          overridingSystemValue: false,
        }),
      ),
      ...setupSite.steps(statement(`LOCK TABLE ${d} IN SHARE ROW EXCLUSIVE MODE`)),
      statement(
        `CREATE TRIGGER ${quoteIdent(names.trigger)} AFTER INSERT OR UPDATE OR DELETE ON ${d} FOR EACH ROW ` +
          `EXECUTE FUNCTION ${quoteQualified(names.fn)}()`,
      ),
    ],
    { lockTimeoutMs: opts.lockTimeoutMs, why: "the mirror: each write to DEFAULT applied to the staging table" },
    [setupSite],
  );

  // 2. the copy
  const cols = columnList(columns);
  const keyCols = columnList(key);
  const k = key.length;
  const upper = (lower: boolean) => {
    const after = lower ? ` WHERE ${rowCompare(key, ">", 1)}` : "";
    return (
      `SELECT ${key.map((c, i) => `${quoteIdent(c)}::text AS k${i}`).join(", ")}, count(*) OVER () AS n ` +
      `FROM (SELECT ${keyCols} FROM ${d}${after} ORDER BY ${keyCols} LIMIT $${lower ? k + 1 : 1}) s ` +
      `ORDER BY ${key.map((c) => `${quoteIdent(c)} DESC`).join(", ")} LIMIT 1`
    );
  };
  const copySql = (lower: boolean) => {
    const range = [...(lower ? [rowCompare(key, ">", 1)] : []), rowCompare(key, "<=", lower ? k + 1 : 1)];
    return (
      `WITH batch AS (SELECT ${cols} FROM ${d} WHERE ${range.join(" AND ")} FOR SHARE), ` +
      `ins AS (INSERT INTO ${staging} (${cols}) SELECT ${cols} FROM batch ON CONFLICT (${keyCols}) DO NOTHING ` +
      "RETURNING 1) SELECT (SELECT count(*) FROM batch)::int AS read, (SELECT count(*) FROM ins)::int AS inserted"
    );
  };
  const batchTx = (lower: boolean): TransactionStep =>
    transactionStep([statement(upper(lower)), statement(copySql(lower))], { lockTimeoutMs: BATCH_LOCK_TIMEOUT_MS });
  const first = batchTx(false);
  const next = batchTx(true);
  const maxRows = opts.batchSize ?? 5000;
  const sizer = new BatchSizer({ targetMs: opts.batchTimeMs ?? 50, maxRows, startRows: Math.min(maxRows, 500) });
  const copy = async () => {
    const started = performance.now();
    let checkpoint: string[] | null = null;
    for (;;) {
      const n = sizer.rows;
      const lower: boolean = checkpoint !== null;
      const t0 = performance.now();
      const values: string[] = checkpoint ?? [];
      const r: { hi: string[]; keys: number; read: number } | null = await runTransaction(
        sql,
        lower ? next : first,
        async (tx): Promise<{ hi: string[]; keys: number; read: number } | null> => {
          const hiRow: Record<string, unknown> | undefined = (
            await tx.unsafe(upper(lower), [...values, n], { prepare: true })
          )[0];
          if (!hiRow) return null;
          const hi: string[] = key.map((_, i) => String(hiRow[`k${i}`]));
          const c = await tx.unsafe(copySql(lower), [...values, ...hi], { prepare: true });
          return { hi, keys: Number(hiRow.n), read: Number(c[0]?.read ?? 0) };
        },
        // A row that a concurrent UPDATE moved to another partition while the batch locked it: 40001
        // ("tuple to be locked was already moved to another partition"); the batch runs again.
        { retries: 50, retryOn: (err) => sqlState(err) === "40001" },
      );
      if (!r) break;
      const ms = performance.now() - t0;
      sizer.observe(r.keys, ms);
      run.rowsCopied += r.read;
      run.batches++;
      checkpoint = r.hi;
      emit("batch", {
        table: shown,
        rows: r.read,
        ms,
        batchRows: n,
        rowsCopied: run.rowsCopied,
        rowsEstimated: run.rowsCopied,
        rate: (run.rowsCopied * 1000) / Math.max(1, performance.now() - started),
        etaSeconds: null,
      });
      if (r.keys < n) break;
    }
    log().info({ table: shown, rows: run.rowsCopied, batches: run.batches }, "maintain: DEFAULT's rows copied");
  };
  const copyBlock = block(
    "once",
    `the copy of DEFAULT's rows into ${names.staging.name}, in batches sized to last about ` +
      `${opts.batchTimeMs ?? 50} ms (${maxRows} rows at most), in key order, each a transaction of its own ` +
      `(lock_timeout ${BATCH_LOCK_TIMEOUT_MS} ms: a batch that would wait longer for a writer rolls back, runs again)`,
    [
      block("at most once", "the first batch", [first]),
      block("any number of times", "each next batch, after the last key copied ($1 ...: that key)", [next]),
    ],
    copy,
  );

  // 3. the switch
  const site = new LockSite(
    [
      { table, mode: "ACCESS EXCLUSIVE" },
      { table: names.staging, mode: "ACCESS EXCLUSIVE" },
    ],
    {
      table: shown,
      command: "maintain: switch of DEFAULT",
      lockTimeoutMs: opts.lockTimeoutMs,
      terminateAfterMs: opts.terminateAfterMs ?? null,
    },
  );
  const lock = statement(`LOCK TABLE ONLY ${parent}, ${d}, ${staging} IN ACCESS EXCLUSIVE MODE`);
  const switchTx = lockedTransaction(
    [
      ...site.steps(lock),
      statement(`DROP TRIGGER ${quoteIdent(names.trigger)} ON ${d}`),
      statement(`ALTER TABLE ${parent} DETACH PARTITION ${d}`),
      statement(`ALTER TABLE ${d} RENAME TO ${quoteIdent(names.oldDefault.name)}`),
      ...parts.map((p) => statement(`ALTER TABLE ${staging} DETACH PARTITION ${child(p)}`)),
      statement(`ALTER TABLE ${staging} DETACH PARTITION ${newDefault}`),
      ...parts.flatMap((p) => [
        statement(`ALTER TABLE ${parent} ATTACH PARTITION ${child(p)} ${p.bound}`, "transaction", "no scan: CHECK"),
        statement(`ALTER TABLE ${child(p)} DROP CONSTRAINT ${quoteIdent(boundCheckName(p))}`),
      ]),
      statement(
        `ALTER TABLE ${parent} ATTACH PARTITION ${newDefault} DEFAULT`,
        "transaction",
        "scans the new default: only the rows no new partition covers",
      ),
      statement(`ALTER TABLE ${newDefault} RENAME TO ${quoteIdent(def.name)}`),
    ],
    {
      lockTimeoutMs: opts.lockTimeoutMs,
      why: `the switch: DEFAULT detached, ${parts.length} partition(s) attached, the new default attached`,
    },
    [site],
  );
  const onCommit = site.committed.bind(site);
  site.committed = () => {
    run.blockedMs = onCommit();
    return run.blockedMs;
  };

  // 4. after COMMIT
  const after = dropSteps(names, opts.lockTimeoutMs);
  return {
    steps: opts.resume ? [copyBlock, switchTx, ...after] : [create, mirror, copyBlock, switchTx, ...after],
    run,
  };
}

/** The drops after the switch (or after a crash): the old DEFAULT, the staging table, the trigger function. */
function dropSteps(names: ReturnType<typeof moveNames>, lockTimeoutMs: number): Step[] {
  return [
    transactionStep(
      [
        statement(`DROP TABLE IF EXISTS ${quoteQualified(names.oldDefault)}`),
        statement(`DROP TABLE IF EXISTS ${quoteQualified(names.staging)}`),
        statement(`DROP FUNCTION IF EXISTS ${quoteQualified(names.fn)}()`),
      ],
      { lockTimeoutMs, why: "after the switch: the old DEFAULT, the staging table, the mirror's function dropped" },
    ),
  ];
}

/**
 * The partitions of a move interrupted before its switch whose staging table and mirror are whole (the trigger on
 * DEFAULT, the staging table with its new default): that move can resume with its copy (every row the staging
 * table holds has been kept equal to DEFAULT's by the mirror since it was copied; the copy's ON CONFLICT DO NOTHING
 * skips them). Null when there is no such move.
 */
export async function stagedMove(sql: AnySql, layout: TableLayout): Promise<NewPartition[] | null> {
  if (!layout.defaultPartition) return null;
  const names = moveNames(layout.table);
  const def = quoteQualified({ schema: layout.table.schema, name: layout.defaultPartition });
  const r = await sql`
    select c.relname::text as name, pg_get_expr(c.relpartbound, c.oid) as bound
      from pg_inherits i join pg_class c on c.oid = i.inhrelid
     where i.inhparent = to_regclass(${quoteQualified(names.staging)})
       and exists (select from pg_trigger where tgrelid = to_regclass(${def}) and tgname = ${names.trigger})
     order by 1`;
  const parts = r.filter((x) => x.bound !== "DEFAULT");
  if (parts.length === 0 || !r.some((x) => x.bound === "DEFAULT" && x.name === names.newDefault.name)) return null;
  const lits = parts.map((x) => rangeLiterals(String(x.bound)));
  if (lits.some((l) => l === null)) return null;
  const ords = await ordinals(
    sql,
    layout.columnType,
    lits.flatMap((l) => [l!.from, l!.to]),
  );
  return parts.map((x, i) => ({
    name: String(x.name),
    bound: String(x.bound),
    from: lits[i]!.from,
    to: lits[i]!.to,
    lo: ords[2 * i]!,
    hi: ords[2 * i + 1]!,
  }));
}

/**
 * What an interrupted move left (a crash, a lost connection), found by name, and the steps that remove it: the
 * mirror trigger on DEFAULT (looked at and locked as the setup locks it), the staging table with its partitions
 * and its new default, the old DEFAULT, the function. Empty when nothing is left.
 */
export async function leftoverSteps(
  sql: AnySql,
  layout: TableLayout,
  opts: { lockTimeoutMs: number; terminateAfterMs?: number | null },
): Promise<Step[]> {
  const names = moveNames(layout.table);
  const found = await sql`
    select to_regclass(${quoteQualified(names.staging)}) is not null as staging,
           to_regclass(${quoteQualified(names.oldDefault)}) is not null as old,
           to_regprocedure(${`${quoteQualified(names.fn)}()`}) is not null as fn`;
  const f = found[0]!;
  const steps: Step[] = [];
  if (layout.defaultPartition) {
    const def = { schema: layout.table.schema, name: layout.defaultPartition };
    const trg = await sql`select 1 from pg_trigger where tgrelid = to_regclass(${quoteQualified(def)})
                            and tgname = ${names.trigger}`;
    if (trg.length > 0) {
      const site = new LockSite([{ table: def, mode: "ACCESS EXCLUSIVE" }], {
        table: displayName(layout.table),
        command: "maintain: leftovers of a move",
        lockTimeoutMs: opts.lockTimeoutMs,
        terminateAfterMs: opts.terminateAfterMs ?? null,
      });
      steps.push(
        lockedTransaction(
          [
            ...site.steps(statement(`LOCK TABLE ${quoteQualified(def)} IN ACCESS EXCLUSIVE MODE`)),
            statement(`DROP TRIGGER ${quoteIdent(names.trigger)} ON ${quoteQualified(def)}`),
          ],
          { lockTimeoutMs: opts.lockTimeoutMs, why: "an interrupted move of DEFAULT's rows: its mirror removed" },
          [site],
        ),
      );
    }
  }
  if (steps.length > 0 || f.staging || f.old || f.fn) steps.push(...dropSteps(names, opts.lockTimeoutMs));
  return steps;
}
