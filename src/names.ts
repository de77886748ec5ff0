import { PgshiftError } from "./errors.js";

/** A schema-qualified relation name, unquoted (as stored in pg_class / pg_namespace). */
export interface QualifiedName {
  schema: string;
  name: string;
}

/** PostgreSQL's NAMEDATALEN - 1: the longest identifier in bytes (docs: "Identifiers and Key Words"). */
export const MAX_IDENTIFIER_BYTES = 63;

/**
 * Parses a table argument the way psql users write it: `orders`, `sales.orders`,
 * `"Order Items"`, `"My Schema"."Order Items"`. Unquoted parts are folded to lower case,
 * quoted parts keep their case and may contain dots and doubled quotes.
 * @throws PgshiftError when the text is not one or two identifiers separated by a dot.
 */
export function parseTableName(text: string, defaultSchema = "public"): QualifiedName {
  const parts: string[] = [];
  let i = 0;
  const bad = () =>
    new PgshiftError(`invalid table name ${JSON.stringify(text)}`, {
      hint: 'write it as table, schema.table or "Quoted Name" (quotes keep case and spaces)',
    });
  while (i < text.length) {
    let part = "";
    if (text[i] === '"') {
      const q = readQuotedIdentifier(text, i);
      if (!q || q.name === "") throw bad();
      part = q.name;
      i = q.end;
    } else {
      const m = /^[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*/.exec(text.slice(i));
      if (!m) throw bad();
      part = m[0].replace(/[A-Z]+/g, (c) => c.toLowerCase()); // PostgreSQL folds ASCII letters only
      i += m[0].length;
    }
    parts.push(part);
    if (i < text.length) {
      if (text[i] !== ".") throw bad();
      i++;
      if (i >= text.length) throw bad();
    }
  }
  if (parts.length === 1) return { schema: defaultSchema, name: parts[0]! };
  if (parts.length === 2) return { schema: parts[0]!, name: parts[1]! };
  throw bad();
}

/**
 * Reads a double-quoted identifier starting at `text[start]` (which must be `"`): `""` stands for `"`.
 * @returns the unquoted name and the index just past the closing quote, or null when it is unterminated.
 */
export function readQuotedIdentifier(text: string, start: number): { name: string; end: number } | null {
  let name = "";
  for (let i = start + 1; i < text.length; ) {
    if (text[i] === '"') {
      if (text[i + 1] !== '"') return { name, end: i + 1 };
      name += '"';
      i += 2;
    } else name += text[i++];
  }
  return null;
}

/** Quotes an identifier exactly as PostgreSQL's quote_ident() would always-quote it: `"` doubled. */
export function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

/** `"schema"."name"`. */
export function quoteQualified(q: QualifiedName): string {
  return `${quoteIdent(q.schema)}.${quoteIdent(q.name)}`;
}

/** Human form for messages: schema.name, quoted only where needed. */
export function displayName(q: QualifiedName): string {
  const simple = (s: string) => (/^[a-z_][a-z0-9_$]*$/.test(s) ? s : quoteIdent(s));
  return `${simple(q.schema)}.${simple(q.name)}`;
}

/**
 * Quotes a string literal like PostgreSQL's quote_literal(): single quotes doubled, and the
 * E'' form with doubled backslashes when the value has a backslash (docs: "String Constants").
 */
export function quoteLiteral(value: string): string {
  const body = value.replace(/'/g, "''");
  return value.includes("\\") ? `E'${body.replace(/\\/g, "\\\\")}'` : `'${body}'`;
}

/**
 * Truncates `base` so that `base + suffix` fits in 63 bytes (UTF-8), never cutting a character.
 * PostgreSQL would silently truncate a longer name, which could make two names collide.
 */
export function fitName(base: string, suffix: string): string {
  const enc = new TextEncoder();
  const room = MAX_IDENTIFIER_BYTES - enc.encode(suffix).length;
  const chars = Array.from(base); // code points: never split a surrogate pair
  while (enc.encode(chars.join("")).length > room) chars.pop();
  return chars.join("") + suffix;
}
