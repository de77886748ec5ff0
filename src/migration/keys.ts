import { z } from "zod";
import type { AnySql } from "../db.js";
import { sqlState } from "../errors.js";
import { displayName, type QualifiedName, quoteIdent } from "../names.js";

/**
 * A unique key of the source table (primary key, unique constraint or unique index) that does not contain
 * the partition column. PostgreSQL requires every unique index of a partitioned table to contain the
 * partition key columns (PostgreSQL documentation, "Table Partitioning", 5.12.2.3 Limitations), so the
 * partitioned table gets the key with the partition column added: from then on the database enforces only
 * the widened key, and an `ON CONFLICT` target naming the original one no longer finds an arbiter.
 */
export interface WidenedKey {
  kind: "primary key" | "unique constraint" | "unique index";
  /** The constraint's name (primary key, unique constraint), else the index's name (as stored, unquoted). */
  name: string;
  index: string;
  /** Key elements as pg_get_indexdef() prints them: column names (quoted when needed) or expressions. */
  columns: string[];
  /** The same with the partition column added: what the partitioned table enforces. */
  widenedTo: string[];
  /** Partial index predicate, or null. */
  predicate: string | null;
  /** DEFERRABLE constraint: never an ON CONFLICT arbiter, before or after. */
  deferrable: boolean;
  /**
   * ON CONFLICT targets that work against the original table and stop working at cutover:
   * `ON CONFLICT (columns) [WHERE predicate]` (inference needs a unique index on exactly those columns:
   * PostgreSQL documentation, INSERT, "ON CONFLICT Clause") and, for a constraint,
   * `ON CONFLICT ON CONSTRAINT name`. Empty for a deferrable constraint.
   */
  onConflictTargets: string[];
}

const KeyRow = z.object({
  index: z.string(),
  primary: z.boolean(),
  conname: z.string().nullable(),
  qconname: z.string().nullable(),
  qpart: z.string(),
  contype: z.string().nullable(),
  deferrable: z.boolean(),
  predicate: z.string().nullable(),
  elems: z.array(z.string()),
  /** Plain column name of each key element, null for an expression. */
  cols: z.array(z.string().nullable()),
});

/**
 * The unique keys of the table with OID `oid` that lose global uniqueness when partitioned by
 * `partitionColumn` (see WidenedKey), in catalog order: primary key first, then by index name.
 * Only valid unique indexes count (an invalid one enforces nothing today either).
 */
export async function widenedKeys(sql: AnySql, oid: number, partitionColumn: string): Promise<WidenedKey[]> {
  const rows = await sql`
    select ic.relname::text as index, i.indisprimary as primary, con.conname::text as conname,
           pg_catalog.quote_ident(con.conname) as qconname, pg_catalog.quote_ident(${partitionColumn}) as qpart,
             con.contype::text as contype,
           coalesce(con.condeferrable, false) as deferrable,
           pg_catalog.pg_get_expr(i.indpred, i.indrelid, true) as predicate,
           (select array_agg(pg_catalog.pg_get_indexdef(i.indexrelid, k.n, true) order by k.n)
              from generate_series(1, i.indnkeyatts::int) k(n)) as elems,
           (select array_agg(a.attname::text order by k.ord)
              from unnest(i.indkey) with ordinality k(attnum, ord)
              left join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum and k.attnum <> 0
             where k.ord <= i.indnkeyatts) as cols
      from pg_catalog.pg_index i
      join pg_catalog.pg_class ic on ic.oid = i.indexrelid
      left join pg_catalog.pg_constraint con on con.conindid = i.indexrelid and con.conrelid = i.indrelid and
        con.contype in ('p', 'u')
     where i.indrelid = ${oid} and i.indisunique and i.indisvalid
     order by i.indisprimary desc, ic.relname`;
  const out: WidenedKey[] = [];
  for (const raw of rows) {
    const r = KeyRow.parse(raw);
    if (r.cols.includes(partitionColumn)) continue;
    const kind =
      r.contype === "p" || r.primary ? "primary key" : r.contype === "u" ? "unique constraint" : "unique index";
    const name = r.conname ?? r.index;
    const where = r.predicate === null ? "" : ` WHERE ${r.predicate}`;
    const targets = r.deferrable ? [] : [`ON CONFLICT (${r.elems.join(", ")})${where}`];
    if (!r.deferrable && r.qconname !== null) targets.push(`ON CONFLICT ON CONSTRAINT ${r.qconname}`);
    out.push({
      kind,
      name,
      index: r.index,
      columns: r.elems,
      widenedTo: [...r.elems, r.qpart],
      predicate: r.predicate,
      deferrable: r.deferrable,
      onConflictTargets: targets,
    });
  }
  return out;
}

/**
 * One line per widened key for `plan` and `start`: what it becomes, until and after finalize, and the targets that stop
 * working.
 */
