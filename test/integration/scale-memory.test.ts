/**
 * Memory stays flat in the table's size (issue 18, item 5): the peak RSS of `pgshift backfill` and of
 * `pgshift verify`, each a child process measured from /proc/<pid>/status (VmHWM) and its own maxRSS at exit, is
 * the same at 200,000 rows (100 batches and chunks of 2,000) as at 10,000 (5) within a few MB, with V8's old
 * generation capped. Rows go from table to table inside PostgreSQL and verify compares chunk by chunk, so 190,000
 * more rows (about 25 MB of heap, far more as JavaScript values) must not show in the process. scripts/bench-scale
 * measures the same from 1 to 10 million rows.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type PgshiftRun, runPgshift } from "../../scripts/bench-common.js";
import { abort } from "../../src/migration/finish.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

let db: TestDatabase;
const T = { schema: "public", name: "sm_events" };
const SPEC = "range:created_at:month";
/**
 * How much more the peak may be at 10x the rows: V8 grows its heap (the young generation first) in steps of a few
 * MB with the work done; differences of -3.5 to +8.2 MB were measured from 10,000 to 100,000 rows without a cap.
 * Keeping the 190,000 more rows as JavaScript values would take 60 MB or more.
 */
const SLACK_BYTES = 20 * 1024 * 1024;
/**
 * The old generation of V8's heap is capped (node --max-old-space-size, MB) in the processes measured: a process
 * that kept the rows would fail with "JavaScript heap out of memory" at 200,000 rows, and garbage cannot make the
 * heap, hence the peak, grow with the rows copied (the collector runs instead).
 */
const OLD_SPACE_MB = 40;

beforeAll(async () => {
  db = await freshDatabase();
  await db.admin.unsafe(`
    create table sm_events (
      id bigint primary key,
      created_at timestamptz not null,
      customer text not null,
      payload jsonb not null
    );
    create index sm_events_created_at on sm_events (created_at);`);
});
afterAll(async () => {
  await db?.close();
});

const cli = (args: string[]) =>
  runPgshift(args, {
    url: db.url,
    entry: [`--max-old-space-size=${OLD_SPACE_MB}`, "--import", "tsx", "src/cli/main.ts"],
    pollMs: 50,
  });

const ok = (r: PgshiftRun) => {
  expect(r.code, `pgshift ${r.args.join(" ")}\n${r.stdout}\n${r.stderr}`).toBe(0);
  expect(r.peakRssFrom).toBe("exit");
  return r.peakRssBytes!;
};

/** Fills sm_events to `rows` rows, then start, backfill, verify as processes: their peak RSS, bytes. */
async function peaksAt(rows: number): Promise<{ backfill: number; verify: number }> {
  await db.admin.unsafe(`
    insert into sm_events
    select i, timestamptz '2025-01-01' + i * interval '2 minutes', 'customer-' || (i % 5000),
           jsonb_build_object('sku', 'SKU-' || (i % 500), 'note', md5(i::text))
      from generate_series((select coalesce(max(id), 0) + 1 from sm_events), ${rows}) i;
    analyze sm_events;`);
  ok(await cli(["start", T.name, "--partition-by", SPEC, "--allow-key-extension"]));
  const backfill = ok(await cli(["backfill", T.name, "--batch-size", "2000", "--batch-time-ms", "0"]));
  const verify = ok(await cli(["verify", T.name, "--chunk-size", "2000"]));
  await abort(db.sql, T);
  return { backfill, verify };
}

describe("memory is flat in the table's size", () => {
  it("backfill and verify peak at 200,000 rows within a few MB of their peak at 10,000", async () => {
    const small = await peaksAt(10_000);
    const big = await peaksAt(200_000);
    const mb = (b: number) => (b / 1024 / 1024).toFixed(1);
    const text =
      `backfill ${mb(small.backfill)} -> ${mb(big.backfill)} MB, ` +
      `verify ${mb(small.verify)} -> ${mb(big.verify)} MB`;
    process.stdout.write(`scale-memory: ${text}\n`);
    // Sanity: the figures are a node process's (tens of MB), not a shell's.
    expect(small.backfill).toBeGreaterThan(30 * 1024 * 1024);
    expect(big.backfill - small.backfill, text).toBeLessThanOrEqual(SLACK_BYTES);
    expect(big.verify - small.verify, text).toBeLessThanOrEqual(SLACK_BYTES);
  });
});
