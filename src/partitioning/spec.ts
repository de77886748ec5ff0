import { z } from "zod";
import { PgshiftError } from "../errors.js";
import { readQuotedIdentifier } from "../names.js";

export const TIME_INTERVALS = ["day", "week", "month", "quarter", "year"] as const;
export type TimeInterval = (typeof TIME_INTERVALS)[number];

/** A parsed `--partition-by` spec. Stored as JSON in the migration row, so `width` is a decimal string. */
export const PartitionSpecSchema = z.discriminatedUnion("strategy", [
  z.object({ strategy: z.literal("range"), column: z.string().min(1), interval: z.enum(TIME_INTERVALS) }),
  z.object({ strategy: z.literal("range-int"), column: z.string().min(1), width: z.string().regex(/^[1-9][0-9]*$/) }),
  z.object({ strategy: z.literal("list"), column: z.string().min(1) }),
  z.object({ strategy: z.literal("hash"), column: z.string().min(1), modulus: z.number().int().min(2).max(1024) }),
]);
export type PartitionSpec = z.infer<typeof PartitionSpecSchema>;

const SPEC_HELP =
  "use range:<column>:<day|week|month|quarter|year>, range:<column>:<width>, list:<column> or hash:<column>:<modulus>";

/**
 * Parses `range:created_at:month`, `range:id:1000000`, `list:tenant_id`, `hash:id:16`.
 * The column is an identifier: unquoted it folds to lower case, `"Quoted"` keeps its case.
 * @throws PgshiftError with the accepted forms when the spec is malformed.
 */
export function parsePartitionSpec(text: string): PartitionSpec {
  const bad = (why: string) =>
    new PgshiftError(`invalid --partition-by ${JSON.stringify(text)}: ${why}`, { hint: SPEC_HELP });
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

/** The spec written back in its command-line form. */
export function formatPartitionSpec(spec: PartitionSpec): string {
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
  }
}

/** PostgreSQL's PARTITION BY method for a spec. */
export function partitionMethod(spec: PartitionSpec): "RANGE" | "LIST" | "HASH" {
  return spec.strategy === "list" ? "LIST" : spec.strategy === "hash" ? "HASH" : "RANGE";
}

/** Column types each strategy accepts (pg_type.typname). */
export const TIME_TYPES = ["date", "timestamp", "timestamptz"] as const;
export const INTEGER_TYPES = ["int2", "int4", "int8"] as const;
