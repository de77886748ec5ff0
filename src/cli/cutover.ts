import { Command } from "commander";
import { carryOverSql, cutover, cutoverPlanSql, swapBack, swapBackSql } from "../cutover/cutover.js";
import { requireMigration } from "../migration/state.js";
import { addConnectionOption, addLockOptions, type ConnOpts, intOption, withTable } from "./common.js";

type Opts = ConnOpts & { lockTimeout: number; retries: number; catchupTimeoutMs: number; dryRun?: boolean };

function switchCommand(name: "cutover" | "swap-back"): Command {
  const isCutover = name === "cutover";
  const cmd = new Command(name)
    .description(
      isCutover
        ? "swap the names in one short transaction; the old table keeps receiving writes; prints how long writes were blocked"
        : "undo the cutover: the original table is live again with every write made since",
    )
    .argument("<table>", "table under migration")
    .option(
      "--dry-run",
      "print the statements it would run (index builds before the lock, then the transaction); change nothing",
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
        const m = await requireMigration(sql, table, isCutover ? "cutover" : "swap-back", { upgrade: false });
        // Indexes created on the live table during the migration are built on the copy first; anything else refuses here as it would there.
        const before = await carryOverSql(sql, m, table);
        const after = isCutover ? cutoverPlanSql(before.migration) : swapBackSql(before.migration);
        process.stdout.write(`${[...before.statements, ...after].map((s) => `${s};`).join("\n")}\n`);
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
          `built index ${b.name} on ${b.on} before the lock, for index ${b.original} created during the migration (USING ${b.definition})` +
            (b.widened
              ? "; unique only together with the partition column, which a partitioned table's unique index must contain"
              : "") +
            (isCutover ? `; recorded in the migration, so that it takes the name ${b.original}` : "") +
            "\n",
        );
      }
      process.stdout.write(
        `${isCutover ? "cutover" : "swap-back"} done in ${r.attempts} attempt(s): writes were blocked for ${r.lockHeldMs.toFixed(1)} ms\n` +
          (isCutover
            ? `next: pgshift verify ${tableArg}, then pgshift finalize ${tableArg} --yes (or pgshift swap-back ${tableArg})\n`
            : `next: pgshift cutover ${tableArg} again, or pgshift abort ${tableArg}\n`),
      );
    });
  });
  return cmd;
}

export const cutoverCommand = () => switchCommand("cutover");
export const swapBackCommand = () => switchCommand("swap-back");
