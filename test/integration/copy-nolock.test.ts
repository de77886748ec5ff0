import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { connect, type Sql } from "../../src/db.js";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
import { parsePartitionSpec, parseSpecs } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * The copy without row locks (issue 18, item 1; src/backfill/cleanup.ts): the race provoked on purpose, between a
 * batch's read and its COMMIT (the onBatchWritten hook): another session deletes rows of the batch's range, moves
 * one to another partition (first and second level) and changes one in place, committing before the batch does.
 * The mirror's DELETE finds nothing of the batch's uncommitted rows: without the cleanup the copy keeps them (the
 * first test fails with ghosts when runCleanup deletes nothing); with it, the shadow equals the source. The same
 * race with --lock-rows (the writes wait for the batch). A crash with batches not cleaned yet: the next run cleans
 * them. And the copy writes nothing to the source: no row of it carries a lock (xmax) afterwards, whereas every row
 * does after a copy with --lock-rows.
 */

let db: TestDatabase;
let other: Sql;
beforeAll(async () => {
  db = await freshDatabase();
  other = await connect({ url: db.url });
});
afterAll(async () => {
  await other?.end();
  await db?.close();
});

const COLS = "id, created_at, region, status, amount, note, data";

/** Rows only in the source and rows only in the shadow (two-way EXCEPT over the copied columns). */
async function differences(name: string): Promise<{ onlySource: number; onlyShadow: number }> {
  const r = await db.admin.unsafe(`
    select (select count(*) from (select ${COLS} from ${name} except select ${COLS} from ${name}_pgshift_shadow) a)::int
             as "onlySource",
           (select count(*) from (select ${COLS} from ${name}_pgshift_shadow except select ${COLS} from ${name}) b)::int
             as "onlyShadow"`);
  return r[0] as unknown as { onlySource: number; onlyShadow: number };
}

/**
 * What the racing session does in a batch's range (lo, hi] (bigint keys): deletes the last key and the one 5 below,
 * moves the key 10 below to another month (40 days back) and, when `region`, the key 15 below to another region,
 * changes the key 20 below in place. In autocommit: each commits at once (or, with row locks, once the batch has).
 */
function racingWrites(name: string, hi: number, region: boolean): { free: string[]; waits: string } {
  return {
    free: [
      `delete from ${name} where id in (${hi}, ${hi - 5})`,
      `update ${name} set created_at = created_at - interval '40 days' where id = ${hi - 10}`,
      ...(region
        ? [`update ${name} set region = case region when 'emea' then 'apac' else 'emea' end where id = ${hi - 15}`]
        : []),
    ],
    waits: `update ${name} set note = 'changed in the race', amount = amount + 1 where id = ${hi - 20}`,
  };
}

/**
 * Runs the racing writes of a batch's range on `other`: returns once the deletes and moves have committed (without
 * row locks) or once one of them is seen waiting for a lock (with row locks: they wait for the batch, which waits
 * for this function, so they cannot have waited if they are done); the in-place update, whose mirror upsert meets
 * the batch's uncommitted copy of the row and waits for the batch in any mode, runs after them. Waiting is read
 * from pg_stat_activity, not from a time limit: nothing else runs in this test's database, and a loaded machine
 * may take long to commit without waiting for a lock (a 300 ms limit failed in CI).
 * @returns the promise of them all, and whether the deletes and moves had to wait.
 */
async function race(name: string, hi: number, region: boolean): Promise<{ all: Promise<unknown>; waited: boolean }> {
  const w = racingWrites(name, hi, region);
  let done = false;
  const free = (async () => {
    for (const q of w.free) await other.unsafe(q);
  })().finally(() => {
    done = true;
  });
  const all = free.then(() => other.unsafe(w.waits));
  for (;;) {
    await Promise.race([free, sleep(20)]);
    if (done) return { all, waited: false };
    const [r] = await db.admin`
      select count(*)::int as n from pg_stat_activity
       where datname = current_database() and wait_event_type = 'Lock'`;
    // Once the deletes and moves are done, the waiting session is the in-place update's (it runs after them).
    if (done) return { all, waited: false };
    if (Number(r?.n) > 0) return { all, waited: true };
  }
}

async function workload(name: string, rows: number): Promise<Workload> {
  const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
  await createWorkload(db.admin, w, rows);
  return w;
}

