import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { catalogSnapshot } from "../support/catalog.js";
import { type CliResult, describeRun, runCli } from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * The "bad input" guarantees, through the real CLI (`node --import tsx src/cli/main.ts`, one child
 * process per command, connection only through --url): every refused command exits 2, prints exactly
 * one `pgshift: error:` line that names the problem (a `pgshift: hint:` line may follow) and changes
 * nothing in the database (a catalog snapshot before and after compares equal).
 */

let db: TestDatabase;
let weakUrl: string;

/** Runs pgshift against the test database (or `url`). */
const pgshift = (args: string[], url = db.url) => runCli([...args, "--url", url]);

/** stderr without empty lines. */
const stderrLines = (r: CliResult) => r.stderr.split("\n").filter((l) => l.trim() !== "");

/**
 * Asserts a refusal's output: stderr is exactly one `pgshift: error:` line, optionally followed by one
 * `pgshift: hint:` line, and the error line matches every pattern. Returns the error line.
 */
function expectRefusal(r: CliResult, ...patterns: (string | RegExp)[]): string {
  expect(r.signal, describeRun(r)).toBeNull();
  const lines = stderrLines(r);
  expect(
    lines.filter((l) => l.startsWith("pgshift: error:")),
    describeRun(r),
  ).toHaveLength(1);
  expect(lines[0], describeRun(r)).toMatch(/^pgshift: error: /);
  expect(lines.length, describeRun(r)).toBeLessThanOrEqual(2);
  if (lines.length === 2) expect(lines[1], describeRun(r)).toMatch(/^pgshift: hint: \S/);
  const error = lines[0]!;
  for (const p of patterns) {
    if (typeof p === "string") expect(error, describeRun(r)).toContain(p);
    else expect(error, describeRun(r)).toMatch(p);
  }
  return error;
}

/** `plan` with blockers: the plan on stdout with one `blocker:` line per reason, nothing on stderr. */
function expectPlanBlocker(r: CliResult, ...patterns: (string | RegExp)[]): void {
  expect(r.signal, describeRun(r)).toBeNull();
  const blockers = r.stdout.split("\n").filter((l) => l.startsWith("  blocker: "));
  expect(blockers.length, describeRun(r)).toBeGreaterThan(0);
  const text = blockers.join("\n");
  for (const p of patterns) {
    if (typeof p === "string") expect(text, describeRun(r)).toContain(p);
    else expect(text, describeRun(r)).toMatch(p);
  }
  expect(r.stdout, describeRun(r)).not.toContain("statements start runs");
}

type ExpectExit = (r: CliResult, code: number) => void;

/** Declares a test whose body asserts the exit code of each CLI call with `expectExit(result, code)`. */
function cliIt(name: string, body: (expectExit: ExpectExit) => Promise<void>): void {
  it(name, () => body((r, code) => expect(r.code, describeRun(r)).toBe(code)));
}

/**
 * A refusal test: takes a catalog snapshot, runs `run` (one or more CLI calls), asserts with `check`
 * and that every call exits 2, then that the snapshot is unchanged.
 */
function refusal(name: string, run: () => Promise<CliResult[]>, check: (rs: CliResult[]) => void): void {
  cliIt(name, async (expectExit) => {
    const before = await catalogSnapshot(db.admin);
    const rs = await run();
    for (const r of rs) expectExit(r, 2);
    check(rs);
    expect(await catalogSnapshot(db.admin)).toEqual(before);
  });
}

/** Several CLI calls in parallel (only where they cannot take the same migration's advisory lock). */
const all = (...calls: Promise<CliResult>[]) => Promise.all(calls);

/** Several CLI calls one after the other. */
async function sequential(...calls: (() => Promise<CliResult>)[]): Promise<CliResult[]> {
  const out: CliResult[] = [];
  for (const c of calls) out.push(await c());
  return out;
}

