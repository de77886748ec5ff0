/**
 * Mirror overhead benchmark: how much application write throughput does a running migration cost, and
 * does the logical mirror's applier keep the shadow within a second of the table?
 *
 *   scripts/bench-overhead [--rows N] [--connections N] [--seconds S] [--repeat K]
 *                          [--applier child|inprocess] [--durable] [--rate TPS] [--floor] [--json] [--strict]
 *
 * One process, one run:
 *  1. starts the embedded PostgreSQL (unless DATABASE_URL is set: then that database is used, and the
 *     bench table is dropped at the end);
 *  2. creates the workload table `bench_overhead` (createWorkload, bigint key, default 200,000 rows; its
 *     twin is dropped, nothing writes it), autovacuum off on it (and so on the shadow partitions), ANALYZE;
 *  3. runs the same write load for the same time in three setups, interleaved and repeated
 *     (a, b, c, a, b, c, ...):
 *       (a) no migration;
 *       (b) trigger mirror: startMigration (mode trigger) + backfill, completed before the timed window,
 *           so the window measures steady-state mirroring (the row trigger in every application write);
 *       (c) logical mirror: startMigration (mode logical) + backfill, then during the window an applier
 *           (`pgshift sync` as a child process, or with --applier inprocess `sync()` in this process on
 *           connections of its own) keeps the shadow in step; lag is sampled every second, and after the
 *           window the time the applier needs to catch up is measured.
 *     Before each window: VACUUM (ANALYZE) of the table (and of the shadow), CHECKPOINT. After each: the
 *     migration is aborted (shadow, triggers, slot, publication dropped), so every run starts from the
 *     same table;
 *     With --floor, two more setups join the rotation, to show what this machine allows any mirror:
 *       (d) each row written twice by the load itself: every statement of the load also writes the row to
 *           a plain copy of the table (same columns and indexes, not partitioned) in the same statement
 *           (data-modifying WITH); no trigger, no routing, no upsert: no synchronous mirror costs less;
 *       (e) changes decoded, nothing applied: a publication and a pgoutput slot on the table, consumed by
 *           pg_recvlogical writing to /dev/null (by scripts/decode-only.ts when pg_recvlogical is not on
 *           the PATH): no logical mirror costs less.
 *  4. reports the committed transactions per second of each run (medians over the repeats), the ratios
 *     (b)/(a) and (c)/(a) against their targets (>= 0.85, >= 0.95), the logical run's lag at steady state
 *     (the first 3 s of each window ignored) against its target (< 1 s), and where the CPU went.
 *
 * The load: `--connections` workers (default 4), no pause (or paced with --rate: a load the machine can
 * carry, as on a production server with headroom; TPS then shows whether each setup keeps up with it, and
 * latency what each adds), each running one-statement transactions
 * (autocommit) on the keys it owns: 25% INSERT (created_at = now()), 50% UPDATE of a random existing row
 * (one in five moves created_at to another month, i.e. another partition of the shadow), 25% DELETE of a
 * random existing row. Inserts and deletes balance, so the table keeps its size across runs.
 *
 * Lag: `lagBytes` and `lagSeconds` are slotState's (WAL not confirmed by the slot; PostgreSQL's replay_lag
 * of the applier). `commitLagSeconds` is the end-to-end lag, now() minus the commit time of the last source
 * transaction applied to the shadow (the applier records it), which also counts the time the WAL waited
 * to be decoded. The lag target is checked on the larger of the two. The applier's pace is how many
 * seconds of source commits it applies per second (below 1 it falls behind and the lag keeps growing, so
 * the lag figures then depend on the length of the window).
 *
 * CPU: with a local server, the CPU time of each part during the window is read from /proc (the load's
 * server backends, the walsender, the applier's backend, all server processes, this Node process, the
 * sync child, the whole machine) and shown as cores busy; "other programs" is what the machine spent on
 * anything else meanwhile (a busy neighbour makes the figures unreliable).
 * --durable: the embedded server runs with PostgreSQL's default durability (fsync, synchronous_commit and
 * full_page_writes on) instead of the test settings (all off), and the load's sessions commit with
 * synchronous_commit = on, so that each transaction waits for its WAL flush, as on a production server.
 * Exit status 0 whatever the figures, unless --strict (then 1 when a target is missed).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { accessSync, constants as fsConstants, readdirSync, readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { destination, pino } from "pino";
import postgres from "postgres";
import { connectionUrl } from "../src/db.js";
import {
  abort,
  backfill,
  connect,
  loadMigration,
  parsePartitionSpec,
  type QualifiedName,
  type Sql,
  setLogger,
  startMigration,
} from "../src/index.js";
import { createWorkload, WORKLOAD_COLUMNS } from "../src/load/workload.js";
import { slotState } from "../src/mirror/logical.js";
import { sync } from "../src/mirror/sync.js";
import { quoteQualified } from "../src/names.js";
import { columnList } from "../src/sql/statement.js";
import {
  COMMON_OPTIONS,
  fmtInt,
  median,
  openBenchSession,
  positiveInt,
  printedHelp,
  runBench,
} from "./bench-common.js";

const TARGET_TRIGGER = 0.85;
const TARGET_LOGICAL = 0.95;
const TARGET_LAG_SECONDS = 1;
/** Issue 18: each mirror at least this fraction of its floor (--floor: (b)/(d) and (c)/(e)). */
const TARGET_OF_FLOOR = 0.95;
const STEADY_AFTER_SECONDS = 3;
const TABLE: QualifiedName = { schema: "public", name: "bench_overhead" };
const TWIN: QualifiedName = { schema: "public", name: "bench_overhead_twin" };
const SPEC = "range:created_at:month";
const LOAD_APP = "bench-overhead-load";
const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

type Setup = "a" | "b" | "c" | "d" | "e";
const LABELS: Record<Setup, string> = {
  a: "no migration",
  b: "trigger mirror",
  c: "logical mirror",
  d: "floor: each row written twice by the load itself",
  e: "floor: changes decoded, nothing applied",
};
/** (d)'s second table: a plain copy of the workload table (same columns and indexes, not partitioned). */
const FLOOR_COPY: QualifiedName = { schema: "public", name: "bench_overhead_floor" };
/** (e)'s publication and slot. */
const FLOOR_SLOT = "bench_overhead_floor";