describe("the copy without row locks", () => {
  it.each([
    { level: "one level (range by month)", spec: parsePartitionSpec("range:created_at:month"), region: false },
    {
      level: "two levels (list by region, range by month)",
      spec: parseSpecs("list:region", "range:created_at:month"),
      region: true,
    },
  ])("deletes the ghosts of rows deleted or moved while their batch ran: $level", async ({ spec, region }) => {
    const name = region ? "nl_race_two" : "nl_race_one";
    const w = await workload(name, 3000);
    await startMigration(db.sql, w.table, { allowKeyExtension: true, spec });
    let raced = 0;
    const writes: Promise<unknown>[] = [];
    const r = await backfill(db.sql, w.table, {
      batchSize: 500,
      onBatchWritten: async ({ hi }) => {
        const h = Number(hi[0]);
        if (h < 100) return;
        const x = await race(name, h, region);
        writes.push(x.all);
        // Without row locks the deletes and moves do not wait for the batch.
        expect(x.waited).toBe(false);
        raced++;
      },
    });
    await Promise.all(writes);
    expect(r.complete).toBe(true);
    expect(raced).toBeGreaterThanOrEqual(5);
    expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
    expect(r.ghostsDeleted).toBeGreaterThanOrEqual(raced * (region ? 4 : 3));
    const v = await verify(db.sql, w.table, { chunkSize: 700 });
    expect(v.differences).toEqual([]);
    // The checkpoint and the counters are the copy's end.
    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.phase).toBe("backfilled");
    expect(m.batches).toBe(r.batches);
  });

  it("with --lock-rows the same writes wait for the batch, and the copy has no ghost either", async () => {
    const name = "nl_race_locked";
    const w = await workload(name, 3000);
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    const writes: Promise<unknown>[] = [];
    let waited = 0;
    const r = await backfill(db.sql, w.table, {
      batchSize: 500,
      lockRows: true,
      onBatchWritten: async ({ hi }) => {
        const h = Number(hi[0]);
        if (h < 100) return;
        // The first delete waits for the batch's row lock (until the batch commits).
        const x = await race(name, h, false);
        writes.push(x.all);
        if (x.waited) waited++;
      },
    });
    await Promise.all(writes);
    expect(r.complete).toBe(true);
    expect(waited).toBeGreaterThanOrEqual(5);
    expect(r.ghostsDeleted).toBe(0);
    expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
  });

  /**
   * A table `name` of 4,000 rows migrated by month, and a backfill (batches of `batchSize` rows, `workers`) that
   * crashes when its fourth batch is written, each earlier batch raced (race()) before it committed: batches written
   * but not cleaned, their ghosts in the shadow.
   */
  async function crashAfterRacedBatches(name: string, batchSize: number, workers = 1): Promise<Workload> {
    const w = await workload(name, 4000);
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    let batch = 0;
    const crash = new Error("simulated crash");
    const writes: Promise<unknown>[] = [];
    await expect(
      backfill(db.sql, w.table, {
        batchSize,
        workers,
        onBatchWritten: async ({ hi }) => {
          batch++;
          if (batch >= 4) throw crash;
          writes.push((await race(name, Number(hi[0]), false)).all);
        },
      }),
    ).rejects.toThrow("simulated crash");
    await Promise.all(writes);
    return w;
  }

  it("a crash with batches not cleaned: the checkpoint stays at the clean end, the next run cleans", async () => {
    const name = "nl_crash";
    const w = await crashAfterRacedBatches(name, 500);
    const m = (await loadMigration(db.sql, w.table))!;
    // Batch 3 (keys 1001..1500) was written but its range not cleaned: the checkpoint is below it, and its
    // ghosts are in the shadow.
    expect(Number(m.checkpoint?.[0] ?? 0)).toBeLessThanOrEqual(1000);
    expect((await differences(name)).onlyShadow).toBeGreaterThan(0);
    const r = await backfill(db.sql, w.table, { batchSize: 500 });
    expect(r.complete).toBe(true);
    expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
  });

  for (const workers of [1, 2])
    it(`a crash without row locks, then --lock-rows (${workers} worker(s)): it cleans the crash's ghosts`, async () => {
      const name = `nl_crash_locked_${workers}`;
      const w = await crashAfterRacedBatches(name, 400, workers);
      expect((await differences(name)).onlyShadow).toBeGreaterThan(0);
      // FOR SHARE batches make no ghost and clean nothing: only the cleanup before them removes these.
      const r = await backfill(db.sql, w.table, { batchSize: 400, workers, lockRows: true });
      expect(r.complete).toBe(true);
      expect(r.ghostsDeleted).toBeGreaterThan(0);
      expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
    });

  it("a crash with ghosts above every key the source has at the next run: its last cleanup reaches them", async () => {
    const name = "nl_crash_tail";
    const w = await workload(name, 4000);
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    let batch = 0;
    const crash = new Error("simulated crash");
    await expect(
      backfill(db.sql, w.table, {
        batchSize: 500,
        onBatchWritten: async () => {
          batch++;
          // Batch 3 (keys 1001..1500): its last 101 rows deleted while it is uncommitted: ghosts once it commits.
          if (batch === 3) await other.unsafe(`delete from ${name} where id between 1400 and 1500`);
          if (batch === 4) throw crash;
        },
      }),
    ).rejects.toThrow("simulated crash");
    const m = (await loadMigration(db.sql, w.table))!;
    expect(Number(m.checkpoint?.[0] ?? 0)).toBeLessThanOrEqual(1000);
    expect((await differences(name)).onlyShadow).toBe(101);
    // Every key above the ghosts' goes too: the next run's batches end at 1399, below every ghost.
    await db.admin.unsafe(`delete from ${name} where id > 1500`);
    const r = await backfill(db.sql, w.table, { batchSize: 500 });
    expect(r.complete).toBe(true);
    expect(r.ghostsDeleted).toBe(101);
    expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
    const v = await verify(db.sql, w.table, { chunkSize: 700 });
    expect(v.differences).toEqual([]);
  });

  it("writes nothing to the source: no row carries a lock afterwards (every row does with --lock-rows)", async () => {
    const locked = async (name: string) =>
      Number((await db.admin.unsafe(`select count(*)::int as n from ${name} where xmax::text <> '0'`))[0]!.n);
    for (const [name, lockRows] of [
      ["nl_quiet", false],
      ["nl_quiet_locked", true],
    ] as const) {
      const w = await workload(name, 5000);
      await db.admin.unsafe(`vacuum (freeze) ${name}`);
      await startMigration(db.sql, w.table, { allowKeyExtension: true, spec: parsePartitionSpec("list:region") });
      expect(await locked(name)).toBe(0);
      const r = await backfill(db.sql, w.table, { batchSize: 1000, lockRows });
      expect(r.complete).toBe(true);
      expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
      expect(await locked(name)).toBe(lockRows ? 5000 : 0);
    }
  });
});
