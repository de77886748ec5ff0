/**
 * Publications that stream the migrated table (issue 15).
 *
 * A publication that lists the table (pg_publication_rel, `FOR TABLE`): at every switch, inside its transaction
 * after the renames, the table leaving the application (it has the copy's name by then) is dropped from it and
 * the table becoming live added under the original name, with the same row filter and column list (PostgreSQL
 * 15 and later). A partitioned table's changes are published under its partitions' names unless the
 * publication's publish_via_partition_root is on (docs: CREATE PUBLICATION, publish_via_partition_root): cutover
 * sets it on when the publication holds no other partitioned table (for which it would change what consumers
 * receive), so consumers keep receiving the table's changes under its own name.
 *
 * `FOR ALL TABLES` and `FOR TABLES IN SCHEMA` publications publish whichever table has the name, and the shadow
 * and the retired table too: nothing to move, `plan` says what their consumers see.
 *
 * pgshift's own publication (logical mode, `pgshift_<n>`) is not one of them.
 */
import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import { shadowKey } from "../ddl/shadow.js";
import { tablesIn } from "../migration/phases.js";
import type { Migration } from "../migration/state.js";
import { displayName, fitName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import { type PartitionSpec, partitionColumns } from "../partitioning/spec.js";
import { statement } from "../plan/steps.js";
import type { Carried, Carrier, CarrierPlan, SwitchTo } from "./carrier.js";

/** pgshift's own publications (logical mode), named pgshift_<migration id>. */
const OWN = "^pgshift_[0-9]+$";

const ListedRow = z.object({
  /** pg_publication_rel's oid. */
  oid: z.coerce.number(),
  name: z.string(),
  viaRoot: z.boolean(),
  /** The row filter (pg_get_expr(prqual, prrelid)), PostgreSQL 15+; null when none. */
  filter: z.string().nullable(),
  /** The column list (prattrs), PostgreSQL 15+; null when none (every column). */
  columns: z.array(z.string()).nullable(),
  /** Other partitioned tables the publication lists (schema.name). */
  otherPartitioned: z.array(z.string()),
});
/** A publication that lists the table. */
export type ListedPublication = z.infer<typeof ListedRow>;

/**
 * The publications that list `t` (pg_publication_rel), pgshift's own left out, with their row filter and column
 * list (PostgreSQL 15+). A row filter names no object outside pg_catalog (PostgreSQL allows only built-in
 * immutable functions, operators and types in it: docs, CREATE PUBLICATION), so it reads the same under any
 * search_path.
 */
export async function listedPublications(sql: AnySql, t: QualifiedName): Promise<ListedPublication[]> {
  const v15 = Number((await sql`select current_setting('server_version_num')::int as v`)[0]?.v) >= 150000;
  const filter = v15 ? sql`pg_catalog.pg_get_expr(r.prqual, r.prrelid)` : sql`null::text`;
  const columns = v15
    ? sql`(select array_agg(a.attname::text order by k.ord)
             from unnest(r.prattrs::int2[]) with ordinality k(attnum, ord)
             join pg_catalog.pg_attribute a on a.attrelid = r.prrelid and a.attnum = k.attnum)`
    : sql`null::text[]`;
  const rows = await sql`
    select r.oid::int8 as oid, p.pubname::text as name, p.pubviaroot as "viaRoot",
           ${filter} as filter, ${columns} as columns,
           array(select n.nspname::text || '.' || c.relname::text
                   from pg_catalog.pg_publication_rel o join pg_catalog.pg_class c on c.oid = o.prrelid
                   join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                  where o.prpubid = p.oid and o.prrelid <> r.prrelid and c.relkind = 'p'
                  order by 1) as "otherPartitioned"
      from pg_catalog.pg_publication_rel r
      join pg_catalog.pg_publication p on p.oid = r.prpubid
     where r.prrelid = to_regclass(${quoteQualified(t)}) and p.pubname !~ ${OWN}
     order by p.pubname`;
  return z.array(ListedRow).parse(rows);
}

const WholeRow = z.object({
  name: z.string(),
  allTables: z.boolean(),
  viaRoot: z.boolean(),
});

/** `FOR ALL TABLES` and `FOR TABLES IN SCHEMA` publications that publish `t` without listing it. */
async function wholePublications(sql: AnySql, t: QualifiedName): Promise<z.infer<typeof WholeRow>[]> {
  const rows = await sql`
    select p.pubname::text as name, p.puballtables as "allTables", p.pubviaroot as "viaRoot"
      from pg_catalog.pg_publication p
     where p.pubname !~ ${OWN}
       and exists (select from pg_catalog.pg_publication_tables x
                    where x.pubname = p.pubname and x.schemaname = ${t.schema} and x.tablename = ${t.name})
       and not exists (select from pg_catalog.pg_publication_rel r
                        where r.prpubid = p.oid and r.prrelid = to_regclass(${quoteQualified(t)}))
     order by 1`;
  return z.array(WholeRow).parse(rows);
}

/** `ADD TABLE` of `t` in `p` as it lists the table now: column list, row filter. */
function addTable(p: ListedPublication, t: QualifiedName): string {
  return (
    `ALTER PUBLICATION ${quoteIdent(p.name)} ADD TABLE ${quoteQualified(t)}` +
    (p.columns ? ` (${p.columns.map(quoteIdent).join(", ")})` : "") +
    (p.filter !== null ? ` WHERE (${p.filter})` : "")
  );
}

export const publications: Carrier = {
  kind: "publications",

  async plan(sql: AnySql, facts: TableFacts, spec: PartitionSpec): Promise<CarrierPlan> {
    const out: CarrierPlan = { lines: [], blockers: [] };
    const t = facts.table;
    const table = displayName(t);
    const shadow = displayName({ schema: t.schema, name: fitName(t.name, "_pgshift_shadow") });
    const retired = displayName({ schema: t.schema, name: fitName(t.name, "_pgshift_retired") });
    const key = shadowKey(facts.keyColumns ?? [], partitionColumns(spec));
    for (const p of await listedPublications(sql, t)) {
      const what =
        `publication ${p.name} (lists ${table}` +
        (p.columns ? `, columns (${p.columns.join(", ")})` : "") +
        (p.filter !== null ? `, WHERE (${p.filter})` : "") +
        ")";
      // The partitions' replica identity is the partitioned table's key (with the partition column): PostgreSQL
      // refuses UPDATE and DELETE on a published table whose column list does not cover its replica identity.
      const uncovered = p.columns && facts.replicaIdentity !== "f" ? key.filter((c) => !p.columns!.includes(c)) : [];
      if (p.columns && facts.replicaIdentity === "f") {
        if (p.columns.length < facts.columns.length)
          out.blockers.push(
            `${what}: ${table} has REPLICA IDENTITY FULL and the column list leaves columns out; PostgreSQL would ` +
              "refuse UPDATE and DELETE on the partitioned table (docs: CREATE PUBLICATION, column lists)",
          );
      } else if (uncovered.length > 0) {
        out.blockers.push(
          `${what}: its column list lacks ${uncovered.join(", ")} of the partitioned table's key ` +
            `(${key.join(", ")}), its replica identity: PostgreSQL would refuse the application's UPDATE and ` +
            `DELETE on it after cutover (docs: CREATE PUBLICATION, column lists); add ${uncovered.join(", ")} ` +
            "to the column list first",
        );
        continue;
      }
      let root: string;
      if (p.viaRoot) root = `publish_via_partition_root is on, so consumers receive its changes as ${table}`;
      else if (p.otherPartitioned.length === 0)
        root =
          "cutover sets publish_via_partition_root = true (it holds no other partitioned table, so this changes " +
          `nothing else), so consumers receive the partitioned table's changes as ${table}, not under its ` +
          "partitions' names; it stays on after swap-back (it changes nothing for a table that is not partitioned)";
      else if (p.filter !== null || p.columns) {
        out.blockers.push(
          `${what}: publish_via_partition_root is off and cannot be set on without changing how it publishes ` +
            `${p.otherPartitioned.join(", ")}, and PostgreSQL accepts a row filter or column list for a ` +
            "partitioned table only when it is on (docs: CREATE PUBLICATION); set it on yourself first",
        );
        continue;
      } else
        root =
          `publish_via_partition_root stays off: setting it would change how it publishes ` +
          `${p.otherPartitioned.join(", ")}; so after cutover consumers receive ${table}'s changes under its ` +
          "partitions' names and need tables of those names (or set publish_via_partition_root = true yourself)";
      out.lines.push(
        `${what}: at every switch the table becoming live takes the other's place in it under the name ${table}, ` +
          `with the same column list and row filter; ${root}; pgshift's shadow and retired table are never in it`,
      );
    }
    for (const p of await wholePublications(sql, t)) {
      const kind = p.allTables ? "FOR ALL TABLES" : `FOR TABLES IN SCHEMA ${t.schema}`;
      out.lines.push(
        `publication ${p.name} (${kind}): publishes whichever table is named ${table}, so nothing is moved; but ` +
          `it also publishes pgshift's tables: during the migration ${shadow}` +
          (p.viaRoot ? "" : " (under its partitions' names)") +
          `, written by the backfill and the mirror, and after cutover ${retired}, kept current by the reverse ` +
          "mirror, until finalize (or abort) drops them" +
          (p.allTables
            ? ", and pgshift's state (pgshift.migrations, pgshift.schema_version), written at every step"
            : "") +
          ": a consumer (subscription) without tables of those names " +
          'stops with "logical replication target relation ... does not exist" unless it has them; after ' +
          `cutover consumers receive ${table}'s changes ` +
          (p.viaRoot
            ? `as ${table} (publish_via_partition_root is on)`
            : "under its partitions' names (publish_via_partition_root is off; pgshift leaves it, as it applies " +
              "to every partitioned table the publication covers)"),
      );
    }
    return out;
  },

  async claims(sql: AnySql, live: QualifiedName): Promise<string[]> {
    return (await listedPublications(sql, live)).map((p) => `pg_publication_rel/${p.oid}`);
  },

  async carry(sql: AnySql, m: Migration, to: SwitchTo): Promise<Carried[]> {
    // After the renames the table leaving the application has the copy's name of the next phase.
    const leaving = tablesIn(m, to).copy;
    const partitioned = to === "cutover";
    return (await listedPublications(sql, m.live))
      .filter((p) => p.name !== m.publication_name)
      .map((p) => {
        const pub = quoteIdent(p.name);
        const label = `publication ${p.name}`;
        const viaRoot =
          partitioned && !p.viaRoot && p.otherPartitioned.length === 0
            ? [
                statement(
                  `ALTER PUBLICATION ${pub} SET (publish_via_partition_root = true)`,
                  "transaction",
                  `${label}: the partitioned table's changes are published under its own name`,
                ),
              ]
            : [];
        return {
          label,
          inside: [
            ...viaRoot,
            statement(
              `ALTER PUBLICATION ${pub} DROP TABLE ${quoteQualified(leaving)}`,
              "transaction",
              `${label}: publishes the live table`,
            ),
            statement(addTable(p, { schema: m.source_schema, name: m.source_table })),
          ],
          after: [],
        };
      });
  },
};
