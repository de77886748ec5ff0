/**
 * plan's prediction of the backfill (time, disk, WAL) against a real backfill of the same table: from statistics
 * (after ANALYZE) and from a sample copy (--sample-copy), within stated factors; the sample's scratch table is gone
 * afterwards (also after an error, and after the CLI is interrupted mid-sample); plan without the flag creates
 * nothing.
 */
import { spawn } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { planMigration, predictPlan } from "../../src/migration/plan.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { type Prediction, sampleCopy, sampleTableName } from "../../src/plan/predict.js";
import { repoRoot, runCli } from "../support/cli.js";
import { createLoginRole, freshDatabase, sleep, type TestDatabase } from "../support/db.js";

let db: TestDatabase;
const T = { schema: "public", name: "pp_events" };
const SPEC = "range:created_at:month";
const ROWS = 200_000;

/**
 * Factors the predictions must hold to (measured / predicted and predicted / measured, both at most this). Time
 * from statistics gets 4x: its rates are fixed, and on the shared 2-core test machine the same backfill took
 * from 1.3 s (quiet) to 6.3 s (with five other test files running), where the prediction said 1.9 s.
 */
const FACTOR = {
  statistics: { time: 4, disk: 1.5, wal: 1.5 },
  sample: { time: 4, disk: 1.25, wal: 1.25 },
};

const relations = async () =>
  (await db.admin`select oid::int as oid, relname::text as name from pg_class order by oid`).map(
    (r) => `${r.oid} ${r.name}`,
  );

const scratchLeft = async () =>
  Number((await db.admin`select count(*)::int as n from pg_class where relname = ${sampleTableName(T).name}`)[0]?.n);

beforeAll(async () => {
  db = await freshDatabase();
  await db.admin.unsafe(`
    create table pp_events (
      id bigint generated always as identity primary key,
      created_at timestamptz not null,
      customer_id int not null,
      amount numeric(12, 2),
      note text,
      payload jsonb
    );
    insert into pp_events (created_at, customer_id, amount, note, payload)
      select timestamptz '2025-01-01' + (i * interval '1 minute'), i % 5000, (i % 10000) / 100.0,
             'note ' || md5(i::text), jsonb_build_object('i', i, 'tag', 'x' || (i % 50))
        from generate_series(1, ${ROWS}) i;
    create index pp_events_customer on pp_events (customer_id);
    analyze pp_events;
    checkpoint;`);
});
/** Roles are cluster-wide: dropped once the database is gone. */
const dropRoles: (() => Promise<void>)[] = [];
afterAll(async () => {
  await db?.close();
  for (const drop of dropRoles) await drop();
});

const within = (predicted: number, measured: number, factor: number) => {
  const ratio = predicted / measured;
  return ratio <= factor && ratio >= 1 / factor;
};

