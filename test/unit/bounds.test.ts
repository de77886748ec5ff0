import { describe, expect, it } from "vitest";
import {
  computePartitions,
  type DataRange,
  MAX_PARTITIONS,
  nextDay,
  type PartitionDef,
  truncateDay,
} from "../../src/partitioning/bounds.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";

const NOW = new Date("2024-03-10T12:34:56Z"); // a Sunday
const bytes = (s: string) => Buffer.byteLength(s, "utf8");

function parts(
  spec: string,
  data: DataRange,
  opts: { premake?: number; now?: Date; type?: string; base?: string } = {},
) {
  return computePartitions(parsePartitionSpec(spec), opts.base ?? "orders", opts.type ?? "timestamptz", data, {
    premake: opts.premake ?? 0,
    now: opts.now ?? NOW,
  });
}
const names = (ps: PartitionDef[]) => ps.map((p) => p.name);
/** The FROM values of the non-default partitions, unquoted. */
const froms = (ps: PartitionDef[]) =>
  ps
    .filter((p) => !p.isDefault)
    .map((p) =>
      /^FOR VALUES FROM \((?:'([^']*)'|([^)]*))\)/
        .exec(p.bound)!
        .slice(1)
        .find((x) => x !== undefined),
    );

describe("truncateDay / nextDay", () => {
  it("truncates to the interval start", () => {
    const d = { y: 2024, m: 8, d: 17 }; // a Saturday
    expect(truncateDay(d, "day")).toEqual({ y: 2024, m: 8, d: 17 });
    expect(truncateDay(d, "week")).toEqual({ y: 2024, m: 8, d: 12 });
    expect(truncateDay(d, "month")).toEqual({ y: 2024, m: 8, d: 1 });
    expect(truncateDay(d, "quarter")).toEqual({ y: 2024, m: 7, d: 1 });
    expect(truncateDay(d, "year")).toEqual({ y: 2024, m: 1, d: 1 });
  });

  it("starts weeks on Monday, also across a year boundary", () => {
    expect(truncateDay({ y: 2024, m: 3, d: 11 }, "week")).toEqual({ y: 2024, m: 3, d: 11 }); // Monday stays
    expect(truncateDay({ y: 2024, m: 3, d: 10 }, "week")).toEqual({ y: 2024, m: 3, d: 4 }); // Sunday -> previous Monday
    expect(truncateDay({ y: 2021, m: 1, d: 2 }, "week")).toEqual({ y: 2020, m: 12, d: 28 });
  });

  it("puts every month in its quarter", () => {
    const starts = Array.from({ length: 12 }, (_, i) => truncateDay({ y: 2023, m: i + 1, d: 15 }, "quarter").m);
    expect(starts).toEqual([1, 1, 1, 4, 4, 4, 7, 7, 7, 10, 10, 10]);
  });

  it("steps to the next interval start", () => {
    expect(nextDay({ y: 2024, m: 2, d: 28 }, "day")).toEqual({ y: 2024, m: 2, d: 29 });
    expect(nextDay({ y: 2023, m: 2, d: 28 }, "day")).toEqual({ y: 2023, m: 3, d: 1 });
    expect(nextDay({ y: 2024, m: 12, d: 30 }, "week")).toEqual({ y: 2025, m: 1, d: 6 });
    expect(nextDay({ y: 2024, m: 12, d: 1 }, "month")).toEqual({ y: 2025, m: 1, d: 1 });
    expect(nextDay({ y: 2024, m: 10, d: 1 }, "quarter")).toEqual({ y: 2025, m: 1, d: 1 });
    expect(nextDay({ y: 2024, m: 1, d: 1 }, "year")).toEqual({ y: 2025, m: 1, d: 1 });
  });
});

