/**
 * Foreign keys of other tables that reference the migrated table (issue 15). At every switch, inside its
 * transaction after the renames, each is dropped and added again under its name from its definition read
 * before the switch (which names the referenced table by the original name, now the table becoming live),
 * `NOT VALID`; after COMMIT `VALIDATE CONSTRAINT` checks the existing rows without blocking writes (it takes
 * SHARE UPDATE EXCLUSIVE on the referencing table). Actions (ON DELETE / ON UPDATE), MATCH and deferrability
 * are part of the definition and so kept.
 *
 * What PostgreSQL allows (docs: CREATE TABLE, REFERENCES: "the referenced columns must be the columns of a
 * non-deferrable unique or primary key constraint in the referenced table"; CREATE TABLE, PARTITION BY and
 * "Table Partitioning", limitations: a unique constraint on a partitioned table must include all the partition
 * key columns): a foreign key can reference the partitioned table only when the partition column is among its
 * referenced columns (the shadow then has a unique key on exactly them: start widens a key with the partition
 * column only when it lacks it). Before PostgreSQL 18 a NOT VALID foreign key cannot be added to a partitioned
 * referencing table (ALTER TABLE, ADD table_constraint ... NOT VALID; 18's release notes).
 */
import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import { groupTableNames } from "../group/members.js";
import type { Migration } from "../migration/state.js";
import { loadMigration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { INTEGER_TYPES, type PartitionSpec, TIME_TYPES } from "../partitioning/spec.js";
import { statement } from "../plan/steps.js";
import type { Carried, Carrier, CarrierPlan, SwitchTo } from "./carrier.js";

const IncomingRow = z.object({
  oid: z.coerce.number(),
  name: z.string(),
  /** The referencing table, quoted and schema-qualified. */
  rel: z.string(),
  /** The referencing table for messages (schema.name). */
  relName: z.string(),
  relkind: z.string(),
  self: z.boolean(),
  /** The current user owns the referencing table (or is a member of its owner): ALTER TABLE needs it. */
  owned: z.boolean(),
  owner: z.string(),
  valid: z.boolean(),
  /** The referenced columns, in the order of the foreign key. */
  refcols: z.array(z.string()),
  reftypes: z.array(z.string()),
  def: z.string(),
  comment: z.string().nullable(),
});
/** A foreign key of another table referencing the table. */
export type IncomingForeignKey = z.infer<typeof IncomingRow>;

/**
 * The foreign keys referencing `t` (their parent constraint when the referencing table is partitioned), each
 * with its definition (pg_get_constraintdef) naming the referenced table schema-qualified (qualifiedReference).
 */
export async function incomingForeignKeys(sql: AnySql, t: QualifiedName): Promise<IncomingForeignKey[]> {
  const rows = await sql`
    select c.oid::int8 as oid, c.conname::text as name,
           pg_catalog.format('%I.%I', n.nspname, r.relname) as rel,
           n.nspname::text || '.' || r.relname::text as "relName",
           r.relkind::text as relkind, c.conrelid = c.confrelid as self, c.convalidated as valid,
           pg_catalog.pg_has_role(r.relowner, 'USAGE') as owned, pg_catalog.pg_get_userbyid(r.relowner)::text as owner,
           (select array_agg(a.attname::text order by k.ord)
              from unnest(c.confkey) with ordinality k(attnum, ord)
              join pg_catalog.pg_attribute a on a.attrelid = c.confrelid and a.attnum = k.attnum) as refcols,
           (select array_agg(y.typname::text order by k.ord)
              from unnest(c.confkey) with ordinality k(attnum, ord)
              join pg_catalog.pg_attribute a on a.attrelid = c.confrelid and a.attnum = k.attnum
              join pg_catalog.pg_type y on y.oid = a.atttypid) as reftypes,
           pg_catalog.pg_get_constraintdef(c.oid) as def,
           pg_catalog.format('%I.%I', fn.nspname, f.relname) as qref,
           pg_catalog.format('%I', f.relname) as uref,
           pg_catalog.obj_description(c.oid, 'pg_constraint') as comment
      from pg_catalog.pg_constraint c
      join pg_catalog.pg_class r on r.oid = c.conrelid
      join pg_catalog.pg_namespace n on n.oid = r.relnamespace
      join pg_catalog.pg_class f on f.oid = c.confrelid
      join pg_catalog.pg_namespace fn on fn.oid = f.relnamespace
     where c.contype = 'f' and c.confrelid = to_regclass(${quoteQualified(t)}) and c.conparentid = 0
     order by n.nspname, r.relname, c.conname`;
  return z
    .array(IncomingRow.extend({ qref: z.string(), uref: z.string() }))
    .parse(rows)
    .map(({ qref, uref, ...fk }) => ({ ...fk, def: qualifiedReference(fk.def, qref, uref) }));
}

/**
 * A foreign key's definition (pg_get_constraintdef) with the referenced table named `qualified` (`"s"."t"`
 * quoted as format('%I.%I') quotes): pg_get_constraintdef leaves out the schema of a table the search_path
 * shows (as `unqualified`), and the switch's statements must name it whatever the search_path of whoever runs
 * them. The only name in a foreign key's definition is the referenced table's (MATCH, actions and columns aside).
 */
export function qualifiedReference(def: string, qualified: string, unqualified: string): string {
  for (const name of [qualified, unqualified]) {
    const at = def.indexOf(` REFERENCES ${name}(`);
    if (at >= 0) {
      const start = at + " REFERENCES ".length;
      return def.slice(0, start) + qualified + def.slice(start + name.length);
    }
  }
  return def;
}

/** The specs whose partition column is one of `cols`, the ones suiting each column's type first. */
export function specsAllowing(cols: readonly string[], types: readonly string[]): string[] {
  const out: string[] = [];
  cols.forEach((c, i) => {
    const ty = types[i] ?? "";
    const q = /^[a-z_][a-z0-9_$]*$/.test(c) ? c : `"${c.replace(/"/g, '""')}"`;
    if ((INTEGER_TYPES as readonly string[]).includes(ty)) out.push(`hash:${q}:8`, `range:${q}:<width>`);
    else if ((TIME_TYPES as readonly string[]).includes(ty)) out.push(`range:${q}:month`, `hash:${q}:8`);
    else out.push(`hash:${q}:8`, `list:${q}`);
  });
  return out;
}

/**
 * Why the foreign key `fk` cannot follow `table` partitioned by `column` on a server of `version`
 * (server_version_num), as what follows `foreign key <name> on <table>: `; null when it can.
 */
export function whyNot(fk: IncomingForeignKey, column: string, version: number, table: string): string | null {
  if (fk.self)
    return (
      "it references its own table: pgshift does not carry a self-referencing foreign key (the shadow would " +
      "have to reference its own rows before they are copied); drop it, and add it again after finalize"
    );
  if (!fk.owned)
    return (
      `the current user does not own ${fk.relName} (owner: ${fk.owner}), and only its owner may drop and add ` +
      "its foreign key at each switch: run pgshift as that role (or a member of it)"
    );
  if (fk.relkind === "p" && version < 180000)
    return (
      `${fk.relName} is partitioned, and PostgreSQL before 18 cannot add a NOT VALID foreign key to a ` +
      `partitioned table, so re-creating it would check every row of ${fk.relName} while the switch blocks writes`
    );
  if (!fk.refcols.includes(column))
    return (
      `it references (${fk.refcols.join(", ")}) of ${table}: a foreign key needs a unique key of exactly its ` +
      `referenced columns, and every unique key of a partitioned table must contain the partition column ` +
      `${column} (docs: CREATE TABLE, PARTITION BY), so it cannot reference the partitioned table; a spec ` +
      `partitioning by a referenced column allows it: ${specsAllowing(fk.refcols, fk.reftypes).join(", ")}`
    );
  return null;
}

/** server_version_num. */
export const serverVersion = async (sql: AnySql) =>
  Number((await sql`select current_setting('server_version_num')::int as v`)[0]?.v);

/** The statements that move `fk` at a switch: drop, add NOT VALID, its comment; VALIDATE after COMMIT. */
function carried(fk: IncomingForeignKey): Carried {
  const name = quoteIdent(fk.name);
  const def = fk.def.replace(/ NOT VALID$/, "");
  const label = `foreign key ${fk.name} on ${fk.relName}`;
  return {
    label,
    inside: [
      statement(`ALTER TABLE ${fk.rel} DROP CONSTRAINT ${name}`, "transaction", `${label}: follows the live table`),
      statement(`ALTER TABLE ${fk.rel} ADD CONSTRAINT ${name} ${def} NOT VALID`),
      ...(fk.comment !== null
        ? [statement(`COMMENT ON CONSTRAINT ${name} ON ${fk.rel} IS ${quoteLiteral(fk.comment)}`)]
        : []),
    ],
    after: fk.valid
      ? [
          statement(
            `ALTER TABLE ${fk.rel} VALIDATE CONSTRAINT ${name}`,
            "session",
            "checks the existing rows without blocking writes (SHARE UPDATE EXCLUSIVE)",
          ),
        ]
      : [],
  };
}

/**
 * Foreign keys carried over that are not validated (yet): after a switch until its VALIDATE CONSTRAINT ran, or
 * because it failed. One line each, with the statement to run; for `status`.
 */
export async function pendingValidations(sql: AnySql, m: Migration): Promise<string[]> {
  const fks = await incomingForeignKeys(sql, m.live);
  return fks
    .filter((f) => !f.valid && !f.self)
    .map(
      (f) =>
        `foreign key ${f.name} on ${f.relName} references ${displayName(m.live)} and is not validated (NOT VALID): ` +
        `ALTER TABLE ${f.rel} VALIDATE CONSTRAINT ${quoteIdent(f.name)} checks its rows without blocking writes` +
        " (unless it was NOT VALID before the migration)",
    );
}

export const foreignKeys: Carrier = {
  kind: "foreign keys of other tables",

  async plan(sql: AnySql, facts: TableFacts, spec: PartitionSpec): Promise<CarrierPlan> {
    const out: CarrierPlan = { lines: [], blockers: [] };
    const fks = await incomingForeignKeys(sql, facts.table);
    const table = displayName(facts.table);
    for (const fk of fks) {
      const why = whyNot(fk, spec.column, facts.serverVersionNum, table);
      if (why) {
        out.blockers.push(`foreign key ${fk.name} on ${fk.relName}: ${why}`);
        continue;
      }
      out.lines.push(
        `foreign key ${fk.name} on ${fk.relName} (${fk.def}): dropped and added again NOT VALID in each switch's ` +
          `transaction (it locks ${fk.relName} for those milliseconds), so it references the live table: the ` +
          `partitioned one after cutover (through its unique key (${fk.refcols.join(", ")})), ${table} again after ` +
          "swap-back; " +
          (fk.valid
            ? "VALIDATE CONSTRAINT then checks the existing rows after the commit without blocking writes " +
              "(status shows it until it has)"
            : "it stays NOT VALID, as it is now"),
      );
    }
    return out;
  },

  async claims(sql: AnySql, live: QualifiedName): Promise<string[]> {
    const m = await loadMigration(sql, live, { upgrade: false });
    if (!m) return [];
    const version = await serverVersion(sql);
    // A foreign key between two tables of a migration group follows its table (docs/groups.md): claimed, not carried.
    const group = await groupTableNames(sql, m);
    // A foreign key that cannot follow is not claimed: the late-object check refuses it, naming it.
    const oids = (await incomingForeignKeys(sql, m.live))
      .filter((f) => group.has(f.relName) || whyNot(f, m.spec.column, version, displayName(m.live)) === null)
      .map((f) => String(f.oid));
    // With them, their clones on the partitions of a partitioned referencing table (dropped and re-created with them).
    const rows = await sql`
      with recursive tree as (
        select c.oid from pg_catalog.pg_constraint c where c.oid = any(${oids}::oid[])
        union all
        select c.oid from pg_catalog.pg_constraint c join tree t on c.conparentid = t.oid)
      select oid::int8 as oid from tree`;
    return rows.map((r) => `pg_constraint/${String(r.oid)}`);
  },

  async carry(sql: AnySql, m: Migration, _to: SwitchTo): Promise<Carried[]> {
    const version = await serverVersion(sql);
    const fks = await incomingForeignKeys(sql, m.live);
    // One from another table of m's migration group references m's partitioned table from that table's partitioned
    // one (and the original from the original): the group's switch renames both, so it stays as it is.
    const group = await groupTableNames(sql, m);
    return fks
      .filter((f) => !group.has(f.relName) && whyNot(f, m.spec.column, version, displayName(m.live)) === null)
      .map(carried);
  },
};
