import { describe, expect, it } from "vitest";
import { PgshiftError } from "../../src/errors.js";
import {
  formatPartitionSpec,
  type PartitionSpec,
  PartitionSpecSchema,
  parsePartitionSpec,
  partitionMethod,
  TIME_INTERVALS,
} from "../../src/partitioning/spec.js";

/** Runs `fn`, expects a PgshiftError, returns it for further checks. */
function thrown(fn: () => unknown): PgshiftError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(PgshiftError);
    return err as PgshiftError;
  }
  throw new Error("expected a PgshiftError, nothing was thrown");
}

describe("parsePartitionSpec: valid forms", () => {
  it.each(TIME_INTERVALS.map((i) => [i]))("range:<col>:%s", (interval) => {
    expect(parsePartitionSpec(`range:created_at:${interval}`)).toEqual({
      strategy: "range",
      column: "created_at",
      interval,
    });
  });

  it("folds the interval and the strategy to lower case", () => {
    expect(parsePartitionSpec("RANGE:created_at:MONTH")).toEqual({
      strategy: "range",
      column: "created_at",
      interval: "month",
    });
    expect(parsePartitionSpec("Range:created_at:Quarter")).toEqual({
      strategy: "range",
      column: "created_at",
      interval: "quarter",
    });
    expect(parsePartitionSpec("LIST:tenant")).toEqual({ strategy: "list", column: "tenant" });
    expect(parsePartitionSpec("Hash:id:8")).toEqual({ strategy: "hash", column: "id", modulus: 8 });
  });

  it("range:<col>:<N> is an integer range with the width kept as a decimal string", () => {
    expect(parsePartitionSpec("range:id:1000000")).toEqual({ strategy: "range-int", column: "id", width: "1000000" });
    expect(parsePartitionSpec("range:id:1")).toEqual({ strategy: "range-int", column: "id", width: "1" });
  });

  it("accepts a width up to 2^62 and no more", () => {
    const max = (2n ** 62n).toString();
    expect(parsePartitionSpec(`range:id:${max}`)).toEqual({
      strategy: "range-int",
      column: "id",
      width: "4611686018427387904",
    });
    thrown(() => parsePartitionSpec(`range:id:${(2n ** 62n + 1n).toString()}`));
    thrown(() => parsePartitionSpec("range:id:99999999999999999999999"));
  });

  it("list:<col>", () => {
    expect(parsePartitionSpec("list:tenant_id")).toEqual({ strategy: "list", column: "tenant_id" });
  });

  it("hash:<col>:<modulus> for the bounds 2 and 1024", () => {
    expect(parsePartitionSpec("hash:id:16")).toEqual({ strategy: "hash", column: "id", modulus: 16 });
    expect(parsePartitionSpec("hash:id:2")).toEqual({ strategy: "hash", column: "id", modulus: 2 });
    expect(parsePartitionSpec("hash:id:1024")).toEqual({ strategy: "hash", column: "id", modulus: 1024 });
  });

  it("folds unquoted column names to lower case", () => {
    expect(parsePartitionSpec("range:CreatedAt:day")).toEqual({
      strategy: "range",
      column: "createdat",
      interval: "day",
    });
    expect(parsePartitionSpec("list:Tenant_ID")).toEqual({ strategy: "list", column: "tenant_id" });
    expect(parsePartitionSpec("hash:ID:4")).toEqual({ strategy: "hash", column: "id", modulus: 4 });
  });

  it("accepts unquoted names with digits, underscores and dollars after the first character", () => {
    expect(parsePartitionSpec("list:_a1$b")).toEqual({ strategy: "list", column: "_a1$b" });
  });

  it("keeps the case and spaces of quoted columns", () => {
    expect(parsePartitionSpec('range:"Created At":week')).toEqual({
      strategy: "range",
      column: "Created At",
      interval: "week",
    });
    expect(parsePartitionSpec('list:"TenantId"')).toEqual({ strategy: "list", column: "TenantId" });
    expect(parsePartitionSpec('hash:"Id":3')).toEqual({ strategy: "hash", column: "Id", modulus: 3 });
  });

  it("undoubles quotes inside quoted columns and allows colons there", () => {
    expect(parsePartitionSpec('list:"say ""hi"""')).toEqual({ strategy: "list", column: 'say "hi"' });
    expect(parsePartitionSpec('range:"a:b":month')).toEqual({ strategy: "range", column: "a:b", interval: "month" });
    expect(parsePartitionSpec('range:"""":10')).toEqual({ strategy: "range-int", column: '"', width: "10" });
  });

  it("every result satisfies the stored JSON schema", () => {
    for (const t of ["range:a:day", "range:a:5", "list:a", "hash:a:7", 'list:"X y"']) {
      const spec = parsePartitionSpec(t);
      expect(PartitionSpecSchema.parse(JSON.parse(JSON.stringify(spec)))).toEqual(spec);
    }
  });
});

