import { z } from "zod";
import type { AnySql } from "../db.js";
import { type DeferredIndex, extendIndexKey } from "../ddl/shadow.js";
import { incomingForeignKeys, serverVersion, whyNot } from "../dependents/foreign-keys.js";
import { claimedObjects } from "../dependents/index.js";
import { PgshiftError } from "../errors.js";
import { copyToLive } from "../group/members.js";
import type { Migration } from "../migration/state.js";
import { displayName, fitName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";

const ColumnRow = z.object({ name: z.string(), type: z.string(), generated: z.boolean() });
type ColumnRow = z.infer<typeof ColumnRow>;

async function columnsOf(sql: AnySql, t: QualifiedName): Promise<ColumnRow[]> {
  const rows = await sql`
    select a.attname::text as name, pg_catalog.format_type(a.atttypid, a.atttypmod) as type,
      a.attgenerated <> '' as generated
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
    else if (o.generated !== c.generated)
      out.push(
        `column ${c.name} is ${c.generated ? "" : "not "}generated in ${liveName} ` +
          `but ${o.generated ? "" : "not "}generated in ${copyName}`,
      );
  }
  for (const c of copy)
    if (!liveBy.has(c.name)) out.push(`column ${c.name} (${c.type}) is in ${copyName} but not in ${liveName}`);
  const mirrored = new Set(m.copy_columns);
  for (const c of live) {
    if (!c.generated && !mirrored.has(c.name) && copyBy.has(c.name))
      out.push(`column ${c.name} of ${liveName} is not mirrored (added after pgshift start)`);
  }
  for (const name of m.copy_columns) {
    if (!liveBy.has(name) && !copyBy.has(name))
      out.push(`mirrored column ${name} is in neither ${liveName} nor ${copyName}`);
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
    hint:
      "pgshift does not carry ALTER TABLE over; undo the change, or run pgshift abort and start " +
      "the migration again",
  });
}

// ---------------------------------------------------------------------------------------------------------
// Objects created during the migration (issue 13, item 5).

/** Names pgshift may give the copy's counterpart of an index of the live table (the first free one is used). */
function buildNameCandidates(original: string, suffix: "_part" | "_orig"): string[] {
  return ["", "2", "3", "4", "5"].map((n) => fitName(original, `${suffix}${n}`));
}

const IndexInfoRow = z.object({
  name: z.string(),
  unique: z.boolean(),
  valid: z.boolean(),
  def: z.string(),
  qname: z.string(),
  qtable: z.string(),
  keycols: z.array(z.string().nullable()).nullable(),
  conname: z.string().nullable(),
  contype: z.string().nullable(),
});

/** An index of one table: name, uniqueness, validity, its definition after USING, the constraint it backs. */
interface IndexInfo {
  name: string;
  unique: boolean;
  valid: boolean;
  /** pg_get_indexdef() after `ON [ONLY] <table> USING `: `btree (a, b) INCLUDE (c) WHERE ...`. */
  tail: string;
  /** The whole pg_get_indexdef() text. */
  definition: string;
  keyColumns: (string | null)[];
  constraint: { name: string; type: string } | null;
}

async function indexesOf(sql: AnySql, t: QualifiedName): Promise<IndexInfo[]> {
  const rows = await sql`
    select ic.relname::text as name, i.indisunique as unique, i.indisvalid and i.indisready as valid,
           pg_catalog.pg_get_indexdef(i.indexrelid) as def, pg_catalog.quote_ident(ic.relname) as qname,
           pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) as qtable,
           (select array_agg(case when k.attnum = 0 then null else a.attname::text end order by k.ord)
              from unnest(i.indkey) with ordinality k(attnum, ord)
              left join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
             where k.ord <= i.indnkeyatts) as keycols,
           con.conname::text as conname, con.contype::text as contype
      from pg_catalog.pg_index i
      join pg_catalog.pg_class ic on ic.oid = i.indexrelid
      join pg_catalog.pg_class c on c.oid = i.indrelid
      join pg_catalog.pg_namespace n on n.oid = c.relnamespace
      left join pg_catalog.pg_constraint con on con.conindid = i.indexrelid and con.conrelid = i.indrelid
     where i.indrelid = to_regclass(${quoteQualified(t)})
     order by ic.relname`;
  return z
    .array(IndexInfoRow)
    .parse(rows)
    .map((r) => {
      const u = r.unique ? "UNIQUE " : "";
      const prefixes = [
        `CREATE ${u}INDEX ${r.qname} ON ${r.qtable} USING `,
        `CREATE ${u}INDEX ${r.qname} ON ONLY ${r.qtable} USING `,
      ];
      const p = prefixes.find((x) => r.def.startsWith(x));
      return {
        name: r.name,
        unique: r.unique,
        valid: r.valid,
        tail: p ? r.def.slice(p.length) : r.def,
        definition: r.def,
        keyColumns: r.keycols ?? [],
        constraint: r.conname && r.contype ? { name: r.conname, type: r.contype } : null,
      };
    });
}

/**
 * Whether index `a` of one table and index `b` of the other are the same index for the application:
 * same uniqueness and the same definition after USING, or (unique on the table that is not partitioned)
 * the definition widened with the partition column, as start widens it (extendIndexKey).
 */
function sameIndex(plain: IndexInfo, partitioned: IndexInfo, partitionColumn: string): boolean {
  if (plain.unique !== partitioned.unique) return false;
  if (plain.tail === partitioned.tail) return true;
  if (!plain.unique || plain.keyColumns.includes(partitionColumn)) return false;
  try {
    // extendIndexKey quotes the column; pg_get_indexdef quotes it only where needed.
    const widened = extendIndexKey(plain.tail, [partitionColumn]);
    return (
      widened === partitioned.tail ||
      widened.replace(`, ${quoteIdent(partitionColumn)})`, `, ${partitionColumn})`) === partitioned.tail
    );
  } catch {
    return false;
  }
}

/**
 * An index of the live table created after start that the copy lacks: cutover (or swap-back) builds it on the copy
 * before its lock.
 */
export interface LateIndex {
  /** The index on the live table. */
  name: string;
  unique: boolean;
  /** Its pg_get_indexdef() text. */
  definition: string;
  /**
   * What is built on the copy: its name and the definition after USING (widened with the partition column when
   * `widened`).
   */
  build: DeferredIndex;
  /** Unique, and the partition column had to be added to its key (the copy is partitioned). */
  widened: boolean;
  /** The copy is partitioned: ON ONLY the parent, then CREATE INDEX CONCURRENTLY and ATTACH per partition. */
  partitioned: boolean;
}

/** Something else that depends on the live table and would stay with the other table after the switch. */
export interface LateDependent {
  /** What it is, for messages: `view public.v`, `trigger audit on public.orders`, ... */
  label: string;
  /** Statements to run before the switch (drop it, or create it on the copy too), one line each. */
  before: string[];
  /** Statements to run after the switch, to create it again on the table that is then live. */
  after: string[];
  /** When no statement can be given: what to do instead. */
  advice?: string;
}

/** What `lateObjects` found. */
export interface LateObjects {
  /** The table the application writes now, and the table that takes its name at the next switch. */
  live: QualifiedName;
  copy: QualifiedName;
  /**
   * The name the live table gets at the next switch, with whatever is left on it: the retired table's (cutover) or the
   * shadow's (swap-back).
   */
  leftWith: QualifiedName;
  /** "cutover" before the first cutover and after a swap-back; "swap-back" in phase cutover. */
  step: "cutover" | "swap-back";
  indexes: LateIndex[];
  dependents: LateDependent[];
  /**
   * Counterparts built by an earlier cutover that stopped before recording them (pgshift's names for them):
   * `{ from: copy's index, to: live's index }`, for `index_renames` (finalize gives `from` the name `to`).
   */
  renames: { from: string; to: string }[];
}

const DepRow = z.object({
  catalog: z.string(),
  objid: z.coerce.number(),
  objsubid: z.coerce.number(),
  description: z.string().nullable(),
});

const PolicyRow = z.object({
  name: z.string(),
  permissive: z.string(),
  roles: z.array(z.string()),
  cmd: z.string(),
  qual: z.string().nullable(),
  with_check: z.string().nullable(),
});

const ConstraintRow = z.object({ name: z.string(), type: z.string(), def: z.string(), ref: z.string().nullable() });

const StatRow = z.object({ name: z.string(), schema: z.string(), kinds: z.array(z.string()), columns: z.string() });

/**
 * A statement as one line: runs of whitespace outside quoted text ('...', "...", $tag$...$tag$) become one
 * space, so that an error's hint stays on one line and still runs as printed.
 */
export function oneLine(stmt: string): string {
  let out = "";
  let i = 0;
  while (i < stmt.length) {
    const ch = stmt[i]!;
    if (ch === "'" || ch === '"') {
      let j = i + 1;
      while (j < stmt.length && !(stmt[j] === ch && stmt[j + 1] !== ch)) j += stmt[j] === ch ? 2 : 1;
      out += stmt.slice(i, j + 1);
      i = j + 1;
      continue;
    }
    if (ch === "$") {
      const tag = /^\$[A-Za-z_0-9]*\$/.exec(stmt.slice(i));
      if (tag) {
        const end = stmt.indexOf(tag[0], i + tag[0].length);
        const stop = end < 0 ? stmt.length : end + tag[0].length;
        out += stmt.slice(i, stop);
        i = stop;
        continue;
      }
    }
    if (/\s/.test(ch)) {
      while (i < stmt.length && /\s/.test(stmt[i]!)) i++;
      if (out !== "" && i < stmt.length) out += " ";
      continue;
    }
    out += ch;
    i++;
  }
  return out.replace(/\s*;$/, "");
}

/** A constraint definition without what does not change which rows it admits (NOT VALID, deferrability). */
function constraintCore(def: string): string {
  return def
    .replace(/ NOT VALID$/, "")
    .replace(/ (NOT )?DEFERRABLE( INITIALLY (DEFERRED|IMMEDIATE))?/, "")
    .replace(/ INITIALLY (DEFERRED|IMMEDIATE)/, "");
}

/** The index part of lateObjects: late indexes, late index-backed constraints (as dependents), renames to record. */
async function lateIndexes(
  sql: AnySql,
  m: Migration,
): Promise<Omit<LateObjects, "dependents"> & { dependents: LateDependent[] }> {
  const step = m.phase === "cutover" ? "swap-back" : "cutover";
  const live = m.live;
  const copy = m.copy;
  const copyIsPartitioned = step === "cutover";
  const col = m.spec.column;
  const [liveIx, copyIx] = await Promise.all([indexesOf(sql, live), indexesOf(sql, copy)]);
  // The indexes of the migration (start's, and those cutover built): the original table's name (`to`) and the
  // partitioned table's (`from`); either table may carry either name (a switch may exchange them).
  const known = new Set(m.index_renames.flatMap((r) => [r.from, r.to]));
  const indexes: LateIndex[] = [];
  const dependents: LateDependent[] = [];
  const renames: { from: string; to: string }[] = [];
  const suffix = copyIsPartitioned ? "_part" : "_orig";
  const taken = new Set(
    (
      await sql`select c.relname::text as name from pg_catalog.pg_class c join pg_catalog.pg_namespace n on
        n.oid = c.relnamespace
                where n.nspname = ${copy.schema} and c.relname::text =
                  any(${liveIx.flatMap((i) => buildNameCandidates(i.name, suffix))}::text[])`
    ).map((r) => String(r.name)),
  );
  for (const o of liveIx) {
    if (known.has(o.name) || !o.valid) continue;
    const counterpart = copyIx.find(
      (p) => p.valid && (copyIsPartitioned ? sameIndex(o, p, col) : sameIndex(p, o, col)),
    );
    if (counterpart) {
      if (
        copyIsPartitioned &&
        !known.has(counterpart.name) &&
        buildNameCandidates(o.name, suffix).includes(counterpart.name)
      ) {
        renames.push({ from: counterpart.name, to: o.name });
      }
      continue;
    }
    if (o.constraint) {
      const c = o.constraint;
      const def = String(
        (
          await sql`select pg_catalog.pg_get_constraintdef(oid) as d from pg_catalog.pg_constraint where conrelid =
            to_regclass(${quoteQualified(live)}) and conname = ${c.name}`
        )[0]?.d ?? "",
      );
      const widened =
        copyIsPartitioned && c.type !== "x" && !o.keyColumns.includes(col) ? extendIndexKey(def, [col]) : def;
      const kind = c.type === "p" ? "primary key" : c.type === "u" ? "unique constraint" : "exclusion constraint";
      dependents.push({
        label: `${kind} ${c.name} on ${displayName(live)} (${def})`,
        before: [
          `ALTER TABLE ${quoteQualified(copy)} ADD CONSTRAINT ${quoteIdent(fitName(c.name, suffix))} ${widened}`,
        ],
        after: [],
      });
      continue;
    }
    const widened = copyIsPartitioned && o.unique && !o.keyColumns.includes(col);
    const tail = widened ? extendIndexKey(o.tail, [col]) : o.tail;
    const free = buildNameCandidates(o.name, suffix).find(
      (n) =>
        !taken.has(n) ||
        copyIx.some(
          (p) =>
            p.name === n &&
            !p.valid &&
            p.unique === o.unique &&
            (p.tail === tail || p.tail === tail.replace(`, ${quoteIdent(col)})`, `, ${col})`)),
        ),
    );
    if (!free) {
      dependents.push({
        label: `index ${o.name} on ${displayName(live)} (${o.definition})`,
        before: [],
        after: [],
        advice: `the names pgshift would give its copy on ${displayName(copy)} are taken: create it there yourself`,
      });
      continue;
    }
    indexes.push({
      name: o.name,
      unique: o.unique,
      definition: o.definition,
      build: { name: free, original: o.name, unique: o.unique, definition: tail },
      widened,
      partitioned: copyIsPartitioned,
    });
  }
  const leftWith = { schema: live.schema, name: copyIsPartitioned ? m.retired_table : m.shadow_table };
  return { live, copy, leftWith, step, indexes, dependents, renames };
}

/**
 * The objects that depend on the live table and have no counterpart on the copy, so that the next switch
 * (cutover, or swap-back in phase cutover) would leave them with the table that loses the application's name:
 * - indexes (valid ones, not among the indexes start gave the partitioned table, `m.index_renames`) the copy
 *   has no counterpart of (sameIndex): `indexes`, which cutover builds on the copy before its lock;
 * - everything else pg_depend records as depending on the live table or its row type: views and materialized
 *   views, rules, triggers (not those a carrier moves: src/dependents), functions and procedures (SQL bodies
 *   with BEGIN ATOMIC, row-type arguments), foreign keys of other tables, publications, columns and typed
 *   tables of the row type, CHECK and foreign-key constraints and extended statistics the copy lacks, unique,
 *   primary-key and exclusion constraints added since start: `dependents`, with the statements that move them
 *   (PostgreSQL docs: "Dependency Tracking", pg_depend).
 * pgshift's own objects are not listed: the mirror and TRUNCATE-guard triggers (functions in schema pgshift),
 * pgshift's functions, its publication, the table's own columns' defaults, sequences and partitions.
 * Reads the catalog only.
 */
export async function lateObjects(sql: AnySql, m: Migration): Promise<LateObjects> {
  const lo = await lateIndexes(sql, m);
  return { ...lo, dependents: [...lo.dependents, ...(await dependentsOf(sql, m, lo.live, lo.copy))] };
}

/**
 * The indexes of lateObjects, as lines for status and for the log: each index created on the live table
 * after start that the copy lacks, with what the next cutover (or swap-back) builds on the copy before its lock.
 * @returns one line per index; empty when there is none.
 */
export async function indexDrift(sql: AnySql, m: Migration): Promise<string[]> {
  const lo = await lateIndexes(sql, m);
  return lo.indexes.map((i) => lateIndexLine(lo, i));
}

/** One line for a late index: what it is and what the next switch builds. */
export function lateIndexLine(lo: Pick<LateObjects, "live" | "copy" | "step">, i: LateIndex): string {
  return (
    `index ${i.name} was created on ${displayName(lo.live)} during the migration (${i.definition}) ` +
    `and ${displayName(lo.copy)} has no counterpart: ` +
    `${lo.step} builds it there first, before its lock, as ${i.build.name} ` +
    `(${i.build.unique ? "UNIQUE " : ""}USING ${i.build.definition})` +
    (i.widened
      ? `, unique only together with the partition column (a partitioned table's unique index must contain it)`
      : "")
  );
}

