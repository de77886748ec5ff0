import { LogicalReplicationService, PgoutputPlugin } from "pg-logical-replication";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import { connect, type Sql } from "../../src/db.js";
import { PgshiftError } from "../../src/errors.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { abort } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, logicalNames, type Migration, requireStream } from "../../src/migration/state.js";
import { Applier, StreamFenced } from "../../src/mirror/apply.js";
import { followStream } from "../../src/mirror/stream.js";
import { sync } from "../../src/mirror/sync.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { type Running, spawnCli, waitUntil } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * Logical mode around the cutover (issue 13, item 10: an UPDATE lost in both tables after a run of the
 * whole flow under load). The cutover of a logical-mode migration locks the live table, reads
 * pg_current_wal_insert_lsn(), waits until the stream has applied everything up to it, then locks the
 * shadow and renames; from then on nothing of the stream may reach either table.
 *
 * - The race provoked on purpose: writers insert a row and update it in the very next transaction, so
 *   that at every cutover some insert has committed just before the lock and its update waits behind
 *   the lock (then runs on the partitioned table): the insert must be in the partitioned table by then.
 *   With the applier in the cutover's process, with `pgshift sync` in another process and with sync in
 *   this one, through cutover, swap-back, cutover and swap-back, beside the twin workload; repeated.
 * - An applier stopped while its group waits for a lock: before the fix it recorded the group's position
 *   outside the group (its ROLLBACK went first) and the next applier skipped the changes.
 * - The commit fence: a group whose commit comes after the migration left the streaming phases (cut over,
 *   swapped back: the shadow's name may point at a table again) is rolled back, never applied.
 * - What the cutover takes as caught up: a group recorded in the migration row, not the slot's confirmed
 *   position (a consumer that applies nothing, pg_recvlogical attached by mistake, advances that).
 *
 * The first test has not reproduced the reported loss on the code before the fix either: 15 logical
 * cutovers there (PostgreSQL 17: 6 with the cutover's own applier and 6 with `pgshift sync` in another
 * process, in an earlier form of this loop; PostgreSQL 16: this test, 3), plus 3 runs of
 * `pgshift demo --mode logical --rows 60000` on PostgreSQL 16; and none after it (PostgreSQL 14, 16, 17
 * and 18: 25 logical cutovers, each followed by swap-back, cutover and swap-back). The others fail on the code before
 * the fix (3 stale rows; the cutover went through and
 * the 10 updates were not in the live table; the group applied).
 */

let db: TestDatabase;
const syncs: Running[] = [];
const OPTS = { lockTimeoutMs: 200, retries: 40 };

beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  for (const s of syncs) if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill("SIGKILL");
  if (!db) return;
  await db.admin`select pg_drop_replication_slot(slot_name) from pg_replication_slots where database =
    current_database() and not active`.catch(() => {});
  await db.close();
});

interface PairWriters {
  /** Keys whose UPDATE found no row in the live table (the application would have lost it). */
  lost: string[];
  errors: string[];
  pairs: () => number;
  stop: () => Promise<void>;
}

/**
 * `n` connections that each insert an order ('new') and, in the next transaction, pay it ('paid',
 * amount + 1, a key added to data), on the table and on its twin in the same transactions; a worker
 * deletes its oldest rows to keep the table small.
 */
