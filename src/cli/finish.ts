import { Command, Option } from "commander";
import { PgshiftError } from "../errors.js";
import { finishGroup } from "../group/finish.js";
import { abort, abortPlan, finalize } from "../migration/finish.js";
import { formatSteps } from "../plan/steps.js";
import {
  addConnectionOption,
  addGroupOption,
  addLockOptions,
  addObserveOptions,
  type ConnOpts,
  groupOf,
  withConnection,
  withTable,
} from "./common.js";
import { addTerminateOption } from "./cutover.js";

type Opts = ConnOpts & {
  group?: string;
  lockTimeout: number;
  retries: number;
  terminateHoldersAfter?: number;
  yes?: boolean;
  dryRun?: boolean;
  handOff?: string;
};

export function finalizeCommand(): Command {
  const cmd = new Command("finalize")
    .description("after cutover: drop the retired table, the mirror and the metadata (swap-back is then impossible)")
    .argument("[table]", "table under migration (or --group)")
    .option("--yes", "confirm dropping the retired table")
    .option("--dry-run", "print the plan (its statements, where each runs, the checks between); change nothing")
    .addOption(
      new Option("--hand-off <extension>", "then register the table with pg_partman (see pgshift maintain)").choices([
        "pg_partman",
      ]),
    );
  addGroupOption(cmd, "every table of this migration group, the referencing tables first");
  addLockOptions(cmd);
  addTerminateOption(cmd);
  addConnectionOption(cmd);
  addObserveOptions(cmd);
  cmd.addHelpText(
    "after",
    `
Refused (exit 2, nothing changed) while the last verify found differences (run pgshift verify --repair
first), or while anything but pgshift's own objects depends on the retired table (views, rules, functions
with BEGIN ATOMIC bodies, columns of its row type, foreign keys referencing it: they are listed by name).
With --dry-run the same checks run before the statements are printed.

Example:
  pgshift verify orders && pgshift finalize orders --yes
  pgshift finalize orders --yes --hand-off pg_partman   # then CALL partman.run_maintenance_proc() keeps it
  pgshift finalize --group shop --yes   # each table of group shop, in its own transaction`,
  );
  cmd.action(async (tableArg: string | undefined, opts: Opts) => {
    const group = groupOf(tableArg, opts, "finalize");
    if (group !== null) return groupFinish("finalize", group, opts);
    const r = await withTable(tableArg!, opts, (sql, table) =>
      finalize(sql, table, {
        yes: opts.yes,
        dryRun: opts.dryRun,
        ...(opts.handOff === "pg_partman" ? { handOff: "pg_partman" as const } : {}),
        lockTimeoutMs: opts.lockTimeout,
        retries: opts.retries,
        terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
      }),
    );
    if (opts.dryRun) return void process.stdout.write(formatSteps(r.steps));
    process.stdout.write(
      `finalized: ${tableArg} is partitioned; the retired table, the mirror and the metadata are gone\n` +
        (opts.handOff ? `handed off to pg_partman: CALL partman.run_maintenance_proc() keeps its partitions\n` : ""),
    );
  });
  return cmd;
}

export function abortCommand(): Command {
  const cmd = new Command("abort")
    .description("before cutover: drop the shadow and the mirror, leaving the source untouched")
    .argument("[table]", "table under migration (or --group)")
    .option("--dry-run", "print the plan (its statements, where each runs, the checks between); change nothing");
  addGroupOption(cmd, "every table of this migration group, the referencing tables first");
  addLockOptions(cmd);
  addTerminateOption(cmd);
  addConnectionOption(cmd);
  addObserveOptions(cmd);
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift abort orders
  pgshift abort --group shop`,
  );
  cmd.action(async (tableArg: string | undefined, opts: Opts) => {
    const group = groupOf(tableArg, opts, "abort");
    if (group !== null) return groupFinish("abort", group, opts);
    await withTable(tableArg!, opts, async (sql, table) => {
      if (opts.dryRun) {
        process.stdout.write(
          formatSteps(
            (
              await abortPlan(sql, table, {
                dryRun: true,
                lockTimeoutMs: opts.lockTimeout,
                terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
              })
            ).steps,
          ),
        );
        return;
      }
      await abort(sql, table, {
        lockTimeoutMs: opts.lockTimeout,
        retries: opts.retries,
        terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
      });
      process.stdout.write(`aborted: shadow and mirror dropped; ${tableArg} is as it was\n`);
    });
  });
  return cmd;
}

/** `finalize --group` and `abort --group`: each table of the group in turn (finishGroup). */
async function groupFinish(command: "finalize" | "abort", group: string, opts: Opts): Promise<void> {
  if (opts.handOff !== undefined)
    throw new PgshiftError("--hand-off takes one table, not --group", {
      hint: `pgshift finalize --group ${group} --yes, then pgshift maintain <table> --hand-off pg_partman for each`,
    });
  const r = await withConnection(opts, (sql) =>
    finishGroup(sql, group, command, {
      yes: opts.yes,
      dryRun: opts.dryRun,
      lockTimeoutMs: opts.lockTimeout,
      retries: opts.retries,
      terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
    }),
  );
  if (opts.dryRun) {
    for (const t of r.tables) process.stdout.write(`-- ${t.table}\n${formatSteps(t.result.steps)}`);
    return;
  }
  process.stdout.write(
    `${command === "finalize" ? "finalized" : "aborted"} group ${group}: ${r.tables.map((t) => t.table).join(", ")}\n`,
  );
}
