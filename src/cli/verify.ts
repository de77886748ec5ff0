import { Command } from "commander";
import { PgshiftError } from "../errors.js";
import { loadGroup } from "../group/members.js";
import { displayName } from "../names.js";
import { describeVerify, verify } from "../verify/verify.js";
import { addThrottleOptions, type ThrottleCliOptions, throttleOptions } from "./backfill.js";
import {
  addConnectionOption,
  addGroupOption,
  addLockOptions,
  addObserveOptions,
  type ConnOpts,
  groupOf,
  intOption,
  printJson,
  withConnection,
  withTable,
} from "./common.js";

export function verifyCommand(): Command {
  const cmd = new Command("verify")
    .description(
      "compare the live table and its copy chunk by chunk; exit 0 when equal, 1 when they differ, 2 on error",
    )
    .argument("[table]", "table under migration (or --group)")
    .option("--json", "print the report as JSON")
    .option("--repair", "rewrite differing rows of the copy from the live table")
    .option("--dry-run", "print the plan (a chunk's and a key's statements once, key values as $n); change nothing")
    .option("--chunk-size <rows>", "rows per compared chunk", intOption("--chunk-size", 1), 10000);
  addLockOptions(cmd, "lock_timeout for --repair's short SHARE lock");
  addThrottleOptions(cmd, "before each chunk");
  addGroupOption(cmd, "every table of this migration group, one after the other; exit 1 when any differs");
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
  pgshift verify --group shop
pgshift pause orders (from any terminal) stops it between chunks; pgshift resume orders lets it go on.
Exit codes: 0 equal (also after a successful --repair), 1 differences remain (keys listed), 2 error.`,
  );
  cmd.action(
    async (
      tableArg: string | undefined,
      opts: ConnOpts &
        ThrottleCliOptions & {
          group?: string;
          json?: boolean;
          repair?: boolean;
          dryRun?: boolean;
          chunkSize: number;
          lockTimeout: number;
          retries: number;
        },
    ) => {
      const group = groupOf(tableArg, opts, "verify");
      const each = async (fn: (table: string) => Promise<void>) => {
        if (group === null) return fn(tableArg!);
        const tables = await withConnection(opts, (sql) => loadGroup(sql, group, { upgrade: false }));
        if (tables.length === 0)
          throw new PgshiftError(`no migration group ${group} is in progress`, { hint: "see pgshift status" });
        for (const m of tables) await fn(displayName(m.live));
      };
      await each((t) => verifyOne(t, opts));
    },
  );
  return cmd;
}

async function verifyOne(
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
): Promise<void> {
  {
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
    // A group: any table that differs makes it 1.
    if (!r.equal || process.exitCode !== 1) process.exitCode = r.equal ? 0 : 1;
  }
}