beforeAll(async () => {
  db = await freshDatabase();
  // The table the migration flow runs on: small, a serial key, a NOT NULL time column, nullable columns.
  await db.admin.unsafe(`
    create table orders (
      id bigserial primary key,
      created_at timestamptz not null,
      note text,
      qty integer not null default 1,
      shipped_at timestamptz
    );
    insert into orders (created_at, note, qty)
      select timestamptz '2025-01-01 00:00+00' + i * interval '7 hours', 'order ' || i, i % 7
        from generate_series(1, 300) i;

    create table nopk (id int not null, created_at timestamptz not null);
    insert into nopk select i, now() from generate_series(1, 10) i;

    create table parted (id int not null, created_at timestamptz not null, primary key (id, created_at)) partition by
      range (created_at);
    create table parted_2025 partition of parted for values from ('2025-01-01') to ('2026-01-01');
    insert into parted values (1, '2025-03-01');
  `);
  // One table per dependent object that must block, each with a key and a NOT NULL time column.
  for (const t of [
    "dep_view",
    "dep_rule",
    "dep_policy",
    "dep_fk",
    "dep_trigger",
    "dep_colgrant",
    "dep_inherit",
    "dep_rowtype",
  ]) {
    await db.admin.unsafe(`
      create table ${t} (id int primary key, created_at timestamptz not null default '2025-06-01');
      insert into ${t} (id) select generate_series(1, 20);`);
  }
  await db.admin.unsafe(`
    create materialized view dep_view_summary as select count(*) as n from dep_view;
    create materialized view dep_view_summary2 as select n from dep_view_summary;
    create rule dep_rule_ignore as on delete to dep_rule do instead nothing;
    -- pgshift carries the table's own policies and triggers; not another table's policy reading it, nor a row
    -- trigger with transition tables, which PostgreSQL refuses on a partitioned table.
    create table dep_policy_other (id int);
    alter table dep_policy_other enable row level security;
    create policy dep_policy_tenant on dep_policy_other using (id in (select id from dep_policy));
    create table dep_fk_child (id int primary key, parent_id int references dep_fk (id));
    create function dep_trigger_touch() returns trigger language plpgsql as $$ begin return new; end $$;
    create trigger dep_trigger_audit after insert on dep_trigger referencing new table as added for each row
      execute function dep_trigger_touch();
    grant select (id) on dep_colgrant to public;
    create table dep_inherit_child (note text) inherits (dep_inherit);
    create table dep_rowtype_snap (id int primary key, snap dep_rowtype);
  `);

  // A role that may log in, read, write and create in public, but does not own the tables.
  const u = new URL(db.url);
  await db.admin.unsafe(`
    do $$ begin create role pgshift_weak login password 'weak'; exception when duplicate_object then null; end $$;
    alter role pgshift_weak login password 'weak';
    grant all on table orders to pgshift_weak;
    grant usage on sequence orders_id_seq to pgshift_weak;
    grant create on schema public to pgshift_weak;
  `);
  u.username = "pgshift_weak";
  u.password = "weak";
  weakUrl = u.toString();
});

afterAll(async () => {
  await db?.close();
  // The role is cluster-wide; its only grants were in the database close() dropped.
  const root = postgres(inject("pgUrl"), { max: 1, onnotice: () => {} });
  await root.unsafe(`drop role if exists pgshift_weak`).catch(() => {});
  await root.end();
});

