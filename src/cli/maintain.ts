import { Command, InvalidArgumentError } from "commander";
import { connect } from "../db.js";
import { explain, PgshiftError } from "../errors.js";
import { type MaintainOptions, type MaintainResult, maintain, maintainAll } from "../maintain/maintain.js";
import { handOff } from "../maintain/partman.js";
import { parseTableName } from "../names.js";
import { formatSteps, type Step } from "../plan/steps.js";
import { addConnectionOption, addLockOptions, type ConnOpts, intOption, printJson } from "./common.js";
import { addTerminateOption } from "./cutover.js";

type Opts = ConnOpts & {
  all?: boolean;
  premake?: number;
  retention?: string;
  retentionKeepTable?: boolean;
  move: boolean;
  batchTimeMs: number;
  batchSize: number;
  terminateHoldersAfter?: number;
  handOff?: string;
  dryRun?: boolean;
  json?: boolean;
  lockTimeout: number;
  retries: number;
};

function handOffOption(v: string): string {
  if (v !== "pg_partman")
    throw new InvalidArgumentError(`--hand-off accepts pg_partman only, got ${JSON.stringify(v)}`);
  return v;
}

/** What a run did, in a few lines for a terminal (or a cron mail). */
function describe(r: MaintainResult, dryRun: boolean): string {
  const would = dryRun ? "would " : "";
  const lines: string[] = [];
  const moved = r.created.reduce((n, c) => n + c.rowsMoved, 0);
  const blocked = r.move
    ? ` (online: ${r.move.batches} batch(es), writes blocked ${r.move.blockedMs.toFixed(1)} ms)`
    : "";
  lines.push(
    `${r.table} (${r.spec}): ${would}create ${r.created.length} partition(s)` +
      `${moved ? `, ${would}move ${moved} row(s) out of DEFAULT${blocked}` : ""}, ${would}detach ${r.detached.length}` +
      `${r.detached.some((d) => d.dropped) ? " and drop them" : r.detached.length ? " (kept as tables)" : ""}` +
      `${r.rowsLeftInDefault ? `; ${r.rowsLeftInDefault} row(s) left in DEFAULT` : ""}`,
  );
  for (const c of r.created) lines.push(`  + ${c.name} ${c.bound}${c.rowsMoved ? ` (${c.rowsMoved} rows moved)` : ""}`);
  for (const d of r.detached) lines.push(`  - ${d.name}${d.dropped ? " dropped" : " detached, kept"}`);
  if (r.note) lines.push(`  ${r.note}`);
  return `${lines.join("\n")}\n`;
}

export function maintainCommand(): Command {
  const cmd = new Command("maintain")
    .description(
      "after finalize: keep the partitions in shape (premake, rows moved out of DEFAULT, retention); safe from cron",
    )
    .argument("[table]", "a table pgshift partitioned (finalized)")
    .option("--all", "every table pgshift partitioned in this database")
    .option(
      "--premake <n>",
      "partitions kept ahead of now and of the newest row (saved; default 3)",
      intOption("--premake"),
    )
    .option(
      "--retention <age>",
      "detach partitions older than this: an interval ('24 months') or, for integer ranges, a key distance (saved)",
    )
    .option("--retention-keep-table", "keep the detached partitions as tables instead of dropping them (saved)")
    .option("--no-move", "leave the rows of DEFAULT where they are")
    .option(
      "--batch-time-ms <ms>",
      "the move's copy: target duration of one batch (the time a batch holds its rows of DEFAULT locked)",
      intOption("--batch-time-ms", 1),
      50,
    )
    .option("--batch-size <rows>", "the move's copy: rows per batch at most", intOption("--batch-size", 1), 5000)
    .option(
      "--hand-off <extension>",
      "register the table with pg_partman instead (its run_maintenance keeps it)",
      handOffOption,
    )
    .option("--dry-run", "print the plan (its statements, where each runs, the checks between); change nothing")
    .option("--json", "print what it did as JSON");
  addLockOptions(cmd);
  addTerminateOption(cmd);
  addConnectionOption(cmd);
  cmd.addHelpText(
    "after",
    `
Time ranges premake by their interval, integer ranges by their width; list and hash have nothing to premake.
Rows waiting in DEFAULT move online into new partitions of their bound: copied in batches into a staging table
(its partitions are the new partitions) while a trigger on DEFAULT mirrors every write, then one short
transaction detaches DEFAULT and attaches the new partitions and a new DEFAULT (catalog changes only: writes are
blocked for milliseconds, whatever the rows moved). Every lock is looked at before and requested with
--lock-timeout, retried. Retention detaches (CONCURRENTLY when there is no DEFAULT partition), then drops unless
--retention-keep-table. A second run changes nothing; a run after a crash removes what the move left first.

Examples:
  pgshift maintain orders --premake 3 --retention '24 months'
  pgshift maintain --all --json
  pgshift maintain orders --dry-run
  pgshift maintain orders --hand-off pg_partman          # then: CALL partman.run_maintenance_proc();
Cron, every hour:
  17 * * * * pgshift maintain --all --url postgres://pgshift@db/app >>/var/log/pgshift-maintain.log 2>&1`,
  );
  cmd.action(async (tableArg: string | undefined, opts: Opts) => {
    if (!tableArg === !opts.all)
      throw new PgshiftError("give a table or --all, not both nor neither", { hint: "pgshift maintain --help" });
    if (opts.all && opts.handOff)
      throw new PgshiftError("--hand-off takes one table", { hint: "pgshift maintain <table> --hand-off pg_partman" });
    const mo: MaintainOptions = {
      premake: opts.premake,
      retention: opts.retention,
      retentionKeepTable: opts.retentionKeepTable,
      move: opts.move,
      batchTimeMs: opts.batchTimeMs,
      batchSize: opts.batchSize,
      terminateAfterMs: opts.terminateHoldersAfter ?? null,
      dryRun: opts.dryRun,
      lockTimeoutMs: opts.lockTimeout,
      retries: opts.retries,
    };
    const sql = await connect({ url: opts.url, fallbackApplicationName: "pgshift maintain" });
    try {
      if (opts.handOff) {
        const table = parseTableName(tableArg!);
        const r = await handOff(sql, table, { ...mo, premake: opts.premake });
        if (opts.dryRun) return void process.stdout.write(formatSteps(r.steps));
        if (opts.json) return printJson({ table: tableArg, handOff: "pg_partman", statements: r.statements });
        process.stdout.write(`${tableArg} handed off to pg_partman: CALL partman.run_maintenance_proc() keeps it\n`);
        return;
      }
      const results = opts.all ? await maintainAll(sql, mo) : [await maintain(sql, parseTableName(tableArg!), mo)];
      if (opts.dryRun) {
        const steps: Step[] = results.flatMap((r) => r.steps);
        return void process.stdout.write(formatSteps(steps));
      }
      if (opts.json)
        return printJson(
          opts.all ? results.map(({ steps: _s, ...r }) => r) : (({ steps: _s, ...r }) => r)(results[0]!),
        );
      for (const r of results) process.stdout.write(describe(r, false));
      if (results.length === 0) process.stdout.write("no table pgshift partitioned in this database\n");
    } catch (err) {
      throw explain(err);
    } finally {
      await sql.end({ timeout: 5 }).catch(() => {});
    }
  });
  return cmd;
}
