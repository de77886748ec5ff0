import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createWorkload, type RunningLoad, startLoad, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { describeRun, exitWithin, type Running, runCli, spawnCli, waitUntil } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * Item 5 of issue 16: `--metrics-port` serves Prometheus's text format while the real CLI runs (a child process),
 * scraped here over HTTP: during a slowed-down backfill (rows copied rising, batches and their durations, the
 * table label) and during `sync` of a logical-mode migration under a write load (applied changes rising, lag).
 */

let db: TestDatabase;
const children: Running[] = [];
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  for (const c of children) if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill("SIGKILL");
  await db?.close();
});

const MONTH = parsePartitionSpec("range:created_at:month");

/** Starts the CLI with `--metrics-port 0` and returns it with the URL its log says it serves. */
async function spawnWithMetrics(args: string[]): Promise<{ run: Running; url: string }> {
  const run = spawnCli([...args, "--metrics-port", "0", "--url", db.url]);
  children.push(run);
  let url = "";
  await waitUntil(
    "the command logs where it serves its metrics",
    async () => {
      if (run.child.exitCode !== null) throw new Error(`exited early:\n${run.out.stderr}`);
      url = /"url":"(http:\/\/127\.0\.0\.1:\d+\/metrics)"/.exec(run.out.stderr)?.[1] ?? "";
      return url !== "";
    },
    30_000,
  );
  return { run, url };
}

/** One sample of a scrape: the value of `name` with every label of `labels`, or null when absent. */
function sample(text: string, name: string, labels: Record<string, string> = {}): number | null {
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[3] ?? "").matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(m[4]);
  }
  return null;
}

async function scrape(url: string): Promise<{ text: string; contentType: string }> {
  const r = await fetch(url);
  expect(r.status).toBe(200);
  return { text: await r.text(), contentType: r.headers.get("content-type") ?? "" };
}

describe("metrics during a backfill", () => {
  const w: Workload = {
    table: { schema: "public", name: "met_bf" },
    twin: { schema: "twin", name: "met_bf" },
    keyKind: "bigint",
  };
  beforeAll(async () => {
    await createWorkload(db.admin, w, 4000);
    await startMigration(db.sql, w.table, { allowKeyExtension: true, spec: MONTH });
  });

  it("serves pgshift_ metrics over HTTP with the table label, rows copied rising, batches timed", async () => {
    const { run, url } = await spawnWithMetrics(["backfill", "met_bf", "--batch-size", "100", "--sleep-ms", "150"]);
    const t = { table: "public.met_bf" };
    const copied: number[] = [];
    let first = "";
    await waitUntil(
      "three scrapes see rows copied rise",
      async () => {
        const { text, contentType } = await scrape(url);
        expect(contentType).toMatch(/^text\/plain; version=0\.0\.4/);
        const n = sample(text, "pgshift_backfill_rows_copied", t);
        if (n !== null && n > 0 && n !== copied[copied.length - 1]) copied.push(n);
        if (copied.length === 1 && first === "") first = text;
        return copied.length >= 3;
      },
      30_000,
      300,
    );
    expect(copied).toEqual([...copied].sort((a, b) => a - b));
    const { text } = await scrape(url);
    expect(run.child.exitCode, run.out.stderr).toBeNull();
    const est = sample(text, "pgshift_backfill_rows_estimated", t);
    expect(est).toBeGreaterThan(3000);
    expect(est).toBeLessThan(6000);
    expect(sample(text, "pgshift_backfill_rows_copied", t)).toBeLessThanOrEqual(est ?? 0);
    expect(sample(text, "pgshift_backfill_batches_total", t)).toBeGreaterThanOrEqual(3);
    expect(sample(text, "pgshift_backfill_batch_duration_seconds_count", t)).toBe(
      sample(text, "pgshift_backfill_batches_total", t),
    );
    expect(sample(text, "pgshift_backfill_batch_duration_seconds_sum", t)).toBeGreaterThan(0);
    expect(sample(text, "pgshift_backfill_batch_rows", t)).toBeGreaterThan(0);
    expect(sample(text, "pgshift_backfill_rows_per_second", t)).toBeGreaterThan(0);
    expect(sample(text, "pgshift_backfill_eta_seconds", t)).toBeGreaterThan(0);
    expect(sample(text, "pgshift_backfill_copy_complete", t)).toBe(0);
    // Every metric of pgshift is named pgshift_ (prom-client's process metrics included).
    const names = text
      .split("\n")
      .filter((l) => l.startsWith("# TYPE "))
      .map((l) => l.split(" ")[2]);
    expect(names.length).toBeGreaterThan(10);
    for (const n of names) expect(n).toMatch(/^pgshift_/);
    expect(first).toContain('table="public.met_bf"');
    // Not found elsewhere than /metrics.
    expect((await fetch(url.replace("/metrics", "/nope"))).status).toBe(404);

    const end = await exitWithin(run, 60_000);
    expect(end.code, run.out.stderr).toBe(0);
    expect(run.out.stdout).toContain("backfill complete");
    expect((await loadMigration(db.sql, w.table))?.phase).toBe("backfilled");
    // The endpoint is closed with the command.
    await expect(fetch(url)).rejects.toThrow();
  }, 90_000);

  it("serves verify's chunks, rows compared and the result while verify runs", async () => {
    // Each chunk waits for the throttle query (150 ms, then false: go on), so the scrapes see verify in progress.
    const { run, url } = await spawnWithMetrics([
      "verify",
      "met_bf",
      "--chunk-size",
      "200",
      "--throttle-query",
      "SELECT false FROM pg_sleep(0.15)",
    ]);
    const t = { table: "public.met_bf" };
    const chunks: number[] = [];
    await waitUntil(
      "two scrapes see verify's chunks rise",
      async () => {
        const n = sample((await scrape(url)).text, "pgshift_verify_chunks_total", t);
        if (n !== null && n > 0 && n !== chunks[chunks.length - 1]) chunks.push(n);
        return chunks.length >= 2;
      },
      30_000,
      100,
    );
    const { text } = await scrape(url);
    expect(sample(text, "pgshift_verify_rows_total", t)).toBeGreaterThanOrEqual(200 * (chunks[1] ?? 0));
    expect(sample(text, "pgshift_verify_differences_total", t) ?? 0).toBe(0);
    expect((await exitWithin(run, 60_000)).code, run.out.stderr).toBe(0);
  }, 90_000);

  it("refuses a port already in use: exit 2, one line, nothing copied", async () => {
    const { run, url } = await spawnWithMetrics(["status", "met_bf", "--watch", "--interval", "200"]);
    const port = new URL(url).port;
    const before = (await loadMigration(db.sql, w.table))?.rows_copied;
    const r = await runCli(["verify", "met_bf", "--metrics-port", port, "--url", db.url]);
    expect(r.code, describeRun(r)).toBe(2);
    const lines = r.stderr.split("\n").filter((l) => l.startsWith("pgshift: "));
    expect(lines[0]).toBe(`pgshift: error: cannot serve metrics on 127.0.0.1:${port}: the port is in use`);
    expect((await loadMigration(db.sql, w.table))?.rows_copied).toBe(before);
    // status --watch serves the status as gauges.
    const { text } = await scrape(url);
    expect(sample(text, "pgshift_phase", { table: "public.met_bf", phase: "backfilled" })).toBe(1);
    expect(sample(text, "pgshift_phase", { table: "public.met_bf", phase: "started" })).toBe(0);
    expect(sample(text, "pgshift_backfill_copy_complete", { table: "public.met_bf" })).toBe(1);
    expect(sample(text, "pgshift_backfill_rows_copied", { table: "public.met_bf" })).toBe(before);
    run.child.kill("SIGINT");
    expect((await exitWithin(run, 10_000)).code).toBe(0);
  }, 60_000);
});

