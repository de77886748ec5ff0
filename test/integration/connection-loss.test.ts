import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Sql, table as tableRef } from "../../src/db.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { loadMigration, type Migration } from "../../src/migration/state.js";
import { displayName, type QualifiedName } from "../../src/names.js";
import {
  type CliResult,
  describeRun,
  exitWithin,
  expectRefusal,
  type Running,
  runCli,
  spawnCli,
  waitUntil,
} from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Invariant 3 of the design (every step re-runnable after a lost connection): each command's session is
 * terminated while it waits for a lock the test holds (so at a known point, in the middle of its work).
 * The command exits 2 with one line saying the connection was closed and to run it again; the migration is
 * where it was before the command; the same command run again completes. A write load and its twin run
 * throughout, and the live table equals the twin at the end, in both mirror modes.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
const running: Running[] = [];
afterAll(async () => {
  for (const r of running) if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill("SIGKILL");
  await db?.close();
});

const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);

/**
 * Runs `pgshift args` while `hold` (run in a transaction of its own) holds a lock the command needs; once
 * the command's session waits for that lock, terminates it, then releases the lock.
 * @returns the command's result.
 */
async function terminatedWhileWaiting(args: string[], hold: (tx: Sql) => Promise<unknown>): Promise<CliResult> {
  const admin = await db.admin.reserve();
  try {
    const holder = Number((await admin`select pg_backend_pid() as pid`)[0]!.pid);
    await admin`begin`;
    await hold(admin as unknown as Sql);
    const c = spawnCli([...args, "--url", db.url]);
    running.push(c);
    let exited = false;
    void c.exited.then(() => (exited = true));
    // The command's own session, named after it ("pgshift backfill"; not an applier's: those are named
    // "pgshift apply ..."), waiting for the lock held here (not for a row the load holds for a moment), in
    // this test's database (sessions of other test files, on the same server, are named so too).
    const waiter = async () =>
      (
        await db.admin`
        select pid from pg_stat_activity
         where datname = current_database() and application_name = ${`pgshift ${args[0]}`} and ${holder}::int =
           any(pg_blocking_pids(pid))`
      )[0]?.pid as number | undefined;
    let pid: number | undefined;
    await waitUntil(
      `pgshift ${args[0]} waits for the lock`,
      async () => {
        if (exited) throw new Error(`pgshift ${args[0]} exited before waiting:\n${c.out.stdout}\n${c.out.stderr}`);
        pid = await waiter();
        return pid !== undefined;
      },
      60_000,
      20,
    );
    const killed = await db.admin`select pg_terminate_backend(${pid!}::int) as ok`;
    expect(killed[0]?.ok).toBe(true);
    const ex = await exitWithin(c, 30_000);
    if (ex.timedOut)
      throw new Error(
        `pgshift ${args[0]} did not exit within 30 s of losing its session:\n${c.out.stdout}\n${c.out.stderr}`,
      );
    return { args, code: ex.code, signal: ex.signal, stdout: c.out.stdout, stderr: c.out.stderr, ms: 0 };
  } finally {
    await admin`rollback`.catch(() => {});
    admin.release();
  }
}

const lockTable = (t: QualifiedName) => (tx: Sql) => tx`lock table ${tableRef(tx, t)} in access share mode`;

/** The one line of a command whose session was terminated. */
function expectTerminated(r: CliResult): void {
  expectRefusal(r, "the server closed the connection");
  expect(r.stderr, describeRun(r)).toContain("pgshift: hint: re-run the same command");
}

async function relkind(t: QualifiedName): Promise<string | null> {
  const r = await db.admin`select relkind::text as k from pg_class where oid = to_regclass(${displayName(t)})`;
  return r[0] ? String(r[0].k) : null;
}

/** The migration's row, for comparing before and after a terminated command. */
async function state(w: Workload): Promise<Pick<Migration, "phase" | "slot_name" | "retired_table">> {
  const m = (await loadMigration(db.admin, w.table))!;
  return { phase: m.phase, slot_name: m.slot_name, retired_table: m.retired_table };
}

const slots = async (slot: string | null) =>
  slot ? (await db.admin`select count(*)::int as n from pg_replication_slots where slot_name = ${slot}`)[0]!.n : 0;

