import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type Sql } from "../../src/db.js";
import {
  compareWithTwin,
  createWorkload,
  type RunningLoad,
  startLoad,
  type Workload,
} from "../../src/load/workload.js";
import { loadMigration } from "../../src/migration/state.js";
import { displayName, type QualifiedName } from "../../src/names.js";
import type { StatusReport } from "../../src/status.js";
import { describeRun, runCli } from "../support/cli.js";
import { createLoginRole, freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * The DDL guard (src/migration/ddl-guard.ts): while a table is being migrated, an ALTER TABLE that would
 * leave the columns of the live table and of its copy out of step is refused by PostgreSQL itself (the
 * event trigger raises, so the ALTER rolls back), whoever runs it. Without the guard, dropping a column the
 * trigger mirror names makes every write of the application fail. A write load and its twin run throughout:
 * the refusals touch none of the application's writes, and the table equals the twin at the end.
 */

let db: TestDatabase;
/** A role that is not a superuser, owns its tables, and may not read pgshift's. */
let role: Awaited<ReturnType<typeof createLoginRole>> | null = null;
let roleUrl = "";
let roleSql: Sql | null = null;

beforeAll(async () => {
  db = await freshDatabase();
  role = await createLoginRole(db, "pgshift_ddl");
  roleUrl = role.url;
  roleSql = await connect({ url: roleUrl, max: 1 });
});

afterAll(async () => {
  await roleSql?.end({ timeout: 5 }).catch(() => {});
  await db?.close();
  await role?.drop();
});

const pgshift = (args: string[], url = db.url) => runCli([...args, "--url", url]);

async function statusOf(name: string, url = db.url): Promise<StatusReport> {
  const r = await pgshift(["status", name, "--json"], url);
  expect(r.code, describeRun(r)).toBe(0);
  return JSON.parse(r.stdout) as StatusReport;
}

/** Name, type and generated flag of every column of `t`, in order: what a refused ALTER must leave as it was. */
async function columns(t: QualifiedName): Promise<string[]> {
  const r = await db.admin`
    select attname::text || ' ' || format_type(atttypid, atttypmod) || ' ' || attgenerated::text as c
      from pg_attribute where attrelid = to_regclass(${displayName(t)}) and attnum > 0 and not
        attisdropped order by attnum`;
  return r.map((x) => String(x.c));
}

const guardCount = async () =>
  Number(
    (
      await db.admin`select count(*)::int as n from pg_event_trigger where evtname in ('pgshift_ddl_guard',
        'pgshift_drop_guard', 'pgshift_partition_guard')`
    )[0]!.n,
  );

/** Runs `stmt` and returns the error PostgreSQL raised (code, message, hint), or null when it went through. */
async function tryDdl(sql: Sql, stmt: string): Promise<{ code: string; message: string; hint: string } | null> {
  try {
    await sql.unsafe(stmt);
    return null;
  } catch (err) {
    const e = err as { code?: string; message?: string; hint?: string };
    return { code: String(e.code), message: String(e.message), hint: String(e.hint) };
  }
}

function expectGuardRefusal(err: Awaited<ReturnType<typeof tryDdl>>, live: string, copy: string, column: string): void {
  expect(err).not.toBeNull();
  expect(err!.code).toBe("55006");
  expect(err!.message).toBe(
    `pgshift: ALTER TABLE refused while ${live} is being migrated: the columns of ${live} and ${copy} would ` +
      `differ (${column})`,
  );
  expect(err!.hint).toContain("SET pgshift.allow_ddl = on");
}

function expectDropRefusal(err: Awaited<ReturnType<typeof tryDdl>>, live: string, dropped: string): void {
  expect(err).not.toBeNull();
  expect(err!.code).toBe("55006");
  expect(err!.message).toBe(`pgshift: DROP refused while ${live} is being migrated: it would drop ${dropped}`);
  expect(err!.hint).toContain("pgshift abort");
}

/**
 * Runs `body` while a write load (and its twin) runs on a fresh workload table `name`; then stops the
 * load and checks that the application saw no error and that the table equals the twin.
 */
async function underLoad(name: string, body: (w: Workload, load: RunningLoad) => Promise<void>): Promise<void> {
  const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
  await createWorkload(db.admin, w, 3_000);
  const load = await startLoad(db.url, w, { connections: 3, pauseMs: 3 });
  try {
    await body(w, load);
  } finally {
    const stats = await load.stop();
    expect(stats.errors, "the application saw no error").toEqual([]);
  }
  expect(await compareWithTwin(db.admin, w.table, w.twin, "bigint")).toMatchObject({ onlyInTable: 0, onlyInTwin: 0 });
}

describe("without superuser", () => {
  it("start installs no guard, says so in plan, start and status, and the migration still works", async () => {
    const sql = roleSql!;
    await sql`create table ddl_weak (id bigserial primary key, created_at timestamptz not null, note text)`;
    await sql`insert into ddl_weak (created_at, note) select now() - i * interval '1 day', 'n' || i from
      generate_series(1, 200) i`;
    const plan = await pgshift(["plan", "ddl_weak", "--partition-by", "range:created_at:month"], roleUrl);
    expect(plan.code, describeRun(plan)).toBe(0);
    expect(plan.stdout).not.toContain("EVENT TRIGGER");
    expect(plan.stdout + plan.stderr).toContain(
      "the DDL guard is not installed (creating an event trigger needs superuser)",
    );
    const st = await pgshift(
      ["start", "--allow-key-extension", "ddl_weak", "--partition-by", "range:created_at:month"],
      roleUrl,
    );
    expect(st.code, describeRun(st)).toBe(0);
    expect(st.stderr).toContain("the DDL guard is not installed");
    expect(await guardCount()).toBe(0);
    expect((await statusOf("ddl_weak", roleUrl)).ddlGuard).toBe("missing");
    // Nothing refuses the change; status reports it, and cutover would refuse.
    await sql`alter table ddl_weak add column extra int`;
    expect((await statusOf("ddl_weak", roleUrl)).schemaDrift).toEqual([
      "column extra (integer) is in public.ddl_weak but not in public.ddl_weak_pgshift_shadow",
    ]);
    const ab = await pgshift(["abort", "ddl_weak"], roleUrl);
    expect(ab.code, describeRun(ab)).toBe(0);
  });
});

describe.each(["trigger", "logical"] as const)("%s mode, under a write load", (mode) => {
  it(
    "refuses every ALTER TABLE that changes the columns of either table, and DROP of either, before and after " +
      "cutover; lets the others through; the table equals the twin",
    async () => {
      const name = `ddl_${mode}`;
      await underLoad(name, async (w, load) => {
        const plan = await pgshift(["plan", name, "--partition-by", "range:created_at:month", "--mode", mode]);
        expect(plan.stdout, describeRun(plan)).toContain(
          "CREATE EVENT TRIGGER pgshift_ddl_guard ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')",
        );
        const st = await pgshift([
          "start",
          "--allow-key-extension",
          name,
          "--partition-by",
          "range:created_at:month",
          "--mode",
          mode,
        ]);
        expect(st.code, describeRun(st)).toBe(0);
        expect(await guardCount()).toBe(3);
        expect((await statusOf(name)).ddlGuard).toBe("on");
        await db.admin`alter event trigger pgshift_drop_guard disable`;
        expect((await statusOf(name)).ddlGuard).toBe("disabled");
        await db.admin`alter event trigger pgshift_drop_guard enable`;
        const bf = await pgshift(["backfill", name]);
        expect(bf.code, describeRun(bf)).toBe(0);

        const m = (await loadMigration(db.admin, w.table))!;
        const live = displayName(m.live);
        const shadow = displayName(m.copy);
        const before = { live: await columns(m.live), shadow: await columns(m.copy) };
        const ops = () => load.stats.inserts + load.stats.updates + load.stats.deletes;
        const opsBefore = ops();

        expectGuardRefusal(await tryDdl(db.admin, `alter table ${live} drop column note`), live, shadow, "note");
        expectGuardRefusal(
          await tryDdl(db.admin, `alter table ${live} rename column note to remark`),
          live,
          shadow,
          "note, remark",
        );
        expectGuardRefusal(
          await tryDdl(db.admin, `alter table ${live} add column extra int default 7`),
          live,
          shadow,
          "extra",
        );
        expectGuardRefusal(
          await tryDdl(db.admin, `alter table ${live} alter column status type varchar(40)`),
          live,
          shadow,
          "status",
        );
        expectGuardRefusal(await tryDdl(db.admin, `alter table ${shadow} drop column status`), live, shadow, "status");
        // Several subcommands in one ALTER: refused whole.
        expectGuardRefusal(
          await tryDdl(db.admin, `alter table ${live} set (fillfactor = 95), drop column region`),
          live,
          shadow,
          "region",
        );
        // Dropping either table: in trigger mode a dropped shadow would make every application write fail.
        expectDropRefusal(await tryDdl(db.admin, `drop table ${shadow}`), live, shadow);
        expectDropRefusal(await tryDdl(db.admin, `drop table ${live} cascade`), live, live);
        expectDropRefusal(await tryDdl(db.admin, `drop table if exists ${shadow}, twin.${name}`), live, shadow);
        expect({ live: await columns(m.live), shadow: await columns(m.copy) }).toEqual(before);
        // Changes that leave the columns as they are go through.
        expect(await tryDdl(db.admin, `alter table ${live} set (fillfactor = 95)`)).toBeNull();
        expect(await tryDdl(db.admin, `alter table ${live} alter column note set statistics 200`)).toBeNull();
        expect(await tryDdl(db.admin, `alter table ${shadow} alter column note set statistics 200`)).toBeNull();
        // A table that is not being migrated, altered by a role that may not read pgshift's tables.
        await roleSql!.unsafe(`create table ddl_other_${mode} (id int primary key)`);
        expect(await tryDdl(roleSql!, `alter table ddl_other_${mode} add column extra int`)).toBeNull();

        // Let through on purpose. In logical mode a change carrying another column stops the applier for good
        // (drift.test.ts), so there it is only tried and rolled back; in trigger mode status lists the
        // difference, and it can be undone the same way.
        if (mode === "logical") {
          const through = await db.admin
            .begin(async (tx) => {
              await tx`set local pgshift.allow_ddl = on`;
              await tx.unsafe(`alter table ${live} add column extra int`);
              throw new Error("rollback");
            })
            .catch((err: Error) => err.message);
          expect(through).toBe("rollback");
        } else
          await db.admin.begin(async (tx) => {
            await tx`set local pgshift.allow_ddl = on`;
            await tx.unsafe(`alter table ${live} add column extra int`);
          });
        if (mode === "trigger") {
          expect((await statusOf(name)).schemaDrift).toEqual([
            `column extra (integer) is in ${live} but not in ${shadow}`,
          ]);
          await db.admin.begin(async (tx) => {
            await tx`set local pgshift.allow_ddl = on`;
            await tx.unsafe(`alter table ${live} drop column extra`);
          });
        }
        expect((await statusOf(name)).schemaDrift).toEqual([]);

        const v = await pgshift(["verify", name]);
        expect(v.code, describeRun(v)).toBe(0);
        const cut = await pgshift(["cutover", name]);
        expect(cut.code, describeRun(cut)).toBe(0);
        // After cutover the application writes the partitioned table and the mirror fills the retired one.
        const retired = displayName((await loadMigration(db.admin, w.table))!.copy);
        expectGuardRefusal(await tryDdl(db.admin, `alter table ${live} drop column note`), live, retired, "note");
        expectGuardRefusal(
          await tryDdl(db.admin, `alter table ${retired} rename column status to state`),
          live,
          retired,
          "state, status",
        );
        expectDropRefusal(await tryDdl(db.admin, `drop table ${retired}`), live, retired);
        await new Promise((r) => setTimeout(r, 300));
        expect(ops(), "the application kept writing").toBeGreaterThan(opsBefore);
        const fin = await pgshift(["finalize", name, "--yes"]);
        expect(fin.code, describeRun(fin)).toBe(0);
      });
      // The migration is over: the table is the application's to change again.
      expect(await tryDdl(db.admin, `alter table ${name} add column after_finalize int`)).toBeNull();
      // Removing pgshift from the database removes the guard with it (the next start installs it again).
      await db.admin`drop schema pgshift cascade`;
      expect(await guardCount()).toBe(0);
    },
  );
});

/**
 * The partitions of `parent` (every level, schema-qualified), with whether each is detach-pending and how many rows it
 * holds itself.
 */
async function partitionsOf(parent: string): Promise<{ name: string; pending: boolean; rows: number }[]> {
  const parts = await db.admin`
    select format('%I.%I', n.nspname, c.relname) as name, coalesce(i.inhdetachpending, false) as pending
      from pg_partition_tree(to_regclass(${parent})) t join pg_class c on c.oid = t.relid join pg_namespace n on
        n.oid = c.relnamespace
      left join pg_inherits i on i.inhrelid = t.relid
     where t.level > 0 order by 1`;
  const out = [];
  for (const p of parts) {
    const n = await db.admin.unsafe(`select count(*)::int as n from only ${String(p.name)}`);
    out.push({ name: String(p.name), pending: Boolean(p.pending), rows: Number(n[0]!.n) });
  }
  return out;
}

function expectPartitionRefusal(err: Awaited<ReturnType<typeof tryDdl>>, message: string): void {
  expect(err).not.toBeNull();
  expect(err!.message).toBe(message);
  expect(err!.code).toBe("55006");
  expect(err!.hint).toContain("SET pgshift.allow_ddl = on");
}

describe.each(["trigger", "logical"] as const)("partitions, %s mode, under a write load", (mode) => {
  it(
    "refuses to detach or drop a partition, or attach one with rows, of the partitioned table before and after " +
      "cutover; empty ones come and go; the table equals the twin",
    async () => {
      const name = `ddl_parts_${mode}`;
      await underLoad(name, async (w) => {
        const st = await pgshift([
          "start",
          "--allow-key-extension",
          name,
          "--partition-by",
          "range:created_at:month",
          "--mode",
          mode,
        ]);
        expect(st.code, describeRun(st)).toBe(0);
        const bf = await pgshift(["backfill", name]);
        expect(bf.code, describeRun(bf)).toBe(0);
        const shadow = displayName((await loadMigration(db.admin, w.table))!.copy);
        const before = await partitionsOf(shadow);
        const full = before.find((p) => p.rows > 0)!;
        const dflt = before.find((p) => p.name.endsWith("_default"))!;
        expect(full, "a partition with rows").toBeDefined();
        expect(dflt, "the DEFAULT partition").toBeDefined();
        const names = () =>
          partitionsOf(shadow).then((ps) => ps.map((p) => `${p.name}${p.pending ? " (pending)" : ""}`));
        const namesBefore = await names();

        expectPartitionRefusal(
          await tryDdl(db.admin, `alter table ${shadow} detach partition ${full.name}`),
          `pgshift: ALTER TABLE refused while a table is being migrated: it would detach ${full.name} ` +
            `(from ${shadow}), and the rows in it with it`,
        );
        expectPartitionRefusal(
          await tryDdl(db.admin, `alter table ${shadow} detach partition ${dflt.name}`),
          `pgshift: ALTER TABLE refused while a table is being migrated: it would detach ${dflt.name} ` +
            `(from ${shadow}), and the rows in it with it`,
        );
        // Refused before it starts: refused at its end, the partition would stay detach-pending.
        expectPartitionRefusal(
          await tryDdl(db.admin, `alter table ${shadow} detach partition ${full.name} concurrently`),
          `pgshift: DETACH PARTITION CONCURRENTLY refused while public.${name} is being migrated: the statement ` +
            `names ${shadow}, whose partitions hold the rows of the migration`,
        );
        expectPartitionRefusal(
          await tryDdl(db.admin, `drop table ${full.name}`),
          `pgshift: DROP refused while a table is being migrated: it would drop ${full.name} (a partition ` +
            `of ${shadow}), and the rows in it with it`,
        );
        expect(await names()).toEqual(namesBefore);

        // A table with rows attached: rows the source never had. Refused; an empty one goes through, and
        // CREATE TABLE ... PARTITION OF, and (on purpose) a detach of that empty one.
        await db.admin.unsafe(
          `create table public.${name}_2101_01 (like ${shadow} including defaults including generated
          including constraints)`,
        );
        await db.admin.unsafe(
          `insert into public.${name}_2101_01 (id, created_at, region, status, amount) values (-1,
          '2101-01-15', 'eu', 'x', 1)`,
        );
        expectPartitionRefusal(
          await tryDdl(
            db.admin,
            `alter table ${shadow} attach partition public.${name}_2101_01 for values from ('2101-01-01') ` +
              `to ('2101-02-01')`,
          ),
          `pgshift: ALTER TABLE refused while a table is being migrated: it would attach ` +
            `public.${name}_2101_01, which ` +
            `holds rows the other table of the migration does not have, to ${shadow}`,
        );
        await db.admin.unsafe(`truncate public.${name}_2101_01`);
        expect(
          await tryDdl(
            db.admin,
            `alter table ${shadow} attach partition public.${name}_2101_01 for values from ('2101-01-01') ` +
              `to ('2101-02-01')`,
          ),
        ).toBeNull();
        expect(
          await tryDdl(
            db.admin,
            `create table public.${name}_2101_02 partition of ${shadow} for values from ('2101-02-01') ` +
              `to ('2101-03-01')`,
          ),
        ).toBeNull();
        // The shadow, its partitions and those added since start carry the TRUNCATE guard (a TRUNCATE of the
        // shadow would lose its rows at cutover).
        for (const t of [shadow, full.name, `public.${name}_2101_01`, `public.${name}_2101_02`]) {
          expect((await tryDdl(db.admin, `truncate ${t}`))?.code, t).toBe("55006");
        }
        // Detached under pgshift.allow_ddl, a partition leaves the migration, and its guard with it.
        await db.admin.begin(async (tx) => {
          await tx`set local pgshift.allow_ddl = on`;
          await tx.unsafe(`alter table ${shadow} detach partition public.${name}_2101_02`);
        });
        expect(await names()).toEqual([...namesBefore, `public.${name}_2101_01`].sort());
        expect(await tryDdl(db.admin, `truncate public.${name}_2101_02`)).toBeNull();

        const v = await pgshift(["verify", name]);
        expect(v.code, describeRun(v)).toBe(0);
        const cut = await pgshift(["cutover", name]);
        expect(cut.code, describeRun(cut)).toBe(0);
        // After cutover the partitioned table is the live one: the same rules, or swap-back would bring back
        // (or lose) the rows.
        const live = `public.${name}`;
        expectPartitionRefusal(
          await tryDdl(db.admin, `alter table ${live} detach partition ${full.name}`),
          `pgshift: ALTER TABLE refused while a table is being migrated: it would detach ${full.name} ` +
            `(from ${live}), ` +
            `and the rows in it with it`,
        );
        expectPartitionRefusal(
          await tryDdl(db.admin, `drop table public.${name}_2101_01`),
          `pgshift: DROP refused while a table is being migrated: it would drop public.${name}_2101_01 (a partition ` +
            `of ${live}), and the rows in it with it`,
        );
        // A partition created or attached after cutover gets the TRUNCATE guard the others have (TRUNCATE of a
        // partition fires only its own triggers; the retired table would keep the rows), and so does the
        // retired table.
        expect(
          await tryDdl(
            db.admin,
            `create table public.${name}_2101_03 partition of ${live} for values from ('2101-03-01') to ('2101-04-01')`,
          ),
        ).toBeNull();
        await db.admin.unsafe(
          `create table public.${name}_2101_04 (like ${live} including defaults including generated
          including constraints)`,
        );
        expect(
          await tryDdl(
            db.admin,
            `alter table ${live} attach partition public.${name}_2101_04 for values from ('2101-04-01') ` +
              `to ('2101-05-01')`,
          ),
        ).toBeNull();
        for (const p of ["2101_01", "2101_03", "2101_04", "pgshift_retired"]) {
          const t = await tryDdl(db.admin, `truncate public.${name}_${p}`);
          expect(t?.message, p).toBe(
            `pgshift: TRUNCATE of public.${name}_${p} is refused while the table is being migrated`,
          );
        }
        const sb = await pgshift(["swap-back", name]);
        expect(sb.code, describeRun(sb)).toBe(0);
        const again = await pgshift(["cutover", name]);
        expect(again.code, describeRun(again)).toBe(0);
        const fin = await pgshift(["finalize", name, "--yes"]);
        expect(fin.code, describeRun(fin)).toBe(0);
      });
      // Finalized: the partitions are the application's again.
      expect(await tryDdl(db.admin, `alter table public.${name} detach partition public.${name}_2101_01`)).toBeNull();
      expect(await tryDdl(db.admin, `truncate public.${name}_2101_03`)).toBeNull();
      expect(
        await db.admin`select tgrelid::regclass::text as t from pg_trigger where tgname like 'pgshift%'
        and not tgisinternal`,
      ).toEqual([]);
    },
  );
});

// The guard runs for every CREATE TABLE and ALTER TABLE in the database. It gives the TRUNCATE guard only to
// partitions the command itself created or attached: touching any other table would make unrelated DDL wait
// for that table's locks (found when an upgrade's CREATE TABLE IF NOT EXISTS hung behind an application's
// open transaction on a shadow partition that lacked the guard).
describe("unrelated DDL", () => {
  it(
    "never waits for the locks of a migration's tables, even on a partition that lacks the TRUNCATE " + "guard",
    async () => {
      await db.admin.unsafe(`
      create table ddl_quiet (id bigserial primary key, created_at timestamptz not null, note text);
      insert into ddl_quiet (created_at, note) select timestamptz '2025-01-01 00:00+00' + i * interval '9 hours', 'n'
        from generate_series(1, 300) i;`);
      const st = await pgshift([
        "start",
        "--allow-key-extension",
        "ddl_quiet",
        "--partition-by",
        "range:created_at:month",
      ]);
      expect(st.code, describeRun(st)).toBe(0);
      await db.admin.unsafe(`drop trigger pgshift_truncate_guard on ddl_quiet_p2025_01`);
      const writer = await db.admin.reserve();
      const other = await connect({ url: db.url, max: 1 });
      try {
        await writer.unsafe("begin");
        await writer.unsafe("insert into ddl_quiet_p2025_01 (id, created_at) values (-1, '2025-01-02')");
        await other`set statement_timeout = '5s'`;
        await other.unsafe("create table ddl_quiet_other (id int primary key)");
        await other.unsafe("alter table ddl_quiet_other add column v text");
        await other.unsafe("create table if not exists ddl_quiet_other (id int primary key)");
      } finally {
        await writer.unsafe("rollback").catch(() => {});
        writer.release();
        await other.end({ timeout: 5 });
      }
      // A partition created in the shadow does get it (the command holds its lock). Not while the writer
      // runs: CREATE TABLE ... PARTITION OF locks the partitioned table, which a write to a partition locks too.
      await db.admin.unsafe(
        `create table ddl_quiet_p2101_01 partition of ddl_quiet_pgshift_shadow for values from ('2101-01-01')
        to ('2101-02-01')`,
      );
      const guarded = await db.admin`
      select c.relname::text as t from pg_trigger g join pg_class c on c.oid = g.tgrelid
       where g.tgname = 'pgshift_truncate_guard' and c.relname::text in ('ddl_quiet_p2025_01', 'ddl_quiet_p2101_01',
         'ddl_quiet_other')`;
      expect(guarded.map((r) => String(r.t))).toEqual(["ddl_quiet_p2101_01"]);
      expect((await pgshift(["abort", "ddl_quiet"])).code).toBe(0);
    },
  );
});
