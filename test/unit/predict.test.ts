import { describe, expect, it } from "vitest";
import {
  analyzeSampledRows,
  PREDICT_RATES,
  type PredictInputs,
  predictFromSample,
  predictFromStatistics,
  type SampleResult,
  sampleStatements,
} from "../../src/plan/predict.js";

const base: PredictInputs = {
  rows: 1_000_000,
  relpages: 20_000,
  heapBytes: 20_000 * 8192,
  toastBytes: 0,
  indexBytes: 60_000_000,
  rowWidth: 100,
  keyWidth: 16,
  keyIndexBytes: 30_000_000,
  deferredIndexBytes: [22_000_000],
  fillfactor: 100,
  blockSize: 8192,
  partitions: 0,
  rowLocks: false,
  fullPageWrites: true,
};

describe("predictFromStatistics", () => {
  it("heap pages from the row's width: MAXALIGN(23 + width) + a 4-byte line pointer per row", () => {
    // (23 + 100) aligned to 8 = 128, + 4 = 132 bytes a row; (8192 - 24) / 132 = 61 rows a page.
    const p = predictFromStatistics(base);
    expect(p.heapBytes).toBe(Math.ceil(1_000_000 / 61) * 8192);
  });

  it("fillfactor leaves room in each page", () => {
    // 90 %: floor(8168 * 0.9) = 7351 usable bytes, 55 rows a page.
    expect(predictFromStatistics({ ...base, fillfactor: 90 }).heapBytes).toBe(Math.ceil(1_000_000 / 55) * 8192);
  });

  it("without pg_stats, the source's heap; TOAST is added as the source has it", () => {
    const p = predictFromStatistics({ ...base, rowWidth: null, toastBytes: 5_000_000 });
    expect(p.heapBytes).toBe(20_000 * 8192 + 5_000_000);
  });

  it("indexes: the key from its width at 90 % fill, the deferred as the source's, a page each per partition", () => {
    // (8 + 16) aligned = 24, + 4 = 28 bytes an entry; (8192 - 40) x 0.9 = 7336.8 bytes a leaf; 1 % inner pages.
    const key = Math.ceil((1_000_000 * 28) / ((8192 - 24 - 16) * 0.9)) * 8192 * 1.01;
    expect(predictFromStatistics(base).indexBytes).toBe(Math.round(key + 22_000_000));
    expect(predictFromStatistics({ ...base, partitions: 10 }).indexBytes).toBe(
      Math.round(key + 22_000_000 + 10 * 2 * 8192),
    );
    // No key width: the source's key index.
    expect(predictFromStatistics({ ...base, keyWidth: null }).indexBytes).toBe(30_000_000 + 22_000_000);
  });

  it("WAL: a heap insert and a btree insert a row, the index builds, and the row locks with their page images", () => {
    const heapRecord = 128 + 40; // aligned tuple (23 + 100 -> 128) + record overhead
    const btreeRecord = 24 + 40; // aligned index tuple (8 + 16) + record overhead
    const copy = 1_000_000 * (heapRecord + btreeRecord);
    expect(predictFromStatistics(base).walBytes).toBe(Math.round(copy + 22_000_000 * 1.02));
    const locks = 1_000_000 * 54 + 20_000 * 8192;
    expect(predictFromStatistics({ ...base, rowLocks: true }).walBytes).toBe(
      Math.round(copy + locks + 22_000_000 * 1.02),
    );
    // Without full-page writes, no page images.
    expect(predictFromStatistics({ ...base, rowLocks: true, fullPageWrites: false }).walBytes).toBe(
      Math.round(copy + 1_000_000 * 54 + 22_000_000 * 1.02),
    );
  });

  it("time from the rates: per row, per heap byte, per row and index, plus the fixed cost", () => {
    const p = predictFromStatistics(base);
    const heap = Math.ceil(1_000_000 / 61) * 8192;
    expect(p.copyMs).toBe(
      Math.round(
        (1_000_000 * PREDICT_RATES.copyUsPerRow + heap * PREDICT_RATES.copyUsPerHeapByte) / 1000 +
          PREDICT_RATES.fixedMs,
      ),
    );
    // base has no partitions: one table, one deferred index.
    expect(p.indexBuildMs).toBe(
      Math.round((1_000_000 * PREDICT_RATES.indexUsPerRow) / 1000 + PREDICT_RATES.indexMsPerPartition),
    );
    // A build per partition and index besides the rows.
    expect(predictFromStatistics({ ...base, partitions: 29 }).indexBuildMs).toBe(
      Math.round((1_000_000 * PREDICT_RATES.indexUsPerRow) / 1000 + 29 * PREDICT_RATES.indexMsPerPartition),
    );
  });

  it("ANALYZE from the rows it samples: 300 x the statistics target of the table and of each partition", () => {
    // 1,000,000 rows over 29 partitions: 34,482 a partition, above the 30,000 sampled.
    expect(analyzeSampledRows(1_000_000, 29)).toBe(30_000 + 29 * 30_000);
    expect(analyzeSampledRows(10_000_000, 29)).toBe(30_000 + 29 * 30_000);
    // Small partitions are read whole; the whole table's sample still 30,000.
    expect(analyzeSampledRows(200_000, 29)).toBe(30_000 + 200_000);
    expect(analyzeSampledRows(10_000, 29)).toBe(10_000 + 10_000);
    // Without partitions: one table. A higher target samples more.
    expect(analyzeSampledRows(1_000_000, 0)).toBe(30_000);
    expect(analyzeSampledRows(1_000_000, 0, 1000)).toBe(300_000);
    const p = predictFromStatistics({ ...base, partitions: 29 });
    expect(p.analyzeMs).toBe(Math.round((30 * 30_000 * PREDICT_RATES.analyzeUsPerSampledRow) / 1000));
  });

  it("a table never analyzed (reltuples -1) predicts an empty copy", () => {
    const p = predictFromStatistics({ ...base, rows: -1, heapBytes: 0, relpages: 0, deferredIndexBytes: [] });
    expect(p.copyMs).toBe(PREDICT_RATES.fixedMs);
    expect(p.indexBuildMs).toBe(0);
    expect(p.analyzeMs).toBe(0);
    expect(p.heapBytes).toBe(0);
  });
});

