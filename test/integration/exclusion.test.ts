import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import { finalize } from "../../src/migration/finish.js";
import { planMigration } from "../../src/migration/plan.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Exclusion constraints (issue 15): kept where PostgreSQL allows them on a partitioned table (17 and later, when
 * they compare the partition column with =), enforced on the table the application writes at every step and
 * named as before after finalize; refused by name otherwise (before 17, or a partition column not compared with =).
 */

let db: TestDatabase;
let version = 0;
const opts = { lockTimeoutMs: 200, retries: 30 };

beforeAll(async () => {
  db = await freshDatabase();
  version = Number((await db.admin`show server_version_num`)[0]!.server_version_num);
  await db.admin.unsafe(`
    create extension if not exists btree_gist;
    create table bookings (
      id bigint primary key, room int not null, during tstzrange not null, created_at timestamptz not null,
      constraint bookings_no_overlap exclude using gist (room with =, during with &&));
    insert into bookings
      select i, i % 10, tstzrange(timestamptz '2025-01-01' + (i / 10) * interval '1 hour',
                                  timestamptz '2025-01-01' + (i / 10 + 1) * interval '1 hour'),
             timestamptz '2025-01-01' + i * interval '1 minute'
        from generate_series(1, 2000) i;`);
});

afterAll(async () => {
  await db?.close();
});

/** An overlapping booking of room 3 (row 3 holds 2025-01-01 00:00-01:00): refused by the constraint. */
const overlap = (id: number) =>
  db.admin.unsafe(
    `insert into bookings values (${id}, 3, tstzrange('2025-01-01 00:30+00', '2025-01-01 00:45+00'), now())`,
  );

describe("an exclusion constraint", () => {
  it("that does not compare the partition column with = is refused by name", async () => {
    const plan = await planMigration(
      db.sql,
      { schema: "public", name: "bookings" },
      {
        spec: parsePartitionSpec("range:created_at:month"),
      },
    );
    expect(plan.blockers.join("\n")).toContain("exclusion constraint bookings_no_overlap on public.bookings");
  });

  it("is kept on PostgreSQL 17 and later (refused by name before) and enforced at every step", async () => {
    const table = { schema: "public", name: "bookings" };
    const spec = parsePartitionSpec("hash:room:4");
    const plan = await planMigration(db.sql, table, { spec });
    if (version < 170000) {
      expect(plan.blockers.join("\n")).toContain(
        "exclusion constraint bookings_no_overlap on public.bookings: PostgreSQL",
      );
      return;
    }
    expect(plan.blockers).toEqual([]);
    await startMigration(db.sql, table, { spec, allowKeyExtension: true, ...opts });
    // The shadow has it from the start: the mirror's and the backfill's rows are checked by it.
    const def = await db.admin`
      select pg_get_constraintdef(oid) as d from pg_constraint where conrelid = 'bookings_pgshift_shadow'::regclass
         and contype = 'x'`;
    expect(def.map((r) => r.d)).toEqual(["EXCLUDE USING gist (room WITH =, during WITH &&)"]);
    expect((await backfill(db.sql, table)).complete).toBe(true);
    expect((await verify(db.sql, table)).equal).toBe(true);
    await expect(overlap(5001)).rejects.toThrow(/violates exclusion constraint/);
    await cutover(db.sql, table, opts);
    await expect(overlap(5002)).rejects.toThrow(/violates exclusion constraint/);
    await swapBack(db.sql, table, opts);
    await expect(overlap(5003)).rejects.toThrow(/violates exclusion constraint/);
    await cutover(db.sql, table, opts);
    await finalize(db.sql, table, { yes: true });
    await expect(overlap(5004)).rejects.toThrow(/violates exclusion constraint/);
    const after = await db.admin`
      select conname::text as n, (select relkind::text from pg_class where oid = conrelid) as k from pg_constraint
       where conrelid = 'bookings'::regclass and contype = 'x'`;
    expect(after.map((r) => [r.n, r.k])).toEqual([["bookings_no_overlap", "p"]]);
  });
});
