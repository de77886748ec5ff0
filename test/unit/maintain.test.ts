import { describe, expect, it } from "vitest";
import { overlaps, rangeLiterals, type TableLayout } from "../../src/maintain/partitions.js";
import { expired } from "../../src/maintain/retention.js";

const layout = (parts: [string, bigint | null, bigint | null, string?][]): TableLayout => ({
  table: { schema: "public", name: "t" },
  columnType: "int8",
  defaultPartition: "t_default",
  twoLevel: false,
  partitions: parts.map(([name, lo, hi, bound]) => ({
    name,
    bound: bound ?? (name === "t_default" ? "DEFAULT" : `FOR VALUES FROM (${lo}) TO (${hi})`),
    isDefault: name === "t_default",
    lo,
    hi,
  })),
});

describe("maintain's reading of partition bounds", () => {
  it("takes the literals of a one-column range bound as PostgreSQL prints it", () => {
    expect(rangeLiterals("FOR VALUES FROM ('2026-01-01 00:00:00+00') TO ('2026-02-01 00:00:00+00')")).toEqual({
      from: "2026-01-01 00:00:00+00",
      to: "2026-02-01 00:00:00+00",
    });
    expect(rangeLiterals("FOR VALUES FROM (MINVALUE) TO (1000)")).toEqual({ from: "MINVALUE", to: "1000" });
    expect(rangeLiterals("FOR VALUES FROM ('it''s') TO ('z')")).toEqual({ from: "it's", to: "z" });
    expect(rangeLiterals("FOR VALUES IN ('emea')")).toBeNull();
    expect(rangeLiterals("DEFAULT")).toBeNull();
  });

  it("finds overlaps with range partitions only, and the partitions wholly before a cutoff, oldest first", () => {
    const l = layout([
      ["t_p2000", 2000n, 3000n],
      ["t_p0", 0n, 1000n],
      ["t_pmin", null, 0n, "FOR VALUES FROM (MINVALUE) TO (0)"],
      ["t_default", null, null],
    ]);
    expect(overlaps(l, 1000n, 2000n)).toBe(false);
    expect(overlaps(l, 2500n, 2600n)).toBe(true);
    expect(overlaps(l, -50n, -10n)).toBe(true);
    expect(overlaps(l, 3000n, 4000n)).toBe(false);
    expect(expired(l, 1000n).map((p) => p.name)).toEqual(["t_pmin", "t_p0"]);
    expect(expired(l, 999n).map((p) => p.name)).toEqual(["t_pmin"]);
    expect(expired(l, null)).toEqual([]);
  });
});
