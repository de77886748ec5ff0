import { Command } from "commander";
import { cutover, DEFAULT_CATCHUP_TIMEOUT_MS, formatSwitchPlan, swapBack, switchPlan } from "../cutover/cutover.js";
import { formatGroupSwitchPlan, groupSwitchPlan, switchGroup } from "../group/switch.js";
import {
  addConnectionOption,
  addGroupOption,
  addLockOptions,
  addObserveOptions,
  type ConnOpts,
  groupOf,
  intOption,
  withConnection,
  withTable,
} from "./common.js";

type Opts = ConnOpts & {
  group?: string;
  lockTimeout: number;
  retries: number;
  catchupTimeoutMs: number;
  terminateHoldersAfter?: number;
  dryRun?: boolean;
};

/**
 * `--terminate-holders-after <ms>`: terminate sessions holding a conflicting lock on the tables (or their partitions)
 * whose transaction is at least that old, before locking (src/locks/holders.ts). Off by default.
 */
export function addTerminateOption(cmd: Command): Command {
  return cmd.option(
    "--terminate-holders-after <ms>",
    "before locking, terminate (pg_terminate_backend) sessions holding a conflicting lock on the tables whose " +
      "transaction is at least this old; default: never, they are reported and waited for",
    intOption("--terminate-holders-after", 0),
  );
}

function switchCommand(name: "cutover" | "swap-back"): Command {
  const isCutover = name === "cutover";
  const cmd = new Command(name)
    .description(
      isCutover
        ? "swap the names in one short transaction; the old table keeps receiving writes; prints how long writes " +
            "were blocked"
        : "undo the cutover: the original table is live again with every write made since",
    )
    .argument("[table]", "table under migration (or --group)")
    .option(
      "--dry-run",
      "print the plan it would run (index builds before the lock, the transaction, the checks between); change nothing",
    );
  if (isCutover) {
    cmd.option(
      "--catchup-timeout-ms <ms>",
      "logical mode: how long the stream may take, under the lock, to apply the last changes (it is caught up " +
        "before the lock); past it the lock is released and the attempt runs again",
      intOption("--catchup-timeout-ms", 1),
      DEFAULT_CATCHUP_TIMEOUT_MS,
    );
  }
  addGroupOption(cmd, "every table of this migration group, in one transaction (all switch or none)");
  addLockOptions(cmd, "lock_timeout of each attempt: the longest the application waits behind one attempt");
  addTerminateOption(cmd);
  addConnectionOption(cmd);
  addObserveOptions(cmd);
  cmd.addHelpText(
    "after",
    isCutover
      ? `
Examples:
  pgshift cutover orders
  pgshift cutover orders --lock-timeout 30 --retries 200
  pgshift cutover orders --terminate-holders-after 60000   # end sessions holding the table for a minute or more
  pgshift cutover --group shop     # every table of group shop in one transaction (docs/groups.md)`
      : `
Examples:
  pgshift swap-back orders
  pgshift swap-back --group shop`,
  );
  cmd.action(async (tableArg: string | undefined, opts: Opts) => {
    const group = groupOf(tableArg, opts, name);
    if (group !== null) return groupSwitch(name, group, opts);
    await withTable(tableArg!, opts, async (sql, table) => {
      if (opts.dryRun) {
        // The plan the command runs: index builds first (indexes created on the live table meanwhile), then
        // the transaction; refused here as it would be there.
        const plan = await switchPlan(sql, table, name, {
          dryRun: true,
          catchupTimeoutMs: opts.catchupTimeoutMs,
          lockTimeoutMs: opts.lockTimeout,
          terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
        });
        process.stdout.write(formatSwitchPlan(plan));
        return;
      }
      const fn = isCutover ? cutover : swapBack;
      const r = await fn(sql, table, {
        lockTimeoutMs: opts.lockTimeout,
        retries: opts.retries,
        catchupTimeoutMs: opts.catchupTimeoutMs,
        terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
      });
      for (const a of r.autovacuumCancelled)
        process.stdout.write(`cancelled autovacuum on ${a.relation} (pid ${a.pid}) before locking\n`);
      for (const t of r.terminated)
        process.stdout.write(`terminated pid ${t.pid} (holding a lock on ${t.relation}: ${t.query ?? "?"})\n`);
      for (const b of r.indexesBuilt) {
        process.stdout.write(
          `built index ${b.name} on ${b.on} before the lock, for index ${b.original} created during the migration ` +
            `(USING ${b.definition})` +
            (b.widened
              ? "; unique only together with the partition column, which a partitioned table's unique index must " +
                "contain"
              : "") +
            (isCutover ? `; recorded in the migration, so that it takes the name ${b.original}` : "") +
            "\n",
        );
      }
      process.stdout.write(
        `${isCutover ? "cutover" : "swap-back"} done in ${r.attempts} attempt(s): writes were blocked ` +
          `for ${r.lockHeldMs.toFixed(1)} ms\n` +
          (isCutover
            ? `next: pgshift verify ${tableArg}, then pgshift finalize ${tableArg} --yes (or pgshift ` +
              `swap-back ${tableArg})\n`
            : `next: pgshift cutover ${tableArg} again, or pgshift abort ${tableArg}\n`),
      );
    });
  });
  return cmd;
}

/** `cutover --group` and `swap-back --group`: the group's plan (--dry-run), or its one transaction. */
async function groupSwitch(name: "cutover" | "swap-back", group: string, opts: Opts): Promise<void> {
  const o = {
    lockTimeoutMs: opts.lockTimeout,
    retries: opts.retries,
    terminateHoldersAfterMs: opts.terminateHoldersAfter ?? null,
  };
  await withConnection(opts, async (sql) => {
    if (opts.dryRun) {
      process.stdout.write(formatGroupSwitchPlan(await groupSwitchPlan(sql, group, name, { ...o, dryRun: true })));
      return;
    }
    const r = await switchGroup(sql, group, name, o);
    for (const b of r.indexesBuilt)
      process.stdout.write(`built index ${b.name} on ${b.on} before the lock, for index ${b.original}\n`);
    process.stdout.write(
      `${name} of group ${group} done in ${r.attempts} attempt(s), one transaction for ${r.tables.join(", ")}: ` +
        `writes were blocked for ${r.lockHeldMs.toFixed(1)} ms\n` +
        (name === "cutover"
          ? `next: pgshift verify --group ${group}, then pgshift finalize --group ${group} --yes (or pgshift ` +
            `swap-back --group ${group})\n`
          : `next: pgshift cutover --group ${group} again, or pgshift abort --group ${group}\n`),
    );
  });
}

export const cutoverCommand = () => switchCommand("cutover");
export const swapBackCommand = () => switchCommand("swap-back");
