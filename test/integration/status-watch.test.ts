import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { abort } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import type { StatusReport } from "../../src/status.js";
import { describeRun, exitWithin, expectRefusal, type Running, runCli, spawnCli, waitUntil } from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Item 7 of issue 16: `pgshift status <table> --watch` through the real CLI. Not on a terminal (the test's pipe) it
 * prints one JSON status object per line, refreshed every --interval: a backfill run meanwhile shows up in later
 * lines; Ctrl-C ends it (exit 0); it ends by itself once the migration is aborted. The live view on a terminal is
 * checked in test/unit/status-view.test.ts.
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

type Line = StatusReport & { at: string };

function jsonLines(out: string): Line[] {
  return out
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Line);
}

describe("status --watch", () => {
  const w: Workload = {
    table: { schema: "public", name: "sw" },
    twin: { schema: "twin", name: "sw" },
    keyKind: "bigint",
  };
  beforeAll(async () => {
    await createWorkload(db.admin, w, 1500);
    await startMigration(db.sql, w.table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
  });

  it("not on a terminal: one JSON status per line, refreshed; Ctrl-C ends it with exit 0", async () => {
    const run = spawnCli(["status", "sw", "--watch", "--interval", "300", "--url", db.url]);
    children.push(run);
    await waitUntil("two status lines", async () => jsonLines(run.out.stdout).length >= 2, 20_000);
    const [a, b] = jsonLines(run.out.stdout);
    expect(a?.table).toBe("public.sw");
    expect(a?.phase).toBe("started");
    expect(b?.phase).toBe("started");
    expect(Date.parse(b!.at)).toBeGreaterThan(Date.parse(a!.at));
    // Every line is one whole JSON object: nothing else on stdout.
    expect(
      run.out.stdout
        .trim()
        .split("\n")
        .every((l) => l.startsWith("{") && l.endsWith("}")),
    ).toBe(true);

    await backfill(db.sql, w.table, { batchSize: 500 });
    await waitUntil(
      "a later line shows the backfill done",
      async () => jsonLines(run.out.stdout).some((l) => l.phase === "backfilled" && l.rowsCopied === 1500),
      20_000,
    );
    run.child.kill("SIGINT");
    const end = await exitWithin(run, 10_000);
    expect(end.code, run.out.stderr).toBe(0);
  }, 60_000);

  it("--json on any output, and it ends by itself (exit 0) once the migration is aborted", async () => {
    const run = spawnCli(["status", "sw", "--watch", "--json", "--interval", "200", "--url", db.url]);
    children.push(run);
    await waitUntil("a status line", async () => jsonLines(run.out.stdout).length >= 1, 20_000);
    await abort(db.sql, w.table);
    const end = await exitWithin(run, 15_000);
    expect(end.code, run.out.stderr).toBe(0);
    const lines = run.out.stdout.trim().split("\n");
    expect(JSON.parse(lines[lines.length - 1]!)).toEqual({ table: "public.sw", over: true });
  }, 60_000);

  it("refuses --metrics-port without --watch, and a table with no migration", async () => {
    const r = await runCli(["status", "sw", "--metrics-port", "0", "--url", db.url]);
    expectRefusal(r, "--metrics-port needs --watch");
    const n = await runCli(["status", "nothing_here", "--watch", "--url", db.url]);
    expectRefusal(n, "no migration of public.nothing_here is in progress");
  }, 30_000);

  it("--help shows --watch, --interval and examples of them", async () => {
    const r = await runCli(["status", "--help"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toContain("--watch");
    expect(r.stdout).toContain("--interval <ms>");
    expect(r.stdout).toContain("--metrics-port <port>");
    expect(r.stdout).toMatch(/Examples:[\s\S]*pgshift status orders --watch\b/);
    expect(r.stdout).toMatch(/pgshift status orders --watch .*--metrics-port/);
  }, 30_000);
});