interface LagSample {
  /** Seconds since the window started. */
  t: number;
  lagBytes: number;
  lagSeconds: number | null;
  commitLagSeconds: number | null;
}

interface Cpu {
  /** Cores busy on average during the window, per part (null when it could not be measured). */
  loadBackends: number | null;
  walsender: number | null;
  applierBackend: number | null;
  /** Every process of the (local) server, including the above and the background processes. */
  server: number | null;
  nodeMain: number;
  syncChild: number | null;
  machine: number | null;
  /** Machine minus server, this process and the child: other programs running on the machine meanwhile. */
  outside: number | null;
}

interface Run {
  setup: Setup;
  repeat: number;
  seconds: number;
  transactions: number;
  tps: number;
  inserts: number;
  updates: number;
  deletes: number;
  errors: number;
  latencyMs: { mean: number; p50: number; p99: number };
  /** (b), (c): migration start + backfill, seconds (not in the window). */
  prepareSeconds: number | null;
  lag: LagSample[] | null;
  /** (c): seconds the applier needed after the load stopped to confirm everything written in the window. */
  drainSeconds: number | null;
  /** (c): row changes the applier applied during the window (in-process applier only). */
  appliedChanges: number | null;
  cpu: Cpu;
}

function usage(): string {
  return (
    `usage: scripts/bench-overhead [--rows N] [--connections N] [--seconds S] [--repeat K] [--applier ` +
    `child|inprocess] [--durable] [--rate TPS] [--json] [--strict]
  --rows N          rows in the workload table (default 200000)
  --connections N   load connections (default 4)
  --seconds S       length of each timed window (default 20)
  --repeat K        run (a), (b), (c) K times, interleaved; report medians (default 1)
  --applier WHERE   logical run's applier: \`pgshift sync\` as a child process (child, default) or sync() in this ` +
    `process (inprocess)
  --durable         commit durably: PostgreSQL's default fsync/synchronous_commit/full_page_writes on the embedded ` +
    `server, synchronous_commit = on in the load's sessions
  --rate TPS        pace the load at TPS transactions per second in all (default: no pause, as fast as ` +
    `the machine allows)
  --floor           also run (d) the load writing each row twice itself and (e) a slot decoded with nothing applied: ` +
    `the least any mirror costs
  --json            print the report as JSON on stdout
  --strict          exit 1 when a target is missed (trigger >= ${TARGET_TRIGGER}, logical >= ${TARGET_LOGICAL}, lag ` +
    `< ${TARGET_LAG_SECONDS} s)
Uses DATABASE_URL when set, else starts an embedded PostgreSQL.`
  );
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const r2 = (n: number) => Number(n.toFixed(2));

// ---------------------------------------------------------------------------------------------------------
// CPU accounting from /proc (Linux, local server). Every reader returns null when it cannot read.

/** USER_HZ, the unit of /proc times: 100 on every Linux architecture Node supports. */
const clockTicks = 100;

function procSeconds(pid: number): number | null {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    // fields after the command name: state is f[0]; utime = field 14, stime = field 15 (1-based) -> f[11], f[12]
    return (Number(f[11]) + Number(f[12])) / clockTicks;
  } catch {
    return null;
  }
}

function parentPid(pid: number): number | null {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "utf8");
    return Number(s.slice(s.lastIndexOf(")") + 2).split(" ")[1]);
  } catch {
    return null;
  }
}

/** The postmaster (parent of `backendPid`) and all its children: every process of a local server. */
function serverPids(backendPid: number): number[] {
  const postmaster = parentPid(backendPid);
  if (postmaster === null) return [];
  const out = [postmaster];
  try {
    for (const d of readdirSync("/proc")) {
      if (/^[0-9]+$/.test(d) && parentPid(Number(d)) === postmaster) out.push(Number(d));
    }
  } catch {
    return [];
  }
  return out;
}

/** Whether `pid` is a PostgreSQL process on this machine (false for a remote server's backend pid). */
function isLocalPostgres(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").startsWith("postgres");
  } catch {
    return false;
  }
}

function machineBusySeconds(): number | null {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n")[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    const idle = (v[3] ?? 0) + (v[4] ?? 0);
    const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
    return (total - idle) / clockTicks;
  } catch {
    return null;
  }
}

interface CpuProbe {
  finish(): Cpu;
}

/** Starts measuring CPU of the given backend pids, the Node process, a child and the machine. */
function cpuProbe(
  pids: { load: number[]; walsender: number[]; applier: number[]; server: number[] },
  child: ChildProcess | null,
): CpuProbe {
  const sum = (xs: number[], skipGone = false) => {
    let t = 0;
    for (const p of xs) {
      const s = procSeconds(p);
      if (s === null && !skipGone) return null;
      t += s ?? 0;
    }
    return xs.length === 0 ? null : t;
  };
  // server processes that exit during the window (none expected) would make the sum drop: count them as 0 at both ends
  const serverAlive = () => pids.server.filter((p) => procSeconds(p) !== null);
  const t0 = performance.now();
  const start = {
    load: sum(pids.load),
    walsender: sum(pids.walsender),
    applier: sum(pids.applier),
    serverPids: serverAlive(),
    node: process.cpuUsage(),
    child: child?.pid ? procSeconds(child.pid) : null,
    machine: machineBusySeconds(),
  };
  const server0 = sum(start.serverPids, true);
  return {
    finish(): Cpu {
      const secs = (performance.now() - t0) / 1000;
      const rate = (a: number | null, b: number | null) => (a === null || b === null ? null : r2((b - a) / secs));
      const node = process.cpuUsage(start.node);
      const nodeMain = r2((node.user + node.system) / 1e6 / secs);
      const server = rate(server0, sum(start.serverPids, true));
      const syncChild = child?.pid ? rate(start.child, procSeconds(child.pid)) : null;
      const machine = rate(start.machine, machineBusySeconds());
      return {
        loadBackends: rate(start.load, sum(pids.load)),
        walsender: rate(start.walsender, sum(pids.walsender)),
        applierBackend: rate(start.applier, sum(pids.applier)),
        server,
        nodeMain,
        syncChild,
        machine,
        outside:
          machine === null || server === null ? null : r2(Math.max(0, machine - server - nodeMain - (syncChild ?? 0))),
      };
    },
  };
}

