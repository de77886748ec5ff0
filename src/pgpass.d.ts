/** Types for the helper module of `pgpass` (installed with `pg`), which has no type declarations of its own. */
declare module "pgpass/lib/helper.js" {
  import type { Readable } from "node:stream";
  /** The fields a `.pgpass` line is matched on; `port` defaults to 5432. */
  export interface PgpassConnInfo {
    host: string;
    port: string | number;
    database: string;
    user: string;
  }
  /** Reads `stream` as a password file and calls `cb` with the password of the first matching line, if any. */
  export function getPassword(connInfo: PgpassConnInfo, stream: Readable, cb: (password: string | undefined) => void): void;
  const helper: { getPassword: typeof getPassword };
  export default helper;
}
