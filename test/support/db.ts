import { randomBytes } from "node:crypto";
import { pino } from "pino";
import postgres from "postgres";
import { inject } from "vitest";
import type { Sql } from "../../src/db.js";
import { connect } from "../../src/db.js";
import { setLogger } from "../../src/log.js";

setLogger(pino({ level: process.env.PGSHIFT_TEST_LOG ?? "silent" }));

export interface TestDatabase {
  url: string;
  /** A one-connection pool, the way pgshift commands run. */
  sql: Sql;
  /** A second pool for checks and side work (size 4). */
  admin: Sql;
  close: () => Promise<void>;
}

/** Creates a fresh database for one test file on the run's server. */
export async function freshDatabase(): Promise<TestDatabase> {
  const base = inject("pgUrl");
  const name = `pgshift_t_${randomBytes(5).toString("hex")}`;
  const root = postgres(base, { max: 1, onnotice: () => {} });
  await root.unsafe(`create database ${name}`);
  await root.end();
  const u = new URL(base);
  u.pathname = `/${name}`;
  const url = u.toString();
  const sql = await connect({ url });
  const admin = await connect({ url, max: 4 });
  return {
    url,
    sql,
    admin,
    close: async () => {
      await sql.end({ timeout: 5 });
      await admin.end({ timeout: 5 });
      const r = postgres(base, { max: 1, onnotice: () => {} });
      await r.unsafe(`drop database if exists ${name} with (force)`).catch(() => {});
      await r.end();
    },
  };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * A login role with a random name starting with `prefix`, that may create schemas in `db`'s database and
 * tables in its public schema (not a superuser). Roles are cluster-wide: call drop() after db.close().
 * @returns the role's name, a URL that connects to `db` as it, and drop().
 */
export async function createLoginRole(
  db: TestDatabase,
  prefix: string,
): Promise<{ name: string; url: string; drop: () => Promise<void> }> {
  const name = `${prefix}_${randomBytes(4).toString("hex")}`;
  const dbName = new URL(db.url).pathname.slice(1);
  await db.admin.unsafe(`
    create role ${name} login password '${name}';
    grant create on database ${dbName} to ${name};
    grant create on schema public to ${name};`);
  const u = new URL(db.url);
  u.username = name;
  u.password = name;
  return {
    name,
    url: u.toString(),
    drop: async () => {
      const root = postgres(inject("pgUrl"), { max: 1, onnotice: () => {} });
      await root.unsafe(`drop role if exists ${name}`).catch(() => {});
      await root.end();
    },
  };
}