// ---------------------------------------------------------------------------------------------------------
// The load: one-statement transactions on keys each worker owns.

interface Worker {
  sql: postgres.Sql;
  pid: number;
  keys: number[];
}

interface LoadResult {
  transactions: number;
  inserts: number;
  updates: number;
  deletes: number;
  errors: string[];
  latencies: number[];
}

/** Opens the load's connections and hands out the table's keys (worker i owns every key with index i mod n). */
async function openWorkers(url: string, sql: Sql, n: number, durable: boolean): Promise<Worker[]> {
  const ids = await sql`select id::int8::text as id from ${sql(TABLE.schema)}.${sql(TABLE.name)}`;
  const workers: Worker[] = [];
  for (let i = 0; i < n; i++) {
    const w = postgres(url, {
      max: 1,
      onnotice: () => {},
      idle_timeout: 0,
      connection: { application_name: LOAD_APP, ...(durable ? { synchronous_commit: "on" } : {}) },
    });
    const r = await w`select pg_backend_pid() as pid`;
    workers.push({ sql: w, pid: Number(r[0]!.pid), keys: [] });
  }
  for (const [i, r] of ids.entries()) workers[i % n]!.keys.push(Number(r.id));
  return workers;
}

async function closeWorkers(workers: Worker[]): Promise<void> {
  await Promise.all(workers.map((w) => w.sql.end({ timeout: 5 }).catch(() => {})));
}

/**
 * Runs the load on every worker for `seconds`, without pause, or paced at `rate` transactions per second in
 * all (each worker starts its k-th transaction k * workers / rate seconds after the start, at once when it is
 * late); returns what was committed. `twice`: every statement also writes the row to FLOOR_COPY, in the
 * same statement (data-modifying WITH), as the cheapest synchronous mirror would.
 */
async function runLoad(workers: Worker[], seconds: number, rate: number | null, twice = false): Promise<LoadResult> {
  const res: LoadResult = { transactions: 0, inserts: 0, updates: 0, deletes: 0, errors: [], latencies: [] };
  const started = performance.now();
  const until = started + seconds * 1000;
  const intervalMs = rate === null ? 0 : (1000 * workers.length) / rate;
  const DAY = 86400_000;
  const regions = ["emea", "amer", "apac", "latam"];
  const statuses = ["new", "paid", "shipped"];
  await Promise.all(
    workers.map(async (w, wi) => {
      const sql = w.sql;
      for (let k = 0; performance.now() < until; k++) {
        if (rate !== null) {
          const due = started + k * intervalMs;
          const now = performance.now();
          if (due > now) await sleep(due - now);
          if (performance.now() >= until) break;
        }
        const r = Math.random();
        const t0 = performance.now();
        try {
          if (r < 0.25 || w.keys.length < 100) {
            const amount = (Math.random() * 1000).toFixed(2);
            const ins = twice
              ? await sql`
                  with i as (
                    insert into bench_overhead (region, status, amount, note, data)
                    values (${regions[wi % 4]!}, 'new', ${amount}, ${`w${wi}`}, ${sql.json({ w: wi })})
                    returning id, created_at, region, status, amount, note, data),
                  c as (insert into bench_overhead_floor (id, created_at, region, status, amount, note,
                    data) select * from i)
                  select id::text as id from i`
              : await sql`
                  insert into bench_overhead (region, status, amount, note, data)
                  values (${regions[wi % 4]!}, 'new', ${amount}, ${`w${wi}`}, ${sql.json({ w: wi })})
                  returning id::text as id`;
            w.keys.push(Number(ins[0]!.id));
            res.inserts++;
          } else {
            const idx = Math.floor(Math.random() * w.keys.length);
            const id = w.keys[idx]!;
            if (r < 0.75) {
              if (Math.random() < 0.2) {
                // moves the row to another month: another partition of the shadow
                const at = new Date(Date.now() - Math.floor(Math.random() * 700 * DAY));
                if (twice)
                  await sql`with u as (update bench_overhead set created_at = ${at}, status = 'moved' where id = ${id}
                    returning id, created_at, status)
                            update bench_overhead_floor f set created_at = u.created_at, status = u.status from u
                              where f.id = u.id`;
                else await sql`update bench_overhead set created_at = ${at}, status = 'moved' where id = ${id}`;
              } else {
                const amount = (Math.random() * 1000).toFixed(2);
                const status = statuses[Math.floor(Math.random() * 3)]!;
                if (twice)
                  await sql`with u as (update bench_overhead set status = ${status}, amount = ${amount} where id = ${id}
                    returning id, status, amount)
                            update bench_overhead_floor f set status = u.status, amount = u.amount from u
                              where f.id = u.id`;
                else await sql`update bench_overhead set status = ${status}, amount = ${amount} where id = ${id}`;
              }
              res.updates++;
            } else {
              if (twice)
                await sql`with d as (delete from bench_overhead where id = ${id} returning id) delete from
                  bench_overhead_floor f using d where f.id = d.id`;
              else await sql`delete from bench_overhead where id = ${id}`;
              w.keys[idx] = w.keys[w.keys.length - 1]!;
              w.keys.pop();
              res.deletes++;
            }
          }
          res.transactions++;
          res.latencies.push(performance.now() - t0);
        } catch (err) {
          res.errors.push(err instanceof Error ? err.message : String(err));
          if (res.errors.length > 50) throw new Error(`the load failed 50 times, last: ${res.errors.at(-1)}`);
        }
      }
    }),
  );
  return res;
}

// ---------------------------------------------------------------------------------------------------------
// The logical run's applier.

