import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadMigration, SCHEMA_VERSION } from "../../src/migration/state.js";
import { mirrorFunctionSql } from "../../src/mirror/trigger.js";
import { catalogSnapshot } from "../support/catalog.js";
import { describeRun, expectRefusal, runCli } from "../support/cli.js";
import { createLoginRole, freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * The version of the pgshift schema (pgshift.schema_version): a database whose state an older pgshift
 * wrote is read as it is by status and upgraded by the first command that writes, and the migration goes on; one whose
 * state a newer
 * pgshift wrote is refused by every command with one line, nothing changed.
 */

let db: TestDatabase;
let role: Awaited<ReturnType<typeof createLoginRole>> | null = null;
const pgshift = (args: string[], url = db.url) => runCli([...args, "--url", url]);

beforeAll(async () => {
  db = await freshDatabase();
  role = await createLoginRole(db, "pgshift_ver");
});

afterAll(async () => {
  await db?.close();
  await role?.drop();
});

async function createOrders(name: string): Promise<void> {
  await db.admin.unsafe(`
    create table ${name} (id bigserial primary key, created_at timestamptz not null, note text);
    insert into ${name} (created_at, note)
      select timestamptz '2025-01-01 00:00+00' + i * interval '9 hours', 'order ' || i from
        generate_series(1, 400) i;`);
}

const version = async () => Number((await db.admin`select max(version) as v from pgshift.schema_version`)[0]!.v);
const hasCopiesLsn = async () =>
  Number(
    (
      await db.admin`select count(*)::int as n from pg_attribute where attrelid = 'pgshift.migrations'::regclass and
        attname = 'copies_lsn' and not attisdropped`
    )[0]!.n,
  ) === 1;

describe("schema version", () => {
  it(
    "a schema of version 1 (no copies_lsn, or no version table at all) is upgraded by the next command, and the " +
      "migration goes on",
    async () => {
      await createOrders("ver_old");
      const st = await pgshift([
        "start",
        "--allow-key-extension",
        "ver_old",
        "--partition-by",
        "range:created_at:month",
        "--mode",
        "logical",
      ]);
      expect(st.code, describeRun(st)).toBe(0);
      expect(await version()).toBe(SCHEMA_VERSION);

      // What a version-1 pgshift left: no copies_lsn column (and, as up to version 2, a DDL guard without
      // its partition guard; as up to version 3, no TRUNCATE guard on the shadow).
      const shadowGuards = async () =>
        Number(
          (
            await db.admin`select count(*)::int as n from pg_trigger where tgname = 'pgshift_truncate_guard'
                               and tgrelid in (select relid from pg_partition_tree('ver_old_pgshift_shadow'))`
          )[0]!.n,
        );
      const shadowTables = Number(
        (await db.admin`select count(*)::int as n from pg_partition_tree('ver_old_pgshift_shadow')`)[0]!.n,
      );
      expect(await shadowGuards()).toBe(shadowTables);
      await db.admin.unsafe(`do $$ declare r regclass; begin
      for r in select relid from pg_partition_tree('ver_old_pgshift_shadow') loop
        execute format('drop trigger pgshift_truncate_guard on %s', r);
      end loop; end $$`);
      expect(await shadowGuards()).toBe(0);
      await db.admin`drop event trigger pgshift_partition_guard`;
      await db.admin`drop event trigger pgshift_ddl_guard`;
      await db.admin`create event trigger pgshift_ddl_guard on ddl_command_end when tag in ('ALTER TABLE') execute
      function pgshift.ddl_guard()`;
      await db.admin`alter table pgshift.migrations drop column copies_lsn`;
      await db.admin`update pgshift.schema_version set version = 1`;
      const s1 = await pgshift(["status", "ver_old", "--json"]);
      expect(s1.code, describeRun(s1)).toBe(0);
      expect(JSON.parse(s1.stdout).phase).toBe("started");
      // status reads it as it is; the next command that writes upgrades it.
      expect(await version()).toBe(1);
      for (const args of [
        ["backfill", "ver_old", "--dry-run"],
        ["abort", "ver_old", "--dry-run"],
      ]) {
        const dry = await pgshift(args);
        expect(dry.code, describeRun(dry)).toBe(0);
        expect(await version(), `${args.join(" ")} changes nothing`).toBe(1);
      }
      expect(await hasCopiesLsn()).toBe(false);

      // Older still: no version table either.
      await db.admin`drop table pgshift.schema_version`;
      const bf = await pgshift(["backfill", "ver_old"]);
      expect(bf.code, describeRun(bf)).toBe(0);
      expect(await version()).toBe(SCHEMA_VERSION);
      expect(await hasCopiesLsn()).toBe(true);
      expect(
        (await db.admin`select count(*)::int as n from pg_event_trigger where evtname = 'pgshift_partition_guard'`)[0]!
          .n,
      ).toBe(1);
      expect(
        (await db.admin`select evttags from pg_event_trigger where evtname = 'pgshift_ddl_guard'`)[0]!.evttags,
      ).toEqual(["ALTER TABLE", "CREATE TABLE"]);
      expect(await shadowGuards()).toBe(shadowTables);
      await expect(db.admin`truncate ver_old_pgshift_shadow`).rejects.toMatchObject({ code: "55006" });
      const v = await pgshift(["verify", "ver_old"]);
      expect(v.code, describeRun(v)).toBe(0);
      const cut = await pgshift(["cutover", "ver_old"]);
      expect(cut.code, describeRun(cut)).toBe(0);
      const fin = await pgshift(["finalize", "ver_old", "--yes"]);
      expect(fin.code, describeRun(fin)).toBe(0);
    },
  );

  it(
    "an upgrade that cannot lock a shadow to give it the TRUNCATE guard warns and goes on; the next cutover " +
      "gives it",
    async () => {
      await createOrders("ver_busy");
      const st = await pgshift([
        "start",
        "--allow-key-extension",
        "ver_busy",
        "--partition-by",
        "range:created_at:month",
      ]);
      expect(st.code, describeRun(st)).toBe(0);
      expect((await pgshift(["backfill", "ver_busy"])).code).toBe(0);
      const guarded = async (root: string) =>
        (
          await db.admin`select c.oid::regclass::text as t, exists (select from pg_trigger g where g.tgrelid = c.oid and
          g.tgname = 'pgshift_truncate_guard') as g
                        from pg_class c where c.oid = ${root}::regclass or c.oid in (select relid from
                          pg_partition_tree(${root}::regclass))
                       order by 1`
        ).map((r) => `${String(r.t)}: ${r.g ? "guarded" : "not guarded"}`);
      const all = (ts: string[]) => ts.map((t) => t.replace(/not guarded$/, "guarded"));
      // What a version-3 pgshift left: a shadow without the guard.
      await db.admin.unsafe(`do $$ declare r regclass; begin
      for r in select relid from pg_partition_tree('ver_busy_pgshift_shadow') loop
        execute format('drop trigger pgshift_truncate_guard on %s', r);
      end loop; end $$`);
      await db.admin`update pgshift.schema_version set version = 3`;
      const unguarded = await guarded("ver_busy_pgshift_shadow");
      expect(unguarded.every((t) => t.endsWith("not guarded"))).toBe(true);
      // A writer's lock on the shadow (ROW EXCLUSIVE) that outlasts the upgrade's lock_timeout and retries.
      const holder = await db.admin.reserve();
      try {
        await holder.unsafe("begin");
        await holder.unsafe("lock table ver_busy_pgshift_shadow in row exclusive mode");
        const v = await pgshift(["verify", "ver_busy"]);
        expect(v.code, describeRun(v)).toBe(0);
        expect(v.stdout + v.stderr).toContain(
          "could not lock the table to give it the TRUNCATE guard; the next cutover or swap-back does",
        );
        expect(await version()).toBe(SCHEMA_VERSION);
        expect(await guarded("ver_busy_pgshift_shadow")).toEqual(unguarded);
      } finally {
        await holder.unsafe("rollback");
        holder.release();
      }
      const cut = await pgshift(["cutover", "ver_busy"]);
      expect(cut.code, describeRun(cut)).toBe(0);
      const live = await guarded("ver_busy");
      expect(live).toEqual(all(unguarded.map((t) => t.replace("ver_busy_pgshift_shadow", "ver_busy"))).sort());
      expect(await guarded("ver_busy_pgshift_retired")).toEqual(["ver_busy_pgshift_retired: guarded"]);
      expect((await pgshift(["finalize", "ver_busy", "--yes"])).code).toBe(0);
    },
  );

  it(
    "a migration cut over by a version-4 pgshift (reverse mirror upserts) gets the strict reverse mirror from the " +
      "next command: a reused key is refused, the retired row kept",
    async () => {
      await createOrders("ver_rev");
      const st = await pgshift([
        "start",
        "--allow-key-extension",
        "ver_rev",
        "--partition-by",
        "range:created_at:month",
      ]);
      expect(st.code, describeRun(st)).toBe(0);
      expect((await pgshift(["backfill", "ver_rev"])).code).toBe(0);
      expect((await pgshift(["cutover", "ver_rev"])).code).toBe(0);
      // What a version-4 pgshift installed after cutover: the reverse mirror upserting on the original key.
      const m = (await loadMigration(db.admin, { schema: "public", name: "ver_rev" }))!;
      await db.admin.unsafe(
        mirrorFunctionSql({
          fn: m.mirrorFn,
          from: m.live,
          to: m.copy,
          columns: m.copy_columns,
          key: m.key_columns,
          overridingSystemValue: false,
          writes: "upsert",
        }),
      );
      await db.admin`update pgshift.schema_version set version = 4`;
      const original = await db.admin`select id, created_at, note from ver_rev_pgshift_retired where id = 1`;
      const v = await pgshift(["status", "ver_rev"]);
      expect(v.code, describeRun(v)).toBe(0);
      expect(await version()).toBe(4); // status reads as it is
      const verify = await pgshift(["verify", "ver_rev"]);
      expect(verify.code, describeRun(verify)).toBe(0);
      expect(await version()).toBe(SCHEMA_VERSION);
      // id 1 again, in another month: the partitioned table alone would take it; the retired table refuses it.
      const err = await db.admin`insert into ver_rev (id, created_at, note) values (1, '2030-06-01', 'dup')`.catch(
        (e: unknown) => e,
      );
      expect((err as { code?: string }).code).toBe("23505");
      expect(await db.admin`select id, created_at, note from ver_rev_pgshift_retired where id = 1`).toEqual(original);
      expect((await pgshift(["swap-back", "ver_rev"])).code).toBe(0);
      expect(await db.admin`select id, created_at, note from ver_rev where id = 1`).toEqual(original);
      expect((await pgshift(["abort", "ver_rev"])).code).toBe(0);
    },
  );

  it("an upgrade the role may not make is refused with one line, nothing changed", async () => {
    await createOrders("ver_weak");
    await db.admin.unsafe(`alter table ver_weak owner to ${role!.name}`);
    const st = await pgshift([
      "start",
      "--allow-key-extension",
      "ver_weak",
      "--partition-by",
      "range:created_at:month",
    ]);
    expect(st.code, describeRun(st)).toBe(0);
    // The role may read the state but does not own it.
    await db.admin.unsafe(`grant select on pgshift.migrations, pgshift.schema_version to ${role!.name}`);
    await db.admin`alter table pgshift.migrations drop column copies_lsn`;
    await db.admin`update pgshift.schema_version set version = 1`;
    const before = await catalogSnapshot(db.admin);
    expectRefusal(
      await pgshift(["backfill", "ver_weak"], role!.url),
      `the pgshift schema of this database is version 1 and needs an upgrade to ${SCHEMA_VERSION}, which failed`,
    );
    expect(await catalogSnapshot(db.admin)).toEqual(before);
    // Its owner runs a command that writes: upgraded.
    expect((await pgshift(["backfill", "ver_weak"])).code).toBe(0);
    expect(await version()).toBe(SCHEMA_VERSION);
    expect(await hasCopiesLsn()).toBe(true);
    expect((await pgshift(["abort", "ver_weak"])).code).toBe(0);
  });

  it("a schema newer than this pgshift is refused by every command with one line, nothing changed", async () => {
    await createOrders("ver_new");
    await createOrders("ver_other");
    const st = await pgshift(["start", "--allow-key-extension", "ver_new", "--partition-by", "range:created_at:month"]);
    expect(st.code, describeRun(st)).toBe(0);
    const newer = SCHEMA_VERSION + 1;
    await db.admin`update pgshift.schema_version set version = ${newer}`;
    const before = await catalogSnapshot(db.admin);
    const line =
      `the pgshift schema of this database is version ${newer}, newer than this pgshift understands ` +
      `(${SCHEMA_VERSION})`;
    for (const args of [
      ["status", "ver_new"],
      ["backfill", "ver_new"],
      ["verify", "ver_new"],
      ["cutover", "ver_new"],
      ["abort", "ver_new"],
    ]) {
      expectRefusal(await pgshift(args), line);
    }
    const plan = await pgshift(["plan", "ver_other", "--partition-by", "range:created_at:month"]);
    expect(plan.code, describeRun(plan)).toBe(2);
    expect(plan.stdout + plan.stderr).toContain(line);
    expectRefusal(
      await pgshift(["start", "--allow-key-extension", "ver_other", "--partition-by", "range:created_at:month"]),
      line,
    );
    expect(await catalogSnapshot(db.admin)).toEqual(before);
  });
});
