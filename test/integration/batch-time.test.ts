import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { on, type PgshiftEvents } from "../../src/events.js";
import { createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, type Mode } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { status } from "../../src/status.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * Item 2 of issue 16: batches sized by time. With a small --batch-time-ms the backfill's batches shrink from
 * --batch-size (the first batch's size and the largest) towards the target, the size in use is kept in pgshift's
 * state for status, and the copy stays exact under a concurrent write load compared with the twin (the load
 * changes the table and the twin in the same transactions).
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

describe.each<{ mode: Mode }>([{ mode: "trigger" }, { mode: "logical" }])(
  "batches sized by time, $mode mode",
  ({ mode }) => {
    it("adapt the row count to --batch-time-ms, shown in status, and copy exactly under a write load", async () => {
      const name = `paced_${mode}`;
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(db.admin, w, 60_000);
      const batches: PgshiftEvents["batch"][] = [];
      const off = on("batch", (b) => {
        if (b.table === `public.${name}`) batches.push(b);
      });
      const load = await startLoad(db.url, w, { connections: 3, pauseMs: 2 });
      let seen: Awaited<ReturnType<typeof status>>["batch"] = null;
      try {
        await sleep(200);
        await startMigration(db.sql, w.table, {
          allowKeyExtension: true,
          spec: parsePartitionSpec("range:created_at:month"),
          mode,
          lockTimeoutMs: 200,
          retries: 30,
        });
        const run = backfill(db.sql, w.table, { batchSize: 20_000, batchTimeMs: 20 });
        // status (another session) sees the size in use while the copy runs
        while (!seen || seen.rows === 20_000) {
          const s = await status(db.admin, w.table);
          if (s.backfillFinishedAt) break;
          seen = s.batch;
          await sleep(50);
        }
        expect((await run).complete).toBe(true);
        await sleep(300);
      } finally {
        off();
        await load.stop();
      }
      expect(load.stats.errors).toEqual([]);
      expect(load.stats.updates).toBeGreaterThan(20);
      // The first batch asks for --batch-size rows; it takes far longer than 20 ms, so the next ones shrink.
      expect(batches[0]!.batchRows).toBe(20_000);
      const later = batches.slice(3);
      expect(later.length).toBeGreaterThan(5);
      expect(Math.max(...later.map((b) => b.batchRows))).toBeLessThan(20_000 / 4);
      // ... and they lock their rows for a much shorter time than the first
      const median = later.map((b) => b.ms).sort((a, b) => a - b)[Math.floor(later.length / 2)]!;
      expect(median).toBeLessThan(batches[0]!.ms / 4);
      expect(seen?.rows).toBeLessThan(20_000);
      expect(seen?.targetMs).toBe(20);
      const m = (await loadMigration(db.sql, w.table))!;
      expect(m.batch_target_ms).toBe(20);
      expect(m.batch_rows).toBeLessThan(20_000 / 4);
      expect(m.last_batch_ms).not.toBeNull();
      // The live table equals the twin, and the shadow the live table (verify: in logical mode once the stream
      // applied every write); in trigger mode the shadow also equals the twin directly.
      await expectEqualToTwin(db.admin, [w.table], w.twin, "bigint");
      const v = await verify(db.sql, w.table);
      expect(v.differences).toEqual([]);
      expect(v.equal).toBe(true);
      if (mode === "trigger")
        await expectEqualToTwin(db.admin, [{ schema: "public", name: `${name}_pgshift_shadow` }], w.twin, "bigint");
    });
  },
);