describe("computePartitions: time ranges", () => {
  it("month partitions of a timestamptz column, bounds pinned to UTC", () => {
    const ps = parts(
      "range:created_at:month",
      { min: "2024-01-15 08:00:00+00", max: "2024-02-29 23:59:59.999999+00" },
      { now: new Date("2024-02-10T00:00:00Z") },
    );
    expect(ps).toEqual([
      {
        name: "orders_p2024_01",
        bound: "FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-02-01 00:00:00+00')",
        isDefault: false,
      },
      {
        name: "orders_p2024_02",
        bound: "FOR VALUES FROM ('2024-02-01 00:00:00+00') TO ('2024-03-01 00:00:00+00')",
        isDefault: false,
      },
      { name: "orders_default", bound: "DEFAULT", isDefault: true },
    ]);
  });

  it("plain dates for a date column, no zone for timestamp", () => {
    const data = { min: "2024-01-31", max: "2024-01-31" };
    const now = new Date("2024-01-31T00:00:00Z");
    expect(parts("range:d:month", data, { type: "date", now })[0]!.bound).toBe(
      "FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')",
    );
    expect(
      parts("range:d:month", { min: "2024-01-31 10:00:00", max: "2024-01-31 10:00:00" }, { type: "timestamp", now })[0]!
        .bound,
    ).toBe("FOR VALUES FROM ('2024-01-01 00:00:00') TO ('2024-02-01 00:00:00')");
  });

  it("day partitions across a leap day", () => {
    const ps = parts(
      "range:d:day",
      { min: "2024-02-27", max: "2024-03-01" },
      { type: "date", now: new Date("2024-02-01T00:00:00Z") },
    );
    expect(names(ps)).toEqual([
      "orders_p2024_02_27",
      "orders_p2024_02_28",
      "orders_p2024_02_29",
      "orders_p2024_03_01",
      "orders_default",
    ]);
    expect(ps[2]!.bound).toBe("FOR VALUES FROM ('2024-02-29') TO ('2024-03-01')");
    expect(ps[3]!.bound).toBe("FOR VALUES FROM ('2024-03-01') TO ('2024-03-02')");
  });

  it("no leap day in a common year", () => {
    const ps = parts(
      "range:d:day",
      { min: "2023-02-28", max: "2023-03-01" },
      { type: "date", now: new Date("2023-01-01T00:00:00Z") },
    );
    expect(names(ps)).toEqual(["orders_p2023_02_28", "orders_p2023_03_01", "orders_default"]);
    expect(ps[0]!.bound).toBe("FOR VALUES FROM ('2023-02-28') TO ('2023-03-01')");
  });

  it("month partitions from a month end (Jan 31) and through a leap February", () => {
    const ps = parts(
      "range:d:month",
      { min: "2024-01-31", max: "2024-03-31" },
      { type: "date", now: new Date("2024-01-01T00:00:00Z") },
    );
    expect(ps.map((p) => p.bound)).toEqual([
      "FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')",
      "FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')",
      "FOR VALUES FROM ('2024-03-01') TO ('2024-04-01')",
      "DEFAULT",
    ]);
  });

  it("week partitions start on Monday and cross the year boundary", () => {
    // 2024-12-31 is a Tuesday, 2025-01-08 a Wednesday
    const ps = parts(
      "range:d:week",
      { min: "2024-12-31", max: "2025-01-08" },
      { type: "date", now: new Date("2024-12-01T00:00:00Z") },
    );
    expect(ps).toEqual([
      { name: "orders_p2024_12_30", bound: "FOR VALUES FROM ('2024-12-30') TO ('2025-01-06')", isDefault: false },
      { name: "orders_p2025_01_06", bound: "FOR VALUES FROM ('2025-01-06') TO ('2025-01-13')", isDefault: false },
      { name: "orders_default", bound: "DEFAULT", isDefault: true },
    ]);
  });

  it("a Sunday belongs to the week of the Monday before", () => {
    const ps = parts("range:d:week", { min: "2024-03-10", max: "2024-03-10" }, { type: "date" });
    expect(ps[0]).toEqual({
      name: "orders_p2024_03_04",
      bound: "FOR VALUES FROM ('2024-03-04') TO ('2024-03-11')",
      isDefault: false,
    });
    expect(ps).toHaveLength(2);
  });

  it("quarter partitions and their names", () => {
    const ps = parts(
      "range:created_at:quarter",
      { min: "2023-11-05 00:00:00+00", max: "2024-08-01 00:00:00+00" },
      { now: new Date("2024-01-01T00:00:00Z") },
    );
    expect(names(ps)).toEqual([
      "orders_p2023_q4",
      "orders_p2024_q1",
      "orders_p2024_q2",
      "orders_p2024_q3",
      "orders_default",
    ]);
    expect(ps[0]!.bound).toBe("FOR VALUES FROM ('2023-10-01 00:00:00+00') TO ('2024-01-01 00:00:00+00')");
    expect(ps[3]!.bound).toBe("FOR VALUES FROM ('2024-07-01 00:00:00+00') TO ('2024-10-01 00:00:00+00')");
  });

  it("year partitions", () => {
    const ps = parts("range:d:year", { min: "2022-12-31", max: "2024-02-29" }, { type: "date" });
    expect(ps).toEqual([
      { name: "orders_p2022", bound: "FOR VALUES FROM ('2022-01-01') TO ('2023-01-01')", isDefault: false },
      { name: "orders_p2023", bound: "FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')", isDefault: false },
      { name: "orders_p2024", bound: "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')", isDefault: false },
      { name: "orders_default", bound: "DEFAULT", isDefault: true },
    ]);
  });

  it("a value just before midnight UTC on Dec 31 stays in its year", () => {
    const ps = parts(
      "range:ts:year",
      { min: "2023-12-31 23:59:59.999999+00", max: "2023-12-31 23:59:59.999999+00" },
      { now: new Date("2023-06-01T00:00:00Z") },
    );
    expect(names(ps)).toEqual(["orders_p2023", "orders_default"]);
  });

  it("ranges are contiguous: each TO is the next FROM", () => {
    const ps = parts("range:d:week", { min: "2023-01-01", max: "2024-03-10" }, { type: "date", premake: 3 });
    const ranges = ps
      .filter((p) => !p.isDefault)
      .map((p) => /FROM \('([^']+)'\) TO \('([^']+)'\)/.exec(p.bound)!.slice(1));
    for (let i = 1; i < ranges.length; i++) expect(ranges[i]![0]).toBe(ranges[i - 1]![1]);
    expect(new Set(names(ps)).size).toBe(ps.length);
  });

  describe("premake", () => {
    const data = { min: "2024-01-15", max: "2024-02-10" };
    it("adds partitions past `now` when now is after max", () => {
      const ps = parts("range:d:month", data, { type: "date", premake: 2, now: new Date("2024-05-20T00:00:00Z") });
      // Jan..May (through now), then Jun and Jul
      expect(froms(ps)).toEqual([
        "2024-01-01",
        "2024-02-01",
        "2024-03-01",
        "2024-04-01",
        "2024-05-01",
        "2024-06-01",
        "2024-07-01",
      ]);
      expect(ps.at(-1)!.isDefault).toBe(true);
    });

    it("adds partitions past max when max is after now", () => {
      const ps = parts("range:d:month", data, { type: "date", premake: 2, now: new Date("2023-06-01T00:00:00Z") });
      expect(froms(ps)).toEqual(["2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01"]);
    });

    it("premake 0 stops at the interval holding the later of max and now", () => {
      expect(
        froms(parts("range:d:month", data, { type: "date", premake: 0, now: new Date("2023-06-01T00:00:00Z") })),
      ).toEqual(["2024-01-01", "2024-02-01"]);
      expect(
        froms(parts("range:d:month", data, { type: "date", premake: 0, now: new Date("2024-03-31T23:59:59Z") })),
      ).toEqual(["2024-01-01", "2024-02-01", "2024-03-01"]);
    });

    it("counts premade days past now", () => {
      const ps = parts("range:d:day", { min: "2024-03-09", max: "2024-03-09" }, { type: "date", premake: 3 });
      expect(names(ps)).toEqual([
        "orders_p2024_03_09",
        "orders_p2024_03_10",
        "orders_p2024_03_11",
        "orders_p2024_03_12",
        "orders_p2024_03_13",
        "orders_default",
      ]);
    });
  });

  it("an empty table gets the interval holding now plus premake", () => {
    const ps = parts("range:created_at:month", { min: null, max: null }, { premake: 3 });
    expect(names(ps)).toEqual([
      "orders_p2024_03",
      "orders_p2024_04",
      "orders_p2024_05",
      "orders_p2024_06",
      "orders_default",
    ]);
    expect(ps[0]!.bound).toBe("FOR VALUES FROM ('2024-03-01 00:00:00+00') TO ('2024-04-01 00:00:00+00')");
  });

  it("an infinite max counts as min; infinities alone count as an empty table", () => {
    const ps = parts("range:d:month", { min: "2024-01-05", max: "infinity" }, { type: "date", premake: 1 });
    expect(froms(ps)).toEqual(["2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01"]);
    const inf = parts("range:d:month", { min: "-infinity", max: "infinity" }, { type: "date", premake: 1 });
    expect(inf).toEqual(parts("range:d:month", { min: null, max: null }, { type: "date", premake: 1 }));
    expect(froms(inf)).toEqual(["2024-03-01", "2024-04-01"]);
  });

  it("a -infinity min starts at the interval holding now", () => {
    const ps = parts("range:d:month", { min: "-infinity", max: "2024-05-02" }, { type: "date" });
    expect(froms(ps)).toEqual(["2024-03-01", "2024-04-01", "2024-05-01"]);
  });

  it("a five-digit year counts like infinity", () => {
    const ps = parts("range:d:year", { min: "2023-01-01", max: "10000-01-01" }, { type: "date" });
    expect(names(ps)).toEqual(["orders_p2023", "orders_p2024", "orders_default"]);
  });

  // BUG: Date.UTC maps years 0..99 to 1900..1999, so a column whose minimum is in the year 44 gets a
  // first partition FROM ('0044-01-01') TO ('1945-01-01') instead of TO ('0045-01-01').
  it("years below 100 get one-interval partitions", () => {
    const ps = parts("range:d:year", { min: "0044-03-15", max: "0045-06-01" }, { type: "date" });
    expect(ps[0]).toEqual({
      name: "orders_p0044",
      bound: "FOR VALUES FROM ('0044-01-01') TO ('0045-01-01')",
      isDefault: false,
    });
    expect(ps[1]!.name).toBe("orders_p0045");
  });

  // BUG: PostgreSQL writes BC values as '0044-03-15 BC'; parseDay matches the leading digits and reads the
  // year as 44 AD (the comment says BC values go to DEFAULT), which with the bug above yields partitions from 0044.
  it("a BC minimum is treated like -infinity (its rows go to DEFAULT)", () => {
    const ps = parts("range:d:year", { min: "0044-03-15 BC", max: "2024-02-01" }, { type: "date" });
    expect(names(ps)).toEqual(["orders_p2024", "orders_default"]);
  });

  it("throws past MAX_PARTITIONS, and allows exactly MAX_PARTITIONS", () => {
    expect(MAX_PARTITIONS).toBe(5000);
    const start = Date.UTC(2000, 0, 1);
    const day = 86_400_000;
    const ok = parts(
      "range:d:day",
      { min: "2000-01-01", max: "2000-01-01" },
      { type: "date", now: new Date(start + 4999 * day) },
    );
    expect(ok).toHaveLength(5001);
    expect(ok[0]!.name).toBe("orders_p2000_01_01");
    expect(ok.at(-2)!.name).toBe("orders_p2013_09_08"); // 2000-01-01 + 4999 days
    expect(() =>
      parts(
        "range:d:day",
        { min: "2000-01-01", max: "2000-01-01" },
        { type: "date", now: new Date(start + 5000 * day) },
      ),
    ).toThrow(/more than 5000 partitions/);
    expect(() => parts("range:d:day", { min: "1990-01-01", max: "2024-01-01" }, { type: "date" })).toThrow(
      /choose a coarser interval/,
    );
    expect(() =>
      parts("range:d:month", { min: "1990-01-01", max: "2024-01-01" }, { type: "date", premake: 5000 }),
    ).toThrow(/5000/);
  });
});

