/**
 * User triggers follow the live table (issue 15). At every switch the table that becomes live gets the live
 * table's user triggers as they are then (definition, comment, enabled state), and the table that leaves gets
 * its own disabled, so that the mirror's writes into the copy fire none of them: an application write fires
 * each trigger once, on whichever table is live. Before the first cutover the shadow has no user trigger at
 * all, so neither the trigger mirror nor the logical applier fires any.
 */
import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { tablesIn } from "../migration/phases.js";
import type { Migration } from "../migration/state.js";
import { displayName, fitName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { check, type Step, statement } from "../plan/steps.js";
import { type Carried, type Carrier, type CarrierPlan, oidOf, type SwitchTo, withQualifiedNames } from "./carrier.js";

const TriggerRow = z.object({
  oid: z.coerce.number(),
  name: z.string(),
  def: z.string(),
  enabled: z.enum(["O", "D", "R", "A"]),
  comment: z.string().nullable(),
  row: z.boolean(),
  before: z.boolean(),
  transition: z.boolean(),
  constraint: z.coerce.number(),
  timing: z.string(),
  events: z.string(),
});
type TriggerRow = z.infer<typeof TriggerRow>;

/**
 * The user triggers of `t` (not internal ones: foreign keys' and partitions' clones; not pgshift's, whose
 * function is in schema pgshift), by name, their definitions schema-qualified (withQualifiedNames).
 */
async function userTriggers(sql: AnySql, t: QualifiedName): Promise<TriggerRow[]> {
  // A plain look first: a table without user triggers (most) costs no transaction of its own.
  const any = await sql`
    select exists (select from pg_catalog.pg_trigger g join pg_catalog.pg_proc p on p.oid = g.tgfoid
                     join pg_catalog.pg_namespace n on n.oid = p.pronamespace
                    where g.tgrelid = pg_catalog.to_regclass(${quoteQualified(t)}) and not g.tgisinternal
                      and n.nspname <> 'pgshift') as any`;
  if (!any[0]?.any) return [];
  return withQualifiedNames(sql, async (s) => {
    const rows = await s`
      select g.oid::int8 as oid, g.tgname::text as name, pg_catalog.pg_get_triggerdef(g.oid) as def,
             g.tgenabled::text as enabled, pg_catalog.obj_description(g.oid, 'pg_trigger') as comment,
             (g.tgtype & 1) <> 0 as row, (g.tgtype & 2) <> 0 as before,
             g.tgoldtable is not null or g.tgnewtable is not null as transition, g.tgconstraint::int8 as constraint,
             case when (g.tgtype & 2) <> 0 then 'BEFORE' when (g.tgtype & 64) <> 0 then 'INSTEAD OF' else 'AFTER'
               end as timing,
             pg_catalog.concat_ws(' OR ', case when (g.tgtype & 4) <> 0 then 'INSERT' end,
               case when (g.tgtype & 16) <> 0 then 'UPDATE' end, case when (g.tgtype & 8) <> 0 then 'DELETE' end,
               case when (g.tgtype & 32) <> 0 then 'TRUNCATE' end) as events
        from pg_catalog.pg_trigger g
        join pg_catalog.pg_proc p on p.oid = g.tgfoid
        join pg_catalog.pg_namespace n on n.oid = p.pronamespace
       where g.tgrelid = pg_catalog.to_regclass(${quoteQualified(t)}) and not g.tgisinternal
         and n.nspname <> 'pgshift'
       order by g.tgname`;
    return z.array(TriggerRow).parse(rows);
  });
}

/**
 * What identifies the state of the user triggers of `tables` (oids from to_regclass, read now): each
 * trigger's oid, row version (xmin: CREATE OR REPLACE, ALTER TRIGGER, ENABLE/DISABLE change it) and comment.
 * Table renames change none of them, so the switch compares it, after its renames, with what was read.
 */
async function triggerStamp(sql: AnySql, tables: readonly number[]): Promise<string> {
  const r = await sql`
    select coalesce(pg_catalog.string_agg(g.oid::text || ':' || g.xmin::text || ':' ||
             coalesce(pg_catalog.obj_description(g.oid, 'pg_trigger'), '-'), ',' order by g.oid), '') as stamp
      from pg_catalog.pg_trigger g
      join pg_catalog.pg_proc p on p.oid = g.tgfoid
      join pg_catalog.pg_namespace n on n.oid = p.pronamespace
     where g.tgrelid = any(${tables.map(String)}::oid[]) and not g.tgisinternal and n.nspname <> 'pgshift'`;
  return String(r[0]?.stamp ?? "");
}

/** The ALTER TABLE that gives a trigger created on `t` (enabled, 'O') the state `enabled`, or none. */
function enabledSql(t: QualifiedName, name: string, enabled: TriggerRow["enabled"]): string[] {
  const how = { O: null, D: "DISABLE", R: "ENABLE REPLICA", A: "ENABLE ALWAYS" }[enabled];
  return how === null ? [] : [`ALTER TABLE ${quoteQualified(t)} ${how} TRIGGER ${quoteIdent(name)}`];
}

/** What PostgreSQL refuses on a partitioned table: a row-level trigger with transition tables (REFERENCING). */
function refusedOnPartitioned(g: TriggerRow): string | null {
  return g.row && g.transition
    ? `trigger ${g.name} is FOR EACH ROW with transition tables (REFERENCING), which PostgreSQL refuses on a ` +
        "partitioned table (docs: CREATE TRIGGER); make it FOR EACH STATEMENT, or drop it"
    : null;
}

/** `AFTER INSERT OR UPDATE, FOR EACH ROW, disabled`: what a trigger is, for plan lines. */
function kindOf(g: TriggerRow): string {
  const state = { O: "", D: ", disabled", R: ", ENABLE REPLICA", A: ", ENABLE ALWAYS" }[g.enabled];
  return (
    `${g.constraint !== 0 ? "constraint trigger, " : ""}${g.timing} ${g.events}, ` +
    `FOR EACH ${g.row ? "ROW" : "STATEMENT"}${state}`
  );
}

/** The carrier of user triggers (see the module's comment and docs/dependents.md, "Triggers"). */
export const triggersCarrier: Carrier = {
  kind: "user triggers",

  async plan(sql: AnySql, facts: TableFacts): Promise<CarrierPlan> {
    const out: CarrierPlan = { lines: [], blockers: [] };
    const triggers = await userTriggers(sql, facts.table);
    const retired = displayName({ schema: facts.table.schema, name: fitName(facts.table.name, "_pgshift_retired") });
    const table = displayName(facts.table);
    for (const g of triggers) {
      const refused = refusedOnPartitioned(g);
      if (refused) {
        out.blockers.push(`${refused} (on ${table})`);
        continue;
      }
      let line =
        `trigger ${g.name} on ${table} (${kindOf(g)}): the shadow has none, so the mirror fires no user trigger; ` +
        `cutover creates it on the partitioned table as it is then (definition, comment, enabled state) and ` +
        `disables it on ${retired}, whose writes are the mirror's; swap-back the other way round; ` +
        `finalize drops the retired table's disabled copy`;
      if (g.row) {
        line +=
          "; on the partitioned table it fires on the partition (TG_TABLE_NAME names it), and an UPDATE that moves " +
          "a row to another partition fires the DELETE and INSERT row triggers, not the UPDATE ones " +
          "(docs: Overview of Trigger Behavior)";
      }
      if (g.row && g.before && /INSERT|UPDATE/.test(g.events)) {
        line += "; it must not change the partition column (PostgreSQL refuses to move a row in a BEFORE trigger)";
      }
      out.lines.push(line);
    }
    return out;
  },

  async claims(sql: AnySql, live: QualifiedName): Promise<string[]> {
    const r = await sql`select relkind::text as k from pg_catalog.pg_class
                         where oid = pg_catalog.to_regclass(${quoteQualified(live)})`;
    const toPartitioned = r[0]?.k !== "p";
    const out: string[] = [];
    for (const g of await userTriggers(sql, live)) {
      // One PostgreSQL would refuse on the partitioned table is left to the late-object check (with its statements).
      if (toPartitioned && refusedOnPartitioned(g)) continue;
      out.push(`pg_trigger/${g.oid}`);
      if (g.constraint !== 0) out.push(`pg_constraint/${g.constraint}`);
    }
    return out;
  },

  async carry(sql: AnySql, m: Migration, to: SwitchTo): Promise<Carried[]> {
    // Before the renames: m.live (the original name) and m.copy. After them: `live` (the same name, now the
    // table that was m.copy) and `left` (the table that was live, under the copy's name).
    const next = tablesIn(m, to);
    const live = next.live;
    const left = next.copy;
    const [oldOid, newOid] = await Promise.all([oidOf(sql, m.live), oidOf(sql, m.copy)]);
    const [theirs, stale] = await Promise.all([userTriggers(sql, m.live), userTriggers(sql, m.copy)]);
    if (theirs.length === 0 && stale.length === 0) return [];
    if (to === "cutover") {
      const refused = theirs.map(refusedOnPartitioned).filter((x): x is string => x !== null);
      if (refused.length > 0)
        throw new PgshiftError(`cannot cut over: ${refused.join("; ")}; nothing was changed`, {
          hint: `change the trigger on ${displayName(m.live)}, then run the cutover again`,
        });
    }
    const stamp = await triggerStamp(sql, [oldOid, newOid]);
    const out: Carried[] = [];
    const guard: Step = check(
      `refuse if a user trigger of ${displayName(m.live)} or ${displayName(m.copy)} changed since this plan read them`,
      async (tx) => {
        if ((await triggerStamp(tx, [oldOid, newOid])) !== stamp)
          throw new PgshiftError(
            `cannot switch: the triggers of ${displayName(m.live)} or ${displayName(m.copy)} changed while the ` +
              "switch prepared; nothing was changed",
            { hint: "run the command again" },
          );
      },
    );
    const names = new Set(theirs.map((g) => g.name));
    for (const [i, g] of theirs.entries()) {
      const inside: Step[] = i === 0 ? [guard] : [];
      // A disabled one left there by an earlier switch goes first.
      if (stale.some((x) => x.name === g.name))
        inside.push(statement(`DROP TRIGGER IF EXISTS ${quoteIdent(g.name)} ON ${quoteQualified(live)}`));
      // The definition names the table by the original name: the table becoming live, after the renames.
      inside.push(statement(g.def));
      if (g.comment !== null)
        inside.push(
          statement(
            `COMMENT ON TRIGGER ${quoteIdent(g.name)} ON ${quoteQualified(live)} IS ${quoteLiteral(g.comment)}`,
          ),
        );
      inside.push(...enabledSql(live, g.name, g.enabled).map((s) => statement(s)));
      if (g.enabled !== "D")
        inside.push(
          statement(
            `ALTER TABLE ${quoteQualified(left)} DISABLE TRIGGER ${quoteIdent(g.name)}`,
            "transaction",
            "the mirror writes into this table from now on: an application write fires the trigger once, on the live " +
              "table",
          ),
        );
      out.push({ label: `trigger ${g.name} on ${displayName(live)}`, inside, after: [] });
    }
    for (const g of stale.filter((x) => !names.has(x.name))) {
      out.push({
        label: `trigger ${g.name} (no longer on ${displayName(m.live)})`,
        inside: [
          ...(out.length === 0 ? [guard] : []),
          statement(
            `DROP TRIGGER ${quoteIdent(g.name)} ON ${quoteQualified(live)}`,
            "transaction",
            `dropped from ${displayName(m.live)} while it was live`,
          ),
        ],
        after: [],
      });
    }
    return out;
  },
};
