import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import { displayName, fitName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import type { PartitionDef } from "../partitioning/bounds.js";
import { type PartitionSpec, partitionColumns, partitionMethod } from "../partitioning/spec.js";

export interface ShadowNames {
  source: QualifiedName;
  shadow: QualifiedName;
  /**
   * Outgoing foreign keys (by name) not to copy: those to other tables of a migration group, which the group's
   * backfill adds once every copy is complete, referencing the other table's shadow (src/group/foreign-keys.ts).
   */
  withoutForeignKeys?: readonly string[];
}

/**
 * Inserts extra key columns into an index definition tail (`btree (a, b) INCLUDE (c) WHERE ...`):
 * the partition columns a unique index on a partitioned table must contain (docs: "Table Partitioning",
 * limitations: unique constraints must include all partition key columns).
 * Scans for the first parenthesised group, skipping quoted identifiers and string literals.
 */
export function extendIndexKey(tail: string, extra: readonly string[]): string {
  if (extra.length === 0) return tail;
  const open = tail.indexOf("(");
  if (open < 0) throw new Error(`unexpected index definition: ${tail}`);
  let depth = 0;
  let i = open;
  for (; i < tail.length; i++) {
    const ch = tail[i];
    if (ch === '"' || ch === "'") {
      const q = ch;
      i++;
      while (i < tail.length && !(tail[i] === q && tail[i + 1] !== q)) i += tail[i] === q ? 2 : 1;
      continue;
    }
    if (ch === "(") depth++;
    else if (ch === ")" && --depth === 0) break;
  }
  if (i >= tail.length) throw new Error(`unbalanced index definition: ${tail}`);
  return `${tail.slice(0, i)}, ${extra.map(quoteIdent).join(", ")}${tail.slice(i)}`;
}

/**
 * The shadow's unique key: the source key followed by the partition column (or, with two levels, the columns
 * of both levels: partitionColumns) the key lacks. PostgreSQL requires every unique key of a partitioned table,
 * and of a partition that is partitioned itself, to contain its partition key (docs: "Table Partitioning",
 * limitations).
 */
export function shadowKey(keyColumns: readonly string[], partitionColumn: string | readonly string[]): string[] {
  const cols = typeof partitionColumn === "string" ? [partitionColumn] : partitionColumn;
  return [...keyColumns, ...cols.filter((c) => !keyColumns.includes(c))];
}

/**
 * One partition of a partitioned table's tree, as deferredIndexSql takes it: `partitioned` when it is
 * partitioned itself (two levels), `parent` the partition it belongs to (null: the table's own).
 */
export interface PartitionNode {
  name: string;
  partitioned: boolean;
  parent: string | null;
}

/**
 * The partitions of `table` at every level (pg_partition_tree), each partitioned one before its own
 * partitions, as deferredIndexSql takes them; all in the table's schema.
 */
export async function partitionTree(sql: AnySql, table: QualifiedName): Promise<PartitionNode[]> {
  const rows = await sql`
    select c.relname::text as name, not t.isleaf as partitioned, t.level,
           case when t.level > 1 then (select p.relname::text from pg_catalog.pg_class p where p.oid = t.parentrelid)
           end as parent
      from pg_catalog.pg_partition_tree(to_regclass(${quoteQualified(table)})) t
      join pg_catalog.pg_class c on c.oid = t.relid
     where t.level > 0
     order by coalesce((select p.relname::text from pg_catalog.pg_class p where p.oid = t.parentrelid
                          and t.level > 1), c.relname::text), t.level, c.relname`;
  return rows.map((r) => ({
    name: String(r.name),
    partitioned: Boolean(r.partitioned),
    parent: r.parent === null ? null : String(r.parent),
  }));
}

/** The planned partitions as PartitionNodes (first-level partition, then its own partitions). */
export function plannedTree(partitions: readonly PartitionDef[]): PartitionNode[] {
  return partitions.flatMap((p) => [
    { name: p.name, partitioned: p.sub !== undefined, parent: null },
    ...(p.sub?.partitions ?? []).map((c) => ({ name: c.name, partitioned: false, parent: p.name })),
  ]);
}

/**
 * A unique constraint a deferred index backs: the parent gets it with `ALTER TABLE ONLY ... ADD CONSTRAINT`
 * (a partitioned table accepts no `ADD CONSTRAINT ... USING INDEX`), each partition with `ADD CONSTRAINT ...
 * USING INDEX` on its concurrently built index, which ATTACH then links to the parent's constraint.
 */
export interface DeferredConstraint {
  /** What follows the constraint name: `UNIQUE (a, "p") DEFERRABLE INITIALLY DEFERRED`, already widened. */
  definition: string;
  deferrable: boolean;
  deferred: boolean;
}

/** A secondary index of the shadow, built after the copy (see deferredIndexSql). */
export interface DeferredIndex {
  /** Name of the partitioned (parent) index. */
  name: string;
  /** Name of the index on the original table (the parent index takes it at cutover). */
  original: string;
  unique: boolean;
  /** What follows USING: `btree (a, b) INCLUDE (c) WHERE ...`, already widened with the partition column. */
  definition: string;
  /** Set when the original index backs a UNIQUE constraint (absent in migrations started by older pgshift). */
  constraint?: DeferredConstraint | null;
}

export interface ShadowDdl {
  statements: string[];
  /**
   * Pairs of names {from: the shadow's, to: the original's} of the indexes and extended statistics objects
   * of the partitioned table: the table that is live carries the original names (liveNamesSql, at cutover
   * and swap-back), and finalize gives them for good.
   */
  indexRenames: { from: string; to: string }[];
  /** Indexes whose uniqueness had to be widened with the partition column (original index names). */
  widenedUniqueIndexes: string[];
  /** Secondary indexes, built after the copy, partition by partition, without blocking writes. */
  deferredIndexes: DeferredIndex[];
  /** Run by backfill after the deferred indexes are built (afterCopySql). */
  afterCopy: string[];
}

/**
 * A DO block around `body` (after `DECLARE declare`, when given), with a dollar-quote tag the text does not contain.
 */
export function doBlock(body: string, declare = ""): string {
  let tag = "pgshift";
  for (let i = 0; body.includes(`$${tag}$`) || declare.includes(`$${tag}$`); i++) tag = `pgshift${i}`;
  return `DO $${tag}$ ${declare ? `DECLARE ${declare} ` : ""}BEGIN ${body} END $${tag}$`;
}

/** `UNIQUE USING INDEX ...` clause flags of a constraint: `` / ` DEFERRABLE` / ` DEFERRABLE INITIALLY DEFERRED`. */
function deferClause(c: { deferrable: boolean; deferred: boolean }): string {
  return c.deferrable ? (c.deferred ? " DEFERRABLE INITIALLY DEFERRED" : " DEFERRABLE") : "";
}

/**
 * Statements that build one deferred index without blocking writes to the shadow (which the mirror
 * writes in the application's transactions): an invalid index ON ONLY the parent, then on each partition
 * CREATE INDEX CONCURRENTLY and ATTACH PARTITION; the parent index becomes valid when every partition's is
 * attached (docs: CREATE INDEX, "ON ONLY"; ALTER INDEX ... ATTACH PARTITION).
 * When the index backs a UNIQUE constraint, the parent statement is `ALTER TABLE ONLY ... ADD CONSTRAINT`
 * (guarded: skipped when the index exists), and each partition's index becomes a constraint with
 * `ADD CONSTRAINT ... UNIQUE USING INDEX` (same deferrability) before ATTACH, which links it to the parent's
 * constraint (docs: ALTER TABLE, ADD table_constraint_using_index: not allowed on partitioned tables).
 * @returns [parent statement, then per partition: create, constrain (null for a plain index), attach].
 */
export function deferredIndexSql(
  schema: string,
  shadow: string,
  partitions: readonly (string | PartitionNode)[],
  idx: DeferredIndex,
): {
  parent: string;
  perPartition: {
    partition: string;
    index: string;
    create: string;
    constrain: string | null;
    attach: string;
    /**
     * Two levels: the partition is partitioned itself; `create` makes its (invalid) index ON ONLY it, or the
     * constraint with ALTER TABLE ONLY (instant), and `attach` attaches it to the parent's index: both short,
     * in one transaction, before its own partitions, whose indexes attach to it (it becomes valid, and then
     * the parent's, when the last one is attached: docs, ALTER INDEX ... ATTACH PARTITION).
     */
    partitioned: boolean;
  }[];
} {
  const unique = idx.unique ? "UNIQUE " : "";
  const parentName = quoteQualified({ schema, name: idx.name });
  const shd = quoteQualified({ schema, name: shadow });
  const c = idx.constraint ?? null;
  return {
    parent: c
      ? doBlock(
          `IF to_regclass(${quoteLiteral(parentName)}) IS NULL THEN ALTER TABLE ONLY ${shd} ADD ` +
            `CONSTRAINT ${quoteIdent(idx.name)} ${c.definition}; END IF;`,
        )
      : `CREATE ${unique}INDEX IF NOT EXISTS ${quoteIdent(idx.name)} ON ONLY ${shd} USING ${idx.definition}`,
    perPartition: partitions.map((node) => {
      const p = typeof node === "string" ? node : node.name;
      const up = typeof node === "string" ? null : node.parent;
      const attachTo = up === null ? parentName : quoteQualified({ schema, name: partitionIndexName(up, idx.name) });
      const index = partitionIndexName(p, idx.name);
      const part = quoteQualified({ schema, name: p });
      if (typeof node !== "string" && node.partitioned) {
        const qi = quoteQualified({ schema, name: index });
        return {
          partition: p,
          index,
          create: c
            ? doBlock(
                `IF to_regclass(${quoteLiteral(qi)}) IS NULL THEN ALTER TABLE ONLY ${part} ADD ` +
                  `CONSTRAINT ${quoteIdent(index)} ${c.definition}; END IF;`,
              )
            : `CREATE ${unique}INDEX IF NOT EXISTS ${quoteIdent(index)} ON ONLY ${part} USING ${idx.definition}`,
          constrain: null,
          attach: `ALTER INDEX ${attachTo} ATTACH PARTITION ${qi}`,
          partitioned: true,
        };
      }
      return {
        partition: p,
        index,
        create:
          `CREATE ${unique}INDEX CONCURRENTLY IF NOT EXISTS ${quoteIdent(index)} ON ${part} ` +
          `USING ${idx.definition}`,
        constrain: c
          ? `ALTER TABLE ${part} ADD CONSTRAINT ${quoteIdent(index)} UNIQUE USING ` +
            `INDEX ${quoteIdent(index)}${deferClause(c)}`
          : null,
        attach: `ALTER INDEX ${attachTo} ATTACH PARTITION ${quoteQualified({ schema, name: index })}`,
        partitioned: false,
      };
    }),
  };
}

/** Name of a deferred index on one partition: the partition's name and a short hash of the parent index's name. */
export function partitionIndexName(partition: string, parentIndex: string): string {
  let h = 2166136261;
  for (const ch of parentIndex) h = Math.imul(h ^ ch.codePointAt(0)!, 16777619) >>> 0;
  return fitName(partition, `_${h.toString(36)}_idx`);
}

/** The shadow's name for an index or statistics object of the original (the original's name until cutover). */
export function shadowObjectName(original: string): string {
  return fitName(original, "_part");
}

/**
 * A NO INHERIT check is refused on a partitioned table; on a table without children it means no more than a plain one.
 */
function inheritableCheck(definition: string): string {
  return definition.replace(/ NO INHERIT\b/, "");
}

/** `n_distinct=-0.5` -> `n_distinct = '-0.5'` (attoptions and reloptions are name=value text). */
function optionAssignment(opt: string): string {
  const eq = opt.indexOf("=");
  const name = eq < 0 ? opt : opt.slice(0, eq);
  if (!/^[a-z_][a-z0-9_]*$/.test(name)) throw new Error(`unexpected attribute option: ${opt}`);
  return eq < 0 ? name : `${name} = ${quoteLiteral(opt.slice(eq + 1))}`;
}

const STATISTICS_KINDS: Record<string, string> = { d: "ndistinct", f: "dependencies", m: "mcv" };

/**
 * Problems that make a faithful partitioned copy impossible, each one line for `plan` (a blocker):
 * - a DEFERRABLE primary key or key index: the mirror upserts on the key, and ON CONFLICT refuses a
 *   deferrable arbiter (docs: INSERT, "ON CONFLICT Clause");
 * - FORCE ROW LEVEL SECURITY when the current user neither is superuser nor has BYPASSRLS: the owner is
 *   subject to the policies too, so the copy would read (and the verify compare) the rows it may see, not
 *   the table (docs: "Row Security Policies");
 * - a NOT VALID foreign key before PostgreSQL 18, which cannot add one to a partitioned table (docs:
 *   ALTER TABLE, ADD table_constraint ... NOT VALID; 18's release notes).
 */
export function fidelityBlockers(facts: TableFacts): string[] {
  const out: string[] = [];
  const key = facts.indexes.find((i) => i.name === facts.keyIndexName);
  if (key?.deferrable) {
    out.push(
      `${key.isPrimary ? "primary key" : "unique key"} ${key.constraintName ?? key.name} is DEFERRABLE: pgshift's ` +
        `mirror upserts on the key with ON CONFLICT, ` +
        `which PostgreSQL refuses on a deferrable constraint (ALTER TABLE ... ALTER CONSTRAINT ... NOT ` +
        `DEFERRABLE first)`,
    );
  }
  if (facts.forceRowSecurity && !facts.bypassesRowSecurity) {
    out.push(
      `row-level security is forced on ${displayName(facts.table)} and the current user has neither ` +
        `superuser nor BYPASSRLS: ` +
        `the copy would see only the rows the policies let it see (run pgshift as a role WITH BYPASSRLS)`,
    );
  }
  if (facts.serverVersionNum < 180000) {
    for (const fk of facts.foreignKeys.filter((f) => !f.valid)) {
      out.push(
        `foreign key ${fk.name} is NOT VALID, and PostgreSQL before 18 cannot add a NOT VALID foreign key to a ` +
          `partitioned table ` +
          `(ALTER TABLE ... VALIDATE CONSTRAINT ${quoteIdent(fk.name)} first, or drop it)`,
      );
    }
  }
  return out;
}

/**
 * What the partitioned table cannot keep as the original has it, each one line for `plan` (a warning):
 * the CLUSTER mark (PostgreSQL refuses `ALTER TABLE ... CLUSTER ON` for a partitioned table: each partition
 * carries it on its copy of the index instead), a NO INHERIT check (created inheritable: the same rule for
 * every row, as the table without children had it).
 */
export function fidelityWarnings(facts: TableFacts): string[] {
  const out: string[] = [];
  for (const ix of facts.indexes.filter((i) => i.isClustered)) {
    out.push(
      `${displayName(facts.table)} is clustered on ${ix.name}: a partitioned table cannot carry the CLUSTER mark, so ` +
        `each partition carries it on its copy of the index; ` +
        `after cutover a plain CLUSTER reclusters the partitions, CLUSTER ${displayName(facts.table)} needs ` +
        `USING ${quoteIdent(ix.name)} (PostgreSQL 15 and later; 14 clusters partitions only)`,
    );
  }
  for (const c of facts.checks.filter((x) => / NO INHERIT\b/.test(x.definition))) {
    out.push(
      `check constraint ${c.name} is NO INHERIT, which a partitioned table cannot hold: it is created inheritable ` +
        `(every partition enforces it, as the table did)`,
    );
  }
  return out;
}

/**
 * DDL that creates the partitioned shadow table beside the source, as SQL text (printable by `plan`).
 *
 * - `LIKE ... INCLUDING DEFAULTS, COMMENTS, STORAGE, COMPRESSION, GENERATED`: same columns in the same
 *   order, types, collations, NOT NULL, column comments, serial defaults (the same `nextval()` of the one
 *   sequence), generated expressions.
 * - the owner of the original table (whoever runs pgshift), on the parent and on every partition
 *   (ALTER TABLE ... OWNER does not recurse to partitions).
 * - identity columns become plain columns whose default draws from the source's identity sequence, so
 *   both tables hand out ids from one sequence (docs: CREATE TABLE, LIKE: identity is not copied by default).
 * - CHECK constraints under their names; a NOT VALID one is added after the copy, NOT VALID (a check is
 *   enforced on every insert, so present during the copy it would refuse the old rows it was never
 *   validated against); constraint comments.
 * - ENABLE / FORCE ROW LEVEL SECURITY and REPLICA IDENTITY FULL / NOTHING on the parent and each partition
 *   (neither recurses); REPLICA IDENTITY USING INDEX once the index exists (afterCopySql).
 * - partitions with the source's storage parameters (a partitioned parent cannot hold them).
 * - per-column statistics targets (SET STATISTICS recurses) and attribute options (n_distinct,
 *   n_distinct_inherited), which do not recurse: on the parent and on each partition.
 * - the primary key (or the unique key pgshift copies by) now, with the original's constraint definition
 *   (INCLUDE, WITH, tablespace) widened with the partition column; every other index is returned in
 *   `deferredIndexes`, built after the copy (cheaper than maintaining it row by row, as a bulk load does);
 *   unique ones are extended with the partition column; those backing a UNIQUE constraint become
 *   constraints again (deferredIndexSql). A DEFERRABLE unique constraint is created at once instead
 *   (a concurrently built unique index is immediate until it becomes the constraint, and would refuse the
 *   application's momentary duplicates meanwhile); backfill defers it and bounds its commit-time wait.
 *   Index comments.
 * - outgoing foreign keys (deferrability kept; a NOT VALID one after the copy), the table comment,
 *   extended statistics under the shadow's names (the original names at cutover: liveNamesSql), with
 *   their owner, statistics target and comment; table and column grants, and the privileges the owner
 *   revoked from itself.
 *
 * Identifiers are quoted with quoteIdent, values with quoteLiteral: utility statements take no bind parameters.
 */
export function shadowDdl(
  facts: TableFacts,
  spec: PartitionSpec,
  partitions: readonly PartitionDef[],
  names: ShadowNames,
): ShadowDdl {
  const src = quoteQualified(names.source);
  const shd = quoteQualified(names.shadow);
  const col = spec.column;
  const pcols = partitionColumns(spec);
  const out: string[] = [];
  const widened: string[] = [];
  const deferred: DeferredIndex[] = [];
  const renames: { from: string; to: string }[] = [];
  const owner = quoteIdent(facts.owner);
  out.push(
    `CREATE TABLE ${shd} (LIKE ${src} INCLUDING DEFAULTS INCLUDING COMMENTS INCLUDING STORAGE ` +
      `INCLUDING COMPRESSION INCLUDING GENERATED) PARTITION BY ${partitionMethod(spec)} (${quoteIdent(col)})`,
  );
  out.push(`ALTER TABLE ${shd} OWNER TO ${owner}`);
  for (const c of facts.columns) {
    if (c.identity !== "" && c.sequence) {
      // A real identity column needs no privilege on its sequence; a nextval() default does. The wrapper
      // runs as its owner, so every role that may insert into the table still can.
      const fn = quoteQualified(identityDefaultFunction(facts.oid, c.attnum));
      out.push(
        `CREATE OR REPLACE FUNCTION ${fn}() RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = ` +
          `pg_catalog, pg_temp ` +
          `AS $pgshift$ SELECT nextval(${quoteLiteral(quoteQualified(c.sequence))}::regclass) $pgshift$`,
      );
      out.push(`ALTER TABLE ${shd} ALTER COLUMN ${quoteIdent(c.name)} SET DEFAULT ${fn}()`);
    }
  }
  if (facts.comment !== null) out.push(`COMMENT ON TABLE ${shd} IS ${quoteLiteral(facts.comment)}`);
  for (const c of facts.checks ?? []) {
    // PostgreSQL 18: LIKE copies a NOT VALID NOT NULL as a valid one, which would refuse the old NULLs; it
    // comes back NOT VALID after the copy.
    if (!c.valid && c.column !== undefined)
      out.push(`ALTER TABLE ${shd} ALTER COLUMN ${quoteIdent(c.column)} DROP NOT NULL`);
    if (!c.valid) continue; // after the copy (afterCopySql)
    out.push(`ALTER TABLE ${shd} ADD CONSTRAINT ${quoteIdent(c.name)} ${inheritableCheck(c.definition)}`);
    if (c.comment !== null)
      out.push(`COMMENT ON CONSTRAINT ${quoteIdent(c.name)} ON ${shd} IS ${quoteLiteral(c.comment)}`);
  }
  /** Row security and replica identity of one relation (the parent, or a partition). */
  const relationMarks = (rel: string): string[] => {
    const marks: string[] = [];
    if (facts.rowSecurity) marks.push(`ALTER TABLE ${rel} ENABLE ROW LEVEL SECURITY`);
    if (facts.forceRowSecurity) marks.push(`ALTER TABLE ${rel} FORCE ROW LEVEL SECURITY`);
    if (facts.replicaIdentity === "f") marks.push(`ALTER TABLE ${rel} REPLICA IDENTITY FULL`);
    if (facts.replicaIdentity === "n") marks.push(`ALTER TABLE ${rel} REPLICA IDENTITY NOTHING`);
    return marks;
  };
  const columnOptions = (rel: string): string[] =>
    facts.columns
      .filter((c) => (c.options ?? []).length > 0)
      .map(
        (c) =>
          `ALTER TABLE ${rel} ALTER COLUMN ${quoteIdent(c.name)} SET (${c.options.map(optionAssignment).join(", ")})`,
      );
  out.push(...relationMarks(shd));
  const withOpts = facts.reloptions.length > 0 ? ` WITH (${facts.reloptions.join(", ")})` : "";
  // Two levels: a partition with `sub` is partitioned itself (it holds no rows, so no storage parameters),
  // and its own partitions follow it.
  const createPartitions = (parent: string, list: readonly PartitionDef[]) => {
    for (const p of list) {
      const part = quoteQualified({ schema: names.shadow.schema, name: p.name });
      out.push(
        p.sub
          ? `CREATE TABLE ${part} PARTITION OF ${parent} ${p.bound} PARTITION BY ${p.sub.method} ` +
              `(${quoteIdent(p.sub.column)})`
          : `CREATE TABLE ${part} PARTITION OF ${parent} ${p.bound}${withOpts}`,
      );
      out.push(`ALTER TABLE ${part} OWNER TO ${owner}`);
      out.push(...relationMarks(part));
      out.push(...columnOptions(part));
      if (p.sub) createPartitions(part, p.sub.partitions);
    }
  };
  createPartitions(shd, partitions);
  // SET STATISTICS recurses to the partitions; attribute options do not (set on each partition above).
  for (const c of facts.columns) {
    if (c.statisticsTarget !== null && c.statisticsTarget !== undefined)
      out.push(`ALTER TABLE ${shd} ALTER COLUMN ${quoteIdent(c.name)} SET STATISTICS ${c.statisticsTarget}`);
  }
  out.push(...columnOptions(shd));
  const extraFor = (keys: readonly (string | null)[]) => pcols.filter((c) => !keys.includes(c));
  const qualifiedIndex = (name: string) => quoteQualified({ schema: names.shadow.schema, name });
  for (const ix of facts.indexes) {
    const name = shadowObjectName(ix.name);
    renames.push({ from: name, to: ix.name });
    const extra = ix.isUnique || ix.isPrimary ? extraFor(ix.keyColumns) : [];
    if (extra.length > 0) widened.push(ix.name);
    const definition = extendIndexKey(ix.tail, extra);
    const constraintDef = ix.constraintDef ? extendIndexKey(ix.constraintDef, extra) : null;
    // A DEFERRABLE unique constraint is created now, on the empty table: an index built concurrently after
    // the copy is an immediate unique index until it becomes the constraint, and would refuse the
    // application's momentary duplicates (what DEFERRABLE is for) through the mirror meanwhile.
    const deferrableUnique = constraintDef !== null && ix.constraintType === "u" && ix.deferrable;
    // An exclusion constraint (PostgreSQL 17+, comparing the partition column with =: plan refuses others) is
    // created now too, so that no row breaking it gets into the shadow while it would not into the original.
    const exclusion = constraintDef !== null && ix.constraintType === "x";
    if (ix.isPrimary || ix.name === facts.keyIndexName || deferrableUnique || exclusion) {
      // The key the mirror upserts on is needed from the start; the table is empty, so it is instant.
      if (ix.isPrimary)
        out.push(
          `ALTER TABLE ${shd} ADD CONSTRAINT ${quoteIdent(name)} ` +
            (constraintDef ??
              `PRIMARY KEY (${shadowKey(ix.keyColumns.map(String), pcols).map(quoteIdent).join(", ")})`),
        );
      else if (constraintDef && (ix.constraintType === "u" || ix.constraintType === "x"))
        out.push(`ALTER TABLE ${shd} ADD CONSTRAINT ${quoteIdent(name)} ${constraintDef}`);
      else out.push(`CREATE UNIQUE INDEX ${quoteIdent(name)} ON ${shd} USING ${definition}`);
      if (ix.comment) out.push(`COMMENT ON INDEX ${qualifiedIndex(name)} IS ${quoteLiteral(ix.comment)}`);
      if (ix.constraintComment && ix.constraintName)
        out.push(`COMMENT ON CONSTRAINT ${quoteIdent(name)} ON ${shd} IS ${quoteLiteral(ix.constraintComment)}`);
      continue;
    }
    const constraint =
      constraintDef && ix.constraintType === "u"
        ? { definition: constraintDef, deferrable: ix.deferrable, deferred: ix.deferred }
        : null;
    deferred.push({ name, original: ix.name, unique: ix.isUnique, definition, ...(constraint ? { constraint } : {}) });
  }
  for (const fk of facts.foreignKeys) {
    if (fk.valid === false) continue; // after the copy (afterCopySql)
    if (names.withoutForeignKeys?.includes(fk.name)) continue; // the group's backfill adds it
    out.push(`ALTER TABLE ${shd} ADD CONSTRAINT ${quoteIdent(fk.name)} ${fk.definition}`);
    if (fk.comment) out.push(`COMMENT ON CONSTRAINT ${quoteIdent(fk.name)} ON ${shd} IS ${quoteLiteral(fk.comment)}`);
  }
  for (const st of facts.statistics ?? []) {
    const name = shadowObjectName(st.name);
    const q = quoteQualified({ schema: st.schema, name });
    const kinds = st.kinds.map((k) => STATISTICS_KINDS[k]).filter((k): k is string => k !== undefined);
    out.push(`CREATE STATISTICS ${q}${kinds.length > 0 ? ` (${kinds.join(", ")})` : ""} ON ${st.columns} FROM ${shd}`);
    out.push(`ALTER STATISTICS ${q} OWNER TO ${quoteIdent(st.owner)}`);
    if (st.target !== null) out.push(`ALTER STATISTICS ${q} SET STATISTICS ${st.target}`);
    if (st.comment !== null) out.push(`COMMENT ON STATISTICS ${q} IS ${quoteLiteral(st.comment)}`);
    renames.push({ from: name, to: st.name });
  }
  for (const g of facts.grants) {
    out.push(
      `GRANT ${g.privilege} ON ${shd} ` +
        `TO ${g.grantee === null ? "PUBLIC" : quoteIdent(g.grantee)}${g.grantable ? " WITH GRANT OPTION" : ""}`,
    );
  }
  if ((facts.ownerRevoked ?? []).length > 0)
    out.push(`REVOKE ${facts.ownerRevoked.join(", ")} ON ${shd} FROM ${owner}`);
  for (const g of facts.columnGrants ?? []) {
    out.push(
      `GRANT ${g.privilege} (${quoteIdent(g.column)}) ON ${shd} ` +
        `TO ${g.grantee === null ? "PUBLIC" : quoteIdent(g.grantee)}${g.grantable ? " WITH GRANT OPTION" : ""}`,
    );
  }
  return {
    statements: out,
    widenedUniqueIndexes: widened,
    deferredIndexes: deferred,
    indexRenames: renames,
    afterCopy: afterCopySql(facts, names),
  };
}

/**
 * Statements backfill runs once the rows are copied and the deferred indexes built, on the partitioned
 * table `names.shadow`, from the original's facts (read again then, so a comment changed meanwhile is
 * carried over). Each is re-runnable (guarded where PostgreSQL has no IF NOT EXISTS):
 * - NOT VALID checks and foreign keys, added NOT VALID (no scan; the copied rows are never checked, as
 *   the original's never were; new writes are, on both tables), with their comments;
 * - comments on the deferred indexes and the constraints they back;
 * - REPLICA IDENTITY USING INDEX on the parent and on each partition's copy of the index;
 * - the CLUSTER mark on each partition's copy of the clustered index (the parent cannot carry it);
 * - `ANALYZE` of the partitioned table (autovacuum never analyzes a partitioned parent; it also
 *   analyzes each partition; docs: ANALYZE, "partitioned table").
 */
export function afterCopySql(facts: TableFacts, names: ShadowNames): string[] {
  const shd = quoteQualified(names.shadow);
  const out: string[] = [];
  const hasConstraint = (name: string) =>
    `EXISTS (SELECT FROM pg_catalog.pg_constraint WHERE conrelid = ${quoteLiteral(shd)}::regclass AND conname ` +
    `= ${quoteLiteral(name)})`;
  const notValid = [...(facts.checks ?? []), ...(facts.serverVersionNum >= 180000 ? facts.foreignKeys : [])].filter(
    (c) => c.valid === false,
  );
  for (const c of notValid) {
    out.push(
      doBlock(
        `IF NOT ${hasConstraint(c.name)} THEN ALTER TABLE ${shd} ADD ` +
          `CONSTRAINT ${quoteIdent(c.name)} ${inheritableCheck(c.definition)}; END IF;`,
      ),
    );
    if (c.comment) out.push(`COMMENT ON CONSTRAINT ${quoteIdent(c.name)} ON ${shd} IS ${quoteLiteral(c.comment)}`);
  }
  /**
   * Each partition's index attached to the parent index `parent` (qualified, quoted), then (two levels) each
   * index attached to those, in loops over `r`; `leavesOnly`: only indexes of partitions that hold rows.
   */
  const forEachPartitionIndex = (parent: string, stmt: string, leavesOnly = false) => {
    const select = `SELECT tn.nspname AS s, t.relname AS t, ic.relname AS i FROM pg_catalog.pg_inherits h `;
    const joins =
      `JOIN pg_catalog.pg_index x ON x.indexrelid = h.inhrelid JOIN pg_catalog.pg_class ic ON ic.oid = ` +
      `x.indexrelid JOIN pg_catalog.pg_class t ON t.oid = x.indrelid${leavesOnly ? " AND t.relkind = 'r'" : ""} ` +
      `JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace `;
    const loop = `LOOP EXECUTE format(${quoteLiteral(stmt)}, r.s, r.t, r.i); END LOOP;`;
    return (
      `FOR r IN ${select}${joins}WHERE h.inhparent = ${quoteLiteral(parent)}::regclass ${loop} ` +
      `FOR r IN ${select}JOIN pg_catalog.pg_inherits h1 ON h1.inhrelid = h.inhparent ${joins}` +
      `WHERE h1.inhparent = ${quoteLiteral(parent)}::regclass ${loop}`
    );
  };
  // Built after the copy (the others, and their comments, come with start).
  const deferredIx = facts.indexes.filter(
    (ix) =>
      !ix.isPrimary &&
      ix.name !== facts.keyIndexName &&
      !(ix.constraintType === "u" && ix.deferrable && ix.constraintDef) &&
      !(ix.constraintType === "x" && ix.constraintDef),
  );
  for (const ix of facts.indexes) {
    const name = shadowObjectName(ix.name);
    const q = quoteQualified({ schema: names.shadow.schema, name });
    const exists = `to_regclass(${quoteLiteral(q)}) IS NOT NULL`;
    if (deferredIx.includes(ix)) {
      if (ix.comment)
        out.push(doBlock(`IF ${exists} THEN COMMENT ON INDEX ${q} IS ${quoteLiteral(ix.comment)}; END IF;`));
      if (ix.constraintComment && ix.constraintType === "u") {
        out.push(
          doBlock(
            `IF ${hasConstraint(name)} THEN COMMENT ON CONSTRAINT ${quoteIdent(name)} ON ${shd} ` +
              `IS ${quoteLiteral(ix.constraintComment)}; END IF;`,
          ),
        );
      }
    }
    if (ix.isReplicaIdentity && facts.replicaIdentity === "i") {
      out.push(
        doBlock(
          `IF ${exists} THEN ALTER TABLE ${shd} REPLICA IDENTITY USING INDEX ${quoteIdent(name)}; ` +
            forEachPartitionIndex(q, "ALTER TABLE %I.%I REPLICA IDENTITY USING INDEX %I") +
            ` END IF;`,
          "r record;",
        ),
      );
    }
    if (ix.isClustered) {
      out.push(
        doBlock(
          `IF ${exists} THEN ${forEachPartitionIndex(q, "ALTER TABLE %I.%I CLUSTER ON %I", true)} END IF;`,
          "r record;",
        ),
      );
    }
  }
  out.push(`ANALYZE ${shd}`);
  return out;
}

/**
 * One statement (a DO block) run at cutover and swap-back once the tables are renamed: the indexes and
 * extended statistics objects of the table now `live` take the original names, and the copy's take the
 * shadow's, so that the application finds what it names (`ON CONFLICT ON CONSTRAINT name` names the
 * index-backed constraint, which always has its index's name). For each pair {from: shadow name, to:
 * original name}: when `live` has `from` and `copy` has `to`, the names are swapped (through a temporary
 * name); when only `live` has `from` and `to` is free, it is renamed. Anything else is left alone, so the
 * statement is re-runnable and right whatever state an older pgshift left. ALTER INDEX / ALTER STATISTICS
 * ... RENAME (an index's constraint is renamed with it: docs, ALTER INDEX).
 * @returns [] when there is nothing to rename.
 */
export function liveNamesSql(
  live: QualifiedName,
  copy: QualifiedName,
  pairs: readonly { from: string; to: string }[],
): string[] {
  if (pairs.length === 0) return [];
  const arr = `ARRAY[${pairs.map((p) => `ARRAY[${quoteLiteral(p.from)}, ${quoteLiteral(p.to)}]`).join(", ")}]::text[]`;
  return [
    doBlock(
      `FOREACH p SLICE 1 IN ARRAY ${arr} LOOP ` +
        // indexes
        `SELECT c.oid, n.nspname INTO lf FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = ` +
        `i.indexrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE i.indrelid = live AND ` +
        `c.relname = p[1]; ` +
        `IF lf.oid IS NOT NULL THEN ` +
        `SELECT c.oid INTO ct FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid WHERE ` +
        `i.indrelid = copy AND c.relname = p[2]; ` +
        `IF ct.oid IS NOT NULL THEN ` +
        `EXECUTE format('ALTER INDEX %I.%I RENAME TO %I', lf.nspname, p[2], 'pgshift_swap_' || ct.oid); ` +
        `EXECUTE format('ALTER INDEX %I.%I RENAME TO %I', lf.nspname, p[1], p[2]); ` +
        `EXECUTE format('ALTER INDEX %I.%I RENAME TO %I', lf.nspname, 'pgshift_swap_' || ct.oid, p[1]); ` +
        `ELSIF NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.relnamespace = (SELECT relnamespace FROM ` +
        `pg_catalog.pg_class WHERE oid = lf.oid) AND c.relname = p[2]) THEN ` +
        `EXECUTE format('ALTER INDEX %I.%I RENAME TO %I', lf.nspname, p[1], p[2]); END IF; END IF; ` +
        // extended statistics
        `SELECT s.oid, n.nspname, s.stxnamespace INTO lf FROM pg_catalog.pg_statistic_ext s JOIN ` +
        `pg_catalog.pg_namespace n ON n.oid = s.stxnamespace WHERE s.stxrelid = live AND s.stxname = p[1]; ` +
        `IF lf.oid IS NOT NULL THEN ` +
        `SELECT s.oid INTO ct FROM pg_catalog.pg_statistic_ext s WHERE s.stxrelid = copy AND s.stxname = p[2] AND ` +
        `s.stxnamespace = lf.stxnamespace; ` +
        `IF ct.oid IS NOT NULL THEN ` +
        `EXECUTE format('ALTER STATISTICS %I.%I RENAME TO %I', lf.nspname, p[2], 'pgshift_swap_' || ct.oid); ` +
        `EXECUTE format('ALTER STATISTICS %I.%I RENAME TO %I', lf.nspname, p[1], p[2]); ` +
        `EXECUTE format('ALTER STATISTICS %I.%I RENAME TO %I', lf.nspname, 'pgshift_swap_' || ct.oid, p[1]); ` +
        `ELSIF NOT EXISTS (SELECT FROM pg_catalog.pg_statistic_ext s WHERE s.stxnamespace = lf.stxnamespace AND ` +
        `s.stxname = p[2]) THEN ` +
        `EXECUTE format('ALTER STATISTICS %I.%I RENAME TO %I', lf.nspname, p[1], p[2]); END IF; END IF; ` +
        `END LOOP;`,
      `live oid := to_regclass(${quoteLiteral(quoteQualified(live))}); copy oid := ` +
        `to_regclass(${quoteLiteral(quoteQualified(copy))}); p text[]; lf record; ct record;`,
    ),
  ];
}

/** The SECURITY DEFINER function that feeds an identity column's sequence to the shadow's default. */
export function identityDefaultFunction(tableOid: number, attnum: number): QualifiedName {
  return { schema: "pgshift", name: `nextval_${tableOid}_${attnum}` };
}

/** Columns pgshift writes when copying or mirroring: every column but generated ones. */
export function copyColumns(facts: TableFacts): string[] {
  return facts.columns.filter((c) => c.generated === "").map((c) => c.name);
}
