/**
 * Materialized views that read the table follow it, rebuilt after the switch. A materialized view's query cannot
 * be replaced (there is no CREATE OR REPLACE MATERIALIZED VIEW), and building one holds no lock the application
 * waits for only if it runs outside the switch's transaction. So after every switch commits (cutover, swap-back),
 * without blocking writes, each is rebuilt from the table that is live then:
 * - `CREATE MATERIALIZED VIEW <name>_pgshift_next ... WITH DATA` (WITH NO DATA for one never populated) with its
 *   own definition (read before the switch with every name qualified: it names the table by the original name,
 *   now the live table's), options and tablespace, then its indexes (a unique one keeps `REFRESH MATERIALIZED
 *   VIEW CONCURRENTLY` possible);
 * - one short transaction (lock_timeout, retried): the old one and its indexes renamed aside, the new one and its
 *   indexes given their names, its owner, grants and comment, the views that read it re-pointed (CREATE OR
 *   REPLACE VIEW), the old one dropped.
 * Until then it keeps its data and reads the table that left (which the mirror keeps equal to the live one until
 * finalize), so a REFRESH meanwhile still shows the application's rows; `status` lists it as pending. Its data is
 * as of the rebuild, as after a REFRESH.
 */
import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import type { Migration } from "../migration/state.js";
import { displayName, fitName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { type Step, statement, transactionStep } from "../plan/steps.js";
import { type Carried, type Carrier, type CarrierPlan, withQualifiedNames } from "./carrier.js";

const MatviewRow = z.object({
  rewrite: z.coerce.number(),
  schema: z.string(),
  name: z.string(),
  owner: z.string(),
  is_owner: z.boolean(),
  populated: z.boolean(),
  definition: z.string(),
  options: z.array(z.string()).nullable(),
  tablespace: z.string().nullable(),
  comment: z.string().nullable(),
  grants: z.array(z.object({ grantee: z.string().nullable(), privilege: z.string(), grantable: z.boolean() })),
  indexes: z.array(z.object({ name: z.string(), definition: z.string() })),
  views: z.array(z.object({ name: z.string(), definition: z.string(), options: z.array(z.string()).nullable() })),
  others: z.array(z.string()),
});
type MatviewRow = z.infer<typeof MatviewRow>;

/**
 * The materialized views that read `table` directly, with what a rebuild needs: definition, options, tablespace,
 * comment, grants, indexes (pg_get_indexdef), the plain views that read them (to re-point), and anything else
 * that depends on them (pg_describe_object; a rebuild would have to drop it: plan refuses). Names qualified.
 */
async function matviewsOf(sql: AnySql, table: QualifiedName): Promise<MatviewRow[]> {
  return withQualifiedNames(sql, async (tx) => {
    const rows = await tx`
      select distinct on (n.nspname, c.relname)
             w.oid::int8 as rewrite, n.nspname::text as schema, c.relname::text as name,
             pg_catalog.pg_get_userbyid(c.relowner)::text as owner,
             pg_catalog.pg_has_role(c.relowner, 'USAGE') as is_owner, c.relispopulated as populated,
             pg_catalog.pg_get_viewdef(c.oid) as definition, c.reloptions::text[] as options,
             (select spcname::text from pg_catalog.pg_tablespace where oid = c.reltablespace) as tablespace,
             pg_catalog.obj_description(c.oid, 'pg_class') as comment,
             coalesce((select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                         'grantee', case when a.grantee = 0 then null else pg_catalog.pg_get_userbyid(a.grantee) end,
                         'privilege', a.privilege_type, 'grantable', a.is_grantable))
                         from pg_catalog.aclexplode(c.relacl) a where a.grantee <> c.relowner), '[]') as grants,
             coalesce((select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('name', ic.relname::text,
                         'definition', pg_catalog.pg_get_indexdef(i.indexrelid)) order by ic.relname)
                         from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
                        where i.indrelid = c.oid), '[]') as indexes,
             coalesce((select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                         'name', pg_catalog.format('%I.%I', vn.nspname, v.relname),
                         'definition', pg_catalog.pg_get_viewdef(v.oid), 'options', v.reloptions))
                         from pg_catalog.pg_class v join pg_catalog.pg_namespace vn on vn.oid = v.relnamespace
                        where v.relkind = 'v' and v.oid in (
                          select vw.ev_class from pg_catalog.pg_depend vd join pg_catalog.pg_rewrite vw on vw.oid =
                            vd.objid where vd.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                              and vd.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass and vd.refobjid = c.oid
                              and vw.ev_class <> c.oid)), '[]') as views,
             coalesce((select pg_catalog.array_agg(pg_catalog.pg_describe_object(od.classid, od.objid, 0))
                         from pg_catalog.pg_depend od
                        where od.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass and od.refobjid = c.oid
                          and od.deptype = 'n'
                          and not (od.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass and exists (
                                   select from pg_catalog.pg_rewrite ow join pg_catalog.pg_class oc on oc.oid =
                                     ow.ev_class where ow.oid = od.objid and (oc.oid = c.oid or oc.relkind = 'v')))
                          and not (od.classid = 'pg_catalog.pg_class'::pg_catalog.regclass and exists (
                                   select from pg_catalog.pg_index oi where oi.indexrelid = od.objid))),
                       '{}') as others
        from pg_catalog.pg_depend d
        join pg_catalog.pg_rewrite w on w.oid = d.objid
        join pg_catalog.pg_class c on c.oid = w.ev_class
        join pg_catalog.pg_namespace n on n.oid = c.relnamespace
       where d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
         and d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
         and d.refobjid = pg_catalog.to_regclass(${quoteQualified(table)})
         and c.relkind = 'm'
       order by n.nspname, c.relname`;
    return z.array(MatviewRow).parse(rows);
  });
}

const nameOf = (v: MatviewRow): QualifiedName => ({ schema: v.schema, name: v.name });
const label = (v: MatviewRow) => `materialized view ${displayName(nameOf(v))}`;
const body = (definition: string) => definition.trim().replace(/;$/, "");
const withOptions = (options: readonly string[] | null) =>
  options && options.length > 0 ? ` WITH (${options.join(", ")})` : "";

/** The name of the materialized view that replaces `v` (built WITH NO DATA in the switch, filled after it). */
const nextOf = (v: { schema: string; name: string }): QualifiedName => ({
  schema: v.schema,
  name: fitName(v.name, NEXT),
});
const NEXT = "_pgshift_next";
const isNext = (v: MatviewRow) => v.name.endsWith(NEXT);

/**
 * The switch's part for `v`: its replacement created WITH NO DATA (catalog only: nothing is read, no time
 * under the locks) from its definition, which resolves to the table becoming live.
 */
function createNextSteps(v: MatviewRow): Step[] {
  const next = quoteQualified(nextOf(v));
  return [
    statement(`DROP MATERIALIZED VIEW IF EXISTS ${next}`, "transaction", "left by an earlier switch"),
    statement(
      `CREATE MATERIALIZED VIEW ${next}${withOptions(v.options)}` +
        `${v.tablespace ? ` TABLESPACE ${quoteIdent(v.tablespace)}` : ""} AS ${body(v.definition)} WITH NO DATA`,
      "transaction",
      `${label(v)}: its replacement, reading the table that is live now, filled after the switch`,
    ),
  ];
}

/**
 * After the switch, without blocking writes: fill `v`'s replacement (REFRESH, unless `v` was never populated),
 * build its indexes, then in one short transaction (lock_timeout, retried) swap it in: the old one renamed aside
 * (its ACCESS EXCLUSIVE lock; LOCK TABLE does not take materialized views) with its indexes, the replacement and
 * its indexes given their names, owner, grants, comment, the views reading it re-pointed, the old one dropped.
 * Every statement can run again after an interruption.
 */
function finishSteps(v: MatviewRow, lockTimeoutMs: number): Step[] {
  const q = quoteQualified(nameOf(v));
  const next = nextOf(v);
  const aside = { schema: v.schema, name: fitName(v.name, "_pgshift_old") };
  const steps: Step[] = v.populated
    ? [statement(`REFRESH MATERIALIZED VIEW ${quoteQualified(next)}`, "session", `${label(v)}, rebuilt`)]
    : [];
  const swap: Step[] = [statement(`ALTER MATERIALIZED VIEW ${q} RENAME TO ${quoteIdent(aside.name)}`)];
  for (const [i, ix] of v.indexes.entries()) {
    // pg_get_indexdef: CREATE [UNIQUE] INDEX <name> ON <schema>.<matview> USING ...
    const using = ix.definition.indexOf(" USING ");
    const unique = ix.definition.startsWith("CREATE UNIQUE ");
    steps.push(
      statement(
        `CREATE ${unique ? "UNIQUE " : ""}INDEX IF NOT EXISTS ${quoteIdent(fitName(ix.name, NEXT))} ` +
          `ON ${quoteQualified(next)}${ix.definition.slice(using)}`,
        "session",
      ),
    );
    swap.push(
      statement(
        `ALTER INDEX ${quoteQualified({ schema: v.schema, name: ix.name })} RENAME TO ` +
          `${quoteIdent(fitName(`pgshift_old_${i}_${ix.name}`, ""))}`,
      ),
    );
  }
  swap.push(statement(`ALTER MATERIALIZED VIEW ${quoteQualified(next)} RENAME TO ${quoteIdent(v.name)}`));
  for (const ix of v.indexes) {
    swap.push(
      statement(
        `ALTER INDEX ${quoteQualified({ schema: v.schema, name: fitName(ix.name, NEXT) })} RENAME TO ` +
          quoteIdent(ix.name),
      ),
    );
  }
  swap.push(statement(`ALTER MATERIALIZED VIEW ${q} OWNER TO ${quoteIdent(v.owner)}`));
  for (const g of v.grants) {
    swap.push(
      statement(
        `GRANT ${g.privilege} ON ${q} TO ${g.grantee === null ? "PUBLIC" : quoteIdent(g.grantee)}` +
          (g.grantable ? " WITH GRANT OPTION" : ""),
      ),
    );
  }
  if (v.comment !== null) swap.push(statement(`COMMENT ON MATERIALIZED VIEW ${q} IS ${quoteLiteral(v.comment)}`));
  for (const view of v.views) {
    swap.push(statement(`CREATE OR REPLACE VIEW ${view.name}${withOptions(view.options)} AS ${body(view.definition)}`));
  }
  swap.push(statement(`DROP MATERIALIZED VIEW ${quoteQualified(aside)}`));
  steps.push(
    transactionStep(swap, {
      lockTimeoutMs,
      why: `${label(v)}: the rebuilt one takes its name, indexes, owner, grants and comment`,
    }),
  );
  return steps;
}

/**
 * Materialized views whose rebuild after the last switch did not finish (the process stopped, or a step
 * failed): they still read `m.copy`, and their replacement (`<name>_pgshift_next`, reading the live table)
 * exists. With the steps that finish each (finishSteps): finalize runs them first, status lists them.
 */
export async function pendingRebuilds(
  sql: AnySql,
  m: Migration,
  lockTimeoutMs = 500,
): Promise<{ label: string; steps: Step[] }[]> {
  const out: { label: string; steps: Step[] }[] = [];
  for (const v of await matviewsOf(sql, m.copy)) {
    if (isNext(v)) continue;
    const r = await sql`select pg_catalog.to_regclass(${quoteQualified(nextOf(v))}) is not null as present`;
    if (r[0]?.present) out.push({ label: label(v), steps: finishSteps(v, lockTimeoutMs) });
  }
  return out;
}

/** Materialized views: rebuilt from the live table after every switch (see the module's comment). */
export const materializedViewsCarrier: Carrier = {
  kind: "materialized views",

  async plan(sql: AnySql, facts: TableFacts): Promise<CarrierPlan> {
    const out: CarrierPlan = { lines: [], blockers: [] };
    for (const v of await matviewsOf(sql, facts.table)) {
      if (isNext(v)) continue;
      if (!v.is_owner) {
        out.blockers.push(
          `${label(v)} reads ${displayName(facts.table)} and is owned by ${v.owner}: rebuilding it after every ` +
            `switch needs its owner's rights; run pgshift as ${v.owner} or a superuser`,
        );
      } else if (v.others.length > 0) {
        out.blockers.push(
          `${label(v)} reads ${displayName(facts.table)}, and ${v.others.join(", ")} depend on it: rebuilding it ` +
            `after every switch would have to drop them; drop them first`,
        );
      } else {
        out.lines.push(
          `${label(v)}: rebuilt from the live table right after cutover and after swap-back, without blocking ` +
            `writes (built under a temporary name${v.indexes.length > 0 ? " with its indexes" : ""}, then swapped ` +
            `in by renames in a short transaction); its data is then as of that rebuild, as after a REFRESH` +
            (v.indexes.some((i) => i.definition.startsWith("CREATE UNIQUE "))
              ? ", and REFRESH ... CONCURRENTLY stays possible (its unique index is rebuilt)"
              : ""),
        );
      }
    }
    return out;
  },

  // A replacement left by an unfinished rebuild reads the live table too: it is claimed, and dropped by the
  // next switch (its materialized view then reads the table becoming live again).
  async claims(sql: AnySql, live: QualifiedName): Promise<string[]> {
    return (await matviewsOf(sql, live)).map((v) => `pg_rewrite/${v.rewrite}`);
  },

  async carry(sql: AnySql, m: Migration): Promise<Carried[]> {
    const out: Carried[] = [];
    for (const v of await matviewsOf(sql, m.live)) {
      if (isNext(v)) {
        const q = quoteQualified({ schema: v.schema, name: v.name });
        out.push({
          label: `materialized view ${displayName({ schema: v.schema, name: v.name })}`,
          inside: [statement(`DROP MATERIALIZED VIEW ${q}`, "transaction", "left by an unfinished rebuild")],
          after: [],
        });
      } else out.push({ label: label(v), inside: createNextSteps(v), after: finishSteps(v, 500) });
    }
    return out;
  },
};