interface RunningApplier {
  /** Row changes applied so far (null when unknown: child process). */
  changes(): number | null;
  child: ChildProcess | null;
  stop(): Promise<void>;
}

async function startApplier(
  sql: Sql,
  url: string,
  where: "inprocess" | "child",
  slot: string,
  say: (l: string) => void,
): Promise<RunningApplier> {
  if (where === "inprocess") {
    // sync() on a pool of its own (its ticks query the migration row and the slot), its Applier opens its own
    // connection
    const syncSql = await connect({ url, applicationName: "bench-overhead-sync" });
    const ctrl = new AbortController();
    let changes = 0;
    const done = sync(syncSql, TABLE, { signal: ctrl.signal, onTick: (t) => (changes = t.changes) }).catch(
      (err: unknown) => {
        say(`sync stopped with an error: ${err instanceof Error ? err.message : String(err)}`);
        return { reason: "error" as const };
      },
    );
    await waitActive(sql, slot);
    return {
      changes: () => changes,
      child: null,
      stop: async () => {
        ctrl.abort();
        await done;
        await syncSql.end({ timeout: 5 }).catch(() => {});
      },
    };
  }
  const child = spawn(
    process.execPath,
    ["--import", "tsx", join(ROOT, "src/cli/main.ts"), "sync", `${TABLE.schema}.${TABLE.name}`, "--url", url],
    {
      cwd: ROOT,
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, PGSHIFT_LOG_LEVEL: process.env.PGSHIFT_LOG_LEVEL ?? "warn" },
    },
  );
  return attachedChild(sql, child, slot, "pgshift sync");
}

/**
 * A slot's consumer running as `child`, once it streams from `slot`; stop() ends it (SIGTERM, then SIGKILL after 10 s).
 */
async function attachedChild(sql: Sql, child: ChildProcess, slot: string, what: string): Promise<RunningApplier> {
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  try {
    await waitActive(sql, slot, 30_000);
  } catch (err) {
    child.kill("SIGTERM");
    await exited;
    throw new Error(
      `${what} did not attach to the slot: ${err instanceof Error ? err.message : String(err)}\n${stderr}`,
    );
  }
  return {
    changes: () => null,
    child,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(t);
    },
  };
}

/** PostgreSQL's pg_recvlogical on the PATH, if any (a C client: the cheapest consumer of a slot). */
function findRecvlogical(): string | null {
  for (const dir of (process.env.PATH ?? "").split(":")) {
    const p = join(dir || ".", "pg_recvlogical");
    try {
      accessSync(p, fsConstants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return null;
}

/** The consumer (e) uses: pg_recvlogical's path when it is on the PATH, else scripts/decode-only.ts. */
const FLOOR_CONSUMER = findRecvlogical() ?? "scripts/decode-only.ts";

/**
 * (e): the slot's consumer (FLOOR_CONSUMER), once it streams: pg_recvlogical writes to /dev/null, reports
 * its position every second and never fsyncs; decode-only.ts is the same in Node (pg-logical-replication).
 */
async function startDecodeOnly(sql: Sql, url: string): Promise<RunningApplier> {
  const child = FLOOR_CONSUMER.endsWith("pg_recvlogical")
    ? spawn(
        FLOOR_CONSUMER,
        [
          "-d",
          url,
          "--slot",
          FLOOR_SLOT,
          "--start",
          "-o",
          "proto_version=1",
          "-o",
          `publication_names=${FLOOR_SLOT}`,
          "-f",
          "/dev/null",
          "-F",
          "0",
          "-s",
          "1",
        ],
        { stdio: ["ignore", "ignore", "pipe"] },
      )
    : spawn(process.execPath, ["--import", "tsx", join(ROOT, FLOOR_CONSUMER), url, FLOOR_SLOT, FLOOR_SLOT], {
        cwd: ROOT,
        stdio: ["ignore", "ignore", "pipe"],
      });
  return attachedChild(sql, child, FLOOR_SLOT, FLOOR_CONSUMER);
}

/** Drops (e)'s slot (once its consumer has let go of it) and publication, if they exist. */
async function dropFloorSlot(sql: Sql): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const r = await sql`select active from pg_replication_slots where slot_name = ${FLOOR_SLOT}`;
    if (r.length === 0) break;
    if (!r[0]!.active) {
      await sql`select pg_drop_replication_slot(${FLOOR_SLOT})`;
      break;
    }
    await sleep(100);
  }
  await sql`drop publication if exists ${sql(FLOOR_SLOT)}`;
}

async function waitActive(sql: Sql, slot: string, timeoutMs = 15_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    if ((await slotState(sql, slot)).active) return;
    if (Date.now() > until) throw new Error(`no consumer attached to slot ${slot} after ${timeoutMs} ms`);
    await sleep(50);
  }
}

// ---------------------------------------------------------------------------------------------------------

async function vacuumAndCheckpoint(sql: Sql, shadow: QualifiedName | null): Promise<void> {
  await sql`vacuum (analyze) ${sql(TABLE.schema)}.${sql(TABLE.name)}`;
  if (shadow) await sql`vacuum (analyze) ${sql(shadow.schema)}.${sql(shadow.name)}`;
  await sql`checkpoint`;
}

async function backendPids(sql: Sql): Promise<{ walsender: number[]; applier: number[] }> {
  const r = await sql`select pid, backend_type, application_name from pg_stat_activity`;
  return {
    walsender: r.filter((x) => x.backend_type === "walsender").map((x) => Number(x.pid)),
    applier: r
      .filter((x) => x.backend_type === "client backend" && String(x.application_name).startsWith("pgshift apply "))
      .map((x) => Number(x.pid)),
  };
}