describe("computePartitions: integer ranges", () => {
  it("multiples of the width from floor(min) past max, plus premake and DEFAULT", () => {
    const ps = parts("range:id:1000", { min: "1", max: "2500" }, { type: "int8", premake: 1 });
    expect(ps).toEqual([
      { name: "orders_p0", bound: "FOR VALUES FROM (0) TO (1000)", isDefault: false },
      { name: "orders_p1000", bound: "FOR VALUES FROM (1000) TO (2000)", isDefault: false },
      { name: "orders_p2000", bound: "FOR VALUES FROM (2000) TO (3000)", isDefault: false },
      { name: "orders_p3000", bound: "FOR VALUES FROM (3000) TO (4000)", isDefault: false },
      { name: "orders_default", bound: "DEFAULT", isDefault: true },
    ]);
  });

  it("a max on a multiple of the width opens a new partition", () => {
    expect(froms(parts("range:id:10", { min: "0", max: "10" }, { type: "int4" }))).toEqual(["0", "10"]);
    expect(froms(parts("range:id:10", { min: "0", max: "9" }, { type: "int4" }))).toEqual(["0"]);
  });

  it("floors negative values (floor division, not truncation)", () => {
    const ps = parts("range:id:10", { min: "-15", max: "7" }, { type: "int4", premake: 1 });
    expect(ps.map((p) => [p.name, p.bound])).toEqual([
      ["orders_pm20", "FOR VALUES FROM (-20) TO (-10)"],
      ["orders_pm10", "FOR VALUES FROM (-10) TO (0)"],
      ["orders_p0", "FOR VALUES FROM (0) TO (10)"],
      ["orders_p10", "FOR VALUES FROM (10) TO (20)"],
      ["orders_default", "DEFAULT"],
    ]);
  });

  it("a negative multiple of the width is its own start", () => {
    expect(froms(parts("range:id:10", { min: "-10", max: "-1" }, { type: "int4" }))).toEqual(["-10"]);
    expect(froms(parts("range:id:10", { min: "-11", max: "-11" }, { type: "int4" }))).toEqual(["-20"]);
  });

  it("uses exact bigint arithmetic for big values", () => {
    const ps = parts(
      "range:id:1000000000000",
      { min: "9000000000000000000", max: "9000000000000000001" },
      { type: "int8" },
    );
    expect(ps[0]).toEqual({
      name: "orders_p9000000000000000000",
      bound: "FOR VALUES FROM (9000000000000000000) TO (9000001000000000000)",
      isDefault: false,
    });
    expect(ps).toHaveLength(2);
  });

  it("an empty table starts at 0", () => {
    const ps = parts("range:id:100", { min: null, max: null }, { type: "int8", premake: 2 });
    expect(froms(ps)).toEqual(["0", "100", "200"]);
    expect(ps.at(-1)).toEqual({ name: "orders_default", bound: "DEFAULT", isDefault: true });
  });

  it("does not depend on now", () => {
    const a = parts("range:id:100", { min: "5", max: "250" }, { type: "int8", now: new Date("2000-01-01T00:00:00Z") });
    const b = parts("range:id:100", { min: "5", max: "250" }, { type: "int8", now: new Date("2100-01-01T00:00:00Z") });
    expect(a).toEqual(b);
    expect(froms(a)).toEqual(["0", "100", "200"]);
  });

  it("throws past MAX_PARTITIONS, and allows exactly MAX_PARTITIONS", () => {
    expect(parts("range:id:1", { min: "0", max: "4999" }, { type: "int4" })).toHaveLength(5001);
    expect(() => parts("range:id:1", { min: "0", max: "5000" }, { type: "int4" })).toThrow(/more than 5000 partitions/);
    expect(() => parts("range:id:1", { min: "0", max: "4999" }, { type: "int4", premake: 1 })).toThrow(
      /more than 5000 partitions/,
    );
    expect(() =>
      parts("range:id:1", { min: "-9223372036854775808", max: "9223372036854775807" }, { type: "int8" }),
    ).toThrow(/5000/);
  });

  // BUG: integer bounds ignore the column type. Premade (or the last) partitions run past the type's range,
  // and PostgreSQL rejects the DDL: CREATE TABLE ... PARTITION OF ... FOR VALUES FROM (2147483000) TO (2147484000)
  // on an integer column fails with "integer out of range". Bounds past the type's limits should be MAXVALUE/MINVALUE.
  it("bounds stay inside the range of an int4 column", () => {
    const ps = parts("range:id:1000", { min: "2147482000", max: "2147483647" }, { type: "int4", premake: 1 });
    for (const p of ps.filter((x) => !x.isDefault)) {
      for (const v of /FROM \(([^)]*)\) TO \(([^)]*)\)/.exec(p.bound)!.slice(1)) {
        if (v !== "MAXVALUE" && v !== "MINVALUE") expect(BigInt(v!)).toBeLessThanOrEqual(2147483647n);
      }
    }
  });
});

