import type { TableFacts, IndexFacts } from "../catalog/inspect.js";
import { fitName, quoteIdent, quoteLiteral, quoteQualified, type QualifiedName } from "../names.js";
import type { PartitionDef } from "../partitioning/bounds.js";
import { partitionMethod, type PartitionSpec } from "../partitioning/spec.js";

export interface ShadowNames {
  source: QualifiedName;
  shadow: QualifiedName;
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
  return tail.slice(0, i) + ", " + extra.map(quoteIdent).join(", ") + tail.slice(i);
}

/** The shadow's unique key: the source key followed by the partition column when the key lacks it. */
export function shadowKey(keyColumns: readonly string[], partitionColumn: string): string[] {
  return keyColumns.includes(partitionColumn) ? [...keyColumns] : [...keyColumns, partitionColumn];
}

/** A secondary index of the shadow, built after the copy (see deferredIndexSql). */
export interface DeferredIndex {
  /** Name of the partitioned (parent) index. */
  name: string;
  /** Name of the index on the original table (the parent index takes it at finalize). */
  original: string;
  unique: boolean;
  /** What follows USING: `btree (a, b) INCLUDE (c) WHERE ...`, already widened with the partition column. */
  definition: string;
}

export interface ShadowDdl {
  statements: string[];
  /** Indexes of the shadow to rename at finalize, when the original table and its names are gone. */
  indexRenames: { from: string; to: string }[];
  /** Indexes whose uniqueness had to be widened with the partition column (original index names). */
  widenedUniqueIndexes: string[];
  /** Secondary indexes, built after the copy, partition by partition, without blocking writes. */
  deferredIndexes: DeferredIndex[];
}

/**
 * Statements that build one deferred index without blocking writes to the shadow (which the mirror
 * writes in the application's transactions): an invalid index ON ONLY the parent, then on each partition
 * CREATE INDEX CONCURRENTLY and ATTACH PARTITION; the parent index becomes valid when every partition's is
 * attached (docs: CREATE INDEX, "ON ONLY"; ALTER INDEX ... ATTACH PARTITION).
 * @returns [parent statement, then per partition: create, attach].
 */