describe("refused before anything exists (no pgshift schema yet)", () => {
  refusal(
    "a table that does not exist: start and plan",
    () =>
      all(
        pgshift(["start", "--allow-key-extension", "no_such_table", "--partition-by", "range:created_at:month"]),
        pgshift(["plan", "sales.no_such_table", "--partition-by", "range:created_at:month"]),
      ),
    ([start, plan]) => {
      expectRefusal(start!, "table public.no_such_table does not exist");
      expectRefusal(plan!, "table sales.no_such_table does not exist");
    },
  );

  refusal(
    "a malformed --partition-by: nonsense, an unknown interval, a hash modulus of 1",
    () =>
      all(
        pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "nonsense"]),
        pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:fortnight"]),
        pgshift(["plan", "orders", "--partition-by", "hash:id:1"]),
      ),
    ([nonsense, fortnight, hash1]) => {
      expectRefusal(nonsense!, 'invalid --partition-by "nonsense"', "missing the column");
      expectRefusal(fortnight!, 'invalid --partition-by "range:created_at:fortnight"', '"fortnight"');
      expectRefusal(hash1!, 'invalid --partition-by "hash:id:1"', "modulus must be between 2 and 1024");
    },
  );

  refusal(
    "an unknown column, a text column for a time range, a timestamptz column for an integer range",
    // One start at a time: a start takes the migration's advisory lock, a second one would be refused
    // as "another pgshift process is working on public.orders".
    () =>
      sequential(
        () => pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:placed_on:month"]),
        () => pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:note:month"]),
        () => pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:1000"]),
        () => pgshift(["plan", "orders", "--partition-by", "range:note:month"]),
      ),
    ([unknown, text, width, plan]) => {
      expectRefusal(unknown!, "cannot be migrated", 'column "placed_on" does not exist in public.orders');
      expectRefusal(text!, "cannot be migrated", "column note is text", "needs date, timestamp or timestamptz");
      expectRefusal(
        width!,
        "cannot be migrated",
        "column created_at is timestamp with time zone",
        "needs smallint, integer or bigint",
      );
      expectPlanBlocker(plan!, "column note is text");
    },
  );

  refusal(
    "a server that cannot be reached",
    () =>
      all(
        pgshift(
          ["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:month"],
          "postgres://postgres:x@127.0.0.1:1/postgres",
        ),
      ),
    ([r]) => {
      expectRefusal(r!, "cannot reach the PostgreSQL server", "ECONNREFUSED");
    },
  );

  refusal(
    "a wrong password",
    () => {
      const u = new URL(db.url);
      u.password = "certainly-not-the-password";
      return all(
        pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:month"], u.toString()),
      );
    },
    ([r]) => {
      expectRefusal(r!, "authentication failed", "password authentication failed");
    },
  );

  refusal(
    "a role that does not own the table: plan reports the blocker, start refuses",
    () =>
      all(
        pgshift(["plan", "orders", "--partition-by", "range:created_at:month"], weakUrl),
        pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:month"], weakUrl),
      ),
    ([plan, start]) => {
      expectPlanBlocker(plan!, "the current user is not the owner of public.orders (owner: ");
      expectRefusal(start!, "public.orders cannot be migrated", "the current user is not the owner of public.orders");
    },
  );

  refusal(
    "a table without a primary key",
    () => all(pgshift(["start", "--allow-key-extension", "nopk", "--partition-by", "range:created_at:month"])),
    ([r]) => {
      expectRefusal(r!, "public.nopk cannot be migrated", "has no primary key");
    },
  );

  refusal(
    "a table that is already partitioned, or a partition: one blocker line (its partitions or parent are " +
      "not listed again)",
    () =>
      all(
        pgshift(["start", "--allow-key-extension", "parted", "--partition-by", "range:created_at:month"]),
        pgshift(["plan", "parted", "--partition-by", "range:created_at:month"]),
        pgshift(["plan", "parted_2025", "--partition-by", "range:created_at:month"]),
      ),
    ([r, plan, part]) => {
      expectRefusal(r!, "public.parted cannot be migrated", "public.parted is already partitioned");
      expectPlanBlocker(plan!, "public.parted is already partitioned");
      expect(plan!.stdout.match(/^ {2}blocker: /gm), describeRun(plan!)).toHaveLength(1);
      expectPlanBlocker(part!, "public.parted_2025 is itself a partition of another table");
      expect(part!.stdout.match(/^ {2}blocker: /gm), describeRun(part!)).toHaveLength(1);
    },
  );

  const dependents: { name: string; table: string; mentions: string[] }[] = [
    {
      name: "a materialized view on the table that another materialized view reads",
      table: "dep_view",
      mentions: [
        "materialized view public.dep_view_summary reads public.dep_view, and rule _RETURN on materialized " +
          "view dep_view_summary2 depend on it",
      ],
    },
    { name: "a rule", table: "dep_rule", mentions: ["rules", "dep_rule_ignore"] },
    {
      name: "another table's row-level security policy reading it",
      table: "dep_policy",
      mentions: ["policy dep_policy_tenant on dep_policy_other reads public.dep_policy"],
    },
    {
      name: "an incoming foreign key",
      table: "dep_fk",
      mentions: ["foreign key dep_fk_child_parent_id_fkey on public.dep_fk_child", "hash:id:8"],
    },
    {
      name: "a row trigger with transition tables",
      table: "dep_trigger",
      mentions: ["trigger dep_trigger_audit is FOR EACH ROW with transition tables (REFERENCING)"],
    },
    {
      name: "a column of another table of its row type",
      table: "dep_rowtype",
      mentions: ["column snap of public.dep_rowtype_snap has the row type of public.dep_rowtype"],
    },
    {
      name: "a child table (INHERITS)",
      table: "dep_inherit",
      mentions: ["inheritance (parent or child tables): dep_inherit_child (not"],
    },
  ];
  for (const d of dependents) {
    refusal(
      `a table with ${d.name}: start refuses and plan lists it, naming it`,
      () =>
        all(
          pgshift(["start", "--allow-key-extension", d.table, "--partition-by", "range:created_at:month"]),
          pgshift(["plan", d.table, "--partition-by", "range:created_at:month"]),
        ),
      ([start, plan]) => {
        expectRefusal(start!, `public.${d.table} cannot be migrated`, ...d.mentions);
        expectPlanBlocker(plan!, ...d.mentions);
        // Only this object blocks: plan prints one line per blocker.
        expect(plan!.stdout.match(/^ {2}blocker: /gm), describeRun(plan!)).toHaveLength(1);
      },
    );
  }

  refusal(
    "a nullable partition column",
    () => all(pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:shipped_at:month"])),
    ([r]) => {
      expectRefusal(r!, "public.orders cannot be migrated", "partition column shipped_at allows NULL", "SET NOT NULL");
    },
  );

  refusal(
    "commands that need a migration when there is none: backfill, verify, status",
    () =>
      sequential(
        () => pgshift(["backfill", "orders"]),
        () => pgshift(["verify", "orders"]),
        () => pgshift(["status", "orders"]),
      ),
    (rs) => {
      for (const r of rs) expectRefusal(r, "no migration of public.orders is in progress");
    },
  );

  refusal(
    "usage errors (commander): unknown option, missing argument, missing required option, bad integer",
    () =>
      all(
        pgshift(["plan", "orders", "--partition-by", "range:created_at:month", "--frobnicate"]),
        pgshift(["plan", "--partition-by", "range:created_at:month"]),
        pgshift(["start", "--allow-key-extension", "orders"]),
        pgshift(["backfill", "orders", "--batch-size", "0"]),
        pgshift(["cutover"]),
      ),
    ([unknown, missingArg, missingOpt, badInt, neither]) => {
      expect(unknown!.stderr, describeRun(unknown!)).toContain("unknown option '--frobnicate'");
      expect(missingArg!.stderr, describeRun(missingArg!)).toContain("missing required argument 'table'");
      // Commands that take a table or --group refuse neither themselves (still exit 2, one line and a hint).
      expect(neither!.stderr, describeRun(neither!)).toContain("takes a table or --group <name>, not neither");
      expect(missingOpt!.stderr, describeRun(missingOpt!)).toContain(
        "required option '--partition-by <spec>' not specified",
      );
      expect(badInt!.stderr, describeRun(badInt!)).toContain("--batch-size must be an integer >= 1");
      for (const r of [unknown!, missingArg!, missingOpt!, badInt!]) expect(r.stdout, describeRun(r)).toBe("");
    },
  );
});

