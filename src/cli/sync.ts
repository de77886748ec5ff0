import { Command } from "commander";
import { log } from "../log.js";
import { type SyncTick, sync } from "../mirror/sync.js";
import { addConnectionOption, addObserveOptions, type ConnOpts, formatBytes, withTable } from "./common.js";

export function syncCommand(): Command {
  const cmd = new Command("sync")
    .description(
      "logical mode: apply the replication stream to the shadow until stopped (Ctrl-C), showing applied " +
        "LSN, lag and rate",
    )
    .argument("<table>", "table under migration (started with --mode logical)");
  cmd.option(
    "--no-loop",
    "exit (code 2) when the connection to the server is lost, instead of connecting again (as " +
      "pg_recvlogical --no-loop)",
  );
  addConnectionOption(cmd);
  addObserveOptions(cmd, { metrics: true });
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift sync orders                 # leave it running in a terminal (or under systemd) until cutover
  pgshift sync orders 2>sync.log &    # JSON lines when not on a terminal
  pgshift sync orders --no-loop       # let a supervisor restart it instead
backfill, verify and cutover work whether or not sync runs: they wait for it to catch up.
When the server restarts or the connection drops, sync connects again (0.5 s, doubling up to 5 s between
attempts) and goes on from the slot's confirmed position: nothing is lost or applied twice.
It exits 0 by itself once the migration is cut over or aborted.`,
  );
  cmd.action(async (tableArg: string, opts: ConnOpts & { loop: boolean }) => {
    const ctrl = new AbortController();
    const onSigint = () => {
      if (ctrl.signal.aborted) process.exit(130);
      ctrl.abort();
    };
    process.on("SIGINT", onSigint);
    process.on("SIGTERM", onSigint);
    const tty = Boolean(process.stderr.isTTY);
    let lastLog = 0;
    const onTick = (t: SyncTick) => {
      const line =
        `applied ${t.appliedLsn} | ` +
        `lag ${formatBytes(t.lagBytes)}, ${t.lagSeconds === null ? "-" : `${t.lagSeconds.toFixed(1)} s`} ` +
        `| ${Math.round(t.changesPerSecond)} changes/s | ${t.transactions} transactions`;
      if (tty) process.stderr.write(`\r\x1b[2K${line}`);
      else if (Date.now() - lastLog >= 5000) {
        lastLog = Date.now();
        log().info(t, "sync progress");
      }
    };
    try {
      const r = await withTable(
        tableArg,
        opts,
        (sql, table) => sync(sql, table, { signal: ctrl.signal, onTick, loop: opts.loop }),
        { keepOnLoss: opts.loop },
      );
      if (tty) process.stderr.write("\n");
      process.stdout.write(
        r.reason === "stopped"
          ? "sync stopped; the slot keeps every change not applied yet\n"
          : `sync finished: the migration is ${r.reason}\n`,
      );
    } finally {
      process.off("SIGINT", onSigint);
      process.off("SIGTERM", onSigint);
    }
  });
  return cmd;
}
