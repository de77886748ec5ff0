/** Types for the helper module of `pgpass` (installed with `pg`), which has no type declarations of its own. */
declare module "pgpass/lib/helper.js" {
  /** The fields of a `.pgpass` line; a connection is matched on the first four (`port` defaults to 5432). */
  export interface PgpassEntry {
    host: string;
    port: string | number;
    database: string;
    user: string;
    password?: string;
  }
  /** One line of a password file split at its unescaped colons (`\:` and `\\` unescaped), or null. */
  export function parseLine(line: string): PgpassEntry | null;
  /** Whether a parsed line has its five fields non-empty and a valid port (or `*`). */
  export function isValidEntry(entry: PgpassEntry): boolean;
  /** Whether `entry` applies to the connection `connInfo` (each field equal, or `*`). */
  export function match(connInfo: PgpassEntry, entry: PgpassEntry): boolean;
  const helper: { parseLine: typeof parseLine; isValidEntry: typeof isValidEntry; match: typeof match };
  export default helper;
}
