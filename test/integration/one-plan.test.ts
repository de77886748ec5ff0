import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type CliResult, describeRun, runCli } from "../support/cli.js";
import {
  classify,
  comparePlan,
  type LoggedStatement,
  type PlanItem,
  parsePrintedPlan,
  type StatementLog,
  splitStatements,
  startStatementLog,
} from "../support/statement-log.js";

/**
 * One plan: for every command that changes something, what runs is what --dry-run printed.
 *
 * The recorder is the server's own statement log, not pgshift's runner: a dedicated embedded server with
 * log_statement = 'all' and a log_line_prefix with the session id, virtual transaction id and application_name
 * (test/support/statement-log.ts; read from the server's stderr). Each command runs as the real CLI, so its sessions
 * are named `pgshift <command>`. For each command: marks in the log, the command's --dry-run, a mark, the command, a
 * mark; then what the command's sessions sent between the last two marks is compared with what the dry run printed.
 *
 * Told apart (classify in statement-log.ts, applied alike to the printed plan and to the log):
 * - the plan: every statement that writes or changes the session: DDL, INSERT/UPDATE/DELETE, LOCK, SET,
 *   transaction control, ANALYZE, a SELECT calling a function with an effect (set_config, slots, messages);
 *   compared exactly, in order; the statements of a block (a batch, a chunk, a key) are printed once, with
 *   their values as $n parameters, and may run as many times as the block's mark says;
 * - reads (plain SELECTs: catalog looks, a batch's upper key, checksums): left aside on both sides;
 * - the migration's advisory lock (taken before the plan is read, released at the end, the same for every
 *   command): left aside on both sides.
 * The dry run itself must send nothing of the first kind. Sessions other than the command's during its run must
 * be the stream's in logical mode (`pgshift flush`, `pgshift apply <table>`: they follow the replication
 * stream, which carries the application's rows, not the plan), and nothing else.
 */

let log: StatementLog;
let url: string;
let admin: postgres.Sql;

beforeAll(async () => {
  log = await startStatementLog();
  const root = postgres(log.url, { max: 1, onnotice: () => {}, connection: { application_name: "one-plan test" } });
  await root.unsafe("create database one_plan");
  await root.end();
  const u = new URL(log.url);
  u.pathname = "/one_plan";
  url = u.toString();
  admin = postgres(url, { max: 2, onnotice: () => {}, connection: { application_name: "one-plan test" } });
});

afterAll(async () => {
  await admin?.end({ timeout: 5 });
  await log?.stop();
});

/** The stream's own sessions (logical mode), which may run while a command waits for the stream. */
const STREAM_SESSION = /^pgshift (flush|apply .*)$/;

/** Every statement of a printed plan, in order (its `--` comment lines left out), reads included. */
function printedStatements(out: string): string[] {
  return splitStatements(
    out
      .split("\n")
      .filter((l) => !l.startsWith("--"))
      .join("\n"),
  );
}

/**
 * The table every command runs on, with a view, a materialized view, a trigger, a policy, another table's foreign
 * key and a publication: what carries them at each switch must be printed and run alike too.
 */
async function createTable(name: string): Promise<void> {
  await admin.unsafe(`
    create table ${name} (id bigint primary key, created_at timestamptz not null, note text);
    create index ${name}_note on ${name} (note);
    insert into ${name} select i, timestamptz '2024-01-01' + i * interval '1 hour', 'n' || i
      from generate_series(1, 2500) i;
    analyze ${name};
    -- Objects that follow the live table (src/dependents): their statements are part of every switch's plan.
    create view ${name}_v as select id, note from ${name};
    create materialized view ${name}_mv as select count(*) as n from ${name};
    create function ${name}_touch() returns trigger language plpgsql as $$
      begin new.note := coalesce(new.note, 'touched'); return new; end $$;
    create trigger ${name}_touch before insert on ${name} for each row execute function ${name}_touch();
    create policy ${name}_all on ${name} using (true);
    create table ${name}_items (id bigint primary key, order_id bigint references ${name} (id) on delete cascade);
    create publication ${name}_pub for table ${name};`);
}

/** Every statement of a printed plan, at any depth of its blocks. */
function allPrinted(items: readonly PlanItem[]): string[] {
  return items.flatMap((it) => (it.kind === "statement" ? [it.text] : allPrinted(it.items)));
}

/**
 * Runs `pgshift <command> <table> <args> --dry-run`, then the command, and checks that the statements of the
 * plan the command's sessions sent are the ones the dry run printed, in order (batch values aside), that the
 * dry run sent none, and that no other session of pgshift ran but the stream's. With `workers` (backfill
 * --workers), the sessions named `pgshift <command> worker` are the command's too: what they and the command's own
 * session send interleaves, so the check is weaker there: each statement any of them sent must be one the plan
 * printed (not in the plan's order).
 */
