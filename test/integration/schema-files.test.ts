import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { namesInSql, PHASES, tablesIn } from "../../src/migration/phases.js";
import { loadMigration, SCHEMA_VERSION, schemaSql } from "../../src/migration/state.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * The SQL kept in files, against the real server: namesInSql (the state machine's names as SQL, filled into the
 * DDL guard) answers as tablesIn does for a row in every phase; the schema's numbered files give, from any older
 * version, the schema a fresh install has, and each can run again without lowering the version.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

describe("namesInSql on the server", () => {
  const row = {
    source_schema: "Some Schema",
    source_table: "Orders",
    shadow_table: "Orders_pgshift_shadow",
    retired_table: "Orders_pgshift_retired",
  };
  for (const alias of ["", "m"]) {
    it(`names the same tables as tablesIn in every phase${alias ? " (with an alias)" : ""}`, async () => {
      const names = namesInSql(alias);
      for (const phase of PHASES) {
        const rows = await db.admin.unsafe(
          `SELECT ${names.live} AS live, ${names.copy} AS copy, ${names.original} AS original,
                  ${names.partitioned} AS partitioned
             FROM (VALUES ($1, $2, $3, $4, $5)) AS ${alias || "migrations"}
                  (source_schema, source_table, shadow_table, retired_table, phase)`,
          [row.source_schema, row.source_table, row.shadow_table, row.retired_table, phase],
        );
        const t = tablesIn(row, phase);
        expect(rows[0], phase).toEqual({
          live: t.live.name,
          copy: t.copy.name,
          original: t.original.name,
          partitioned: t.partitioned.name,
        });
        for (const n of Object.values(t)) expect(n.schema).toBe(row.source_schema);
      }
    });
  }
});

describe("the schema's numbered files", () => {
  const columns = async () =>
    (
      await db.admin`select attname::text as n, format_type(atttypid, atttypmod) as t, attnotnull as nn
                       from pg_attribute where attrelid = 'pgshift.migrations'::regclass and attnum > 0
                        and not attisdropped order by 1`
    ).map((r) => `${String(r.n)} ${String(r.t)}${r.nn ? " not null" : ""}`);
  const version = async () => Number((await db.admin`select max(version) as v from pgshift.schema_version`)[0]!.v);
  const truncateGuard = async () =>
    Number((await db.admin`select count(*)::int as n from pg_proc where proname = 'truncate_guard'`)[0]!.n);

  it("bring a schema of every older version to the fresh install's, and run again changing nothing", async () => {
    await db.admin`drop schema if exists pgshift cascade`;
    for (const file of schemaSql()) await db.admin.unsafe(file);
    expect(await version()).toBe(SCHEMA_VERSION);
    const fresh = await columns();
    expect(fresh).toContain("copies_lsn text");
    expect(await truncateGuard()).toBe(1);
    // Again, every file: idempotent, and none lowers the version.
    for (const file of schemaSql()) await db.admin.unsafe(file);
    expect(await version()).toBe(SCHEMA_VERSION);
    expect(await columns()).toEqual(fresh);

    for (let old = 1; old < SCHEMA_VERSION; old++) {
      await db.admin`drop schema pgshift cascade`;
      for (const file of schemaSql().slice(0, old)) await db.admin.unsafe(file);
      expect(await version(), `version ${old}`).toBe(old);
      expect((await columns()).includes("copies_lsn text"), `version ${old}`).toBe(old >= 2);
      // The first command that writes state upgrades it (no migration of this table: null).
      expect(await loadMigration(db.sql, { schema: "public", name: "none" })).toBeNull();
      expect(await version(), `from version ${old}`).toBe(SCHEMA_VERSION);
      expect(await columns(), `from version ${old}`).toEqual(fresh);
      expect(await truncateGuard()).toBe(1);
    }
  });
});
