import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover } from "../../src/cutover/cutover.js";
import { connect } from "../../src/db.js";
import { PgshiftError } from "../../src/errors.js";
import { on, type PgshiftEvents } from "../../src/events.js";
import { createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, type Mode } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * Cutover without a stall (issue 16, item 1), against a real server, under a write load whose every transaction's
 * latency is recorded:
 * - autovacuum really running on a partition (per-table settings: threshold 0, the largest cost delay, a cost
 *   limit of 1, on a partition with many dead rows; autovacuum_naptime 1 s): the cutover cancels it, succeeds,
 *   and no application transaction waits longer than the lock timeout (+ a margin for this shared machine);
 * - an idle-in-transaction session holding a lock on the table: the cutover does not queue behind it (no lock is
 *   requested while it is there, so no application write waits the lock timeout), names it (pid, query), gives
 *   up after its retries; with terminateHoldersAfterMs it ends it and succeeds;
 * - logical mode with a backlog in the stream: the catch-up happens before the lock, so writes are blocked for
 *   a short time even with a generous bound under the lock.
 */

/** Latencies of the load's transactions (performance.now() at their start, ms). */
function recorder() {
  const xs: { at: number; ms: number }[] = [];
  return {
    onTransaction: (at: number, ms: number) => void xs.push({ at, ms }),
    /** The longest transaction that overlapped [from, to] (performance.now() values), ms. */
    worst: (from: number, to: number) =>
      xs.filter((x) => x.at <= to && x.at + x.ms >= from).reduce((m, x) => Math.max(m, x.ms), 0),
    count: (from: number, to: number) => xs.filter((x) => x.at <= to && x.at + x.ms >= from).length,
  };
}

/** Collects the events `name` while `fn` runs. */
async function collect<K extends keyof PgshiftEvents, T>(
  name: K,
  fn: () => Promise<T>,
): Promise<{ events: PgshiftEvents[K][]; result: T | undefined; error: unknown }> {
  const events: PgshiftEvents[K][] = [];
  const off = on(name, (p) => void events.push(p));
  try {
    return { events, result: await fn(), error: undefined };
  } catch (error) {
    return { events, result: undefined, error };
  } finally {
    off();
  }
}

/**
 * What the application may wait on top of the lock timeout on this shared 2-core machine, ms (with no migration at
 * all, single transactions of the load take up to 200 ms there when other work runs).
 */
const MARGIN_MS = 200;

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
  // Autovacuum looks at each database every second (restored in afterAll).
  await db.admin`alter system set autovacuum_naptime = 1`;
  await db.admin`select pg_reload_conf()`;
});
afterAll(async () => {
  if (!db) return;
  await db.admin`alter system reset autovacuum_naptime`.catch(() => {});
  await db.admin`select pg_reload_conf()`.catch(() => {});
  await db.close();
});

/** A workload table of `rows` rows, plus `extra` rows in one month (one big partition), started and backfilled. */
async function prepare(name: string, mode: Mode, rows: number, extra = 0): Promise<Workload> {
  const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
  await createWorkload(db.admin, w, rows);
  if (extra > 0) {
    await db.admin.unsafe(
      `insert into ${name} (created_at, region, status, amount, note, data)
       select date_trunc('month', now()) - interval '100 days' + i * interval '1 second', 'emea', 'new', 1,
              'extra ' || i, '{}' from generate_series(1, $1) i`,
      [extra],
    );
    await db.admin.unsafe(
      `insert into twin.${name} select id, created_at, region, status, amount, note, data from ${name}
        where id > (select coalesce(max(id), 0) from twin.${name})`,
    );
  }
  await startMigration(db.sql, w.table, {
    allowKeyExtension: true,
    spec: parsePartitionSpec("range:created_at:month"),
    mode,
  });
  const bf = await backfill(db.sql, w.table, { batchSize: 5000 });
  expect(bf.complete).toBe(true);
  return w;
}

