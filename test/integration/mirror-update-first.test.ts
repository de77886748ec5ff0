import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { createWorkload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * The forward mirror updates a row whose key did not change in place, and upserts only when it finds none
 * (src/sql/mirror/upsert.sql). Before the backfill reaches a row, the shadow does not hold it: an UPDATE of it must
 * then write it whole through the upsert (without that fallback the shadow misses the row until the copy reaches
 * it: the first test fails, checked by removing the fallback). The race with a batch's uncommitted copy of the row
 * is copy-nolock.test.ts's in-place update, under concurrent writes concurrency.test.ts.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

const COLS = "id, created_at, region, status, amount, note, data";

/** The row of `id` in the table and in its shadow (null when absent), over the copied columns, as JSON text. */
async function both(name: string, id: number): Promise<{ source: string | null; shadow: string | null }> {
  const row = async (t: string) => {
    const q = `select row_to_json(r)::text as j from (select ${COLS} from ${t} where id = $1) r`;
    return ((await db.admin.unsafe(q, [id]))[0]?.j as string | undefined) ?? null;
  };
  return { source: await row(name), shadow: await row(`${name}_pgshift_shadow`) };
}

describe("the forward mirror's UPDATE of a row whose key did not change", () => {
  it("writes a row the shadow does not hold yet (before the backfill), then updates it in place", async () => {
    const table = { schema: "public", name: "upd_first" };
    const twin = { schema: "public", name: "upd_first_twin" };
    await createWorkload(db.admin, { table, twin, keyKind: "bigint" }, 500);
    await startMigration(db.admin, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
      mode: "trigger",
    });
    expect(Number((await db.admin`select count(*)::int as n from upd_first_pgshift_shadow`)[0]!.n)).toBe(0);

    // in place, twice (not held yet, then held), a large TOASTed note included (id 500: i % 500 = 0)
    for (const id of [10, 500]) {
      await db.admin.unsafe(`update upd_first set status = 'first', amount = 1.5 where id = $1`, [id]);
      let r = await both("upd_first", id);
      expect(r.shadow).not.toBeNull();
      expect(r.shadow).toBe(r.source);
      await db.admin.unsafe(`update upd_first set status = 'second', note = 'n' || id where id = $1`, [id]);
      r = await both("upd_first", id);
      expect(r.shadow).toContain('"status":"second"');
      expect(r.shadow).toBe(r.source);
    }
    // in a transaction that updates the row twice, the second time finding the first one's row
    await db.admin.begin(async (tx) => {
      await tx`update upd_first set amount = 2 where id = 20`;
      await tx`update upd_first set amount = 3 where id = 20`;
    });
    expect((await both("upd_first", 20)).shadow).toBe((await both("upd_first", 20)).source);
    // a move then an update in place of the moved row
    await db.admin`update upd_first set created_at = created_at - interval '40 days' where id = 30`;
    await db.admin`update upd_first set status = 'after the move' where id = 30`;
    const moved = await both("upd_first", 30);
    expect(moved.shadow).toBe(moved.source);
    expect(Number((await db.admin`select count(*)::int as n from upd_first_pgshift_shadow`)[0]!.n)).toBe(4);

    // the backfill then copies the rest, and keeps what the mirror wrote
    expect((await backfill(db.admin, table, {})).complete).toBe(true);
    const diff = await db.admin.unsafe(`
      select (select count(*) from (select ${COLS} from upd_first except all
                                    select ${COLS} from upd_first_pgshift_shadow) a)::int as a,
             (select count(*) from (select ${COLS} from upd_first_pgshift_shadow except all
                                    select ${COLS} from upd_first) b)::int as b`);
    expect(diff[0]).toEqual({ a: 0, b: 0 });
  });

  it("writes the row when every column is in the shadow's key (no column to set but the key's)", async () => {
    await db.admin`create table all_key (k int primary key, day date not null)`;
    await db.admin`insert into all_key select i, date '2026-01-01' + i from generate_series(1, 60) i`;
    const table = { schema: "public", name: "all_key" };
    await startMigration(db.admin, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:day:month"),
      mode: "trigger",
    });
    await db.admin`update all_key set k = k where k = 7`;
    expect(await db.admin`select k, day::text from all_key_pgshift_shadow`).toEqual([{ k: 7, day: "2026-01-08" }]);
    await db.admin`update all_key set day = day where k = 7`;
    expect(await db.admin`select k, day::text from all_key_pgshift_shadow`).toEqual([{ k: 7, day: "2026-01-08" }]);
  });
});
