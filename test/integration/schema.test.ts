import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import { abort, finalize } from "../../src/migration/finish.js";
import { planMigration } from "../../src/migration/plan.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, schemaSql } from "../../src/migration/state.js";
import { parseTableName, type QualifiedName, quoteIdent, quoteQualified } from "../../src/names.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { type VerifyReport, verify } from "../../src/verify/verify.js";
import { type CatalogSnapshot, catalogSnapshot } from "../support/catalog.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Schema fidelity and odd identifiers, against the real server: the shadow carries every column
 * property, constraint, index, comment, storage parameter and grant of the source; the whole flow works
 * with a schema and a table whose names need quoting and with a reserved-word column; serial and
 * identity sequences keep handing out unique ids through cutover, swap-back and finalize; TRUNCATE is
 * refused while a migration runs; abort leaves the source exactly as it was; generated columns are
 * never written but always equal.
 * Also: an application role may insert into an identity table between cutover and finalize; finalize keeps
 * the options of an identity sequence; TRUNCATE of a partition of the live table is refused too.
 */

const ROLE = "pgshift_app";
const SPEC = 'range:"Created At":month';

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
  await db.admin.unsafe(`do $$ begin create role ${ROLE} nologin; exception when duplicate_object then null; end $$`);
});
afterAll(async () => {
  await db?.close();
  // The role is cluster-wide; its only grants were in the database close() dropped.
  const root = postgres(inject("pgUrl"), { max: 1, onnotice: () => {} });
  await root.unsafe(`drop role if exists ${ROLE}`).catch(() => {});
  await root.end();
});

const q = quoteQualified;
const shadowOf = (t: QualifiedName): QualifiedName => ({ schema: t.schema, name: `${t.name}_pgshift_shadow` });

/** Every column but generated ones, as the application writes them (the dropped column is gone). */
const WRITE_COLS = `"Created At", "select", qty, price, note, code, payload, customer_id`;
/** Every visible column, for row comparisons. */
const ALL_COLS = `id, ${WRITE_COLS.replace("price, note", "price, note, total")}`;

/**
 * Creates `schema` with a `customers` table and `"Order Items"`: a bigserial key, a quoted mixed-case
 * timestamptz partition column with a default, a reserved-word column, a CHECK, a numeric typmod, a
 * dropped column, a commented column, a stored generated column, a varchar with collation "C", an
 * EXTERNAL-storage column, an outgoing FK, fillfactor 70, a partial unique index, a plain index, a
 * table comment with quotes and grants to pgshift_app and PUBLIC; filled with `rows` rows over ~3 months.
 */
async function createOrderItems(schema: string, rows = 300): Promise<QualifiedName> {
  const s = quoteIdent(schema);
  await db.admin.unsafe(`
    create schema ${s};
    create table ${s}.customers (id bigint primary key, name text not null);
    insert into ${s}.customers select g, 'customer ' || g from generate_series(1, 20) g;
    create table ${s}."Order Items" (
      id bigserial primary key,
      "Created At" timestamptz not null default now(),
      "select" text default 'x',
      qty int not null check (qty > 0),
      price numeric(10,2),
      gone int,
      note text,
      total numeric generated always as (qty * price) stored,
      code varchar(40) collate "C",
      payload text,
      customer_id bigint references ${s}.customers (id)
    ) with (fillfactor = 70);
    alter table ${s}."Order Items" drop column gone;
    alter table ${s}."Order Items" alter column payload set storage external;
    comment on column ${s}."Order Items".note is 'the customer''s note';
    comment on table ${s}."Order Items" is 'line items: it''s "quoted"';
    create unique index "Order Items note key" on ${s}."Order Items" (note) where note is not null;
    create index on ${s}."Order Items" ("select");
    grant select, insert on ${s}."Order Items" to ${ROLE};
    grant select on ${s}."Order Items" to public;
    insert into ${s}."Order Items" ("Created At", "select", qty, price, note, code, payload, customer_id)
      select now() - make_interval(days => g % 95, secs => g), case when g % 7 = 0 then null else 's' || (g % 5) end,
             1 + g % 9, (g % 50) * 1.25, case when g % 3 = 0 then 'note ' || g end, 'code-' || g,
             case when g % 10 = 0 then repeat(md5(g::text), 200) else repeat('p', g % 200) end, 1 + g % 20
        from generate_series(1, ${rows}) g;
    analyze ${s}."Order Items";
  `);
  return { schema, name: "Order Items" };
}

type Row = Record<string, unknown>;
const plain = (rows: readonly Row[]): Row[] => rows.map((r) => ({ ...r }));

async function columnsOf(rel: QualifiedName): Promise<Row[]> {
  return plain(
    await db.admin`
      select a.attname::text as name, format_type(a.atttypid, a.atttypmod) as type, co.collname::text as collation,
             a.attnotnull as not_null, pg_get_expr(ad.adbin, ad.adrelid) as default, a.attgenerated::text as generated,
             a.attidentity::text as identity, a.attstorage::text as storage, col_description(a.attrelid,
               a.attnum) as comment
        from pg_attribute a
        left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum
        left join pg_collation co on co.oid = a.attcollation
       where a.attrelid = to_regclass(${q(rel)}) and a.attnum > 0 and not a.attisdropped
       order by a.attnum`,
  );
}

