/**
 * Prometheus metrics of a running pgshift command (`--metrics-port`): a prom-client registry fed by the events of
 * src/events.ts (and, for `status --watch`, by the status report read each refresh), served in Prometheus's text
 * exposition format over HTTP at `/metrics`. Every metric's name starts with `pgshift_` and carries the table
 * (schema.name) as the label `table`; docs/metrics.md lists them all.
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import { PgshiftError } from "../errors.js";
import { on } from "../events.js";
import { log } from "../log.js";
import { PHASES } from "../migration/phases.js";

/** The metrics of one process, in their own registry (never prom-client's global one). */
export interface PgshiftMetrics {
  registry: Registry;
  rowsCopied: Gauge<"table">;
  rowsEstimated: Gauge<"table">;
  rate: Gauge<"table">;
  eta: Gauge<"table">;
  batches: Counter<"table">;
  batchDuration: Histogram<"table">;
  batchRows: Gauge<"table">;
  copyComplete: Gauge<"table">;
  lagBytes: Gauge<"table">;
  lagSeconds: Gauge<"table">;
  applied: Counter<"table">;
  throttled: Gauge<"table" | "step">;
  throttledSeconds: Counter<"table" | "step" | "reason">;
  paused: Gauge<"table">;
  lockAttempts: Counter<"table" | "command" | "result">;
  lockWaitSeconds: Counter<"table" | "command">;
  blocked: Histogram<"table" | "command">;
  verifyChunks: Counter<"table">;
  verifyRows: Counter<"table">;
  verifyDifferences: Counter<"table">;
  verifyLast: Gauge<"table" | "kind">;
  verifyEqual: Gauge<"table">;
  phase: Gauge<"table" | "phase">;
  failures: Counter<"table" | "command">;
}

/**
 * A registry with every pgshift metric, and prom-client's process metrics (CPU, memory, event loop lag) prefixed
 * `pgshift_`. Nothing listens yet: see listen().
 */
export function createMetrics(): PgshiftMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: "pgshift_" });
  const registers = [registry];
  const gauge = <L extends string>(name: string, help: string, labelNames: L[]) =>
    new Gauge<L>({ name, help, labelNames, registers });
  const counter = <L extends string>(name: string, help: string, labelNames: L[]) =>
    new Counter<L>({ name, help, labelNames, registers });
  const t = ["table" as const];
  return {
    registry,
    rowsCopied: gauge("pgshift_backfill_rows_copied", "Rows of the table copied into the shadow so far", t),
    rowsEstimated: gauge("pgshift_backfill_rows_estimated", "Rows the copy expects in all (estimate)", t),
    rate: gauge("pgshift_backfill_rows_per_second", "Copy rate, rows per second, since this process started", t),
    eta: gauge("pgshift_backfill_eta_seconds", "Seconds until the copy is done at the current rate", t),
    batches: counter("pgshift_backfill_batches_total", "Backfill batches committed by this process", t),
    batchDuration: new Histogram({
      name: "pgshift_backfill_batch_duration_seconds",
      help: "Duration of each backfill batch (its transaction), seconds",
      labelNames: t,
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers,
    }),
    batchRows: gauge("pgshift_backfill_batch_rows", "Batch size in use: the rows the last batch asked for", t),
    copyComplete: gauge("pgshift_backfill_copy_complete", "1 once every row has been copied, else 0", t),
    lagBytes: gauge("pgshift_sync_lag_bytes", "Logical mode: bytes of WAL the replication slot has not confirmed", t),
    lagSeconds: gauge("pgshift_sync_lag_seconds", "Logical mode: the stream's lag behind the server, seconds", t),
    applied: counter("pgshift_sync_applied_changes_total", "Logical mode: row changes applied to the shadow", t),
    throttled: gauge("pgshift_throttled", "1 while the step waits for a throttle condition, else 0", ["table", "step"]),
    throttledSeconds: counter("pgshift_throttled_seconds_total", "Time the step waited, by throttle reason", [
      "table",
      "step",
      "reason",
    ]),
    paused: gauge("pgshift_paused", "1 while the migration is paused (pgshift pause), else 0", t),
    lockAttempts: counter("pgshift_lock_attempts_total", "Attempts to lock a table pgshift moves, by result", [
      "table",
      "command",
      "result",
    ]),
    lockWaitSeconds: counter("pgshift_lock_wait_seconds_total", "Time spent waiting for those locks, seconds", [
      "table",
      "command",
    ]),
    blocked: new Histogram({
      name: "pgshift_writes_blocked_seconds",
      help: "How long each switch (or other step holding a lock the application waits on) blocked writes, seconds",
      labelNames: ["table", "command"],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    }),
    verifyChunks: counter("pgshift_verify_chunks_total", "Verify chunks compared", t),
    verifyRows: counter("pgshift_verify_rows_total", "Rows of the live table compared by verify", t),
    verifyDifferences: counter("pgshift_verify_differences_total", "Differences found by verify chunks", t),
    verifyLast: gauge("pgshift_verify_last_differences", "The last finished verify's differences, by kind", [
      "table",
      "kind",
    ]),
    verifyEqual: gauge("pgshift_verify_last_equal", "1 when the last finished verify found the tables equal", t),
    phase: gauge("pgshift_phase", "1 for the migration's current phase, 0 for the others", ["table", "phase"]),
    failures: counter("pgshift_failures_total", "Commands that failed", ["table", "command"]),
  };
}

