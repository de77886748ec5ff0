import { type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { type SqlValue, sqlFile } from "../sql/template.js";

/** What a row-trigger mirror copies from one table into another. */
export interface TriggerMirrorSpec {
  /** Schema-qualified name of the trigger function to create. */
  fn: QualifiedName;
  /** Table the trigger fires on (where the application writes). */
  from: QualifiedName;
  /** Table that receives the mirrored writes. */
  to: QualifiedName;
  /** Columns written (generated columns excluded), in table order. */
  columns: readonly string[];
  /** The target's unique key used for ON CONFLICT and to find the row to delete (NOT NULL columns). */
  key: readonly string[];
  /** Write with OVERRIDING SYSTEM VALUE (target has a GENERATED ALWAYS identity column). */
  overridingSystemValue: boolean;
  /**
   * How rows are written into the target (default "upsert"):
   * - "upsert": the forward mirror into the partitioned shadow. INSERT upserts on `key` (a backfill batch may
   *   have written the row already), an UPDATE that changes the key deletes the old row first.
   * - "strict": the reverse mirror into the retired (original) table after cutover. INSERT is a plain INSERT,
   *   UPDATE updates the row found by its old key: every unique index and constraint of the target refuses
   *   a duplicate inside the application's transaction, as the original table did before cutover, and no
   *   row of the target is ever overwritten by a row with another identity.
   */
  writes?: "upsert" | "strict";
  /**
   * "strict" only: the target's GENERATED ALWAYS identity columns. An UPDATE sets them only when their value
   * changed, and then the target refuses it as the original table would (such a column "can only be updated
   * to DEFAULT").
   */
  alwaysIdentity?: readonly string[];
}

export const MIRROR_TRIGGER = "pgshift_mirror";
export const TRUNCATE_TRIGGER = "pgshift_truncate_guard";
/** The TRUNCATE guard's function, created with the pgshift schema (src/sql/schema/000001.sql). */
export const TRUNCATE_GUARD_FN: QualifiedName = { schema: "pgshift", name: "truncate_guard" };

/**
 * The template at `path` filled with `values` and a dollar quote (:tag) that occurs nowhere in the body:
 * $pgshift$, else $pgshift1$, $pgshift2$, ... (a body holds the names of the columns, which may hold one).
 */
function withDollarTag(path: string, values: Record<string, SqlValue>): string {
  for (let n = 0; ; n++) {
    const tag = n === 0 ? "$pgshift$" : `$pgshift${n}$`;
    const text = sqlFile(path, { ...values, tag });
    // The tag opens and closes the body; any other occurrence is inside it.
    if (text.split(tag).length === 3) return text;
  }
}

/**
 * The plpgsql trigger function of the mirror, as SQL text. Semantics, per row, in the application's transaction,
 * with `writes: "upsert"` (the forward mirror, into the partitioned shadow before cutover and after swap-back):
 * - INSERT: upsert the new row into the target (`ON CONFLICT (key) DO UPDATE`): an insert-or-nothing would
 *   keep a stale copy when a backfill batch already wrote the row.
 * - UPDATE: when the key (primary key and partition column) changed, delete the old row from the target
 *   first (else it would keep both); then upsert the new row. A row moving between partitions is thus
 *   removed from its old partition and written into its new one.
 * - DELETE: delete the row by its old key.
 * With `writes: "strict"` (the reverse mirror, from the partitioned live table into the retired table after
 * cutover): the partitioned table's unique keys are the original ones extended with the partition column, so
 * it accepts a row that reuses an existing key with another partition value; an upsert would then overwrite
 * the original row in the retired table, and swap-back would lose it. Instead:
 * - INSERT: a plain INSERT; every unique index of the retired table (the original table's, not only its
 *   primary key) refuses a duplicate with unique_violation (23505) in the application's transaction, the
 *   error the original table gave before cutover, and the application's statement fails with it.
 * - UPDATE: `UPDATE ... WHERE key = OLD.key`, setting every column: when the key changes, the retired
 *   table's unique indexes decide. A row it lacks (it never should) is inserted. GENERATED ALWAYS identity
 *   columns are set only when their value changed (the target then refuses as the original did: 428C9).
 * - DELETE: delete the row by its old key. (An UPDATE of the partitioned table that moves a row to another
 *   partition fires DELETE then INSERT: "Overview of Trigger Behavior" in the PostgreSQL documentation.)
 * NOT NULL key columns make `=` exact; SECURITY DEFINER with a fixed search_path lets application roles that
 * may write the source write the target through the trigger, and nothing else.
 * `plan_cache_mode = force_generic_plan`: PL/pgSQL keeps each statement's plan, but when the target is
 * partitioned the plan cache judges the generic plan (all partitions) dearer than a custom one and plans the
 * statement again on every row; a generic plan prunes partitions when it runs instead ("Partition Pruning"
 * and "plan_cache_mode" in the PostgreSQL documentation).
 * The SQL is in src/sql/mirror/upsert.sql and src/sql/mirror/strict.sql.
 */
export function mirrorFunctionSql(m: TriggerMirrorSpec): string {
  const values: Record<string, SqlValue> = {
    fn: m.fn,
    to: m.to,
    columns: m.columns,
    key: m.key,
    old_key: keyTupleOf(m.key, "OLD"),
    new_values: m.columns.map((c) => `NEW.${quoteIdent(c)}`).join(", "),
    overriding: m.overridingSystemValue ? " OVERRIDING SYSTEM VALUE" : "",
  };
  if (m.writes === "strict") return withDollarTag("mirror/strict.sql", { ...values, update: strictUpdate(m) });
  const rest = m.columns.filter((c) => !m.key.includes(c)).map(quoteIdent);
  const conflict =
    rest.length === 0 ? "DO NOTHING" : `DO UPDATE SET ${rest.map((c) => `${c} = EXCLUDED.${c}`).join(", ")}`;
  return withDollarTag("mirror/upsert.sql", { ...values, new_key: keyTupleOf(m.key, "NEW"), conflict });
}

const keyTupleOf = (key: readonly string[], rec: string) => `(${key.map((k) => `${rec}.${quoteIdent(k)}`).join(", ")})`;

/** The strict mirror's UPDATE by the old key (its GENERATED ALWAYS identity columns set only when changed). */
function strictUpdate(m: TriggerMirrorSpec): string {
  const to = quoteQualified(m.to);
  const where = `(${m.key.map(quoteIdent).join(", ")}) = ${keyTupleOf(m.key, "OLD")}`;
  const always = m.columns.filter((c) => (m.alwaysIdentity ?? []).includes(c));
  const set = (cols: readonly string[]) => cols.map((c) => `${quoteIdent(c)} = NEW.${quoteIdent(c)}`).join(", ");
  const update = (cols: readonly string[]) => `UPDATE ${to} SET ${set(cols)} WHERE ${where};`;
  const settable = m.columns.filter((c) => !always.includes(c));
  // Every column may be a GENERATED ALWAYS identity column, leaving nothing to set when none changed.
  const plain = settable.length > 0 ? update(settable) : `PERFORM FROM ${to} WHERE ${where};`;
  return always.length === 0
    ? `    ${plain}`
    : `    IF ${keyTupleOf(always, "OLD")} IS DISTINCT FROM ${keyTupleOf(always, "NEW")} THEN
      ${update(m.columns)}
    ELSE
      ${plain}
    END IF;`;
}

/**
 * A DO block that runs `command` (a format() pattern with one %s for the partition) on every partition of
 * `parent`, at every level (only those where `condition`, an SQL condition on `relid`, holds); nothing
 * when `parent` is not partitioned. TRUNCATE of one partition fires only that partition's triggers, so the
 * guard must sit on each of them.
 */
function forEachPartitionSql(parent: QualifiedName, command: string, condition?: string): string {
  return sqlFile("mirror/each-partition.sql", { parent, command, condition: condition ? ` AND ${condition}` : "" });
}

/**
 * The TRUNCATE guard on `table` and, when it is partitioned, on each of its partitions that lacks it.
 * Both tables of a migration carry it from start until abort or finalize: TRUNCATE fires no row trigger, so
 * a TRUNCATE of the live table would leave its rows in the copy, and a TRUNCATE of the copy (the shadow
 * before cutover, the retired table after) would lose them at the next cutover or swap-back.
 */
export function truncateGuardSql(table: QualifiedName): string[] {
  const t = quoteQualified(table);
  const guard = `BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION ${quoteQualified(TRUNCATE_GUARD_FN)}()`;
  // Partitions that already carry it (since start, or given it by the DDL guard when they were created) are
  // left alone: cutover and swap-back run this under their locks, and a catalog read is cheaper than a
  // CREATE OR REPLACE per partition.
  return [
    `CREATE OR REPLACE TRIGGER ${TRUNCATE_TRIGGER} ${guard.replace("%s", () => t)}`,
    forEachPartitionSql(
      table,
      `CREATE TRIGGER ${TRUNCATE_TRIGGER} ${guard}`,
      `NOT EXISTS (SELECT FROM pg_catalog.pg_trigger AS g WHERE g.tgrelid = relid AND g.tgname ` +
        `= ${quoteLiteral(TRUNCATE_TRIGGER)})`,
    ),
  ];
}

/** Statements that start mirroring `from` into `to`: the function, the row trigger, the TRUNCATE guards. */
export function installTriggerMirrorSql(m: TriggerMirrorSpec): string[] {
  const from = quoteQualified(m.from);
  return [
    mirrorFunctionSql(m),
    `CREATE TRIGGER ${MIRROR_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON ${from} FOR EACH ROW EXECUTE ` +
      `FUNCTION ${quoteQualified(m.fn)}()`,
    ...truncateGuardSql(m.from),
  ];
}

/** The statement that stops mirroring out of `from` (the function is dropped separately; the TRUNCATE guard stays). */
export function removeMirrorTriggerSql(from: QualifiedName): string[] {
  return [`DROP TRIGGER IF EXISTS ${MIRROR_TRIGGER} ON ${quoteQualified(from)}`];
}

/** Statements that remove the TRUNCATE guard from `table` and its partitions (abort and finalize). */
export function removeTruncateGuardSql(table: QualifiedName): string[] {
  return [
    `DROP TRIGGER IF EXISTS ${TRUNCATE_TRIGGER} ON ${quoteQualified(table)}`,
    forEachPartitionSql(table, `DROP TRIGGER IF EXISTS ${TRUNCATE_TRIGGER} ON %s`),
  ];
}
