/**
 * Overhead per run: how long `pgshift backfill <table>` takes on a tiny table (100 rows, one secondary index),
 * where nearly all of it is not copying rows: node's own start, loading pgshift's modules, connecting, and the
 * statements around the copy. Runs the built CLI (`node dist/cli/main.js`: run `npm run build` first) against
 * an embedded PostgreSQL (or DATABASE_URL), `--repeat` times, and prints the medians (ms):
 *
 * - `node -e 0`: node alone;
 * - `pgshift --version`: node and pgshift's modules for the command line (commander, the command definitions);
 * - `pgshift backfill`: the whole command, with, from the server's statement log (log_min_duration_statement = 0,
 *   embedded server only): the time until its first statement (start-up and connecting), the statements it
 *   sent, and the time from its first to its last statement.
 *
 * Usage: scripts/bench-startup [--repeat N] [--durable] [--statements] [--baseline <main.js>] [--json]
 * (`--statements`: also print the statements of the last backfill, each with the ms since the one before;
 * `--baseline`: another build's dist/cli/main.js, run in turn with this one in every round, for a before/after.)
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import postgres from "postgres";
import { type EmbeddedServer, startEmbedded } from "../src/embedded.js";
import { median, positiveInt, printedHelp, runBench } from "./bench-common.js";

const TIME = "/usr/bin/time";
const root = fileURLToPath(new URL("..", import.meta.url));
const usage = () =>
  "usage: scripts/bench-startup [--repeat N (default 7)] [--durable] [--statements] [--baseline <main.js>] [--json]";

/** One logged statement of a pgshift session: when it ended (ms since the epoch) and its text. */
interface Logged {
  at: number;
  app: string;
  text: string;
}

/**
 * Runs node with `args` and times it: wall-clock ms, and the CPU time of the process (user + system, ms, read
 * by /usr/bin/time when it is there; on a busy machine the steadier figure). Asynchronous, so that the
 * embedded server's log (a pipe to this process) keeps being read meanwhile: a full pipe would stop the server.
 */
