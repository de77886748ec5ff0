#!/usr/bin/env node
import { Command, CommanderError } from "commander";
import { explain, isConnectionLoss } from "../errors.js";
import { endObservation } from "../observe/session.js";
import { setCommandName } from "./common.js";

/**
 * The commands, in the order `pgshift --help` lists them, each loaded only when it is needed: a command's module
 * brings what it runs (the copy, verify, the stream of logical mode, the status display), and loading every one
 * of them for each run cost a few hundred ms (docs/benchmarks.md, "overhead per run").
 */
const COMMANDS: Record<string, () => Promise<Command>> = {
  plan: async () => (await import("./plan.js")).planCommand(),
  start: async () => (await import("./start.js")).startCommand(),
  backfill: async () => (await import("./backfill.js")).backfillCommand(),
  sync: async () => (await import("./sync.js")).syncCommand(),
  status: async () => (await import("./status.js")).statusCommand(),
  verify: async () => (await import("./verify.js")).verifyCommand(),
  pause: async () => (await import("./pause.js")).pauseCommand(),
  resume: async () => (await import("./resume.js")).resumeCommand(),
  cutover: async () => (await import("./cutover.js")).cutoverCommand(),
  "swap-back": async () => (await import("./cutover.js")).swapBackCommand(),
  finalize: async () => (await import("./finish.js")).finalizeCommand(),
  abort: async () => (await import("./finish.js")).abortCommand(),
  maintain: async () => (await import("./maintain.js")).maintainCommand(),
  demo: async () => (await import("./demo.js")).demoCommand(),
};

// A reader that went away (`pgshift plan ... | head -1`): what is left to print is dropped, and the command
// ends as it would have (a step that changes the database is not cut short because nobody reads its output).
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (err: NodeJS.ErrnoException) => {
    if (err.code === "EPIPE" || err.code === "ERR_STREAM_DESTROYED") return;
    throw err;
  });
}

/** The subcommand being parsed, for the hint of a usage error. */
let subcommand: string | undefined;

/**
 * Commander's usage errors (unknown option or command, bad option value, missing argument) as every other
 * refusal: `pgshift: error: <message>` and a hint on stderr, exit 2. Commander prints nothing itself.
 */
function reportUsageError(err: CommanderError): void {
  const [first = err.message, ...rest] = err.message.replace(/^error: /, "").split("\n");
  const suggestion = rest
    .join(" ")
    .trim()
    .replace(/^\((.*)\)$/, "$1");
  const help =
    `pgshift ${subcommand ? `${subcommand} ` : ""}--help lists ` +
    `the ${err.code === "commander.unknownCommand" ? "commands" : "options"}`;
  process.stderr.write(`pgshift: error: ${first}\n`);
  process.stderr.write(`pgshift: hint: ${suggestion ? `${suggestion.replace(/^Did/, "did")} (${help})` : help}\n`);
}

const program = new Command("pgshift")
  .description("Move a big, busy PostgreSQL table into a partitioned table with no downtime")
  .version("0.1.0")
  .exitOverride()
  .configureOutput({ outputError: () => {} })
  .hook("preSubcommand", (_program, sub) => {
    subcommand = sub.name();
    setCommandName(sub.name());
  })
  .addHelpText(
    "after",
    `
The flow:
  pgshift plan      orders --partition-by range:created_at:month   # what would happen, changes nothing
  pgshift start     orders --partition-by range:created_at:month --allow-key-extension
                                                                   # shadow + mirror (--mode logical: slot + stream);
                                                                   # the flag: the key (id) becomes (id, ` +
      `created_at), see plan
  pgshift sync      orders                                         # logical mode: apply the stream until cutover
  pgshift backfill  orders                                         # copy existing rows in batches
  pgshift verify    orders                                         # compare, exit 1 on differences
  pgshift cutover   orders                                         # swap names (milliseconds)
  pgshift swap-back orders                                         # undo, losing nothing
  pgshift finalize  orders --yes                                   # drop the retired table
Connection: --url, else DATABASE_URL, completed as psql would: PGSERVICE, PGHOST, PGPORT, PGUSER, PGPASSWORD,
  PGDATABASE, PGSSLMODE, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY, PGCONNECT_TIMEOUT, PGAPPNAME, ~/.pgpass.
Exit codes: 0 ok, 1 verify found differences, 2 error (nothing changed), 130 interrupted.`,
  );

// The command named first (`pgshift backfill orders ...`) is the only one loaded, and none for --version;
// anything else (no command, --help, `help`, a misspelt command that commander suggests a name for) loads them all.
const named = process.argv[2];
const wanted =
  named === "--version" || named === "-V"
    ? []
    : named !== undefined && Object.hasOwn(COMMANDS, named)
      ? [COMMANDS[named]!]
      : Object.values(COMMANDS);
for (const c of await Promise.all(wanted.map((load) => load()))) {
  program.addCommand(c.exitOverride().configureOutput({ outputError: () => {} }));
}

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    // --help and --version exit 0 (and `pgshift` alone, which printed the help, 2); usage errors (unknown
    // option, bad value, missing argument) print one error line and a hint, exit 2.
    if (!["commander.helpDisplayed", "commander.help", "commander.version"].includes(err.code)) reportUsageError(err);
    process.exitCode = err.exitCode === 0 ? 0 : 2;
  } else {
    const e = explain(err);
    process.stderr.write(`pgshift: error: ${e.message}\n`);
    if (e.hint) process.stderr.write(`pgshift: hint: ${e.hint}\n`);
    if (process.env.PGSHIFT_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    process.exitCode = e.exitCode;
    // The failure event and the on-failure hook, then the metrics endpoint stopped (src/observe/session.ts).
    await endObservation(err);
    // A lost session may leave work of the command waiting for ever (see withTable): the state is in the
    // database, so end here, as a crash would, once the error is written.
    if (isConnectionLoss(err)) process.exit(e.exitCode);
  }
}
