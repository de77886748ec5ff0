import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill, describeBackfill } from "../../src/backfill/backfill.js";
import { readRanges } from "../../src/backfill/ranges.js";
import { checkWorkers } from "../../src/backfill/workers.js";
import { createWorkload, type KeyKind, startLoad, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { type BackfillRangeRow, loadMigration, type Migration, type Mode } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { expectRefusal, runCli, spawnCli } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * Parallel workers (issue 18, item 2; src/backfill/ranges.ts, workers.ts): `backfill --workers N` splits the key
 * into ranges and copies them on N connections at once, each range from its own checkpoint. Under the concurrent
 * twin workload in both modes the copy equals the source and the twin; the ranges are disjoint, cover the whole
 * key and are all done; a process killed mid-way is finished by a run with another number of workers, from the
 * ranges' checkpoints, never split again; composite and uuid keys split too; bad --workers values are refused.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

/** The key's text compared as the key's type: bigint keys as numbers, others as PostgreSQL orders them. */
async function ordered(a: string[], b: string[], types: string[]): Promise<boolean> {
  const cols = types.map((t, i) => `$${i + 1}::${t}`).join(", ");
  const cols2 = types.map((t, i) => `$${i + 1 + types.length}::${t}`).join(", ");
  const r = await db.admin.unsafe(`select (${cols}) < (${cols2}) as lt`, [...a, ...b]);
  return Boolean(r[0]?.lt);
}

/** Asserts the ranges are disjoint and cover the key: from the first key, each the next's lower, to the last. */
async function expectTiling(ranges: BackfillRangeRow[], types: string[]): Promise<void> {
  expect(ranges.length).toBeGreaterThan(1);
  expect(ranges[0]!.lower).toBeNull();
  expect(ranges.at(-1)!.upper).toBeNull();
  for (let i = 0; i < ranges.length; i++) {
    const r = ranges[i]!;
    expect(r.range_no).toBe(i);
    if (i > 0) expect(r.lower).toEqual(ranges[i - 1]!.upper);
    if (r.lower && r.upper) expect(await ordered(r.lower, r.upper, types)).toBe(true);
  }
}

const workloadOf = (name: string, keyKind: KeyKind): Workload => ({
  table: { schema: "public", name },
  twin: { schema: "twin", name },
  keyKind,
});

describe.each<{ mode: Mode }>([{ mode: "trigger" }, { mode: "logical" }])(
  "backfill with 3 workers under concurrent writes: $mode mode",
  ({ mode }) => {
    it("copies every range once, equal to the source and to the twin; the indexes built in parallel", async () => {
      const name = `bw_${mode}`;
      const w = workloadOf(name, "bigint");
      await createWorkload(db.admin, w, 12_000);
      const load = await startLoad(db.url, w, { connections: 3, pauseMs: mode === "logical" ? 3 : 1 });
      let m: Migration;
      try {
        await sleep(200);
        await startMigration(db.sql, w.table, {
          allowKeyExtension: true,
          spec: parsePartitionSpec("range:created_at:month"),
          mode,
          lockTimeoutMs: 200,
          retries: 30,
        });
        const batches: number[] = [];
        const r = await backfill(db.sql, w.table, {
          batchSize: 400,
          workers: 3,
          onBatchWritten: async () => {
            batches.push(performance.now());
          },
        });
        expect(r.complete).toBe(true);
        m = (await loadMigration(db.sql, w.table))!;
        expect(m.phase).toBe("backfilled");
        const ranges = await readRanges(db.sql, m);
        await expectTiling(ranges, ["bigint"]);
        expect(ranges.every((x) => x.done)).toBe(true);
        // Every range copied something (a sample's tiles of a table of 12,000 rows), and the counters add up.
        expect(ranges.every((x) => x.rows_copied > 0)).toBe(true);
        expect(m.rows_copied).toBe(ranges.reduce((a, x) => a + x.rows_copied, 0));
        expect(m.batches).toBe(ranges.reduce((a, x) => a + x.batches, 0));
        expect(m.rows_copied).toBeGreaterThanOrEqual(11_000);
        // The secondary indexes were built (over 3 connections) and are valid on every partition.
        const ix = await db.admin`
          select (select count(*) from pg_index where indrelid = to_regclass(${`public.${name}`}))::int as source,
                 (select count(*) from pg_index where indrelid = to_regclass(${`public.${name}_pgshift_shadow`})
                   and indisvalid)::int as shadow,
                 (select count(*) from pg_index i join pg_inherits h on h.inhrelid = i.indrelid
                   where h.inhparent = to_regclass(${`public.${name}_pgshift_shadow`}) and not
                     i.indisvalid)::int as invalid`;
        expect(ix[0]).toEqual({ source: 3, shadow: 3, invalid: 0 });
        const v1 = await verify(db.sql, w.table, { chunkSize: 4000 });
        expect(v1.differences).toEqual([]);
      } finally {
        await load.stop();
      }
      expect(load.stats.errors).toEqual([]);
      expect(load.stats.deletes).toBeGreaterThan(5);
      const v2 = await verify(db.sql, w.table, { chunkSize: 4000 });
      expect(v2.equal).toBe(true);
      await expectEqualToTwin(db.admin, [m.original, m.partitioned], w.twin, "bigint");
    });
  },
);

describe("a backfill with workers killed mid-way", () => {
  it("is finished by a run with another number of workers, from the ranges' checkpoints, not split again", async () => {
    const name = "bw_crash";
    const w = workloadOf(name, "bigint");
    await createWorkload(db.admin, w, 40_000);
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    const m0 = (await loadMigration(db.sql, w.table))!;
    const s = spawnCli([
      "backfill",
      name,
      "--workers",
      "3",
      "--batch-size",
      "300",
      "--batch-time-ms",
      "0",
      "--sleep-ms",
      "20",
      "--url",
      db.url,
    ]);
    let before: BackfillRangeRow[] = [];
    for (let i = 0; i < 1200; i++) {
      before = await readRanges(db.admin, m0);
      if (before.filter((r) => r.checkpoint !== null).length >= 3 && before.some((r) => !r.done)) break;
      await sleep(25);
    }
    s.child.kill("SIGKILL");
    await s.exited;
    before = await readRanges(db.admin, m0);
    expect(before.length).toBeGreaterThanOrEqual(3);
    expect(before.filter((r) => r.checkpoint !== null).length).toBeGreaterThanOrEqual(3);
    expect(before.some((r) => !r.done)).toBe(true);
    const killed = (await loadMigration(db.sql, w.table))!;
    expect(killed.phase).toBe("backfilling");
    // status shows the ranges' progress (text and JSON), and the total is their sum (give or take the batch each
    // worker lost before syncing the migration's counters).
    const text = await runCli(["status", name, "--url", db.url]);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(new RegExp(`\\d+ of ${before.length} key ranges done`));
    const json = await runCli(["status", name, "--json", "--url", db.url]);
    const st = JSON.parse(json.stdout) as { ranges: BackfillRangeRow[]; rowsCopied: number };
    expect(st.ranges.map((x) => x.range_no)).toEqual(before.map((x) => x.range_no));
    const sum = st.ranges.reduce((a, x) => a + x.rows_copied, 0);
    expect(st.rowsCopied).toBeLessThanOrEqual(sum);
    expect(st.rowsCopied).toBeGreaterThanOrEqual(sum - 3 * 300);

    // The dry run of the resume: no split (the ranges exist), the ranges' batches, their cleanups and counters.
    const dry = await runCli(["backfill", name, "--workers", "2", "--dry-run", "--url", db.url]);
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.stdout).toContain(`the key is split already (${before.length} ranges`);
    expect(dry.stdout).not.toContain("TABLESAMPLE");
    expect(dry.stdout).toContain("UPDATE pgshift.backfill_ranges SET updated_at = now()");
    expect(dry.stdout).toContain("UPDATE pgshift.backfill_ranges SET checkpoint = ARRAY[$1]::text[], rows_copied = $2");
    const r = await runCli(["backfill", name, "--workers", "2", "--batch-size", "2000", "--url", db.url]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain("backfill complete");
    const after = await readRanges(db.admin, m0);
    // Not split again: the same ranges, bound for bound, every one done, from where it was.
    expect(after.map((x) => [x.range_no, x.lower, x.upper])).toEqual(before.map((x) => [x.range_no, x.lower, x.upper]));
    expect(after.every((x) => x.done)).toBe(true);
    for (const x of before) {
      const y = after[x.range_no]!;
      expect(y.rows_copied).toBeGreaterThanOrEqual(x.rows_copied);
      if (x.done) expect(y).toEqual(x);
    }
    await expectTiling(after, ["bigint"]);
    // Rows counted at most once, but for the batches lost with the process (3 workers, a batch in flight each).
    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.phase).toBe("backfilled");
    expect(m.rows_copied).toBeGreaterThanOrEqual(40_000);
    expect(m.rows_copied).toBeLessThanOrEqual(40_000 + 3 * 300);
    const v = await verify(db.sql, w.table);
    expect(v.differences).toEqual([]);
    expect(v.equal).toBe(true);
  });
});

