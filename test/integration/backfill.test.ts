import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { connect } from "../../src/db.js";
import { partitionIndexName } from "../../src/ddl/shadow.js";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, lockMigration, unlockMigration } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

describe("backfill", () => {
  it(
    "copies a table keyed by text (odd characters, collation order) with concurrent changes, and verify " + "agrees",
    async () => {
      await db.admin.unsafe(`
      create table bf_text (code text primary key, created_at date not null, v int);
      insert into bf_text select 'k' || lpad(i::text, 5, '0') || case when i % 7 = 0 then ' é''"\\' else '' end,
                                 date '2024-01-01' + (i % 400), i from generate_series(1, 5000) i;`);
      const t = { schema: "public", name: "bf_text" };
      await startMigration(db.sql, t, {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:quarter"),
      });
      const r1 = await backfill(db.sql, t, { batchSize: 700, maxBatches: 3 });
      expect(r1.complete).toBe(false);
      expect(r1.rowsCopied).toBe(2100);
      // rows behind and ahead of the checkpoint change while the backfill is paused
      await db.admin`update bf_text set v = -v, created_at = created_at + 200 where v % 10 = 0`;
      await db.admin`delete from bf_text where v % 13 = 0`;
      await db.admin`insert into bf_text values ('a-first', '2024-02-02', 1), ('zz-last', '2025-02-02', 2),
      ('k00001x', '2024-03-03', 3)`;
      const r2 = await backfill(db.sql, t, { batchSize: 700 });
      expect(r2.complete).toBe(true);
      const v = await verify(db.sql, t, { chunkSize: 600 });
      expect(v.differences).toEqual([]);
      expect(v.rowsCompared).toBe(Number((await db.admin`select count(*)::int as n from bf_text`)[0]!.n));
      const diff = await db.admin`
      select (select count(*) from (select * from bf_text except select * from bf_text_pgshift_shadow) a)::int as a,
             (select count(*) from (select * from bf_text_pgshift_shadow except select * from bf_text) b)::int as b`;
      expect(diff[0]).toEqual({ a: 0, b: 0 });
    },
  );

  it("refuses to run while another pgshift process holds the migration's advisory lock", async () => {
    await db.admin.unsafe(`create table bf_lock (id bigint primary key, created_at timestamptz not null default now());
                           insert into bf_lock (id) select generate_series(1, 100);`);
    const t = { schema: "public", name: "bf_lock" };
    await startMigration(db.sql, t, { allowKeyExtension: true, spec: parsePartitionSpec("range:created_at:month") });
    const other = await connect({ url: db.url });
    try {
      await lockMigration(other, t);
      await expect(backfill(db.sql, t)).rejects.toThrow(
        /another pgshift process \(backend pid \d+\) is working on public\.bf_lock/,
      );
      await expect(verify(db.sql, t)).rejects.toThrow(/another pgshift process/);
      expect((await loadMigration(db.admin, t))!.rows_copied).toBe(0);
      await unlockMigration(other, t);
      expect((await backfill(db.sql, t)).complete).toBe(true);
    } finally {
      await other.end();
    }
  });

  it(
    "batches that meet rows the mirror already wrote fall back to ON CONFLICT DO NOTHING and copy the " + "rest",
    async () => {
      const w: Workload = {
        table: { schema: "public", name: "bf_conflict" },
        twin: { schema: "twin", name: "bf_conflict" },
        keyKind: "bigint",
      };
      await createWorkload(db.admin, w, 6000);
      await startMigration(db.sql, w.table, {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:month"),
      });
      // The mirror writes these rows into the shadow before the backfill reaches them.
      await db.admin`update bf_conflict set status = 'touched' where id % 3 = 0 and id <= 3000`;
      const r = await backfill(db.sql, w.table, { batchSize: 500 });
      expect(r.complete).toBe(true);
      expect(r.conflictBatches).toBeGreaterThanOrEqual(1);
      expect(r.rowsCopied).toBe(6000);
      const v = await verify(db.sql, w.table);
      expect(v.differences).toEqual([]);
      const n = await db.admin`select count(*)::int as n from bf_conflict_pgshift_shadow where status = 'touched'`;
      expect(n[0]!.n).toBe(1000);
    },
  );

  it("resumes an index build interrupted during CREATE INDEX CONCURRENTLY (an INVALID index is rebuilt)", async () => {
    const w: Workload = {
      table: { schema: "public", name: "bf_index" },
      twin: { schema: "twin", name: "bf_index" },
      keyKind: "bigint",
    };
    await createWorkload(db.admin, w, 4000);
    await startMigration(db.sql, w.table, { allowKeyExtension: true, spec: parsePartitionSpec("list:region") });
    expect((await backfill(db.sql, w.table)).complete).toBe(true);
    const m = (await loadMigration(db.admin, w.table))!;
    const idx = m.deferred_indexes.find((d) => d.definition.includes("created_at"))!;
    expect(idx).toBeDefined();
    // Put the database where a crash during the index build leaves it: copy done, phase backfilling,
    // the parent index gone and an INVALID index, under the name pgshift uses, on one partition.
    await db.admin`update pgshift.migrations set phase = 'backfilling', backfill_finished_at = null where id = ${m.id}`;
    await db.admin.unsafe(`drop index "${idx.name}"`);
    const part = "bf_index_p_emea";
    const pidx = partitionIndexName(part, idx.name);
    await expect(db.admin.unsafe(`create unique index concurrently "${pidx}" on "${part}" (region)`)).rejects.toThrow(
      /could not create unique index/,
    );
    const invalid = await db.admin`select indisvalid from pg_index where indexrelid = to_regclass(${pidx})`;
    expect(invalid[0]!.indisvalid).toBe(false);

    const r = await backfill(db.sql, w.table);
    expect(r.complete).toBe(true);
    expect(r.batches).toBe(m.batches); // the copy was not run again
    const after = await db.admin`
      select i.indisvalid, (select count(*) from pg_inherits h where h.inhrelid = i.indexrelid)::int as attached,
             pg_get_indexdef(i.indexrelid) as def
        from pg_index i where i.indexrelid = to_regclass(${pidx})`;
    expect(after[0]).toMatchObject({ indisvalid: true, attached: 1 });
    expect(String(after[0]!.def)).toContain("(created_at)");
    const parent = await db.admin`select indisvalid from pg_index where indexrelid = to_regclass(${idx.name})`;
    expect(parent[0]!.indisvalid).toBe(true);
    expect((await loadMigration(db.admin, w.table))!.phase).toBe("backfilled");
  });
});
