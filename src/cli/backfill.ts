import cliProgress from "cli-progress";
import { Command } from "commander";
import { type BackfillProgress, backfill, describeBackfill } from "../backfill/backfill.js";
import { log } from "../log.js";
import {
  addConnectionOption,
  addObserveOptions,
  type ConnOpts,
  formatDuration,
  intOption,
  withTable,
} from "./common.js";

/** Progress on a terminal: a bar with rate and ETA on stderr. Elsewhere: a JSON log line every 2 s. */
export function progressReporter(): { update: (p: BackfillProgress) => void; stop: () => void } {
  if (process.stderr.isTTY) {
    const bar = new cliProgress.SingleBar(
      {
        stream: process.stderr,
        format: "backfill |{bar}| {percentage}% {value}/{total} rows | {rate} rows/s | ETA {etaText}",
        hideCursor: true,
        etaBuffer: 20,
      },
      cliProgress.Presets.shades_classic,
    );
    let started = false;
    return {
      update: (p) => {
        const payload = { rate: Math.round(p.rate), etaText: formatDuration(p.etaSeconds) };
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
  return {
    update: (p) => {
      const now = Date.now();
      if (now - last < 2000 && !p.done) return;
      last = now;
      log().info(
        {
          rowsCopied: p.rowsCopied,
          rowsEstimated: p.rowsEstimated,
          batches: p.batches,
          rate: Math.round(p.rate),
          etaSeconds: p.etaSeconds === null ? null : Math.round(p.etaSeconds),
        },
        "backfill progress",
      );
    },
    stop: () => {},
  };
}

export function backfillCommand(): Command {
  const cmd = new Command("backfill")
    .description("copy existing rows into the shadow in keyed batches; resumes from its checkpoint after a crash")
    .argument("<table>", "table under migration")
    .option("--batch-size <rows>", "rows per batch (one short transaction each)", intOption("--batch-size", 1), 10000)
    .option("--sleep-ms <ms>", "pause between batches, to throttle the copy", intOption("--sleep-ms"), 0)
    .option(
      "--max-lag-ms <ms>",
      "logical mode: return once the stream applies new writes within this many ms",
      intOption("--max-lag-ms", 1),
      1000,
    )
    .option(
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
Ctrl-C stops after the current batch; run the command again to continue.`,
  );
  cmd.action(
    async (
      tableArg: string,
      opts: ConnOpts & { batchSize: number; sleepMs: number; maxLagMs: number; dryRun?: boolean },
    ) => {
      if (opts.dryRun) {
        const plan = await withTable(tableArg, opts, (sql, table) =>
          describeBackfill(sql, table, { batchSize: opts.batchSize, maxLagMs: opts.maxLagMs }),
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
        const r = await withTable(tableArg, opts, (sql, table) =>
          backfill(sql, table, {
            batchSize: opts.batchSize,
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
