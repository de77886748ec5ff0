import cliProgress from "cli-progress";
import { Command, InvalidArgumentError } from "commander";
import { type BackfillOptions, type BackfillProgress, backfill, describeBackfill } from "../backfill/backfill.js";
import { MAX_WORKERS } from "../backfill/ranges.js";
import { backfillGroup, describeGroupBackfill } from "../group/backfill.js";
import { log } from "../log.js";
import type { ThrottleOptions } from "../pace/throttle.js";
import {
  addConnectionOption,
  addGroupOption,
  addObserveOptions,
  type ConnOpts,
  formatDuration,
  groupOf,
  intOption,
  withConnection,
  withTable,
} from "./common.js";

/** Progress on a terminal: a bar with rate and ETA on stderr. Elsewhere: a JSON log line every 2 s. */
export function progressReporter(): { update: (p: BackfillProgress) => void; stop: () => void } {
  if (process.stderr.isTTY) {
    const bar = new cliProgress.SingleBar(
      {
        stream: process.stderr,
        format:
          "backfill |{bar}| {percentage}% {value}/{total} rows | {rate} rows/s | ETA {etaText} | batch {batchRows} " +
          "rows{waitText}",
        hideCursor: true,
        etaBuffer: 20,
      },
      cliProgress.Presets.shades_classic,
    );
    let started = false;
    return {
      update: (p) => {
        const payload = {
          rate: Math.round(p.rate),
          etaText: formatDuration(p.etaSeconds),
          batchRows: p.batchRows,
          waitText: p.waiting ? ` | ${p.waiting.kind === "paused" ? "PAUSED" : "THROTTLED"}: ${p.waiting.reason}` : "",
        };
        if (!started) {
          bar.start(p.rowsEstimated, p.rowsCopied, payload);
          started = true;
        }
        bar.setTotal(p.rowsEstimated);
        bar.update(p.rowsCopied, payload);
      },
      stop: () => bar.stop(),
    };
  }
  let last = 0;
  let lastWait: string | null = null;
  return {
    update: (p) => {
      const now = Date.now();
      const wait = p.waiting ? `${p.waiting.kind}: ${p.waiting.reason}` : null;
      // A wait that starts or ends is reported at once.
      if (now - last < 2000 && !p.done && wait === lastWait) return;
      last = now;
      lastWait = wait;
      log().info(
        {
          rowsCopied: p.rowsCopied,
          rowsEstimated: p.rowsEstimated,
          batches: p.batches,
          rate: Math.round(p.rate),
          etaSeconds: p.etaSeconds === null ? null : Math.round(p.etaSeconds),
          batchRows: p.batchRows,
          paused: p.waiting?.kind === "paused" ? p.waiting.reason : null,
          throttled: p.waiting?.kind === "throttled" ? p.waiting.reason : null,
          waitingSince: p.waiting?.since ?? null,
        },
        "backfill progress",
      );
    },
    stop: () => {},
  };
}

/** The throttle options of backfill and verify, as commander gives them. */
export interface ThrottleCliOptions {
  maxReplicaLagMs?: number;
  maxSlotLagBytes?: number;
  maxActiveSessions?: number;
  throttleQuery?: string;
}

/** `--max-replica-lag-ms`, `--max-slot-lag-bytes`, `--max-active-sessions`, `--throttle-query` (off when unset). */
export function addThrottleOptions(cmd: Command, what: string): Command {
  return cmd
    .option(
      "--max-replica-lag-ms <ms>",
      `wait ${what} while a physical standby replays more than this many ms behind (pg_stat_replication)`,
      intOption("--max-replica-lag-ms"),
    )
    .option(
      "--max-slot-lag-bytes <bytes>",
      `wait ${what} while another logical replication slot is more than this many bytes of WAL behind`,
      intOption("--max-slot-lag-bytes"),
    )
    .option(
      "--max-active-sessions <n>",
      `wait ${what} while more than this many sessions are active (pg_stat_activity; pgshift's own left out)`,
      intOption("--max-active-sessions"),
    )
    .option("--throttle-query <sql>", `wait ${what} while this query's first column is true`);
}

/** The throttle options for the library. */
export function throttleOptions(o: ThrottleCliOptions): ThrottleOptions {
  return {
    ...(o.maxReplicaLagMs !== undefined ? { maxReplicaLagMs: o.maxReplicaLagMs } : {}),
    ...(o.maxSlotLagBytes !== undefined ? { maxSlotLagBytes: o.maxSlotLagBytes } : {}),
    ...(o.maxActiveSessions !== undefined ? { maxActiveSessions: o.maxActiveSessions } : {}),
    ...(o.throttleQuery !== undefined ? { throttleQuery: o.throttleQuery } : {}),
  };
}

/** `--workers`: an integer from 1 to MAX_WORKERS (the server's free connections are checked by backfill). */
function workersOption(value: string): number {
  const n = intOption("--workers", 1)(value);
  if (n > MAX_WORKERS)
    throw new InvalidArgumentError(
      `--workers must be an integer from 1 to ${MAX_WORKERS}, got ${JSON.stringify(value)}`,
    );
  return n;
}

/** --batch-time-ms's default: see docs/commands/backfill.md ("Batch size and latency"). */
export const DEFAULT_BATCH_TIME_MS = 100;

