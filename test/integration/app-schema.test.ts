import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import type { Sql } from "../../src/db.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { finalize } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { describeRun, runCli } from "../support/cli.js";
import { createLoginRole, freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { createSubscriber, type Subscriber } from "../support/subscriber.js";

/**
 * A typical application schema migrated under load (issue 15): `orders` (the concurrency test's workload, with
 * its independent twin) has a view, a materialized view, an updated_at BEFORE UPDATE trigger, an audit AFTER
 * trigger writing to another table, row-level security with a tenant policy read by a non-owner role, column
 * grants for a reporting role, a publication read by a subscriber database (a real subscription), and
 * `order_items` referencing it with ON DELETE CASCADE. Through start, backfill, verify, cutover, swap-back,
 * cutover and finalize, in both mirror modes, at each step: the views read the live table; `updated_at` changes
 * on update; a tenant sees only its rows; the reporting role reads only its columns; the publication has the
 * live table and its consumer gets the changes under the table's own name; an orphan order item is refused and
 * deleting an order cascades. At the end: one audit row per application write (the twin has the same audit
 * trigger, so its audit table counts the load's writes independently), no load error, the live table equals the
 * twin. A spec the foreign key cannot follow is refused by plan, naming the foreign key.
 */

let db: TestDatabase;
let tenant: Awaited<ReturnType<typeof createLoginRole>>;
let reporting: Awaited<ReturnType<typeof createLoginRole>>;
const opts = { lockTimeoutMs: 200, retries: 30 };

beforeAll(async () => {
  db = await freshDatabase();
  tenant = await createLoginRole(db, "app_tenant");
  reporting = await createLoginRole(db, "app_reporting");
});

afterAll(async () => {
  for (const s of subscribers) await s.drop();
  await db?.close();
  await tenant?.drop();
  await reporting?.drop();
});

/** The application's schema around the workload table `name` and its twin. */
async function createSchema(sql: Sql, name: string): Promise<void> {
  await sql.unsafe(`
    alter table ${name} add column updated_at timestamptz;
    create table ${name}_audit (n bigserial primary key, op text not null, id bigint not null);
    create table twin.${name}_audit (n bigserial primary key, op text not null, id bigint not null);
    create function ${name}_touch() returns trigger language plpgsql as $$
      begin new.updated_at := clock_timestamp(); return new; end $$;
    create function ${name}_audit() returns trigger language plpgsql as $$
      begin
        execute format('insert into %s (op, id) values ($1, $2)', tg_argv[0])
          using tg_op, case when tg_op = 'DELETE' then old.id else new.id end;
        return null;
      end $$;
    create trigger ${name}_touch before update on ${name} for each row execute function ${name}_touch();
    create trigger ${name}_audit after insert or update or delete on ${name}
      for each row execute function ${name}_audit('public.${name}_audit');
    create trigger ${name}_audit after insert or update or delete on twin.${name}
      for each row execute function ${name}_audit('twin.${name}_audit');
    create view ${name}_v as select id, region, status, amount from ${name} where status is not null;
    create materialized view ${name}_mv as select region, count(*) as n from ${name} group by region;
    create unique index on ${name}_mv (region);
    alter table ${name} enable row level security;
    create policy ${name}_tenant on ${name} for select to ${tenant.name} using (region = 'emea');
    create policy ${name}_reporting on ${name} for select to ${reporting.name} using (true);
    grant select on ${name} to ${tenant.name};
    grant select (id, status, created_at) on ${name} to ${reporting.name};
    create publication ${name}_pub for table ${name};
    create table ${name}_items (id bigserial primary key,
      tenant_id int not null default 1, order_id bigint not null, qty int not null default 1,
      foreign key (tenant_id, order_id) references ${name} (tenant_id, id) on delete cascade);`);
}

/** The subscriber databases (dropped after the file). */
const subscribers: Subscriber[] = [];

/**
 * A subscriber database with its own `name` table (the workload's columns and updated_at) subscribed to the
 * publication, with the initial copy.
 */
async function subscribe(name: string): Promise<postgres.Sql> {
  const sub = await createSubscriber(db, {
    suffix: name,
    publication: `${name}_pub`,
    slot: `${name}_sub`,
    copyData: true,
    setup: (s) =>
      s.unsafe(`create table ${name} (tenant_id int not null, id bigint not null, primary key (tenant_id, id),
        created_at timestamptz not null, region text not null, status text, amount numeric(12,2), note text,
        data jsonb, total numeric generated always as (amount * 2) stored, updated_at timestamptz)`),
  });
  subscribers.push(sub);
  return sub.sql;
}

/** Waits until the subscriber has the row `id` with `status` (at most 15 s); false if it never comes. */
async function arrives(sub: postgres.Sql, name: string, id: number, status: string): Promise<boolean> {
  for (let i = 0; i < 150; i++) {
    const r = await sub.unsafe(`select status from ${name} where tenant_id = 1 and id = ${id}`);
    if (r[0]?.status === status) return true;
    await sleep(100);
  }
  return false;
}

describe.each(["trigger", "logical"] as const)("an application schema around orders (%s mode)", (mode) => {
  it("keeps working at every step of the migration under concurrent writes", { timeout: 300_000 }, async () => {
    const name = `app_${mode}`;
    const table = { schema: "public", name };
    // Composite keys: the load never changes a row's partition column (tenant_id), so no UPDATE moves a row to
    // another partition, which PostgreSQL turns into a DELETE and an INSERT for row triggers (docs: CREATE
    // TRIGGER, "Notes"): each application write is then exactly one audit row on either table.
    const w: Workload = { table, twin: { schema: "twin", name }, keyKind: "composite" };
    await createWorkload(db.admin, w, 5_000);
    await createSchema(db.admin, name);
    const sub = await subscribe(name);
    const asTenant = postgres(tenant.url, { max: 1, onnotice: () => {} });
    const asReporting = postgres(reporting.url, { max: 1, onnotice: () => {} });
    let nextId = 1_000_000_000;
    /** One order written by the test (in the twin too, so that the comparison holds), with `items` items. */
    const order = async (items: number) => {
      const id = nextId++;
      for (const t of [name, `twin.${name}`])
        await db.admin.unsafe(
          `insert into ${t} (tenant_id, id, created_at, region, status) ` +
            `values (1, ${id}, '2025-06-01 00:00+00', 'emea', 'new')`,
        );
      for (let i = 0; i < items; i++) await db.admin.unsafe(`insert into ${name}_items (order_id) values (${id})`);
      return id;
    };
    const check = async (step: string) => {
      const live = (await db.admin`select to_regclass(${`public.${name}`})::oid as o`)[0]!.o;
      // The view and the materialized view read the live table.
      const reads = await db.admin`
          select c.relname::text as v, array_agg(distinct d.refobjid) as r from pg_depend d
            join pg_rewrite w on w.oid = d.objid join pg_class c on c.oid = w.ev_class
           where c.relname in (${`${name}_v`}, ${`${name}_mv`}) and d.refclassid = 'pg_class'::regclass
             and d.refobjid <> w.ev_class group by 1 order by 1`;
      expect(
        reads.map((r) => [r.v, r.r]),
        step,
      ).toEqual([
        [`${name}_mv`, [live]],
        [`${name}_v`, [live]],
      ]);
      const same = await db.admin.unsafe(
        `select (select count(*) from ${name}_v) = (select count(*) from ${name} where status is not null) as v`,
      );
      expect(same[0]?.v, step).toBe(true);
      await db.admin.unsafe(`refresh materialized view concurrently ${name}_mv`);
      const mv = await db.admin.unsafe(`select sum(n)::int as n from ${name}_mv`);
      expect(Number(mv[0]?.n), step).toBeGreaterThan(4000);
      // updated_at changes on update (the BEFORE trigger fires on the live table).
      const id = await order(0);
      for (const t of [name, `twin.${name}`])
        await db.admin.unsafe(`update ${t} set status = 'paid' where tenant_id = 1 and id = ${id}`);
      const touched = await db.admin.unsafe(
        `select updated_at is not null as t from ${name} where tenant_id = 1 and id = ${id}`,
      );
      expect(touched[0]?.t, step).toBe(true);
      // A tenant sees only its rows; the reporting role reads only its columns.
      const seen = await asTenant.unsafe(
        `select count(*)::int as n, count(*) filter (where region <> 'emea')::int as other from ${name}`,
      );
      expect(seen[0]?.other, step).toBe(0);
      expect(seen[0]?.n, step).toBeGreaterThan(0);
      const rep = await asReporting.unsafe(`select count(*)::int as n from (select id, status from ${name}) x`);
      expect(rep[0]?.n, step).toBeGreaterThan(4000);
      await expect(asReporting.unsafe(`select amount from ${name} limit 1`), step).rejects.toThrow(/permission denied/);
      // The publication has the live table; its consumer got the changes under the table's own name.
      const pub = await db.admin`select tablename::text as t from pg_publication_tables
                                    where pubname = ${`${name}_pub`}`;
      expect(
        pub.map((r) => r.t),
        step,
      ).toEqual([name]);
      expect(await arrives(sub, name, id, "paid"), `${step}: the subscriber got the update`).toBe(true);
      // An orphan order item is refused; deleting an order cascades to its items.
      await expect(db.admin.unsafe(`insert into ${name}_items (order_id) values (-1)`), step).rejects.toThrow(
        /foreign key/,
      );
      const doomed = await order(2);
      for (const t of [name, `twin.${name}`])
        await db.admin.unsafe(`delete from ${t} where tenant_id = 1 and id = ${doomed}`);
      const left = await db.admin.unsafe(`select count(*)::int as n from ${name}_items where order_id = ${doomed}`);
      expect(left[0]?.n, step).toBe(0);
      const fk = await db.admin`select confrelid::oid as r from pg_constraint where conrelid =
          to_regclass(${`public.${name}_items`}) and contype = 'f' and conparentid = 0`;
      expect(
        fk.map((r) => r.r),
        step,
      ).toEqual([live]);
    };
    await check("before start");
    const load = await startLoad(db.url, w, { connections: 3, pauseMs: mode === "logical" ? 3 : 1 });
    try {
      await sleep(200);
      await startMigration(db.sql, table, { spec: parsePartitionSpec("hash:tenant_id:4"), mode, ...opts });
      await check("start");
      expect((await backfill(db.sql, table, { batchSize: 2000 })).complete).toBe(true);
      expect((await verify(db.sql, table)).equal).toBe(true);
      await check("backfill and verify");
      await cutover(db.sql, table, opts);
      await sleep(300);
      await check("cutover");
      await swapBack(db.sql, table, opts);
      await sleep(300);
      await check("swap-back");
      await cutover(db.sql, table, opts);
      await sleep(300);
      await check("the second cutover");
    } finally {
      await load.stop();
    }
    expect(load.stats.errors, "load errors").toEqual([]);
    expect(load.stats.updates).toBeGreaterThan(20);
    expect((await verify(db.sql, table)).equal).toBe(true);
    await finalize(db.sql, table, { yes: true });
    await check("finalize");
    await asTenant.end();
    await asReporting.end();
    // The subscriber, which got every change under the table's name, ends equal to the live table.
    const rows = async (q: postgres.Sql) =>
      (await q.unsafe(`select tenant_id, id, status, amount, region, note from ${name} order by 1, 2`)).map((r) =>
        JSON.stringify(r),
      );
    const want = await rows(db.admin as unknown as postgres.Sql);
    let got: string[] = [];
    for (let i = 0; i < 200 && got.join() !== want.join(); i++) {
      got = await rows(sub);
      if (got.join() !== want.join()) await sleep(100);
    }
    expect(got.length).toBe(want.length);
    expect(got.join() === want.join(), "the subscriber equals the live table").toBe(true);
    expect(await compareWithTwin(db.admin, table, w.twin, "composite")).toMatchObject({
      onlyInTable: 0,
      onlyInTwin: 0,
    });
    // One audit row per application write: the same writes went to the twin, whose trigger counted them.
    const audit = await db.admin.unsafe(`
        select (select array_agg(x order by x) from (select op || ':' || count(*) as x from ${name}_audit
                 group by op) a) as live,
               (select array_agg(x order by x) from (select op || ':' || count(*) as x from twin.${name}_audit
                 group by op) b) as twin`);
    expect(audit[0]?.live).toEqual(audit[0]?.twin);
    expect(((audit[0]?.live as string[]) ?? []).length).toBe(3);
  });
});

describe("a spec the foreign key cannot follow", () => {
  it("is refused by plan, naming the foreign key", async () => {
    const name = "app_refused";
    const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
    await createWorkload(db.admin, w, 100);
    await db.admin.unsafe(`
      create table ${name}_items (id bigserial primary key,
        order_id bigint not null references ${name} (id) on delete cascade)`);
    const r = await runCli(["plan", name, "--partition-by", "range:created_at:month", "--url", db.url]);
    expect(r.code, describeRun(r)).toBe(2);
    expect(r.stdout).toContain(`${name}_items_order_id_fkey`);
    expect(r.stdout).toContain("hash:id:");
  });
});
