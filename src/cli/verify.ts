import { Command } from "commander";
import { describeVerify, verify } from "../verify/verify.js";
import { addThrottleOptions, type ThrottleCliOptions, throttleOptions } from "./backfill.js";
import {
  addConnectionOption,
  addLockOptions,
  addObserveOptions,
  type ConnOpts,
  intOption,
  printJson,
  withTable,
} from "./common.js";

export function verifyCommand(): Command {
  const cmd = new Command("verify")
    .description(
      "compare the live table and its copy chunk by chunk; exit 0 when equal, 1 when they differ, 2 on error",
    )
    .argument("<table>", "table under migration")
    .option("--json", "print the report as JSON")
    .option("--repair", "rewrite differing rows of the copy from the live table")
    .option("--dry-run", "print the plan (a chunk's and a key's statements once, key values as $n); change nothing")
    .option("--chunk-size <rows>", "rows per compared chunk", intOption("--chunk-size", 1), 10000);
  addLockOptions(cmd, "lock_timeout for --repair's short SHARE lock");
  addThrottleOptions(cmd, "before each chunk");
  addConnectionOption(cmd);
  addObserveOptions(cmd, { metrics: true });
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift verify orders
  pgshift verify orders --json > verify.json; echo $?
  pgshift verify orders --repair
  pgshift verify orders --repair --dry-run
  pgshift verify orders --max-replica-lag-ms 2000 --max-active-sessions 40
pgshift pause orders (from any terminal) stops it between chunks; pgshift resume orders lets it go on.
Exit codes: 0 equal (also after a successful --repair), 1 differences remain (keys listed), 2 error.`,
  );
  cmd.action(
    async (
      tableArg: string,
      opts: ConnOpts &
        ThrottleCliOptions & {
          json?: boolean;
          repair?: boolean;
          dryRun?: boolean;
          chunkSize: number;
          lockTimeout: number;
          retries: number;
        },
    ) => {
      if (opts.dryRun) {
        const plan = await withTable(tableArg, opts, (sql, table) =>
          describeVerify(sql, table, {
            chunkSize: opts.chunkSize,
            repair: opts.repair,
            lockTimeoutMs: opts.lockTimeout,
            ...throttleOptions(opts),
          }),
        );
        process.stdout.write(plan);
        return;
      }
      const r = await withTable(tableArg, opts, (sql, table) =>
        verify(sql, table, {
          chunkSize: opts.chunkSize,
          repair: opts.repair,
          lockTimeoutMs: opts.lockTimeout,
          retries: opts.retries,
          ...throttleOptions(opts),
        }),
      );
      if (opts.json) printJson(r);
      else {
        const lines = [
          `${r.equal ? "equal" : "DIFFERENT"}: ${r.live} vs ${r.copy}, ${r.rowsCompared} rows in ${r.chunks} chunks ` +
            `(${r.ms} ms)`,
        ];
        if (r.repaired > 0) lines.push(`repaired ${r.repaired} rows of ${r.copy}`);
        if (!r.equal) {
          lines.push(`${r.missing} missing, ${r.extra} extra, ${r.different} different:`);
          for (const d of r.differences) lines.push(`  ${d.kind.padEnd(9)} (${d.key.join(", ")})`);
          const listed = r.differences.length;
          const total = r.missing + r.extra + r.different;
          if (total > listed) lines.push(`  ... and ${total - listed} more`);
          lines.push(`fix with: pgshift verify ${tableArg} --repair`);
        }
        process.stdout.write(`${lines.join("\n")}\n`);
      }
      process.exitCode = r.equal ? 0 : 1;
    },
  );
  return cmd;
}
