import { describe, expect, it } from "vitest";
import { plannedTree, shadowKey } from "../../src/ddl/shadow.js";
import { PgshiftError } from "../../src/errors.js";
import {
  computeKeyedPartitions,
  computeSubPartitions,
  flattenPartitions,
  type GroupData,
  hashModulus,
  type PartitionDef,
  rangeRowsBuckets,
} from "../../src/partitioning/bounds.js";
import { levelGroupSql, rangeRowsSql } from "../../src/partitioning/levels.js";
import {
  formatPartitionSpec,
  formatSpecs,
  PartitionSpecSchema,
  parseSpecs,
  parseSubPartitionSpec,
  partitionColumns,
  partitionMethod,
} from "../../src/partitioning/spec.js";

const opts = { premake: 3, now: new Date("2025-03-15T12:00:00Z") };

function thrown(fn: () => unknown): PgshiftError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(PgshiftError);
    return err as PgshiftError;
  }
  throw new Error("expected a PgshiftError, nothing was thrown");
}

describe("--subpartition-by: parsing and formatting", () => {
  it.each([
    ["hash:id:rows=50000", { strategy: "hash-rows", column: "id", rows: "50000" }],
    ["range:id:rows=1000", { strategy: "range-rows", column: "id", rows: "1000" }],
    ["hash:tenant_id:4", { strategy: "hash", column: "tenant_id", modulus: 4 }],
    ["range:created_at:month", { strategy: "range", column: "created_at", interval: "month" }],
    ["range:id:100000", { strategy: "range-int", column: "id", width: "100000" }],
    ["list:customer_id", { strategy: "list", column: "customer_id" }],
    ['hash:"Id":ROWS=7', { strategy: "hash-rows", column: "Id", rows: "7" }],
  ])("%s", (text, parsed) => {
    const spec = parseSubPartitionSpec(text);
    expect(spec).toEqual(parsed);
    // written back in its command-line form, which parses to the same spec
    expect(parseSubPartitionSpec(formatPartitionSpec(spec))).toEqual(spec);
  });

  it("formats the rows forms as given", () => {
    expect(formatPartitionSpec({ strategy: "hash-rows", column: "id", rows: "50000" })).toBe("hash:id:rows=50000");
    expect(formatPartitionSpec({ strategy: "range-rows", column: "Id", rows: "9" })).toBe('range:"Id":rows=9');
  });

  it.each([
    ["hash:id:rows=0", /positive integer/],
    ["hash:id:rows=", /positive integer/],
    ["hash:id:rows=-5", /positive integer/],
    ["list:id:rows=5", /goes with hash or range/],
    ["range:id:rows=99999999999999999999", /positive integer/],
  ])("refuses %s", (text, why) => {
    const e = thrown(() => parseSubPartitionSpec(text));
    expect(e.message).toMatch(/^invalid --subpartition-by/);
    expect(e.message).toMatch(why);
    expect(e.hint).toMatch(/rows=<N>/);
  });

  it("refuses rows=N on the first level", () => {
    expect(thrown(() => parseSpecs("hash:id:rows=5")).message).toMatch(/--subpartition-by only/);
  });

  it("puts the second level in `sub`, refuses the first level's column, and formats both", () => {
    const spec = parseSpecs("list:customer_id", "hash:id:rows=50000");
    expect(spec).toEqual({
      strategy: "list",
      column: "customer_id",
      sub: { strategy: "hash-rows", column: "id", rows: "50000" },
    });
    expect(formatSpecs(spec)).toBe("list:customer_id / hash:id:rows=50000");
    expect(formatSpecs(parseSpecs("list:customer_id"))).toBe("list:customer_id");
    expect(partitionColumns(spec)).toEqual(["customer_id", "id"]);
    expect(partitionMethod(spec.sub!)).toBe("HASH");
    expect(partitionMethod(parseSubPartitionSpec("range:id:rows=5"))).toBe("RANGE");
    expect(thrown(() => parseSpecs("list:customer_id", "hash:customer_id:4")).message).toMatch(/first level/);
  });

  it("stores the second level in the migration row and reads an older row (no sub) unchanged", () => {
    const spec = parseSpecs("range:created_at:month", "hash:tenant_id:4");
    expect(PartitionSpecSchema.parse(JSON.parse(JSON.stringify(spec)))).toEqual(spec);
    const old = { strategy: "list", column: "region" };
    expect(PartitionSpecSchema.parse(old)).toEqual(old);
    expect(
      PartitionSpecSchema.safeParse({ ...old, sub: { strategy: "hash-rows", column: "id", rows: "0" } }).success,
    ).toBe(false);
  });

  it("widens the shadow key with the columns of both levels", () => {
    expect(shadowKey(["id"], ["customer_id", "id"])).toEqual(["id", "customer_id"]);
    expect(shadowKey(["tenant_id", "id"], ["created_at", "tenant_id"])).toEqual(["tenant_id", "id", "created_at"]);
    expect(shadowKey(["id"], "created_at")).toEqual(["id", "created_at"]);
  });
});

