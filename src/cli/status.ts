import cliProgress from "cli-progress";
import Table from "cli-table3";
import { Command } from "commander";
import { rangeLine } from "../backfill/ranges.js";
import type { Sql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { loadGroup } from "../group/members.js";
import { displayName, type QualifiedName } from "../names.js";
import { createMetrics, type MetricsServer, type PgshiftMetrics, serveMetrics, setPhase } from "../observe/metrics.js";
import { type StatusReport, status } from "../status.js";
import {
  addConnectionOption,
  addGroupOption,
  addMetricsOption,
  type ConnOpts,
  formatBytes,
  formatDuration,
  groupOf,
  intOption,
  printJson,
  withConnection,
  withTable,
} from "./common.js";

type StatusOpts = ConnOpts & {
  group?: string;
  json?: boolean;
  maxRetainedWal: number;
  watch?: boolean;
  interval: number;
  metricsPort?: number;
  metricsHost: string;
};

export function statusCommand(): Command {
  const cmd = new Command("status")
    .description(
      "phase, who works on it now (pid, command, since when), rows copied / estimated, rate and ETA while a backfill " +
        "runs, rows in DEFAULT, mirror health, last verify result, next step; --watch: refreshed every second",
    )
    .argument("[table]", "table under migration (or --group)")
    .option("--json", "print as JSON (with --watch: one JSON object per line)")
    .option(
      "--watch",
      "refresh until Ctrl-C: a live view on a terminal, else (or with --json) one JSON status object per line",
    )
    .option("--interval <ms>", "with --watch: time between refreshes", intOption("--interval", 100), 1000)
    .option(
      "--max-retained-wal <bytes>",
      "logical mode: warn when the slot retains more WAL than this",
      intOption("--max-retained-wal", 1),
      1024 ** 3,
    );
  addGroupOption(cmd, "every table of this migration group (--json: {group, tables: [...]}; not with --watch)");
  addConnectionOption(cmd);
  addMetricsOption(cmd);
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift status orders
  pgshift status orders --json | jq .phase
  pgshift status orders --watch                          # live view: progress bar, rate, ETA, lag, throttle
  pgshift status orders --watch --interval 5000 >> status.jsonl   # not a terminal: one JSON object per line
  pgshift status orders --watch --metrics-port 9187      # and Prometheus metrics at :9187/metrics
  pgshift status --group shop                            # every table of migration group shop
--metrics-port needs --watch. The watch ends with Ctrl-C, or by itself (exit 0) once the migration is finalized
or aborted.`,
  );
  cmd.action(async (tableArg: string | undefined, opts: StatusOpts) => {
    const group = groupOf(tableArg, opts, "status");
    if (group !== null) {
      if (opts.watch)
        throw new PgshiftError("--watch shows one table", {
          hint: `pgshift status <table> --watch (see --group ${group})`,
        });
      const tables = await withConnection(opts, async (sql) => {
        const ms = await loadGroup(sql, group, { upgrade: false });
        const out: StatusReport[] = [];
        for (const m of ms) out.push(await status(sql, m.live, { maxRetainedWalBytes: opts.maxRetainedWal }));
        return out;
      });
      if (tables.length === 0)
        throw new PgshiftError(`no migration group ${group} is in progress`, {
          hint: `start one with: pgshift start <table> <table>... --group ${group} --partition-by <spec>`,
        });
      if (opts.json) return printJson({ group, tables });
      for (const [i, s] of tables.entries()) {
        process.stdout.write(`${i > 0 ? "\n" : ""}migration group ${group}, table ${i + 1} of ${tables.length}:\n`);
        printStatus(s);
      }
      return;
    }
    if (tableArg === undefined) return;
    if (opts.metricsPort !== undefined && !opts.watch) {
      throw new PgshiftError("--metrics-port needs --watch", {
        hint: `pgshift status ${tableArg} --watch --metrics-port ${opts.metricsPort}`,
      });
    }
    if (opts.watch) return await withTable(tableArg, opts, (sql, table) => watchStatus(sql, table, opts));
    const s = await withTable(tableArg, opts, (sql, table) =>
      status(sql, table, { maxRetainedWalBytes: opts.maxRetainedWal }),
    );
    if (opts.json) return printJson(s);
    printStatus(s);
  });
  return cmd;
}

/**
 * Fields of the status report that pgshift pause/resume, the throttles and time-sized batches add (issue 16):
 * `paused: {by, client, since} | null`, `throttle: {reason, since} | null`, `batch: {rows, targetMs, lastMs} | null`.
 */
interface PaceFields {
  /** null: this report does not say (a StatusReport without the field). */
  paused: boolean | null;
  pausedBy: string | null;
  /** The pausing session's application_name and client address. */
  pausedClient: string | null;
  pausedSince: string | null;
  throttleReason: string | null;
  throttleSince: string | null;
  batchRows: number | null;
  batchTargetMs: number | null;
  lastBatchMs: number | null;
}

/** The PaceFields of `s`, read whether or not this StatusReport has them yet (null where it has none). */
export function paceFields(s: StatusReport): PaceFields {
  const r = s as unknown as Record<string, unknown>;
  const obj = (k: string) => (r[k] && typeof r[k] === "object" ? (r[k] as Record<string, unknown>) : null);
  const str = (v: unknown) => (typeof v === "string" ? v : null);
  const num = (v: unknown) => (typeof v === "number" ? v : null);
  const paused = obj("paused");
  const throttle = obj("throttle");
  const batch = obj("batch");
  return {
    paused: paused ? true : "paused" in r ? false : null,
    pausedBy: str(paused?.by),
    pausedClient: str(paused?.client),
    pausedSince: str(paused?.since),
    throttleReason: str(throttle?.reason),
    throttleSince: str(throttle?.since),
    batchRows: num(batch?.rows),
    batchTargetMs: num(batch?.targetMs),
    lastBatchMs: num(batch?.lastMs),
  };
}

/**
 * `status --watch`: reads the status every `opts.interval` ms until Ctrl-C (or SIGTERM), and shows it: on a terminal
 * (without --json) as a live view redrawn in place, else as one JSON object per line (the status report and `at`,
 * the time it was read). With --metrics-port, serves the report as Prometheus gauges (setFromStatus). Ends by itself
 * once the migration is gone (finalized or aborted) after the first read.
 * @throws PgshiftError when there is no migration of `table` at the first read, or the port cannot be listened on.
 */
async function watchStatus(sql: Sql, table: QualifiedName, opts: StatusOpts): Promise<void> {
  const live = Boolean(process.stdout.isTTY) && !opts.json;
  const ctrl = new AbortController();
  const stop = () => ctrl.abort();
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
  let server: MetricsServer | null = null;
  let drawn = 0;
  try {
    const first = await status(sql, table, { maxRetainedWalBytes: opts.maxRetainedWal });
    if (opts.metricsPort !== undefined) {
      server = await serveMetrics({ port: opts.metricsPort, host: opts.metricsHost, metrics: createMetrics() });
    }
    if (live) process.stdout.write("\x1b[?25l");
    let s: StatusReport | null = first;
    while (s) {
      if (server) setFromStatus(server.metrics, s);
      if (live) {
        const lines = liveView(s, opts.interval);
        process.stdout.write(`${drawn > 0 ? `\x1b[${drawn}A\x1b[0J` : ""}${lines.join("\n")}\n`);
        drawn = lines.length;
      } else {
        process.stdout.write(`${JSON.stringify({ ...s, at: new Date().toISOString() })}\n`);
      }
      await sleep(opts.interval, ctrl.signal);
      if (ctrl.signal.aborted) break;
      s = await status(sql, table, { maxRetainedWalBytes: opts.maxRetainedWal }).catch((err: unknown) => {
        if (err instanceof PgshiftError && /no migration of .* is in progress/.test(err.message)) return null;
        throw err;
      });
      if (!s) {
        const done = `the migration of ${displayName(table)} is over (finalized or aborted)`;
        process.stdout.write(live ? `${done}\n` : `${JSON.stringify({ table: displayName(table), over: true })}\n`);
      }
    }
  } finally {
    if (live) process.stdout.write("\x1b[?25h");
    process.off("SIGINT", stop);
    process.off("SIGTERM", stop);
    await server?.stop();
  }
}

/** Waits `ms`, or less when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}

/** A progress bar `width` characters wide for `percent` (0-100), drawn by cli-progress's bar formatter. */
function bar(percent: number, width = 30): string {
  return cliProgress.Format.BarFormat(Math.max(0, Math.min(1, percent / 100)), {
    barsize: width,
    barCompleteString: "\u2588".repeat(width),
    barIncompleteString: "\u2591".repeat(width),
    barGlue: "",
  });
}

/** The live view of `s`: the lines `status --watch` draws on a terminal. */
export function liveView(s: StatusReport, intervalMs: number): string[] {
  const p = paceFields(s);
  const v = s.lastVerify;
  const row = (k: string, val: string) => `${k.padEnd(12)} ${val}`;
  const lines = [
    `pgshift status ${s.table} (${s.mode} mode), every ${intervalMs / 1000} s; Ctrl-C to quit   ` +
      new Date().toISOString().slice(11, 19),
    row("phase", s.phase),
    row(
      "backfill",
      s.percent === null
        ? "not started"
        : `${bar(s.percent)} ${s.percent.toFixed(1).padStart(5)}%  ${s.rowsCopied} / ${s.rowsEstimated} rows, ` +
            `${s.batches} batches`,
    ),
    row(
      "rate",
      s.rate === null
        ? s.backfillFinishedAt
          ? "- (backfill complete)"
          : "- (no backfill is running)"
        : `${Math.round(s.rate)} rows/s, ETA ${formatDuration(s.etaSeconds)}`,
    ),
  ];
  if (s.ranges.length > 0) lines.push(row("ranges", rangesText(s).split("\n")[0]!));
  if (p.batchRows !== null) {
    lines.push(
      row(
        "batch size",
        `${p.batchRows} rows` +
          (p.batchTargetMs !== null ? `, target ${p.batchTargetMs} ms` : "") +
          (p.lastBatchMs !== null ? `, last batch ${p.lastBatchMs} ms` : ""),
      ),
    );
  }
  lines.push(
    row(
      "throttle",
      p.throttleReason
        ? `WAITING: ${p.throttleReason}${p.throttleSince ? ` (for ${formatDuration(ago(p.throttleSince))})` : ""}`
        : "not throttled",
    ),
  );
  if (p.paused !== null) {
    lines.push(
      row(
        "paused",
        p.paused
          ? `PAUSED${p.pausedBy ? ` by ${p.pausedBy}` : ""}${p.pausedClient ? ` (${p.pausedClient})` : ""}` +
              `${p.pausedSince ? ` since ${p.pausedSince}` : ""} ` +
              `(pgshift resume ${s.table})`
          : "no",
      ),
    );
  }
  if (s.stream) {
    const st = s.stream;
    lines.push(
      row(
        "lag",
        `${formatBytes(st.lagBytes)}, ${st.lagSeconds === null ? "-" : `${st.lagSeconds.toFixed(1)} s`} ` +
          `(slot ${slotState(st)})`,
      ),
    );
  }
  lines.push(
    row(
      "last verify",
      v
        ? `${v.equal ? "equal" : "DIFFERENT"}: ${v.rowsCompared} rows, ${v.missing} missing, ${v.extra} extra, ` +
            `${v.different} different (${v.at})`
        : "never",
    ),
    row("running", runningLine(s)),
    row("mirror", `${s.mirror.ok ? "ok" : "NOT OK"}: ${s.mirror.detail}`),
    row("next", s.next),
  );
  for (const w of s.stream?.warnings ?? []) lines.push(`warning: ${w}`);
  const width = process.stdout.columns ?? 0;
  // Lines cut to the terminal's width: a wrapped line would break the redraw in place.
  return width > 0 ? lines.map((l) => (l.length > width ? `${l.slice(0, width - 1)}\u2026` : l)) : lines;
}

/**
 * Sets the gauges of `m` from a status report (status --watch --metrics-port): rows copied and estimated, rate,
 * ETA, copy complete, phase, lag, paused, throttled, batch size in use, the last verify's differences. Counters
 * (batches, applied changes, lock attempts, ...) come from the process doing the work, not from here.
 */
export function setFromStatus(m: PgshiftMetrics, s: StatusReport): void {
  const t = { table: s.table };
  const p = paceFields(s);
  m.rowsCopied.set(t, s.rowsCopied);
  m.rowsEstimated.set(t, s.rowsEstimated);
  if (s.rate !== null) m.rate.set(t, s.rate);
  else m.rate.remove(t);
  if (s.etaSeconds !== null) m.eta.set(t, s.etaSeconds);
  else m.eta.remove(t);
  m.copyComplete.set(t, s.backfillFinishedAt ? 1 : 0);
  setPhase(m, s.table, s.phase);
  if (s.stream) {
    m.lagBytes.set(t, s.stream.lagBytes);
    if (s.stream.lagSeconds !== null) m.lagSeconds.set(t, s.stream.lagSeconds);
  }
  if (p.paused !== null) m.paused.set(t, p.paused ? 1 : 0);
  if (p.batchRows !== null) m.batchRows.set(t, p.batchRows);
  m.throttled.set({ table: s.table, step: "any" }, p.throttleReason ? 1 : 0);
  if (s.lastVerify) {
    m.verifyEqual.set(t, s.lastVerify.equal ? 1 : 0);
    for (const kind of ["missing", "extra", "different"] as const)
      m.verifyLast.set({ table: s.table, kind }, s.lastVerify[kind]);
  }
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

/**
 * The key ranges of a backfill with workers: how many are done, then one line for each range not done yet (its
 * bounds, rows and batches, checkpoint).
 */
function rangesText(s: StatusReport): string {
  const done = s.ranges.filter((r) => r.done).length;
  return [
    `${done} of ${s.ranges.length} key ranges done`,
    ...s.ranges.filter((r) => !r.done).map((r) => rangeLine(r)),
  ].join("\n");
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
    ...(s.ranges.length > 0 ? [{ ranges: rangesText(s) }] : []),
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
  // Rows per partition, both levels (issue 17): estimates, DEFAULT partitions counted; --json lists every one.
  const shown = s.partitionRows.slice(0, 40);
  if (shown.length > 0) process.stdout.write("rows per partition (estimated; DEFAULT counted):\n");
  for (const p of shown)
    process.stdout.write(`${"  ".repeat(p.level)}${p.name}  ${p.rows}${p.exact ? "" : " ~"}  ${p.bound}\n`);
  if (s.partitionRows.length > shown.length)
    process.stdout.write(`  ... ${s.partitionRows.length - shown.length} more (pgshift status --json lists all)\n`);
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
