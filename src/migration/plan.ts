import { inspectTable, type TableFacts } from "../catalog/inspect.js";
import { DEFAULT_LOCK_TIMEOUT_MS, type Sql } from "../db.js";
import {
  copyColumns,
  type DeferredIndex,
  deferredIndexSql,
  fidelityBlockers,
  fidelityWarnings,
  identityDefaultFunction,
  plannedTree,
  shadowDdl,
  shadowKey,
} from "../ddl/shadow.js";
import { incomingForeignKeys, whyNot } from "../dependents/foreign-keys.js";
import { planDependents } from "../dependents/index.js";
import { PgshiftError } from "../errors.js";
import { lockSourceTransaction } from "../locks/holders.js";
import { createStreamSql, createsSlot, logicalPrerequisites } from "../mirror/logical.js";
import { installTriggerMirrorSql, truncateGuardSql } from "../mirror/trigger.js";
import { displayName, fitName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import {
  computeKeyedPartitions,
  computePartitions,
  computeSubPartitions,
  type DataRange,
  flattenPartitions,
  type PartitionDef,
  type SubData,
} from "../partitioning/bounds.js";
import { readSubData } from "../partitioning/levels.js";
import {
  formatPartitionSpec,
  INTEGER_TYPES,
  type LevelSpec,
  type PartitionSpec,
  partitionColumns,
  TIME_TYPES,
} from "../partitioning/spec.js";
import { copyLocksRows, type Prediction, predictBackfill } from "../plan/predict.js";
import { type Step, statement, type TransactionStep, transactionStep } from "../plan/steps.js";
import { ddlGuardSql, ddlGuardState } from "./ddl-guard.js";
import { affectedStatements, describeWidenedKey, type StatementCheck, type WidenedKey, widenedKeys } from "./keys.js";
import { loadMigration, logicalNames, type Mode, type SequenceUse, schemaSql, stateOwnershipProblem } from "./state.js";

export interface PlanOptions {
  spec: PartitionSpec;
  mode?: Mode;
  /** Future partitions past the data and past now (time and integer ranges). Default 3. */
  premake?: number;
  /** "Now" for premade time partitions (tests pin it). */
  now?: Date;
  /** lock_timeout of start's transaction, ms (default DEFAULT_LOCK_TIMEOUT_MS, 50; retried on a lock timeout). */
  lockTimeoutMs?: number;
  /**
   * Logical mode: the longest creating the replication slot may wait for running transactions, ms (default 300,000).
   */
  slotTimeoutMs?: number;
  /** Terminate sessions holding a conflicting lock on the source older than this, ms, before locking it. */
  terminateHoldersAfterMs?: number | null;
  /**
   * A migration group (src/group): its name, recorded in the row, and the table's foreign keys to other tables of
   * the group, left off the shadow (the group's backfill adds them, referencing the other shadows).
   */
  group?: { name: string; foreignKeys: readonly string[] };
}

/** lock_timeout of start's transaction when none is given, ms (db.ts). */
export { DEFAULT_LOCK_TIMEOUT_MS };
/** How long start --mode logical waits, by default, for running transactions before the slot exists: 5 minutes. */
export const DEFAULT_SLOT_TIMEOUT_MS = 300_000;

/** Everything `start` would do, computed without changing anything. */
export interface MigrationPlan {
  source: QualifiedName;
  shadow: QualifiedName;
  retired: QualifiedName;
  spec: PartitionSpec;
  mode: Mode;
  /** Source key (primary key, or a NOT NULL unique key) and the shadow's key (with the partition column). */
  keyColumns: string[];
  shadowKey: string[];
  copyColumns: string[];
  sequences: SequenceUse[];
  mirrorFunction: QualifiedName;
  /**
   * The first-level partitions in bound order, DEFAULT last; with a second level (spec.sub) each carries its own
   * partitions in `sub` (flattenPartitions lists both levels).
   */
  partitions: PartitionDef[];
  estimatedRows: number;
  totalBytes: number;
  /** Reasons the migration cannot start; empty when it can. */
  blockers: string[];
  /** Things a person must know (e.g. uniqueness no longer enforced). */
  warnings: string[];
  /**
   * What happens to each object that depends on the table (views, triggers, policies, foreign keys of other
   * tables, publications) at cutover, swap-back and finalize: one line each (planDependents).
   */
  dependents: string[];
  /**
   * Unique keys that lose global uniqueness because the partition column is added to them, with the
   * ON CONFLICT targets that stop working at cutover (widenedKeys). `start` refuses unless allowKeyExtension.
   */
  widenedKeys: WidenedKey[];
  /** What changes at finalize, one line for a person; null when no key is widened. */
  atFinalize: string | null;
  /** The application's statements that would fail after cutover, from pg_stat_statements (affectedStatements). */
  applicationStatements: StatementCheck;
  /** Logical mode: statements run first, each on its own (publication, then replication slot). */
  streamStatements: string[];
  /**
   * Every statement `start` runs, in order, in one transaction: first the table's own DDL (the shadow, its
   * partitions, keys, constraints, grants), then pgshift's own objects (its schema, the DDL guard, the
   * identity default functions, the TRUNCATE guard, the mirror, the migration's row). The statements of
   * `transaction`.
   */
  statements: string[];
  /** How many of `statements`, from the first, are the table's own DDL; the rest are pgshift's own objects. */
  tableStatementCount: number;
  /**
   * The DDL guard at start: "installs" (superuser: start creates or replaces it), "present" (already on),
   * "missing" (not installed or disabled, and creating it needs superuser); null when blockers stop the plan.
   */
  ddlGuard: "installs" | "present" | "missing" | null;
  /**
   * What `start` runs, in order, and what `start --dry-run` prints (formatSteps): in logical mode the
   * publication (committed on its own) and the slot's transaction (`streamSteps`), then `transaction`.
   * Empty when there are blockers.
   */
  steps: Step[];
  /** Logical mode: CREATE PUBLICATION, then the transaction that creates the slot (under statement_timeout). */
  streamSteps: Step[];
  /** The transaction that creates the shadow, installs the mirror and records the migration (lock_timeout, retried). */
  transaction: TransactionStep;
  /** Statements `backfill` runs after the copy to build the secondary indexes without blocking writes. */
  afterCopyStatements: string[];
  deferredIndexes: DeferredIndex[];
  facts: TableFacts | null;
}

const MIN_SERVER = 140000;

/**
 * Refuses a server older than PostgreSQL 14 (server_version_num < 140000) before anything else is read from its
 * catalogs: pgshift relies on 14's catalog and trigger syntax (CREATE OR REPLACE TRIGGER, pg_stat_* columns,
 * logical decoding of in-progress details), and 13 is out of community support.
 * @throws PgshiftError, one line naming the version, exit 2; nothing read or changed.
 */
async function requireSupportedServer(sql: Sql): Promise<void> {
  const r =
    await sql`select current_setting('server_version_num')::int as num, current_setting('server_version') as version`;
  const num = Number(r[0]?.num);
  if (num < MIN_SERVER) {
    throw new PgshiftError(
      `PostgreSQL ${String(r[0]?.version)} is not supported: pgshift needs PostgreSQL 14 or later`,
      {
        hint: "upgrade the server (pgshift supports PostgreSQL 14, 15, 16, 17 and 18); nothing was changed",
      },
    );
  }
}

/**
 * Exclusion constraints a partitioned table cannot keep, one blocker each: PostgreSQL 17 is the first to allow
 * them on a partitioned table, and only when they compare every partition column with equality (docs: CREATE
 * TABLE, "EXCLUDE", and the partitioning limitations of "Table Partitioning"). One that qualifies is created on
 * the shadow at start (shadowDdl), before any row, so the mirror and the backfill are checked by it.
 */
async function exclusionBlockers(sql: Sql, facts: TableFacts, column: string): Promise<string[]> {
  const rows = await sql`
    select c.conname::text as name,
           exists (select from unnest(c.conkey, c.conexclop) as u(k, op) join pg_catalog.pg_operator o on o.oid = u.op
                    join pg_catalog.pg_attribute a on a.attrelid = c.conrelid and a.attnum = u.k
                   where a.attname = ${column} and o.oprname = '=') as equal
      from pg_catalog.pg_constraint c where c.conrelid = ${facts.oid} and c.contype = 'x' order by 1`;
  const t = displayName(facts.table);
  return rows.flatMap((r) => {
    const name = String(r.name);
    if (facts.serverVersionNum < 170000)
      return [
        `exclusion constraint ${name} on ${t}: PostgreSQL ${Math.floor(facts.serverVersionNum / 10000)} cannot ` +
          `have one on a partitioned table (17 and later can, when it compares the partition column with =)`,
      ];
    if (!r.equal)
      return [
        `exclusion constraint ${name} on ${t} does not compare partition column ${column} with =, as PostgreSQL ` +
          `requires on a partitioned table; partition by a column it compares with = (or add "${column} WITH =" ` +
          `to it)`,
      ];
    return [];
  });
}

/**
 * Inspects `table` and computes the shadow, its partitions, the DDL and the mirror, changing nothing.
 * Blockers are collected, not thrown, so that `plan` can list them all.
 * @throws PgshiftError when the table does not exist.
 */
export async function planMigration(sql: Sql, table: QualifiedName, opts: PlanOptions): Promise<MigrationPlan> {
  const spec = opts.spec;
  const mode = opts.mode ?? "trigger";
  const premake = opts.premake ?? 3;
  const lockTimeoutMs = opts.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  const slotTimeoutMs = opts.slotTimeoutMs ?? DEFAULT_SLOT_TIMEOUT_MS;
  await requireSupportedServer(sql);
  const facts = await inspectTable(sql, table);
  if (!facts) {
    throw new PgshiftError(`table ${displayName(table)} does not exist`, {
      hint: "check the name (schema-qualify it, and quote mixed-case names: '\"Order Items\"')",
    });
  }
  const blockers: string[] = [];
  const warnings: string[] = [];
  let existing: Awaited<ReturnType<typeof loadMigration>> = null;
  try {
    existing = await loadMigration(sql, table, { upgrade: false });
  } catch (err) {
    blockers.push(err instanceof Error ? err.message : String(err));
  }
  if (existing)
    blockers.push(`${displayName(table)} is already under migration (phase ${existing.phase}); use pgshift status`);
  else if (blockers.length === 0) {
    const problem = await stateOwnershipProblem(sql);
    if (problem) blockers.push(problem);
  }
  if (facts.serverVersionNum < MIN_SERVER)
    blockers.push(`PostgreSQL ${facts.serverVersionNum} is too old: pgshift needs 14 or later`);
  if (facts.relkind === "p") blockers.push(`${displayName(table)} is already partitioned`);
  else if (facts.relkind !== "r")
    blockers.push(`${displayName(table)} is not an ordinary table (relkind ${facts.relkind})`);
  if (facts.isPartition) blockers.push(`${displayName(table)} is itself a partition of another table`);
  // What a partitioned table cannot keep as the original has it (constraints, row security, CLUSTER mark).
  blockers.push(...fidelityBlockers(facts));
  warnings.push(...fidelityWarnings(facts));
  if (facts.persistence !== "p")
    blockers.push(
      `${displayName(table)} is ${facts.persistence === "u" ? "unlogged" : "temporary"}; only permanent tables are ` +
        `supported`,
    );
  if (!facts.isOwner)
    blockers.push(`the current user is not the owner of ${displayName(table)} (owner: ${facts.owner})`);
  if (!facts.canCreateInSchema) blockers.push(`the current user may not create tables in schema ${facts.table.schema}`);
  if (!facts.keyColumns)
    blockers.push(
      `${displayName(table)} has no primary key (nor a NOT NULL unique key); pgshift copies and compares rows by key`,
    );
  // Dependent objects that follow the live table through every switch (src/dependents), and those that cannot.
  const dependents = await planDependents(sql, facts, spec);
  blockers.push(...dependents.blockers);
  const dep = facts.dependents;
  const list = (what: string, xs: string[]) => {
    if (xs.length > 0) blockers.push(`${what}: ${xs.join(", ")} (not carried over yet; drop or detach them first)`);
  };
  list("rules", dep.rules);
  // A partitioned table or a partition is refused above; its partitions or parent need no second line.
  if (facts.relkind !== "p" && !facts.isPartition) list("inheritance (parent or child tables)", dep.inheritance);
  if (dep.exclusionConstraints.length > 0)
    for (const c of partitionColumns(spec)) blockers.push(...(await exclusionBlockers(sql, facts, c)));

  /** The column of one level, with a blocker for each reason it cannot be that level's partition key. */
  const levelColumn = (level: LevelSpec) => {
    const col = facts.columns.find((c) => c.name === level.column);
    if (!col) {
      blockers.push(`column ${JSON.stringify(level.column)} does not exist in ${displayName(table)}`);
      return undefined;
    }
    const t = col.typeName;
    if (level.strategy === "range" && !(TIME_TYPES as readonly string[]).includes(t)) {
      blockers.push(
        `column ${col.name} is ${col.formattedType}; range:<col>:<interval> needs date, timestamp or timestamptz`,
      );
    } else if (
      (level.strategy === "range-int" || level.strategy === "range-rows") &&
      !(INTEGER_TYPES as readonly string[]).includes(t)
    ) {
      blockers.push(
        `column ${col.name} is ${col.formattedType}; ${formatPartitionSpec(level)} needs smallint, integer or bigint`,
      );
    }
    if (col.generated !== "") blockers.push(`column ${col.name} is a generated column and cannot be the partition key`);
    if (!col.notNull) {
      blockers.push(
        `partition column ${col.name} allows NULL; the shadow's key must include it: ALTER TABLE ... ALTER ` +
          `COLUMN ${col.name} SET NOT NULL first`,
      );
    }
    return col;
  };
  const col = levelColumn(spec);
  const subCol = spec.sub ? levelColumn(spec.sub) : undefined;
  if (spec.sub?.strategy === "range-rows" && spec.strategy === "hash")
    blockers.push(
      `${formatPartitionSpec(spec.sub)} under ${formatPartitionSpec(spec)}: the rows of each hash partition are ` +
        `not known before it exists; use hash:${spec.sub.column}:rows=<N> (a hash first level spreads rows evenly)`,
    );
  if (spec.sub) {
    // A foreign key of another table must reference a unique key of the partitioned table, which contains the
    // columns of both levels: the foreign-key carrier checks the first level's.
    for (const fk of await incomingForeignKeys(sql, facts.table)) {
      const why = whyNot(fk, spec.sub.column, facts.serverVersionNum, displayName(table));
      if (why && whyNot(fk, spec.column, facts.serverVersionNum, displayName(table)) === null)
        blockers.push(`foreign key ${fk.name} on ${fk.relName} (second level): ${why}`);
    }
  }
  let data: DataRange = { min: null, max: null };
  const src = facts.table;
  const shadow = { schema: src.schema, name: fitName(src.name, "_pgshift_shadow") };
  const retired = { schema: src.schema, name: fitName(src.name, "_pgshift_retired") };
  const mirrorFunction = { schema: "pgshift", name: fitName(`mirror_${facts.oid}`, "") };

  let partitions: PartitionDef[] = [];
  if (blockers.length === 0 && col) {
    data = await readDataRange(sql, src, spec);
    const now = opts.now ?? new Date();
    try {
      if (spec.sub && subCol) {
        // The second level, from the data: one aggregate query, streamed (readSubData).
        const level1 = computeKeyedPartitions(spec, src.name, col.typeName, data, { premake, now });
        const subData: SubData = await readSubData(sql, src, spec, col.typeName, readDataRange);
        partitions = computeSubPartitions(spec.sub, level1, subCol.typeName, subData, { premake, now });
      } else partitions = computePartitions(spec, src.name, col.typeName, data, { premake, now });
    } catch (err) {
      blockers.push(err instanceof Error ? err.message : String(err));
    }
    const taken = await sql`
      select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
       where n.nspname = ${src.schema} and c.relname =
         any(${[shadow.name, retired.name, ...flattenPartitions(partitions).map((p) => p.name)]})`;
    if (taken.length > 0)
      blockers.push(`names already taken in schema ${src.schema}: ${taken.map((r) => String(r.relname)).join(", ")}`);
  }

  const keyColumns = facts.keyColumns ?? [];
  const sKey = shadowKey(keyColumns, partitionColumns(spec));
  const cols = copyColumns(facts);
  const sequences: SequenceUse[] = facts.columns
    .filter((c) => c.sequence)
    .map((c) => ({
      column: c.name,
      schema: c.sequence!.schema,
      name: c.sequence!.name,
      identity: c.identity,
      defaultFunction: c.identity !== "" ? identityDefaultFunction(facts.oid, c.attnum).name : null,
    }));
  const statements: string[] = [];
  const streamStatements: string[] = [];
  const afterCopyStatements: string[] = [];
  const stream = mode === "logical" ? logicalNames(facts.oid) : null;
  if (stream && blockers.length === 0) blockers.push(...(await logicalPrerequisites(sql, facts)));
  // What the application will notice (said before anything changes): keys widened with the partition column.
  const keys = col
    ? mergeWidenedKeys(
        await widenedKeys(sql, facts.oid, spec.column),
        subCol ? await widenedKeys(sql, facts.oid, subCol.name) : [],
      )
    : [];
  const applicationStatements = col
    ? await affectedStatements(sql, src, spec.column, keys).then(async (first) => {
        // Two levels: a statement can also fail for lack of the second level's column.
        if (!subCol || first.status !== "checked") return first;
        const second = await affectedStatements(sql, src, subCol.name, keys);
        const seen = new Set(first.statements.map((x) => `${x.query}\u0000${x.target}`));
        const more = second.statements.filter((x) => !seen.has(`${x.query}\u0000${x.target}`));
        return { ...first, statements: [...first.statements, ...more] };
      })
    : {
        status: "not-needed" as const,
        detail: "no partition column: nothing to check",
        statements: [],
        examined: 0,
        hidden: 0,
        unparsed: 0,
      };
  let deferredIndexes: DeferredIndex[] = [];
  let indexRenames: { from: string; to: string }[] = [];
  let tableStatementCount = 0;
  let ddlGuard: MigrationPlan["ddlGuard"] = null;
  let sourceAt = 0;
  if (blockers.length === 0) {
    // The table's own DDL runs first, then pgshift's own objects (what plan prints is what start runs). The
    // identity default functions live in schema pgshift, so they and the column defaults calling them come
    // after the schema; nothing is written to the shadow before the transaction commits.
    const ddl = shadowDdl(facts, spec, partitions, {
      source: src,
      shadow,
      withoutForeignKeys: opts.group?.foreignKeys ?? [],
    });
    const identityFns = sequences.flatMap((s) =>
      s.defaultFunction ? [`${quoteQualified({ schema: "pgshift", name: s.defaultFunction })}()`] : [],
    );
    const callsPgshift = (stmt: string) => identityFns.some((fn) => stmt.includes(fn));
    statements.push(...ddl.statements.filter((s) => !callsPgshift(s)));
    tableStatementCount = statements.length;
    if (!existing) statements.push(...schemaSql());
    const guard = await ddlGuardState(sql);
    ddlGuard = guard.superuser ? "installs" : guard.installed && guard.enabled ? "present" : "missing";
    if (guard.superuser) statements.push(...ddlGuardSql());
    else if (!guard.installed || !guard.enabled) {
      warnings.push(
        `the DDL guard is ${guard.installed ? "disabled" : "not installed"} (creating an event trigger needs ` +
          `superuser): an ALTER TABLE that drops, renames, adds or retypes a column of ` +
          `${displayName(table)} or of its shadow, a DROP of either, or detaching or dropping a partition of the ` +
          `shadow, will not be refused during the migration` +
          (mode === "trigger"
            ? ", and dropping or renaming a mirrored column, or dropping the shadow, makes the application's writes " +
              "fail"
            : ""),
      );
    }
    statements.push(...ddl.statements.filter(callsPgshift));
    deferredIndexes = ddl.deferredIndexes;
    indexRenames = ddl.indexRenames;
    for (const idx of deferredIndexes) {
      const d = deferredIndexSql(src.schema, shadow.name, plannedTree(partitions), idx);
      afterCopyStatements.push(
        d.parent,
        ...d.perPartition.flatMap((x) => [x.create, ...(x.constrain ? [x.constrain] : []), x.attach]),
      );
    }
    afterCopyStatements.push(...ddl.afterCopy);
    for (const k of keys) warnings.push(describeWidenedKey(k));
    // Both tables carry the TRUNCATE guard until the migration ends (the source's comes with its mirror).
    statements.push(...truncateGuardSql(shadow));
    // From here on the statements lock the source: the look for holders and the lock come first (startSteps).
    sourceAt = statements.length;
    if (stream) {
      streamStatements.push(...createStreamSql(src, stream.slot, stream.publication));
      statements.push(...truncateGuardSql(src));
    } else {
      statements.push(
        ...installTriggerMirrorSql({
          fn: mirrorFunction,
          from: src,
          to: shadow,
          columns: cols,
          key: sKey,
          overridingSystemValue: false,
        }),
      );
    }
    statements.push(
      `INSERT INTO pgshift.migrations (source_schema, source_table, shadow_table, retired_table, spec, mode, phase, ` +
        `key_columns, shadow_key, copy_columns, sequences, mirror_function, deferred_indexes, index_renames, ` +
        `slot_name, publication_name, rows_estimated${opts.group ? ", group_name" : ""}) VALUES (` +
        [src.schema, src.name, shadow.name, retired.name].map(quoteLiteral).join(", ") +
        `, ${quoteLiteral(JSON.stringify(spec))}, ${quoteLiteral(mode)}, ` +
        `'started', ${textArray(keyColumns)}, ${textArray(sKey)}, ${textArray(cols)}, ` +
        `${quoteLiteral(JSON.stringify(sequences))}, ${quoteLiteral(mirrorFunction.name)}, ` +
        `${quoteLiteral(JSON.stringify(deferredIndexes))}, ${quoteLiteral(JSON.stringify(indexRenames))}, ` +
        `${stream ? quoteLiteral(stream.slot) : "NULL"}, ${stream ? quoteLiteral(stream.publication) : "NULL"}, ` +
        `${Math.max(0, Math.round(facts.estimatedRows))}${opts.group ? `, ${quoteLiteral(opts.group.name)}` : ""})`,
    );
  }
  if (facts.estimatedRows < 0)
    warnings.push(`${displayName(table)} was never analyzed: row estimates are unknown until ANALYZE`);
  if (opts.group && opts.group.foreignKeys.length > 0)
    warnings.push(
      `foreign key ${opts.group.foreignKeys.join(", ")} (to another table of group ${opts.group.name}) is left off ` +
        `the shadow while the tables are copied: pgshift backfill --group ${opts.group.name} adds it between the ` +
        "shadows once every table is copied, before any cutover (docs/groups.md)",
    );
  const streamSteps: Step[] = streamStatements.map((stmt) =>
    createsSlot(stmt)
      ? transactionStep([statement(`SET LOCAL statement_timeout = '${slotTimeoutMs}ms'`), statement(stmt)], {
          why:
            `the replication slot: its creation waits until the transactions running now end, ${slotTimeoutMs} ms ` +
            `at most`,
        })
      : statement(stmt, "session", "logical mode: the publication first, then the slot, before anything is copied"),
  );
  const transaction = lockSourceTransaction(src, statements, sourceAt, {
    lockTimeoutMs,
    terminateAfterMs: opts.terminateHoldersAfterMs ?? null,
    why: "the shadow, its partitions, the mirror and the migration's row, all or nothing",
  });
  const steps: Step[] = statements.length > 0 ? [...streamSteps, transaction] : [];
  return {
    source: src,
    shadow,
    retired,
    spec,
    mode,
    keyColumns,
    shadowKey: sKey,
    copyColumns: cols,
    sequences,
    mirrorFunction,
    partitions,
    estimatedRows: Math.max(0, facts.estimatedRows),
    totalBytes: facts.totalBytes,
    blockers,
    warnings,
    dependents: dependents.lines,
    widenedKeys: keys,
    atFinalize: atFinalize(keys),
    applicationStatements,
    streamStatements,
    statements,
    tableStatementCount,
    ddlGuard,
    steps,
    streamSteps,
    transaction,
    afterCopyStatements,
    deferredIndexes,
    facts,
  };
}

/**
 * What the backfill of `plan` will take (time, disk, WAL; logical mode: the WAL the slot may retain) and the free
 * disk where it can be read (predictBackfill): from the table's statistics, or with `sampleRows` from a sample
 * copy into a scratch table in a transaction that is rolled back. Null when blockers stop the plan.
 * @throws the sample copy's error (nothing stays of it).
 */
export async function predictPlan(
  sql: Sql,
  plan: MigrationPlan,
  opts: { sampleRows: number | null; walRateIntervalMs?: number },
): Promise<Prediction | null> {
  if (plan.blockers.length > 0 || !plan.facts) return null;
  const leaves = flattenPartitions(plan.partitions).filter((p) => !p.sub).length;
  return predictBackfill(sql, {
    source: plan.source,
    oid: plan.facts.oid,
    copyColumns: plan.copyColumns,
    shadowKey: plan.shadowKey,
    deferredOriginals: plan.deferredIndexes.map((d) => d.original),
    indexDefinitions: plan.deferredIndexes.map((d) => d.definition),
    partitions: leaves,
    rowLocks: copyLocksRows(plan.mode),
    mode: plan.mode,
    sampleRows: opts.sampleRows,
    ...(opts.walRateIntervalMs !== undefined ? { walRateIntervalMs: opts.walRateIntervalMs } : {}),
  });
}

/**
 * What changes at finalize when keys are widened: until then the original keys stay unique through the
 * retired table (the reverse mirror inserts there, so a duplicate is refused in the application's
 * transaction, as the original table would refuse it); after it only the widened keys are enforced.
 */
function atFinalize(keys: readonly WidenedKey[]): string | null {
  if (keys.length === 0) return null;
  const orig = keys.map((k) => `(${k.columns.join(", ")})`).join(", ");
  const wide = keys.map((k) => `(${k.widenedTo.join(", ")})`).join(", ");
  return (
    `until finalize, pgshift keeps ${orig} unique through the retired table (an insert or update that would ` +
    `duplicate one is refused in the application's transaction, as the original table refuses it); ` +
    `finalize drops the retired table, and from then on the database enforces only ${wide}: a row that ` +
    `repeats ${keys.length === 1 ? "that key" : "one of those keys"} with another value of the partition column is ` +
    `accepted`
  );
}

/**
 * The keys widened by the first level's column (`first`) and by the second level's (`second`): a key missing
 * both is widened with both (`widenedTo` ends with the first level's column, then the second's).
 */
export function mergeWidenedKeys(first: readonly WidenedKey[], second: readonly WidenedKey[]): WidenedKey[] {
  const out = first.map((k) => {
    const other = second.find((o) => o.index === k.index);
    return other ? { ...k, widenedTo: [...k.widenedTo, other.widenedTo.at(-1)!] } : k;
  });
  for (const o of second) if (!first.some((k) => k.index === o.index)) out.push(o);
  return out;
}

function textArray(xs: readonly string[]): string {
  return `ARRAY[${xs.map(quoteLiteral).join(", ")}]::text[]`;
}

/** min/max (as UTC text) or the distinct values of the partition column; what bounds are computed from. */
export async function readDataRange(sql: Sql, src: QualifiedName, spec: LevelSpec): Promise<DataRange> {
  const t = quoteQualified(src);
  const c = quoteIdent(spec.column);
  if (spec.strategy === "range" || spec.strategy === "range-int") {
    // Infinite values go to DEFAULT; they must not stretch the bounds.
    const finite = spec.strategy === "range" ? ` WHERE isfinite(${c})` : "";
    const r = await sql.unsafe(`SELECT min(${c})::text AS min, max(${c})::text AS max FROM ${t}${finite}`);
    return { min: (r[0]?.min as string | null) ?? null, max: (r[0]?.max as string | null) ?? null };
  }
  if (spec.strategy === "list") {
    const r = await sql.unsafe(`SELECT DISTINCT ${c}::text AS v FROM ${t} WHERE ${c} IS NOT NULL LIMIT 5001`);
    return { min: null, max: null, values: r.map((x) => String(x.v)) };
  }
  return { min: null, max: null };
}
