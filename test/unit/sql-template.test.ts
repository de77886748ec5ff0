import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import {
  DDL_GUARD_TRIGGER,
  DROP_GUARD_TRIGGER,
  ddlGuardSql,
  PARTITION_GUARD_TRIGGER,
} from "../../src/migration/ddl-guard.js";
import { namesInSql } from "../../src/migration/phases.js";
import { SCHEMA_VERSION, schemaSql, upgradeSql } from "../../src/migration/state.js";
import { fillSql, loadSql, sqlFile } from "../../src/sql/template.js";

describe("fillSql", () => {
  it('quotes identifiers, lists of them and table names for :"name"', () => {
    expect(fillSql(`SELECT :"col" FROM :"table"`, { col: 'Or"der', table: { schema: "My Schema", name: "t" } })).toBe(
      `SELECT "Or""der" FROM "My Schema"."t"`,
    );
    expect(fillSql(`INSERT INTO t (:"cols")`, { cols: ["a", "B c"] })).toBe(`INSERT INTO t ("a", "B c")`);
  });

  it("quotes literals for :'name', a table name as its quoted name", () => {
    expect(fillSql(`SELECT :'v', :'t'::regclass`, { v: "it's", t: { schema: "s", name: "Ta'ble" } })).toBe(
      `SELECT 'it''s', '"s"."Ta''ble"'::regclass`,
    );
    expect(fillSql(`SELECT :'v'`, { v: "a\\b" })).toBe(`SELECT E'a\\\\b'`);
  });

  it("inserts SQL text as it is for :name, and one value may fill placeholders of every kind", () => {
    expect(fillSql(`SELECT :expr AS :"n" WHERE x = :'n'`, { expr: "1 + 1", n: "two" })).toBe(
      `SELECT 1 + 1 AS "two" WHERE x = 'two'`,
    );
  });

  it("leaves casts, :=, literals, quoted identifiers and comments alone", () => {
    const text = [
      "x := y::int;",
      "SELECT ':a', '[[:space:]]', ':''b''', \":c\" FROM t; -- :d and it's :'e'",
      "/* :f /* nested :g */ :h */ SELECT 1",
    ].join("\n");
    expect(fillSql(text, {})).toBe(text);
  });

  it("reads no placeholder in the values it inserts", () => {
    expect(fillSql(`SELECT :a, :b`, { a: ":b", b: ":'a'" })).toBe(`SELECT :b, :'a'`);
  });

  it("refuses a placeholder without a value and a value without a placeholder, naming the template", () => {
    expect(() => fillSql(`SELECT :"a", :b`, { a: "x" }, "t.sql")).toThrow(`t.sql: no value for the placeholder :b`);
    expect(() => fillSql(`SELECT :'a'`, { a: "x", extra: "y" }, "t.sql")).toThrow(`t.sql: no placeholder for extra`);
    // A placeholder in a comment is no placeholder: its value is unused.
    expect(() => fillSql(`SELECT 1 -- :a`, { a: "x" })).toThrow(`no placeholder for a`);
  });

  it("refuses a value of a kind its placeholder does not take", () => {
    expect(() => fillSql(`SELECT :'a'`, { a: ["x", "y"] })).toThrow(`:'a' takes one string`);
    expect(() => fillSql(`SELECT :a`, { a: { schema: "s", name: "t" } })).toThrow(`:a takes SQL text`);
    expect(() => fillSql(`SELECT :"a"`, { a: [] })).toThrow(`the list for :"a" is empty`);
  });
});

describe("template files", () => {
  it("are read next to the module, without their header comment and final newline", () => {
    const raw = readFileSync(new URL("../../src/sql/schema/000003.sql", import.meta.url), "utf8");
    expect(raw.startsWith("--")).toBe(true);
    expect(loadSql("schema/000003.sql")).toBe("UPDATE pgshift.schema_version SET version = 3 WHERE version < 3;");
    expect(() => loadSql("schema/999999.sql")).toThrow();
    expect(() => sqlFile("ddl-guard-triggers.sql", {})).toThrow(`ddl-guard-triggers.sql: no value for the placeholder`);
  });

  it("number the schema's versions 1..SCHEMA_VERSION, each raising pgshift.schema_version to its number", () => {
    const files = readdirSync(new URL("../../src/sql/schema/", import.meta.url)).sort();
    expect(files).toEqual(Array.from({ length: SCHEMA_VERSION }, (_, i) => `${String(i + 1).padStart(6, "0")}.sql`));
    expect(schemaSql()).toEqual(upgradeSql(0));
    expect(schemaSql()).toHaveLength(SCHEMA_VERSION);
    expect(upgradeSql(SCHEMA_VERSION)).toEqual([]);
    expect(upgradeSql(3)).toEqual(schemaSql().slice(3));
    schemaSql().forEach((text, i) => {
      const v = i + 1;
      if (v === 1) expect(text).toContain("INSERT INTO pgshift.schema_version SELECT 1 WHERE NOT EXISTS");
      else expect(text.endsWith(`UPDATE pgshift.schema_version SET version = ${v} WHERE version < ${v}`)).toBe(true);
      // plan prints each followed by one semicolon
      expect(text.endsWith(";")).toBe(false);
    });
  });

  it("give the DDL guard the state machine's names of the partitioned table and the copy, none spelled by hand", () => {
    const [fn, triggers] = ddlGuardSql();
    const names = namesInSql();
    expect(fn).toContain(`to_regclass(format('%I.%I', source_schema, ${names.partitioned})) AS root`);
    expect(fn).toContain(`SELECT ${names.partitioned} AS parted, source_schema, source_table`);
    expect(fn).toContain(`SELECT source_schema, source_table, ${names.copy} AS copy_table`);
    // Every CASE in the guard is one of namesInSql's.
    const cases = fn!.match(/CASE WHEN .*? END/g) ?? [];
    expect(cases.length).toBe(5);
    for (const c of cases) expect([names.partitioned, names.copy]).toContain(c);
    for (const [name, event] of [
      [PARTITION_GUARD_TRIGGER, "ddl_command_start"],
      [DDL_GUARD_TRIGGER, "ddl_command_end"],
      [DROP_GUARD_TRIGGER, "sql_drop"],
    ]) {
      expect(triggers).toContain(`evtname = '${name}'`);
      expect(triggers).toContain(`CREATE EVENT TRIGGER ${name} ON ${event}`);
    }
    expect(triggers).toContain(`DROP EVENT TRIGGER IF EXISTS ${DDL_GUARD_TRIGGER};`);
    expect(triggers!.split(`EXECUTE FUNCTION "pgshift"."ddl_guard"();`)).toHaveLength(4);
  });
});
