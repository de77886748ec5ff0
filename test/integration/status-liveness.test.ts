import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import {
  compareWithTwin,
  createWorkload,
  type RunningLoad,
  startLoad,
  type Workload,
} from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import type { StatusReport } from "../../src/status.js";
import { verify } from "../../src/verify/verify.js";
import { describeRun, type Running, runCli, spawnCli, waitUntil } from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Item 7 of issue 13: status tells the truth about liveness. Whether a pgshift process holds the migration
 * right now (pid, command, since when) is checked against pg_stat_activity read here, independently; rate
 * and ETA appear only while a backfill runs; the next step follows from what runs. All under a live write
 * load whose twin the table is compared with at the end.
 */

let db: TestDatabase;
const children: Running[] = [];
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  for (const c of children) if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill("SIGKILL");
  await db?.close();
});

const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);

async function statusJson(table: string): Promise<StatusReport> {
  const r = await pgshift(["status", table, "--json"]);
  expect(r.code, describeRun(r)).toBe(0);
  return JSON.parse(r.stdout) as StatusReport;
}

async function statusText(table: string): Promise<string> {
  const r = await pgshift(["status", table]);
  expect(r.code, describeRun(r)).toBe(0);
  return r.stdout;
}

/** Backend pids of this database's sessions named `name`, read here, not through pgshift. */
async function sessionsNamed(name: string): Promise<number[]> {
  const rows =
    await db.admin`select pid from pg_stat_activity where datname = current_database() and application_name = ${name}`;
  return rows.map((r) => Number(r.pid));
}

describe("status while a backfill runs, and after it was killed with SIGKILL", () => {
  const w: Workload = {
    table: { schema: "public", name: "live_bf" },
    twin: { schema: "twin", name: "live_bf" },
    keyKind: "bigint",
  };
  let load: RunningLoad | null = null;
  let bf: Running;

  beforeAll(async () => {
    await createWorkload(db.admin, w, 30_000);
    load = await startLoad(db.url, w, { connections: 2, pauseMs: 5 });
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
  });
  afterAll(async () => {
    await load?.stop();
  });

  it("before any backfill: no holder, no rate, next is to run the backfill", async () => {
    const s = await statusJson("live_bf");
    expect(s.running.holder).toBeNull();
    expect(s.running.backfillRunning).toBe(false);
    expect(s.rate).toBeNull();
    expect(s.etaSeconds).toBeNull();
    expect(s.next).toBe("run pgshift backfill public.live_bf");
  });

  it(
    "while a backfill runs in another process: status names it (pid, command, since), shows rate and ETA, and says " +
      "wait",
    async () => {
      // Slow on purpose (at least 150 s for the whole copy): it must still be copying when it is killed below,
      // however long the status commands take on a busy machine.
      bf = spawnCli(["backfill", "live_bf", "--batch-size", "100", "--sleep-ms", "500", "--url", db.url]);
      children.push(bf);
      await waitUntil(
        "the backfill has copied a few batches",
        async () => ((await loadMigration(db.admin, w.table))?.batches ?? 0) >= 3,
        60_000,
      );
      const pids = await sessionsNamed("pgshift backfill");
      expect(pids).toHaveLength(1);
      const s = await statusJson("live_bf");
      expect(s.phase).toBe("backfilling");
      expect(s.running.holder).toMatchObject({
        pid: pids[0],
        applicationName: "pgshift backfill",
        command: "backfill",
      });
      expect(Date.parse(s.running.holder!.since!)).toBeLessThanOrEqual(Date.now());
      expect(s.running.backfillRunning).toBe(true);
      expect(s.running.lastBatchAt).not.toBeNull();
      expect(s.rate).toBeGreaterThan(0);
      expect(s.etaSeconds).not.toBeNull();
      expect(s.next).toMatch(
        new RegExp(
          `^wait: pgshift backfill \\(backend pid ${pids[0]}, since .*\\) is copying; watch it with: watch -n 5 ` +
            `pgshift status public.live_bf$`,
        ),
      );
      expect(s.next).not.toContain("run pgshift backfill");

      const text = await statusText("live_bf");
      expect(text).toContain(`pgshift backfill (backend pid ${pids[0]}`);
      expect(text).toContain("holds the migration");
      expect(text).toMatch(/rows\/s, ETA /);
      expect(text).not.toContain("run pgshift backfill");
      expect(bf.child.exitCode).toBeNull();
    },
  );

  it(
    "after kill -9 of that backfill: no holder, no rate or ETA, and the next step is to re-run backfill from the " +
      "checkpoint",
    async () => {
      bf.child.kill("SIGKILL");
      expect((await bf.exited).signal).toBe("SIGKILL");
      // The server ends the session once it sees the closed connection: checked here, not through pgshift.
      await waitUntil(
        "the killed backfill's session is gone",
        async () => (await sessionsNamed("pgshift backfill")).length === 0,
        30_000,
        100,
      );
      const m = (await loadMigration(db.admin, w.table))!;
      expect(m.phase).toBe("backfilling");
      expect(m.copy_finished_at).toBeNull();
      expect(m.rows_copied).toBeGreaterThan(0);

      const s = await statusJson("live_bf");
      expect(s.running.holder).toBeNull();
      expect(s.running.backfillRunning).toBe(false);
      expect(s.rate).toBeNull();
      expect(s.etaSeconds).toBeNull();
      expect(s.running.lastBatchAt).toBe(m.updated_at.toISOString());
      expect(s.next).toMatch(
        new RegExp(
          String.raw`^no backfill is running \(it stopped or was killed; last batch at .*\): ` +
            String.raw`run pgshift backfill public\.live_bf to resume from its checkpoint \(\d+ rows copied\)$`,
        ),
      );

      const text = await statusText("live_bf");
      expect(text).toContain("no pgshift command is working on it (no backfill is running)");
      expect(text).toContain("- (no backfill is running)");
      expect(text).not.toContain("ETA");
      expect(text).toContain("last batch");
    },
  );

  it(
    "re-running the backfill resumes and completes; status then says verify and cutover, and the table equals its " +
      "twin",
    async () => {
      const r = await pgshift(["backfill", "live_bf"]);
      expect(r.code, describeRun(r)).toBe(0);
      const s = await statusJson("live_bf");
      expect(s.phase).toBe("backfilled");
      expect(s.running.holder).toBeNull();
      expect(s.next).toBe("run pgshift verify public.live_bf, then pgshift cutover public.live_bf");
      expect((await verify(db.sql, w.table)).equal).toBe(true);
      const stats = await load!.stop();
      load = null;
      expect(stats.errors).toEqual([]);
      const cmp = await compareWithTwin(db.admin, w.table, w.twin, "bigint");
      expect(cmp).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
    },
  );
});

