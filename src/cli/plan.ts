import { Command, Option } from "commander";
import type { TableFacts } from "../catalog/inspect.js";
import { describeWidenedKey } from "../migration/keys.js";
import { type MigrationPlan, planMigration, predictPlan } from "../migration/plan.js";
import { logicalNames } from "../migration/state.js";
import { displayName } from "../names.js";
import { flattenPartitions, type PartitionDef } from "../partitioning/bounds.js";
import { formatPartitionSpec, formatSpecs, parseSpecs } from "../partitioning/spec.js";
import { DEFAULT_SAMPLE_ROWS, type Prediction } from "../plan/predict.js";
import { check, formatSteps, type Step, transactionStep } from "../plan/steps.js";
import {
  addConnectionOption,
  type ConnOpts,
  formatBytes,
  formatDuration,
  intOption,
  printJson,
  withTable,
} from "./common.js";

export interface PlanCliOpts extends ConnOpts {
  partitionBy: string;
  subpartitionBy?: string;
  mode: "trigger" | "logical";
  premake: number;
  json?: boolean;
  /** `--sample-copy[=rows]`: true without a number. */
  sampleCopy?: number | true;
}

export function specOptions(cmd: Command): Command {
  return cmd
    .requiredOption(
      "--partition-by <spec>",
      "range:<col>:<day|week|month|quarter|year>, range:<col>:<width>, list:<col> or hash:<col>:<modulus>",
    )
    .option(
      "--subpartition-by <spec>",
      "a second level under every partition: the same forms, or hash:<col>:rows=<N> / range:<col>:rows=<N> " +
        "(buckets of about N rows each, sized per partition from the data)",
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

/**
 * What `plan` says first, one line per item for a person (also `summary` in `plan --json`):
 * - creates: the partitioned shadow and its partitions (how many, first and last bound, DEFAULT), the mirror,
 *   pgshift's schema and the DDL guard;
 * - carriedOver: what the partitioned table keeps of the original (owner, columns, keys, indexes, constraints,
 *   grants, row security, replica identity, storage parameters, statistics, comments, CLUSTER mark), as counts;
 * - application: what changes for the application (widened unique keys, ON CONFLICT targets, its statements
 *   from pg_stat_statements, the names at cutover, the other warnings);
 * - blocks: the blockers, or none.
 * Index and constraint names are left to the details and the statements below it.
 */
export interface PlanSummary {
  creates: string[];
  carriedOver: string[];
  application: string[];
  blocks: string[];
}

const plural = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

/** The summary of `plan` (PlanSummary), from the plan and the table's facts. */
export function planSummary(plan: MigrationPlan): PlanSummary {
  const f = plan.facts;
  const creates: string[] = [];
  const carriedOver: string[] = [];
  const application: string[] = [];
  if (plan.blockers.length === 0) {
    creates.push(`partitioned shadow ${displayName(plan.shadow)} ${describePartitions(plan)}`);
    if (plan.mode === "logical" && f) {
      const { slot, publication } = logicalNames(f.oid);
      creates.push(
        `logical mirror: publication ${publication} and replication slot ${slot}, created first; ` +
          `pgshift sync (or backfill, verify and cutover) applies the stream to the shadow`,
      );
    } else {
      creates.push(
        `trigger mirror: a row trigger on ${displayName(plan.source)} calling ${displayName(plan.mirrorFunction)}, ` +
          `which writes each change to the shadow in the application's own transaction`,
      );
    }
    creates.push(`pgshift's schema (if missing): its state, one row in pgshift.migrations, and the TRUNCATE guard`);
    if (plan.ddlGuard === "installs") creates.push(`the DDL guard (3 event triggers, inert when no migration runs)`);
    else if (plan.ddlGuard === "present") creates.push(`no DDL guard: the one in this database is on already`);
    else creates.push(`no DDL guard: creating one needs superuser (see the warning below)`);
  } else creates.push(`nothing: start is refused while anything blocks (below)`);
  if (f) carriedOver.push(...carriedOverLines(plan, f));
  carriedOver.push(...plan.dependents);

  const col = plan.spec.column;
  const keys = plan.widenedKeys;
  if (keys.length === 0) application.push(`no unique key changes: every one contains ${col}`);
  else {
    application.push(
      `${plural(keys.length, "unique key")} ${keys.length === 1 ? "loses" : "lose"} global uniqueness, ` +
        `${col} added: ${keys.map((k) => k.name).join(", ")}`,
    );
    const targets = keys.flatMap((k) => k.onConflictTargets);
    if (targets.length > 0)
      application.push(
        `${plural(targets.length, "ON CONFLICT target")} ${targets.length === 1 ? "stops" : "stop"} working at cutover`,
      );
    const app = plan.applicationStatements;
    if (app.status === "checked") {
      const fails = app.statements.filter((s) => s.effect === "fails").length;
      application.push(
        `pg_stat_statements: ${plural(fails, "statement")} would fail after cutover, ` +
          `${plural(app.statements.length - fails, "other")} would behave otherwise`,
      );
    } else
      application.push(
        `the application's statements were not checked: pg_stat_statements ` +
          `${app.status === "not-installed" ? "is not installed" : "could not be read"} (below)`,
      );
    application.push(`start refuses this spec unless --allow-key-extension is given`);
  }
  if (plan.blockers.length === 0)
    application.push(
      `at cutover the partitioned table takes the name ${displayName(plan.source)}; ` +
        `the original is kept as ${displayName(plan.retired)}, in step, until finalize`,
    );
  const keyLines = new Set(keys.map(describeWidenedKey));
  const others = plan.warnings.filter((w) => !keyLines.has(w) && !w.startsWith("the DDL guard is"));
  if (others.length > 0) application.push(`${plural(others.length, "more warning")}: below`);
  const blocks =
    plan.blockers.length === 0
      ? ["nothing"]
      : [`${plural(plan.blockers.length, "reason")} start refuses for, each on a blocker line below`];
  return { creates, carriedOver, application, blocks };
}

/** "28 partitions from '2024-01-01 ...' to '2026-05-01 ...', plus DEFAULT orders_default", from the bounds. */
function describePartitions(plan: MigrationPlan): string {
  const ps = plan.partitions.filter((p) => !p.isDefault);
  const dflt = plan.partitions.find((p) => p.isDefault);
  const by = `(${formatPartitionSpec(plan.spec)})`;
  const sub = plan.spec.sub;
  const leaves = plan.partitions.flatMap((p) => p.sub?.partitions ?? []);
  const second = sub
    ? `; second level (${formatPartitionSpec(sub)}): ${plural(leaves.length, "partition")} under them, ` +
      `${Math.min(...plan.partitions.map((p) => p.sub?.partitions.length ?? 0))} to ` +
      `${Math.max(...plan.partitions.map((p) => p.sub?.partitions.length ?? 0))} each`
    : "";
  let span = "";
  const first = /^FOR VALUES FROM \((.*)\) TO \((.*)\)$/.exec(ps[0]?.bound ?? "");
  const last = /^FOR VALUES FROM \((.*)\) TO \((.*)\)$/.exec(ps[ps.length - 1]?.bound ?? "");
  if (first && last) span = ` from ${first[1]} to ${last[2]}`;
  else if (ps.length > 0) span = ` (${ps[0]!.name} .. ${ps[ps.length - 1]!.name})`;
  return `${by}: ${plural(ps.length, "partition")}${span}${dflt ? `, plus DEFAULT ${dflt.name}` : ""}${second}`;
}

/**
 * The partitions with their bounds, as a tree: a first-level partition that is partitioned itself is followed by
 * `PARTITION BY ...` and its own partitions, one step further in. A list longer than 6 shows its first 3 and last
 * 2 (the statements below list every one).
 */
export function partitionTreeLines(ps: readonly PartitionDef[], indent: string): string[] {
  const shown = ps.length <= 6 ? ps : [...ps.slice(0, 3), null, ...ps.slice(-2)];
  return shown.flatMap((p) =>
    p
      ? [
          `${indent}${p.name}  ${p.bound}${p.sub ? `  PARTITION BY ${p.sub.method} (${p.sub.column})` : ""}`,
          ...(p.sub ? partitionTreeLines(p.sub.partitions, `${indent}  `) : []),
        ]
      : [`${indent}... (${ps.length - 5} more)`],
  );
}

/** What the partitioned table keeps of the original, as counts (names are in the statements). */
function carriedOverLines(plan: MigrationPlan, f: TableFacts): string[] {
  const out: string[] = [];
  out.push(`owner ${f.owner}, on the parent and every partition`);
  out.push(
    `${plural(f.columns.length, "column")} in the same order: types, collations, defaults, NOT NULL, generated ` +
      `columns, column comments`,
  );
  const identity = f.columns.filter((c) => c.identity !== "" && c.sequence).length;
  const serial = f.columns.filter((c) => c.identity === "" && c.sequence).length;
  if (serial > 0) out.push(`${plural(serial, "serial column")}: the same sequence`);
  if (identity > 0)
    out.push(
      `${plural(identity, "identity column")}: drawn from the original sequence until finalize makes ` +
        `${identity === 1 ? "it an identity column" : "them identity columns"} again`,
    );
  const key = f.indexes.find((i) => i.isPrimary || i.name === f.keyIndexName);
  const kind = key?.isPrimary ? "primary key" : "key";
  const widened = plan.shadowKey.length > plan.keyColumns.length ? ` as (${plan.shadowKey.join(", ")})` : "";
  out.push(`${kind} (${plan.keyColumns.join(", ")})${widened}, created at start`);
  const others = f.indexes.filter((i) => i !== key);
  if (others.length > 0) {
    const unique = others.filter((i) => i.isUnique).length;
    const later = plan.deferredIndexes.length;
    out.push(
      `${plural(others.length, "more index", "more indexes")}${unique > 0 ? ` (${unique} unique)` : ""}: ` +
        [
          ...(later > 0 ? [`${later} built by backfill after the copy, without blocking writes`] : []),
          ...(others.length > later ? [`${others.length - later} at start (deferrable unique)`] : []),
        ].join(", "),
    );
  }
  const notValid = f.checks.filter((c) => !c.valid).length + f.foreignKeys.filter((c) => !c.valid).length;
  const constraints = [
    ...(f.checks.length > 0 ? [plural(f.checks.length, "CHECK constraint")] : []),
    ...(f.foreignKeys.length > 0 ? [plural(f.foreignKeys.length, "foreign key")] : []),
  ];
  if (constraints.length > 0)
    out.push(
      `${constraints.join(", ")}, under ${f.checks.length + f.foreignKeys.length === 1 ? "its name" : "their names"}` +
        (notValid > 0 ? ` (${notValid} NOT VALID, added after the copy)` : ""),
    );
  const grants = f.grants.length + f.columnGrants.length;
  if (grants > 0 || f.ownerRevoked.length > 0)
    out.push(
      `${plural(f.grants.length, "table grant")}, ${plural(f.columnGrants.length, "column grant")}` +
        (f.ownerRevoked.length > 0 ? `, the owner's own revokes (${f.ownerRevoked.join(", ")})` : ""),
    );
  if (f.rowSecurity || f.forceRowSecurity)
    out.push(
      `row level security: ${[f.rowSecurity ? "enabled" : "", f.forceRowSecurity ? "forced" : ""].join(" ").trim()}`,
    );
  const identityKind = { f: "FULL", n: "NOTHING", i: "USING INDEX (after the copy)" }[f.replicaIdentity];
  if (identityKind) out.push(`replica identity ${identityKind}`);
  if (f.reloptions.length > 0) out.push(`storage parameters on each partition: ${f.reloptions.join(", ")}`);
  const perColumn = f.columns.filter((c) => c.statisticsTarget !== null || c.options.length > 0).length;
  if (perColumn > 0) out.push(`statistics targets and n_distinct of ${plural(perColumn, "column")}`);
  if (f.statistics.length > 0) out.push(`${plural(f.statistics.length, "extended statistics object")}`);
  if (f.comment !== null) out.push(`the table comment`);
  if (f.indexes.some((i) => i.isClustered)) out.push(`the CLUSTER mark, on each partition's copy of the index`);
  return out;
}

/**
 * The steps start runs (plan.steps, what start --dry-run prints and startMigration runs), with the parts of
 * start's transaction marked for a reader by comment-only steps (checks without a run: they print as `--`
 * lines and run nothing): the table's own DDL first, then pgshift's own objects (plan.tableStatementCount).
 * statementsOf() of the result is statementsOf(plan.steps).
 */
export function planSteps(plan: MigrationPlan): Step[] {
  const t = plan.transaction;
  const n = plan.tableStatementCount;
  const own = t.steps.length - n;
  const marked = transactionStep(
    [
      check(`the ${t.steps.length} statements start runs, in this transaction:`),
      check(`the table's own DDL: the shadow, its partitions, key, constraints, grants (${n}):`),
      ...t.steps.slice(0, n),
      check(
        `pgshift's own objects: its schema, the DDL guard, identity defaults, TRUNCATE guard, mirror, ` +
          `the migration's row (${own}):`,
      ),
      ...t.steps.slice(n),
    ],
    {
      ...(t.modes !== undefined ? { modes: t.modes } : {}),
      ...(t.lockTimeoutMs !== undefined ? { lockTimeoutMs: t.lockTimeoutMs } : {}),
      ...(t.why !== undefined ? { why: t.why } : {}),
    },
  );
  return plan.steps.map((s) => (s === t ? marked : s));
}

/**
 * Human-readable plan: the summary (planSummary), then what was found (rows, key, partitions, warnings,
 * blockers, what the application will notice), then the steps start runs as start --dry-run prints them
 * (formatSteps of planSteps: the stream's steps in logical mode, then start's transaction, BEGIN, SET LOCAL
 * lock_timeout, the table's own DDL, pgshift's own objects, COMMIT), then what backfill runs after the copy.
 */
export function printPlan(plan: MigrationPlan, prediction: Prediction | null = null): void {
  const out: string[] = [];
  out.push(`plan for ${displayName(plan.source)}: partition by ${formatSpecs(plan.spec)}, ${plan.mode} mirror`);
  const summary = planSummary(plan);
  const section = (title: string, lines: string[]) => {
    if (lines.length === 1) out.push(`  ${title}: ${lines[0]}`);
    else if (lines.length > 1) out.push(`  ${title}:`, ...lines.map((l) => `    - ${l}`));
  };
  section("creates", summary.creates);
  section("carries over", summary.carriedOver);
  section("changes for the application", summary.application);
  section("blocks", summary.blocks);
  out.push("", "details:");
  out.push(
    `  found: ~${plan.estimatedRows} rows, ${formatBytes(plan.totalBytes)}, key (${plan.keyColumns.join(", ")})`,
  );
  if (prediction) out.push(...predictionLines(prediction));
  if (plan.partitions.length > 0) {
    const ps = plan.partitions;
    const all = flattenPartitions(ps).length;
    const levels = all > ps.length ? ` (${ps.length} first-level)` : "";
    out.push(
      `  shadow: ${displayName(plan.shadow)} with ${all} partitions${levels}, key (${plan.shadowKey.join(", ")})`,
    );
    out.push(...partitionTreeLines(ps, "    "));
    out.push(`  retired name after cutover: ${displayName(plan.retired)}`);
  }
  // The widened keys' warnings are said in full by applicationLines below.
  const keyLines = new Set(plan.widenedKeys.map(describeWidenedKey));
  for (const w of plan.warnings) if (!keyLines.has(w)) out.push(`  warning: ${w}`);
  for (const b of plan.blockers) out.push(`  blocker: ${b}`);
  out.push(...applicationLines(plan));
  if (plan.steps.length > 0) {
    out.push("", `-- what start runs, step by step (start --dry-run prints these very steps):`);
    out.push(formatSteps(planSteps(plan)).trimEnd());
  }
  if (plan.afterCopyStatements.length > 0) {
    out.push(
      "",
      `-- after the copy, backfill builds the secondary indexes without blocking writes ` +
        `(${plan.afterCopyStatements.length} statements, each on its own):`,
    );
    for (const s of plan.afterCopyStatements) out.push(`${s};`);
  }
  if (prediction?.sample) {
    out.push("", `-- the sample copy plan ran for its prediction (--sample-copy), rolled back: nothing of it stays`);
    for (const s of prediction.sample.statements) out.push(`${s};`);
  }
  process.stdout.write(`${out.join("\n")}\n`);
}

/** A duration for a person: "850 ms" under 10 s, else "12s", "3m05s", "1h02m". */
function formatMs(ms: number): string {
  return ms < 10_000 ? `${Math.round(ms)} ms` : formatDuration(ms / 1000);
}

/**
 * The prediction's lines in plan's details: what the backfill takes (time, disk, WAL, the slot's WAL in logical
 * mode), the free disk, which inputs it came from, what it leaves out, and its warnings.
 */
export function predictionLines(p: Prediction): string[] {
  const from = p.source === "sample" ? "a sample copy" : "statistics; --sample-copy measures a sample";
  const out = [
    `  predicts (from ${from}): backfill ${formatMs(p.durationMs)} (copy ${formatMs(p.copyMs)}, index builds ` +
      `${formatMs(p.indexBuildMs)}, ANALYZE ${formatMs(p.analyzeMs)}), disk ${formatBytes(p.diskBytes)} ` +
      `(table ${formatBytes(p.heapBytes)}, indexes ${formatBytes(p.indexBytes)}), WAL ${formatBytes(p.walBytes)}`,
  ];
  if (p.slotRetainedBytes !== null)
    out.push(
      `    the replication slot may retain ${formatBytes(p.slotRetainedBytes)} of WAL by the end of the backfill if ` +
        `nothing consumes it (pgshift sync not running): the server writes ` +
        `${formatBytes(p.serverWalBytesPerSecond ?? 0)}/s now`,
    );
  out.push(
    p.freeDisk.known
      ? `    free disk: ${formatBytes(p.freeDisk.bytes)} at ${p.freeDisk.path} (${p.freeDisk.how})`
      : `    free disk: unknown: ${p.freeDisk.why}`,
  );
  for (const i of p.inputs) out.push(`    from ${i}`);
  for (const x of p.excludes) out.push(`    not included: ${x}`);
  for (const w of p.warnings) out.push(`    warning: ${w}`);
  return out;
}

/** What the application will notice: widened keys, ON CONFLICT targets, statements found, what finalize changes. */
export function applicationLines(plan: MigrationPlan): string[] {
  const out: string[] = [];
  const keys = plan.widenedKeys;
  if (keys.length === 0) {
    out.push(
      `  unique keys: every one contains ${plan.spec.column}; each stays unique as it is, and every ON CONFLICT ` +
        `target keeps working`,
    );
    return out;
  }
  out.push(
    `  unique keys that lose global uniqueness (${plan.spec.column} is added to them; PostgreSQL requires it on a ` +
      `partitioned table):`,
  );
  for (const k of keys)
    out.push(
      `    ${k.kind} ${k.name}: (${k.columns.join(", ")}) -> (${k.widenedTo.join(", ")})${
        k.predicate ? ` WHERE ${k.predicate}` : ""
      }${k.deferrable ? " (deferrable: no ON CONFLICT arbiter before either)" : ""}`,
    );
  const targets = keys.flatMap((k) => k.onConflictTargets);
  if (targets.length > 0) {
    out.push(
      `  ON CONFLICT targets that stop working at cutover (an upsert naming one fails, or no longer arbitrates on ` +
        `the original key):`,
    );
    for (const t of targets) out.push(`    ${t}`);
  }
  if (plan.atFinalize) out.push(`  at finalize: ${plan.atFinalize}`);
  const app = plan.applicationStatements;
  out.push(`  application statements: ${app.detail}`);
  for (const s of app.statements) {
    out.push(
      `    ${s.effect === "fails" ? "FAILS" : "CHANGES"} (${s.calls} ` +
        `call${s.calls === 1 ? "" : "s"}, ${s.target}): ${s.reason}`,
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
    .option("--json", "print the plan as JSON")
    .option(
      "--sample-copy [rows]",
      `predict from a timed copy of about this many rows (default ${DEFAULT_SAMPLE_ROWS}) into a scratch table, ` +
        "in a transaction that is rolled back (it reads those rows without locking them, and writes WAL); " +
        "without it, from the table's statistics alone",
      intOption("--sample-copy", 1),
    );
  specOptions(cmd);
  addConnectionOption(cmd);
  cmd.addHelpText(
    "after",
    `
Examples:
  pgshift plan orders --partition-by range:created_at:month
  pgshift plan sales."Order Items" --partition-by hash:id:16 --json
  pgshift plan orders --partition-by range:created_at:month --sample-copy=50000
Exit codes: 0 the table can be migrated, 2 blockers found or error.`,
  );
  cmd.action(async (tableArg: string, opts: PlanCliOpts) => {
    const spec = parseSpecs(opts.partitionBy, opts.subpartitionBy);
    const sampleRows =
      opts.sampleCopy === undefined ? null : opts.sampleCopy === true ? DEFAULT_SAMPLE_ROWS : opts.sampleCopy;
    const { plan, prediction } = await withTable(tableArg, opts, async (sql, table) => {
      const plan = await planMigration(sql, table, { spec, mode: opts.mode, premake: opts.premake });
      return { plan, prediction: await predictPlan(sql, plan, { sampleRows }) };
    });
    if (opts.json) {
      const { facts: _facts, ...rest } = plan;
      printJson({ ...rest, summary: planSummary(plan), prediction });
    } else printPlan(plan, prediction);
    if (plan.blockers.length > 0) process.exitCode = 2;
  });
  return cmd;
}
