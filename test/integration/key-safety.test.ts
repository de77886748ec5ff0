import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import type { Sql } from "../../src/db.js";
import { createWorkload, startLoad, WORKLOAD_COLUMNS, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, type Mode } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { catalogSnapshot } from "../support/catalog.js";
import { describeRun, expectRefusal, runCli } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * After cutover the live (partitioned) table's unique keys are the original ones extended with the partition
 * column, so it accepts a row that reuses an existing key with another partition value. Until finalize the
 * original keys must hold as before cutover: the reverse mirror inserts (never upserts) into the retired
 * table, whose unique indexes refuse the duplicate in the application's transaction, so no row of the
 * retired table is overwritten and swap-back loses nothing. verify --repair reports a duplicate it cannot
 * write as a difference with its key (exit 1), never as a raw error. finalize refuses (exit 2, nothing
 * changed) after a verify that found differences, and while views, BEGIN ATOMIC functions, columns of the
 * retired table's row type or foreign keys depend on the retired table, naming them.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);
const opts = { lockTimeoutMs: 200, retries: 30 };
// Every table here is partitioned by a column outside its keys: that is the point.
const startOpts = { ...opts, allowKeyExtension: true };
const COLS = WORKLOAD_COLUMNS("bigint").join(", ");

/** A row as text over the twin's columns, or null when the table has no row with this id (several: all, sorted). */
async function rowsOf(sql: Sql, table: string, id: number): Promise<string[]> {
  const r = await sql.unsafe(`select (${COLS})::text as t from ${table} where id = ${id} order by 1`);
  return r.map((x) => String(x.t));
}

/** Runs `fn` and returns the PostgreSQL error it threw (or fails the test when it did not throw). */
async function pgError(
  fn: () => Promise<unknown>,
): Promise<{ code?: string; constraint_name?: string; detail?: string; message: string }> {
  try {
    await fn();
  } catch (err) {
    return err as { code?: string; constraint_name?: string; detail?: string; message: string };
  }
  throw new Error("expected the statement to be refused, it went through");
}

