import { Command } from "commander";
import { cutover, formatSwitchPlan, swapBack, switchPlan } from "../cutover/cutover.js";
import {
  addConnectionOption,
  addLockOptions,
  addObserveOptions,
  type ConnOpts,
  intOption,
  withTable,
} from "./common.js";

type Opts = ConnOpts & { lockTimeout: number; retries: number; catchupTimeoutMs: number; dryRun?: boolean };

function switchCommand(name: "cutover" | "swap-back"): Command {
  const isCutover = name === "cutover";
  const cmd = new Command(name)
    .description(
      isCutover
        ? "swap the names in one short transaction; the old table keeps receiving writes; prints how long writes " +
            "were blocked"
        : "undo the cutover: the original table is live again with every write made since",
    )
    .argument("<table>", "table under migration")
    .option(
      "--dry-run",
      "print the plan it would run (index builds before the lock, the transaction, the checks between); change nothing",
    );
  if (isCutover) {
    cmd.option(
      "--catchup-timeout-ms <ms>",
      "logical mode: how long the stream may take, under the lock, to apply every committed change",
      intOption("--catchup-timeout-ms", 1),
      2000,
    );
  }
  addLockOptions(cmd, "lock_timeout: the longest the application waits behind pgshift");
  addConnectionOption(cmd);
  addObserveOptions(cmd);
  cmd.addHelpText(
    "after",
    isCutover
      ? `
Examples:
  pgshift cutover orders
  pgshift cutover orders --lock-timeout 200 --retries 50`
      : `
Examples:
  pgshift swap-back orders`,
  );
  cmd.action(async (tableArg: string, opts: Opts) => {
    await withTable(tableArg, opts, async (sql, table) => {
      if (opts.dryRun) {
        // The plan the command runs: index builds first (indexes created on the live table meanwhile), then
        // the transaction; refused here as it would be there.
        const plan = await switchPlan(sql, table, name, {
          dryRun: true,
          catchupTimeoutMs: opts.catchupTimeoutMs,
          lockTimeoutMs: opts.lockTimeout,
        });
        process.stdout.write(formatSwitchPlan(plan));
        return;
      }
      const fn = isCutover ? cutover : swapBack;
      const r = await fn(sql, table, {
        lockTimeoutMs: opts.lockTimeout,
        retries: opts.retries,
        catchupTimeoutMs: opts.catchupTimeoutMs,
      });
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

export const cutoverCommand = () => switchCommand("cutover");
export const swapBackCommand = () => switchCommand("swap-back");
