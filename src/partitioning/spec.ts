import { z } from "zod";
import { PgshiftError } from "../errors.js";
import { readQuotedIdentifier } from "../names.js";

export const TIME_INTERVALS = ["day", "week", "month", "quarter", "year"] as const;
export type TimeInterval = (typeof TIME_INTERVALS)[number];

const RangeTime = z.object({
  strategy: z.literal("range"),
  column: z.string().min(1),
  interval: z.enum(TIME_INTERVALS),
});
const RangeInt = z.object({
  strategy: z.literal("range-int"),
  column: z.string().min(1),
  width: z.string().regex(/^[1-9][0-9]*$/),
});
const List = z.object({ strategy: z.literal("list"), column: z.string().min(1) });
const Hash = z.object({
  strategy: z.literal("hash"),
  column: z.string().min(1),
  modulus: z.number().int().min(2).max(1024),
});
/** `rows` is a decimal string: the most rows a bucket should hold at migration time. */
const Rows = z.string().regex(/^[1-9][0-9]*$/);

/**
 * A parsed `--subpartition-by` spec: the second level, under every first-level partition. Besides the
 * first level's forms, two computed from the data at plan time (computeSubPartitions):
 * `hash-rows` (`hash:<col>:rows=<N>`: modulus ceil(rows / N) per first-level partition) and `range-rows`
 * (`range:<col>:rows=<N>` on an integer column: a bound at every N-th value).
 */
export const SubPartitionSpecSchema = z.discriminatedUnion("strategy", [
  RangeTime,
  RangeInt,
  List,
  Hash,
  z.object({ strategy: z.literal("hash-rows"), column: z.string().min(1), rows: Rows }),
  z.object({ strategy: z.literal("range-rows"), column: z.string().min(1), rows: Rows }),
]);
export type SubPartitionSpec = z.infer<typeof SubPartitionSpecSchema>;

/**
 * A parsed `--partition-by` spec, with the optional second level `sub` (`--subpartition-by`). Stored as JSON
 * in the migration row (`width` and `rows` are decimal strings); a row written before `sub` existed parses
 * unchanged (no second level).
 */
export const PartitionSpecSchema = z.discriminatedUnion("strategy", [
  RangeTime.extend({ sub: SubPartitionSpecSchema.optional() }),
  RangeInt.extend({ sub: SubPartitionSpecSchema.optional() }),
  List.extend({ sub: SubPartitionSpecSchema.optional() }),
  Hash.extend({ sub: SubPartitionSpecSchema.optional() }),
]);
export type PartitionSpec = z.infer<typeof PartitionSpecSchema>;
/** One level of a spec (a first-level spec is one too: its `sub` is ignored where a level is meant). */
export type LevelSpec = SubPartitionSpec;

const SPEC_HELP =
  "use range:<column>:<day|week|month|quarter|year>, range:<column>:<width>, list:<column> or hash:<column>:<modulus>";
const SUB_HELP = `${SPEC_HELP}; or hash:<column>:rows=<N>, range:<column>:rows=<N> (buckets of about N rows)`;

/**
 * Parses `range:created_at:month`, `range:id:1000000`, `list:tenant_id`, `hash:id:16`.
 * The column is an identifier: unquoted it folds to lower case, `"Quoted"` keeps its case.
 * @throws PgshiftError with the accepted forms when the spec is malformed.
 */
export function parsePartitionSpec(text: string): PartitionSpec {
  return parseLevel(text, "--partition-by", false) as PartitionSpec;
}

/**
 * Parses a `--subpartition-by` spec: every form parsePartitionSpec takes, plus `hash:<column>:rows=<N>` and
 * `range:<column>:rows=<N>` (N rows per bucket at migration time, 1 to 2^62).
 * @throws PgshiftError with the accepted forms when the spec is malformed.
 */
export function parseSubPartitionSpec(text: string): SubPartitionSpec {
  return parseLevel(text, "--subpartition-by", true);
}

/**
 * The spec of `--partition-by` with the second level of `--subpartition-by` (when given) as its `sub`.
 * @throws PgshiftError when either is malformed, or when both levels name the same column.
 */
export function parseSpecs(partitionBy: string, subpartitionBy?: string): PartitionSpec {
  const spec = parsePartitionSpec(partitionBy);
  if (subpartitionBy === undefined) return spec;
  const sub = parseSubPartitionSpec(subpartitionBy);
  if (sub.column === spec.column)
    throw new PgshiftError(
      `invalid --subpartition-by ${JSON.stringify(subpartitionBy)}: ${sub.column} is the first level's column already`,
      { hint: "sub-partition by another column (e.g. --partition-by list:customer_id --subpartition-by hash:id:8)" },
    );
  return { ...spec, sub };
}

