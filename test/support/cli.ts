import { type ChildProcess, spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { expect } from "vitest";
import { sleep } from "./db.js";

/** The repository root: the CLI runs from here, the way `npx tsx src/cli/main.ts` would. */
export const repoRoot = fileURLToPath(new URL("../..", import.meta.url));

export interface CliResult {
  args: string[];
  /** Exit code, or null when the process was killed by a signal (e.g. the timeout). */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/**
 * Runs the real CLI as a child process: `node --import tsx src/cli/main.ts <args>`.
 * DATABASE_URL and the libpq PG* variables are removed from the environment, so only `--url` counts;
 * PGSHIFT_DEBUG is removed so that error output is what a user sees. `opts.env` is then added (PG* variables
 * a test sets on purpose).
 */
export function runCli(args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const k of Object.keys(env)) {
    if (k === "DATABASE_URL" || k === "PGSHIFT_DEBUG" || /^PG[A-Z]+$/.test(k)) delete env[k];
  }
  Object.assign(env, opts.env);
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", "src/cli/main.ts", ...args], {
      cwd: repoRoot,
      env,
      stdio: ["ignore", "pipe", "pipe"],
      timeout: opts.timeoutMs ?? 60_000,
      killSignal: "SIGKILL",
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code, signal) =>
      resolve({ args, code, signal, stdout, stderr, ms: Math.round(performance.now() - t0) }),
    );
  });
}

/** A result as text for assertion messages. */
export function describeRun(r: CliResult): string {
  return (
    `pgshift ${r.args.join(" ")}\n  exit ${r.code}${r.signal ? ` (${r.signal})` : ""}, ${r.ms} ms\n--- ` +
    `stdout\n${r.stdout}--- stderr\n${r.stderr}---`
  );
}

/**
 * A refused command: exit 2, and on stderr (JSON log lines aside) one `pgshift: error:` line containing every
 * pattern, followed by at most one hint line.
 */
export function expectRefusal(r: CliResult, ...patterns: string[]): void {
  expect(r.code, describeRun(r)).toBe(2);
  const lines = r.stderr.split("\n").filter((l) => l.trim() !== "" && !l.startsWith("{"));
  expect(lines[0], describeRun(r)).toMatch(/^pgshift: error: /);
  expect(lines.length, describeRun(r)).toBeLessThanOrEqual(2);
  if (lines.length === 2) expect(lines[1], describeRun(r)).toMatch(/^pgshift: hint: \S/);
  for (const p of patterns) expect(lines[0], describeRun(r)).toContain(p);
}

/** Polls `cond` every `everyMs` until it is true. @throws after `timeoutMs`, naming `what`. */
export async function waitUntil(
  what: string,
  cond: () => Promise<boolean>,
  timeoutMs = 30_000,
  everyMs = 50,
): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() >= until) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    await sleep(everyMs);
  }
}

/** A long-running CLI child process (`pgshift sync`), with the environment runCli uses (only --url counts). */
export interface Running {
  child: ChildProcess;
  out: { stdout: string; stderr: string };
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts the CLI as a child process and returns at once (see runCli for the environment). */
export function spawnCli(args: string[]): Running {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const k of Object.keys(env)) {
    if (k === "DATABASE_URL" || k === "PGSHIFT_DEBUG" || /^PG[A-Z]+$/.test(k)) delete env[k];
  }
  const child = spawn(process.execPath, ["--import", "tsx", "src/cli/main.ts", ...args], {
    cwd: repoRoot,
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const out = { stdout: "", stderr: "" };
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out.stdout += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (out.stderr += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on("close", (code, signal) => resolve({ code, signal })),
  );
  return { child, out, exited };
}

/** Waits for a child to exit by itself, at most `ms`; SIGKILLs it after that and reports signal SIGKILL. */
export async function exitWithin(
  s: Running,
  ms: number,
): Promise<{ code: number | null; signal: NodeJS.Signals | null; timedOut: boolean }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), ms)));
  const first = await Promise.race([s.exited, timeout]);
  clearTimeout(timer);
  if (first !== "timeout") return { ...first, timedOut: false };
  s.child.kill("SIGKILL");
  return { ...(await s.exited), timedOut: true };
}
