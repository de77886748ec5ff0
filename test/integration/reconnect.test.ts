import pTimeout from "p-timeout";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Sql, table as tableRef } from "../../src/db.js";
import { type EmbeddedServer, startEmbedded } from "../../src/embedded.js";
import { isConnectionLoss } from "../../src/errors.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { loadMigration, requireStream } from "../../src/migration/state.js";
import { Applier } from "../../src/mirror/apply.js";
import { describeRun, exitWithin, expectRefusal, type Running, runCli, spawnCli, waitUntil } from "../support/cli.js";
import { sleep } from "../support/db.js";
import { startProxy } from "../support/proxy.js";

/**
 * `pgshift sync` outlives its connections: a restart of the server (fast shutdown, every session terminated
 * mid-stream and mid-apply), the walsender terminated, the apply session terminated. Each time it connects
 * again and goes on from the slot's confirmed position, and the shadow ends equal to an independent twin
 * written in the same transactions as the table. With --no-loop it exits 2 with one line instead.
 * A server of its own: the test restarts it.
 */

let server: EmbeddedServer;
let admin: Sql;
const pgshift = (args: string[]) => runCli([...args, "--url", server.url]);

beforeAll(async () => {
  server = await startEmbedded();
  admin = postgres(server.url, { max: 2, onnotice: () => {} }) as unknown as Sql;
}, 120_000);

/** Every sync started here: one left running by a failed test would try to connect for ever. */
const children: Running[] = [];

afterAll(async () => {
  for (const c of children) if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill("SIGKILL");
  await admin?.end({ timeout: 5 });
  await server?.stop();
});

const slotActive = async (slot: string) =>
  Boolean((await admin`select active from pg_replication_slots where slot_name = ${slot}`)[0]?.active);

/** `pgshift sync <table>` (with `extra` options), once attached to the slot. */
async function startSync(table: string, slot: string, extra: string[] = []): Promise<Running> {
  const s = spawnCli(["sync", table, ...extra, "--url", server.url]);
  children.push(s);
  let done = false;
  void s.exited.then(() => (done = true));
  await waitUntil(`pgshift sync ${table} attaches to ${slot}`, async () => {
    if (done) throw new Error(`pgshift sync exited early:\n${s.out.stdout}\n${s.out.stderr}`);
    return slotActive(slot);
  });
  return s;
}

const describeSync = (s: Running) => `--- stdout\n${s.out.stdout}--- stderr\n${s.out.stderr}---`;

/** JSON log lines of a sync child with the given message. */
const logLines = (s: Running, msg: string) =>
  s.out.stderr
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as { msg?: string })
    .filter((l) => l.msg?.startsWith(msg));

