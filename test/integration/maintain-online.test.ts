import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover } from "../../src/cutover/cutover.js";
import { createWorkload, type LoadStats, startLoad, type Workload } from "../../src/load/workload.js";
import { maintain } from "../../src/maintain/maintain.js";
import { finalize } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { describeRun, runCli, spawnCli } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * maintain moves the rows of DEFAULT online (src/maintain/default-move.ts): a table moved to range:created_at:month
 * and finalized gets tens of thousands of rows dated past its partitions (DEFAULT); while the twin load runs (it
 * owns those rows too: it updates them, moves them out of DEFAULT and deletes some) and a writer of its own keeps
 * inserting rows into DEFAULT's range, moving them within it, into it and out of it, and deleting them, maintain
 * copies them in small batches and switches: the table equals the twin, DEFAULT keeps no row a partition covers,
 * the switch blocked writes for milliseconds and no application transaction waited longer than the lock timeout
 * plus a margin. A maintain killed in the middle of the copy leaves its staging table and mirror; the next run
 * resumes the move (copy again, switch); the run after it changes nothing; what other crashes leave (after the
 * switch, or before the mirror) is removed.
 */
let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

const name = "events";
const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
const LOCK_TIMEOUT_MS = 50;
const MARGIN_MS = 200;
const opts = { lockTimeoutMs: LOCK_TIMEOUT_MS, retries: 60 };

/** Latencies of the application's transactions (performance.now() at their start, ms). */
function recorder() {
  const xs: { at: number; ms: number }[] = [];
  return {
    onTransaction: (at: number, ms: number) => void xs.push({ at, ms }),
    /** The longest transaction that overlapped [from, to], ms. */
    worst: (from: number, to: number) =>
      xs.filter((x) => x.at <= to && x.at + x.ms >= from).reduce((m, x) => Math.max(m, x.ms), 0),
    count: (from: number, to: number) => xs.filter((x) => x.at <= to && x.at + x.ms >= from).length,
  };
}

/** Inserts `n` rows from `months` months ahead (a minute apart) into the table and, in one statement, the twin. */
async function insertAhead(months: number, n: number): Promise<void> {
  await db.admin.unsafe(`
    with ins as (
      insert into public.events (created_at, region, status, amount, note, data)
      select date_trunc('month', now()) + interval '${months} months' + i * interval '1 minute', 'emea', 'late', i,
             null, jsonb_build_object('late', i)
        from generate_series(1, ${n}) i
      returning id, created_at, region, status, amount, note, data)
    insert into twin.events (id, created_at, region, status, amount, note, data) select * from ins`);
}

/**
 * A writer of rows dated in DEFAULT's range (`fromMonth` to `fromMonth + 2` months ahead), on a connection of its
 * own, each change made to the twin in the same transaction: inserts, updates (some move the row within that range,
 * some to this month, out of DEFAULT), moves into that range, deletes; only rows it inserted itself.
 */
