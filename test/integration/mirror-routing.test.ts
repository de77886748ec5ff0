import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Sql } from "../../src/db.js";
import { installTriggerMirrorSql, TRUNCATE_TRIGGER } from "../../src/mirror/trigger.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * The forward mirror's routed function (issue 18 item 6): each row written straight into its leaf partition, chosen
 * by the leaf's partition constraint; a row that meets none (a DEFAULT partition's row, at either level) written
 * through the partitioned target. Writes that move rows between partitions, into and out of DEFAULT, change the key
 * and delete; the target must equal the source after each, with every row in the partition PostgreSQL would route
 * it to. Without the fallback through the target, the rows of the DEFAULT partitions are lost and this fails.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

const COLUMNS = ["id", "created_at", "region", "note"];

async function setUp(sql: Sql, name: string, twoLevels: boolean): Promise<void> {
  await sql.unsafe(`
    create table public.${name}_src (id bigint primary key, created_at timestamptz not null, region text not null,
      note text);
    create table public.${name}_dst (like public.${name}_src) partition by range (created_at);
    alter table public.${name}_dst add primary key (id, created_at${twoLevels ? ", region" : ""});
    create table public.${name}_dst_default partition of public.${name}_dst default;`);
  for (const m of ["01", "02", "03"]) {
    const next = m === "03" ? "04" : `0${Number(m) + 1}`;
    const bound = `for values from ('2026-${m}-01 00:00+00') to ('2026-${next}-01 00:00+00')`;
    if (!twoLevels) {
      await sql.unsafe(`create table public.${name}_dst_${m} partition of public.${name}_dst ${bound}`);
      continue;
    }
    await sql.unsafe(`
      create table public.${name}_dst_${m} partition of public.${name}_dst ${bound} partition by list (region);
      create table public.${name}_dst_${m}_emea partition of public.${name}_dst_${m} for values in ('emea');
      create table public.${name}_dst_${m}_apac partition of public.${name}_dst_${m} for values in ('apac');
      create table public.${name}_dst_${m}_default partition of public.${name}_dst_${m} default;`);
  }
  const key = twoLevels ? ["id", "created_at", "region"] : ["id", "created_at"];
  await sql.begin(async (tx) => {
    // (the TRUNCATE guard needs pgshift's schema, and nothing here truncates)
    for (const s of installTriggerMirrorSql({
      fn: { schema: "public", name: `${name}_mirror` },
      from: { schema: "public", name: `${name}_src` },
      to: { schema: "public", name: `${name}_dst` },
      columns: COLUMNS,
      key,
      overridingSystemValue: false,
    }))
      if (!s.includes(TRUNCATE_TRIGGER)) await tx.unsafe(s);
  });
}

/** Source and target row for row, and each target row in the leaf PostgreSQL routes it to. */
async function expectMirrored(sql: Sql, name: string): Promise<void> {
  const src = await sql.unsafe(`select ${COLUMNS.join(", ")} from public.${name}_src order by id`);
  const dst = await sql.unsafe(`select ${COLUMNS.join(", ")} from public.${name}_dst order by id`);
  expect(dst).toEqual(src);
  // Where each row sits, against where an INSERT into the target puts it (routed by PostgreSQL).
  const placed = [
    ...(await sql.unsafe(`select id, tableoid::regclass::text as leaf from public.${name}_dst order by id`)),
  ];
  // (the same rows inserted through the target in a transaction rolled back: the thrown error carries the rows)
  const expected = await sql
    .begin(async (tx) => {
      await tx.unsafe(`delete from public.${name}_dst`);
      await tx.unsafe(`insert into public.${name}_dst select ${COLUMNS.join(", ")} from public.${name}_src`);
      const rows = await tx.unsafe(`select id, tableoid::regclass::text as leaf from public.${name}_dst order by id`);
      throw Object.assign(new Error("rolled back"), { rows: [...rows] });
    })
    .catch((e: { rows?: unknown }) => e.rows);
  expect(placed).toEqual(expected);
}

async function writeEverything(sql: Sql, name: string): Promise<void> {
  const t = `public.${name}_src`;
  const steps = [
    // a leaf of each kind, a row outside every bound (DEFAULT), a region of no list (the second level's DEFAULT)
    `insert into ${t} values (1, '2026-01-10 00:00+00', 'emea', 'a'), (2, '2026-02-10 00:00+00', 'apac', null),
       (3, '2025-06-01 00:00+00', 'emea', 'outside'), (4, '2026-03-31 23:59:59+00', 'zz', 'no list'),
       (5, '2026-04-01 00:00+00', 'emea', 'first moment outside'), (6, '2026-01-01 00:00+00', 'apac', 'lower bound')`,
    // key unchanged; partition column unchanged
    `update ${t} set note = 'b' where id in (1, 3, 4)`,
    // to another partition; into DEFAULT; out of DEFAULT; to another list (and to the second level's DEFAULT)
    `update ${t} set created_at = '2026-02-15 00:00+00' where id = 1`,
    `update ${t} set created_at = '2031-01-01 00:00+00' where id = 2`,
    `update ${t} set created_at = '2026-03-01 00:00+00' where id = 3`,
    `update ${t} set region = case region when 'zz' then 'emea' else 'zz' end where id in (4, 6)`,
    // the key changes; a row of DEFAULT deleted; a routed row deleted
    `update ${t} set id = 60 where id = 6`,
    `delete from ${t} where id = 5`,
    `insert into ${t} values (7, '2026-02-02 00:00+00', 'emea', 'x'), (8, '2020-01-01 00:00+00', 'apac', 'y')`,
    `delete from ${t} where id in (7, 8)`,
  ];
  for (const s of steps) {
    await sql.unsafe(s);
    await expectMirrored(sql, name);
  }
}

describe("the routed forward mirror", () => {
  for (const twoLevels of [false, true]) {
    const levels = twoLevels ? "two levels" : "one level";
    it(`writes each row into its leaf, and DEFAULT's rows through the target (${levels})`, async () => {
      const name = twoLevels ? "two" : "one";
      await setUp(db.admin, name, twoLevels);
      const body = (await db.admin.unsafe(`select pg_get_functiondef('public.${name}_mirror'::regproc) as d`))[0]!
        .d as string;
      // routed: the leaves are written directly (at the lowest level), and the target only as the fallback
      const leaf = twoLevels ? `public.${name}_dst_01_emea` : `public.${name}_dst_01`;
      expect(body).toContain(`INSERT INTO ${leaf} `);
      expect(body).toContain(`DELETE FROM ${leaf} `);
      expect(body).not.toContain(`INTO public.${name}_dst_default `);
      expect(body).toContain(`INSERT INTO "public"."${name}_dst" `);
      await writeEverything(db.admin, name);
      const counts = await db.admin.unsafe(
        `select tableoid::regclass::text as leaf, count(*)::int as n from public.${name}_dst group by 1 order by 1`,
      );
      // rows did land in the DEFAULT partitions and in routed leaves
      expect(counts.map((c) => c.leaf)).toContain(`${name}_dst_default`);
      if (twoLevels) expect(counts.map((c) => c.leaf)).toContain(`${name}_dst_01_default`);
    });
  }
});
