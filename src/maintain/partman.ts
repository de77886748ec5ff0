/**
 * Hand-off to pg_partman: registers a table pgshift partitioned with pg_partman (partman.create_parent), so that
 * partman.run_maintenance_proc() keeps its partitions from then on, as the ERP plans that use pg_partman do.
 *
 * pg_partman finds a child table by its name (create_partition_time skips a partition whose name exists), so the
 * existing partitions must carry the names it gives: `<table>_p<suffix>` (partman.check_name_length), the suffix
 * being to_char(lower bound, format). pg_partman 4.x: yearly `YYYY`, quarterly `YYYY"q"Q`, monthly `YYYY_MM`,
 * weekly `IYYY"w"IW`, daily `YYYY_MM_DD`, integers the lower bound; pgshift's month, day and year names are the same,
 * its quarter and week names are not. pg_partman 5.x: `YYYYMMDD` for every interval of a day or more. The hand-off
 * renames the partitions whose names differ (ALTER TABLE ... RENAME, in the hand-off's transaction).
 * pg_partman 4.x's create_parent always creates and attaches `<table>_default`: the hand-off detaches and drops
 * pgshift's DEFAULT first, which must be empty (run pgshift maintain first); 5.x is told p_default_table := false
 * and keeps it. pg_partman computes time boundaries in the session's TimeZone: pgshift's bounds are UTC, so
 * run_maintenance must run with TimeZone UTC (ALTER DATABASE ... SET timezone = 'UTC', or for the role of cron).
 * Sources: pg_partman's docs (pg_partman.md: create_parent, "Child Table Naming"), its 4.7 and 5.x sql/functions.
 */