describe.each(["trigger", "logical"] as Mode[])(
  "after cutover (started in %s mode) the original keys still hold",
  (mode) => {
    it(
      "an insert reusing an existing key with another partition value is refused with unique_violation, the " +
        "original row stays in both tables, swap-back loses nothing, the tables equal the twin",
      async () => {
        const name = `keys_${mode}`;
        const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
        await createWorkload(db.admin, w, 10_000);
        // A second unique key besides the primary key: start extends it with the partition column too.
        await db.admin.unsafe(
          `alter table ${name} add column ext text; create unique index ${name}_ext_key on ${name} (ext)`,
        );
        const load = await startLoad(db.url, w, { connections: 4, pauseMs: mode === "logical" ? 3 : 1 });
        // Sentinel rows, added after the load took its keys: no worker touches them. Months apart, ids < 0.
        const month = (n: number) => `date_trunc('month', now()) - interval '${n} months' + interval '3 days'`;
        const sentinel = (id: number, monthsAgo: number) =>
          `(${id}, ${month(monthsAgo)}, 'emea', 'sentinel', ${-id}.00, 'original ${id}', '{"s": ${-id}}')`;
        const ids = [-1, -2, -3, -4, -5];
        const values = ids.map((id) => sentinel(id, 2 + -id)).join(", ");
        await db.admin.begin(async (tx) => {
          await tx.unsafe(`insert into ${name} (${COLS}) values ${values}`);
          await tx.unsafe(`update ${name} set ext = 's' || -id where id < 0`);
          await tx.unsafe(`insert into twin.${name} (${COLS}) values ${values}`);
        });
        const app = postgres(db.url, { max: 1, onnotice: () => {} });
        const appTx = (f: (tx: postgres.TransactionSql) => Promise<unknown>) => app.begin(f);
        try {
          await sleep(200);
          await startMigration(db.sql, w.table, {
            spec: parsePartitionSpec("range:created_at:month"),
            mode,
            ...startOpts,
          });
          expect((await backfill(db.sql, w.table, { batchSize: 2000, sleepMs: 10 })).complete).toBe(true);
          expect((await verify(db.sql, w.table, { chunkSize: 4000 })).equal).toBe(true);
          await cutover(db.sql, w.table, opts);
          const m = (await loadMigration(db.sql, w.table))!;
          expect(m.phase).toBe("cutover");
          const retired = `public.${m.retired_table}`;
          // The retired table's unique indexes answer for the original keys until finalize.
          const pkey = String(
            (
              await db.admin`select conname::text as n from pg_constraint where conrelid =
              ${retired}::regclass and contype = 'p'`
            )[0]!.n,
          );
          const extKey = String(
            (
              await db.admin`
        select c.relname::text as n from pg_index i join pg_class c on c.oid = i.indexrelid
         where i.indrelid = ${retired}::regclass and i.indisunique and not i.indisprimary`
            )[0]!.n,
          );
          const before = await Promise.all(ids.map((id) => rowsOf(db.admin, `twin.${name}`, id)));

          // The application reuses id -1 with another month, writing its twin in the same transaction (as the load
          // does): the partitioned table alone would accept it; the retired table's primary key refuses it.
          const dup = await pgError(() =>
            appTx(async (tx) => {
              await tx.unsafe(
                `insert into ${name} (${COLS}) values (-1, ${month(20)}, 'amer', 'impostor', 9, 'dup', '{}')`,
              );
              await tx.unsafe(
                `insert into twin.${name} (${COLS}) values (-1, ${month(20)}, 'amer', 'impostor', 9, 'dup', '{}')`,
              );
            }),
          );
          expect(dup.code, dup.message).toBe("23505");
          // The error the original table gave before cutover (SQLSTATE, detail), from its primary key.
          expect(dup.detail).toBe("Key (id)=(-1) already exists.");
          expect(dup.constraint_name).toBe(pkey);
          // Another unique index: a new id, but ext of sentinel -2, in another month.
          const dupExt = await pgError(() =>
            app.unsafe(
              `insert into ${name} (created_at, region, status, ext) values (${month(25)}, 'apac', 'impostor', 's2')`,
            ),
          );
          expect(dupExt.code, dupExt.message).toBe("23505");
          expect(dupExt.detail).toBe("Key (ext)=(s2) already exists.");
          expect(dupExt.constraint_name).toBe(extKey);
          // An UPDATE that gives sentinel -3 the key of sentinel -1 (another month: the partitioned table accepts).
          const dupKey = await pgError(() => app.unsafe(`update ${name} set id = -1 where id = -3`));
          expect(dupKey.code, dupKey.message).toBe("23505");
          // Ordinary writes to a sentinel still reach the retired table: an update that moves it to another
          // month (DELETE and INSERT of the partitioned table) and one that changes its key to a free one.
          await appTx(async (tx) => {
            for (const t of [name, `twin.${name}`])
              await tx.unsafe(`update ${t} set created_at = ${month(30)}, amount = 40 where id = -4`);
          });
          await appTx(async (tx) => {
            for (const t of [name, `twin.${name}`]) await tx.unsafe(`update ${t} set id = -6 where id = -5`);
          });
          await sleep(300);

          for (const [i, id] of ids.slice(0, 3).entries()) {
            expect(await rowsOf(db.admin, name, id), `live ${id}`).toEqual(before[i]);
            expect(await rowsOf(db.admin, retired, id), `retired ${id}`).toEqual(before[i]);
          }
          for (const id of [-4, -6]) {
            const twin = await rowsOf(db.admin, `twin.${name}`, id);
            expect(twin).toHaveLength(1);
            expect(await rowsOf(db.admin, name, id)).toEqual(twin);
            expect(await rowsOf(db.admin, retired, id)).toEqual(twin);
          }
          expect(await rowsOf(db.admin, retired, -5)).toEqual([]);
          const ext = await db.admin.unsafe(`select count(*)::int as n from ${retired} where ext = 's2'`);
          expect(ext[0]!.n).toBe(1);
          expect((await verify(db.sql, w.table, { chunkSize: 4000 })).equal).toBe(true);

          await swapBack(db.sql, w.table, opts);
          await sleep(400);
        } finally {
          await load.stop();
          await app.end();
        }
        expect(load.stats.errors).toEqual([]);
        expect(load.stats.inserts).toBeGreaterThan(20);
        expect(load.stats.updates).toBeGreaterThan(20);
        const m = (await loadMigration(db.sql, w.table))!;
        expect(m.phase).toBe("swapped_back");
        // Swap-back lost nothing: the original table is live again and equals the twin; so does the shadow.
        await expectEqualToTwin(db.admin, [m.live, m.copy], w.twin, "bigint");
        for (const id of [-1, -2, -3]) expect(await rowsOf(db.admin, name, id)).toHaveLength(1);
        expect((await verify(db.sql, w.table)).equal).toBe(true);
      },
    );
  },
);

