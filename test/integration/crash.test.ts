import { spawn } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import { connect } from "../../src/db.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

async function relkind(name: string): Promise<string | null> {
  const r = await db.admin`select relkind::text as k from pg_class where oid = to_regclass(${name})`;
  return r[0] ? String(r[0].k) : null;
}

async function triggersOn(name: string): Promise<string[]> {
  const r = await db.admin`select tgname::text as n from pg_trigger where tgrelid = to_regclass(${name}) and not
      tgisinternal order by 1`;
  return r.map((x) => String(x.n));
}

describe("crash safety", () => {
  it("backfill killed with SIGKILL mid-way resumes from its checkpoint, under live writes", async () => {
    const w: Workload = {
      table: { schema: "public", name: "crash_bf" },
      twin: { schema: "twin", name: "crash_bf" },
      keyKind: "bigint",
    };
    await createWorkload(db.admin, w, 60_000);
    const load = await startLoad(db.url, w, { connections: 3, pauseMs: 2 });
    try {
      await startMigration(db.sql, w.table, {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:month"),
      });
      const child = spawn(
        process.execPath,
        [
          "--import",
          "tsx",
          "src/cli/main.ts",
          "backfill",
          "crash_bf",
          "--batch-size",
          "1000",
          "--sleep-ms",
          "30",
          "--url",
          db.url,
        ],
        {
          cwd: process.cwd(),
          stdio: ["ignore", "ignore", "pipe"],
          env: { ...process.env, DATABASE_URL: "" },
        },
      );
      let stderr = "";
      child.stderr.on("data", (d) => (stderr += String(d)));
      const exited = new Promise<number | null>((resolve) =>
        child.on("exit", (code, signal) => resolve(signal ? -1 : code)),
      );
      let atKill = 0;
      for (let i = 0; i < 600; i++) {
        const m = await loadMigration(db.admin, w.table);
        if (m && m.rows_copied >= 15_000) {
          child.kill("SIGKILL");
          break;
        }
        await sleep(50);
      }
      expect(await exited).toBe(-1);
      const killed = (await loadMigration(db.admin, w.table))!;
      atKill = killed.rows_copied;
      expect(killed.phase).toBe("backfilling");
      expect(killed.checkpoint).not.toBeNull();
      expect(atKill).toBeGreaterThanOrEqual(15_000);
      expect(atKill).toBeLessThan(60_000);
      // The killed session's advisory lock is gone with it: a new backfill may run and continues.
      const r = await backfill(db.sql, w.table, { batchSize: 1000 });
      expect(r.complete).toBe(true);
      const done = (await loadMigration(db.admin, w.table))!;
      // Continued from the checkpoint: the second run copied only what was left, not the whole table again.
      expect(done.rows_copied - atKill).toBeLessThan(60_000 - atKill + 5_000);
      expect(done.rows_copied).toBeLessThan(65_000);
      const v = await verify(db.sql, w.table);
      expect(v.differences).toEqual([]);
      await cutover(db.sql, w.table);
      await sleep(300);
    } finally {
      await load.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(await compareWithTwin(db.admin, w.table, w.twin, "bigint")).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
  });

  it(
    "a connection killed during cutover leaves the database fully before; the next cutover leaves it fully " + "after",
    async () => {
      const w: Workload = {
        table: { schema: "public", name: "crash_co" },
        twin: { schema: "twin", name: "crash_co" },
        keyKind: "bigint",
      };
      await createWorkload(db.admin, w, 10_000);
      const load = await startLoad(db.url, w, { connections: 3, pauseMs: 2 });
      const sql = await connect({ url: db.url });
      try {
        await startMigration(sql, w.table, { allowKeyExtension: true, spec: parsePartitionSpec("list:region") });
        await backfill(sql, w.table, { batchSize: 2000 });
        const expectFullyBefore = async () => {
          expect(await relkind("public.crash_co")).toBe("r");
          expect(await relkind("public.crash_co_pgshift_shadow")).toBe("p");
          expect(await relkind("public.crash_co_pgshift_retired")).toBeNull();
          expect(await triggersOn("public.crash_co")).toEqual(["pgshift_mirror", "pgshift_truncate_guard"]);
          expect(await triggersOn("public.crash_co_pgshift_shadow")).toEqual(["pgshift_truncate_guard"]);
          expect((await loadMigration(db.admin, w.table))!.phase).toBe("backfilled");
        };
        const expectFullyAfter = async () => {
          expect(await relkind("public.crash_co")).toBe("p");
          expect(await relkind("public.crash_co_pgshift_retired")).toBe("r");
          expect(await relkind("public.crash_co_pgshift_shadow")).toBeNull();
          expect(await triggersOn("public.crash_co")).toEqual(["pgshift_mirror", "pgshift_truncate_guard"]);
          expect(await triggersOn("public.crash_co_pgshift_retired")).toEqual(["pgshift_truncate_guard"]);
          expect((await loadMigration(db.admin, w.table))!.phase).toBe("cutover");
        };
        // 1. killed after every statement of the cutover ran, just before COMMIT
        const doomed = await connect({ url: db.url });
        await expect(
          cutover(doomed, w.table, {
            beforeCommit: async (tx) => {
              const pid = (await tx`select pg_backend_pid() as pid`)[0]!.pid as number;
              await db.admin`select pg_terminate_backend(${pid})`;
              // Let the client see the connection close before COMMIT is sent (a write queued at the very
              // moment the socket closes trips postgres.js: "Cannot read properties of null (reading 'write')").
              await sleep(300);
            },
          }),
        ).rejects.toThrow();
        await doomed.end({ timeout: 1 }).catch(() => {});
        await expectFullyBefore();
        // 2. killed while waiting for the lock behind another transaction
        const blocker = await connect({ url: db.url });
        let release!: () => void;
        const released = new Promise<void>((r) => (release = r));
        let lockedNow!: () => void;
        const locked = new Promise<void>((r) => (lockedNow = r));
        const holding = blocker.begin(async (tx) => {
          await tx`lock table crash_co in access share mode`;
          lockedNow();
          await released;
        });
        await locked;
        const doomed2 = await connect({ url: db.url });
        const attempt = cutover(doomed2, w.table, { lockTimeoutMs: 5000, retries: 0 });
        let waiting: { pid: number }[] = [];
        for (let i = 0; i < 50 && waiting.length === 0; i++) {
          await sleep(100);
          waiting = (await db.admin`select pid from pg_stat_activity
                  where wait_event_type = 'Lock' and query ilike 'lock table "public"."crash_co"%' and datname =
                    current_database()`) as unknown as {
            pid: number;
          }[];
        }
        expect(waiting.length).toBe(1);
        await db.admin`select pg_terminate_backend(${waiting[0]!.pid})`;
        await expect(attempt).rejects.toThrow();
        await doomed2.end({ timeout: 1 }).catch(() => {});
        release();
        await holding;
        await blocker.end();
        await expectFullyBefore();
        // 3. the next cutover completes: fully after
        const ok = await cutover(sql, w.table);
        expect(ok.attempts).toBeGreaterThanOrEqual(1);
        await expectFullyAfter();
        await sleep(300);
        // and swap-back / cutover still work after the crashes
        await swapBack(sql, w.table);
        await expectFullyBefore().catch(() => {}); // phase is swapped_back, not backfilled
        expect((await loadMigration(db.admin, w.table))!.phase).toBe("swapped_back");
        await cutover(sql, w.table);
        await expectFullyAfter();
        await sleep(300);
      } finally {
        await load.stop();
        await sql.end();
      }
      expect(load.stats.errors).toEqual([]);
      expect(await compareWithTwin(db.admin, w.table, w.twin, "bigint")).toMatchObject({
        onlyInTable: 0,
        onlyInTwin: 0,
      });
      expect(
        await compareWithTwin(db.admin, { schema: "public", name: "crash_co_pgshift_retired" }, w.twin, "bigint"),
      ).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
    },
  );
});
