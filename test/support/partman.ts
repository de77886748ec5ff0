import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { chownSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort } from "../../src/embedded.js";

/**
 * A PostgreSQL 15 server from Debian's packages (postgresql-15), with pg_partman (postgresql-15-partman), for the
 * test of the hand-off against a real pg_partman: the embedded binaries have no pg_partman. Started as
 * src/embedded.ts starts the embedded server (a temporary data directory, a free port on 127.0.0.1, as the
 * postgres system user when running as root: PostgreSQL refuses to run as root), stopped and removed by stop().
 */
export const DEBIAN_PG15 = "/usr/lib/postgresql/15";
const CONTROL = "/usr/share/postgresql/15/extension/pg_partman.control";

/** Whether Debian's PostgreSQL 15 and its pg_partman are installed here. */
export function partmanAvailable(): boolean {
  return existsSync(join(DEBIAN_PG15, "bin", "postgres")) && existsSync(CONTROL);
}

export interface PartmanServer {
  url: string;
  stop: () => Promise<void>;
}

function runAs(): { uid: number; gid: number } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const id = (flag: string) => Number(execFileSync("id", [flag, "postgres"], { encoding: "utf8" }).trim());
  return { uid: id("-u"), gid: id("-g") };
}

/** Starts the server (initdb, then postgres until it is ready, at most 60 s). */
export async function startPartmanServer(): Promise<PartmanServer> {
  const user = runAs();
  const dir = mkdtempSync(join(tmpdir(), "pgshift-partman-"));
  const data = join(dir, "data");
  const pwfile = join(dir, "pw");
  writeFileSync(pwfile, "pgshift\n", { mode: 0o600 });
  if (user) {
    chownSync(dir, user.uid, user.gid);
    chownSync(pwfile, user.uid, user.gid);
  }
  const env: NodeJS.ProcessEnv = { ...process.env, LC_ALL: "C", LANG: "C" };
  for (const k of ["PGDATA", "PGPORT", "PGHOST", "PGOPTIONS", "PGTZ"]) delete env[k];
  execFileSync(
    join(DEBIAN_PG15, "bin", "initdb"),
    [`--pgdata=${data}`, "--auth=password", "--username=postgres", `--pwfile=${pwfile}`, "--locale=C", "--no-sync"],
    { ...(user ?? {}), env, stdio: "ignore" },
  );
  const port = await freePort();
  const child: ChildProcess = spawn(
    join(DEBIAN_PG15, "bin", "postgres"),
    [
      "-D",
      data,
      "-p",
      String(port),
      "-c",
      "listen_addresses=127.0.0.1",
      "-c",
      "fsync=off",
      "-c",
      `unix_socket_directories=${dir}`,
    ],
    { ...(user ?? {}), env, stdio: ["ignore", "pipe", "pipe"] },
  );
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the Debian PostgreSQL 15 did not start in 60 s")), 60_000);
    let tail = "";
    const onData = (b: Buffer) => {
      tail = (tail + b.toString("utf8")).slice(-2000);
      if (/database system is ready to accept connections/.test(tail)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stderr?.on("data", onData);
    child.stdout?.on("data", onData);
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`the Debian PostgreSQL 15 exited (${String(code)}): ${tail.trim().split("\n").at(-1)}`));
    });
  });
  child.removeAllListeners("exit");
  return {
    url: `postgres://postgres:pgshift@127.0.0.1:${port}/postgres`,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        await new Promise<void>((done) => {
          child.once("exit", () => done());
          child.kill("SIGINT");
        });
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
