import type { AnySql } from "../../src/db.js";

export type CatalogSnapshot = Awaited<ReturnType<typeof catalogSnapshot>>;

/** Schemas that are PostgreSQL's own, not the database's content. */
const SYSTEM_SCHEMAS =
  `n.nspname not in ('pg_catalog', 'information_schema') and n.nspname not like 'pg\\_toast%' ` +
  `and n.nspname not like 'pg\\_temp\\_%'`;

/**
 * Everything a pgshift command could create, drop, rename or alter, by kind, each entry one JSON text,
 * sorted: schemas, relations (kind, persistence, owner, grants, partitioning, columns), index and view
 * definitions, sequences and their positions, functions (with a hash of their body), triggers,
 * constraints, rules, policies, publications, the contents of every ordinary table (row count and a
 * hash of the sorted rows: the test tables are small) and the rows of pgshift.migrations if it exists.
 * Two snapshots compare equal (`toEqual`) exactly when nothing of that changed.
 * Statistics (reltuples, pg_stat_*) are left out: autovacuum changes them.
 */
export async function catalogSnapshot(sql: AnySql) {
  const q = async (query: string): Promise<string[]> => {
    const rows = await sql.unsafe(query);
    return rows.map((r) => JSON.stringify(r)).sort();
  };
  const catalog = {
    schemas: await q(`select n.nspname from pg_namespace n where ${SYSTEM_SCHEMAS}`),
    relations: await q(`
      select n.nspname, c.relname, c.relkind::text, c.relpersistence::text, pg_get_userbyid(c.relowner) as owner,
             c.relacl::text as acl, c.relrowsecurity, c.relispartition,
             pg_get_partkeydef(c.oid) as partkey, pg_get_expr(c.relpartbound, c.oid) as bound,
             (select string_agg(format('%s %s%s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                                       case when a.attnotnull then ' not null' else '' end,
                                       coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), ''),
                                       case when a.attidentity::text <> '' then ' identity ' ||
                                         a.attidentity::text else '' end),
                                ', ' order by a.attnum)
                from pg_attribute a left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum
               where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped) as columns
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
       where ${SYSTEM_SCHEMAS}`),
    indexes: await q(`
      select n.nspname, c.relname, pg_get_indexdef(c.oid) as def
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
       where c.relkind in ('i', 'I') and ${SYSTEM_SCHEMAS}`),
    views: await q(`
      select n.nspname, c.relname, pg_get_viewdef(c.oid) as def
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
       where c.relkind in ('v', 'm') and ${SYSTEM_SCHEMAS}`),
    sequences: await q(`
      select schemaname, sequencename, last_value::text, increment_by::text
        from pg_sequences where schemaname not in ('pg_catalog', 'information_schema')`),
    functions: await q(`
      select n.nspname, p.proname, pg_get_function_identity_arguments(p.oid) as args, md5(p.prosrc) as body
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
       where ${SYSTEM_SCHEMAS}`),
    triggers: await q(`
      select t.tgname, t.tgrelid::regclass::text as rel, t.tgenabled::text, t.tgisinternal,
        pg_get_triggerdef(t.oid) as def
        from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
       where ${SYSTEM_SCHEMAS}`),
    constraints: await q(`
      select co.conname, co.conrelid::regclass::text as rel, co.contype::text, pg_get_constraintdef(co.oid) as def
        from pg_constraint co join pg_namespace n on n.oid = co.connamespace
       where ${SYSTEM_SCHEMAS}`),
    rules: await q(`
      select r.rulename, r.ev_class::regclass::text as rel, pg_get_ruledef(r.oid) as def
        from pg_rewrite r join pg_class c on c.oid = r.ev_class join pg_namespace n on n.oid = c.relnamespace
       where r.rulename <> '_RETURN' and ${SYSTEM_SCHEMAS}`),
    policies: await q(`select polname, polrelid::regclass::text as rel, polcmd::text from pg_policy`),
    publications: await q(`
      select p.pubname, p.puballtables, coalesce((select string_agg(pr.prrelid::regclass::text, ', ' order by
        pr.prrelid::regclass::text)
                                               from pg_publication_rel pr where pr.prpubid = p.oid), '') as tables
        from pg_publication p`),
  };

  const tables = await sql.unsafe(`
    select format('%I.%I', n.nspname, c.relname) as q
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.relkind = 'r' and ${SYSTEM_SCHEMAS}`);
  const contents: string[] = [];
  for (const t of tables) {
    const r = await sql.unsafe(
      `select count(*)::int as n, md5(coalesce(string_agg(x::text, E'\\n' order by x::text), '')) as h
        from ${String(t.q)} x`,
    );
    contents.push(JSON.stringify({ table: t.q, rows: r[0]?.n, hash: r[0]?.h }));
  }

  const hasMigrations = await sql`select to_regclass('pgshift.migrations') is not null as ok`;
  const migrations = hasMigrations[0]?.ok ? await q(`select * from pgshift.migrations`) : ["<no pgshift.migrations>"];
  return { ...catalog, contents: contents.sort(), migrations };
}