/**
 * lateObjects' dependents of the live table and copyDependents, as lines for status: what the next switch
 * refuses for, with the statements that move it, and what depends on the copy.
 */
export async function lateObjectLines(sql: AnySql, m: Migration): Promise<string[]> {
  const lo = await lateIndexes(sql, m);
  const deps = [...lo.dependents, ...(await dependentsOf(sql, m, lo.live, lo.copy))];
  const out = deps.map(
    (d) =>
      `${d.label} depends on ${displayName(lo.live)} and would stay with it ` +
      `as ${displayName(lo.leftWith)}: ${lo.step} refuses until it is moved` +
      (d.advice ? ` (${d.advice})` : "") +
      (d.before.length > 0 ? `; before: ${d.before.join("; ")}` : "") +
      (d.after.length > 0 ? `; after: ${d.after.join("; ")}` : ""),
  );
  for (const c of await copyDependents(sql, m)) {
    out.push(
      `${c} depends on ${displayName(m.copy)}: it follows that table at ${lo.step}; until ` +
        `then ${m.phase === "cutover" ? "finalize" : "abort"} cannot drop it`,
    );
  }
  return out;
}

/**
 * What depends on `t` (pg_depend, on the table or on its row type) other than its own parts, pgshift's
 * objects, and what `copy` has the same of (CHECK and foreign-key constraints, extended statistics),
 * with the statements that move each (see lateObjects). `copy` null: list them all, with no statements (status
 * uses it for the copy's own dependents).
 */
