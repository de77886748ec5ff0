import { Command } from "commander";
import { type PauseState, pause, resume } from "../pace/pause.js";
import { addConnectionOption, type ConnOpts, printJson, withTable } from "./common.js";

/** pgshift pause or pgshift resume: the same shape, one verb each (resume.ts registers the second). */
export function paceCommandFor(name: "pause" | "resume"): Command {
  const cmd = new Command(name)
    .description(
      name === "pause"
        ? "pause the copy and the verify from any terminal: a running backfill or verify stops before its next batch " +
            "(checkpoint saved), one started later waits; kept in pgshift's state until pgshift resume"
        : "let a paused backfill or verify go on (within half a second), from any terminal",
    )
    .argument("<table>", "table under migration")
    .option("--json", "print the pause state as JSON");
  addConnectionOption(cmd);
  cmd.addHelpText(
    "after",
    name === "pause"
      ? `
Examples:
  pgshift pause orders
  pgshift pause orders --json
  pgshift status orders        # who paused it, from where, since when
  pgshift resume orders
The logical mode's applier (pgshift sync) is not paused: the slot would retain WAL meanwhile.`
      : `
Examples:
  pgshift resume orders
  pgshift resume orders --json`,
  );
  cmd.action(async (tableArg: string, opts: ConnOpts & { json?: boolean }) => {
    const s = await withTable(tableArg, opts, (sql, table) => (name === "pause" ? pause : resume)(sql, table));
    if (opts.json) return printJson(s);
    process.stdout.write(`${describe(s, tableArg)}\n`);
  });
  return cmd;
}

/** The pause state in one line or two, for a terminal. */
function describe(s: PauseState, tableArg: string): string {
  if (s.paused) {
    const who = `by ${s.by ?? "?"}${s.client ? ` (${s.client})` : ""} since ${s.since}`;
    return (
      `${s.changed ? "paused" : "already paused"} ${s.table} ${who}: a running backfill or verify stops before ` +
      `its next batch, one started later waits\nresume with: pgshift resume ${tableArg}`
    );
  }
  return s.changed
    ? `resumed ${s.table}: a waiting backfill or verify goes on`
    : `${s.table} was not paused: nothing to resume`;
}

export function pauseCommand(): Command {
  return paceCommandFor("pause");
}