describe.each(["trigger", "logical"] as const)("autovacuum on a partition (%s mode)", (mode) => {
  it("is cancelled before the lock; the cutover succeeds and no write waits past the lock timeout", async () => {
    const name = `av_${mode}`;
    const w = await prepare(name, mode, 5000, 25_000);
    // The shadow's biggest partition: dead rows in all of it (a change that changes nothing), and autovacuum
    // settings that make it start at once and crawl (a cost delay after every page).
    const big = (
      await db.admin`select c.relname::text as name from pg_inherits i join pg_class c on c.oid = i.inhrelid
        where i.inhparent = to_regclass(${`public.${name}_pgshift_shadow`}) order by c.relpages desc limit 1`
    )[0]!.name as string;
    await db.admin.unsafe(
      `alter table "${big}" set (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
         autovacuum_vacuum_insert_threshold = 0, autovacuum_vacuum_cost_delay = 100,
         autovacuum_vacuum_cost_limit = 1)`,
    );
    await db.admin.unsafe(`update "${big}" set amount = amount`);
    let worker: number | null = null;
    for (let i = 0; i < 240 && worker === null; i++) {
      const r = await db.admin`select pid from pg_stat_activity where backend_type = 'autovacuum worker'
        and query ilike ${`%${big}%`}`;
      if (r.length > 0) worker = Number(r[0]!.pid);
      else await sleep(500);
    }
    expect(worker, `autovacuum started on ${big}`).not.toBeNull();

    const lat = recorder();
    const load = await startLoad(db.url, w, { connections: 4, pauseMs: 2, onTransaction: lat.onTransaction });
    let t0 = 0;
    let t1 = 0;
    let baseline = 0;
    try {
      const tb = performance.now();
      await sleep(1500);
      t0 = performance.now();
      // The load's own worst in the same process just before, with no lock involved: the reference (CI machines
      // run another test file beside this one).
      baseline = lat.worst(tb + 200, t0);
      const { result, error, events } = await collect("lockHolder", () => cutover(db.sql, w.table));
      t1 = performance.now();
      expect(error).toBeUndefined();
      expect(result!.autovacuumCancelled.map((a) => a.pid)).toContain(worker);
      expect(events.some((e) => e.action === "cancelled" && e.pid === worker && e.relation.includes(big))).toBe(true);
      // The vacuum would have taken minutes at that pace; the cutover did not wait for it.
      expect(t1 - t0).toBeLessThan(20_000);
      await sleep(300);
    } finally {
      await load.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(lat.count(t0, t1)).toBeGreaterThan(0);
    // Writes wait for one attempt's lock timeout at most, or for the lock's hold: in logical mode that includes
    // the last catch-up, at most catchupTimeoutMs (100 ms), and the shadow's lock (at most its lock timeout).
    const bound = 50 + (mode === "logical" ? 100 + 50 : 0) + Math.max(MARGIN_MS, 2 * baseline);
    expect(lat.worst(t0, t1), "the longest application transaction during the cutover, ms").toBeLessThan(bound);
    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.phase).toBe("cutover");
    await expectEqualToTwin(db.admin, [m.live, m.copy], w.twin, "bigint");
  });
});

