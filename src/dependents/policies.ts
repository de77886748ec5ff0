/**
 * Row-level security follows the live table (issue 15): its policies, ENABLE / FORCE ROW LEVEL SECURITY, and
 * the table's and columns' privileges. start gives the shadow ENABLE / FORCE and the privileges (not the
 * policies: nobody but pgshift reads the shadow); at every switch the table that becomes live is made equal to
 * the live table as it is then, so a policy created, changed or dropped, RLS enabled or disabled, or a GRANT or
 * REVOKE made during the migration follows too.
 * The mirror writes the copy as pgshift's role (SECURITY DEFINER: the owner, or a role bypassing row
 * security), so the copy's own policies and privileges never get in its way.
 */
import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { tablesIn } from "../migration/phases.js";
import type { Migration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { check, type Step, statement } from "../plan/steps.js";
import type { Carried, Carrier, CarrierPlan, SwitchTo } from "./carrier.js";
import { oidOf, withQualifiedNames } from "./carrier.js";

const PolicyRow = z.object({
  oid: z.coerce.number(),
  name: z.string(),
  permissive: z.boolean(),
  cmd: z.string(),
  roles: z.array(z.string()),
  qual: z.string().nullable(),
  with_check: z.string().nullable(),
  comment: z.string().nullable(),
});
type PolicyRow = z.infer<typeof PolicyRow>;

const COMMANDS: Record<string, string> = { r: "SELECT", a: "INSERT", w: "UPDATE", d: "DELETE", "*": "ALL" };

/** The policies of `t`, by name, expressions schema-qualified (withQualifiedNames); roles quoted (PUBLIC as such). */
async function policiesOf(sql: AnySql, t: QualifiedName): Promise<PolicyRow[]> {
  // A plain look first: a table without policies (most) costs no transaction of its own.
  const any = await sql`select exists (select from pg_catalog.pg_policy
                                        where polrelid = pg_catalog.to_regclass(${quoteQualified(t)})) as any`;
  if (!any[0]?.any) return [];
  return withQualifiedNames(sql, async (s) => {
    const rows = await s`
      select p.oid::int8 as oid, p.polname::text as name, p.polpermissive as permissive, p.polcmd::text as cmd,
             array(select case when r.r = 0 then 'PUBLIC' else pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(r.r))
                          end from pg_catalog.unnest(p.polroles) with ordinality r(r, i) order by r.i) as roles,
             pg_catalog.pg_get_expr(p.polqual, p.polrelid) as qual,
             pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) as with_check,
             pg_catalog.obj_description(p.oid, 'pg_policy') as comment
        from pg_catalog.pg_policy p
       where p.polrelid = pg_catalog.to_regclass(${quoteQualified(t)})
       order by p.polname`;
    return z.array(PolicyRow).parse(rows);
  });
}

/** CREATE POLICY of `p` on `on` (the qual and check as read, their names qualified). */
function createPolicySql(p: PolicyRow, on: QualifiedName): string {
  return (
    `CREATE POLICY ${quoteIdent(p.name)} ON ${quoteQualified(on)} AS ${p.permissive ? "PERMISSIVE" : "RESTRICTIVE"} ` +
    `FOR ${COMMANDS[p.cmd] ?? "ALL"} TO ${p.roles.join(", ")}` +
    (p.qual !== null ? ` USING (${p.qual})` : "") +
    (p.with_check !== null ? ` WITH CHECK (${p.with_check})` : "")
  );
}

const SecurityRow = z.object({
  rls: z.boolean(),
  force: z.boolean(),
  /** Whether the table has privileges of its own (relacl), not only its owner's defaults. */
  custom: z.boolean(),
  /** Table privileges, each `{"g": grantee (quoted, or PUBLIC), "p": privilege, "o": grantable}` as JSON. */
  acl: z.array(z.string()),
  /** Column privileges, each as `acl` with `"c"`: the column's name. */
  columns: z.array(z.string()),
});
type SecurityRow = z.infer<typeof SecurityRow>;

const Privilege = z.object({ c: z.string().optional(), g: z.string(), p: z.string(), o: z.boolean() });
type Privilege = z.infer<typeof Privilege>;

/** ENABLE / FORCE ROW LEVEL SECURITY and the privileges of `t` (owner's defaults made explicit: acldefault). */
async function securityOf(sql: AnySql, t: QualifiedName): Promise<SecurityRow> {
  const grantee = sql.unsafe(
    "case when x.grantee = 0 then 'PUBLIC' else pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(x.grantee)) end",
  );
  const rows = await sql`
    select c.relrowsecurity as rls, c.relforcerowsecurity as force, c.relacl is not null as custom,
           array(select pg_catalog.json_build_object('g', ${grantee}, 'p', x.privilege_type, 'o', x.is_grantable)::text
                   from pg_catalog.aclexplode(coalesce(c.relacl, pg_catalog.acldefault('r', c.relowner))) x
                  order by 1) as acl,
           array(select pg_catalog.json_build_object('c', a.attname, 'g', ${grantee}, 'p', x.privilege_type,
                          'o', x.is_grantable)::text
                   from pg_catalog.pg_attribute a, pg_catalog.aclexplode(a.attacl) x
                  where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped and a.attacl is not null
                  order by 1) as columns
      from pg_catalog.pg_class c where c.oid = pg_catalog.to_regclass(${quoteQualified(t)})`;
  if (rows.length === 0) throw new PgshiftError(`${displayName(t)} does not exist`);
  return SecurityRow.parse(rows[0]);
}

/**
 * GRANT and REVOKE statements that give `on` (whose privileges are `have`) the privileges `want`, entries as
 * securityOf gives them (the grantor is not compared: pgshift's statements record the owner as grantor).
 */
function privilegeSql(on: QualifiedName, want: readonly string[], have: readonly string[]): string[] {
  const parse = (e: string) => Privilege.parse(JSON.parse(e));
  const key = (x: Privilege) => JSON.stringify([x.c ?? null, x.g, x.p]);
  const wantBy = new Map(want.map(parse).map((x) => [key(x), x]));
  const haveBy = new Map(have.map(parse).map((x) => [key(x), x]));
  const target = (x: Privilege) => `${x.p}${x.c !== undefined ? ` (${quoteIdent(x.c)})` : ""} ON ${quoteQualified(on)}`;
  const out: string[] = [];
  for (const [k, h] of haveBy) {
    const w = wantBy.get(k);
    if (!w) out.push(`REVOKE ${target(h)} FROM ${h.g}`);
    else if (h.o && !w.o) out.push(`REVOKE GRANT OPTION FOR ${target(h)} FROM ${h.g}`);
  }
  for (const [k, w] of wantBy) {
    const h = haveBy.get(k);
    if (!h || (w.o && !h.o)) out.push(`GRANT ${target(w)} TO ${w.g}${w.o ? " WITH GRANT OPTION" : ""}`);
  }
  return out;
}

/**
 * What identifies the row security of `tables` (oids, read now): each policy's oid, row version (xmin: ALTER
 * POLICY changes it) and comment; each table's ENABLE / FORCE and privileges. Table renames change none of
 * them, so the switch compares it, after its renames, with what was read.
 */
async function securityStamp(sql: AnySql, tables: readonly number[]): Promise<string> {
  const r = await sql`
    select coalesce((select pg_catalog.string_agg(p.oid::text || ':' || p.xmin::text || ':' ||
                       coalesce(pg_catalog.obj_description(p.oid, 'pg_policy'), '-'), ',' order by p.oid)
                       from pg_catalog.pg_policy p where p.polrelid = any(${tables.map(String)}::oid[])), '') || '|' ||
           (select pg_catalog.string_agg(c.oid::text || ':' || c.relrowsecurity::text || ':' ||
                     c.relforcerowsecurity::text || ':' || coalesce(c.relacl::text, '-') || ':' ||
                     coalesce((select pg_catalog.string_agg(a.attnum::text || '=' || a.attacl::text, ',' order by
                       a.attnum) from pg_catalog.pg_attribute a where a.attrelid = c.oid and a.attacl is not null),
                       '-'), ',' order by c.oid)
              from pg_catalog.pg_class c where c.oid = any(${tables.map(String)}::oid[])) as stamp`;
  return String(r[0]?.stamp ?? "");
}

/** The carrier of row-level security (see the module's comment and docs/dependents.md). */
export const policiesCarrier: Carrier = {
  kind: "row-level security policies",

  async plan(sql: AnySql, facts: TableFacts): Promise<CarrierPlan> {
    const out: CarrierPlan = { lines: [], blockers: [] };
    const table = displayName(facts.table);
    const carried =
      "at every switch (cutover, swap-back) the table becoming live gets the live table's policies as they are " +
      "then (its own dropped, the live table's created), so one created, changed or dropped meanwhile follows " +
      "too; the retired table keeps its own until finalize drops it; the mirror's writes (as pgshift's role) are " +
      "not subject to them";
    for (const p of await policiesOf(sql, facts.table)) {
      out.lines.push(
        `policy ${p.name} on ${table} (${p.permissive ? "PERMISSIVE" : "RESTRICTIVE"} FOR ` +
          `${COMMANDS[p.cmd] ?? "ALL"} TO ${p.roles.join(", ")}): ${carried}`,
      );
    }
    if (facts.rowSecurity || facts.forceRowSecurity)
      out.lines.push(
        `row-level security ${facts.forceRowSecurity ? "enabled and forced" : "enabled"} on ${table}: ` +
          "start sets the same on the shadow and its partitions; every switch sets the table becoming live as the " +
          "live table is then",
      );
    if (facts.grants.length + facts.columnGrants.length > 0)
      out.lines.push(
        `privileges on ${table} (${facts.grants.length} table and ${facts.columnGrants.length} column grants): ` +
          "start grants the same on the shadow; a GRANT or REVOKE made during the migration is carried at the next " +
          "switch",
      );
    // A policy of another table whose expression reads this one keeps pointing at it by oid.
    const others = await sql`
      select pg_catalog.format('policy %I on %s', p.polname, p.polrelid::regclass) as label
        from pg_catalog.pg_depend d join pg_catalog.pg_policy p on p.oid = d.objid
       where d.classid = 'pg_catalog.pg_policy'::regclass and d.refclassid = 'pg_catalog.pg_class'::regclass
         and d.refobjid = ${facts.oid} and p.polrelid <> ${facts.oid}
       group by 1 order by 1`;
    for (const o of others)
      out.blockers.push(
        `${String(o.label)} reads ${table}: after cutover it would still read the retired table, and pgshift ` +
          "carries only the table's own policies (drop it, and create it again after cutover)",
      );
    return out;
  },

  async claims(sql: AnySql, live: QualifiedName): Promise<string[]> {
    return (await policiesOf(sql, live)).map((p) => `pg_policy/${p.oid}`);
  },

  async carry(sql: AnySql, m: Migration, to: SwitchTo): Promise<Carried[]> {
    // After the renames `live` (the original name) is the table that was m.copy.
    const live = tablesIn(m, to).live;
    const [oldOid, newOid] = await Promise.all([oidOf(sql, m.live), oidOf(sql, m.copy)]);
    const [theirs, mine, want, have] = await Promise.all([
      policiesOf(sql, m.live),
      policiesOf(sql, m.copy),
      securityOf(sql, m.live),
      securityOf(sql, m.copy),
    ]);
    const stamp = await securityStamp(sql, [oldOid, newOid]);
    const inside: Step[] = [
      check(
        `refuse if the policies, row security or privileges of ${displayName(m.live)} or ${displayName(m.copy)} ` +
          "changed since this plan read them",
        async (tx) => {
          if ((await securityStamp(tx, [oldOid, newOid])) !== stamp)
            throw new PgshiftError(
              `cannot switch: the policies, row security or privileges of ${displayName(m.live)} or ` +
                `${displayName(m.copy)} changed while the switch prepared; nothing was changed`,
              { hint: "run the command again" },
            );
        },
      ),
    ];
    const t = quoteQualified(live);
    for (const p of mine) inside.push(statement(`DROP POLICY ${quoteIdent(p.name)} ON ${t}`));
    for (const p of theirs) {
      // The expressions name tables by schema and name: the live table's own name is the new live table by now.
      inside.push(statement(createPolicySql(p, live)));
      if (p.comment !== null)
        inside.push(statement(`COMMENT ON POLICY ${quoteIdent(p.name)} ON ${t} IS ${quoteLiteral(p.comment)}`));
    }
    if (want.rls !== have.rls)
      inside.push(statement(`ALTER TABLE ${t} ${want.rls ? "ENABLE" : "DISABLE"} ROW LEVEL SECURITY`));
    if (want.force !== have.force)
      inside.push(statement(`ALTER TABLE ${t} ${want.force ? "FORCE" : "NO FORCE"} ROW LEVEL SECURITY`));
    inside.push(...privilegeSql(live, want.acl, have.acl).map((s) => statement(s)));
    inside.push(...privilegeSql(live, want.columns, have.columns).map((s) => statement(s)));
    // Nothing to check nor change: a table without row security, policies or privileges of its own.
    const plain = [want, have].every((x) => !x.rls && !x.force && !x.custom && x.columns.length === 0);
    if (inside.length === 1 && plain) return [];
    return [{ label: `row-level security and privileges of ${displayName(live)}`, inside, after: [] }];
  },
};