async function runOnce(
  sql: Sql,
  url: string,
  setup: Setup,
  k: number,
  opts: { connections: number; seconds: number; applier: "inprocess" | "child"; durable: boolean; rate: number | null },
  say: (l: string) => void,
): Promise<Run> {
  let prepareSeconds: number | null = null;
  let shadow: QualifiedName | null = null;
  if (setup === "b" || setup === "c") {
    const t0 = performance.now();
    await startMigration(sql, TABLE, {
      allowKeyExtension: true,
      spec: parsePartitionSpec(SPEC),
      mode: setup === "b" ? "trigger" : "logical",
    });
    const bf = await backfill(sql, TABLE, {});
    if (!bf.complete) throw new Error("backfill did not complete");
    prepareSeconds = (performance.now() - t0) / 1000;
    shadow = (await loadMigration(sql, TABLE))!.partitioned;
  }
  let applier: RunningApplier | null = null;
  let workers: Worker[] = [];
  try {
    if (setup === "d") {
      const t0 = performance.now();
      const cols = columnList(WORKLOAD_COLUMNS("bigint"));
      await sql.unsafe(
        `create table ${quoteQualified(FLOOR_COPY)} (like ${quoteQualified(TABLE)} including all) ` +
          `with (autovacuum_enabled = off)`,
      );
      await sql.unsafe(
        `insert into ${quoteQualified(FLOOR_COPY)} (${cols}) select ${cols} from ${quoteQualified(TABLE)}`,
      );
      prepareSeconds = (performance.now() - t0) / 1000;
      shadow = FLOOR_COPY;
    }
    if (setup === "e") {
      await sql`create publication ${sql(FLOOR_SLOT)} for table ${sql(TABLE.schema)}.${sql(TABLE.name)}`;
      await sql`select pg_create_logical_replication_slot(${FLOOR_SLOT}, 'pgoutput')`;
    }
    await vacuumAndCheckpoint(sql, shadow);
    const m = setup === "c" ? await loadMigration(sql, TABLE) : null;
    const slot = setup === "e" ? FLOOR_SLOT : (m?.slot_name ?? null);
    if (setup === "c") applier = await startApplier(sql, url, opts.applier, slot!, say);
    if (setup === "e") applier = await startDecodeOnly(sql, url);
    workers = await openWorkers(url, sql, opts.connections, opts.durable);
    const local = workers.every((w) => isLocalPostgres(w.pid));
    const pids = (setup === "c" || setup === "e") && local ? await backendPids(sql) : { walsender: [], applier: [] };
    const prepared = setup === "d" ? "copy" : "start + backfill";
    const took = prepareSeconds !== null ? ` (${prepared} took ${prepareSeconds.toFixed(1)} s)` : "";
    say(`[${k}] (${setup}) ${LABELS[setup]}: ${opts.seconds} s of load on ${opts.connections} connections${took} ...`);

    // lag sampler, every second, on the admin connection
    const lag: LagSample[] = [];
    const tw = performance.now();
    let sampling = setup === "c";
    const sampler = (async () => {
      while (sampling) {
        await sleep(1000 - ((performance.now() - tw) % 1000));
        if (!sampling) break;
        const s = await slotState(sql, slot!);
        const c = await sql`select extract(epoch from clock_timestamp() - applied_commit_time)::float8 as l from
            pgshift.migrations where id = ${m!.id}`;
        lag.push({
          t: r2((performance.now() - tw) / 1000),
          lagBytes: s.lagBytes,
          lagSeconds: s.lagSeconds,
          commitLagSeconds: c[0]?.l === null || c[0]?.l === undefined ? null : Number(c[0].l),
        });
      }
    })();
    const probe = cpuProbe(
      {
        load: local ? workers.map((w) => w.pid) : [],
        walsender: pids.walsender,
        applier: pids.applier,
        server: local ? serverPids(workers[0]!.pid) : [],
      },
      applier?.child ?? null,
    );
    const changes0 = applier?.changes() ?? null;
    const t0 = performance.now();
    const load = await runLoad(workers, opts.seconds, opts.rate, setup === "d");
    const secs = (performance.now() - t0) / 1000;
    const cpu = probe.finish();
    const changes1 = applier?.changes() ?? null;
    sampling = false;
    await sampler;

    // (c): how long the applier needs to confirm everything the window wrote
    let drainSeconds: number | null = null;
    const drainLimit = Math.max(120, 10 * opts.seconds);
    if (setup === "c" || setup === "e") {
      const target = String((await sql`select pg_current_wal_lsn()::text as l`)[0]!.l);
      const td = performance.now();
      for (;;) {
        const r = await sql`select confirmed_flush_lsn >= ${target}::pg_lsn as ok from pg_replication_slots where
            slot_name = ${slot!}`;
        if (r[0]?.ok) {
          drainSeconds = r2((performance.now() - td) / 1000);
          break;
        }
        if (performance.now() - td > drainLimit * 1000) {
          say(`[${k}] (${setup}) the slot's consumer did not catch up within ${drainLimit} s after the load stopped`);
          break;
        }
        await sleep(20);
      }
    }
    const lat = [...load.latencies].sort((a, b) => a - b);
    const run: Run = {
      setup,
      repeat: k,
      seconds: r2(secs),
      transactions: load.transactions,
      tps: load.transactions / secs,
      inserts: load.inserts,
      updates: load.updates,
      deletes: load.deletes,
      errors: load.errors.length,
      latencyMs: {
        mean: r2(lat.reduce((a, b) => a + b, 0) / Math.max(1, lat.length)),
        p50: r2(percentile(lat, 50)),
        p99: r2(percentile(lat, 99)),
      },
      prepareSeconds: prepareSeconds === null ? null : r2(prepareSeconds),
      lag: setup === "c" ? lag : null,
      drainSeconds,
      appliedChanges: changes0 !== null && changes1 !== null ? changes1 - changes0 : null,
      cpu,
    };
    if (load.errors.length > 0) say(`[${k}] (${setup}) ${load.errors.length} load errors, first: ${load.errors[0]}`);
    return run;
  } finally {
    await closeWorkers(workers);
    await applier?.stop();
    if (setup === "b" || setup === "c") await abort(sql, TABLE);
    if (setup === "d") await sql`drop table if exists ${sql(FLOOR_COPY.schema)}.${sql(FLOOR_COPY.name)}`;
    if (setup === "e") await dropFloorSlot(sql);
  }
}