describe("logical mode: the stream's consumer", () => {
  const table = { schema: "public", name: "live_lg" };
  let sync: Running | null = null;
  beforeAll(async () => {
    await db.admin.unsafe(`
      create table live_lg (id bigint primary key, created_at timestamptz not null, v text);
      insert into live_lg select i, timestamptz '2025-01-01' + i * interval '1 hour', 'v' from
        generate_series(1, 2000) i;`);
    await startMigration(db.sql, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
      mode: "logical",
    });
    expect((await backfill(db.sql, table)).complete).toBe(true);
  });
  afterAll(async () => {
    if (sync) {
      sync.child.kill("SIGINT");
      await sync.exited;
    }
  });

  it(
    "with no sync attached the next step says to run one; with one attached status names it and says verify, " +
      "cutover",
    async () => {
      const idle = await statusJson("live_lg");
      expect(idle.running.streamConsumer).toBeNull();
      expect(idle.next).toBe(
        "run pgshift verify public.live_lg, then pgshift cutover public.live_lg; meanwhile run pgshift sync " +
          "public.live_lg (nothing streams the replication slot now: WAL piles up until something does)",
      );
      sync = spawnCli(["sync", "live_lg", "--url", db.url]);
      children.push(sync);
      await waitUntil(
        "sync streams the slot",
        async () => {
          const r = await db.admin`select active from pg_replication_slots where slot_name = ${idle.stream!.slot}`;
          return Boolean(r[0]?.active);
        },
        60_000,
        100,
      );
      const pids = await sessionsNamed("pgshift sync public.live_lg");
      expect(pids.length).toBeGreaterThan(0);
      const s = await statusJson("live_lg");
      expect(s.running.holder).toBeNull();
      expect(s.running.streamConsumer).toMatchObject({ command: "sync", pid: pids[0] });
      expect(s.running.streamConsumer!.walsenderPid).toBe(s.stream!.activePid);
      expect(s.next).toBe("run pgshift verify public.live_lg, then pgshift cutover public.live_lg");
      expect(await statusText("live_lg")).toContain(`the stream is applied by pgshift sync (backend pid ${pids[0]}`);
    },
  );
});
