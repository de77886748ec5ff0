/**
 * Views that read the table follow it: at every switch each view that reads the live table directly is
 * replaced, in the switch's transaction after the renames, by `CREATE OR REPLACE VIEW` with its own definition
 * (read beforehand with every name schema-qualified, so it names the table by the original name, which then
 * belongs to the table becoming live) and its own options (security_barrier, security_invoker, check_option).
 * CREATE OR REPLACE keeps the view itself: its oid, owner, grants, comments and the views built on it, which
 * therefore follow without being touched (docs: CREATE VIEW, "CREATE OR REPLACE VIEW ... the new query must
 * generate the same columns").
 */
import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import type { Migration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";
import { statement } from "../plan/steps.js";
import { type Carried, type Carrier, type CarrierPlan, withQualifiedNames } from "./carrier.js";

const ViewRow = z.object({
  rewrite: z.coerce.number(),
  schema: z.string(),
  name: z.string(),
  kind: z.string(),
  owner: z.string(),
  is_owner: z.boolean(),
  definition: z.string(),
  options: z.array(z.string()).nullable(),
});
type ViewRow = z.infer<typeof ViewRow>;

/**
 * The views and materialized views that read `table` directly (through their `_RETURN` rule: pg_depend from
 * pg_rewrite), with their definitions as pg_get_viewdef prints them under `search_path = pg_catalog` (every
 * name outside pg_catalog schema-qualified), their options and owner. Reads the catalog only.
 */
async function viewsOf(sql: AnySql, table: QualifiedName): Promise<ViewRow[]> {
  return withQualifiedNames(sql, async (tx) => {
    const rows = await tx`
      select distinct w.oid::int8 as rewrite, n.nspname::text as schema, c.relname::text as name,
             c.relkind::text as kind, pg_catalog.pg_get_userbyid(c.relowner)::text as owner,
             pg_catalog.pg_has_role(c.relowner, 'USAGE') as is_owner,
             pg_catalog.pg_get_viewdef(c.oid) as definition, c.reloptions::text[] as options
        from pg_catalog.pg_depend d
        join pg_catalog.pg_rewrite w on w.oid = d.objid
        join pg_catalog.pg_class c on c.oid = w.ev_class
        join pg_catalog.pg_namespace n on n.oid = c.relnamespace
       where d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
         and d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
         and d.refobjid = pg_catalog.to_regclass(${quoteQualified(table)})
         and c.oid <> d.refobjid and w.rulename = '_RETURN'
       order by 2, 3`;
    return z.array(ViewRow).parse(rows);
  });
}

/**
 * `CREATE OR REPLACE VIEW` for a view as read by viewsOf: its definition (without the final semicolon) and
 * options. check_option is one of the options (docs: CREATE VIEW, WITH CHECK OPTION), so it is kept too.
 */
function replaceViewSql(v: ViewRow): string {
  const name = quoteQualified({ schema: v.schema, name: v.name });
  const options = (v.options ?? []).map(viewOption);
  const body = v.definition.trim().replace(/;$/, "");
  return `CREATE OR REPLACE VIEW ${name}${options.length > 0 ? ` WITH (${options.join(", ")})` : ""} AS ${body}`;
}

/** A view's reloption `name=value` as an option of CREATE VIEW (the value quoted as a literal if not a word). */
function viewOption(opt: string): string {
  const eq = opt.indexOf("=");
  const name = eq < 0 ? opt : opt.slice(0, eq);
  if (!/^[a-z_][a-z0-9_]*$/.test(name)) throw new Error(`unexpected view option: ${opt}`);
  if (eq < 0) return name;
  const value = opt.slice(eq + 1);
  return /^[A-Za-z0-9_.]+$/.test(value) ? `${name}=${value}` : `${name}='${value.replaceAll("'", "''")}'`;
}

const label = (v: ViewRow) => `view ${displayName({ schema: v.schema, name: v.name })}`;

/** Views: re-pointed at the live table at every switch (see the module's comment). */
export const viewsCarrier: Carrier = {
  kind: "views",

  async plan(sql: AnySql, facts: TableFacts): Promise<CarrierPlan> {
    const out: CarrierPlan = { lines: [], blockers: [] };
    for (const v of await viewsOf(sql, facts.table)) {
      if (v.kind !== "v") continue; // materialized-views.ts
      if (!v.is_owner) {
        out.blockers.push(
          `${label(v)} reads ${displayName(facts.table)} and is owned by ${v.owner}: re-pointing it at every switch ` +
            `(CREATE OR REPLACE VIEW) needs its owner's rights; run pgshift as ${v.owner} or a superuser`,
        );
        continue;
      }
      out.lines.push(
        `${label(v)}: re-created with its own definition and options at cutover (it then reads the partitioned ` +
          `table) and at swap-back (the original again); the same view keeps its grants, comments and the views ` +
          `built on it`,
      );
    }
    return out;
  },

  async claims(sql: AnySql, live: QualifiedName): Promise<string[]> {
    return (await viewsOf(sql, live)).filter((v) => v.kind === "v").map((v) => `pg_rewrite/${v.rewrite}`);
  },

  async carry(sql: AnySql, m: Migration): Promise<Carried[]> {
    return (await viewsOf(sql, m.live))
      .filter((v) => v.kind === "v")
      .map((v) => ({
        label: label(v),
        inside: [statement(replaceViewSql(v), "transaction", `${label(v)} reads the table that is live now`)],
        after: [],
      }));
  },
};
