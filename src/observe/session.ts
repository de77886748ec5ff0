/**
 * The metrics endpoint and the hooks of the command this process runs, started before its action (after the
 * options are parsed) and stopped after it, or after its failure (the CLI's error handler). One per process: the
 * CLI runs one command.
 */
import { explain } from "../errors.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import { TRANSITIONS } from "../migration/phases.js";
import { displayName, parseTableName } from "../names.js";
import { type HookName, Hooks } from "./hooks.js";
import type { MetricsServer } from "./metrics.js";

/** The options addObserveOptions() adds, as commander parses them. */
export interface ObserveOpts {
  metricsPort?: number;
  metricsHost?: string;
  hooksDir?: string;
  hooksTimeoutMs?: number;
  dryRun?: boolean;
}

interface Session {
  command: string;
  table: string;
  metrics: MetricsServer | null;
  hooks: Hooks | null;
  stopHooks: (() => void) | null;
}

let current: Session | null = null;

/** Hooks that run once the command succeeded, and the phase the migration is then in. */
const AFTER: Readonly<Record<string, { hook: HookName; phase: string }>> = {
  start: { hook: "on-start", phase: "started" },
  cutover: { hook: "on-cutover", phase: "cutover" },
  "swap-back": { hook: "on-swap-back", phase: "swapped_back" },
  finalize: { hook: "on-finalize", phase: TRANSITIONS.finalize.to },
  abort: { hook: "on-abort", phase: TRANSITIONS.abort.to },
};

/** Hooks that run before the command does anything, and stop it when they fail. */
const BEFORE: Readonly<Record<string, HookName>> = { cutover: "on-before-cutover", "swap-back": "on-before-swap-back" };

/**
 * Starts what `opts` asks for `command` on `tableArg`: the metrics endpoint (--metrics-port), the hooks
 * (--hooks-dir, checked now), and runs the gate hook of a switch. With --dry-run nothing starts (nothing runs, so
 * nothing is observed).
 * @throws PgshiftError (exit 2): the table name is invalid, the port cannot be listened on, a hook is not
 *   executable or unknown, the gate hook failed.
 */
export async function beginObservation(command: string, tableArg: string, opts: ObserveOpts): Promise<void> {
  if (opts.dryRun) return;
  const table = displayName(parseTableName(tableArg));
  const s: Session = { command, table, metrics: null, hooks: null, stopHooks: null };
  current = s;
  if (opts.hooksDir !== undefined) {
    s.hooks = await new Hooks(opts.hooksDir, {
      timeoutMs: opts.hooksTimeoutMs ?? 60_000,
      vars: { table, command },
    }).check();
    s.stopHooks = s.hooks.listen();
  }
  if (opts.metricsPort !== undefined) {
    // Loaded only when asked for: prom-client takes a few hundred ms to load (docs/benchmarks.md).
    const { serveMetrics } = await import("./metrics.js");
    s.metrics = await serveMetrics({ port: opts.metricsPort, host: opts.metricsHost ?? "127.0.0.1" });
  }
  const gate = BEFORE[command];
  if (gate && s.hooks) await s.hooks.gate(gate);
}

/**
 * Ends the observation of the command: after a success, runs the hook of its end (on-start, on-cutover, ...;
 * on-verify-done when the verify did not report it); after a failure (`err`), emits the `failure` event and runs
 * on-failure with PGSHIFT_ERROR. Waits for every hook still running, then stops the metrics endpoint. Never throws.
 */
export async function endObservation(err: unknown = null): Promise<void> {
  const s = current;
  if (!s) return;
  current = null;
  try {
    if (err !== null) {
      const message = explain(err).message;
      emit("failure", { table: s.table, command: s.command, error: message });
      await s.hooks?.run("on-failure", { error: message });
    } else if (s.hooks) {
      const after = AFTER[s.command];
      if (after) await s.hooks.run(after.hook, { phase: after.phase });
      if (s.command === "verify" && !s.hooks.verifyDone) {
        // verify exits 1 when differences remain (src/cli/verify.ts).
        await s.hooks.run("on-verify-done", { verify_equal: process.exitCode !== 1 });
      }
    }
    s.stopHooks?.();
    await s.hooks?.settle();
  } catch (e) {
    log().warn({ err: e instanceof Error ? e.message : String(e) }, "ending the hooks failed");
  } finally {
    await s.metrics?.stop().catch(() => {});
  }
}