async function dependentsOf(
  sql: AnySql,
  m: Migration,
  t: QualifiedName,
  copy: QualifiedName | null,
): Promise<LateDependent[]> {
  const tq = quoteQualified(t);
  const rows = await sql`
    with t as (select to_regclass(${tq})::oid as oid),
    ty as (select y.oid from pg_catalog.pg_type y where y.typrelid = (select oid from t)
           union all select y.typarray from pg_catalog.pg_type y where y.typrelid = (select oid from t)
             and y.typarray <> 0),
    d as (select distinct d.classid, d.objid, case when d.classid = 'pg_catalog.pg_class'::regclass then d.objsubid
      else 0 end as objsubid
            from pg_catalog.pg_depend d
           where ((d.refclassid = 'pg_catalog.pg_class'::regclass and d.refobjid = (select oid from t))
                  or (d.refclassid = 'pg_catalog.pg_type'::regclass and d.refobjid in (select oid from ty)))
             and d.deptype not in ('i', 'e', 'x'))
    select d.classid::regclass::text as catalog, d.objid::int8 as objid, d.objsubid,
      pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid) as description
      from d
     where not (d.classid = 'pg_catalog.pg_class'::regclass and (
                  d.objid = (select oid from t)
               or exists (select from pg_catalog.pg_index i where i.indexrelid = d.objid and i.indrelid =
                 (select oid from t))
               or exists (select from pg_catalog.pg_class s where s.oid = d.objid and s.relkind = 'S')
               or exists (select from pg_catalog.pg_inherits h where h.inhrelid = d.objid and h.inhparent =
                 (select oid from t))))
       and not (d.classid = 'pg_catalog.pg_attrdef'::regclass and exists (select from pg_catalog.pg_attrdef a where
         a.oid = d.objid and a.adrelid = (select oid from t)))
       and not (d.classid = 'pg_catalog.pg_constraint'::regclass and exists (select from pg_catalog.pg_constraint c
         where c.oid = d.objid and c.conrelid = (select oid from t)))
       and not (d.classid = 'pg_catalog.pg_trigger'::regclass and exists (
                  select from pg_catalog.pg_trigger g join pg_catalog.pg_proc p on p.oid = g.tgfoid
                   where g.oid = d.objid and (g.tgisinternal or p.pronamespace = 'pgshift'::regnamespace)))
       and not (d.classid = 'pg_catalog.pg_proc'::regclass and exists (select from pg_catalog.pg_proc p where p.oid =
         d.objid and p.pronamespace = 'pgshift'::regnamespace))
       and not (d.classid = 'pg_catalog.pg_publication_rel'::regclass and exists (
                  select from pg_catalog.pg_publication_rel r join pg_catalog.pg_publication b on b.oid = r.prpubid
                   where r.oid = d.objid and (b.pubname = ${m.publication_name ?? ""} or b.pubname ~
                     '^pgshift_[0-9]+$')))
       and not (d.classid = 'pg_catalog.pg_policy'::regclass and exists (select from pg_catalog.pg_policy p
         where p.oid = d.objid and p.polrelid = (select oid from t)))
       and d.classid <> 'pg_catalog.pg_statistic_ext'::regclass
     order by 1, 2, 3`;
  const out: LateDependent[] = [];
  const tn = displayName(t);
  // What a carrier moves at the switch (src/dependents) is neither refused nor listed as left behind.
  const claimed = copy === null ? new Set<string>() : await claimedObjects(sql, t);
  for (const r of z.array(DepRow).parse(rows)) {
    const id = r.objid;
    if (claimed.has(`${r.catalog}/${id}`)) continue;
    // A user trigger on the copy is the trigger carrier's disabled leftover: abort and finalize drop it with the table.
    if (copy === null && r.catalog === "pg_trigger") continue;
    const desc = r.description ?? `${r.catalog} ${id}`;
    if (copy === null) {
      out.push({ label: desc, before: [], after: [] });
      continue;
    }
    if (r.catalog === "pg_rewrite") {
      const x = (
        await sql`
        select w.rulename::text as rule, w.ev_class = to_regclass(${tq}) as on_table,
          pg_catalog.pg_get_ruledef(w.oid) as ruledef,
               c.relkind::text as kind, pg_catalog.quote_ident(n.nspname) || '.' ||
                 pg_catalog.quote_ident(c.relname) as qview,
               n.nspname::text as schema, c.relname::text as name, pg_catalog.pg_get_viewdef(c.oid) as viewdef,
               coalesce(pg_catalog.array_to_string(c.reloptions, ', '), '') as options
          from pg_catalog.pg_rewrite w join pg_catalog.pg_class c on c.oid = w.ev_class join pg_catalog.pg_namespace n
            on n.oid = c.relnamespace
         where w.oid = ${id}`
      )[0];
      if (!x) continue;
      if (x.on_table) {
        out.push({
          label: `rule ${String(x.rule)} on ${tn}`,
          before: [`DROP RULE ${quoteIdent(String(x.rule))} ON ${tq}`],
          after: [oneLine(String(x.ruledef))],
        });
      } else {
        const mat = x.kind === "m";
        const what = mat ? "MATERIALIZED VIEW" : "VIEW";
        const opts = x.options ? ` WITH (${String(x.options)})` : "";
        const viewName = { schema: String(x.schema), name: String(x.name) };
        out.push({
          label: `${mat ? "materialized view" : "view"} ${displayName(viewName)}`,
          before: [`DROP ${what} ${String(x.qview)}`],
          after: [`CREATE ${what} ${String(x.qview)}${opts} AS ${oneLine(String(x.viewdef))}`],
        });
      }
    } else if (r.catalog === "pg_trigger") {
      const x = (
        await sql`select tgname::text as name, pg_catalog.pg_get_triggerdef(oid) as def from
          pg_catalog.pg_trigger where oid = ${id}`
      )[0];
      if (!x) continue;
      out.push({
        label: `trigger ${String(x.name)} on ${tn}`,
        before: [`DROP TRIGGER ${quoteIdent(String(x.name))} ON ${tq}`],
        after: [oneLine(String(x.def))],
      });
    } else if (r.catalog === "pg_policy") {
      // Another table's policy whose expression reads this table (its own policies are carried: src/dependents).
      const x = (
        await sql`
        select p.policyname::text as name, p.permissive, p.roles::text[] as roles, p.cmd, p.qual, p.with_check,
               p.schemaname::text as schema, p.tablename::text as table
          from pg_catalog.pg_policies p join pg_catalog.pg_policy o on o.polname = p.policyname
          join pg_catalog.pg_class c on c.oid = o.polrelid and c.relname = p.tablename
          join pg_catalog.pg_namespace n on n.oid = c.relnamespace and n.nspname = p.schemaname
         where o.oid = ${id}`
      )[0];
      if (!x) continue;
      const p = PolicyRow.parse(x);
      const on = { schema: String(x.schema), name: String(x.table) };
      out.push({
        label: `policy ${p.name} on ${displayName(on)} (it reads ${tn})`,
        before: [`DROP POLICY ${quoteIdent(p.name)} ON ${quoteQualified(on)}`],
        after: [policySql(p, on)],
      });
    } else if (r.catalog === "pg_proc") {
      const x = (
        await sql`
        select format('%I.%I(%s)', n.nspname, p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid)) as sig,
          p.prokind::text as kind,
               case when p.prokind in ('f', 'p', 'w') then pg_catalog.pg_get_functiondef(p.oid) end as def
          from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace where p.oid = ${id}`
      )[0];
      if (!x) continue;
      const proc = x.kind === "p";
      out.push({
        label: `${proc ? "procedure" : x.kind === "a" ? "aggregate" : "function"} ${String(x.sig)}`,
        before: [`DROP ${proc ? "PROCEDURE" : x.kind === "a" ? "AGGREGATE" : "FUNCTION"} ${String(x.sig)}`],
        after: x.def ? [oneLine(String(x.def))] : [],
        ...(x.def ? {} : { advice: "create it again after the switch" }),
      });
    } else if (r.catalog === "pg_constraint") {
      const x = (
        await sql`select conname::text as name, (select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c
          join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = conrelid) as rel,
            pg_catalog.pg_get_constraintdef(oid) as def from pg_catalog.pg_constraint where oid = ${id}`
      )[0];
      if (!x) continue;
      const rel = String(x.rel);
      // Why the foreign-key carrier (src/dependents/foreign-keys.ts) does not carry it.
      const fk = (await incomingForeignKeys(sql, t)).find((f) => f.oid === id);
      const why = fk ? whyNot(fk, m.spec.column, await serverVersion(sql), tn) : null;
      out.push({
        label: `foreign key ${String(x.name)} on ${rel}`,
        before: [`ALTER TABLE ${rel} DROP CONSTRAINT ${quoteIdent(String(x.name))}`],
        after: [`ALTER TABLE ${rel} ADD CONSTRAINT ${quoteIdent(String(x.name))} ${String(x.def)}`],
        advice: why ?? "after cutover it needs a unique key of exactly the referenced columns on the partitioned table",
      });
    } else if (r.catalog === "pg_publication_rel") {
      const x = (
        await sql`select b.pubname::text as name from pg_catalog.pg_publication_rel r join pg_catalog.pg_publication b
          on b.oid = r.prpubid where r.oid = ${id}`
      )[0];
      if (!x) continue;
      const pub = quoteIdent(String(x.name));
      out.push({
        label: `publication ${String(x.name)} (of ${tn})`,
        before: [`ALTER PUBLICATION ${pub} DROP TABLE ${tq}`],
        after: [`ALTER PUBLICATION ${pub} ADD TABLE ${tq}`],
      });
    } else if (r.catalog === "pg_class" && r.objsubid > 0) {
      const x = (
        await sql`select (select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c join
          pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = attrelid) as rel,
                pg_catalog.quote_ident(attname) as col from pg_catalog.pg_attribute where attrelid = ${id} and
                  attnum = ${r.objsubid}`
      )[0];
      if (!x) continue;
      out.push({
        label: `column ${String(x.col)} of ${String(x.rel)} (of the row type of ${tn})`,
        before: [
          `ALTER TABLE ${String(x.rel)} ALTER COLUMN ${String(x.col)} TYPE jsonb USING to_jsonb(${String(x.col)})`,
        ],
        after: [],
        advice: "a column of the table's row type stays with the old table: give it another type",
      });
    } else {
      out.push({ label: desc, before: [], after: [], advice: "drop it before the switch and create it again after" });
    }
  }
  if (copy === null) return out;
  out.push(
    ...(await constraintsLacking(sql, t, copy, await copyToLive(sql, m))),
    ...(await statisticsLacking(sql, t, copy)),
  );
  return out;
}

