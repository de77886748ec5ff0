import { Command } from "commander";
import Table from "cli-table3";
import { status, type StatusReport } from "../status.js";
import { addConnectionOption, formatDuration, printJson, withTable, type ConnOpts } from "./common.js";

export function statusCommand(): Command {
  const cmd = new Command("status")
    .description("phase, rows copied / estimated, rate, ETA, rows in DEFAULT, mirror health, last verify result")
    .argument("<table>", "table under migration")
    .option("--json", "print as JSON");
  addConnectionOption(cmd);
  cmd.addHelpText("after", `
Examples:
  pgshift status orders
  watch -n 5 pgshift status orders
  pgshift status orders --json | jq .phase`);
  cmd.action(async (tableArg: string, opts: ConnOpts & { json?: boolean }) => {
    const s = await withTable(tableArg, opts, (sql, table) => status(sql, table));
    if (opts.json) return printJson(s);
    printStatus(s);
  });
  return cmd;
}

/** The status report as a two-column table on stdout. */
export function printStatus(s: StatusReport): void {
    const t = new Table({ style: { head: [], border: [] } });
    const v = s.lastVerify;
    t.push(
      { table: s.table },
      { phase: s.phase },
      { "partition by": `${s.partitionBy} (${s.partitions} partitions)` },
      { "live / copy": `${s.live} -> ${s.copy}` },
      { backfill: s.percent === null ? "not started" : `${s.rowsCopied} / ${s.rowsEstimated} rows (${s.percent.toFixed(1)}%), ${s.batches} batches` },
      { rate: s.rate === null ? "-" : `${Math.round(s.rate)} rows/s, ETA ${formatDuration(s.etaSeconds)}` },
      { "DEFAULT rows": s.defaultPartition ? `${s.defaultPartition.rows} in ${s.defaultPartition.name}` : "no DEFAULT partition (hash)" },
      { mirror: `${s.mirror.ok ? "ok" : "NOT OK"}: ${s.mirror.detail}` },
      { "last verify": v ? `${v.equal ? "equal" : "DIFFERENT"}: ${v.rowsCompared} rows, ${v.missing} missing, ${v.extra} extra, ${v.different} different, ${v.repaired} repaired (${v.at})` : "never" },
      { next: s.next },
    );
    process.stdout.write(t.toString() + "\n");
    if (s.defaultPartition && s.defaultPartition.rows > 0) {
      process.stdout.write(`note: ${s.defaultPartition.rows} rows fall outside the planned bounds and sit in ${s.defaultPartition.name}\n`);
    }
}
