import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { connect, type Sql } from "../../src/db.js";
import { on, type PgshiftEvents } from "../../src/events.js";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { status } from "../../src/status.js";
import { verify } from "../../src/verify/verify.js";
import { describeRun, exitWithin, type Running, runCli, spawnCli, waitUntil } from "../support/cli.js";
import { sleep } from "../support/db.js";
import { type PrimaryAndStandby, startPrimaryWithStandby } from "../support/standby.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * Item 3 of issue 16: the copy and the verify wait between batches while a throttle holds, with the reason in
 * pgshift status, and go on once it lifts. On a primary of its own with a physical standby streaming from it
 * (test/support/standby.ts): the standby's replay paused (pg_wal_replay_pause) makes the copy wait until it is
 * resumed; the operator's --throttle-query (the CLI as a process), --max-active-sessions and
 * --max-slot-lag-bytes make it wait and then go on; verify obeys too. Every copy ends equal to its twin.
 */

let ps: PrimaryAndStandby;
let sql: Sql;
let admin: Sql;
const children: Running[] = [];
const events: PgshiftEvents["throttle"][] = [];
const off = on("throttle", (e) => events.push(e));

beforeAll(async () => {
  ps = await startPrimaryWithStandby();
  sql = await connect({ url: ps.primary.url });
  admin = await connect({ url: ps.primary.url, max: 4 });
});
afterAll(async () => {
  off();
  for (const c of children) if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill("SIGKILL");
  await sql?.end({ timeout: 5 });
  await admin?.end({ timeout: 5 });
  await ps?.stop();
});

async function prepare(name: string, rows: number): Promise<Workload> {
  const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
  await createWorkload(admin, w, rows);
  await startMigration(sql, w.table, {
    allowKeyExtension: true,
    spec: parsePartitionSpec("range:created_at:month"),
    mode: "trigger",
  });
  return w;
}

const shadowOf = (w: Workload) => ({ schema: "public", name: `${w.table.name}_pgshift_shadow` });

async function batches(name: string): Promise<number> {
  return Number((await admin`select batches from pgshift.migrations where source_table = ${name}`)[0]!.batches);
}

/** Waits until status (another session) shows a throttle reason matching `re`; checks no batch runs meanwhile. */
async function expectThrottled(w: Workload, re: RegExp): Promise<void> {
  await waitUntil(
    `status shows the throttle ${re}`,
    async () => re.test((await status(admin, w.table)).throttle?.reason ?? ""),
    60_000,
  );
  const s = await status(admin, w.table);
  expect(s.throttle?.since).toMatch(/^\d{4}-/);
  const b = await batches(w.table.name);
  await sleep(1200);
  expect(await batches(w.table.name)).toBe(b);
}

