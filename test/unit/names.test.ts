import { describe, expect, it } from "vitest";
import { PgshiftError } from "../../src/errors.js";
import {
  displayName,
  fitName,
  MAX_IDENTIFIER_BYTES,
  parseTableName,
  quoteIdent,
  quoteLiteral,
  quoteQualified,
} from "../../src/names.js";

const bytes = (s: string) => Buffer.byteLength(s, "utf8");
/** True when `s` holds a UTF-16 surrogate that is not part of a pair (a split character). */
const hasLoneSurrogate = (s: string) =>
  /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(s);

describe("parseTableName", () => {
  it("puts a bare name in the default schema", () => {
    expect(parseTableName("orders")).toEqual({ schema: "public", name: "orders" });
    expect(parseTableName("orders", "app")).toEqual({ schema: "app", name: "orders" });
  });

  it("folds unquoted parts to lower case", () => {
    expect(parseTableName("Sales.Orders")).toEqual({ schema: "sales", name: "orders" });
    expect(parseTableName("ORDERS")).toEqual({ schema: "public", name: "orders" });
    expect(parseTableName("Sales.Orders", "ignored")).toEqual({ schema: "sales", name: "orders" });
  });

  it("accepts digits, underscores and dollars after the first character", () => {
    expect(parseTableName("_t1$x")).toEqual({ schema: "public", name: "_t1$x" });
    expect(parseTableName("s2.t_2")).toEqual({ schema: "s2", name: "t_2" });
  });

  it("keeps the case and spaces of quoted parts", () => {
    expect(parseTableName('"Order Items"')).toEqual({ schema: "public", name: "Order Items" });
    expect(parseTableName('"My Schema"."Order Items"')).toEqual({ schema: "My Schema", name: "Order Items" });
    expect(parseTableName('sales."Order Items"')).toEqual({ schema: "sales", name: "Order Items" });
    expect(parseTableName('"Sales".Orders')).toEqual({ schema: "Sales", name: "orders" });
  });

  it("undoubles quotes inside quoted parts", () => {
    expect(parseTableName('"a""b"')).toEqual({ schema: "public", name: 'a"b' });
    expect(parseTableName('""""')).toEqual({ schema: "public", name: '"' });
  });

  it("takes reserved words as plain names", () => {
    expect(parseTableName('"select"')).toEqual({ schema: "public", name: "select" });
    expect(parseTableName("select")).toEqual({ schema: "public", name: "select" });
    expect(parseTableName('"user"."table"')).toEqual({ schema: "user", name: "table" });
  });

  it("keeps dots inside quoted parts", () => {
    expect(parseTableName('"a.b"')).toEqual({ schema: "public", name: "a.b" });
    expect(parseTableName('"s.x"."a.b"')).toEqual({ schema: "s.x", name: "a.b" });
    expect(parseTableName('s."v1.2"')).toEqual({ schema: "s", name: "v1.2" });
  });

  it("accepts non-ASCII letters unquoted", () => {
    expect(parseTableName("bestellungen_ö")).toEqual({ schema: "public", name: "bestellungen_ö" });
  });

  // BUG: PostgreSQL in a UTF8 database folds only ASCII letters of unquoted identifiers
  // (downcase_identifier), so `Ärger` names the table "Ärger"; parseTableName lower-cases it to "ärger".
  it("folds only ASCII letters, as PostgreSQL does in a UTF8 database", () => {
    expect(parseTableName("Ärger")).toEqual({ schema: "public", name: "Ärger" });
  });

  it.each([
    ["empty", ""],
    ["trailing dot", "orders."],
    ["leading dot", ".orders"],
    ["two dots", "sales..orders"],
    ["unterminated quote", '"Order Items'],
    ["unterminated quote after schema", 'sales."Order'],
    ["three parts", "db.sales.orders"],
    ["three quoted parts", '"a"."b"."c"'],
    ["spaces unquoted", "order items"],
    ["leading space", " orders"],
    ["trailing space", "orders "],
    ["empty quoted name", '""'],
    ["empty quoted schema", '"".orders'],
    ["leading digit", "1orders"],
    ["dash", "order-items"],
    ["text after a quoted part", '"a"b'],
  ])("throws PgshiftError for %s (%j)", (_why, text) => {
    let caught: unknown;
    try {
      parseTableName(text);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(PgshiftError);
    const err = caught as PgshiftError;
    expect(err.message).toBe(`invalid table name ${JSON.stringify(text)}`);
    expect(err.hint).toMatch(/schema\.table/);
  });
});

describe("quoteIdent / quoteQualified", () => {
  it("always quotes and doubles embedded quotes", () => {
    expect(quoteIdent("orders")).toBe('"orders"');
    expect(quoteIdent("Order Items")).toBe('"Order Items"');
    expect(quoteIdent('a"b')).toBe('"a""b"');
    expect(quoteIdent('"')).toBe('""""');
    expect(quoteIdent("select")).toBe('"select"');
    expect(quoteIdent("a.b")).toBe('"a.b"');
  });

  it("quotes each part of a qualified name", () => {
    expect(quoteQualified({ schema: "public", name: "orders" })).toBe('"public"."orders"');
    expect(quoteQualified({ schema: "My Schema", name: 'Order "Items"' })).toBe('"My Schema"."Order ""Items"""');
    expect(quoteQualified(parseTableName('"s.x"."a.b"'))).toBe('"s.x"."a.b"');
  });

  it("round-trips through parseTableName", () => {
    for (const q of [
      { schema: "public", name: "orders" },
      { schema: "My Schema", name: "Order Items" },
      { schema: 'we"ird', name: 'a""b.c' },
      { schema: "Ärger", name: "日本" },
    ]) {
      expect(parseTableName(quoteQualified(q))).toEqual(q);
    }
  });
});

describe("quoteLiteral", () => {
  it("single-quotes plain values", () => {
    expect(quoteLiteral("abc")).toBe("'abc'");
    expect(quoteLiteral("")).toBe("''");
    expect(quoteLiteral('say "hi"')).toBe(`'say "hi"'`);
  });

  it("doubles single quotes", () => {
    expect(quoteLiteral("it's")).toBe("'it''s'");
    expect(quoteLiteral("'")).toBe("''''");
  });

  it("uses E'' with doubled backslashes when the value has a backslash", () => {
    expect(quoteLiteral("a\\b")).toBe("E'a\\\\b'");
    expect(quoteLiteral("\\")).toBe("E'\\\\'");
    expect(quoteLiteral("it's C:\\dir\\")).toBe("E'it''s C:\\\\dir\\\\'");
    // Read as the characters a PostgreSQL user would see:
    expect(quoteLiteral("x\\'y")).toBe(String.raw`E'x\\''y'`);
  });
});

describe("displayName", () => {
  it("leaves plain lower-case identifiers unquoted", () => {
    expect(displayName({ schema: "public", name: "orders" })).toBe("public.orders");
    expect(displayName({ schema: "s_1", name: "t$2" })).toBe("s_1.t$2");
  });

  it("quotes parts that need it", () => {
    expect(displayName({ schema: "My Schema", name: "Order Items" })).toBe('"My Schema"."Order Items"');
    expect(displayName({ schema: "public", name: "Orders" })).toBe('public."Orders"');
    expect(displayName({ schema: "public", name: 'a"b' })).toBe('public."a""b"');
    expect(displayName({ schema: "public", name: "a.b" })).toBe('public."a.b"');
    expect(displayName({ schema: "public", name: "9lives" })).toBe('public."9lives"');
  });
});

describe("fitName", () => {
  it("is 63 bytes", () => {
    expect(MAX_IDENTIFIER_BYTES).toBe(63);
  });

  it("leaves names that fit alone", () => {
    expect(fitName("orders", "_p2024_01")).toBe("orders_p2024_01");
    expect(fitName("orders", "")).toBe("orders");
    const exact = "a".repeat(54);
    expect(fitName(exact, "_p2024_01")).toBe(`${exact}_p2024_01`);
    expect(bytes(fitName(exact, "_p2024_01"))).toBe(63);
  });

  it("cuts an ASCII base so that base + suffix is exactly 63 bytes", () => {
    const out = fitName("a".repeat(100), "_default");
    expect(out).toBe(`${"a".repeat(55)}_default`);
    expect(bytes(out)).toBe(63);
    expect(fitName("b".repeat(70), "")).toBe("b".repeat(63));
  });

  it("counts bytes, not characters, for two-byte characters", () => {
    const out = fitName("é".repeat(40), "_x"); // 80 bytes of base; room 61 -> 30 characters (60 bytes)
    expect(out).toBe(`${"é".repeat(30)}_x`);
    expect(bytes(out)).toBe(62);
  });

  it("counts bytes for three-byte characters", () => {
    const out = fitName("日".repeat(30), "_p0"); // room 60 -> 20 characters
    expect(out).toBe(`${"日".repeat(20)}_p0`);
    expect(bytes(out)).toBe(63);
    const mixed = fitName(`ab${"日".repeat(30)}`, "_p0"); // room 60: 2 + 19*3 = 59, one more would be 62
    expect(mixed).toBe(`ab${"日".repeat(19)}_p0`);
    expect(bytes(mixed)).toBe(62);
  });

  it("keeps the suffix whole and the base as a prefix", () => {
    const base = "Bestellungsübersicht_für_das_Geschäftsjahr_mit_Überlänge_und_mehr";
    const out = fitName(base, "_pgshift_shadow");
    expect(out.endsWith("_pgshift_shadow")).toBe(true);
    expect(base.startsWith(out.slice(0, -"_pgshift_shadow".length))).toBe(true);
    expect(bytes(out)).toBeLessThanOrEqual(63);
    expect(bytes(out)).toBeGreaterThan(60);
  });

  it("drops a whole four-byte character when the fit is tighter than the character", () => {
    // 58 + 4 = 62 bytes before "abc", room 60: the emoji cannot stay (and half of it would be 61 bytes)
    const out = fitName(`${"x".repeat(58)}😀abc`, "_p1");
    expect(out).toBe(`${"x".repeat(58)}_p1`);
    expect(bytes(out)).toBe(61);
    expect(hasLoneSurrogate(out)).toBe(false);
    // 56 + 4 = 60 bytes: the emoji stays whole
    expect(fitName(`${"x".repeat(56)}😀abc`, "_p1")).toBe(`${"x".repeat(56)}😀_p1`);
  });

  // BUG: fitName trims one UTF-16 code unit at a time. When dropping only the low surrogate of an
  // astral character makes the (lone high surrogate, encoded by TextEncoder as U+FFFD, 3 bytes) text fit,
  // it stops there and returns a string with half a character.
  it("never splits a surrogate pair (astral characters such as emoji)", () => {
    const out = fitName(`${"x".repeat(57)}😀abc`, "_p1"); // room 60: 57 + 3 (lone surrogate) fits
    expect(hasLoneSurrogate(out)).toBe(false);
    expect(out).toBe(`${"x".repeat(57)}_p1`);
  });
});
