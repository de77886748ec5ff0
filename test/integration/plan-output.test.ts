import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_LOCK_TIMEOUT_MS } from "../../src/db.js";
import { type CliResult, describeRun, runCli } from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Item 8 of issue 14: `plan`'s human output starts with a short summary (what is created, what is carried
 * over, what changes for the application, what blocks) before the statements, and prints the table's own DDL
 * before pgshift's own objects; start runs the statements in that same order. The statements are printed as
 * the steps start runs (formatSteps, what start --dry-run prints: BEGIN, SET LOCAL lock_timeout, ..., COMMIT);
 * one-plan.test.ts checks that they are start --dry-run's. `plan --json` keeps its fields and adds `summary`,
 * `tableStatementCount` and `ddlGuard`.
 */

interface PlanJson {
  statements: string[];
  tableStatementCount: number;
  ddlGuard: string | null;
  blockers: string[];
  summary: { creates: string[]; carriedOver: string[]; application: string[]; blocks: string[] };
}

const MONTH = ["--partition-by", "range:created_at:month"];

/** A table with something of each kind plan carries over: identity key, serial, index, checks, foreign key,
 * grants, row security, storage parameters, statistics target, comment; 90 days of rows from 2025-01-01. */
async function createTables(db: TestDatabase): Promise<void> {
  await db.admin.unsafe(`
    create table customers (id bigint primary key);
    insert into customers select generate_series(1, 10);
    create table orders (
      id bigint generated always as identity primary key,
      created_at timestamptz not null,
      customer_id bigint not null references customers (id),
      line_no serial,
      amount numeric check (amount >= 0),
      note text,
      constraint orders_note_len check (length(note) < 100)
    ) with (fillfactor = 90);
    create index orders_customer_idx on orders (customer_id);
    create unique index orders_line_idx on orders (line_no, created_at);
    alter table orders alter column note set statistics 500;
    alter table orders enable row level security;
    comment on table orders is 'the orders';
    grant select on orders to public;
    insert into orders (created_at, customer_id, amount, note)
      select timestamptz '2025-01-01' + i * interval '1 day', 1 + i % 10, i, 'n' || i from generate_series(0, 89) i;
    analyze orders;
    create table keyless (created_at timestamptz not null, note text);`);
}

/** The lines of the summary: from the header to the blank line before "details:". */
function summaryOf(r: CliResult): string[] {
  const lines = r.stdout.split("\n");
  const end = lines.indexOf("details:");
  expect(end, describeRun(r)).toBeGreaterThan(0);
  return lines.slice(0, end);
}