describe("identity columns after cutover", () => {
  it(
    "GENERATED ALWAYS: new rows get ids, a reused id is refused with unique_violation, an update of the id is " +
      "refused as the original table refused it; swap-back loses nothing",
    async () => {
      const name = "keys_identity";
      await db.admin.unsafe(`
      create table ${name} (id bigint generated always as identity primary key, created_at
        timestamptz not null, v text);
      insert into ${name} (created_at, v) select now() - (i % 120) * interval '1 day', 'v' || i from
        generate_series(1, 600) i;`);
      const table = { schema: "public", name };
      await startMigration(db.sql, table, { spec: parsePartitionSpec("range:created_at:month"), ...startOpts });
      expect((await backfill(db.sql, table, { batchSize: 200 })).complete).toBe(true);
      await cutover(db.sql, table, opts);
      const retired = `public.${(await loadMigration(db.sql, table))!.retired_table}`;
      const same = async (copy = retired) => {
        const r = await db.admin.unsafe(`
        select (select count(*) from (table ${name} except table ${copy}) a)::int as a,
               (select count(*) from (table ${copy} except table ${name}) b)::int as b`);
        return r[0];
      };
      const app = postgres(db.url, { max: 1, onnotice: () => {} });
      try {
        const row1 = await rowsOfIdentity(retired, 1);
        await app.unsafe(`insert into ${name} (created_at, v) values (now(), 'new')`);
        await app.unsafe(`update ${name} set v = 'changed' where id = 2`);
        await app.unsafe(`update ${name} set created_at = created_at - interval '200 days' where id = 3`);
        const dup = await pgError(() =>
          app.unsafe(`insert into ${name} (id, created_at, v) values (1, now() - interval '300 days', 'dup')`),
        );
        expect(dup.code, dup.message).toBe("23505");
        const rekey = await pgError(() => app.unsafe(`update ${name} set id = 1000000 where id = 4`));
        // What the original table answered: an identity column GENERATED ALWAYS "can only be updated to DEFAULT".
        expect(rekey.code, rekey.message).toBe("428C9");
        expect(await rowsOfIdentity(retired, 1)).toEqual(row1);
        expect(await rowsOfIdentity(name, 1)).toEqual(row1);
        expect(await rowsOfIdentity(name, 4)).toHaveLength(1);
        expect(await same()).toEqual({ a: 0, b: 0 });
        await swapBack(db.sql, table, opts);
        const m = (await loadMigration(db.sql, table))!;
        expect(m.phase).toBe("swapped_back");
        expect(await same(`public.${m.shadow_table}`)).toEqual({ a: 0, b: 0 });
        expect((await db.admin.unsafe(`select count(*)::int as n from ${name}`))[0]!.n).toBe(601);
      } finally {
        await app.end();
      }
    },
  );
});

async function rowsOfIdentity(table: string, id: number): Promise<string[]> {
  return (await db.admin.unsafe(`select t::text from ${table} t where id = ${id}`)).map((r) => String(r.t));
}

