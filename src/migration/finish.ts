import type { Sql } from "../db.js";
import { table as tableRef, withLockRetry, type AnySql, type LockRetryOptions } from "../db.js";
import { PgshiftError } from "../errors.js";
import { log } from "../log.js";
import { mirrorFor } from "../mirror/mirror.js";
import { displayName, quoteIdent, quoteQualified, type QualifiedName } from "../names.js";
import { lockMigration, requireMigration, unlockMigration, type Migration } from "./state.js";

/**
 * Statements of finalize (phase cutover): stop the reverse mirror, drop the retired table and the mirror
 * function, re-create identity columns on the live table from their old sequence's position, forget the
 * migration. Identity sequences belong to their column and would go with the retired table, so their next
 * value is read first and the new identity starts there (`seqNext` maps column -> next value).
 */
export function finalizeSql(m: Migration, seqNext: Map<string, string>): string[] {
  const mirror = mirrorFor(m.mode);
  const out = [`LOCK TABLE ${quoteQualified(m.live)}, ${quoteQualified(m.copy)} IN ACCESS EXCLUSIVE MODE`, ...mirror.stopSql(m)];
  const identities = m.sequences.filter((x) => x.identity !== "");
  // The live table's default depends on the identity sequence, which goes with the retired table.
  for (const s of identities) out.push(`ALTER TABLE ${quoteQualified(m.live)} ALTER COLUMN ${quoteIdent(s.column)} DROP DEFAULT`);
  out.push(`DROP TABLE ${quoteQualified(m.copy)}`);
  for (const s of identities) {
    const col = quoteIdent(s.column);
    const next = seqNext.get(s.column) ?? "1";
    out.push(
      `ALTER TABLE ${quoteQualified(m.live)} ALTER COLUMN ${col} ADD GENERATED ${s.identity === "a" ? "ALWAYS" : "BY DEFAULT"} AS IDENTITY ` +
        `(SEQUENCE NAME ${quoteQualified({ schema: s.schema, name: s.name })} START WITH ${next})`,
    );
  }
  out.push(...mirror.dropSql(m));
  out.push(`DELETE FROM pgshift.migrations WHERE id = ${m.id}`);
  return out;
}

/** Next value of each identity sequence (column -> value), read where finalize will re-create the identity. */
async function identityNext(sql: AnySql, m: Migration): Promise<Map<string, string>> {
  const seqNext = new Map<string, string>();
  for (const s of m.sequences.filter((x) => x.identity !== "")) {
    const r = await sql`
      select case when sq.is_called then sq.last_value + ps.increment_by else sq.last_value end::text as next
        from ${tableRef(sql, { schema: s.schema, name: s.name })} sq, pg_sequences ps
       where ps.schemaname = ${s.schema} and ps.sequencename = ${s.name}`;
    seqNext.set(s.column, String(r[0]?.next ?? "1"));
  }
  return seqNext;
}

/** Statements of abort (before cutover): stop the mirror, drop the shadow and the mirror function, forget the migration. */
export function abortSql(m: Migration): string[] {
  const mirror = mirrorFor(m.mode);
  return [
    `LOCK TABLE ${quoteQualified(m.live)} IN SHARE ROW EXCLUSIVE MODE`,
    ...mirror.stopSql(m),
    `DROP TABLE IF EXISTS ${quoteQualified(m.copy)}`,
    ...mirror.dropSql(m),
    `DELETE FROM pgshift.migrations WHERE id = ${m.id}`,
  ];
}

export interface FinishOptions extends LockRetryOptions {
  /** finalize only: the person confirmed that the retired table may be dropped. */
  yes?: boolean;
  /** finalize only: return the statements without running them. */
  dryRun?: boolean;
}

/**
 * After cutover: drops the retired table, the reverse mirror and the migration's metadata, in one
 * transaction. After this, swap-back is no longer possible.
 * @throws PgshiftError without `yes`; PhaseError unless the migration is in phase cutover.
 */
export async function finalize(sql: Sql, table: QualifiedName, opts: FinishOptions = {}): Promise<{ statements: string[] }> {
  await lockMigration(sql, table);
  try {
    const m = await requireMigration(sql, table, "finalize", ["cutover"]);
    if (!opts.yes && !opts.dryRun) {
      throw new PgshiftError(`finalize drops ${displayName(m.copy)} and makes swap-back impossible`, { hint: "run it again with --yes to confirm" });
    }
    let statements: string[] = [];
    if (opts.dryRun) return { statements: finalizeSql(m, await identityNext(sql, m)) };
    await withLockRetry(
      sql,
      async (tx) => {
        statements = finalizeSql(m, await identityNext(tx, m));
        for (const stmt of statements) await tx.unsafe(stmt);
      },
      opts,
    );
    log().info({ table: displayName(table) }, "finalized: retired table, mirror and metadata dropped");
    return { statements };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * Before cutover (or after a swap-back): drops the shadow and the mirror and forgets the migration,
 * leaving the source table exactly as it was.
 * @throws PhaseError in phase cutover (swap back first).
 */
export async function abort(sql: Sql, table: QualifiedName, opts: LockRetryOptions = {}): Promise<{ statements: string[] }> {
  await lockMigration(sql, table);
  try {
    const m = await requireMigration(sql, table, "abort", ["started", "backfilling", "backfilled", "swapped_back"]);
    const statements = abortSql(m);
    await withLockRetry(
      sql,
      async (tx) => {
        for (const stmt of statements) await tx.unsafe(stmt);
      },
      opts,
    );
    log().info({ table: displayName(table) }, "aborted: shadow and mirror dropped, source untouched");
    return { statements };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}
