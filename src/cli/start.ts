import { Command } from "commander";
import { BlockedError, PgshiftError } from "../errors.js";
import { planGroupStart, startGroup } from "../group/start.js";
import { type MigrationPlan, planMigration } from "../migration/plan.js";
import { DEFAULT_SLOT_TIMEOUT_MS, keyExtensionRefusal, startMigration } from "../migration/start.js";
import { displayName, parseTableName } from "../names.js";
import { formatSpecs, parseSpecs } from "../partitioning/spec.js";
import { formatSteps } from "../plan/steps.js";
import {
  addConnectionOption,
  addGroupOption,
  addLockOptions,
  addObserveOptions,
  intOption,
  withConnection,
  withTable,
} from "./common.js";
import { addTerminateOption } from "./cutover.js";
import { applicationLines, type PlanCliOpts, specOptions } from "./plan.js";

export function startCommand(): Command {
  const cmd = new Command("start")
    .description("create the shadow table, its partitions and indexes, install the mirror, record the migration")
    .argument("<tables...>", "table to partition, optionally schema-qualified (several with --group)")
    .option("--dry-run", "print the plan and its statements; change nothing")
    .option(
      "--allow-key-extension",
      "start although the partition column is added to unique keys (primary key, unique constraints and indexes): " +
        "each is then enforced only together with it after finalize, and ON CONFLICT on it stops working at cutover " +
        "(see pgshift plan)",
    )
    .option(
      "--slot-timeout-ms <ms>",
      "logical mode: the longest creating the replication slot may wait for transactions already running to end",
      intOption("--slot-timeout-ms", 1),
      DEFAULT_SLOT_TIMEOUT_MS,
    );
  addGroupOption(
    cmd,
    "start the tables as one migration group: all or none, foreign keys between them kept, switched together",
  );
  specOptions(cmd);
  addLockOptions(cmd);
  addTerminateOption(cmd);
  addConnectionOption(cmd);
  addObserveOptions(cmd);
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift start orders --partition-by range:created_at:month --premake 6 --allow-key-extension
  pgshift start public.events --partition-by list:tenant_id --dry-run
  pgshift start events --partition-by range:created_at:month --mode logical --slot-timeout-ms 60000 ` +
      `--allow-key-extension
  pgshift start orders --partition-by range:created_at:month --allow-key-extension   # key (id) becomes (id, created_at)
A spec that adds the partition column to a unique key is refused (exit 2, nothing changed) without
--allow-key-extension: pgshift plan names the keys, the ON CONFLICT targets that stop working at cutover
and, with pg_stat_statements, the application's statements that would fail.
Several tables at once (docs/groups.md):
  pgshift start orders order_items --group shop --partition-by range:created_at:month --allow-key-extension`,
  );
  cmd.action(
    async (
      tableArgs: string[],
      opts: PlanCliOpts & {
        group?: string;
        lockTimeout: number;
        retries: number;
        terminateHoldersAfter?: number;
        dryRun?: boolean;
        slotTimeoutMs: number;
        allowKeyExtension?: boolean;
      },
    ) => {
      const spec = parseSpecs(opts.partitionBy, opts.subpartitionBy);
      const o = {
        spec,
        mode: opts.mode,
        premake: opts.premake,
        lockTimeoutMs: opts.lockTimeout,
        retries: opts.retries,
        slotTimeoutMs: opts.slotTimeoutMs,
        allowKeyExtension: opts.allowKeyExtension ?? false,
        terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
      };
      if (opts.group !== undefined || tableArgs.length > 1) {
        if (opts.group === undefined)
          throw new PgshiftError("pgshift start takes one table, or several with --group <name>", {
            hint: `pgshift start ${tableArgs.join(" ")} --group <name> --partition-by <spec>`,
          });
        const group = opts.group;
        const tables = tableArgs.map((t) => parseTableName(t));
        await withConnection(opts, async (sql) => {
          if (opts.dryRun) {
            const p = await planGroupStart(sql, group, tables, o);
            for (const plan of p.plans) printStartPlan(plan);
            if (p.blockers.length > 0) throw new BlockedError(`migration group ${group}`, p.blockers);
            return;
          }
          const r = await startGroup(sql, group, tables, o);
          for (const x of r.started) {
            for (const w of x.plan.warnings) process.stdout.write(`warning: ${w}\n`);
            process.stdout.write(
              `started: ${displayName(x.plan.shadow)} with ${x.plan.partitions.length} partitions (group ${group})\n`,
            );
          }
          process.stdout.write(`next: pgshift backfill --group ${group}\n`);
        });
        return;
      }
      const tableArg = tableArgs[0]!;
      await withTable(tableArg, opts, async (sql, table) => {
        if (opts.dryRun) {
          const plan = await planMigration(sql, table, o);
          printStartPlan(plan);
          if (plan.blockers.length > 0) throw new BlockedError(displayName(table), plan.blockers);
          const refusal = opts.allowKeyExtension ? null : keyExtensionRefusal(plan);
          if (refusal) throw refusal;
          return;
        }
        const { plan, ms } = await startMigration(sql, table, o);
        for (const w of plan.warnings) process.stdout.write(`warning: ${w}\n`);
        if (plan.atFinalize) process.stdout.write(`at finalize: ${plan.atFinalize}\n`);
        process.stdout.write(
          `started: ${displayName(plan.shadow)} with ${plan.partitions.length} partitions, ${plan.mode} mirror ` +
            `installed (${Math.round(ms)} ms)\n` +
            `next: pgshift backfill ${tableArg}\n`,
        );
      });
    },
  );
  return cmd;
}

/**
 * What start --dry-run prints: what was found and what the application will notice as `--` comments, then
 * the steps start runs (formatSteps of plan.steps, the very list startMigration runs).
 */
function printStartPlan(plan: MigrationPlan): void {
  const head = [
    `start ${displayName(plan.source)}: partition by ${formatSpecs(plan.spec)}, ${plan.mode} mirror, ` +
      `${plan.partitions.length} partitions, shadow ${displayName(plan.shadow)}, key (${plan.shadowKey.join(", ")})`,
    ...applicationLines(plan).map((l) => l.trim()),
    ...plan.warnings.map((w) => `warning: ${w}`),
    ...plan.blockers.map((b) => `blocker: ${b}`),
  ];
  process.stdout.write(`${head.map((l) => `-- ${l}`).join("\n")}\n${formatSteps(plan.steps)}`);
}
