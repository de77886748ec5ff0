import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { connect, type Sql } from "../../src/db.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * The copy without row locks in logical mode (issue 18, item 1; src/backfill/cleanup.ts, "Logical mode"): the races
 * provoked on purpose between a batch's read and its COMMIT (the onBatchWritten hook), with the applier of this
 * process running. In each batch's range another session, committing at once:
 * - deletes two rows and moves one to another month (40 days back; an UPDATE of the partition column only, so its
 *   TOASTed value is not streamed): the applier's DELETE does not see the batch's uncommitted copies (ghosts,
 *   which the cleanup removes), and the test waits until the applier has applied them;
 * - then, in odd batches, updates another column of a row whose large TOASTed value it leaves alone: the applier
 *   reads that row from the source and meets the batch's uncommitted copy (the test waits until it waits for the
 *   batch). With `ON CONFLICT DO NOTHING` there, the batch's older version stays: a stale row;
 * - in even batches, moves a row away with a new large value (streamed whole, applied while the batch is
 *   uncommitted), then back with the value left alone: merging that partial update into the batch's copy of the
 *   old place keeps the copy's old value (a stale row, which a cleanup of ghosts does not see: the source has the
 *   key again).
 * After the copy and the stream, the shadow equals the source, every column compared. This test fails when
 * Applier.applyFromSource does nothing on the conflict, when the cleanup deletes nothing, and when the partial
 * update merges into the shadow during the copy (the settled path only, with its fallback's DO UPDATE).
 * A crash with batches not cleaned: the next run cleans them. And the copy writes nothing to the source: no row of
 * it carries a lock (xmax) afterwards, every one does with lockRows (--lock-rows).
 */

let db: TestDatabase;
let other: Sql;
beforeAll(async () => {
  db = await freshDatabase();
  other = await connect({ url: db.url });
});
afterAll(async () => {
  await other?.end();
  if (!db) return;
  await db.admin`select pg_drop_replication_slot(slot_name) from pg_replication_slots where database =
    current_database() and not active`.catch(() => {});
  await db.close();
});

const COLS = "id, created_at, status, amount, big";

/**
 * A table of `rows` rows over 300 days with a large text value each (80 md5 sums, 2,560 characters, stored out of
 * line: `storage external`), so that an UPDATE leaving it alone streams it as unchanged.
 */
async function createTable(name: string, rows: number): Promise<void> {
  await db.admin.unsafe(`
    create table ${name} (id bigint primary key, created_at timestamptz not null, status text not null,
      amount int not null, big text not null);
    alter table ${name} alter column big set storage external;
    insert into ${name}
      select i, timestamptz '2025-01-01' + (i % 300) * interval '1 day', 'new', 0,
             (select string_agg(md5(i::text || '-' || g::text), '') from generate_series(1, 80) g)
        from generate_series(1, ${rows}) i;
    analyze ${name}`);
}

/** Rows only in the source and rows only in the shadow (two-way EXCEPT over every column). */
async function differences(name: string): Promise<{ onlySource: number; onlyShadow: number }> {
  const r = await db.admin.unsafe(`
    select (select count(*) from (select ${COLS} from ${name} except select ${COLS} from ${name}_pgshift_shadow) a)::int
             as "onlySource",
           (select count(*) from (select ${COLS} from ${name}_pgshift_shadow except select ${COLS} from ${name}) b)::int
             as "onlyShadow"`);
  return r[0] as unknown as { onlySource: number; onlyShadow: number };
}

/** Waits (at most `ms`) until the migration row records the stream applied past `lsn`. */
async function applied(name: string, lsn: string, ms = 10_000): Promise<boolean> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const r = await db.admin.unsafe(
      `select applied_lsn is not null and applied_lsn::pg_lsn >= $1::pg_lsn as ok from pgshift.migrations
        where source_table = $2`,
      [lsn, name],
    );
    if (r[0]?.ok) return true;
    await sleep(20);
  }
  return false;
}

/** Waits (at most `ms`) until this process's applier waits for a lock (the batch's uncommitted row). */
async function applierWaits(name: string, ms = 5000): Promise<boolean> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const r = await db.admin.unsafe(
      `select count(*)::int as n from pg_stat_activity where application_name = $1 and wait_event_type = 'Lock'`,
      [`pgshift apply ${name}`],
    );
    if (Number(r[0]?.n) > 0) return true;
    await sleep(20);
  }
  return false;
}

const lsnNow = async () => String((await other`select pg_current_wal_lsn()::text as l`)[0]!.l);

