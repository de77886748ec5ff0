/**
 * Functions and procedures whose SQL-standard body (`BEGIN ATOMIC ... END` or `RETURN expr`, PostgreSQL 14 and
 * later) reads or writes the table: PostgreSQL parses such a body once and records what it uses, so the body
 * would keep using the table under its new name after a switch. At every switch each one is replaced, in the
 * switch's transaction after the renames, by `CREATE OR REPLACE` with its definition as pg_get_functiondef prints
 * it (read with every name schema-qualified), which then resolves to the table becoming live. CREATE OR REPLACE
 * keeps the function's oid, owner, grants and comment (docs: CREATE FUNCTION, "sql_body").
 *
 * A function whose signature uses the table's row type (an argument or result of type `orders`) cannot follow:
 * the row type belongs to the original table and keeps its oid under the retired name, and CREATE OR REPLACE
 * cannot change argument types. `plan` refuses it by name, as it does a column of another table of the row type.
 */
import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import type { Migration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";
import { statement } from "../plan/steps.js";
import { type Carried, type Carrier, type CarrierPlan, withQualifiedNames } from "./carrier.js";

const FunctionRow = z.object({
  oid: z.coerce.number(),
  signature: z.string(),
  kind: z.string(),
  owner: z.string(),
  is_owner: z.boolean(),
  sql_body: z.boolean(),
  row_type: z.boolean(),
  definition: z.string().nullable(),
});
type FunctionRow = z.infer<typeof FunctionRow>;

/**
 * Functions, procedures and aggregates that depend on `table` (pg_depend: on the table or its columns, or on its
 * row type or the row type's array), with whether the dependency comes from a SQL-standard body (prosqlbody) and
 * whether the signature uses the row type, and the definition (pg_get_functiondef, names qualified) of those
 * with a SQL-standard body. pgshift's own functions (schema pgshift) are left out. Reads the catalog only.
 */
async function functionsOf(sql: AnySql, table: QualifiedName): Promise<FunctionRow[]> {
  return withQualifiedNames(sql, async (tx) => {
    const rows = await tx`
      with t as (select pg_catalog.to_regclass(${quoteQualified(table)})::oid as oid),
      ty as (select y.oid from pg_catalog.pg_type y where y.typrelid = (select oid from t)
             union all select y.typarray from pg_catalog.pg_type y where y.typrelid = (select oid from t)
               and y.typarray <> 0)
      select p.oid::int8 as oid,
             pg_catalog.format('%I.%I(%s)', n.nspname, p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid))
               as signature,
             p.prokind::text as kind, pg_catalog.pg_get_userbyid(p.proowner)::text as owner,
             pg_catalog.pg_has_role(p.proowner, 'USAGE') as is_owner,
             p.prosqlbody is not null as sql_body,
             exists (select from pg_catalog.pg_depend d where d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                        and d.objid = p.oid and d.refclassid = 'pg_catalog.pg_type'::pg_catalog.regclass
                        and d.refobjid in (select oid from ty)) as row_type,
             case when p.prosqlbody is not null and p.prokind in ('f', 'p') then pg_catalog.pg_get_functiondef(p.oid)
               end as definition
        from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
       where n.nspname <> 'pgshift'
         and p.oid in (select d.objid from pg_catalog.pg_depend d
                        where d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                          and ((d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass and d.refobjid =
                                  (select oid from t))
                               or (d.refclassid = 'pg_catalog.pg_type'::pg_catalog.regclass and d.refobjid in
                                  (select oid from ty))))
       order by 2`;
    return z.array(FunctionRow).parse(rows);
  });
}

const what = (f: FunctionRow) => (f.kind === "p" ? "procedure" : f.kind === "a" ? "aggregate" : "function");
const label = (f: FunctionRow) => `${what(f)} ${f.signature}`;
/** Carried: a SQL-standard body that uses the table, and a signature that does not use its row type. */
const carried = (f: FunctionRow) => f.sql_body && !f.row_type && f.definition !== null && f.is_owner;

/** Functions and procedures with a SQL-standard body: re-created at every switch (see the module's comment). */
export const functionsCarrier: Carrier = {
  kind: "functions",

  async plan(sql: AnySql, facts: TableFacts): Promise<CarrierPlan> {
    const out: CarrierPlan = { lines: [], blockers: [] };
    const t = displayName(facts.table);
    // Columns of other tables (and typed tables) of the table's row type or its array type: they would keep the
    // retired table's type, and finalize could not drop it.
    const columns = await sql`
      select pg_catalog.format('%I.%I', n.nspname, c.relname) as rel, a.attname::text as col
        from pg_catalog.pg_attribute a join pg_catalog.pg_class c on c.oid = a.attrelid
        join pg_catalog.pg_namespace n on n.oid = c.relnamespace
       where a.attnum > 0 and not a.attisdropped and a.attrelid <> ${facts.oid}
         and a.atttypid in (select y.oid from pg_catalog.pg_type y where y.typrelid = ${facts.oid}
                            union all select y.typarray from pg_catalog.pg_type y where y.typrelid = ${facts.oid})
       order by 1, 2`;
    for (const c of columns) {
      out.blockers.push(
        `column ${String(c.col)} of ${String(c.rel)} has the row type of ${t}, which stays with the original table ` +
          `(the retired table after cutover, dropped by finalize); give it another type (for example jsonb) first`,
      );
    }
    for (const f of await functionsOf(sql, facts.table)) {
      if (f.row_type) {
        out.blockers.push(
          `${label(f)} takes or returns the row type of ${t}, which stays with the original table (the retired ` +
            `table after cutover, dropped by finalize); change its signature (for example to jsonb) first`,
        );
      } else if (!f.sql_body || f.definition === null) {
        out.blockers.push(`${label(f)} depends on ${t} in a way pgshift cannot re-create; drop it first`);
      } else if (!f.is_owner) {
        out.blockers.push(
          `${label(f)} has a SQL-standard body that uses ${t} and is owned by ${f.owner}: re-creating it at every ` +
            `switch needs its owner's rights; run pgshift as ${f.owner} or a superuser`,
        );
      } else {
        out.lines.push(
          `${label(f)}: its SQL-standard body is re-created (CREATE OR REPLACE) at cutover and at swap-back, so it ` +
            `always uses the live table; the same ${what(f)} keeps its grants and comment`,
        );
      }
    }
    return out;
  },

  async claims(sql: AnySql, live: QualifiedName): Promise<string[]> {
    return (await functionsOf(sql, live)).filter(carried).map((f) => `pg_proc/${f.oid}`);
  },

  async carry(sql: AnySql, m: Migration): Promise<Carried[]> {
    return (await functionsOf(sql, m.live)).filter(carried).map((f) => ({
      label: label(f),
      inside: [statement(f.definition!.trim(), "transaction", `${label(f)}: its body uses the table that is live now`)],
      after: [],
    }));
  },
};