describe.each(["trigger", "logical"] as const)("%s mode: a command whose session is terminated mid-way", (mode) => {
  it(
    "exits 2 with one line, leaves the migration where it was, and completes when run again (backfill, cutover, " +
      "swap-back, finalize); the table equals the twin",
    async () => {
      const name = `connloss_${mode}`;
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(db.admin, w, 8_000);
      const load = await startLoad(db.url, w, { connections: 3, pauseMs: 3 });
      try {
        const st = await pgshift([
          "start",
          "--allow-key-extension",
          name,
          "--partition-by",
          "range:created_at:month",
          "--mode",
          mode,
        ]);
        expect(st.code, describeRun(st)).toBe(0);
        const m0 = (await loadMigration(db.admin, w.table))!;
        const lockOpts = ["--lock-timeout", "30000", "--retries", "0"];

        // backfill: a first run interrupted mid-way (Ctrl-C: exit 130, checkpoint saved), then one whose
        // session is terminated while its first statement waits for the migrations table. A table lock,
        // not a row lock: a transaction holding a row lock has an xid, and creating a replication slot
        // (another test file's logical start, on the same server) waits for every transaction with an xid.
        const first = spawnCli(["backfill", name, "--batch-size", "250", "--sleep-ms", "20", "--url", db.url]);
        running.push(first);
        await waitUntil(
          "the first backfill has copied some rows",
          async () => ((await loadMigration(db.admin, w.table))?.rows_copied ?? 0) >= 1_000,
          60_000,
          20,
        );
        first.child.kill("SIGINT");
        const ex1 = await exitWithin(first, 30_000);
        expect(ex1, first.out.stderr).toMatchObject({ code: 130, timedOut: false });
        const migrationsTable = (tx: Sql) => tx`lock table pgshift.migrations in share mode`;
        const bf = await terminatedWhileWaiting(["backfill", name, "--batch-size", "250"], migrationsTable);
        expectTerminated(bf);
        const mid = (await loadMigration(db.admin, w.table))!;
        expect(mid.phase).toBe("backfilling");
        expect(mid.rows_copied).toBeGreaterThanOrEqual(1_000);
        expect(mid.checkpoint).not.toBeNull();
        const bf2 = await pgshift(["backfill", name]);
        expect(bf2.code, describeRun(bf2)).toBe(0);
        const v = await pgshift(["verify", name]);
        expect(v.code, describeRun(v)).toBe(0);

        // cutover: blocked on the shadow (it holds the table's lock by then: the load waits, then goes on).
        const before = await state(w);
        // The catch-up gets its time (the stream may lag on a busy machine): what is tested is the lock wait.
        const catchup = ["--catchup-timeout-ms", "30000"];
        const cut = await terminatedWhileWaiting(["cutover", name, ...lockOpts, ...catchup], lockTable(m0.partitioned));
        expectTerminated(cut);
        expect(await state(w)).toEqual(before);
        expect(await relkind(w.table), "the table keeps its name: nothing was renamed").toBe("r");
        expect(await slots(before.slot_name)).toBe(mode === "logical" ? 1 : 0);
        const cut2 = await pgshift(["cutover", name]);
        expect(cut2.code, describeRun(cut2)).toBe(0);
        expect(await relkind(w.table)).toBe("p");

        // swap-back: blocked on the retired table.
        const retired = { schema: w.table.schema, name: (await state(w)).retired_table };
        const afterCut = await state(w);
        const sb = await terminatedWhileWaiting(["swap-back", name, ...lockOpts], lockTable(retired));
        expectTerminated(sb);
        expect(await state(w)).toEqual(afterCut);
        expect(await relkind(w.table)).toBe("p");
        const sb2 = await pgshift(["swap-back", name]);
        expect(sb2.code, describeRun(sb2)).toBe(0);
        expect(await relkind(w.table)).toBe("r");
        const cut3 = await pgshift(["cutover", name]);
        expect(cut3.code, describeRun(cut3)).toBe(0);

        // finalize: blocked on the retired table.
        const beforeFinal = await state(w);
        const fin = await terminatedWhileWaiting(["finalize", name, "--yes", ...lockOpts], lockTable(retired));
        expectTerminated(fin);
        expect(await state(w)).toEqual(beforeFinal);
        expect(await relkind(retired), "the retired table is still there").toBe("r");
        const fin2 = await pgshift(["finalize", name, "--yes"]);
        expect(fin2.code, describeRun(fin2)).toBe(0);
        expect(await relkind(retired)).toBeNull();
        expect(await slots(m0.slot_name)).toBe(0);
      } finally {
        const stats = await load.stop();
        expect(stats.errors, "terminating pgshift's sessions never touches the application's").toEqual([]);
        expect(stats.inserts + stats.updates + stats.deletes).toBeGreaterThan(100);
      }
      expect(await compareWithTwin(db.admin, w.table, w.twin, "bigint")).toMatchObject({
        onlyInTable: 0,
        onlyInTwin: 0,
      });
    },
  );

  it("abort: exits 2 with one line, leaves everything in place, and removes everything when run again", async () => {
    const name = `connloss_abort_${mode}`;
    const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
    await createWorkload(db.admin, w, 1_000);
    expect(
      (
        await pgshift([
          "start",
          "--allow-key-extension",
          name,
          "--partition-by",
          "range:created_at:month",
          "--mode",
          mode,
        ])
      ).code,
    ).toBe(0);
    const m = (await loadMigration(db.admin, w.table))!;
    const ab = await terminatedWhileWaiting(
      ["abort", name, "--lock-timeout", "30000", "--retries", "0"],
      lockTable(m.partitioned),
    );
    expectTerminated(ab);
    expect((await state(w)).phase).toBe("started");
    expect(await relkind(m.partitioned), "the shadow is still there").toBe("p");
    // abort drops the slot and the publication first (nothing after that can leave them behind), then
    // the tables in one transaction: that transaction is what the lost session rolled back.
    expect(await slots(m.slot_name)).toBe(0);
    const ab2 = await pgshift(["abort", name]);
    expect(ab2.code, describeRun(ab2)).toBe(0);
    expect(await relkind(m.partitioned)).toBeNull();
    expect(await loadMigration(db.admin, w.table)).toBeNull();
    expect(await slots(m.slot_name)).toBe(0);
    expect(
      (await db.admin`select count(*)::int as n from pg_publication where pubname = ${m.publication_name ?? ""}`)[0]!.n,
    ).toBe(0);
  });
});

