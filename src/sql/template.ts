import { readFileSync } from "node:fs";
import { type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";

/**
 * SQL templates: the `.sql` files under this folder (the pgshift schema and its upgrades, the DDL guard, the
 * trigger functions), read next to this module (src/sql from the sources, dist/sql after `npm run build`,
 * which copies them), with named placeholders in psql's own syntax ("SQL Interpolation" in psql's
 * documentation):
 * - `:"name"` an identifier: a string is quoted (quoteIdent), a list of strings gives them quoted and separated
 *   by commas, a QualifiedName gives `"schema"."name"`;
 * - `:'name'` a literal: a string is quoted (quoteLiteral), a QualifiedName gives its quoted name as a literal
 *   (for `::regclass`);
 * - `:name` SQL text the caller built (a string, inserted as it is).
 * As in psql, `::` (a cast) is no placeholder, and nothing is replaced inside string literals, quoted
 * identifiers and comments. Unlike psql, placeholders inside dollar-quoted text are replaced: a template's
 * function body is its point. One value may fill several placeholders, of any kind. Values are inserted in
 * one pass: a value is never read for placeholders. Templates must not use E'' strings (backslash escapes).
 */

/** What fills a placeholder: see the module's comment for how each kind quotes it. */
export type SqlValue = string | readonly string[] | QualifiedName;

const cache = new Map<string, string>();

/**
 * The text of a template file, by its path relative to this folder (e.g. "schema/000001.sql"), without its
 * header (the `--` comment lines it starts with, which describe the template) and its final newline. Read
 * once, then cached.
 * @throws Error when the file cannot be read (a build that did not copy the .sql files, or a wrong path).
 */
export function loadSql(path: string): string {
  let text = cache.get(path);
  if (text === undefined) {
    text = readFileSync(new URL(path, import.meta.url), "utf8")
      .replace(/^(?:--.*\r?\n)+/, "")
      .replace(/\r?\n$/, "");
    cache.set(path, text);
  }
  return text;
}

function isQualified(v: SqlValue): v is QualifiedName {
  return typeof v === "object" && !Array.isArray(v);
}

function fill(kind: '"' | "'" | "", name: string, value: SqlValue, where: string): string {
  if (kind === '"') {
    if (typeof value === "string") return quoteIdent(value);
    if (isQualified(value)) return quoteQualified(value);
    if (value.length === 0) throw new Error(`${where}: the list for :"${name}" is empty`);
    return value.map(quoteIdent).join(", ");
  }
  if (kind === "'") {
    if (typeof value === "string") return quoteLiteral(value);
    if (isQualified(value)) return quoteLiteral(quoteQualified(value));
    throw new Error(`${where}: :'${name}' takes one string or a table name, not a list`);
  }
  if (typeof value !== "string") throw new Error(`${where}: :${name} takes SQL text (a string)`);
  return value;
}

/** Index just past the end of the quoted text that starts at `start` with `quote` (doubled quotes inside). */
function endOfQuoted(text: string, start: number, quote: string): number {
  for (let i = start + 1; i < text.length; i++) {
    if (text[i] !== quote) continue;
    if (text[i + 1] === quote) i++;
    else return i + 1;
  }
  return text.length;
}

/** Index just past the end of the block comment that starts at `start` (they nest in PostgreSQL). */
function endOfComment(text: string, start: number): number {
  let depth = 0;
  for (let i = start; i < text.length - 1; i++) {
    if (text.startsWith("/*", i)) {
      depth++;
      i++;
    } else if (text.startsWith("*/", i)) {
      depth--;
      i++;
      if (depth === 0) return i + 1;
    }
  }
  return text.length;
}

const PLACEHOLDER = /:(?:"([A-Za-z_][A-Za-z0-9_]*)"|'([A-Za-z_][A-Za-z0-9_]*)'|([A-Za-z_][A-Za-z0-9_]*))/y;

/**
 * Fills the placeholders of `template` with `values` (see the module's comment for the syntax).
 * `where` names the template in errors.
 * @returns the SQL text.
 * @throws Error when a placeholder has no value, or a value fills no placeholder, or a value is of a kind its
 *   placeholder does not take (a list for a literal, a list or name for SQL text, an empty list).
 */
export function fillSql(template: string, values: Readonly<Record<string, SqlValue>> = {}, where = "SQL"): string {
  const used = new Set<string>();
  let out = "";
  let i = 0;
  while (i < template.length) {
    const c = template[i]!;
    let end = i + 1;
    if (template.startsWith("--", i)) {
      const nl = template.indexOf("\n", i);
      end = nl < 0 ? template.length : nl;
    } else if (template.startsWith("/*", i)) end = endOfComment(template, i);
    else if (c === "'" || c === '"') end = endOfQuoted(template, i, c);
    else if (template.startsWith("::", i)) end = i + 2;
    else if (c === ":") {
      PLACEHOLDER.lastIndex = i;
      const m = PLACEHOLDER.exec(template);
      if (m) {
        const kind = m[1] !== undefined ? '"' : m[2] !== undefined ? "'" : "";
        const name = (m[1] ?? m[2] ?? m[3])!;
        const value = Object.hasOwn(values, name) ? values[name] : undefined;
        if (value === undefined) throw new Error(`${where}: no value for the placeholder ${m[0]}`);
        used.add(name);
        out += fill(kind, name, value, where);
        i += m[0].length;
        continue;
      }
    }
    out += template.slice(i, end);
    i = end;
  }
  const unused = Object.keys(values).filter((k) => !used.has(k));
  if (unused.length > 0) throw new Error(`${where}: no placeholder for ${unused.join(", ")}`);
  return out;
}

/** The template file at `path` (relative to this folder) with its placeholders filled (loadSql, fillSql). */
export function sqlFile(path: string, values: Readonly<Record<string, SqlValue>> = {}): string {
  return fillSql(loadSql(path), values, path);
}