export function describeWidenedKey(k: WidenedKey): string {
  const cols = `(${k.columns.join(", ")})`;
  const wide = `(${k.widenedTo.join(", ")})`;
  const n = k.onConflictTargets.length;
  const targets =
    n > 0 ? `; ${k.onConflictTargets.join(" and ")} ${n === 1 ? "stops" : "stop"} working at cutover` : "";
  return (
    `${k.kind} ${k.name} ${cols} becomes ${wide} on the partitioned table: until finalize pgshift keeps ${cols} ` +
    `unique ` +
    `through the retired table; after finalize only ${wide} is enforced${targets}`
  );
}

/** An application statement (from pg_stat_statements) that would fail, or behave otherwise, after cutover. */
export interface AffectedStatement {
  /** The statement's normalized text as pg_stat_statements keeps it (constants as $1, $2, ...). */
  query: string;
  /** Executions recorded for this database (all users, all nesting levels). */
  calls: number;
  /** The ON CONFLICT clause as the statement writes it (target only). */
  target: string;
  /** "fails": errors at every execution from cutover on; "changes": a conflicting row is no longer caught. */
  effect: "fails" | "changes";
  reason: string;
}

/** What the look at pg_stat_statements found. */
export interface StatementCheck {
  /**
   * "checked": the statements were read; "not-installed": the extension is not installed in this database;
   * "unavailable": installed but not readable (not in shared_preload_libraries, or no privilege);
   * "not-needed": no key is widened, so no statement can be affected.
   */
  status: "checked" | "not-installed" | "unavailable" | "not-needed";
  /** One line for a person. */
  detail: string;
  statements: AffectedStatement[];
  /** Upserts on this table that were looked at (calls > 0). */
  examined: number;
  /** Statements whose text this role may not read ("<insufficient privilege>": needs pg_read_all_stats). */
  hidden: number;
  /** Statements mentioning ON CONFLICT that the PostgreSQL parser (libpg-query) could not parse. */
  unparsed: number;
}

const StatRow = z.object({ query: z.string(), calls: z.coerce.number() });
const ExtRow = z.object({ schema: z.string() });

/**
 * Reads the application's statements from pg_stat_statements (this database only; the extension must be
 * installed here and loaded through shared_preload_libraries: PostgreSQL documentation, F.32
 * pg_stat_statements) and lists the INSERT ... ON CONFLICT statements on `table` that would fail or
 * behave otherwise once the table is partitioned by `partitionColumn`.
 *
 * Each statement is parsed with PostgreSQL's own parser (libpg-query); nothing is guessed from text. Only
 * statements executed at least once (calls > 0; a statement that only ever failed is not counted) are
 * looked at, so every target found works against the original table today. Then, for an INSERT into
 * `table` (schema-qualified, or unqualified with the same name):
 * - `ON CONFLICT (elements)` without the partition column among its plain columns fails at every
 *   execution after cutover: every unique index of the partitioned table contains the partition column, so
 *   none is inferred (error 42P10);
 * - `ON CONFLICT ON CONSTRAINT name` of a widened key no longer arbitrates on the original key;
 * - `ON CONFLICT DO NOTHING` without a target no longer skips a row that conflicts only on a widened key.
 * @returns what was found; never throws for a missing or unreadable extension (see StatementCheck.status).
 */