describe("hash:<col>:rows=N: the modulus", () => {
  it.each([
    [250_000, 50_000n, 5],
    [120_000, 50_000n, 3],
    [50_000, 50_000n, 1],
    [50_001, 50_000n, 2],
    [1, 50_000n, 1],
    [0, 50_000n, 1],
  ])("%i rows by %i per bucket: %i", (rows, n, m) => {
    expect(hashModulus(rows, n)).toBe(m);
  });

  it("sizes each first-level partition from its own rows; DEFAULT from the rows no partition takes", () => {
    const keyed = computeKeyedPartitions(
      { strategy: "list", column: "customer_id" },
      "cmd",
      "int8",
      {
        min: null,
        max: null,
        values: ["1", "2", "3"],
      },
      opts,
    );
    const groups = new Map<string, GroupData>([
      ["1", { rows: 250_000 }],
      ["2", { rows: 120_000 }],
      ["3", { rows: 900 }],
      ["77", { rows: 60_000 }], // a value the list does not know: DEFAULT's
    ]);
    const level1: PartitionDef[] = computeSubPartitions(
      { strategy: "hash-rows", column: "id", rows: "50000" },
      keyed,
      "int8",
      { groups },
      opts,
    );
    const by = new Map(level1.map((p) => [p.name, p.sub!.partitions]));
    expect(by.get("cmd_p_1")!.map((p) => p.bound)).toEqual(
      [0, 1, 2, 3, 4].map((r) => `FOR VALUES WITH (MODULUS 5, REMAINDER ${r})`),
    );
    expect(by.get("cmd_p_2")!.length).toBe(3);
    // one bucket: a single hash partition of modulus 1 (every first-level partition is partitioned the same way)
    expect(by.get("cmd_p_3")!).toEqual([
      { name: "cmd_p_3_p0", bound: "FOR VALUES WITH (MODULUS 1, REMAINDER 0)", isDefault: false },
    ]);
    expect(by.get("cmd_default")!.length).toBe(2);
    expect(level1.every((p) => p.sub?.method === "HASH" && p.sub.column === "id")).toBe(true);
    expect(
      flattenPartitions(level1)
        .map((p) => p.name)
        .slice(0, 3),
    ).toEqual(["cmd_p_1", "cmd_p_1_p0", "cmd_p_1_p1"]);
    expect(plannedTree(level1).slice(0, 2)).toEqual([
      { name: "cmd_p_1", partitioned: true, parent: null },
      { name: "cmd_p_1_p0", partitioned: false, parent: "cmd_p_1" },
    ]);
  });

  it("refuses more partitions than MAX_PARTITIONS over both levels", () => {
    const keyed = computeKeyedPartitions(
      { strategy: "hash", column: "a", modulus: 8 },
      "t",
      "int8",
      {
        min: null,
        max: null,
      },
      opts,
    );
    const groups = new Map<string, GroupData>([...Array(8).keys()].map((i) => [String(i), { rows: 1_000_000 }]));
    expect(() =>
      computeSubPartitions({ strategy: "hash-rows", column: "id", rows: "1000" }, keyed, "int8", { groups }, opts),
    ).toThrow(/more than 5000 partitions/);
  });
});

