import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { finalize } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { status } from "../../src/status.js";
import { verify } from "../../src/verify/verify.js";
import { describeRun, runCli } from "../support/cli.js";
import { createLoginRole, freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * Views follow the live table (issue 15): a view, a view of that view, a security_barrier view WITH CHECK
 * OPTION (and a security_invoker one on PostgreSQL 15 and later) read the table the application uses at every
 * step (after start, cutover, swap-back, a second cutover and finalize), keep their options, grants and
 * comments, and a reader role granted the view only sees what it saw; under concurrent writes checked against an
 * independent twin, in both mirror modes. `cutover --dry-run` prints the CREATE OR REPLACE VIEW it runs.
 */

let db: TestDatabase;
let reader: Awaited<ReturnType<typeof createLoginRole>>;
const opts = { lockTimeoutMs: 200, retries: 30 };

beforeAll(async () => {
  db = await freshDatabase();
  reader = await createLoginRole(db, "view_reader");
});

afterAll(async () => {
  await db?.close();
  await reader?.drop();
});

/** The relations a view reads directly (pg_depend of its _RETURN rule), as regclass text. */
async function viewReads(view: string): Promise<string[]> {
  const r = await db.admin`
    select distinct d.refobjid::regclass::text as t from pg_depend d join pg_rewrite w on w.oid = d.objid
     where d.classid = 'pg_rewrite'::regclass and w.ev_class = to_regclass(${view}) and d.refclassid =
       'pg_class'::regclass and d.refobjid <> w.ev_class order by 1`;
  return r.map((x) => String(x.t));
}

/** Options, comment and grants of a view: what CREATE OR REPLACE must keep. */
async function viewFacts(view: string) {
  const r = await db.admin`
    select c.reloptions::text[] as options, obj_description(c.oid, 'pg_class') as comment, c.relacl::text[] as acl,
           c.oid::int8 as oid
      from pg_class c where c.oid = to_regclass(${view})`;
  return r[0];
}

describe.each(["trigger", "logical"] as const)("views of a migrated table (%s mode)", (mode) => {
  it("read the live table at every step, with their options, grants and comments, under concurrent writes", {
    timeout: 240_000,
  }, async () => {
    const name = `vw_${mode}`;
    const table = { schema: "public", name };
    const w: Workload = { table, twin: { schema: "twin", name }, keyKind: "bigint" };
    await createWorkload(db.admin, w, 5_000);
    const invoker = Number((await db.admin`show server_version_num`)[0]!.server_version_num) >= 150000;
    await db.admin.unsafe(`
        create view ${name}_v as select id, status, amount from ${name} where amount >= 0;
        comment on view ${name}_v is 'orders with an amount';
        create view ${name}_v2 as select status, count(*) as n from ${name}_v group by status;
        create view ${name}_paid with (security_barrier) as select id, status from ${name} where status = 'paid'
          with local check option;
        ${invoker ? `create view ${name}_inv with (security_invoker = true) as select id from ${name};` : ""}
        create materialized view ${name}_mv as select status, count(*) as n from ${name} group by status;
        create unique index ${name}_mv_status on ${name}_mv (status);
        comment on materialized view ${name}_mv is 'orders by status';
        create view ${name}_mvv as select status from ${name}_mv;
        grant select on ${name}_v, ${name}_v2, ${name}_paid, ${name}_mv, ${name}_mvv to ${reader.name};`);
    const views = [`public.${name}_v`, `public.${name}_paid`, ...(invoker ? [`public.${name}_inv`] : [])];
    const before = await Promise.all([...views, `public.${name}_v2`].map(viewFacts));
    const readerSql = (await import("postgres")).default(reader.url, { max: 1, onnotice: () => {} });
    /** Every view reads `expected` (regclass text of the table the application uses), and works as before. */
    const check = async (step: string, expected: string) => {
      for (const v of views) expect(await viewReads(v), `${v} after ${step}`).toEqual([expected]);
      expect(await viewReads(`public.${name}_v2`), step).toEqual([`${name}_v`]);
      // The materialized view was rebuilt from the live table after the switch, with its index, grant and
      // comment; the view on it reads the rebuilt one; REFRESH ... CONCURRENTLY still works.
      expect(await viewReads(`public.${name}_mv`), step).toEqual([expected]);
      expect(await viewReads(`public.${name}_mvv`), step).toEqual([`${name}_mv`]);
      const mv = await db.admin`
        select obj_description(c.oid, 'pg_class') as comment, has_table_privilege(${reader.name}, c.oid, 'select') as g,
               (select array_agg(i.relname::text) from pg_index x join pg_class i on i.oid = x.indexrelid
                 where x.indrelid = c.oid and x.indisunique) as ix
          from pg_class c where c.oid = to_regclass(${`public.${name}_mv`})`;
      expect(mv[0], step).toEqual({ comment: "orders by status", g: true, ix: [`${name}_mv_status`] });
      await db.admin.unsafe(`refresh materialized view concurrently ${name}_mv`);
      const rows = await readerSql.unsafe(`select count(*)::int as n from ${name}_mvv`);
      expect(Number(rows[0]?.n), step).toBeGreaterThan(0);
      expect(await Promise.all([...views, `public.${name}_v2`].map(viewFacts)), step).toEqual(before);
      // What the view shows is what the table holds now (one snapshot: the load keeps writing), and the
      // reader granted the views reads them.
      const same = await db.admin.unsafe(
        `select (select count(*) from ${name}_v) = (select count(*) from ${name} where amount >= 0) as v,
                (select sum(n) from ${name}_v2) = (select count(*) from ${name} where amount >= 0) as v2`,
      );
      expect(same[0], step).toEqual({ v: true, v2: true });
      const seen = await readerSql.unsafe(`select count(*)::int as n from ${name}_v2`);
      expect(Number(seen[0]?.n), step).toBeGreaterThan(0);
      // WITH CHECK OPTION still refuses a row the view would not show.
      await expect(db.admin.unsafe(`insert into ${name}_paid (id, status) values (-1, 'new')`), step).rejects.toThrow(
        /check option/,
      );
      await expect(readerSql`select * from ${readerSql(name)} limit 1`, step).rejects.toThrow(/permission denied/);
    };
    const load = await startLoad(db.url, w, { connections: 3, pauseMs: mode === "logical" ? 3 : 1 });
    try {
      await startMigration(db.sql, table, {
        spec: parsePartitionSpec("range:created_at:month"),
        mode,
        allowKeyExtension: true,
        ...opts,
      });
      await check("start", name);
      expect((await backfill(db.sql, table)).complete).toBe(true);
      expect((await verify(db.sql, table)).equal).toBe(true);
      const dry = await runCli(["cutover", name, "--dry-run", "--url", db.url]);
      expect(dry.code, describeRun(dry)).toBe(0);
      expect(dry.stdout).toContain(`CREATE OR REPLACE VIEW "public"."${name}_v" AS`);
      expect(dry.stdout).toContain(
        `CREATE OR REPLACE VIEW "public"."${name}_paid" WITH (security_barrier=true, check_option=local) AS`,
      );
      await cutover(db.sql, table, opts);
      await check("cutover", name);
      await sleep(300);
      await swapBack(db.sql, table, opts);
      await check("swap-back", name);
      await sleep(300);
      await cutover(db.sql, table, opts);
      await check("the second cutover", name);
      await sleep(300);
    } finally {
      await load.stop();
    }
    expect(load.stats.errors, "load errors").toEqual([]);
    expect(load.stats.updates).toBeGreaterThan(10);
    expect((await verify(db.sql, table)).equal).toBe(true);
    await finalize(db.sql, table, { yes: true });
    await check("finalize", name);
    await readerSql.end();
    expect(await compareWithTwin(db.admin, table, w.twin, "bigint")).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
  });
});

describe("a view owned by another role", () => {
  it("is refused by plan, naming it and its owner", async () => {
    const name = "vw_owned";
    await db.admin.unsafe(`
      create table ${name} (id bigint primary key, created_at timestamptz not null);
      alter table ${name} owner to ${reader.name};
      create view ${name}_v as select id from ${name};
      create role ${reader.name}_other;
      alter view ${name}_v owner to ${reader.name}_other;`);
    const r = await runCli(["plan", name, "--partition-by", "hash:id:4", "--url", db.url]);
    // The test runs as a superuser, who may replace any view: plan lists it as carried.
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toContain(`view public.${name}_v: re-created with its own definition`);
    const asReader = await runCli(["plan", name, "--partition-by", "hash:id:4", "--url", reader.url]);
    expect(asReader.code, describeRun(asReader)).toBe(2);
    expect(asReader.stdout).toContain(
      `blocker: view public.${name}_v reads public.${name} and is owned by ${reader.name}_other`,
    );
    await db.admin.unsafe(`drop view ${name}_v; drop role ${reader.name}_other`);
  });
});

describe("a materialized view whose rebuild after the switch fails", () => {
  it("is pending in status and reads the copy; swap-back drops the replacement, finalize finishes it", async () => {
    const name = "mv_gate";
    const table = { schema: "public", name };
    await db.admin.unsafe(`
      create table ${name} (id bigint primary key, created_at timestamptz not null);
      insert into ${name} select i, timestamptz '2025-01-01' + i * interval '1 hour' from generate_series(1, 500) i;
      create table ${name}_closed (closed bool);
      create function ${name}_open() returns int language plpgsql as $$
        begin
          if exists (select from public.${name}_closed) then raise exception 'gate closed'; end if; return 1;
        end $$;
      create materialized view ${name}_mv as select count(*) * ${name}_open() as n from ${name};`);
    const reads = () => viewReads(`public.${name}_mv`);
    const pending = async () => (await status(db.sql, table)).pending;
    await startMigration(db.sql, table, { spec: parsePartitionSpec("hash:id:4"), ...opts });
    expect((await backfill(db.sql, table)).complete).toBe(true);
    await db.admin.unsafe(`insert into ${name}_closed values (true)`);
    await cutover(db.sql, table, opts);
    // The switch happened; the rebuild failed: the materialized view still reads the retired table.
    expect(await reads()).toEqual([`${name}_pgshift_retired`]);
    expect(await pending()).toEqual([
      `materialized view public.${name}_mv still reads public.${name}_pgshift_retired: its rebuild from ` +
        `public.${name} after the last switch did not finish; pgshift finalize finishes it first, and the next ` +
        `switch makes it read the table then live`,
    ]);
    const human = await runCli(["status", name, "--url", db.url]);
    expect(human.stdout).toContain(`pending: materialized view public.${name}_mv still reads`);
    // Swap-back: the original table is live again, the materialized view reads it, the replacement is gone.
    await swapBack(db.sql, table, opts);
    expect(await reads()).toEqual([name]);
    expect(await pending()).toEqual([]);
    expect((await db.admin`select to_regclass(${`public.${name}_mv_pgshift_next`}) as r`)[0]!.r).toBeNull();
    await cutover(db.sql, table, opts);
    expect(await pending()).toHaveLength(1);
    // Finalize finishes the rebuild first (the gate open again), then drops the retired table.
    await db.admin.unsafe(`delete from ${name}_closed`);
    const dry = await runCli(["finalize", name, "--dry-run", "--url", db.url]);
    expect(dry.code, describeRun(dry)).toBe(0);
    expect(dry.stdout).toContain(`REFRESH MATERIALIZED VIEW "public"."${name}_mv_pgshift_next";`);
    await finalize(db.sql, table, { yes: true });
    expect(await reads()).toEqual([name]);
    expect((await db.admin.unsafe(`select n from ${name}_mv`))[0]?.n).toBe("500");
  });
});