describe("computePartitions: list", () => {
  it("one partition per value, sorted, then DEFAULT", () => {
    const ps = parts("list:region", { min: null, max: null, values: ["us", "eu", "apac"] }, { type: "text" });
    expect(ps).toEqual([
      { name: "orders_p_apac", bound: "FOR VALUES IN ('apac')", isDefault: false },
      { name: "orders_p_eu", bound: "FOR VALUES IN ('eu')", isDefault: false },
      { name: "orders_p_us", bound: "FOR VALUES IN ('us')", isDefault: false },
      { name: "orders_default", bound: "DEFAULT", isDefault: true },
    ]);
  });

  it("does not change the caller's array", () => {
    const values = ["b", "a"];
    parts("list:c", { min: null, max: null, values }, { type: "text" });
    expect(values).toEqual(["b", "a"]);
  });

  it("sanitises names: lower case, runs of other characters to one underscore, trimmed, at most 24 characters", () => {
    const ps = parts(
      "list:c",
      { min: null, max: null, values: ["North America!", "--x--", "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123"] },
      { type: "text" },
    );
    expect(names(ps)).toEqual([
      "orders_p_x",
      "orders_p_abcdefghijklmnopqrstuvwx",
      "orders_p_north_america",
      "orders_default",
    ]);
    expect(ps[2]!.bound).toBe("FOR VALUES IN ('North America!')");
  });

  it("values with nothing to keep are named by position", () => {
    const ps = parts("list:c", { min: null, max: null, values: ["日本", "!!!", "ok"] }, { type: "text" });
    // sorted: "!!!", "ok", "日本"
    expect(ps.map((p) => [p.name, p.bound])).toEqual([
      ["orders_p0", "FOR VALUES IN ('!!!')"],
      ["orders_p_ok", "FOR VALUES IN ('ok')"],
      ["orders_p2", "FOR VALUES IN ('日本')"],
      ["orders_default", "DEFAULT"],
    ]);
  });

  it("gives duplicate sanitised names numeric suffixes", () => {
    const ps = parts("list:c", { min: null, max: null, values: ["a-b", "A B", "a b", "a_b"] }, { type: "text" });
    // sorted by code unit: "A B" < "a b" < "a-b" < "a_b"
    expect(ps.map((p) => [p.name, p.bound])).toEqual([
      ["orders_p_a_b", "FOR VALUES IN ('A B')"],
      ["orders_p_a_b_2", "FOR VALUES IN ('a b')"],
      ["orders_p_a_b_3", "FOR VALUES IN ('a-b')"],
      ["orders_p_a_b_4", "FOR VALUES IN ('a_b')"],
      ["orders_default", "DEFAULT"],
    ]);
  });

  it("a suffixed name that is also a value's own name is skipped", () => {
    const ps = parts("list:c", { min: null, max: null, values: ["a b", "a-b", "a_b_2"] }, { type: "text" });
    expect(names(ps)).toEqual(["orders_p_a_b", "orders_p_a_b_2", "orders_p_a_b_2_2", "orders_default"]);
  });

  it("quotes values with quotes and backslashes correctly", () => {
    const ps = parts("list:c", { min: null, max: null, values: ["O'Brien", "C:\\temp", "it's \\n"] }, { type: "text" });
    expect(ps.map((p) => p.bound)).toEqual([
      "FOR VALUES IN (E'C:\\\\temp')",
      "FOR VALUES IN ('O''Brien')",
      "FOR VALUES IN (E'it''s \\\\n')",
      "DEFAULT",
    ]);
    expect(names(ps)).toEqual(["orders_p_c_temp", "orders_p_o_brien", "orders_p_it_s_n", "orders_default"]);
  });

  it("integer values as text", () => {
    const ps = parts("list:tenant", { min: null, max: null, values: ["10", "2", "-1"] }, { type: "int4" });
    expect(ps.map((p) => [p.name, p.bound])).toEqual([
      ["orders_p_1", "FOR VALUES IN ('-1')"],
      ["orders_p_10", "FOR VALUES IN ('10')"],
      ["orders_p_2", "FOR VALUES IN ('2')"],
      ["orders_default", "DEFAULT"],
    ]);
  });

  it("no values: only DEFAULT", () => {
    expect(parts("list:c", { min: null, max: null, values: [] }, { type: "text" })).toEqual([
      { name: "orders_default", bound: "DEFAULT", isDefault: true },
    ]);
    expect(parts("list:c", { min: null, max: null }, { type: "text" })).toEqual([
      { name: "orders_default", bound: "DEFAULT", isDefault: true },
    ]);
  });

  it("a value named default does not take DEFAULT's name", () => {
    const base = "t";
    const ps = computePartitions(
      parsePartitionSpec("list:c"),
      base,
      "text",
      { min: null, max: null, values: ["default"] },
      { premake: 0, now: NOW },
    );
    expect(names(ps)).toEqual(["t_p_default", "t_default"]);
  });

  it("throws past MAX_PARTITIONS values, allows exactly MAX_PARTITIONS", () => {
    const values = Array.from({ length: 5000 }, (_, i) => `v${i}`);
    const ps = parts("list:c", { min: null, max: null, values }, { type: "text" });
    expect(ps).toHaveLength(5001);
    expect(new Set(names(ps)).size).toBe(5001);
    expect(() => parts("list:c", { min: null, max: null, values: [...values, "one more"] }, { type: "text" })).toThrow(
      /more than 5000 partitions/,
    );
  });
});

