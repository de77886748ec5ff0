import { Command, Option } from "commander";
import { planMigration, type MigrationPlan } from "../migration/plan.js";
import { displayName } from "../names.js";
import { parsePartitionSpec, formatPartitionSpec } from "../partitioning/spec.js";
import { addConnectionOption, formatBytes, intOption, printJson, withTable, type ConnOpts } from "./common.js";

export interface PlanCliOpts extends ConnOpts {
  partitionBy: string;
  mode: "trigger" | "logical";
  premake: number;
  json?: boolean;
}

export function specOptions(cmd: Command): Command {
  return cmd
    .requiredOption("--partition-by <spec>", "range:<col>:<day|week|month|quarter|year>, range:<col>:<width>, list:<col> or hash:<col>:<modulus>")
    .addOption(new Option("--mode <mode>", "how live writes reach the shadow").choices(["trigger", "logical"]).default("trigger"))
    .option("--premake <n>", "future partitions past the data and past today (time and integer ranges)", intOption("--premake"), 3);
}

/** Human-readable plan: what was found, what will be created, every statement. */
export function printPlan(plan: MigrationPlan): void {
  const out: string[] = [];
  out.push(`plan for ${displayName(plan.source)}: partition by ${formatPartitionSpec(plan.spec)}, ${plan.mode} mirror`);
  out.push(`  found: ~${plan.estimatedRows} rows, ${formatBytes(plan.totalBytes)}, key (${plan.keyColumns.join(", ")})`);
  if (plan.partitions.length > 0) {
    const ps = plan.partitions;
    const shown = ps.length <= 6 ? ps : [...ps.slice(0, 3), null, ...ps.slice(-2)];
    out.push(`  shadow: ${displayName(plan.shadow)} with ${ps.length} partitions, key (${plan.shadowKey.join(", ")})`);
    for (const p of shown) out.push(p ? `    ${p.name}  ${p.bound}` : `    ...`);
    out.push(`  retired name after cutover: ${displayName(plan.retired)}`);
  }
  for (const w of plan.warnings) out.push(`  warning: ${w}`);
  for (const b of plan.blockers) out.push(`  blocker: ${b}`);
  if (plan.streamStatements.length > 0) {
    out.push("", `-- first, each on its own (logical mode: the publication, then the replication slot):`);
    for (const s of plan.streamStatements) out.push(s + ";");
  }
  if (plan.statements.length > 0) {
    out.push("", `-- the ${plan.statements.length} statements start runs, in one transaction:`);
    for (const s of plan.statements) out.push(s + ";");
  }
  if (plan.afterCopyStatements.length > 0) {
    out.push("", `-- after the copy, backfill builds the secondary indexes without blocking writes (${plan.afterCopyStatements.length} statements, each on its own):`);
    for (const s of plan.afterCopyStatements) out.push(s + ";");
  }
  process.stdout.write(out.join("\n") + "\n");
}

export function planCommand(): Command {
  const cmd = new Command("plan")
    .description("print every SQL statement start would run and what it found (rows, key, bounds, blockers); changes nothing")
    .argument("<table>", "table to partition, optionally schema-qualified")
    .option("--json", "print the plan as JSON");
  specOptions(cmd);
  addConnectionOption(cmd);
  cmd.addHelpText("after", `
Examples:
  pgshift plan orders --partition-by range:created_at:month
  pgshift plan sales."Order Items" --partition-by hash:id:16 --json
Exit codes: 0 the table can be migrated, 2 blockers found or error.`);
  cmd.action(async (tableArg: string, opts: PlanCliOpts) => {
    const spec = parsePartitionSpec(opts.partitionBy);
    const plan = await withTable(tableArg, opts, (sql, table) => planMigration(sql, table, { spec, mode: opts.mode, premake: opts.premake }));
    if (opts.json) {
      const { facts: _facts, ...rest } = plan;
      printJson(rest);
    } else printPlan(plan);
    if (plan.blockers.length > 0) process.exitCode = 2;
  });
  return cmd;
}