describe("logical mode: the copy without row locks", () => {
  it("no ghost and no stale row when the applier meets a batch's uncommitted copy", async () => {
    const name = "nll_race";
    await createTable(name, 4000);
    await startMigration(
      db.sql,
      { schema: "public", name },
      {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:month"),
        mode: "logical",
      },
    );
    const raced = new Set<number>();
    let met = { partial: 0, back: 0 };
    const r = await backfill(
      db.sql,
      { schema: "public", name },
      {
        batchSize: 500,
        onBatchWritten: async ({ hi }) => {
          const h = Number(hi[0]);
          // Once per range (a batch retried after a lock timeout runs the hook again), and only in full ranges.
          if (h < 100 || raced.has(h)) return;
          raced.add(h);
          const odd = raced.size % 2 === 1;
          await other.unsafe(`delete from ${name} where id in (${h}, ${h - 5})`);
          await other.unsafe(`update ${name} set created_at = created_at - interval '40 days' where id = ${h - 10}`);
          if (!odd)
            await other.unsafe(
              `update ${name} set created_at = created_at - interval '40 days', big = big || 'moved away' ` +
                `where id = ${h - 30}`,
            );
          // The applier has applied these (missing the batch's uncommitted copies) before the batch commits.
          expect(await applied(name, await lsnNow())).toBe(true);
          if (odd) await other.unsafe(`update ${name} set status = 'raced', amount = amount + 1 where id = ${h - 20}`);
          else
            await other.unsafe(`update ${name} set created_at = created_at + interval '40 days' where id = ${h - 30}`);
          // The applier meets the batch's uncommitted copy of the row and waits for the batch.
          if (await applierWaits(name))
            met = odd ? { ...met, partial: met.partial + 1 } : { ...met, back: met.back + 1 };
        },
      },
    );
    expect(r.complete).toBe(true);
    expect(raced.size).toBeGreaterThanOrEqual(6);
    expect(met.partial).toBeGreaterThanOrEqual(2);
    expect(met.back).toBeGreaterThanOrEqual(2);
    // backfill returned once the stream caught up; the last writes were applied long before.
    expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
    const v = await verify(db.sql, { schema: "public", name }, { chunkSize: 700 });
    expect(v.differences).toEqual([]);
    // Two deletes and a move in each range, and in every other range a move away and back.
    expect(r.ghostsDeleted).toBeGreaterThanOrEqual(raced.size * 3);
    const m = (await loadMigration(db.sql, { schema: "public", name }))!;
    expect(m.phase).toBe("backfilled");
    expect(m.batches).toBe(r.batches);
  });

  it("a crash with batches not cleaned: the checkpoint stays at the clean end, the next run cleans", async () => {
    const name = "nll_crash";
    await createTable(name, 3000);
    await startMigration(
      db.sql,
      { schema: "public", name },
      {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:month"),
        mode: "logical",
      },
    );
    let batch = 0;
    const crash = new Error("simulated crash");
    await expect(
      backfill(
        db.sql,
        { schema: "public", name },
        {
          batchSize: 500,
          onBatchWritten: async ({ hi }) => {
            batch++;
            if (batch === 4) throw crash;
            const h = Number(hi[0]);
            await other.unsafe(`delete from ${name} where id in (${h}, ${h - 5})`);
            await other.unsafe(`update ${name} set created_at = created_at - interval '40 days' where id = ${h - 10}`);
            expect(await applied(name, await lsnNow())).toBe(true);
          },
        },
      ),
    ).rejects.toThrow("simulated crash");
    const m = (await loadMigration(db.sql, { schema: "public", name }))!;
    // Batch 3 (keys 1001..1500) was written but its range not cleaned: the checkpoint is below it, and its ghosts
    // are in the shadow.
    expect(Number(m.checkpoint?.[0] ?? 0)).toBeLessThanOrEqual(1000);
    expect((await differences(name)).onlyShadow).toBeGreaterThan(0);
    const r = await backfill(db.sql, { schema: "public", name }, { batchSize: 500 });
    expect(r.complete).toBe(true);
    expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
  });

  it("writes nothing to the source: no row carries a lock afterwards (every row does with --lock-rows)", async () => {
    const locked = async (name: string) =>
      Number((await db.admin.unsafe(`select count(*)::int as n from ${name} where xmax::text <> '0'`))[0]!.n);
    for (const [name, lockRows] of [
      ["nll_quiet", false],
      ["nll_quiet_locked", true],
    ] as const) {
      await createTable(name, 3000);
      await db.admin.unsafe(`vacuum (freeze) ${name}`);
      await startMigration(
        db.sql,
        { schema: "public", name },
        {
          allowKeyExtension: true,
          spec: parsePartitionSpec("range:created_at:month"),
          mode: "logical",
        },
      );
      expect(await locked(name)).toBe(0);
      const r = await backfill(db.sql, { schema: "public", name }, { batchSize: 1000, lockRows });
      expect(r.complete).toBe(true);
      expect(await differences(name)).toEqual({ onlySource: 0, onlyShadow: 0 });
      expect(await locked(name)).toBe(lockRows ? 3000 : 0);
    }
  });
});