/** oid (text) of the sequence the default of `column` calls nextval() of, via pg_depend. */
async function defaultSequence(rel: QualifiedName, column: string): Promise<string | null> {
  const r = await db.admin`
    select d.refobjid::text as seq
      from pg_attrdef ad
      join pg_attribute a on a.attrelid = ad.adrelid and a.attnum = ad.adnum
      join pg_depend d on d.classid = 'pg_attrdef'::regclass and d.objid = ad.oid and d.refclassid =
        'pg_class'::regclass
      join pg_class s on s.oid = d.refobjid and s.relkind = 'S'
     where ad.adrelid = to_regclass(${q(rel)}) and a.attname = ${column}`;
  return r[0] ? String(r[0].seq) : null;
}

/** The relations (oid text) and columns that own the sequence `seqOid` (pg_depend, 'a' = OWNED BY, 'i' = identity). */
async function sequenceOwners(seqOid: string): Promise<{ rel: string; column: string; deptype: string }[]> {
  const r = await db.admin`
    select d.refobjid::text as rel, a.attname::text as column, d.deptype::text as deptype
      from pg_depend d join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
     where d.classid = 'pg_class'::regclass and d.objid = ${seqOid}::oid and d.refclassid = 'pg_class'::regclass
       and d.deptype in ('a', 'i')`;
  return r.map((x) => ({ rel: String(x.rel), column: String(x.column), deptype: String(x.deptype) }));
}

async function oidOf(rel: QualifiedName): Promise<string | null> {
  const r = await db.admin`select to_regclass(${q(rel)})::oid::text as oid`;
  return (r[0]?.oid as string | null) ?? null;
}

async function relkind(rel: QualifiedName): Promise<string | null> {
  const r = await db.admin`select relkind::text as k from pg_class where oid = to_regclass(${q(rel)})`;
  return r[0] ? String(r[0].k) : null;
}

/** oid (text) of pg_get_serial_sequence(rel, column): serial and identity columns alike. */
async function serialSequence(rel: QualifiedName, column: string): Promise<string | null> {
  const r = await db.admin`select pg_get_serial_sequence(${q(rel)}, ${column})::regclass::oid::text as oid`;
  return (r[0]?.oid as string | null) ?? null;
}

/** Rows only in `a` and only in `b` (multiset EXCEPT ALL over `cols`), and the row count of `a`. */
async function diffRows(
  a: QualifiedName,
  b: QualifiedName,
  cols: string,
): Promise<{ onlyA: number; onlyB: number; rows: number }> {
  const r = await db.admin.unsafe(`
    select (select count(*) from (select ${cols} from ${q(a)} except all select ${cols} from ${q(b)}) x)::int as only_a,
           (select count(*) from (select ${cols} from ${q(b)} except all select ${cols} from ${q(a)}) x)::int as only_b,
           (select count(*) from ${q(a)})::int as rows`);
  return { onlyA: Number(r[0]!.only_a), onlyB: Number(r[0]!.only_b), rows: Number(r[0]!.rows) };
}

/** The value nextval() would return next from the sequence of `rel`.`column`, as text (without consuming it). */
async function nextValue(rel: QualifiedName, column: string): Promise<string> {
  const name = await db.admin`select pg_get_serial_sequence(${q(rel)}, ${column}) as s`;
  const seqText = String(name[0]!.s);
  const r = await db.admin.unsafe(`
    select (case when s.is_called then s.last_value + ps.increment_by else s.last_value end)::text as next
      from ${seqText} s, pg_sequences ps
     where format('%I.%I', ps.schemaname, ps.sequencename)::regclass = '${seqText.replace(/'/g, "''")}'::regclass`);
  return String(r[0]!.next);
}

function expectEqual(v: VerifyReport): void {
  expect(v.differences).toEqual([]);
  expect(v.equal).toBe(true);
  expect(v.rowsCompared).toBeGreaterThan(0);
}

async function sqlState(p: Promise<unknown>): Promise<{ code: string; message: string }> {
  try {
    await p;
  } catch (err) {
    const e = err as { code?: unknown; message?: unknown };
    return { code: String(e.code), message: String(e.message) };
  }
  throw new Error("expected the statement to fail, it succeeded");
}