describe("range:<col>:rows=N: the bounds", () => {
  it("cuts at every N-th value, makes buckets above the max as wide as N rows took, then DEFAULT", () => {
    // 10 rows per bucket over values 100..139 (40 rows): starts at the 1st, 11th, 21st, 31st value
    const group: GroupData = { rows: 40, starts: ["100", "110", "120", "130"], max: "139" };
    const b = rangeRowsBuckets("t_p_1", "int8", 10n, group, 2);
    expect(b.map((p) => p.bound)).toEqual([
      "FOR VALUES FROM (MINVALUE) TO (110)",
      "FOR VALUES FROM (110) TO (120)",
      "FOR VALUES FROM (120) TO (130)",
      "FOR VALUES FROM (130) TO (140)",
      "FOR VALUES FROM (140) TO (150)",
      "FOR VALUES FROM (150) TO (160)",
      "DEFAULT",
    ]);
    expect(b.map((p) => p.name)).toEqual([
      "t_p_1_pmin",
      "t_p_1_p110",
      "t_p_1_p120",
      "t_p_1_p130",
      "t_p_1_p140",
      "t_p_1_p150",
      "t_p_1_default",
    ]);
  });

  it("skips repeated values, stops at the type's maximum, and gives an empty partition one bucket", () => {
    const dup = rangeRowsBuckets("t", "int8", 2n, { rows: 6, starts: ["5", "5", "7"], max: "9" }, 0);
    expect(dup.map((p) => p.bound)).toEqual([
      "FOR VALUES FROM (MINVALUE) TO (7)",
      "FOR VALUES FROM (7) TO (10)",
      "DEFAULT",
    ]);
    const top = rangeRowsBuckets("t", "int2", 10n, { rows: 20, starts: ["32700", "32750"], max: "32767" }, 3);
    expect(top.map((p) => p.bound)).toEqual([
      "FOR VALUES FROM (MINVALUE) TO (32750)",
      "FOR VALUES FROM (32750) TO (MAXVALUE)",
    ]);
    expect(rangeRowsBuckets("t", "int8", 10n, undefined, 3)).toEqual([
      { name: "t_pall", bound: "FOR VALUES FROM (MINVALUE) TO (MAXVALUE)", isDefault: false },
    ]);
  });

  it("keys each month by its UTC start, as the data query groups rows", () => {
    const keyed = computeKeyedPartitions(
      { strategy: "range", column: "created_at", interval: "month" },
      "ev",
      "timestamptz",
      { min: "2025-01-10 00:00:00+00", max: "2025-02-02 00:00:00+00" },
      { premake: 0, now: new Date("2025-02-15T00:00:00Z") },
    );
    expect(keyed.map((p) => p.key)).toEqual(["2025-01-01", "2025-02-01", undefined]);
    const groups = new Map<string, GroupData>([["2025-01-01", { rows: 3, starts: ["1", "3"], max: "5" }]]);
    const level1: PartitionDef[] = computeSubPartitions(
      { strategy: "range-rows", column: "id", rows: "2" },
      keyed,
      "int8",
      { groups },
      opts,
    );
    expect(level1[0]!.sub!.partitions.map((p) => p.bound)[0]).toBe("FOR VALUES FROM (MINVALUE) TO (3)");
    expect(level1[1]!.sub!.partitions.map((p) => p.bound)).toEqual(["FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"]);
    expect(levelGroupSql({ strategy: "range", column: "created_at", interval: "month" }, "timestamptz")).toBe(
      `to_char(date_trunc('month', "created_at", 'UTC'), 'YYYY-MM-DD')`,
    );
    expect(levelGroupSql({ strategy: "range-int", column: "id", width: "1000" }, "int8")).toBe(
      `(floor("id"::numeric / 1000) * 1000)::text`,
    );
    expect(levelGroupSql({ strategy: "hash", column: "id", modulus: 4 }, "int8")).toBeNull();
    expect(rangeRowsSql({ schema: "public", name: "t" }, "g0", "id", "50")).toMatch(/WHERE \(rn - 1\) % 50 = 0 OR/);
  });

  it("repeats a fixed second level under every first-level partition", () => {
    const keyed = computeKeyedPartitions(
      { strategy: "list", column: "c" },
      "t",
      "int8",
      {
        min: null,
        max: null,
        values: ["1", "2"],
      },
      opts,
    );
    const level1: PartitionDef[] = computeSubPartitions(
      { strategy: "hash", column: "tenant_id", modulus: 4 },
      keyed,
      "int4",
      {
        range: { min: null, max: null },
      },
      opts,
    );
    expect(level1.map((p) => p.sub!.partitions.length)).toEqual([4, 4, 4]);
    expect(level1[2]!.sub!.partitions[3]!.name).toBe("t_default_p3");
  });
});
