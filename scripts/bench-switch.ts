/**
 * Switch benchmark: how long cutover and swap-back block writes when the table has dependent objects that
 * follow it (issue 15), against the same table without them, in the same process.
 *
 *   scripts/bench-switch [--rows N] [--repeat K] [--durable] [--json]
 *
 * One process, one run: starts the embedded PostgreSQL (or uses DATABASE_URL), creates two tables of `--rows`
 * rows (default 20,000) partitioned by `hash:id:4`: `bench_switch_plain` alone, and `bench_switch_deps` with
 * three views (one of another view), a materialized view with a unique index, an updated_at BEFORE trigger,
 * an audit AFTER trigger, row-level security with two policies, a column grant, a publication and
 * another table's foreign key (ON DELETE CASCADE). Both are started and backfilled (trigger mode), then
 * cut over and swapped back `--repeat` times (default 5), the two tables interleaved. Reports the medians
 * of the time writes were blocked (CutoverResult.lockHeldMs: from both locks granted to COMMIT) and the
 * difference the dependents make, in ms. The work after the commit (validating the foreign key, rebuilding
 * the materialized view) blocks no write and is not counted; its time is reported on its own.
 */
import { parseArgs } from "node:util";
import { backfill } from "../src/backfill/backfill.js";
import { cutover, swapBack } from "../src/cutover/cutover.js";
import type { Sql } from "../src/db.js";
import { startMigration } from "../src/migration/start.js";
import { parsePartitionSpec } from "../src/partitioning/spec.js";
import { COMMON_OPTIONS, median, openBenchSession, positiveInt, printedHelp, runBench } from "./bench-common.js";

const usage = () =>
  "usage: scripts/bench-switch [--rows N] [--repeat K] [--durable] [--json]\n" +
  "  measures the time cutover and swap-back block writes with and without dependent objects";

const TABLES = ["bench_switch_plain", "bench_switch_deps"] as const;

async function createTable(sql: Sql, name: string, rows: number, deps: boolean): Promise<void> {
  await sql.unsafe(`
    create table ${name} (id bigint primary key, created_at timestamptz not null, status text, amount numeric,
      updated_at timestamptz);
    insert into ${name} select i, now() - i * interval '1 minute', 'new', i % 100 from generate_series(1, ${rows}) i;
    analyze ${name};`);
  if (!deps) return;
  await sql.unsafe(`
    do $$ begin create role bench_switch_reader; exception when duplicate_object then null; end $$;
    create table ${name}_audit (n bigserial primary key, op text, id bigint);
    create function ${name}_touch() returns trigger language plpgsql as $f$
      begin new.updated_at := clock_timestamp(); return new; end $f$;
    create function ${name}_audit() returns trigger language plpgsql as $f$
      begin insert into public.${name}_audit (op, id) values (tg_op, coalesce(new.id, old.id)); return null; end $f$;
    create trigger ${name}_touch before update on ${name} for each row execute function ${name}_touch();
    create trigger ${name}_audit after insert or update or delete on ${name}
      for each row execute function ${name}_audit();
    create view ${name}_v1 as select id, status from ${name};
    create view ${name}_v2 as select status, count(*) as n from ${name}_v1 group by status;
    create view ${name}_v3 with (security_barrier) as select id, amount from ${name} where amount > 10;
    create materialized view ${name}_mv as select status, count(*) as n from ${name} group by status;
    create unique index on ${name}_mv (status);
    alter table ${name} enable row level security;
    create policy ${name}_read on ${name} for select to bench_switch_reader using (amount > 5);
    create policy ${name}_all on ${name} for all to bench_switch_reader using (true) with check (amount > 0);
    grant select (id, status) on ${name} to bench_switch_reader;
    create publication ${name}_pub for table ${name};
    create table ${name}_items (id bigserial primary key,
      order_id bigint not null references ${name} (id) on delete cascade);
    insert into ${name}_items (order_id) select i from generate_series(1, ${rows}, 10) i;`);
}

async function main(): Promise<number> {
  const { values } = parseArgs({ options: { ...COMMON_OPTIONS, durable: { type: "boolean", default: false } } });
  if (printedHelp(values, usage)) return 0;
  const rows = positiveInt("--rows", values.rows, 20_000);
  const repeat = positiveInt("--repeat", values.repeat, 5);
  const say = (line: string) => {
    if (!values.json) process.stdout.write(`${line}\n`);
  };
  const session = await openBenchSession({
    applicationName: "pgshift bench-switch",
    say,
    durable: values.durable,
    dropTables: async (sql) => {
      for (const t of TABLES) await sql.unsafe(`drop table if exists ${t}_items, ${t} cascade`);
    },
  });
  const sql = session.sql;
  try {
    const opts = { lockTimeoutMs: 500, retries: 30 };
    for (const [i, t] of TABLES.entries()) {
      await createTable(sql, t, rows, i === 1);
      await startMigration(sql, { schema: "public", name: t }, { spec: parsePartitionSpec("hash:id:4"), ...opts });
      await backfill(sql, { schema: "public", name: t });
    }
    const held: Record<string, { cutover: number[]; swapBack: number[]; total: number[] }> = {};
    for (const t of TABLES) held[t] = { cutover: [], swapBack: [], total: [] };
    for (let r = 0; r < repeat; r++) {
      for (const t of TABLES) {
        const table = { schema: "public", name: t };
        let t0 = performance.now();
        held[t]!.cutover.push((await cutover(sql, table, opts)).lockHeldMs);
        held[t]!.total.push(performance.now() - t0);
        t0 = performance.now();
        held[t]!.swapBack.push((await swapBack(sql, table, opts)).lockHeldMs);
        held[t]!.total.push(performance.now() - t0);
      }
    }
    const m = (xs: number[]) => Math.round(median(xs) * 10) / 10;
    const report = {
      rows,
      repeat,
      durable: values.durable,
      plain: { cutoverMs: m(held[TABLES[0]]!.cutover), swapBackMs: m(held[TABLES[0]]!.swapBack) },
      dependents: { cutoverMs: m(held[TABLES[1]]!.cutover), swapBackMs: m(held[TABLES[1]]!.swapBack) },
      commandMs: { plain: m(held[TABLES[0]]!.total), dependents: m(held[TABLES[1]]!.total) },
    };
    if (values.json) process.stdout.write(`${JSON.stringify(report)}\n`);
    else {
      say(`writes blocked (median of ${repeat}, ms), ${rows} rows, ${values.durable ? "durable" : "fast"} server:`);
      say(`  plain table:        cutover ${report.plain.cutoverMs}, swap-back ${report.plain.swapBackMs}`);
      say(`  with dependents:    cutover ${report.dependents.cutoverMs}, swap-back ${report.dependents.swapBackMs}`);
      say(
        `  the dependents add: cutover ${m([report.dependents.cutoverMs - report.plain.cutoverMs])}, swap-back ` +
          `${m([report.dependents.swapBackMs - report.plain.swapBackMs])}`,
      );
      say(
        `  whole command (with the work after COMMIT): plain ${report.commandMs.plain}, with dependents ` +
          `${report.commandMs.dependents}`,
      );
    }
    return 0;
  } finally {
    await session.cleanup();
  }
}

runBench("bench-switch", usage, main);
