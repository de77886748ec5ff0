import postgres from "postgres";
import type { TestDatabase } from "./db.js";

/** A subscriber database (createSubscriber): its connection, and drop() for afterAll. */
export interface Subscriber {
  sql: postgres.Sql;
  /** Drops the subscription (and with it its slot on the publisher), closes the connection, drops the database. */
  drop: () => Promise<void>;
}

/**
 * A real logical replication consumer of `db`: a database `<db's name>_<suffix>` in the same cluster, prepared by
 * `setup` (its tables), subscribed to `publication` with `copy_data` as given. The slot `slot` is created on the
 * publisher first: CREATE SUBSCRIPTION creating it in the same cluster would wait for itself (docs: CREATE
 * SUBSCRIPTION, notes).
 */
export async function createSubscriber(
  db: TestDatabase,
  opts: {
    suffix: string;
    setup: (sub: postgres.Sql) => Promise<unknown>;
    publication: string;
    slot: string;
    copyData: boolean;
  },
): Promise<Subscriber> {
  const name = `${new URL(db.url).pathname.slice(1)}_${opts.suffix}`;
  const root = postgres(db.url, { max: 1, onnotice: () => {} });
  await root.unsafe(`create database ${name}`);
  await root.end();
  const u = new URL(db.url);
  u.pathname = `/${name}`;
  const sql = postgres(u.toString(), { max: 1, onnotice: () => {} });
  const drop = async () => {
    await sql.unsafe(`drop subscription if exists ${opts.slot}`).catch(() => {});
    await sql.end({ timeout: 5 });
    const r = postgres(db.url, { max: 1, onnotice: () => {} });
    await r.unsafe(`drop database if exists ${name} with (force)`).catch(() => {});
    await r.end();
  };
  try {
    await opts.setup(sql);
    await db.admin.unsafe(`select pg_create_logical_replication_slot('${opts.slot}', 'pgoutput')`);
    const p = new URL(db.url);
    const conninfo =
      `host=${p.hostname} port=${p.port} dbname=${p.pathname.slice(1)} user=${decodeURIComponent(p.username)}` +
      (p.password ? ` password=${decodeURIComponent(p.password)}` : "");
    await sql.unsafe(
      `create subscription ${opts.slot} connection '${conninfo}' publication ${opts.publication} ` +
        `with (create_slot = false, slot_name = '${opts.slot}', copy_data = ${opts.copyData})`,
    );
  } catch (err) {
    await drop();
    throw err;
  }
  return { sql, drop };
}
