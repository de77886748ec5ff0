import Table from "cli-table3";
import { Command } from "commander";
import { type StatusReport, status } from "../status.js";
import {
  addConnectionOption,
  type ConnOpts,
  formatBytes,
  formatDuration,
  intOption,
  printJson,
  withTable,
} from "./common.js";

export function statusCommand(): Command {
  const cmd = new Command("status")
    .description(
      "phase, who works on it now (pid, command, since when), rows copied / estimated, rate and ETA while a backfill " +
        "runs, rows in DEFAULT, mirror health, last verify result, next step",
    )
    .argument("<table>", "table under migration")
    .option("--json", "print as JSON")
    .option(
      "--max-retained-wal <bytes>",
      "logical mode: warn when the slot retains more WAL than this",
      intOption("--max-retained-wal", 1),
      1024 ** 3,
    );
  addConnectionOption(cmd);
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift status orders
  watch -n 5 pgshift status orders
  pgshift status orders --json | jq .phase`,
  );
  cmd.action(async (tableArg: string, opts: ConnOpts & { json?: boolean; maxRetainedWal: number }) => {
    const s = await withTable(tableArg, opts, (sql, table) =>
      status(sql, table, { maxRetainedWalBytes: opts.maxRetainedWal }),
    );
    if (opts.json) return printJson(s);
    printStatus(s);
  });
  return cmd;
}

/** Seconds since an ISO 8601 time. */
function ago(iso: string): number {
  return Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
}

/**
 * Who works on the migration right now, in one line: the holder of its lock, and in logical mode the stream's consumer.
 */
export function runningLine(s: StatusReport): string {
  const r = s.running;
  const who = (x: { pid: number; command: string | null; applicationName: string | null; since: string | null }) =>
    `${x.command ? `pgshift ${x.command}` : (x.applicationName ?? "a pgshift process")} (backend ` +
    `pid ${x.pid}${x.since ? `, since ${x.since}` : ""})`;
  const parts = [
    r.holder
      ? `${who(r.holder)} holds the migration`
      : `no pgshift command is working on it${s.backfillFinishedAt ? "" : " (no backfill is running)"}`,
  ];
  if (r.streamConsumer) parts.push(`the stream is applied by ${who(r.streamConsumer)}`);
  return parts.join("; ");
}

/** The replication slot's state in a few words: missing, invalidated (and why), streaming to a pid, or idle. */
function slotState(st: NonNullable<StatusReport["stream"]>): string {
  if (!st.exists) return "MISSING";
  if (st.invalidated !== null) return `INVALIDATED (${st.invalidated})`;
  return st.active ? `streaming to pid ${st.activePid}` : "idle: no consumer attached";
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
    {
      backfill:
        s.percent === null
          ? "not started"
          : `${s.rowsCopied} / ${s.rowsEstimated} rows (${s.percent.toFixed(1)}%), ${s.batches} batches`,
    },
    {
      rate:
        s.rate === null
          ? s.backfillFinishedAt
            ? "-"
            : "- (no backfill is running)"
          : `${Math.round(s.rate)} rows/s, ETA ${formatDuration(s.etaSeconds)}`,
    },
    { running: runningLine(s) },
    // The pace (issue 16, items 2-4): pause, throttle, batch size in use.
    ...(s.paused
      ? [{ paused: `paused by ${s.paused.by ?? "?"} (${s.paused.client ?? "?"}) since ${s.paused.since}` }]
      : []),
    ...(s.throttle ? [{ throttled: `${s.throttle.reason} (since ${s.throttle.since})` }] : []),
    ...(s.batch
      ? [
          {
            "batch size":
              `${s.batch.rows} rows${s.batch.targetMs ? ` (sized to ${s.batch.targetMs} ms)` : ""}` +
              `${s.batch.lastMs !== null ? `, last batch ${s.batch.lastMs} ms` : ""}`,
          },
        ]
      : []),
    ...(s.running.lastBatchAt
      ? [{ "last batch": `${s.running.lastBatchAt} (${formatDuration(ago(s.running.lastBatchAt))} ago)` }]
      : []),
    {
      "DEFAULT rows": s.defaultPartition
        ? `${s.defaultPartition.rows} in ${s.defaultPartition.name}`
        : "no DEFAULT partition (hash)",
    },
    { mirror: `${s.mirror.ok ? "ok" : "NOT OK"}: ${s.mirror.detail}` },
    {
      columns:
        s.schemaDrift.length === 0
          ? "the same in both tables, all mirrored"
          : `CHANGED during the migration (${s.schemaDrift.length} differences)`,
    },
    {
      "DDL guard":
        s.ddlGuard === "on"
          ? "on: ALTER TABLE that changes columns, DROP of either table, and detaching or dropping a " +
            "partition are refused"
          : `${s.ddlGuard}: column changes, DROP of either table and of partitions are not refused (creating the ` +
            `guard needs superuser)`,
    },
    {
      "last verify": v
        ? `${v.equal ? "equal" : "DIFFERENT"}: ${v.rowsCompared} rows, ${v.missing} missing, ${v.extra} ` +
          `extra, ${v.different} different, ${v.repaired} repaired (${v.at})`
        : "never",
    },
    { next: s.next },
  );
  if (s.stream) {
    const st = s.stream;
    t.push(
      {
        "replication slot": `${st.slot} ${slotState(st)}${st.walStatus ? `, WAL ${st.walStatus}` : ""}`,
      },
      { "confirmed LSN": `${st.confirmedLsn ?? "-"} (current ${st.currentLsn})` },
      { lag: `${formatBytes(st.lagBytes)}, ${st.lagSeconds === null ? "-" : `${st.lagSeconds.toFixed(1)} s`}` },
      { "retained WAL": formatBytes(st.retainedBytes) },
      { "last applied commit": st.appliedCommitTime ?? "-" },
    );
  }
  process.stdout.write(`${t.toString()}\n`);
  for (const w of s.stream?.warnings ?? []) process.stdout.write(`warning: ${w}\n`);
  for (const d of s.indexDrift) process.stdout.write(`warning: ${d}\n`);
  for (const d of s.lateObjects) process.stdout.write(`warning: ${d}\n`);
  for (const d of s.pending) process.stdout.write(`pending: ${d}\n`);
  for (const d of s.schemaDrift)
    process.stdout.write(`warning: ${d} (cutover, swap-back and verify refuse until the columns agree)\n`);
  if (s.defaultPartition && s.defaultPartition.rows > 0) {
    process.stdout.write(
      `note: ${s.defaultPartition.rows} rows fall outside the planned bounds and sit in ${s.defaultPartition.name}\n`,
    );
  }
}