describe("pgshift sync when its connections are lost", () => {
  it(
    "connects again after a server restart and after its walsender and apply session are terminated; the shadow " +
      "equals the twin",
    async () => {
      const name = "reconnect_orders";
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(admin, w, 5_000);
      expect(
        (
          await pgshift([
            "start",
            "--allow-key-extension",
            name,
            "--partition-by",
            "range:created_at:month",
            "--mode",
            "logical",
          ])
        ).code,
      ).toBe(0);
      const bf = await pgshift(["backfill", name]);
      expect(bf.code, describeRun(bf)).toBe(0);
      const m = (await loadMigration(admin, w.table))!;
      const slot = m.slot_name!;
      const sync = await startSync(name, slot);

      // 1. The server restarts right after a load (sync's last group may still be open): every session is cut.
      // The load stops first: its postgres.js pools, reconnecting during the shutdown, would hold the
      // shutdown up (postgres.js 3.4.9 bug, see sync.ts); sync itself opens new pools after a loss.
      const load1 = await startLoad(server.url, w, { connections: 3, pauseMs: 2 });
      await sleep(1500);
      const stats1 = await load1.stop();
      const t0 = Date.now();
      await server.restart();
      expect(stats1.errors).toEqual([]);
      expect(stats1.inserts + stats1.updates + stats1.deletes, "the load ran before the restart").toBeGreaterThan(100);
      // sync tries again during the shutdown: at worst one attempt waits for its connect_timeout (10 s).
      expect(Date.now() - t0, "nothing held the server's shutdown up for long").toBeLessThan(12_000);
      await waitUntil("sync attaches again after the restart", () => slotActive(slot), 30_000, 100);

      // 2. The walsender is terminated (as a network failure or an administrator would), then the apply session.
      const load2 = await startLoad(server.url, w, { connections: 3, pauseMs: 2 });
      await sleep(1000);
      const ws = await admin`select pg_terminate_backend(active_pid) as ok from pg_replication_slots where slot_name =
        ${slot} and active`;
      expect(ws[0]?.ok).toBe(true);
      await sleep(1500);
      await waitUntil("sync attaches again after its walsender was terminated", () => slotActive(slot), 30_000, 100);
      // The apply session, three times, at random points: in a group or between two. Regressions: terminated
      // in a group, the applier once confirmed a keepalive's position while rolling that group back (the slot
      // never sent those transactions again); terminated between two groups, it waited for ever in
      // postgres.js reserve() while sync reported 0 changes/s.
      const applySessions = async () =>
        (
          await admin`select count(*)::int as n from pg_stat_activity where application_name =
            ${`pgshift apply ${name}`}`
        )[0]!.n;
      for (let i = 0; i < 3; i++) {
        await waitUntil(
          "sync has an apply session",
          async () => (await applySessions()) > 0 && (await slotActive(slot)),
          30_000,
          100,
        );
        await sleep(700);
        await waitUntil(
          "an apply session was terminated",
          async () =>
            (
              await admin`select pg_terminate_backend(pid) as ok from pg_stat_activity where application_name =
              ${`pgshift apply ${name}`}`
            ).length > 0,
          30_000,
          50,
        );
      }
      await sleep(500);
      const stats2 = await load2.stop();
      expect(stats2.errors, "terminating sync's sessions does not touch the application's").toEqual([]);
      expect(stats2.inserts + stats2.updates + stats2.deletes).toBeGreaterThan(100);

      // sync is still running, said what happened, and the shadow converges to the twin.
      expect(sync.child.exitCode, describeSync(sync)).toBeNull();
      // The losses (restart, walsender, apply session three times) made sync connect again. A termination may
      // land on a session already on its way out, or on an attempt still connecting: count at least three.
      const streamingAfterLastLoss = () => {
        const events = logLines(sync, "sync: ").map((l) => l.msg ?? "");
        const last = (prefix: string) => events.reduce((at, m, i) => (m.startsWith(prefix) ? i : at), -1);
        const lastLoss = last("sync: connection lost");
        return lastLoss >= 0 && last("sync: streaming again") > lastLoss;
      };
      await waitUntil(
        "sync streams again after the last loss",
        async () => streamingAfterLastLoss(),
        30_000,
        100,
      ).catch((err: unknown) => {
        throw new Error(`${err instanceof Error ? err.message : String(err)}\n${describeSync(sync)}`);
      });
      expect(logLines(sync, "sync: connection lost").length, describeSync(sync)).toBeGreaterThanOrEqual(3);
      expect(await compareWithTwin(admin, w.table, w.twin, "bigint")).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
      let last = { onlyInTable: -1, onlyInTwin: -1, rows: 0 };
      await waitUntil(
        "the shadow equals the twin",
        async () => {
          last = await compareWithTwin(admin, m.partitioned, w.twin, "bigint");
          return last.onlyInTable === 0 && last.onlyInTwin === 0;
        },
        30_000,
        250,
      ).catch((err: unknown) => {
        throw new Error(
          `${err instanceof Error ? err.message : String(err)}: ${JSON.stringify(last)}\n${describeSync(sync)}`,
        );
      });
      expect(last.rows).toBeGreaterThan(4_000);

      // Cutover with sync attached; sync then finishes by itself, exit 0.
      const cut = await pgshift(["cutover", name]);
      expect(cut.code, describeRun(cut)).toBe(0);
      const ex = await exitWithin(sync, 20_000);
      expect(ex, describeSync(sync)).toMatchObject({ code: 0, timedOut: false });
      expect(sync.out.stdout).toContain("cut over");
      expect(await compareWithTwin(admin, w.table, w.twin, "bigint")).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
      expect((await admin`select count(*)::int as n from pg_replication_slots`)[0]!.n).toBe(0);
      expect((await pgshift(["finalize", name, "--yes"])).code).toBe(0);
    },
  );

  it("--no-loop: exits 2 with one line when its connection is lost, and a new sync goes on", async () => {
    const name = "noloop_orders";
    const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
    await createWorkload(admin, w, 1_000);
    expect(
      (
        await pgshift([
          "start",
          "--allow-key-extension",
          name,
          "--partition-by",
          "range:created_at:month",
          "--mode",
          "logical",
        ])
      ).code,
    ).toBe(0);
    expect((await pgshift(["backfill", name])).code).toBe(0);
    const m = (await loadMigration(admin, w.table))!;
    const slot = m.slot_name!;
    const sync = await startSync(name, slot, ["--no-loop"]);
    await admin`select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = ${slot} and active`;
    const ex = await exitWithin(sync, 20_000);
    expectRefusal(
      {
        args: ["sync", name, "--no-loop"],
        code: ex.code,
        signal: ex.signal,
        stdout: sync.out.stdout,
        stderr: sync.out.stderr,
        ms: 0,
      },
      "sync lost its connection to the server",
    );
    expect(logLines(sync, "sync: connection lost")).toEqual([]);

    // Nothing was lost: a change made meanwhile reaches the shadow through the next sync.
    await admin`update ${tableRef(admin, w.table)} set status = 'after-no-loop' where id = 1`;
    const again = await startSync(name, slot);
    await waitUntil(
      "the change made while no sync ran reaches the shadow",
      async () =>
        (
          await admin`select count(*)::int as n from ${tableRef(admin, m.partitioned)} where id = 1 and
            status = 'after-no-loop'`
        )[0]!.n === 1,
      20_000,
      100,
    );
    const ab = await pgshift(["abort", name]);
    expect(ab.code, describeRun(ab)).toBe(0);
    const gone = await exitWithin(again, 20_000);
    expect(gone, describeSync(again)).toMatchObject({ code: 0, timedOut: false });
    expect((await admin`select count(*)::int as n from pg_replication_slots where slot_name = ${slot}`)[0]!.n).toBe(0);
  });

  it(
    "an apply session terminated while the applier starts fails the start with a connection loss (so sync connects " +
      "again)",
    async () => {
      // Regression: terminated while the stream was starting, the applier stopped its own replication client,
      // and start() reported that client's "Client was closed and is not queryable", which is not a
      // connection loss: sync exited 1 instead of connecting again (a fresh-clone CI run).
      const name = "startrace_orders";
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(admin, w, 500);
      expect(
        (
          await pgshift([
            "start",
            "--allow-key-extension",
            name,
            "--partition-by",
            "range:created_at:month",
            "--mode",
            "logical",
          ])
        ).code,
      ).toBe(0);
      const m = (await loadMigration(admin, w.table))!;
      const app = `pgshift apply ${name}`;
      const applySession = async () =>
        (await admin`select pid from pg_stat_activity where application_name = ${app}`)[0]?.pid as number | undefined;
      const terminateApply = () =>
        admin`select pg_terminate_backend(pid) from pg_stat_activity where application_name = ${app}`;
      const poll = async (what: () => Promise<number | undefined>) => {
        for (let t = 0; t < 5000; t++) {
          const pid = await what();
          if (pid !== undefined) return pid;
          await sleep(1);
        }
        throw new Error("the session never appeared");
      };
      const outcomes: string[] = [];
      for (let i = 0; i < 8; i++) {
        // Deterministic first: the replication connection is held in a proxy (as a slow network would)
        // while its client is still connecting, and the apply session is terminated meanwhile.
        const proxy = i < 2 ? await startProxy(server.url, { holdReplication: true }) : null;
        const applier = new Applier(requireStream(m), { url: proxy?.url ?? server.url });
        const starting = applier.start().then(
          () => "started",
          (err: unknown) => err,
        );
        if (proxy) {
          await proxy.held();
          await poll(applySession);
          await terminateApply();
          await sleep(200 * i);
          proxy.release();
        } else {
          // At a random point: as soon as the apply session exists, or up to 60 ms later.
          await poll(applySession);
          await sleep((i % 4) * 20);
          await terminateApply();
        }
        // Regression too: stopped while its replication client connected, start() once waited for ever.
        const outcome = await pTimeout(starting, { milliseconds: 20_000, message: "applier.start() never settled" });
        if (outcome === "started") {
          // Terminated after the start: the applier fails with the loss (sync's next session goes on).
          await waitUntil("the started applier notices the loss", async () => applier.error !== null, 10_000, 20);
          expect(isConnectionLoss(applier.error), String(applier.error)).toBe(true);
          outcomes.push("after start");
        } else {
          expect(isConnectionLoss(outcome), `start failed with: ${String(outcome)}`).toBe(true);
          outcomes.push("during start");
        }
        await applier.stop();
        await proxy?.close();
        await waitUntil("the slot is free again", async () => !(await slotActive(m.slot_name!)), 20_000, 20);
      }
      expect(outcomes.slice(0, 2), "both terminations made while the stream connected landed during the start").toEqual(
        ["during start", "during start"],
      );
      expect((await pgshift(["abort", name])).code).toBe(0);
      expect(
        (await admin`select count(*)::int as n from pg_replication_slots where slot_name = ${m.slot_name!}`)[0]!.n,
      ).toBe(0);
    },
  );
});