describe("shadow fidelity", () => {
  it(
    'the shadow of "My Schema"."Order Items" has every column property, constraint, index, comment, option and ' +
      "grant",
    async () => {
      const table = await createOrderItems("My Schema");
      expect(parseTableName('"My Schema"."Order Items"')).toEqual(table);
      const spec = parsePartitionSpec(SPEC);
      expect(spec).toEqual({ strategy: "range", column: "Created At", interval: "month" });

      const plan = await planMigration(db.sql, table, { spec });
      expect(plan.blockers).toEqual([]);
      expect(plan.shadow).toEqual(shadowOf(table));
      expect(
        plan.warnings.some(
          (w) => w.includes("keeps (id) unique") && w.includes(`after finalize only (id, "Created At") is enforced`),
        ),
        plan.warnings.join("\n"),
      ).toBe(true);
      expect(
        plan.warnings.some((w) => w.includes("keeps (note) unique")),
        plan.warnings.join("\n"),
      ).toBe(true);

      await startMigration(db.sql, table, { allowKeyExtension: true, spec });
      const shadow = shadowOf(table);
      expect(await relkind(shadow)).toBe("p");

      // Columns: same order, types, collations, NOT NULL, defaults, generated expressions, storage, comments.
      const srcCols = await columnsOf(table);
      const shdCols = await columnsOf(shadow);
      expect(srcCols.map((c) => c.name)).toEqual([
        "id",
        "Created At",
        "select",
        "qty",
        "price",
        "note",
        "total",
        "code",
        "payload",
        "customer_id",
      ]);
      expect(shdCols).toEqual(srcCols);
      const byName = (n: string) => shdCols.find((c) => c.name === n)!;
      expect(byName("code")).toMatchObject({ type: "character varying(40)", collation: "C" });
      expect(byName("price")).toMatchObject({ type: "numeric(10,2)" });
      expect(byName("payload")).toMatchObject({ storage: "e" });
      expect(byName("total")).toMatchObject({ generated: "s" });
      expect(String(byName("total").default)).toMatch(/qty.*price/);
      expect(byName("select")).toMatchObject({ default: "'x'::text" });
      expect(byName("Created At")).toMatchObject({ not_null: true, default: "now()" });
      expect(byName("note")).toMatchObject({ comment: "the customer's note" });
      // The serial default calls nextval() of the one sequence of the source, not a copy.
      const seq = await serialSequence(table, "id");
      expect(seq).not.toBeNull();
      expect(await defaultSequence(table, "id")).toBe(seq);
      expect(await defaultSequence(shadow, "id")).toBe(seq);

      // Every partition inherits the column storage and carries the source's storage parameters.
      const parts = await db.admin`
      select c.relname::text as name, c.reloptions,
             (select a.attstorage::text from pg_attribute a where a.attrelid = c.oid and a.attname =
               'payload') as storage
        from pg_inherits i join pg_class c on c.oid = i.inhrelid
       where i.inhparent = to_regclass(${q(shadow)}) order by 1`;
      expect(parts.length).toBeGreaterThanOrEqual(4);
      expect(parts.map((p) => p.name)).toContain("Order Items_default");
      for (const p of parts) {
        expect(p.reloptions, String(p.name)).toEqual(["fillfactor=70"]);
        expect(p.storage, String(p.name)).toBe("e");
      }

      // CHECK constraint, with the source's definition.
      const checks = async (rel: QualifiedName) =>
        (
          await db.admin`select pg_get_constraintdef(oid) as def from pg_constraint where conrelid =
          to_regclass(${q(rel)}) and contype = 'c' order by 1`
        ).map((r) => String(r.def));
      expect(await checks(shadow)).toEqual(["CHECK ((qty > 0))"]);
      expect(await checks(shadow)).toEqual(await checks(table));

      // Table comment (with quotes).
      const comment = await db.admin`select obj_description(to_regclass(${q(shadow)}), 'pg_class') as c`;
      expect(comment[0]!.c).toBe(`line items: it's "quoted"`);

      // Primary key (id, "Created At"); the partial unique index widened with "Created At"; the plain index.
      // (Secondary indexes may be built only after the copy: look once the backfill is done.)
      expect((await backfill(db.sql, table)).complete).toBe(true);
      const indexes = await db.admin`
      select i.indisprimary as primary, i.indisunique as unique, i.indisvalid as valid,
        pg_get_indexdef(i.indexrelid) as def,
             array(select a.attname::text from unnest(i.indkey) with ordinality k(n, o)
                     join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.n order by k.o) as cols
        from pg_index i where i.indrelid = to_regclass(${q(shadow)}) order by 3`;
      const pk = indexes.filter((i) => i.primary);
      expect(pk.map((i) => i.cols)).toEqual([["id", "Created At"]]);
      const uniques = indexes.filter((i) => i.unique && !i.primary);
      expect(uniques.map((i) => i.cols)).toEqual([["note", "Created At"]]);
      expect(String(uniques[0]!.def)).toMatch(/WHERE \(note IS NOT NULL\)/);
      const plainIx = indexes.filter((i) => !i.unique);
      expect(plainIx.map((i) => i.cols)).toEqual([["select"]]);
      for (const i of indexes) expect(i.valid, String(i.def)).toBe(true);
      // Every partition has the three indexes too.
      const perPartition = await db.admin`
      select c.relname::text as name, (select count(*)::int from pg_index i where i.indrelid = c.oid
        and i.indisvalid) as n
        from pg_inherits h join pg_class c on c.oid = h.inhrelid where h.inhparent = to_regclass(${q(shadow)})`;
      for (const p of perPartition) expect(p.n, String(p.name)).toBe(3);

      // Outgoing foreign key.
      const fks = async (rel: QualifiedName) =>
        (
          await db.admin`select pg_get_constraintdef(oid) as def from pg_constraint where conrelid =
          to_regclass(${q(rel)}) and contype = 'f'`
        ).map((r) => String(r.def));
      expect(await fks(shadow)).toHaveLength(1);
      expect(await fks(shadow)).toEqual(await fks(table));
      expect((await fks(shadow))[0]).toMatch(/FOREIGN KEY \(customer_id\) REFERENCES "My Schema"\.customers\(id\)/);

      // Grants (relacl) to pgshift_app and PUBLIC.
      const grants = async (rel: QualifiedName) =>
        plain(
          await db.admin`
          select case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee)::text end as grantee,
            a.privilege_type, a.is_grantable
            from pg_class c, aclexplode(c.relacl) a
           where c.oid = to_regclass(${q(rel)}) and a.grantee <> c.relowner order by 1, 2`,
        );
      expect(await grants(shadow)).toEqual([
        { grantee: "PUBLIC", privilege_type: "SELECT", is_grantable: false },
        { grantee: ROLE, privilege_type: "INSERT", is_grantable: false },
        { grantee: ROLE, privilege_type: "SELECT", is_grantable: false },
      ]);
      expect(await grants(shadow)).toEqual(await grants(table));
    },
  );
});