describe("verify --repair meets a duplicate key after cutover", () => {
  it(
    "reports it as a difference with its key (exit 1, no raw error), keeps the retired row, and converges once the " +
      "duplicate is removed",
    async () => {
      const name = "keys_repair";
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(db.admin, w, 6000);
      const load = await startLoad(db.url, w, { connections: 3, pauseMs: 2 });
      const id = -7;
      const row = (monthsAgo: number, note: string) =>
        `(${id}, date_trunc('month', now()) - interval '${monthsAgo} months' + interval '2 days', ` +
        `'emea', 'sentinel', ` +
        `7, '${note}', '{}')`;
      await db.admin.begin(async (tx) => {
        for (const t of [name, `twin.${name}`])
          await tx.unsafe(`insert into ${t} (${COLS}) values ${row(3, "original")}`);
      });
      let retired = "";
      try {
        await startMigration(db.sql, w.table, { spec: parsePartitionSpec("range:created_at:month"), ...startOpts });
        expect((await backfill(db.sql, w.table, { batchSize: 2000, sleepMs: 10 })).complete).toBe(true);
        await cutover(db.sql, w.table, opts);
        retired = `public.${(await loadMigration(db.sql, w.table))!.retired_table}`;
        const original = await rowsOf(db.admin, `twin.${name}`, id);
        // A second row with the key gets into the live table past the mirror (what a pgshift before this
        // safeguard let in, or a session with session_replication_role = replica).
        await db.admin.begin(async (tx) => {
          await tx.unsafe(`set local session_replication_role = replica`);
          await tx.unsafe(`insert into ${name} (${COLS}) values ${row(15, "duplicate")}`);
        });
        const r = await pgshift(["verify", name, "--repair", "--chunk-size", "2000"]);
        expect(r.code, describeRun(r)).toBe(1);
        // stderr holds log lines (JSON, off a terminal) and nothing else: no error line, no stack trace.
        expect(
          r.stderr.split("\n").filter((l) => l.trim() !== "" && !l.startsWith("{")),
          describeRun(r),
        ).toEqual([]);
        expect(r.stdout, describeRun(r)).toMatch(/^DIFFERENT: /);
        expect(r.stdout, describeRun(r)).toContain(`(${id})`);
        const j = await pgshift(["verify", name, "--repair", "--json"]);
        expect(j.code, describeRun(j)).toBe(1);
        const report = JSON.parse(j.stdout) as {
          equal: boolean;
          differences: { kind: string; key: string[]; reason?: string }[];
        };
        expect(report.equal).toBe(false);
        expect(report.differences.length).toBeGreaterThan(0);
        for (const d of report.differences) {
          expect(d.key).toEqual([String(id)]);
          expect(d.reason, JSON.stringify(d)).toMatch(
            /duplicate key value violates unique constraint .*\(Key \(id\)=\(-7\) already exists\.\)/,
          );
        }
        // The retired table keeps the original row; cutover's way back is refused while the difference stands.
        expect(await rowsOf(db.admin, retired, id)).toEqual(original);
        expectRefusal(await pgshift(["swap-back", name]), "cannot swap back", "1 missing");
        // What the hint says: remove the duplicate from the live table, then repair.
        await db.admin.unsafe(`delete from ${name} where id = ${id} and note = 'duplicate'`);
        const again = await pgshift(["verify", name, "--repair"]);
        expect(again.code, describeRun(again)).toBe(0);
        expect(await rowsOf(db.admin, name, id)).toEqual(original);
        expect(await rowsOf(db.admin, retired, id)).toEqual(original);
        expect((await pgshift(["swap-back", name])).code).toBe(0);
        await sleep(300);
      } finally {
        await load.stop();
      }
      expect(load.stats.errors).toEqual([]);
      const m = (await loadMigration(db.sql, w.table))!;
      await expectEqualToTwin(db.admin, [m.live, m.copy], w.twin, "bigint");
    },
  );
});