function policySql(p: z.infer<typeof PolicyRow>, on: QualifiedName): string {
  const roles = p.roles.map((r) => (r === "public" ? "PUBLIC" : quoteIdent(r))).join(", ");
  return (
    `CREATE POLICY ${quoteIdent(p.name)} ON ${quoteQualified(on)} AS ${p.permissive} FOR ${p.cmd} TO ${roles}` +
    (p.qual !== null ? ` USING (${oneLine(p.qual)})` : "") +
    (p.with_check !== null ? ` WITH CHECK (${oneLine(p.with_check)})` : "")
  );
}

/**
 * CHECK and foreign-key constraints of `t` that `copy` has none of the same definition of (NOT VALID and
 * deferrability aside), and unique, primary-key and exclusion constraints are handled with their indexes.
 */
async function constraintsLacking(
  sql: AnySql,
  t: QualifiedName,
  copy: QualifiedName,
  groupCopies: ReadonlyMap<string, string>,
): Promise<LateDependent[]> {
  const q = (x: QualifiedName) => sql`
    select conname::text as name, contype::text as type, pg_catalog.pg_get_constraintdef(oid) as def,
           case when contype = 'f' then confrelid::regclass::text end as ref
      from pg_catalog.pg_constraint where conrelid = to_regclass(${quoteQualified(x)}) and contype in ('c',
        'f') and conparentid = 0 order by conname`;
  const [mine, theirs] = await Promise.all([q(t), q(copy)]).then(([a, b]) => [
    z.array(ConstraintRow).parse(a),
    z.array(ConstraintRow).parse(b),
  ]);
  // A migration group: the copy's foreign key to another table's copy counts as the live table's to that table.
  const mapped = (c: z.infer<typeof ConstraintRow>) => {
    const live = c.ref === null ? undefined : groupCopies.get(c.ref);
    return live === undefined ? c.def : c.def.replace(` REFERENCES ${c.ref}(`, ` REFERENCES ${live}(`);
  };
  const have = new Set(theirs!.map((c) => `${c.type} ${constraintCore(mapped(c))}`));
  return mine!
    .filter((c) => !have.has(`${c.type} ${constraintCore(c.def)}`))
    .map((c) => ({
      label: `${c.type === "c" ? "check constraint" : "foreign key"} ${c.name} on ${displayName(t)} (${c.def})`,
      before: [`ALTER TABLE ${quoteQualified(copy)} ADD CONSTRAINT ${quoteIdent(c.name)} ${c.def}`],
      after: [],
    }));
}

