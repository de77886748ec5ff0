import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { partitionIndexName } from "../../src/ddl/shadow.js";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
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
  it("batches that meet rows the mirror already wrote fall back to ON CONFLICT DO NOTHING and copy the rest", async () => {
    const w: Workload = { table: { schema: "public", name: "bf_conflict" }, twin: { schema: "twin", name: "bf_conflict" }, keyKind: "bigint" };
    await createWorkload(db.admin, w, 6000);
    await startMigration(db.sql, w.table, { spec: parsePartitionSpec("range:created_at:month") });
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
  });

  it("resumes an index build interrupted during CREATE INDEX CONCURRENTLY (an INVALID index is rebuilt)", async () => {
    const w: Workload = { table: { schema: "public", name: "bf_index" }, twin: { schema: "twin", name: "bf_index" }, keyKind: "bigint" };
    await createWorkload(db.admin, w, 4000);
    await startMigration(db.sql, w.table, { spec: parsePartitionSpec("list:region") });
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
    await expect(db.admin.unsafe(`create unique index concurrently "${pidx}" on "${part}" (region)`)).rejects.toThrow(/could not create unique index/);
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
