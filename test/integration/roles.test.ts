import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { catalogSnapshot } from "../support/catalog.js";
import { describeRun, expectRefusal, runCli } from "../support/cli.js";
import { createLoginRole, freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Two roles, neither a superuser, each owning a table in one database. pgshift keeps one `pgshift` schema
 * per database, owned by the role that first ran it; another role must be a member of that role to run
 * pgshift there. Before, the second role got a bare "permission denied" (plan) or failed part-way; now
 * every command refuses with one line naming the owner and the GRANT that lets it through, nothing changed,
 * and after that GRANT the second role's migration runs to the end.
 */

let db: TestDatabase;
let first: Awaited<ReturnType<typeof createLoginRole>> | null = null;
let second: Awaited<ReturnType<typeof createLoginRole>> | null = null;
const pgshift = (args: string[], url: string) => runCli([...args, "--url", url]);

beforeAll(async () => {
  db = await freshDatabase();
  first = await createLoginRole(db, "pgshift_first");
  second = await createLoginRole(db, "pgshift_second");
  for (const [role, table] of [
    [first, "first_orders"],
    [second, "second_orders"],
  ] as const) {
    await db.admin.unsafe(`
      create table ${table} (id bigserial primary key, created_at timestamptz not null, note text);
      insert into ${table} (created_at, note)
        select timestamptz '2025-01-01 00:00+00' + i * interval '7 hours', 'n' || i from generate_series(1, 300) i;
      alter table ${table} owner to ${role.name};
      analyze ${table};`);
  }
});

afterAll(async () => {
  await db?.close();
  await first?.drop();
  await second?.drop();
});

describe("two roles in one database", () => {
  it(
    "the role that does not own pgshift's state is refused with one line naming the owner, nothing changed; after " +
      "GRANT it migrates its table",
    async () => {
      const st = await pgshift(
        ["start", "--allow-key-extension", "first_orders", "--partition-by", "range:created_at:month"],
        first!.url,
      );
      expect(st.code, describeRun(st)).toBe(0);
      const owner = (
        await db.admin`select pg_get_userbyid(relowner) as o from pg_class where oid = 'pgshift.migrations'::regclass`
      )[0]!.o;
      expect(owner).toBe(first!.name);

      const line =
        `pgshift's state in this database (schema pgshift) belongs to role ${first!.name}, ` +
        `and ${second!.name} is not a member of it`;
      const remedy = `GRANT ${first!.name} TO ${second!.name}`;
      const before = await catalogSnapshot(db.admin);
      const plan = await pgshift(["plan", "second_orders", "--partition-by", "range:created_at:month"], second!.url);
      expect(plan.code, describeRun(plan)).toBe(2);
      expect(plan.stdout, describeRun(plan)).toContain(`blocker: ${line}`);
      expect(plan.stdout).toContain(remedy);
      expectRefusal(
        await pgshift(
          ["start", "--allow-key-extension", "second_orders", "--partition-by", "range:created_at:month"],
          second!.url,
        ),
        line,
        remedy,
      );
      // The other role's migration: not readable (its tables are private), let alone changeable.
      for (const args of [
        ["status", "first_orders"],
        ["backfill", "first_orders"],
        ["abort", "first_orders"],
      ]) {
        expectRefusal(await pgshift(args, second!.url), line, remedy);
      }
      expect(await catalogSnapshot(db.admin)).toEqual(before);

      // The state readable is not enough to write it: commands that write still refuse, before any change.
      await db.admin.unsafe(`grant select on pgshift.migrations, pgshift.schema_version to ${second!.name}`);
      const before2 = await catalogSnapshot(db.admin);
      expectRefusal(await pgshift(["backfill", "first_orders"], second!.url), line, remedy);
      expectRefusal(
        await pgshift(
          ["start", "--allow-key-extension", "second_orders", "--partition-by", "range:created_at:month"],
          second!.url,
        ),
        line,
        remedy,
      );
      expect(await catalogSnapshot(db.admin)).toEqual(before2);

      await db.admin.unsafe(`grant ${first!.name} to ${second!.name}`);
      for (const args of [
        ["start", "--allow-key-extension", "second_orders", "--partition-by", "range:created_at:month"],
        ["backfill", "second_orders"],
        ["verify", "second_orders"],
        ["cutover", "second_orders"],
        ["finalize", "second_orders", "--yes"],
      ]) {
        const r = await pgshift(args, second!.url);
        expect(r.code, describeRun(r)).toBe(0);
      }
      const parts =
        await db.admin`select count(*)::int as n from pg_inherits where inhparent = 'public.second_orders'::regclass`;
      expect(parts[0]!.n).toBeGreaterThan(1);
      const rows = await db.admin`select count(*)::int as n from second_orders`;
      expect(rows[0]!.n).toBe(300);
      // The first role's migration is its own to finish.
      const ab = await pgshift(["abort", "first_orders"], first!.url);
      expect(ab.code, describeRun(ab)).toBe(0);
    },
  );
});