const KIND_NAMES: Record<string, string> = { d: "ndistinct", f: "dependencies", m: "mcv" };

/** Extended statistics of `t` (CREATE STATISTICS) that `copy` has none of the same kinds and columns of. */
async function statisticsLacking(sql: AnySql, t: QualifiedName, copy: QualifiedName): Promise<LateDependent[]> {
  const q = (x: QualifiedName) => sql`
    select s.stxname::text as name, n.nspname::text as schema, s.stxkind::text[] as kinds,
      pg_catalog.pg_get_statisticsobjdef_columns(s.oid) as columns
      from pg_catalog.pg_statistic_ext s join pg_catalog.pg_namespace n on n.oid = s.stxnamespace
     where s.stxrelid = to_regclass(${quoteQualified(x)}) order by 1`;
  const [mine, theirs] = await Promise.all([q(t), q(copy)]).then(([a, b]) => [
    z.array(StatRow).parse(a),
    z.array(StatRow).parse(b),
  ]);
  const key = (s: z.infer<typeof StatRow>) => `${[...s.kinds].sort().join()} ${s.columns}`;
  const have = new Set(theirs!.map(key));
  return mine!
    .filter((s) => !have.has(key(s)))
    .map((s) => {
      const kinds = s.kinds.filter((k) => k in KIND_NAMES);
      const spec = kinds.length === 3 || kinds.length === 0 ? "" : ` (${kinds.map((k) => KIND_NAMES[k]).join(", ")})`;
      return {
        label: `statistics ${displayName({ schema: s.schema, name: s.name })} on ${displayName(t)}`,
        before: [
          `CREATE STATISTICS ${quoteQualified({ schema: s.schema, name: fitName(s.name, "_copy") })}${spec} ` +
            `ON ${s.columns} FROM ${quoteQualified(copy)}`,
        ],
        after: [],
      };
    });
}

