import { z } from "zod";
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { displayName, quoteQualified, type QualifiedName } from "../names.js";
import type { Migration } from "../migration/state.js";

const ColumnRow = z.object({ name: z.string(), type: z.string(), generated: z.boolean() });
type ColumnRow = z.infer<typeof ColumnRow>;

async function columnsOf(sql: AnySql, t: QualifiedName): Promise<ColumnRow[]> {
  const rows = await sql`
    select a.attname::text as name, pg_catalog.format_type(a.atttypid, a.atttypmod) as type, a.attgenerated <> '' as generated
      from pg_catalog.pg_attribute a
      join pg_catalog.pg_class c on c.oid = a.attrelid
      join pg_catalog.pg_namespace n on n.oid = c.relnamespace
     where n.nspname = ${t.schema} and c.relname = ${t.name} and a.attnum > 0 and not a.attisdropped
     order by a.attnum`;
  return z.array(ColumnRow).parse(rows);
}

/**
 * Schema drift: how the columns of the table the application writes (`m.live`) and of the table the mirror
 * fills (`m.copy`) differ from each other and from the columns the mirror copies (`m.copy_columns`, fixed at
 * start). pgshift does not carry ALTER TABLE over: a column added to the live table during the migration is
 * not mirrored (and would vanish at cutover), a dropped one makes the trigger mirror fail.
 * @returns one line per difference (column name, type, which table); empty when the columns agree.
 *   A table that does not exist reads as one without columns, so each column of the other is reported.
 * @throws only what the server raises (e.g. a lost connection), never for a difference.
 */
export async function columnDrift(sql: AnySql, m: Migration): Promise<string[]> {
  const [live, copy] = await Promise.all([columnsOf(sql, m.live), columnsOf(sql, m.copy)]);
  const out: string[] = [];
  const liveName = displayName(m.live);
  const copyName = displayName(m.copy);
  const copyBy = new Map(copy.map((c) => [c.name, c]));
  const liveBy = new Map(live.map((c) => [c.name, c]));
  for (const c of live) {
    const o = copyBy.get(c.name);
    if (!o) out.push(`column ${c.name} (${c.type}) is in ${liveName} but not in ${copyName}`);
    else if (o.type !== c.type) out.push(`column ${c.name} is ${c.type} in ${liveName} but ${o.type} in ${copyName}`);
    else if (o.generated !== c.generated) out.push(`column ${c.name} is ${c.generated ? "" : "not "}generated in ${liveName} but ${o.generated ? "" : "not "}generated in ${copyName}`);
  }
  for (const c of copy) if (!liveBy.has(c.name)) out.push(`column ${c.name} (${c.type}) is in ${copyName} but not in ${liveName}`);
  const mirrored = new Set(m.copy_columns);
  for (const c of live) {
    if (!c.generated && !mirrored.has(c.name) && copyBy.has(c.name)) out.push(`column ${c.name} of ${liveName} is not mirrored (added after pgshift start)`);
  }
  for (const name of m.copy_columns) {
    if (!liveBy.has(name) && !copyBy.has(name)) out.push(`mirrored column ${name} is in neither ${liveName} nor ${copyName}`);
  }
  return out;
}

/**
 * Refuses (before any change) a step that needs both tables to have the columns the mirror copies.
 * @param what the step, for the message ("cut over", "swap back", "verify").
 * @throws PgshiftError listing every difference, with what to do.
 */
export async function requireNoDrift(sql: AnySql, m: Migration, what: string): Promise<void> {
  const drift = await columnDrift(sql, m);
  if (drift.length === 0) return;
  throw new PgshiftError(`cannot ${what}: the columns changed during the migration: ${drift.join("; ")}`, {
    hint: "pgshift does not carry ALTER TABLE over; undo the change, or run pgshift abort and start the migration again",
  });
}

const IndexRow = z.object({ name: z.string(), definition: z.string() });

/**
 * Indexes created on the original table after `start` (not in `m.index_renames`, the indexes the partitioned
 * table was given) that the partitioned table has no counterpart for, so they would be gone after cutover.
 * A counterpart is an index of the partitioned table with the same uniqueness and the same definition from
 * `USING` on (access method, columns or expressions, operator classes, INCLUDE, WHERE), as
 * pg_get_indexdef() prints it: what an operator creates there on being told. Only while the original table
 * is the live one (every phase but cutover). An index is not data, so this warns (status, cutover) and
 * refuses nothing.
 * @returns one line per index, with its definition; empty when there is none.
 */
export async function indexDrift(sql: AnySql, m: Migration): Promise<string[]> {
  if (m.phase === "cutover") return [];
  const rows = await sql`
    with ix as (
      select t.oid as relid, c.relname::text as name, i.indisunique as is_unique, pg_catalog.pg_get_indexdef(i.indexrelid) as definition
        from pg_catalog.pg_index i
        join pg_catalog.pg_class c on c.oid = i.indexrelid
        join pg_catalog.pg_class t on t.oid = i.indrelid
       where t.oid in (to_regclass(${quoteQualified(m.original)}), to_regclass(${quoteQualified(m.partitioned)}))
    )
    select o.name, o.definition from ix o
     where o.relid = to_regclass(${quoteQualified(m.original)})
       and not exists (select from ix p
                        where p.relid = to_regclass(${quoteQualified(m.partitioned)}) and p.is_unique = o.is_unique
                          and substring(p.definition from ' USING .*$') = substring(o.definition from ' USING .*$'))
     order by o.name`;
  const known = new Set(m.index_renames.map((r) => r.to));
  return z
    .array(IndexRow)
    .parse(rows)
    .filter((r) => !known.has(r.name))
    .map((r) => `index ${r.name} was created on ${displayName(m.original)} after pgshift start and ${displayName(m.partitioned)} has no counterpart: it is gone after cutover unless you create it there first (${r.definition})`);
}
