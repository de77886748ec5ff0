import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import type { Sql } from "../../src/db.js";
import { finalize } from "../../src/migration/finish.js";
import { planMigration } from "../../src/migration/plan.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, type Mode } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { status } from "../../src/status.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * Foreign keys of other tables (issue 15): order_items.order_id REFERENCES orders(id) ON DELETE CASCADE, with
 * orders partitioned by hash on id, through start, backfill, verify, cutover, swap-back, cutover and finalize in
 * both mirror modes, under concurrent writes to both tables checked against an independent twin (changed in the
 * same transactions). At each step an orphan item is refused, deleting an order deletes its items, the foreign key
 * references the table the application uses and is validated. plan refuses a spec the foreign key cannot follow.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

const opts = { lockTimeoutMs: 200, retries: 30 };
const FK = "order_items_order_id_fkey";

async function createSchema(sql: Sql, orders: string): Promise<void> {
  const items = `${orders}_items`;
  const schema = (s: string, fk: string) => `
    create table ${s}${orders} (id bigserial primary key, created_at timestamptz not null default now(), note text);
    create table ${s}${items} (id bigserial primary key, order_id bigint not null ${fk}, qty int not null);`;
  await sql.unsafe(`
    create schema if not exists twin;
    ${schema("public.", `constraint ${FK} references public.${orders} (id) on delete cascade`)}
    ${schema("twin.", `references twin.${orders} (id) on delete cascade`)}
    comment on constraint ${FK} on public.${items} is 'every item belongs to an order';
    create table public.${orders}_notes (id int primary key, order_id bigint);
    insert into public.${orders} (id, created_at, note)
      select i, now() - i * interval '1 hour', 'order ' || i from generate_series(1, 3000) i;
    select setval('public.${orders}_id_seq', 3000);
    insert into twin.${orders} select * from public.${orders};
    insert into public.${items} (order_id, qty) select 1 + i % 3000, i % 7 from generate_series(1, 6000) i;
    insert into twin.${items} select * from public.${items};
    select setval('twin.${items}_id_seq', 6000);
    insert into public.${orders}_notes values (1, -1);
    alter table public.${orders}_notes add constraint ${orders}_notes_order_fkey foreign key (order_id)
      references public.${orders} (id) not valid;`);
}

interface Load {
  stop: () => Promise<void>;
  errors: string[];
  writes: number;
}

/**
 * Workers each writing to orders and items they created (or were given), and to the twin in the same
 * transaction: new orders with items, items added, notes changed, orders deleted (their items cascade).
 */
function startLoad(url: string, orders: string, workers: number): Load {
  const items = `${orders}_items`;
  const errors: string[] = [];
  let stopped = false;
  let writes = 0;
  const conns: postgres.Sql[] = [];
  const run = async (k: number) => {
    const sql = postgres(url, { max: 1, onnotice: () => {} });
    conns.push(sql);
    const mine: number[] = [];
    for (let i = 1; i <= 3000; i++) if (i % workers === k) mine.push(i);
    while (!stopped) {
      const op = Math.random();
      try {
        await sql.begin(async (tx) => {
          if (op < 0.35 || mine.length < 50) {
            const [o] = await tx.unsafe(`insert into public.${orders} (note) values ('new') returning id`);
            await tx.unsafe(`insert into twin.${orders} select * from public.${orders} where id = $1`, [o!.id]);
            for (let j = 0; j < 2; j++) {
              const [it] = await tx.unsafe(`insert into public.${items} (order_id, qty) values ($1, $2) returning id`, [
                o!.id,
                j,
              ]);
              await tx.unsafe(`insert into twin.${items} values ($1, $2, $3)`, [it!.id, o!.id, j]);
            }
            mine.push(Number(o!.id));
          } else if (op < 0.55) {
            const id = mine.splice(Math.floor(Math.random() * mine.length), 1)[0]!;
            await tx.unsafe(`delete from public.${orders} where id = $1`, [id]);
            await tx.unsafe(`delete from twin.${orders} where id = $1`, [id]);
          } else if (op < 0.8) {
            const id = mine[Math.floor(Math.random() * mine.length)]!;
            const [it] = await tx.unsafe(`insert into public.${items} (order_id, qty) values ($1, 9) returning id`, [
              id,
            ]);
            await tx.unsafe(`insert into twin.${items} values ($1, $2, 9)`, [it!.id, id]);
          } else {
            const id = mine[Math.floor(Math.random() * mine.length)]!;
            const note = `n${Math.random()}`;
            await tx.unsafe(`update public.${orders} set note = $2 where id = $1`, [id, note]);
            await tx.unsafe(`update twin.${orders} set note = $2 where id = $1`, [id, note]);
          }
        });
        writes++;
      } catch (err) {
        errors.push(err instanceof Error ? err.message : String(err));
      }
      await sleep(2);
    }
  };
  const running = Array.from({ length: workers }, (_, k) => run(k));
  return {
    errors,
    get writes() {
      return writes;
    },
    stop: async () => {
      stopped = true;
      await Promise.all(running);
      await Promise.all(conns.map((c) => c.end({ timeout: 5 })));
    },
  };
}