describe("a worker's connection ended mid-way", () => {
  it("fails the run (the other workers stop after their batch); the next run, with 1 worker, finishes", async () => {
    const name = "bw_conn";
    const w = workloadOf(name, "bigint");
    await createWorkload(db.admin, w, 8000);
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    let batches = 0;
    let ended = 0;
    await expect(
      backfill(db.sql, w.table, {
        batchSize: 200,
        workers: 2,
        onBatchWritten: async () => {
          // The 6th batch: its worker's connection (inside the batch's transaction) is ended by the server.
          if (++batches !== 6) return;
          const r = await db.admin`
            select pg_terminate_backend(pid) as ok from pg_stat_activity
             where application_name = 'pgshift backfill worker' and state = 'idle in transaction'`;
          ended = r.filter((x) => x.ok).length;
        },
      }),
    ).rejects.toThrow();
    expect(ended).toBeGreaterThanOrEqual(1);
    const m0 = (await loadMigration(db.sql, w.table))!;
    const before = await readRanges(db.sql, m0);
    expect(before.some((x) => !x.done)).toBe(true);
    const r = await backfill(db.sql, w.table, { batchSize: 1000 });
    expect(r.complete).toBe(true);
    const after = await readRanges(db.sql, m0);
    expect(after.map((x) => [x.lower, x.upper])).toEqual(before.map((x) => [x.lower, x.upper]));
    expect(after.every((x) => x.done)).toBe(true);
    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.rows_copied).toBeGreaterThanOrEqual(8000);
    expect(m.rows_copied).toBeLessThanOrEqual(8000 + 2 * 200);
    expect((await verify(db.sql, w.table)).equal).toBe(true);
  });
});