function aheadWriter(url: string, fromMonth: number, onTransaction: (at: number, ms: number) => void) {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  const stats: LoadStats = { inserts: 0, updates: 0, deletes: 0, errors: [] };
  const mine: string[] = [];
  let running = true;
  const at = (r: number) => `date_trunc('month', now()) + interval '${fromMonth} months' + ${r} * interval '59 days'`;
  const done = (async () => {
    while (running) {
      const t0 = performance.now();
      const r = Math.random();
      try {
        await sql.begin(async (tx) => {
          // The values are chosen first (as text: exact), then written to both tables.
          const when = async (expr: string) => String((await tx.unsafe(`select (${expr})::text as v`))[0]!.v);
          if (r < 0.4 || mine.length < 20) {
            const v = await when(at(Math.random()));
            const row = await tx.unsafe(
              `insert into public.events (created_at, region, status, amount, note, data)
               values ($1, 'apac', 'ahead', 1, 'w', '{"ahead": true}') returning id`,
              [v],
            );
            const id = String(row[0]!.id);
            await tx.unsafe(
              `insert into twin.events (id, created_at, region, status, amount, note, data)
               values ($1, $2, 'apac', 'ahead', 1, 'w', '{"ahead": true}')`,
              [id, v],
            );
            mine.push(id);
            stats.inserts++;
            return;
          }
          const i = Math.floor(Math.random() * mine.length);
          const id = mine[i]!;
          if (r < 0.55) {
            for (const t of ["public.events", "twin.events"]) await tx.unsafe(`delete from ${t} where id = $1`, [id]);
            mine.splice(i, 1);
            stats.deletes++;
            return;
          }
          // Within DEFAULT's range, out of it (this month), or back into it; or a plain update.
          const to = r < 0.75 ? at(Math.random()) : r < 0.85 ? "now()" : null;
          const v = to ? await when(to) : null;
          for (const t of ["public.events", "twin.events"])
            await tx.unsafe(
              `update ${t} set created_at = coalesce($2::timestamptz, created_at), amount = amount + 1, ` +
                "note = $3 where id = $1",
              [id, v, v ? "w" : "u"],
            );
          stats.updates++;
        });
      } catch (err) {
        stats.errors.push(err instanceof Error ? err.message : String(err));
        if (stats.errors.length > 50) running = false;
      }
      onTransaction(t0, performance.now() - t0);
      await sleep(2);
    }
  })();
  return {
    stats,
    stop: async () => {
      running = false;
      await done;
      await sql.end({ timeout: 5 });
      return stats;
    },
  };
}

/** Rows of DEFAULT that a partition's bound covers (there must be none), and rows of DEFAULT all told. */
async function inDefault(): Promise<{ covered: number; total: number }> {
  const r = await db.admin.unsafe(`
    with b as (
      select (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\) TO'))[1]::timestamptz as lo,
             (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)'))[1]::timestamptz as hi
        from pg_inherits i join pg_class c on c.oid = i.inhrelid
       where i.inhparent = 'public.events'::regclass and c.relname <> 'events_default')
    select (select count(*) from public.events_default d join b on d.created_at >= b.lo and d.created_at < b.hi)::int
             as covered,
           (select count(*) from public.events_default)::int as total`);
  return { covered: r[0]!.covered as number, total: r[0]!.total as number };
}

/** The move's objects left in the database (staging table, old DEFAULT, function, trigger on DEFAULT). */
async function leftovers(): Promise<string[]> {
  const r = await db.admin`
    select x from (values
      (case when to_regclass('public.events_pgshift_move') is not null then 'staging' end),
      (case when to_regclass('public.events_pgshift_old') is not null then 'old default' end),
      (case when to_regprocedure('public.events_pgshift_move_fn()') is not null then 'function' end),
      (case when exists (select from pg_trigger where tgname = 'pgshift_move') then 'trigger' end)) v (x)
     where x is not null`;
  return r.map((x) => String(x.x));
}