export function deferredIndexSql(schema: string, shadow: string, partitions: readonly string[], idx: DeferredIndex): { parent: string; perPartition: { partition: string; index: string; create: string; attach: string }[] } {
  const unique = idx.unique ? "UNIQUE " : "";
  const parentName = quoteQualified({ schema, name: idx.name });
  return {
    parent: `CREATE ${unique}INDEX IF NOT EXISTS ${quoteIdent(idx.name)} ON ONLY ${quoteQualified({ schema, name: shadow })} USING ${idx.definition}`,
    perPartition: partitions.map((p) => {
      const index = partitionIndexName(p, idx.name);
      return {
        partition: p,
        index,
        create: `CREATE ${unique}INDEX CONCURRENTLY IF NOT EXISTS ${quoteIdent(index)} ON ${quoteQualified({ schema, name: p })} USING ${idx.definition}`,
        attach: `ALTER INDEX ${parentName} ATTACH PARTITION ${quoteQualified({ schema, name: index })}`,
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

/**
 * DDL that creates the partitioned shadow table beside the source, as SQL text (printable by `plan`).
 *
 * - `LIKE ... INCLUDING DEFAULTS, CONSTRAINTS, COMMENTS, STORAGE, COMPRESSION, GENERATED, STATISTICS`:
 *   same columns in the same order, types, collations, NOT NULL, CHECK constraints, column comments,
 *   serial defaults (the same `nextval()` of the one sequence), generated expressions.
 * - identity columns become plain columns whose default draws from the source's identity sequence, so
 *   both tables hand out ids from one sequence (docs: CREATE TABLE, LIKE: identity is not copied by default).
 * - partitions with the source's storage parameters (a partitioned parent cannot hold them).
 * - the primary key (or the unique key pgshift copies by) now; every other index is returned in
 *   `deferredIndexes`, built after the copy (cheaper than maintaining it row by row, as a bulk load does);
 *   unique ones are extended with the partition column.
 * - outgoing foreign keys, the table comment, grants and the owner.
 *
 * Identifiers are quoted with quoteIdent, values with quoteLiteral: utility statements take no bind parameters.
 */
export function shadowDdl(facts: TableFacts, spec: PartitionSpec, partitions: readonly PartitionDef[], names: ShadowNames): ShadowDdl {
  const src = quoteQualified(names.source);
  const shd = quoteQualified(names.shadow);
  const col = spec.column;
  const out: string[] = [];
  const widened: string[] = [];
  const deferred: DeferredIndex[] = [];
  const renames: { from: string; to: string }[] = [];
  out.push(
    `CREATE TABLE ${shd} (LIKE ${src} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS INCLUDING STORAGE ` +
      `INCLUDING COMPRESSION INCLUDING GENERATED INCLUDING STATISTICS) PARTITION BY ${partitionMethod(spec)} (${quoteIdent(col)})`,
  );
  for (const c of facts.columns) {
    if (c.identity !== "" && c.sequence) {
      // A real identity column needs no privilege on its sequence; a nextval() default does. The wrapper
      // runs as its owner, so every role that may insert into the table still can.
      const fn = quoteQualified(identityDefaultFunction(facts.oid, c.attnum));
      out.push(
        `CREATE OR REPLACE FUNCTION ${fn}() RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp ` +
          `AS $pgshift$ SELECT nextval(${quoteLiteral(quoteQualified(c.sequence))}::regclass) $pgshift$`,
      );
      out.push(`ALTER TABLE ${shd} ALTER COLUMN ${quoteIdent(c.name)} SET DEFAULT ${fn}()`);
    }
  }
  if (facts.comment !== null) out.push(`COMMENT ON TABLE ${shd} IS ${quoteLiteral(facts.comment)}`);
  const withOpts = facts.reloptions.length > 0 ? ` WITH (${facts.reloptions.join(", ")})` : "";
  for (const p of partitions) {
    out.push(`CREATE TABLE ${quoteQualified({ schema: names.shadow.schema, name: p.name })} PARTITION OF ${shd} ${p.bound}${withOpts}`);
  }
  const extraFor = (keys: readonly (string | null)[]) => (keys.includes(col) ? [] : [col]);
  for (const ix of facts.indexes) {
    if (ix.isPrimary) {
      const key = shadowKey(ix.keyColumns.map(String), col);
      if (key.length !== ix.keyColumns.length) widened.push(ix.name);
      const name = fitName(ix.constraintName ?? ix.name, "_part");
      renames.push({ from: name, to: ix.constraintName ?? ix.name });
      out.push(`ALTER TABLE ${shd} ADD CONSTRAINT ${quoteIdent(name)} PRIMARY KEY (${key.map(quoteIdent).join(", ")})`);
      continue;
    }
    const extra = ix.isUnique ? extraFor(ix.keyColumns) : [];
    if (extra.length > 0) widened.push(ix.name);
    const definition = extendIndexKey(ix.tail, extra);
    if (ix.name === facts.keyIndexName) {
      // The key the mirror upserts on is needed from the start; the table is empty, so it is instant.
      out.push(`CREATE UNIQUE INDEX ${quoteIdent(fitName(ix.name, "_part"))} ON ${shd} USING ${definition}`);
    } else {
      deferred.push({ name: fitName(ix.name, "_part"), original: ix.name, unique: ix.isUnique, definition });
    }
    renames.push({ from: fitName(ix.name, "_part"), to: ix.name });
  }
  for (const fk of facts.foreignKeys) {
    out.push(`ALTER TABLE ${shd} ADD CONSTRAINT ${quoteIdent(fk.name)} ${fk.definition}`);
  }
  for (const g of facts.grants) {
    out.push(
      `GRANT ${g.privilege} ON ${shd} TO ${g.grantee === null ? "PUBLIC" : quoteIdent(g.grantee)}${g.grantable ? " WITH GRANT OPTION" : ""}`,
    );
  }
  return { statements: out, widenedUniqueIndexes: widened, deferredIndexes: deferred, indexRenames: renames };
}

/** The SECURITY DEFINER function that feeds an identity column's sequence to the shadow's default. */
export function identityDefaultFunction(tableOid: number, attnum: number): QualifiedName {
  return { schema: "pgshift", name: `nextval_${tableOid}_${attnum}` };
}

/** Columns pgshift writes when copying or mirroring: every column but generated ones. */
export function copyColumns(facts: TableFacts): string[] {
  return facts.columns.filter((c) => c.generated === "").map((c) => c.name);
}

/** Index facts re-exported for callers that only need DDL. */
export type { IndexFacts };
