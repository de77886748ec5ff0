import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover } from "../../src/cutover/cutover.js";
import { createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { maintain } from "../../src/maintain/maintain.js";
import { finalize } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { describeRun, expectRefusal, runCli } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * pgshift maintain after a whole flow under the concurrent load: rows written after the cutover with timestamps past
 * the premade partitions land in DEFAULT and maintain moves them into new partitions while the load runs (the live
 * table still equals the twin, the load sees no error); a second run changes nothing; --dry-run changes nothing;
 * retention detaches and keeps, then drops; --all maintains every table pgshift partitioned and only those; a
 * table pgshift did not partition is refused.
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
const opts = { lockTimeoutMs: 200, retries: 30 };

/** The partitions of `table`: name and bound, by name. */
async function partitions(table = name): Promise<string[]> {
  return (
    await db.admin`select c.relname::text || ' ' || pg_get_expr(c.relpartbound, c.oid) as p
                     from pg_inherits i join pg_class c on c.oid = i.inhrelid
                    where i.inhparent = to_regclass(${`public.${table}`}) order by 1`
  ).map((r) => String(r.p));
}

async function defaultRows(where = "true"): Promise<number> {
  return Number((await db.admin.unsafe(`select count(*)::int as n from public.events_default where ${where}`))[0]!.n);
}

/** Inserts `n` rows dated `months` months ahead (an hour apart) into the table and, in the same statement, the twin. */
async function insertAhead(months: number, n: number): Promise<void> {
  await db.admin.unsafe(`
    with ins as (
      insert into public.events (created_at, region, status, amount, note, data)
      select date_trunc('month', now()) + interval '${months} months' + i * interval '1 hour', 'emea', 'late', i, null,
             jsonb_build_object('late', i)
        from generate_series(1, ${n}) i
      returning id, created_at, region, status, amount, note, data)
    insert into twin.events (id, created_at, region, status, amount, note, data) select * from ins`);
}

describe("pgshift maintain", () => {
  it("moves DEFAULT's rows into new partitions under load, premakes, and a second run changes nothing", async () => {
    await createWorkload(db.admin, w, 10_000);
    const load = await startLoad(db.url, w, { connections: 3, pauseMs: 2 });
    try {
      await sleep(200);
      await startMigration(db.sql, w.table, {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:month"),
        mode: "trigger",
        ...opts,
      });
      expect((await backfill(db.sql, w.table, { batchSize: 2000 })).complete).toBe(true);
      expect((await verify(db.sql, w.table)).equal).toBe(true);
      await cutover(db.sql, w.table, opts);
      await finalize(db.sql, w.table, { yes: true, ...opts });
      // Past the 3 premade months: DEFAULT.
      await insertAhead(5, 300);
      await insertAhead(7, 200);
      const ahead = "created_at >= date_trunc('month', now()) + interval '5 months'";
      expect(await defaultRows(ahead)).toBe(500);

      const before = await partitions();
      const dry = await runCli(["maintain", name, "--dry-run", "--url", db.url]);
      expect(dry.code, describeRun(dry)).toBe(0);
      expect(dry.stdout).toContain("ATTACH PARTITION");
      expect(dry.stdout).toContain("FOR SHARE), ins AS (INSERT INTO");
      expect(dry.stdout).toContain("CREATE TRIGGER");
      expect(await partitions()).toEqual(before);
      expect(await defaultRows(ahead)).toBe(500);

      const r = await maintain(db.sql, w.table, { premake: 3, ...opts });
      const moved = r.created.filter((c) => c.rowsMoved > 0);
      expect(moved.map((c) => c.rowsMoved).reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(500);
      expect(await defaultRows(ahead)).toBe(0);
      // Every month up to 3 past the newest row (7 months ahead) exists now, none overlapping.
      const month = (k: number) =>
        new Date(Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth() + k, 1)).toISOString().slice(0, 7);
      const names = (await partitions()).map((p) => p.split(" ")[0]);
      for (let k = 0; k <= 10; k++)
        expect(names, JSON.stringify(r.created)).toContain(`events_p${month(k).replace("-", "_")}`);
      expect(names).not.toContain(`events_p${month(11).replace("-", "_")}`);
      await sleep(300);
    } finally {
      await load.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(load.stats.updates).toBeGreaterThan(20);
    await expectEqualToTwin(db.admin, [w.table], w.twin, "bigint");
    // Rows the load moved into DEFAULT meanwhile (dates before the first partition) get their partitions now; then
    // nothing is left to do.
    await maintain(db.sql, w.table, opts);
    expect(await defaultRows()).toBe(0);
    const settled = await partitions();
    const again = await maintain(db.sql, w.table, opts);
    expect(again.created).toEqual([]);
    expect(again.detached).toEqual([]);
    expect(again.statements.filter((s) => !/pgshift\.partitioned_tables/.test(s))).toEqual([]);
    expect(await partitions()).toEqual(settled);
    await expectEqualToTwin(db.admin, [w.table], w.twin, "bigint");
    const saved = await db.admin`select premake, last_maintained_at is not null as ran from pgshift.partitioned_tables
                                  where table_name = ${name}`;
    expect(saved[0]).toEqual({ premake: 3, ran: true });
  });

  it("applies the retention: detaches and keeps the tables, then detaches and drops", async () => {
    const oldest = (await partitions()).filter((p) => !p.includes("DEFAULT"));
    const keep = await runCli([
      "maintain",
      name,
      "--retention",
      "18 months",
      "--retention-keep-table",
      "--json",
      "--url",
      db.url,
    ]);
    expect(keep.code, describeRun(keep)).toBe(0);
    const kept = JSON.parse(keep.stdout) as { detached: { name: string; dropped: boolean }[] };
    expect(kept.detached.length).toBeGreaterThan(0);
    expect(kept.detached.every((d) => !d.dropped)).toBe(true);
    const after = (await partitions()).map((p) => p.split(" ")[0]);
    for (const d of kept.detached) {
      expect(after).not.toContain(d.name);
      const t = await db.admin`select relispartition from pg_class where oid = to_regclass(${`public.${d.name}`})`;
      expect(t[0]).toEqual({ relispartition: false });
    }
    // No partition left ends 18 months ago or earlier; those after it are all there.
    const cut = await db.admin`select now() - interval '18 months' as c`;
    for (const p of oldest) {
      const nm = p.split(" ")[0]!;
      const end = await db.admin.unsafe(
        `select (regexp_match($1, 'TO \\(''([^'']*)''\\)'))[1]::timestamptz <= $2::timestamptz as old`,
        [p, cut[0]!.c],
      );
      expect(after.includes(nm), nm).toBe(!end[0]!.old);
    }

    const drop = await maintain(db.sql, w.table, { retention: "12 months", retentionKeepTable: false, ...opts });
    expect(drop.detached.length).toBeGreaterThan(0);
    for (const d of drop.detached) {
      expect(d.dropped).toBe(true);
      expect((await db.admin`select to_regclass(${`public.${d.name}`}) as t`)[0]!.t).toBeNull();
    }
    // The settings were saved: the next run applies them, and has nothing left to do.
    const next = await maintain(db.sql, w.table, opts);
    expect(next.detached).toEqual([]);
    expect(next.created).toEqual([]);
  });

  it("--all maintains every table pgshift partitioned, and refuses a table pgshift did not partition", async () => {
    const ids: Workload = {
      table: { schema: "public", name: "ledger" },
      twin: { schema: "twin", name: "ledger" },
      keyKind: "bigint",
    };
    await createWorkload(db.admin, ids, 3000);
    await startMigration(db.sql, ids.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:id:1000"),
      mode: "trigger",
      ...opts,
    });
    await backfill(db.sql, ids.table, { batchSize: 2000 });
    await cutover(db.sql, ids.table, opts);
    await finalize(db.sql, ids.table, { yes: true, ...opts });
    await db.admin.unsafe("create table public.by_hand (id bigint, at date) partition by range (at)");
    // ids beyond the premade widths: DEFAULT, then moved by --all.
    await db.admin.unsafe(
      "insert into public.ledger (id, created_at) select 20000 + i, now() from generate_series(1, 50) i",
    );
    const all = await runCli(["maintain", "--all", "--premake", "2", "--json", "--url", db.url]);
    expect(all.code, describeRun(all)).toBe(0);
    const rs = JSON.parse(all.stdout) as { table: string; created: { name: string; rowsMoved: number }[] }[];
    expect(rs.map((r) => r.table)).toEqual(["public.events", "public.ledger"]);
    const ledger = rs[1]!;
    expect(ledger.created.find((c) => c.name === "ledger_p20000")?.rowsMoved).toBe(50);
    expect(ledger.created.map((c) => c.name)).toContain("ledger_p22000");
    const inDefault = await db.admin`select count(*)::int as n from public.ledger_default`;
    expect(inDefault[0]!.n).toBe(0);

    const refused = await runCli(["maintain", "by_hand", "--url", db.url]);
    expectRefusal(refused, "pgshift did not partition public.by_hand");
  });

  it("refuses a move when a foreign key references the table; the DELETE triggers do not fire", async () => {
    const parts = async () => partitions("ledger");
    await db.admin.unsafe(`
      insert into public.ledger (id, created_at) select 40000 + i, now() from generate_series(1, 20) i;
      create table public.ledger_refs (ledger_id bigint references public.ledger (id));`);
    const before = await parts();
    const inDefault = async () => Number((await db.admin`select count(*)::int as n from public.ledger_default`)[0]!.n);
    const fk = await runCli(["maintain", "ledger", "--url", db.url]);
    expectRefusal(fk, "foreign keys reference it", "ledger_refs");
    expect(await parts()).toEqual(before);
    expect(await inDefault()).toBe(20);

    // The application's DELETE triggers do not fire: the move deletes no row (DEFAULT is detached, then dropped).
    await db.admin.unsafe(`
      drop table public.ledger_refs;
      create table public.ledger_deleted (id bigint);
      create function public.audit() returns trigger language plpgsql as $$
        begin insert into public.ledger_deleted values (old.id); return old; end $$;
      create trigger ledger_audit after delete on public.ledger for each row execute function public.audit();`);
    const ok = await maintain(db.sql, { schema: "public", name: "ledger" }, opts);
    expect(ok.created.find((c) => c.name === "ledger_p40000")?.rowsMoved).toBe(20);
    expect((await db.admin`select count(*)::int as n from public.ledger_deleted`)[0]!.n).toBe(0);
    // The trigger is on the new partitions (cloned by ATTACH) and on the new DEFAULT.
    await db.admin.unsafe("delete from public.ledger where id in (40001, 20001)");
    expect((await db.admin`select count(*)::int as n from public.ledger_deleted`)[0]!.n).toBe(2);
    expect(await inDefault()).toBe(0);
  });
});