/** Sets pgshift_phase: 1 for `phase`, 0 for every other phase of the state machine. */
export function setPhase(m: PgshiftMetrics, table: string, phase: string): void {
  for (const p of PHASES) m.phase.set({ table, phase: p }, p === phase ? 1 : 0);
}

/**
 * The kind of a throttle's reason, as the `reason` label: what precedes its first colon ("replica lag: standby s1
 * replays 2100 ms behind (limit 1000 ms)" is "replica lag"), at most 40 characters, so that the label takes few
 * values (the whole reason, with its measured value, would make a new series at each wait).
 */
export function reasonKind(reason: string): string {
  const i = reason.indexOf(":");
  return (i > 0 ? reason.slice(0, i) : reason).trim().slice(0, 40);
}

/**
 * Feeds `m` from the event bus until the returned function is called. A `throttle` event with a reason (a wait
 * starts) sets pgshift_throttled to 1; one with a null reason (it ends) sets it to 0; the `ms` of either is added to
 * the throttled time of the kind of reason waited for (reasonKind).
 */
export function listen(m: PgshiftMetrics): () => void {
  /** The kind of reason each table's step waits for now. */
  const waitingFor = new Map<string, string>();
  const offs = [
    on("batch", (e) => {
      const t = { table: e.table };
      m.rowsCopied.set(t, e.rowsCopied);
      m.rowsEstimated.set(t, e.rowsEstimated);
      m.rate.set(t, e.rate);
      if (e.etaSeconds !== null) m.eta.set(t, e.etaSeconds);
      m.batches.inc(t);
      m.batchDuration.observe(t, e.ms / 1000);
      m.batchRows.set(t, e.batchRows);
      m.copyComplete.set(t, 0);
    }),
    on("copyComplete", (e) => {
      m.rowsCopied.set({ table: e.table }, e.rowsCopied);
      m.eta.set({ table: e.table }, 0);
      m.copyComplete.set({ table: e.table }, 1);
    }),
    on("throttle", (e) => {
      const where = { table: e.table, step: e.step };
      const key = `${e.table}\u0000${e.step}`;
      // A wait is reported when it starts (its reason, 0 ms) and when it ends (null reason, the ms it lasted).
      const reason = e.reason === null ? waitingFor.get(key) : reasonKind(e.reason);
      if (e.ms > 0) m.throttledSeconds.inc({ ...where, reason: reason ?? "unknown" }, e.ms / 1000);
      if (e.reason === null) waitingFor.delete(key);
      else waitingFor.set(key, reasonKind(e.reason));
      m.throttled.set(where, e.reason === null ? 0 : 1);
    }),
    on("paused", (e) => m.paused.set({ table: e.table }, e.paused ? 1 : 0)),
    on("lockAttempt", (e) => {
      m.lockAttempts.inc({ table: e.table, command: e.command, result: e.granted ? "granted" : "not_granted" });
      m.lockWaitSeconds.inc({ table: e.table, command: e.command }, e.waitedMs / 1000);
    }),
    on("blocked", (e) => m.blocked.observe({ table: e.table, command: e.command }, e.ms / 1000)),
    on("applied", (e) => {
      const t = { table: e.table };
      m.applied.inc(t, e.changes);
      m.lagBytes.set(t, e.lagBytes);
      if (e.lagSeconds !== null) m.lagSeconds.set(t, e.lagSeconds);
    }),
    on("verifyChunk", (e) => {
      const t = { table: e.table };
      m.verifyChunks.inc(t);
      m.verifyRows.inc(t, e.rows);
      m.verifyDifferences.inc(t, e.differences);
    }),
    on("verifyDone", (e) => {
      m.verifyEqual.set({ table: e.table }, e.equal ? 1 : 0);
      for (const kind of ["missing", "extra", "different"] as const)
        m.verifyLast.set({ table: e.table, kind }, e[kind]);
    }),
    on("phase", (e) => setPhase(m, e.table, e.to)),
    on("failure", (e) => m.failures.inc({ table: e.table, command: e.command })),
  ];
  return () => {
    for (const off of offs) off();
  };
}