describe("an idle-in-transaction session holding a lock on the table (trigger mode)", () => {
  it("is named and not queued behind; with terminateHoldersAfterMs it is ended and the cutover succeeds", async () => {
    const w = await prepare("idle_holder", "trigger", 5000);
    // Long enough that a write queued behind a lock request (what the look prevents) stands out from the load's
    // own latency on a busy machine.
    const lockTimeoutMs = 1000;
    const holderPool = await connect({ url: db.url, applicationName: "idle holder" });
    const holder = await holderPool.reserve();
    const pid = Number((await holder.unsafe("select pg_backend_pid() as pid"))[0]!.pid);
    await holder.unsafe("begin");
    await holder.unsafe("lock table idle_holder in access share mode");
    await sleep(lockTimeoutMs + 200);

    const lat = recorder();
    const load = await startLoad(db.url, w, { connections: 4, pauseMs: 2, onTransaction: lat.onTransaction });
    try {
      await sleep(500);
      // 1. Without the flag: the holder is named, no lock is ever requested (so no write queues behind one), and
      // the cutover gives up after its retries.
      const a0 = performance.now();
      const attempts = await collect("lockAttempt", () =>
        collect("lockHolder", () => cutover(db.sql, w.table, { lockTimeoutMs, retries: 6 })),
      );
      const a1 = performance.now();
      const failed = attempts.result!;
      expect(failed.error).toBeInstanceOf(PgshiftError);
      expect((failed.error as Error).message).toContain(`pid ${pid}`);
      expect((failed.error as Error).message).toContain("lock table idle_holder in access share mode");
      expect((failed.error as Error).message).toContain("idle in transaction");
      expect(failed.events.filter((e) => e.action === "waited" && e.pid === pid).length).toBeGreaterThanOrEqual(2);
      expect(attempts.events, "lock requests made while the holder was there").toEqual([]);
      expect(lat.count(a0, a1)).toBeGreaterThan(0);
      expect(lat.worst(a0, a1), "the longest application transaction while the cutover retried, ms").toBeLessThan(
        lockTimeoutMs,
      );
      expect((await loadMigration(db.sql, w.table))!.phase).toBe("backfilled");

      // 2. With the flag: terminated, then locked and switched.
      const b0 = performance.now();
      const ok = await collect("lockAttempt", () =>
        cutover(db.sql, w.table, { lockTimeoutMs, terminateHoldersAfterMs: 200 }),
      );
      const b1 = performance.now();
      expect(ok.error).toBeUndefined();
      expect(ok.result!.terminated.map((t) => t.pid)).toEqual([pid]);
      expect(ok.result!.terminated[0]!.query).toContain("lock table idle_holder");
      expect(ok.events.filter((e) => e.granted)).toHaveLength(1);
      expect(await db.admin`select 1 from pg_stat_activity where pid = ${pid}`).toHaveLength(0);
      expect(lat.worst(b0, b1), "the longest application transaction during the cutover, ms").toBeLessThan(
        lockTimeoutMs + MARGIN_MS,
      );
      await sleep(300);
    } finally {
      await load.stop();
      holder.release();
      await holderPool.end({ timeout: 1 }).catch(() => {});
    }
    expect(load.stats.errors).toEqual([]);
    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.phase).toBe("cutover");
    await expectEqualToTwin(db.admin, [m.live, m.copy], w.twin, "bigint");
  });
});

describe("logical mode with a backlog in the stream", () => {
  it("catches up before the lock: writes are blocked briefly even with a generous bound under the lock", async () => {
    const w = await prepare("catchup_first", "logical", 10_000);
    const lat = recorder();
    const load = await startLoad(db.url, w, { connections: 4, pauseMs: 2, onTransaction: lat.onTransaction });
    let r: Awaited<ReturnType<typeof cutover>> | undefined;
    let t0 = 0;
    let t1 = 0;
    try {
      // Nothing applies the stream meanwhile: seconds of changes wait in the slot (applied under the lock, they
      // would block writes for about a second on this machine).
      await sleep(8000);
      const lag = await db.admin`select pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint as b
        from pg_replication_slots where slot_name = ${(await loadMigration(db.sql, w.table))!.slot_name!}`;
      expect(Number(lag[0]!.b)).toBeGreaterThan(100_000);
      t0 = performance.now();
      // 5 s under the lock would be allowed (the old default was 2 s): the bound is not what keeps it short.
      r = await cutover(db.sql, w.table, { catchupTimeoutMs: 5000 });
      t1 = performance.now();
      await sleep(300);
    } finally {
      await load.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(r!.catchup).not.toBeNull();
    expect(r!.catchup!.beforeLockMs).toBeLessThanOrEqual(50);
    // The last catch-up under the lock took 20 to 120 ms in the runs on this machine, the switch's statements 50 to
    // 100 ms more.
    expect(r!.lockHeldMs, "writes blocked at cutover, ms").toBeLessThan(500);
    expect(lat.worst(t0, t1), "the longest application transaction during the cutover, ms").toBeLessThan(
      500 + 50 + MARGIN_MS,
    );
    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.phase).toBe("cutover");
    await expectEqualToTwin(db.admin, [m.live, m.copy], w.twin, "bigint");
  });
});
