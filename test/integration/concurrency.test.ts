import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import { compareWithTwin, createWorkload, type KeyKind, startLoad, type Workload } from "../../src/load/workload.js";
import { finalize } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, type Mode } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * The concurrency test: several connections insert, update (partition-key moves, primary-key changes,
 * NULLs, large TOASTed values, updates that leave TOASTed values alone) and delete on the table and, in
 * the same transactions, on an independent twin, while start, backfill, verify, cutover, swap-back and
 * cutover run. Afterwards the live table and the retired table both equal the twin row for row
 * (two-way EXCEPT), verify agrees, and the load saw no error.
 */
const cases: { name: string; keyKind: KeyKind; spec: string; mode: Mode }[] = [
  { name: "range by month, bigint key", keyKind: "bigint", spec: "range:created_at:month", mode: "trigger" },
  { name: "list by region, bigint key", keyKind: "bigint", spec: "list:region", mode: "trigger" },
  { name: "hash, uuid key", keyKind: "uuid", spec: "hash:id:8", mode: "trigger" },
  { name: "range by quarter, composite key", keyKind: "composite", spec: "range:created_at:quarter", mode: "trigger" },
  {
    name: "logical mode, range by month, bigint key",
    keyKind: "bigint",
    spec: "range:created_at:month",
    mode: "logical",
  },
  { name: "logical mode, list by region, bigint key", keyKind: "bigint", spec: "list:region", mode: "logical" },
  { name: "logical mode, hash, uuid key", keyKind: "uuid", spec: "hash:id:8", mode: "logical" },
  {
    name: "logical mode, range by quarter, composite key",
    keyKind: "composite",
    spec: "range:created_at:quarter",
    mode: "logical",
  },
];

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

describe.each(cases)("online migration under concurrent writes: $name", ({ keyKind, spec, mode }) => {
  it("loses, invents and corrupts no row through start, backfill, verify, cutover, swap-back, cutover", async () => {
    const name = `orders_${keyKind}_${spec.split(":")[0]}_${mode}`;
    const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind };
    await createWorkload(db.admin, w, 30_000);
    const indexNames = async () =>
      (
        await db.admin`select c.relname::text as n from pg_index i join pg_class c on c.oid = i.indexrelid
                      where i.indrelid = to_regclass(${`public.${name}`}) order by 1`
      ).map((r) => String(r.n));
    const constraintNames = async () =>
      (
        await db.admin`select conname::text as n from pg_constraint where conrelid =
          to_regclass(${`public.${name}`}) order by 1`
      ).map((r) => String(r.n));
    const originalIndexes = await indexNames();
    const originalConstraints = await constraintNames();
    // In logical mode the applier runs on the same 2 cores as the load and the server: a little slower load.
    const load = await startLoad(db.url, w, { connections: 4, pauseMs: mode === "logical" ? 3 : 1 });
    const opts = { lockTimeoutMs: 200, retries: 30 };
    try {
      await sleep(300);
      await startMigration(db.sql, w.table, { allowKeyExtension: true, spec: parsePartitionSpec(spec), mode, ...opts });
      await sleep(200);
      const bf = await backfill(db.sql, w.table, { batchSize: 2000, sleepMs: 40 });
      expect(bf.complete).toBe(true);
      // every index of the source exists on the shadow, valid (secondary ones were built after the copy)
      const ix = await db.admin`
        select (select count(*) from pg_index where indrelid = to_regclass(${`public.${name}`}))::int as source,
               (select count(*) from pg_index where indrelid = to_regclass(${`public.${name}_pgshift_shadow`}) and
                 indisvalid)::int as shadow,
               (select count(*) from pg_index i join pg_inherits h on h.inhrelid = i.indrelid
                 where h.inhparent = to_regclass(${`public.${name}_pgshift_shadow`}) and not
                   i.indisvalid)::int as invalid`;
      expect(ix[0]).toEqual({ source: 3, shadow: 3, invalid: 0 });
      const v1 = await verify(db.sql, w.table, { chunkSize: 4000 });
      expect(v1.differences).toEqual([]);
      expect(v1.equal).toBe(true);
      const before = { ...load.stats };
      await cutover(db.sql, w.table, opts);
      await sleep(400);
      const v2 = await verify(db.sql, w.table, { chunkSize: 4000 });
      expect(v2.equal).toBe(true);
      await swapBack(db.sql, w.table, opts);
      await sleep(400);
      await cutover(db.sql, w.table, opts);
      await sleep(400);
      expect(load.stats.updates).toBeGreaterThan(before.updates);
    } finally {
      await load.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(load.stats.inserts).toBeGreaterThan(50);
    expect(load.stats.updates).toBeGreaterThan(50);
    expect(load.stats.deletes).toBeGreaterThan(10);

    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.phase).toBe("cutover");
    const kind = await db.admin`select relkind::text from pg_class where oid = to_regclass(${`public.${name}`})`;
    expect(kind[0]!.relkind).toBe("p");
    const live = await compareWithTwin(db.admin, m.live, w.twin, keyKind);
    expect(live).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
    expect(live.rows).toBeGreaterThan(20_000);
    const retired = await compareWithTwin(db.admin, m.copy, w.twin, keyKind);
    expect(retired).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
    const v3 = await verify(db.sql, w.table);
    expect(v3.equal).toBe(true);

    await finalize(db.sql, w.table, { yes: true });
    expect(await loadMigration(db.sql, w.table)).toBeNull();
    // the partitioned table carries the original index and constraint names
    expect(await indexNames()).toEqual(originalIndexes);
    expect(await constraintNames()).toEqual(originalConstraints);
    const after = await compareWithTwin(db.admin, w.table, w.twin, keyKind);
    expect(after).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
  });
});

