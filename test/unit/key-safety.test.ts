import { describe, expect, it } from "vitest";
import { dependentsFromDetail } from "../../src/migration/finish.js";
import { mirrorFunctionSql, type TriggerMirrorSpec } from "../../src/mirror/trigger.js";

describe("mirrorFunctionSql, writes: strict (the reverse mirror into the retired table)", () => {
  const base: TriggerMirrorSpec = {
    fn: { schema: "pgshift", name: "mirror_16384" },
    from: { schema: "public", name: "orders" },
    to: { schema: "public", name: "orders_pgshift_retired" },
    columns: ["id", "created_at", "status"],
    key: ["id"],
    overridingSystemValue: false,
    writes: "strict",
  };

  it("inserts plainly, updates by the old key, deletes by the old key: never ON CONFLICT", () => {
    const sql = mirrorFunctionSql(base);
    expect(sql).not.toContain("ON CONFLICT");
    expect(sql).toContain(
      `INSERT INTO "public"."orders_pgshift_retired" ("id", "created_at", "status")\n    VALUES (NEW."id", ` +
        `NEW."created_at", NEW."status");`,
    );
    expect(sql).toContain(
      `UPDATE "public"."orders_pgshift_retired" SET "id" = NEW."id", "created_at" = NEW."created_at", "status" = ` +
        `NEW."status" WHERE ("id") = (OLD."id");`,
    );
    expect(sql).toContain(`DELETE FROM "public"."orders_pgshift_retired" WHERE ("id") = (OLD."id");`);
    // an UPDATE that found its row is done; one that did not (the row is missing) inserts it
    expect(sql).toMatch(
      /IF TG_OP = 'UPDATE' THEN\n.*\n {4}IF FOUND THEN\n {6}RETURN NULL;\n {4}END IF;\n {2}END IF;\n {2}INSERT INTO/,
    );
  });

  it(
    "sets a GENERATED ALWAYS identity column only when it changed (the retired table then refuses as the " +
      "original did)",
    () => {
      const sql = mirrorFunctionSql({ ...base, overridingSystemValue: true, alwaysIdentity: ["id"] });
      expect(sql).toContain(
        `IF (OLD."id") IS DISTINCT FROM (NEW."id") THEN
      UPDATE "public"."orders_pgshift_retired" SET "id" = NEW."id", "created_at" = NEW."created_at", "status" = ` +
          `NEW."status" WHERE ("id") = (OLD."id");
    ELSE
      UPDATE "public"."orders_pgshift_retired" SET "created_at" = NEW."created_at", "status" = NEW."status" WHERE ` +
          `("id") = (OLD."id");
    END IF;`,
      );
      expect(sql).toContain(`("id", "created_at", "status") OVERRIDING SYSTEM VALUE\n    VALUES`);
    },
  );

  it("keeps the forward mirror an upsert (the default)", () => {
    const { writes: _, ...forward } = base;
    expect(mirrorFunctionSql(forward)).toContain(`ON CONFLICT ("id") DO UPDATE SET`);
    expect(mirrorFunctionSql({ ...base, writes: "upsert" })).toBe(mirrorFunctionSql(forward));
  });
});

describe("dependentsFromDetail", () => {
  it("reads the objects out of the DETAIL of a DROP refused with dependent_objects_still_exist", () => {
    const detail = [
      "view fin_deps_report depends on table fin_deps_pgshift_retired",
      "function fin_deps_count() depends on table fin_deps_pgshift_retired",
      "column snapshot of table fin_deps_archive depends on type fin_deps_pgshift_retired",
      "constraint fin_deps_child_parent_fkey on table fin_deps_child depends on table fin_deps_pgshift_retired",
    ].join("\n");
    expect(dependentsFromDetail(detail)).toEqual([
      "view fin_deps_report",
      "function fin_deps_count()",
      "column snapshot of table fin_deps_archive",
      "constraint fin_deps_child_parent_fkey on table fin_deps_child",
    ]);
  });
});
