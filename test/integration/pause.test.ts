import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import type { StatusReport } from "../../src/status.js";
import { describeRun, exitWithin, expectRefusal, type Running, runCli, spawnCli, waitUntil } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * Item 4 of issue 16: pgshift pause and pgshift resume from another process (the CLI as a process, as an operator
 * runs it from a second terminal). A running backfill stops between batches (no batch while paused, its checkpoint
 * kept), status says who paused it and since when, resume lets it finish with every row copied; a backfill started
 * while paused waits before its first batch and says so.
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

/** The migration's copy counters, read here, not through pgshift. */
async function copyState(name: string): Promise<{ batches: number; rowsCopied: number; checkpoint: string[] | null }> {
  const r =
    await db.admin`select batches, rows_copied, checkpoint from pgshift.migrations where source_table = ${name}`;
  return {
    batches: Number(r[0]!.batches),
    rowsCopied: Number(r[0]!.rows_copied),
    checkpoint: (r[0]!.checkpoint as string[] | null) ?? null,
  };
}

async function prepare(name: string, rows: number): Promise<Workload> {
  const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
  await createWorkload(db.admin, w, rows);
  await startMigration(db.sql, w.table, {
    allowKeyExtension: true,
    spec: parsePartitionSpec("range:created_at:month"),
    mode: "trigger",
  });
  return w;
}

describe("pgshift pause and resume", () => {
  it("stop a running backfill between batches (checkpoint kept), status says who and since when", async () => {
    const w = await prepare("paused_bf", 20_000);
    // About 100 batches of 200 rows, 150 ms apart: long enough to pause it from another process mid-way.
    const bf = spawnCli(["backfill", "paused_bf", "--batch-size", "200", "--sleep-ms", "150", "--url", db.url]);
    children.push(bf);
    await waitUntil("the backfill copied 3 batches", async () => (await copyState("paused_bf")).batches >= 3, 60_000);

    const p = await pgshift(["pause", "paused_bf", "--json"]);
    expect(p.code, describeRun(p)).toBe(0);
    const paused = JSON.parse(p.stdout) as { paused: boolean; changed: boolean; by: string; since: string };
    expect(paused).toMatchObject({ paused: true, changed: true, by: "postgres" });
    // A second pause changes nothing and keeps who paused first.
    const again = await pgshift(["pause", "paused_bf"]);
    expect(again.code, describeRun(again)).toBe(0);
    expect(again.stdout).toContain(`already paused public.paused_bf by postgres`);

    // The batch in flight commits; after it, none while paused.
    await sleep(1500);
    const a = await copyState("paused_bf");
    await sleep(2500);
    const b = await copyState("paused_bf");
    expect(b).toEqual(a);
    expect(a.checkpoint).not.toBeNull();
    expect(a.rowsCopied).toBeLessThan(20_000);

    const s = await statusJson("paused_bf");
    expect(s.paused).toMatchObject({ by: "postgres", since: paused.since });
    expect(s.paused?.client).toContain("pgshift pause");
    expect(s.running.holder?.command).toBe("backfill");
    expect(s.next).toContain("pgshift resume public.paused_bf");
    const text = await pgshift(["status", "paused_bf"]);
    expect(text.stdout).toContain("paused by postgres");
    expect(bf.out.stderr).toContain("backfill: paused by postgres");

    const r = await pgshift(["resume", "paused_bf"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toContain("resumed public.paused_bf");
    const done = await exitWithin(bf, 180_000);
    expect(done.code, bf.out.stderr).toBe(0);
    expect(bf.out.stdout).toContain("backfill complete: 20000 rows");
    expect((await statusJson("paused_bf")).paused).toBeNull();
    const resumed = await pgshift(["resume", "paused_bf"]);
    expect(resumed.stdout).toContain("was not paused");
    await expectEqualToTwin(
      db.admin,
      [w.table, { schema: "public", name: "paused_bf_pgshift_shadow" }],
      w.twin,
      "bigint",
    );
  });

  it("make a backfill started while paused wait before its first batch, saying so, until resume", async () => {
    const w = await prepare("paused_early", 5_000);
    const p = await pgshift(["pause", "paused_early"]);
    expect(p.code, describeRun(p)).toBe(0);
    expect(p.stdout).toContain("paused public.paused_early by postgres");
    const bf = spawnCli(["backfill", "paused_early", "--batch-size", "1000", "--url", db.url]);
    children.push(bf);
    await waitUntil("the backfill says it waits", async () => bf.out.stderr.includes("paused by postgres"), 60_000);
    expect(bf.out.stderr).toContain("waiting (before the next batch) for: pgshift resume public.paused_early");
    // the JSON progress line says so too
    const progress = bf.out.stderr.split("\n").filter((l) => l.includes('"msg":"backfill progress"'));
    expect(
      progress.some((l) => l.includes('"paused":"paused by postgres')),
      bf.out.stderr,
    ).toBe(true);
    await sleep(1500);
    expect(await copyState("paused_early")).toMatchObject({ batches: 0, rowsCopied: 0 });
    expect(bf.child.exitCode).toBeNull();
    const r = await pgshift(["resume", "paused_early", "--json"]);
    expect(JSON.parse(r.stdout)).toMatchObject({ paused: false, changed: true });
    const done = await exitWithin(bf, 120_000);
    expect(done.code, bf.out.stderr).toBe(0);
    expect(bf.out.stdout).toContain("backfill complete: 5000 rows");
    await expectEqualToTwin(
      db.admin,
      [w.table, { schema: "public", name: "paused_early_pgshift_shadow" }],
      w.twin,
      "bigint",
    );
  });

  it("refuse a table with no migration: one error line, exit 2", async () => {
    await db.admin`create table if not exists not_migrated (id int primary key)`;
    expectRefusal(await pgshift(["pause", "not_migrated"]), "no migration of public.not_migrated");
    expectRefusal(await pgshift(["resume", "not_migrated"]), "no migration of public.not_migrated");
  });
});