describe("throttles", () => {
  it("a physical standby whose replay is paused makes the copy wait; it goes on once replay resumes", async () => {
    const w = await prepare("thr_replica", 20_000);
    await ps.standbySql`select pg_wal_replay_pause()`;
    let resumed = false;
    try {
      const run = backfill(sql, w.table, { batchSize: 500, maxReplicaLagMs: 300, checkEveryMs: 100 });
      await expectThrottled(w, /^replica lag: standby pgshift_standby replays \d+ ms behind \(limit 300 ms\)$/);
      expect(await batches(w.table.name)).toBeLessThan(40);
      await ps.standbySql`select pg_wal_replay_resume()`;
      resumed = true;
      const r = await run;
      expect(r.complete).toBe(true);
      expect(r.rowsCopied).toBe(20_000);
    } finally {
      if (!resumed) await ps.standbySql`select pg_wal_replay_resume()`;
    }
    const mine = events.filter((e) => e.table === "public.thr_replica");
    expect(mine[0]).toMatchObject({ step: "backfill", ms: 0 });
    expect(mine[0]!.reason).toMatch(/^replica lag/);
    expect(mine.some((e) => e.reason === null && e.ms > 1000)).toBe(true);
    // Its reason is cleared once it went on.
    expect((await admin`select throttle_reason from pgshift.migrations where source_table = 'thr_replica'`)[0]).toEqual(
      { throttle_reason: null },
    );
    await expectEqualToTwin(admin, [w.table, shadowOf(w)], w.twin, "bigint");
  });

  it("--throttle-query (the CLI as a process): waits while true, with the reason in status, then goes on", async () => {
    const w = await prepare("thr_query", 5_000);
    await admin`create table ops_hold (hold boolean not null)`;
    await admin`insert into ops_hold values (true)`;
    const bf = spawnCli([
      "backfill",
      "thr_query",
      "--batch-size",
      "1000",
      "--throttle-query",
      "select hold from ops_hold",
      "--url",
      ps.primary.url,
    ]);
    children.push(bf);
    await expectThrottled(w, /^throttle query: true \(select hold from ops_hold\)$/);
    expect(await batches("thr_query")).toBe(0);
    const st = await runCli(["status", "thr_query", "--json", "--url", ps.primary.url]);
    expect(JSON.parse(st.stdout).throttle.reason, describeRun(st)).toContain("throttle query: true");
    expect(bf.out.stderr).toContain("backfill: throttled: throttle query: true");
    await admin`update ops_hold set hold = false`;
    const done = await exitWithin(bf, 120_000);
    expect(done.code, bf.out.stderr).toBe(0);
    expect(bf.out.stdout).toContain("backfill complete: 5000 rows");
    await expectEqualToTwin(admin, [w.table, shadowOf(w)], w.twin, "bigint");

    // A throttle query that fails is refused before anything changes.
    const bad = await runCli(["verify", "thr_query", "--throttle-query", "select nope", "--url", ps.primary.url]);
    expect(bad.code, describeRun(bad)).toBe(2);
    expect(bad.stderr).toContain("pgshift: error: --throttle-query failed");
  });

  it("--max-active-sessions and --max-slot-lag-bytes make the copy wait, then go on; verify obeys too", async () => {
    const w = await prepare("thr_load", 5_000);
    // Three sessions busy for a while (not pgshift's): more than the limit of 2.
    const busy = postgres(ps.primary.url, { max: 3, onnotice: () => {} });
    const sleeping = [1, 2, 3].map(() => busy`select pg_sleep(60)`.catch(() => {}));
    try {
      const run = backfill(sql, w.table, { batchSize: 1000, maxActiveSessions: 2, checkEveryMs: 100 });
      await expectThrottled(w, /^active sessions: [3-9] sessions are active \(limit 2\)$/);
      expect(await batches("thr_load")).toBe(0);
      await admin`select pg_cancel_backend(pid) from pg_stat_activity where query = 'select pg_sleep(60)'`;
      await Promise.all(sleeping);
      expect((await run).complete).toBe(true);
    } finally {
      await busy.end({ timeout: 1 });
    }
    await expectEqualToTwin(admin, [w.table, shadowOf(w)], w.twin, "bigint");

    // Another logical slot that does not consume: verify waits until it is gone.
    await admin`select pg_create_logical_replication_slot('other_consumer', 'pgoutput')`;
    await admin`create table wal_filler as select g from generate_series(1, 20000) g`;
    let dropped = false;
    try {
      const v = verify(sql, w.table, { chunkSize: 1000, maxSlotLagBytes: 100_000, checkEveryMs: 100 });
      await waitUntil(
        "status shows the slot lag",
        async () =>
          /^slot lag: replication slot other_consumer is \d+ bytes behind/.test(
            (await status(admin, w.table)).throttle?.reason ?? "",
          ),
        60_000,
      );
      const lastVerify = async () =>
        (await admin`select last_verify from pgshift.migrations where source_table = 'thr_load'`)[0]!.last_verify;
      expect(await lastVerify()).toBeNull();
      await admin`select pg_drop_replication_slot('other_consumer')`;
      dropped = true;
      const r = await v;
      expect(r.equal).toBe(true);
      expect(r.rowsCompared).toBe(5_000);
      expect(await lastVerify()).not.toBeNull();
    } finally {
      if (!dropped) await admin`select pg_drop_replication_slot('other_consumer')`.catch(() => {});
    }
    const mine = events.filter((e) => e.table === "public.thr_load" && e.step === "verify");
    expect(mine.map((e) => e.reason === null)).toEqual([false, true]);
  });
});