describe("the migration flow, and commands in the wrong phase", () => {
  it("plan exits 0 and prints the statements; plan --json has no blockers", async () => {
    const [plain, json] = await Promise.all([
      pgshift(["plan", "orders", "--partition-by", "range:created_at:month"]),
      pgshift(["plan", "orders", "--partition-by", "range:created_at:month", "--json"]),
    ]);
    expect(plain.code, describeRun(plain)).toBe(0);
    expect(plain.stdout).toContain("plan for public.orders: partition by range:created_at:month");
    expect(plain.stdout).toContain("CREATE TABLE");
    expect(plain.stdout).toContain("INSERT INTO pgshift.migrations");
    expect(plain.stdout).not.toContain("blocker:");
    expect(json.code, describeRun(json)).toBe(0);
    const parsed = JSON.parse(json.stdout) as { blockers: unknown; statements: unknown; source: unknown };
    expect(parsed.blockers).toEqual([]);
    expect(Array.isArray(parsed.statements) && parsed.statements.length > 0).toBe(true);
    expect(parsed.source).toEqual({ schema: "public", name: "orders" });
  });

  it("start exits 0; status --json reports phase started", async () => {
    const before = await catalogSnapshot(db.admin);
    const start = await pgshift([
      "start",
      "--allow-key-extension",
      "orders",
      "--partition-by",
      "range:created_at:month",
    ]);
    expect(start.code, describeRun(start)).toBe(0);
    expect(start.stdout).toContain("started: public.orders_pgshift_shadow");
    // The snapshot sees what start did (so "equal snapshots" in the refusals means something).
    const after = await catalogSnapshot(db.admin);
    expect(after.schemas).toContain(JSON.stringify({ nspname: "pgshift" }));
    expect(after.relations.some((r) => r.includes('"relname":"orders_pgshift_shadow"'))).toBe(true);
    expect(after.triggers.length).toBeGreaterThan(before.triggers.length);
    expect(after.migrations).toHaveLength(1);
    const status = await pgshift(["status", "orders", "--json"]);
    expect(status.code, describeRun(status)).toBe(0);
    const s = JSON.parse(status.stdout) as { phase: string; table: string };
    expect(s.phase).toBe("started");
    expect(s.table).toBe("public.orders");
  });

  refusal(
    "start twice: the second is refused as already under migration",
    () => all(pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:month"])),
    ([r]) => {
      expectRefusal(r!, "public.orders cannot be migrated", "already under migration (phase started)");
    },
  );

  // Regression: pgshift's own triggers are not reported as user triggers to drop.
  it("start twice: pgshift's own mirror triggers are not reported as user triggers to drop", async () => {
    const r = await pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:month"]);
    const error = expectRefusal(r, "already under migration");
    expect(error).not.toMatch(/pgshift_mirror|pgshift_truncate_guard/);
  });

  // Regression: with schema pgshift present, a role that may not read it still gets the plan's blockers.
  it("a role that does not own the table, with schema pgshift present: plan still reports the blocker", async () => {
    const plan = await pgshift(["plan", "orders", "--partition-by", "range:created_at:month"], weakUrl);
    expectPlanBlocker(plan, "the current user is not the owner of public.orders");
  });

  refusal(
    "a role that does not own the table, with schema pgshift present: start is refused",
    () =>
      all(pgshift(["start", "--allow-key-extension", "orders", "--partition-by", "range:created_at:month"], weakUrl)),
    ([r]) => {
      expectRefusal(r!, /not the owner of public\.orders|permission denied/);
    },
  );

  refusal(
    "cutover before backfill",
    () => all(pgshift(["cutover", "orders"])),
    ([r]) => {
      expectRefusal(r!, "cannot cut over public.orders: the migration is in phase started");
    },
  );
  refusal(
    "swap-back before cutover",
    () => all(pgshift(["swap-back", "orders"])),
    ([r]) => {
      expectRefusal(r!, "cannot swap back public.orders: the migration is in phase started");
    },
  );
  refusal(
    "finalize before cutover (even with --yes)",
    () => all(pgshift(["finalize", "orders", "--yes"])),
    ([r]) => {
      expectRefusal(r!, "cannot finalize public.orders: the migration is in phase started");
    },
  );
  refusal(
    "verify before backfill",
    () => all(pgshift(["verify", "orders"])),
    ([r]) => {
      expectRefusal(r!, "cannot verify public.orders: the migration is in phase started");
    },
  );

  cliIt(
    "verify: 0 after backfill, 1 naming the key of a corrupted shadow row (cutover refuses then), 0 after --repair",
    async (expectExit) => {
      const bf = await pgshift(["backfill", "orders", "--batch-size", "100"]);
      expect(bf.code, describeRun(bf)).toBe(0);
      expect(bf.stdout).toContain("backfill complete: 300 rows");
      const ok = await pgshift(["verify", "orders"]);
      expect(ok.code, describeRun(ok)).toBe(0);
      expect(ok.stdout).toMatch(/^equal: public\.orders vs public\.orders_pgshift_shadow, 300 rows/);

      const changed = await db.admin`update orders_pgshift_shadow set note = 'corrupted by hand' where id = 137`;
      expect(changed.count).toBe(1);
      const bad = await pgshift(["verify", "orders"]);
      expectExit(bad, 1);
      expect(bad.stdout, describeRun(bad)).toMatch(/^DIFFERENT: /);
      expect(bad.stdout, describeRun(bad)).toContain("0 missing, 0 extra, 1 different");
      expect(bad.stdout, describeRun(bad)).toMatch(/^ {2}different +\(137\)$/m);

      // While the last verify found differences, cutover refuses (the shadow would go live as it is).
      const before = await catalogSnapshot(db.admin);
      const cut = await pgshift(["cutover", "orders"]);
      expectRefusal(
        cut,
        "cannot cut over: the last verify",
        "found 0 missing, 0 extra and 1 different rows in public.orders_pgshift_shadow",
      );
      expect(cut.stderr).toContain("pgshift verify --repair public.orders");
      expect(await catalogSnapshot(db.admin)).toEqual(before);

      const repair = await pgshift(["verify", "orders", "--repair"]);
      expect(repair.code, describeRun(repair)).toBe(0);
      expect(repair.stdout).toContain("repaired 1 rows");
      const again = await pgshift(["verify", "orders"]);
      expect(again.code, describeRun(again)).toBe(0);
      expect(again.stdout).toMatch(/^equal: /);
      const row = await db.admin`select note from orders_pgshift_shadow where id = 137`;
      expect(row[0]?.note).toBe("order 137");
    },
  );

  it("cutover exits 0", async () => {
    const r = await pgshift(["cutover", "orders"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toContain("cutover done");
    const kind = await db.admin`select relkind::text as k from pg_class where oid = 'public.orders'::regclass`;
    expect(kind[0]?.k).toBe("p");
  });

  refusal(
    "finalize without --yes after a cutover",
    () => all(pgshift(["finalize", "orders"])),
    ([r]) => {
      expectRefusal(r!, "finalize drops public.orders_pgshift_retired", "swap-back impossible");
      expect(stderrLines(r!)[1]).toContain("--yes");
    },
  );
  refusal(
    "abort after cutover",
    () => all(pgshift(["abort", "orders"])),
    ([r]) => {
      expectRefusal(r!, "cannot abort public.orders: the migration is in phase cutover");
    },
  );
  refusal(
    "cutover twice",
    () => all(pgshift(["cutover", "orders"])),
    ([r]) => {
      expectRefusal(r!, "cannot cut over public.orders: the migration is in phase cutover");
    },
  );

  cliIt(
    "swap-back refuses while the last verify found the retired table different, and goes through once repaired",
    async (expectExit) => {
      await db.admin`delete from orders_pgshift_retired where id = 42`;
      expectExit(await pgshift(["verify", "orders"]), 1);
      const before = await catalogSnapshot(db.admin);
      expectRefusal(
        await pgshift(["swap-back", "orders"]),
        "cannot swap back: the last verify",
        "found 1 missing, 0 extra and 0 different rows in public.orders_pgshift_retired",
      );
      expect(await catalogSnapshot(db.admin)).toEqual(before);
      expect((await pgshift(["verify", "orders", "--repair"])).code).toBe(0);
      const back = await pgshift(["swap-back", "orders"]);
      expect(back.code, describeRun(back)).toBe(0);
      expect((await db.admin`select count(*)::int as n from orders where id = 42`)[0]!.n).toBe(1);
    },
  );
});