async function startPairWriters(url: string, w: Workload, n: number): Promise<PairWriters> {
  const lost: string[] = [];
  const errors: string[] = [];
  let pairs = 0;
  let running = true;
  const t = `${w.table.schema}.${w.table.name}`;
  const tw = `${w.twin.schema}.${w.twin.name}`;
  const workers = Array.from({ length: n }, async (_, wi) => {
    const c = await connect({ url });
    const mine: string[] = [];
    try {
      while (running) {
        try {
          const at = new Date(Date.now() - Math.floor(Math.random() * 500) * 86400_000).toISOString();
          const region = ["emea", "amer", "apac", "latam"][wi % 4]!;
          const id = await c.begin(async (tx) => {
            const r = await tx.unsafe(
              `insert into ${t} (created_at, region, status, amount, data) values ($1, $2, 'new', 10,
                '{"pair": 1}') returning id`,
              [at, region],
            );
            const id = String(r[0]!.id);
            await tx.unsafe(
              `insert into ${tw} (id, created_at, region, status, amount, data) values ($1, $2, $3, 'new',
                10, '{"pair": 1}')`,
              [id, at, region],
            );
            return id;
          });
          await c.begin(async (tx) => {
            const r = await tx.unsafe(
              `update ${t} set status = 'paid', amount = amount + 1, data = data || '{"paid": 1}' where id = $1`,
              [id],
            );
            await tx.unsafe(
              `update ${tw} set status = 'paid', amount = amount + 1, data = data || '{"paid": 1}' where id = $1`,
              [id],
            );
            if (r.count !== 1) lost.push(id);
          });
          mine.push(id);
          pairs++;
          if (mine.length > 30) {
            const old = mine.shift()!;
            await c.begin(async (tx) => {
              await tx.unsafe(`delete from ${t} where id = $1`, [old]);
              await tx.unsafe(`delete from ${tw} where id = $1`, [old]);
            });
          }
        } catch (err) {
          errors.push(`${wi}: ${err instanceof Error ? err.message : String(err)}`);
          if (errors.length > 20) running = false;
        }
      }
    } finally {
      await c.end({ timeout: 5 });
    }
  });
  return {
    lost,
    errors,
    pairs: () => pairs,
    stop: async () => {
      running = false;
      await Promise.all(workers);
    },
  };
}

/** Keys that differ between `table` and the twin (missing on either side, or another version). */
async function differingKeys(sql: Sql, table: { schema: string; name: string }, w: Workload): Promise<string[]> {
  const r = await sql.unsafe(`
    select coalesce(a.id, b.id)::text as id, a.status as live, b.status as twin
      from ${table.schema}.${table.name} a full join ${w.twin.schema}.${w.twin.name} b using (id)
     where a.id is null or b.id is null
        or (a.created_at, a.region, a.status, a.amount, a.note, a.data) is distinct from (b.created_at, b.region,
          b.status, b.amount, b.note, b.data)
     order by 1 limit 20`);
  return r.map((x) => `${String(x.id)} (${String(x.live)} vs twin ${String(x.twin)})`);
}

async function slotOf(sql: Sql, name: string): Promise<string> {
  return logicalNames(Number((await sql`select to_regclass(${name})::oid::int as o`)[0]!.o)).slot;
}

describe("logical cutover under a write committed just before its lock and updated at once after it", () => {
  it(
    "loses no update, in either table, through repeated start, backfill, cutover, swap-back, cutover, swap-back " +
      "(applier here, pgshift sync in another process, sync in this process)",
    async () => {
      const w: Workload = {
        table: { schema: "public", name: "pairs" },
        twin: { schema: "twin", name: "pairs" },
        keyKind: "bigint",
      };
      await createWorkload(db.admin, w, 3000);
      const load = await startLoad(db.url, w, { connections: 2, pauseMs: 5 });
      const writers = await startPairWriters(db.url, w, 4);
      const found: string[] = [];
      const followers = ["own", "sync process", "sync here"] as const;
      let cutovers = 0;
      try {
        for (const [loop, follower] of followers.entries()) {
          await startMigration(db.sql, w.table, {
            spec: parsePartitionSpec("range:created_at:month"),
            mode: "logical",
            allowKeyExtension: true,
            ...OPTS,
          });
          expect((await backfill(db.sql, w.table, { batchSize: 5000 })).complete).toBe(true);
          const stopSync = new AbortController();
          let inProcess: Promise<unknown> | null = null;
          let syncSql: Sql | null = null;
          if (follower !== "own") {
            const slot = await slotOf(db.admin, "public.pairs");
            if (follower === "sync process") syncs.push(spawnCli(["sync", "pairs", "--url", db.url]));
            else {
              syncSql = await connect({ url: db.url });
              inProcess = sync(syncSql, w.table, { signal: stopSync.signal });
            }
            await waitUntil(
              "sync attached to the slot",
              async () =>
                Boolean((await db.admin`select active from pg_replication_slots where slot_name = ${slot}`)[0]?.active),
              30_000,
            );
            await sleep(200);
          }
          const check = async (step: string) => {
            const m = (await loadMigration(db.sql, w.table))!;
            for (const t of [m.live, m.copy]) {
              const d = await differingKeys(db.admin, t, w);
              if (d.length > 0) found.push(`loop ${loop} (${follower}), after ${step}, ${t.name}: ${d.join(", ")}`);
            }
          };
          await cutover(db.sql, w.table, OPTS);
          cutovers++;
          await sleep(150);
          await check("the logical cutover");
          await swapBack(db.sql, w.table, OPTS);
          await check("swap-back");
          await cutover(db.sql, w.table, OPTS);
          await check("the second cutover (trigger mirror)");
          await swapBack(db.sql, w.table, OPTS);
          await check("the second swap-back");
          stopSync.abort();
          await inProcess;
          await syncSql?.end();
          await abort(db.sql, w.table, OPTS);
          // Resynchronize nothing: a difference found stays and is reported by every later check too.
          if (found.length > 0) break;
        }
      } finally {
        await writers.stop();
        await load.stop();
      }
      expect(found).toEqual([]);
      expect(writers.lost).toEqual([]);
      expect(writers.errors).toEqual([]);
      expect(load.stats.errors).toEqual([]);
      expect(cutovers).toBe(followers.length);
      expect(writers.pairs()).toBeGreaterThan(50);
      expect(await compareWithTwin(db.admin, w.table, w.twin, "bigint")).toMatchObject({
        onlyInTable: 0,
        onlyInTwin: 0,
      });
    },
  );
});