async function planAndRun(
  command: string,
  table: string,
  args: string[],
  mode: string,
  workers = false,
): Promise<{ dry: CliResult; run: CliResult; ran: string[]; ranByWorkers: string[] }> {
  const m0 = await log.mark();
  const dry = await runCli([command, table, ...args, "--dry-run", "--url", url], { timeoutMs: 240_000 });
  expect(dry.code, describeRun(dry)).toBe(0);
  const m1 = await log.mark();
  const run = await runCli([command, table, ...args, "--url", url], { timeoutMs: 240_000 });
  expect(run.code, describeRun(run)).toBe(0);
  const m2 = await log.mark();

  const pgshiftSessions = (xs: LoggedStatement[]) => xs.filter((s) => s.app !== "one-plan test");
  const dryWrites = pgshiftSessions(await log.between(m0, m1)).filter((s) =>
    splitStatements(s.text).some((t) => classify(t) === "plan"),
  );
  expect(
    dryWrites.map((s) => `${s.app}: ${s.text}`),
    `${command} --dry-run sent statements that change something`,
  ).toEqual([]);

  const during = pgshiftSessions(await log.between(m1, m2));
  const worker = (app: string) => workers && app === `pgshift ${command} worker`;
  const others = during.filter((s) => s.app !== `pgshift ${command}` && !worker(s.app));
  const strangers = others.filter((s) => !(mode === "logical" && STREAM_SESSION.test(s.app)));
  expect(
    strangers.map((s) => `${s.app}: ${s.text}`),
    `sessions other than pgshift ${command}'s ran while it ran`,
  ).toEqual([]);

  const ran = during
    .filter((s) => s.app === `pgshift ${command}`)
    .flatMap((s) => splitStatements(s.text))
    .filter((t) => classify(t) === "plan");
  const printed = parsePrintedPlan(dry.stdout);
  const ranByWorkers = during
    .filter((s) => worker(s.app))
    .flatMap((s) => splitStatements(s.text))
    .filter((t) => classify(t) === "plan");
  if (!workers) {
    const differs = comparePlan(printed, ran);
    if (differs !== null) expect.fail(`pgshift ${command} ${table} (${mode} mode): ${differs}`);
  } else {
    // The command's session and its workers' interleave (the copy and the index builds run on the workers'):
    // each statement any of them sent must be one the plan printed.
    const known = new Set(allPrinted(printed));
    expect(
      [...new Set([...ran, ...ranByWorkers].filter((t) => !known.has(t)))],
      `statements of pgshift ${command} and its workers that --dry-run did not print`,
    ).toEqual([]);
  }
  return { dry, run, ran, ranByWorkers };
}

describe.each(["trigger", "logical"])("what ran is what --dry-run printed (%s mode)", (mode) => {
  const t = `op_${mode}`;
  const dropped = `op_${mode}_aborted`;

  beforeAll(async () => {
    await createTable(t);
    await createTable(dropped);
  });

  it("start (and plan prints the very statements start --dry-run prints)", async () => {
    const args = ["--partition-by", "hash:id:4", "--mode", mode];
    const plan = await runCli(["plan", t, ...args, "--url", url], { timeoutMs: 240_000 });
    expect(plan.code, describeRun(plan)).toBe(0);
    const { dry } = await planAndRun("start", t, args, mode);
    const header = "\n-- what start runs, step by step (start --dry-run prints these very steps):\n";
    expect(plan.stdout, describeRun(plan)).toContain(header);
    const planSteps = plan.stdout.slice(plan.stdout.indexOf(header)).split("\n-- after the copy")[0]!;
    const fromPlan = printedStatements(planSteps);
    expect(fromPlan.length).toBeGreaterThan(10);
    expect(fromPlan).toEqual(printedStatements(dry.stdout));
  });

  it("backfill (batches of 1000 rows: the batch's statements printed once, run three times)", async () => {
    const { run, ran } = await planAndRun("backfill", t, ["--batch-size", "1000"], mode);
    expect(run.stdout).toContain("backfill complete: 2500 rows");
    expect(ran.filter((s) => s.startsWith(`INSERT INTO "public"."${t}_pgshift_shadow"`))).toHaveLength(3);
    expect(ran.filter((s) => s.startsWith("CREATE INDEX CONCURRENTLY"))).toHaveLength(4);
  });

  it("verify --repair (a row missing from the copy, another different)", async () => {
    await admin.unsafe(`delete from ${t}_pgshift_shadow where id = 1500`);
    await admin.unsafe(`update ${t}_pgshift_shadow set note = 'changed' where id = 2200`);
    const { run, ran } = await planAndRun("verify", t, ["--repair", "--chunk-size", "1000"], mode);
    expect(run.stdout).toContain("repaired 2 rows");
    expect(ran.filter((s) => s.startsWith(`LOCK TABLE "public"."${t}" IN SHARE MODE`))).toHaveLength(2);
  });

  it("cutover", async () => {
    await planAndRun("cutover", t, [], mode);
  });

  it("swap-back", async () => {
    await planAndRun("swap-back", t, [], mode);
  });

  it("finalize (after a second cutover)", async () => {
    const again = await runCli(["cutover", t, "--url", url], { timeoutMs: 240_000 });
    expect(again.code, describeRun(again)).toBe(0);
    await planAndRun("finalize", t, ["--yes"], mode);
  });

  it("backfill --workers 2, then abort", async () => {
    const s = await runCli(["start", dropped, "--partition-by", "hash:id:4", "--mode", mode, "--url", url], {
      timeoutMs: 240_000,
    });
    expect(s.code, describeRun(s)).toBe(0);
    // Parallel workers (issue 18): the key split into ranges, each copied on a connection of its own, the index
    // builds spread over the workers' connections; every session is named `pgshift backfill`.
    const args = ["--workers", "2", "--batch-size", "500"];
    const { run, ran, ranByWorkers } = await planAndRun("backfill", dropped, args, mode, true);
    expect(run.stdout).toContain("backfill complete: 2500 rows");
    expect(ran.filter((x) => x.startsWith("INSERT INTO pgshift.backfill_ranges")).length).toBeGreaterThanOrEqual(2);
    const copies = ranByWorkers.filter((x) => x.startsWith(`INSERT INTO "public"."${dropped}_pgshift_shadow"`));
    expect(copies.length).toBeGreaterThanOrEqual(5);
    // The deferred index (on note) built on each of the 4 partitions, on the workers' connections.
    expect(ranByWorkers.filter((x) => x.startsWith("CREATE INDEX CONCURRENTLY"))).toHaveLength(4);
    await planAndRun("abort", dropped, [], mode);
  });
});