describe("computePartitions: hash", () => {
  it("remainders 0..modulus-1 and no DEFAULT", () => {
    const ps = parts("hash:id:4", { min: null, max: null }, { type: "int8" });
    expect(ps).toEqual([
      { name: "orders_p0", bound: "FOR VALUES WITH (MODULUS 4, REMAINDER 0)", isDefault: false },
      { name: "orders_p1", bound: "FOR VALUES WITH (MODULUS 4, REMAINDER 1)", isDefault: false },
      { name: "orders_p2", bound: "FOR VALUES WITH (MODULUS 4, REMAINDER 2)", isDefault: false },
      { name: "orders_p3", bound: "FOR VALUES WITH (MODULUS 4, REMAINDER 3)", isDefault: false },
    ]);
  });

  it("ignores the data, premake and now", () => {
    const a = parts("hash:id:1024", { min: "1", max: "99" }, { type: "int8", premake: 7 });
    expect(a).toHaveLength(1024);
    expect(a.some((p) => p.isDefault)).toBe(false);
    expect(a.at(-1)).toEqual({
      name: "orders_p1023",
      bound: "FOR VALUES WITH (MODULUS 1024, REMAINDER 1023)",
      isDefault: false,
    });
    expect(a).toEqual(parts("hash:id:1024", { min: null, max: null }, { type: "int8", now: new Date(0) }));
  });
});

