import { type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";

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
export const TRUNCATE_GUARD_FN: QualifiedName = { schema: "pgshift", name: "truncate_guard" };

function dollarTag(body: string): string {
  let tag = "$pgshift$";
  for (let n = 1; body.includes(tag); n++) tag = `$pgshift${n}$`;
  return tag;
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
 */
export function mirrorFunctionSql(m: TriggerMirrorSpec): string {
  const body = m.writes === "strict" ? strictBody(m) : upsertBody(m);
  const tag = dollarTag(body);
  return (
    `CREATE OR REPLACE FUNCTION ${quoteQualified(m.fn)}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER ` +
    `SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS ${tag}${body}${tag}`
  );
}

const keyTupleOf = (key: readonly string[], rec: string) => `(${key.map((k) => `${rec}.${quoteIdent(k)}`).join(", ")})`;

function insertSql(m: TriggerMirrorSpec): string {
  const overriding = m.overridingSystemValue ? " OVERRIDING SYSTEM VALUE" : "";
  return `INSERT INTO ${quoteQualified(m.to)} (${m.columns.map(quoteIdent).join(", ")})${overriding}
    VALUES (${m.columns.map((c) => `NEW.${quoteIdent(c)}`).join(", ")})`;
}

function upsertBody(m: TriggerMirrorSpec): string {
  const to = quoteQualified(m.to);
  const key = m.key.map(quoteIdent);
  const rest = m.columns.filter((c) => !m.key.includes(c)).map(quoteIdent);
  const conflict =
    rest.length === 0 ? "DO NOTHING" : `DO UPDATE SET ${rest.map((c) => `${c} = EXCLUDED.${c}`).join(", ")}`;
  const where = `(${key.join(", ")}) = ${keyTupleOf(m.key, "OLD")}`;
  // #variable_conflict use_column: a column named found, new, old or tg_op must mean the column.
  return `
#variable_conflict use_column
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM ${to} WHERE ${where};
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' AND ${keyTupleOf(m.key, "OLD")} IS DISTINCT FROM ${keyTupleOf(m.key, "NEW")} THEN
    DELETE FROM ${to} WHERE ${where};
  END IF;
  ${insertSql(m)}
    ON CONFLICT (${key.join(", ")}) ${conflict};
  RETURN NULL;
END
`;
}

function strictBody(m: TriggerMirrorSpec): string {
  const to = quoteQualified(m.to);
  const where = `(${m.key.map(quoteIdent).join(", ")}) = ${keyTupleOf(m.key, "OLD")}`;
  const always = m.columns.filter((c) => (m.alwaysIdentity ?? []).includes(c));
  const set = (cols: readonly string[]) => cols.map((c) => `${quoteIdent(c)} = NEW.${quoteIdent(c)}`).join(", ");
  const update = (cols: readonly string[]) => `UPDATE ${to} SET ${set(cols)} WHERE ${where};`;
  const settable = m.columns.filter((c) => !always.includes(c));
  // Every column may be a GENERATED ALWAYS identity column, leaving nothing to set when none changed.
  const plain = settable.length > 0 ? update(settable) : `PERFORM FROM ${to} WHERE ${where};`;
  const updateSql =
    always.length === 0
      ? `    ${plain}`
      : `    IF ${keyTupleOf(always, "OLD")} IS DISTINCT FROM ${keyTupleOf(always, "NEW")} THEN
      ${update(m.columns)}
    ELSE
      ${plain}
    END IF;`;
  return `
#variable_conflict use_column
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM ${to} WHERE ${where};
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' THEN
${updateSql}
    IF FOUND THEN
      RETURN NULL;
    END IF;
  END IF;
  ${insertSql(m)};
  RETURN NULL;
END
`;
}

/**
 * A DO block that runs `command` (a format() pattern with one %s for the partition) on every partition of
 * `parent`, at every level (only those where `condition`, an SQL condition on `relid`, holds); nothing
 * when `parent` is not partitioned. TRUNCATE of one partition fires only that partition's triggers, so the
 * guard must sit on each of them.
 */
function forEachPartitionSql(parent: QualifiedName, command: string, condition?: string): string {
  return `DO $pgshift$
DECLARE part regclass;
BEGIN
  FOR part IN SELECT relid FROM pg_catalog.pg_partition_tree(${quoteLiteral(quoteQualified(parent))}::regclass) WHERE level > 0${condition ? ` AND ${condition}` : ""} LOOP
    EXECUTE format(${quoteLiteral(command)}, part);
  END LOOP;
END
$pgshift$`;
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
      `NOT EXISTS (SELECT FROM pg_catalog.pg_trigger AS g WHERE g.tgrelid = relid AND g.tgname = ${quoteLiteral(TRUNCATE_TRIGGER)})`,
    ),
  ];
}

/** Statements that start mirroring `from` into `to`: the function, the row trigger, the TRUNCATE guards. */
export function installTriggerMirrorSql(m: TriggerMirrorSpec): string[] {
  const from = quoteQualified(m.from);
  return [
    mirrorFunctionSql(m),
    `CREATE TRIGGER ${MIRROR_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON ${from} FOR EACH ROW EXECUTE FUNCTION ${quoteQualified(m.fn)}()`,
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

/** The shared TRUNCATE guard function, created with the pgshift schema. */
export function truncateGuardFunctionSql(): string {
  return `CREATE OR REPLACE FUNCTION ${quoteQualified(TRUNCATE_GUARD_FN)}() RETURNS trigger LANGUAGE plpgsql AS $pgshift$
BEGIN
  RAISE EXCEPTION 'pgshift: TRUNCATE of %.% is refused while the table is being migrated', TG_TABLE_SCHEMA, TG_TABLE_NAME
    USING ERRCODE = 'object_in_use',
          HINT = 'finish the migration (pgshift finalize) or undo it (pgshift abort) first';
END
$pgshift$`;
}
