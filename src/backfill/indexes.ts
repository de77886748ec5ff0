import { inspectTable } from "../catalog/inspect.js";
import type { Sql } from "../db.js";
import { type LockRetryOptions, withLockRetry } from "../db.js";
import { afterCopySql, deferredIndexSql } from "../ddl/shadow.js";
import { log } from "../log.js";
import type { Migration } from "../migration/state.js";
import { displayName, quoteQualified } from "../names.js";

/**
 * Builds the shadow's secondary indexes after the copy, without ever blocking the writes the mirror
 * makes in the application's transactions: for each index, an invalid parent index `ON ONLY` the shadow
 * (a brief lock of the empty parent, under lock_timeout with retries), then on each partition
 * `CREATE INDEX CONCURRENTLY` and `ALTER INDEX ... ATTACH PARTITION`. An index backing a UNIQUE constraint
 * gets its constraint on the parent (`ALTER TABLE ONLY ... ADD CONSTRAINT`) and on each partition
 * (`ADD CONSTRAINT ... USING INDEX`, deferrability kept) before the attach, which links the two: so the
 * constraint (its name, DEFERRABLE, INITIALLY DEFERRED) exists as on the original, yet no index is
 * maintained row by row during the copy. Re-runnable: a valid index already attached is skipped; an INVALID one left by a crash during CREATE INDEX CONCURRENTLY is dropped and
 * built again (docs: CREATE INDEX, "Building Indexes Concurrently").
 * @returns the number of partition indexes built by this call.
 */
export async function buildDeferredIndexes(sql: Sql, m: Migration, opts: LockRetryOptions = {}): Promise<number> {
  if (m.deferred_indexes.length === 0) return 0;
  const shadow = m.partitioned;
  const parts = await sql`
    select c.relname::text as name from pg_inherits i join pg_class c on c.oid = i.inhrelid
     where i.inhparent = to_regclass(${quoteQualified(shadow)}) order by c.relname`;
  const partitions = parts.map((p) => String(p.name));
  let built = 0;
  for (const idx of m.deferred_indexes) {
    const d = deferredIndexSql(shadow.schema, shadow.name, partitions, idx);
    await withLockRetry(
      sql,
      async (tx) => {
        await tx.unsafe(d.parent);
      },
      opts,
    );
    for (const p of d.perPartition) {
      const state = await sql`
        select i.indisvalid as valid, exists (select from pg_inherits h where h.inhrelid = i.indexrelid) as attached,
               exists (select from pg_constraint c where c.conindid = i.indexrelid and c.conrelid = i.indrelid) as constrained
          from pg_index i where i.indexrelid = to_regclass(${quoteQualified({ schema: shadow.schema, name: p.index })})`;
      const s = state[0];
      if (s?.valid && s.attached) continue;
      if (s && !s.valid)
        await sql.unsafe(
          `DROP INDEX CONCURRENTLY IF EXISTS ${quoteQualified({ schema: shadow.schema, name: p.index })}`,
        );
      const t0 = performance.now();
      if (!s?.valid) {
        await sql.unsafe(p.create);
        built++;
      }
      const constrain = p.constrain;
      if (constrain && !(s?.valid && s.constrained)) {
        await withLockRetry(
          sql,
          async (tx) => {
            await tx.unsafe(constrain);
          },
          opts,
        );
      }
      await withLockRetry(
        sql,
        async (tx) => {
          await tx.unsafe(p.attach);
        },
        opts,
      );
      log().debug(
        { index: p.index, partition: p.partition, ms: Math.round(performance.now() - t0) },
        "backfill: partition index built",
      );
    }
    log().info({ index: idx.name }, "backfill: index built on every partition");
  }
  return built;
}

/**
 * What backfill does last, once the rows are copied and the deferred indexes built (afterCopySql, from the
 * original table's catalog as it is now): NOT VALID checks and foreign keys, comments on the deferred
 * indexes and their constraints, REPLICA IDENTITY USING INDEX, the CLUSTER mark on the partitions, then
 * `ANALYZE` of the partitioned table. Each DDL statement runs in its own transaction under lock_timeout with
 * retries (withLockRetry); ANALYZE runs without lock_timeout (it takes SHARE UPDATE EXCLUSIVE only, which
 * the application's writes do not wait for, and would otherwise give up behind autovacuum). Re-runnable.
 * @returns the statements run.
 */
export async function finishShadow(sql: Sql, m: Migration, opts: LockRetryOptions = {}): Promise<string[]> {
  const facts = await inspectTable(sql, m.original);
  if (!facts) return [];
  const statements = afterCopySql(facts, { source: m.original, shadow: m.partitioned });
  for (const stmt of statements) {
    const t0 = performance.now();
    if (stmt.startsWith("ANALYZE ")) await sql.unsafe(stmt);
    else {
      await withLockRetry(
        sql,
        async (tx) => {
          await tx.unsafe(stmt);
        },
        opts,
      );
    }
    log().debug(
      { table: displayName(m.partitioned), ms: Math.round(performance.now() - t0), statement: stmt.slice(0, 120) },
      "backfill: shadow finished",
    );
  }
  return statements;
}