/** A metrics endpoint being served. */
export interface MetricsServer {
  metrics: PgshiftMetrics;
  /** Where it listens: http://host:port/metrics. */
  url: string;
  /** Stops listening to events and closes the server (and its open connections). */
  stop: () => Promise<void>;
}

/**
 * Serves `metrics` (a new registry fed by the events when not given) on http://host:port/metrics, in Prometheus's
 * text format. `port` 0 picks a free port (see `url`).
 * @throws PgshiftError when the address cannot be listened on (in use, not an address of this machine).
 */
export async function serveMetrics(opts: {
  port: number;
  host: string;
  metrics?: PgshiftMetrics;
}): Promise<MetricsServer> {
  const metrics = opts.metrics ?? createMetrics();
  const stopListening = listen(metrics);
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { allow: "GET, HEAD" }).end();
      return;
    }
    if (path !== "/metrics") {
      res.writeHead(path === "/" ? 200 : 404, { "content-type": "text/plain" });
      res.end(path === "/" ? "pgshift: metrics at /metrics\n" : "not found: metrics at /metrics\n");
      return;
    }
    metrics.registry.metrics().then(
      (text) => {
        res.writeHead(200, { "content-type": metrics.registry.contentType });
        res.end(req.method === "HEAD" ? undefined : text);
      },
      (err: unknown) => {
        log().warn({ err: err instanceof Error ? err.message : String(err) }, "metrics: collecting failed");
        res.writeHead(500, { "content-type": "text/plain" }).end("collecting the metrics failed\n");
      },
    );
  });
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(opts.port, opts.host, () => {
        server.off("error", reject);
        resolve();
      });
    });
  } catch (err) {
    stopListening();
    const code = (err as NodeJS.ErrnoException).code ?? "";
    throw new PgshiftError(
      `cannot serve metrics on ${opts.host}:${opts.port}: ${code === "EADDRINUSE" ? "the port is in use" : code}`,
      { hint: "choose another --metrics-port (or --metrics-host)", cause: err },
    );
  }
  // A scrape in progress must not keep the process alive once the command is done.
  server.unref();
  const addr = server.address() as AddressInfo;
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  log().info({ url: `http://${host}:${addr.port}/metrics` }, "serving Prometheus metrics");
  return {
    metrics,
    url: `http://${host}:${addr.port}/metrics`,
    stop: async () => {
      stopListening();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
