import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover } from "../../src/cutover/cutover.js";
import { connect, type Sql } from "../../src/db.js";
import { type EmbeddedServer, startEmbedded } from "../../src/embedded.js";
import { PgshiftError } from "../../src/errors.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { catalogSnapshot } from "../support/catalog.js";
import { type CliResult, describeRun, expectRefusal, runCli } from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Item 4 of issue 13: what the application will notice is said before anything changes. `plan` names each
 * unique key that loses global uniqueness when the partition column is added to it and each ON CONFLICT
 * target that stops working, says what changes at finalize, and (with pg_stat_statements) lists the
 * application's statements that would fail; `start` refuses such a spec unless --allow-key-extension.
 * Every target plan names is run against the real table before (it works) and after cutover (it does not).
 */

interface PlanJson {
  widenedKeys: {
    kind: string;
    name: string;
    columns: string[];
    widenedTo: string[];
    deferrable: boolean;
    onConflictTargets: string[];
  }[];
  atFinalize: string | null;
  applicationStatements: {
    status: string;
    detail: string;
    statements: { query: string; calls: number; target: string; effect: string; reason: string }[];
    examined: number;
  };
  blockers: string[];
}

const MONTH = ["--partition-by", "range:created_at:month"];

/** The table of the tests: a primary key, a unique constraint, an expression unique index (partial), a
 * deferrable unique constraint (never an arbiter), and a unique index that already has the partition column. */
async function createOrders(sql: Sql, name = "orders"): Promise<void> {
  await sql.unsafe(`
    create table ${name} (
      id bigint primary key,
      created_at timestamptz not null,
      email text,
      sku text,
      ref text,
      code text,
      note text,
      constraint ${name}_email_key unique (email),
      constraint ${name}_code_key unique (code) deferrable initially deferred
    );
    create unique index ${name}_sku_idx on ${name} (sku, created_at);
    create unique index ${name}_ref_idx on ${name} (lower(ref)) where ref is not null;
    insert into ${name} (id, created_at, email, sku, ref, code)
      select i, timestamptz '2025-01-01' + i * interval '1 day', 'e' || i, 's' || i, 'r' || i, 'c' || i from
        generate_series(1, 200) i;
    analyze ${name};`);
}

function parsePlan(r: CliResult): PlanJson {
  expect(r.code, describeRun(r)).toBe(0);
  return JSON.parse(r.stdout) as PlanJson;
}

/**
 * Runs `insert ... <target> DO UPDATE` for a row that repeats row 1's id, email, lower(ref) (and code) with
 * another created_at (and sku), in a transaction that is rolled back. On the original table the upsert
 * finds the existing row and updates it. Returns what happened: "updated" (one row with that id, its
 * note set), or what else: the error's SQLSTATE, or "inserted" (a second row with that id).
 */
async function upsertOutcome(sql: Sql, table: string, target: string): Promise<string> {
  let outcome = "";
  await sql
    .begin(async (tx) => {
      try {
        await tx.unsafe(`
          insert into ${table} (id, created_at, email, sku, ref, code, note)
          values (1, timestamptz '2025-06-15', 'e1', 'other-sku', 'r1', 'c1-other', 'upserted')
          ${target} do update set note = excluded.note`);
        const rows = await tx.unsafe(`select note from ${table} where id = 1`);
        outcome =
          rows.length === 1 && rows[0]!.note === "upserted"
            ? "updated"
            : rows.length > 1
              ? "inserted"
              : `unexpected: ${JSON.stringify(rows)}`;
      } catch (err) {
        outcome = `error ${(err as { code?: string }).code ?? String(err)}`;
      }
      throw new Error("rollback");
    })
    .catch((err: unknown) => {
      if (!(err instanceof Error && err.message === "rollback")) throw err;
    });
  return outcome;
}