function timed(
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ ms: number; cpu: number; start: number }> {
  const start = Date.now();
  const t0 = performance.now();
  const [cmd, argv] = existsSync(TIME)
    ? [TIME, ["-f", "pgshift-bench-cpu %U %S", process.execPath, ...args]]
    : [process.execPath, args];
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { cwd: root, env, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    child.on("error", reject);
    child.on("exit", (code) => {
      const ms = performance.now() - t0;
      const m = /pgshift-bench-cpu ([0-9.]+) ([0-9.]+)/.exec(stderr);
      const cpu = m ? (Number(m[1]) + Number(m[2])) * 1000 : Number.NaN;
      if (code === 0) resolve({ ms, cpu, start });
      else reject(new Error(`node ${args.join(" ")} exited ${code}: ${stderr.trim()}`));
    });
  });
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      repeat: { type: "string" },
      durable: { type: "boolean", default: false },
      statements: { type: "boolean", default: false },
      baseline: { type: "string" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (printedHelp(values, usage)) return 0;
  const repeat = positiveInt("--repeat", values.repeat, 7);
  const say = (l: string) => {
    if (!values.json) process.stdout.write(`${l}\n`);
  };
  const logged: Logged[] = [];
  let server: EmbeddedServer | null = null;
  const external = process.env.DATABASE_URL;
  if (!external) {
    say("starting the embedded PostgreSQL ...");
    server = await startEmbedded({
      durable: values.durable,
      log: (line) => {
        // log_line_prefix '%m [%a] ': "2026-12-07 19:50:01.123 UTC [pgshift backfill] LOG:  duration: ..."
        const m = /^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\S+) \[(.*?)\] LOG: {2}duration: [0-9.]+ ms {2}(.*)$/.exec(
          line,
        );
        if (m) logged.push({ at: Date.parse(`${m[1]!.replace(" ", "T")}Z`), app: m[3]!, text: m[4]! });
      },
    });
  }
  const url = external ?? server!.url;
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  const env = { ...process.env, DATABASE_URL: url };
  try {
    if (server) {
      await sql`alter system set log_min_duration_statement = 0`;
      await sql`alter system set log_line_prefix = '%m [%a] '`;
      await sql`alter system set log_timezone = 'UTC'`;
      await sql`select pg_reload_conf()`;
    }
    type Row = {
      version: number;
      versionCpu: number;
      backfill: number;
      backfillCpu: number;
      first: number;
      statements: number;
      db: number;
    };
    const clis: [string, string][] = [
      ...(values.baseline ? ([["baseline", values.baseline]] as [string, string][]) : []),
      ["this build", "dist/cli/main.js"],
    ];
    const rows = new Map<string, Row[]>(clis.map(([name]) => [name, []]));
    const nodeMs: number[] = [];
    const nodeCpu: number[] = [];
    for (let i = 0; i < repeat; i++) {
      const n = await timed(["-e", "0"]);
      nodeMs.push(n.ms);
      nodeCpu.push(n.cpu);
      for (const [name, cli] of clis) {
        const t = `bench_startup_${i}_${name === "baseline" ? "b" : "c"}`;
        await sql.unsafe(`drop table if exists ${t} cascade`);
        await sql.unsafe(`create table ${t} (id bigint primary key, created_at timestamptz not null, v int);
          insert into ${t} select g, timestamptz '2025-01-01' + g * interval '1 day', g from generate_series(1, 100) g;
          create index on ${t} (v); analyze ${t}`);
        await timed([cli, "start", t, "--partition-by", "range:created_at:month", "--allow-key-extension"], env);
        const version = await timed([cli, "--version"]);
        logged.length = 0;
        const b = await timed([cli, "backfill", t], env);
        await new Promise((r) => setTimeout(r, 200)); // the server's last log lines
        const mine = logged.filter((l) => l.app === "pgshift backfill" && l.at >= b.start);
        const statements = mine.filter((l) => /^(statement|execute)/.test(l.text)).length;
        const first = mine.length > 0 ? mine[0]!.at - b.start : Number.NaN;
        const db = mine.length > 0 ? mine[mine.length - 1]!.at - mine[0]!.at : Number.NaN;
        rows.get(name)!.push({
          version: version.ms,
          versionCpu: version.cpu,
          backfill: b.ms,
          backfillCpu: b.cpu,
          first,
          statements,
          db,
        });
        say(
          `round ${i + 1}, ${name}: --version ${Math.round(version.ms)} ms (CPU ${Math.round(version.cpu)}), ` +
            `backfill ${Math.round(b.ms)} ms (CPU ${Math.round(b.cpu)}; first statement at ${first} ms, ` +
            `${statements} statements over ${db} ms)`,
        );
        if (values.statements && i === repeat - 1)
          for (const [n, l] of mine.entries())
            say(`  +${n === 0 ? first : l.at - mine[n - 1]!.at} ms ${l.text.replace(/\s+/g, " ").slice(0, 110)}`);
      }
    }
    const med = (xs: number[]) => Math.round(median(xs));
    const result = {
      repeat,
      durable: values.durable,
      nodeMs: med(nodeMs),
      nodeCpuMs: med(nodeCpu),
      runs: Object.fromEntries(
        [...rows].map(([name, rs]) => [
          name,
          {
            versionMs: med(rs.map((r) => r.version)),
            versionCpuMs: med(rs.map((r) => r.versionCpu)),
            backfillMs: med(rs.map((r) => r.backfill)),
            backfillCpuMs: med(rs.map((r) => r.backfillCpu)),
            firstStatementMs: med(rs.map((r) => r.first)),
            statements: med(rs.map((r) => r.statements)),
            statementsSpanMs: med(rs.map((r) => r.db)),
          },
        ]),
      ),
    };
    if (values.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    else {
      say(
        `medians of ${repeat} rounds (wall-clock ms, CPU ms): node alone (node -e 0) ${result.nodeMs}, ` +
          `${result.nodeCpuMs}`,
      );
      for (const [name, r] of Object.entries(result.runs))
        say(
          `  ${name}: pgshift --version ${r.versionMs}, ${r.versionCpuMs}; pgshift backfill ${r.backfillMs}, ` +
            `${r.backfillCpuMs}: first statement at ${r.firstStatementMs} ms, ${r.statements} statements over ` +
            `${r.statementsSpanMs} ms`,
        );
    }
    return 0;
  } finally {
    await sql.end({ timeout: 5 });
    await server?.stop();
  }
}

runBench("bench-startup", usage, main);