export async function affectedStatements(
  sql: AnySql,
  table: QualifiedName,
  partitionColumn: string,
  keys: readonly WidenedKey[],
): Promise<StatementCheck> {
  const empty = { statements: [], examined: 0, hidden: 0, unparsed: 0 };
  if (keys.length === 0)
    return {
      status: "not-needed",
      detail: "no unique key loses its uniqueness: no statement of the application is affected",
      ...empty,
    };
  const ext = await sql`
    select n.nspname::text as schema from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid =
      e.extnamespace
     where e.extname = 'pg_stat_statements'`;
  if (ext.length === 0) {
    return {
      status: "not-installed",
      detail:
        "pg_stat_statements is not installed in this database: the application's statements were not checked (CREATE " +
        "EXTENSION pg_stat_statements, with it in shared_preload_libraries, lets plan list those that would fail)",
      ...empty,
    };
  }
  const schema = ExtRow.parse(ext[0]).schema;
  const view = sql.unsafe(`${quoteIdent(schema)}.pg_stat_statements`);
  let rows: z.infer<typeof StatRow>[];
  let hidden = 0;
  try {
    const r = await sql`
      select query, sum(calls)::bigint as calls from ${view}
       where dbid = (select oid from pg_catalog.pg_database where datname = current_database())
         and calls > 0 and query ~* 'on[[:space:]]+conflict'
       group by query`;
    rows = z.array(StatRow).parse(r);
    const h = await sql`
      select count(*)::int as n from ${view}
       where dbid = (select oid from pg_catalog.pg_database where datname = current_database()) and query =
         '<insufficient privilege>'`;
    hidden = Number(h[0]?.n ?? 0);
  } catch (err) {
    const code = sqlState(err);
    if (code === undefined || code.startsWith("08") || code.startsWith("57")) throw err;
    return {
      status: "unavailable",
      detail:
        `pg_stat_statements is installed but could not be read ` +
        `(${err instanceof Error ? err.message : String(err)}): the application's statements were not checked`,
      ...empty,
    };
  }
  const others = await sql`
    select count(*)::int as n from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
     where c.relname = ${table.name} and n.nspname <> ${table.schema} and c.relkind in ('r', 'p', 'v', 'f')`;
  const ambiguous = Number(others[0]?.n ?? 0) > 0;
  const { parse } = await import("libpg-query");
  const byConstraint = new Map(keys.filter((k) => k.kind !== "unique index" && !k.deferrable).map((k) => [k.name, k]));
  const primary = keys.find((k) => k.kind === "primary key") ?? keys[0]!;
  const statements: AffectedStatement[] = [];
  let examined = 0;
  let unparsed = 0;
  for (const row of rows) {
    let tree: unknown;
    try {
      tree = await parse(row.query);
    } catch {
      unparsed++;
      continue;
    }
    for (const ins of insertStatements(tree)) {
      const rel = ins.relation;
      if (!rel || rel.relname !== table.name) continue;
      if (rel.schemaname !== undefined ? rel.schemaname !== table.schema : false) continue;
      const oc = ins.onConflictClause;
      if (!oc) continue;
      examined++;
      const unqualified =
        rel.schemaname === undefined && ambiguous
          ? ` (the statement names ${table.name} unqualified; other schemas have a table of that name)`
          : "";
      const infer = oc.infer;
      if (infer?.conname !== undefined) {
        const k = byConstraint.get(infer.conname);
        if (!k) continue;
        statements.push({
          query: row.query,
          calls: row.calls,
          target: `ON CONFLICT ON CONSTRAINT ${show(infer.conname)}`,
          effect: "fails",
          reason:
            `from cutover on ${show(infer.conname)} no longer arbitrates on (${k.columns.join(", ")}): the ` +
            `partitioned table's key is (${k.widenedTo.join(", ")})${unqualified}`,
        });
        continue;
      }
      if (infer?.indexElems && infer.indexElems.length > 0) {
        const plain = infer.indexElems
          .map((e) => (e as { IndexElem?: { name?: string } }).IndexElem?.name)
          .filter((n): n is string => n !== undefined);
        if (plain.includes(partitionColumn)) continue;
        const shown = infer.indexElems.map((e) => {
          const name = (e as { IndexElem?: { name?: string } }).IndexElem?.name;
          return name !== undefined ? show(name) : "<expression>";
        });
        statements.push({
          query: row.query,
          calls: row.calls,
          target: `ON CONFLICT (${shown.join(", ")})`,
          effect: "fails",
          reason:
            `fails at every call from cutover on (42P10: no unique or exclusion constraint matching the ON ` +
            `CONFLICT specification): every unique key of the partitioned table ` +
            `contains ${show(partitionColumn)}${unqualified}`,
        });
        continue;
      }
      if (oc.action === "ONCONFLICT_NOTHING") {
        statements.push({
          query: row.query,
          calls: row.calls,
          target: "ON CONFLICT DO NOTHING",
          effect: "changes",
          reason:
            `a row that conflicts only on (${primary.columns.join(", ")}) (same key, ` +
            `another ${show(partitionColumn)}) is no longer skipped: refused until finalize, inserted as a second ` +
            `row after${unqualified}`,
        });
      }
    }
  }
  const failing = statements.filter((s) => s.effect === "fails").length;
  const detail =
    `pg_stat_statements (this database): ${examined} upsert${examined === 1 ? "" : "s"} on ${displayName(table)} ` +
    `examined, ${failing} would fail after cutover` +
    (statements.length > failing ? `, ${statements.length - failing} would behave otherwise` : "") +
    (hidden > 0
      ? `; ${hidden} statements of other roles are hidden from this role (grant it pg_read_all_stats to check them)`
      : "") +
    (unparsed > 0 ? `; ${unparsed} could not be parsed and were not checked` : "");
  return { status: "checked", detail, statements, examined, hidden, unparsed };
}

/** An identifier for messages: bare when it needs no quotes (lower case, no reserved-word check), else quoted. */
function show(name: string): string {
  return /^[a-z_][a-z0-9_$]*$/.test(name) ? name : quoteIdent(name);
}

interface InsertNode {
  relation?: { schemaname?: string; relname?: string };
  onConflictClause?: {
    action?: string;
    infer?: { indexElems?: unknown[]; conname?: string };
  };
}

/** Every InsertStmt node of a libpg-query parse tree, CTEs and nested statements included. */
function insertStatements(tree: unknown): InsertNode[] {
  const out: InsertNode[] = [];
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) {
      for (const x of node) walk(x);
      return;
    }
    if (node === null || typeof node !== "object") return;
    for (const [k, v] of Object.entries(node)) {
      if (k === "InsertStmt" && v && typeof v === "object") out.push(v as InsertNode);
      walk(v);
    }
  };
  walk(tree);
  return out;
}
