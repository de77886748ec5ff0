import { describe, expect, it } from "vitest";
import { commandOf, type Liveness, nextStepFor } from "../../src/liveness.js";
import type { Migration, Phase } from "../../src/migration/state.js";

/** The next step status shows, for every phase and what runs (the integration test runs the real thing). */

const table = { schema: "public", name: "orders" };

function migration(phase: Phase, over: Partial<Migration> = {}): Migration {
  return {
    phase,
    mode: "trigger",
    slot_name: null,
    last_verify: null,
    rows_copied: 1234,
    copy_finished_at: null,
    ...over,
  } as Migration;
}

const idle: Liveness = {
  holder: null,
  backfillRunning: false,
  streamConsumer: null,
  lastBatchAt: "2026-01-01T00:00:00.000Z",
  lastAppliedCommitAt: null,
  lastStateChangeAt: "2026-01-01T00:00:00.000Z",
};
const holder = (command: string | null) => ({
  pid: 42,
  applicationName: command ? `pgshift ${command}` : "pgshift",
  command,
  since: "2026-01-01T00:00:00.000Z",
  state: "active",
});
const differs = {
  at: "x",
  equal: false,
  rowsCompared: 1,
  missing: 1,
  extra: 0,
  different: 0,
  repaired: 0,
} as unknown as Migration["last_verify"];

describe("nextStepFor", () => {
  it("while a backfill runs: wait and watch, never 'run pgshift backfill'", () => {
    const live = { ...idle, holder: holder("backfill"), backfillRunning: true };
    for (const phase of ["started", "backfilling"] as const) {
      const next = nextStepFor(migration(phase), table, live);
      expect(next).toBe(
        "wait: pgshift backfill (backend pid 42, since 2026-01-01T00:00:00.000Z) is copying; watch it with: watch -n " +
          "5 pgshift status public.orders",
      );
    }
  });

  it("another command at work: wait for it, in any phase", () => {
    for (const phase of ["backfilled", "cutover", "swapped_back"] as const) {
      expect(nextStepFor(migration(phase), table, { ...idle, holder: holder("cutover") })).toMatch(
        /^wait: pgshift cutover \(backend pid 42, .*\) is working on public\.orders/,
      );
    }
  });

  it("nothing runs: each phase's own step", () => {
    expect(nextStepFor(migration("started"), table, idle)).toBe("run pgshift backfill public.orders");
    expect(nextStepFor(migration("backfilling"), table, idle)).toBe(
      "no backfill is running (it stopped or was killed; last batch at 2026-01-01T00:00:00.000Z): run pgshift " +
        "backfill public.orders to resume from its checkpoint (1234 rows copied)",
    );
    expect(nextStepFor(migration("backfilling", { copy_finished_at: new Date() }), table, idle)).toMatch(
      new RegExp(
        "^no backfill is running: the copy is complete but not all secondary indexes are built; " +
          String.raw`run pgshift backfill public\.orders`,
      ),
    );
    expect(nextStepFor(migration("backfilled"), table, idle)).toBe(
      "run pgshift verify public.orders, then pgshift cutover public.orders",
    );
    expect(nextStepFor(migration("backfilled", { last_verify: differs }), table, idle)).toBe(
      "the last verify found differences: run pgshift verify public.orders --repair, then pgshift " +
        "cutover public.orders",
    );
    expect(nextStepFor(migration("cutover"), table, idle)).toBe(
      "run pgshift verify public.orders, then pgshift finalize public.orders --yes (or pgshift " +
        "swap-back public.orders)",
    );
    expect(nextStepFor(migration("cutover", { last_verify: differs }), table, idle)).toMatch(
      /^the last verify found differences: run pgshift verify public\.orders --repair/,
    );
    expect(nextStepFor(migration("swapped_back"), table, idle)).toBe(
      "run pgshift cutover public.orders again, or pgshift abort public.orders",
    );
  });

  it("logical mode: a backfilled migration with nothing streaming the slot says to run sync", () => {
    const m = migration("backfilled", { mode: "logical", slot_name: "pgshift_1" });
    expect(nextStepFor(m, table, idle)).toContain(
      "meanwhile run pgshift sync public.orders (nothing streams the replication slot now",
    );
    const streaming = { ...idle, streamConsumer: { ...holder("sync"), walsenderPid: 43 } };
    expect(nextStepFor(m, table, streaming)).toBe(
      "run pgshift verify public.orders, then pgshift cutover public.orders",
    );
  });
});

describe("commandOf", () => {
  it("reads the command from pgshift's application_name, and nothing from others", () => {
    expect(commandOf("pgshift backfill")).toBe("backfill");
    expect(commandOf("pgshift swap-back")).toBe("swap-back");
    expect(commandOf("pgshift sync public.orders")).toBe("sync");
    expect(commandOf("pgshift")).toBeNull();
    expect(commandOf("psql")).toBeNull();
    expect(commandOf(null)).toBeNull();
  });
});