/**
 * Objects that depend on the copy (the shadow before cutover, the retired table after), other than its own
 * parts and pgshift's: one line each (pg_describe_object). They follow the copy: after the next switch they
 * depend on the live table; until then abort (shadow) or finalize (retired table) cannot drop the copy.
 */
export async function copyDependents(sql: AnySql, m: Migration): Promise<string[]> {
  return (await dependentsOf(sql, m, m.copy, null)).map((d) => d.label);
}

/**
 * The refusal for late dependents (lateObjects): one line naming each, and a hint with the statements to
 * run, in order: before the step, the step, after it. Null when there is none.
 */
export function lateDependentsRefusal(lo: LateObjects, table: QualifiedName): PgshiftError | null {
  if (lo.dependents.length === 0) return null;
  const labels = lo.dependents.map((d) => (d.advice ? `${d.label}: ${d.advice}` : d.label));
  const before = lo.dependents.flatMap((d) => d.before);
  const after = lo.dependents.flatMap((d) => d.after);
  const hint =
    (before.length > 0 ? `run ${before.map((s) => `${s};`).join(" ")} then ` : "") +
    `pgshift ${lo.step} ${displayName(table)}` +
    (after.length > 0 ? `, then ${after.map((s) => `${s};`).join(" ")}` : "");
  return new PgshiftError(
    `cannot ${lo.step === "cutover" ? "cut over" : "swap back"}: ${lo.dependents.length} object(s) depending ` +
      `on ${displayName(lo.live)} would stay with it as ${displayName(lo.leftWith)}, and pgshift does not carry them ` +
      `over: ${labels.join("; ")}; nothing was changed`,
    { hint },
  );
}