describe("other keys", () => {
  it.each<{ keyKind: KeyKind; types: string[] }>([
    { keyKind: "composite", types: ["bigint", "text"] },
    { keyKind: "uuid", types: ["uuid"] },
  ])("a $keyKind key splits into ranges too", async ({ keyKind, types }) => {
    const name = `bw_key_${keyKind}`;
    const w = workloadOf(name, keyKind);
    await createWorkload(db.admin, w, 3000);
    await startMigration(db.sql, w.table, { allowKeyExtension: true, spec: parsePartitionSpec("list:region") });
    // The dry run prints the split and the ranges' batches, and changes nothing.
    const plan = await describeBackfill(db.sql, w.table, { batchSize: 200, workers: 2 });
    expect(plan).toContain("TABLESAMPLE SYSTEM ($1)");
    expect(plan).toContain("ntile($2)");
    expect(plan).toContain("INSERT INTO pgshift.backfill_ranges");
    expect(plan).toContain("the copy by 2 workers");
    expect(await readRanges(db.sql, (await loadMigration(db.sql, w.table))!)).toEqual([]);
    const r = await backfill(db.sql, w.table, { batchSize: 200, workers: 2 });
    expect(r.complete).toBe(true);
    const m = (await loadMigration(db.sql, w.table))!;
    const ranges = await readRanges(db.sql, m);
    expect(ranges.length).toBeGreaterThanOrEqual(4);
    expect(ranges[0]!.lower).toBeNull();
    await expectTiling(ranges, types);
    expect(ranges.every((x) => x.done && x.rows_copied > 0)).toBe(true);
    expect(m.rows_copied).toBe(3000);
    expect((await verify(db.sql, w.table)).equal).toBe(true);
  });
});

describe("bad --workers values", () => {
  it.each([
    { value: "0", says: "--workers" },
    { value: "1.5", says: "--workers" },
    { value: "65", says: "from 1 to 64" },
  ])("--workers $value: exit 2, one line and a hint, nothing changed", async ({ value, says }) => {
    const name = "bw_bad";
    const w = workloadOf(name, "bigint");
    if (!(await loadMigration(db.sql, w.table))) {
      await createWorkload(db.admin, w, 200);
      await startMigration(db.sql, w.table, { allowKeyExtension: true, spec: parsePartitionSpec("list:region") });
    }
    const r = await runCli(["backfill", name, "--workers", value, "--url", db.url]);
    expectRefusal(r, says);
    const m = (await loadMigration(db.sql, w.table))!;
    expect(m.phase).toBe("started");
    expect(m.rows_copied).toBe(0);
    expect(await readRanges(db.sql, m)).toEqual([]);
  });

  it("more workers than the server has free connections: refused (checkWorkers, before anything changes)", async () => {
    // The test server has max_connections = 200: the stream's share (`extra`) is raised to leave fewer than 64.
    const free = Number(
      (
        await db.admin.unsafe(
          "select current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int " +
            "- (select count(*)::int from pg_stat_activity where backend_type = 'client backend') as n",
        )
      )[0]!.n,
    );
    await expect(checkWorkers(db.sql, 64, free - 10)).rejects.toThrow(/--workers 64 needs 64 more connections/);
    await expect(checkWorkers(db.sql, 8, free - 10)).resolves.toBeUndefined();
    await expect(checkWorkers(db.sql, 0, 0)).rejects.toThrow(/from 1 to 64/);
  });
});