describe("metrics during sync (logical mode)", () => {
  const w: Workload = {
    table: { schema: "public", name: "met_sync" },
    twin: { schema: "twin", name: "met_sync" },
    keyKind: "bigint",
  };
  let load: RunningLoad | null = null;
  beforeAll(async () => {
    await createWorkload(db.admin, w, 2000);
    await startMigration(db.sql, w.table, { allowKeyExtension: true, spec: MONTH, mode: "logical" });
    load = await startLoad(db.url, w, { connections: 2, pauseMs: 5 });
  });
  afterAll(async () => {
    await load?.stop();
  });

  it("serves applied changes (rising) and the lag", async () => {
    const { run, url } = await spawnWithMetrics(["sync", "met_sync"]);
    const t = { table: "public.met_sync" };
    const applied: number[] = [];
    let last = "";
    await waitUntil(
      "applied changes rise in three scrapes",
      async () => {
        last = (await scrape(url)).text;
        const n = sample(last, "pgshift_sync_applied_changes_total", t);
        if (n !== null && n > 0 && n !== applied[applied.length - 1]) applied.push(n);
        return applied.length >= 3;
      },
      45_000,
      500,
    );
    expect(applied).toEqual([...applied].sort((a, b) => a - b));
    const lag = sample(last, "pgshift_sync_lag_bytes", t);
    expect(lag).not.toBeNull();
    expect(lag).toBeGreaterThanOrEqual(0);
    expect(lag).toBeLessThan(64 * 1024 ** 2);
    expect(last).toMatch(/^# TYPE pgshift_sync_applied_changes_total counter$/m);
    expect(last).toMatch(/^# TYPE pgshift_sync_lag_seconds gauge$/m);
    run.child.kill("SIGINT");
    const end = await exitWithin(run, 15_000);
    expect(end.code, run.out.stderr).toBe(0);
    await sleep(100);
  }, 90_000);
});