describe("logical mode: verify --repair under concurrent writes", () => {
  it(
    "repairs a corrupted shadow (missing, changed, extra rows, a second version in another partition) consistently " +
      "with the stream",
    async () => {
      const name = "orders_repair_logical";
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(db.admin, w, 20_000);
      const shadow = `public.${name}_pgshift_shadow`;
      const load = await startLoad(db.url, w, { connections: 4, pauseMs: 3 });
      const opts = { lockTimeoutMs: 200, retries: 30 };
      try {
        await sleep(200);
        await startMigration(db.sql, w.table, {
          allowKeyExtension: true,
          spec: parsePartitionSpec("range:created_at:month"),
          mode: "logical",
          ...opts,
        });
        expect((await backfill(db.sql, w.table, { batchSize: 2000, sleepMs: 20 })).complete).toBe(true);
        const cols = "id, created_at, region, status, amount, note, data";
        // What a bug could leave behind; the load keeps changing rows meanwhile (some of these among them).
        const t = (await db.admin`select to_regclass(${shadow})::text as t`)[0]!.t as string;
        await db.admin.unsafe(`delete from ${t} where id in (select id from ${t} order by id offset 100 limit 10)`);
        await db.admin.unsafe(
          `update ${t} set note = 'corrupted' where id in (select id from ${t} order by id offset 1000 limit 10)`,
        );
        await db.admin.unsafe(
          `insert into ${t} (${cols}) values (-5, now(), 'emea', 'extra', 1, 'not in the table', null)`,
        );
        await db.admin.unsafe(`insert into ${t} (${cols})
                               select id, created_at - interval '40 days', region, status, amount, note, data from ${t}
                                where id in (select id from ${t} order by id offset 2000 limit 3)`);
        const v1 = await verify(db.sql, w.table, { chunkSize: 4000, repair: true, ...opts });
        expect(v1.repaired, JSON.stringify(v1)).toBeGreaterThanOrEqual(1);
        expect(v1.equal, JSON.stringify(v1.differences)).toBe(true);
        await sleep(1000); // the stream applies further writes on top of the repaired rows
        const v2 = await verify(db.sql, w.table, { chunkSize: 4000 });
        expect(v2.equal, JSON.stringify(v2.differences)).toBe(true);
        await cutover(db.sql, w.table, opts);
        await sleep(300);
      } finally {
        await load.stop();
      }
      expect(load.stats.errors).toEqual([]);
      expect(load.stats.updates).toBeGreaterThan(50);
      const m = (await loadMigration(db.sql, w.table))!;
      expect(m.phase).toBe("cutover");
      await expectEqualToTwin(db.admin, [m.live, m.copy], w.twin, "bigint");
      const dup = await db.admin.unsafe(
        `select count(*)::int as n from (select id from ${name} group by id having count(*) > 1) d`,
      );
      expect(dup[0]!.n).toBe(0);
      await finalize(db.sql, w.table, { yes: true });
    },
  );
});
