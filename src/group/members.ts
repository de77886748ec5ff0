/**
 * The tables of a migration group (pgshift start --group, docs/groups.md): the migrations recorded with its name
 * in pgshift.migrations, in the order the group acts on them, and the foreign keys between them.
 */
import { z } from "zod";
import type { AnySql } from "../db.js";
import { PgshiftError, PhaseError } from "../errors.js";
import { type Command, NEXT_STEP, namesInSql, TRANSITIONS } from "../migration/phases.js";
import { loadMigration, type Migration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";

/** A group's name: letters, digits, `_`, `-` and `.`, 1 to 63 characters (zod; the CLI's --group). */
export const GroupNameSchema = z
  .string()
  .regex(/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$/, "must be 1 to 63 letters, digits, _ . or - (not starting with . or -)");

/** A foreign key from one table of a group to another, named by its constraint and the two original tables. */
export interface GroupForeignKey {
  name: string;
  /** The referencing table (original name). */
  from: QualifiedName;
  /** The referenced table (original name). */
  to: QualifiedName;
}

const FkRow = z.object({ name: z.string(), fs: z.string(), fn: z.string(), ts: z.string(), tn: z.string() });

/**
 * The foreign keys between the tables `tables` (by their names now), not a table's to itself, by referencing table
 * and name. Reads pg_constraint only.
 */
export async function foreignKeysBetween(sql: AnySql, tables: readonly QualifiedName[]): Promise<GroupForeignKey[]> {
  const names = tables.map(quoteQualified);
  const rows = await sql`
    select c.conname::text as name, fn.nspname::text as fs, f.relname::text as fn,
           tn.nspname::text as ts, t.relname::text as tn
      from pg_catalog.pg_constraint c
      join pg_catalog.pg_class f on f.oid = c.conrelid join pg_catalog.pg_namespace fn on fn.oid = f.relnamespace
      join pg_catalog.pg_class t on t.oid = c.confrelid join pg_catalog.pg_namespace tn on tn.oid = t.relnamespace
     where c.contype = 'f' and c.conparentid = 0 and c.conrelid <> c.confrelid
       and c.conrelid = any(select to_regclass(x)::oid from unnest(${names}::text[]) x)
       and c.confrelid = any(select to_regclass(x)::oid from unnest(${names}::text[]) x)
     order by 2, 3, 1`;
  return z
    .array(FkRow)
    .parse(rows)
    .map((r) => ({ name: r.name, from: { schema: r.fs, name: r.fn }, to: { schema: r.ts, name: r.tn } }));
}

const same = (a: QualifiedName, b: QualifiedName) => a.schema === b.schema && a.name === b.name;

/**
 * `tables` in the order a group starts, backfills and cuts over in: a referenced table before the tables that
 * reference it (a topological order over `fks`), otherwise in the order given. Finalize and abort use the reverse.
 * @throws PgshiftError when the foreign keys form a cycle (pgshift cannot order such tables).
 */
export function referencedFirst<T>(
  tables: readonly T[],
  nameOf: (t: T) => QualifiedName,
  fks: readonly GroupForeignKey[],
): T[] {
  const out: T[] = [];
  const left = [...tables];
  while (left.length > 0) {
    const i = left.findIndex((t) =>
      fks.every((f) => !same(f.from, nameOf(t)) || out.some((o) => same(nameOf(o), f.to)) || same(f.to, f.from)),
    );
    if (i < 0)
      throw new PgshiftError(
        `the foreign keys between ${left.map((t) => displayName(nameOf(t))).join(", ")} form a cycle`,
        { hint: "a group's tables must reference each other without a cycle; drop one of the foreign keys first" },
      );
    out.push(left.splice(i, 1)[0]!);
  }
  return out;
}

const MemberRow = z.object({ schema: z.string(), name: z.string() });

/**
 * The migrations of group `group`, referenced tables first (referencedFirst), read as loadMigration reads them;
 * empty when there is none. `opts.upgrade` as for loadMigration.
 */
export async function loadGroup(sql: AnySql, group: string, opts: { upgrade?: boolean } = {}): Promise<Migration[]> {
  const exists = await sql`select to_regclass('pgshift.migrations') is not null as ok`;
  if (!exists[0]?.ok) return [];
  // Version 7 and older have no group_name: no group then.
  const col = await sql`
    select exists (select from pg_catalog.pg_attribute where attrelid = 'pgshift.migrations'::regclass
                      and attname = 'group_name' and not attisdropped) as ok`;
  if (!col[0]?.ok) return [];
  const rows = await sql`
    select source_schema as schema, source_table as name from pgshift.migrations where group_name = ${group}
     order by source_schema, source_table`;
  const out: Migration[] = [];
  for (const r of z.array(MemberRow).parse(rows)) {
    const m = await loadMigration(sql, r, opts);
    if (m) out.push(m);
  }
  return referencedFirst(
    out,
    (m) => m.live,
    await foreignKeysBetween(
      sql,
      out.map((m) => m.live),
    ),
  );
}

/**
 * The migrations of group `group` (loadGroup), each checked as requireMigration checks one: `command` must be
 * allowed in its phase.
 * @throws PgshiftError when the group has no migration; PhaseError naming the first table whose phase refuses it.
 */
export async function requireGroup(
  sql: AnySql,
  group: string,
  command: Command,
  opts: { upgrade?: boolean } = {},
): Promise<Migration[]> {
  const ms = await loadGroup(sql, group, opts);
  if (ms.length === 0)
    throw new PgshiftError(`no migration group ${group} is in progress`, {
      hint: `start one with: pgshift start <table> <table>... --group ${group} --partition-by <spec>`,
    });
  const t = TRANSITIONS[command];
  for (const m of ms) {
    if (!t.from.includes(m.phase))
      throw new PhaseError(
        `cannot ${t.verb} group ${group}: the migration of ${displayName(m.live)} is in phase ${m.phase}`,
        NEXT_STEP[m.phase],
      );
  }
  return ms;
}

const NameRow = z.object({ names: z.array(z.string()) });

/**
 * Every name the tables of `m`'s group carry (original, shadow and retired names, as `schema.name`), `m`'s own
 * included; empty when `m` belongs to no group. For the foreign-key carrier: a foreign key between two tables of a
 * group is not carried, it follows its table (docs/groups.md).
 */
export async function groupTableNames(sql: AnySql, m: Pick<Migration, "group_name">): Promise<Set<string>> {
  if (m.group_name === null) return new Set();
  const rows = await sql`
    select array[source_schema || '.' || source_table, source_schema || '.' || shadow_table,
                 source_schema || '.' || retired_table] as names
      from pgshift.migrations where group_name = ${m.group_name}`;
  return new Set(
    z
      .array(NameRow)
      .parse(rows)
      .flatMap((r) => r.names),
  );
}

const PairRow = z.object({ copy: z.string().nullable(), live: z.string().nullable() });

/**
 * For the tables of `m`'s group: each copy's name as regclass prints it (qualified only when the search_path does
 * not show it, as pg_get_constraintdef names a referenced table), mapped to its live table's. Empty without a group.
 * The late-object check compares the foreign keys of a table and of its copy through it: the copy's references
 * the other table's copy.
 */
export async function copyToLive(sql: AnySql, m: Pick<Migration, "group_name">): Promise<Map<string, string>> {
  if (m.group_name === null) return new Map();
  const n = namesInSql();
  const rows = await sql.unsafe(
    `SELECT to_regclass(format('%I.%I', source_schema, ${n.copy}))::text AS copy, ` +
      `to_regclass(format('%I.%I', source_schema, ${n.live}))::text AS live ` +
      `FROM pgshift.migrations WHERE group_name = $1`,
    [m.group_name],
  );
  const out = new Map<string, string>();
  for (const r of z.array(PairRow).parse(rows)) if (r.copy && r.live) out.set(r.copy, r.live);
  return out;
}