/** The foreign key works on the table the application uses: orphans refused, deletes cascade, it references it. */
async function checkForeignKey(orders: string, relkind: "r" | "p"): Promise<void> {
  const items = `${orders}_items`;
  const orphan = await db.admin
    .unsafe(`insert into public.${items} (order_id, qty) values (-42, 1)`)
    .catch((e: unknown) => e);
  expect((orphan as { code?: string }).code, String(orphan)).toBe("23503");
  expect(String(orphan)).toContain(FK);
  await db.admin.begin(async (tx) => {
    const [o] = await tx.unsafe(`insert into public.${orders} (note) values ('cascade') returning id`);
    await tx.unsafe(`insert into public.${items} (order_id, qty) values ($1, 1), ($1, 2)`, [o!.id]);
    await tx.unsafe(`delete from public.${orders} where id = $1`, [o!.id]);
    const left = await tx.unsafe(`select count(*)::int as n from public.${items} where order_id = $1`, [o!.id]);
    expect(left[0]!.n).toBe(0);
  });
  const con = await db.admin`
    select c.confrelid = to_regclass(${`public.${orders}`}) as live, r.relkind::text as relkind, c.convalidated,
           c.confdeltype::text as del, obj_description(c.oid, 'pg_constraint') as comment
      from pg_constraint c join pg_class r on r.oid = c.confrelid
     where c.conname = ${FK} and c.conrelid = to_regclass(${`public.${items}`}) and c.conparentid = 0`;
  expect(con).toEqual([
    { live: true, relkind, convalidated: true, del: "c", comment: "every item belongs to an order" },
  ]);
  // The foreign key that was NOT VALID before the migration follows too, and stays NOT VALID.
  const notes = await db.admin`
    select c.confrelid = to_regclass(${`public.${orders}`}) as live, c.convalidated from pg_constraint c
     where c.conname = ${`${orders}_notes_order_fkey`} and c.conparentid = 0`;
  expect(notes).toEqual([{ live: true, convalidated: false }]);
}

async function expectEqualToTwin(orders: string): Promise<void> {
  for (const t of [orders, `${orders}_items`]) {
    const r = await db.admin.unsafe(`
      select (select count(*) from (select * from public.${t} except select * from twin.${t}) a)::int as only_live,
             (select count(*) from (select * from twin.${t} except select * from public.${t}) b)::int as only_twin,
             (select count(*) from twin.${t})::int as rows`);
    expect(r[0], t).toMatchObject({ only_live: 0, only_twin: 0 });
    expect(r[0]!.rows).toBeGreaterThan(2000);
  }
}

describe.each<{ mode: Mode }>([{ mode: "trigger" }, { mode: "logical" }])(
  "a foreign key of another table follows the live table ($mode mirror)",
  ({ mode }) => {
    const title =
      "under concurrent writes: orphans refused and deletes cascading at every step, validated after each switch";
    it(title, async () => {
      const orders = `fk_orders_${mode}`;
      const table = { schema: "public", name: orders };
      await createSchema(db.admin, orders);
      const p = await planMigration(db.sql, table, { spec: parsePartitionSpec("hash:id:4"), mode });
      expect(p.blockers).toEqual([]);
      expect(p.dependents.join("\n")).toContain(`foreign key ${FK} on public.${orders}_items`);
      const load = startLoad(db.url, orders, 3);
      try {
        await sleep(200);
        await startMigration(db.sql, table, { spec: parsePartitionSpec("hash:id:4"), mode, ...opts });
        await checkForeignKey(orders, "r");
        expect((await backfill(db.sql, table, { batchSize: 1000, sleepMs: 10 })).complete).toBe(true);
        await checkForeignKey(orders, "r");
        expect((await verify(db.sql, table, { chunkSize: 2000 })).equal).toBe(true);
        // status: the foreign key that was NOT VALID before the migration, with the statement that validates it.
        expect((await status(db.sql, table)).pending).toEqual([
          expect.stringContaining(`ALTER TABLE public.${orders}_notes VALIDATE CONSTRAINT`),
        ]);
        const c1 = await cutover(db.sql, table, opts);
        await checkForeignKey(orders, "p");
        expect(c1.statements).toContain(`ALTER TABLE public.${orders}_items VALIDATE CONSTRAINT "${FK}"`);
        // The referenced table schema-qualified, whatever the search_path of whoever runs the printed plan.
        expect(c1.statements).toContain(
          `ALTER TABLE public.${orders}_items ADD CONSTRAINT "${FK}" FOREIGN KEY (order_id) ` +
            `REFERENCES public.${orders}(id) ON DELETE CASCADE NOT VALID`,
        );
        await sleep(300);
        expect((await verify(db.sql, table, { chunkSize: 2000 })).equal).toBe(true);
        await swapBack(db.sql, table, opts);
        await checkForeignKey(orders, "r");
        await sleep(300);
        await cutover(db.sql, table, opts);
        await checkForeignKey(orders, "p");
        await sleep(300);
      } finally {
        await load.stop();
      }
      expect(load.errors).toEqual([]);
      expect(load.writes).toBeGreaterThan(100);
      await expectEqualToTwin(orders);
      const m = (await loadMigration(db.sql, table))!;
      expect(m.phase).toBe("cutover");
      expect((await verify(db.sql, table)).equal).toBe(true);
      await finalize(db.sql, table, { yes: true });
      await checkForeignKey(orders, "p");
      await expectEqualToTwin(orders);
    });
  },
);

