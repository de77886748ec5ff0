import { expect } from "vitest";
import type { Sql } from "../../src/db.js";
import { compareWithTwin, type KeyKind } from "../../src/load/workload.js";
import type { QualifiedName } from "../../src/names.js";

/**
 * Asserts that each of `tables` (the live table and the copy, say) holds exactly the rows of the independent twin
 * `twin`: no row only in the table, none only in the twin (compareWithTwin).
 */
export async function expectEqualToTwin(
  sql: Sql,
  tables: readonly QualifiedName[],
  twin: QualifiedName,
  keyKind: KeyKind,
): Promise<void> {
  for (const t of tables) {
    expect(await compareWithTwin(sql, t, twin, keyKind), `${t.schema}.${t.name} against the twin`).toMatchObject({
      onlyInTable: 0,
      onlyInTwin: 0,
    });
  }
}
