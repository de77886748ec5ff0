import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Sql } from "../../src/db.js";
import type { StatusReport } from "../../src/status.js";
import { describeRun, expectRefusal, runCli } from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Schema drift: an ALTER TABLE run on the table while it is being migrated, let through the DDL guard on
 * purpose (SET pgshift.allow_ddl = on; ddl-guard.test.ts tests the refusals). pgshift does not carry it over,
 * so every step that would lose or break a column must refuse, with one clear line and nothing changed:
 * cutover, swap-back and verify refuse, status shows each difference, and the logical applier stops at the
 * first change that carries the new columns instead of applying it without them.
 */

let db: TestDatabase;
const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);
const MONTH = ["--partition-by", "range:created_at:month"];

beforeAll(async () => {
  db = await freshDatabase();
});

afterAll(async () => {
  await db?.close();
});

async function createOrders(sql: Sql, name: string): Promise<void> {
  await sql.unsafe(`
    create table ${name} (id bigserial primary key, created_at timestamptz not null, note text);
    insert into ${name} (created_at, note)
      select timestamptz '2025-01-01 00:00+00' + i * interval '11 hours', 'order ' || i from
        generate_series(1, 300) i;`);
}

/** Runs an ALTER TABLE that the DDL guard would refuse, as an operator who sets pgshift.allow_ddl does. */
async function alterAnyway(stmt: string): Promise<void> {
  await db.admin.begin(async (tx) => {
    await tx`set local pgshift.allow_ddl = on`;
    await tx.unsafe(stmt);
  });
}

/** What a refused step must leave as it was: the phase, which table is partitioned, the triggers. */
async function snapshot(name: string) {
  const r = await db.admin`
    select (select phase from pgshift.migrations where source_table = ${name}) as phase,
           (select relkind::text from pg_class where oid = to_regclass(${`public.${name}`})) as live_kind,
           (select array_agg(tgname::text order by tgname) from pg_trigger where tgrelid =
             to_regclass(${`public.${name}`}) and not tgisinternal) as triggers`;
  return r[0];
}

async function statusOf(name: string): Promise<StatusReport> {
  const r = await pgshift(["status", name, "--json"]);
  expect(r.code, describeRun(r)).toBe(0);
  return JSON.parse(r.stdout) as StatusReport;
}

/** Creates the orders table `name`, starts its migration by month in `mode` and backfills it, through the CLI. */
async function startAndBackfill(name: string, mode: "trigger" | "logical"): Promise<void> {
  await createOrders(db.admin, name);
  expect((await pgshift(["start", "--allow-key-extension", name, ...MONTH, "--mode", mode])).code).toBe(0);
  expect((await pgshift(["backfill", name])).code).toBe(0);
}

describe("trigger mode", () => {
  it("refuses cutover, swap-back and verify while the columns differ, and proceeds once they agree again", async () => {
    await startAndBackfill("drift_t", "trigger");
    expect((await statusOf("drift_t")).schemaDrift).toEqual([]);

    // A deploy adds a column while the migration runs; the application writes it.
    await alterAnyway(`alter table drift_t add column extra int`);
    await db.admin`update drift_t set extra = 1 where id <= 10`;
    const before = await snapshot("drift_t");
    const st = await statusOf("drift_t");
    expect(st.schemaDrift).toEqual([
      "column extra (integer) is in public.drift_t but not in public.drift_t_pgshift_shadow",
    ]);
    const human = await pgshift(["status", "drift_t"]);
    expect(human.stdout).toContain("CHANGED during the migration (1 differences)");
    expect(human.stdout).toContain(
      "warning: column extra (integer) is in public.drift_t but not in public.drift_t_pgshift_shadow",
    );

    expectRefusal(
      await pgshift(["cutover", "drift_t"]),
      "cannot cut over",
      "column extra (integer) is in public.drift_t",
    );
    expectRefusal(await pgshift(["verify", "drift_t"]), "cannot verify", "column extra");
    expect(await snapshot("drift_t")).toEqual(before);

    // The same column added to the shadow by hand: the tables agree, but the mirror does not copy it.
    await alterAnyway(`alter table drift_t_pgshift_shadow add column extra int`);
    expect((await statusOf("drift_t")).schemaDrift).toEqual([
      "column extra of public.drift_t is not mirrored (added after pgshift start)",
    ]);
    expectRefusal(
      await pgshift(["cutover", "drift_t"]),
      "cannot cut over",
      "column extra of public.drift_t is not mirrored",
    );
    expect(await snapshot("drift_t")).toEqual(before);

    // Undone on both: cutover goes through.
    await alterAnyway(`alter table drift_t drop column extra`);
    await alterAnyway(`alter table drift_t_pgshift_shadow drop column extra`);
    expect((await statusOf("drift_t")).schemaDrift).toEqual([]);
    const cut = await pgshift(["cutover", "drift_t"]);
    expect(cut.code, describeRun(cut)).toBe(0);

    // After cutover the application writes the partitioned table; a type change there blocks swap-back.
    await alterAnyway(`alter table drift_t alter column note type varchar(200)`);
    const after = await snapshot("drift_t");
    expect(after?.phase).toBe("cutover");
    expect(after?.live_kind).toBe("p");
    expect((await statusOf("drift_t")).schemaDrift).toEqual([
      "column note is character varying(200) in public.drift_t but text in public.drift_t_pgshift_retired",
    ]);
    expectRefusal(await pgshift(["swap-back", "drift_t"]), "cannot swap back", "column note is character varying(200)");
    expect(await snapshot("drift_t")).toEqual(after);

    await alterAnyway(`alter table drift_t alter column note type text`);
    const back = await pgshift(["swap-back", "drift_t"]);
    expect(back.code, describeRun(back)).toBe(0);
    expect((await snapshot("drift_t"))?.live_kind).toBe("r");
  });
});