describe("the full flow with odd identifiers", () => {
  it(
    "insert/update/delete through the table name across start, backfill, verify, cutover, swap-back, cutover, " +
      "finalize",
    async () => {
      const schema = 'Flow "Schema"';
      const table = await createOrderItems(schema);
      const parsed = parseTableName(`${quoteIdent(schema)}."Order Items"`);
      expect(parsed).toEqual(table);
      const L = q(table);
      const twin: QualifiedName = { schema: "twin", name: "Order Items" };
      const T = q(twin);
      await db.admin.unsafe(`
      create schema twin;
      create table ${T} (id bigint primary key, "Created At" timestamptz not null, "select" text, qty int not null,
        price numeric(10,2), note text, total numeric generated always as (qty * price) stored, code
          varchar(40) collate "C",
        payload text, customer_id bigint);
      insert into ${T} (id, ${WRITE_COLS}) select id, ${WRITE_COLS} from ${L};`);

      const seq = (await serialSequence(table, "id"))!;
      expect(seq).not.toBeNull();
      const originalOid = (await oidOf(table))!;
      const ids: number[][] = [];
      let round = 0;

      /**
       * One transaction: inserts (ids from the sequence), updates (partition-key moves, TOAST), deletes, on the table
       * and
       * the twin.
       */
      const write = async () => {
        const k = ++round;
        await db.admin.begin(async (tx) => {
          const ins = await tx.unsafe(`
          with ins as (
            insert into ${L} ("Created At", "select", qty, price, note, code, payload, customer_id)
            select now() - make_interval(days => (g * 13 + ${k}) % 90), case when g % 2 = 0 then
              'r${k}' end, g, g * 2.5,
                   'round ${k} row ' || g, 'c' || g, repeat('x', g * 700), 1 + g % 20
              from generate_series(1, 6) g
            returning *),
          ins2 as (insert into ${L} (qty, note) values (3, 'round ${k} defaults') returning *),
          tw as (insert into ${T} (id, ${WRITE_COLS}) select id, ${WRITE_COLS} from ins union all select id,
            ${WRITE_COLS} from ins2)
          select id from ins union all select id from ins2 order by id`);
          ids.push(ins.map((r) => Number(r.id)));
          for (const t of [L, T]) {
            await tx.unsafe(`update ${t} set qty = qty + 1, "select" = 'u${k}' where id % 11 = ${k % 11}`);
            await tx.unsafe(
              `update ${t} set "Created At" = "Created At" - interval '33 days' where id % 13 = ${k % 13}`,
            );
            await tx.unsafe(
              `update ${t} set payload = repeat('y${k}', 2000), price = price + 1 where id % 29 = ${k % 29}`,
            );
            await tx.unsafe(`update ${t} set note = null where id % 31 = ${k % 31}`);
            await tx.unsafe(`delete from ${t} where id % 17 = ${k % 17}`);
          }
        });
        const d = await diffRows(table, twin, ALL_COLS);
        expect(d, `after write round ${k}`).toMatchObject({ onlyA: 0, onlyB: 0 });
      };
      /** The one sequence is owned by the id column of the table that is live now (OWNED BY, deptype 'a'). */
      const expectSequenceOwnedByLive = async (phase: string) => {
        const live = (await oidOf(table))!;
        expect(await sequenceOwners(seq), phase).toEqual([{ rel: live, column: "id", deptype: "a" }]);
        expect(await serialSequence(table, "id"), phase).toBe(seq);
        expect(await defaultSequence(table, "id"), phase).toBe(seq);
      };

      await write();
      await expectSequenceOwnedByLive("before start");
      await startMigration(db.sql, parsed, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
      await write();
      const part = await backfill(db.sql, parsed, { batchSize: 40, maxBatches: 3 });
      expect(part.complete).toBe(false);
      await write();
      const bf = await backfill(db.sql, parsed, { batchSize: 40 });
      expect(bf.complete).toBe(true);
      await write();
      expectEqual(await verify(db.sql, parsed, { chunkSize: 50 }));
      await expectSequenceOwnedByLive("backfilled");

      await cutover(db.sql, parsed);
      expect(await relkind(table)).toBe("p");
      await write();
      expectEqual(await verify(db.sql, parsed, { chunkSize: 50 }));
      await expectSequenceOwnedByLive("after cutover");

      await swapBack(db.sql, parsed);
      expect(await oidOf(table)).toBe(originalOid);
      await write();
      expectEqual(await verify(db.sql, parsed, { chunkSize: 50 }));
      await expectSequenceOwnedByLive("after swap-back");

      await cutover(db.sql, parsed);
      await write();
      expectEqual(await verify(db.sql, parsed, { chunkSize: 50 }));
      await expectSequenceOwnedByLive("after the second cutover");
      const m = (await loadMigration(db.sql, parsed))!;
      expect(m.phase).toBe("cutover");
      expect(await diffRows(m.copy, twin, ALL_COLS)).toMatchObject({ onlyA: 0, onlyB: 0 });

      await finalize(db.sql, parsed, { yes: true });
      expect(await loadMigration(db.sql, parsed)).toBeNull();
      expect(await relkind(table)).toBe("p");
      expect(await oidOf(m.copy)).toBeNull();
      const d = await diffRows(table, twin, ALL_COLS);
      expect(d).toMatchObject({ onlyA: 0, onlyB: 0 });
      expect(d.rows).toBeGreaterThan(150);

      // The sequence survived the retired table and is owned by the new table's id column.
      await expectSequenceOwnedByLive("after finalize");
      await write();

      // Every id came from the one sequence, in order: no duplicates, each round above the previous one.
      const flat = ids.flat();
      expect(new Set(flat).size).toBe(flat.length);
      for (let i = 1; i < ids.length; i++)
        expect(Math.min(...ids[i]!), `round ${i + 1}`).toBeGreaterThan(Math.max(...ids[i - 1]!));
      const dup = await db.admin.unsafe(`select count(*)::int as n, count(distinct id)::int as d from ${L}`);
      expect(dup[0]!.n).toBe(dup[0]!.d);
    },
  );
});

describe("identity columns", () => {
  const cases = [
    { name: "ident_always", identity: "a", clause: "generated always as identity", spec: "range:created_at:month" },
    { name: "ident_by_default", identity: "d", clause: "generated by default as identity", spec: "hash:id:4" },
  ] as const;

  it.each(cases)(
    "$name: ids stay unique through cutover, swap-back, cutover; finalize restores the identity",
    async ({ name, identity, clause, spec }) => {
      const table: QualifiedName = { schema: "public", name };
      const L = q(table);
      await db.admin.unsafe(`
      create table ${L} (id bigint ${clause} primary key, created_at timestamptz not null default now(), v text);
      insert into ${L} (created_at, v) select now() - make_interval(days => g % 80), 'v' || g from
        generate_series(1, 120) g;`);
      const seq = (await serialSequence(table, "id"))!;
      expect(seq).not.toBeNull();
      const ids: number[] = [];
      const insertRows = async (tag: string) => {
        const r = await db.admin.unsafe(
          `insert into ${L} (created_at, v) select now() - make_interval(days => g * 20), '${tag}' || g from
            generate_series(1, 5) g returning id`,
        );
        const got = r.map((x) => Number(x.id));
        const prev = ids.length > 0 ? Math.max(...ids) : 120;
        expect(Math.min(...got), tag).toBeGreaterThan(prev);
        ids.push(...got);
      };
      const noDuplicates = async () => {
        const r = await db.admin.unsafe(`select count(*)::int as n, count(distinct id)::int as d from ${L}`);
        expect(r[0]!.n).toBe(r[0]!.d);
      };

      await startMigration(db.sql, table, { allowKeyExtension: true, spec: parsePartitionSpec(spec) });
      await insertRows("started");
      expect((await backfill(db.sql, table, { batchSize: 50 })).complete).toBe(true);
      expectEqual(await verify(db.sql, table));

      await cutover(db.sql, table);
      expect(await relkind(table)).toBe("p");
      await insertRows("cutover");
      await noDuplicates();
      expectEqual(await verify(db.sql, table));

      await swapBack(db.sql, table);
      expect(await relkind(table)).toBe("r");
      await insertRows("swapped-back");
      await noDuplicates();
      if (identity === "a") {
        // The original table still has its GENERATED ALWAYS identity: explicit ids need OVERRIDING SYSTEM VALUE.
        const e = await sqlState(
          db.admin.unsafe(`insert into ${L} (id, created_at, v) values (1000000, now(), 'explicit')`),
        );
        expect(e.code).toBe("428C9");
        await db.admin.begin(async (tx) => {
          await tx.unsafe(
            `insert into ${L} (id, created_at, v) overriding system value values (1000000, now(), 'explicit')`,
          );
          await tx.unsafe(`delete from ${L} where id = 1000000`);
        });
      }
      const attidentity =
        await db.admin`select attidentity::text as i from pg_attribute where attrelid = to_regclass(${L})
          and attname = 'id'`;
      expect(attidentity[0]!.i).toBe(identity);
      expectEqual(await verify(db.sql, table));

      await cutover(db.sql, table);
      await insertRows("cutover-again");
      expectEqual(await verify(db.sql, table));
      await finalize(db.sql, table, { yes: true });

      expect(await relkind(table)).toBe("p");
      const after = await db.admin`select attidentity::text as i from pg_attribute where attrelid = to_regclass(${L})
          and attname = 'id'`;
      expect(after[0]!.i).toBe(identity);
      const newSeq = await serialSequence(table, "id");
      expect(newSeq).not.toBeNull();
      const max = await db.admin.unsafe(`select max(id)::text as m from ${L}`);
      expect(BigInt(await nextValue(table, "id"))).toBeGreaterThan(BigInt(String(max[0]!.m)));
      await insertRows("finalized");
      await noDuplicates();
      if (identity === "a") {
        const e = await sqlState(
          db.admin.unsafe(`insert into ${L} (id, created_at, v) values (1000000, now(), 'explicit')`),
        );
        expect(e.code).toBe("428C9");
      }
    },
  );

  // Regression: the shadow's identity default is a SECURITY DEFINER function, so roles without USAGE on the sequence
  // can insert.
  it("an application role with INSERT and no sequence privilege can insert without id after cutover", async () => {
    const table: QualifiedName = { schema: "public", name: "ident_app" };
    const L = q(table);
    await db.admin.unsafe(`
      create table ${L} (id bigint generated always as identity primary key, created_at timestamptz not null
        default now(), v text);
      insert into ${L} (created_at, v) select now() - make_interval(days => g % 60), 'v' || g from
        generate_series(1, 50) g;
      grant select, insert on ${L} to ${ROLE};`);
    const asApp = (text: string) =>
      db.admin.begin(async (tx) => {
        await tx.unsafe(`set local role ${ROLE}`);
        return tx.unsafe(text);
      });
    const insert = `insert into ${L} (v) values ('app') returning id`;
    await asApp(insert);
    await startMigration(db.sql, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    await asApp(insert);
    expect((await backfill(db.sql, table)).complete).toBe(true);
    await cutover(db.sql, table);
    await asApp(insert); // fails here: permission denied for sequence ident_app_id_seq
    await finalize(db.sql, table, { yes: true });
    await asApp(insert);
  });

  // Regression: finalize re-creates the identity with the sequence's increment, bounds, cache and cycle.
  it("finalize re-creates the identity sequence with its options (increment, min/max, cache, cycle)", async () => {
    const table: QualifiedName = { schema: "public", name: "ident_opts" };
    const L = q(table);
    await db.admin.unsafe(`
      create table ${L} (
        id bigint generated by default as identity (start with 1000 increment by 5 minvalue 10 maxvalue 900000 cache 3
          cycle) primary key,
        created_at timestamptz not null default now(), v text);
      insert into ${L} (created_at, v) select now() - make_interval(days => g % 60), 'v' || g from
        generate_series(1, 50) g;`);
    const options = async () => {
      const name = (await db.admin`select pg_get_serial_sequence(${L}, 'id') as s`)[0]!.s as string | null;
      expect(name).not.toBeNull();
      const r = await db.admin`
        select data_type::text, min_value::text, max_value::text, increment_by::text, cycle, cache_size::text
          from pg_sequences where format('%I.%I', schemaname, sequencename)::regclass = ${name}::regclass`;
      return plain(r);
    };
    const before = await options();
    expect(before).toEqual([
      { data_type: "bigint", min_value: "10", max_value: "900000", increment_by: "5", cycle: true, cache_size: "3" },
    ]);
    await startMigration(db.sql, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    expect((await backfill(db.sql, table)).complete).toBe(true);
    await cutover(db.sql, table);
    await finalize(db.sql, table, { yes: true });
    const ids = await db.admin.unsafe(`insert into ${L} (v) values ('a'), ('b') returning id`);
    expect(Number(ids[1]!.id) - Number(ids[0]!.id)).toBe(5);
    expect(await options()).toEqual(before);
  });
});

describe("TRUNCATE guard", () => {
  const expectRefused = async (rel: QualifiedName, when: string) => {
    const e = await sqlState(db.admin.unsafe(`truncate ${q(rel)}`));
    expect(e.code, when).toBe("55006");
    expect(e.message, when).toMatch(/pgshift/);
  };
  const count = async (rel: QualifiedName) =>
    Number((await db.admin.unsafe(`select count(*)::int as n from ${q(rel)}`))[0]!.n);
  /** pgshift's triggers on the tables whose name starts with `t`'s (its shadow, retired table, partitions). */
  const pgshiftTriggers = async (t: QualifiedName) =>
    (
      await db.admin`
      select c.relname::text || '.' || g.tgname::text as t from pg_trigger g join pg_class c on c.oid = g.tgrelid
       where g.tgname like 'pgshift%' and not g.tgisinternal and starts_with(c.relname::text, ${t.name})`
    ).map((r) => String(r.t));
  const create = async (name: string) => {
    const t: QualifiedName = { schema: "Trunc Schema", name };
    await db.admin.unsafe(`
      create schema if not exists "Trunc Schema";
      create table ${q(t)} (id bigserial primary key, "Created At" timestamptz not null default now(), v text);
      insert into ${q(t)} ("Created At", v) select now() - make_interval(days => g), 'v' || g from
        generate_series(1, 60) g;`);
    return t;
  };

  // Both tables: a TRUNCATE of the copy (shadow before cutover, retired table after) would lose its rows at
  // the next cutover or swap-back.
  it("is refused on both tables (and every partition) from start to finalize; works after finalize", async () => {
    const t = await create("Trunc Final");
    const shadow: QualifiedName = { schema: t.schema, name: `${t.name}_pgshift_shadow` };
    const retired: QualifiedName = { schema: t.schema, name: `${t.name}_pgshift_retired` };
    const both = async (live: QualifiedName, copy: QualifiedName, when: string) => {
      await expectRefused(live, `${when}, live`);
      await expectRefused(copy, `${when}, copy`);
      const parted = (await relkind(live)) === "p" ? live : copy;
      const parts =
        await db.admin`select relid::regclass::text as name from pg_partition_tree(${q(parted)}) where level > 0`;
      expect(parts.length, when).toBeGreaterThan(1);
      for (const p of parts) {
        const e = await sqlState(db.admin.unsafe(`truncate ${String(p.name)}`));
        expect(e.code, `${when}, partition ${String(p.name)}`).toBe("55006");
      }
      expect(await count(live), when).toBe(60);
      expect(await count(copy), when).toBe(when === "started" ? 0 : 60);
    };
    await startMigration(db.sql, t, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
    await both(t, shadow, "started");
    expect((await backfill(db.sql, t)).complete).toBe(true);
    await both(t, shadow, "backfilled");
    await cutover(db.sql, t);
    expect(await relkind(t)).toBe("p");
    await both(t, retired, "cutover");
    await swapBack(db.sql, t);
    await both(t, shadow, "swapped back");
    await cutover(db.sql, t);
    await both(t, retired, "cutover again");
    await finalize(db.sql, t, { yes: true });
    await db.admin.unsafe(`truncate ${q(t)}`);
    expect(await count(t)).toBe(0);
    expect(await pgshiftTriggers(t)).toEqual([]);
  });

  // Regression: TRUNCATE of one partition fires only that partition's triggers, so the guard sits on each one.
  it("is refused on a partition of the new live table after cutover", async () => {
    const t = await create("Trunc Part");
    await startMigration(db.sql, t, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
    expect((await backfill(db.sql, t)).complete).toBe(true);
    await cutover(db.sql, t);
    const parts = await db.admin`
      select c.relname::text as name from pg_inherits h join pg_class c on c.oid = h.inhrelid
       where h.inhparent = to_regclass(${q(t)}) order by 1`;
    let refused = 0;
    for (const p of parts) {
      const part = { schema: t.schema, name: String(p.name) };
      if ((await count(part)) === 0) continue;
      await expectRefused(part, `cutover, partition ${part.name}`);
      refused++;
    }
    expect(refused).toBeGreaterThan(0);
    expect(await count(t)).toBe(60);
  });

  it("works again on the source after abort", async () => {
    const t = await create("Trunc Abort");
    await startMigration(db.sql, t, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
    await expectRefused(t, "started");
    await abort(db.sql, t);
    await db.admin.unsafe(`truncate ${q(t)}`);
    expect(await count(t)).toBe(0);
    expect(await pgshiftTriggers(t)).toEqual([]);
  });
});

/** A snapshot without the position of pgshift.migrations_id_seq: every start draws a migration id from it. */
function withoutBookkeeping(s: CatalogSnapshot): CatalogSnapshot {
  return {
    ...s,
    sequences: s.sequences.filter(
      (x) => !(x.includes('"schemaname":"pgshift"') && x.includes('"sequencename":"migrations_id_seq"')),
    ),
  };
}

describe("abort leaves the source exactly as before start", () => {
  const mirrorFunctionExists = async (fn: string) =>
    (
      await db.admin`select count(*)::int as n from pg_proc p join pg_namespace n on n.oid = p.pronamespace where
        n.nspname = 'pgshift' and p.proname = ${fn}`
    )[0]!.n;
  const rowType = async (rel: QualifiedName) =>
    plain(
      await db.admin`select t.typname::text as typ, a.typname::text as arr from pg_type t left join pg_type a on a.oid =
        t.typarray where t.typrelid = to_regclass(${q(rel)})`,
    );

  beforeAll(async () => {
    // The pgshift schema outlives every migration; create it first so that the snapshots compare the rest.
    for (const stmt of schemaSql()) await db.admin.unsafe(stmt);
  });

  for (const when of ["after start", "after cutover and swap-back"] as const) {
    it(when, async () => {
      const table = await createOrderItems(when === "after start" ? "Abort Start" : "Abort Swapped");
      const seq = (await serialSequence(table, "id"))!;
      const owners = await sequenceOwners(seq);
      const types = await rowType(table);
      const before = await catalogSnapshot(db.admin);

      await startMigration(db.sql, table, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
      const m = (await loadMigration(db.sql, table))!;
      expect(await oidOf(shadowOf(table))).not.toBeNull();
      expect(await mirrorFunctionExists(m.mirrorFn.name)).toBe(1);
      if (when !== "after start") {
        expect((await backfill(db.sql, table)).complete).toBe(true);
        expectEqual(await verify(db.sql, table));
        await cutover(db.sql, table);
        await swapBack(db.sql, table);
        expect((await loadMigration(db.sql, table))!.phase).toBe("swapped_back");
      }
      await abort(db.sql, table);

      expect(await loadMigration(db.sql, table)).toBeNull();
      expect(await oidOf(shadowOf(table))).toBeNull();
      expect(await mirrorFunctionExists(m.mirrorFn.name)).toBe(0);
      const after = await catalogSnapshot(db.admin);
      expect(withoutBookkeeping(after)).toEqual(withoutBookkeeping(before));
      // Not in the snapshot: who owns the sequence, and the row type names.
      expect(await sequenceOwners(seq)).toEqual(owners);
      expect(await rowType(table)).toEqual(types);
    });
  }
});

describe("generated columns", () => {
  it("are never written: backfill and both mirrors work and the values equal the source's", async () => {
    const table: QualifiedName = { schema: "public", name: "gen_items" };
    const L = q(table);
    await db.admin.unsafe(`
      create table ${L} (
        id int primary key, a int not null, doubled int generated always as (a * 2) stored,
        created_at timestamptz not null, b int, sum_ab int generated always as (a + coalesce(b, 0)) stored, label text);
      insert into ${L} (id, a, created_at, b, label)
        select g, g, now() - make_interval(days => g % 70), case when g % 4 = 0 then null else g * 10 end, 'l' || g
          from generate_series(1, 200) g;`);
    const cols = "id, a, doubled, created_at, b, sum_ab, label";
    const consistent = async (rel: QualifiedName) => {
      const r = await db.admin.unsafe(
        `select count(*)::int as n from ${q(rel)} where doubled is distinct from a * 2 or sum_ab is distinct from
          a + coalesce(b, 0)`,
      );
      expect(r[0]!.n, q(rel)).toBe(0);
    };

    const plan = await startMigration(db.sql, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    expect(plan.plan.copyColumns).toEqual(["id", "a", "created_at", "b", "label"]);
    const shadow = shadowOf(table);
    // Mirror before the backfill: insert, update of a base column, partition move, delete.
    await db.admin.unsafe(`
      insert into ${L} (id, a, created_at, b) values (1001, 7, now(), 3), (1002, 8, now() - interval '40 days', null);
      update ${L} set a = a + 100 where id in (5, 1001);
      update ${L} set b = 1, created_at = created_at - interval '31 days' where id = 6;
      delete from ${L} where id = 7;`);
    expect((await backfill(db.sql, table, { batchSize: 30 })).complete).toBe(true);
    await db.admin.unsafe(`update ${L} set a = a + 1 where id % 9 = 0; update ${L} set b = null where id = 1002;`);
    expect(await diffRows(table, shadow, cols)).toMatchObject({ onlyA: 0, onlyB: 0, rows: 201 });
    await consistent(shadow);
    expectEqual(await verify(db.sql, table));

    // After cutover the reverse mirror writes the retired table, which also has the generated columns.
    await cutover(db.sql, table);
    await db.admin.unsafe(`
      insert into ${L} (id, a, created_at, b) values (2001, 5, now(), 5);
      update ${L} set a = a * 3 where id % 10 = 1;
      delete from ${L} where id = 8;`);
    const m = (await loadMigration(db.sql, table))!;
    expect(await diffRows(table, m.copy, cols)).toMatchObject({ onlyA: 0, onlyB: 0, rows: 201 });
    await consistent(table);
    await consistent(m.copy);
    expectEqual(await verify(db.sql, table));
    await finalize(db.sql, table, { yes: true });
    await consistent(table);
  });
});
