import { describe, expect, it } from "vitest";
import { BatchSizer } from "../../src/pace/batch-size.js";

describe("BatchSizer", () => {
  it("starts at the largest size and shrinks at most to a quarter per batch when batches overrun", () => {
    const s = new BatchSizer({ targetMs: 100, maxRows: 10_000 });
    expect(s.rows).toBe(10_000);
    // 1 ms per row: 10,000 rows took 10 s; the ideal (100 rows) is reached in steps of x0.25.
    expect(s.observe(10_000, 10_000)).toBe(2500);
    expect(s.observe(2500, 2500)).toBe(625);
    expect(s.observe(625, 625)).toBe(156);
    expect(s.observe(156, 156)).toBe(100);
    expect(s.observe(100, 100)).toBe(100);
  });

  it("grows by at most half per batch, up to the largest size, when batches are fast", () => {
    const s = new BatchSizer({ targetMs: 100, maxRows: 10_000, startRows: 1000 });
    expect(s.observe(1000, 10)).toBe(1500);
    expect(s.observe(1500, 15)).toBe(2250);
    for (let i = 0; i < 10; i++) s.observe(s.rows, s.rows / 100);
    expect(s.rows).toBe(10_000);
  });

  it("settles near the target and ignores the short last batch", () => {
    const s = new BatchSizer({ targetMs: 50, maxRows: 100_000, startRows: 1000 });
    for (let i = 0; i < 30; i++) s.observe(s.rows, s.rows * 0.02);
    expect(s.rows).toBeGreaterThan(2000);
    expect(s.rows).toBeLessThanOrEqual(2500);
    const before = s.rows;
    expect(s.observe(10, 500)).toBe(before);
  });

  it("keeps within [minRows, maxRows]", () => {
    const s = new BatchSizer({ targetMs: 10, maxRows: 50, minRows: 20 });
    for (let i = 0; i < 5; i++) s.observe(s.rows, 10_000);
    expect(s.rows).toBe(20);
    expect(new BatchSizer({ targetMs: 10, maxRows: 50, startRows: 500 }).rows).toBe(50);
  });
});
