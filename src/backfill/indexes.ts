import { inspectTable } from "../catalog/inspect.js";
import type { Sql } from "../db.js";
import { afterCopySql, deferredIndexSql, partitionTree } from "../ddl/shadow.js";
import type { Migration } from "../migration/state.js";
import { quoteQualified } from "../names.js";
import { block, type Step, statement, transactionStep } from "../plan/steps.js";
import { runChains } from "./workers.js";

/**
 * The steps that build the shadow's secondary indexes after the copy, without ever blocking the writes the
 * mirror makes in the application's transactions: for each index, an invalid parent index `ON ONLY` the shadow
 * (a brief lock of the empty parent, in a transaction under lock_timeout, retried), then on each partition
 * `CREATE INDEX CONCURRENTLY` and `ALTER INDEX ... ATTACH PARTITION`. An index backing a UNIQUE constraint
 * gets its constraint on the parent (`ALTER TABLE ONLY ... ADD CONSTRAINT`) and on each partition
 * (`ADD CONSTRAINT ... USING INDEX`, deferrability kept) before the attach, which links the two: so the
 * constraint (its name, DEFERRABLE, INITIALLY DEFERRED) exists as on the original, yet no index is
 * maintained row by row during the copy.
 * Re-runnable, from the catalog as it is when the plan is made: a valid index already attached is skipped; an
 * INVALID one left by a crash during CREATE INDEX CONCURRENTLY is dropped and built again (docs: CREATE INDEX,
 * "Building Indexes Concurrently").
 * With `workers` above 1 the partitions' builds of each index run over that many connections at once, each
 * partition's chain (build, constraint, attach) on one connection, after the parent's index `ON ONLY` and the
 * sub-partitioned levels' indexes: the recipe of PostgreSQL's documentation for an index on a partitioned table
 * built without locking it as a whole ("Table Partitioning", section "Partition Maintenance": `CREATE INDEX ... ON
 * ONLY` the parent, then on each partition `CREATE INDEX CONCURRENTLY` and `ALTER INDEX ... ATTACH PARTITION`;
 * the parent's index becomes valid once every partition's is attached).
 * @param lockTimeoutMs lock_timeout of each transaction, ms.
 * @param workers connections that build the partitions' indexes at once (default 1: one after the other).
 */
export async function deferredIndexSteps(sql: Sql, m: Migration, lockTimeoutMs: number, workers = 1): Promise<Step[]> {
  if (m.deferred_indexes.length === 0) return [];
  const shadow = m.partitioned;
  // Every level (two levels: a partitioned partition's index, then its partitions': partitionTree).
  const partitions = await partitionTree(sql, shadow);
  const steps: Step[] = [];
  for (const idx of m.deferred_indexes) {
    const d = deferredIndexSql(shadow.schema, shadow.name, partitions, idx);
    steps.push(transactionStep([statement(d.parent)], { lockTimeoutMs, why: `index ${idx.name}: its parent` }));
    const chains: Step[][] = [];
    for (const p of d.perPartition) {
      if (p.partitioned) {
        steps.push(transactionStep([statement(p.create), statement(p.attach)], { lockTimeoutMs }));
        continue;
      }
      const state = await sql`
        select i.indisvalid as valid, exists (select from pg_inherits h where h.inhrelid = i.indexrelid) as attached,
               exists (select from pg_constraint c where c.conindid = i.indexrelid and c.conrelid = i.indrelid) as
                 constrained
          from pg_index i where i.indexrelid =
            to_regclass(${quoteQualified({ schema: shadow.schema, name: p.index })})`;
      const s = state[0];
      if (s?.valid && s.attached) continue;
      const chain: Step[] = [];
      chains.push(chain);
      if (s && !s.valid)
        chain.push(
          statement(
            `DROP INDEX CONCURRENTLY IF EXISTS ${quoteQualified({ schema: shadow.schema, name: p.index })}`,
            "concurrently",
            `left invalid by an interrupted build`,
          ),
        );
      if (!s?.valid) chain.push(statement(p.create, "concurrently"));
      if (p.constrain && !(s?.valid && s.constrained))
        chain.push(transactionStep([statement(p.constrain)], { lockTimeoutMs }));
      chain.push(transactionStep([statement(p.attach)], { lockTimeoutMs }));
    }
    if (workers > 1 && chains.length > 1)
      steps.push(
        block(
          "once",
          `index ${idx.name} on ${chains.length} partitions, over ${Math.min(workers, chains.length)} connections ` +
            "at once (each partition's statements in order on one of them)",
          chains.flat(),
          () => runChains(sql, workers, chains),
        ),
      );
    else steps.push(...chains.flat());
  }
  return steps;
}

/**
 * What backfill does last, once the rows are copied and the deferred indexes built (afterCopySql, from the
 * original table's catalog as it is when the plan is made): NOT VALID checks and foreign keys, comments on
 * the deferred indexes and their constraints, REPLICA IDENTITY USING INDEX, the CLUSTER mark on the
 * partitions, then `ANALYZE` of the partitioned table. Each DDL statement in a transaction of its own under
 * lock_timeout (retried); ANALYZE on its own without it (it takes SHARE UPDATE EXCLUSIVE only, which the
 * application's writes do not wait for, and would otherwise give up behind autovacuum). Re-runnable.
 */
export async function finishShadowSteps(sql: Sql, m: Migration, lockTimeoutMs: number): Promise<Step[]> {
  const facts = await inspectTable(sql, m.original);
  if (!facts) return [];
  return afterCopySql(facts, { source: m.original, shadow: m.partitioned }).map((stmt) =>
    stmt.startsWith("ANALYZE ") ? statement(stmt, "session") : transactionStep([statement(stmt)], { lockTimeoutMs }),
  );
}