describe("indexes", () => {
  it(
    "an index created on the table during the migration is reported by status until the partitioned table has the " +
      "same index, and built there by cutover first",
    async () => {
      await startAndBackfill("drift_i", "trigger");
      expect((await statusOf("drift_i")).indexDrift).toEqual([]);
      await db.admin`create index drift_i_note on drift_i (note)`;
      const st = await statusOf("drift_i");
      expect(st.indexDrift).toHaveLength(1);
      expect(st.indexDrift[0]).toContain(
        "index drift_i_note was created on public.drift_i during the migration (CREATE INDEX drift_i_note ON " +
          "public.drift_i USING btree (note)) and public.drift_i_pgshift_shadow has no counterpart: cutover builds " +
          "it there first, before its lock, as drift_i_note_part",
      );
      expect(st.indexDrift[0]).toContain("CREATE INDEX drift_i_note ON public.drift_i USING btree (note)");
      expect(st.schemaDrift).toEqual([]);
      // The operator does as told for this one: the same index on the partitioned table is its counterpart.
      await db.admin`create index drift_i_shadow_note on drift_i_pgshift_shadow (note)`;
      expect((await statusOf("drift_i")).indexDrift).toEqual([]);
      // Another one, with a predicate; a counterpart without the predicate does not count.
      await db.admin`create index drift_i_recent on drift_i (created_at) where note is not null`;
      await db.admin`create index drift_i_shadow_recent on drift_i_pgshift_shadow (created_at)`;
      const st2 = await statusOf("drift_i");
      expect(st2.indexDrift).toHaveLength(1);
      expect(st2.indexDrift[0]).toContain("index drift_i_recent was created on public.drift_i during the migration");
      const cut = await pgshift(["cutover", "drift_i"]);
      expect(cut.code, describeRun(cut)).toBe(0);
      // Cutover built the one without a counterpart on the partitioned table first (late-objects.test.ts tests that
      // under
      // load).
      expect(cut.stdout, describeRun(cut)).toContain(
        "built index drift_i_recent_part on public.drift_i_pgshift_shadow before the lock, for index drift_i_recent",
      );
      expect(cut.stdout, describeRun(cut)).not.toContain("index drift_i_note");
      // After cutover the retired table's extra index does not matter any more; the partitioned table's extra
      // one (drift_i_shadow_recent, without the predicate) is what swap-back would build on the retired table.
      const st3 = await statusOf("drift_i");
      expect(st3.indexDrift).toHaveLength(1);
      expect(st3.indexDrift[0]).toContain(
        "index drift_i_shadow_recent was created on public.drift_i during the migration",
      );
      expect(st3.indexDrift[0]).toContain(
        "swap-back builds it there first, before its lock, as drift_i_shadow_recent_orig",
      );
    },
  );
});

describe("logical mode", () => {
  it("the applier stops at the first change with the new column, applies none of it, and cutover refuses", async () => {
    await startAndBackfill("drift_l", "logical");
    // A change before the ALTER, then the ALTER and changes carrying the new column.
    await db.admin`update drift_l set note = 'before' where id = 1`;
    const alterAt = String((await db.admin`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
    await alterAnyway(`alter table drift_l add column extra int default 7`);
    await db.admin`insert into drift_l (created_at, note, extra) values (timestamptz
      '2025-02-01 00:00+00', 'after', 8)`;
    await db.admin`update drift_l set note = 'after too' where id = 2`;

    const sync = await runCli(["sync", "drift_l", "--url", db.url], { timeoutMs: 60_000 });
    expectRefusal(sync, "the columns of public.drift_l changed during the migration (added extra)");

    // Nothing written after the ALTER reached the shadow (the group holding it was rolled back), and the
    // slot never confirmed a position past the ALTER.
    const shadow =
      await db.admin`select id, note from drift_l_pgshift_shadow where id = 2 or note like 'after%' order by id`;
    expect(shadow.map((r) => [Number(r.id), r.note])).toEqual([[2, "order 2"]]);
    const slot =
      await db.admin`select confirmed_flush_lsn <= ${alterAt}::pg_lsn as ok from pg_replication_slots where database =
        current_database()`;
    expect(slot.map((r) => r.ok)).toEqual([true]);
    // Restarting replays to the same place and stops again: the slot never confirmed past it.
    expectRefusal(await runCli(["sync", "drift_l", "--url", db.url], { timeoutMs: 60_000 }), "added extra");

    const st = await statusOf("drift_l");
    expect(st.schemaDrift).toEqual([
      "column extra (integer) is in public.drift_l but not in public.drift_l_pgshift_shadow",
    ]);
    expectRefusal(await pgshift(["cutover", "drift_l"]), "cannot cut over", "column extra");
    expect((await snapshot("drift_l"))?.phase).toBe("backfilled");

    const ab = await pgshift(["abort", "drift_l"]);
    expect(ab.code, describeRun(ab)).toBe(0);
    const left =
      await db.admin`select count(*)::int as n from pg_replication_slots where database = current_database()`;
    expect(left[0]!.n).toBe(0);
  });
});
