import type postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import type { Sql } from "../../src/db.js";
import { finalize } from "../../src/migration/finish.js";
import { planMigration } from "../../src/migration/plan.js";
import { startMigration } from "../../src/migration/start.js";
import type { Mode } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { createSubscriber, type Subscriber } from "../support/subscriber.js";

/**
 * Publications (issue 15): a publication listing the table (with a row filter and a column list on PostgreSQL
 * 15+) keeps publishing the table the application uses, under its own name, and a real consumer (a subscription
 * in another database of the same cluster) receives the application's changes after start, after cutover, after
 * swap-back, after a second cutover and after finalize, in both mirror modes. A FOR TABLES IN SCHEMA (15+) or
 * FOR ALL TABLES publication no longer blocks, and plan says what its consumers see.
 */

let db: TestDatabase;
let version = 0;
const subscribers: Subscriber[] = [];

beforeAll(async () => {
  db = await freshDatabase();
  version = Number((await db.admin`select current_setting('server_version_num')::int as v`)[0]!.v);
});
afterAll(async () => {
  for (const s of subscribers) await s.drop();
  await db?.close();
});

const opts = { lockTimeoutMs: 200, retries: 30 };

/** The table's columns and rows, the same on the publisher and the subscriber. */
const tableSql = (t: string) => `
  create table ${t} (id bigserial primary key, created_at timestamptz not null, amount int not null, note text);
  insert into ${t} (id, created_at, amount, note)
    select i, timestamptz '2025-01-01 00:00+00' + i * interval '7 hours', i % 50, 'seed'
      from generate_series(1, 500) i;
  select setval('${t}_id_seq', 500);`;

/** A subscriber database with the table (and, `filtered`, the seed rows as the publication publishes them). */
async function subscribe(t: string, pub: string, filtered: boolean): Promise<postgres.Sql> {
  const sub = await createSubscriber(db, {
    suffix: t,
    publication: pub,
    slot: `sub_${t}`,
    copyData: false,
    setup: async (s) => {
      await s.unsafe(tableSql(t));
      // What the publication publishes of the seed rows (no initial copy: copy_data = false).
      if (filtered) await s.unsafe(`update ${t} set note = null; delete from ${t} where id % 5 = 0`);
    },
  });
  subscribers.push(sub);
  return sub.sql;
}

/**
 * Makes changes on the publisher (insert, update, delete) through the table's name, then waits until the
 * subscriber's table equals what the publication publishes of the publisher's (row filter, column list).
 */
async function changesArrive(sub: postgres.Sql, t: string, filtered: boolean, step: string): Promise<void> {
  const [r] = await db.admin.unsafe(
    `insert into ${t} (created_at, amount, note) values (now(), 7, 'x'), (now() - interval '40 days', 3, 'y'),
       (now(), 0, 'z') returning id`,
  );
  await db.admin.unsafe(`update ${t} set amount = amount + 1, note = 'changed' where id = $1`, [r!.id]);
  await db.admin.unsafe(`delete from ${t} where id in (select id from ${t} where note = 'seed' order by id limit 3)`);
  const where = filtered ? "where id % 5 <> 0" : "";
  const cols = filtered ? "id, created_at, amount, null::text as note" : "id, created_at, amount, note";
  const want = (await db.admin.unsafe(`select ${cols} from ${t} ${where} order by id`)).map((r) => JSON.stringify(r));
  let got: string[] = [];
  for (let i = 0; i < 150; i++) {
    got = (await sub.unsafe(`select id, created_at, amount, note from ${t} order by id`)).map((r) => JSON.stringify(r));
    if (got.join() === want.join()) return;
    await sleep(100);
  }
  const missing = want.filter((w) => !got.includes(w));
  const extra = got.filter((g) => !want.includes(g));
  expect({ missing, extra }, `${step}: the subscriber did not receive the changes`).toEqual({ missing: [], extra: [] });
}

