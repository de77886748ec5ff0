import { randomBytes } from "node:crypto";
import { inject } from "vitest";
import postgres from "postgres";
import type { Sql } from "../../src/db.js";
import { connect } from "../../src/db.js";
import { setLogger } from "../../src/log.js";
import { pino } from "pino";

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