describe("predictFromSample", () => {
  const sample: SampleResult = {
    statements: [],
    rows: 20_000,
    copyMs: 100,
    indexBuildMs: 10,
    copyWalBytes: 6_000_000,
    indexWalBytes: 500_000,
    tableBytes: 3_000_000,
    indexBytes: 1_000_000,
    analyzeMs: 40,
  };
  it("scales each measurement by rows / sampled rows", () => {
    const p = predictFromSample({ rows: 1_000_000, partitions: 4, deferredIndexBytes: [1], blockSize: 8192 }, sample);
    expect(p.copyMs).toBe(100 * 50 + PREDICT_RATES.fixedMs);
    expect(p.indexBuildMs).toBe(
      Math.round(10 * 50 * PREDICT_RATES.concurrentlyFactor + 4 * PREDICT_RATES.indexMsPerPartition),
    );
    expect(p.heapBytes).toBe(150_000_000);
    expect(p.indexBytes).toBe(50_000_000 + 4 * 2 * 8192);
    expect(p.walBytes).toBe(325_000_000);
    // ANALYZE: 2 µs a row in the sample (40 ms / 20,000), times the 30,000 + 4 x 30,000 rows sampled.
    expect(p.analyzeMs).toBe(300);
  });
});

describe("sampleStatements", () => {
  it("one transaction that is rolled back; TABLESAMPLE sized for 1.5x the rows wanted; FOR SHARE as the copy", () => {
    const s = sampleStatements({
      source: { schema: "public", name: "orders" },
      copyColumns: ["id", "created_at"],
      shadowKey: ["id", "created_at"],
      indexDefinitions: ["btree (created_at)"],
      estimatedRows: 1_000_000,
      rows: 10_000,
      rowLocks: true,
    });
    expect(s[0]).toBe("BEGIN");
    expect(s.at(-1)).toBe("ROLLBACK");
    expect(s).toContain(`CREATE TABLE "public"."orders_pgshift_sample" (LIKE "public"."orders")`);
    expect(s).toContain(
      `INSERT INTO "public"."orders_pgshift_sample" ("id", "created_at") SELECT "id", "created_at" FROM ` +
        `"public"."orders" TABLESAMPLE SYSTEM (1.5) LIMIT 10000 FOR SHARE`,
    );
    expect(s).toContain(`CREATE INDEX ON "public"."orders_pgshift_sample" USING btree (created_at)`);
    expect(s.at(-2)).toBe(`ANALYZE "public"."orders_pgshift_sample"`);
    expect(s.filter((x) => x.startsWith("COMMIT"))).toEqual([]);
  });
});
