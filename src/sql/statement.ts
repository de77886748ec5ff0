/**
 * Pieces of statements built as SQL text, the one way pgshift builds what it runs: identifiers quoted by
 * quoteIdent / quoteQualified (names.ts), literals by quoteLiteral, longer statements from `.sql` templates
 * (template.ts), and every value that changes from one run to the next (a batch's keys, a change's row) as a
 * `$n` bind parameter, sent apart from the text (postgres.js `sql.unsafe(text, values)`), never spliced in.
 * The text is what `plan` and `--dry-run` print; the values are what a block binds when it runs.
 */
import type postgres from "postgres";
import { quoteIdent } from "../names.js";

/**
 * A bound value, as the driver takes it: text (typed by the server from where its `$n` stands), null, or a
 * value postgres.js serializes (a number, a Date, `sql.json(...)`).
 */
export type BindValue = postgres.ParameterOrJSON<never>;

/**
 * `"a", "b"`: quoted identifiers separated by commas; with `alias`, each qualified by it: `s."a", s."b"`.
 * @throws Error when `names` is empty (`()` is no valid column list).
 */
export function columnList(names: readonly string[], alias?: string): string {
  if (names.length === 0) throw new Error("columnList: no column");
  const prefix = alias === undefined ? "" : `${quoteIdent(alias)}.`;
  return names.map((n) => prefix + quoteIdent(n)).join(", ");
}

/** `$from, $from+1, ...`: `n` parameters, numbered from `from` (1 for a statement's first). */
export function placeholders(from: number, n: number): string {
  return Array.from({ length: n }, (_, i) => `$${from + i}`).join(", ");
}

/**
 * `("a", "b") > ($1, $2)`: a row comparison of the columns `names` with `names.length` parameters numbered
 * from `from`, the keyset predicate of batches and chunks (docs: "Row Constructor Comparison": compared
 * left to right, as an index on those columns orders them).
 * @param op `=`, `<`, `<=`, `>`, `>=` or `is distinct from`.
 */
export function rowCompare(names: readonly string[], op: string, from: number): string {
  return `(${columnList(names)}) ${op} (${placeholders(from, names.length)})`;
}

/**
 * The values of a statement being built, in the order of their `$n`: `add` returns the next placeholder.
 * For statements whose shape depends on the values (which columns an UPDATE sets); a statement of fixed shape
 * uses placeholders() and its values in order.
 */
export class Bindings {
  readonly values: BindValue[] = [];

  /** Binds `value`; returns its placeholder `$n`. */
  add(value: BindValue): string {
    this.values.push(value);
    return `$${this.values.length}`;
  }

  /** Binds each of `values`; returns their placeholders separated by commas (`$3, $4`). */
  list(values: readonly BindValue[]): string {
    if (values.length === 0) throw new Error("Bindings.list: no value");
    return values.map((v) => this.add(v)).join(", ");
  }
}
