/**
 * Hooks (`--hooks-dir <dir>`): executables in a directory, named after pgshift's events, that a command runs when the
 * event happens, with what it knows in environment variables (the table, the command, the phase, counts, the
 * error). The model is gh-ost's hooks; docs/hooks.md lists the hooks and their variables.
 *
 * A hook runs without a shell (spawn, in a process group of its own), with the environment of pgshift plus the
 * PGSHIFT_* variables, for at most the timeout (then its whole process group is killed); its output is logged. A
 * missing hook is skipped. A failing `on-before-cutover` or `on-before-swap-back` (non-zero exit, killed, timed
 * out) stops the switch before it changes anything; every other hook's failure is logged and the command goes on.
 */
import { spawn } from "node:child_process";
import { constants } from "node:fs";
import { access, readdir, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import { PgshiftError } from "../errors.js";
import { on } from "../events.js";
import { log } from "../log.js";

/** Every hook pgshift runs, with when it runs. */
export const HOOKS = {
  "on-start": "start succeeded: the shadow table and the mirror are in place",
  "on-copy-complete": "the backfill copied the last row (before the indexes are built)",
  "on-verify-done": "a verify finished (equal or not)",
  "on-before-cutover": "cutover is about to start, before it changes anything; a failure stops it",
  "on-cutover": "cutover committed: the partitioned table is live",
  "on-before-swap-back": "swap-back is about to start, before it changes anything; a failure stops it",
  "on-swap-back": "swap-back committed: the original table is live again",
  "on-finalize": "finalize dropped the retired table: the migration is over",
  "on-abort": "abort removed the shadow and the mirror: the migration is forgotten",
  "on-throttle": "the copy, verify or applier started waiting for a throttle condition (or for another reason)",
  "on-pause": "the command saw the migration paused (pgshift pause)",
  "on-resume": "the command saw the migration resumed (pgshift resume)",
  "on-failure": "the command failed; PGSHIFT_ERROR says why",
} as const;

export type HookName = keyof typeof HOOKS;

/** Hooks whose failure stops the command. */
const GATES: ReadonlySet<HookName> = new Set(["on-before-cutover", "on-before-swap-back"]);

/** Output of a hook kept (and logged), the last characters of each stream. */
const OUTPUT_KEPT = 4000;

/** What a hook is told: PGSHIFT_<KEY> variables, keys in upper snake case; null and undefined are left out. */
export type HookVars = Record<string, string | number | boolean | null | undefined>;

/** How one hook run ended. */
export interface HookResult {
  hook: HookName;
  ok: boolean;
  /** Exit code, or null when killed (timeout: signal SIGKILL). */
  code: number | null;
  signal: string | null;
  ms: number;
  stdout: string;
  stderr: string;
  /** Why it failed, one line, or null. */
  error: string | null;
}

/**
 * The hooks of a directory, found and checked once (`check`), run by name (`run`) or from the event bus (`listen`).
 */
export class Hooks {
  readonly dir: string;
  readonly timeoutMs: number;
  /** Variables every hook gets (PGSHIFT_TABLE, PGSHIFT_COMMAND, ...), updated as the command goes on. */
  readonly vars: HookVars;
  private present = new Set<HookName>();
  private pending = new Set<Promise<HookResult | null>>();
  private readonly t0 = Date.now();

  constructor(dir: string, opts: { timeoutMs: number; vars: HookVars }) {
    this.dir = resolve(dir);
    this.timeoutMs = opts.timeoutMs;
    this.vars = { ...opts.vars };
  }

  /**
   * Finds the hooks in the directory: files whose names are in HOOKS. Files whose names do not start with `on-`
   * are ignored (a README); an `on-*` name pgshift does not know is refused, so that a misspelt hook (a gate
   * above all) is not silently skipped.
   * @throws PgshiftError (exit 2) when the directory is missing or unreadable, a hook is not a regular file or
   *   not executable by this user, or an `on-*` name is unknown.
   */
  async check(): Promise<this> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      throw new PgshiftError(`--hooks-dir ${this.dir} cannot be read: ${(err as NodeJS.ErrnoException).code}`, {
        hint: "give a directory holding executables named after the hooks (docs/hooks.md)",
      });
    }
    for (const name of names.sort()) {
      if (!name.startsWith("on-")) continue;
      if (!(name in HOOKS)) {
        throw new PgshiftError(`--hooks-dir ${this.dir}: ${name} is not a pgshift hook`, {
          hint: `the hooks are ${Object.keys(HOOKS).join(", ")}; rename or remove it`,
        });
      }
      const path = join(this.dir, name);
      const st = await stat(path);
      const executable = await access(path, constants.X_OK).then(
        () => true,
        () => false,
      );
      if (!st.isFile() || !executable) {
        throw new PgshiftError(`hook ${path} is not an executable file`, { hint: `chmod +x ${path}` });
      }
      this.present.add(name as HookName);
    }
    log().info({ dir: this.dir, hooks: [...this.present] }, "hooks found");
    return this;
  }

  /** Whether `hook` exists in the directory (as check() found it). */
  has(hook: HookName): boolean {
    return this.present.has(hook);
  }

  /**
   * Runs `hook` if it exists, with the environment of pgshift, the PGSHIFT_* variables of `vars` and of this
   * object, PGSHIFT_HOOK and PGSHIFT_ELAPSED_SECONDS; waits at most the timeout, then kills it and every process
   * it started (SIGKILL to its process group). Logs how it ended
   * and its output.
   * @returns how it ended, or null when the hook does not exist.
   */
  run(hook: HookName, vars: HookVars = {}): Promise<HookResult | null> {
    if (!this.present.has(hook)) return Promise.resolve(null);
    const env: NodeJS.ProcessEnv = { ...process.env };
    const all: HookVars = {
      ...this.vars,
      ...vars,
      hook,
      hooks_dir: this.dir,
      elapsed_seconds: Math.round((Date.now() - this.t0) / 1000),
    };
    for (const [k, v] of Object.entries(all)) {
      if (v !== null && v !== undefined) env[`PGSHIFT_${k.toUpperCase()}`] = String(v);
    }
    const t0 = performance.now();
    const p = new Promise<HookResult>((done) => {
      let timedOut = false;
      let stdout = "";
      let stderr = "";
      // spawn without a shell (execFile would not start it in a process group of its own): detached, so that
      // at the timeout the whole group is killed and what the hook started dies with it.
      const child = spawn(join(this.dir, hook), [], {
        env,
        cwd: this.dir,
        detached: true,
        stdio: ["ignore", "pipe", "pipe"],
      });
      const keep = (text: string, d: string) => (text + d).slice(-OUTPUT_KEPT);
      child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout = keep(stdout, d)));
      child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr = keep(stderr, d)));
      const timer = setTimeout(() => {
        timedOut = true;
        try {
          if (child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
        } catch {
          child.kill("SIGKILL");
        }
      }, this.timeoutMs);
      const finish = (code: number | null, signal: string | null, failure: string | null) => {
        clearTimeout(timer);
        const error = timedOut
          ? `timed out after ${this.timeoutMs} ms`
          : failure
            ? failure
            : code !== 0 && code !== null
              ? `exit code ${code}${lastLine(stderr) ? `: ${lastLine(stderr)}` : ""}`
              : signal
                ? `killed by ${signal}`
                : null;
        done({ hook, ok: error === null, code, signal, ms: Math.round(performance.now() - t0), stdout, stderr, error });
      };
      child.on("error", (err: NodeJS.ErrnoException) =>
        finish(null, null, `cannot run it: ${err.code ?? err.message}`),
      );
      child.on("close", (code, signal) => finish(code, signal, null));
    }).then((r) => {
      const fields = {
        hook,
        ms: r.ms,
        code: r.code,
        stdout: r.stdout,
        stderr: r.stderr,
      };
      if (r.ok) log().info(fields, `hook ${hook} ran`);
      else log().warn({ ...fields, error: r.error }, `hook ${hook} failed`);
      return r;
    });
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
    return p;
  }

  /**
   * Runs a gate hook (on-before-cutover, on-before-swap-back) and waits for it.
   * @throws PgshiftError (exit 2) when it fails: `the <hook> hook failed: <why>`.
   */
  async gate(hook: HookName, vars: HookVars = {}): Promise<void> {
    if (!GATES.has(hook)) throw new Error(`${hook} is not a gate hook`);
    const r = await this.run(hook, vars);
    if (r && !r.ok) {
      throw new PgshiftError(`the ${hook} hook failed: ${r.error}`, {
        hint: `nothing was changed; ${join(this.dir, hook)} decides when the switch may run`,
      });
    }
  }

  /**
   * Runs the hooks of the event bus's events while the command runs: on-copy-complete, on-verify-done,
   * on-throttle (when the reason changes to a new one), on-pause, on-resume. Counts the events carry are added to
   * `vars` for every later hook. Returns the function that stops listening.
   */
  listen(): () => void {
    let throttleReason: string | null = null;
    let pausedNow: boolean | null = null;
    const offs = [
      on("batch", (e) => {
        Object.assign(this.vars, {
          rows_copied: e.rowsCopied,
          rows_estimated: e.rowsEstimated,
          batch_rows: e.batchRows,
        });
      }),
      on("copyComplete", (e) => {
        Object.assign(this.vars, { rows_copied: e.rowsCopied, batches: e.batches });
        void this.run("on-copy-complete", { phase: "backfilling" });
      }),
      on("verifyDone", (e) => {
        this.verifyDone = true;
        void this.run("on-verify-done", {
          verify_equal: e.equal,
          verify_missing: e.missing,
          verify_extra: e.extra,
          verify_different: e.different,
        });
      }),
      on("throttle", (e) => {
        if (e.reason !== null && e.reason !== throttleReason)
          void this.run("on-throttle", { throttle_reason: e.reason, throttle_step: e.step });
        throttleReason = e.reason;
      }),
      on("paused", (e) => {
        if (e.paused !== pausedNow)
          void this.run(e.paused ? "on-pause" : "on-resume", { paused_by: e.by, paused_since: e.since });
        pausedNow = e.paused;
      }),
      on("blocked", (e) => {
        this.vars.writes_blocked_ms = Math.round(e.ms * 10) / 10;
      }),
      on("phase", (e) => {
        this.vars.phase = e.to;
      }),
    ];
    return () => {
      for (const off of offs) off();
    };
  }

  /** Whether a verifyDone event was seen (else the verify command's end runs on-verify-done itself). */
  verifyDone = false;

  /** Waits for every hook started so far to end. */
  async settle(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }
}

function lastLine(text: string): string {
  const lines = String(text).trim().split("\n");
  return (lines[lines.length - 1] ?? "").slice(0, 200);
}