interface LagSummary {
  samples: number;
  /**
   * Source commit time the applier got through per second of wall time during the steady part of the
   * windows (1: keeps up; below 1 the lag grows by 1 - pace seconds every second). From the end-to-end lag.
   */
  pace: number | null;
  /** End-to-end lag at the end of the windows (median over runs), seconds. */
  commitSecondsAtEnd: number | null;
  bytes: { median: number; max: number };
  seconds: { median: number; max: number };
  commitSeconds: { median: number; max: number };
}

function summarizeLag(runs: Run[]): LagSummary | null {
  const steady = runs.flatMap((r) => (r.lag ?? []).filter((s) => s.t > STEADY_AFTER_SECONDS));
  if (steady.length === 0) return null;
  const pick = (f: (s: LagSample) => number | null) => steady.map(f).filter((x): x is number => x !== null);
  const mm = (xs: number[]) => ({ median: xs.length ? median(xs) : NaN, max: xs.length ? Math.max(...xs) : NaN });
  const bytes = mm(pick((s) => s.lagBytes));
  const secs = mm(pick((s) => s.lagSeconds));
  const commit = mm(pick((s) => s.commitLagSeconds));
  const paces: number[] = [];
  const ends: number[] = [];
  for (const r of runs) {
    const xs = (r.lag ?? []).filter((s) => s.t > STEADY_AFTER_SECONDS && s.commitLagSeconds !== null);
    const first = xs[0];
    const last = xs.at(-1);
    if (last) ends.push(last.commitLagSeconds!);
    if (first && last && last.t > first.t)
      paces.push(1 - (last.commitLagSeconds! - first.commitLagSeconds!) / (last.t - first.t));
  }
  return {
    samples: steady.length,
    pace: paces.length ? Number(median(paces).toFixed(2)) : null,
    commitSecondsAtEnd: ends.length ? Number(median(ends).toFixed(3)) : null,
    bytes: { median: Math.round(bytes.median), max: Math.round(bytes.max) },
    seconds: { median: Number(secs.median.toFixed(3)), max: Number(secs.max.toFixed(3)) },
    commitSeconds: { median: Number(commit.median.toFixed(3)), max: Number(commit.max.toFixed(3)) },
  };
}