describe("computePartitions: DEFAULT and names", () => {
  it("DEFAULT is last for range, range-int and list, and absent for hash", () => {
    const all = [
      parts("range:d:month", { min: "2024-01-01", max: "2024-02-01" }, { type: "date" }),
      parts("range:id:10", { min: "1", max: "2" }, { type: "int4" }),
      parts("list:c", { min: null, max: null, values: ["x"] }, { type: "text" }),
    ];
    for (const ps of all) {
      expect(ps.filter((p) => p.isDefault)).toEqual([{ name: "orders_default", bound: "DEFAULT", isDefault: true }]);
      expect(ps.at(-1)!.isDefault).toBe(true);
    }
    expect(
      parts("hash:id:3", { min: null, max: null }, { type: "int4" }).filter(
        (p) => p.isDefault || p.bound === "DEFAULT",
      ),
    ).toEqual([]);
  });

  it("names never exceed 63 bytes with a long multibyte base, and stay unique", () => {
    const base = `Bestellpositionen_für_Kunden_${"ü".repeat(20)}_日本語の注文`;
    expect(bytes(base)).toBeGreaterThan(63);
    const sets = [
      computePartitions(
        parsePartitionSpec("range:d:week"),
        base,
        "date",
        { min: "2023-01-01", max: "2024-03-01" },
        { premake: 4, now: NOW },
      ),
      computePartitions(
        parsePartitionSpec("range:d:quarter"),
        base,
        "date",
        { min: "2001-01-01", max: "2024-03-01" },
        { premake: 4, now: NOW },
      ),
      computePartitions(
        parsePartitionSpec("range:id:7"),
        base,
        "int8",
        { min: "-1000", max: "1000" },
        { premake: 4, now: NOW },
      ),
      computePartitions(
        parsePartitionSpec("list:c"),
        base,
        "text",
        { min: null, max: null, values: ["a b", "a-b", "Ä", "x".repeat(40), "日本"] },
        { premake: 0, now: NOW },
      ),
      computePartitions(
        parsePartitionSpec("hash:id:64"),
        base,
        "int8",
        { min: null, max: null },
        { premake: 0, now: NOW },
      ),
    ];
    for (const ps of sets) {
      for (const p of ps) {
        expect(bytes(p.name)).toBeLessThanOrEqual(63);
        expect(p.name.includes("\uFFFD")).toBe(false);
        expect(base.startsWith(p.name.slice(0, 10))).toBe(true);
      }
      expect(new Set(names(ps)).size).toBe(ps.length);
    }
    const week = sets[0]!;
    expect(week[0]!.name.endsWith("_p2022_12_26")).toBe(true);
    expect(week.at(-1)!.name.endsWith("_default")).toBe(true);
    expect(sets[2]![0]!.name.endsWith("_pm1001")).toBe(true);
    // the truncated base is the same for every suffix of the same length
    expect(week[0]!.name.slice(0, -"_p2022_12_26".length)).toBe(week[1]!.name.slice(0, -"_p2023_01_02".length));
  });
});
