import { quoteIdent, quoteLiteral, quoteQualified, type QualifiedName } from "../names.js";

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
 * The plpgsql trigger function of the mirror, as SQL text. Semantics, per row, in the application's transaction:
 * - INSERT: upsert the new row into the target (`ON CONFLICT (key) DO UPDATE`): an insert-or-nothing would
 *   keep a stale copy when a backfill batch already wrote the row.
 * - UPDATE: when the key (primary key and partition column) changed, delete the old row from the target
 *   first (else it would keep both); then upsert the new row. A row moving between partitions is thus
 *   removed from its old partition and written into its new one.
 * - DELETE: delete the row by its old key.
 * NOT NULL key columns make `=` exact; SECURITY DEFINER with a fixed search_path lets application roles that
 * may write the source write the target through the trigger, and nothing else.
 * `plan_cache_mode = force_generic_plan`: PL/pgSQL keeps each statement's plan, but when the target is
 * partitioned the plan cache judges the generic plan (all partitions) dearer than a custom one and plans the
 * statement again on every row; a generic plan prunes partitions when it runs instead ("Partition Pruning"
 * and "plan_cache_mode" in the PostgreSQL documentation).
 */
export function mirrorFunctionSql(m: TriggerMirrorSpec): string {
  const to = quoteQualified(m.to);
  const cols = m.columns.map(quoteIdent);
  const key = m.key.map(quoteIdent);
  const keyTuple = (rec: string) => `(${m.key.map((k) => `${rec}.${quoteIdent(k)}`).join(", ")})`;
  const rest = m.columns.filter((c) => !m.key.includes(c)).map(quoteIdent);
  const conflict =
    rest.length === 0 ? "DO NOTHING" : `DO UPDATE SET ${rest.map((c) => `${c} = EXCLUDED.${c}`).join(", ")}`;
  const where = `(${key.join(", ")}) = ${keyTuple("OLD")}`;
  const overriding = m.overridingSystemValue ? " OVERRIDING SYSTEM VALUE" : "";
  // #variable_conflict use_column: a column named found, new, old or tg_op must mean the column.
  const body = `
#variable_conflict use_column
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM ${to} WHERE ${where};
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' AND ${keyTuple("OLD")} IS DISTINCT FROM ${keyTuple("NEW")} THEN
    DELETE FROM ${to} WHERE ${where};
  END IF;
  INSERT INTO ${to} (${cols.join(", ")})${overriding}
    VALUES (${m.columns.map((c) => `NEW.${quoteIdent(c)}`).join(", ")})
    ON CONFLICT (${key.join(", ")}) ${conflict};
  RETURN NULL;
END
`;
  const tag = dollarTag(body);
  return (
    `CREATE OR REPLACE FUNCTION ${quoteQualified(m.fn)}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER ` +
    `SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS ${tag}${body}${tag}`
  );
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
    forEachPartitionSql(table, `CREATE TRIGGER ${TRUNCATE_TRIGGER} ${guard}`, `NOT EXISTS (SELECT FROM pg_catalog.pg_trigger AS g WHERE g.tgrelid = relid AND g.tgname = ${quoteLiteral(TRUNCATE_TRIGGER)})`),
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
  return (
    `CREATE OR REPLACE FUNCTION ${quoteQualified(TRUNCATE_GUARD_FN)}() RETURNS trigger LANGUAGE plpgsql AS $pgshift$
BEGIN
  RAISE EXCEPTION 'pgshift: TRUNCATE of %.% is refused while the table is being migrated', TG_TABLE_SCHEMA, TG_TABLE_NAME
    USING ERRCODE = 'object_in_use',
          HINT = 'finish the migration (pgshift finalize) or undo it (pgshift abort) first';
END
$pgshift$`
  );
}