describe.each<{ mode: Mode }>([{ mode: "trigger" }, { mode: "logical" }])(
  "a publication listing the table follows the live table ($mode mirror)",
  ({ mode }) => {
    it("a subscriber receives the application's changes under the table's name at every step", async () => {
      const t = `pub_orders_${mode}`;
      const table = { schema: "public", name: t };
      const filtered = version >= 150000;
      await db.admin.unsafe(tableSql(t));
      // Row filters and column lists exist from PostgreSQL 15 on; on 14 the publication lists the table only.
      await db.admin.unsafe(
        `create publication cdc_${mode} for table ${t}` +
          (filtered ? " (id, created_at, amount) where (id % 5 <> 0)" : ""),
      );
      const sub = await subscribe(t, `cdc_${mode}`, filtered);
      const spec = parsePartitionSpec("range:created_at:month");
      const p = await planMigration(db.sql, table, { spec, mode });
      expect(p.blockers).toEqual([]);
      expect(p.dependents.join("\n")).toContain(`publication cdc_${mode} (lists public.${t}`);
      expect(p.dependents.join("\n")).toContain("cutover sets publish_via_partition_root = true");
      await changesArrive(sub, t, filtered, "before start");
      await startMigration(db.sql, table, { spec, mode, allowKeyExtension: true, ...opts });
      expect((await backfill(db.sql, table, { batchSize: 200 })).complete).toBe(true);
      await changesArrive(sub, t, filtered, "after start and backfill");
      const c1 = await cutover(db.sql, table, opts);
      const pub = async () =>
        (
          await db.admin`
          select p.pubviaroot, (select array_agg(r.prrelid::regclass::text) from pg_publication_rel r
                                 where r.prpubid = p.oid) as tables,
                 (select c.relkind::text from pg_class c where c.oid = ${t}::regclass) as relkind
            from pg_publication p where p.pubname = ${`cdc_${mode}`}`
        )[0];
      expect(await pub()).toEqual({ pubviaroot: true, tables: [t], relkind: "p" });
      await changesArrive(sub, t, filtered, "after cutover");
      expect(c1.statements).toContain(`ALTER PUBLICATION "cdc_${mode}" DROP TABLE "public"."${t}_pgshift_retired"`);
      await swapBack(db.sql, table, opts);
      expect(await pub()).toEqual({ pubviaroot: true, tables: [t], relkind: "r" });
      await changesArrive(sub, t, filtered, "after swap-back");
      await cutover(db.sql, table, opts);
      expect(await pub()).toEqual({ pubviaroot: true, tables: [t], relkind: "p" });
      await changesArrive(sub, t, filtered, "after the second cutover");
      await finalize(db.sql, table, { yes: true });
      await changesArrive(sub, t, filtered, "after finalize");
      if (filtered) {
        const rel = await db.admin`
          select pg_get_expr(r.prqual, r.prrelid) as filter, r.prattrs::text as attrs
            from pg_publication_rel r join pg_publication p on p.oid = r.prpubid where p.pubname = ${`cdc_${mode}`}`;
        expect(rel).toEqual([{ filter: "((id % (5)::bigint) <> 0)", attrs: "1 2 3" }]);
      }
    });
  },
);

/**
 * A FOR ALL TABLES publication (which publishes pgshift's own tables too), and on 15+ a FOR TABLES IN SCHEMA one
 * (new in 15). Returns how plan names each.
 */
async function wholePublications(sql: Sql, schema: string): Promise<string[]> {
  await sql.unsafe(`create publication ${schema}_all for all tables`);
  const out = [`publication ${schema}_all (FOR ALL TABLES)`];
  if (version >= 150000) {
    await sql.unsafe(`create publication ${schema}_whole for tables in schema ${schema}`);
    out.push(`publication ${schema}_whole (FOR TABLES IN SCHEMA ${schema})`);
  }
  return out;
}

describe("FOR ALL TABLES and FOR TABLES IN SCHEMA publications", () => {
  it("no longer blocks: plan explains what its consumers see, and the migration runs to finalize", async () => {
    const schema = "wholepub";
    const t = "orders";
    const table = { schema, name: t };
    await db.admin.unsafe(`create schema ${schema}; set search_path = ${schema}; ${tableSql(t)}; reset search_path`);
    const labels = await wholePublications(db.admin, schema);
    const spec = parsePartitionSpec("range:created_at:month");
    const p = await planMigration(db.sql, table, { spec });
    expect(p.blockers).toEqual([]);
    for (const label of labels) {
      const line = p.dependents.find((l) => l.startsWith(label));
      expect(line, p.dependents.join("\n")).toBeDefined();
      expect(line).toContain(`also publishes pgshift's tables: during the migration ${schema}.${t}_pgshift_shadow`);
      expect(line).toContain(`after cutover ${schema}.${t}_pgshift_retired`);
      expect(line).toContain('"logical replication target relation ... does not exist"');
      expect(line).toContain("under its partitions' names (publish_via_partition_root is off");
    }
    expect(p.dependents.find((l) => l.startsWith(labels[0]!))).toContain("pgshift's state (pgshift.migrations");
    await startMigration(db.sql, table, { spec, allowKeyExtension: true, ...opts });
    expect((await backfill(db.sql, table)).complete).toBe(true);
    await cutover(db.sql, table, opts);
    await finalize(db.sql, table, { yes: true });
    // publish_via_partition_root off: the partitioned table is published under its partitions' names, as plan said.
    const published = await db.admin`
      select count(*)::int as n from pg_publication_tables p join pg_inherits i
          on i.inhrelid = format('%I.%I', p.schemaname, p.tablename)::regclass
       where p.pubname = ${`${schema}_all`} and i.inhparent = ${`${schema}.${t}`}::regclass`;
    expect(published[0]!.n).toBeGreaterThan(3);
    await db.admin.unsafe(`drop publication ${schema}_all; drop publication if exists ${schema}_whole`);
  });
});