describe("plan and start on a table whose unique keys lack the partition column", () => {
  let db: TestDatabase;
  const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);
  beforeAll(async () => {
    db = await freshDatabase();
    await createOrders(db.admin);
    await db.admin.unsafe(`create table plain (id bigint primary key, created_at timestamptz not null);
                           insert into plain select i, now() from generate_series(1, 50) i;`);
  });
  afterAll(async () => {
    await db?.close();
  });

  it(
    "plan names the widened keys, their ON CONFLICT targets and what changes at finalize; the targets work " + "today",
    async () => {
      const plan = parsePlan(await pgshift(["plan", "orders", ...MONTH, "--json"]));
      const byName = Object.fromEntries(plan.widenedKeys.map((k) => [k.name, k]));
      expect(Object.keys(byName).sort()).toEqual([
        "orders_code_key",
        "orders_email_key",
        "orders_pkey",
        "orders_ref_idx",
      ]);
      expect(byName.orders_pkey).toMatchObject({
        kind: "primary key",
        columns: ["id"],
        widenedTo: ["id", "created_at"],
        onConflictTargets: ["ON CONFLICT (id)", "ON CONFLICT ON CONSTRAINT orders_pkey"],
      });
      expect(byName.orders_email_key).toMatchObject({
        kind: "unique constraint",
        columns: ["email"],
        onConflictTargets: ["ON CONFLICT (email)", "ON CONFLICT ON CONSTRAINT orders_email_key"],
      });
      expect(byName.orders_ref_idx).toMatchObject({
        kind: "unique index",
        columns: ["lower(ref)"],
        onConflictTargets: ["ON CONFLICT (lower(ref)) WHERE ref IS NOT NULL"],
      });
      // A deferrable constraint is no ON CONFLICT arbiter, before or after; it still loses its uniqueness.
      expect(byName.orders_code_key).toMatchObject({
        kind: "unique constraint",
        deferrable: true,
        onConflictTargets: [],
      });
      expect(plan.atFinalize).toMatch(
        /^until finalize, pgshift keeps \(id\), \(code\), \(email\), \(lower\(ref\)\) unique through the retired table/,
      );
      expect(plan.atFinalize).toContain("from then on the database enforces only (id, created_at)");
      expect(plan.applicationStatements.status).toBe("not-installed");

      const text = await pgshift(["plan", "orders", ...MONTH]);
      expect(text.code, describeRun(text)).toBe(0);
      expect(text.stdout).toContain("unique keys that lose global uniqueness (created_at is added to them");
      expect(text.stdout).toContain("    primary key orders_pkey: (id) -> (id, created_at)");
      expect(text.stdout).toContain("    ON CONFLICT ON CONSTRAINT orders_email_key\n");
      expect(text.stdout).toContain("  at finalize: until finalize, pgshift keeps (id)");
      expect(text.stdout).toContain("pg_stat_statements is not installed in this database");
      expect(text.stdout).toContain("start refuses this spec unless --allow-key-extension is given");
      // The unique index that already contains created_at is not among them (the SQL below names it, of course).
      expect(text.stdout.split("\n-- ")[0]).not.toContain("orders_sku_idx");

      // Every target plan names works against the original table today (it updates the existing row).
      for (const target of plan.widenedKeys.flatMap((k) => k.onConflictTargets)) {
        expect(await upsertOutcome(db.admin, "orders", target), target).toBe("updated");
      }
    },
  );

  it(
    "start without --allow-key-extension exits 2 with one line and changes nothing; so does --dry-run and the " +
      "library",
    async () => {
      const before = await catalogSnapshot(db.admin);
      const r = await pgshift(["start", "orders", ...MONTH]);
      expectRefusal(
        r,
        "adds created_at to 4 unique keys",
        "primary key orders_pkey (id)",
        "ON CONFLICT (id)",
        "stop working at cutover",
      );
      expect(r.stderr).toContain(
        "pgshift: hint: read what the application will notice with pgshift plan, then start again with " +
          "--allow-key-extension",
      );
      const dry = await pgshift(["start", "orders", ...MONTH, "--dry-run"]);
      expect(dry.code, describeRun(dry)).toBe(2);
      expect(dry.stderr).toContain("adds created_at to 4 unique keys");
      await expect(
        startMigration(
          db.sql,
          { schema: "public", name: "orders" },
          { spec: parsePartitionSpec("range:created_at:month") },
        ),
      ).rejects.toThrow(PgshiftError);
      expect(await catalogSnapshot(db.admin)).toEqual(before);
    },
  );

  it("a spec whose column is in every unique key needs no option", async () => {
    const plan = parsePlan(await pgshift(["plan", "plain", "--partition-by", "hash:id:4", "--json"]));
    expect(plan.widenedKeys).toEqual([]);
    expect(plan.atFinalize).toBeNull();
    const st = await pgshift(["start", "plain", "--partition-by", "hash:id:4"]);
    expect(st.code, describeRun(st)).toBe(0);
    expect(st.stdout).not.toContain("at finalize:");
    expect((await pgshift(["abort", "plain"])).code).toBe(0);
  });

  it(
    "with --allow-key-extension it starts; after cutover every target plan named stops working, and the one it did " +
      "not name still works",
    async () => {
      const plan = parsePlan(await pgshift(["plan", "orders", ...MONTH, "--json"]));
      const st = await pgshift(["start", "orders", ...MONTH, "--allow-key-extension"]);
      expect(st.code, describeRun(st)).toBe(0);
      expect(st.stdout).toContain(
        "warning: primary key orders_pkey (id) becomes (id, created_at) on the partitioned table: until finalize " +
          "pgshift keeps (id) unique",
      );
      expect(st.stdout).toContain("at finalize: until finalize, pgshift keeps (id)");
      const table = { schema: "public", name: "orders" };
      const bf = await backfill(db.sql, table);
      expect(bf.complete).toBe(true);
      expect((await verify(db.sql, table)).equal).toBe(true);
      await cutover(db.sql, table);
      expect(
        (await db.admin`select relkind::text as k from pg_class where oid = 'public.orders'::regclass`)[0]!.k,
      ).toBe("p");
      for (const target of plan.widenedKeys.flatMap((k) => k.onConflictTargets)) {
        // Either PostgreSQL finds no arbiter (42P10) or no such constraint (42704), or the row is refused
        // (23505: the original key kept through the retired table), or it no longer updates the existing row.
        expect(await upsertOutcome(db.admin, "orders", target), target).not.toBe("updated");
      }
      // ON CONFLICT (id) in particular fails outright: no unique index on exactly (id) is left.
      expect(await upsertOutcome(db.admin, "orders", "ON CONFLICT (id)")).toBe("error 42P10");
      // A target that contains the partition column keeps working.
      await db.admin`insert into orders (id, created_at, sku, note) values (100000, timestamptz
      '2025-03-01', 'keep', 'a')`;
      await db.admin`insert into orders (id, created_at, sku, note) values (100000, timestamptz
        '2025-03-01', 'keep', 'b')
      on conflict (sku, created_at) do update set note = excluded.note`;
      expect((await db.admin`select note from orders where sku = 'keep'`).map((r) => r.note)).toEqual(["b"]);
    },
  );
});