describe("plan predicts the backfill", () => {
  let fromStats: Prediction;
  let fromSample: Prediction;

  it("from statistics alone by default, and creates nothing (pg_class unchanged)", async () => {
    const before = await relations();
    const r = await runCli(["plan", "pp_events", "--partition-by", SPEC, "--json", "--url", db.url]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const plan = JSON.parse(r.stdout) as { prediction: Prediction };
    fromStats = plan.prediction;
    expect(fromStats.source).toBe("statistics");
    expect(fromStats.sample).toBeNull();
    expect(fromStats.rows).toBe(ROWS);
    expect(fromStats.slotRetainedBytes).toBeNull();
    expect(fromStats.inputs.join("\n")).toContain("pg_stats.avg_width");
    expect(await relations()).toEqual(before);
    const text = await runCli(["plan", "pp_events", "--partition-by", SPEC, "--url", db.url]);
    expect(text.stdout).toMatch(/^ {2}predicts \(from statistics; --sample-copy measures a sample\): backfill /m);
    expect(text.stdout).toMatch(/^ {4}free disk: /m);
    expect(text.stdout).not.toContain("_pgshift_sample");
    expect(await relations()).toEqual(before);
  });

  it("free disk: unknown for a user who may not read data_directory, with the reason", async () => {
    const role = await createLoginRole(db, "pp_user");
    dropRoles.push(role.drop);
    {
      await db.admin.unsafe(`create table pp_small (id int primary key, at date not null);
        insert into pp_small select i, date '2025-01-01' + i from generate_series(1, 100) i;
        analyze pp_small; alter table pp_small owner to ${role.name}`);
      const r = await runCli(["plan", "pp_small", "--partition-by", "range:at:month", "--json", "--url", role.url]);
      expect(r.stderr).toBe("");
      const p = (JSON.parse(r.stdout) as { prediction: Prediction }).prediction;
      expect(p.freeDisk).toEqual({
        known: false,
        bytes: null,
        why: expect.stringContaining("readable only by superusers and members of pg_read_all_settings"),
      });
      await db.admin.unsafe(`drop table pp_small`);
    }
  });

  it("with --sample-copy: prints every statement of the sample, which leaves nothing behind", async () => {
    const before = await relations();
    const r = await runCli([
      "plan",
      "pp_events",
      "--partition-by",
      SPEC,
      "--mode",
      "logical",
      "--sample-copy=20000",
      "--url",
      db.url,
    ]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^ {2}predicts \(from a sample copy\): backfill /m);
    expect(r.stdout).toMatch(/^ {4}the replication slot may retain /m);
    const printed = r.stdout.slice(r.stdout.indexOf("-- the sample copy plan ran"));
    expect(printed).toContain(`CREATE TABLE "public"."pp_events_pgshift_sample" (LIKE "public"."pp_events");`);
    // The sample copies as backfill's default copy does, in logical mode too: without row locks.
    expect(printed).toContain("TABLESAMPLE SYSTEM");
    expect(printed).not.toContain("FOR SHARE");
    expect(printed.trimEnd().endsWith("ROLLBACK;")).toBe(true);
    expect(await relations()).toEqual(before);
    // The library's prediction, for the comparison below (logical mode, as the CLI above).
    const plan = await planMigration(db.sql, T, { spec: parsePartitionSpec(SPEC), mode: "logical" });
    const p = await predictPlan(db.sql, plan, { sampleRows: 20_000 });
    expect(p?.source).toBe("sample");
    expect(p?.sample?.rows).toBeGreaterThan(15_000);
    // What plan printed is what ran: the same statements, in order.
    const lines = printed.trimEnd().split("\n").slice(1);
    expect(p?.sample?.statements.map((x) => `${x};`)).toEqual(lines);
    // The comparison below runs a trigger-mode backfill, whose copy takes no row lock: so does its sample.
    const trigger = await planMigration(db.sql, T, { spec: parsePartitionSpec(SPEC) });
    const q = await predictPlan(db.sql, trigger, { sampleRows: 20_000 });
    expect(q?.sample?.statements.some((x) => x.includes("FOR SHARE"))).toBe(false);
    expect(p?.sample?.statements.some((x) => x.includes("FOR SHARE"))).toBe(false);
    fromSample = q!;
    expect(await scratchLeft()).toBe(0);
    expect(await relations()).toEqual(before);
  });

  it("a sample copy that fails leaves nothing (statement_timeout provoked)", async () => {
    const plan = await planMigration(db.sql, T, { spec: parsePartitionSpec(SPEC) });
    await expect(
      sampleCopy(db.sql, {
        source: T,
        copyColumns: plan.copyColumns,
        shadowKey: plan.shadowKey,
        indexDefinitions: plan.deferredIndexes.map((d) => d.definition),
        estimatedRows: ROWS,
        rows: ROWS,
        rowLocks: true,
        statementTimeoutMs: 5,
      }),
    ).rejects.toThrow(/statement timeout/);
    expect(await scratchLeft()).toBe(0);
    // Nor in the session that ran it (the one place an uncommitted scratch table would show).
    const here = await db.sql`select to_regclass(${'"public"."pp_events_pgshift_sample"'})::text as r`;
    expect(here[0]?.r).toBeNull();
  });

  it("an interrupted plan --sample-copy leaves nothing (the CLI killed while the sample waits)", async () => {
    // Another session creates a table of the scratch table's name and keeps its transaction open: the sample's
    // CREATE TABLE waits for it (lock_timeout 1 s); the CLI is killed meanwhile.
    const other = await db.admin.reserve();
    try {
      await other.unsafe(`begin; create table ${sampleTableName(T).name} (x int)`);
      const child = spawn(
        process.execPath,
        ["--import", "tsx", "src/cli/main.ts", "plan", "pp_events", "--partition-by", SPEC, "--sample-copy"],
        { cwd: repoRoot, env: { ...process.env, DATABASE_URL: db.url }, stdio: "ignore" },
      );
      const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
      let waiting = false;
      for (let i = 0; i < 300 && !waiting; i++) {
        const w = await db.admin`
          select count(*)::int as n from pg_stat_activity
           where application_name = 'pgshift plan' and wait_event_type = 'Lock' and query like 'CREATE TABLE%'`;
        waiting = Number(w[0]?.n) > 0;
        if (!waiting) await sleep(20);
      }
      expect(waiting).toBe(true);
      // Ctrl-C: SIGINT to the CLI's process.
      child.kill("SIGINT");
      expect(await exited).not.toBe(0);
      await other.unsafe("rollback");
    } finally {
      other.release();
    }
    for (let i = 0; i < 100; i++) {
      const left =
        await db.admin`select count(*)::int as n from pg_stat_activity where application_name = 'pgshift plan'`;
      if (Number(left[0]?.n) === 0) break;
      await sleep(50);
    }
    expect(await scratchLeft()).toBe(0);
  });

  it("the predictions are within their factors of a real backfill", async () => {
    await startMigration(db.sql, T, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC) });
    // As on a table that has not changed since the last checkpoint; the trigger-mode copy below takes no row lock,
    // and its predictions count none.
    await db.admin`checkpoint`;
    const lsn0 = String((await db.admin`select pg_current_wal_insert_lsn()::text as l`)[0]?.l);
    const t0 = performance.now();
    const r = await backfill(db.sql, T);
    const ms = performance.now() - t0;
    expect(r.complete).toBe(true);
    const m = (
      await db.admin`
      select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), ${lsn0}::pg_lsn)::float8 as wal,
             (select sum(pg_total_relation_size(relid))::float8 from pg_partition_tree('pp_events_pgshift_shadow'))
               as disk`
    )[0]!;
    const measured = { ms, wal: Number(m.wal), disk: Number(m.disk) };
    const report = (p: Prediction) =>
      `${p.source}: time ${p.durationMs} ms vs ${Math.round(measured.ms)}, disk ${p.diskBytes} vs ${measured.disk}, ` +
      `WAL ${p.walBytes} vs ${measured.wal}`;
    process.stdout.write(`plan-predict: ${report(fromStats)}\nplan-predict: ${report(fromSample)}\n`);
    for (const [p, f] of [
      [fromStats, FACTOR.statistics],
      [fromSample, FACTOR.sample],
    ] as const) {
      expect(within(p.durationMs, measured.ms, f.time), report(p)).toBe(true);
      expect(within(p.diskBytes, measured.disk, f.disk), report(p)).toBe(true);
      expect(within(p.walBytes, measured.wal, f.wal), report(p)).toBe(true);
    }
  });
});
