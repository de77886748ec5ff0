import { readFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { describe, expect, it } from "vitest";
import * as library from "../../src/index.js";

/** The source files `entry` imports, directly or not (relative imports of .js files, mapped to .ts). */
function importedFiles(entry: string): Set<string> {
  const seen = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    const text = readFileSync(file, "utf8");
    for (const m of text.matchAll(/(?:from|import)\s*\(?\s*"(\.{1,2}\/[^"]+)\.js"/g)) {
      visit(join(dirname(file), `${m[1]}.ts`));
    }
  };
  visit(entry);
  return new Set([...seen].map((f) => relative("src", f)));
}

describe("the library's exports (src/index.ts)", () => {
  it("has what a user of the library needs", () => {
    for (const name of [
      "connect",
      "planMigration",
      "startMigration",
      "backfill",
      "verify",
      "cutover",
      "swapBack",
      "finalize",
      "abort",
      "status",
      "sync",
      "PgshiftError",
      "BlockedError",
      "PhaseError",
      "StreamFenced",
      "parseTableName",
      "quoteIdent",
      "parsePartitionSpec",
      "PHASES",
      "TRANSITIONS",
      "NEXT_STEP",
      "allows",
      "tablesIn",
      "formatSteps",
      "statementsOf",
    ]) {
      expect(library, name).toHaveProperty(name);
    }
  });

  it("has neither the demo, its load generator, nor the embedded server", () => {
    for (const name of ["runDemo", "createWorkload", "startLoad", "compareWithTwin", "startEmbedded"]) {
      expect(library, name).not.toHaveProperty(name);
    }
    const files = [...importedFiles("src/index.ts")];
    expect(files).toContain("driver/postgres.ts");
    expect(files.filter((f) => /^(demo|load|cli)\/|^embedded\.ts$/.test(f))).toEqual([]);
  });
});