describe("parsePartitionSpec: malformed input throws PgshiftError", () => {
  const cases: [string, string, RegExp][] = [
    ["no colon at all", "created_at", /missing the column/],
    ["empty text", "", /missing the column/],
    ["missing column", "range::month", /is not a column name/],
    ["missing column, only strategy", "list:", /is not a column name/],
    ["empty quoted column", 'list:""', /empty column name/],
    ["unterminated quoted column", 'range:"created_at:month', /unterminated quoted column name/],
    ["column starting with a digit", "list:1abc", /is not a column name/],
    ["column with a space unquoted", "list:tenant id", /is not a column name/],
    ["column with a dash unquoted", "list:tenant-id", /is not a column name/],
    ["unknown strategy", "interval:created_at:month", /unknown strategy "interval"/],
    ["empty strategy", ":created_at:month", /unknown strategy ""/],
    ["range without a parameter", "range:created_at", /range needs an interval/],
    ["range with an empty parameter", "range:created_at:", /range needs an interval/],
    [
      "bad interval",
      "range:created_at:fortnight",
      /is neither day, week, month, quarter, year nor a positive integer width/,
    ],
    ["plural interval", "range:created_at:months", /is neither/],
    ["zero width", "range:id:0", /is neither/],
    ["negative width", "range:id:-10", /is neither/],
    ["width with a leading zero", "range:id:010", /is neither/],
    ["fractional width", "range:id:1.5", /is neither/],
    ["hash without modulus", "hash:id", /hash needs a modulus/],
    ["hash with empty modulus", "hash:id:", /hash needs a modulus/],
    ["hash modulus not a number", "hash:id:four", /hash needs a modulus/],
    ["hash modulus 1", "hash:id:1", /between 2 and 1024/],
    ["hash modulus 0", "hash:id:0", /between 2 and 1024/],
    ["hash modulus 1025", "hash:id:1025", /between 2 and 1024/],
    ["hash modulus 2000", "hash:id:2000", /between 2 and 1024/],
    ["trailing junk after the interval", "range:created_at:month:x", /is neither/],
    ["trailing junk after the modulus", "hash:id:16:x", /hash needs a modulus/],
    ["trailing text after a quoted column", 'list:"Tenant"x', /expected ':' after the column/],
    ["list with a param", "list:tenant_id:5", /list takes only a column/],
    ["list with an empty param", "list:tenant_id:", /list takes only a column/],
  ];
  it.each(cases)("%s: %j", (_why, text, message) => {
    const err = thrown(() => parsePartitionSpec(text));
    expect(err.message).toMatch(message);
    expect(err.message).toContain(`invalid --partition-by ${JSON.stringify(text)}`);
    expect(err.hint).toBe(
      "use range:<column>:<day|week|month|quarter|year>, range:<column>:<width>, list:<column> or " +
        "hash:<column>:<modulus>",
    );
    expect(err.exitCode).toBe(2);
  });
});

describe("formatPartitionSpec", () => {
  it("writes each strategy in its command-line form", () => {
    expect(formatPartitionSpec({ strategy: "range", column: "created_at", interval: "quarter" })).toBe(
      "range:created_at:quarter",
    );
    expect(formatPartitionSpec({ strategy: "range-int", column: "id", width: "250000" })).toBe("range:id:250000");
    expect(formatPartitionSpec({ strategy: "list", column: "tenant_id" })).toBe("list:tenant_id");
    expect(formatPartitionSpec({ strategy: "hash", column: "id", modulus: 32 })).toBe("hash:id:32");
  });

  it("quotes columns that are not plain lower-case identifiers, doubling quotes", () => {
    expect(formatPartitionSpec({ strategy: "range", column: "Created At", interval: "month" })).toBe(
      'range:"Created At":month',
    );
    expect(formatPartitionSpec({ strategy: "list", column: "CamelCase" })).toBe('list:"CamelCase"');
    expect(formatPartitionSpec({ strategy: "list", column: 'say "hi"' })).toBe('list:"say ""hi"""');
    expect(formatPartitionSpec({ strategy: "hash", column: "a:b", modulus: 2 })).toBe('hash:"a:b":2');
    expect(formatPartitionSpec({ strategy: "list", column: "1st" })).toBe('list:"1st"');
  });

  const specs: PartitionSpec[] = [
    ...TIME_INTERVALS.map((interval): PartitionSpec => ({ strategy: "range", column: "created_at", interval })),
    { strategy: "range", column: "Created At", interval: "day" },
    { strategy: "range-int", column: "id", width: "1000" },
    { strategy: "range-int", column: 'we"ird', width: "4611686018427387904" },
    { strategy: "list", column: "tenant_id" },
    { strategy: "list", column: 'say "hi"' },
    { strategy: "list", column: '"' },
    { strategy: "list", column: "ärger" },
    { strategy: "hash", column: "id", modulus: 2 },
    { strategy: "hash", column: "Order ID", modulus: 1024 },
  ];
  it.each(specs.map((s) => [formatPartitionSpec(s), s] as const))("round-trips %s", (_text, spec) => {
    expect(parsePartitionSpec(formatPartitionSpec(spec))).toEqual(spec);
  });

  it.each([
    "range:created_at:month",
    "range:id:1000000",
    "list:tenant_id",
    "hash:id:16",
    'range:"Created At":week',
    'list:"say ""hi"""',
  ])("formats the parse of %s back to the same text", (text) => {
    expect(formatPartitionSpec(parsePartitionSpec(text))).toBe(text);
  });

  it("normalises folded input", () => {
    expect(formatPartitionSpec(parsePartitionSpec("RANGE:CreatedAt:Month"))).toBe("range:createdat:month");
    expect(formatPartitionSpec(parsePartitionSpec('list:"lower"'))).toBe("list:lower");
  });
});

describe("partitionMethod", () => {
  it("maps strategies to PARTITION BY methods", () => {
    expect(partitionMethod(parsePartitionSpec("range:a:day"))).toBe("RANGE");
    expect(partitionMethod(parsePartitionSpec("range:a:10"))).toBe("RANGE");
    expect(partitionMethod(parsePartitionSpec("list:a"))).toBe("LIST");
    expect(partitionMethod(parsePartitionSpec("hash:a:3"))).toBe("HASH");
  });
});