describe("pgshift maintain: the move out of DEFAULT, online", () => {
  it("moves 20,000 rows of DEFAULT while the application writes them, blocking writes for milliseconds", async () => {
    await createWorkload(db.admin, w, 4000);
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
      mode: "trigger",
      ...opts,
    });
    expect((await backfill(db.sql, w.table, { batchSize: 2000 })).complete).toBe(true);
    await cutover(db.sql, w.table, opts);
    await finalize(db.sql, w.table, { yes: true, ...opts });
    // A foreign key of the table's own: the new partitions get it before the switch (ATTACH adopts it, no
    // validation of the moved rows under the lock).
    await db.admin.unsafe(`
      create table public.regions (code text primary key);
      insert into public.regions values ('emea'), ('amer'), ('apac'), ('latam');
      alter table public.events add constraint events_region_fkey foreign key (region) references public.regions`);
    await insertAhead(5, 8000);
    await insertAhead(6, 6000);
    await insertAhead(7, 6000);
    expect((await inDefault()).total).toBeGreaterThanOrEqual(20_000);

    const lat = recorder();
    // The twin load owns every row there is now, those of DEFAULT included; the writer only rows it inserts.
    const load = await startLoad(db.url, w, { connections: 3, pauseMs: 2, onTransaction: lat.onTransaction });
    const ahead = aheadWriter(db.url, 5, lat.onTransaction);
    let t0 = 0;
    let t1 = 0;
    let baseline = 0;
    let r: Awaited<ReturnType<typeof maintain>>;
    try {
      const tb = performance.now();
      await sleep(700);
      t0 = performance.now();
      baseline = lat.worst(tb + 200, t0);
      r = await maintain(db.sql, w.table, { premake: 3, batchSize: 1000, batchTimeMs: 20, ...opts });
      t1 = performance.now();
      await sleep(300);
    } finally {
      await load.stop();
      await ahead.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(ahead.stats.errors).toEqual([]);
    expect(load.stats.updates).toBeGreaterThan(20);
    expect(ahead.stats.updates + ahead.stats.deletes).toBeGreaterThan(20);
    // The copy ran in many batches while the application wrote (the writers ran all along).
    expect(r.move, JSON.stringify(r.created)).toBeDefined();
    expect(r.move!.batches).toBeGreaterThan(10);
    expect(r.move!.rowsCopied).toBeGreaterThanOrEqual(19_000);
    expect(lat.count(t0, t1)).toBeGreaterThan(50);
    // Writes blocked by the switch: catalog changes only (the new default holds only the writer's rows of months
    // past the new partitions, none here).
    expect(r.move!.blockedMs, "writes blocked by the switch, ms").toBeLessThan(Math.max(MARGIN_MS, 2 * baseline));
    // No application transaction waited longer than one lock timeout plus the margin (as the cutover's test).
    const bound = LOCK_TIMEOUT_MS + Math.max(MARGIN_MS, 2 * baseline);
    expect(lat.worst(t0, t1), "the longest application transaction during maintain, ms").toBeLessThan(bound);
    console.log(
      `maintain moved ${r.move!.rowsCopied} rows in ${r.move!.batches} batches; writes blocked ` +
        `${r.move!.blockedMs.toFixed(1)} ms by the switch; longest application transaction ${lat
          .worst(t0, t1)
          .toFixed(1)} ms (baseline ${baseline.toFixed(1)} ms)`,
    );

    await expectEqualToTwin(db.admin, [w.table], w.twin, "bigint");
    expect((await inDefault()).covered).toBe(0);
    const late = await db.admin`select count(*)::int as n from public.events_default
                                 where created_at >= date_trunc('month', now()) + interval '5 months'`;
    expect(late[0]!.n).toBe(0);
    expect(await leftovers()).toEqual([]);
    // Every partition has the foreign key once, as the table's (attached to it).
    const fks = await db.admin`
      select c.relname::text as p, count(k.oid)::int as n, bool_and(k.conparentid <> 0) as attached
        from pg_inherits i join pg_class c on c.oid = i.inhrelid
        left join pg_constraint k on k.conrelid = c.oid and k.contype = 'f'
       where i.inhparent = 'public.events'::regclass group by 1`;
    for (const f of fks) expect(f, f.p).toMatchObject({ n: 1, attached: true });
    // The rows the load sent to DEFAULT meanwhile (dates before the first partition) get theirs now; then a run
    // changes nothing.
    await maintain(db.sql, w.table, opts);
    expect(await inDefault()).toEqual({ covered: 0, total: 0 });
    const again = await maintain(db.sql, w.table, opts);
    expect(again.created).toEqual([]);
    expect(again.move).toBeUndefined();
    expect(again.statements.filter((s) => !/pgshift\.partitioned_tables/.test(s))).toEqual([]);
    await expectEqualToTwin(db.admin, [w.table], w.twin, "bigint");
  }, 120_000);

  it("a maintain killed during the copy: the next run resumes it; leftovers of other crashes are removed", async () => {
    await insertAhead(13, 30_000);
    const lat = recorder();
    const load = await startLoad(db.url, w, { connections: 2, pauseMs: 2, onTransaction: lat.onTransaction });
    const ahead = aheadWriter(db.url, 13, lat.onTransaction);
    try {
      const run = spawnCli(["maintain", name, "--batch-size", "100", "--batch-time-ms", "5", "--url", db.url]);
      let copied = 0;
      for (let i = 0; i < 300 && copied < 2000; i++) {
        await sleep(50);
        const s = await db.admin`select to_regclass('public.events_pgshift_move') is not null as s`;
        if (s[0]!.s) copied = Number((await db.admin`select count(*)::int as n from public.events_pgshift_move`)[0]!.n);
      }
      run.child.kill("SIGKILL");
      await run.exited;
      expect(copied).toBeGreaterThanOrEqual(2000);
      expect(await leftovers()).toEqual(["staging", "function", "trigger"]);
      await sleep(300);

      // --dry-run prints the resumed move (its copy and its switch, no new staging table), and changes nothing.
      const dry = await runCli(["maintain", name, "--dry-run", "--url", db.url]);
      expect(dry.code, describeRun(dry)).toBe(0);
      expect(dry.stdout).toContain("resume the move");
      expect(dry.stdout).toContain("FOR SHARE), ins AS (INSERT INTO");
      expect(dry.stdout).toMatch(/DETACH PARTITION .*events_default/);
      expect(dry.stdout).not.toContain("CREATE TRIGGER");
      expect(await leftovers()).toEqual(["staging", "function", "trigger"]);

      const r = await maintain(db.sql, w.table, { batchSize: 2000, batchTimeMs: 50, ...opts });
      // The copy ran again over DEFAULT (the rows copied before the kill were skipped, kept by the mirror).
      expect(r.move!.rowsCopied).toBeGreaterThanOrEqual(29_000);
      expect(r.statements.some((s) => /^CREATE TABLE .*events_pgshift_move/.test(s))).toBe(false);
      expect(r.statements.some((s) => /^DROP TRIGGER "?pgshift_move"?/.test(s))).toBe(true);
      await sleep(300);
    } finally {
      await load.stop();
      await ahead.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(ahead.stats.errors).toEqual([]);
    expect(await leftovers()).toEqual([]);
    await expectEqualToTwin(db.admin, [w.table], w.twin, "bigint");
    expect((await inDefault()).covered).toBe(0);
    await maintain(db.sql, w.table, opts);
    const again = await maintain(db.sql, w.table, opts);
    expect(again.created).toEqual([]);
    expect(again.statements.filter((s) => !/pgshift\.partitioned_tables/.test(s))).toEqual([]);

    // What a crash after a switch leaves (the old DEFAULT, the staging table emptied, the function), or between the
    // staging table's creation and the mirror's: removed by the next run, which then has nothing else to do.
    await db.admin.unsafe(`
      create table public.events_pgshift_old (like public.events);
      create table public.events_pgshift_move (like public.events) partition by range (created_at);
      create function public.events_pgshift_move_fn() returns trigger language plpgsql
        as $$ begin return null; end $$`);
    expect(await leftovers()).toEqual(["staging", "old default", "function"]);
    const clean = await maintain(db.sql, w.table, opts);
    expect(clean.statements.some((s) => /^DROP TABLE IF EXISTS .*events_pgshift_old/.test(s))).toBe(true);
    expect(clean.created).toEqual([]);
    expect(await leftovers()).toEqual([]);
    await expectEqualToTwin(db.admin, [w.table], w.twin, "bigint");
  }, 120_000);
});
