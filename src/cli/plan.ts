import { Command, Option } from "commander";
import { describeWidenedKey } from "../migration/keys.js";
import { type MigrationPlan, planMigration } from "../migration/plan.js";
import { displayName } from "../names.js";
import { formatPartitionSpec, parsePartitionSpec } from "../partitioning/spec.js";
import { addConnectionOption, type ConnOpts, formatBytes, intOption, printJson, withTable } from "./common.js";

export interface PlanCliOpts extends ConnOpts {
  partitionBy: string;
  mode: "trigger" | "logical";
  premake: number;
  json?: boolean;
}

export function specOptions(cmd: Command): Command {
  return cmd
    .requiredOption(
      "--partition-by <spec>",
      "range:<col>:<day|week|month|quarter|year>, range:<col>:<width>, list:<col> or hash:<col>:<modulus>",
    )
    .addOption(
      new Option("--mode <mode>", "how live writes reach the shadow")
        .choices(["trigger", "logical"])
        .default("trigger"),
    )
    .option(
      "--premake <n>",
      "future partitions past the data and past today (time and integer ranges)",
      intOption("--premake"),
      3,
    );
}

/** Human-readable plan: what was found, what will be created, every statement. */
export function printPlan(plan: MigrationPlan): void {
  const out: string[] = [];
  out.push(`plan for ${displayName(plan.source)}: partition by ${formatPartitionSpec(plan.spec)}, ${plan.mode} mirror`);
  out.push(
    `  found: ~${plan.estimatedRows} rows, ${formatBytes(plan.totalBytes)}, key (${plan.keyColumns.join(", ")})`,
  );
  if (plan.partitions.length > 0) {
    const ps = plan.partitions;
    const shown = ps.length <= 6 ? ps : [...ps.slice(0, 3), null, ...ps.slice(-2)];
    out.push(`  shadow: ${displayName(plan.shadow)} with ${ps.length} partitions, key (${plan.shadowKey.join(", ")})`);
    for (const p of shown) out.push(p ? `    ${p.name}  ${p.bound}` : `    ...`);
    out.push(`  retired name after cutover: ${displayName(plan.retired)}`);
  }
  // The widened keys' warnings are said in full by applicationLines below.
  const keyLines = new Set(plan.widenedKeys.map(describeWidenedKey));
  for (const w of plan.warnings) if (!keyLines.has(w)) out.push(`  warning: ${w}`);
  for (const b of plan.blockers) out.push(`  blocker: ${b}`);
  out.push(...applicationLines(plan));
  if (plan.streamStatements.length > 0) {
    out.push("", `-- first, each on its own (logical mode: the publication, then the replication slot):`);
    for (const s of plan.streamStatements) out.push(`${s};`);
  }
  if (plan.statements.length > 0) {
    out.push("", `-- the ${plan.statements.length} statements start runs, in one transaction:`);
    for (const s of plan.statements) out.push(`${s};`);
  }
  if (plan.afterCopyStatements.length > 0) {
    out.push(
      "",
      `-- after the copy, backfill builds the secondary indexes without blocking writes (${plan.afterCopyStatements.length} statements, each on its own):`,
    );
    for (const s of plan.afterCopyStatements) out.push(`${s};`);
  }
  process.stdout.write(`${out.join("\n")}\n`);
}

/** What the application will notice: widened keys, ON CONFLICT targets, statements found, what finalize changes. */
export function applicationLines(plan: MigrationPlan): string[] {
  const out: string[] = [];
  const keys = plan.widenedKeys;
  if (keys.length === 0) {
    out.push(
      `  unique keys: every one contains ${plan.spec.column}; each stays unique as it is, and every ON CONFLICT target keeps working`,
    );
    return out;
  }
  out.push(
    `  unique keys that lose global uniqueness (${plan.spec.column} is added to them; PostgreSQL requires it on a partitioned table):`,
  );
  for (const k of keys)
    out.push(
      `    ${k.kind} ${k.name}: (${k.columns.join(", ")}) -> (${k.widenedTo.join(", ")})${k.predicate ? ` WHERE ${k.predicate}` : ""}${k.deferrable ? " (deferrable: no ON CONFLICT arbiter before either)" : ""}`,
    );
  const targets = keys.flatMap((k) => k.onConflictTargets);
  if (targets.length > 0) {
    out.push(
      `  ON CONFLICT targets that stop working at cutover (an upsert naming one fails, or no longer arbitrates on the original key):`,
    );
    for (const t of targets) out.push(`    ${t}`);
  }
  if (plan.atFinalize) out.push(`  at finalize: ${plan.atFinalize}`);
  const app = plan.applicationStatements;
  out.push(`  application statements: ${app.detail}`);
  for (const s of app.statements) {
    out.push(
      `    ${s.effect === "fails" ? "FAILS" : "CHANGES"} (${s.calls} call${s.calls === 1 ? "" : "s"}, ${s.target}): ${s.reason}`,
    );
    out.push(`      ${s.query.replace(/\s+/g, " ").slice(0, 300)}${s.query.length > 300 ? " ..." : ""}`);
  }
  out.push(`  start refuses this spec unless --allow-key-extension is given`);
  return out;
}

export function planCommand(): Command {
  const cmd = new Command("plan")
    .description(
      "print every SQL statement start would run and what it found (rows, key, bounds, blockers); changes nothing",
    )
    .argument("<table>", "table to partition, optionally schema-qualified")
    .option("--json", "print the plan as JSON");
  specOptions(cmd);
  addConnectionOption(cmd);
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift plan orders --partition-by range:created_at:month
  pgshift plan sales."Order Items" --partition-by hash:id:16 --json
Exit codes: 0 the table can be migrated, 2 blockers found or error.`,
  );
  cmd.action(async (tableArg: string, opts: PlanCliOpts) => {
    const spec = parsePartitionSpec(opts.partitionBy);
    const plan = await withTable(tableArg, opts, (sql, table) =>
      planMigration(sql, table, { spec, mode: opts.mode, premake: opts.premake }),
    );
    if (opts.json) {
      const { facts: _facts, ...rest } = plan;
      printJson(rest);
    } else printPlan(plan);
    if (plan.blockers.length > 0) process.exitCode = 2;
  });
  return cmd;
}