describe("a spec the foreign key cannot follow", () => {
  it("plan refuses it naming the foreign key, why, and specs that would allow it", async () => {
    const orders = "fk_orders_refused";
    await createSchema(db.admin, orders);
    const p = await planMigration(
      db.sql,
      { schema: "public", name: orders },
      {
        spec: parsePartitionSpec("range:created_at:month"),
      },
    );
    const b = p.blockers.find((x) => x.includes(`foreign key ${FK} on public.${orders}_items`));
    expect(b, p.blockers.join("\n")).toBeDefined();
    expect(b).toContain("references (id)");
    expect(b).toContain("must contain the partition column created_at");
    expect(b).toContain("hash:id:8, range:id:<width>");
    expect(p.blockers.join("\n")).toContain(`foreign key ${orders}_notes_order_fkey on public.${orders}_notes`);
  });
});

describe("a foreign key of a partitioned table", () => {
  const title =
    "is refused by plan before PostgreSQL 18 (no NOT VALID foreign key on a partitioned table), carried on 18";
  it(title, async () => {
    const orders = "fk_orders_partref";
    const table = { schema: "public", name: orders };
    await db.admin.unsafe(`
      create table ${orders} (id bigint primary key, note text);
      insert into ${orders} select i, 'o' from generate_series(1, 200) i;
      create table ${orders}_lines (id int, order_id bigint not null, primary key (id, order_id))
        partition by hash (order_id);
      create table ${orders}_lines_0 partition of ${orders}_lines for values with (modulus 2, remainder 0);
      create table ${orders}_lines_1 partition of ${orders}_lines for values with (modulus 2, remainder 1);
      alter table ${orders}_lines add constraint ${orders}_lines_fk foreign key (order_id)
        references ${orders} (id) on delete cascade;
      insert into ${orders}_lines select i, i from generate_series(1, 200) i;`);
    const version = Number((await db.admin`select current_setting('server_version_num')::int as v`)[0]!.v);
    const spec = parsePartitionSpec("hash:id:4");
    const p = await planMigration(db.sql, table, { spec });
    const label = `foreign key ${orders}_lines_fk on public.${orders}_lines`;
    if (version < 180000) {
      expect(p.blockers).toEqual([
        `${label}: public.${orders}_lines is partitioned, and PostgreSQL before 18 cannot add a NOT VALID foreign ` +
          `key to a partitioned table, so re-creating it would check every row of public.${orders}_lines while ` +
          "the switch blocks writes",
      ]);
      return;
    }
    expect(p.blockers).toEqual([]);
    await startMigration(db.sql, table, { spec, ...opts });
    expect((await backfill(db.sql, table)).complete).toBe(true);
    await cutover(db.sql, table, opts);
    await swapBack(db.sql, table, opts);
    await cutover(db.sql, table, opts);
    const con = async () =>
      db.admin`select c.confrelid = to_regclass(${`public.${orders}`}) as live, c.convalidated
                 from pg_constraint c where c.conname = ${`${orders}_lines_fk`} and c.conparentid = 0`;
    expect(await con()).toEqual([{ live: true, convalidated: true }]);
    await db.admin.unsafe(`delete from ${orders} where id = 7`);
    const left = await db.admin.unsafe(`select count(*)::int as n from ${orders}_lines where order_id = 7`);
    expect(left[0]!.n).toBe(0);
    await finalize(db.sql, table, { yes: true });
    expect(await con()).toEqual([{ live: true, convalidated: true }]);
  });
});