describe("plan's human output: summary first, the table's DDL before pgshift's own objects", () => {
  let db: TestDatabase;
  const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);
  beforeAll(async () => {
    db = await freshDatabase();
    await createTables(db);
  });
  afterAll(async () => {
    await db?.close();
  });

  it("summarizes what is created, carried over, what changes for the application and what blocks", async () => {
    const r = await pgshift(["plan", "orders", ...MONTH]);
    expect(r.code, describeRun(r)).toBe(0);
    const summary = summaryOf(r);
    expect(summary[0]).toBe("plan for public.orders: partition by range:created_at:month, trigger mirror");
    expect(summary).toContain("  creates:");
    // 2025-01-01 .. 2025-03-31, then 3 months premade past the later of the newest row and today.
    const shadowLine = summary.find((l) => l.startsWith("    - partitioned shadow public.orders_pgshift_shadow"));
    expect(shadowLine, describeRun(r)).toMatch(
      new RegExp(
        " \\(range:created_at:month\\): \\d+ partitions from '2025-01-01 00:00:00\\+00' " +
          "to '\\d{4}-\\d\\d-01 00:00:00\\+00', plus DEFAULT orders_default$",
      ),
    );
    expect(summary).toContain(
      "    - trigger mirror: a row trigger on public.orders calling pgshift.mirror_" +
        summary.join("\n").match(/pgshift\.mirror_(\d+)/)![1] +
        ", which writes each change to the shadow in the application's own transaction",
    );
    expect(summary).toContain("    - the DDL guard (3 event triggers, inert when no migration runs)");
    expect(summary).toContain("  carries over:");
    const carried = summary.join("\n");
    for (const line of [
      "    - owner postgres, on the parent and every partition",
      "    - 6 columns in the same order: types, collations, defaults, NOT NULL, generated columns, column comments",
      "    - 1 serial column: the same sequence",
      "    - 1 identity column: drawn from the original sequence until finalize makes it an identity column again",
      "    - primary key (id) as (id, created_at), created at start",
      "    - 2 more indexes (1 unique): 2 built by backfill after the copy, without blocking writes",
      "    - 2 CHECK constraints, 1 foreign key, under their names",
      "    - 1 table grant, 0 column grants",
      "    - row level security: enabled",
      "    - storage parameters on each partition: fillfactor=90",
      "    - statistics targets and n_distinct of 1 column",
      "    - the table comment",
    ]) {
      expect(carried, describeRun(r)).toContain(`${line}\n`);
    }
    expect(summary).toContain("  changes for the application:");
    expect(summary).toContain("    - 1 unique key loses global uniqueness, created_at added: orders_pkey");
    expect(summary).toContain("    - 2 ON CONFLICT targets stop working at cutover");
    expect(summary).toContain("    - start refuses this spec unless --allow-key-extension is given");
    expect(summary).toContain(
      "    - at cutover the partitioned table takes the name public.orders; " +
        "the original is kept as public.orders_pgshift_retired, in step, until finalize",
    );
    expect(summary).toContain("  blocks: nothing");
    // The summary names no index: index names are for the details and the statements.
    expect(carried).not.toContain("orders_customer_idx");
  });

  it("prints the table's own DDL, then pgshift's schema, DDL guard and mirror; JSON says where", async () => {
    const [text, json] = await Promise.all([
      pgshift(["plan", "orders", ...MONTH]),
      pgshift(["plan", "orders", ...MONTH, "--json"]),
    ]);
    expect(json.code, describeRun(json)).toBe(0);
    const plan = JSON.parse(json.stdout) as PlanJson;
    const n = plan.tableStatementCount;
    expect(n).toBeGreaterThan(0);
    expect(plan.statements[0]).toMatch(/^CREATE TABLE "public"\."orders_pgshift_shadow" \(LIKE "public"\."orders" /);
    // pgshift's part starts with its schema's first file (src/sql/schema/000001.sql), which creates the schema.
    expect(plan.statements[n]).toMatch(/^(--[^\n]*\n)*CREATE SCHEMA IF NOT EXISTS pgshift;\n/);
    const table = plan.statements.slice(0, n);
    const own = plan.statements.slice(n);
    // The table's part names nothing of pgshift's schema; it holds the partitions, the key, checks and grants.
    for (const s of table) expect(s).not.toMatch(/"?pgshift"?\./);
    expect(table.filter((s) => s.includes("PARTITION OF"))).toHaveLength(
      plan.statements.filter((s) => s.includes("PARTITION OF")).length,
    );
    expect(table.some((s) => s.includes("PRIMARY KEY"))).toBe(true);
    expect(table.some((s) => s.startsWith("GRANT SELECT ON"))).toBe(true);
    // pgshift's part: schema, DDL guard, the identity default (function, then the column default), the mirror, the row.
    const at = (re: RegExp) => own.findIndex((s) => re.test(s));
    expect(at(/CREATE EVENT TRIGGER pgshift_ddl_guard ON ddl_command_end/)).toBeGreaterThan(0);
    expect(at(/^CREATE OR REPLACE FUNCTION "pgshift"\."nextval_/)).toBeGreaterThan(0);
    expect(at(/ALTER COLUMN "id" SET DEFAULT "pgshift"\."nextval_/)).toBeGreaterThan(
      at(/^CREATE OR REPLACE FUNCTION "pgshift"\."nextval_/),
    );
    expect(own.at(-1)).toMatch(/^INSERT INTO pgshift\.migrations /);
    expect(plan.ddlGuard).toBe("installs");
    expect(plan.summary.blocks).toEqual(["nothing"]);
    expect(plan.summary.creates.length).toBeGreaterThan(0);

    // The text prints the same statements in the same order, under its two headers, after the summary, as
    // the steps start runs: start's transaction, BEGIN and its lock_timeout first, COMMIT last.
    const out = text.stdout;
    const stepsHeader = out.indexOf("\n-- what start runs, step by step (start --dry-run prints these very steps):\n");
    const tableHeader = out.indexOf("-- the table's own DDL: the shadow, its partitions, key, constraints, grants");
    const ownHeader = out.indexOf("-- pgshift's own objects: its schema, the DDL guard, identity defaults");
    expect(out.indexOf("details:")).toBeLessThan(stepsHeader);
    expect(stepsHeader, describeRun(text)).toBeGreaterThan(0);
    expect(out.slice(stepsHeader, tableHeader)).toContain(
      `BEGIN;\nSET LOCAL lock_timeout = '${DEFAULT_LOCK_TIMEOUT_MS}ms';\n` +
        `-- the ${plan.statements.length} statements start runs, in this transaction:\n`,
    );
    expect(tableHeader).toBeGreaterThan(stepsHeader);
    expect(ownHeader).toBeGreaterThan(tableHeader);
    expect(out.slice(tableHeader, ownHeader)).toContain(`${plan.statements[0]};`);
    expect(out.slice(tableHeader, ownHeader)).not.toContain("CREATE SCHEMA");
    expect(out.slice(ownHeader)).toContain("CREATE SCHEMA IF NOT EXISTS pgshift;\n");
    const printed = out
      .slice(tableHeader)
      .split("\n-- after the copy")[0]!
      .split("\n")
      .filter((l) => !l.startsWith("-- "))
      .join("\n");
    // Comment lines are left out on both sides: the headers above, and those inside the schema's .sql files.
    const uncommented = (t: string) =>
      t
        .split("\n")
        .filter((l) => !l.startsWith("-- "))
        .join("\n");
    expect(printed.trim()).toBe(`${uncommented(plan.statements.map((s) => `${s};`).join("\n"))}\nCOMMIT;`);
  });

  it("start runs them in that order: the shadow's identity column calls pgshift's function", async () => {
    const st = await pgshift(["start", "orders", ...MONTH, "--allow-key-extension"]);
    expect(st.code, describeRun(st)).toBe(0);
    const [d] = await db.admin`
      select pg_get_expr(ad.adbin, ad.adrelid) as expr
        from pg_attrdef ad join pg_attribute a on a.attrelid = ad.adrelid and a.attnum = ad.adnum
       where ad.adrelid = 'orders_pgshift_shadow'::regclass and a.attname = 'id'`;
    expect(String(d?.expr)).toMatch(/^pgshift\.nextval_\d+_1\(\)$/);
    const ab = await pgshift(["abort", "orders"]);
    expect(ab.code, describeRun(ab)).toBe(0);
  });

  it("a blocked table: the summary says nothing is created and what blocks; no statements", async () => {
    const r = await pgshift(["plan", "keyless", ...MONTH]);
    expect(r.code, describeRun(r)).toBe(2);
    const summary = summaryOf(r);
    expect(summary).toContain("  creates: nothing: start is refused while anything blocks (below)");
    expect(summary).toContain("  blocks: 1 reason start refuses for, each on a blocker line below");
    expect(r.stdout).toContain("  blocker: public.keyless has no primary key");
    expect(r.stdout).not.toContain("statements start runs");
  });

  it("logical mode: the summary names the publication and the slot, created first", async () => {
    const r = await pgshift(["plan", "orders", ...MONTH, "--mode", "logical"]);
    expect(r.code, describeRun(r)).toBe(0);
    const line = summaryOf(r).find((l) => l.startsWith("    - logical mirror: "));
    expect(line, describeRun(r)).toMatch(
      /^ {4}- logical mirror: publication pgshift_(\d+) and replication slot pgshift_\1, created first; pgshift sync/,
    );
    expect(r.stdout.indexOf("CREATE PUBLICATION")).toBeLessThan(r.stdout.indexOf("statements start runs"));
  });
});