describe("finalize refuses, changing nothing", () => {
  /** A small table cut over (trigger mode, no load: the catalog snapshot covers every table's rows). */
  async function cutOver(name: string): Promise<string> {
    await db.admin.unsafe(`
      create table ${name} (id bigserial primary key, created_at timestamptz not null, v text);
      insert into ${name} (created_at, v) select now() - (i % 90) * interval '1 day', 'v' || i from
        generate_series(1, 500) i;`);
    const table = { schema: "public", name };
    await startMigration(db.sql, table, { spec: parsePartitionSpec("range:created_at:month"), ...startOpts });
    expect((await backfill(db.sql, table, { batchSize: 200 })).complete).toBe(true);
    await cutover(db.sql, table, opts);
    return `public.${(await loadMigration(db.sql, table))!.retired_table}`;
  }

  it(
    "after a verify that found differences (rows only in the retired table), then goes through once verify finds " +
      "none",
    async () => {
      const name = "fin_diff";
      const retired = await cutOver(name);
      // Rows only in the retired table: finalize would drop the only copy of them.
      await db.admin.unsafe(
        `insert into ${retired} (id, created_at, v) values (-1, now(), 'only here'), (-2, now(), 'only here')`,
      );
      const v = await pgshift(["verify", name]);
      expect(v.code, describeRun(v)).toBe(1);
      const before = await catalogSnapshot(db.admin);
      for (const args of [
        ["finalize", name, "--yes"],
        ["finalize", name, "--dry-run"],
      ]) {
        expectRefusal(await pgshift(args), "cannot finalize", "found 0 missing, 2 extra and 0 different rows", retired);
      }
      expect(await catalogSnapshot(db.admin)).toEqual(before);
      // Moved to the live table (the reverse mirror copies them back: it refuses keys the retired table holds),
      // they verify equal; finalize then goes through.
      await db.admin.unsafe(
        `with gone as (delete from ${retired} where id < 0 returning id, created_at, v) insert into ${name} (id,
        created_at, v) select * from gone`,
      );
      expect((await pgshift(["verify", name])).code).toBe(0);
      const f = await pgshift(["finalize", name, "--yes"]);
      expect(f.code, describeRun(f)).toBe(0);
      expect((await db.admin.unsafe(`select count(*)::int as n from ${name} where id < 0`))[0]!.n).toBe(2);
    },
  );

  it(
    "while a view, a BEGIN ATOMIC function, a column of its row type or a foreign key depends on the retired table, " +
      "naming each",
    async () => {
      const name = "fin_deps";
      const retired = await cutOver(name);
      expect((await pgshift(["verify", name])).code).toBe(0);
      await db.admin.unsafe(`
      create view fin_deps_report as select id, v from ${retired};
      create function fin_deps_count() returns bigint language sql begin atomic select count(*) from ${retired}; end;
      create table fin_deps_archive (id int, snapshot ${retired});
      create table fin_deps_child (id int, parent bigint references ${retired} (id));`);
      const before = await catalogSnapshot(db.admin);
      const r = await pgshift(["finalize", name, "--yes"]);
      expectRefusal(
        r,
        "cannot finalize public.fin_deps: 4 objects still depend on the retired table",
        "view public.fin_deps_report",
        "function public.fin_deps_count()",
        "table column public.fin_deps_archive.snapshot",
        "table constraint fin_deps_child_parent_fkey on public.fin_deps_child",
      );
      // pgshift's own objects on the retired table (its TRUNCATE guard) are not listed.
      expect(r.stderr).not.toMatch(/pgshift_truncate_guard|pgshift_mirror|trigger /);
      expect(await catalogSnapshot(db.admin)).toEqual(before);
      // One at a time: each refusal names what is left.
      await db.admin.unsafe(`drop view fin_deps_report; drop table fin_deps_child`);
      expectRefusal(
        await pgshift(["finalize", name, "--yes"]),
        "2 objects still depend",
        "function public.fin_deps_count()",
        "table column public.fin_deps_archive.snapshot",
      );
      await db.admin.unsafe(`drop function fin_deps_count()`);
      expectRefusal(
        await pgshift(["finalize", name, "--yes"]),
        "an object still depends",
        "table column public.fin_deps_archive.snapshot",
      );
      expect((await loadMigration(db.sql, { schema: "public", name }))!.phase).toBe("cutover");
      await db.admin.unsafe(`drop table fin_deps_archive`);
      const f = await pgshift(["finalize", name, "--yes"]);
      expect(f.code, describeRun(f)).toBe(0);
      expect(await loadMigration(db.sql, { schema: "public", name })).toBeNull();
      expect((await db.admin`select to_regclass(${retired}) is null as gone`)[0]!.gone).toBe(true);
    },
  );
});