/** Median drain time of the logical runs; null when one of them did not catch up. */
function drainSeconds(runs: Run[]): number | null {
  const xs = runs.map((r) => r.drainSeconds);
  return xs.some((x) => x === null) ? null : median(xs as number[]);
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      ...COMMON_OPTIONS,
      connections: { type: "string" },
      seconds: { type: "string" },
      applier: { type: "string" },
      durable: { type: "boolean", default: false },
      rate: { type: "string" },
      floor: { type: "boolean", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (printedHelp(values, usage)) return 0;
  const rows = positiveInt("--rows", values.rows, 200_000);
  const connections = positiveInt("--connections", values.connections, 4);
  const seconds = positiveInt("--seconds", values.seconds, 20);
  const repeat = positiveInt("--repeat", values.repeat, 1);
  const applierWhere = values.applier ?? "child";
  if (applierWhere !== "inprocess" && applierWhere !== "child")
    throw new Error(`--applier must be inprocess or child, got ${JSON.stringify(applierWhere)}`);
  if (seconds <= STEADY_AFTER_SECONDS)
    throw new Error(
      `--seconds must be more than ${STEADY_AFTER_SECONDS} (the lag of the first ${STEADY_AFTER_SECONDS} s is ignored)`,
    );
  const durable = values.durable === true;
  const rate = values.rate === undefined ? null : positiveInt("--rate", values.rate, 0);
  const json = values.json === true;
  const floor = values.floor === true;
  const setups: Setup[] = floor ? ["a", "b", "c", "d", "e"] : ["a", "b", "c"];
  const say = (l: string) => process.stderr.write(`${l}\n`);
  setLogger(pino({ level: process.env.PGSHIFT_LOG_LEVEL ?? "error" }, destination(2)));

  const dropBench = async (s: Sql) => {
    if (await loadMigration(s, TABLE).catch(() => null)) await abort(s, TABLE);
    await dropFloorSlot(s);
    await s`drop table if exists ${s(FLOOR_COPY.schema)}.${s(FLOOR_COPY.name)}`;
    await s`drop table if exists ${s(TWIN.schema)}.${s(TWIN.name)}`;
    await s`drop table if exists ${s(TABLE.schema)}.${s(TABLE.name)}`;
  };
  const { sql, external, cleanup } = await openBenchSession({
    applicationName: "bench-overhead",
    say,
    dropTables: dropBench,
    durable,
  });
  try {
    const url = connectionUrl(sql);
    const v = await sql`select current_setting('server_version') as v, current_setting('shared_buffers') as sb,
                               current_setting('fsync') as fsync, current_setting('synchronous_commit') as sc,
                                 current_setting('wal_level') as wl`;
    if (durable) v[0]!.sc = "on (load sessions)";
    const serverInfo =
      `PostgreSQL ${String(v[0]?.v)}${external ? "" : " (embedded)"}, ` +
      `shared_buffers=${String(v[0]?.sb)}, fsync=${String(v[0]?.fsync)}, synchronous_commit=${String(v[0]?.sc)}, ` +
      `wal_level=${String(v[0]?.wl)}`;
    say(serverInfo);

    await dropBench(sql);
    say(`creating ${TABLE.name} with ${fmtInt(rows)} rows ...`);
    await createWorkload(sql, { table: TABLE, twin: TWIN, keyKind: "bigint" }, rows);
    await sql`drop table ${sql(TWIN.schema)}.${sql(TWIN.name)}`;
    await sql`alter table ${sql(TABLE.schema)}.${sql(TABLE.name)} set (autovacuum_enabled = off)`;
    await sql`analyze ${sql(TABLE.schema)}.${sql(TABLE.name)}`;

    const runs: Run[] = [];
    for (let k = 1; k <= repeat; k++) {
      for (const setup of setups) {
        const r = await runOnce(
          sql,
          url,
          setup,
          k,
          { connections, seconds, applier: applierWhere, durable, rate },
          say,
        );
        const lag = r.lag ? summarizeLag([r]) : null;
        say(
          `[${k}] (${setup}) ${fmtInt(r.tps)} TPS, ${fmtInt(r.transactions)} transactions, latency ` +
            `p50 ${r.latencyMs.p50} ms p99 ${r.latencyMs.p99} ms` +
            (r.cpu.machine !== null
              ? `, CPU: machine ${r.cpu.machine} cores, other programs ${r.cpu.outside ?? "?"}`
              : "") +
            (lag
              ? `, lag median ${fmtInt(lag.bytes.median)} B / ${lag.seconds.median} s ` +
                `(end-to-end ${lag.commitSeconds.median} s), max ${fmtInt(lag.bytes.max)} B / ${lag.seconds.max} s ` +
                `(end-to-end ${lag.commitSeconds.max} s), drain ${r.drainSeconds} s`
              : ""),
        );
        runs.push(r);
      }
    }

    const of = (s: Setup) => runs.filter((r) => r.setup === s);
    const tps = {
      a: median(of("a").map((r) => r.tps)),
      b: median(of("b").map((r) => r.tps)),
      c: median(of("c").map((r) => r.tps)),
    };
    const ratioB = r2(tps.b / tps.a);
    const ratioC = r2(tps.c / tps.a);
    // --floor: what the machine allows any mirror (see LABELS): medians and ratios to (a), null without --floor
    const floorTps = floor ? { d: median(of("d").map((r) => r.tps)), e: median(of("e").map((r) => r.tps)) } : null;
    const floorRatios = floorTps ? { writtenTwice: r2(floorTps.d / tps.a), decodedOnly: r2(floorTps.e / tps.a) } : null;
    // Each mirror against its floor (issue 18: at least TARGET_OF_FLOOR): the ratio of the medians.
    const ofFloor = floorTps ? { trigger: r2(tps.b / floorTps.d), logical: r2(tps.c / floorTps.e) } : null;
    const perRepeat = Array.from({ length: repeat }, (_, i) => {
      const get = (s: Setup) => runs.find((r) => r.setup === s && r.repeat === i + 1)!.tps;
      return {
        trigger: r2(get("b") / get("a")),
        logical: r2(get("c") / get("a")),
        ...(floor ? { writtenTwice: r2(get("d") / get("a")), decodedOnly: r2(get("e") / get("a")) } : {}),
      };
    });
    const lag = summarizeLag(of("c"));
    const lagWorst = lag ? Math.max(lag.seconds.max, lag.commitSeconds.max) : NaN;
    const pass = {
      trigger: ratioB >= TARGET_TRIGGER,
      logical: ratioC >= TARGET_LOGICAL,
      lag: lag !== null && lagWorst < TARGET_LAG_SECONDS,
    };
    const cpuMedian = (s: Setup) => {
      const keys = [
        "loadBackends",
        "walsender",
        "applierBackend",
        "server",
        "nodeMain",
        "syncChild",
        "machine",
        "outside",
      ] as const;
      const out: Partial<Record<(typeof keys)[number], number | null>> = {};
      for (const key of keys) {
        const xs = of(s)
          .map((r) => r.cpu[key])
          .filter((x): x is number => x !== null);
        out[key] = xs.length ? r2(median(xs)) : null;
      }
      return out;
    };
    const report = {
      rows,
      connections,
      seconds,
      repeat,
      applier: applierWhere,
      durable,
      server: serverInfo,
      cpus: availableParallelism(),
      load:
        `one-statement transactions: 25% INSERT, 50% UPDATE (1 in 5 moves created_at to another month), 25% ` +
        `DELETE; ${rate === null ? "no pause" : `paced at ${fmtInt(rate)} TPS in all`}`,
      tps: {
        a: Math.round(tps.a),
        b: Math.round(tps.b),
        c: Math.round(tps.c),
        ...(floorTps ? { d: Math.round(floorTps.d), e: Math.round(floorTps.e) } : {}),
      },
      ratios: { trigger: ratioB, logical: ratioC, perRepeat },
      floor: floorRatios ? { ...floorRatios, consumer: FLOOR_CONSUMER } : null,
      ofFloor,
      targets: {
        trigger: TARGET_TRIGGER,
        logical: TARGET_LOGICAL,
        lagSeconds: TARGET_LAG_SECONDS,
        ofFloor: TARGET_OF_FLOOR,
      },
      pass,
      lag: lag ? { ...lag, ignoredFirstSeconds: STEADY_AFTER_SECONDS, drainSeconds: drainSeconds(of("c")) } : null,
      cpuCores: Object.fromEntries(setups.map((x) => [x, cpuMedian(x)])) as Record<Setup, ReturnType<typeof cpuMedian>>,
      runs: runs.map((r) => ({ ...r, tps: Math.round(r.tps) })),
    };

    if (json) {
      process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    } else {
      const out: string[] = [];
      const line = (label: string, value: string) => out.push(`${label.padEnd(28)}${value}`);
      const verdict = (ok: boolean) => (ok ? "PASS" : "FAIL");
      const med = repeat > 1 ? ` (median of ${repeat})` : "";
      out.push("", `pgshift mirror overhead benchmark: ${serverInfo}, ${report.cpus} CPUs`);
      line(
        "load",
        `${connections} connections, ${seconds} s per run, ${fmtInt(rows)} ` +
          `rows; ${report.load}${durable ? "; synchronous_commit = on in the load's sessions" : ""}`,
      );
      line(
        "logical applier",
        applierWhere === "inprocess"
          ? "sync() in this process (same Node event loop as the load driver)"
          : "`pgshift sync` child process",
      );
      line(
        "(a) no migration",
        `${fmtInt(tps.a)} TPS${med}   [${of("a")
          .map((r) => fmtInt(r.tps))
          .join(", ")}]`,
      );
      line(
        "(b) trigger mirror",
        `${fmtInt(tps.b)} TPS${med}   [${of("b")
          .map((r) => fmtInt(r.tps))
          .join(", ")}]`,
      );
      line(
        "(c) logical mirror",
        `${fmtInt(tps.c)} TPS${med}   [${of("c")
          .map((r) => fmtInt(r.tps))
          .join(", ")}]`,
      );
      if (floorTps && floorRatios) {
        const twice = repeat > 1 ? ` (${perRepeat.map((p) => p.writtenTwice!.toFixed(2)).join(", ")})` : "";
        const decoded = repeat > 1 ? ` (${perRepeat.map((p) => p.decodedOnly!.toFixed(2)).join(", ")})` : "";
        line(
          "(d) floor, written twice",
          `${fmtInt(floorTps.d)} TPS${med}   [${of("d")
            .map((r) => fmtInt(r.tps))
            .join(", ")}]   ratio ${floorRatios.writtenTwice.toFixed(2)}${twice}: ` +
            "the load writes each row to a plain copy too, in the same statement; no synchronous mirror costs less",
        );
        line(
          "(e) floor, decoded only",
          `${fmtInt(floorTps.e)} TPS${med}   [${of("e")
            .map((r) => fmtInt(r.tps))
            .join(", ")}]   ratio ${floorRatios.decodedOnly.toFixed(2)}${decoded}: ` +
            `a slot's changes decoded and sent to ${FLOOR_CONSUMER}, nothing applied; no logical mirror costs less`,
        );
      }
      const triggers = repeat > 1 ? `   per repeat: ${perRepeat.map((p) => p.trigger.toFixed(2)).join(", ")}` : "";
      const logicals = repeat > 1 ? `   per repeat: ${perRepeat.map((p) => p.logical.toFixed(2)).join(", ")}` : "";
      line(
        "ratio (b)/(a) trigger",
        `${ratioB.toFixed(2)}   target >= ${TARGET_TRIGGER.toFixed(2)}   ${verdict(pass.trigger)}${triggers}`,
      );
      line(
        "ratio (c)/(a) logical",
        `${ratioC.toFixed(2)}   target >= ${TARGET_LOGICAL.toFixed(2)}   ${verdict(pass.logical)}${logicals}`,
      );
      if (ofFloor) {
        const target = `target >= ${TARGET_OF_FLOOR.toFixed(2)}`;
        line(
          "trigger / its floor (d)",
          `${ofFloor.trigger.toFixed(2)}   ${target}   ${verdict(ofFloor.trigger >= TARGET_OF_FLOOR)}`,
        );
        line(
          "logical / its floor (e)",
          `${ofFloor.logical.toFixed(2)}   ${target}   ${verdict(ofFloor.logical >= TARGET_OF_FLOOR)}`,
        );
      }
      if (lag) {
        line(
          "logical lag, bytes",
          `median ${fmtInt(lag.bytes.median)}   max ${fmtInt(lag.bytes.max)}   (${lag.samples} samples, ` +
            `first ${STEADY_AFTER_SECONDS} s of each run ignored)`,
        );
        line(
          "logical lag, seconds",
          `median ${lag.seconds.median.toFixed(3)}   max ${lag.seconds.max.toFixed(3)}   (replay_lag)`,
        );
        line(
          "  end-to-end",
          `median ${lag.commitSeconds.median.toFixed(3)}   max ${lag.commitSeconds.max.toFixed(3)}   (now() - commit ` +
            `time of the last applied transaction)`,
        );
        line(
          "  target",
          `< ${TARGET_LAG_SECONDS} s (worst of the two maxima: ${lagWorst.toFixed(3)} s)   ${verdict(pass.lag)}`,
        );
        if (lag.pace !== null) {
          const behind =
            lag.pace < 0.98
              ? ` (falls behind: the lag grows ${(1 - lag.pace).toFixed(2)} s every second; ` +
                `${lag.commitSecondsAtEnd?.toFixed(1)} s at the end of the window)`
              : "";
          line("  applier pace", `${lag.pace.toFixed(2)} s of source commits applied per second${behind}`);
        }
        line(
          "  drain after the load",
          report.lag!.drainSeconds === null
            ? "did not catch up in time (see the lines above)"
            : `${report.lag!.drainSeconds} s to confirm everything written in the window`,
        );
      } else {
        line("logical lag", "no steady-state sample   FAIL");
      }
      const cpuLine = (s: Setup) => {
        const c = report.cpuCores[s];
        const part = (label: string, x: number | null | undefined) =>
          x === null || x === undefined ? "" : `${label} ${x.toFixed(2)}  `;
        const backends =
          part("load backends", c.loadBackends) +
          part("walsender", c.walsender) +
          part("applier backend", c.applierBackend);
        const clients =
          part("bench node", c.nodeMain) +
          part(s === "e" ? "consumer" : "sync child", c.syncChild) +
          part("other programs", c.outside);
        return `${part("machine", c.machine)}${part("server", c.server)}(${backends}`.trim() + `)  ${clients}`.trim();
      };
      line("CPU cores busy (a)", cpuLine("a"));
      line("CPU cores busy (b)", cpuLine("b"));
      line("CPU cores busy (c)", cpuLine("c"));
      if (floor) {
        line("CPU cores busy (d)", cpuLine("d"));
        line("CPU cores busy (e)", cpuLine("e"));
      }
      const lat = (s: Setup) => {
        const rs = of(s);
        return (
          `p50 ${median(rs.map((r) => r.latencyMs.p50)).toFixed(2)} ms, ` +
          `p99 ${median(rs.map((r) => r.latencyMs.p99)).toFixed(2)} ms`
        );
      };
      line("latency a / b / c", `${lat("a")} / ${lat("b")} / ${lat("c")}`);
      const errors = runs.reduce((a, r) => a + r.errors, 0);
      if (errors > 0) line("load errors", String(errors));
      process.stdout.write(`${out.join("\n")}\n`);
    }
    return values.strict && !(pass.trigger && pass.logical && pass.lag) ? 1 : 0;
  } finally {
    await cleanup();
  }
}

runBench("bench-overhead", usage, main);