/**
 * Every object pg_depend records as depending on `t` or its row type, as `catalog/oid` strings (sorted):
 * a snapshot taken before the switch's lock, compared under it (newDependents) so that nothing created in
 * between goes unseen. One catalog query.
 */
export async function dependencySnapshot(sql: AnySql, t: QualifiedName): Promise<string[]> {
  const rows = await sql`
    with t as (select to_regclass(${quoteQualified(t)})::oid as oid)
    select distinct d.classid::int8 || '/' || d.objid::int8 as k
      from pg_catalog.pg_depend d
     where (d.refclassid = 'pg_catalog.pg_class'::regclass and d.refobjid = (select oid from t))
        or (d.refclassid = 'pg_catalog.pg_type'::regclass and d.refobjid in (
              select oid from pg_catalog.pg_type where typrelid = (select oid from t)
              union all select typarray from pg_catalog.pg_type where typrelid = (select oid from t)))
     order by 1`;
  return rows.map((r) => String(r.k));
}

/**
 * Objects depending on `t` now that were not in `before` (dependencySnapshot), described (pg_describe_object).
 */
export async function newDependents(sql: AnySql, t: QualifiedName, before: readonly string[]): Promise<string[]> {
  const seen = new Set(before);
  const added = (await dependencySnapshot(sql, t)).filter((k) => !seen.has(k));
  if (added.length === 0) return [];
  const rows = await sql`
    select pg_catalog.pg_describe_object(split_part(k, '/', 1)::oid, split_part(k, '/', 2)::oid, 0) as d
      from unnest(${added}::text[]) k order by 1`;
  return rows.map((r) => String(r.d));
}
