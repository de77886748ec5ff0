import { describe, expect, it } from "vitest";
import { liveView, paceFields, setFromStatus } from "../../src/cli/status.js";
import { emit } from "../../src/events.js";
import { createMetrics, listen } from "../../src/observe/metrics.js";
import type { StatusReport } from "../../src/status.js";

/**
 * What `status --watch` draws on a terminal (liveView) and serves as gauges (setFromStatus), from status reports
 * written here: with and without the fields of pause, throttle and time-sized batches (issue 16, items 2-4).
 */

function report(extra: Record<string, unknown> = {}): StatusReport {
  return {
    table: "public.orders",
    phase: "backfilling",
    ranges: [],
    mode: "logical",
    partitionBy: "range:created_at:month",
    next: "wait: pgshift backfill is copying",
    running: {
      holder: { pid: 42, command: "backfill", applicationName: "pgshift backfill", since: "2026-01-01T00:00:00Z" },
      backfillRunning: true,
      streamConsumer: null,
      lastBatchAt: "2026-01-01T00:01:00Z",
      lastAppliedCommitAt: null,
      lastStateChangeAt: "2026-01-01T00:01:00Z",
    },
    live: "public.orders",
    copy: "public.orders_pgshift",
    partitioned: "public.orders_pgshift",
    partitions: 12,
    rowsCopied: 2500,
    rowsEstimated: 10000,
    percent: 25,
    rate: 500,
    etaSeconds: 15,
    batches: 5,
    defaultPartition: null,
    mirror: { ok: true, detail: "streaming" },
    schemaDrift: [],
    indexDrift: [],
    lateObjects: [],
    pending: [],
    ddlGuard: "on",
    stream: {
      slot: "pgshift_1",
      exists: true,
      active: true,
      activePid: 77,
      invalidated: null,
      walStatus: "reserved",
      confirmedLsn: "0/1000",
      currentLsn: "0/3000",
      lagBytes: 8192,
      lagSeconds: 1.5,
      retainedBytes: 8192,
      appliedCommitTime: null,
      warnings: [],
    },
    lastVerify: null,
    startedAt: "2026-01-01T00:00:00Z",
    backfillStartedAt: "2026-01-01T00:00:10Z",
    backfillFinishedAt: null,
    cutoverAt: null,
    swappedBackAt: null,
    ...extra,
  } as unknown as StatusReport;
}

/** The pace fields as the status report of issue 16 has them. */
const PACE = {
  paused: { by: "alice", client: "psql 10.0.0.7", since: "2026-01-01T00:02:00Z" },
  throttle: { reason: "replica lag 2.1 s > 1 s", since: new Date(Date.now() - 65_000).toISOString() },
  batch: { rows: 3200, targetMs: 200, lastMs: 180 },
};

describe("status --watch: the live view", () => {
  it("draws the phase, a progress bar, rate and ETA, lag, last verify, next", () => {
    const text = liveView(report(), 1000).join("\n");
    expect(text).toMatch(/^phase\s+backfilling$/m);
    // 25% of a 30-character bar, by cli-progress's bar formatter.
    expect(text).toContain(`${"\u2588".repeat(8)}${"\u2591".repeat(22)}  25.0%  2500 / 10000 rows, 5 batches`);
    expect(text).toMatch(/^rate\s+500 rows\/s, ETA 15s$/m);
    expect(text).toMatch(/^lag\s+8\.0 kB, 1\.5 s \(slot streaming to pid 77\)$/m);
    expect(text).toMatch(/^throttle\s+not throttled$/m);
    expect(text).toMatch(/^last verify\s+never$/m);
    expect(text).toMatch(/^next\s+wait: pgshift backfill is copying$/m);
    // Without the pace fields: no paused or batch size line (nothing known), no error.
    expect(text).not.toMatch(/^paused/m);
    expect(text).not.toMatch(/^batch size/m);
  });

  it("shows pause, the throttle's reason and the batch size in use when the report has them", () => {
    const text = liveView(report(PACE), 1000).join("\n");
    expect(text).toMatch(
      /^paused\s+PAUSED by alice \(psql 10\.0\.0\.7\) since 2026-01-01T00:02:00Z \(pgshift resume public\.orders\)$/m,
    );
    expect(text).toMatch(/^throttle\s+WAITING: replica lag 2\.1 s > 1 s \(for 1m0[56]s\)$/m);
    expect(text).toMatch(/^batch size\s+3200 rows, target 200 ms, last batch 180 ms$/m);
    // Present but null: not paused, not throttled, no batch yet.
    const none = liveView(report({ paused: null, throttle: null, batch: null }), 1000).join("\n");
    expect(none).toMatch(/^paused\s+no$/m);
    expect(none).toMatch(/^throttle\s+not throttled$/m);
    expect(none).not.toMatch(/^batch size/m);
    expect(paceFields(report()).paused).toBeNull();
  });

  it("shows how many key ranges of a backfill with workers are done", () => {
    const ranges = [
      { range_no: 0, lower: null, upper: ["1000"], checkpoint: null, rows_copied: 1000, batches: 2, done: true },
      {
        range_no: 1,
        lower: ["1000"],
        upper: ["2000"],
        checkpoint: ["1500"],
        rows_copied: 500,
        batches: 1,
        done: false,
      },
      { range_no: 2, lower: ["2000"], upper: null, checkpoint: null, rows_copied: 0, batches: 0, done: false },
    ];
    const text = liveView(report({ ranges }), 1000).join("\n");
    expect(text).toMatch(/^ranges\s+1 of 3 key ranges done$/m);
    expect(liveView(report(), 1000).join("\n")).not.toMatch(/^ranges/m);
  });

  it("before the backfill and after it", () => {
    expect(liveView(report({ percent: null, rate: null }), 1000).join("\n")).toMatch(/^backfill\s+not started$/m);
    const done = liveView(report({ rate: null, backfillFinishedAt: "2026-01-01T00:05:00Z" }), 2000).join("\n");
    expect(done).toMatch(/^rate\s+- \(backfill complete\)$/m);
    expect(done).toContain("every 2 s");
  });
});