describe("logical mode: the consumer a command follows goes away", () => {
  it(
    "backfill following pgshift sync takes the stream over when sync is killed, and completes; cutover follows; the " +
      "table equals the twin",
    async () => {
      const name = "connloss_takeover";
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(db.admin, w, 20_000);
      const load = await startLoad(db.url, w, { connections: 3, pauseMs: 3 });
      try {
        const st = await pgshift([
          "start",
          "--allow-key-extension",
          name,
          "--partition-by",
          "range:created_at:month",
          "--mode",
          "logical",
        ]);
        expect(st.code, describeRun(st)).toBe(0);
        const m = (await loadMigration(db.admin, w.table))!;
        const slotActive = async () =>
          Boolean(
            (await db.admin`select active from pg_replication_slots where slot_name = ${m.slot_name!}`)[0]?.active,
          );
        const sync = spawnCli(["sync", name, "--url", db.url]);
        running.push(sync);
        await waitUntil("pgshift sync attaches to the slot", slotActive, 30_000, 50);
        // backfill finds sync attached: it follows it rather than applying the stream itself.
        const bf = spawnCli(["backfill", name, "--batch-size", "500", "--sleep-ms", "20", "--url", db.url]);
        running.push(bf);
        await waitUntil(
          "backfill has copied some rows",
          async () => ((await loadMigration(db.admin, w.table))?.rows_copied ?? 0) >= 2_000,
          60_000,
          20,
        );
        sync.child.kill("SIGKILL");
        await sync.exited;
        // Regression: backfill waited for the stream to catch up through a consumer that was gone, for up to
        // 10 minutes, then said it had caught up.
        const ex = await exitWithin(bf, 90_000);
        const r = {
          args: ["backfill", name],
          code: ex.code,
          signal: ex.signal,
          stdout: bf.out.stdout,
          stderr: bf.out.stderr,
          ms: 0,
        };
        expect(ex.timedOut, describeRun(r)).toBe(false);
        expect(ex.code, describeRun(r)).toBe(0);
        expect(bf.out.stderr, describeRun(r)).toContain("applying the stream in this process");
        const v = await pgshift(["verify", name]);
        expect(v.code, describeRun(v)).toBe(0);
        const cut = await pgshift(["cutover", name]);
        expect(cut.code, describeRun(cut)).toBe(0);
      } finally {
        const stats = await load.stop();
        expect(stats.errors).toEqual([]);
      }
      expect(await compareWithTwin(db.admin, w.table, w.twin, "bigint")).toMatchObject({
        onlyInTable: 0,
        onlyInTwin: 0,
      });
      expect((await pgshift(["finalize", name, "--yes"])).code).toBe(0);
    },
  );
});