describe("plan with pg_stat_statements", () => {
  let server: EmbeddedServer;
  let sql: Sql;
  let app: postgres.Sql;
  let noPreload: TestDatabase;
  beforeAll(async () => {
    server = await startEmbedded({ sharedPreloadLibraries: ["pg_stat_statements"] });
    sql = await connect({ url: server.url });
    await sql`create extension pg_stat_statements`;
    await createOrders(sql);
    await createOrders(sql, "other");
    // The application: its own connection, its own statements.
    app = postgres(server.url, { max: 1, onnotice: () => {}, connection: { application_name: "the-app" } });
    noPreload = await freshDatabase();
    await createOrders(noPreload.admin);
    await noPreload.admin`create extension pg_stat_statements`;
  });
  afterAll(async () => {
    await app?.end({ timeout: 5 });
    await sql?.end({ timeout: 5 });
    await server?.stop();
    await noPreload?.close();
  });

  it("lists the application's upserts that would fail after cutover, and none of the others", async () => {
    for (let i = 0; i < 3; i++) {
      // (a) an upsert on ON CONFLICT (id): fails after cutover. Its text stays on one line (the test below matches
      // it with /values .* on conflict/), the line breaks inside ${}.
      await app`insert into orders (id, created_at, note) values (${
        1 + i
      }, now(), ${"a"}) on conflict (id) do update set note = excluded.note`;
      // (b) a target with the partition column: keeps working.
      await app`insert into orders (id, created_at, sku) values (${5000 + i}, timestamptz '2025-02-01', ${"s2"})
        on conflict (sku, created_at) do nothing`;
      // (c) ON CONFLICT ON CONSTRAINT of a widened unique constraint.
      await app`insert into public.orders (id, created_at, email) values (${6000 + i}, now(), ${"e3"})
        on conflict on constraint orders_email_key do nothing`;
      // (d) the same upsert as (a) on another table.
      await app`insert into other (id, created_at, note) values (${1 + i}, now(), ${"d"})
        on conflict (id) do update set note = excluded.note`;
      // (e) an upsert hidden in a CTE.
      await app`with v as (select ${7000 + i}::bigint as id)
        insert into orders (id, created_at) select id, now() from v on conflict (id) do nothing`;
    }
    // (f) a statement that only ever failed (no arbiter on the original table either): never counted.
    await app`insert into orders (id, created_at) values (1, now()) on conflict (id, note) do nothing`.catch(() => {});

    const r = await runCli(["plan", "orders", ...MONTH, "--json", "--url", server.url]);
    const plan = parsePlan(r);
    const found = plan.applicationStatements;
    expect(found.status).toBe("checked");
    const listed = found.statements.map((s) => `${s.effect} ${s.target} ${s.query}`);
    const failsA =
      /^fails ON CONFLICT \(id\) insert into orders \(id, created_at, note\) values .* on conflict \(id\) do update/;
    expect(
      listed.some((s) => failsA.test(s)),
      listed.join("\n"),
    ).toBe(true);
    expect(
      listed.some((s) => s.startsWith("fails ON CONFLICT ON CONSTRAINT orders_email_key insert into public.orders")),
      listed.join("\n"),
    ).toBe(true);
    expect(
      listed.some((s) => /^fails ON CONFLICT \(id\) with v as/.test(s)),
      listed.join("\n"),
    ).toBe(true);
    expect(found.statements).toHaveLength(3);
    expect(listed.join("\n")).not.toContain("insert into other");
    expect(listed.join("\n")).not.toContain("sku");
    expect(listed.join("\n")).not.toContain("(id, note)");
    const upsertA = found.statements.find((s) => s.query.includes("do update set note"))!;
    expect(upsertA.calls).toBe(3);
    expect(upsertA.reason).toContain("42P10");

    const text = await runCli(["plan", "orders", ...MONTH, "--url", server.url]);
    expect(text.code, describeRun(text)).toBe(0);
    expect(text.stdout).toContain("would fail after cutover");
    expect(text.stdout).toMatch(/FAILS \(3 calls, ON CONFLICT \(id\)\): fails at every call from cutover on/);

    const refused = await runCli(["start", "orders", ...MONTH, "--url", server.url]);
    expectRefusal(refused, "(3 of the application's statements in pg_stat_statements would fail)");
  });

  it(
    "installed but not loaded through shared_preload_libraries: plan says it could not read it, and " + "exits 0",
    async () => {
      const plan = parsePlan(await runCli(["plan", "orders", ...MONTH, "--json", "--url", noPreload.url]));
      expect(plan.applicationStatements.status).toBe("unavailable");
      expect(plan.applicationStatements.detail).toContain("pg_stat_statements is installed but could not be read");
      expect(plan.blockers).toEqual([]);
    },
  );
});