export function backfillCommand(): Command {
  const cmd = new Command("backfill")
    .description("copy existing rows into the shadow in keyed batches; resumes from its checkpoint after a crash")
    .argument("[table]", "table under migration (or --group)")
    .option(
      "--batch-size <rows>",
      "the largest batch, rows (one short transaction each); also the first batch's size",
      intOption("--batch-size", 1),
      10000,
    )
    .option(
      "--batch-time-ms <ms>",
      "target duration of a batch: its row count adapts to it (an application write that meets a row the batch " +
        "holds waits about this long at most); 0: every batch has --batch-size rows",
      intOption("--batch-time-ms"),
      DEFAULT_BATCH_TIME_MS,
    )
    .option("--sleep-ms <ms>", "pause between batches, to throttle the copy", intOption("--sleep-ms"), 0)
    .option(
      "--lock-rows",
      "lock the rows each batch reads (FOR SHARE) instead of cleaning its range afterwards, in either mode: writes " +
        "a row lock into every row of the table; the default copy writes nothing to it",
    )
    .option(
      "--workers <n>",
      "copy disjoint key ranges on this many connections at once, each range from its own checkpoint (and build " +
        `the deferred indexes over as many); 1 to ${MAX_WORKERS}, within the server's free connections`,
      workersOption,
      1,
    )
    .option(
      "--max-lag-ms <ms>",
      "logical mode: return once the stream applies new writes within this many ms",
      intOption("--max-lag-ms", 1),
      1000,
    );
  addThrottleOptions(cmd, "before each batch");
  addGroupOption(
    cmd,
    "every table of this migration group (referenced tables first), then the foreign keys between them",
  );
  cmd.option(
    "--dry-run",
    "print the plan (a batch's statements once, its key values as $n; the index build; the phase changes); change " +
      "nothing",
  );
  addConnectionOption(cmd);
  addObserveOptions(cmd, { metrics: true });
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift backfill orders
  pgshift backfill orders --batch-size 5000 --sleep-ms 50
  pgshift backfill orders --workers 4
  pgshift backfill orders --batch-time-ms 50 --max-replica-lag-ms 2000 --max-active-sessions 40
  pgshift backfill orders --throttle-query "select exists (select from ops.maintenance_window)"
Ctrl-C stops after the current batch; run the command again to continue.
pgshift pause orders (from any terminal) stops it between batches; pgshift resume orders lets it go on.`,
  );
  cmd.action(
    async (
      tableArg: string | undefined,
      opts: ConnOpts &
        ThrottleCliOptions & {
          group?: string;
          batchSize: number;
          batchTimeMs: number;
          sleepMs: number;
          maxLagMs: number;
          lockRows?: boolean;
          dryRun?: boolean;
          workers: number;
        },
    ) => {
      const pace = {
        ...throttleOptions(opts),
        ...(opts.workers > 1 ? { workers: opts.workers } : {}),
        ...(opts.lockRows ? { lockRows: true } : {}),
        ...(opts.batchTimeMs > 0 ? { batchTimeMs: opts.batchTimeMs } : {}),
      };
      const group = groupOf(tableArg, opts, "backfill");
      if (group !== null) return backfillGroupCli(group, opts, pace);
      if (opts.dryRun) {
        const plan = await withTable(tableArg!, opts, (sql, table) =>
          describeBackfill(sql, table, { batchSize: opts.batchSize, maxLagMs: opts.maxLagMs, ...pace }),
        );
        process.stdout.write(plan);
        return;
      }
      const ctrl = new AbortController();
      const onSigint = () => {
        if (ctrl.signal.aborted) process.exit(130);
        ctrl.abort();
        process.stderr.write("\nstopping after the current batch (Ctrl-C again to quit now)...\n");
      };
      process.on("SIGINT", onSigint);
      const reporter = progressReporter();
      try {
        const r = await withTable(tableArg!, opts, (sql, table) =>
          backfill(sql, table, {
            batchSize: opts.batchSize,
            ...pace,
            sleepMs: opts.sleepMs,
            maxLagMs: opts.maxLagMs,
            signal: ctrl.signal,
            onProgress: reporter.update,
          }),
        );
        reporter.stop();
        process.stdout.write(
          r.complete
            ? `backfill complete: ${r.rowsCopied} rows in ${r.batches} batches\nnext: pgshift verify ${tableArg}\n`
            : `backfill stopped at ${r.rowsCopied} rows (checkpoint saved); run pgshift backfill ${tableArg} to ` +
                `continue\n`,
        );
        if (!r.complete) process.exitCode = 130;
      } finally {
        reporter.stop();
        process.off("SIGINT", onSigint);
      }
    },
  );
  return cmd;
}

/** `backfill --group`: every table of the group, then the foreign keys between the shadows (src/group/backfill.ts). */
async function backfillGroupCli(
  group: string,
  opts: ConnOpts & { batchSize: number; sleepMs: number; maxLagMs: number; dryRun?: boolean },
  pace: BackfillOptions,
): Promise<void> {
  const o = { batchSize: opts.batchSize, sleepMs: opts.sleepMs, maxLagMs: opts.maxLagMs, ...pace };
  if (opts.dryRun)
    return void process.stdout.write(await withConnection(opts, (sql) => describeGroupBackfill(sql, group, o)));
  const r = await withConnection(opts, (sql) => backfillGroup(sql, group, o));
  for (const t of r.tables)
    process.stdout.write(`${t.table}: ${t.result.rowsCopied} rows in ${t.result.batches} batches\n`);
  process.stdout.write(
    r.complete
      ? `backfill of group ${group} complete` +
          (r.foreignKeys.length > 0 ? "; foreign keys added between the shadows" : "") +
          "\n" +
          `next: pgshift verify --group ${group}\n`
      : `backfill of group ${group} stopped (checkpoints saved); run pgshift backfill --group ${group} to continue\n`,
  );
  if (!r.complete) process.exitCode = 130;
}