import type { AnySql, Sql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import type { PartitionSpec, TimeInterval } from "../partitioning/spec.js";
import { check, runSteps, type Step, statement, statementsOf, transactionStep } from "../plan/steps.js";
import { readLayout } from "./partitions.js";
import { loadPartitioned, settingsSql } from "./registry.js";

const P4_INTERVAL: Record<TimeInterval, string> = {
  year: "yearly",
  quarter: "quarterly",
  month: "monthly",
  week: "weekly",
  day: "daily",
};
const P4_FORMAT: Record<TimeInterval, string> = {
  year: "YYYY",
  quarter: 'YYYY"q"Q',
  month: "YYYY_MM",
  week: 'IYYY"w"IW',
  day: "YYYY_MM_DD",
};
const P5_INTERVAL: Record<TimeInterval, string> = {
  year: "1 year",
  quarter: "3 months",
  month: "1 month",
  week: "1 week",
  day: "1 day",
};

/** pg_partman installed in this database: its schema and major version; null when it is not. */
export async function partmanInstalled(sql: AnySql): Promise<{ schema: string; major: number } | null> {
  const r = await sql`
    select n.nspname::text as schema, e.extversion::text as version
      from pg_extension e join pg_namespace n on n.oid = e.extnamespace where e.extname = 'pg_partman'`;
  if (r.length === 0) return null;
  return { schema: String(r[0]!.schema), major: Number.parseInt(String(r[0]!.version), 10) };
}

/**
 * Refuses (exit 2, nothing changed) a hand-off that cannot be made: pg_partman not installed, or a spec that is
 * not a time or integer range (pg_partman keeps ranges only).
 */
export async function requireHandOff(sql: AnySql, table: QualifiedName, spec: PartitionSpec): Promise<void> {
  if (!(await partmanInstalled(sql)))
    throw new PgshiftError(`cannot hand ${displayName(table)} off to pg_partman: the extension is not installed`, {
      hint: "install it (Debian: postgresql-NN-partman), CREATE EXTENSION pg_partman SCHEMA partman, then again",
    });
  if (spec.strategy !== "range" && spec.strategy !== "range-int")
    throw new PgshiftError(
      `cannot hand ${displayName(table)} off to pg_partman: it keeps time and integer ranges, not ${spec.strategy}`,
      { hint: "keep the partitions with pgshift maintain instead" },
    );
}

/**
 * The plan of the hand-off of `table` (finalized by pgshift) to pg_partman: one transaction with a short
 * lock_timeout (retried): lock the table, rename the partitions to pg_partman's names, with 4.x detach and drop
 * pgshift's empty DEFAULT, partman.create_parent (premake and retention from pgshift's settings), record it.
 * @throws PgshiftError as requireHandOff; when DEFAULT holds rows (run pgshift maintain first).
 */
export async function handOffPlan(
  sql: Sql,
  table: QualifiedName,
  opts: { lockTimeoutMs?: number; premake?: number } = {},
): Promise<Step[]> {
  const row = await loadPartitioned(sql, table, { upgrade: false });
  await requireHandOff(sql, table, row.spec);
  const pm = (await partmanInstalled(sql))!;
  const spec = row.spec;
  const layout = await readLayout(sql, table, spec);
  const s = quoteIdent(pm.schema);
  const parent = quoteQualified(table);
  const steps: Step[] = [statement(`LOCK TABLE ${parent} IN ACCESS EXCLUSIVE MODE`)];
  const d = layout.defaultPartition;
  if (d) {
    const dq = quoteQualified({ schema: table.schema, name: d });
    steps.push(
      check(`refuse if ${d} holds rows (pgshift maintain moves them into partitions)`, async (tx) => {
        const r = await tx.unsafe(`SELECT count(*)::bigint AS n FROM ${dq}`);
        if (Number(r[0]!.n) > 0)
          throw new PgshiftError(`cannot hand ${displayName(table)} off to pg_partman: ${d} holds rows`, {
            hint: `run pgshift maintain ${displayName(table)} first (it moves them into partitions), then again`,
          });
      }),
    );
  }
  // The names pg_partman gives, from each range partition's lower bound (computed by pg_partman's own function).
  const ranges = layout.partitions.filter((p) => !p.isDefault && p.lo !== null);
  const lows = ranges.map((p) => /^FOR VALUES FROM \('?([^')]*)'?\)/.exec(p.bound)?.[1] ?? "");
  const t = layout.columnType;
  const suffix =
    spec.strategy === "range"
      ? `to_char((v::${t})${t === "timestamptz" ? " AT TIME ZONE 'UTC'" : ""}, ${quoteLiteral(
          pm.major >= 5 ? "YYYYMMDD" : P4_FORMAT[spec.interval],
        )})`
      : "v";
  const names = lows.length
    ? (
        await sql.unsafe(
          `SELECT ${s}.check_name_length($1, ${suffix}, true) AS n FROM unnest($2::text[]) WITH ORDINALITY x(v, i)
            ORDER BY i`,
          [table.name, lows],
        )
      ).map((r) => String(r.n))
    : [];
  ranges.forEach((p, i) => {
    if (names[i] && names[i] !== p.name)
      steps.push(
        statement(
          `ALTER TABLE ${quoteQualified({ schema: table.schema, name: p.name })} RENAME TO ${quoteIdent(names[i]!)}`,
        ),
      );
  });
  if (d && pm.major < 5) {
    const dq = quoteQualified({ schema: table.schema, name: d });
    steps.push(statement(`ALTER TABLE ${parent} DETACH PARTITION ${dq}`), statement(`DROP TABLE ${dq}`));
  }
  let first = -1;
  ranges.forEach((p, i) => {
    if (first < 0 || p.lo! < ranges[first]!.lo!) first = i;
  });
  const oldest = first >= 0 ? lows[first]! : null;
  const interval =
    spec.strategy === "range"
      ? (pm.major >= 5 ? P5_INTERVAL : P4_INTERVAL)[spec.interval]
      : spec.strategy === "range-int"
        ? spec.width
        : "";
  const args = [
    `p_parent_table := ${quoteLiteral(`${table.schema}.${table.name}`)}`,
    `p_control := ${quoteLiteral(spec.column)}`,
    `p_type := ${quoteLiteral(pm.major >= 5 ? "range" : "native")}`,
    `p_interval := ${quoteLiteral(interval)}`,
    `p_premake := ${opts.premake ?? row.premake}`,
    ...(oldest ? [`p_start_partition := ${quoteLiteral(oldest)}`] : []),
    ...(pm.major >= 5 ? ["p_default_table := false"] : []),
    ...(pm.major >= 5 && spec.strategy === "range" && (spec.interval === "week" || spec.interval === "quarter")
      ? [`p_date_trunc_interval := ${quoteLiteral(spec.interval)}`]
      : []),
  ];
  steps.push(statement(`SELECT ${s}.create_parent(${args.join(", ")})`));
  if (row.retention)
    steps.push(
      statement(
        `UPDATE ${s}.part_config SET retention = ${quoteLiteral(row.retention)}, retention_keep_table = ${
          row.retention_keep_table
        } WHERE parent_table = ${quoteLiteral(`${table.schema}.${table.name}`)}`,
      ),
    );
  steps.push(statement(settingsSql(table, { handOff: "pg_partman" })!));
  return [
    transactionStep(steps, {
      lockTimeoutMs: opts.lockTimeoutMs ?? 500,
      why: `hand ${displayName(table)} off to pg_partman ${pm.major}.x`,
    }),
  ];
}

/** Runs handOffPlan's steps (or only returns them with `dryRun`). */
export async function handOff(
  sql: Sql,
  table: QualifiedName,
  opts: { lockTimeoutMs?: number; retries?: number; premake?: number; dryRun?: boolean } = {},
): Promise<{ steps: Step[]; statements: string[] }> {
  const steps = await handOffPlan(sql, table, opts);
  if (!opts.dryRun) await runSteps(sql, steps, { lockRetry: { retries: opts.retries } });
  return { steps, statements: statementsOf(steps) };
}