describe("status --watch --metrics-port: gauges from the report", () => {
  it("sets rows, rate, ETA, phase, lag, paused, throttled, batch size", async () => {
    const m = createMetrics();
    setFromStatus(m, report(PACE));
    const text = await m.registry.metrics();
    const t = 'table="public.orders"';
    expect(text).toContain(`pgshift_backfill_rows_copied{${t}} 2500`);
    expect(text).toContain(`pgshift_backfill_rows_estimated{${t}} 10000`);
    expect(text).toContain(`pgshift_backfill_rows_per_second{${t}} 500`);
    expect(text).toContain(`pgshift_backfill_eta_seconds{${t}} 15`);
    expect(text).toContain(`pgshift_phase{${t},phase="backfilling"} 1`);
    expect(text).toContain(`pgshift_phase{${t},phase="started"} 0`);
    expect(text).toContain(`pgshift_sync_lag_bytes{${t}} 8192`);
    expect(text).toContain(`pgshift_sync_lag_seconds{${t}} 1.5`);
    expect(text).toContain(`pgshift_paused{${t}} 1`);
    expect(text).toContain(`pgshift_throttled{${t},step="any"} 1`);
    expect(text).toContain(`pgshift_backfill_batch_rows{${t}} 3200`);
    // The rate goes away when no backfill runs.
    setFromStatus(m, report({ rate: null, etaSeconds: null }));
    expect(await m.registry.metrics()).not.toContain(`pgshift_backfill_rows_per_second{${t}}`);
  });
});

describe("metrics from the events", () => {
  it("throttled time goes to the kind of reason waited for, added when the wait ends", async () => {
    const m = createMetrics();
    const stop = listen(m);
    const table = "public.orders";
    try {
      emit("throttle", { table, step: "backfill", reason: "replica lag: standby s1 replays 2100 ms behind", ms: 0 });
      let text = await m.registry.metrics();
      expect(text).toContain(`pgshift_throttled{table="${table}",step="backfill"} 1`);
      emit("throttle", { table, step: "backfill", reason: null, ms: 1500 });
      text = await m.registry.metrics();
      expect(text).toContain(`pgshift_throttled{table="${table}",step="backfill"} 0`);
      expect(text).toContain(
        `pgshift_throttled_seconds_total{table="${table}",step="backfill",reason="replica lag"} 1.5`,
      );
      emit("paused", { table, paused: true, by: "alice", since: "2026-01-01T00:00:00Z" });
      expect(await m.registry.metrics()).toContain(`pgshift_paused{table="${table}"} 1`);
    } finally {
      stop();
    }
    // Stopped: no longer fed.
    emit("paused", { table, paused: false, by: null, since: null });
    expect(await m.registry.metrics()).toContain(`pgshift_paused{table="${table}"} 1`);
  });
});