describe("the applier's group commit", () => {
  /** A logical-mode migration of a small table `name`, backfilled; returns it as loaded afterwards. */
  async function backfilled(name: string): Promise<Migration> {
    await db.admin.unsafe(`
      create table ${name} (id bigserial primary key, created_at timestamptz not null, v int not null, note text);
      insert into ${name} (created_at, v) select timestamptz '2025-01-01 00:00+00' + i * interval '9 hours', 0 from
        generate_series(1, 100) i;`);
    const table = { schema: "public", name };
    await startMigration(db.sql, table, {
      spec: parsePartitionSpec("range:created_at:month"),
      mode: "logical",
      allowKeyExtension: true,
    });
    expect((await backfill(db.sql, table, { batchSize: 1000 })).complete).toBe(true);
    return (await loadMigration(db.sql, table))!;
  }

  /** Rows whose v differs between the source and the shadow. */
  async function stale(name: string): Promise<number> {
    const r = await db.admin.unsafe(
      `select count(*)::int as n from ${name} s join ${name}_pgshift_shadow p using (id) where s.v <> p.v`,
    );
    return Number(r[0]!.n);
  }

  it(
    "an applier stopped while its group waits for a lock records nothing of it: the next applier applies the " +
      "changes",
    async () => {
      const m = await backfilled("stall");
      const a = new Applier(requireStream(m), { url: db.url });
      await a.start();
      // A session holds a row of the shadow: the applier's next group waits for it.
      const blocker = await connect({ url: db.url });
      const held = await blocker.reserve();
      await held`begin`;
      await held`update stall_pgshift_shadow set note = 'held' where id = 1`;
      await db.admin`update stall set v = 1 where id in (1, 2, 3)`;
      await waitUntil(
        "the applier waits for the held row",
        async () =>
          (
            await db.admin`select count(*)::int as n from pg_stat_activity where application_name =
              'pgshift apply stall'
            and wait_event_type = 'Lock'`
          )[0]!.n === 1,
        20_000,
      );
      const stopped = a.stop();
      // stop() waits 5 s for the group in hand, then abandons it; the lock is released after that.
      await sleep(6000);
      await held`rollback`;
      held.release();
      await stopped;
      await blocker.end();
      const row = (await loadMigration(db.sql, { schema: "public", name: "stall" }))!;
      // The next applier (sync, a command following the stream) starts from the recorded position.
      const f = await followStream(db.sql, requireStream(row));
      try {
        const target = String((await db.admin`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
        expect(await f.waitFor(target, 20_000)).toBe(true);
      } finally {
        await f.stop();
      }
      expect(await stale("stall")).toBe(0);
      await abort(db.sql, { schema: "public", name: "stall" });
    },
  );

  it(
    "the cutover takes only an applied and recorded position: a consumer that confirms what it never applied " +
      "(pg_recvlogical attached by mistake) makes it refuse, changing nothing",
    async () => {
      const m = await backfilled("outsider");
      const table = { schema: "public", name: "outsider" };
      // Confirms everything it receives, as pg_recvlogical does, and applies nothing.
      const outsider = new LogicalReplicationService(
        { connectionString: db.url },
        { acknowledge: { auto: true, timeoutSeconds: 1 } },
      );
      const streaming = outsider
        .subscribe(new PgoutputPlugin({ protoVersion: 1, publicationNames: [m.publication_name!] }), m.slot_name!)
        .catch(() => {});
      try {
        await waitUntil(
          "the outsider attached",
          async () =>
            Boolean(
              (await db.admin`select active from pg_replication_slots where slot_name = ${m.slot_name!}`)[0]?.active,
            ),
          20_000,
        );
        await db.admin`update outsider set v = 7 where id <= 10`;
        const after = String((await db.admin`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
        await waitUntil(
          "the outsider confirmed past the update",
          async () =>
            Boolean(
              (
                await db.admin`select confirmed_flush_lsn >= ${after}::pg_lsn as ok from pg_replication_slots where
                slot_name = ${m.slot_name!}`
              )[0]?.ok,
            ),
          20_000,
        );
        // The outsider acknowledges every second: 3 s under the lock let it confirm past the cutover's target even on
        // a loaded machine (with 1 s it sometimes had not, and the refusal said only "bytes behind").
        const err = await cutover(db.sql, table, { catchupTimeoutMs: 3000, lockTimeoutMs: 500, retries: 1 }).then(
          () => null,
          (e: unknown) => e,
        );
        expect(err).toBeInstanceOf(PgshiftError);
        expect((err as Error).message).toContain("did not apply everything");
        expect((err as Error).message).toContain("no pgshift applier recorded it");
        expect((await loadMigration(db.sql, table))!.phase).toBe("backfilled");
        // The updates never reached the shadow: cutting over would have made them vanish from the live table.
        expect(await stale("outsider")).toBe(10);
      } finally {
        await outsider.stop().catch(() => {});
        await streaming;
      }
      await abort(db.sql, table);
    },
  );

  it(
    "a group reaching its commit after the migration left the streaming phases is rolled back, not applied (the " +
      "shadow's name points at the partitioned table again after a swap-back)",
    async () => {
      const m = await backfilled("fence");
      const a = new Applier(requireStream(m), { url: db.url });
      await a.start();
      try {
        await db.admin`update fence set v = 1 where id = 1`;
        await waitUntil("the first change applied", async () => (await stale("fence")) === 0, 20_000);
        // What the cutover and then swap-back write in the migration row, in their own transactions.
        await db.admin`update pgshift.migrations set phase = 'swapped_back' where id = ${m.id}`;
        await db.admin`update fence set v = 2 where id = 2`;
        await waitUntil("the applier stops", async () => a.error !== null, 20_000);
        expect(a.error).toBeInstanceOf(StreamFenced);
        expect(a.error!.message).toContain("phase swapped_back");
        expect(await stale("fence")).toBe(1);
        const after = (await db.admin`select applied_lsn from pgshift.migrations where id = ${m.id}`)[0]!
          .applied_lsn as string;
        await db.admin`update fence set v = 3 where id = 3`;
        await sleep(500);
        expect(await stale("fence")).toBe(2);
        expect((await db.admin`select applied_lsn from pgshift.migrations where id = ${m.id}`)[0]!.applied_lsn).toBe(
          after,
        );
      } finally {
        await a.stop();
        await db.admin`update pgshift.migrations set phase = 'backfilled' where id = ${m.id}`;
      }
      await abort(db.sql, { schema: "public", name: "fence" });
    },
  );
});