function parseLevel(text: string, option: string, sub: boolean): SubPartitionSpec {
  const bad = (why: string) =>
    new PgshiftError(`invalid ${option} ${JSON.stringify(text)}: ${why}`, { hint: sub ? SUB_HELP : SPEC_HELP });
  const colon = text.indexOf(":");
  if (colon < 0) throw bad("missing the column");
  const strategy = text.slice(0, colon).toLowerCase();
  let rest = text.slice(colon + 1);
  let column: string;
  if (rest.startsWith('"')) {
    const q = readQuotedIdentifier(rest, 0);
    if (!q) throw bad("unterminated quoted column name");
    column = q.name;
    rest = rest.slice(q.end);
  } else {
    const m = /^[^:]*/.exec(rest)![0];
    if (!/^[A-Za-z_][A-Za-z0-9_$]*$/.test(m))
      throw bad(`${JSON.stringify(m)} is not a column name (quote it with "...")`);
    column = m.toLowerCase();
    rest = rest.slice(m.length);
  }
  if (column === "") throw bad("empty column name");
  const param = rest.startsWith(":") ? rest.slice(1) : rest === "" ? undefined : null;
  if (param === null) throw bad("expected ':' after the column");
  const rowsForm = param !== undefined ? /^rows=(.*)$/i.exec(param) : null;
  if (rowsForm) {
    if (!sub) throw bad("rows=<N> is a form of --subpartition-by only");
    const n = rowsForm[1]!;
    if (!/^[1-9][0-9]*$/.test(n) || BigInt(n) > 2n ** 62n) throw bad("rows=<N> needs a positive integer N");
    if (strategy === "hash") return { strategy: "hash-rows", column, rows: n };
    if (strategy === "range") return { strategy: "range-rows", column, rows: n };
    throw bad(`rows=<N> goes with hash or range, not ${JSON.stringify(strategy)}`);
  }
  switch (strategy) {
    case "range": {
      if (param === undefined || param === "") throw bad("range needs an interval or an integer width");
      if ((TIME_INTERVALS as readonly string[]).includes(param.toLowerCase())) {
        return { strategy: "range", column, interval: param.toLowerCase() as TimeInterval };
      }
      if (/^[1-9][0-9]*$/.test(param) && BigInt(param) <= 2n ** 62n)
        return { strategy: "range-int", column, width: param };
      throw bad(`${JSON.stringify(param)} is neither day, week, month, quarter, year nor a positive integer width`);
    }
    case "list":
      if (param !== undefined) throw bad("list takes only a column");
      return { strategy: "list", column };
    case "hash": {
      if (param === undefined || !/^[0-9]+$/.test(param)) throw bad("hash needs a modulus: hash:<column>:<modulus>");
      const modulus = Number(param);
      if (modulus < 2 || modulus > 1024) throw bad("the modulus must be between 2 and 1024");
      return { strategy: "hash", column, modulus };
    }
    default:
      throw bad(`unknown strategy ${JSON.stringify(strategy)}`);
  }
}

/** The spec written back in its command-line form (the first level only: formatSubPartitionSpec for `sub`). */
export function formatPartitionSpec(spec: LevelSpec): string {
  const col = /^[a-z_][a-z0-9_$]*$/.test(spec.column) ? spec.column : `"${spec.column.replace(/"/g, '""')}"`;
  switch (spec.strategy) {
    case "range":
      return `range:${col}:${spec.interval}`;
    case "range-int":
      return `range:${col}:${spec.width}`;
    case "list":
      return `list:${col}`;
    case "hash":
      return `hash:${col}:${spec.modulus}`;
    case "hash-rows":
      return `hash:${col}:rows=${spec.rows}`;
    case "range-rows":
      return `range:${col}:rows=${spec.rows}`;
  }
}

/** Both levels in command-line form: `list:customer_id` or `list:customer_id / hash:id:rows=50000`. */
export function formatSpecs(spec: PartitionSpec): string {
  return spec.sub ? `${formatPartitionSpec(spec)} / ${formatPartitionSpec(spec.sub)}` : formatPartitionSpec(spec);
}

/** The partition columns of both levels, first level first (each column once). */
export function partitionColumns(spec: PartitionSpec): string[] {
  return spec.sub && spec.sub.column !== spec.column ? [spec.column, spec.sub.column] : [spec.column];
}

/** PostgreSQL's PARTITION BY method for a spec. */
export function partitionMethod(spec: LevelSpec): "RANGE" | "LIST" | "HASH" {
  return spec.strategy === "list"
    ? "LIST"
    : spec.strategy === "hash" || spec.strategy === "hash-rows"
      ? "HASH"
      : "RANGE";
}

/** Column types each strategy accepts (pg_type.typname). */
export const TIME_TYPES = ["date", "timestamp", "timestamptz"] as const;
export const INTEGER_TYPES = ["int2", "int4", "int8"] as const;
