/**
 * Carrying over, before a switch takes its lock, the indexes created on the live table during the migration
 * (lateObjects): built on the copy without blocking the writes the mirror makes there, then recorded in the
 * migration. Its steps are the first part of the plan cutover and swap-back print and run.
 */
import {
  type LateIndex,
  type LateObjects,
  lateDependentsRefusal,
  lateIndexLine,
  lateObjects,
} from "../catalog/drift.js";
import type { AnySql, Sql } from "../db.js";
import { deferredIndexSql, partitionTree } from "../ddl/shadow.js";
import { PgshiftError } from "../errors.js";
import { log } from "../log.js";
import type { Migration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { runSteps, type Step, statement, transactionStep } from "../plan/steps.js";

/**
 * An index built on the copy before the switch: its name there, the live table's index it stands for, its definition
 * after USING.
 */
export interface BuiltIndex {
  name: string;
  on: string;
  original: string;
  definition: string;
  /** Unique, widened with the partition column (the copy is partitioned). */
  widened: boolean;
}

/** What carryOverPlan found to do: the steps of each late index, then the statement that records the renames. */
export interface CarryOver {
  lateObjects: LateObjects;
  indexes: { index: LateIndex; steps: Step[] }[];
  /** The UPDATE of pgshift.migrations that records the partitioned table's new indexes (index_renames). */
  record: Step | null;
  /** The migration as the switch's transaction then reads it (index renames recorded). */
  migration: Migration;
}

/** Whether there is nothing to carry over. */
export const nothingToCarry = (c: CarryOver): boolean => c.indexes.length === 0 && c.record === null;

/** Every step of the carry-over, in order. */
export const carryOverSteps = (c: CarryOver): Step[] => [
  ...c.indexes.flatMap((i) => i.steps),
  ...(c.record ? [c.record] : []),
];

/** State of an index of the copy by name: absent (null), valid or not, attached to a parent, backing a constraint. */
async function indexState(
  sql: AnySql,
  index: QualifiedName,
): Promise<{ valid: boolean; attached: boolean; constrained: boolean } | null> {
  const r = await sql`
    select i.indisvalid as valid, exists (select from pg_inherits h where h.inhrelid = i.indexrelid) as attached,
           exists (select from pg_constraint c where c.conindid = i.indexrelid and c.conrelid = i.indrelid) as
             constrained
      from pg_index i where i.indexrelid = to_regclass(${quoteQualified(index)})`;
  const x = r[0];
  return x ? { valid: Boolean(x.valid), attached: Boolean(x.attached), constrained: Boolean(x.constrained) } : null;
}

/**
 * The steps that build one late index on the copy (lateObjects), from the state the copy is in now (so an
 * interrupted build is completed, not repeated): on a partitioned copy an invalid index ON ONLY the parent
 * (one short transaction under `lockTimeoutMs`), then per partition whose index is not yet valid and attached:
 * DROP INDEX
 * CONCURRENTLY of an INVALID one left by an interrupted build, CREATE INDEX CONCURRENTLY, ATTACH PARTITION in
 * a short transaction (deferredIndexSql, as the backfill builds the shadow's indexes); on the retired table
 * the same DROP if needed and one CREATE INDEX CONCURRENTLY. None of them blocks the writes the mirror makes
 * to the copy for more than the parent's brief lock (docs: CREATE INDEX, "Building Indexes Concurrently";
 * ALTER INDEX ... ATTACH PARTITION).
 */
async function lateIndexSteps(sql: AnySql, lo: LateObjects, i: LateIndex, lockTimeoutMs: number): Promise<Step[]> {
  const drop = (name: QualifiedName) =>
    statement(`DROP INDEX CONCURRENTLY IF EXISTS ${quoteQualified(name)}`, "concurrently", "left INVALID by a build");
  if (!i.partitioned) {
    const name = { schema: lo.copy.schema, name: i.build.name };
    const st = await indexState(sql, name);
    const steps: Step[] = st && !st.valid ? [drop(name)] : [];
    steps.push(
      statement(
        `CREATE ${i.build.unique ? "UNIQUE " : ""}INDEX CONCURRENTLY IF NOT EXISTS ${quoteIdent(i.build.name)} ` +
          `ON ${quoteQualified(lo.copy)} USING ${i.build.definition}`,
        "concurrently",
      ),
    );
    return steps;
  }
  const d = deferredIndexSql(lo.copy.schema, lo.copy.name, await partitionTree(sql, lo.copy), i.build);
  const short = (stmt: string) => transactionStep([statement(stmt)], { lockTimeoutMs });
  const out: Step[] = [short(d.parent)];
  for (const p of d.perPartition) {
    if (p.partitioned) {
      out.push(transactionStep([statement(p.create), statement(p.attach)], { lockTimeoutMs }));
      continue;
    }
    const name = { schema: lo.copy.schema, name: p.index };
    const st = await indexState(sql, name);
    if (st?.valid && st.attached) continue;
    if (st && !st.valid) out.push(drop(name));
    if (!st?.valid) out.push(statement(p.create, "concurrently"));
    if (p.constrain && !(st?.valid && st.constrained)) out.push(short(p.constrain));
    out.push(short(p.attach));
  }
  return out;
}

/** The statement that records renames in the migration (finalize gives each `from` index the name `to`). */
function recordRenamesSql(m: Migration, renames: readonly { from: string; to: string }[]): string {
  return (
    `UPDATE pgshift.migrations SET index_renames ` +
    `= ${quoteLiteral(JSON.stringify([...m.index_renames, ...renames]))}::jsonb, updated_at = now() WHERE id = ${m.id}`
  );
}

/**
 * What cutover (or swap-back) runs before its transaction to carry the objects created on the live table
 * during the migration over to the copy (lateObjects): the steps that build each late index, then the
 * UPDATE that records the partitioned table's new indexes in the migration's index renames.
 * @throws PgshiftError (exit 2) naming every other object that would be left behind, with the statements to
 *   run (lateDependentsRefusal); nothing changed.
 */
export async function carryOverPlan(
  sql: AnySql,
  m: Migration,
  table: QualifiedName,
  lockTimeoutMs: number,
): Promise<CarryOver> {
  const lo = await lateObjects(sql, m);
  const refusal = lateDependentsRefusal(lo, table);
  if (refusal) throw refusal;
  const indexes: CarryOver["indexes"] = [];
  for (const i of lo.indexes) indexes.push({ index: i, steps: await lateIndexSteps(sql, lo, i, lockTimeoutMs) });
  const renames = [
    ...lo.renames,
    ...(lo.step === "cutover" ? lo.indexes.map((i) => ({ from: i.build.name, to: i.name })) : []),
  ];
  return {
    lateObjects: lo,
    indexes,
    record: renames.length > 0 ? statement(recordRenamesSql(m, renames), "session") : null,
    migration: { ...m, index_renames: [...m.index_renames, ...renames] },
  };
}

/**
 * Runs a carry-over (carryOverPlan's steps, in order; `retries`: of each short transaction), logging each index
 * it builds.
 * @returns the indexes built.
 * @throws PgshiftError when a build fails (the switch has not happened; the hint says what to do).
 */
export async function runCarryOver(
  sql: Sql,
  c: CarryOver,
  table: QualifiedName,
  retries?: number,
): Promise<BuiltIndex[]> {
  const lo = c.lateObjects;
  const built: BuiltIndex[] = [];
  for (const { index: i, steps } of c.indexes) {
    log().info({ table: displayName(table) }, lateIndexLine(lo, i));
    if (i.widened)
      log().warn(
        { index: i.name, on: displayName(lo.copy), definition: i.build.definition },
        `unique index ${i.name} is built on the partitioned table with the partition column added to its key: unique ` +
          `only together with it`,
      );
    try {
      await runSteps(sql, steps, { lockRetry: { retries } });
    } catch (err) {
      if (err instanceof PgshiftError) throw err;
      throw new PgshiftError(
        `cannot ${lo.step === "cutover" ? "cut over" : "swap back"}: building index ${i.build.name} ` +
          `on ${displayName(lo.copy)} (for index ${i.name} of ${displayName(lo.live)}) ` +
          `failed: ${err instanceof Error ? err.message : String(err)}`,
        {
          hint:
            `nothing was switched; fix the cause (or drop index ${i.name}), then run ` +
            `pgshift ${lo.step} ${displayName(table)} again`,
          cause: err,
        },
      );
    }
    built.push({
      name: i.build.name,
      on: displayName(lo.copy),
      original: i.name,
      definition: i.build.definition,
      widened: i.widened,
    });
  }
  if (c.record) await runSteps(sql, [c.record]);
  return built;
}
